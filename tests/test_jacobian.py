"""The Jacobian lens: the fit against a brute-force Jacobian, its readout, and the published artifact format."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model
from torch.autograd.functional import jacobian

from lenslab import LogitLens, ModelView, TunedLens
from lenslab.cli import main
from lenslab.errors import LensLabError
from lenslab.jacobian import (
    ATTENTION_SINK_TOKENS,
    JacobianLens,
    JacobianSums,
    read_jacobian_artifact,
    source_positions,
    write_jacobian_artifact,
)
from lenslab.residuals import capture_residuals, hook_residual

SEQ = ATTENTION_SINK_TOKENS + 4


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def view(request) -> ModelView:
    model = tiny_model(request.param).double()  # float64, so the two estimators agree to rounding
    return ModelView.from_model(model)


def prompts(view: ModelView, count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, view.vocab_size, (count, SEQ), generator=generator)


def brute_force_jacobian(view: ModelView, prompt: torch.Tensor, position: int) -> torch.Tensor:
    """(1/|V|) sum over t, t' in V of d h_final,t' / d h_position,t, from the full [seq, d, seq, d] Jacobian."""
    ids = prompt[None]
    with torch.no_grad():
        h = capture_residuals(view, ids, positions=[position], need_logits=False).hidden[position]

    def last_residual(replacement: torch.Tensor) -> torch.Tensor:
        handle = hook_residual(view, position, lambda _: replacement)
        try:
            return capture_residuals(view, ids, positions=[-1], need_logits=False).hidden[-1][0]
        finally:
            handle.remove()

    full = jacobian(last_residual, h)[:, :, 0]  # [seq, d, seq, d]: output (t', i) by input (t, j)
    valid = source_positions(prompt.shape[-1])
    return full[valid, :, valid, :].sum(dim=(0, 2)) / (valid.stop - valid.start)


def test_fit_equals_the_brute_force_jacobian(view):
    batch = prompts(view, 2)
    lens = JacobianLens.fit(view, batch, dim_batch=5)  # several backward passes, the last one partly filled
    for position in range(1, view.num_layers):
        expected = sum(brute_force_jacobian(view, prompt, position) for prompt in batch) / len(batch)
        torch.testing.assert_close(lens.jacobian(position).double(), expected, rtol=1e-5, atol=1e-6)


def test_sums_over_parts_equal_one_fit_whatever_the_dim_batch(view):
    batch = prompts(view, 3, seed=1)
    parts = JacobianSums(view, dim_batch=7)
    parts.add(batch[:1])
    parts.add(batch[1:])
    whole = JacobianSums(view, dim_batch=view.d_model)
    whole.add(batch)
    assert parts.prompts == whole.prompts == 3
    torch.testing.assert_close(parts.means(), whole.means())


def test_identity_is_the_logit_lens_and_the_ends_are_unfitted(view):
    identity = JacobianLens(view)
    logit = LogitLens(view)
    residuals = view.capture(prompts(view, 1))
    for position, h in enumerate(residuals.hidden):
        torch.testing.assert_close(identity(h, position), logit(h, position))
    assert identity.jacobian(0) is None and identity.jacobian(view.num_layers) is None


def test_readout_decodes_j_times_h(view):
    lens = JacobianLens.fit(view, prompts(view, 1), dim_batch=16)
    h = torch.randn(2, 3, view.d_model, dtype=torch.float64)
    position = 1
    expected = view.decode(h @ lens.jacobian(position).double().T)
    torch.testing.assert_close(lens(h, position), expected, rtol=1e-5, atol=1e-5)


def test_artifact_round_trip(view, tmp_path):
    lens = JacobianLens.fit(view, prompts(view, 2), dim_batch=16)
    path = tmp_path / "jlens.pt"
    write_jacobian_artifact(lens, path, {"model": "tiny"})
    raw = torch.load(path, weights_only=True)
    assert raw["source_layers"] == list(range(view.num_layers - 1))
    assert raw["n_prompts"] == 2 and raw["d_model"] == view.d_model
    assert all(matrix.dtype == torch.float16 for matrix in raw["J"].values())
    loaded = read_jacobian_artifact(path, view)
    assert loaded.prompts == 2 and loaded.metadata == {"model": "tiny", "prompts": 2}
    for position in range(1, view.num_layers):
        torch.testing.assert_close(loaded.jacobian(position), lens.jacobian(position).half().float())


def test_artifact_for_another_width_or_depth_is_refused(view, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"J": {0: torch.eye(view.d_model + 1)}, "n_prompts": 1, "d_model": view.d_model + 1}, path)
    with pytest.raises(LensLabError, match="d_model"):
        read_jacobian_artifact(path, view)
    torch.save({"J": {view.num_layers + 3: torch.eye(view.d_model)}, "n_prompts": 1}, path)
    with pytest.raises(LensLabError, match="blocks"):
        read_jacobian_artifact(path, view)


def test_hostile_or_truncated_artifacts_are_refused(view, tmp_path):
    hostile = tmp_path / "hostile.pt"
    torch.save({"J": {0: torch.eye(view.d_model)}, "callback": print}, hostile)  # a pickled function
    with pytest.raises(LensLabError, match="not a readable Jacobian-lens file"):
        read_jacobian_artifact(hostile, view)
    truncated = tmp_path / "truncated.pt"
    good = tmp_path / "good.pt"
    write_jacobian_artifact(JacobianLens(view), good)
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(LensLabError, match="not a readable Jacobian-lens file"):
        read_jacobian_artifact(truncated, view)


def test_short_prompts_are_refused_before_any_work(view):
    with pytest.raises(LensLabError, match="too short"):
        JacobianSums(view).add(torch.zeros(1, ATTENTION_SINK_TOKENS + 1, dtype=torch.long))


def test_eval_puts_a_jacobian_lens_file_beside_a_tuned_lens(tiny_lm, tmp_path):
    view = ModelView.from_model(tiny_lm.model)
    ids = tiny_lm.tokenizer(tiny_lm.train_text_path.read_text()[:4000], return_tensors="pt").input_ids
    fitted = JacobianLens.fit(view, ids[:, : 2 * 32].reshape(2, 32), dim_batch=view.d_model)
    artifact = tmp_path / "gpt2-tiny.pt"
    write_jacobian_artifact(fitted, artifact)
    tuned = tmp_path / "tuned"
    TunedLens.from_model(view).save(tuned)
    output = tmp_path / "eval.json"
    assert main([
        "eval", "--model", str(tiny_lm.directory), "--data", str(tiny_lm.heldout_text_path), "--device", "cpu",
        "--seq-len", "32", "--tokens", "256", "--output", str(output), "--lens", str(tuned), "--lens", str(artifact),
    ]) == 0  # fmt: skip
    document = json.loads(output.read_text())
    kl = {name: metrics["kl"] for name, metrics in document["lenses"].items()}
    assert list(kl) == ["logit", "tuned", "jacobian"]
    assert document["kinds"] == {"logit": "logit", "tuned": "tuned", "jacobian": "jacobian"}
    last = view.num_layers
    assert kl["jacobian"][0] == pytest.approx(kl["logit"][0]) and kl["jacobian"][last] == kl["logit"][last] == 0
    assert all(kl["jacobian"][p] != pytest.approx(kl["logit"][p]) for p in range(1, last))


def run_jacobian_train(tiny_lm, output, *extra) -> int:
    return main([
        "train", "--kind", "jacobian", "--model", str(tiny_lm.directory), "--data", str(tiny_lm.train_text_path),
        "--device", "cpu", "--seq-len", "24", "--heldout-tokens", "0", "--train-tokens", str(3 * 24),
        "--dim-batch", "16", "--output", str(output), *extra,
    ])  # fmt: skip


def test_train_kind_jacobian_fits_saves_and_resumes(tiny_lm, tmp_path, capsys, monkeypatch):
    from lenslab.lens_files import load_lens
    from lenslab.train import checkpoints, jacobian_fit

    whole = tmp_path / "whole"
    assert run_jacobian_train(tiny_lm, whole) == 0
    assert "saved the Jacobian lens" in capsys.readouterr().out
    view = ModelView.from_model(tiny_lm.model)
    lens = load_lens(whole, view)
    assert isinstance(lens, JacobianLens) and lens.prompts == 3
    assert json.loads((whole / "config.json").read_text())["kind"] == "jacobian"

    # Killed after the checkpoint at prompt 2: the rerun adds only the third prompt, and the lens is the same.
    parted = tmp_path / "parted"
    real_add = JacobianSums.add
    calls = []

    def add_then_die(self, input_ids):
        calls.append(len(calls))
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_add(self, input_ids)

    monkeypatch.setattr(JacobianSums, "add", add_then_die)
    monkeypatch.setattr(jacobian_fit, "fit_jacobian_lens", partial_checkpoints(jacobian_fit.fit_jacobian_lens))
    assert run_jacobian_train(tiny_lm, parted) == 130
    assert checkpoints.load_checkpoint(parted).step == 2
    monkeypatch.setattr(JacobianSums, "add", real_add)
    added = []
    monkeypatch.setattr(JacobianSums, "add", lambda self, ids: (added.append(1), real_add(self, ids)))
    assert run_jacobian_train(tiny_lm, parted) == 0
    assert len(added) == 1
    resumed = load_lens(parted, view)
    for position in range(1, view.num_layers):
        torch.testing.assert_close(resumed.jacobian(position), lens.jacobian(position))
    # A finished run is not fitted again.
    assert run_jacobian_train(tiny_lm, parted) == 0
    assert "already holds the Jacobian lens" in capsys.readouterr().out and len(added) == 1


def partial_checkpoints(fit):
    """`fit` with a checkpoint after every second prompt."""

    def fit_often(*args, **kwargs):
        return fit(*args, **{**kwargs, "checkpoint_every": 2})

    return fit_often


def test_train_refuses_prompts_too_short_before_loading_the_model(tmp_path, capsys):
    output = tmp_path / "jlens"
    code = main([
        "train", "--kind", "jacobian", "--model", str(tmp_path / "no-model"), "--data", __file__,
        "--seq-len", "12", "--output", str(output),
    ])  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "too short for the Jacobian lens" in error and "--seq-len 18" in error  # not a missing-model error
    assert not output.exists()


def test_fit_freezes_trainable_weights_only_while_it_records_the_graph(view):
    batch = prompts(view, 1, seed=3)
    frozen = JacobianLens.fit(view, batch, dim_batch=8)
    model = view.model
    flags = [parameter.requires_grad for parameter in model.parameters()]
    model.requires_grad_(True)
    try:
        trainable = JacobianLens.fit(view, batch, dim_batch=8)
        assert all(parameter.requires_grad and parameter.grad is None for parameter in model.parameters())
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
    for position in range(1, view.num_layers):
        torch.testing.assert_close(trainable.jacobian(position), frozen.jacobian(position))
