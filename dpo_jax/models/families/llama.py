"""Llama 2/3: the reference Llama layout; optional attention/MLP biases, llama3 rope scaling."""

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


def _from_hf(d: dict[str, Any]) -> dict[str, Any]:
    bias = bool(d.get("attention_bias", False))
    return dict(
        **llama_like_from_hf(d),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(**llama_like_to_hf(cfg), attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)


FAMILY = register(
    Family(
        model_type="llama",
        architecture="LlamaForCausalLM",
        switches=dict(LLAMA_SWITCHES),
        from_hf=_from_hf,
        to_hf=_to_hf,
        tensor_map=llama_tensor_map,
        peft_layout=LLAMA_PEFT,
    )
)
