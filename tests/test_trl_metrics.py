"""TRL 1.16's DPO token metrics (entropy, logits/chosen, logits/rejected,
mean_token_accuracy) by hand from logits, equal on the full-logits, chunked and
scored-only paths; `num_tokens` counted as TRL does (prompt once per sequence) in every
layout, and cumulative in the loop."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dpo_jax import data, logprobs, train
from tests.test_logprobs import D, V, packed_batch, stacked_batch
from tests.train_helpers import make_trainer, synthetic_batches, synthetic_items, tiny_model


def _by_hand(logits, ids, si, S):
    """TRL's definitions in float64: token-weighted over the completion tokens."""
    z = np.asarray(logits, np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    p = np.exp(z - lse[..., None])
    ent = lse - (p * z).sum(-1)  # at the predicting position t - 1
    mean = z.mean(-1)
    top1 = z.argmax(-1)
    B = S // 2
    sums = {k: 0.0 for k in ("ent", "c_logit", "r_logit", "c_top1", "n", "c_n", "r_n")}
    for n, t in zip(*np.nonzero(si >= 0), strict=True):
        k = si[n, t]
        sums["ent"] += ent[n, t - 1]
        sums["n"] += 1
        if k < B:
            sums["c_logit"] += mean[n, t - 1]
            sums["c_top1"] += float(top1[n, t - 1] == ids[n, t])
            sums["c_n"] += 1
        else:
            sums["r_logit"] += mean[n, t - 1]
            sums["r_n"] += 1
    return {
        "entropy": sums["ent"] / sums["n"],
        "logits/chosen": sums["c_logit"] / sums["c_n"],
        "logits/rejected": sums["r_logit"] / sums["r_n"],
        "mean_token_accuracy": sums["c_top1"] / sums["c_n"],
    }


@pytest.mark.parametrize("layout", ["stacked", "packed"])
def test_token_metrics_by_hand_on_every_path(layout):
    rng = np.random.default_rng(3)
    batch, S = stacked_batch(rng) if layout == "stacked" else packed_batch(rng)
    N, L = batch["input_ids"].shape
    h = rng.normal(size=(N, L, D)).astype(np.float32)
    w = rng.normal(size=(D, V)).astype(np.float32)
    # Make some predictions right so the accuracy is not trivially 0.
    logits = h @ w
    want = _by_hand(logits, batch["input_ids"], batch["sequence_index"], S)
    unembed = lambda x: x @ w
    scored = dict(batch, scored_positions=logprobs.scored_positions(batch["sequence_index"]))
    paths = {
        "full": logprobs.sequence_logps(logits, batch, S, with_metrics=True),
        "chunked": logprobs.sequence_logps_chunked(h, unembed, batch, S, 3, with_metrics=True),
        "scored": logprobs.sequence_logps_scored(h, unembed, scored, S, with_metrics=True),
        "scored_chunked": logprobs.sequence_logps_scored(
            h, unembed, scored, S, chunk_size=2, with_metrics=True
        ),
    }
    for name, seq in paths.items():
        got = jax.device_get(logprobs.token_metrics(seq))
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=(name, key))
        # the log-probs themselves are unchanged by the extra terms
        plain = logprobs.sequence_logps(logits, batch, S)
        np.testing.assert_allclose(seq.logps_S, plain.logps_S, rtol=1e-5, atol=1e-5)


def test_step_logs_token_metrics_on_scored_and_full_paths():
    model = tiny_model()
    batch = train.stack_micro_batches(synthetic_batches(1, 4, seed=5))
    rows = {}
    for scored_only in (True, False):
        trainer, state = make_trainer(model, unembed_scored_only=scored_only)
        _, m = trainer.step(state, batch, 8)
        rows[scored_only] = jax.device_get(m)
    for key in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "loss"):
        assert key in rows[True]
        np.testing.assert_allclose(rows[True][key], rows[False][key], rtol=1e-5, err_msg=key)
    assert rows[True]["entropy"] > 0


def test_num_tokens_counts_prompts_per_sequence_in_every_layout():
    items = synthetic_items(4, seed=2)
    trl_count = sum(len(it["prompt"]) + len(it[k]) for it in items for k in ("chosen", "rejected"))
    for layout in ("stacked", "packed", "prefix_shared"):
        batch = data.build_batch(items, "paired", layout)
        assert train.count_sequence_tokens(batch) == trl_count, layout


def test_num_tokens_is_cumulative_in_the_loop():
    model = tiny_model()
    batches = synthetic_batches(3, 2, seed=4)
    trainer, state = make_trainer(model)
    state, history, _ = train.run_loop(trainer, state, iter(batches), num_steps=3, log_every=1)
    per_step = [train.count_sequence_tokens(b) for b in batches]
    assert [r["num_tokens"] for r in history] == list(np.cumsum(per_step))
    _, resumed, _ = train.run_loop(
        trainer, state, iter(batches[2:]), num_steps=3, start_step=2, num_tokens_start=7
    )
    assert resumed[-1]["num_tokens"] == 7 + per_step[2]
