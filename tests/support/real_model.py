"""Settings the real-model tier (tests/real) shares between its fixtures and its tests."""

from pathlib import Path

EXAMPLE_TEXT = Path(__file__).parents[2] / "examples" / "persuasion.txt"
"""Jane Austen's *Persuasion* (public domain), shipped with lenslab for its README command."""
SEQ_LEN = 128
"""Tokens per sequence in every real-model test: short, since vocabulary-wide work runs at tens of tokens/s."""
