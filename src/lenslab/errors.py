"""The exception type lenslab raises for bad input.

Every message is a single sentence that says what was found, what was expected and the argument or
flag that fixes it; the CLI prints it and exits with status 2 instead of a traceback.
"""


class LensLabError(ValueError):
    """Bad input that the user can fix: an unreadable model, a lens for another model, too little data."""


class LensModelMismatch(LensLabError):
    """A lens loaded onto a model whose unembedding differs from the one it was trained for (callers that know
    better than `compatibility.check_compatible`'s advice to relax the check catch this one)."""
