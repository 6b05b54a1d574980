"""Qwen2: Llama layout with q/k/v biases, rope theta 1e6, optional sliding window on the
layers from `max_window_layers` on."""

from __future__ import annotations

from typing import Any

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.families.base import (
    LLAMA_PEFT,
    LLAMA_SWITCHES,
    Family,
    layer_types_from_hf,
    layer_types_to_hf,
    llama_like_from_hf,
    llama_like_to_hf,
    llama_tensor_map,
    register,
)


def _from_hf(d: dict[str, Any]) -> dict[str, Any]:
    # As transformers: the window applies only with use_sliding_window, and then (unless
    # config.json lists layer_types) to layers i >= max_window_layers.
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    n, first = d["num_hidden_layers"], d.get("max_window_layers", 28)
    types = d.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(n)
    ]
    return dict(
        **llama_like_from_hf(d),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        **layer_types_from_hf(types, window),
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    types = layer_types_to_hf(cfg)
    return dict(
        **llama_like_to_hf(cfg),
        use_sliding_window=cfg.sliding_window is not None,
        sliding_window=cfg.sliding_window,
        layer_types=types,
        # Consistent with layer_types for readers that derive them from max_window_layers.
        max_window_layers=next(
            (i for i in range(len(types)) if all(t == types[-1] for t in types[i:])), 0
        )
        if types[-1] == "sliding_attention"
        else cfg.num_layers,
    )


FAMILY = register(
    Family(
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        switches={**LLAMA_SWITCHES, "qkv_bias": True, "rope_theta": 1000000.0},
        from_hf=_from_hf,
        to_hf=_to_hf,
        tensor_map=llama_tensor_map,
        peft_layout=LLAMA_PEFT,
    )
)
