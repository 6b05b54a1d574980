"""LoRA: adapters as a parameter transform, the adapters-off reference, training."""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import loading, lora, models, sharding, train
from dpo_jax.configs import tiny
from dpo_jax.errors import UserError
from dpo_jax.scoring import score
from dpo_jax.train_step import TrainState
from tests.train_helpers import (
    make_trainer,
    synthetic_batches,
    tiny_model,
    tiny_model_config,
)

IDS = jnp.asarray(np.random.default_rng(0).integers(2, 60, size=(2, 10)), jnp.int32)


def _random_adapters(base, lcfg, seed=1):
    """Adapters with B drawn at random too, so the update is non-zero."""
    adapters = lora.init_adapters(base, lcfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x,
        adapters,
    )


@pytest.mark.parametrize(
    "overrides,targets",
    [
        (dict(scan_layers=True), "all-linear,embed,lm_head"),
        (dict(scan_layers=False), "q,v,o,down"),
        (dict(model_type="gpt2", gated_mlp=False, tie_word_embeddings=True), "all-linear,embed"),
    ],
    ids=["llama-scanned", "llama-unscanned", "gpt2-like-tied"],
)
def test_factored_forward_equals_merged_weights(overrides, targets):
    # The forward adds x A (s B) beside each frozen weight; a second code path merges
    # W + s A B explicitly. Both must give the same logits.
    cfg = tiny_model_config(num_layers=2, dtype="float32", **overrides)
    base = models.init_params(cfg, jax.random.key(0))
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
    adapters = _random_adapters(base, lcfg)
    model = models.Transformer(cfg)
    apply = jax.jit(model.apply)
    factored = apply({"params": lora.apply_adapters(base, adapters, lcfg.scale)}, IDS)
    merged = apply({"params": lora.merge_adapters(base, adapters, lcfg.scale)}, IDS)
    plain = apply({"params": base}, IDS)
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(merged - plain))) > 1e-2  # the update is not a no-op
    off = apply({"params": lora.apply_adapters(base, adapters, 2.0, enabled=False)}, IDS)
    np.testing.assert_array_equal(off, plain)


def test_zero_init_and_shapes_and_logical_axes():
    cfg = tiny_model_config(num_layers=2, scan_layers=True)  # scanned: params stacked on `layers`
    base = models.init_params(cfg, jax.random.key(0))
    lcfg = lora.LoraConfig(rank=4, alpha=4.0, targets="q,o,up,embed")
    adapters = lora.init_adapters(base, lcfg, jax.random.key(1))
    q, o = adapters["layers"]["attn"]["q"], adapters["layers"]["attn"]["o"]
    assert q["lora_a"].shape == (2, 32, 4) and q["lora_b"].shape == (2, 4, 4, 8)
    assert o["lora_a"].shape == (2, 4, 8, 4) and o["lora_b"].shape == (2, 4, 32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        if path[-1].key == "lora_b":
            assert float(jnp.max(jnp.abs(leaf))) == 0.0  # step 0 is the base model
        else:
            assert float(jnp.std(leaf)) > 0
    bound = 1 / math.sqrt(32)
    assert float(jnp.max(jnp.abs(q["lora_a"]))) <= bound
    logical = lora.adapter_logical_axes(models.logical_axes(cfg), adapters)
    lq = logical["layers"]["attn"]["q"]
    assert tuple(lq["lora_a"]) == ("layers", "embed", "lora_rank")
    assert tuple(lq["lora_b"]) == ("layers", "lora_rank", "heads", "head_dim")
    lo = logical["layers"]["attn"]["o"]
    assert tuple(lo["lora_a"]) == ("layers", "heads", "head_dim", "lora_rank")
    assert tuple(lo["lora_b"]) == ("layers", "lora_rank", "embed")
    assert tuple(logical["embed"]["lora_b"]) == ("lora_rank", "embed")
    # Through the one rule table: the rank axis stays whole; the others shard as the base.
    assert dict(sharding.LOGICAL_AXIS_RULES)["lora_rank"] is None
    # Through the one rule table on a (data 1, fsdp 8, tensor 2) mesh: A splits its
    # weight's input axis over fsdp, B its heads over tensor, the rank axis stays whole.
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 8, "tensor": 2})
    P = jax.sharding.PartitionSpec
    spec = lambda x, names: sharding.logical_to_mesh_spec(names, x.shape, mesh)
    assert spec(q["lora_a"], lq["lora_a"]) == P(None, "fsdp")
    assert spec(q["lora_b"], lq["lora_b"]) == P(None, None, "tensor")
    assert spec(o["lora_a"], lo["lora_a"]) == P(None, "tensor")
    assert spec(o["lora_b"], lo["lora_b"]) == P(None, None, "fsdp")


def test_bad_lora_config_is_one_line_user_error():
    with pytest.raises(UserError, match="lora.targets.*'qq'"):
        lora.config_from({"rank": 4, "targets": "q,qq"})
    with pytest.raises(UserError, match="lora.alpha"):
        lora.config_from({"rank": 4, "alpha": 0})
    assert lora.config_from({"rank": 0}) is None
    base = models.init_params(
        tiny_model_config(model_type="gpt2", gated_mlp=False), jax.random.key(0)
    )
    with pytest.raises(UserError, match="'gate' matches no weight"):
        lora.init_adapters(base, lora.LoraConfig(4, 4.0, "q,gate"), jax.random.key(0))
    with pytest.raises(UserError, match="reference.mode.*lora.rank"):
        loading.resolve_reference_mode("adapters_off", "sigmoid", False, with_lora=False)
    assert (
        loading.resolve_reference_mode("auto", "sigmoid", False, with_lora=True) == "adapters_off"
    )
    assert loading.resolve_reference_mode("auto", "sigmoid", True, with_lora=True) == "precomputed"
    assert loading.resolve_reference_mode("auto", "simpo", False, with_lora=True) == "none"


def test_adapters_off_reference_at_step_0_and_only_adapters_train():
    cfg = tiny_model_config(num_layers=1, scan_layers=True)
    base = models.init_params(cfg, jax.random.key(0))
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
    trainer, state = make_trainer((cfg, base), reference="adapters_off", lora_config=lcfg)
    assert state.ref_params is None  # no second copy of the weights
    assert isinstance(state, TrainState) and state.base_params is not None
    # Optimizer state mirrors the adapters only.
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_adapters = sum(x.size for x in jax.tree.leaves(state.params))
    n_base = sum(x.size for x in jax.tree.leaves(state.base_params))
    assert n_opt < 2 * n_adapters + 10 < n_base
    batch = synthetic_batches(num=1, pairs=4, seed=0)[0]
    batch_A = train.stack_micro_batches([batch])
    n_seq = train.batch_num_sequences(batch_A)

    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), trainer.prepare_batch(batch_A, n_seq)[0])
    base_then = jax.tree.map(np.asarray, state.base_params)
    metrics = trainer.evaluate(state, batch_A, n_seq)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["rewards/margins"]) == 0.0
    state, m1 = trainer.step(state, batch_A, n_seq)
    assert m1["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    state, _ = trainer.step(state, batch_A, n_seq)
    metrics = trainer.evaluate(state, batch_A, n_seq)
    assert float(metrics["rewards/margins"]) > 0  # adapters moved the policy off the base

    # Second code path: the policy with explicitly merged weights and the reference as
    # the base model on its own (what a frozen copy of the loaded model would score).
    cfg_step = trainer.step_config
    merged = lora.merge_adapters(base, jax.device_get(state.params), lcfg.scale)
    policy = score(cfg_step.apply_fn, merged, micro, n_seq).logps_S
    ref = score(cfg_step.apply_fn, base, micro, n_seq).logps_S
    np.testing.assert_allclose(metrics["logps/chosen"], np.mean(policy[:4]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        metrics["rewards/chosen"], 0.1 * np.mean(policy[:4] - ref[:4]), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        metrics["rewards/rejected"], 0.1 * np.mean(policy[4:] - ref[4:]), rtol=1e-4, atol=1e-6
    )
    for a, b in zip(jax.tree.leaves(state.base_params), jax.tree.leaves(base_then), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # the base never moves


def test_bfloat16_base_keeps_float32_adapters():
    cfg, base = tiny_model(num_layers=1)
    lcfg = lora.LoraConfig(rank=2, alpha=2.0, targets="q,v", base_dtype="bfloat16")
    trainer, state = make_trainer((cfg, base), reference="adapters_off", lora_config=lcfg)
    assert {x.dtype for x in jax.tree.leaves(state.base_params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    batch_A = train.stack_micro_batches(synthetic_batches(num=1, pairs=2, seed=0))
    state, metrics = trainer.step(state, batch_A, train.batch_num_sequences(batch_A))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])


def test_lora_dpo_raises_held_out_reward_accuracy():
    # Mirrors test_train_e2e's full fine-tune run, with LoRA (r=8 on every linear layer
    # and the output layer: the task is a token preference) and the adapters-off
    # reference that `auto` picks.
    cfg, params = tiny_model()
    config = tiny.get_config()
    config.run_dir = ""
    config.num_steps = 24
    config.grad_accum_steps = 1
    config.optim.learning_rate = 1e-2
    config.train.eval_every = 8
    config.train.log_every = 8
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.targets = "all-linear,lm_head"
    train_batches = synthetic_batches(num=24, pairs=8, seed=10)
    held_out = synthetic_batches(num=2, pairs=8, seed=999)  # unseen prompts and completions

    result = train.train(
        config, train_data=train_batches, eval_data=held_out, model_config=cfg, params=params
    )
    assert result.trainer.step_config.reference == "adapters_off"
    assert result.state.ref_params is None
    evals = result.eval_history
    assert [e["step"] for e in evals] == [8, 16, 24]
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"] > 0
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] < math.log(2)
    # Only the adapters trained: the frozen base is bit-identical to what was loaded.
    for a, b in zip(
        jax.tree.leaves(result.state.base_params), jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_int8_base_dequantised_per_layer_matches_merged_float_weights():
    cfg = tiny_model_config(num_layers=2, scan_layers=True, dtype="float32")
    base = models.init_params(cfg, jax.random.key(0))
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets="all-linear", base_dtype="int8")
    qbase = lora.cast_base(base, lcfg)
    q = qbase["layers"]["attn"]["q"]
    assert q["kernel"].dtype == jnp.int8 and q["kernel_scale"].shape == (2, 4, 8)
    assert qbase["embed"]["embedding"].dtype == jnp.float32  # lookups stay float
    # Round trip: every weight within half a quantisation step of the float one.
    w = base["layers"]["attn"]["o"]["kernel"]
    wq = lora.dequantize_base(qbase)["layers"]["attn"]["o"]["kernel"]
    step = qbase["layers"]["attn"]["o"]["kernel_scale"][:, None, None, :]
    assert float(jnp.max(jnp.abs(wq - w) / step)) <= 0.5 + 1e-4

    adapters = _random_adapters(qbase, lcfg)
    apply = jax.jit(models.Transformer(cfg).apply)
    factored = apply({"params": lora.apply_adapters(qbase, adapters, lcfg.scale)}, IDS)
    merged = apply({"params": lora.merge_adapters(qbase, adapters, lcfg.scale)}, IDS)
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5)
    # The int8 model is close to, not equal to, the float one (quantisation error).
    off_q = apply({"params": qbase}, IDS)
    off_f = apply({"params": base}, IDS)
    err = float(jnp.max(jnp.abs(off_q - off_f)))
    assert 0 < err < 0.05 * float(jnp.max(jnp.abs(off_f)))
    logical = lora.base_logical_axes(models.logical_axes(cfg), qbase)
    assert tuple(logical["layers"]["attn"]["q"]["kernel_scale"]) == ("layers", "heads", "head_dim")
    assert tuple(logical["layers"]["attn"]["o"]["kernel_scale"]) == ("layers", "embed")


@pytest.mark.heavy
def test_int8_base_trains_from_log2_and_refuses_a_float_reference():
    cfg, base = tiny_model(num_layers=1)
    lcfg = lora.LoraConfig(rank=2, alpha=2.0, targets="all-linear", base_dtype="int8")
    trainer, state = make_trainer((cfg, base), reference="adapters_off", lora_config=lcfg)
    batch_A = train.stack_micro_batches(synthetic_batches(num=1, pairs=2, seed=0))
    n_seq = train.batch_num_sequences(batch_A)
    state, m0 = trainer.step(state, batch_A, n_seq)
    assert m0["loss"] == pytest.approx(math.log(2), abs=1e-6)
    state, m1 = trainer.step(state, batch_A, n_seq)
    assert np.isfinite(m1["loss"]) and float(m1["rewards/margins"]) != 0.0
    with pytest.raises(UserError, match="lora.base_dtype.*adapters_off"):
        lora.config_from({"rank": 2, "base_dtype": "int8"}, {"mode": "frozen"})


@pytest.mark.heavy
def test_lora_run_resumes_adapters_and_rebuilds_the_base(tmp_path):
    from dpo_jax import checkpoint
    from tests.train_helpers import StopAfter, flat_params

    cfg, params = tiny_model()
    batches = synthetic_batches(num=4, pairs=2, seed=7)  # 4 steps x A=1
    config = tiny.get_config()
    config.num_steps = 4
    config.grad_accum_steps = 1
    config.batch_size = 2
    config.train.tensorboard = False
    config.lora.rank = 2
    config.optim.learning_rate = 1e-2

    def run(run_dir, ckpt):
        config.run_dir = str(run_dir)
        return train.train(
            config, train_data=batches, model_config=cfg, params=params, checkpointer=ckpt
        )

    full = run(tmp_path / "full", None)
    opts = checkpoint.CheckpointOptions(save_every=100, async_save=False, handle_sigterm=False)

    def make_ckpt(run_dir):
        return checkpoint.Checkpointer(
            run_dir, options=opts, config=config.to_dict(), model_config=cfg,
            metrics_path=run_dir / "metrics.jsonl",
        )  # fmt: skip

    part = tmp_path / "part"
    run(part, StopAfter(make_ckpt(part), step=2))
    # The checkpoint holds the adapters and their optimizer state, not the base.
    _, _, saved = checkpoint.load_params(part)
    assert {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]} == {
        "lora_a",
        "lora_b",
    }
    resumed = run(part, make_ckpt(part))
    assert [r["step"] for r in resumed.history] == [3, 4]
    np.testing.assert_array_equal(flat_params(resumed.state.base_params), flat_params(params))
    np.testing.assert_allclose(
        flat_params(resumed.state.params), flat_params(full.state.params), rtol=1e-6, atol=1e-7
    )
