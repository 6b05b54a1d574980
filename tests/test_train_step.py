"""The jitted train step on one device: accumulation, precomputed vs frozen reference, NaN policy."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_jax import data, reference, train
from tests.train_helpers import (
    flat_params,
    make_trainer,
    synthetic_batches,
    synthetic_items,
    tiny_model,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_grad_accumulation_equals_one_big_batch(model):
    items = synthetic_items(8, seed=3)
    big = data.build_batch(items, "paired", "stacked", length=16)
    micro = [
        data.build_batch(items[i : i + 2], "paired", "stacked", length=16) for i in range(0, 8, 2)
    ]
    sgd = dict(name="sgd", learning_rate=0.5, schedule="constant", max_grad_norm=0.0)

    trainer_a, state_a = make_trainer(model, optim_cfg=sgd)
    state_a, m_a = trainer_a.step(state_a, train.stack_micro_batches(micro), n_seq=4)
    trainer_b, state_b = make_trainer(model, optim_cfg=sgd)
    state_b, m_b = trainer_b.step(state_b, train.stack_micro_batches([big]), n_seq=16)

    np.testing.assert_allclose(float(m_a["loss"]), float(m_b["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_a["grad_norm"]), float(m_b["grad_norm"]), rtol=1e-5)
    np.testing.assert_allclose(
        float(m_a["rewards/margins"]), float(m_b["rewards/margins"]), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        flat_params(state_a.params), flat_params(state_b.params), rtol=1e-5, atol=1e-7
    )
    # and the update really moved the params
    assert np.abs(flat_params(state_a.params) - flat_params(model[1])).max() > 1e-4


def test_precomputed_reference_equals_frozen_reference(model):
    cfg, params = model
    batches = synthetic_batches(num=6, pairs=2, seed=5)
    # Reference log-probs by a second code path: dpo_jax.reference scores pair by pair
    # (batch of 1, its own bucket length), not the train step's batches.
    fn = reference.make_logps_fn(cfg, params)
    pre = []
    for b in batches:
        seqs = b["sequence_index"]
        n = b["input_ids"].shape[0] // 2
        per_pair = []
        for k in range(n):
            rows = [k, n + k]
            single = {key: b[key][rows] for key in ("input_ids", "positions", "segment_ids")}
            si = seqs[rows].copy()
            si[si == k] = 0
            si[si == n + k] = 1
            single["sequence_index"] = si
            per_pair.append(fn(single, 2))
        pb = dict(b)
        pb["ref_logps"] = np.asarray(
            [p[0] for p in per_pair] + [p[1] for p in per_pair], np.float32
        )
        pre.append(pb)

    def run(reference_mode, bs):
        trainer, state = make_trainer(model, reference=reference_mode)
        assert (state.ref_params is None) == (reference_mode == "precomputed")
        out = []
        for i in range(0, len(bs), 2):
            state, m = trainer.step(state, train.stack_micro_batches(bs[i : i + 2]), n_seq=4)
            out.append({k: float(v) for k, v in m.items()})
        return out, state

    frozen, s_f = run("frozen", batches)
    precomp, s_p = run("precomputed", pre)
    for i, (a, b) in enumerate(zip(frozen, precomp, strict=True)):
        keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm"]
        if i:  # at step 0 every reward is 0 up to rounding, so "chosen > rejected" is a coin flip
            keys.append("rewards/accuracies")
        for key in keys:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert frozen[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference at step 0
    assert frozen[-1]["loss"] < frozen[0]["loss"]
    np.testing.assert_allclose(
        flat_params(s_f.params), flat_params(s_p.params), rtol=1e-4, atol=1e-6
    )


def _nan_batch():
    b = train.stack_micro_batches(synthetic_batches(num=1, pairs=2, seed=9))
    b["ref_logps"] = np.full((1, 4), np.nan, np.float32)
    return b


def test_nan_policy_skip_keeps_params_and_counts(model):
    trainer, state = make_trainer(model, reference="precomputed", nan_policy="skip")
    before = flat_params(state.params)
    state, m = trainer.step(state, _nan_batch(), n_seq=4)
    assert int(m["skipped_steps"]) == 1 and int(m["nonfinite"]) == 1
    np.testing.assert_array_equal(flat_params(state.params), before)
    assert int(state.step) == 1
    good = train.stack_micro_batches(synthetic_batches(num=1, pairs=2, seed=9))
    good["ref_logps"] = np.zeros((1, 4), np.float32)
    state, m = trainer.step(state, good, n_seq=4)
    assert int(m["skipped_steps"]) == 1 and int(m["nonfinite"]) == 0
    assert np.abs(flat_params(state.params) - before).max() > 0


def test_nan_policy_stop_raises_naming_the_step(model):
    trainer, state = make_trainer(model, reference="precomputed", nan_policy="stop")
    good = train.stack_micro_batches(synthetic_batches(num=1, pairs=2, seed=9))
    good["ref_logps"] = np.zeros((1, 4), np.float32)
    unstack = lambda b: {k: v[0] for k, v in b.items()}
    stream = [unstack(good), unstack(good), unstack(_nan_batch())]
    with pytest.raises(train.NonFiniteLossError, match="step 3: non-finite"):
        train.run_loop(trainer, state, stream, num_steps=3, log_every=10)
