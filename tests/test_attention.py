"""Attention as O(L) rules: the mask rule, blockwise attention, backends and dispatch.

Every implementation is compared with `reference_attention` (dense, float32, built from
the same rules) in value and gradient, on stacked, packed and prefix-shared rows from
the real batch builders, with sliding windows, GQA and logit soft-capping.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import data, logprobs, models
from dpo_jax.models import attention as A
from tests.train_helpers import synthetic_items, tiny_model_config


def _old_prefix_shared_mask(prompts, comps, length):
    """The `[N, L, L]` attn_mask the prefix-shared builder used to put in the batch,
    ANDed with what the model added (same non-zero segment, causal by row index)."""
    b = len(prompts)
    mask = np.zeros((b, length, length), bool)
    for i in range(b):
        np_, n1, n2 = len(prompts[i]), len(comps[i]), len(comps[b + i])
        sc = np_ + n1
        end = sc + 1 + n2
        mask[i, :sc, :sc] = True
        mask[i, sc:end, : np_ - 1] = True
        mask[i, sc:end, sc:end] = True
    return mask & np.tril(np.ones((length, length), bool))[None]


def _rule(batch) -> A.MaskRule:
    branch = batch.get("branch_ids")
    return A.make_rule(
        jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"]),
        None if branch is None else jnp.asarray(branch),
    )  # fmt: skip


def _batches(pairs: int = 3, seed: int = 0) -> dict[str, dict]:
    """The three layouts of the same pairs; lengths > one 16-token block."""
    rng = np.random.default_rng(seed)
    items = [
        dict(
            prompt=rng.integers(3, 60, rng.integers(1, 30)),
            chosen=rng.integers(3, 60, rng.integers(1, 20)),
            rejected=rng.integers(3, 60, rng.integers(1, 20)),
        )
        for _ in range(pairs)
    ]
    out = {layout: data.build_batch(items, "paired", layout) for layout in data.LAYOUTS}
    out["items"] = items
    return out


def test_rule_equals_the_old_prefix_shared_attn_mask():
    """branch_ids describe exactly the mask the batch used to carry (real tokens)."""
    for seed in range(5):
        bs = _batches(4, seed)
        ps = bs["prefix_shared"]
        prompts, comps = data.batching.sequences_of(bs["items"], "paired")
        old = _old_prefix_shared_mask(prompts, comps, ps["input_ids"].shape[1])
        new = np.asarray(A.dense_mask(_rule(ps)))[:, 0]
        assert "attn_mask" not in ps
        np.testing.assert_array_equal(new, old)


def test_mask_block_is_the_dense_mask_blockwise():
    """Tiling mask_block over blocks reproduces the dense mask (window included)."""
    ps = _batches(3, 1)["prefix_shared"]
    rule = _rule(ps)
    dense = np.asarray(A.dense_mask(rule, window=5))[:, 0]
    length, blk = dense.shape[1], 16
    for i in range(0, length, blk):
        for j in range(0, length, blk):
            q = jax.tree.map(lambda a, i=i: a[:, i : i + blk], rule)
            k = jax.tree.map(lambda a, j=j: a[:, j : j + blk], rule)
            got = np.asarray(A.mask_block(q, k, window=5))
            np.testing.assert_array_equal(got, dense[:, i : i + blk, j : j + blk])


def test_packed_rule_by_hand():
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    pos = jnp.array([[0, 1, 0, 1, 2, 0]])
    got = np.asarray(A.dense_mask(A.make_rule(seg, pos), window=2))[0, 0]
    want = np.zeros((6, 6), bool)
    for q, k in [(0, 0), (1, 0), (1, 1), (2, 2), (3, 2), (3, 3), (4, 3), (4, 4)]:
        want[q, k] = True
    np.testing.assert_array_equal(got, want)


def _qkv(n, length, h, kv, d, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    mk = lambda heads: jnp.asarray(rng.normal(size=(n, length, heads, d)), dtype)
    return mk(h), mk(kv), mk(kv)


def _value_and_grads(fn, q, k, v, valid_NxL):
    """Output on real tokens and grads of a random projection of it (padding excluded)."""
    w = jnp.asarray(
        np.random.default_rng(9).normal(size=q.shape) * np.asarray(valid_NxL)[..., None, None],
        jnp.float32,
    )
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    out = fn(q, k, v).astype(jnp.float32) * np.asarray(valid_NxL)[..., None, None]
    return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


CASES = [
    # (layout, heads, kv heads, window, softcap)
    ("stacked", 4, 4, None, None),
    ("packed", 4, 4, None, None),
    ("prefix_shared", 4, 4, None, None),
    ("prefix_shared", 4, 1, None, None),  # GQA (MQA)
    ("packed", 6, 2, None, None),  # GQA
    ("prefix_shared", 4, 2, 7, None),  # sliding window on positions
    ("packed", 4, 2, 5, None),
    ("stacked", 4, 2, None, 5.0),  # Gemma 2 soft-capping
    ("prefix_shared", 4, 2, 9, 3.0),
]


@pytest.mark.parametrize("layout,h,kv,window,softcap", CASES)
def test_blockwise_equals_reference_float32(layout, h, kv, window, softcap):
    batch = _batches(3, 2)[layout]
    rule = _rule(batch)
    n, length = batch["input_ids"].shape
    assert length > 16  # several 16-token blocks, so skipping and accumulation are exercised
    q, k, v = _qkv(n, length, h, kv, 8, seed=3)
    kw = dict(window=window, softcap=softcap)
    valid = batch["segment_ids"] != 0
    ref, ref_g = _value_and_grads(
        lambda q, k, v: A.reference_attention(q, k, v, rule, **kw), q, k, v, valid
    )
    got, got_g = _value_and_grads(
        lambda q, k, v: A.blockwise_attention(q, k, v, rule, block=16, **kw), q, k, v, valid
    )
    assert float(jnp.abs(ref).max()) > 0.1
    np.testing.assert_allclose(got, ref, atol=1e-5)
    for a, b in zip(got_g, ref_g, strict=True):
        assert float(jnp.abs(b).max()) > 1e-3
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_blockwise_pads_lengths_that_are_not_a_block_multiple():
    seg = jnp.ones((2, 45), jnp.int32).at[1, 30:].set(0)
    pos = jnp.broadcast_to(jnp.arange(45), (2, 45))
    rule = A.make_rule(seg, pos)
    q, k, v = _qkv(2, 45, 2, 2, 8, seed=4)
    np.testing.assert_allclose(
        A.blockwise_attention(q, k, v, rule, block=16)[0],
        A.reference_attention(q, k, v, rule)[0],
        atol=1e-5,
    )


def test_xla_path_matches_reference():
    """The dense xla backend (jax.nn.dot_product_attention with the rule's mask)."""
    batch = _batches(3, 5)["prefix_shared"]
    rule = _rule(batch)
    q, k, v = _qkv(*batch["input_ids"].shape, 4, 2, 8, seed=5)
    valid = np.asarray(batch["segment_ids"] != 0)[..., None, None]
    got = A.attend(q, k, v, rule, impl="xla", window=6)
    np.testing.assert_allclose(
        got * valid, A.reference_attention(q, k, v, rule, window=6) * valid, atol=1e-5
    )


def test_blockwise_bfloat16_close_to_float32():
    """bfloat16 blockwise vs float32 reference, the tolerance benchmarks/attention_check uses."""
    batch = _batches(3, 6)["packed"]
    rule = _rule(batch)
    q, k, v = _qkv(*batch["input_ids"].shape, 4, 2, 16, seed=6)
    valid = batch["segment_ids"] != 0
    ref, ref_g = _value_and_grads(
        lambda q, k, v: A.reference_attention(q, k, v, rule), q, k, v, valid
    )
    bf = lambda x: x.astype(jnp.bfloat16)
    got, got_g = _value_and_grads(
        lambda q, k, v: A.blockwise_attention(q, k, v, rule, block=16),
        bf(q), bf(k), bf(v), valid,
    )  # fmt: skip
    np.testing.assert_allclose(got, ref, atol=5e-2)
    for a, b in zip(got_g, ref_g, strict=True):
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=5e-2 * float(jnp.abs(b).max()))


def test_blockwise_saves_no_probabilities():
    """The backward pass keeps O(L) residuals: nothing of size L x L survives the forward."""
    length = 256
    rule = A.make_rule(jnp.ones((1, length), jnp.int32), jnp.arange(length)[None])
    q, k, v = _qkv(1, length, 2, 2, 8)
    _, vjp = jax.vjp(lambda q, k, v: A.blockwise_attention(q, k, v, rule, block=32), q, k, v)
    biggest = max(x.size for x in jax.tree.leaves(vjp) if hasattr(x, "size"))
    assert biggest <= 4 * length * 2 * 8  # q/k/v/out sized, never L * L * heads


def test_splash_interpret_mode_on_cpu():
    """The Pallas splash kernel in interpret mode: packed rows, GQA, window, soft-cap, grads."""
    seg = np.ones((1, 256), np.int32)
    seg[0, 100:] = 2
    seg[0, 200:] = 0
    pos = np.concatenate([np.arange(100), np.arange(100), np.zeros(56)])[None].astype(np.int32)
    rule = A.make_rule(jnp.asarray(seg), jnp.asarray(pos))
    q, k, v = _qkv(1, 256, 2, 1, 64, seed=7)
    kw = dict(window=30, softcap=2.0)
    ref, ref_g = _value_and_grads(
        lambda q, k, v: A.reference_attention(q, k, v, rule, **kw), q, k, v, seg != 0
    )
    got, got_g = _value_and_grads(
        lambda q, k, v: A.attend(q, k, v, rule, impl="splash", splash_interpret=True, **kw),
        q, k, v, seg != 0,
    )  # fmt: skip
    np.testing.assert_allclose(got, ref, atol=1e-5)
    for a, b in zip(got_g, ref_g, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_single_segment_rows_check():
    pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
    stacked = A.make_rule(jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]]), pos)
    packed = A.make_rule(jnp.array([[1, 1, 2, 0], [1, 1, 0, 0]]), pos)
    holes = A.make_rule(jnp.array([[1, 0, 1, 0], [1, 1, 0, 0]]), pos)
    assert bool(A._single_segment_rows(stacked))
    assert not bool(A._single_segment_rows(packed))
    assert not bool(A._single_segment_rows(holes))
    shifted = A.make_rule(jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]]), pos + 1)
    assert bool(A._single_segment_rows(shifted)) and not bool(A._single_segment_rows(shifted, 4))


def test_dispatch(caplog):
    f32, bf16 = jnp.float32, jnp.bfloat16
    kw = dict(has_branches=False, softcap=None)
    assert A.choose("auto", length=512, backend="cpu", dtype=f32, **kw) == "xla"
    assert A.choose("auto", length=A.BLOCKWISE_MIN_LENGTH, backend="cpu", dtype=f32, **kw) == (
        "blockwise"
    )
    assert A.choose("auto", length=64, backend="gpu", dtype=bf16, **kw) == "cudnn"
    assert A.choose("auto", length=256, backend="tpu", dtype=bf16, **kw) == "splash"
    assert A.choose("xla", length=8192, backend="gpu", dtype=bf16, **kw) == "xla"
    # Each fallback is logged once per process (`_log_choice` is cached so a trace of 24
    # layers warns once): forget what earlier tests logged, or the order decides the result.
    A._log_choice.cache_clear()
    with caplog.at_level(logging.WARNING, logger="dpo_jax.models.attention"):
        prefix = dict(kw, has_branches=True)
        assert A.choose("auto", length=64, backend="gpu", dtype=bf16, **prefix) == "blockwise"
        assert A.choose("cudnn", length=64, backend="gpu", dtype=f32, **kw) == "blockwise"
        capped = dict(kw, softcap=30.0)
        assert A.choose("cudnn", length=64, backend="gpu", dtype=bf16, **capped) == "blockwise"
        assert A.choose("splash", length=256, backend="tpu", dtype=bf16, **prefix) == "blockwise"
        assert A.choose("splash", length=64, backend="tpu", dtype=bf16, **kw) == "blockwise"
        assert A.choose("splash", length=256, backend="cpu", dtype=bf16, **kw) == "blockwise"
    text = caplog.text
    for reason in ("branch_ids", "bfloat16", "soft-capping", "multiple of 128", "needs a TPU"):
        assert reason in text, reason
    with pytest.raises(ValueError, match="attention_impl"):
        A.choose("flash", length=8, backend="cpu", dtype=f32, **kw)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_model_logps_prefix_shared_blockwise_equal_xla(softcap):
    """Whole model: prefix-shared log-probs and their gradients, blockwise vs dense xla."""
    cfg = tiny_model_config(
        num_layers=1, init_std=0.2, attn_logit_softcap=softcap, attention_block=16
    )
    params = models.init_params(cfg, jax.random.key(1))
    batch = {k: jnp.asarray(v) for k, v in _batches(3, 8)["prefix_shared"].items() if k != "items"}
    assert batch["input_ids"].shape[1] > 16

    def logps(impl, p):
        model = models.Transformer(cfg.replace(attention_impl=impl))
        kw = {k: batch[k] for k in ("positions", "segment_ids", "branch_ids")}
        logits = model.apply({"params": p}, batch["input_ids"], **kw)
        return logprobs.sequence_logps(logits, batch, 6).logps_S

    ref, ref_vjp = jax.vjp(lambda p: logps("xla", p), params)
    got, got_vjp = jax.vjp(lambda p: logps("blockwise", p), params)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    ct = jnp.linspace(-1.0, 1.0, 6)
    for a, b in zip(jax.tree.leaves(got_vjp(ct)), jax.tree.leaves(ref_vjp(ct)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())))


@pytest.mark.heavy
def test_prefix_shared_blockwise_equals_stacked():
    """Prefix-shared rows under blockwise attention score like stacked rows (dense path)."""
    cfg = tiny_model_config(num_layers=1, init_std=0.2, attention_block=16)
    params = models.init_params(cfg, jax.random.key(2))
    items = synthetic_items(4, seed=5)
    out = {}
    for layout, impl in (("stacked", "xla"), ("prefix_shared", "blockwise")):
        b = {k: jnp.asarray(v) for k, v in data.build_batch(items, "paired", layout).items()}
        model = models.Transformer(cfg.replace(attention_impl=impl))
        kw = {k: b[k] for k in ("positions", "segment_ids", "branch_ids") if k in b}
        logits = model.apply({"params": params}, b["input_ids"], **kw)
        out[layout] = np.asarray(logprobs.sequence_logps(logits, b, 8).logps_S)
    np.testing.assert_allclose(out["prefix_shared"], out["stacked"], rtol=1e-5)


# over 120 s (~250 s): one DPO step on 32k-token rows is the long-context claim itself;
# a smaller row would not leave the dense path's memory
@pytest.mark.heavy
def test_32k_prefix_shared_dpo_step_on_cpu():
    """One 32768-token prefix-shared DPO step of a tiny model compiles and runs on CPU
    (auto -> blockwise), and its step-0 log-probs equal the two stacked rows scored
    separately by the same blockwise path."""
    from dpo_jax import train
    from tests.train_helpers import make_trainer

    length = 32768
    cfg = tiny_model_config(num_layers=1, max_position_embeddings=length, scan_layers=True)
    params = models.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    draw = lambda n: rng.integers(3, 60, n).astype(np.int32)
    items = [
        dict(prompt=draw(length // 2 - 1), chosen=draw(length // 4), rejected=draw(length // 4))
    ]
    batch = data.build_batch(items, "paired", "prefix_shared", length=length)
    assert batch["input_ids"].shape == (1, length) and "attn_mask" not in batch
    assert A.choose("auto", length=length, backend="cpu", has_branches=True, softcap=None,
                    dtype=jnp.float32) == "blockwise"  # fmt: skip
    trainer, state = make_trainer((cfg, params))
    batch_A = train.stack_micro_batches([batch])
    state, metrics = trainer.step(state, batch_A, 2)
    m = {k: float(v) for k, v in metrics.items()}
    assert np.isfinite(m["loss"]) and m["loss"] == pytest.approx(np.log(2.0), abs=1e-4)

    # The stacked rows of prompt + completion (24k tokens each), same blockwise path.
    model = models.Transformer(cfg)
    stacked = {
        k: jnp.asarray(v)
        for k, v in data.build_batch(items, "paired", "stacked", length=3 * length // 4).items()
    }
    logits = jax.jit(model.apply)(
        {"params": params}, stacked["input_ids"], stacked["positions"], stacked["segment_ids"]
    )
    want = np.asarray(logprobs.sequence_logps(logits, stacked, 2).logps_S)
    got = np.array([m["logps/chosen"], m["logps/rejected"]])
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_model_attention_config_key():
    """`model.attention` reaches the model config; a wrong value is a one-line UserError."""
    from dpo_jax import errors, loading
    from dpo_jax.configs import default

    config = default.get_config()
    assert loading.attention_choice(config) == "auto"
    config.model.attention = "flash"
    with pytest.raises(errors.UserError, match="model.attention"):
        loading.attention_choice(config)


@pytest.mark.heavy
def test_blockwise_on_sharded_meshes():
    """Prefix-shared DPO steps with blockwise attention on 4-device data and fsdp meshes
    equal the 1-device dense run (tests/blockwise_sharded_run.py, own process)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run(
        [sys.executable, "-m", "tests.blockwise_sharded_run"],
        cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == {"1dev-xla", "1dev-blockwise", "2x2x1-blockwise", "4x1x1-blockwise"}
    for name, r in out.items():
        assert r["loss_change"] > 1e-3, name  # the steps really trained
        assert r["loss_diff"] < 1e-6 and r["param_diff"] < 1e-6, (name, r)
