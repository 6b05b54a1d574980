"""Mistral: Llama layout with one sliding window shared by every layer."""

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
    return dict(
        **llama_like_from_hf(d),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        sliding_window=d.get("sliding_window", 4096),
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(**llama_like_to_hf(cfg), sliding_window=cfg.sliding_window)


FAMILY = register(
    Family(
        model_type="mistral",
        architecture="MistralForCausalLM",
        switches=dict(LLAMA_SWITCHES),
        from_hf=_from_hf,
        to_hf=_to_hf,
        tensor_map=llama_tensor_map,
        peft_layout=LLAMA_PEFT,
    )
)
