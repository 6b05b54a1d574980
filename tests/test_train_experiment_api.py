"""`train.train`'s experiment API: `model_config=` + `params=`, `eval_hook` rows across a resume, and
`dry_run=True` lowering exactly the program the run executes."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dpo_jax import models, train
from dpo_jax.configs import tiny
from dpo_jax.metrics import read_jsonl
from tests.train_helpers import flat_params, synthetic_batches, tiny_model


def _config(run_dir) -> object:
    config = tiny.get_config()
    config.run_dir = str(run_dir)
    config.num_steps = 4
    config.grad_accum_steps = 1
    config.train.eval_every = 2
    config.train.tensorboard = False
    return config


def _hook(calls: list):
    def hook(step, params):
        calls.append(step)
        # A number that depends on the params: a resumed run must reproduce it.
        return {"eval/param_sum": float(sum(np.sum(x) for x in jax.tree.leaves(params)))}

    return hook


@pytest.mark.heavy  # three train() runs (~35 s on the shared box); the default suite's
# sentiment kill test covers eval rows and generator data across a resume end to end
def test_eval_hook_rows_survive_a_kill_and_resume(tmp_path):
    model_config, params = tiny_model()
    batches = synthetic_batches(num=4, pairs=2, seed=3)
    calls: list[int] = []
    full = train.train(
        _config(tmp_path / "full"),
        train_data=batches,
        model_config=model_config,
        params=params,
        eval_hook=_hook(calls),
    )
    assert calls == [2, 4]
    full_rows = [
        r for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if "eval/param_sum" in r
    ]
    assert [r["step"] for r in full_rows] == [2, 4]
    assert [r["step"] for r in full.eval_history] == [2, 4]
    # The hook saw the params of its step: the last one is the final state's.
    final_sum = float(sum(np.sum(x) for x in jax.tree.leaves(full.state.params)))
    np.testing.assert_allclose(full_rows[-1]["eval/param_sum"], final_sum, rtol=1e-6)

    # The same run with checkpoints, killed while fetching step 4's batch (after the
    # step-2 save and step 3's metrics row), then rerun with the same command.
    config = _config(tmp_path / "part")
    config.checkpoint.enabled = True
    config.checkpoint.save_every = 2
    config.checkpoint.async_save = False

    class Killed(Exception):
        pass

    def dies_at_step_4():
        yield from batches[:3]
        raise Killed

    calls_a: list[int] = []
    with pytest.raises(Killed):
        train.train(
            config,
            train_data=dies_at_step_4(),
            model_config=model_config,
            params=params,
            eval_hook=_hook(calls_a),
        )
    assert calls_a == [2]
    calls_b: list[int] = []
    # A generator: the resume skips the 2 restored steps' batches of it, from its start.
    resumed = train.train(
        config,
        train_data=iter(batches),
        model_config=model_config,
        params=params,
        eval_hook=_hook(calls_b),
    )
    assert calls_b == [4]  # step 2's eval row came from the first process
    rows = [r for r in read_jsonl(tmp_path / "part" / "metrics.jsonl") if "eval/param_sum" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert [r["eval/param_sum"] for r in rows] == [r["eval/param_sum"] for r in full_rows]
    np.testing.assert_array_equal(flat_params(resumed.state.params), flat_params(full.state.params))


def test_dry_run_lowers_the_program_the_run_executes(tmp_path):
    cfg, params = tiny_model()
    batches = synthetic_batches(num=4, pairs=2, seed=3)
    config = _config(tmp_path / "run")
    run = train.train(config, train_data=batches, model_config=cfg, params=params)
    executed = run.trainer.lower(run.state, train.stack_micro_batches(batches[:1]), 4).as_text()
    # The run compiled exactly one train program, and lowering it again is that program.
    assert len(run.trainer._train_fns) == 1

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), models.init_params(cfg, jax.random.key(1))
    )
    dry = train.train(
        _config(tmp_path / "dry"),
        train_data=batches,
        model_config=cfg,
        params=abstract,
        dry_run=True,
    )
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(dry.state))
    assert dry.lowered.as_text() == executed
    memory = dry.lowered.compile().memory_analysis()
    assert memory.argument_size_in_bytes >= 4 * models.param_count(cfg)
