"""The Jacobian lens (Gurnee et al. 2026, "Verbalizable Representations Form a Global Workspace in Language Models").

For the output h_l of block l, one d x d matrix, the average sensitivity of the last block's output to it:

    J_l = E_prompt[ (1/|V|) sum_{t in V} sum_{t' >= t, t' in V} d h_final,t' / d h_l,t ]

read out by the model's own head: logits = decode(J_l h). V is every position after the first 16 (attention sinks)
except the last. J = I is the logit lens. The last block is never fitted (its output is h_final, J = I there), and
neither is the embedding output, which the published estimator leaves out: at those lens positions the J-lens is
the logit lens.

It is fitted without training. Per prompt: one forward of `dim_batch` copies of it, then ceil(d / dim_batch)
backward passes, each with a one-hot cotangent on one output dimension per copy at every position of V at once;
causal attention already restricts the sum to t' >= t. Row i of J_l is then the gradient of the summed i-th
output summed over the source positions. It is deterministic given the prompts; about 100 prompts of 128 tokens
serve (reference: `anthropics/jacobian-lens`; TransformerLens 4.3 `JacobianLens`).

Lens positions here are lenslab's: block l's output is lens position l + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lenslab.adapter import ModelView
from lenslab.artifacts import LensConfig
from lenslab.errors import LensLabError
from lenslab.io import atomic_write
from lenslab.lenses import StoredLens
from lenslab.residuals import capture_residuals, hook_residual

ATTENTION_SINK_TOKENS = 16
"""Leading positions left out of V: their residuals hold attention sinks, not content."""


def fitted_positions(view: ModelView) -> range:
    """The lens positions a J-lens has a matrix for: the outputs of blocks 0..L-2."""
    return range(1, view.num_layers)


def check_prompt_length(seq_len: int) -> None:
    """Refuse prompts too short to leave any position in V (after the sinks, before the last token)."""
    if seq_len < ATTENTION_SINK_TOKENS + 2:
        raise LensLabError(
            f"Prompts of {seq_len} tokens are too short for the Jacobian lens: it averages over the positions after "
            f"the first {ATTENTION_SINK_TOKENS} and before the last; pass --seq-len {ATTENTION_SINK_TOKENS + 2} or "
            f"more (128 is usual)."
        )


def source_positions(seq_len: int) -> slice:
    """V: the positions averaged over, after the attention sinks and before the last token."""
    return slice(ATTENTION_SINK_TOKENS, seq_len - 1)


class JacobianSums:
    """Running sums of per-prompt Jacobians, J_l summed over prompts, in float64 on the host.

    Kept as sums, not means, so that runs resume from a checkpoint and processes under torchrun add theirs.
    """

    def __init__(self, view: ModelView, *, dim_batch: int = 32):
        if dim_batch < 1:
            raise LensLabError(f"dim_batch must be at least 1, got {dim_batch}; pass a positive number of copies.")
        self.view = view
        self.dim_batch = dim_batch
        d = view.d_model
        self.sums = torch.zeros(len(fitted_positions(view)), d, d, dtype=torch.float64)
        """[L - 1, d_model, d_model]: sums[p - 1] is the sum of prompt Jacobians at lens position p."""
        self.prompts = 0

    def add(self, input_ids: Tensor) -> None:
        """Add the Jacobians of each prompt in `input_ids`: [prompts, seq], every row at least 18 tokens long."""
        check_prompt_length(input_ids.shape[-1])
        for prompt in input_ids:
            self.sums += prompt_jacobians(self.view, prompt, dim_batch=self.dim_batch)
            self.prompts += 1

    def means(self) -> Tensor:
        """[L - 1, d_model, d_model] float32: J at lens positions 1..L-1."""
        if self.prompts == 0:
            raise LensLabError("No prompts were added to the Jacobian lens fit; pass data with at least one prompt.")
        return (self.sums / self.prompts).float()


def prompt_jacobians(view: ModelView, prompt: Tensor, *, dim_batch: int = 32) -> Tensor:
    """One prompt's Jacobians at every fitted lens position. prompt: [seq] -> [L - 1, d_model, d_model] float64.

    Each is (1/|V|) sum_{t in V} sum_{t' in V} d h_final,t' / d h_l,t, with row i the derivative of output
    dimension i.
    """
    d, last = view.d_model, view.num_layers
    valid = source_positions(prompt.shape[-1])
    copies = min(dim_batch, d)
    ids = prompt.to(view.device).expand(copies, -1)
    positions = list(fitted_positions(view))

    # The embedding output becomes a leaf that requires grad, so the forward records a graph through every block
    # even though the model's weights are frozen; gradients are then taken at the intermediate block outputs.
    def as_leaf(h: Tensor) -> Tensor:
        return h.detach().requires_grad_(True)

    # Weights that require grad would add their own gradients to the graph, which makes a fit about ten times slower
    # (the tiny test GPT-2 on a CPU); `lenslab.load_model` freezes them, a model loaded otherwise may not have, so
    # they are frozen for the forward that records the graph and given their flags back after it.
    trainable = [parameter for parameter in view.model.parameters() if parameter.requires_grad]
    handle = hook_residual(view, 0, as_leaf)
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with torch.enable_grad():
            hidden = capture_residuals(view, ids, positions=[*positions, last], need_logits=False).hidden
    finally:
        handle.remove()
        for parameter in trainable:
            parameter.requires_grad_(True)
    final = hidden[last]
    sources = [hidden[p] for p in positions]
    jacobians = torch.zeros(len(positions), d, d, dtype=torch.float64)
    chunks = math.ceil(d / copies)
    for chunk in range(chunks):
        rows = range(chunk * copies, min(d, (chunk + 1) * copies))
        cotangent = torch.zeros_like(final)
        for copy, row in enumerate(rows):
            cotangent[copy, valid, row] = 1
        grads = torch.autograd.grad(final, sources, cotangent, retain_graph=chunk < chunks - 1)
        for index, grad in enumerate(grads):
            # grad: [copies, seq, d]; copy c holds row rows[c] of J, summed over the source positions.
            jacobians[index, rows.start : rows.stop] = grad[: len(rows), valid].sum(1).double().cpu()
    return jacobians / (valid.stop - valid.start)


class JacobianLens(StoredLens):
    """Decode `J_p h` with the model's own head; J_p = I (the logit lens) where the J-lens has no matrix.

    The matrices are float32 tensors that no optimiser trains, each on the device of the residual it reads.
    """

    kind = "jacobian"

    def __init__(self, view: ModelView, jacobians: Tensor | None = None, *, prompts: int = 0):
        super().__init__(view)
        positions = fitted_positions(view)
        d = view.d_model
        if jacobians is None:
            jacobians = torch.eye(d).expand(len(positions), d, d)
        if tuple(jacobians.shape) != (len(positions), d, d):
            raise LensLabError(
                f"A Jacobian lens for this model needs {len(positions)} matrices of {d} x {d}, got "
                f"{list(jacobians.shape)}; fit or load one made for this model."
            )
        if not torch.isfinite(jacobians).all():
            raise LensLabError("The Jacobian lens holds NaN or infinite values; fit it again.")
        self.matrices = nn.ParameterList(
            nn.Parameter(matrix.float().to(view.residual_device(p)).clone(), requires_grad=False)
            for p, matrix in zip(positions, jacobians)
        )
        self.metadata["prompts"] = prompts

    @property
    def prompts(self) -> int:
        """How many prompts the matrices average over (0 for the identity)."""
        return int(self.metadata.get("prompts", 0))

    @classmethod
    def empty(cls, view: ModelView, config: LensConfig) -> JacobianLens:
        return cls(view)

    @classmethod
    def fit(cls, view: ModelView, prompts: Tensor, *, dim_batch: int = 32) -> JacobianLens:
        """Fit on `prompts`: [n, seq] token ids (seq >= 18)."""
        sums = JacobianSums(view, dim_batch=dim_batch)
        sums.add(prompts)
        return cls.from_sums(sums)

    @classmethod
    def from_sums(cls, sums: JacobianSums) -> JacobianLens:
        return cls(sums.view, sums.means(), prompts=sums.prompts)

    def jacobian(self, layer: int) -> Tensor | None:
        """J at lens position `layer`: [d_model, d_model], or None where the lens is the logit lens."""
        if layer in fitted_positions(self.view):
            return self.matrices[layer - 1]
        return None

    def transform(self, h: Tensor, layer: int) -> Tensor:
        self.check_position(h, layer)
        matrix = self.jacobian(layer)
        if matrix is None:
            return h
        return (h.to(matrix.device, matrix.dtype) @ matrix.T).to(h.dtype)


@dataclass
class JacobianArtifact:
    """What a published J-lens file holds, its shapes checked but not yet matched to a model (`lenslab convert`
    reads and writes these without one)."""

    matrices: dict[int, Tensor]
    """Block l -> J_l: [d_model, d_model] float32; block l's output is lens position l + 1."""
    n_prompts: int
    """How many prompts the matrices average over (0 for matrices that were not fitted, e.g. converted)."""
    d_model: int
    """Width of the residual stream."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Provenance; TransformerLens records its fit settings and model name here."""


def write_jacobian_artifact(lens: JacobianLens, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Write `lens` as the published J-lens artifact (`save_jacobian_artifact`), with `metadata` or the lens's own."""
    blocks = [p - 1 for p in fitted_positions(lens.view)]
    matrices = {block: lens.matrices[block].detach() for block in blocks}
    provenance = {key: value for key, value in (metadata or lens.metadata).items() if key != "prompts"}
    save_jacobian_artifact(JacobianArtifact(matrices, lens.prompts, lens.view.d_model, provenance), path)


def save_jacobian_artifact(artifact: JacobianArtifact, path: str | Path) -> None:
    """Write the published J-lens artifact atomically: a `.pt` of plain tensors and numbers (float16 matrices).

    {"J": {block: [d, d]}, "n_prompts": int, "source_layers": [blocks], "d_model": int, "metadata": {...}}
    """
    blocks = sorted(artifact.matrices)
    content = {
        "J": {block: artifact.matrices[block].to("cpu", torch.float16) for block in blocks},
        "n_prompts": artifact.n_prompts,
        "source_layers": blocks,
        "d_model": artifact.d_model,
        "metadata": artifact.metadata,
    }
    atomic_write(Path(path), lambda staged: torch.save(content, staged))


def load_jacobian_artifact(path: str | Path) -> JacobianArtifact:
    """Read a J-lens artifact safely (`weights_only`: no code runs), checking that it is a table of square matrices
    of one width; which model it fits is the caller's question (`read_jacobian_artifact`)."""
    path = Path(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for truncated or hostile files
        raise LensLabError(
            f"{path} is not a readable Jacobian-lens file ({type(error).__name__}: {str(error)[:200]}); "
            f"pass a .pt saved by TransformerLens's JacobianLens or `lenslab convert`."
        ) from None
    if not isinstance(content, dict) or not isinstance(content.get("J"), dict) or not content["J"]:
        raise LensLabError(f"{path} has no 'J' table of matrices, so it is not a Jacobian-lens file.")
    first = next(iter(content["J"].values()))
    d = content.get("d_model", first.shape[-1] if isinstance(first, Tensor) else None)
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise LensLabError(f"{path} records d_model {d!r}, not a positive width; it is not a Jacobian-lens file.")
    matrices = {}
    for block, matrix in content["J"].items():
        if not isinstance(block, int) or isinstance(block, bool) or block < 0:
            raise LensLabError(f"{path} has a matrix under {block!r}, not a block number; it is not a J-lens file.")
        if not isinstance(matrix, Tensor) or tuple(matrix.shape) != (d, d):
            raise LensLabError(
                f"The Jacobian lens in {path} holds a {getattr(matrix, 'shape', type(matrix).__name__)} entry "
                f"for block {block}, not a {d} x {d} matrix; load a lens fitted for this model."
            )
        matrices[block] = matrix.float()
    prompts, metadata = content.get("n_prompts", 0), content.get("metadata") or {}
    if not isinstance(prompts, int) or isinstance(prompts, bool) or prompts < 0 or not isinstance(metadata, dict):
        raise LensLabError(f"{path} records n_prompts {prompts!r} or a metadata that is not a table; re-save it.")
    return JacobianArtifact(matrices, prompts, d, metadata)


def read_jacobian_artifact(path: str | Path, view: ModelView) -> JacobianLens:
    """Load a J-lens artifact for `view`'s model, refusing one of another width or depth."""
    artifact = load_jacobian_artifact(path)
    d = view.d_model
    if artifact.d_model != d:
        raise LensLabError(
            f"The Jacobian lens in {path} is for d_model {artifact.d_model}, but this model has {d}; "
            f"load a lens fitted for this model."
        )
    blocks = [p - 1 for p in fitted_positions(view)]
    extra = sorted(set(artifact.matrices) - set(blocks))
    if extra:
        raise LensLabError(
            f"The Jacobian lens in {path} has matrices for blocks {extra[:4]}, which this "
            f"{view.num_layers}-layer model does not fit; load a lens fitted for this model."
        )
    # A block the file leaves out is read by the logit lens.
    identity = torch.eye(d)
    lens = JacobianLens(view, torch.stack([artifact.matrices.get(block, identity) for block in blocks]))
    lens.metadata = {**artifact.metadata, "prompts": artifact.n_prompts}
    return lens
