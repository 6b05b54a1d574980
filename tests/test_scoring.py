"""scoring.score: the three unembedding paths agree on every need, per-token log-probs
and last hidden states match a hand computation, and the host wrapper is the same pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import logprobs, models, scoring
from tests.train_helpers import synthetic_batches, tiny_model

ALL = ("logps", "wpo", "log1m", "token_metrics", "token_logps", "last_hidden", "hidden")


def jitted_score(apply_fn, n_seq, **kw):
    """`score` under one jit (eager op-by-op dispatch is what makes CPU tests slow)."""
    return jax.jit(lambda p, b: scoring.score(apply_fn, p, b, n_seq, **kw))


def test_every_path_gives_the_same_statistics_and_token_logps_by_hand():
    cfg, params = tiny_model()
    apply_fn = models.Transformer(cfg).apply
    host = synthetic_batches(num=1, pairs=2, seed=3)[0]
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    scored = dict(
        batch, scored_positions=jnp.asarray(logprobs.scored_positions(host["sequence_index"]))
    )
    full = jitted_score(apply_fn, 4, needs=ALL)(params, batch)
    chunked = jitted_score(apply_fn, 4, needs=ALL, chunk_size=3)(params, batch)
    fast = jitted_score(apply_fn, 4, needs=ALL)(params, scored)
    for other in (chunked, fast):
        for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    # by hand: log_softmax of the previous position's logits, at scored tokens
    forward = jax.jit(lambda p, b: apply_fn({"params": p}, b["input_ids"],
                      positions=b["positions"], segment_ids=b["segment_ids"]))  # fmt: skip
    logits = np.asarray(forward(params, batch), np.float64)
    ids, si = host["input_ids"], host["sequence_index"]
    want = np.zeros(ids.shape)
    for n, t in zip(*np.nonzero(si >= 0), strict=True):
        row = logits[n, t - 1]
        want[n, t] = row[ids[n, t]] - (np.log(np.exp(row - row.max()).sum()) + row.max())
    np.testing.assert_allclose(np.asarray(full.token_logps_NxL), want, rtol=1e-5, atol=1e-5)
    sums = [want[si == k].sum() for k in range(4)]
    np.testing.assert_allclose(np.asarray(full.logps_S), sums, rtol=1e-5)
    hidden = np.asarray(full.hidden_NxLxD)
    for k in range(4):
        rows, cols = np.nonzero(si == k)
        np.testing.assert_allclose(np.asarray(full.last_hidden_SxD[k]), hidden[rows[-1], cols[-1]])


def test_needs_without_log_probs_skip_the_unembedding_and_unknown_needs_fail():
    cfg, params = tiny_model()
    batch = {k: jnp.asarray(v) for k, v in synthetic_batches(num=1, pairs=2, seed=3)[0].items()}
    apply_fn = models.Transformer(cfg).apply
    out = jitted_score(apply_fn, 4, needs={"last_hidden"})(params, batch)
    assert out.logps_S is None and out.token_logps_NxL is None
    assert out.last_hidden_SxD.shape == (4, cfg.hidden_size)
    with pytest.raises(ValueError, match="unknown needs"):
        scoring.score(apply_fn, params, batch, 4, needs={"values"})


def test_host_scorer_is_the_steps_scoring_pass():
    cfg, params = tiny_model()
    host = synthetic_batches(num=1, pairs=3, seed=5)[0]
    apply_fn = models.Transformer(cfg).apply
    got = scoring.host_scorer(apply_fn)(params, dict(host, step=np.int64(0)), 6)
    scored = {k: jnp.asarray(v) for k, v in host.items()}
    scored["scored_positions"] = jnp.asarray(logprobs.scored_positions(host["sequence_index"]))
    want = jax.jit(lambda p, b: scoring.score(apply_fn, p, b, 6))(params, scored)
    np.testing.assert_array_equal(np.asarray(got.logps_S), np.asarray(want.logps_S))
