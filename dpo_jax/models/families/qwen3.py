"""Qwen3: Llama layout with RMSNorm on each q and k head (qk_norm), head_dim 128 default."""

from __future__ import annotations

from typing import Any

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.families.base import (
    LLAMA_PEFT,
    LLAMA_SWITCHES,
    Family,
    llama_like_from_hf,
    llama_like_to_hf,
    llama_tensor_map,
    no_sliding_window,
    register,
)


def _from_hf(d: dict[str, Any]) -> dict[str, Any]:
    no_sliding_window(d, "qwen3")
    bias = bool(d.get("attention_bias", False))
    return dict(
        **llama_like_from_hf(d, default_head_dim=128),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        qkv_bias=bias,
        attn_out_bias=bias,
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        **llama_like_to_hf(cfg),
        attention_bias=cfg.qkv_bias,
        use_sliding_window=False,
        sliding_window=None,
    )


FAMILY = register(
    Family(
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        switches={**LLAMA_SWITCHES, "qk_norm": True, "rope_theta": 1000000.0},
        from_hf=_from_hf,
        to_hf=_to_hf,
        tensor_map=llama_tensor_map,
        peft_layout=LLAMA_PEFT,
    )
)
