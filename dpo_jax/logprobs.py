"""Per-token and per-sequence log-probs over the stacked / packed batches of CONTRACTS.md.

A batch row holds tokens; `sequence_index[n, t] = k >= 0` says token t of row n is a
completion token of sequence k, scored by the logits at position t - 1 of the same row.
Sequences are summed with a segment sum, so the stacked, packed and prefix-shared
layouts all go through the same code.

Two paths give the same numbers:

* `sequence_logps(logits_NxLxV, ...)`: from full logits (one `[N, L, V]` array, any dtype;
  log-softmax is never materialised, only gather - logsumexp in float32);
* `sequence_logps_chunked(hidden_NxLxD, unembed_fn, ...)`: unembeds `chunk_size`
  positions at a time inside a `lax.scan` under `jax.checkpoint`, so neither the forward
  nor the backward pass holds more than `[N, chunk_size, V]` float32 logits. Use it for
  128k-256k vocabularies, where the logits dominate memory.

`sequence_logps_scored(hidden_NxLxD, unembed_fn, ...)` is the fast path of both: with a
host-built `batch["scored_positions"]` (`scored_positions`) it gathers the `K` positions
per row that predict a scored token and unembeds only those (optionally chunked over
`K`). DPO scores only completion tokens, so at prompt-heavy shapes most of the `D x V`
unembedding (and its backward) is skipped; the numbers are those of the other paths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import losses
from dpo_jax.models import vocab as vocab_lib

Array = jax.Array


@flax.struct.dataclass
class SequenceLogps:
    """Per-sequence sums over completion tokens; `S` = number of sequences (2B paired,
    N rows for single sequences). Fields a scoring pass was not asked for
    (`scoring.score(needs=...)`) are None."""

    logps_S: Array | None = None  # sum of log p over the completion
    lengths_S: Array | None = None  # completion token count (float32)
    # LD-DPO: sum over the first min(len_k, len_partner) tokens; the partner of k < B is
    # k + B and vice versa (chosen/rejected in paired layouts). None when S is odd.
    prefix_logps_S: Array | None = None
    # WPO: exp(mean_t[log p_t - log sum_v p_v^2]), no gradient; None unless requested.
    wpo_weights_S: Array | None = None
    # Unlikelihood: sum of log(1 - p_t) over the completion; None unless requested.
    log1m_sums_S: Array | None = None
    # TRL's token metrics (no gradient; None unless requested): sums over the completion
    # of the next-token entropy, of the mean logit over the vocabulary, and the count of
    # tokens that are the top-1 prediction.
    entropy_sums_S: Array | None = None
    mean_logit_sums_S: Array | None = None
    top1_counts_S: Array | None = None
    # Final hidden state (after the last norm) at the last token of each sequence, for a
    # scalar head (reward model, value head); `[S, D]`, model dtype. None unless requested.
    last_hidden_SxD: Array | None = None
    # All final hidden states `[N, L, D]` (per-token heads); None unless requested.
    hidden_NxLxD: Array | None = None
    # Per-token log-probs `[N, L]` float32 aligned with the tokens (entry t: log p of
    # token t), 0 where `sequence_index` < 0; differentiable. None unless requested.
    token_logps_NxL: Array | None = None


# --------------------------------------------------------------------------------------
# Per-token log-probs
# --------------------------------------------------------------------------------------


def _next_token_ids(input_ids_NxL: Array) -> Array:
    # Position t predicts token t + 1; the last position predicts nothing (dummy id 0).
    return jnp.concatenate([input_ids_NxL[:, 1:], jnp.zeros_like(input_ids_NxL[:, :1])], axis=1)


def _shift_right(next_NxL: Array) -> Array:
    # Entry t of the result belongs to token t (predicted at t - 1); entry 0 has no context.
    return jnp.concatenate([jnp.zeros_like(next_NxL[:, :1]), next_NxL[:, :-1]], axis=1)


TOKEN_METRIC_TERMS = ("entropy", "mean_logit", "top1")


def _next_token_terms(
    logits_NxLxV: Array, next_ids_NxL: Array, with_wpo: bool, with_metrics: bool = False
) -> tuple[Array, dict[str, Array]]:
    """log p(next token) at every position, and extra per-position terms: "log_sum_p2"
    (log sum_v p_v^2, for WPO) and, with `with_metrics`, `TOKEN_METRIC_TERMS` (TRL's
    entropy, mean logit and top-1 indicator), all without gradient."""
    # The float32 cast feeds straight into reductions and a gather: no log-softmax is ever
    # formed, float32 logits are read in place, and bf16 logits cost at most one float32
    # copy (the XLA CPU backend makes one; fused backends need none).
    logits32 = logits_NxLxV.astype(jnp.float32)
    lse_NxL = jax.nn.logsumexp(logits32, axis=-1)
    target_NxL = jnp.take_along_axis(logits32, next_ids_NxL[..., None], axis=-1)[..., 0]
    extras: dict[str, Array] = {}
    if with_wpo:
        # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z); WPO weights carry no gradient.
        extras["log_sum_p2"] = jax.lax.stop_gradient(
            jax.nn.logsumexp(2.0 * logits32, axis=-1) - 2.0 * lse_NxL
        )
    if with_metrics:
        z = jax.lax.stop_gradient(logits32)
        lse = jax.lax.stop_gradient(lse_NxL)
        # H = -sum_v p_v log p_v = lse - sum_v p_v z_v
        extras["entropy"] = lse - jnp.sum(jnp.exp(z - lse[..., None]) * z, axis=-1)
        # over the real vocabulary: padding columns (masked by the model) do not count
        real = ~vocab_lib.is_padded_logit(z)
        extras["mean_logit"] = jnp.sum(jnp.where(real, z, 0.0), axis=-1) / jnp.sum(real, axis=-1)
        extras["top1"] = (jnp.argmax(z, axis=-1) == next_ids_NxL).astype(jnp.float32)
    return target_NxL - lse_NxL, extras


def token_logps(logits_NxLxV: Array, input_ids_NxL: Array) -> Array:
    """`[N, L]` float32: entry t is log p(input_ids[t] | logits[t-1]); entry 0 is 0."""
    _check_logits(logits_NxLxV, input_ids_NxL)
    next_NxL, _ = _next_token_terms(logits_NxLxV, _next_token_ids(input_ids_NxL), False)
    return _shift_right(next_NxL)


# --------------------------------------------------------------------------------------
# Per-sequence sums
# --------------------------------------------------------------------------------------


def _rank_within_sequence(seg_flat: Array, num_segments: int) -> Array:
    """For each flat token, how many tokens of its segment precede it (row-major order)."""
    order = jnp.argsort(seg_flat, stable=True)  # groups segments, keeps token order inside
    counts = jax.ops.segment_sum(jnp.ones_like(seg_flat), seg_flat, num_segments)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(seg_flat.shape[0]) - starts[seg_flat[order]]
    return jnp.zeros_like(seg_flat).at[order].set(rank_sorted)


def reduce_token_logps(
    token_logps_NxL: Array,
    sequence_index_NxL: Array,
    num_sequences: int,
    log_sum_p2_NxL: Array | None = None,
    with_log1m: bool = False,
    token_terms_NxL: Mapping[str, Array] | None = None,
) -> SequenceLogps:
    """Sums per-token log-probs into sequences via `sequence_index` (-1 = not scored).

    `with_log1m` adds per-sequence sums of log(1 - p_t) (unlikelihood training);
    `token_terms_NxL` (the `TOKEN_METRIC_TERMS` of `_next_token_terms`, aligned with the
    tokens) adds their per-sequence sums (TRL's entropy / logits / accuracy metrics).
    """
    S = int(num_sequences)
    if S <= 0:
        raise ValueError(f"num_sequences must be positive, got {S}")
    scored = sequence_index_NxL >= 0
    # Unscored tokens go to an extra segment S that is dropped.
    seg = jnp.where(scored, sequence_index_NxL, S).reshape(-1).astype(jnp.int32)
    tok = jnp.where(scored, token_logps_NxL, 0.0).reshape(-1).astype(jnp.float32)

    def seg_sum(values: Array) -> Array:
        return jax.ops.segment_sum(values, seg, S + 1)[:S]

    lengths_S = seg_sum(scored.reshape(-1).astype(jnp.float32))
    logps_S = seg_sum(tok)

    prefix_logps_S = None
    if S % 2 == 0:  # paired: sequence k's partner is k +- B
        B = S // 2
        shared_B = jnp.minimum(lengths_S[:B], lengths_S[B:])
        shared_S1 = jnp.concatenate([shared_B, shared_B, jnp.zeros((1,), jnp.float32)])
        in_prefix = _rank_within_sequence(seg, S + 1) < shared_S1[seg]
        prefix_logps_S = seg_sum(jnp.where(in_prefix, tok, 0.0))

    wpo_weights_S = None
    if log_sum_p2_NxL is not None:
        aligned = jnp.where(scored, token_logps_NxL - log_sum_p2_NxL, 0.0).reshape(-1)
        mean_S = seg_sum(jax.lax.stop_gradient(aligned)) / jnp.maximum(lengths_S, 1.0)
        wpo_weights_S = jnp.exp(mean_S)
    log1m_sums_S = None
    if with_log1m:
        # Elementwise in log p_t, so both log-prob paths share it; unscored entries are
        # finite (log1mexp clamps log p <= 0), so the masking where() keeps gradients finite.
        log1m_sums_S = seg_sum(jnp.where(scored.reshape(-1), losses.log1mexp(tok), 0.0))
    metric_sums = [None] * len(TOKEN_METRIC_TERMS)
    if token_terms_NxL:
        metric_sums = [
            seg_sum(jnp.where(scored, token_terms_NxL[k], 0.0).reshape(-1).astype(jnp.float32))
            for k in TOKEN_METRIC_TERMS
        ]
    return SequenceLogps(
        logps_S, lengths_S, prefix_logps_S, wpo_weights_S, log1m_sums_S, *metric_sums
    )


def sequence_logps(
    logits_NxLxV: Array,
    batch: Mapping[str, Array],
    num_sequences: int,
    *,
    with_wpo: bool = False,
    with_log1m: bool = False,
    with_metrics: bool = False,
    with_token_logps: bool = False,
) -> SequenceLogps:
    """Per-sequence log-prob sums, lengths and extras (WPO weights, log(1-p) sums, TRL's
    token metrics, per-token log-probs) from logits."""
    input_ids, sequence_index = _batch_arrays(batch, num_sequences)
    _check_logits(logits_NxLxV, input_ids)
    next_NxL, extras = _next_token_terms(
        logits_NxLxV, _next_token_ids(input_ids), with_wpo, with_metrics
    )
    out = _reduce_shifted(next_NxL, extras, sequence_index, num_sequences, with_log1m)
    return _with_token_logps(out, next_NxL, sequence_index) if with_token_logps else out


def _with_token_logps(out: SequenceLogps, next_NxL: Array, sequence_index: Array) -> SequenceLogps:
    """`out` plus `token_logps_NxL` from per-position terms (still at the predicting
    position)."""
    token_NxL = jnp.where(sequence_index >= 0, _shift_right(next_NxL), 0.0)
    return out.replace(token_logps_NxL=token_NxL.astype(jnp.float32))


def _reduce_shifted(
    next_NxL: Array,
    extras: Mapping[str, Array],
    sequence_index: Array,
    num_sequences: int,
    with_log1m: bool,
) -> SequenceLogps:
    """`reduce_token_logps` of per-position terms that still sit at the predicting position."""
    shifted = {k: _shift_right(v) for k, v in extras.items()}
    terms = {k: shifted[k] for k in TOKEN_METRIC_TERMS if k in shifted}
    return reduce_token_logps(
        _shift_right(next_NxL), sequence_index, num_sequences, shifted.get("log_sum_p2"),
        with_log1m, terms or None,
    )  # fmt: skip


def _unembedded_terms(
    hidden_NxKxD: Array,
    next_ids_NxK: Array,
    unembed_fn: Callable[[Array], Array],
    chunk_size: int,
    with_wpo: bool,
    with_metrics: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """`_next_token_terms` of `unembed_fn(hidden)`, all at once or `chunk_size` positions
    at a time (each chunk under `jax.checkpoint`, so the backward pass recomputes its
    logits instead of storing them)."""
    N, K, D = hidden_NxKxD.shape
    if chunk_size <= 0:
        return _next_token_terms(unembed_fn(hidden_NxKxD), next_ids_NxK, with_wpo, with_metrics)
    C = min(int(chunk_size), K)
    num_chunks = -(-K // C)
    pad = num_chunks * C - K
    hidden_p = jnp.pad(hidden_NxKxD, ((0, 0), (0, pad), (0, 0)))
    ids_p = jnp.pad(next_ids_NxK, ((0, 0), (0, pad)))
    # [num_chunks, N, C, ...]: scan over position chunks, keeping the batch axis (and its
    # sharding) inside every chunk.
    hidden_chunks = hidden_p.reshape(N, num_chunks, C, D).transpose(1, 0, 2, 3)
    id_chunks = ids_p.reshape(N, num_chunks, C).transpose(1, 0, 2)

    @jax.checkpoint
    def one_chunk(h_NxCxD: Array, ids_NxC: Array) -> tuple[Array, dict[str, Array]]:
        return _next_token_terms(unembed_fn(h_NxCxD), ids_NxC, with_wpo, with_metrics)

    def step(carry: None, xs: tuple[Array, Array]) -> tuple[None, tuple[Array, Any]]:
        return carry, one_chunk(*xs)

    _, (logp_chunks, extra_chunks) = jax.lax.scan(step, None, (hidden_chunks, id_chunks))

    def unchunk(x: Array) -> Array:
        return x.transpose(1, 0, 2).reshape(N, num_chunks * C)[:, :K]

    return unchunk(logp_chunks), {k: unchunk(v) for k, v in extra_chunks.items()}


def _check_hidden(hidden_NxLxD: Array, input_ids_NxL: Array) -> None:
    if hidden_NxLxD.ndim != 3 or hidden_NxLxD.shape[:2] != input_ids_NxL.shape:
        raise ValueError(
            f"hidden_NxLxD has shape {hidden_NxLxD.shape}; expected [N, L, D] with "
            f"[N, L] = input_ids shape {input_ids_NxL.shape}"
        )


def sequence_logps_chunked(
    hidden_NxLxD: Array,
    unembed_fn: Callable[[Array], Array],
    batch: Mapping[str, Array],
    num_sequences: int,
    chunk_size: int,
    *,
    with_wpo: bool = False,
    with_log1m: bool = False,
    with_metrics: bool = False,
    with_token_logps: bool = False,
) -> SequenceLogps:
    """`sequence_logps` from hidden states, unembedding `chunk_size` positions at a time.

    `unembed_fn(hidden_NxCxD) -> logits_NxCxV` (e.g. `lambda h: model.apply(v, h,
    method="logits")`). Each chunk runs under `jax.checkpoint`, so the backward pass
    recomputes its logits instead of storing them.
    """
    input_ids, sequence_index = _batch_arrays(batch, num_sequences)
    _check_hidden(hidden_NxLxD, input_ids)
    if int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    logp_NxL, extras = _unembedded_terms(
        hidden_NxLxD, _next_token_ids(input_ids), unembed_fn, int(chunk_size), with_wpo,
        with_metrics,
    )  # fmt: skip
    out = _reduce_shifted(logp_NxL, extras, sequence_index, num_sequences, with_log1m)
    return _with_token_logps(out, logp_NxL, sequence_index) if with_token_logps else out


def scored_positions(
    sequence_index: np.ndarray, num_positions: int | None = None, min_positions: int = 8
) -> np.ndarray:
    """Host-side `[..., N, K]` int32 positions `t` whose next token `t + 1` is scored.

    Rows list their positions in increasing order and pad with -1. `K` is the largest
    per-row count rounded up to a quarter-octave step (a multiple of `min_positions`, at
    most `L`), so varying batches compile a handful of shapes; `num_positions` fixes `K` instead
    (hosts of one multi-host step must agree on it). Leading axes (micro-batches) pass
    through.
    """
    si = np.asarray(sequence_index)
    L = si.shape[-1]
    scored_next = np.zeros(si.shape, bool)
    scored_next[..., :-1] = si[..., 1:] >= 0
    counts = scored_next.sum(-1)
    if num_positions is None:
        most = max(int(counts.max(initial=0)), int(min_positions), 1)
        # Quarter-octave buckets: at most 25% wasted positions, four shapes per octave.
        step = max(int(min_positions), (1 << (most.bit_length() - 1)) // 4, 1)
        num_positions = min(-(-most // step) * step, L)
    k = int(num_positions)
    if counts.size and int(counts.max()) > k:
        raise ValueError(f"scored_positions: a row scores {int(counts.max())} tokens > K = {k}")
    # A stable sort on "not scored" brings the scored positions first, in order.
    order = np.argsort(~scored_next, axis=-1, kind="stable")[..., :k].astype(np.int32)
    if k > L:
        order = np.concatenate([order, np.zeros(order.shape[:-1] + (k - L,), np.int32)], axis=-1)
    keep = np.arange(k) < counts[..., None]
    return np.where(keep, order, -1).astype(np.int32)


def sequence_logps_scored(
    hidden_NxLxD: Array,
    unembed_fn: Callable[[Array], Array],
    batch: Mapping[str, Array],
    num_sequences: int,
    *,
    chunk_size: int = 0,
    with_wpo: bool = False,
    with_log1m: bool = False,
    with_metrics: bool = False,
    with_token_logps: bool = False,
) -> SequenceLogps:
    """`sequence_logps` unembedding only the positions in `batch["scored_positions"]`.

    `batch["scored_positions"]` is `[N, K]` from `scored_positions` (every scored token's
    predicting position, -1 pads). The hidden states at those positions are gathered and
    unembedded (`chunk_size > 0`: in chunks over `K`), so logits are `[N, K, V]` instead
    of `[N, L, V]`; the per-sequence sums are those of `sequence_logps`.
    """
    input_ids, sequence_index = _batch_arrays(batch, num_sequences)
    _check_hidden(hidden_NxLxD, input_ids)
    pos_NxK = jnp.asarray(batch["scored_positions"])
    if pos_NxK.ndim != 2 or pos_NxK.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"batch['scored_positions'] has shape {pos_NxK.shape}; expected [N, K] with "
            f"N = {input_ids.shape[0]}"
        )
    valid_NxK = pos_NxK >= 0
    t_NxK = jnp.where(valid_NxK, pos_NxK, 0)
    h_NxKxD = jnp.take_along_axis(hidden_NxLxD, t_NxK[..., None], axis=1)
    next_ids_NxK = jnp.take_along_axis(input_ids, t_NxK + 1, axis=1)
    seq_NxK = jnp.where(valid_NxK, jnp.take_along_axis(sequence_index, t_NxK + 1, axis=1), -1)
    logp_NxK, extras = _unembedded_terms(
        h_NxKxD, next_ids_NxK, unembed_fn, int(chunk_size), with_wpo, with_metrics
    )
    terms = {k: extras[k] for k in TOKEN_METRIC_TERMS if k in extras}
    out = reduce_token_logps(
        logp_NxK, seq_NxK, num_sequences, extras.get("log_sum_p2"), with_log1m, terms or None
    )
    if with_token_logps:  # back to token positions: position t predicts token t + 1
        rows_NxK = jnp.broadcast_to(jnp.arange(pos_NxK.shape[0])[:, None], pos_NxK.shape)
        scored_NxK = jnp.where(seq_NxK >= 0, logp_NxK, 0.0).astype(jnp.float32)
        token_NxL = jnp.zeros(input_ids.shape, jnp.float32).at[rows_NxK, t_NxK + 1].add(scored_NxK)
        out = out.replace(token_logps_NxL=token_NxL)
    return out


# --------------------------------------------------------------------------------------
# From sequences to loss inputs
# --------------------------------------------------------------------------------------


def _split(x_S: Array) -> tuple[Array, Array]:
    B = x_S.shape[0] // 2
    return x_S[:B], x_S[B:]


def _ref_logps_S(ref: Array | SequenceLogps, policy: SequenceLogps) -> Array:
    """The reference's `[2B]` log-probs (from its `SequenceLogps` or a precomputed column)."""
    ref_S = ref.logps_S if isinstance(ref, SequenceLogps) else jnp.asarray(ref, jnp.float32)
    if ref_S.shape != policy.logps_S.shape:
        raise ValueError(
            f"reference log-probs have shape {ref_S.shape}; expected {policy.logps_S.shape} "
            "(one per sequence, in sequence_index order)"
        )
    return ref_S


def preference_stats(
    policy: SequenceLogps, ref: Array | SequenceLogps | None = None
) -> losses.PreferenceStats:
    """Paired `PreferenceStats`: sequences `k < B` are chosen, `B <= k < 2B` rejected.

    `ref` is the reference's `SequenceLogps` (its prefix sums then enable LD-DPO on the
    reference too), a precomputed `[2B]` column (`batch["ref_logps"]`), or None for
    reference-free losses.
    """
    chosen, rejected = _split(policy.logps_S)
    c_len, r_len = _split(policy.lengths_S)
    c_pre, r_pre = _split(policy.prefix_logps_S)
    c_w = r_w = c_1m = r_1m = None
    if policy.wpo_weights_S is not None:
        c_w, r_w = _split(policy.wpo_weights_S)
    if policy.log1m_sums_S is not None:
        c_1m, r_1m = _split(policy.log1m_sums_S)
    ref_c = ref_r = ref_c_pre = ref_r_pre = None
    if ref is not None:
        ref_c, ref_r = _split(_ref_logps_S(ref, policy))
    if isinstance(ref, SequenceLogps):
        ref_c_pre, ref_r_pre = _split(ref.prefix_logps_S)
    return losses.PreferenceStats(
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=ref_c,
        ref_rejected_logps=ref_r,
        chosen_lengths=c_len,
        rejected_lengths=r_len,
        chosen_weights=c_w,
        rejected_weights=r_w,
        chosen_prefix_logps=c_pre,
        rejected_prefix_logps=r_pre,
        ref_chosen_prefix_logps=ref_c_pre,
        ref_rejected_prefix_logps=ref_r_pre,
        chosen_log1m_sum=c_1m,
        rejected_log1m_sum=r_1m,
    )


def token_metrics(policy: SequenceLogps) -> dict[str, Array]:
    """TRL 1.16's DPO token metrics from the policy's per-sequence sums (paired layout):
    `entropy` (mean over every completion token), `logits/chosen` / `logits/rejected`
    (mean over the chosen / rejected completion tokens of the vocabulary-mean logit) and
    `mean_token_accuracy` (share of chosen completion tokens predicted top-1)."""
    if policy.entropy_sums_S is None:
        raise ValueError("token_metrics needs sequence log-probs computed with_metrics=True")
    c_len, r_len = _split(policy.lengths_S)
    c_logit, r_logit = _split(policy.mean_logit_sums_S)
    c_top1, _ = _split(policy.top1_counts_S)

    def ratio(num: Array, den: Array) -> Array:
        return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)

    return {
        "entropy": ratio(jnp.sum(policy.entropy_sums_S), jnp.sum(policy.lengths_S)),
        "logits/chosen": ratio(jnp.sum(c_logit), jnp.sum(c_len)),
        "logits/rejected": ratio(jnp.sum(r_logit), jnp.sum(r_len)),
        "mean_token_accuracy": ratio(jnp.sum(c_top1), jnp.sum(c_len)),
    }


def unpaired_stats(
    policy: SequenceLogps, ref: Array | SequenceLogps | None, labels_B: Array
) -> losses.UnpairedStats:
    """KTO `UnpairedStats`: sequences `k < B` are the examples, `B <= k < 2B` their KL pairs."""
    logps, kl_logps = _split(policy.logps_S)
    lengths, _ = _split(policy.lengths_S)
    ref_logps = ref_kl = None
    if ref is not None:
        ref_logps, ref_kl = _split(_ref_logps_S(ref, policy))
    labels_B = jnp.asarray(labels_B)
    if labels_B.shape != logps.shape:
        raise ValueError(
            f"labels have shape {labels_B.shape}; expected {logps.shape} (one per example)"
        )
    return losses.UnpairedStats(
        logps=logps,
        ref_logps=ref_logps,
        kl_logps=kl_logps,
        ref_kl_logps=ref_kl,
        labels=labels_B,
        lengths=lengths,
    )


# --------------------------------------------------------------------------------------
# Input checks (shapes are static under jit; values are checked when concrete)
# --------------------------------------------------------------------------------------


def _check_logits(logits_NxLxV: Array, input_ids_NxL: Array) -> None:
    if logits_NxLxV.ndim != 3 or logits_NxLxV.shape[:2] != input_ids_NxL.shape:
        raise ValueError(
            f"logits have shape {logits_NxLxV.shape}; expected [N, L, V] with [N, L] = "
            f"input_ids shape {input_ids_NxL.shape}"
        )


def _batch_arrays(batch: Mapping[str, Array], num_sequences: int) -> tuple[Array, Array]:
    if int(num_sequences) <= 0:
        raise ValueError(f"num_sequences must be positive, got {num_sequences}")
    for key in ("input_ids", "sequence_index"):
        if key not in batch:
            raise KeyError(f"batch has no {key!r} (keys: {sorted(batch)}); see docs/CONTRACTS.md")
    input_ids, sequence_index = batch["input_ids"], batch["sequence_index"]
    if input_ids.shape != sequence_index.shape or input_ids.ndim != 2:
        raise ValueError(
            f"batch['input_ids'] {input_ids.shape} and batch['sequence_index'] "
            f"{sequence_index.shape} must both be [N, L]"
        )
    if isinstance(sequence_index, np.ndarray) and sequence_index.size:
        lo, hi = int(sequence_index.min()), int(sequence_index.max())
        if lo < -1 or hi >= num_sequences:
            raise ValueError(
                f"batch['sequence_index'] spans [{lo}, {hi}]; expected -1 or 0..{num_sequences - 1}"
            )
        if (sequence_index[:, 0] >= 0).any():
            raise ValueError(
                "batch['sequence_index'][:, 0] scores a token at row position 0, which has no "
                "preceding logits to predict it"
            )
    return jnp.asarray(input_ids), jnp.asarray(sequence_index)
