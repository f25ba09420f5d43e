"""Detect anomalous (e.g. prompt-injected) inputs from the trajectory of a multiple-choice prediction.

The tuned lens paper (Belrose et al. 2023, section 5) fits unsupervised anomaly detectors to the way a
model's answer forms across layers. For every prompt:

1. each choice is appended to the prompt and scored at every lens position: its log-probability is the
   sum of the lens's log-probabilities of all its tokens (the whole continuation, not only its first
   token), each read where the model predicts it. For a one-token choice this is the lens's
   log-probability of that token at the last prompt token;
2. per lens position, these are normalised over the choices (``log_softmax``), so the features are
   log-probabilities of a distribution over the same answers at every layer whatever the prompt;
3. the ``[positions, choices]`` trajectory is flattened into the prompt's feature vector.

Isolation Forest and Local Outlier Factor (``novelty=True``) from scikit-learn are fitted on normal prompts
only and score a test set; each gets an AUROC (``sklearn.metrics.roc_auc_score``) with a 95% interval from a
stratified percentile bootstrap (anomalous and normal test prompts resampled separately, so every resample
holds both). The baseline is the Mahalanobis distance of the final-layer residual at the last prompt token,
under a Ledoit-Wolf covariance fitted on the normal prompts.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import mannwhitneyu
from sklearn.covariance import LedoitWolf
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import LocalOutlierFactor
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lenslab.adapter import ModelView
from lenslab.applications.prompts import ChoicePrompt
from lenslab.errors import LensLabError
from lenslab.lenses import Lens, row_chunks

logger = logging.getLogger(__name__)

TRAJECTORY_DETECTORS = ("isolation_forest", "lof")
"""Detectors fitted on each lens's prediction trajectories."""
BASELINE = "final_residual/mahalanobis"
"""Report key of the baseline detector."""
LOF_NEIGHBORS = 20
"""scikit-learn's default neighbourhood, lowered to the number of normal prompts minus one when there are fewer."""


class PromptFeatures(NamedTuple):
    """What the detectors see of a set of prompts."""

    trajectories: dict[str, np.ndarray]
    """Lens name -> [n_prompts, num_positions, n_choices] choice log-probabilities, normalised over the choices."""
    final_residual: np.ndarray
    """[n_prompts, d_model] residual at the last lens position (before the final norm) at the last prompt token."""


@dataclass
class DetectorScore:
    """How well one detector separates anomalous from normal test prompts."""

    auroc: float
    """Area under the ROC curve of the anomaly scores (1 = perfect, 0.5 = chance)."""
    ci95: tuple[float, float]
    """2.5th and 97.5th percentiles of the AUROC over stratified bootstrap resamples."""


@dataclass
class DetectionReport:
    """AUROC of every detector; ``to_json()`` is the ``lenslab detect`` report."""

    detectors: dict[str, DetectorScore]
    """``"<lens>/<detector>"`` (and ``BASELINE``) -> score."""
    n_normal: int
    """Normal prompts the detectors were fitted on."""
    n_test_normal: int
    """Normal prompts in the test set."""
    n_test_anomalous: int
    """Anomalous prompts in the test set."""
    bootstrap: dict = field(default_factory=dict)
    """How the intervals were made: resamples, seed and method."""

    def to_json(self) -> dict:
        report = asdict(self)
        for score in report["detectors"].values():
            score["ci95"] = list(score["ci95"])
        return report


def choice_features(
    view: ModelView,
    tokenizer: PreTrainedTokenizerBase,
    lenses: dict[str, Lens],
    prompts: list[ChoicePrompt],
    *,
    batch_size: int = 16,
) -> PromptFeatures:
    """Prediction trajectories of the choices of every prompt under every lens (see the module docstring).

    One forward per (prompt, choice) sequence, ``batch_size`` sequences at a time, right-padded. Every prompt
    must have as many choices as the first, and every choice must be at least one token.
    """
    sequences = _tokenize(tokenizer, prompts)
    n_choices = len(prompts[0].choices)
    trajectories = {name: np.zeros((len(prompts), view.num_positions, n_choices)) for name in lenses}
    final_residual = np.zeros((len(prompts), view.d_model))
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(s.ids) for s in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # right-padded; the mask hides the padding
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, sequence in enumerate(batch):
            input_ids[row, : len(sequence.ids)] = torch.tensor(sequence.ids)
            attention_mask[row, : len(sequence.ids)] = 1
        # Every choice token, flattened over the batch: its row, the position that predicts it, and the token.
        rows = torch.cat([torch.full((len(s.ids) - s.prompt_length,), row) for row, s in enumerate(batch)])
        positions = torch.cat([torch.arange(s.prompt_length - 1, len(s.ids) - 1) for s in batch])
        targets = torch.tensor([token for s in batch for token in s.ids[s.prompt_length :]])
        prompt_index = [s.prompt_index for s in batch]
        choice_index = [s.choice_index for s in batch]
        with torch.inference_mode():
            hidden = view.capture(input_ids.to(view.device), attention_mask.to(view.device), need_logits=False).hidden
            for name, lens in lenses.items():
                for position, h in enumerate(hidden):
                    token_log_probs = _token_log_probs(lens, position, h[rows, positions], targets)  # [choice tokens]
                    sums = torch.zeros(len(batch)).index_add_(0, rows, token_log_probs)  # [batch]
                    trajectories[name][prompt_index, position, choice_index] = sums.numpy()
            last_prompt_token = torch.tensor([s.prompt_length - 1 for s in batch])
            final_residual[prompt_index] = hidden[-1][torch.arange(len(batch)), last_prompt_token].float().cpu().numpy()
    for name, values in trajectories.items():
        # Normalised over the choices: a distribution over the same answers at every lens position.
        trajectories[name] = torch.from_numpy(values).log_softmax(-1).numpy()
    return PromptFeatures(trajectories, final_residual)


def _token_log_probs(lens: Lens, position: int, h: Tensor, targets: Tensor) -> Tensor:
    """The lens's log-probability of each target token, decoded a slice of tokens at a time (`row_chunks`).

    h: [n, d_model] residuals at lens ``position``; targets: [n] token ids -> [n] float32 on the CPU.
    """
    targets = targets.to(h.device)
    pieces = []
    for rows in row_chunks(len(h), lens.view.vocab_size):
        log_probs = lens(h[rows], position).float().log_softmax(-1)  # [chunk, vocab]
        pieces.append(log_probs.gather(-1, targets[rows, None])[:, 0].cpu())
    return torch.cat(pieces)


class _Sequence(NamedTuple):
    prompt_index: int
    choice_index: int
    ids: list[int]
    """Prompt tokens then choice tokens."""
    prompt_length: int


def _tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[ChoicePrompt]) -> list[_Sequence]:
    """One sequence per (prompt, choice): the prompt as the tokenizer encodes text (BOS included), then the choice."""
    if not prompts:
        raise LensLabError("No prompts to score; pass --normal and --test JSONL files with at least one prompt each.")
    n_choices = len(prompts[0].choices)
    sequences = []
    for prompt_index, prompt in enumerate(prompts):
        if len(prompt.choices) != n_choices:
            raise LensLabError(
                f"Prompt {prompt_index + 1} has {len(prompt.choices)} choices but the first has {n_choices}; the "
                "trajectories must line up, so give every prompt of --normal and --test the same number of choices."
            )
        prompt_ids = tokenizer(prompt.prompt)["input_ids"]
        if not prompt_ids:
            raise LensLabError(
                f"Prompt {prompt_index + 1} ({prompt.prompt!r}) tokenizes to nothing, so nothing predicts its choices; "
                "give every prompt some text."
            )
        for choice_index, choice in enumerate(prompt.choices):
            choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not choice_ids:
                raise LensLabError(
                    f"Choice {choice!r} of prompt {prompt_index + 1} tokenizes to no tokens, so it has no "
                    "probability to score; give every choice some text (usually with a leading space)."
                )
            sequences.append(_Sequence(prompt_index, choice_index, prompt_ids + choice_ids, len(prompt_ids)))
    return sequences


def anomaly_scores(normal: np.ndarray, test: np.ndarray, detector: str, *, seed: int = 0) -> np.ndarray:
    """Fit ``detector`` on ``normal: [n, features]`` and score ``test: [m, features]``; higher = more anomalous.

    ``detector`` is ``"isolation_forest"``, ``"lof"`` or ``"mahalanobis"`` (squared distance under a
    Ledoit-Wolf covariance, which stays invertible with fewer prompts than features).
    """
    if detector == "isolation_forest":
        return -IsolationForest(random_state=seed).fit(normal).score_samples(test)
    if detector == "lof":
        neighbours = min(LOF_NEIGHBORS, len(normal) - 1)
        return -LocalOutlierFactor(n_neighbors=neighbours, novelty=True).fit(normal).score_samples(test)
    if detector == "mahalanobis":
        return LedoitWolf().fit(normal).mahalanobis(test)
    raise LensLabError(f"Unknown detector {detector!r}; use isolation_forest, lof or mahalanobis.")


def auroc_with_interval(
    anomalous: np.ndarray, scores: np.ndarray, *, resamples: int = 1000, seed: int = 0
) -> DetectorScore:
    """AUROC of ``scores: [m]`` for the boolean ``anomalous: [m]``, with a stratified percentile bootstrap 95% CI.

    Each resample draws the anomalous and the normal prompts separately, with replacement and in their
    original numbers. A resample's AUROC is its Mann-Whitney U over (anomalous x normal) pairs, which is
    exactly ``roc_auc_score`` (ties count one half) computed for all resamples at once.
    """
    positive, negative = scores[anomalous], scores[~anomalous]
    rng = np.random.default_rng(seed)
    positive_draws = positive[rng.integers(0, len(positive), (resamples, len(positive)))]  # [resamples, n_pos]
    negative_draws = negative[rng.integers(0, len(negative), (resamples, len(negative)))]  # [resamples, n_neg]
    u = mannwhitneyu(positive_draws, negative_draws, axis=1, method="asymptotic").statistic
    low, high = np.percentile(u / (len(positive) * len(negative)), [2.5, 97.5])
    return DetectorScore(float(roc_auc_score(anomalous, scores)), (float(low), float(high)))


def detect_anomalies(
    normal: PromptFeatures,
    test: PromptFeatures,
    anomalous: np.ndarray,
    *,
    seed: int = 0,
    resamples: int = 1000,
) -> DetectionReport:
    """Fit every detector on ``normal`` and score ``test`` against the boolean ``anomalous: [n_test]``."""
    if len(anomalous) != len(test.final_residual):
        raise LensLabError(f"Got {len(anomalous)} labels for {len(test.final_residual)} test prompts; label each once.")
    _check_sizes(len(normal.final_residual), anomalous)
    detectors = {}
    for name, trajectories in normal.trajectories.items():
        train, scored = trajectories.reshape(len(trajectories), -1), test.trajectories[name]
        for detector in TRAJECTORY_DETECTORS:
            scores = anomaly_scores(train, scored.reshape(len(scored), -1), detector, seed=seed)
            detectors[f"{name}/{detector}"] = auroc_with_interval(anomalous, scores, resamples=resamples, seed=seed)
    baseline = anomaly_scores(normal.final_residual, test.final_residual, "mahalanobis")
    detectors[BASELINE] = auroc_with_interval(anomalous, baseline, resamples=resamples, seed=seed)
    for name, score in detectors.items():
        logger.info("%s: AUROC %.3f [%.3f, %.3f]", name, score.auroc, *score.ci95)
    return DetectionReport(
        detectors=detectors,
        n_normal=len(normal.final_residual),
        n_test_normal=int((~anomalous).sum()),
        n_test_anomalous=int(anomalous.sum()),
        bootstrap={"resamples": resamples, "seed": seed, "method": "stratified percentile"},
    )


def run_detection(
    view: ModelView,
    tokenizer: PreTrainedTokenizerBase,
    lenses: dict[str, Lens],
    normal: list[ChoicePrompt],
    test: list[ChoicePrompt],
    *,
    seed: int = 0,
    resamples: int = 1000,
    batch_size: int = 16,
) -> DetectionReport:
    """Features of ``normal`` and ``test`` prompts (one pass over both), then ``detect_anomalies``.

    ``normal`` may not hold prompts labelled anomalous; every ``test`` prompt must carry a label.
    """
    if any(prompt.label == "anomalous" for prompt in normal):
        raise LensLabError(
            "--normal holds prompts labelled 'anomalous', but detectors are fitted on normal prompts only; pass "
            "--normal a file of normal prompts (e.g. make-attacks --fraction 0 on other records)."
        )
    unlabelled = [i for i, prompt in enumerate(test) if prompt.label is None]
    if unlabelled:
        raise LensLabError(
            f"Test prompt {unlabelled[0] + 1} has no 'label'; give every --test record label 'normal' or 'anomalous'."
        )
    anomalous = np.array([prompt.label == "anomalous" for prompt in test])
    _check_sizes(len(normal), anomalous)  # before the model runs
    # Scored together so that one check covers the number of choices in both sets.
    features = choice_features(view, tokenizer, lenses, normal + test, batch_size=batch_size)
    split = len(normal)
    normal_features = PromptFeatures(
        {name: values[:split] for name, values in features.trajectories.items()}, features.final_residual[:split]
    )
    test_features = PromptFeatures(
        {name: values[split:] for name, values in features.trajectories.items()}, features.final_residual[split:]
    )
    return detect_anomalies(normal_features, test_features, anomalous, seed=seed, resamples=resamples)


def _check_sizes(n_normal: int, anomalous: np.ndarray) -> None:
    """Enough normal prompts to fit on, and both kinds in the test set (AUROC needs both)."""
    if n_normal < 2:
        raise LensLabError(
            f"Got {n_normal} normal prompt(s) to fit the detectors on; pass --normal at least 2 (tens or more for a "
            "meaningful fit)."
        )
    n_anomalous = int(anomalous.sum())
    if n_anomalous in (0, len(anomalous)):
        raise LensLabError(
            f"The test set holds {n_anomalous} anomalous and {len(anomalous) - n_anomalous} normal prompts, so AUROC "
            "is undefined; label both kinds in --test (see `lenslab make-attacks`)."
        )
