"""Tiny random configs, one per supported model family, for offline tests.

Every config is small enough that building the model and running a forward takes milliseconds
(vocab 96-128, d_model 32-64, 2-3 layers). Families differ on purpose in what the adapter must
discover: tied and untied unembeddings, an lm_head bias (GPT-J), post-LN without a final norm
(OPT-350m style), an embedding layernorm (BLOOM), embedding scaling (Gemma), logit softcapping
(Gemma-2/3) and logit scaling (Cohere, Granite).

>>> model = tiny_model("llama")
>>> model.config.num_hidden_layers
2
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    CohereConfig,
    FalconConfig,
    FalconH1Config,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoConfig,
    GPTNeoXConfig,
    GraniteConfig,
    HyperCLOVAXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 112
"""Vocabulary size of every family (token ids 0..VOCAB-1 are valid everywhere)."""

# Special token ids inside the tiny vocabulary (several configs default to ids of 50k and warn).
_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Keyword arguments shared by the llama-like families (RMSNorm, rotary, gated MLP).
_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    **_SPECIAL,
)


def _gemma_like(**extra) -> dict:
    """Gemma configs need an explicit head_dim; the rest is shared."""
    return {**_LLAMA_LIKE, "hidden_size": 32, "head_dim": 8, **extra}


FAMILIES: dict[str, Callable[[], PretrainedConfig]] = {
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB,
        **_SPECIAL,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=64,
        tie_word_embeddings=True,
    ),
    "gpt_neo": lambda: GPTNeoConfig(
        **_SPECIAL,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_size=32,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        num_heads=4,
        intermediate_size=64,
        window_size=8,
        tie_word_embeddings=True,
    ),
    # GPT-J's lm_head carries a bias, so its unembedding cannot be tied to the embedding.
    "gptj": lambda: GPTJConfig(
        vocab_size=VOCAB,
        **_SPECIAL,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        rotary_dim=4,
        n_inner=64,
        tie_word_embeddings=False,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        **_SPECIAL,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB,
        **_SPECIAL,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        do_layer_norm_before=True,
        tie_word_embeddings=True,
    ),
    # OPT-350m: post-LN layers, no final norm, embeddings narrower than the residual (project_in/out).
    "opt-350m": lambda: OPTConfig(
        vocab_size=VOCAB,
        **_SPECIAL,
        hidden_size=48,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        do_layer_norm_before=False,
        tie_word_embeddings=True,
    ),
    "bloom": lambda: BloomConfig(
        vocab_size=VOCAB, **_SPECIAL, hidden_size=32, n_layer=2, n_head=4, tie_word_embeddings=True
    ),
    "llama": lambda: LlamaConfig(**_LLAMA_LIKE, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**_LLAMA_LIKE, sliding_window=16, tie_word_embeddings=False),
    "mixtral": lambda: MixtralConfig(
        **_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False
    ),
    "qwen2": lambda: Qwen2Config(**_LLAMA_LIKE, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**_LLAMA_LIKE, head_dim=12, tie_word_embeddings=True),
    "gemma": lambda: GemmaConfig(**_gemma_like(), tie_word_embeddings=True),
    "gemma2": lambda: Gemma2Config(
        **_gemma_like(),
        sliding_window=16,
        final_logit_softcapping=0.5,
        attn_logit_softcapping=50.0,
        tie_word_embeddings=True,
    ),
    "gemma3": lambda: Gemma3TextConfig(
        **_gemma_like(), sliding_window=16, final_logit_softcapping=0.5, tie_word_embeddings=False
    ),
    "phi3": lambda: Phi3Config(**{**_LLAMA_LIKE, "num_key_value_heads": 4}, tie_word_embeddings=False),
    "olmo2": lambda: Olmo2Config(**_LLAMA_LIKE, tie_word_embeddings=False),
    "falcon": lambda: FalconConfig(
        vocab_size=VOCAB,
        **_SPECIAL,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    "cohere": lambda: CohereConfig(**_LLAMA_LIKE, logit_scale=0.25, tie_word_embeddings=True),
    "granite": lambda: GraniteConfig(
        **_LLAMA_LIKE,
        logits_scaling=4.0,
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        tie_word_embeddings=False,
    ),
    # HyperCLOVA X multiplies the logits by logits_scaling, which Granite divides by.
    "hyperclovax": lambda: HyperCLOVAXConfig(
        **_LLAMA_LIKE,
        logits_scaling=4.0,
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        tie_word_embeddings=False,
    ),
    # A hybrid: every layer runs attention and a Mamba-2 mixer side by side; logits * lm_head_multiplier.
    "falcon_h1": lambda: FalconH1Config(
        **_LLAMA_LIKE,
        head_dim=12,
        lm_head_multiplier=0.25,
        mamba_d_ssm=48,
        mamba_n_heads=4,
        mamba_d_head=12,
        mamba_n_groups=1,
        mamba_d_state=8,
        mamba_chunk_size=16,
        tie_word_embeddings=False,
    ),
}
"""Family name -> function building its tiny random config (a fresh config on every call)."""


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """Build the tiny model of ``family`` with random weights: float32, eval mode, reproducible for ``seed``.

    Vector parameters (norm weights and biases) are perturbed away from their initial ones and zeros:
    freshly initialised norms are all alike, so a test could not tell one norm from another.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()
