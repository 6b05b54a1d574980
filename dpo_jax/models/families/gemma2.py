"""Gemma 2: Gemma 1 plus attention/final logit soft-capping, alternating sliding and
global layers, norms after attention and MLP too, and query_pre_attn_scalar."""

from __future__ import annotations

from typing import Any

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.families.base import (
    LAYER,
    LLAMA_PEFT,
    Family,
    Tensor,
    embed_and_head,
    layer_types_from_hf,
    layer_types_to_hf,
    llama_attention,
    llama_like_from_hf,
    llama_like_to_hf,
    llama_mlp,
    norm_tensors,
    register,
)
from dpo_jax.models.families.gemma import FAMILY as GEMMA
from dpo_jax.models.families.gemma import gemma_act, gemma_hidden_act


def gemma2_options_from_hf(
    d: dict[str, Any], default_every: int, default_caps: tuple[float | None, float | None]
) -> dict[str, Any]:
    """Switches Gemma 2 and 3 read alike; layer i is global when (i + 1) % default_every == 0
    unless config.json lists `layer_types` (or Gemma 3's `sliding_window_pattern`)."""
    if d.get("use_bidirectional_attention"):
        raise ValueError(
            f"config.json: {d.get('model_type')} with use_bidirectional_attention=true is "
            "not a causal LM; not supported"
        )
    n = d["num_hidden_layers"]
    every = d.get("sliding_window_pattern") or default_every
    types = d.get("layer_types") or [
        "sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)
    ]
    bias = bool(d.get("attention_bias", False))
    return dict(
        tie_word_embeddings=d.get("tie_word_embeddings", True),
        qkv_bias=bias,
        attn_out_bias=bias,
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or 256),
        # Absent keys take transformers' defaults; an explicit null turns a cap off.
        attn_logit_softcap=d.get("attn_logit_softcapping", default_caps[0]),
        final_logit_softcap=d.get("final_logit_softcapping", default_caps[1]),
        **layer_types_from_hf(types, d.get("sliding_window", 4096)),
    )


def _int_if_whole(x: float | None) -> float | int | None:
    return int(x) if x is not None and float(x).is_integer() else x


def gemma2_options_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json keys of `gemma2_options_from_hf`."""
    return dict(
        hidden_activation=gemma_hidden_act(cfg),
        attention_bias=cfg.qkv_bias,
        # transformers types it int (strictly validated); ours is a float.
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
        attn_logit_softcapping=cfg.attn_logit_softcap,
        final_logit_softcapping=cfg.final_logit_softcap,
        sliding_window=cfg.sliding_window,
        layer_types=layer_types_to_hf(cfg),
    )


def _from_hf(d: dict[str, Any]) -> dict[str, Any]:
    base = llama_like_from_hf(d, default_head_dim=256, act=gemma_act(d))
    return dict(**base, **gemma2_options_from_hf(d, default_every=2, default_caps=(50.0, 30.0)))


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(**llama_like_to_hf(cfg, gemma_hidden_act(cfg)), **gemma2_options_to_hf(cfg))


def gemma2_tensor_map(cfg: ModelConfig) -> list[Tensor]:
    """Llama's tensors, but post_attention_layernorm is the norm on the attention output;
    the MLP's input norm is pre_feedforward_layernorm."""
    embed, head = embed_and_head(cfg, "model.embed_tokens.weight", "lm_head.weight")
    ts = [embed]
    norms = (
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "post_attn_norm"),
        ("pre_feedforward_layernorm", "mlp_norm"),
        ("post_feedforward_layernorm", "post_mlp_norm"),
    )
    for i in range(cfg.num_layers):
        b = f"model.layers.{i}"
        for hf_name, ours in norms:
            ts += norm_tensors(cfg, f"{b}.{hf_name}", (LAYER, ours), i)
        ts += llama_attention(cfg, f"{b}.self_attn", i)
        ts += llama_mlp(cfg, f"{b}.mlp", i)
    ts += norm_tensors(cfg, "model.norm", ("final_norm",), None)
    return ts + head


FAMILY = register(
    Family(
        model_type="gemma2",
        architecture="Gemma2ForCausalLM",
        switches={
            **GEMMA.switches,
            "post_norms": True,
            "query_pre_attn_scalar": 256.0,
            "attn_logit_softcap": 50.0,
            "final_logit_softcap": 30.0,
        },
        from_hf=_from_hf,
        to_hf=_to_hf,
        tensor_map=gemma2_tensor_map,
        peft_layout=LLAMA_PEFT,
    )
)
