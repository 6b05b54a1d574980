"""Gemma 3 (text): Gemma 2's layout plus (1 + w) RMSNorm on each q and k head, a 5:1
local:global layer pattern, and separate RoPE bases for local and global layers."""

from __future__ import annotations

from typing import Any

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.families.base import (
    LLAMA_PEFT,
    Family,
    llama_like_from_hf,
    llama_like_to_hf,
    register,
    rope_from_hf,
    rope_to_hf,
)
from dpo_jax.models.families.gemma import gemma_act, gemma_hidden_act
from dpo_jax.models.families.gemma2 import FAMILY as GEMMA2
from dpo_jax.models.families.gemma2 import (
    gemma2_options_from_hf,
    gemma2_options_to_hf,
    gemma2_tensor_map,
)


def _ropes_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """Global rope (theta 1e6, optional scaling) and the local base (1e4, unscaled).

    New style: rope_parameters = {"full_attention": {...}, "sliding_attention": {...}};
    old style: rope_theta, rope_scaling (global) and rope_local_base_freq.
    """
    params = d.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = dict(d.get("rope_scaling") or {})
        full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
        local = {"rope_theta": d.get("rope_local_base_freq", 10_000.0)}
    full.setdefault("rope_theta", 1_000_000.0)
    if local.get("rope_type", "default") != "default":
        raise ValueError(
            "config.json: gemma3_text sliding_attention rope_type "
            f"{local['rope_type']!r} is not supported (only 'default')"
        )
    glob = rope_from_hf({"rope_parameters": full})
    return dict(**glob, rope_local_theta=float(local.get("rope_theta", 10_000.0)))


def _from_hf(d: dict[str, Any]) -> dict[str, Any]:
    base = llama_like_from_hf({**d, "rope_parameters": None, "rope_scaling": None},
                              default_head_dim=256, act=gemma_act(d))  # fmt: skip
    return {
        **base,
        **_ropes_from_hf(d),
        **gemma2_options_from_hf(d, default_every=6, default_caps=(None, None)),
    }


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    d = llama_like_to_hf(cfg, gemma_hidden_act(cfg))
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta}
    d["rope_parameters"] = {"full_attention": rope_to_hf(cfg), "sliding_attention": local}
    d.pop("rope_theta")
    return dict(**d, **gemma2_options_to_hf(cfg))


FAMILY = register(
    Family(
        model_type="gemma3_text",
        architecture="Gemma3ForCausalLM",
        switches={
            **GEMMA2.switches,
            "qk_norm": True,
            "rope_theta": 1_000_000.0,
            "rope_local_theta": 10_000.0,
            "attn_logit_softcap": None,
            "final_logit_softcap": None,
        },
        from_hf=_from_hf,
        to_hf=_to_hf,
        tensor_map=gemma2_tensor_map,
        peft_layout=LLAMA_PEFT,
    )
)
