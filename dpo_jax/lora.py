"""LoRA as a parameter transform: low-rank adapters beside frozen base weights.

An adapter for a weight `W` of shape `(*in, *out)` is `A (*in, r)` and `B (r, *out)`;
the effective weight is `W + (alpha / r) A B`. Adapters live in their own pytree whose
paths mirror the base params, with `lora_a` / `lora_b` leaves sitting where the
targeted module keeps its `kernel` (or `embedding`)::

    adapters = init_adapters(base, model_config, LoraConfig(rank=16), rng)
    params = apply_adapters(base, adapters, scale)    # a dict union, no arithmetic
    logits = model.apply({"params": params}, ids)     # x W + (x A)(s B) per layer
    logits_ref = model.apply({"params": base}, ids)   # adapters off: the base model

The model's `Linear` / `Embed` add the low-rank product when the two leaves are
present, so the forward never materialises a merged weight and gradients reach only
`A` and `B`. Scanned layers stack adapters on the same leading `layers` axis as their
kernels. `B` starts at zero, so step 0 is the base model exactly.

`merge_adapters` computes `W + s A B` explicitly (export, and a second code path for
tests); `peft_state_dict` / `save_peft` write a PEFT LoRA adapter that `peft` loads on
the Hugging Face base model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from dpo_jax import configs, paths
from dpo_jax.errors import UserError, config_error
from dpo_jax.models import families, hf
from dpo_jax.models.transformer import layer_location
from dpo_jax.models.vocab import resize_vocab

A_NAME, B_NAME = "lora_a", "lora_b"
SCALE_NAME = "kernel_scale"  # int8 base: per-output-channel scale beside the int8 kernel
BASE_DTYPES = ("float32", "bfloat16", "float16", "int8")
RANK_AXIS = "lora_rank"  # logical name of the rank axis; replicated (sharding.py)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha, targets and the dtype the frozen base is held in.

    `targets`: comma-separated names from `families.LORA_TARGETS` or `all-linear`
    (q,k,v,o,gate,up,down where the family has them). `base_dtype` "" keeps the loaded dtype.
    """

    rank: int = 16
    alpha: float = 16.0
    targets: str = "all-linear"
    base_dtype: str = ""

    @property
    def scale(self) -> float:
        """The multiplier of `A B` (alpha / r, as PEFT without rsLoRA)."""
        return float(self.alpha) / int(self.rank)

    def target_names(self) -> tuple[tuple[str, bool], ...]:
        """(name, explicit) pairs; an explicit name must match a module of the model,
        the names `all-linear` expands to need not (GPT-2 has no `gate`)."""
        out: list[tuple[str, bool]] = []
        for raw in str(self.targets).replace(";", ",").split(","):
            raw = raw.strip()
            if raw == "all-linear":
                out += [(n, False) for n in families.LORA_ALL_LINEAR if n not in dict(out)]
            elif raw and raw not in dict(out):
                out.append((raw, True))
        return tuple(out)


def config_from(
    section: Mapping[str, Any] | None, reference: Mapping[str, Any] | None = None
) -> LoraConfig | None:
    """A validated `LoraConfig` from the `lora` config section, or None when rank is 0.

    `reference` (the `reference` section) is checked against an int8 base."""
    if not section:
        return None

    section = configs.complete_section("lora", section)  # defaults: configs/default.py
    rank = int(section["rank"])
    if rank == 0:
        return None
    if rank < 0:
        raise config_error("lora.rank", f"must be >= 0, got {rank}", "0 turns LoRA off")
    alpha = float(section["alpha"])
    if not alpha > 0:
        raise config_error("lora.alpha", f"must be > 0, got {alpha}", "PEFT's default is 8-32")
    base_dtype = str(section["base_dtype"] or "")
    if base_dtype and base_dtype not in BASE_DTYPES:
        raise config_error(
            "lora.base_dtype", f"unknown dtype {base_dtype!r}", f"use one of {BASE_DTYPES} or ''"
        )
    cfg = LoraConfig(rank, alpha, str(section["targets"]), base_dtype)
    mode = str(reference["mode"]) if reference else "auto"  # no reference section: no check
    if base_dtype == "int8" and mode not in ("auto", "adapters_off", "none"):
        raise config_error(
            "lora.base_dtype",
            f"an int8 base is scored by its own forward; reference.mode={mode!r} would "
            "score a different (float) model",
            "use reference.mode=adapters_off",
        )
    names = [n for n, _ in cfg.target_names()]
    unknown = [n for n in names if n not in families.LORA_TARGETS]
    if unknown or not names:
        raise config_error(
            "lora.targets",
            f"unknown target(s) {unknown or names}",
            f"use a comma-separated subset of {','.join(families.LORA_TARGETS)} or 'all-linear'",
        )
    return cfg


# ------------------------------------------------------------------------ trees


def _modules(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, dict) of every nested dict of `tree` (the Flax modules)."""
    out = []
    if isinstance(tree, Mapping):
        out.append((prefix, tree))
        for key, value in tree.items():
            out += _modules(value, (*prefix, str(key)))
    return out


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _copy(tree: Any) -> Any:
    """Plain nested dicts with the same leaves (FrozenDicts become dicts)."""
    if isinstance(tree, Mapping):
        return {k: _copy(v) for k, v in tree.items()}
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def target_paths(base: Any, lcfg: LoraConfig) -> list[tuple[tuple[str, ...], str, int]]:
    """(module path, target name, input axes) of every module the config adapts."""
    found: list[tuple[tuple[str, ...], str, int]] = []
    for name, explicit in lcfg.target_names():
        module, leaf, n_in = families.LORA_TARGETS[name]
        hits = [
            (path, name, n_in)
            for path, node in _modules(base)
            if path and path[-1] == module and leaf in node
        ]
        if explicit and not hits:
            raise config_error(
                "lora.targets", f"{name!r} matches no weight of this model", "drop it"
            )
        found += hits
    if not found:
        raise config_error("lora.targets", f"{lcfg.targets!r} matches no weight", "")
    return sorted(found)


def _scanned(path: tuple[str, ...]) -> bool:
    # nn.scan stacks a block's params on a leading axis under the module named `layers`
    return bool(path) and path[0] == "layers"


def _split_shape(
    shape: tuple[int, ...], n_in: int, stacked: bool
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    lead = shape[:1] if stacked else ()
    rest = shape[len(lead) :]
    return lead, rest[:n_in], rest[n_in:]


def init_adapters(base: Any, lcfg: LoraConfig, rng: jax.Array, dtype: Any = jnp.float32) -> Any:
    """Adapters for `base`: `A` uniform in +-1/sqrt(fan_in) (PEFT's Kaiming init), `B` = 0.

    Embedding tables draw `A` from N(0, 1) instead (a lookup has no fan-in).
    """
    out: dict = {}
    paths = target_paths(base, lcfg)
    keys = jax.random.split(rng, len(paths))
    for key, (path, name, n_in) in zip(keys, paths, strict=True):
        leaf = _get(base, path)[families.LORA_TARGETS[name][1]]
        lead, ins, outs = _split_shape(tuple(leaf.shape), n_in, _scanned(path))
        a_shape = (*lead, *ins, lcfg.rank)
        if name == "embed":
            a = jax.random.normal(key, a_shape, dtype)
        else:
            bound = 1.0 / math.sqrt(math.prod(ins))
            a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        _set(out, (*path, A_NAME), a)
        _set(out, (*path, B_NAME), jnp.zeros((*lead, lcfg.rank, *outs), dtype))
    return out


def adapter_logical_axes(base_logical: Any, adapters: Any) -> Any:
    """Logical PartitionSpecs of `adapters`: `A` keeps its weight's input axes, `B` its
    output axes, the rank axis is `lora_rank` (replicated)."""
    out: dict = {}
    for path, node in _modules(adapters):
        if A_NAME not in node:
            continue
        module = _get(base_logical, path)
        spec = tuple(module["kernel"] if "kernel" in module else module["embedding"])
        a_ndim = node[A_NAME].ndim
        lead = spec[:1] if _scanned(path) else ()
        n_in = a_ndim - 1 - len(lead)
        ins, outs = spec[len(lead) : len(lead) + n_in], spec[len(lead) + n_in :]
        _set(out, (*path, A_NAME), PartitionSpec(*lead, *ins, RANK_AXIS))
        _set(out, (*path, B_NAME), PartitionSpec(*lead, RANK_AXIS, *outs))
    return out


def apply_adapters(base: Any, adapters: Any, scale: float, enabled: bool = True) -> Any:
    """The params the model applies: `base` plus `lora_a` and `scale * lora_b` leaves.

    A pure function (use it inside jit). `enabled=False` returns `base` itself: the
    adapters-off reference is the same apply on the base, with no second copy.
    """
    if not enabled or adapters is None:
        return base
    out = _copy(base)  # new containers, same leaves
    for path, node in _modules(adapters):
        if A_NAME in node:
            _set(out, (*path, A_NAME), node[A_NAME])
            _set(out, (*path, B_NAME), node[B_NAME] * jnp.asarray(scale, node[B_NAME].dtype))
    return out


def delta(a: jax.Array, b: jax.Array, scale: float, stacked: bool) -> jax.Array:
    """`scale * A B` in float32, shaped like the adapted weight."""
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    if stacked:
        return scale * jax.vmap(lambda x, y: jnp.tensordot(x, y, 1))(a32, b32)
    return scale * jnp.tensordot(a32, b32, 1)


def merge_adapters(base: Any, adapters: Any, scale: float) -> Any:
    """Base params with every adapted weight replaced by `W + scale * A B` (its dtype)."""
    out = dequantize_base(base)  # an int8 base merges into the weights it stands for
    for path, node in _modules(adapters):
        if A_NAME not in node:
            continue
        module = _get(out, path)
        leaf = "kernel" if "kernel" in module else "embedding"
        w = module[leaf]
        d = delta(node[A_NAME], node[B_NAME], scale, _scanned(path))
        module[leaf] = (w.astype(jnp.float32) + d).astype(w.dtype)
    return out


def dequantize_base(params: Any) -> Any:
    """`params` with every int8 kernel (and its scale) replaced by its float32 weight."""
    out = _copy(params)
    for path, node in _modules(out):
        if SCALE_NAME in node:
            n_in = node["kernel"].ndim - node[SCALE_NAME].ndim
            node["kernel"] = dequantize(node["kernel"], node.pop(SCALE_NAME), n_in, _scanned(path))
    return out


def cast_base(base: Any, lcfg: LoraConfig) -> Any:
    """The frozen base in `lcfg.base_dtype` (unchanged when it is "").

    "int8" quantises every linear `kernel` (see `quantize_int8`); embeddings, norms and
    biases keep their dtype.
    """
    if not lcfg.base_dtype:
        return base
    if lcfg.base_dtype == "int8":
        out = _copy(base)
        for path, node in _modules(out):
            if "kernel" in node:
                n_in = families.LORA_TARGETS.get(path[-1], ("", "", 1))[2]
                node["kernel"], node[SCALE_NAME] = quantize_int8(
                    node["kernel"], n_in, _scanned(path)
                )
        return out
    return jax.tree.map(lambda x: x.astype(lcfg.base_dtype), base)


def quantize_int8(w: jax.Array, n_in: int, stacked: bool) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 with one float32 scale per output channel (and layer).

    `w ~= q * scale` broadcast over the input axes; the model's `Linear` computes
    `(x @ q) * scale`, which is exactly `x @ (q * scale)` since the scale is constant
    along the contracted axes, so the weight is dequantised per layer inside the
    forward and no float copy of the base is kept.
    """
    lead = 1 if stacked else 0
    axes = tuple(range(lead, lead + n_in))
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=axes)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w32 / jnp.expand_dims(scale, axes)), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array, n_in: int, stacked: bool) -> jax.Array:
    """float32 `q * scale` (the weight an int8 base stands for)."""
    lead = 1 if stacked else 0
    axes = tuple(range(lead, lead + n_in))
    return q.astype(jnp.float32) * jnp.expand_dims(scale, axes)


def base_logical_axes(model_logical: Any, base: Any) -> Any:
    """The model's logical axes, plus the output axes of each int8 kernel's scale."""
    out = _copy(model_logical)
    for path, node in _modules(base):
        if SCALE_NAME in node:
            spec = tuple(_get(out, path)["kernel"])
            lead = 1 if _scanned(path) else 0
            n_in = node["kernel"].ndim - node[SCALE_NAME].ndim
            _set(out, (*path, SCALE_NAME), PartitionSpec(*spec[:lead], *spec[lead + n_in :]))
    return out


# ------------------------------------------------------------------------ PEFT export


def _peft_layout(model_type: str) -> families.PeftLayout:
    """The family's PEFT module layout, or a UserError when it has none."""
    fam = families.REGISTRY.get(model_type)
    if fam is None or fam.peft_layout is None:
        have = [n for n, f in families.REGISTRY.items() if f.peft_layout is not None]
        raise UserError(
            f"export --adapter: no PEFT module map for model_type {model_type!r} (supported: "
            f"{', '.join(have)}); use export --merge instead"
        )
    return fam.peft_layout


def _layer_slices(adapters: Any, model_config: Any) -> list[tuple[int, dict]]:
    """(layer index, {target: (A, B)}) with per-layer numpy arrays."""
    layers = []
    for i in range(model_config.num_layers):
        per: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        prefix, idx = layer_location(model_config, i)
        block = adapters
        for key in prefix:
            block = block.get(key, {})
        pick = np.asarray if idx is None else (lambda x, idx=idx: np.asarray(x[idx]))
        for path, node in _modules(block):
            if A_NAME in node:
                per[path[-1]] = (pick(node[A_NAME]), pick(node[B_NAME]))
        layers.append((i, per))
    return layers


def peft_state_dict(
    adapters: Any, model_config: Any, lcfg: LoraConfig
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """PEFT tensors (`base_model.model.<module>.lora_A.weight` ...) and `adapter_config`.

    PEFT's `lora_A.weight` is `(r, in)` and `lora_B.weight` `(out, r)` for both
    `nn.Linear` and GPT-2's `Conv1D` (`fan_in_fan_out` only affects merging). A fused
    module (`PeftLayout.fused`, GPT-2's `c_attn`) gets one adapter of rank `m r` for its
    `m` adapted projections: `A` stacked, `B` block-diagonal over its outputs (e.g.
    `[q | k | v]`), alpha `m alpha` (same scale), which is exactly the sum of the
    separate updates.
    """
    adapters = jax.device_get(adapters)
    layout = _peft_layout(model_config.model_type)
    prefix, modules, top = layout.prefix, layout.modules, layout.top
    fused_module, fused_targets = layout.fused or ("", ())
    fused_name = fused_module.rsplit(".", 1)[-1]
    kv_width = model_config.num_kv_heads * model_config.head_dim
    widths = {"q": model_config.num_heads * model_config.head_dim, "k": kv_width, "v": kv_width}
    r, alpha = lcfg.rank, float(lcfg.alpha)
    tensors: dict[str, np.ndarray] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    hf_modules: set[str] = set()

    def put(module: str, a_rxin: np.ndarray, b_outxr: np.ndarray) -> None:
        name = f"base_model.model.{module}"
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a_rxin, np.float32)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b_outxr, np.float32)
        hf_modules.add(module.rsplit(".", 1)[-1])

    for i, per in _layer_slices(adapters, model_config):
        fused = [t for t in fused_targets if t in per]
        if fused:
            # the fused output is the targets' outputs side by side; zero blocks where
            # a target is not adapted
            starts = np.cumsum([0] + [widths[t] for t in fused_targets])
            m = len(fused)
            a_full = np.concatenate([per[t][0].reshape(-1, r).T for t in fused], axis=0)
            b_full = np.zeros((int(starts[-1]), m * r), np.float32)
            for j, t in enumerate(fused):
                row = int(starts[fused_targets.index(t)])
                b_full[row : row + widths[t], j * r : (j + 1) * r] = per[t][1].reshape(r, -1).T
            put(f"{prefix}.{i}.{fused_module}", a_full, b_full)
            if m > 1:
                rank_pattern[fused_name], alpha_pattern[fused_name] = m * r, m * alpha
        for target, (a, b) in per.items():
            if target in fused:
                continue
            if target not in modules:
                raise UserError(
                    f"export --adapter: {model_config.model_type} has no PEFT module for "
                    f"LoRA target {target!r}; use export --merge instead"
                )
            put(f"{prefix}.{i}.{modules[target]}", a.reshape(-1, r).T, b.reshape(r, -1).T)
    for target, (module, _, _) in ((t, families.LORA_TARGETS[t]) for t in ("embed", "lm_head")):
        node = adapters.get(module, {})
        if A_NAME not in node:
            continue
        if target == "embed" and model_config.tie_word_embeddings:
            raise UserError(
                "export --adapter: LoRA on a tied embedding also changes the output layer, "
                "which a PEFT embedding adapter does not; use export --merge instead"
            )
        a, b = np.asarray(node[A_NAME]), np.asarray(node[B_NAME])
        # a padded vocabulary (models.pad_vocab) is ours: PEFT gets the real rows only
        if target == "embed":
            a = a[..., : model_config.vocab_size, :]
        elif target == "lm_head":
            b = b[..., : model_config.vocab_size]
        name = f"base_model.model.{top[target]}"
        if target == "embed":  # PEFT: delta = (B_emb A_emb)^T, A_emb (r, V), B_emb (D, r)
            tensors[f"{name}.lora_embedding_A"] = np.ascontiguousarray(a.T, np.float32)
            tensors[f"{name}.lora_embedding_B"] = np.ascontiguousarray(b.T, np.float32)
            hf_modules.add(top[target].rsplit(".", 1)[-1])
        else:
            put(top[target], a.T, b.T)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(hf_modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": layout.fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return tensors, config


def save_peft(
    out_dir: str | os.PathLike,
    adapters: Any,
    model_config: Any,
    lcfg: LoraConfig,
    base_model_name_or_path: str = "",
) -> Path | paths.Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` for `peft` to load."""
    from safetensors.numpy import save_file

    tensors, config = peft_state_dict(adapters, model_config, lcfg)
    config["base_model_name_or_path"] = str(base_model_name_or_path)
    with paths.staged_dir(out_dir) as local:  # safetensors writes local files
        out = Path(local)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return paths.as_path(out_dir) if paths.is_url(out_dir) else Path(out_dir)


# ------------------------------------------------------------------------ checkpoints


def config_of_run(run_config: Mapping[str, Any] | None) -> LoraConfig | None:
    """The `LoraConfig` a saved run config (checkpoint meta `config`) trained with."""
    if not run_config:
        return None
    return config_from(run_config.get("lora"))


def load_base(model_path: str, model_config: Any) -> Any:
    """The base model's params (float32), laid out like `model_config` (scanned or not)."""
    if not model_path or not Path(model_path).exists():
        raise UserError(
            f"LoRA export: the base model {model_path!r} (the run's model.path) is not a "
            "directory here; pass --base DIR"
        )
    _, params = hf.load_hf(
        model_path, dtype="float32", param_dtype="float32", scan_layers=model_config.scan_layers
    )
    # padded as in training (vocab padded on a tensor axis), so adapters of the embedding
    # or lm_head merge row for row; save_hf strips the padding again
    return resize_vocab(params, model_config, model_config.embed_vocab_size)


def require_lora(meta: Mapping[str, Any], path: Any) -> LoraConfig:
    """The LoRA config of a checkpoint's run (meta), or a UserError if it has none."""
    lcfg = config_of_run(meta.get("config"))
    if lcfg is None:
        raise UserError(f"{path}: this run did not train LoRA adapters (lora.rank is 0)")
    return lcfg


def base_model_path(meta: Mapping[str, Any], base: str | os.PathLike | None) -> str:
    """The base model a LoRA checkpoint's adapters apply to: `base`, else the run's model.path."""
    return str(base) if base else str((meta.get("config") or {}).get("model", {}).get("path", ""))


def merged_checkpoint_params(
    meta: Mapping[str, Any],
    adapters: Any,
    model_config: Any,
    base: str | os.PathLike | None = None,
    path: Any = "",
) -> Any:
    """Full params `W + s A B` from a LoRA checkpoint's adapters and its base model
    (the run's `model.path`, or `base`)."""
    lcfg = require_lora(meta, path)
    # The base as training held it (bfloat16 / int8 rounding included), then float32,
    # so the export reproduces the trained model's logits.
    base_params = dequantize_base(
        cast_base(load_base(base_model_path(meta, base), model_config), lcfg)
    )
    base_params = jax.tree.map(lambda x: x.astype(jnp.float32), base_params)
    return jax.device_get(merge_adapters(base_params, adapters, lcfg.scale))
