"""GPT-NeoX / Pythia: parallel residual, partial rotary, fused per-head-interleaved qkv."""

from __future__ import annotations

from typing import Any

import numpy as np

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.families.base import (
    LAYER,
    Family,
    Tensor,
    ToFlax,
    ToHf,
    activation_from_hf,
    embed_and_head,
    linear,
    norm_tensors,
    register,
    rope_from_hf,
    rope_to_hf,
    same,
    shared_hf_keys,
    t,
)


def _from_hf(d: dict[str, Any]) -> dict[str, Any]:
    attn_bias = d.get("attention_bias", True)
    return dict(
        vocab_size=d.get("vocab_size", 50432),
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        norm_eps=d.get("layer_norm_eps", 1e-5),
        activation=activation_from_hf(d.get("hidden_act", "gelu")),
        parallel_residual=d.get("use_parallel_residual", True),
        qkv_bias=attn_bias,
        attn_out_bias=attn_bias,
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        **rope_from_hf(d, default_pct=0.25),
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rope = rope_to_hf(cfg)
    rope.setdefault("partial_rotary_factor", cfg.rotary_pct)
    return dict(
        **shared_hf_keys(cfg),
        layer_norm_eps=cfg.norm_eps,
        use_parallel_residual=cfg.parallel_residual,
        attention_bias=cfg.qkv_bias,
        rope_parameters=rope,
        # Old-style keys too, for readers that predate rope_parameters.
        rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rope_theta,
        hidden_dropout=0.0,
    )


def _fused_qkv(cfg: ModelConfig, bias: bool) -> tuple[ToFlax, ToHf]:
    """query_key_value: (3D, D) with output rows ordered (head, {q,k,v}, head_dim)."""
    h, dh, dm = cfg.num_heads, cfg.head_dim, cfg.hidden_size

    def to_flax(w: np.ndarray) -> tuple[np.ndarray, ...]:
        w = w.reshape(h, 3, dh) if bias else w.T.reshape(dm, h, 3, dh)
        return tuple(np.take(w, j, axis=-2) for j in range(3))

    def to_hf(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        w = np.stack([q, k, v], axis=-2)
        return w.reshape(3 * h * dh) if bias else w.reshape(dm, 3 * h * dh).T

    return to_flax, to_hf


def _tensor_map(cfg: ModelConfig) -> list[Tensor]:
    L, p, dm, f = LAYER, "gpt_neox", cfg.hidden_size, cfg.intermediate_size
    embed, head = embed_and_head(cfg, f"{p}.embed_in.weight", "embed_out.weight")
    ts = [embed]
    for i in range(cfg.num_layers):
        b = f"{p}.layers.{i}"
        ts += norm_tensors(cfg, f"{b}.input_layernorm", (L, "attn_norm"), i)
        ts += norm_tensors(cfg, f"{b}.post_attention_layernorm", (L, "mlp_norm"), i)
        qkv = tuple((L, "attn", n, "kernel") for n in "qkv")
        ts.append(t(f"{b}.attention.query_key_value.weight", qkv, _fused_qkv(cfg, False), i))
        if cfg.qkv_bias:
            qkv_b = tuple((L, "attn", n, "bias") for n in "qkv")
            ts.append(t(f"{b}.attention.query_key_value.bias", qkv_b, _fused_qkv(cfg, True), i))
        o_fns = linear((cfg.num_heads, cfg.head_dim), (dm,))
        ts.append(t(f"{b}.attention.dense.weight", (L, "attn", "o", "kernel"), o_fns, i))
        if cfg.attn_out_bias:
            ts.append(t(f"{b}.attention.dense.bias", (L, "attn", "o", "bias"), same(), i))
        ts += [
            t(f"{b}.mlp.dense_h_to_4h.weight", (L, "mlp", "up", "kernel"), linear((dm,), (f,)), i),
            t(f"{b}.mlp.dense_h_to_4h.bias", (L, "mlp", "up", "bias"), same(), i),
            t(
                f"{b}.mlp.dense_4h_to_h.weight",
                (L, "mlp", "down", "kernel"),
                linear((f,), (dm,)),
                i,
            ),
            t(f"{b}.mlp.dense_4h_to_h.bias", (L, "mlp", "down", "bias"), same(), i),
        ]
    ts += norm_tensors(cfg, f"{p}.final_layer_norm", ("final_norm",), None)
    return ts + head


FAMILY = register(
    Family(
        model_type="gpt_neox",
        architecture="GPTNeoXForCausalLM",
        switches=dict(
            norm_type="layernorm",
            norm_eps=1e-5,
            activation="gelu",
            gated_mlp=False,
            position_embedding="rope",
            rotary_pct=0.25,
            parallel_residual=True,
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
        ),
        from_hf=_from_hf,
        to_hf=_to_hf,
        tensor_map=_tensor_map,
    )
)
