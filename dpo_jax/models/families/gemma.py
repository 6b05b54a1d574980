"""Gemma 1: Llama layout, sqrt(D) embedding scale, (1 + w) RMSNorm, tanh GELU, tied head."""

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
    register,
)


def gemma_act(d: dict[str, Any]) -> str:
    """Gemma's "gelu" means the tanh approximation (HF converts it the same way)."""
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if act == "gelu" else act


def _from_hf(d: dict[str, Any]) -> dict[str, Any]:
    bias = bool(d.get("attention_bias", False))
    return dict(
        **llama_like_from_hf(d, default_head_dim=256, act=gemma_act(d)),
        tie_word_embeddings=d.get("tie_word_embeddings", True),
        qkv_bias=bias,
        attn_out_bias=bias,
    )


def gemma_hidden_act(cfg: ModelConfig) -> str:
    """gelu_new is the same function as the name Gemma checkpoints use."""
    return "gelu_pytorch_tanh" if cfg.activation == "gelu_new" else cfg.activation


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(**llama_like_to_hf(cfg, gemma_hidden_act(cfg)), attention_bias=cfg.qkv_bias)


FAMILY = register(
    Family(
        model_type="gemma",
        architecture="GemmaForCausalLM",
        switches={
            **LLAMA_SWITCHES,
            "activation": "gelu_new",
            "tie_word_embeddings": True,
            "embed_scale": True,
            "norm_scale_offset": 1.0,
        },
        from_hf=_from_hf,
        to_hf=_to_hf,
        tensor_map=llama_tensor_map,
        peft_layout=LLAMA_PEFT,
    )
)
