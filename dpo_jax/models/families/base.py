"""Building blocks every family module uses: the registry record and tensor-map helpers.

A family module (`dpo_jax/models/families/<name>.py`) builds one `Family` and
calls `register(family)`. The record holds everything that differs between
Hugging Face families; `dpo_jax.models.hf` holds only the family-agnostic
reading and writing of safetensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from dpo_jax.models.config import FAMILY_SWITCHES, ModelConfig, RopeScaling

Path_ = tuple[str, ...]
ToFlax = Callable[[np.ndarray], tuple[np.ndarray, ...]]
ToHf = Callable[..., np.ndarray]
LAYER = "LAYER"  # first element of a per-layer Flax path (resolved by hf._resolve)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor <-> one or more Flax leaves (paths start with LAYER in a block)."""

    hf_name: str
    paths: tuple[Path_, ...]
    layer: int | None
    to_flax: ToFlax
    to_hf: ToHf


# The modules of `models.Transformer` a LoRA adapter can target, named alike in every
# family: target -> (module name in the params tree, leaf it adapts, number of input
# axes). `o` contracts (heads, head_dim); embeddings are looked up along their first axis.
# A family without a module (GPT-2 has no `gate`) simply has no such weight.
LORA_TARGETS: dict[str, tuple[str, str, int]] = {
    "q": ("q", "kernel", 1),
    "k": ("k", "kernel", 1),
    "v": ("v", "kernel", 1),
    "o": ("o", "kernel", 2),
    "gate": ("gate", "kernel", 1),
    "up": ("up", "kernel", 1),
    "down": ("down", "kernel", 1),
    "embed": ("embed", "embedding", 1),
    "lm_head": ("lm_head", "kernel", 1),
}
LORA_ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class PeftLayout:
    """The Hugging Face modules a family's LoRA targets map to, for PEFT adapter export.

    - `prefix`: the HF path of the layer list (`model.layers`).
    - `modules`: target -> module under a layer.
    - `top`: top-level target (`embed`, `lm_head`) -> module.
    - `fused`: `(module, targets)` of one HF module that holds several of our
      projections side by side in that order (GPT-2's `attn.c_attn` = [q | k | v]), or
      None.
    - `fan_in_fan_out`: the HF weights are stored `(in, out)` (GPT-2's `Conv1D`).
    """

    prefix: str
    modules: dict[str, str]
    top: dict[str, str]
    fused: tuple[str, tuple[str, ...]] | None = None
    fan_in_fan_out: bool = False


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything that makes one Hugging Face `model_type` what it is.

    - `switches`: `ModelConfig` fields fixed by the family (sizes come from config.json).
    - `from_hf(d)`: config.json dict -> `ModelConfig` keyword arguments (sizes + options).
    - `to_hf(cfg)`: `ModelConfig` -> family-specific config.json keys (the common
      keys `architectures`, `model_type`, `vocab_size`, token ids, ... are added by hf.py).
    - `tensor_map(cfg)`: every HF tensor with its Flax destination(s) and converters.
    - `peft_layout`: where `lora`'s PEFT adapter export puts each target
      (`PeftLayout`), or None when the family has none.
    """

    model_type: str
    architecture: str
    switches: dict[str, Any]
    from_hf: Callable[[dict[str, Any]], dict[str, Any]]
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    tensor_map: Callable[[ModelConfig], list[Tensor]]
    peft_layout: PeftLayout | None = None


REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds `family` to the registry and its switches to `config.FAMILY_SWITCHES`."""
    if family.model_type in REGISTRY:
        raise ValueError(f"model family {family.model_type!r} registered twice")
    REGISTRY[family.model_type] = family
    FAMILY_SWITCHES[family.model_type] = dict(family.switches)
    return family


# ----------------------------------------------------------------------------- config helpers

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


def activation_from_hf(name: str) -> str:
    """Our activation name for a HF `hidden_act` value (raises if unsupported)."""
    if name not in _ACT_FROM_HF:
        raise ValueError(
            f"config.json: activation {name!r} is not supported (supported: {sorted(_ACT_FROM_HF)})"
        )
    return _ACT_FROM_HF[name]


def rope_params(d: dict[str, Any]) -> dict[str, Any]:
    """The rope parameter dict of a config.json (new `rope_parameters` or old `rope_scaling`)."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            "config.json: per-layer-type rope_parameters are not supported "
            f"(got keys {sorted(params)})"
        )
    return params


def rope_from_hf(d: dict[str, Any], default_pct: float = 1.0) -> dict[str, Any]:
    """rope_theta / rotary_pct / rope_scaling from old- or new-style HF keys."""
    params = rope_params(d)
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
    elif rope_type in ("longrope", "su"):
        scaling = _longrope_from_hf(d, params)
    elif rope_type != "default":
        raise ValueError(
            f"config.json: rope_type {rope_type!r} is not supported "
            "(supported: 'default', 'linear', 'llama3', 'longrope')"
        )
    return dict(rope_theta=float(theta), rotary_pct=float(pct), rope_scaling=scaling)


def _longrope_from_hf(d: dict[str, Any], params: dict[str, Any]) -> RopeScaling:
    """LongRoPE with its attention factor resolved as transformers does."""
    original = int(
        params.get("original_max_position_embeddings")
        or d.get("original_max_position_embeddings")
        or d["max_position_embeddings"]
    )
    factor = params.get("factor") or d["max_position_embeddings"] / original
    attn = params.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(
        rope_type="longrope",
        factor=float(factor),
        original_max_position_embeddings=original,
        short_factor=tuple(params["short_factor"]),
        long_factor=tuple(params["long_factor"]),
        attention_factor=float(attn),
    )


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """`rope_parameters` dict of cfg."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rs = cfg.rope_scaling
    if rs is not None:
        params.update(rope_type=rs.rope_type, factor=rs.factor)
        if rs.rope_type == "longrope":
            params.update(
                short_factor=list(rs.short_factor or ()),
                long_factor=list(rs.long_factor or ()),
                attention_factor=rs.attention_factor,
                original_max_position_embeddings=rs.original_max_position_embeddings,
            )
        if rs.rope_type == "llama3":
            params.update(
                low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position_embeddings,
            )
    if cfg.rotary_pct != 1.0:
        params["partial_rotary_factor"] = cfg.rotary_pct
    return params


def shared_hf_keys(cfg: ModelConfig, hidden_act: str | None = None) -> dict[str, Any]:
    """config.json keys GPT-NeoX and the Llama-like families name alike (GPT-2: n_*)."""
    return dict(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=hidden_act or cfg.activation,  # our names are valid HF ACT2FN keys
        attention_dropout=0.0,
    )


def no_sliding_window(d: dict[str, Any], model_type: str) -> None:
    """Raises for configs asking for per-layer windows the family module does not handle."""
    if d.get("use_sliding_window"):
        raise ValueError(
            f"config.json: {model_type} with use_sliding_window=true is not supported "
            "(per-layer windows)"
        )


def llama_like_from_hf(
    d: dict[str, Any], default_head_dim: int | None = None, act: str | None = None
) -> dict[str, Any]:
    """Sizes and rope of a Llama-style config.json (shared by Llama, Mistral, Qwen, Gemma...)."""
    heads = d["num_attention_heads"]
    return dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or default_head_dim or d["hidden_size"] // heads,
        intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        activation=activation_from_hf(act or d.get("hidden_act", "silu")),
        **rope_from_hf(d),
    )


def llama_like_to_hf(cfg: ModelConfig, hidden_act: str | None = None) -> dict[str, Any]:
    """config.json keys of a Llama-style family."""
    return dict(
        **shared_hf_keys(cfg, hidden_act),
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope_to_hf(cfg),
        rope_theta=cfg.rope_theta,
    )


# ----------------------------------------------------------------------------- tensor helpers


def linear(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[ToFlax, ToHf]:
    """nn.Linear weight (out, in) <-> kernel (*in_shape, *out_shape)."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return (
        lambda w: (w.T.reshape(*in_shape, *out_shape),),
        lambda k: k.reshape(n_in, n_out).T,
    )


def conv1d(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[ToFlax, ToHf]:
    """GPT-2 Conv1D weight (in, out) <-> kernel (*in_shape, *out_shape)."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return (lambda w: (w.reshape(*in_shape, *out_shape),), lambda k: k.reshape(n_in, n_out))


def reshape(shape: tuple[int, ...]) -> tuple[ToFlax, ToHf]:
    """Same data, different shape (biases, norms, embeddings)."""
    return (lambda w: (w.reshape(shape),), lambda k: k.reshape(-1) if len(shape) > 1 else k)


def same() -> tuple[ToFlax, ToHf]:
    """Identity conversion."""
    return (lambda w: (w,), lambda k: k)


def t(hf: str, paths: Path_ | tuple[Path_, ...], fns: tuple[ToFlax, ToHf], layer: int | None):
    """A `Tensor` from one path or a tuple of paths."""
    if paths and isinstance(paths[0], str):
        paths = (paths,)
    return Tensor(hf, tuple(paths), layer, fns[0], fns[1])  # type: ignore[arg-type]


def norm_tensors(cfg: ModelConfig, hf: str, path: Path_, layer: int | None) -> list[Tensor]:
    """Scale (and LayerNorm bias) of one norm."""
    out = [t(f"{hf}.weight", (*path, "scale"), same(), layer)]
    if cfg.norm_type == "layernorm":
        out.append(t(f"{hf}.bias", (*path, "bias"), same(), layer))
    return out


def embed_and_head(cfg: ModelConfig, embed: str, head: str) -> tuple[Tensor, list[Tensor]]:
    """The token embedding and (unless tied) the output projection."""
    e = t(embed, ("embed", "embedding"), same(), None)
    h = [] if cfg.tie_word_embeddings else [
        t(head, ("lm_head", "kernel"), linear((cfg.hidden_size,), (cfg.vocab_size,)), None)
    ]  # fmt: skip
    return e, h


def llama_attention(cfg: ModelConfig, a: str, i: int) -> list[Tensor]:
    """q/k/v/o projections (+ biases, q/k norms) under HF module path `a` of layer i."""
    L, dm, dh = LAYER, cfg.hidden_size, cfg.head_dim
    ts: list[Tensor] = []
    for name, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
        ts.append(
            t(f"{a}.{name}_proj.weight", (L, "attn", name, "kernel"), linear((dm,), (heads, dh)), i)
        )
        if cfg.qkv_bias:
            ts.append(
                t(f"{a}.{name}_proj.bias", (L, "attn", name, "bias"), reshape((heads, dh)), i)
            )
    ts.append(
        t(f"{a}.o_proj.weight", (L, "attn", "o", "kernel"), linear((cfg.num_heads, dh), (dm,)), i)
    )
    if cfg.attn_out_bias:
        ts.append(t(f"{a}.o_proj.bias", (L, "attn", "o", "bias"), same(), i))
    if cfg.qk_norm:
        ts.append(t(f"{a}.q_norm.weight", (L, "attn", "q_norm", "scale"), same(), i))
        ts.append(t(f"{a}.k_norm.weight", (L, "attn", "k_norm", "scale"), same(), i))
    return ts


def llama_mlp(cfg: ModelConfig, m: str, i: int) -> list[Tensor]:
    """gate/up/down projections (+ biases) under HF module path `m` of layer i."""
    dm, f = cfg.hidden_size, cfg.intermediate_size
    ts: list[Tensor] = []
    for name, shp in (("gate", ((dm,), (f,))), ("up", ((dm,), (f,))), ("down", ((f,), (dm,)))):
        ts.append(t(f"{m}.{name}_proj.weight", (LAYER, "mlp", name, "kernel"), linear(*shp), i))
        if cfg.mlp_bias:
            ts.append(t(f"{m}.{name}_proj.bias", (LAYER, "mlp", name, "bias"), same(), i))
    return ts


def llama_tensor_map(cfg: ModelConfig) -> list[Tensor]:
    """Tensor map of the Llama layout (model.layers.i.{input,post_attention}_layernorm, ...)."""
    embed, head = embed_and_head(cfg, "model.embed_tokens.weight", "lm_head.weight")
    ts = [embed]
    for i in range(cfg.num_layers):
        b = f"model.layers.{i}"
        ts += norm_tensors(cfg, f"{b}.input_layernorm", (LAYER, "attn_norm"), i)
        ts += norm_tensors(cfg, f"{b}.post_attention_layernorm", (LAYER, "mlp_norm"), i)
        ts += llama_attention(cfg, f"{b}.self_attn", i)
        ts += llama_mlp(cfg, f"{b}.mlp", i)
    ts += norm_tensors(cfg, "model.norm", ("final_norm",), None)
    return ts + head


# Llama's switches; the Llama-like families add their own differences.
LLAMA_SWITCHES: dict[str, Any] = dict(
    norm_type="rmsnorm", norm_eps=1e-6, activation="silu", gated_mlp=True
)

LLAMA_PEFT = PeftLayout(
    "model.layers",
    {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    {"embed": "model.embed_tokens", "lm_head": "lm_head"},
)  # fmt: skip


def layer_types_from_hf(types: list[str] | tuple[str, ...], window: int | None) -> dict[str, Any]:
    """`layer_types` / `sliding_window` switches, in one canonical form.

    No window, or every layer full: no per-layer types (all full causal). Every
    layer sliding: the Mistral form (one window for all, no per-layer types).
    """
    types = tuple(types)
    if window is None or all(x == "full_attention" for x in types):
        return dict(layer_types=None, sliding_window=None)
    if all(x == "sliding_attention" for x in types):
        return dict(layer_types=None, sliding_window=window)
    return dict(layer_types=types, sliding_window=window)


def layer_types_to_hf(cfg: ModelConfig) -> list[str]:
    """HF `layer_types` list of cfg (inverse of `layer_types_from_hf`)."""
    if cfg.layer_types is not None:
        return list(cfg.layer_types)
    kind = "full_attention" if cfg.sliding_window is None else "sliding_attention"
    return [kind] * cfg.num_layers
