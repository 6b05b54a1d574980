"""Unembedding only scored positions: host positions by hand, and the same numbers as the
full-logits path (values, gradients, WPO, unlikelihood, LD-DPO prefixes), in the step too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import logprobs, losses
from tests.test_logprobs import D, V, packed_batch, stacked_batch


def test_scored_positions_by_hand():
    si = -np.ones((3, 8), np.int32)
    si[0, 3:6] = 0  # tokens 3, 4, 5 scored -> predicted at 2, 3, 4
    si[1, [1, 6, 7]] = 1  # -> 0, 5, 6
    # row 2 scores nothing
    pos = logprobs.scored_positions(si, min_positions=2)
    # largest count 3 -> K = 4 (rounded up to a multiple of 2)
    np.testing.assert_array_equal(pos, [[2, 3, 4, -1], [0, 5, 6, -1], [-1, -1, -1, -1]])
    # quarter-octave buckets: 33 -> 40, 100 -> 112, 32 -> 32 (at most 25% padding)
    for count, k in [(33, 40), (100, 112), (32, 32), (5, 8)]:
        row = -np.ones((1, 200), np.int32)
        row[0, 1 : count + 1] = 0
        assert logprobs.scored_positions(row).shape == (1, k)
    # K never exceeds the row length, and a leading micro-batch axis passes through.
    full = -np.ones((2, 1, 5), np.int32)
    full[:, 0, 1:] = 0
    p = logprobs.scored_positions(full)
    assert p.shape == (2, 1, 5)
    np.testing.assert_array_equal(p[1, 0], [0, 1, 2, 3, -1])
    # A fixed K (what multi-host agreement uses), and a K too small is refused.
    assert logprobs.scored_positions(si, num_positions=6).shape == (3, 6)
    with pytest.raises(ValueError, match="scores 3 tokens > K = 2"):
        logprobs.scored_positions(si, num_positions=2)


def _objective(batch, S, ref, mode, chunk, with_wpo=False, with_log1m=False):
    def f(h, w):
        if mode == "full":
            seq = logprobs.sequence_logps(h @ w, batch, S, with_wpo=with_wpo, with_log1m=with_log1m)
        else:
            seq = logprobs.sequence_logps_scored(
                h, lambda x: x @ w, batch, S, chunk_size=chunk, with_wpo=with_wpo,
                with_log1m=with_log1m,
            )  # fmt: skip
        stats = logprobs.preference_stats(seq, ref)
        loss, _ = losses.compute_loss(stats, ["sigmoid", "ipo"], ld_alpha=0.5, beta=0.1)
        return jnp.mean(loss), seq

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize(
    "layout,chunk", [("stacked", 0), ("packed", 0), ("stacked", 3), ("packed", 2)]
)
def test_scored_path_equals_full_logits_values_and_gradients(layout, chunk):
    rng = np.random.default_rng(11)
    batch, S = stacked_batch(rng) if layout == "stacked" else packed_batch(rng)
    batch = dict(
        batch, scored_positions=logprobs.scored_positions(batch["sequence_index"], None, 1)
    )
    N, L = batch["input_ids"].shape
    # fewer gathered positions than the row holds: the point of the path
    assert batch["scored_positions"].shape[1] < L - 1
    hidden = jnp.asarray(rng.normal(size=(N, L, D)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    ref = jnp.asarray(rng.normal(size=(S,)) - 20.0, jnp.float32)
    (v_full, seq_full), g_full = _objective(batch, S, ref, "full", 0)(hidden, W)
    (v_sc, seq_sc), g_sc = _objective(batch, S, ref, "scored", chunk)(hidden, W)
    np.testing.assert_allclose(v_sc, v_full, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(seq_sc), jax.tree.leaves(seq_full), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    for x, y in zip(g_sc, g_full, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        assert np.abs(np.asarray(y)).max() > 1e-4
    # hidden states at positions that predict nothing scored get no gradient at all
    scored_next = np.zeros((N, L), bool)
    scored_next[:, :-1] = batch["sequence_index"][:, 1:] >= 0
    assert np.all(np.asarray(g_sc[0])[~scored_next] == 0.0)


def test_scored_path_wpo_and_log1m_equal_full():
    rng = np.random.default_rng(12)
    batch, S = packed_batch(rng)
    batch = dict(batch, scored_positions=logprobs.scored_positions(batch["sequence_index"]))
    N, L = batch["input_ids"].shape
    hidden = jnp.asarray(rng.normal(size=(N, L, D)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    a = logprobs.sequence_logps(hidden @ W, batch, S, with_wpo=True, with_log1m=True)
    b = jax.jit(
        lambda h, w: logprobs.sequence_logps_scored(
            h, lambda x: x @ w, batch, S, with_wpo=True, with_log1m=True
        )
    )(hidden, W)
    np.testing.assert_allclose(b.wpo_weights_S, a.wpo_weights_S, rtol=1e-6)
    np.testing.assert_allclose(b.log1m_sums_S, a.log1m_sums_S, rtol=1e-6)


def test_bad_scored_positions_shape_is_named():
    rng = np.random.default_rng(13)
    batch, S = stacked_batch(rng)
    batch = dict(batch, scored_positions=np.zeros((1, 4), np.int32))
    N, L = batch["input_ids"].shape
    with pytest.raises(ValueError, match="scored_positions"):
        logprobs.sequence_logps_scored(jnp.zeros((N, L, D)), lambda x: x, batch, S)


@pytest.mark.parametrize(
    "loss,hyper", [("sigmoid", {"beta": 0.1}), ("unlikelihood", {"unlikelihood_alpha": 0.5})]
)
def test_trainer_steps_equal_with_and_without_scored_unembedding(loss, hyper):
    from dpo_jax import train
    from dpo_jax import trainer as trainer_lib
    from tests.train_helpers import flat_params, make_trainer, synthetic_batches, tiny_model

    model = tiny_model()
    batches = synthetic_batches(num=2, pairs=2, seed=21, length=24)
    runs = {}
    for scored in (False, True):
        # SGD: Adam's first steps turn float rounding in near-zero gradients into full steps
        sgd = dict(name="sgd", learning_rate=0.5, schedule="constant", max_grad_norm=0.0)
        trainer, state = make_trainer(
            model, loss=loss, hyper=hyper, optim_cfg=sgd, unembed_scored_only=scored
        )
        curve = []
        for b in batches:
            state, m = trainer.step(state, train.stack_micro_batches([b]), n_seq=4)
            curve.append(float(m["loss"]))
        batch_A = train.stack_micro_batches([batches[0]])
        if scored:
            batch_A = trainer_lib.with_scored_positions(batch_A)
            assert batch_A["scored_positions"].shape[-1] < 24 // 2  # completions are short
        placed = trainer.place_batch(batch_A)
        fn = next(iter(trainer._train_fns.values()))
        with trainer.mesh_context():
            flops = fn.lower(state, placed).compile().cost_analysis()["flops"]
        runs[scored] = (curve, flat_params(state.params), flops)
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
    np.testing.assert_allclose(runs[True][1], runs[False][1], rtol=1e-5, atol=1e-6)
    assert runs[True][2] < runs[False][2]  # the scored path does less work
