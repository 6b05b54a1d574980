"""GPT-2: learned positions, LayerNorm, Conv1D weights (in, out), fused c_attn, tied head."""

from __future__ import annotations

from typing import Any

import numpy as np

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.families.base import (
    LAYER,
    Family,
    PeftLayout,
    Tensor,
    ToFlax,
    ToHf,
    activation_from_hf,
    conv1d,
    norm_tensors,
    register,
    same,
    t,
)


def _from_hf(d: dict[str, Any]) -> dict[str, Any]:
    if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights") is False:
        raise ValueError(
            "config.json: gpt2 with scale_attn_by_inverse_layer_idx=true or "
            "scale_attn_weights=false is not supported"
        )
    hidden = d.get("n_embd", 768)
    return dict(
        vocab_size=d.get("vocab_size", 50257),
        hidden_size=hidden,
        num_layers=d.get("n_layer", 12),
        num_heads=d.get("n_head", 12),
        intermediate_size=d.get("n_inner") or 4 * hidden,
        max_position_embeddings=d.get("n_positions", 1024),
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        activation=activation_from_hf(d.get("activation_function", "gelu_new")),
        tie_word_embeddings=d.get("tie_word_embeddings", True),
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size,
        n_positions=cfg.max_position_embeddings,
        layer_norm_epsilon=cfg.norm_eps,
        activation_function=cfg.activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def _fused_qkv(cfg: ModelConfig, bias: bool) -> tuple[ToFlax, ToHf]:
    """c_attn: (D, 3D) [q | k | v] along the output axis (bias: (3D,))."""
    h, dh, dm = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    lead = () if bias else (dm,)

    def to_flax(w: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(p.reshape(*lead, h, dh) for p in np.split(w, 3, axis=-1))

    def to_hf(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.concatenate([x.reshape(*lead, h * dh) for x in (q, k, v)], axis=-1)

    return to_flax, to_hf


def _tensor_map(cfg: ModelConfig) -> list[Tensor]:
    L, p = LAYER, "transformer"
    ts = [
        t(f"{p}.wte.weight", ("embed", "embedding"), same(), None),
        t(f"{p}.wpe.weight", ("pos_embed", "embedding"), same(), None),
    ]
    for i in range(cfg.num_layers):
        b = f"{p}.h.{i}"
        qkv = tuple((L, "attn", n, "kernel") for n in "qkv")
        qkv_b = tuple((L, "attn", n, "bias") for n in "qkv")
        ts += norm_tensors(cfg, f"{b}.ln_1", (L, "attn_norm"), i)
        ts += norm_tensors(cfg, f"{b}.ln_2", (L, "mlp_norm"), i)
        ts += [
            t(f"{b}.attn.c_attn.weight", qkv, _fused_qkv(cfg, False), i),
            t(f"{b}.attn.c_attn.bias", qkv_b, _fused_qkv(cfg, True), i),
            t(
                f"{b}.attn.c_proj.weight",
                (L, "attn", "o", "kernel"),
                conv1d((cfg.num_heads, cfg.head_dim), (cfg.hidden_size,)),
                i,
            ),
            t(f"{b}.attn.c_proj.bias", (L, "attn", "o", "bias"), same(), i),
            t(f"{b}.mlp.c_fc.weight", (L, "mlp", "up", "kernel"), same(), i),
            t(f"{b}.mlp.c_fc.bias", (L, "mlp", "up", "bias"), same(), i),
            t(f"{b}.mlp.c_proj.weight", (L, "mlp", "down", "kernel"), same(), i),
            t(f"{b}.mlp.c_proj.bias", (L, "mlp", "down", "bias"), same(), i),
        ]
    return ts + norm_tensors(cfg, f"{p}.ln_f", ("final_norm",), None)


FAMILY = register(
    Family(
        model_type="gpt2",
        architecture="GPT2LMHeadModel",
        switches=dict(
            norm_type="layernorm",
            norm_eps=1e-5,
            activation="gelu_new",
            gated_mlp=False,
            position_embedding="learned",
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        ),
        from_hf=_from_hf,
        to_hf=_to_hf,
        tensor_map=_tensor_map,
        peft_layout=PeftLayout(
            "transformer.h",
            {"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
            {"embed": "transformer.wte"},
            fused=("attn.c_attn", ("q", "k", "v")),  # c_attn's output is [q | k | v]
            fan_in_fan_out=True,  # Conv1D weights are (in, out)
        ),
    )
)
