"""The SFT objective (`objectives.sft_loss` in the one train step): NLL against a numpy
computation, target masks, and steps that learn a bigram table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpo_jax import data, logprobs, train_step
from dpo_jax.scoring import MODEL_KEYS

VOCAB = 7


def bigram_apply(variables, input_ids, positions=None, segment_ids=None):
    """A model whose logits at t depend only on token t: a bigram table."""
    del positions, segment_ids
    return variables["params"]["table"][input_ids]


def numpy_nll(table: np.ndarray, batch: dict[str, np.ndarray]) -> float:
    """Mean NLL over targets, by hand: log-softmax of the row of the previous token."""
    total, count = 0.0, 0
    ids, targets = batch["input_ids"], batch["sequence_index"] >= 0
    for n in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if not targets[n, t]:
                continue
            row = table[ids[n, t - 1]].astype(np.float64)
            logz = np.log(np.exp(row - row.max()).sum()) + row.max()
            total += -(row[ids[n, t]] - logz)
            count += 1
    return total / count


def split(seqs, starts):
    """(context, targets) lists from sequences and the index of their first target."""
    return [s[: max(k, 1)] for s, k in zip(seqs, starts, strict=True)], [
        s[max(k, 1) :] for s, k in zip(seqs, starts, strict=True)
    ]


def step_config(optimizer=optax.identity()) -> train_step.StepConfig:
    return train_step.StepConfig(
        apply_fn=bigram_apply, optimizer=optimizer, schedule=optax.constant_schedule(0.0),
        reference="none",
        **train_step.default_settings(loss_name="sigmoid", objective="sft", unembed_scored_only=False),
    )  # fmt: skip


def test_build_sequences_masks_targets_and_padding():
    batch = data.build_sequences(*split([[1, 2, 3], [4, 5, 6, 1, 2]], [1, 3]), length=4)
    np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 3, 0], [4, 5, 6, 1]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["sequence_index"] >= 0, [[0, 1, 1, 0], [0, 0, 0, 1]])


def test_sft_loss_equals_numpy_nll():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(VOCAB, VOCAB)).astype(np.float32)
    seqs = [rng.integers(1, VOCAB, size=int(k)).tolist() for k in (5, 3, 6)]
    batch = data.build_sequences(*split(seqs, [1, 2, 4]), length=6)
    params = {"table": jnp.asarray(table)}
    cfg = step_config()
    state = train_step.init_state(params, cfg.optimizer, jax.random.key(0), False)
    batch_A = {k: jnp.asarray(v)[None] for k, v in batch.items()}
    metrics = train_step.eval_step(state, batch_A, cfg, 3)
    expected = numpy_nll(table, batch)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert float(metrics["num_target_tokens"]) == 4 + 1 + 2
    np.testing.assert_allclose(float(metrics["perplexity"]), np.exp(expected), rtol=1e-5)


def test_sft_step_learns_a_deterministic_bigram_chain():
    # Sequences follow token -> (token + 1) mod VOCAB; the optimum NLL is 0.
    seqs = [[(s + t) % VOCAB for t in range(6)] for s in range(VOCAB)]
    batches = data.make_train_iterator(
        data.sequence_dataset(*split(seqs, [1] * VOCAB)), 4, buckets=(6,), seed=0
    )
    cfg = step_config(optax.adam(0.1))
    state = train_step.init_state(
        {"table": jnp.zeros((VOCAB, VOCAB))}, cfg.optimizer, jax.random.key(0), False
    )
    step = jax.jit(lambda s, b: train_step.train_step(s, b, cfg, 4))
    evaluate = jax.jit(lambda s, b: train_step.eval_step(s, b, cfg, VOCAB))
    whole = data.build_sequences(*split(seqs, [1] * VOCAB), 6)
    full = {k: jnp.asarray(v)[None] for k, v in whole.items()}
    start = float(evaluate(state, full)["loss"])
    np.testing.assert_allclose(start, np.log(VOCAB), rtol=1e-6)  # uniform table
    for _ in range(150):
        b = next(batches)
        state, metrics = step(state, {k: jnp.asarray(b[k])[None] for k in MODEL_KEYS if k in b})
    end = float(evaluate(state, full)["loss"])
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
    out = logprobs.token_logps(logits, ids)
    assert out.dtype == jnp.float32 and out.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(out[:, 0]), 0.0)
    ref = jax.nn.log_softmax(logits.astype(jnp.float32)[:, :-1], axis=-1)
    ref = jnp.take_along_axis(ref, ids[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(out[:, 1:]), np.asarray(ref), rtol=1e-6)
