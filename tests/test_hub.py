"""Lenses from and to the Hugging Face Hub (`lenslab.hub`, `lenslab.publish`, `lenslab.model_card`, `lenslab push`).

No test touches the network: a hub cache is laid out by hand as `huggingface_hub` lays it out
(`models--OWNER--NAME` / `spaces--OWNER--NAME`, `refs/<branch>`, `snapshots/<commit>/...` linked to `blobs/`) in a
temporary HF_HOME with HF_HUB_OFFLINE=1, and uploads are caught by replacing `HfApi`'s methods.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import huggingface_hub.errors as errors
import pytest
import torch
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import RepositoryNotFoundError
from support.random_lens import random_tuned_lens

from lenslab import hub
from lenslab.adapter import ModelView
from lenslab.applications.transfer import OWN_TUNED, transfer_lenses
from lenslab.cli import main
from lenslab.compatibility import tuned_lens_unembed_hash
from lenslab.errors import LensLabError
from lenslab.evaluate import EvalResult, LensMetrics
from lenslab.jacobian import JacobianLens, fitted_positions, write_jacobian_artifact
from lenslab.lens_files import load_lens
from lenslab.lenses import TunedLens
from lenslab.publish import push_lens
from lenslab.specs import LensSpec, TransferSpec

MODEL_ID = "lenslab-test/tiny"
"""The hub id the tiny LM is cached under, for `--lens hub`."""
ZOO = ("AlignmentResearch/tuned-lens", "space")


class HubCache:
    """A hub cache in huggingface_hub's layout: `add` puts files of one commit of a repository into it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, repo_id: str, files: dict[str, Path], *, repo_type: str = "model", ref: str | None = "main") -> str:
        """Cache `files` (path in the repository -> a local file) as one commit; `ref` names it. Returns the commit."""
        commit = hashlib.sha1(f"{repo_id}{sorted(files)}{ref}{os.urandom(4)}".encode()).hexdigest()
        storage = self.root / f"{repo_type}s--{repo_id.replace('/', '--')}"
        for name, source in files.items():
            data = source.read_bytes()
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            target = storage / "snapshots" / commit / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.path.relpath(blob, target.parent))
        if ref is not None:
            (storage / "refs").mkdir(parents=True, exist_ok=True)
            (storage / "refs" / ref).write_text(commit)
        return commit

    def add_folder(self, repo_id: str, folder: Path, prefix: str = "", **options) -> str:
        files = {f"{prefix}{path.relative_to(folder).as_posix()}": path for path in folder.rglob("*") if path.is_file()}
        return self.add(repo_id, files, **options)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> HubCache:
    """An empty hub cache in a temporary HF_HOME, offline."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return HubCache(home / "hub")


@pytest.fixture
def view(tiny_lm, monkeypatch) -> ModelView:
    """The tiny LM as though loaded by its hub id `MODEL_ID`."""
    monkeypatch.setattr(tiny_lm.model.config, "_name_or_path", MODEL_ID)
    return ModelView.from_model(tiny_lm.model)


def tuned_lens_layout(directory: Path, lens: TunedLens, view: ModelView, model: str = MODEL_ID) -> Path:
    """`lens` as the tuned-lens package publishes it in its zoo, for `model`: config.json + params.pt."""
    directory.mkdir(parents=True)
    unembed_hash = tuned_lens_unembed_hash(view.unembedding_weight()) if model == MODEL_ID else "0" * 64
    config = {
        "base_model_name_or_path": model, "d_model": view.d_model, "num_hidden_layers": view.num_layers,
        "bias": True, "lens_type": "linear_tuned_lens", "unembed_hash": unembed_hash,
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(lens.translators.state_dict(), directory / "params.pt")
    return directory


def same_lens(a, b, view: ModelView) -> bool:
    h = torch.randn(2, 3, view.d_model, generator=torch.Generator().manual_seed(1))
    return all(torch.allclose(a(h, layer), b(h, layer), atol=1e-5) for layer in range(len(a)))


@pytest.fixture
def zoo_lens(cache, view, tmp_path) -> TunedLens:
    """The zoo's entry for `MODEL_ID`, cached, beside another model's."""
    lens = random_tuned_lens(view, 0)
    folder = tuned_lens_layout(tmp_path / "zoo" / "lens" / MODEL_ID, lens, view)
    tuned_lens_layout(tmp_path / "zoo" / "lens" / "gpt2", random_tuned_lens(view, 1), view, model="gpt2")
    cache.add_folder(ZOO[0], tmp_path / "zoo", repo_type=ZOO[1])
    assert folder.is_dir()
    return lens


# --- what a reference names -------------------------------------------------------------------------------------


def test_references_parse_to_repository_folder_and_revision():
    assert hub.parse("hub").path is None and hub.parse("hub").kind == "tuned"
    zoo = hub.parse("hub:EleutherAI/pythia-160m-deduped@abc")
    assert (zoo.repo_id, zoo.repo_type, zoo.path, zoo.revision) == (*ZOO, "lens/EleutherAI/pythia-160m-deduped", "abc")
    lens = hub.parse("hf://owner/lenses/gpt2/tuned@refs/pr/1")
    assert (lens.repo_id, lens.repo_type, lens.path, lens.revision) == (
        "owner/lenses",
        "model",
        "gpt2/tuned",
        "refs/pr/1",
    )
    assert hub.parse("hf://owner/lenses").path == "" and hub.parse("hf://owner/lenses").short_name == "lenses"
    jlens = hub.parse("hf://neuronpedia/jacobian-lens/gpt2.pt")
    assert jlens.is_file and jlens.kind == "jacobian" and jlens.short_name == "gpt2"
    assert not hub.is_reference(Path("hub")) and not hub.is_reference("runs/lens")


@pytest.mark.parametrize("reference", ["hf://owner", "hf://owner/repo/../x", "hub:not a model", "hf:///repo"])
def test_a_misspelt_reference_is_refused_while_the_flags_are_read(reference, capsys):
    with pytest.raises(LensLabError, match="hub"):
        LensSpec(lens=[reference])
    assert main(["eval", "--model", "m", "--lens", reference, "--output", "x.json"]) == 2
    assert "error:" in capsys.readouterr().err


# --- loading -----------------------------------------------------------------------------------------------------


def test_hub_loads_the_zoo_entry_for_the_models_hub_id(zoo_lens, view):
    for reference in ("hub", f"hub:{MODEL_ID}"):
        loaded = load_lens(reference, view)
        assert isinstance(loaded, TunedLens) and same_lens(loaded, zoo_lens, view)


def test_the_zoo_keeps_the_safety_of_local_lenses(zoo_lens, view):
    # hub:gpt2 is another model's lens of the same shape: its tuned-lens hash and name both say so.
    with pytest.raises(LensLabError, match="check='shapes'"):
        load_lens("hub:gpt2", view)


def test_hub_needs_a_hub_id(cache, tiny_lm):
    local = ModelView.from_model(tiny_lm.model)  # loaded from a folder
    with pytest.raises(LensLabError, match="pass --lens hub:MODEL_ID"):
        load_lens("hub", local)


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--output", "{out}/eval.json"], ["show", "a prompt"], ["depth", "--output", "{out}/depth.json"],
        ["cbe", "--output", "{out}/cbe.safetensors"],
    ],
)  # fmt: skip
def test_a_hub_lens_is_refused_before_the_model_loads(cache, tiny_lm_dir, monkeypatch, capsys, tmp_path, command):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the hub lens was checked")

    monkeypatch.setattr("lenslab.specs.ModelSpec.load", load)
    name, *rest = (word.format(out=tmp_path) for word in command)
    assert main([name, "--model", str(tiny_lm_dir), "--lens", "hub", *rest]) == 2
    assert "pass --lens hub:MODEL_ID" in capsys.readouterr().err


def test_a_zoo_entry_not_in_the_cache_offline_says_so(zoo_lens, view):
    with pytest.raises(LensLabError, match="not in the Hugging Face cache.*unset HF_HUB_OFFLINE"):
        load_lens("hub:EleutherAI/pythia-70m-deduped", view)


def test_a_zoo_entry_the_hub_lacks_names_the_zoo(cache, view, monkeypatch, tmp_path):
    # Online, snapshot_download returns the snapshot whether or not its patterns matched anything.
    (tmp_path / "snapshot").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(tmp_path / "snapshot"))
    with pytest.raises(LensLabError, match="the tuned-lens zoo has no lens for this model"):
        load_lens("hub", view)


def hub_error(kind: type[Exception]) -> Exception:
    """An error of `kind` as huggingface_hub raises it for an HTTP 404."""
    # The HTTP client huggingface_hub uses (httpx, or its fork) is the module of its errors' Response.
    client = importlib.import_module(errors.Response.__module__.split(".")[0])
    response = errors.Response(404, request=client.Request("GET", "https://huggingface.co/api/models/nobody/lenses"))
    return kind("404 Not Found", response=response)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RepositoryNotFoundError, "the hub has no model repository nobody/lenses you can see; check the name"),
        (errors.RevisionNotFoundError, "nobody/lenses has no revision 'v9'; pass a branch, tag or commit"),
    ],
)
def test_a_repository_or_revision_the_hub_lacks_is_one_sentence(cache, view, monkeypatch, error, message):
    def fail(*args, **kwargs):
        raise hub_error(error)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(LensLabError, match=message):
        load_lens("hf://nobody/lenses/gpt2@v9", view)


def test_hf_loads_a_lens_folder_in_a_subfolder_and_only_its_files(cache, view, tmp_path):
    lens = random_tuned_lens(view, 2)
    lens.save(tmp_path / "repo" / "tiny")
    (tmp_path / "repo" / "tiny" / "lenslab-train.log").write_text("not a lens file")
    cache.add_folder("me/lenses", tmp_path / "repo")
    loaded = load_lens("hf://me/lenses/tiny", view)
    assert same_lens(loaded, lens, view)
    with pytest.raises(LensLabError, match="holds no lens folder at 'elsewhere'|not in the Hugging Face cache"):
        load_lens("hf://me/lenses/elsewhere", view)


def test_hf_pins_a_revision(cache, view, tmp_path):
    old, new = random_tuned_lens(view, 3), random_tuned_lens(view, 4)
    old.save(tmp_path / "old")
    new.save(tmp_path / "new")
    first = cache.add_folder("me/lens", tmp_path / "old", ref="v1")
    cache.add_folder("me/lens", tmp_path / "new", ref="main")
    assert same_lens(load_lens("hf://me/lens", view), new, view)
    assert same_lens(load_lens("hf://me/lens@v1", view), old, view)
    assert same_lens(load_lens(f"hf://me/lens@{first}", view), old, view)


def test_hf_loads_a_jacobian_lens_file(cache, view, tmp_path):
    d, count = view.d_model, len(fitted_positions(view))
    lens = JacobianLens(view, torch.eye(d).repeat(count, 1, 1) + 0.01 * torch.randn(count, d, d), prompts=5)
    write_jacobian_artifact(lens, tmp_path / "tiny.pt")  # float16, as published
    cache.add("me/jlens", {"tiny/tiny.pt": tmp_path / "tiny.pt"})
    loaded = load_lens("hf://me/jlens/tiny/tiny.pt", view)
    assert isinstance(loaded, JacobianLens) and same_lens(loaded, load_lens(tmp_path / "tiny.pt", view), view)


def test_lens_spec_names_and_loads_hub_lenses(zoo_lens, cache, view, tmp_path):
    random_tuned_lens(view, 5).save(tmp_path / "repo" / "mine")
    cache.add_folder("me/lenses", tmp_path / "repo")
    spec = LensSpec(lens=["hub", "hf://me/lenses/mine", "hub"])
    assert spec.names() == {"hub": "hub", "mine": "hf://me/lenses/mine"}
    lenses = spec.load(view)
    assert list(lenses) == ["logit", "hub", "mine"] and same_lens(lenses["hub"], zoo_lens, view)
    assert TransferSpec(lens="hub:gpt2").lens == "hub:gpt2"


def test_transfer_takes_hub_lenses(zoo_lens, cache, view, tmp_path):
    own = random_tuned_lens(view, 11)
    own.save(tmp_path / "repo" / "own")
    cache.add_folder("me/lenses", tmp_path / "repo")
    lenses, note = transfer_lenses(view, "hub:gpt2", own_lens_dir="hf://me/lenses/own")
    assert note["lens"] == "hub:gpt2" and note["base_model"] == "gpt2"  # another model's lens, shapes only
    assert same_lens(lenses[OWN_TUNED], own, view)


def test_show_reads_the_zoo_offline_end_to_end(zoo_lens, cache, tiny_lm_dir, tmp_path):
    names = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    cache.add(MODEL_ID, {name: tiny_lm_dir / name for name in names if (tiny_lm_dir / name).is_file()})
    output = tmp_path / "show.json"
    assert main(["show", "--model", MODEL_ID, "--lens", "hub", "Elnu counted one, two", "--output", str(output)]) == 0
    written = json.loads(output.read_text())
    assert "tuned" in json.dumps(written) and "logit" in json.dumps(written)


def test_convert_reads_a_hub_lens(cache, view, tmp_path):
    d, count = view.d_model, len(fitted_positions(view))
    lens = JacobianLens(view, torch.eye(d).repeat(count, 1, 1) + 0.01 * torch.randn(count, d, d), prompts=5)
    write_jacobian_artifact(lens, tmp_path / "tiny.pt")
    cache.add("me/jlens", {"tiny.pt": tmp_path / "tiny.pt"})
    output = tmp_path / "as-tuned-lens"
    assert main(["convert", "--lens", "hf://me/jlens/tiny.pt", "--to", "tuned-lens", "--output", str(output)]) == 0
    assert same_lens(load_lens(output, view), load_lens(tmp_path / "tiny.pt", view), view)


# --- publishing --------------------------------------------------------------------------------------------------


@pytest.fixture
def uploads(cache, monkeypatch, tmp_path) -> list[dict]:
    """Every create_repo and upload_folder call, with a copy of the uploaded folder; nothing leaves the machine, though
    huggingface_hub is told it is online (after `cache` said offline) so that push goes ahead."""
    calls: list[dict] = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def create_repo(self, repo_id, **options):
        calls.append({"call": "create_repo", "repo_id": repo_id, **options})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **options):
        copy = tmp_path / f"uploaded-{len(calls)}"
        shutil.copytree(folder_path, copy)
        calls.append({"call": "upload_folder", "repo_id": repo_id, "folder": copy, **options})
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def eval_json(view: ModelView) -> dict:
    """JSON as `lenslab eval --output` writes it, for the logit lens and one tuned lens."""
    n = view.num_positions

    def metrics(scale: float) -> LensMetrics:
        values = [scale * (n - i) for i in range(n)]
        return LensMetrics(ce=values, perplexity=values, kl=values, entropy=values, top1_agreement=values,
                           bias_kl=values)  # fmt: skip

    layers = [f"layer {i}" for i in range(n)]
    result = EvalResult(MODEL_ID, 4096, 0.5, layers, 2.0, 1.5, {"logit": metrics(1.0), "tuned": metrics(0.25)},
                        kinds={"logit": "logit", "tuned": "tuned"})  # fmt: skip
    return result.to_json() | {"data": "austen.txt", "written_by": "lenslab eval 0.1.0"}


def test_push_uploads_the_lens_and_a_card_that_loads_back(uploads, cache, view, tmp_path, monkeypatch):
    lens = random_tuned_lens(view, 6)
    lens.metadata = {"data": {"source": "austen.txt", "seq_len": 256, "train_sequences": 40}, "tokens_seen": 10240,
                     "training": {"config": {"steps": 10, "lr": 1.0}}}  # fmt: skip
    lens.save(tmp_path / "lens")
    (tmp_path / "eval.json").write_text(json.dumps(eval_json(view)))
    published = push_lens(tmp_path / "lens", "me/tiny-lens", evaluation=tmp_path / "eval.json", private=True)
    assert published.url == "https://huggingface.co/me/tiny-lens/commit/1"
    create, upload = uploads
    assert create["repo_id"] == upload["repo_id"] == "me/tiny-lens" and create["private"] is True
    folder = upload["folder"]
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "config.json", "params.safetensors"]
    card = (folder / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: lenslab\n" in front and f"base_model: {MODEL_ID}\n" in front
    assert all(f"- {tag}\n" in front for tag in ("lenslab", "tuned-lens", "interpretability"))
    assert "| data | austen.txt |" in card and "| tokens seen | 10240 |" in card and "| lr | 1 |" in card
    # The table: per layer, KL in bits per byte (factor 0.5), logit lens then this lens.
    n = view.num_positions
    assert f"| layer 0 | {0.5 * n:.3f} | {0.125 * n:.3f} |" in card and "KL logit lens (bits/byte)" in card
    cache.add_folder("me/tiny-lens", folder)  # what was uploaded, as a download would cache it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert same_lens(load_lens("hf://me/tiny-lens", view), lens, view)


def test_push_dry_run_writes_what_would_be_uploaded_and_uploads_nothing(uploads, view, tmp_path, capsys):
    random_tuned_lens(view, 7).save(tmp_path / "lens")
    args = ["push", "--lens", str(tmp_path / "lens"), "--repo", "me/tiny-lens", "--dry-run", "--output"]
    assert main([*args, str(tmp_path / "out")]) == 0
    assert uploads == []
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "README.md",
        "config.json",
        "params.safetensors",
    ]
    assert "dry run" in capsys.readouterr().out
    assert main([*args, str(tmp_path / "out")]) == 0  # an earlier dry run's files are replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README.md").write_text("# my project\n")
    assert main([*args, str(tmp_path / "other")]) == 2
    assert "a lenslab push dry run did not write" in capsys.readouterr().err
    assert main(["push", "--lens", str(tmp_path / "lens"), "--repo", "me/x", "--dry-run"]) == 2


def test_push_converts_a_tuned_lens_layout_and_needs_a_hub_id(uploads, view, tmp_path, tiny_lm_dir):
    lens = random_tuned_lens(view, 8)
    tuned_lens_layout(tmp_path / "published", lens, view)
    published = push_lens(tmp_path / "published", "me/converted", dry_run=tmp_path / "out")
    assert published.url is None and not (tmp_path / "out" / "params.pt").exists()
    assert same_lens(TunedLens.load(tmp_path / "out", view), lens, view)
    config = json.loads((tmp_path / "published" / "config.json").read_text())
    (tmp_path / "published" / "config.json").write_text(json.dumps(config | {"base_model_name_or_path": "/models/x"}))
    with pytest.raises(LensLabError, match="pass --base-model"):
        push_lens(tmp_path / "published", "me/converted", dry_run=tmp_path / "out")
    push_lens(tmp_path / "published", "me/converted", dry_run=tmp_path / "out", base_model=MODEL_ID)
    assert uploads == []


def test_push_refuses_bad_input_before_reading_the_lens(cache, view, tmp_path):
    random_tuned_lens(view, 9).save(tmp_path / "lens")
    with pytest.raises(LensLabError, match="HF_HUB_OFFLINE is set"):
        push_lens(tmp_path / "lens", "me/lens")
    with pytest.raises(LensLabError, match="pass OWNER/NAME"):
        push_lens(tmp_path / "lens", "not a repo", dry_run=tmp_path / "out")
    (tmp_path / "eval.json").write_text(json.dumps(eval_json(view) | {"lenses": {"logit": {}}}))
    with pytest.raises(LensLabError, match="--eval scores 0 tuned lenses"):
        push_lens(tmp_path / "lens", "me/lens", evaluation=tmp_path / "eval.json", dry_run=tmp_path / "out")


def test_push_to_hub_on_a_lens(uploads, view):
    published = random_tuned_lens(view, 10).push_to_hub("me/from-python")
    assert published.url is not None and [call["call"] for call in uploads] == ["create_repo", "upload_folder"]
