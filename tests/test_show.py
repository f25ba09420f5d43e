"""`lenslab show` end to end, the pictures it draws, and how tokens are displayed."""

from __future__ import annotations

import json
import re
import typing

import pytest
import torch
from rich.console import Console
from support.tiny_lm import load_tiny_lm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lenslab.adapter import ModelView
from lenslab.cli import main
from lenslab.command_specs import Stat
from lenslab.errors import LensLabError
from lenslab.jacobian import ATTENTION_SINK_TOKENS, JacobianLens
from lenslab.lenses import LogitLens, TunedLens
from lenslab.plots import grid, terminal
from lenslab.plots import html as html_plot
from lenslab.plots import png as png_plot
from lenslab.plots.palette import KIND_COLORS
from lenslab.plots.scales import STATISTICS, statistic_label
from lenslab.specs import LensSpec
from lenslab.tokens import single_token_id, token_text, visible
from lenslab.trajectory import TrajectoryConfig, compute_trajectories, encode_prompt

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPT = "The capital of Varnos is Kelti. Elnu counted one, two, three"
"""In the style of the tiny LM's corpus (``support/tiny_lm.py``); " capital", " one", " two" are single tokens."""


@pytest.fixture(scope="module")
def lens_dir(tiny_lm, tmp_path_factory):
    """A tuned lens for the tiny LM with random translators (so it differs from the logit lens)."""
    lens = TunedLens.from_model(tiny_lm.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for translator in lens.translators:
            translator.weight.copy_(0.1 * torch.randn(translator.weight.shape, generator=generator))
    return lens.save(tmp_path_factory.mktemp("lens"))


def run_show(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["show", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the command line ------------------------------------------------------------------------------


def test_every_output_format_from_the_cli(tiny_lm, lens_dir, tmp_path, capsys):
    model = tiny_lm.directory
    # Twice each: what a run wrote is signed as lenslab's, so the next run may replace it.
    for name in ("out.html", "out.png", "out.json") * 2:
        code, _, err = run_show(capsys, "--model", model, "--lens", lens_dir, "--top-k", 3, "-o", tmp_path / name,
                                PROMPT)  # fmt: skip
        assert code == 0, err
        assert f"Wrote {tmp_path / name}" in err.replace("\n", "")
    page = (tmp_path / "out.html").read_text(encoding="utf-8")
    # Self-contained: plotly.js is inlined, nothing is fetched from a CDN.
    assert not re.search(r"<script[^>]*\bsrc=", page) and "Plotly.newPlot" in page and len(page) > 1_000_000
    assert "logit lens" in page and "tuned lens" in page
    assert (tmp_path / "out.png").read_bytes().startswith(PNG_MAGIC)
    document = json.loads((tmp_path / "out.json").read_text())
    assert list(document["lenses"]) == ["logit", "tuned"]
    logit = document["lenses"]["logit"]
    n_tokens = len(tiny_lm.tokenizer(PROMPT)["input_ids"])
    assert len(logit["tokens"]) == n_tokens and len(logit["layers"]) == 5
    assert len(logit["top_k"][0][0]) == 3 and "".join(logit["tokens"]) == PROMPT
    # The two lenses agree at the model's output and differ below it.
    tuned = document["lenses"]["tuned"]
    assert logit["top_k"][-1] == tuned["top_k"][-1] and logit["top_k"][1] != tuned["top_k"][1]


def test_terminal_view_without_output(tiny_lm, capsys):
    code, out, _ = run_show(capsys, "--model", tiny_lm.directory, "--stat", "rank", PROMPT)
    assert code == 0
    assert "layer 4 (output)" in out and "embeddings" in out and "␣capital" in out and "rank of the next token" in out


def test_json_with_positions_targets_and_prompt_file(tiny_lm, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT + "\n", encoding="utf-8")
    out = tmp_path / "slice.json"
    code, _, err = run_show(
        capsys, "--model", tiny_lm.directory, "--prompt-file", prompt_file, "--positions", "2:6",
        "--target", " two", "--anti-target", " one", "--stat", "target", "-o", out,
    )  # fmt: skip
    assert code == 0, err
    document = json.loads(out.read_text())
    ids = tiny_lm.tokenizer(PROMPT)["input_ids"]  # the final newline of the file is dropped
    assert document["start"] == 2 and document["token_ids"] == ids[2:6] and document["next_tokens"][-1] is not None
    assert document["targets"] == [" two"] and document["anti_targets"] == [" one"]
    score = torch.tensor(document["target_score"])
    difference = torch.tensor(document["target_logprob"]) - torch.tensor(document["anti_target_logprob"])
    torch.testing.assert_close(score, difference)


def test_prompt_longer_than_the_context_needs_positions(tiny_lm, tmp_path, capsys):
    long_prompt = "one, two, three, four, " * 40  # well over the 128-token context
    code, _, err = run_show(capsys, "--model", tiny_lm.directory, long_prompt)
    assert code == 2 and "reads at most 128" in err and "--positions" in err
    out = tmp_path / "a.json"
    code, _, err = run_show(capsys, "--model", tiny_lm.directory, "--positions", ":20", "-o", out, long_prompt)
    assert code == 0, err
    assert len(json.loads(out.read_text())["tokens"]) == 20


def test_lens_for_another_model_is_refused(tiny_lm, tmp_path, capsys):
    other = load_tiny_lm(tiny_lm.directory).model
    with torch.no_grad():
        other.get_output_embeddings().weight.mul_(1.5)  # another model of the same shape
    lens_dir = TunedLens.from_model(other).save(tmp_path / "other-lens")
    code, _, err = run_show(capsys, "--model", tiny_lm.directory, "--lens", lens_dir, PROMPT)
    assert code == 2 and "unembedding differs" in err and "--allow-model-mismatch" in err
    code, _, err = run_show(capsys, "--model", tiny_lm.directory, "--lens", lens_dir, "--allow-model-mismatch", PROMPT)
    assert code == 0, err


def test_any_set_of_lenses_side_by_side_with_the_logit_lens(tiny_lm, lens_dir, tmp_path, capsys):
    """Two tuned lenses (named by their folders, as they share a kind) and a Jacobian lens: one block each in the
    JSON, the HTML, the PNG and the terminal, each in its kind's colour."""
    view = ModelView.from_model(tiny_lm.model)
    other_tuned = TunedLens.from_model(tiny_lm.model).save(tmp_path / "tuned-b")  # untrained: the logit lens
    ids = encode_prompt(tiny_lm.tokenizer, f"{PROMPT} {PROMPT}")[: ATTENTION_SINK_TOKENS + 4]
    jacobian_dir = JacobianLens.fit(view, ids[None], dim_batch=16).save(tmp_path / "jlens")
    spec = LensSpec([lens_dir, other_tuned, jacobian_dir])
    names = {"logit": "logit", lens_dir.name: "tuned", "tuned-b": "tuned", "jacobian": "jacobian"}
    assert {name: lens.kind for name, lens in spec.load(view).items()} == names
    flags = [flag for path in spec.lens for flag in ("--lens", path)]
    for name in ("out.json", "out.html"):
        code, _, err = run_show(capsys, "--model", tiny_lm.directory, *flags, "--top-k", 2, "-o", tmp_path / name,
                                PROMPT)  # fmt: skip
        assert code == 0, err
    document = json.loads((tmp_path / "out.json").read_text())
    assert {name: lens["kind"] for name, lens in document["lenses"].items()} == names
    assert list(document["lenses"]) == list(names)
    tops = [lens["top_k"][1] for lens in document["lenses"].values()]
    assert tops[0] == tops[2] != tops[1]  # the untrained tuned lens is the logit lens, the trained one is not
    page = (tmp_path / "out.html").read_text(encoding="utf-8")
    labels = {"logit lens": "logit", f"tuned lens ({lens_dir.name})": "tuned", "tuned lens (tuned-b)": "tuned",
              "jacobian lens": "jacobian"}  # fmt: skip
    assert all(label in page for label in labels)
    trajectories = compute_trajectories(view, spec.load(view), ids, tokenizer=tiny_lm.tokenizer)
    panels = [a.text for a in html_plot.figure(trajectories).layout.annotations if "<b><span" in a.text]
    assert panels == [
        f'<b><span style="color:{KIND_COLORS[kind]}">{label}</span></b>' for label, kind in labels.items()
    ]
    # The first band's panels, one per lens; matplotlib keeps a left-aligned title apart from the centred one.
    titles = [(ax.get_title(loc="left"), ax._left_title.get_color()) for ax in png_plot.figure(trajectories).axes[:4]]
    assert titles == [
        (f"{label}, tokens 0-{png_plot.tokens_per_band() - 1}", KIND_COLORS[kind]) for label, kind in labels.items()
    ]
    code, out, _ = run_show(capsys, "--model", tiny_lm.directory, *flags, PROMPT)
    assert code == 0 and all(f"{label}, tokens 0-" in out for label in labels)
    assert "it is the top prediction of the logit lens from" in out and "the jacobian lens from" in out


EARLIER_PAGE = '<html><head><meta name="generator" content="lenslab 0.1.0"></head>an earlier run\'s view</html>'
"""Stands in for a page an earlier `lenslab show` wrote, which a new run may replace."""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-file", "{tmp}/empty.txt"], "prompt is empty"),
        ([""], "prompt is empty"),
        ([], "No prompt was given"),
        (["-o", "{tmp}/out.html", "--prompt-file", "{tmp}/empty.txt", "text"], "only one of them"),
        (["-o", "{tmp}/out.pdf", "text"], "has extension '.pdf'"),
        (["--stat", "target", "text"], "no target was given"),
        (["--target", " counted one", "text"], r"--target ' counted one' is 2 tokens"),
        (["--positions", "5:5", "-o", "{tmp}/out.html", "text"], "selects no tokens"),
        (["--lens", "{tmp}/missing", "-o", "{tmp}/out.html", "text"], "No lens found"),
    ],
)  # fmt: skip
def test_bad_input_is_one_sentence_and_keeps_earlier_output(tiny_lm, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "out.html").write_text(EARLIER_PAGE, encoding="utf-8")
    args = [arg.format(tmp=tmp_path) for arg in args]
    code, _, err = run_show(capsys, "--model", tiny_lm.directory, *args)
    assert code == 2
    error = err.strip().splitlines()[-1]
    assert error.startswith("lenslab show: error: ") and message in error and error.count(". ") == 0
    assert (tmp_path / "out.html").read_text(encoding="utf-8") == EARLIER_PAGE


def test_bad_positions_syntax_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["show", "--model", "m", "--positions", "5", "text"])
    assert exit_info.value.code == 2 and "START:END" in capsys.readouterr().err


def test_stat_choices_are_the_statistics():
    assert typing.get_args(Stat) == tuple(STATISTICS)


# --- pictures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trajectories(tiny_lm, lens_dir):
    lenses = [LogitLens.from_model(tiny_lm.model), TunedLens.load(lens_dir, tiny_lm.model)]
    ids = encode_prompt(tiny_lm.tokenizer, "Elnu counted one, two<|endoftext|>\n")
    config = TrajectoryConfig(top_k=3)
    return compute_trajectories(tiny_lm.model, lenses, ids, tokenizer=tiny_lm.tokenizer, config=config)


def test_html_heatmaps_share_one_scale_and_mark_correct_next_tokens(trajectories):
    fig = html_plot.figure(trajectories, "kl")
    heatmaps = [trace for trace in fig.data if trace.type == "heatmap"]
    assert [h.name for h in heatmaps] == ["logit", "tuned"] and all(h.coloraxis == "coloraxis" for h in heatmaps)
    largest = max(float(t.kl_to_final.max()) for t in trajectories)
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax >= largest
    for heatmap, trajectory in zip(heatmaps, trajectories):
        texts = trajectory.token_text
        top1 = [
            [html_plot.label(grid.fit(texts[i], html_plot.CELL_CHARS)) for i in row]
            for row in trajectory.top_k_ids[..., 0].tolist()
        ]
        assert [list(row) for row in heatmap.text] == top1
        assert "3. " in heatmap.customdata[0][0] and "rank" in heatmap.customdata[0][0]
    # Special tokens and whitespace are escaped and visible, not read as markup.
    assert "&lt;|endofte…" in fig.layout.xaxis.ticktext and "↵" in fig.layout.xaxis.ticktext
    marks = [a for a in fig.layout.annotations if a.xref == "x"]
    correct = trajectories[0].top_k_ids[-1, :-1, 0] == trajectories[0].next_ids[:-1]
    assert [a.text.startswith("<b>✓") for a in marks] == correct.tolist() and correct.any()


def test_rank_colour_is_logarithmic(trajectories):
    fig = html_plot.figure(trajectories[:1], "rank")
    assert fig.layout.coloraxis.colorbar.ticktext[:3] == ("1", "10", "100")
    z = fig.data[0].z
    assert z[0][-1] is None  # no next token after the prompt
    assert z[0][0] == pytest.approx(float(torch.log10(trajectories[0].next_token_rank[0, 0].double())))


def test_png_is_written_unless_too_large(trajectories, long_trajectories, tmp_path):
    path = png_plot.write_png(trajectories, tmp_path / "grid.png", stat="prob")
    assert path.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(LensLabError, match=r"pixels tall.*--positions START:END with at most [1-9][0-9]* tokens"):
        png_plot.write_png(long_trajectories, tmp_path / "wide.png", dpi=3_000)
    assert not (tmp_path / "wide.png").exists()


def test_terminal_tables_fit_the_width(trajectories):
    tables = terminal.tables(trajectories, "entropy", width=60)
    n_tokens = trajectories[0].entropy.shape[1]
    assert sum(len(table.columns) - 1 for table in tables) == 2 * n_tokens and len(tables) > 2
    console = Console(width=60, record=True, color_system="truecolor")
    for table in tables:
        console.print(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 60 and "✓" in text
    # The last table's caption is the legend: the colour key's range, and what ✓ and the cells mean.
    legend = " ".join(text.split("colour = entropy (nats): ")[-1].split())
    assert legend.startswith("0 ") and "model's top-1 prediction is right" in legend and "most likely" in legend


@pytest.fixture(scope="module")
def long_trajectories(tiny_lm, lens_dir):
    lenses = [LogitLens.from_model(tiny_lm.model), TunedLens.load(lens_dir, tiny_lm.model)]
    ids = encode_prompt(tiny_lm.tokenizer, "Elnu counted one, two, three, four, five, six. " * 6)
    return compute_trajectories(tiny_lm.model, lenses, ids, tokenizer=tiny_lm.tokenizer)


def test_long_prompt_wraps_into_bands_a_page_wide(long_trajectories):
    n_tokens = long_trajectories[0].entropy.shape[1]
    per_band = png_plot.tokens_per_band()
    bands = -(-n_tokens // per_band)
    assert bands >= 3
    fig = png_plot.figure(long_trajectories, "rank")
    assert fig.get_figwidth() <= png_plot.PAGE_INCHES
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 2 * bands  # each band shows both lenses, one under the other
    assert [ax.get_title(loc="left") for ax in heatmaps[:2]] == [
        f"logit lens, tokens 0-{per_band - 1}",
        f"tuned lens, tokens 0-{per_band - 1}",
    ]
    # Every band as wide as a full one, so columns line up; the colour key names the statistic.
    assert {ax.get_xlim() for ax in heatmaps} == {(-0.5, per_band - 0.5)}
    assert any(ax.get_xlabel() == "rank of the next token" for ax in fig.axes if not ax.images)
    assert heatmaps[-1].get_xlabel() == "input token"


def test_html_fills_the_window_and_wraps(long_trajectories):
    fig = html_plot.figure(long_trajectories, "entropy")
    n_tokens = long_trajectories[0].entropy.shape[1]
    bands = -(-n_tokens // html_plot.TOKENS_PER_BAND)
    assert len(fig.data) == 2 * bands and fig.layout.width is None and fig.layout.autosize
    assert fig.layout.height == html_plot.page_height(long_trajectories)
    assert '"responsive": true' in html_plot.html_document(long_trajectories[:1], "entropy")


def test_hover_says_each_figure_once(trajectories):
    hover = html_plot.figure(trajectories, "entropy").data[0].customdata[0][0]
    assert hover.count("entropy") == 1 and "<b>entropy" in hover  # the coloured figure, bold, not repeated
    assert hover.count("KL") == 1 and hover.count("rank") == 1


def test_target_statistic_names_its_tokens(tiny_lm):
    model, tokenizer = tiny_lm.model, tiny_lm.tokenizer
    ids = encode_prompt(tokenizer, PROMPT)
    two, one = (single_token_id(tokenizer, t, "--target") for t in (" two", " one"))
    lens = [LogitLens.from_model(model)]
    alone = compute_trajectories(model, lens, ids, tokenizer=tokenizer, config=TrajectoryConfig(targets=(two,)))
    both = compute_trajectories(model, lens, ids, tokenizer=tokenizer,
                                config=TrajectoryConfig(targets=(two,), anti_targets=(one,)))  # fmt: skip
    assert statistic_label(alone[0], "target") == "log p('␣two')"
    assert statistic_label(both[0], "target") == "log p('␣two') − log p('␣one')"
    assert png_plot.figure(both, "target")._suptitle.get_text().startswith(f"{tiny_lm.directory.name}: log p('␣two')")


# --- token display -------------------------------------------------------------------------------


def test_byte_level_bpe_tokens(tiny_lm):
    tokenizer = tiny_lm.tokenizer
    ids = tokenizer("Hi the\n\tx 中")["input_ids"]
    shown = [visible(token_text(tokenizer, i)) for i in ids]
    assert shown[shown.index("␣the") + 1 :] == ["↵", "⇥", "x", "␣", "\\xe4", "\\xb8", "\\xad"]
    assert token_text(tokenizer, tokenizer.eos_token_id) == "<|endoftext|>"


def test_whole_non_latin_characters_in_a_byte_level_vocabulary():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(["中文 中文 中文 Привет Привет"] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    assert [token_text(fast, i) for i in fast("中文 Привет")["input_ids"]] == ["中文", " Привет"]


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-style: metaspace ``▁``, byte fallback ``<0xNN>`` and a decoder that strips the leading space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{byte:02X}>": 3 + byte for byte in range(256)}}
    for piece in ["▁", "t", "h", "e", "c", "a", "▁t", "▁th", "▁the", "中"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_tokens():
    tokenizer = sentencepiece_tokenizer()
    ids = tokenizer("the cat\n中文", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:2] == ["▁the", "▁"]
    shown = [visible(token_text(tokenizer, i)) for i in ids]
    assert shown == ["␣the", "␣", "c", "a", "t", "↵", "中", "\\xe6", "\\x96", "\\x87"]


def test_visible_and_single_tokens(tiny_lm):
    assert visible("a b\r\x07") == "a␣b␍\\x07"
    assert token_text(tiny_lm.tokenizer, single_token_id(tiny_lm.tokenizer, " the", "--target")) == " the"
    with pytest.raises(LensLabError, match=r"--target ' counted one' is 2 tokens"):
        single_token_id(tiny_lm.tokenizer, " counted one", "--target")
