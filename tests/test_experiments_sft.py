"""dpo_jax.sft: NLL against a numpy computation, masks, and a step that learns a bigram table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpo_jax import sft

VOCAB = 7


def bigram_apply(params, input_ids, positions=None, segment_ids=None):
    """A model whose logits at t depend only on token t: a bigram table."""
    del positions, segment_ids
    return params["table"][input_ids]


def numpy_nll(table: np.ndarray, batch: dict[str, np.ndarray]) -> float:
    """Mean NLL over targets, by hand: log-softmax of the row of the previous token."""
    total, count = 0.0, 0
    ids, mask = batch["input_ids"], batch["loss_mask"]
    for n in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[n, t] == 0:
                continue
            row = table[ids[n, t - 1]].astype(np.float64)
            logz = np.log(np.exp(row - row.max()).sum()) + row.max()
            total += -(row[ids[n, t]] - logz)
            count += 1
    return total / count


def test_pad_sft_batch_masks_targets_and_padding():
    batch = sft.pad_sft_batch([[1, 2, 3], [4, 5, 6, 1, 2]], [1, 3], max_len=4, pad_id=0)
    np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 3, 0], [4, 5, 6, 1]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="target starts"):
        sft.pad_sft_batch([[1, 2]], [1, 1], max_len=4, pad_id=0)


def test_sft_loss_equals_numpy_nll():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(VOCAB, VOCAB)).astype(np.float32)
    seqs = [rng.integers(1, VOCAB, size=int(k)).tolist() for k in (5, 3, 6)]
    batch = sft.pad_sft_batch(seqs, [1, 2, 4], max_len=6, pad_id=0)
    loss, metrics = sft.sft_loss({"table": jnp.asarray(table)}, bigram_apply, batch)
    expected = numpy_nll(table, batch)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["num_tokens"]) == 4 + 1 + 2
    np.testing.assert_allclose(float(metrics["perplexity"]), np.exp(expected), rtol=1e-5)


def test_sft_step_learns_a_deterministic_bigram_chain():
    # Sequences follow token -> (token + 1) mod VOCAB; the optimum NLL is 0.
    seqs = [[(s + t) % VOCAB for t in range(6)] for s in range(VOCAB)]
    batches = sft.iterate_sft_batches(seqs, [1] * len(seqs), 4, 6, pad_id=0, seed=0)
    optimizer = optax.adam(0.1)
    state = sft.init_state({"table": jnp.zeros((VOCAB, VOCAB))}, optimizer)
    step = sft.make_sft_step(bigram_apply, optimizer)
    evaluate = sft.make_sft_eval(bigram_apply)
    full = sft.pad_sft_batch(seqs, [1] * len(seqs), 6, 0)
    start = float(evaluate(state.params, full)["loss"])
    np.testing.assert_allclose(start, np.log(VOCAB), rtol=1e-6)  # uniform table
    for _ in range(150):
        state, metrics = step(state, next(batches))
    end = float(evaluate(state.params, full)["loss"])
    assert int(state.step) == 150
    assert end < 0.05 * start
    assert np.isfinite(float(metrics["grad_norm"]))
    # The learnt table predicts the successor of every token.
    np.testing.assert_array_equal(
        np.argmax(np.asarray(state.params["table"]), axis=1), (np.arange(VOCAB) + 1) % VOCAB
    )


def test_token_logps_are_float32_from_bf16_logits():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, VOCAB)), jnp.bfloat16)
    ids = jnp.asarray([[1, 2, 3, 4], [5, 6, 0, 1]])
    out = sft.token_logps(logits, ids)
    assert out.dtype == jnp.float32 and out.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(out[:, 0]), 0.0)
    ref = jax.nn.log_softmax(logits.astype(jnp.float32)[:, :-1], axis=-1)
    ref = jnp.take_along_axis(ref, ids[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(out[:, 1:]), np.asarray(ref), rtol=1e-6)
