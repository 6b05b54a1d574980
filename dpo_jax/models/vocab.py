"""Vocabulary padding: one rule, applied where the mesh is known, stripped at export.

A vocabulary that does not divide the tensor-parallel axis (GPT-2's 50257 on 2 devices)
could only be replicated. Instead the embedding and unembedding get extra rows up to a
multiple of `tensor * VOCAB_ALIGN` (`pad_vocab`), recorded as
`ModelConfig.padded_vocab_size`; `ModelConfig.vocab_size` stays the real size that token
ids live in. `Transformer.logits` masks the padded columns to `PADDED_LOGIT`, so they
take no probability mass in any log-prob or sampling path; `strip_vocab` removes the
rows again before export. `trainer.build_trainer` pads when the tensor axis is > 1; the
loaders (`load_hf`, `init_params`) return the real vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dpo_jax.models.config import ModelConfig

VOCAB_ALIGN = 128  # lanes of a TPU vector register / MXU tile: the unit XLA pads to anyway

# The masked logit of a padding id: exp(PADDED_LOGIT - lse) is exactly 0 in float32, it
# is finite in float32 and bfloat16 (so 0 * logit stays 0 in the entropy), and no real
# logit comes near it (`is_padded_logit` tells them apart).
PADDED_LOGIT = -1e30


def padded_size(vocab_size: int, tensor: int) -> int:
    """`vocab_size` rounded up to a multiple of `tensor * VOCAB_ALIGN`."""
    multiple = max(int(tensor), 1) * VOCAB_ALIGN
    return -(-int(vocab_size) // multiple) * multiple


def _vocab_leaves(cfg: ModelConfig) -> list[tuple[tuple[str, ...], int]]:
    """(path, vocab axis) of the embedding and the untied unembedding."""
    out = [(("embed", "embedding"), 0)]
    if not cfg.tie_word_embeddings:
        out += [(("lm_head", "kernel"), 1), (("lm_head", "bias"), 0)]
    return out


def resize_vocab(params: Any, cfg: ModelConfig, rows: int) -> Any:
    """`params` with every vocab axis (as it is in the arrays) cut or zero-padded to
    `rows`: the one place that knows which leaves hold the vocabulary."""
    params = dict(nn.meta.unbox(params))
    for path, axis in _vocab_leaves(cfg):
        module = params.get(path[0])
        if module is None or path[1] not in module:
            continue
        x = module[path[1]]
        have = x.shape[axis]
        if have > rows:
            x = _slice(x, axis, rows)
        elif have < rows:
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, rows - have)
            x = (np if isinstance(x, np.ndarray) else jnp).pad(x, widths)  # host stays host
        params[path[0]] = {**module, path[1]: x}
    return params


def _slice(x: Any, axis: int, rows: int) -> Any:
    index = [slice(None)] * x.ndim
    index[axis] = slice(0, rows)
    return x[tuple(index)]


def pad_vocab(cfg: ModelConfig, params: Any, tensor: int) -> tuple[ModelConfig, Any]:
    """`(cfg, params)` with the vocabulary padded for a tensor axis of size `tensor`.

    Padding rows are zeros (their logits are masked anyway); already padded params are
    cut or padded to the new size, so the result depends only on `tensor`.
    """
    rows = padded_size(cfg.vocab_size, tensor)
    new_cfg = dataclasses.replace(cfg, padded_vocab_size=rows)
    return new_cfg, resize_vocab(params, cfg, rows)


def strip_vocab(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
    """`(cfg, params)` with any padding rows removed (what an export writes); reads the
    arrays' shapes, so params padded under a config that does not say so strip too."""
    stripped = resize_vocab(params, cfg, cfg.vocab_size)
    return dataclasses.replace(cfg, padded_vocab_size=0), stripped


def mask_padded_logits(cfg: ModelConfig, logits_NxLxV: Any) -> Any:
    """`logits` with the columns past `cfg.vocab_size` set to `PADDED_LOGIT`."""
    if logits_NxLxV.shape[-1] == cfg.vocab_size:
        return logits_NxLxV
    real_V = jnp.arange(logits_NxLxV.shape[-1]) < cfg.vocab_size
    return jnp.where(real_V, logits_NxLxV, jnp.asarray(PADDED_LOGIT, logits_NxLxV.dtype))


def is_padded_logit(logits: Any) -> Any:
    """True where a logit is a masked padding column."""
    return logits <= PADDED_LOGIT / 2
