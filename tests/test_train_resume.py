"""Checkpoint hooks of the loop: a run stopped at a step boundary resumes to the same result."""

from __future__ import annotations

import jax
import numpy as np

from dpo_jax import checkpoint, train
from dpo_jax.configs import tiny
from dpo_jax.metrics import read_jsonl
from tests.train_helpers import StopAfter, flat_params, synthetic_batches, tiny_model


def test_preempted_run_resumes_to_the_same_params_and_metrics(tmp_path):
    cfg, params = tiny_model()
    batches = synthetic_batches(num=8, pairs=2, seed=7)  # 4 steps x A=2
    config = tiny.get_config()
    config.num_steps = 4
    config.train.tensorboard = False

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

    part_dir = tmp_path / "part"
    first = run(part_dir, StopAfter(make_ckpt(part_dir), step=2))
    assert [r["step"] for r in first.history] == [1, 2]
    assert int(first.state.step) == 2
    resumed = run(part_dir, make_ckpt(part_dir))
    assert [r["step"] for r in resumed.history] == [3, 4]
    # the reference was not checkpointed (it is the initial policy) and was rebuilt
    np.testing.assert_array_equal(flat_params(resumed.state.ref_params), flat_params(params))
    np.testing.assert_allclose(
        flat_params(resumed.state.params), flat_params(full.state.params), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        flat_params(resumed.state.opt_state),
        flat_params(full.state.opt_state),
        rtol=1e-6,
        atol=1e-7,
    )
    rows = read_jsonl(part_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [r["loss"] for r in rows], [r["loss"] for r in full.history], rtol=1e-6
    )


def test_sigterm_during_the_last_step_still_runs_the_final_evaluation(tmp_path):
    """A stop request at the last step ends the run as a complete one: the final
    evaluation row is written (an experiment phase then counts as finished and reads it;
    before the fix it finished without that row)."""
    cfg, params = tiny_model()
    batches = synthetic_batches(num=8, pairs=2, seed=7)
    config = tiny.get_config()
    config.num_steps, config.train.tensorboard, config.train.eval_every = 4, False, 2
    calls = []

    def eval_hook(step, p):
        calls.append(step)
        return {"eval/sum": float(sum(np.sum(x) for x in jax.tree.leaves(p)))}

    def run(run_dir, ckpt):
        config.run_dir = str(run_dir)
        return train.train(config, train_data=batches, model_config=cfg, params=params,
                           checkpointer=ckpt, eval_hook=eval_hook)  # fmt: skip

    opts = checkpoint.CheckpointOptions(save_every=100, async_save=False, handle_sigterm=False)
    ckpt = checkpoint.Checkpointer(tmp_path, options=opts, config=config.to_dict(),
                                   model_config=cfg, metrics_path=tmp_path / "metrics.jsonl")  # fmt: skip
    result = run(tmp_path, StopAfter(ckpt, step=4))
    assert int(result.state.step) == 4 and calls == [2, 4]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/sum" in r] == [2, 4]
    final = float(sum(np.sum(x) for x in jax.tree.leaves(result.state.params)))
    assert [r for r in rows if "eval/sum" in r][-1]["eval/sum"] == final
    assert checkpoint.Checkpointer(tmp_path, options=opts).latest_step() == 4
