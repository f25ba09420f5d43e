"""lenslab and TransformerLens 4.3 (`transformer_lens.tools.analysis.JacobianLens`) on the same Jacobian lens:
each reads the other's files, and both estimators fit the same J on the same prompts.

TransformerLens is in the `test` extra; where it is not installed the whole module is skipped, with the reason.
Importing it takes seconds, so it is imported once, here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model

pytest.importorskip(
    "transformer_lens", reason="transformer-lens is not installed (pip install -e '.[test]' installs it)"
)
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402
from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens  # noqa: E402

from lenslab import ModelView, TunedLens  # noqa: E402
from lenslab.cli import main  # noqa: E402
from lenslab.evaluate import evaluate_lenses  # noqa: E402
from lenslab.jacobian import JacobianLens  # noqa: E402
from lenslab.lens_files import load_lens  # noqa: E402

SEQ = 40
"""Tokens per prompt in the agreement test: 23 source positions after the 16 attention sinks."""


@pytest.fixture(scope="module")
def view() -> ModelView:
    return ModelView.from_model(tiny_model("gpt2"))  # 2 layers: J-lens block 0 only; see the agreement test for 4


def random_jacobian(view: ModelView) -> JacobianLens:
    generator = torch.Generator().manual_seed(0)
    d, blocks = view.d_model, view.num_layers - 1
    return JacobianLens(view, torch.eye(d) + 0.1 * torch.randn(blocks, d, d, generator=generator), prompts=5)


def test_transformer_lens_loads_what_lenslab_exports(view, tmp_path):
    lens = random_jacobian(view)
    lens.save(tmp_path / "jfolder")
    exported = tmp_path / "exported.pt"
    assert main(["convert", "--lens", str(tmp_path / "jfolder"), "--to", "jacobian-lens", "-o", str(exported)]) == 0
    theirs = TLJacobianLens.load(str(exported))
    assert theirs.source_layers == list(range(view.num_layers - 1))
    assert theirs.d_model == view.d_model and theirs.n_prompts == 5
    for block in theirs.source_layers:
        torch.testing.assert_close(theirs.jacobians[block], lens.jacobian(block + 1), rtol=2e-3, atol=2e-3)
        # Their transport is J h, as ours: the same map, not its transpose.
        h = torch.randn(4, view.d_model)
        torch.testing.assert_close(theirs.transport(h, block), lens.transform(h, block + 1), rtol=5e-3, atol=5e-3)


def test_transformer_lens_loads_a_bias_free_tuned_lens_as_i_plus_a(view, tmp_path):
    tuned = TunedLens.from_model(view, bias=False)
    with torch.no_grad():
        for translator in tuned.translators:
            translator.weight.normal_(0, 0.1)
    tuned.save(tmp_path / "tuned")
    assert (
        main(["convert", "--lens", str(tmp_path / "tuned"), "--to", "jacobian-lens", "-o", str(tmp_path / "j.pt")]) == 0
    )
    theirs = TLJacobianLens.load(str(tmp_path / "j.pt"))
    expected = torch.eye(view.d_model) + tuned.translators[1].weight.detach()
    torch.testing.assert_close(theirs.jacobians[0], expected, rtol=2e-3, atol=2e-3)


def test_lenslab_reads_what_transformer_lens_saves(view, tmp_path):
    d = view.d_model
    matrices = {0: torch.eye(d) + 0.1 * torch.randn(d, d, generator=torch.Generator().manual_seed(2))}
    metadata = {"model_name": "tiny-gpt2", "corpus": "synthetic", "target_layer": view.num_layers - 1}
    TLJacobianLens(matrices, n_prompts=9, d_model=d, metadata=metadata).save(str(tmp_path / "tl.pt"))
    ours = load_lens(tmp_path / "tl.pt", view)
    assert ours.kind == "jacobian" and ours.prompts == 9 and ours.metadata["corpus"] == "synthetic"
    torch.testing.assert_close(ours.jacobian(1), matrices[0], rtol=2e-3, atol=2e-3)
    # ...and converts it into a lenslab folder that exports back to what TransformerLens wrote.
    assert main(["convert", "--lens", str(tmp_path / "tl.pt"), "--to", "lenslab", "-o", str(tmp_path / "folder")]) == 0
    assert (
        main(["convert", "--lens", str(tmp_path / "folder"), "--to", "jacobian-lens", "-o", str(tmp_path / "back.pt")])
        == 0
    )
    back = TLJacobianLens.load(str(tmp_path / "back.pt"))
    assert back.n_prompts == 9 and back.metadata["model_name"] == "tiny-gpt2"
    torch.testing.assert_close(
        back.jacobians[0], TLJacobianLens.load(str(tmp_path / "tl.pt")).jacobians[0], rtol=0, atol=0
    )


@pytest.mark.slow  # two fits and an evaluation: about 5 s on a quiet 2-core CPU, 30 s on a busy one
def test_lenslab_and_transformer_lens_fit_the_same_jacobian_lens(tiny_lm, tmp_path):
    """Same model (the trained tiny GPT-2, float32), same prompts: the same J, and so the same held-out KL."""
    bridge = TransformerBridge.boot_transformers(
        str(tiny_lm.directory), hf_model=copy.deepcopy(tiny_lm.model), tokenizer=tiny_lm.tokenizer, device="cpu"
    )
    bridge.eval()
    documents = [doc for doc in tiny_lm.train_text_path.read_text().split("\n\n") if len(doc) > 400][:3]
    theirs = TLJacobianLens.fit(bridge, documents, corpus="tiny-lm", dim_batch=64, max_seq_len=SEQ, show_progress=False)
    # The very tokens TransformerLens fitted on (its to_tokens prepends the BOS token), for lenslab's fit.
    tokens = torch.cat([bridge.to_tokens(doc)[:, :SEQ] for doc in documents])
    assert tokens.shape == (len(documents), SEQ) and theirs.n_prompts == len(documents)
    view = ModelView.from_model(tiny_lm.model)
    ours = JacobianLens.fit(view, tokens, dim_batch=24)  # other chunks than theirs, the last one partly filled
    assert theirs.source_layers == [p - 1 for p in range(1, view.num_layers)]
    for block in theirs.source_layers:
        torch.testing.assert_close(ours.jacobian(block + 1), theirs.jacobians[block], rtol=1e-4, atol=1e-5)

    heldout = tiny_lm.tokenizer(tiny_lm.heldout_text_path.read_text()[:6000], return_tensors="pt").input_ids
    heldout = heldout[:, : 6 * 64].reshape(6, 64)
    as_ours = JacobianLens(view, torch.stack([theirs.jacobians[block] for block in theirs.source_layers]))
    result = evaluate_lenses(view, {"lenslab": ours, "transformer_lens": as_ours}, heldout)
    kl_ours, kl_theirs = result.lenses["lenslab"].kl, result.lenses["transformer_lens"].kl
    assert kl_ours == pytest.approx(kl_theirs, rel=0.01, abs=1e-6)
    assert kl_ours[1] > kl_ours[view.num_layers - 1] > 0  # a lens that does something, not two identities

    # TransformerLens validates lenslab's export against its model and reads out with it as with its own fit.
    ours.save(tmp_path / "ours")
    assert (
        main(["convert", "--lens", str(tmp_path / "ours"), "--to", "jacobian-lens", "-o", str(tmp_path / "o.pt")]) == 0
    )
    exported = TLJacobianLens.from_pretrained(str(tmp_path / "o.pt"), model=bridge)
    prompt = tiny_lm.heldout_text_path.read_text()[:300]
    mine = exported.readout(bridge, prompt, return_full_logits=True).lens_logits
    reference = theirs.readout(bridge, prompt, return_full_logits=True).lens_logits
    for block in theirs.source_layers:
        torch.testing.assert_close(mine[block], reference[block], rtol=1e-3, atol=5e-3)  # J in float16 in the file
