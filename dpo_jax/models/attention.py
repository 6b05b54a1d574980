"""Attention without L x L arrays: masks as rules, blockwise attention, backends.

A batch describes who may attend to whom by three O(L) arrays per row
(`MaskRule`): `segment_ids` (0 = padding), `branch_ids` (prefix-shared rows
only) and `positions`, plus the row index of each token. Every backend derives
its mask from these with ONE function, `mask_block(q_rule, k_rule, window)`:

    mask(q, k) = seg[q] == seg[k] != 0                    # same sequence, not padding
               & k <= q                                    # causal by row index
               & (branch[k] == 0 | branch[k] == branch[q]) # shared prefix, or the same branch
               & pos[q] - pos[k] < window                  # sliding window (positions)

Branch 0 is the part of a segment every later token of that segment sees (the
shared prompt); tokens of branch b > 0 are seen only by tokens of branch b.
Stacked and packed rows are all branch 0. A prefix-shared row is
`[prompt[:-1] | prompt[-1], chosen | copy of prompt[-1], rejected]` with
branches `0 | 1 | 2`, which is exactly the old `attn_mask`.

Implementations (`ModelConfig.attention_impl`):
- `xla`: the dense reference; builds the `[N, 1, L, L]` mask from the rules.
- `blockwise`: pure JAX online softmax over key blocks with a custom VJP that
  recomputes probabilities in the backward pass (saves only output and
  log-sum-exp), skipping blocks the rules mask entirely. Memory O(L).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` with
  `is_causal` and sequence lengths, for rows that are one segment starting at
  row 0 (checked at run time; other rows take the blockwise path).
- `splash`: the Pallas TPU splash-attention kernel with segment ids and a
  causal (or local) mask; not for prefix-shared rows.
- `ring`: context parallelism (`dpo_jax.models.ring_attention`): the length is
  split over the mesh's `sequence` axis and key/value blocks travel a ring of
  devices; the model picks it (also for `auto`) when that axis is > 1, and it
  falls back to blockwise on a mesh without one. `ulysses`: the same split, with
  an all-to-all (heads <-> length) around blockwise attention instead of a ring.
- `auto`: GPU -> cudnn, TPU -> splash, CPU -> xla below `BLOCKWISE_MIN_LENGTH`
  tokens, blockwise from there; any backend that cannot serve a call falls
  back to blockwise with a logged reason.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
logger = logging.getLogger(__name__)

IMPLS = ("auto", "xla", "blockwise", "cudnn", "splash", "ring", "ulysses")
# On CPU, `auto` uses the dense path below this many tokens per row. At 2k tokens the
# blockwise train step measured 0.15-0.37x the dense one (benchmarks/README.md, "Long
# context"), and the dense path's float32 [N, H, L, L] probabilities dominate the step's
# scratch from about 1k on; below it a row is one or two blocks and the dense mask is small.
BLOCKWISE_MIN_LENGTH = 1024
DEFAULT_BLOCK = 512
SPLASH_BLOCK_MIN = 128  # splash tiles L in blocks of 128..512 tokens


class MaskRule(NamedTuple):
    """O(L) description of the attention mask of a batch (all `[N, L]` int32)."""

    index: Array  # row index 0..L-1 (causality)
    segment: Array  # 0 = padding
    branch: Array | None  # 0 = shared prefix; b > 0 seen only by branch b; None = all 0
    position: Array  # position ids (sliding window)


def make_rule(
    segment_ids_NxL: Array,
    positions_NxL: Array,
    branch_ids_NxL: Array | None = None,
    index_NxL: Array | None = None,
) -> MaskRule:
    """The rule of a batch; `branch_ids` None (stacked, packed) means all zeros.

    Whether branches are present is static, so backends that cannot express them
    (cuDNN, splash) are ruled out at trace time only for prefix-shared batches.
    `index_NxL` None means tokens are in row order (0..L-1); a permuted row (ring
    attention's zig-zag layout) passes each token's original row index.
    """
    n, length = segment_ids_NxL.shape
    if index_NxL is None:
        index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
    else:
        index = index_NxL.astype(jnp.int32)
    branch = None if branch_ids_NxL is None else branch_ids_NxL.astype(jnp.int32)
    return MaskRule(
        index, segment_ids_NxL.astype(jnp.int32), branch, positions_NxL.astype(jnp.int32)
    )


def mask_block(q: MaskRule, k: MaskRule, window: int | None = None) -> Array:
    """Bool `[N, Q, K]`: may query token q attend to key token k (see module doc)."""
    ex_q = lambda a: a[:, :, None]
    ex_k = lambda a: a[:, None, :]
    mask = (ex_q(q.segment) == ex_k(k.segment)) & (ex_q(q.segment) != 0)
    mask &= ex_k(k.index) <= ex_q(q.index)
    if k.branch is not None:
        mask &= (ex_k(k.branch) == 0) | (ex_k(k.branch) == ex_q(q.branch))
    if window is not None:
        mask &= (ex_q(q.position) - ex_k(k.position)) < window
    return mask


def dense_mask(rule: MaskRule, window: int | None = None) -> Array:
    """Bool `[N, 1, L, L]` for the dense paths (and tests)."""
    return mask_block(rule, rule, window)[:, None]


def _softcap(s: Array, cap: float | None) -> Array:
    return s if cap is None else cap * jnp.tanh(s / cap)


def _group(x_NxLxHxD: Array, num_kv: int) -> Array:
    """[N, L, H, D] -> [N, L, K, G, D]: query head h uses kv head h // G (HF repeat_kv)."""
    n, length, h, d = x_NxLxHxD.shape
    return x_NxLxHxD.reshape(n, length, num_kv, h // num_kv, d)


def dense_attention(
    q_NxTxHxD: Array,
    k_NxSxKxD: Array,
    v_NxSxKxD: Array,
    mask_Nx1xTxS: Array,
    *,
    softcap: float | None = None,
    scale: float | None = None,
) -> Array:
    """Dense attention with float32 scores and an explicit mask (soft-capped paths; tests).

    Rows that see nothing (padding) return zeros.
    """
    nkv, d = k_NxSxKxD.shape[2], q_NxTxHxD.shape[-1]
    scale = d**-0.5 if scale is None else scale
    q = _group(q_NxTxHxD, nkv)
    s = jnp.einsum("nqkgd,nskd->nkgqs", q, k_NxSxKxD, preferred_element_type=jnp.float32)
    s = _softcap(s * scale, softcap)
    mask = mask_Nx1xTxS[:, :, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    out = jnp.einsum(
        "nkgqs,nskd->nqkgd", p.astype(v_NxSxKxD.dtype), v_NxSxKxD,
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    return out.reshape(q_NxTxHxD.shape).astype(q_NxTxHxD.dtype)


def reference_attention(
    q_NxLxHxD: Array,
    k_NxLxKxD: Array,
    v_NxLxKxD: Array,
    rule: MaskRule,
    *,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> Array:
    """Dense attention from the rules: the reference every other path must equal."""
    mask = dense_mask(rule, window)
    return dense_attention(q_NxLxHxD, k_NxLxKxD, v_NxLxKxD, mask, softcap=softcap, scale=scale)


# ----------------------------------------------------------------------------- blockwise


class _Static(NamedTuple):
    window: int | None
    softcap: float | None
    scale: float
    block_q: int
    block_k: int
    # Queries and keys are the same rows (index = row): loops stop at the causal diagonal.
    # False for a query block against another device's keys (ring attention), where the
    # index arrays are global row numbers and only the mask skips blocks.
    same_rows: bool = True


def _slice(x: Array, start: Array, size: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _rule_slice(rule: MaskRule, start: Array, size: int) -> MaskRule:
    return jax.tree.map(lambda a: _slice(a, start, size), rule)


def _while(lo: int | Array, hi: int | Array, body: Any, init: Any) -> Any:
    """`fori_loop` that is always a while loop, also for static bounds. A forward kernel
    under a custom VJP must never be linearized (a scan would be, by JAX inside nn.scan
    over layers, stacking every block's probabilities as residuals); a while loop cannot."""
    step = lambda c: (c[0] + 1, body(c[0], c[1]))
    return jax.lax.while_loop(lambda c: c[0] < hi, step, (jnp.asarray(lo, jnp.int32), init))[1]


def _k_blocks_before(i: Array, st: _Static, nk: int) -> Array:
    """Key blocks that can hold keys at row <= the last query row of query block i."""
    return jnp.minimum((i * st.block_q + st.block_q - 1) // st.block_k + 1, nk)


def _scores(qb: Array, kb: Array, st: _Static) -> tuple[Array, Array]:
    """(raw scaled scores, soft-capped scores) [N, K, G, bq, bk] float32."""
    s = jnp.einsum("nqkgd,nskd->nkgqs", qb, kb, preferred_element_type=jnp.float32) * st.scale
    return s, _softcap(s, st.softcap)


def _forward(
    q: Array, k: Array, v: Array, rule: MaskRule, k_rule: MaskRule, st: _Static
) -> tuple[Array, Array]:
    """Online softmax of queries (`rule`) over keys (`k_rule`). q [N, L, K, G, D], k/v
    [N, S, K, D]; returns out (q's shape, float32) and lse [N, K, G, L] (-inf: sees nothing)."""
    n, length, nkv, g, d = q.shape
    nq, nk = length // st.block_q, k.shape[1] // st.block_k

    def q_block(i: Array) -> tuple[Array, Array]:
        q0 = i * st.block_q
        qb, q_rule = _slice(q, q0, st.block_q), _rule_slice(rule, q0, st.block_q)

        def k_step(j: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
            k0 = j * st.block_k
            kb_rule = _rule_slice(k_rule, k0, st.block_k)
            mask = mask_block(q_rule, kb_rule, st.window)

            def update(c: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
                m, denom, acc = c
                kb, vb = _slice(k, k0, st.block_k), _slice(v, k0, st.block_k)
                _, t = _scores(qb, kb, st)
                mk = mask[:, None, None]
                t = jnp.where(mk, t, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(t, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.where(mk, jnp.exp(t - m_safe[..., None]), 0.0)
                corr = jnp.exp(m - m_safe)  # 0 while m is -inf
                denom = denom * corr + jnp.sum(p, axis=-1)
                pv = jnp.einsum(
                    "nkgqs,nskd->nkgqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
                )
                return m_new, denom, acc * corr[..., None] + pv

            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry)

        init = (
            jnp.full((n, nkv, g, st.block_q), -jnp.inf, jnp.float32),
            jnp.zeros((n, nkv, g, st.block_q), jnp.float32),
            jnp.zeros((n, nkv, g, st.block_q, d), jnp.float32),
        )
        stop = _k_blocks_before(i, st, nk) if st.same_rows else nk
        m, denom, acc = _while(0, stop, k_step, init)
        out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
        lse = jnp.where(denom > 0, m + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
        return jnp.moveaxis(out, 3, 1), lse  # out [N, bq, K, G, D]

    outs, lses = jax.lax.map(q_block, jnp.arange(nq))  # [nq, N, bq, K, G, D], [nq, N, K, G, bq]
    out = jnp.moveaxis(outs, 0, 1).reshape(q.shape)
    lse = jnp.moveaxis(lses, 0, 3).reshape(n, nkv, g, length)
    return out, lse


def _backward(
    q: Array,
    k: Array,
    v: Array,
    rule: MaskRule,
    k_rule: MaskRule,
    out: Array,
    lse: Array,
    dout: Array,
    st: _Static,
) -> tuple[Array, Array, Array]:
    """Recomputes each needed block's probabilities; returns dq, dk, dv (float32).

    `out` and `lse` are the attention's final output and log-sum-exp over ALL keys, so
    keys split into parts (ring attention) each give their share of the gradients."""
    n, length, nkv, g, d = q.shape
    nq, nk = length // st.block_q, k.shape[1] // st.block_k
    # D_i = sum_d dO * O (the softmax Jacobian's row term), float32 [N, K, G, L].
    delta = jnp.einsum("nlkgd,nlkgd->nkgl", dout.astype(jnp.float32), out.astype(jnp.float32))
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def k_block(dq: Array, j: Array) -> tuple[Array, tuple[Array, Array]]:
        k0 = j * st.block_k
        kb, vb, kb_rule = (
            _slice(k, k0, st.block_k),
            _slice(v, k0, st.block_k),
            _rule_slice(k_rule, k0, st.block_k),
        )

        def q_step(i: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
            q0 = i * st.block_q
            q_rule = _rule_slice(rule, q0, st.block_q)
            mask = mask_block(q_rule, kb_rule, st.window)

            def update(c: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
                dq, dk, dv = c
                qb, dob = _slice(q, q0, st.block_q), _slice(dout, q0, st.block_q)
                lse_b = jax.lax.dynamic_slice_in_dim(lse_safe, q0, st.block_q, axis=3)
                delta_b = jax.lax.dynamic_slice_in_dim(delta, q0, st.block_q, axis=3)
                s, t = _scores(qb, kb, st)
                mk = mask[:, None, None]
                p = jnp.where(mk, jnp.exp(t - lse_b[..., None]), 0.0)
                dv = dv + jnp.einsum(
                    "nkgqs,nqkgd->nskd", p.astype(dout.dtype), dob,
                    preferred_element_type=jnp.float32,
                )  # fmt: skip
                dp = jnp.einsum("nqkgd,nskd->nkgqs", dob, vb, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_b[..., None])
                if st.softcap is not None:
                    ds = ds * (1.0 - jnp.square(jnp.tanh(s / st.softcap)))
                ds = ds * st.scale
                dq_b = jnp.einsum(
                    "nkgqs,nskd->nqkgd", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32
                )
                dq = jax.lax.dynamic_update_slice_in_dim(
                    dq, _slice(dq, q0, st.block_q) + dq_b, q0, axis=1
                )
                dk = dk + jnp.einsum(
                    "nkgqs,nqkgd->nskd", ds.astype(qb.dtype), qb, preferred_element_type=jnp.float32
                )
                return dq, dk, dv

            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry)

        zeros = jnp.zeros((n, st.block_k, nkv, d), jnp.float32)
        # Earlier query blocks of the same rows cannot see this block.
        first_q = (j * st.block_k) // st.block_q if st.same_rows else 0
        dq, dk, dv = jax.lax.fori_loop(first_q, nq, q_step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dks, dvs) = jax.lax.scan(k_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(n, k.shape[1], nkv, d)
    return dq, unblock(dks), unblock(dvs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise(q: Array, k: Array, v: Array, rule: MaskRule, st: _Static) -> Array:
    return _forward(q, k, v, rule, rule, st)[0].astype(q.dtype)


def _blockwise_fwd(q: Array, k: Array, v: Array, rule: MaskRule, st: _Static) -> Any:
    out, lse = _forward(q, k, v, rule, rule, st)
    out = out.astype(q.dtype)
    return out, (q, k, v, rule, out, lse)


def _blockwise_bwd(st: _Static, res: Any, dout: Array) -> Any:
    q, k, v, rule, out, lse = res
    dq, dk, dv = _backward(q, k, v, rule, rule, out, lse, dout, st)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None  # int rule


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(
    q_NxLxHxD: Array,
    k_NxLxKxD: Array,
    v_NxLxKxD: Array,
    rule: MaskRule,
    *,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    block: int = DEFAULT_BLOCK,
    any_order: bool = False,
) -> Array:
    """Blockwise (flash-style) attention; equals `reference_attention` in value and gradient.

    Pads L up to a multiple of the block (padding is segment 0), so any length works.
    Rows that see nothing (padding) return zeros. `any_order`: tokens are not in row
    order (the zig-zag layout; `rule.index` holds their rows), so no causal loop bounds.
    """
    n, length, h, d = q_NxLxHxD.shape
    nkv = k_NxLxKxD.shape[2]
    blk = min(block, max(16, 1 << (length - 1).bit_length()))
    padded = -(-length // blk) * blk
    scale = d**-0.5 if scale is None else float(scale)
    st = _Static(window, softcap, scale, blk, blk, same_rows=not any_order)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - length)) + ((0, 0),) * (x.ndim - 2))
    q, k, v = (pad(x) for x in (_group(q_NxLxHxD, nkv), k_NxLxKxD, v_NxLxKxD))
    if any_order:
        rule = jax.tree.map(pad, rule)  # padding is segment 0: its index is never read
    elif padded != length:
        index = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), (n, padded))
        rule = jax.tree.map(pad, rule)._replace(index=index)
    out = _blockwise(q, k, v, rule, st)
    return out[:, :length].reshape(n, length, h, d)


# ----------------------------------------------------------------------------- backends


@functools.cache
def _log_choice(requested: str, chosen: str, reason: str) -> None:
    """Logs each (requested, chosen, reason) once per process (at trace time)."""
    logger.warning("attention_impl=%s: using %s (%s)", requested, chosen, reason)


def _single_segment_rows(rule: MaskRule, window: int | None = None) -> Array:
    """True when every row is one segment (id 1) from row 0, then padding (cuDNN's layout);
    with a window, also positions equal to row indices (cuDNN windows by index)."""
    seg = rule.segment
    ok = jnp.all(seg[:, 1:] <= seg[:, :-1]) & jnp.all((seg <= 1) & (seg >= 0))
    if window is not None:
        ok &= jnp.all((seg == 0) | (rule.position == rule.index))
    return ok


def _cudnn(q: Array, k: Array, v: Array, rule: MaskRule, window: int | None) -> Array:
    lengths = jnp.sum(rule.segment != 0, axis=1).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v,
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        # Positions of a single-segment row are its row indices, so the window is by index.
        local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn",
    )  # fmt: skip


def _splash(
    q: Array,
    k: Array,
    v: Array,
    rule: MaskRule,
    window: int | None,
    softcap: float | None,
    interpret: bool,
) -> Array:
    """Pallas splash attention (TPU; `interpret=True` runs it anywhere, slowly)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    n, length, h, d = q.shape
    nkv = k.shape[2]
    if window is None:
        one = sa.CausalMask((length, length))
    else:
        # Segments of stacked/packed rows have consecutive positions, so index distance
        # equals position distance within a segment.
        one = sa.LocalMask((length, length), (window - 1, 0), offset=0)
    blk = next(b for b in (512, 256, SPLASH_BLOCK_MIN) if length % b == 0)
    sizes = sa.BlockSizes(
        block_q=blk, block_kv=blk, block_kv_compute=blk,
        block_q_dkv=blk, block_kv_dkv=blk, block_kv_dkv_compute=blk,
        block_q_dq=blk, block_kv_dq=blk,
    )  # fmt: skip
    mha = sa.make_splash_mha_single_device(
        sa.MultiHeadMask([one] * h),
        block_sizes=sizes,
        attn_logits_soft_cap=softcap,
        interpret=interpret,
    )
    g = h // nkv
    # The kernel takes one example [H, L, D] with q pre-scaled; GQA by repeating kv heads.
    qs = jnp.swapaxes(q * jnp.asarray(d**-0.5, q.dtype), 1, 2)
    ks = jnp.swapaxes(jnp.repeat(k, g, axis=2), 1, 2)
    vs = jnp.swapaxes(jnp.repeat(v, g, axis=2), 1, 2)
    # Padding (segment 0) of one row matches padding keys; its outputs are unscored.
    seg = sa.SegmentIds(q=rule.segment, kv=rule.segment)
    out = jax.vmap(mha)(qs, ks, vs, segment_ids=seg)
    return jnp.swapaxes(out, 1, 2)


def choose(
    impl: str,
    *,
    length: int,
    backend: str,
    has_branches: bool,
    softcap: float | None,
    dtype: Any,
) -> str:
    """The implementation a call uses (static, at trace time); logs any fallback."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if backend == "gpu":
            impl = "cudnn"
        elif backend == "tpu":
            impl = "splash"
        else:
            return "xla" if length < BLOCKWISE_MIN_LENGTH else "blockwise"
        requested = "auto"
    else:
        requested = impl
    reason = None
    if impl in ("ring", "ulysses"):
        reason = f"{impl} attention needs a mesh whose sequence axis is > 1"
    elif impl == "cudnn":
        if backend != "gpu":
            reason = f"cuDNN needs a GPU, backend is {backend}"
        elif jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            reason = f"cuDNN flash attention needs bfloat16/float16, dtype is {jnp.dtype(dtype)}"
        elif has_branches:
            reason = "prefix-shared rows (branch_ids) are not expressible as cuDNN sequence lengths"
        elif softcap is not None:
            reason = "jax.nn.dot_product_attention has no logit soft-capping"
    elif impl == "splash":
        if backend != "tpu":
            reason = f"splash attention needs a TPU, backend is {backend}"
        elif has_branches:
            reason = "prefix-shared rows (branch_ids) are not expressible as splash segment ids"
        elif length % SPLASH_BLOCK_MIN:
            reason = f"splash needs a length that is a multiple of {SPLASH_BLOCK_MIN}, got {length}"
    if reason is not None:
        _log_choice(requested, "blockwise", reason)
        return "blockwise"
    return impl


def attend(
    q_NxLxHxD: Array,
    k_NxLxKxD: Array,
    v_NxLxKxD: Array,
    rule: MaskRule,
    *,
    impl: str,
    window: int | None = None,
    softcap: float | None = None,
    block: int = DEFAULT_BLOCK,
    splash_interpret: bool = False,
) -> Array:
    """Self-attention of a full sequence by the chosen implementation (see module doc).

    Rules without branch ids (stacked, packed) can be served by cuDNN and splash.
    """
    backend = "tpu" if splash_interpret and impl == "splash" else jax.default_backend()
    chosen = choose(
        impl, length=q_NxLxHxD.shape[1], backend=backend, has_branches=rule.branch is not None,
        softcap=softcap, dtype=q_NxLxHxD.dtype,
    )  # fmt: skip
    blockwise = functools.partial(
        blockwise_attention, rule=rule, window=window, softcap=softcap, block=block
    )
    if chosen == "blockwise":
        return blockwise(q_NxLxHxD, k_NxLxKxD, v_NxLxKxD)
    if chosen == "xla":
        if softcap is not None:
            return reference_attention(
                q_NxLxHxD, k_NxLxKxD, v_NxLxKxD, rule, window=window, softcap=softcap
            )
        return jax.nn.dot_product_attention(
            q_NxLxHxD, k_NxLxKxD, v_NxLxKxD, mask=dense_mask(rule, window), implementation="xla"
        )
    if chosen == "splash":
        return _splash(q_NxLxHxD, k_NxLxKxD, v_NxLxKxD, rule, window, softcap, splash_interpret)
    # cuDNN: exact only for one segment per row from row 0; other batches go blockwise.
    return jax.lax.cond(
        _single_segment_rows(rule, window),
        lambda q, k, v: _cudnn(q, k, v, rule, window),
        lambda q, k, v: blockwise(q, k, v),
        q_NxLxHxD, k_NxLxKxD, v_NxLxKxD,
    )  # fmt: skip


__all__ = [
    "BLOCKWISE_MIN_LENGTH",
    "IMPLS",
    "MaskRule",
    "attend",
    "blockwise_attention",
    "choose",
    "dense_attention",
    "dense_mask",
    "make_rule",
    "mask_block",
    "reference_attention",
]
