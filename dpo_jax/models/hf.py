"""Hugging Face checkpoint import and export, without torch.

    cfg, params = load_hf("path/to/hf_dir", dtype=jnp.bfloat16, param_dtype=jnp.float32)
    save_hf("out_dir", cfg, params, tokenizer=tok)   # transformers.from_pretrained loads it

Import reads `config.json` and `*.safetensors` (a single file, or shards listed
in `model.safetensors.index.json`) with `safetensors` in numpy mode, one tensor
at a time, so host memory holds about one copy of the weights. Layout facts
handled per family:

- `nn.Linear` weights are (out, in): transposed into `x @ kernel` form, then
  reshaped to (D, heads, head_dim) / (heads, head_dim, D).
- GPT-2 `Conv1D` weights are already (in, out); its fused `c_attn` is
  [q | k | v] along the output axis; there is no `lm_head` (tied to `wte`).
- GPT-NeoX's fused `query_key_value` output is interleaved per head:
  output row h*3*Dh + j*Dh + d is (head h, j in {q, k, v}, dim d).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.errors import UserError
from dpo_jax.models.config import ModelConfig, RopeScaling
from dpo_jax.models.transformer import abstract_params
from dpo_jax.models.vocab import strip_vocab

SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma")

_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
}

# HF activation names -> ours ("gelu_pytorch_tanh" is the same tanh formula as gelu_new).
_ACT_FROM_HF = {
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "gelu_fast": "gelu_new",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}

# Non-weight buffers some checkpoints carry; ignored on import.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "attention.bias", ".masked_bias", "inv_freq")

# Fields that describe the architecture (compared when checking exportability).
_RUNTIME_FIELDS = {
    "dtype",
    "param_dtype",
    "logits_fp32",
    "remat",
    "scan_layers",
    "attention_impl",
    "attention_block",
    "init_std",
}


# ----------------------------------------------------------------------------- config


def _rope_from_hf(d: dict[str, Any], default_pct: float = 1.0) -> dict[str, Any]:
    """rope_theta / rotary_pct / rope_scaling from old- or new-style HF keys."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            "config.json: per-layer-type rope_parameters are not supported "
            f"(got keys {sorted(params)})"
        )
    theta = params.get("rope_theta", d.get("rope_theta", d.get("rotary_emb_base", 10000.0)))
    pct = params.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if pct is None:
        pct = d.get("rotary_pct", default_pct)
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = None
    if rope_type == "linear":
        scaling = RopeScaling(rope_type="linear", factor=float(params["factor"]))
    elif rope_type == "llama3":
        scaling = RopeScaling(
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise ValueError(
            f"config.json: rope_type {rope_type!r} is not supported "
            "(supported: 'default', 'linear', 'llama3')"
        )
    return dict(rope_theta=float(theta), rotary_pct=float(pct), rope_scaling=scaling)


def _activation_from_hf(name: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ValueError(
            f"config.json: activation {name!r} is not supported (supported: {sorted(_ACT_FROM_HF)})"
        )
    return _ACT_FROM_HF[name]


def _token_ids(d: dict[str, Any]) -> dict[str, Any]:
    eos = d.get("eos_token_id")
    return dict(
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=d.get("pad_token_id"),
    )


def _no_sliding_window(d: dict[str, Any], model_type: str) -> None:
    if d.get("use_sliding_window"):
        raise ValueError(
            f"config.json: {model_type} with use_sliding_window=true is not supported "
            "(per-layer windows)"
        )


def config_from_hf(d: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict; `overrides` win (e.g. dtype)."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json: unknown model_type {model_type!r}; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "gpt2":
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights") is False:
            raise ValueError(
                "config.json: gpt2 with scale_attn_by_inverse_layer_idx=true or "
                "scale_attn_weights=false is not supported"
            )
        hidden = d.get("n_embd", 768)
        kw: dict[str, Any] = dict(
            vocab_size=d.get("vocab_size", 50257),
            hidden_size=hidden,
            num_layers=d.get("n_layer", 12),
            num_heads=d.get("n_head", 12),
            intermediate_size=d.get("n_inner") or 4 * hidden,
            max_position_embeddings=d.get("n_positions", 1024),
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            activation=_activation_from_hf(d.get("activation_function", "gelu_new")),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
        )
    elif model_type == "gpt_neox":
        attn_bias = d.get("attention_bias", True)
        kw = dict(
            vocab_size=d.get("vocab_size", 50432),
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            norm_eps=d.get("layer_norm_eps", 1e-5),
            activation=_activation_from_hf(d.get("hidden_act", "gelu")),
            parallel_residual=d.get("use_parallel_residual", True),
            qkv_bias=attn_bias,
            attn_out_bias=attn_bias,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            **_rope_from_hf(d, default_pct=0.25),
        )
    else:
        heads = d["num_attention_heads"]
        default_head_dim = {"qwen3": 128, "gemma": 256}.get(model_type, d["hidden_size"] // heads)
        act = d.get("hidden_act", "silu")
        if model_type == "gemma":
            # Gemma's "gelu" means the tanh approximation (HF converts it the same way).
            act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
            act = "gelu_pytorch_tanh" if act == "gelu" else act
        kw = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or default_head_dim,
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            activation=_activation_from_hf(act),
            tie_word_embeddings=d.get("tie_word_embeddings", model_type == "gemma"),
            **_rope_from_hf(d),
        )
        if model_type in ("llama", "qwen3", "gemma"):
            kw["qkv_bias"] = kw["attn_out_bias"] = bool(d.get("attention_bias", False))
        if model_type == "llama":
            kw["mlp_bias"] = bool(d.get("mlp_bias", False))
        if model_type == "mistral":
            kw["sliding_window"] = d.get("sliding_window", 4096)
        if model_type in ("qwen2", "qwen3"):
            _no_sliding_window(d, model_type)
    return ModelConfig.for_family(model_type, **{**kw, **_token_ids(d), **overrides})


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rs = cfg.rope_scaling
    if rs is not None:
        params.update(rope_type=rs.rope_type, factor=rs.factor)
        if rs.rope_type == "llama3":
            params.update(
                low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position_embeddings,
            )
    if cfg.rotary_pct != 1.0:
        params["partial_rotary_factor"] = cfg.rotary_pct
    return params


def _act_to_hf(cfg: ModelConfig) -> str:
    if cfg.model_type == "gemma" and cfg.activation == "gelu_new":
        return "gelu_pytorch_tanh"  # same function; the name Gemma checkpoints use
    return cfg.activation  # our names are valid HF ACT2FN keys


def _shared_hf_keys(cfg: ModelConfig) -> dict[str, Any]:
    """config.json keys GPT-NeoX and the Llama-like families name alike (GPT-2: n_*)."""
    return dict(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=_act_to_hf(cfg),
        attention_dropout=0.0,
    )


def config_to_hf(cfg: ModelConfig, hf_dtype: str | None = None) -> dict[str, Any]:
    """Hugging Face config.json dict for `cfg` (raises if the family cannot express it)."""
    mt = cfg.model_type
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unknown model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    d: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[mt]],
        "model_type": mt,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": hf_dtype or cfg.param_dtype,
        "use_cache": True,
    }
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, k)
        d[k] = list(v) if isinstance(v, tuple) else v
    if mt == "gpt2":
        d.update(
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.intermediate_size,
            n_positions=cfg.max_position_embeddings,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function=_act_to_hf(cfg),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    elif mt == "gpt_neox":
        rope = _rope_to_hf(cfg)
        rope.setdefault("partial_rotary_factor", cfg.rotary_pct)
        d.update(
            **_shared_hf_keys(cfg),
            layer_norm_eps=cfg.norm_eps,
            use_parallel_residual=cfg.parallel_residual,
            attention_bias=cfg.qkv_bias,
            rope_parameters=rope,
            # Old-style keys too, for readers that predate rope_parameters.
            rotary_pct=cfg.rotary_pct,
            rotary_emb_base=cfg.rope_theta,
            hidden_dropout=0.0,
        )
    else:
        d.update(
            **_shared_hf_keys(cfg),
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            rms_norm_eps=cfg.norm_eps,
            rope_parameters=_rope_to_hf(cfg),
            rope_theta=cfg.rope_theta,
        )
        if mt in ("llama", "qwen3", "gemma"):
            d["attention_bias"] = cfg.qkv_bias
        if mt == "llama":
            d["mlp_bias"] = cfg.mlp_bias
        if mt == "mistral":
            d["sliding_window"] = cfg.sliding_window
        if mt in ("qwen2", "qwen3"):
            d.update(use_sliding_window=False, sliding_window=None)
    _check_round_trip(cfg, d)
    return d


def _check_round_trip(cfg: ModelConfig, d: dict[str, Any]) -> None:
    """Raises if the HF family cannot represent every architecture switch of cfg."""
    back = config_from_hf(d)
    diffs = [
        f"{f.name}={getattr(cfg, f.name)!r} (would export as {getattr(back, f.name)!r})"
        for f in dataclasses.fields(cfg)
        if f.name not in _RUNTIME_FIELDS and getattr(cfg, f.name) != getattr(back, f.name)
    ]
    if diffs:
        raise ValueError(
            f"config cannot be exported as Hugging Face model_type {cfg.model_type!r}: "
            + "; ".join(diffs)
        )


# ----------------------------------------------------------------------------- tensor maps

Path_ = tuple[str, ...]
ToFlax = Callable[[np.ndarray], tuple[np.ndarray, ...]]
ToHf = Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor <-> one or more Flax leaves (paths start with "LAYER" in a block)."""

    hf_name: str
    paths: tuple[Path_, ...]
    layer: int | None
    to_flax: ToFlax
    to_hf: ToHf


def _linear(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[ToFlax, ToHf]:
    """nn.Linear weight (out, in) <-> kernel (*in_shape, *out_shape)."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return (
        lambda w: (w.T.reshape(*in_shape, *out_shape),),
        lambda k: k.reshape(n_in, n_out).T,
    )


def _conv1d(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[ToFlax, ToHf]:
    """GPT-2 Conv1D weight (in, out) <-> kernel (*in_shape, *out_shape)."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return (lambda w: (w.reshape(*in_shape, *out_shape),), lambda k: k.reshape(n_in, n_out))


def _reshape(shape: tuple[int, ...]) -> tuple[ToFlax, ToHf]:
    """Same data, different shape (biases, norms, embeddings)."""
    return (lambda w: (w.reshape(shape),), lambda k: k.reshape(-1) if len(shape) > 1 else k)


def _same() -> tuple[ToFlax, ToHf]:
    return (lambda w: (w,), lambda k: k)


def _gpt2_fused_qkv(cfg: ModelConfig, bias: bool) -> tuple[ToFlax, ToHf]:
    """c_attn: (D, 3D) [q | k | v] along the output axis (bias: (3D,))."""
    h, dh, dm = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    lead = () if bias else (dm,)

    def to_flax(w: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(p.reshape(*lead, h, dh) for p in np.split(w, 3, axis=-1))

    def to_hf(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.concatenate([x.reshape(*lead, h * dh) for x in (q, k, v)], axis=-1)

    return to_flax, to_hf


def _neox_fused_qkv(cfg: ModelConfig, bias: bool) -> tuple[ToFlax, ToHf]:
    """query_key_value: (3D, D) with output rows ordered (head, {q,k,v}, head_dim)."""
    h, dh, dm = cfg.num_heads, cfg.head_dim, cfg.hidden_size

    def to_flax(w: np.ndarray) -> tuple[np.ndarray, ...]:
        w = w.reshape(h, 3, dh) if bias else w.T.reshape(dm, h, 3, dh)
        return tuple(np.take(w, j, axis=-2) for j in range(3))

    def to_hf(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        w = np.stack([q, k, v], axis=-2)
        return w.reshape(3 * h * dh) if bias else w.reshape(dm, 3 * h * dh).T

    return to_flax, to_hf


def _t(hf: str, paths: Path_ | tuple[Path_, ...], fns: tuple[ToFlax, ToHf], layer: int | None):
    if paths and isinstance(paths[0], str):
        paths = (paths,)
    return _Tensor(hf, tuple(paths), layer, fns[0], fns[1])  # type: ignore[arg-type]


def _norm_tensors(cfg: ModelConfig, hf: str, path: Path_, layer: int | None) -> list[_Tensor]:
    out = [_t(f"{hf}.weight", (*path, "scale"), _same(), layer)]
    if cfg.norm_type == "layernorm":
        out.append(_t(f"{hf}.bias", (*path, "bias"), _same(), layer))
    return out


def _tensor_map(cfg: ModelConfig) -> list[_Tensor]:
    """Every HF tensor of the family with its Flax destination(s) and converters."""
    mt, dm, h, k, dh = (
        cfg.model_type,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    )
    f = cfg.intermediate_size
    L = "LAYER"
    ts: list[_Tensor] = []
    if mt == "gpt2":
        p = "transformer"
        ts += [
            _t(f"{p}.wte.weight", ("embed", "embedding"), _same(), None),
            _t(f"{p}.wpe.weight", ("pos_embed", "embedding"), _same(), None),
        ]
        for i in range(cfg.num_layers):
            b = f"{p}.h.{i}"
            qkv = tuple((L, "attn", n, "kernel") for n in "qkv")
            qkv_b = tuple((L, "attn", n, "bias") for n in "qkv")
            ts += _norm_tensors(cfg, f"{b}.ln_1", (L, "attn_norm"), i)
            ts += _norm_tensors(cfg, f"{b}.ln_2", (L, "mlp_norm"), i)
            ts += [
                _t(f"{b}.attn.c_attn.weight", qkv, _gpt2_fused_qkv(cfg, False), i),
                _t(f"{b}.attn.c_attn.bias", qkv_b, _gpt2_fused_qkv(cfg, True), i),
                _t(
                    f"{b}.attn.c_proj.weight",
                    (L, "attn", "o", "kernel"),
                    _conv1d((h, dh), (dm,)),
                    i,
                ),
                _t(f"{b}.attn.c_proj.bias", (L, "attn", "o", "bias"), _same(), i),
                _t(f"{b}.mlp.c_fc.weight", (L, "mlp", "up", "kernel"), _same(), i),
                _t(f"{b}.mlp.c_fc.bias", (L, "mlp", "up", "bias"), _same(), i),
                _t(f"{b}.mlp.c_proj.weight", (L, "mlp", "down", "kernel"), _same(), i),
                _t(f"{b}.mlp.c_proj.bias", (L, "mlp", "down", "bias"), _same(), i),
            ]
        ts += _norm_tensors(cfg, f"{p}.ln_f", ("final_norm",), None)
        return ts

    if mt == "gpt_neox":
        p = "gpt_neox"
        ts.append(_t(f"{p}.embed_in.weight", ("embed", "embedding"), _same(), None))
        for i in range(cfg.num_layers):
            b = f"{p}.layers.{i}"
            ts += _norm_tensors(cfg, f"{b}.input_layernorm", (L, "attn_norm"), i)
            ts += _norm_tensors(cfg, f"{b}.post_attention_layernorm", (L, "mlp_norm"), i)
            qkv = tuple((L, "attn", n, "kernel") for n in "qkv")
            ts.append(
                _t(f"{b}.attention.query_key_value.weight", qkv, _neox_fused_qkv(cfg, False), i)
            )
            if cfg.qkv_bias:
                qkv_b = tuple((L, "attn", n, "bias") for n in "qkv")
                ts.append(
                    _t(f"{b}.attention.query_key_value.bias", qkv_b, _neox_fused_qkv(cfg, True), i)
                )
            ts.append(
                _t(
                    f"{b}.attention.dense.weight",
                    (L, "attn", "o", "kernel"),
                    _linear((h, dh), (dm,)),
                    i,
                )
            )
            if cfg.attn_out_bias:
                ts.append(_t(f"{b}.attention.dense.bias", (L, "attn", "o", "bias"), _same(), i))
            ts += [
                _t(
                    f"{b}.mlp.dense_h_to_4h.weight",
                    (L, "mlp", "up", "kernel"),
                    _linear((dm,), (f,)),
                    i,
                ),
                _t(f"{b}.mlp.dense_h_to_4h.bias", (L, "mlp", "up", "bias"), _same(), i),
                _t(
                    f"{b}.mlp.dense_4h_to_h.weight",
                    (L, "mlp", "down", "kernel"),
                    _linear((f,), (dm,)),
                    i,
                ),
                _t(f"{b}.mlp.dense_4h_to_h.bias", (L, "mlp", "down", "bias"), _same(), i),
            ]
        ts += _norm_tensors(cfg, f"{p}.final_layer_norm", ("final_norm",), None)
        if not cfg.tie_word_embeddings:
            ts.append(
                _t(
                    "embed_out.weight",
                    ("lm_head", "kernel"),
                    _linear((dm,), (cfg.vocab_size,)),
                    None,
                )
            )
        return ts

    # Llama-style families.
    p = "model"
    ts.append(_t(f"{p}.embed_tokens.weight", ("embed", "embedding"), _same(), None))
    for i in range(cfg.num_layers):
        b = f"{p}.layers.{i}"
        a = f"{b}.self_attn"
        ts += _norm_tensors(cfg, f"{b}.input_layernorm", (L, "attn_norm"), i)
        ts += _norm_tensors(cfg, f"{b}.post_attention_layernorm", (L, "mlp_norm"), i)
        for name, heads in (("q", h), ("k", k), ("v", k)):
            ts.append(
                _t(
                    f"{a}.{name}_proj.weight",
                    (L, "attn", name, "kernel"),
                    _linear((dm,), (heads, dh)),
                    i,
                )
            )
            if cfg.qkv_bias:
                ts.append(
                    _t(f"{a}.{name}_proj.bias", (L, "attn", name, "bias"), _reshape((heads, dh)), i)
                )
        ts.append(_t(f"{a}.o_proj.weight", (L, "attn", "o", "kernel"), _linear((h, dh), (dm,)), i))
        if cfg.attn_out_bias:
            ts.append(_t(f"{a}.o_proj.bias", (L, "attn", "o", "bias"), _same(), i))
        if cfg.qk_norm:
            ts.append(_t(f"{a}.q_norm.weight", (L, "attn", "q_norm", "scale"), _same(), i))
            ts.append(_t(f"{a}.k_norm.weight", (L, "attn", "k_norm", "scale"), _same(), i))
        for name, shp in (("gate", ((dm,), (f,))), ("up", ((dm,), (f,))), ("down", ((f,), (dm,)))):
            ts.append(
                _t(f"{b}.mlp.{name}_proj.weight", (L, "mlp", name, "kernel"), _linear(*shp), i)
            )
            if cfg.mlp_bias:
                ts.append(_t(f"{b}.mlp.{name}_proj.bias", (L, "mlp", name, "bias"), _same(), i))
    ts += _norm_tensors(cfg, f"{p}.norm", ("final_norm",), None)
    if not cfg.tie_word_embeddings:
        ts.append(
            _t("lm_head.weight", ("lm_head", "kernel"), _linear((dm,), (cfg.vocab_size,)), None)
        )
    return ts


def _resolve(cfg: ModelConfig, path: Path_, layer: int | None) -> tuple[Path_, int | None]:
    """Flax path of a leaf and the index along its stacked layer axis (if scanned)."""
    if path[0] != "LAYER":
        return path, None
    if cfg.scan_layers:
        return ("layers", *path[1:]), layer
    return (f"layers_{layer}", *path[1:]), None


# ----------------------------------------------------------------------------- reading


class _SafetensorsReader:
    """Name -> numpy tensor over one or many safetensors files, opened lazily."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.dir = hf_dir
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {name: hf_dir / fn for name, fn in weight_map.items()}
            missing = sorted({str(p) for p in self.where.values() if not p.exists()})
            if missing:
                raise FileNotFoundError(f"{index}: lists shard files that do not exist: {missing}")
        else:
            files = sorted(hf_dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{hf_dir}: no *.safetensors files (and no model.safetensors.index.json); "
                    "only safetensors checkpoints can be loaded"
                )
            self.where = {}
            for fn in files:
                with self._open_file(fn) as fh:
                    for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                        self.where[name] = fn
        self._open: dict[Path, Any] = {}

    def _open_file(self, fn: Path) -> Any:
        """`safe_open(fn)`; a truncated or corrupt file is a `UserError` naming it."""
        from safetensors import SafetensorError

        try:
            return self._safe_open(str(fn), framework="numpy")
        except SafetensorError as e:
            raise UserError(
                f"{fn}: not a readable safetensors file ({e}); it may be truncated or "
                "corrupt: save or download it again"
            ) from None

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> np.ndarray:
        fn = self.where[name]
        if fn not in self._open:
            self._open[fn] = self._open_file(fn).__enter__()
        return self._open[fn].get_tensor(name)

    def close(self) -> None:
        for fh in self._open.values():
            fh.__exit__(None, None, None)
        self._open.clear()


def _lookup(reader: _SafetensorsReader, name: str) -> str | None:
    """The stored name for `name`, allowing a missing or extra top-level prefix."""
    if name in reader.where:
        return name
    stripped = name.split(".", 1)[1] if "." in name else name
    if stripped in reader.where:
        return stripped  # e.g. original GPT-2 checkpoints have no "transformer." prefix
    return None


def _set_path(tree: dict[str, Any], path: Path_, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Any, path: Path_) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def load_hf(
    hf_dir: str | os.PathLike,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    *,
    shardings: Any = None,
    **config_overrides: Any,
) -> tuple[ModelConfig, Any]:
    """Loads a HF checkpoint directory -> (ModelConfig, params pytree of jax arrays).

    `config_overrides` are passed to `config_from_hf` (e.g. remat="block",
    scan_layers=True, attention_impl="auto"). Parameters are cast to
    `param_dtype`; `dtype` is the compute dtype stored in the config.

    `shardings` (optional) places each parameter straight into its sharded
    layout, so no device ever holds the whole model: a params-shaped pytree of
    `jax.sharding.Sharding`, or a callable `cfg -> that pytree` (e.g.
    `lambda cfg: nn.logical_to_mesh_sharding(logical_axes(cfg), mesh, rules)`).
    Every process must be able to read the checkpoint directory.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory {hf_dir} does not exist")
    cfg_file = hf_dir / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} does not exist")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}: line {e.lineno}: invalid JSON: {e.msg}") from e
    try:
        cfg = config_from_hf(hf_cfg, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    except (KeyError, ValueError) as e:
        raise UserError(f"{cfg_file}: {e}") from e

    abstract = nn.meta.unbox(abstract_params(cfg))
    if callable(shardings):
        shardings = shardings(cfg)

    def place(fpath: Path_, arr: np.ndarray) -> jax.Array:
        if shardings is None:
            return jnp.asarray(arr)
        sharding = _get_path(shardings, fpath)
        # Each device receives only its slice of the host array.
        return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])

    pdt = np.dtype(jnp.dtype(cfg.param_dtype))
    reader = _SafetensorsReader(hf_dir)
    params: dict[str, Any] = {}
    stacked: dict[Path_, np.ndarray] = {}
    used: set[str] = set()
    try:
        for t in _tensor_map(cfg):
            stored = _lookup(reader, t.hf_name)
            if stored is None:
                raise UserError(
                    f"{hf_dir}: tensor {t.hf_name!r} is missing from the safetensors files "
                    f"(needed by model_type {cfg.model_type!r})"
                )
            used.add(stored)
            raw = reader.get(stored)
            try:
                pieces = t.to_flax(raw)
            except ValueError as e:  # reshape of a tensor whose size disagrees with config.json
                raise UserError(
                    f"{hf_dir}: tensor {stored!r} has shape {raw.shape}, which config.json "
                    f"does not imply ({e})"
                ) from e
            for path, piece in zip(t.paths, pieces, strict=True):
                fpath, idx = _resolve(cfg, path, t.layer)
                want = _get_path(abstract, fpath)
                want_shape = want.shape[1:] if idx is not None else want.shape
                if piece.shape != tuple(want_shape):
                    raise UserError(
                        f"{hf_dir}: tensor {stored!r} gives shape {piece.shape} for "
                        f"{'/'.join(fpath)}, config.json implies {tuple(want_shape)}"
                    )
                if idx is None:
                    _set_path(params, fpath, place(fpath, piece.astype(pdt, copy=False)))
                else:
                    if fpath not in stacked:
                        stacked[fpath] = np.empty(want.shape, pdt)
                    stacked[fpath][idx] = piece
    finally:
        reader.close()
    for fpath in list(stacked):
        _set_path(params, fpath, place(fpath, stacked.pop(fpath)))

    unused = sorted(
        n
        for n in reader.names() - used
        if not n.endswith(_BUFFER_SUFFIXES)
        and not (cfg.tie_word_embeddings and n.split(".")[-2] in ("lm_head", "embed_out"))
    )
    if unused:
        warnings.warn(f"{hf_dir}: ignored {len(unused)} unused tensors: {unused[:8]}", stacklevel=2)
    expected = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    if expected != got:  # a bug in the tensor map, not in the checkpoint
        raise RuntimeError(f"tensor map mismatch: missing {expected - got}, extra {got - expected}")
    return cfg, params


# ----------------------------------------------------------------------------- writing


def _hf_tensors(
    cfg: ModelConfig, params: Any, np_dtype: np.dtype
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (hf_name, array) one tensor at a time, gathering leaves to host."""
    for t in _tensor_map(cfg):
        parts = []
        for path in t.paths:
            fpath, idx = _resolve(cfg, path, t.layer)
            try:
                leaf = _get_path(params, fpath)
            except (KeyError, TypeError) as e:
                raise ValueError(f"save_hf: params lack {'/'.join(fpath)} (for {t.hf_name})") from e
            leaf = leaf[idx] if idx is not None else leaf
            parts.append(np.asarray(jax.device_get(leaf)).astype(np.float32, copy=False))
        yield t.hf_name, np.ascontiguousarray(t.to_hf(*parts)).astype(np_dtype)


def save_hf(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    params: Any,
    tokenizer: Any = None,
    *,
    hf_dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Writes config.json + safetensors (sharded above `max_shard_bytes`) to `out_dir`.

    `hf_dtype` defaults to `cfg.param_dtype`. The tokenizer (if given) is
    saved with `save_pretrained`. Returns the output directory.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = jnp.dtype(hf_dtype or cfg.param_dtype).name
    np_dtype = np.dtype(jnp.dtype(dtype_name))
    # An export holds the real vocabulary only (the padding rows are ours).
    cfg, params = strip_vocab(cfg, nn.meta.unbox(params))
    hf_cfg = config_to_hf(cfg, hf_dtype=dtype_name)

    shards: list[dict[str, np.ndarray]] = [{}]
    size = total = 0
    tmp_names: list[str] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        name = f"model-{len(tmp_names) + 1:05d}.tmp.safetensors"
        save_file(shards[-1], str(out / name), metadata={"format": "pt"})
        for key in shards[-1]:
            weight_map[key] = name
        tmp_names.append(name)
        shards[-1] = {}

    for name, arr in _hf_tensors(cfg, params, np_dtype):
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
        total += arr.nbytes
    flush()

    for stale in out.glob("model*.safetensors"):
        if stale.name not in tmp_names:
            stale.unlink()
    if len(tmp_names) == 1:
        (out / tmp_names[0]).rename(out / "model.safetensors")
        (out / "model.safetensors.index.json").unlink(missing_ok=True)
    else:
        n = len(tmp_names)
        final = {t: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, t in enumerate(tmp_names)}
        for t, f in final.items():
            (out / t).rename(out / f)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: final[v] for k, v in sorted(weight_map.items())},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
