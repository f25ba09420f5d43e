"""The tuned lens paper's applications, each a consumer of lenses and residuals.

- ``detect``: anomaly / prompt-injection detection from multiple-choice prediction trajectories
  (``attacks`` builds attacked test sets, ``prompts`` reads and writes the prompt files);
- ``depth``: prediction depth of tokens, its correlation with loss and with when training learned them;
- ``transfer``: a base model's tuned lens applied to a fine-tuned relative.
"""
