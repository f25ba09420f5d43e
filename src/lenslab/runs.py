"""What each `lenslab` command does, from the specs its flags describe (`lenslab.specs`) to a `Report`: check the
output paths before any model loads (`lenslab.outputs`), load the model and lenses, make the library call, write
every file atomically once everything is computed, and say what was found. The command line (`lenslab.cli`) only
builds the specs and shows the report; a script can call these functions the same way.

Each command imports what only it needs inside its function, so that `lenslab depth` does not load plotly or
scikit-learn.

>>> report = evaluate(ModelSpec("gpt2"), LensSpec([Path("lenses/gpt2")]), TextSpec("text.txt"),
...                   EvalSpec(Path("eval.json")))  # doctest: +SKIP
>>> report.reading[0]  # doctest: +SKIP
'the tuned lens is closer to the model than the logit lens at every layer; largest gap at embeddings'
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from lenslab.adapter import ModelView
from lenslab.errors import LensLabError
from lenslab.io import atomic_write_json
from lenslab.outputs import check_output, mark
from lenslab.report import WIDTH, Report
from lenslab.scoring import Stage

if TYPE_CHECKING:
    from lenslab.applications.attacks import AttackConfig
    from lenslab.causal import ExtractionConfig
    from lenslab.command_specs import (
        AttackFiles,
        CausalSpec,
        ConvertSpec,
        DepthSpec,
        DetectSpec,
        EvalSpec,
        PushSpec,
        ShowSpec,
    )  # fmt: skip
    from lenslab.lenses import Lens
    from lenslab.loading import LoadedModel
    from lenslab.specs import LensSpec, ModelSpec, TextSpec, TransferSpec
    from lenslab.trajectory import TrajectoryConfig

SHOW_FORMATS = (".html", ".png", ".json")
"""What `lenslab show` writes, chosen by the extension of its output."""
DEPTH_BATCH_TOKENS = 2**12
"""Tokens per forward of `lenslab depth` when no batch size is given; every lens position is decoded for each."""
CAUSAL_BATCH_TOKENS = 2**13
"""Tokens per model forward of `lenslab cbe` when no batch size is given."""


def evaluate(
    model: ModelSpec, lenses: LensSpec, text: TextSpec, spec: EvalSpec, *, stage: Stage | None = None
) -> Report:
    """`lenslab eval`: score the logit lens and `lenses` at every layer (`lenslab.scoring.score_heldout`)."""
    if spec.transfer and not lenses.lens:
        raise LensLabError("--transfer needs a trained lens to apply at other layers; pass --lens DIR.")
    _check_eval_outputs("eval", spec)
    lenses.fetch(model)  # a hub lens the hub lacks is refused before the model loads
    loaded = model.load()
    view = ModelView.from_model(loaded.model)
    loaded_lenses = lenses.load(view)  # before the data is read, so that a lens for another model fails at once
    transfer = [name for name in loaded_lenses if name != "logit"] if spec.transfer else []
    paths = {name: str(directory) for name, directory in lenses.names().items()}
    return _score("eval", loaded, view, loaded_lenses, text, spec, transfer, {"lens_paths": paths}, stage)


def transfer(
    model: ModelSpec, lenses: TransferSpec, text: TextSpec, spec: EvalSpec, *, stage: Stage | None = None
) -> Report:
    """`lenslab transfer`: score a base model's tuned lens on a fine-tuned relative, as `evaluate` does."""
    from lenslab.applications.transfer import BASE_TUNED, OWN_TUNED, transfer_lenses

    _check_eval_outputs("transfer", spec)
    lenses.fetch(model)  # a hub lens the hub lacks is refused before the model loads
    loaded = model.load()
    view = ModelView.from_model(loaded.model)
    # Before the data is read, so that a lens of the wrong shape fails at once; a warning says what is relaxed.
    loaded_lenses, note = transfer_lenses(view, lenses.lens, own_lens_dir=lenses.own_lens)
    paths = {BASE_TUNED: str(lenses.lens)} | ({OWN_TUNED: str(lenses.own_lens)} if lenses.own_lens else {})
    return _score("transfer", loaded, view, loaded_lenses, text, spec, [], {"lens_paths": paths, "lens_transfer": note},
                  stage)  # fmt: skip


def _check_eval_outputs(command: str, spec: EvalSpec) -> None:
    check_output(spec.output, "--output", (".json",), command)
    for path in [spec.plot_path, spec.transfer_path] if spec.transfer else [spec.plot_path]:
        check_output(path, "--plot", (".png",), command)


def _score(
    command: str, loaded: LoadedModel, view: ModelView, lenses: dict[str, Lens], text: TextSpec, spec: EvalSpec,
    transfer: list[str], record: dict, stage: Stage | None,
) -> Report:  # fmt: skip
    """Score `lenses`, then write the PNG(s) and the JSON with `record` merged into it."""
    from lenslab.plots import plot_curves, plot_transfer
    from lenslab.plots.summaries import eval_summary
    from lenslab.scoring import score_heldout

    scores = score_heldout(
        loaded, view, lenses, text, tokens=spec.tokens, batch_size=spec.batch_size, transfer=transfer, stage=stage
    )
    result = scores.result
    summary = eval_summary(result, [spec.output], units=spec.units)  # a bad --units fails before a file is written
    summary.written.append(plot_curves(result, spec.plot_path, units=spec.units))
    if transfer:
        summary.written.append(plot_transfer(result, spec.transfer_path, units=spec.units))
    provenance = {"data": scores.source, "seq_len": scores.seq_len}
    atomic_write_json(spec.output, result.to_json() | provenance | record | mark(command))
    return summary


def show(
    model: ModelSpec, lenses: LensSpec, config: TrajectoryConfig, spec: ShowSpec, *, stage: Stage | None = None
) -> Report:
    """`lenslab show`: the trajectories of the logit lens and every one of `lenses` over one prompt, written as
    HTML, PNG or JSON by the output's extension, or as tables for the terminal without an output."""
    from lenslab.plots.summaries import show_reading
    from lenslab.tokens import single_token_id
    from lenslab.trajectory import EMPTY_PROMPT, compute_trajectories, encode_prompt

    text = spec.text()
    if not text:  # found before the model loads, which can take minutes
        raise LensLabError(EMPTY_PROMPT)
    if spec.output is not None:
        check_output(spec.output, "--output", SHOW_FORMATS, "show")
    if spec.stat == "target" and not spec.target:
        raise LensLabError(
            "--stat target shows the target's log-probability, but no target was given; pass --target TOKEN."
        )
    lenses.fetch(model)  # a hub lens the hub lacks is refused before the model loads
    loaded = model.load()
    view = ModelView.from_model(loaded.model)
    config = replace(
        config,
        targets=tuple(single_token_id(loaded.tokenizer, target, "--target") for target in spec.target),
        anti_targets=tuple(single_token_id(loaded.tokenizer, anti, "--anti-target") for anti in spec.anti_target),
    )
    ids = encode_prompt(loaded.tokenizer, text)
    trajectories = compute_trajectories(view, lenses.load(view), ids, tokenizer=loaded.tokenizer, config=config)
    report = Report(show_reading(trajectories))
    suffix = spec.output.suffix.lower() if spec.output else None
    if suffix is None:
        from lenslab.plots.terminal import tables

        report.tables = tables(trajectories, spec.stat, width=WIDTH)
        return report
    if suffix == ".html":
        from lenslab.plots.html import write_html

        write_html(trajectories, spec.output, spec.stat)
    elif suffix == ".png":
        from lenslab.plots.png import write_png

        write_png(trajectories, spec.output, spec.stat)
    else:
        from lenslab.trajectory_json import trajectories_to_dict

        atomic_write_json(spec.output, trajectories_to_dict(trajectories) | mark("show"))
    report.written.append(spec.output)
    return report


def detect(model: ModelSpec, lenses: LensSpec, spec: DetectSpec, *, stage: Stage | None = None) -> Report:
    """`lenslab detect`: fit anomaly detectors on the choice trajectories of normal prompts and score test ones
    (`lenslab.applications.detect.run_detection`)."""
    from lenslab.applications.detect import run_detection
    from lenslab.applications.prompts import read_choice_prompts
    from lenslab.plots.summaries import detect_summary

    features = spec.features or ("both" if lenses.lens else "logit")
    if features != "logit" and not lenses.lens:
        raise LensLabError(f"--features {features} needs a tuned lens; pass --lens DIR or --features logit.")
    # The output path is checked and the prompt files are read first: a bad one fails before the model loads.
    check_output(spec.output, "--output", (".json",), "detect")
    normal = read_choice_prompts(spec.normal, "--normal")
    test = read_choice_prompts(spec.test, "--test")
    lenses.fetch(model)  # a hub lens the hub lacks is refused before the model loads
    loaded = model.load()
    view = ModelView.from_model(loaded.model)
    chosen = {name: lens for name, lens in lenses.pair(view).items() if features in ("both", name)}
    if stage:
        stage("scoring prompts", None)
    report = run_detection(
        view, loaded.tokenizer, chosen, normal, test, seed=spec.seed, resamples=spec.resamples,
        batch_size=spec.batch_size,
    )  # fmt: skip
    record = {"model": model.model, "lens_path": str(lenses.lens[0]) if lenses.lens else None}
    record |= {"normal": str(spec.normal), "test": str(spec.test)}
    atomic_write_json(spec.output, report.to_json() | record | mark("detect"))
    return detect_summary(report, [spec.output])


def make_attacks(config: AttackConfig, files: AttackFiles, *, stage: Stage | None = None) -> Report:
    """`lenslab make-attacks`: label a multiple-choice file, attacking a share of it
    (`lenslab.applications.attacks.make_attacks`)."""
    from lenslab.applications.attacks import make_attacks as attack
    from lenslab.applications.prompts import read_choice_prompts, write_choice_prompts

    check_output(files.output, "--output", (".jsonl",), "make-attacks")
    records = attack(read_choice_prompts(files.input, "--input"), config)
    write_choice_prompts(files.output, records)
    attacked = sum(record.label == "anomalous" for record in records)
    return Report((
        f"{attacked} of {len(records)} records are attacked ({config.kind}) and labelled anomalous",
        f"the other {len(records) - attacked} are labelled normal; pass the file to lenslab detect --test",
    ), [files.output])  # fmt: skip


def depth(model: ModelSpec, lenses: LensSpec, text: TextSpec, spec: DepthSpec, *, stage: Stage | None = None) -> Report:
    """`lenslab depth`: every held-out token's prediction depth through one lens, with the checkpoint at which
    training learned it when checkpoints are given (`lenslab.applications.depth`)."""
    from lenslab.applications.depth import add_learning_order, learned_checkpoint, prediction_depth
    from lenslab.plots.depth import plot_depth_histogram
    from lenslab.plots.summaries import depth_summary

    check_output(spec.output, "--output", (".json",), "depth")
    check_output(spec.plot_path, "--plot", (".png",), "depth")
    lenses.fetch(model)  # a hub lens the hub lacks is refused before the model loads
    loaded = model.load()
    view = ModelView.from_model(loaded.model)
    lens = lenses.one(view)
    data = text.tokens(loaded, heldout=spec.tokens)
    batch_size = spec.batch_size or max(1, DEPTH_BATCH_TOKENS // data.seq_len)
    result = prediction_depth(view, lens, data.heldout, batch_size=batch_size)
    if spec.checkpoints or spec.checkpoint_revisions:
        sources = [(name, None) for name in spec.checkpoints or []]
        sources += [(model.model, revision) for revision in spec.checkpoint_revisions or []]
        # One checkpoint in memory at a time: each is loaded when the previous one is done.
        models = (model.load(model=name, revision=revision).model for name, revision in sources)
        learned = learned_checkpoint(models, data.heldout, batch_size=batch_size)
        result = add_learning_order(result, learned, spec.checkpoints or spec.checkpoint_revisions)
    plot_depth_histogram(result, spec.plot_path, model=model.model, lens_kind=lens.kind)
    record = {"lens": lens.kind, "lens_path": str(lenses.lens[0]) if lenses.lens else None}
    record |= {"data": data.source, "seq_len": data.seq_len}
    atomic_write_json(spec.output, result.to_json() | record | mark("depth"))
    return depth_summary(result, [spec.output, spec.plot_path], lens_kind=lens.kind)


def causal(
    model: ModelSpec, lenses: LensSpec, text: TextSpec, config: ExtractionConfig, spec: CausalSpec,
    *, stage: Stage | None = None,
) -> Report:  # fmt: skip
    """`lenslab cbe`: causal bases of one lens at each asked layer, their fidelity in the model and the layers'
    stimulus-response alignment (`lenslab.causal.report.causal_report`)."""
    from lenslab.causal import save_bases
    from lenslab.causal.report import causal_report, parse_layers
    from lenslab.command_specs import CAUSAL_SEQ_LEN
    from lenslab.plots.causal import plot_fidelity
    from lenslab.plots.summaries import causal_summary

    paths = spec.paths
    for path in paths:
        check_output(path, "--output", (path.suffix,), "cbe")
    lenses.fetch(model)  # a hub lens the hub lacks is refused before the model loads
    loaded = model.load()
    view = ModelView.from_model(loaded.model)
    lens = lenses.one(view)
    layers = parse_layers(spec.layers, view.num_layers)
    data = text.tokens(loaded, heldout=spec.tokens, seq_len=text.chunk_length(loaded, longest=CAUSAL_SEQ_LEN))
    batch_size = spec.batch_size or max(1, CAUSAL_BATCH_TOKENS // data.seq_len)
    report = causal_report(view, lens, data.heldout, layers, config, batch_size=batch_size, stage=stage)
    save_bases(paths[0], report.bases)
    provenance = {"model": model.model, "lens": str(lenses.lens[0]) if lenses.lens else "logit"}
    provenance |= {"seq_len": data.seq_len, "data": data.source, "seed": config.seed}
    atomic_write_json(paths[1], report.to_json() | provenance | mark("cbe"))
    plot_fidelity(report.fidelities, report.alignments, paths[2], model=model.model, lens_kind=lens.kind)
    lens_name = f"{lens.kind} lens {lenses.lens[0]}" if lenses.lens else "logit lens"
    return causal_summary(report, list(paths), lens_name=lens_name)


def convert(spec: ConvertSpec, *, stage: Stage | None = None) -> Report:
    """`lenslab convert`: the lens in another layout (`lenslab.convert.convert_lens`), checked against `--model` if
    given."""
    from pathlib import Path

    from lenslab import hub
    from lenslab.convert import check_output as check_conversion_output
    from lenslab.convert import convert_lens, describe, source_layout
    from lenslab.specs import ModelSpec

    check_conversion_output(spec.output, spec.to)
    # A hub lens is fetched, and a missing lens refused, before a model loads.
    lens = hub.resolve(spec.lens, spec.model) if hub.is_reference(spec.lens) else Path(spec.lens)
    source_layout(lens)
    view = None
    if spec.model is not None:
        view = ModelView.from_model(ModelSpec(spec.model, dtype="float32", device="cpu").load().model)
    check = "shapes" if spec.allow_model_mismatch else "full"
    conversion = convert_lens(lens, spec.to, spec.output, view=view, check=check)
    return Report(describe(conversion), [conversion.output])


def push(spec: PushSpec, *, stage: Stage | None = None) -> Report:
    """`lenslab push`: upload the lens and its model card (`lenslab.publish.push_lens`), or write them for a dry
    run."""
    from lenslab.publish import push_lens

    published = push_lens(
        spec.lens, spec.repo, evaluation=spec.evaluation, base_model=spec.base_model, private=spec.private,
        dry_run=spec.output if spec.dry_run else None,
    )  # fmt: skip
    files = ", ".join(published.files)
    if published.url is None:
        reading = (f"dry run: nothing was uploaded to {spec.repo}", f"an upload would send {files}")
    else:
        reading = (f"uploaded {files} to {spec.repo}: {published.url}", f"load it with --lens hf://{spec.repo}")
    return Report(reading, list(published.written))


def example_model(*, stage: Stage | None = None) -> Report:
    """`lenslab example-model`: only the path of the example model, so that `$(lenslab example-model)` passes it on."""
    from lenslab.example_model import fetch_example_model

    return Report((str(fetch_example_model()),))
