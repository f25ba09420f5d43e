"""Issue 12, "nothing lost, nothing silent": every fault replayed, each stopping with one sentence (exit status 2)
before any work, or warning, and never leaving a file half-written or touching one lenslab did not write."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import pytest
import torch
from tiny_models import tiny_model

from lenslab import TunedLens
from lenslab.adapter import ModelView
from lenslab.artifacts import CONFIG_FILE, PARAMS_BACKUP, PARAMS_FILE, read_lens
from lenslab.cli import main
from lenslab.compatibility import tuned_lens_unembed_hash
from lenslab.data import DataSpec, iter_texts
from lenslab.errors import LensLabError, LensModelMismatch
from lenslab.model_source import check_model_source
from lenslab.outputs import check_output, mark
from lenslab.train import TrainConfig, train_lens
from lenslab.train import loop as train_loop
from lenslab.train.checkpoints import CHECKPOINT_DIR, LOG_FILE, RUN_FILE, load_checkpoint
from lenslab.train.stopping import divergence_message

matplotlib.use("Agg")
SEQ_LEN = 64


@pytest.fixture(scope="module")
def view():
    return ModelView.from_model(tiny_model("gpt2", seed=0))


def random_lens(view, seed: int) -> TunedLens:
    lens = TunedLens.from_model(view)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return lens


def one_error(capsys, command: str) -> str:
    """The single line of stderr a refused run printed: `lenslab COMMAND: error: ...`, one sentence."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith(f"lenslab {command}: error: ")]
    assert errors == lines[-1:] and errors[0].count(". ") == 0, lines  # model loading may print progress first
    return errors[0]


# --- 3: a lens changes as a whole ----------------------------------------------------------------------------------

# os.replace calls of `write_lens` over an existing lens: old params to the backup, new params, new config.
REPLACES_PER_SAVE = 3


@pytest.mark.parametrize("failing_call", range(1, REPLACES_PER_SAVE + 2))
def test_a_save_killed_at_any_rename_leaves_the_old_lens_or_the_new(tmp_path, view, monkeypatch, failing_call):
    directory = tmp_path / "lens"
    old, new = random_lens(view, 0), random_lens(view, 1)
    old.save(directory, recipe="old")
    (directory / "train_log.jsonl").write_text('{"step": 1}\n')
    (directory / "checkpoint").mkdir()
    (directory / "checkpoint" / "state.pt").write_bytes(b"checkpoint")
    calls, replace = [], os.replace

    def killed_at(source, destination):
        calls.append(destination)
        if len(calls) == failing_call:
            raise KeyboardInterrupt("killed")
        replace(source, destination)

    monkeypatch.setattr(os, "replace", killed_at)
    finished = failing_call > REPLACES_PER_SAVE
    if finished:
        new.save(directory, recipe="new")
    else:
        with pytest.raises(KeyboardInterrupt):
            new.save(directory, recipe="new")
    monkeypatch.undo()
    config, tensors = read_lens(directory)
    expected = new if finished else old
    assert config.metadata == {"recipe": "new" if finished else "old"}
    assert all(torch.equal(tensors[name], value) for name, value in expected.state_dict().items())
    # The training run's files are untouched, and no stray temporary file is left.
    assert (directory / "train_log.jsonl").read_text() == '{"step": 1}\n'
    assert (directory / "checkpoint" / "state.pt").read_bytes() == b"checkpoint"
    assert not [path for path in directory.iterdir() if path.name.endswith(".tmp")]
    # A later save completes the change whatever state the killed one left.
    new.save(directory, recipe="again")
    assert read_lens(directory)[0].metadata == {"recipe": "again"}
    assert not (directory / PARAMS_BACKUP).exists()


def test_a_save_killed_before_the_backup_goes_keeps_the_new_lens(tmp_path, view, monkeypatch):
    directory = tmp_path / "lens"
    random_lens(view, 0).save(directory)
    unlink = Path.unlink

    def killed(path, missing_ok=False):
        if path.name == PARAMS_BACKUP:
            raise KeyboardInterrupt("killed")
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        random_lens(view, 1).save(directory, recipe="new")
    monkeypatch.undo()
    assert (directory / PARAMS_BACKUP).exists() and read_lens(directory)[0].metadata == {"recipe": "new"}


def test_params_of_another_save_under_a_config_are_refused(tmp_path, view):
    random_lens(view, 0).save(tmp_path / "a")
    random_lens(view, 1).save(tmp_path / "b")
    (tmp_path / "a" / PARAMS_FILE).write_bytes((tmp_path / "b" / PARAMS_FILE).read_bytes())
    with pytest.raises(LensLabError, match="not the file written with .*re-save"):
        read_lens(tmp_path / "a")


def test_saving_over_a_config_lenslab_did_not_write_is_refused(tmp_path, view):
    model_config = '{"model_type": "gpt2"}'
    (tmp_path / CONFIG_FILE).write_text(model_config)
    with pytest.raises(LensLabError, match="not a lenslab lens config.*save the lens to another directory"):
        random_lens(view, 0).save(tmp_path)
    assert (tmp_path / CONFIG_FILE).read_text() == model_config and not (tmp_path / PARAMS_FILE).exists()


# --- 4: output paths are checked before any model loads ------------------------------------------------------------


def make_outputs(tmp: Path) -> None:
    (tmp / "README.md").write_text("# read me\n")
    (tmp / "existing_dir").mkdir()
    (tmp / "a_file").write_text("not a folder\n")
    (tmp / "other.json").write_text('{"name": "somebody else\'s"}\n')
    (tmp / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n a holiday photo")
    # Made with the libraries lenslab draws with, but not by lenslab.
    (tmp / "chart.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x1ctEXtSoftware\x00Matplotlib version3.10.0")
    (tmp / "page.html").write_text("<html>my page</html>")
    (tmp / "dashboard.html").write_text("<html><script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script></html>")
    (tmp / "records.jsonl").write_text('{"id": 1}\n')
    (tmp / "mc.jsonl").write_text('{"prompt": "Q: 1 + 1 =", "choices": [" 2", " 3"], "answer": 0}\n')


MODEL = ["--model", "{tmp}/no-model"]  # never reached: loading it would fail with another message
DATA = ["--data", "{tmp}/README.md"]
OUTPUT_CASES = [
    ("eval", [*MODEL, "-o", "{tmp}/results.png"], "--output {tmp}/results.png has extension '.png'"),
    ("eval", [*MODEL, "-o", "{tmp}/README.md"], "has extension '.md'"),
    ("eval", [*MODEL, "-o", "{tmp}/existing_dir"], "--output {tmp}/existing_dir is a folder"),
    ("eval", [*MODEL, "-o", "{tmp}/a_file/results.json"], "{tmp}/a_file is a file, not a folder"),
    ("eval", [*MODEL, "-o", "{tmp}/other.json"], "already exists and is not a .json file lenslab eval wrote"),
    ("eval", [*MODEL, "-o", "{tmp}/new.json", "--plot", "{tmp}/photo.png"], "--plot {tmp}/photo.png already exists"),
    ("eval", [*MODEL, "-o", "{tmp}/photo.json"], "--plot {tmp}/photo.png already exists"),
    ("eval", [*MODEL, "-o", "{tmp}/new.json", "--plot", "{tmp}/chart.png"], "--plot {tmp}/chart.png already exists"),
    ("show", [*MODEL, "-o", "{tmp}/dashboard.html", "text"], "is not a .html file lenslab show wrote"),
    ("transfer", [*MODEL, "--lens", "{tmp}", "-o", "{tmp}/existing_dir"], "is a folder"),
    ("show", [*MODEL, "-o", "{tmp}/page.html", "text"], "is not a .html file lenslab show wrote"),
    ("show", [*MODEL, "-o", "{tmp}/README.md", "text"], "has extension '.md'"),
    ("detect", [*MODEL, "--normal", "{tmp}/mc.jsonl", "--test", "{tmp}/mc.jsonl", "-o", "{tmp}/x.png"], "'.png'"),
    ("depth", [*MODEL, "-o", "{tmp}/other.json"], "is not a .json file lenslab depth wrote"),
    ("cbe", [*MODEL, "-o", "{tmp}/a_file"], "{tmp}/a_file is a file, not a folder"),
    ("make-attacks", ["--input", "{tmp}/mc.jsonl", "-o", "{tmp}/mc.json"], "has extension '.json'"),
    ("make-attacks", ["--input", "{tmp}/mc.jsonl", "-o", "{tmp}/records.jsonl"], "is not a .jsonl file lenslab"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "argv", "message"), OUTPUT_CASES)
def test_bad_output_paths_are_refused_first_and_touch_nothing(tmp_path, capsys, command, argv, message):
    make_outputs(tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert main([command, *(arg.format(tmp=tmp_path) for arg in argv)]) == 2
    assert message.format(tmp=tmp_path) in one_error(capsys, command)
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_outputs_lenslab_wrote_may_be_replaced(tmp_path):
    import matplotlib.pyplot as plt

    from lenslab.plots.palette import save_png

    (tmp_path / "eval.json").write_text(json.dumps({"lenses": {}} | mark("eval")))
    check_output(tmp_path / "eval.json", "--output", (".json",), "eval")
    with pytest.raises(LensLabError, match="not a .json file lenslab depth wrote"):  # another command's output
        check_output(tmp_path / "eval.json", "--output", (".json",), "depth")
    figure = plt.figure()
    save_png(figure, tmp_path / "eval.png")  # how every lenslab figure is written
    plt.close(figure)
    check_output(tmp_path / "eval.png", "--plot", (".png",), "eval")
    check_output(tmp_path / "new" / "deeper" / "eval.json", "--output", (".json",), "eval")  # folders are created


# --- 7: a lens without a fingerprint is checked by hash or name ----------------------------------------------------


def write_tuned_lens_files(directory: Path, view, base: str | None, **extra) -> Path:
    directory.mkdir()
    config = {"base_model_name_or_path": base, "d_model": view.d_model, "num_hidden_layers": view.num_layers, **extra}
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    torch.save(random_lens(view, 0).translators.state_dict(), directory / "params.pt")
    return directory


@pytest.mark.parametrize(
    ("base", "model_name", "outcome"),
    [
        ("EleutherAI/pythia-160m", "EleutherAI/pythia-410m", "refused"),
        ("EleutherAI/pythia-160m", "/models/Pythia-160M/", "silent"),
        ("gpt2", "openai-community/gpt2", "silent"),
        ("EleutherAI/pythia-160m", "{tmp}/my-model", "warned"),
        (None, "gpt2", "warned"),
        ("EleutherAI/pythia-160m", "", "warned"),
    ],
)
def test_tuned_lens_files_are_checked_by_model_name(tmp_path, view, caplog, monkeypatch, base, model_name, outcome):
    (tmp_path / "my-model").mkdir()
    monkeypatch.setattr(view.model.config, "name_or_path", model_name.format(tmp=tmp_path))
    directory = write_tuned_lens_files(tmp_path / "lens", view, base)
    if outcome == "refused":
        with pytest.raises(LensModelMismatch, match="not 'EleutherAI/pythia-410m'.*--allow-model-mismatch"):
            TunedLens.load(directory, view)
        TunedLens.load(directory, view, check="shapes")
        return
    with caplog.at_level(logging.WARNING, logger="lenslab.artifacts"):
        TunedLens.load(directory, view)
    assert ("cannot be checked against model" in caplog.text) == (outcome == "warned")


def test_tuned_lens_unembedding_hash_confirms_the_model(tmp_path, view, caplog, monkeypatch):
    monkeypatch.setattr(view.model.config, "name_or_path", "someone/unrelated-name")
    unembed_hash = tuned_lens_unembed_hash(view.unembedding_weight())
    directory = write_tuned_lens_files(tmp_path / "lens", view, "org/original", unembed_hash=unembed_hash)
    with caplog.at_level(logging.WARNING, logger="lenslab.artifacts"):
        TunedLens.load(directory, view)
    assert not caplog.text
    assert tuned_lens_unembed_hash(view.unembedding_weight().bfloat16()) == unembed_hash  # dtype-robust


def test_lenslab_lens_without_fingerprint_is_checked_by_name(tmp_path, view, monkeypatch):
    random_lens(view, 0).save(tmp_path / "lens")
    config = json.loads((tmp_path / "lens" / CONFIG_FILE).read_text())
    config |= {"unembed_fingerprint": None, "base_model": "org/model-a"}
    (tmp_path / "lens" / CONFIG_FILE).write_text(json.dumps(config))
    monkeypatch.setattr(view.model.config, "name_or_path", "org/model-b")
    with pytest.raises(LensModelMismatch, match="trained for model 'org/model-a', not 'org/model-b'"):
        TunedLens.load(tmp_path / "lens", view)


# --- 8: eval does not score a lens on its own training text --------------------------------------------------------


def lens_with_heldout_record(tiny_lm, directory: Path, source: Path, heldout_tokens: int) -> Path:
    record = {"source": str(source), "seq_len": SEQ_LEN, "heldout_tokens": heldout_tokens}
    return TunedLens.from_model(tiny_lm.model).save(directory, data=record)


def run_eval(tiny_lm, tmp_path, lens: Path, data: Path, tokens: int) -> int:
    return main([
        "eval", "--model", str(tiny_lm.directory), "--lens", str(lens), "--data", str(data), "--device", "cpu",
        "--seq-len", str(SEQ_LEN), "--tokens", str(tokens), "-o", str(tmp_path / "eval.json"),
    ])  # fmt: skip


def test_eval_refuses_more_tokens_than_the_lens_held_out(tiny_lm, tmp_path, capsys, caplog):
    lens = lens_with_heldout_record(tiny_lm, tmp_path / "lens", tiny_lm.heldout_text_path, 4 * SEQ_LEN)
    assert run_eval(tiny_lm, tmp_path, lens, tiny_lm.heldout_text_path, 8 * SEQ_LEN) == 2
    error = one_error(capsys, "eval")
    assert re.search(r"--tokens 512 would score lens 'tuned' on its own training text: .* first 256 tokens", error)
    assert "pass --tokens 256 or fewer" in error and not (tmp_path / "eval.json").exists()
    # Within the held-out span, or on another source (with a warning), it scores.
    assert run_eval(tiny_lm, tmp_path, lens, tiny_lm.heldout_text_path, 4 * SEQ_LEN) == 0
    with caplog.at_level(logging.WARNING, logger="lenslab.scoring"):
        assert run_eval(tiny_lm, tmp_path, lens, tiny_lm.train_text_path, 8 * SEQ_LEN) == 0
    assert "is another source, so make sure it does not hold that training text" in caplog.text


# --- 9, 10: text files: every bad byte, line or record is named; skipped rows are counted --------------------------


def test_rows_without_the_text_field_are_counted(tmp_path, caplog):
    path = tmp_path / "half.jsonl"
    rows = [{"text": f"document {i}"} if i % 2 == 0 else {"title": f"no text {i}"} for i in range(50)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="lenslab.data.sources"):
        assert len(list(iter_texts(DataSpec(str(path))))) == 25
    assert f"--data {path}: 25 of the 50 rows read had no 'text' field (or null) and were skipped" in caplog.text


TEXT_FAULTS = [
    ("latin1.txt", b"good\n\ncaf\xe9 au lait\n", "latin1.txt is not UTF-8 text: line 3 has byte 0xe9 at byte offset 9"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2 has byte 0xe9 at byte offset 28"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": "no end\n', "broken.jsonl line 2 is not valid JSON"),
    ("number.jsonl", b'{"text": "ok"}\n{"text": 5}\n', "number.jsonl line 2: 'text' is 5, not a string"),
    ("list.jsonl", b'{"text": "ok"}\n[1, 2]\n', "list.jsonl line 2 is [1, 2], not an object"),
    ("array.json", b'[{"text": "ok"}, {"text": [1]}]', "array.json item 2: 'text' is [1], not a string"),
    ("pretty.json", b'{\n  "text": \n', "pretty.json is not valid JSON (Expecting value at line 3"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "message"), TEXT_FAULTS)
def test_bad_text_files_stop_with_their_place(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LensLabError) as error:
        list(iter_texts(DataSpec(str(tmp_path / name))))
    assert message in str(error.value) and str(error.value).count(". ") == 0


def test_json_files_of_one_object_or_strings_are_read(tmp_path):
    (tmp_path / "one.json").write_text('{\n  "text": "a single document"\n}\n')
    (tmp_path / "strings.json").write_text('["first", "second"]')
    assert list(iter_texts(DataSpec(str(tmp_path / "one.json")))) == ["a single document"]
    assert list(iter_texts(DataSpec(str(tmp_path / "strings.json")))) == ["first", "second"]


# --- 10: bad lens configs and Ctrl-C -------------------------------------------------------------------------------

LENS_CONFIG_FAULTS = [
    ({"d_model": "abc"}, "d_model is 'abc', expected a positive integer"),
    ({"num_hidden_layers": -1}, "num_hidden_layers is -1, expected a positive integer"),
    ({"bias": "yes"}, "bias is 'yes', expected true or false"),
    ({"unembed_fingerprint": {"shape": "x"}}, "unembed_fingerprint is {'shape': 'x'}, expected null or an object"),
    ({"unembed_fingerprint": {"shape": [3, 2], "sample": [1.0], "index": [0, 1]}}, "unembed_fingerprint is"),
    ({"format_version": "1"}, "format_version is '1', expected an integer"),
    ({"metadata": []}, "metadata is [], expected an object"),
    ({"d_model": None}, "d_model is None"),
]


@pytest.mark.parametrize(("change", "message"), LENS_CONFIG_FAULTS)
def test_bad_values_in_a_lens_config_are_one_sentence(tmp_path, view, change, message):
    random_lens(view, 0).save(tmp_path / "lens")
    path = tmp_path / "lens" / CONFIG_FILE
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(LensLabError) as error:
        TunedLens.load(tmp_path / "lens", view)
    assert f"{path} is not a valid lens config: {message}" in str(error.value)


def test_bad_values_in_a_tuned_lens_config_are_one_sentence(tmp_path, view):
    directory = write_tuned_lens_files(tmp_path / "lens", view, "gpt2")
    (directory / CONFIG_FILE).write_text(json.dumps({"d_model": "abc", "num_hidden_layers": view.num_layers}))
    with pytest.raises(LensLabError, match="is not a valid tuned-lens config: d_model is 'abc'"):
        TunedLens.load(directory, view)


def test_ctrl_c_in_eval_is_one_line_and_exit_130(tiny_lm, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lenslab.scoring.evaluate_lenses", interrupted)
    code = main([
        "eval", "--model", str(tiny_lm.directory), "--data", str(tiny_lm.heldout_text_path), "--device", "cpu",
        "--seq-len", str(SEQ_LEN), "--tokens", str(SEQ_LEN), "-o", str(tmp_path / "eval.json"),
    ])  # fmt: skip
    assert code == 130
    assert (
        capsys.readouterr().err.strip().splitlines()[-1] == "lenslab eval: interrupted; no file was left half-written."
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == []


# --- 11: what a --model names, said at once ------------------------------------------------------------------------


def test_model_sources_that_cannot_load_are_named(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "notes").mkdir()
    with pytest.raises(LensLabError, match="models/gpt2x does not exist; check the folder's path"):
        check_model_source(str(tmp_path / "models" / "gpt2x"))
    with pytest.raises(LensLabError, match="notes is a folder without a config.json, so not a saved model"):
        check_model_source(str(tmp_path / "notes"))

    def offline(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    with pytest.raises(LensLabError, match="Cannot reach the Hugging Face hub .*connect to the network"):
        check_model_source("someone/some-model")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: "/cache/config.json")
    with pytest.raises(LensLabError, match="run with HF_HUB_OFFLINE=1 to use it"):
        check_model_source("someone/some-model")


# --- 1, 2: a training run's output folder: only its own files, one run at a time ----------------------------------


def train_argv(tiny_lm, output: Path, *extra: str) -> list[str]:
    """`lenslab train` on the tiny LM: 2 steps of 4 sequences of 32 tokens by default, a second or two."""
    return [
        "train", "--model", str(tiny_lm.directory), "--data", str(tiny_lm.train_text_path), "--output", str(output),
        "--seq-len", "32", "--tokens-per-step", "128", "--steps", "2", "--init-tokens", "256", "--device", "cpu",
        *extra,
    ]  # fmt: skip


FOREIGN_FOLDERS = [
    # (files there before the run, --overwrite, the refusal, or None where the run trains beside them)
    ({"checkpoint/weights.bin": b"mine"}, False, "{d} is not empty (checkpoint) and holds no lenslab training run"),
    ({"checkpoint/weights.bin": b"mine"}, True, "{d} holds checkpoint, which lenslab train did not write"),
    ({"params.safetensors": b"x", "train_log.jsonl": b"y"}, True, "holds params.safetensors, train_log.jsonl, which"),
    ({"README.md": b"mine"}, False, "pass another --output, or --overwrite to train there beside those files"),
    ({"README.md": b"mine", "notes/a.txt": b"mine"}, True, None),
]  # fmt: skip


@pytest.mark.parametrize(("files", "overwrite", "message"), FOREIGN_FOLDERS)
def test_training_never_replaces_files_it_did_not_write(tiny_lm, tmp_path, capsys, files, overwrite, message):
    output = tmp_path / "d"
    for name, content in files.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_bytes(content)
    code = main(train_argv(tiny_lm, output, *(["--overwrite"] if overwrite else [])))
    assert all((output / name).read_bytes() == content for name, content in files.items())
    if message is None:
        assert code == 0 and (output / RUN_FILE).is_file() and TunedLens.load(output, tiny_lm.model)
        return
    assert code == 2 and message.format(d=output) in one_error(capsys, "train")
    assert sorted(path.name for path in output.iterdir()) == sorted({name.split("/")[0] for name in files})


def test_a_run_replaces_and_deletes_only_its_own_files(tiny_lm, tmp_path):
    output = tmp_path / "run"
    assert main(train_argv(tiny_lm, output, "--checkpoint-every", "1")) == 0
    (output / "notes.txt").write_text("mine")
    (output / CHECKPOINT_DIR).mkdir()
    (output / CHECKPOINT_DIR / "mine.txt").write_text("mine")
    assert main(train_argv(tiny_lm, output, "--checkpoint-every", "1", "--lr", "10", "--overwrite")) == 0
    assert TunedLens.load(output, tiny_lm.model).metadata["training"]["config"]["lr"] == 10
    # The run's own checkpoint is gone, the folder it sat in is not: it holds a file lenslab did not write.
    assert sorted(path.name for path in (output / CHECKPOINT_DIR).iterdir()) == ["mine.txt"]
    assert (output / "notes.txt").read_text() == "mine"


def test_a_second_run_into_a_folder_in_use_stops_at_once(tiny_lm, tmp_path, capsys):
    output = tmp_path / "run"
    hold = (
        "import sys, time; from pathlib import Path; from lenslab.train.checkpoints import own_output\n"
        "with own_output(Path(sys.argv[1]), overwrite=False):\n    print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(train_argv(tiny_lm, output)) == 2
        expected = f"{output} is in use by another lenslab train run (process {holder.pid}); wait for it to finish"
        assert expected in one_error(capsys, "train")
    finally:
        holder.kill()
        holder.wait()
    assert main(train_argv(tiny_lm, output)) == 0  # the lock goes with the process that held it


# --- 5: Ctrl-C and SIGTERM keep the step reached; reruns resume, or say the lens is trained ------------------------

SEQ = 16


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """[48, SEQ] random token ids of the tiny models' vocabulary."""
    return torch.randint(3, 100, (48, SEQ), generator=torch.Generator().manual_seed(0))


def short_run(**overrides) -> TrainConfig:
    """6 steps of 8 sequences from a zero start, checkpoints every 4: the signals below come before the first."""
    settings = {"steps": 6, "tokens_per_step": 8 * SEQ, "batch_size": 8, "checkpoint_every": 4, "recipe": "paper"}
    return TrainConfig(**settings | overrides)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_step_reached_and_the_rerun_resumes(view, tokens, tmp_path, signum):
    def signalled_after_step_two(record):
        if record.step == 2:
            os.kill(os.getpid(), signum)

    with pytest.raises(train_loop.TrainingInterrupted) as stopped:
        train_lens(view, tokens, short_run(), output_dir=tmp_path, progress=False, on_step=signalled_after_step_two)
    name = signal.Signals(signum).name
    assert stopped.value.signum == signum and str(stopped.value) == (
        f"{name} received: training stopped after step 2; run the same command again to resume from the checkpoint "
        f"at step 2 in {tmp_path / CHECKPOINT_DIR}."
    )
    assert load_checkpoint(tmp_path).step == 2 and signal.getsignal(signum) in (signal.default_int_handler, 0)
    resumed = []
    result = train_lens(view, tokens, short_run(), output_dir=tmp_path, progress=False, on_step=resumed.append)
    assert [record.step for record in resumed] == [3, 4, 5, 6]
    whole = train_lens(view, tokens, short_run(), progress=False).lens
    assert all(torch.allclose(whole.state_dict()[k], v, atol=1e-6) for k, v in result.lens.state_dict().items())


def test_sigterm_to_lenslab_train_exits_143_with_the_step_to_resume_from(tiny_lm, tmp_path):
    output = tmp_path / "run"
    argv = train_argv(tiny_lm, output, "--steps", "100000", "--train-tokens", "4096", "--checkpoint-every", "1000")
    process = subprocess.Popen([sys.executable, "-m", "lenslab", *argv], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ((output / LOG_FILE).is_file() and (output / LOG_FILE).read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    error = process.communicate(timeout=60)[1].strip().splitlines()[-1]
    assert process.returncode == 143
    step = load_checkpoint(output).step
    assert error == (
        f"lenslab train: SIGTERM received: training stopped after step {step}; run the same command again to resume "
        f"from the checkpoint at step {step} in {output / CHECKPOINT_DIR}."
    )


def test_reruns_resume_restart_or_say_the_lens_is_trained(view, tokens, tmp_path):
    def interrupted_after_step_two(record):
        if record.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(train_loop.TrainingInterrupted):
        train_lens(view, tokens, short_run(), output_dir=tmp_path, progress=False, on_step=interrupted_after_step_two)
    steps = []
    train_lens(view, tokens, short_run(), output_dir=tmp_path, progress=False, overwrite=True, on_step=steps.append)
    assert steps[0].step == 3  # --overwrite resumes a run of this configuration
    again = train_lens(view, tokens, short_run(), output_dir=tmp_path, progress=False, overwrite=True)
    assert again.already_trained  # and keeps its finished lens
    steps.clear()
    train_lens(
        view, tokens, short_run(), output_dir=tmp_path, progress=False, overwrite=True, resume=False,
        on_step=steps.append,
    )  # fmt: skip
    assert steps[0].step == 1  # --overwrite --no-resume trains again


def test_cli_says_a_finished_run_is_trained(tiny_lm, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(train_argv(tiny_lm, output)) == 0
    capsys.readouterr()
    assert main(train_argv(tiny_lm, output)) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        f"{output} already holds the finished lens of this configuration (2 steps)",
        "it was left as it is; pass --overwrite --no-resume to train again",
    ]


def test_a_run_from_before_run_files_is_still_lenslab_s(view, tokens, tmp_path):
    train_lens(view, tokens, short_run(steps=1), output_dir=tmp_path, progress=False)
    (tmp_path / RUN_FILE).unlink()  # as lenslab train wrote its folders before it marked them
    assert train_lens(view, tokens, short_run(steps=1), output_dir=tmp_path, progress=False).already_trained
    assert (tmp_path / RUN_FILE).is_file()


# --- 6: a loss that climbs and stays up is divergence, and no checkpoint of it is kept -----------------------------


def test_a_climbing_loss_stops_the_run_and_keeps_a_checkpoint_from_before(view, tokens, tmp_path, monkeypatch):
    accumulate, calls = train_loop._accumulate_gradients, []

    def climbing_from_step_four(*args):
        calls.append(1)
        layer_losses = accumulate(*args)
        return layer_losses * 30 if len(calls) >= 4 else layer_losses  # finite, but thirty times too high

    monkeypatch.setattr(train_loop, "_accumulate_gradients", climbing_from_step_four)
    with pytest.raises(LensLabError) as error:
        train_lens(view, tokens, short_run(steps=12, checkpoint_every=1), output_dir=tmp_path, progress=False)
    message = str(error.value)
    assert message.startswith("Training diverged at step 7 (its loss, ")
    assert "and that of the 3 steps before it were above 2 times step 1's" in message
    # Step 3's checkpoint would have held the lens that step 4 found climbing, so step 2's is the last good one.
    assert "the last good checkpoint (step 2) is kept" in message and load_checkpoint(tmp_path).step == 2
    assert "pass a lower --lr than this run's 1," in message and "--dtype" not in message  # float32 already
    assert message.count(". ") == 0 and not (tmp_path / CONFIG_FILE).exists()


def test_lenslab_train_at_a_huge_learning_rate_exits_2(tiny_lm, tmp_path, capsys):
    assert main(train_argv(tiny_lm, tmp_path / "run", "--steps", "12", "--lr", "1e6")) == 2
    error = one_error(capsys, "train")
    assert "Training diverged at step" in error and "pass a lower --lr than this run's 1e+06, with --overwrite" in error
    assert not (tmp_path / "run" / CONFIG_FILE).exists()


def test_half_precision_runs_are_told_of_float32():
    message = divergence_message(3, "a loss of 9", None, None, TrainConfig(lr=2.0), torch.bfloat16)
    assert "pass a lower --lr than this run's 2 or --dtype float32, with --overwrite" in message
