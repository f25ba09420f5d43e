"""Lenses: decode a residual at any lens position into next-token logits.

A lens is a per-position transformation of the residual followed by the model's own head
(`ModelView.decode`: final norm, project_out, unembedding, logit scale/softcap). Consumers depend only on
the `Lens` interface:

    logits = lens(h, layer)          # h: [..., d_model] -> [..., vocab]
    h_translated = lens.transform(h, layer)
    len(lens)                        # number of lens positions, L + 1

Lens position 0 is the embedding output (the input to layer 0), position l the output of layer l-1, and
position L the last layer's output, where every lens is the model itself (`layer_names` names them). Consumers that
decode many tokens do it a slice of rows at a time (`row_chunks`), so no [tokens, vocab] tensor need exist whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel

from lenslab.adapter import ModelView
from lenslab.artifacts import LensConfig, read_lens, write_lens
from lenslab.compatibility import check_compatible, model_facts
from lenslab.errors import LensLabError

LOGITS_PER_CHUNK = 2**24
"""Default budget of `row_chunks`: 64 MiB per float32 [rows, vocab] tensor, so that the analyses that decode
every token (prediction depth, choice scoring) hold a bounded amount whatever the number of tokens."""


def layer_names(view: ModelView) -> list[str]:
    """Readable names of the lens positions: ``["embeddings", "layer 1", ..., "layer L"]``.

    "layer l" is the output of the l-th decoder block (lens position l); the last is the model's own output
    position, before the final norm.
    """
    return ["embeddings", *(f"layer {layer}" for layer in range(1, view.num_positions))]


def row_chunks(n_rows: int, row_width: int, logits: int | None = None) -> list[slice]:
    """Consecutive slices covering range(n_rows), each of at most ``logits // row_width`` rows (at least one).

    ``logits`` defaults to `LOGITS_PER_CHUNK`; ``row_width`` is the vocabulary, times the number of copies of
    each row decoded together. A [rows, vocab] tensor of one slice is then bounded by the budget, not by n_rows.
    """
    step = max(1, (LOGITS_PER_CHUNK if logits is None else logits) // max(1, row_width))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def as_view(model_or_view: PreTrainedModel | ModelView) -> ModelView:
    """Accept either a Hugging Face model or an already-built `ModelView`."""
    if isinstance(model_or_view, ModelView):
        return model_or_view
    return ModelView.from_model(model_or_view)


class Lens(nn.Module):
    """Common interface of every lens kind: `transform` then the model's own decoder."""

    kind: str = "abstract"

    def __init__(self, view: ModelView):
        super().__init__()
        # A plain attribute, not a submodule: the model's weights are frozen and must not appear in the
        # lens's parameters or state dict.
        self.view = view

    def __len__(self) -> int:
        """Number of lens positions: the embeddings plus one per layer (L + 1)."""
        return self.view.num_positions

    def check_position(self, h: torch.Tensor, layer: int) -> None:
        """Raise a clear error for a lens position out of range or a residual of the wrong width."""
        if not 0 <= layer < len(self):
            raise LensLabError(
                f"Lens position {layer} is out of range: this lens has positions 0..{len(self) - 1} "
                f"(0 = embeddings, {len(self) - 1} = last layer output); pass a position in that range."
            )
        if h.shape[-1] != self.view.d_model:
            raise LensLabError(
                f"Hidden size mismatch: got a residual of width {h.shape[-1]} but the model's residual stream "
                f"has width {self.view.d_model}; pass residuals captured from the same model as the lens."
            )

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Map the residual at `layer` into the last layer's basis. h: [..., d_model] -> [..., d_model].

        h may be on any device; the result may be on another (a translator's), which `view.decode` accepts.
        """
        raise NotImplementedError

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Next-token logits predicted from the residual at `layer`. h: [..., d_model] -> [..., vocab]."""
        return self.view.decode(self.transform(h, layer))


class LogitLens(Lens):
    """Decode every residual directly with the model's final norm and unembedding (nostalgebraist 2020)."""

    kind = "logit"

    @classmethod
    def from_model(cls, model_or_view: PreTrainedModel | ModelView) -> LogitLens:
        return cls(as_view(model_or_view))

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        self.check_position(h, layer)
        return h


class StoredLens(Lens):
    """A lens with parameters, kept in a lens folder: `config.json` (its kind, its model) + `params.safetensors`."""

    bias: bool = False
    """Whether the lens has bias terms (recorded in the config)."""

    def __init__(self, view: ModelView):
        super().__init__(view)
        self.metadata: dict[str, Any] = {}
        """Provenance read from or written to the lens file (e.g. the training recipe)."""

    @classmethod
    def empty(cls, view: ModelView, config: LensConfig) -> StoredLens:
        """A lens of this kind, shaped as `config` says, for `load` to fill."""
        raise NotImplementedError

    def save(self, directory: str | Path, **metadata: Any) -> Path:
        """Write `config.json` + `params.safetensors` atomically into `directory`; returns the directory.

        The lens's own `metadata` (what it was trained or loaded with) is stored in the config for provenance,
        updated by the `metadata` given here, which the lens itself does not keep.
        """
        config = LensConfig(
            kind=self.kind,
            d_model=self.view.d_model,
            num_hidden_layers=self.view.num_layers,
            bias=self.bias,
            **model_facts(self.view),
            metadata=self.metadata | metadata,
        )
        return write_lens(directory, config, self.state_dict())

    def push_to_hub(self, repo_id: str, **options: Any) -> Any:
        """Publish this lens as the hub model repository `repo_id` with a model card (`lenslab.publish.push_lens`,
        whose keyword options it takes: evaluation, base_model, private, dry_run, token); returns its `Publication`.
        """
        import tempfile

        from lenslab.publish import push_lens

        with tempfile.TemporaryDirectory(prefix="lenslab-lens-") as directory:
            return push_lens(self.save(directory), repo_id, **options)

    @classmethod
    def load(
        cls: type[_Stored], directory: str | Path, model_or_view: PreTrainedModel | ModelView, *, check: str = "full"
    ) -> _Stored:
        """Load a lens of this kind saved by lenslab (or, for tuned lenses, by the `tuned-lens` package), refusing
        one made for another model.

        check: "full" refuses a lens whose unembedding fingerprint differs from the model's; "shapes" only
        requires the same number of layers and residual width (for a fine-tuned relative of the lens's model).
        """
        view = as_view(model_or_view)
        config, tensors = read_lens(directory)
        if config.kind != cls.kind:
            raise LensLabError(f"The lens in {directory} is a {config.kind!r} lens, not a {cls.kind!r} lens.")
        check_compatible(config, view, Path(directory), check)
        lens = cls.empty(view, config)
        expected = lens.state_dict()
        if set(tensors) != set(expected):
            raise LensLabError(
                f"The lens in {directory} holds parameters {sorted(set(tensors) ^ set(expected))[:4]} that do not "
                f"match a {view.num_layers}-layer {cls.kind} lens with bias={config.bias}; re-save the lens."
            )
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise LensLabError(
                    f"Hidden size mismatch in {directory}: {name} has shape {list(tensor.shape)} but this model "
                    f"needs {list(expected[name].shape)}; load a lens trained for this model."
                )
            if not torch.isfinite(tensor).all():
                raise LensLabError(f"The lens in {directory} contains NaN or infinite values in {name}; re-train it.")
        lens.load_state_dict(tensors)
        lens.metadata = config.metadata
        return lens


_Stored = TypeVar("_Stored", bound=StoredLens)


class TunedLens(StoredLens):
    """One learned affine translator per layer, `h + A_l h + b_l`, before the model's decoder.

    The translator is written residually (`h + Linear(h)`) and initialised at zero, so an untrained tuned
    lens equals the logit lens, and weight decay pulls it toward the identity rather than toward zero.
    There is no translator at the last position: there the lens is the model itself. Each translator lives on the
    device of the residual it reads (`ModelView.residual_device`), which differs between layers when a device map
    spreads the model over several devices; `transform` moves a residual there from wherever it is.
    """

    kind = "tuned"

    def __init__(self, view: ModelView, *, bias: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__(view)
        self.bias = bias
        d_model = view.d_model
        self.translators = nn.ModuleList(
            nn.Linear(d_model, d_model, bias=bias, device=view.residual_device(layer), dtype=dtype)
            for layer in range(view.num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero every translator: the lens becomes the logit lens again."""
        with torch.no_grad():
            for translator in self.translators:
                translator.weight.zero_()
                if translator.bias is not None:
                    translator.bias.zero_()

    @classmethod
    def from_model(
        cls, model_or_view: PreTrainedModel | ModelView, *, bias: bool = True, dtype: torch.dtype = torch.float32
    ) -> TunedLens:
        """An untrained tuned lens (equal to the logit lens) for this model."""
        return cls(as_view(model_or_view), bias=bias, dtype=dtype)

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        self.check_position(h, layer)
        if layer == self.view.num_layers:
            return h
        translator = self.translators[layer]
        # The translator keeps its own (usually float32) precision and device; the result goes back to the model's
        # dtype, and stays on the translator's device for the head to fetch.
        h_lens = h.to(translator.weight.device, translator.weight.dtype)
        return (h_lens + translator(h_lens)).to(h.dtype)

    @classmethod
    def empty(cls, view: ModelView, config: LensConfig) -> TunedLens:
        return cls(view, bias=config.bias)


class LinearLens(TunedLens):
    """The tuned lens's translators, `h + A_l h + b_l`, fitted in closed form instead of trained: each the ridge
    least-squares map from its position's residual to the last one (Din et al. 2023, "Jump to Conclusions"; see
    `lenslab.train.linear_fit`). Same parameters and folder format as `TunedLens`, kind "linear"."""

    kind = "linear"
