"""The model card (`README.md`) of a lens published on the Hugging Face Hub, written from what the lens records.

The YAML front matter is what the hub indexes: `library_name: lenslab`, `base_model` (the model's hub id, which
links the lens from the model's page) and tags. The body says how to use the lens, what it was made from (the
training data, tokens and recipe from the lens config's `metadata`) and, given the JSON `lenslab eval` writes, how
close it comes to the model at each layer beside the logit lens. Nothing here reads tensors: a card is text about a
`LensConfig`.

>>> card = model_card(LensConfig("tuned", d_model=8, num_hidden_layers=2), base_model="gpt2", repo_id="me/lens")
>>> card.splitlines()[:3]
['---', 'library_name: lenslab', 'base_model: gpt2']
"""

from __future__ import annotations

import json
from typing import Any

from lenslab.artifacts import LensConfig
from lenslab.errors import LensLabError
from lenslab.model_source import HUB_ID

TAGS = ("lenslab", "interpretability", "logit-lens")
"""Tags every lens card carries; its kind adds one (`kind_tag`)."""
PROMPT = "The Eiffel Tower is in"


def kind_tag(kind: str) -> str:
    """The tag of a lens kind, as the hub's other lens repositories spell it: "tuned-lens", "jacobian-lens"."""
    return f"{kind}-lens"


def model_card(config: LensConfig, *, base_model: str, repo_id: str, evaluation: dict[str, Any] | None = None) -> str:
    """The card of the lens `config` describes, for `base_model` (a hub id), published as `repo_id`; `evaluation` is
    the JSON of `lenslab eval` run with this lens (see `evaluation_table`)."""
    if not HUB_ID.fullmatch(base_model):
        raise LensLabError(
            f"A model card names the lens's model by its hub id, and {base_model!r} is not one; pass the hub id the "
            f"model was loaded from (lenslab push --base-model OWNER/NAME)."
        )
    tags = [*TAGS, kind_tag(config.kind)]
    front = ["---", "library_name: lenslab", f"base_model: {base_model}", "tags:", *(f"- {t}" for t in tags)]
    reference = f"hf://{repo_id}"
    lines = [
        *front, "---", "",
        f"# {config.kind.capitalize()} lens for {base_model}", "",
        f"A {config.kind} lens for [{base_model}](https://huggingface.co/{base_model}), made with lenslab: it "
        f"decodes the residual stream after every layer into next-token predictions, to read what each layer of "
        f"the model predicts.", "",
        "## Use", "",
        "```bash",
        f'lenslab show --model {base_model} --lens {reference} "{PROMPT}"',
        "```", "",
        "```python",
        "from lenslab import ModelView, load_lens, load_model",
        "",
        f'view = ModelView.from_model(load_model("{base_model}").model)',
        f'lens = load_lens("{reference}", view)  # checks that the lens was made for this model',
        "```", "",
        "## The lens", "",
        *_table(["", ""], _lens_facts(config)), "",
        *_training(config.metadata),
    ]  # fmt: skip
    if evaluation is not None:
        lines += ["## Evaluation", "", *evaluation_table(evaluation, config.kind), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _lens_facts(config: LensConfig) -> list[list[str]]:
    facts = [
        ["kind", config.kind],
        ["base model", config.base_model or "not recorded"],
        ["base model revision", config.base_model_revision or "not recorded"],
        ["layers", str(config.num_hidden_layers)],
        ["residual width", str(config.d_model)],
        ["bias", "yes" if config.bias else "no"],
        ["unembedding fingerprint", "recorded (loading checks it)" if config.unembed_fingerprint else "none"],
        ["files", "config.json, params.safetensors"],
        ["written by", f"lenslab {config.lenslab_version}"],
    ]
    if config.metadata.get("converted_from"):
        facts.append(["converted from", str(config.metadata["converted_from"])])
    return facts


def _training(metadata: dict[str, Any]) -> list[str]:
    """The training section: data, tokens and recipe, as far as the lens recorded them."""
    data = metadata.get("data") or {}
    training = metadata.get("training") or {}
    recipe = training.get("config") or {}
    facts = [
        ["data", data.get("source")],
        ["sequence length", data.get("seq_len") or metadata.get("seq_len")],
        ["training sequences", data.get("train_sequences")],
        ["held-out tokens (not trained on)", data.get("heldout_tokens")],
        ["bytes per token", data.get("bytes_per_token")],
        ["optimizer steps", metadata.get("steps_done")],
        ["tokens seen", metadata.get("tokens_seen")],
        ["closed-form start tokens", metadata.get("init_tokens")],
        ["final loss", metadata.get("final_loss")],
        ["prompts (Jacobian lens)", metadata.get("prompts")],
        ["processes", metadata.get("processes")],
    ]
    facts = [[name, _text(value)] for name, value in facts if value is not None]
    if not facts and not recipe:
        return ["## Training", "", "The lens records no training data or recipe.", ""]
    lines = ["## Training", ""]
    if facts:
        lines += [*_table(["", ""], facts), ""]
    if recipe:
        lines += ["Recipe (`lenslab train` settings):", "", *_table(["setting", "value"], sorted(recipe.items())), ""]
    return lines


def evaluation_table(evaluation: dict[str, Any], kind: str) -> list[str]:
    """Per layer, the KL to the model's own prediction and the cross-entropy of the logit lens and of this lens (the
    lens of `kind` in `evaluation`, the JSON `lenslab eval` writes), in bits per byte where the text's bytes are
    known, else in nats per token."""
    lenses = evaluation.get("lenses")
    if not isinstance(lenses, dict) or "logit" not in lenses or not isinstance(evaluation.get("layers"), list):
        raise LensLabError("--eval does not hold lenslab eval's JSON (no 'lenses' with 'logit'); pass the file "
                           "lenslab eval --output wrote.")  # fmt: skip
    kinds = evaluation.get("kinds") or {}
    candidates = [name for name in lenses if name != "logit" and kinds.get(name, kind) == kind]
    if len(candidates) != 1:
        raise LensLabError(
            f"--eval scores {len(candidates)} {kind} lenses ({', '.join(candidates) or 'none'}), so which one is this "
            f"lens is unclear; pass the JSON of lenslab eval run with --lens set to this lens alone."
        )
    ours, logit = lenses[candidates[0]], lenses["logit"]
    factor = evaluation.get("nats_to_bits_per_byte")
    unit = "bits/byte" if factor else "nats/token"
    factor = factor or 1.0
    header = ["layer", f"KL logit lens ({unit})", f"KL {kind} lens", f"CE logit lens ({unit})", f"CE {kind} lens"]
    rows = [
        [layer, *(f"{values[i] * factor:.3f}" for values in (logit["kl"], ours["kl"], logit["ce"], ours["ce"]))]
        for i, layer in enumerate(evaluation["layers"])
    ]
    source = evaluation.get("data")
    described = f" of {source}" if isinstance(source, str) else ""
    intro = (
        f"`lenslab eval` on {evaluation.get('tokens', 'an unrecorded number of')} held-out tokens{described} with "
        f"{evaluation.get('model', 'the model')}: KL is how far each lens's next-token distribution is from the "
        f"model's own (0 = identical), CE its cross-entropy against the text. At the last layer every lens is the "
        f"model itself."
    )
    return [intro, "", *_table(header, rows)]


def _table(header: list[str], rows: list[list[str]] | list[tuple[str, Any]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_text(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)
