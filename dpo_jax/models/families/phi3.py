"""Phi-3: Llama layout with fused qkv_proj ([q | k | v] rows) and gate_up_proj ([gate | up]
rows), an optional all-layer sliding window, and LongRoPE ("longrope", formerly "su")."""

from __future__ import annotations

from typing import Any

import numpy as np

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.families.base import (
    LAYER,
    LLAMA_SWITCHES,
    Family,
    Tensor,
    ToFlax,
    ToHf,
    embed_and_head,
    linear,
    llama_like_from_hf,
    llama_like_to_hf,
    norm_tensors,
    register,
    t,
)


def _from_hf(d: dict[str, Any]) -> dict[str, Any]:
    return dict(
        **llama_like_from_hf({"rms_norm_eps": 1e-5, **d}),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        sliding_window=d.get("sliding_window"),
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rs = cfg.rope_scaling
    original = rs.original_max_position_embeddings if rs else cfg.max_position_embeddings
    return dict(
        **llama_like_to_hf(cfg),
        sliding_window=cfg.sliding_window,
        original_max_position_embeddings=original,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )


def _split_rows(sizes: tuple[tuple[int, ...], ...], dm: int) -> tuple[ToFlax, ToHf]:
    """nn.Linear weight whose output rows are consecutive projections of the given shapes."""
    widths = [int(np.prod(s)) for s in sizes]
    cuts = np.cumsum(widths)[:-1]

    def to_flax(w: np.ndarray) -> tuple[np.ndarray, ...]:
        parts = np.split(w.T, cuts, axis=-1)
        return tuple(p.reshape(dm, *s) for p, s in zip(parts, sizes, strict=True))

    def to_hf(*kernels: np.ndarray) -> np.ndarray:
        return np.concatenate([k.reshape(dm, -1) for k in kernels], axis=-1).T

    return to_flax, to_hf


def _tensor_map(cfg: ModelConfig) -> list[Tensor]:
    L, dm, dh, f = LAYER, cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    h, k = cfg.num_heads, cfg.num_kv_heads
    embed, head = embed_and_head(cfg, "model.embed_tokens.weight", "lm_head.weight")
    ts = [embed]
    for i in range(cfg.num_layers):
        b = f"model.layers.{i}"
        qkv = tuple((L, "attn", n, "kernel") for n in "qkv")
        gate_up = ((L, "mlp", "gate", "kernel"), (L, "mlp", "up", "kernel"))
        ts += norm_tensors(cfg, f"{b}.input_layernorm", (L, "attn_norm"), i)
        ts += norm_tensors(cfg, f"{b}.post_attention_layernorm", (L, "mlp_norm"), i)
        ts += [
            t(
                f"{b}.self_attn.qkv_proj.weight",
                qkv,
                _split_rows(((h, dh), (k, dh), (k, dh)), dm),
                i,
            ),
            t(
                f"{b}.self_attn.o_proj.weight",
                (L, "attn", "o", "kernel"),
                linear((h, dh), (dm,)),
                i,
            ),
            t(f"{b}.mlp.gate_up_proj.weight", gate_up, _split_rows(((f,), (f,)), dm), i),
            t(f"{b}.mlp.down_proj.weight", (L, "mlp", "down", "kernel"), linear((f,), (dm,)), i),
        ]
    ts += norm_tensors(cfg, "model.norm", ("final_norm",), None)
    return ts + head


FAMILY = register(
    Family(
        model_type="phi3",
        architecture="Phi3ForCausalLM",
        switches={**LLAMA_SWITCHES, "norm_eps": 1e-5},
        from_hf=_from_hf,
        to_hf=_to_hf,
        tensor_map=_tensor_map,
        peft_layout=None,  # fused qkv/gate_up modules: export --merge instead
    )
)
