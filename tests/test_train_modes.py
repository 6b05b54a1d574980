"""Train-step modes on one device: TR-DPO, reference-free, KTO, notebook losses, padding."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import data, loading, losses, reference, train
from dpo_jax import trainer as trainer_lib
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


def test_tr_dpo_soft_updates_reference(model):
    _, params = model
    alpha = 0.25
    trainer, state = make_trainer(model, ref_model_sync_steps=2, ref_model_mixup_alpha=alpha)
    batches = [train.stack_micro_batches([b]) for b in synthetic_batches(num=2, pairs=2, seed=4)]
    state, _ = trainer.step(state, batches[0], n_seq=4)
    np.testing.assert_array_equal(
        flat_params(state.ref_params), flat_params(params)
    )  # step 1: no sync
    state, _ = trainer.step(state, batches[1], n_seq=4)
    policy = flat_params(state.params)
    expected = alpha * policy + (1 - alpha) * flat_params(params)  # TRL's SyncRefModelCallback
    np.testing.assert_allclose(flat_params(state.ref_params), expected, rtol=1e-6, atol=1e-7)


def test_reference_free_loss_has_no_reference(model):
    trainer, state = make_trainer(
        model, reference="none", loss="simpo", hyper={"beta": 2.0, "simpo_gamma": 0.5}
    )
    assert state.ref_params is None
    b = train.stack_micro_batches(synthetic_batches(num=1, pairs=2, seed=2))
    state, m = trainer.step(state, b, n_seq=4)
    assert np.isfinite(float(m["loss"]))
    assert loading.resolve_reference_mode("auto", "simpo", False) == "none"
    assert loading.resolve_reference_mode("auto", "sigmoid", True) == "precomputed"
    assert loading.resolve_reference_mode("auto", "sigmoid", False) == "frozen"


def test_unpaired_kto_batch_goes_through_the_same_step(model):
    rng = np.random.default_rng(0)
    items = [
        dict(prompt=rng.integers(3, 30, size=3).astype(np.int32),
             completion=rng.integers(30, 60, size=4).astype(np.int32), label=i % 2)
        for i in range(4)
    ]  # fmt: skip
    b = data.build_batch(items, "unpaired", "stacked", length=16)
    assert not losses.is_paired("kto")
    trainer, state = make_trainer(model, loss="kto", hyper={"beta": 0.1})
    batch_A = train.stack_micro_batches([b])
    assert train.batch_num_sequences(batch_A) == 8
    state, m = trainer.step(state, batch_A, n_seq=8)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0


def test_custom_loss_registered_in_a_notebook(model):
    @losses.register("cubed_test_loss")
    def cubed(stats, beta=0.1):
        h = losses.margin(stats)
        return -(jax.nn.log_sigmoid(beta * h) ** 3), losses.reward_metrics(stats, beta)

    trainer, state = make_trainer(model, loss="cubed_test_loss")
    b = train.stack_micro_batches(synthetic_batches(num=1, pairs=2, seed=2))
    _, m = trainer.step(state, b, n_seq=4)
    np.testing.assert_allclose(float(m["loss"]), np.log(2) ** 3, rtol=1e-6)


def test_stack_micro_batches_pads_lengths_without_changing_numbers(model):
    cfg, params = model
    a = synthetic_batches(num=1, pairs=2, seed=1, length=16)[0]
    b = synthetic_batches(num=1, pairs=2, seed=2, length=32)[0]
    stacked = train.stack_micro_batches([a, {**b, "step": np.int64(3)}])
    assert stacked["input_ids"].shape == (2, 4, 32) and "step" not in stacked
    fn = reference.make_logps_fn(cfg, params)
    padded_a = {k: v[0] for k, v in stacked.items()}
    np.testing.assert_allclose(fn(padded_a, 4), fn(a, 4), rtol=1e-5, atol=1e-5)
    assert jnp.all(stacked["sequence_index"][0, :, 16:] == -1)


def test_chunked_logps_and_bf16_compute_match_full_fp32(model):
    cfg, params = model
    b = train.stack_micro_batches(synthetic_batches(num=2, pairs=2, seed=6))
    trainer, state = make_trainer(model)
    state, full = trainer.step(state, b, n_seq=4)
    state, full2 = trainer.step(state, b, n_seq=4)

    # bf16 activations with fp32 master params, and logits unembedded 8 positions at a time
    bf16 = (dataclasses.replace(cfg, dtype="bfloat16"), params)
    trainer_c, state_c = make_trainer(bf16, logps_chunk_size=8)
    state_c, chunked = trainer_c.step(state_c, b, n_seq=4)
    state_c, chunked2 = trainer_c.step(state_c, b, n_seq=4)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state_c.params))
    assert all(
        x.dtype == jnp.float32 for x in jax.tree.leaves(state_c.opt_state) if x.dtype.kind == "f"
    )
    np.testing.assert_allclose(float(chunked["loss"]), float(full["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(chunked2["loss"]), float(full2["loss"]), rtol=2e-2)
    np.testing.assert_allclose(
        float(chunked2["logps/chosen"]), float(full2["logps/chosen"]), rtol=2e-2
    )


def test_host_slices_stitch_into_the_contract_numbering(model):
    """Two simulated hosts: renumbered slices, concatenated as make_array_from_process_local_data
    would, score exactly like one batch holding all pairs in canonical order."""
    cfg, params = model
    items = synthetic_items(4, seed=12)
    ref = np.arange(8, dtype=np.float32)  # made-up column: chosen 0..3, rejected 4..7
    hosts = []
    for h in range(2):
        b = data.build_batch(items[2 * h : 2 * h + 2], "paired", "stacked", length=16)
        b["ref_logps"] = np.r_[ref[2 * h : 2 * h + 2], ref[4 + 2 * h : 4 + 2 * h + 2]]
        g, n_seq = trainer_lib.globalize_host_batch(train.stack_micro_batches([b]), 4, h, 2)
        assert n_seq == 8
        hosts.append(g)
    stitched = {k: np.concatenate([hh[k] for hh in hosts], axis=1) for k in hosts[0]}
    stitched["ref_logps"] = np.concatenate([hh["ref_logps"] for hh in hosts], axis=-1)
    np.testing.assert_array_equal(stitched["ref_logps"].reshape(1, -1), ref[None])
    whole = data.build_batch(items, "paired", "stacked", length=16)
    fn = reference.make_logps_fn(cfg, params)
    got = fn({k: v[0] for k, v in stitched.items()}, 8)
    np.testing.assert_allclose(got, fn(whole, 8), rtol=1e-6, atol=1e-6)


def test_kto_weight_rule_checked_on_label_counts():
    from dpo_jax.configs import default

    config = default.get_config("kto")
    labels = np.array([1, 0, 1, 0, 1, 0])
    config.loss.hyper.desirable_weight = 2.0  # balanced labels: ratio 2 > 4/3
    with pytest.warns(UserWarning, match=r"= 2\.000 is outside"):
        loading._check_unpaired_weights(config, labels)
    config.loss.hyper.desirable_weight = 1.0
    config.loss.hyper.undesirable_weight = 0.8  # ratio 1.25: inside, silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loading._check_unpaired_weights(config, labels)
