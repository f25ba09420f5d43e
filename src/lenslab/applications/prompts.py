"""Multiple-choice prompt files: one JSON object per line.

Each line holds the prompt, the answer choices to score and, depending on the use, the index of the correct
choice (``answer``, needed to build few-shot attacks) and whether the prompt is normal or attacked (``label``,
used only to score a detector)::

    {"prompt": "Q: 2 + 2 =\\nA:", "choices": [" 4", " 5"], "answer": 0, "label": "normal"}

Choices are appended to the prompt as they are written, so they normally start with the space that
separates them from the prompt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lenslab.errors import LensLabError
from lenslab.io import atomic_write

LABELS = ("normal", "anomalous")
"""Values of the ``label`` field."""


@dataclass
class ChoicePrompt:
    """One multiple-choice prompt."""

    prompt: str
    """Text the model reads; the answer is predicted after its last token."""
    choices: list[str]
    """Continuations to score, appended to ``prompt`` verbatim."""
    answer: int | None = None
    """Index of the correct choice, when known."""
    label: str | None = None
    """``"normal"`` or ``"anomalous"`` (scoring only), when known."""
    attack: str | None = None
    """Kind of attack applied by ``lenslab.applications.attacks``, None for an untouched prompt."""

    def to_json(self) -> dict:
        """The record as written to a JSONL line; fields that are None are left out."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def read_choice_prompts(path: str | Path, flag: str) -> list[ChoicePrompt]:
    """Read a JSONL file of multiple-choice prompts; ``flag`` names the CLI option in error messages.

    Every record must have a string ``prompt`` and a non-empty list of string ``choices``; ``answer``, when
    present, must index them and ``label`` must be one of ``LABELS``. An empty file is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise LensLabError(f"{flag} {path} does not exist; pass a JSONL file of multiple-choice prompts.")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            records.append(_parse(line, f"{flag} {path} line {number}"))
    if not records:
        raise LensLabError(f"{flag} {path} holds no prompts; pass a JSONL file with one prompt object per line.")
    return records


def write_choice_prompts(path: str | Path, records: list[ChoicePrompt]) -> None:
    """Write ``records`` as JSONL (UTF-8, one object per line), atomically."""
    text = "".join(json.dumps(record.to_json(), ensure_ascii=False) + "\n" for record in records)
    atomic_write(Path(path), lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _parse(line: str, where: str) -> ChoicePrompt:
    """One record from one JSONL line; ``where`` locates it in error messages."""
    fix = 'write it as {"prompt": "...", "choices": ["...", "..."]}'
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as error:
        raise LensLabError(f"{where} is not valid JSON ({error.msg}); {fix}.") from None
    if not isinstance(raw, dict):
        raise LensLabError(f"{where} holds a {type(raw).__name__}, not an object; {fix}.")
    prompt, choices = raw.get("prompt"), raw.get("choices")
    if not isinstance(prompt, str):
        raise LensLabError(f"{where} has no string 'prompt' field; {fix}.")
    if not isinstance(choices, list) or not choices or not all(isinstance(choice, str) for choice in choices):
        raise LensLabError(f"{where} has choices={choices!r} where a non-empty list of strings was expected; {fix}.")
    answer, label = raw.get("answer"), raw.get("label")
    if answer is not None and (type(answer) is not int or not 0 <= answer < len(choices)):
        raise LensLabError(
            f"{where} has answer={answer!r} where the index of a choice (0..{len(choices) - 1}) was expected; "
            "give 'answer' as the position of the correct choice in 'choices'."
        )
    if label is not None and label not in LABELS:
        raise LensLabError(f"{where} has label={label!r}; give 'label' as one of {', '.join(LABELS)}.")
    return ChoicePrompt(prompt, choices, answer, label, raw.get("attack"))
