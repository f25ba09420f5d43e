"""Helpers shared by lenslab's tests that are too big for a conftest: the small trained causal LM."""
