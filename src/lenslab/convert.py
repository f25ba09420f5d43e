"""Convert a lens between the layouts lenslab reads: a lenslab lens folder, the Jacobian-lens artifact and the
tuned-lens package's folder.

    convert_lens("runs/gpt2-jacobian", "jacobian-lens", "gpt2-jlens.pt")    # for TransformerLens's JacobianLens.load
    convert_lens("gpt2-jlens.pt", "tuned-lens", "gpt2-jlens-as-tuned")      # for tuned-lens's TunedLens
    convert_lens("tuned-lens/gpt2", "lenslab", "runs/gpt2-tuned", view=view)  # fingerprinted for `view`'s model

Every lens these layouts hold is, at each lens position p, an affine map h -> M_p h + b_p before the model's own
head: a tuned or linear lens has M_p = I + A_p (its residual translator) and its bias; a J-lens has M_p = J_p and
no bias, J-lens block l being lens position l + 1, and no matrix at the embeddings (position 0), which it reads
with the logit lens. Conversion reads the source into that form (`AffineLens`) and writes it out again, so:

- J-lens to tuned-lens is exact: translators J_p - I with zero biases, a zero translator at the embeddings;
- a tuned or linear lens to a J-lens artifact keeps I + A_p for blocks 0..L-2, but the artifact has no place for a
  bias, so a lens whose bias is not zero (beyond float16 rounding) is refused, and none for the embeddings, so a
  translator there is dropped with a warning (readers use the logit lens at that position);
- a lens without bias written in the tuned-lens layout gets zero biases (tuned-lens cannot build a lens without);
- neither file layout records a kind: what is read from a tuned-lens folder is a tuned lens, from a J-lens file a
  J-lens, whatever lens was written into it;
- a lens is not converted into the layout it already has: copy it instead.

Without a model, conversion reads only files, and keeps what the source records about its model. With one (`view`),
the lens is first checked against it (`check_compatible`), and what the output records is completed from it: a
lenslab folder's unembedding fingerprint, the tuned-lens `unembed_hash`, and the depth of a J-lens artifact whose
blocks do not show it. A J-lens artifact keeps lenslab's record of the model (fingerprint included) in its metadata,
under "lenslab", so that a lens converted back from it is checked against its model as the original was.

Outputs follow lenslab's rules: nothing lenslab did not write is replaced (`check_output`), and each is written
whole or not at all. A folder is built beside the target and renamed into place, with a `lenslab-convert.json`
naming its files, by which a later conversion recognises it and may replace it; an artifact records its writer in
its metadata.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lenslab import __version__, hub
from lenslab.adapter import ModelView
from lenslab.artifacts import (
    CONFIG_FILE,
    FORMAT_NAME,
    PARAMS_FILE,
    TUNED_LENS_PARAMS_FILE,
    LensConfig,
    read_lens,
    write_lens,
)
from lenslab.compatibility import check_compatible, model_facts, tuned_lens_unembed_hash
from lenslab.errors import LensLabError
from lenslab.io import atomic_write, atomic_write_json
from lenslab.jacobian import JacobianArtifact, load_jacobian_artifact, save_jacobian_artifact
from lenslab.model_source import is_hub_id

log = logging.getLogger(__name__)

Layout = Literal["lenslab", "jacobian-lens", "tuned-lens"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
MANIFEST = "lenslab-convert.json"
"""The file in a converted folder that names its files and its writer, so that a later conversion may replace it."""
WRITTEN_BY = f"lenslab convert {__version__}"
BIAS_TOLERANCE = 1e-4
"""Largest bias a J-lens artifact may drop: below the float16 rounding (~5e-4) of the artifact's order-one
entries, so the artifact loses nothing it could have held."""


@dataclass
class AffineLens:
    """A lens as per-position affine maps `h -> matrices[p] h + biases[p]` before the model's own head."""

    config: LensConfig
    """What the source records: its kind, shapes, model and metadata (a J-lens's prompt count as "prompts")."""
    matrices: Tensor
    """[L, d_model, d_model] float32: M_p at lens positions 0..L-1 (at position L every lens is the model itself)."""
    biases: Tensor | None
    """[L, d_model] float32, or None for a lens without bias."""


@dataclass
class Conversion:
    """What `convert_lens` wrote."""

    output: Path
    """The folder or `.pt` file written."""
    layout: str
    """Its layout, one of `LAYOUTS`."""
    source_layout: str
    """The layout the lens was read from."""
    kind: str
    """The lens's kind ("tuned", "linear", "jacobian")."""
    dropped: list[str] = field(default_factory=list)
    """What the output layout could not hold and was left out."""


def convert_lens(
    source: str | Path, to: str, output: str | Path, *, view: ModelView | None = None, check: str = "full"
) -> Conversion:
    """Read the lens at `source` and write it in layout `to` at `output` (see the module's docstring).

    view: the lens's model, to check the lens against (`check`: "full" or "shapes", as `StoredLens.load`) and, with
    "full", to complete what the output records about it; None converts from the files alone.
    """
    if hub.is_reference(source):  # downloaded into the hub's cache, then read like a local lens
        source = hub.resolve(str(source), view.model.config.name_or_path if view is not None else None)
    source, output = Path(source), Path(output)
    if to not in LAYOUTS:
        raise LensLabError(f"Unknown lens layout {to!r}; pass one of {', '.join(LAYOUTS)}.")
    check_output(output, to)
    layout = source_layout(source)
    if layout == to:
        raise LensLabError(f"{source} is already in the {to} layout, so there is nothing to convert; copy it instead.")
    lens = read_affine(source, num_layers=view.num_layers if view is not None else None)
    if view is not None:
        check_compatible(lens.config, view, source, check)
    # A lens let through for a relative of its model (check="shapes") is not recorded as that relative's.
    model = view if check == "full" else None
    if model is not None:
        missing = {key: value for key, value in model_facts(model).items() if getattr(lens.config, key) is None}
        lens.config = replace(lens.config, **missing)
    conversion = Conversion(output, to, layout, lens.config.kind)
    if to == "lenslab":
        _write_folder(output, source, lambda folder: _write_lenslab(lens, folder, layout))
    elif to == "tuned-lens":
        _write_folder(output, source, lambda folder: _write_tuned_lens(lens, folder, model))
    else:
        conversion.dropped = _write_jacobian(lens, output, layout)
    return conversion


def source_layout(path: Path) -> str:
    """The layout of the lens at `path`: a file is a J-lens artifact; a folder is lenslab's unless it holds only the
    tuned-lens package's `params.pt` (the rule `read_lens` follows)."""
    if path.is_file():
        return "jacobian-lens"
    if not path.is_dir():
        raise LensLabError(f"No lens found at {path}: nothing is there; pass a lens folder or a J-lens .pt file.")
    if (path / TUNED_LENS_PARAMS_FILE).is_file() and not (path / PARAMS_FILE).is_file():
        try:
            raw = json.loads((path / CONFIG_FILE).read_bytes())
        except (OSError, ValueError):
            raw = None
        if not (isinstance(raw, dict) and raw.get("format") == FORMAT_NAME):
            return "tuned-lens"
    return "lenslab"


def read_affine(path: Path, *, num_layers: int | None = None) -> AffineLens:
    """The lens at `path` as affine maps; `num_layers` is the model's depth, when known (else a J-lens artifact's
    depth is read from it)."""
    if path.is_file():
        return _read_jacobian_artifact(path, num_layers)
    config, tensors = read_lens(path)
    layers, d = config.num_hidden_layers, config.d_model
    identity = torch.eye(d)
    if config.kind == "jacobian":
        # JacobianLens's parameters: matrices.{l} is block l's J, lens position l + 1.
        names = {f"matrices.{block}": (d, d) for block in range(layers - 1)}
        _check_tensors(path, config, tensors, names)
        matrices = torch.stack([identity, *(tensors[f"matrices.{block}"].float() for block in range(layers - 1))])
        return AffineLens(config, matrices, None)
    # TunedLens's parameters (and those of every kind built on its translators): h + translators.{p}(h).
    names = {f"translators.{p}.weight": (d, d) for p in range(layers)}
    if config.bias:
        names |= {f"translators.{p}.bias": (d,) for p in range(layers)}
    _check_tensors(path, config, tensors, names)
    matrices = identity + torch.stack([tensors[f"translators.{p}.weight"].float() for p in range(layers)])
    biases = torch.stack([tensors[f"translators.{p}.bias"].float() for p in range(layers)]) if config.bias else None
    return AffineLens(config, matrices, biases)


def _check_tensors(path: Path, config: LensConfig, tensors: dict[str, Tensor], names: dict[str, tuple]) -> None:
    """Refuse parameters that are not those of a `config.kind` lens of the config's shape, or not finite."""
    if set(tensors) != set(names):
        raise LensLabError(
            f"The {config.kind} lens in {path} holds parameters {sorted(set(tensors) ^ set(names))[:4]} that do not "
            f"match a {config.num_hidden_layers}-layer lens of the kinds lenslab converts (tuned, linear, jacobian); "
            f"re-save the lens."
        )
    for name, shape in names.items():
        if tuple(tensors[name].shape) != shape or not torch.isfinite(tensors[name]).all():
            raise LensLabError(
                f"{name} in the lens in {path} has shape {list(tensors[name].shape)} or non-finite values, where "
                f"the config asks for finite values of shape {list(shape)}; re-save or re-train the lens."
            )


def _read_jacobian_artifact(path: Path, num_layers: int | None) -> AffineLens:
    artifact = load_jacobian_artifact(path)
    blocks = sorted(artifact.matrices)
    metadata = dict(artifact.metadata)
    recorded = metadata.pop("lenslab", None)  # what `_write_jacobian` kept of a lenslab lens's record of its model
    recorded = recorded if isinstance(recorded, dict) else {}
    # The depth the file records wins over the model's, so that `check_compatible` refuses a mismatch: TransformerLens
    # records its target, the last block, and lenslab the depth; a file with neither and no model given is taken as
    # the published full fit, of blocks 0..L-2.
    target, depth = metadata.get("target_layer"), recorded.get("num_hidden_layers")
    if _is_count(target) or _is_count(depth):
        num_layers = target + 1 if _is_count(target) else depth
    elif num_layers is None:
        num_layers = blocks[-1] + 2
    if blocks[-1] > num_layers - 2:
        raise LensLabError(
            f"The Jacobian lens in {path} has a matrix for block {blocks[-1]}, but a {num_layers}-layer model has "
            f"J-lens blocks 0..{num_layers - 2} only; pass --model with the model it was fitted for."
        )
    identity = torch.eye(artifact.d_model)
    matrices = torch.stack([identity, *(artifact.matrices.get(block, identity) for block in range(num_layers - 1))])
    name = metadata.get("model_name")
    try:
        config = LensConfig(
            kind="jacobian", d_model=artifact.d_model, num_hidden_layers=num_layers, bias=False,
            base_model=recorded.get("base_model", name if isinstance(name, str) else None),
            base_model_revision=recorded.get("base_model_revision"), vocab_size=recorded.get("vocab_size"),
            unembed_fingerprint=recorded.get("unembed_fingerprint"),
            metadata={**metadata, "prompts": artifact.n_prompts},
        )  # fmt: skip
    except ValueError as error:
        raise LensLabError(f"{path} records a model that is not valid ({error}); re-save the lens.") from None
    return AffineLens(config, matrices, None)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _write_lenslab(lens: AffineLens, folder: Path, layout: str) -> list[str]:
    config = lens.config
    identity = torch.eye(config.d_model)
    if config.kind == "jacobian":
        tensors = {f"matrices.{p - 1}": lens.matrices[p] for p in range(1, config.num_hidden_layers)}
    else:
        tensors = {f"translators.{p}.weight": matrix - identity for p, matrix in enumerate(lens.matrices)}
        if lens.biases is not None:
            tensors |= {f"translators.{p}.bias": bias for p, bias in enumerate(lens.biases)}
    metadata = {**config.metadata, "converted_from": layout}
    write_lens(folder, replace(config, bias=lens.biases is not None, metadata=metadata), tensors)
    return [CONFIG_FILE, PARAMS_FILE]


def _write_tuned_lens(lens: AffineLens, folder: Path, view: ModelView | None) -> list[str]:
    """`config.json` + `params.pt` exactly as tuned-lens 0.2 `TunedLens.save` writes them: the `TunedLensConfig`
    fields, and the state dict of its translators, `{p}.weight` and `{p}.bias` for positions 0..L-1."""
    config = lens.config
    weights = lens.matrices - torch.eye(config.d_model)
    biases = lens.biases if lens.biases is not None else torch.zeros(config.num_hidden_layers, config.d_model)
    params = {f"{p}.{name}": tensor.contiguous() for p in range(config.num_hidden_layers)
              for name, tensor in (("weight", weights[p]), ("bias", biases[p]))}  # fmt: skip
    unembed_hash = config.metadata.get("unembed_hash")
    if view is not None:
        unembed_hash = tuned_lens_unembed_hash(view.unembedding_weight())
    tuned_config = {
        "base_model_name_or_path": config.base_model,
        "d_model": config.d_model,
        "num_hidden_layers": config.num_hidden_layers,
        "bias": True,  # tuned-lens always builds biases (its TunedLens zeroes them unconditionally)
        "base_model_revision": config.base_model_revision,
        "unembed_hash": unembed_hash,
        "lens_type": "linear_tuned_lens",
    }
    atomic_write(folder / TUNED_LENS_PARAMS_FILE, lambda staged: torch.save(params, staged))
    atomic_write_json(folder / CONFIG_FILE, tuned_config)
    return [CONFIG_FILE, TUNED_LENS_PARAMS_FILE]


def _write_jacobian(lens: AffineLens, output: Path, layout: str) -> list[str]:
    """Write the J-lens artifact; returns what it left out."""
    config = lens.config
    if config.num_hidden_layers < 2:
        raise LensLabError(
            f"A {config.num_hidden_layers}-layer model has no block below its last, so a Jacobian-lens file for it "
            f"would hold no matrix; keep the lens in the {layout} layout."
        )
    if lens.biases is not None and (largest := lens.biases.abs().max().item()) > BIAS_TOLERANCE:
        raise LensLabError(
            f"The {config.kind} lens has biases up to {largest:.3g}, which a Jacobian-lens file has no place for, so "
            f"they would be lost; convert a lens trained without bias, or keep it in the {layout} layout."
        )
    dropped = []
    if not torch.allclose(lens.matrices[0], torch.eye(config.d_model), rtol=0, atol=BIAS_TOLERANCE):
        dropped.append("the translator at the embeddings (lens position 0)")
        log.warning(
            "A Jacobian-lens file has no matrix for the embeddings, so the %s lens's translator there is dropped: "
            "readers of %s use the logit lens at that position.", config.kind, output,
        )  # fmt: skip
    metadata = {key: value for key, value in config.metadata.items() if key != "prompts"}
    if config.base_model and is_hub_id(config.base_model):
        metadata.setdefault("model_name", config.base_model)  # the name TransformerLens checks a model against
    record = {"num_hidden_layers": config.num_hidden_layers, **{key: getattr(config, key) for key in _MODEL_FIELDS}}
    metadata |= {"written_by": WRITTEN_BY, "converted_from": layout, "lenslab": record}
    prompts = config.metadata.get("prompts", 0) if config.kind == "jacobian" else 0
    matrices = {p - 1: lens.matrices[p] for p in range(1, config.num_hidden_layers)}
    save_jacobian_artifact(JacobianArtifact(matrices, int(prompts), config.d_model, metadata), output)
    return dropped


_MODEL_FIELDS = ("base_model", "base_model_revision", "vocab_size", "unembed_fingerprint")
"""The `LensConfig` fields about the model, which a J-lens artifact keeps under metadata "lenslab"."""


def check_output(output: Path, to: str) -> None:
    """Refuse, before any work, an `--output` that lenslab convert cannot write, or must not replace: anything but a
    missing path, an empty folder, or an earlier conversion's output."""
    if to == "jacobian-lens":
        if output.suffix != ".pt" or output.is_dir():
            raise LensLabError(f"--output {output} is not a .pt file, which --to {to} writes; pass e.g. lens.pt.")
        taken = output.exists() and not _is_converted_artifact(output)
    else:
        if output.exists() and not output.is_dir():
            raise LensLabError(f"--output {output} is a file, but --to {to} writes a folder; pass a folder.")
        taken = output.is_dir() and bool(_foreign_files(output))
    if taken:
        raise LensLabError(
            f"--output {output} already holds what lenslab convert did not write, so it is left alone; pass a new "
            f"path or an empty folder, or move that away first."
        )
    folder = next(parent for parent in output.absolute().parents if parent.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise LensLabError(f"--output {output} cannot be written: {folder} is not a writable folder; pass another.")


def _is_converted_artifact(path: Path) -> bool:
    try:
        metadata = load_jacobian_artifact(path).metadata
    except LensLabError:
        return False
    return str(metadata.get("written_by", "")).startswith("lenslab convert ")


def _foreign_files(folder: Path) -> list[str]:
    """The files in `folder` that no earlier conversion wrote there (all of them when it has no manifest)."""
    present = sorted(entry.name for entry in folder.iterdir())
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
        ours = {*manifest["files"], MANIFEST} if str(manifest["written_by"]).startswith("lenslab convert ") else set()
    except (OSError, ValueError, TypeError, KeyError):
        ours = set()
    return [name for name in present if name not in ours]


def _write_folder(output: Path, source: Path, write: Callable[[Path], list[str]]) -> None:
    """Build the folder beside `output` with `write(folder) -> file names`, then rename it into place.

    An earlier conversion's folder at `output` is moved aside first and deleted after: a kill between those two
    renames leaves it under a hidden name beside `output`, and no half-written folder at `output`.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    previous = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes an owner-only folder; give it a plain mkdir's permissions
        files = write(staging)
        atomic_write_json(staging / MANIFEST, {"written_by": WRITTEN_BY, "source": str(source), "files": files})
        if output.is_dir() and any(output.iterdir()):
            previous = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".previous"))
            os.replace(output, previous)
        os.replace(staging, output)  # onto a missing path or an empty folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


def describe(conversion: Conversion) -> tuple[str, str]:
    """A two-line reading of a conversion, for the command line."""
    first = f"Converted the {conversion.kind} lens from the {conversion.source_layout} layout to {conversion.layout}."
    if conversion.dropped:
        return first, f"Left out, as the {conversion.layout} layout has no place: {'; '.join(conversion.dropped)}."
    rounding = " (up to the float16 rounding of the file's matrices)" if conversion.layout == "jacobian-lens" else ""
    return first, f"Nothing was left out: the converted lens decodes as the original did{rounding}."
