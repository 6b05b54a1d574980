"""Hugging Face checkpoint import and export, without torch.

    cfg, params = load_hf("path/to/hf_dir", dtype=jnp.bfloat16, param_dtype=jnp.float32)
    save_hf("out_dir", cfg, params, tokenizer=tok)   # transformers.from_pretrained loads it
    save_hf("rm_dir", cfg, params, score_weight=w_1xD)  # AutoModelForSequenceClassification

Import reads `config.json` and `*.safetensors` (a single file, or shards listed
in `model.safetensors.index.json`) with `safetensors` in numpy mode, one tensor
at a time, so host memory holds about one copy of the weights. Everything
family-specific (config.json keys, tensor names and layouts) lives in one
module per family under `dpo_jax.models.families`; for example:

- `nn.Linear` weights are (out, in): transposed into `x @ kernel` form, then
  reshaped to (D, heads, head_dim) / (heads, head_dim, D).
- GPT-2 `Conv1D` weights are already (in, out); its fused `c_attn` is
  [q | k | v] along the output axis; there is no `lm_head` (tied to `wte`).
- GPT-NeoX's fused `query_key_value` output is interleaved per head:
  output row h*3*Dh + j*Dh + d is (head h, j in {q, k, v}, dim d).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.errors import UserError
from dpo_jax.models import families
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.families.base import LAYER, Tensor
from dpo_jax.models.transformer import abstract_params, layer_location
from dpo_jax.models.vocab import strip_vocab

SUPPORTED_MODEL_TYPES = families.names()

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


# Sequence classifiers (`save_hf(score_weight=)`): the family's architecture with this
# suffix, where transformers' name does not follow the causal LM's.
_CLASSIFIER_SUFFIX = "ForSequenceClassification"
_CLASSIFIER_NAMES = {"gemma3_text": "Gemma3TextForSequenceClassification"}
SCORE_TENSOR = "score.weight"  # [num_labels, D]: the classifier head of every family


def classifier_architecture(model_type: str) -> str:
    """The transformers `...ForSequenceClassification` class name of a family."""
    if model_type in _CLASSIFIER_NAMES:
        return _CLASSIFIER_NAMES[model_type]
    lm = families.get(model_type).architecture
    return lm.removesuffix("LMHeadModel").removesuffix("ForCausalLM") + _CLASSIFIER_SUFFIX


def is_classifier(hf_cfg: dict[str, Any]) -> bool:
    """Whether a config.json dict is a sequence classifier's (its `architectures`)."""
    return any(str(a).endswith(_CLASSIFIER_SUFFIX) for a in hf_cfg.get("architectures") or ())


def _is_output_embedding(hf_name: str) -> bool:
    # the untied unembedding (lm_head / GPT-NeoX's embed_out), which a classifier lacks
    return "." in hf_name and hf_name.split(".")[-2] in ("lm_head", "embed_out")


# ----------------------------------------------------------------------------- config


def _token_ids(d: dict[str, Any]) -> dict[str, Any]:
    eos = d.get("eos_token_id")
    return dict(
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=d.get("pad_token_id"),
    )


def config_from_hf(d: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict; `overrides` win (e.g. dtype)."""
    model_type = d.get("model_type")
    try:
        family = families.get(model_type)
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None
    kw = family.from_hf(d)
    return ModelConfig.for_family(model_type, **{**kw, **_token_ids(d), **overrides})


def config_to_hf(cfg: ModelConfig, hf_dtype: str | None = None) -> dict[str, Any]:
    """Hugging Face config.json dict for `cfg` (raises if the family cannot express it)."""
    family = families.get(cfg.model_type)
    d: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": hf_dtype or cfg.param_dtype,
        "use_cache": True,
    }
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, k)
        d[k] = list(v) if isinstance(v, tuple) else v
    d.update(family.to_hf(cfg))
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


def _tensor_map(cfg: ModelConfig) -> list[Tensor]:
    """Every HF tensor of the family with its Flax destination(s) and converters."""
    return families.get(cfg.model_type).tensor_map(cfg)


def _resolve(cfg: ModelConfig, path: Path_, layer: int | None) -> tuple[Path_, int | None]:
    """Flax path of a leaf and the index along its stacked layer axis (if scanned)."""
    if path[0] != LAYER:
        return path, None
    prefix, idx = layer_location(cfg, layer)
    return (*prefix, *path[1:]), idx


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

    A sequence classifier's directory (`save_hf(score_weight=)`, a reward model) loads
    its backbone; having no unembedding, an untied one is zeros (its `score.weight`:
    `read_hf_tensor`).
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
    # A sequence classifier has no unembedding: an untied one loads as zeros (a reward
    # model reads hidden states only), and its `score` head is read by `read_hf_tensor`.
    classifier = is_classifier(hf_cfg)
    reader = _SafetensorsReader(hf_dir)
    params: dict[str, Any] = {}
    stacked: dict[Path_, np.ndarray] = {}
    used: set[str] = set()
    try:
        for t in _tensor_map(cfg):
            stored = _lookup(reader, t.hf_name)
            if stored is None and classifier and _is_output_embedding(t.hf_name):
                (path,) = t.paths
                want = _get_path(abstract, path)
                _set_path(params, path, place(path, np.zeros(want.shape, pdt)))
                continue
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
        and not (cfg.tie_word_embeddings and _is_output_embedding(n))
        and not (classifier and n == SCORE_TENSOR)
    )
    if unused:
        warnings.warn(f"{hf_dir}: ignored {len(unused)} unused tensors: {unused[:8]}", stacklevel=2)
    expected = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    if expected != got:  # a bug in the tensor map, not in the checkpoint
        raise RuntimeError(f"tensor map mismatch: missing {expected - got}, extra {got - expected}")
    return cfg, params


def read_hf_tensor(hf_dir: str | os.PathLike, name: str) -> np.ndarray | None:
    """One tensor of a checkpoint directory's safetensors files (None when absent)."""
    reader = _SafetensorsReader(Path(hf_dir))
    try:
        return np.asarray(reader.get(name)) if name in reader.where else None
    finally:
        reader.close()


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


def _classifier_config(cfg: ModelConfig, shape: tuple[int, ...]) -> dict[str, Any]:
    """config.json keys of a sequence classifier with a `score.weight` of `shape`."""
    if len(shape) != 2 or shape[1] != cfg.hidden_size:
        raise ValueError(f"score_weight: shape {shape}, expected [num_labels, {cfg.hidden_size}]")
    labels = [f"LABEL_{i}" for i in range(shape[0])]
    return {
        "architectures": [classifier_architecture(cfg.model_type)],
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def save_hf(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    params: Any,
    tokenizer: Any = None,
    *,
    hf_dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
    score_weight: np.ndarray | None = None,
) -> Path:
    """Writes config.json + safetensors (sharded above `max_shard_bytes`) to `out_dir`.

    `hf_dtype` defaults to `cfg.param_dtype`. The tokenizer (if given) is
    saved with `save_pretrained`. Returns the output directory. With `score_weight`
    (`[num_labels, D]`) the directory is the family's `...ForSequenceClassification`
    (`classifier_architecture`): the backbone, no unembedding, `score.weight`; it
    scores the last token that is not `cfg.pad_token_id`, as transformers does.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = jnp.dtype(hf_dtype or cfg.param_dtype).name
    np_dtype = np.dtype(jnp.dtype(dtype_name))
    # An export holds the real vocabulary only (the padding rows are ours).
    cfg, params = strip_vocab(cfg, nn.meta.unbox(params))
    hf_cfg = config_to_hf(cfg, hf_dtype=dtype_name)
    tensors = _hf_tensors(cfg, params, np_dtype)
    if score_weight is not None:
        hf_cfg.update(_classifier_config(cfg, np.shape(score_weight)))
        score = np.ascontiguousarray(np.asarray(score_weight, np.float32).astype(np_dtype))
        body = ((n, a) for n, a in tensors if not _is_output_embedding(n))
        tensors = itertools.chain(body, [(SCORE_TENSOR, score)])

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

    for name, arr in tensors:
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
