"""KV-cache decoding equals a full forward pass (left-padded prompts, prefill then steps)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models import ModelConfig, Transformer, init_cache, init_params, load_hf
from tests.hf_fixtures import FAMILIES

PROMPT_LENS = np.array([6, 3, 5])
STEPS = 5
VOCAB = 320


@functools.partial(jax.jit, static_argnums=0)
def _full(cfg: ModelConfig, params, ids, segment_ids):
    return Transformer(cfg).apply({"params": params}, ids, segment_ids=segment_ids)


@functools.partial(jax.jit, static_argnums=0)
def _decode(cfg: ModelConfig, params, cache, ids, positions, kv_mask):
    logits, mutated = Transformer(cfg).apply(
        {"params": params, "cache": cache},
        ids,
        positions=positions,
        kv_mask=kv_mask,
        decode=True,
        mutable=["cache"],
    )
    return logits, mutated["cache"]


def _sequences(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, VOCAB, size=p + STEPS).astype(np.int32) for p in PROMPT_LENS]


def _reference(cfg: ModelConfig, params, seqs: list[np.ndarray]) -> list[np.ndarray]:
    """Full-forward logits of each sequence (right-padded batch, segment_ids)."""
    length = max(len(s) for s in seqs)
    ids = np.ones((len(seqs), length), np.int32)
    seg = np.zeros((len(seqs), length), np.int32)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], seg[r, : len(s)] = s, 1
    out = np.asarray(_full(cfg, params, jnp.asarray(ids), jnp.asarray(seg)))
    return [out[r, : len(s)] for r, s in enumerate(seqs)]


def _cached(cfg: ModelConfig, params, seqs: list[np.ndarray]) -> list[np.ndarray]:
    """Left-padded prefill of the prompts, then STEPS single-token decode calls."""
    n, p_max = len(seqs), int(PROMPT_LENS.max())
    max_len = p_max + STEPS + 2  # spare slots stay masked by causality
    pad = p_max - PROMPT_LENS
    slots = np.arange(max_len)
    kv_mask = slots[None, :] >= pad[:, None]
    ids = np.ones((n, p_max), np.int32)
    for r, s in enumerate(seqs):
        ids[r, pad[r] :] = s[: PROMPT_LENS[r]]
    positions = np.maximum(slots[None, :p_max] - pad[:, None], 0).astype(np.int32)
    cache = init_cache(cfg, n, max_len)
    logits, cache = _decode(cfg, params, cache, ids, positions, kv_mask)
    logits = np.asarray(logits)
    outs = [[logits[r, pad[r] :]] for r in range(n)]
    for t in range(STEPS):
        tok = np.array([[s[PROMPT_LENS[r] + t]] for r, s in enumerate(seqs)], np.int32)
        pos = (PROMPT_LENS + t)[:, None].astype(np.int32)
        step, cache = _decode(cfg, params, cache, tok, pos, kv_mask)
        for r in range(n):
            outs[r].append(np.asarray(step)[r])
    assert int(np.asarray(jax.tree.leaves(cache)[0]).ravel()[0]) == p_max + STEPS  # cache_index
    return [np.concatenate(o, axis=0) for o in outs]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_matches_full_forward(tiny_hf_dir, family):
    cfg, params = load_hf(tiny_hf_dir(family))
    seqs = _sequences()
    ref = _reference(cfg, params, seqs)
    got = _cached(cfg, params, seqs)
    for r in range(len(seqs)):
        assert got[r].shape == ref[r].shape
        np.testing.assert_allclose(got[r], ref[r], atol=1e-4, rtol=0)
    assert max(np.abs(x).max() for x in ref) > 1.0  # logits are O(1): the bound is strict


def test_scanned_cache_matches_full_forward(tiny_hf_dir):
    cfg, params = load_hf(tiny_hf_dir("llama"), scan_layers=True)
    cache = init_cache(cfg, 3, 8)
    assert cache["layers"]["attn"]["cached_key"].shape == (cfg.num_layers, 3, 8, 2, 16)
    seqs = _sequences(seed=1)
    for got, ref in zip(_cached(cfg, params, seqs), _reference(cfg, params, seqs), strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_init_cache_layout_and_dtype():
    cfg = ModelConfig.tiny("qwen3", dtype="bfloat16")
    cache = init_cache(cfg, 2, 7)
    layer = cache["layers_1"]["attn"]
    assert layer["cached_key"].shape == (2, 7, cfg.num_kv_heads, cfg.head_dim)
    assert layer["cached_value"].dtype == jnp.bfloat16
    assert layer["cache_index"].shape == () and int(layer["cache_index"]) == 0
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(cache))


def test_decode_needs_positions_and_valid_kv_mask():
    cfg = ModelConfig.tiny("llama")
    model = Transformer(cfg)
    ids = jnp.zeros((1, 2), jnp.int32)
    # Abstract params/cache: eval_shape runs the shape checks without compiling anything.
    variables = {
        "params": jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))),
        "cache": jax.eval_shape(lambda: init_cache(cfg, 1, 4)),
    }
    with pytest.raises(ValueError, match="positions"):
        jax.eval_shape(lambda v: model.apply(v, ids, decode=True, mutable=["cache"]), variables)
    with pytest.raises(ValueError, match="kv_mask has shape"):
        jax.eval_shape(
            lambda v: model.apply(
                v,
                ids,
                positions=jnp.zeros((1, 2), jnp.int32),
                kv_mask=jnp.ones((1, 3), bool),
                decode=True,
                mutable=["cache"],
            ),
            variables,
        )
