"""One scoring pass: a model forward, then per-sequence statistics (`SequenceLogps`).

    seq = scoring.score(apply_fn, params, batch, n_seq, needs={"logps", "wpo"})

`score` is the only "forward, then `logprobs`" in the project: the train step (policy
and frozen reference), every objective, `dpo-jax ref-logps` and the reference cache,
evaluation and the learned reward model call it. Callers say what they need instead of
threading flags:

| need | fills | used by |
|---|---|---|
| `"logps"` | `logps_S`, `lengths_S`, `prefix_logps_S` (even `S`) | every log-prob user |
| `"wpo"` | `wpo_weights_S` | WPO (`loss.hyper.use_weighting`) |
| `"log1m"` | `log1m_sums_S` | unlikelihood losses |
| `"token_metrics"` | `entropy_sums_S`, `mean_logit_sums_S`, `top1_counts_S` | TRL's token metrics |
| `"token_logps"` | `token_logps_NxL` (per-token log-probs at the tokens, 0 unscored) | per-token objectives (PPO) |
| `"last_hidden"` | `last_hidden_SxD` (final hidden state at each sequence's last token) | scalar heads (reward model) |
| `"hidden"` | `hidden_NxLxD` (every final hidden state) | per-token heads (a value head) |

The unembedding follows the batch: a batch with `scored_positions` (the Trainer adds
them) unembeds only the positions that predict a scored token; `chunk_size > 0`
unembeds in chunks (no `[N, L, V]` logits); otherwise the full logits are formed. The
three give the same numbers (`logprobs`). A pass that needs no log-probs (a reward
head) runs no unembedding at all.

Host callers (reference log-probs, evaluation, reward scoring) use `host_scorer`: one
jitted fixed-shape wrapper that reads only `MODEL_KEYS` from a host batch.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import logprobs, policy_gradient, ppo
from dpo_jax.logprobs import SequenceLogps

NEEDS = ("logps", "wpo", "log1m", "token_metrics", "token_logps", "last_hidden", "hidden")
_LOGP_NEEDS = frozenset(("logps", "wpo", "log1m", "token_metrics", "token_logps"))

# The keys of a host batch that a model forward and its scoring read (plus
# `scored_positions`, added per step); `step` stays on the host, and the objectives'
# columns are `OBJECTIVE_KEYS`.
MODEL_KEYS = ("input_ids", "positions", "segment_ids", "branch_ids", "sequence_index")
OBJECTIVE_KEYS = tuple(
    dict.fromkeys(
        ("ref_logps", "labels", "margin", *ppo.BATCH_COLUMNS, *policy_gradient.BATCH_COLUMNS)
    )
)


def check_needs(needs: Collection[str]) -> frozenset[str]:
    """`needs` as a frozenset, refusing names `score` cannot provide."""
    out = frozenset(needs)
    unknown = sorted(out - set(NEEDS))
    if unknown:
        raise ValueError(f"score(): unknown needs {unknown}; known: {list(NEEDS)}")
    return out


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword inputs of the model's forward (positions, segments, branches)."""
    inputs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    if "branch_ids" in batch:
        inputs["branch_ids"] = batch["branch_ids"]
    return inputs


def last_token_index(sequence_index_NxL: jax.Array, num_sequences: int) -> jax.Array:
    """Flat index (row * L + col) of the last token of each sequence, `[S]`.

    Reads only `sequence_index`, so it serves every layout; a sequence with no marked
    token gets -1.
    """
    n, length = sequence_index_NxL.shape
    flat_seq = sequence_index_NxL.reshape(-1)
    flat_pos = jnp.arange(n * length, dtype=jnp.int32)
    seg = jnp.where(flat_seq >= 0, flat_seq, num_sequences)  # unmarked: a dropped segment
    last = jax.ops.segment_max(flat_pos, seg, num_segments=num_sequences + 1)[:num_sequences]
    return jnp.where(last < 0, -1, last)


def last_hidden(hidden_NxLxD: jax.Array, sequence_index_NxL: jax.Array, n_seq: int) -> jax.Array:
    """`[S, D]` final hidden state at the last token of each sequence."""
    n, length, d = hidden_NxLxD.shape
    last_S = last_token_index(jnp.asarray(sequence_index_NxL), n_seq)
    return hidden_NxLxD.reshape(n * length, d)[jnp.maximum(last_S, 0)]


def score(
    apply_fn: Callable[..., Any],
    params: Any,
    batch: Mapping[str, Any],
    n_seq: int,
    *,
    needs: Collection[str] = ("logps",),
    chunk_size: int = 0,
) -> SequenceLogps:
    """One forward of `apply_fn` (a `models.Transformer(...).apply`) under `params`, then
    the per-sequence statistics `needs` asks for (see the module docstring)."""
    needs = check_needs(needs)
    variables = {"params": params}
    inputs = model_inputs(batch)
    ids = batch["input_ids"]
    flags = dict(
        with_wpo="wpo" in needs,
        with_log1m="log1m" in needs,
        with_metrics="token_metrics" in needs,
        with_token_logps="token_logps" in needs,
    )
    want_logps = bool(needs & _LOGP_NEEDS)
    want_hidden = bool(needs & {"last_hidden", "hidden"})
    unembed = lambda h: apply_fn(variables, h, method="logits")
    if want_logps and not want_hidden and "scored_positions" not in batch and chunk_size <= 0:
        logits = apply_fn(variables, ids, **inputs)  # the model's own fused forward
        return logprobs.sequence_logps(logits, batch, n_seq, **flags)
    hidden = apply_fn(variables, ids, return_hidden=True, **inputs)
    out = SequenceLogps()
    if want_logps:
        if "scored_positions" in batch:
            out = logprobs.sequence_logps_scored(
                hidden, unembed, batch, n_seq, chunk_size=chunk_size, **flags
            )
        elif chunk_size > 0:
            out = logprobs.sequence_logps_chunked(
                hidden, unembed, batch, n_seq, chunk_size, **flags
            )
        else:
            out = logprobs.sequence_logps(unembed(hidden), batch, n_seq, **flags)
    if "last_hidden" in needs:
        out = out.replace(last_hidden_SxD=last_hidden(hidden, batch["sequence_index"], n_seq))
    if "hidden" in needs:
        out = out.replace(hidden_NxLxD=hidden)
    return out


def device_batch(batch: Mapping[str, Any], extra: Collection[str] = ()) -> dict[str, jax.Array]:
    """The arrays of a host batch a scoring pass reads (`MODEL_KEYS` + `extra`)."""
    keys = (*MODEL_KEYS, "scored_positions", *extra)
    return {k: jnp.asarray(batch[k]) for k in keys if k in batch}


def host_scorer(
    apply_fn: Callable[..., Any],
    *,
    needs: Collection[str] = ("logps",),
    chunk_size: int = 0,
    scored_only: bool = True,
) -> Callable[[Any, Mapping[str, Any], int], SequenceLogps]:
    """`fn(params, host_batch, n_seq) -> SequenceLogps` on host numpy batches: `score`
    under one `jax.jit` (one compile per batch shape), reading only `MODEL_KEYS`.

    With `scored_only` the batch gets `scored_positions` (as in the train step), so host
    scoring runs the same program and gives the same numbers as the step.
    """
    needs = check_needs(needs)

    def scored(params: Any, batch: dict[str, jax.Array], n_seq: int) -> SequenceLogps:
        return score(apply_fn, params, batch, n_seq, needs=needs, chunk_size=chunk_size)

    jitted = jax.jit(scored, static_argnums=(2,))

    def fn(params: Any, batch: Mapping[str, Any], n_seq: int) -> SequenceLogps:
        host = dict(batch)
        if scored_only and needs & _LOGP_NEEDS and "scored_positions" not in host:
            host["scored_positions"] = logprobs.scored_positions(np.asarray(host["sequence_index"]))
        return jitted(params, device_batch(host), int(n_seq))

    return fn
