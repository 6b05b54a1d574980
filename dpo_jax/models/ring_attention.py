"""Ring attention: context parallelism over the mesh's `sequence` axis.

A row's length is split over the `n` devices of the `sequence` axis. Each device keeps
its query block; the key/value blocks travel around the ring with `jax.lax.ppermute`,
each with its O(L) mask rule (segment ids, positions, branch ids and the tokens'
original row indices), so every device sees every key block once and the mask is the
same `attention.mask_block` as on one device. Causal, packed and prefix-shared rows,
sliding windows, GQA and soft-capping therefore work unchanged.

Forward: per ring step the blockwise kernel (`attention._forward`) gives the local
queries' output and log-sum-exp over the visiting keys; steps merge by log-sum-exp (the
online softmax's running max and sum, one level up). Backward (custom VJP): the visiting
block's dK/dV accumulators travel with it and arrive home after a full turn; dQ stays
local. Per-step gradients use the final output and log-sum-exp, as in flash attention,
so no per-step state is saved: memory per device is O(L / n).

Zig-zag layout: with causal masks the device holding the last tokens has the most work.
The model (`transformer.Transformer`) permutes the row once at its input so that device
i holds chunks i and 2n-1-i of 2n equal chunks (`to_zigzag`), carries each token's
original row index in the rule, and permutes the final hidden states back
(`from_zigzag`), so log-probs and everything after see the row in order.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dpo_jax.models import attention as attn_lib
from dpo_jax.models.attention import MaskRule

Array = jax.Array

SEQUENCE_AXIS = "sequence"  # the mesh axis (dpo_jax.sharding.SEQUENCE_AXIS)


def sequence_size() -> int:
    """Size of the `sequence` axis of the mesh in context (1 without one)."""
    return int(dict(jax.sharding.get_abstract_mesh().shape).get(SEQUENCE_AXIS, 1))


def padded_length(length: int, n: int) -> int:
    """`length` rounded up to a multiple of 2n (two zig-zag chunks per device)."""
    return -(-length // (2 * n)) * (2 * n)


def to_zigzag(x_NxL: Array, n: int) -> Array:
    """Reorder axis 1 (length divisible by 2n) so device i's share is chunks i, 2n-1-i."""
    shape = x_NxL.shape
    c = shape[1] // (2 * n)
    chunks = x_NxL.reshape(shape[0], 2 * n, c, *shape[2:])
    first, second = chunks[:, :n], jnp.flip(chunks[:, n:], axis=1)
    return jnp.stack([first, second], axis=2).reshape(shape)


def from_zigzag(x_NxL: Array, n: int) -> Array:
    """Inverse of `to_zigzag`: rows back in order."""
    shape = x_NxL.shape
    c = shape[1] // (2 * n)
    pairs = x_NxL.reshape(shape[0], n, 2, c, *shape[2:])
    chunks = jnp.concatenate([pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)], axis=1)
    return chunks.reshape(shape)


def zigzag_index(n_rows: int, length: int, n: int) -> Array:
    """`[N, L]` original row index of each slot of the zig-zag layout."""
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n_rows, length))
    return to_zigzag(index, n)


def _rotate(tree: Any, n: int) -> Any:
    """Send every leaf to the next device of the ring (device i -> i + 1)."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, SEQUENCE_AXIS, perm), tree)


def _merge(out: Array, lse: Array, out_t: Array, lse_t: Array) -> tuple[Array, Array]:
    """Combine two partial softmaxes (out [N, L, K, G, D] f32, lse [N, K, G, L]) by lse."""
    new = jnp.logaddexp(lse, lse_t)
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    # -inf lse (no key seen yet) gives weight 0, not NaN.
    w = lambda x: jnp.moveaxis(jnp.where(jnp.isfinite(x), jnp.exp(x - safe), 0.0), 3, 1)
    return out * w(lse)[..., None] + out_t * w(lse_t)[..., None], new


def _ring_forward(
    q: Array, k: Array, v: Array, rule: MaskRule, st: attn_lib._Static, n: int
) -> tuple[Array, Array]:
    """Local queries over all n key blocks; returns out (float32) and lse."""

    def step(_: int, carry: tuple) -> tuple:
        k, v, k_rule, out, lse = carry
        out_t, lse_t = attn_lib._forward(q, k, v, rule, k_rule, st)
        out, lse = _merge(out, lse, out_t, lse_t)
        k, v, k_rule = _rotate((k, v, k_rule), n)
        return k, v, k_rule, out, lse

    nb, length, nkv, g, _ = q.shape
    init = (
        k, v, rule,
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((nb, nkv, g, length), -jnp.inf, jnp.float32),
    )  # fmt: skip
    k, v, k_rule, out, lse = attn_lib._while(0, n - 1, step, init)
    # The last block needs no onward rotation.
    out_t, lse_t = attn_lib._forward(q, k, v, rule, k_rule, st)
    return _merge(out, lse, out_t, lse_t)


def _pad_local(length: int, block: int) -> tuple[int, Any]:
    """(block size, pad fn) for one device's share of `length` tokens: the kernel tiles
    whole blocks, and padding is segment 0, so it sees nothing and nothing sees it."""
    blk = min(block, max(16, 1 << (length - 1).bit_length()))
    extra = -(-length // blk) * blk - length
    pad = lambda x: jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))
    return blk, pad


def _local_fwd(q: Array, k: Array, v: Array, rule: MaskRule, st: attn_lib._Static, n: int):
    """One device (inside shard_map): out (q dtype, [N, Lc, K, G, D]), lse [N, K, G, Lc]."""
    length = q.shape[1]
    _, pad = _pad_local(length, st.block_q)
    out, lse = _ring_forward(pad(q), pad(k), pad(v), jax.tree.map(pad, rule), st, n)
    return out[:, :length].astype(q.dtype), lse[..., :length]


def _local_bwd(q, k, v, rule, out, lse, dout, st: attn_lib._Static, n: int):
    """One device: dq, dk, dv of its share; dK/dV come home after a full turn."""
    length = q.shape[1]
    _, pad = _pad_local(length, st.block_q)
    q, k, v, out, dout = (pad(x) for x in (q, k, v, out, dout))
    rule = jax.tree.map(pad, rule)
    lse = jnp.pad(lse, ((0, 0),) * 3 + ((0, q.shape[1] - length),), constant_values=-jnp.inf)

    def grads(k: Array, v: Array, k_rule: MaskRule) -> tuple[Array, Array, Array]:
        return attn_lib._backward(q, k, v, rule, k_rule, out, lse, dout, st)

    def step(_: int, carry: tuple) -> tuple:
        k, v, k_rule, dq, dk, dv = carry
        dq_t, dk_t, dv_t = grads(k, v, k_rule)
        # dK/dV belong to the visiting block: they travel on with it.
        k, v, k_rule, dk, dv = _rotate((k, v, k_rule, dk + dk_t, dv + dv_t), n)
        return k, v, k_rule, dq + dq_t, dk, dv

    zeros_kv = jnp.zeros(k.shape, jnp.float32)
    init = (k, v, rule, jnp.zeros(q.shape, jnp.float32), zeros_kv, zeros_kv)
    k_, v_, k_rule, dq, dk, dv = jax.lax.fori_loop(0, n - 1, step, init)
    dq_t, dk_t, dv_t = grads(k_, v_, k_rule)
    # One more hop brings every block's accumulated dK/dV home.
    dk, dv = _rotate((dk + dk_t, dv + dv_t), n)
    cut = lambda x, like: x[:, :length].astype(like.dtype)
    return cut(dq + dq_t, q), cut(dk, k), cut(dv, v)


_SEQ = PartitionSpec(None, SEQUENCE_AXIS)
_LSE = PartitionSpec(None, None, None, SEQUENCE_AXIS)


def _manual(fn: Any, in_specs: tuple, out_specs: Any) -> Any:
    """`fn` per device over the `sequence` axis only (other axes stay GSPMD's)."""
    return jax.shard_map(
        fn, in_specs=in_specs, out_specs=out_specs, axis_names={SEQUENCE_AXIS}, check_vma=False
    )


# The custom VJP is outside shard_map (forward and backward are each one shard_map), so
# remat and autodiff only ever see this one opaque op, as with `attention._blockwise`.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(q: Array, k: Array, v: Array, rule: MaskRule, st: attn_lib._Static, n: int) -> Array:
    return _ring_fwd(q, k, v, rule, st, n)[0]


def _ring_fwd(q: Array, k: Array, v: Array, rule: MaskRule, st: attn_lib._Static, n: int) -> Any:
    rule_spec = jax.tree.map(lambda _: _SEQ, rule)
    fwd = _manual(
        functools.partial(_local_fwd, st=st, n=n), (_SEQ, _SEQ, _SEQ, rule_spec), (_SEQ, _LSE)
    )
    out, lse = fwd(q, k, v, rule)
    return out, (q, k, v, rule, out, lse)


def _ring_bwd(st: attn_lib._Static, n: int, res: Any, dout: Array) -> Any:
    q, k, v, rule, out, lse = res
    rule_spec = jax.tree.map(lambda _: _SEQ, rule)
    bwd = _manual(
        functools.partial(_local_bwd, st=st, n=n),
        (_SEQ, _SEQ, _SEQ, rule_spec, _SEQ, _LSE, _SEQ),
        (_SEQ, _SEQ, _SEQ),
    )
    dq, dk, dv = bwd(q, k, v, rule, out, lse, dout)
    return dq, dk, dv, None  # integer rule: no cotangent


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    q_NxLxHxD: Array,
    k_NxLxKxD: Array,
    v_NxLxKxD: Array,
    rule: MaskRule,
    *,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    block: int = attn_lib.DEFAULT_BLOCK,
) -> Array:
    """Self-attention with the length split over the mesh's `sequence` axis.

    Call under `jax.set_mesh(mesh)` with L divisible by mesh.sequence. Tokens may be in
    any order along L (the zig-zag layout) as long as `rule.index` holds each token's
    original row index. Equals `attention.reference_attention` in value and gradient.
    Only the `sequence` axis is manual: batch and heads keep their GSPMD sharding.
    """
    n = sequence_size()
    nb, length, h, d = q_NxLxHxD.shape
    if length % n:
        raise ValueError(f"ring attention: length {length} is not divisible by {n}")
    nkv = k_NxLxKxD.shape[2]
    blk, _ = _pad_local(length // n, block)
    scale = d**-0.5 if scale is None else float(scale)
    st = attn_lib._Static(window, softcap, scale, blk, blk, same_rows=False)
    out = _ring(attn_lib._group(q_NxLxHxD, nkv), k_NxLxKxD, v_NxLxKxD, rule, st, n)
    return out.reshape(nb, length, h, d)


def ulysses_attention(
    q_NxLxHxD: Array,
    k_NxLxKxD: Array,
    v_NxLxKxD: Array,
    rule: MaskRule,
    *,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    block: int = attn_lib.DEFAULT_BLOCK,
) -> Array:
    """All-to-all (Ulysses) context parallelism: heads <-> length, then attention.

    Each device trades its length share of every head for the whole length of 1/n of
    the heads (`all_to_all`), gathers the O(L) rule arrays, runs blockwise attention
    on full rows (any token order: the rule's index), and trades back. Needs the query
    and kv head counts divisible by mesh.sequence. Same contract as `ring_attention`.
    """
    n = sequence_size()
    h, nkv = q_NxLxHxD.shape[2], k_NxLxKxD.shape[2]
    if q_NxLxHxD.shape[1] % n or h % n or nkv % n:
        raise ValueError(f"ulysses attention: length, {h} heads and {nkv} kv heads must divide {n}")

    def local(q: Array, k: Array, v: Array, rule: MaskRule) -> Array:
        to_heads = lambda x: jax.lax.all_to_all(x, SEQUENCE_AXIS, 2, 1, tiled=True)
        whole = lambda r: jax.lax.all_gather(r, SEQUENCE_AXIS, axis=1, tiled=True)
        out = attn_lib.blockwise_attention(
            to_heads(q), to_heads(k), to_heads(v), jax.tree.map(whole, rule),
            window=window, softcap=softcap, scale=scale, block=block, any_order=True,
        )  # fmt: skip
        return jax.lax.all_to_all(out, SEQUENCE_AXIS, 1, 2, tiled=True)

    rule_spec = jax.tree.map(lambda _: _SEQ, rule)
    return _manual(local, (_SEQ, _SEQ, _SEQ, rule_spec), _SEQ)(
        q_NxLxHxD, k_NxLxKxD, v_NxLxKxD, rule
    )


__all__ = [
    "SEQUENCE_AXIS",
    "from_zigzag",
    "padded_length",
    "ring_attention",
    "sequence_size",
    "to_zigzag",
    "ulysses_attention",
    "zigzag_index",
]
