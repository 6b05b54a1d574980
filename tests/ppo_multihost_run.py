"""One process of the PPO phase in a simulated multi-host run (2 processes x 2 CPU
devices, jax.distributed on localhost), or the single-process reference (process id -1,
4 CPU devices): the same (data 2, fsdp 2) mesh either way. Run by
tests/test_ppo_multihost.py.

Arguments: process_id, port, out_dir, stop_after (stop once this many rollouts are
checkpointed, as a SIGTERM would; 0 runs to the end), and optionally the objective
(`ppo`, default, or another on-policy method: `grpo`, with 2 passes per rollout and the
k3 KL term, so its old-policy and reference scoring passes run split across hosts). Multi-host processes checkpoint into
`out_dir/run` (so a second launch resumes); process 0 writes `out_dir/<tag>.npz` (the final
params, gathered) and `out_dir/<tag>.json` (the history). Every process writes
`out_dir/<tag>_host<i>.json`: how many episodes its reward scored and how many rows it
fed each step, per call.
"""

from __future__ import annotations

import json
import os
import sys

NUM_PROCESSES = 2
_PID = int(sys.argv[1]) if len(sys.argv) > 1 else -1
_LOCAL = 4 if _PID < 0 else 2  # the same 4 devices in all
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_LOCAL}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from dpo_jax import checkpoint, sharding, train  # noqa: E402
from dpo_jax import trainer as trainer_lib  # noqa: E402
from tests import test_ppo_train as t  # noqa: E402
from tests import train_helpers as th  # noqa: E402

# Episodes: 8 prompts x 4 samples = 32 per rollout (all hosts together), 4 tokens each;
# 2 mini-batches x 2 micro-batches of 8 rows: 4 rows per host, one per device.
PPO = dict(
    num_rollouts=3, rollout_batch_size=32, samples_per_prompt=4, max_new_tokens=4,
    num_epochs=2, num_mini_batches=2, kl_coef=0.1, target_kl=0.5, kl_horizon=100.0,
)  # fmt: skip
GRAD_ACCUM = 2
OBJECTIVE = sys.argv[5] if len(sys.argv) > 5 else "ppo"
GROUP = dict(num_iterations=2, kl_coef=0.1)  # GRPO: 2 passes x 2 mini-batches per rollout


def reward(samples) -> np.ndarray:
    """Fraction of the completion's tokens in `t.GOOD`, minus 0.1 per token (multi-token
    episodes: GAE over several steps)."""
    good = np.isin(samples.tokens, t.GOOD) & samples.mask
    return (good.sum(-1) / samples.lengths - 0.1 * samples.lengths).astype(np.float32)


def config(run_dir: str):
    c = t._config(run_dir, **PPO)
    c.objective.name = OBJECTIVE
    if OBJECTIVE != "ppo":
        for k, v in GROUP.items():
            (c.grpo if k in c.grpo else c.online)[k] = v
    c.grad_accum_steps = GRAD_ACCUM
    c.mesh.multihost = "false"  # initialized by main()
    c.checkpoint.enabled = bool(run_dir)
    c.checkpoint.save_every = 1  # every step: taken at each rollout's last step
    c.checkpoint.async_save = False
    return c


def main() -> None:
    port, out_dir, stop_after = sys.argv[2], sys.argv[3], int(sys.argv[4])
    if _PID >= 0:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}", num_processes=NUM_PROCESSES,
            process_id=_PID,
        )  # fmt: skip
    assert jax.device_count() == 4 and jax.local_device_count() == _LOCAL
    tag = ("single" if _PID < 0 else "multi") + ("" if OBJECTIVE == "ppo" else f"_{OBJECTIVE}")
    calls: dict[str, list] = {"reward_episodes": [], "step_rows": []}

    def counted_reward(samples):
        calls["reward_episodes"].append(int(samples.tokens.shape[0]))
        return reward(samples)

    step = trainer_lib.Trainer.step

    def counted_step(self, state, batch_A, n_seq):
        calls["step_rows"].append(list(np.shape(batch_A["input_ids"])[:2]))
        return step(self, state, batch_A, n_seq)

    trainer_lib.Trainer.step = counted_step
    run_dir = os.path.join(out_dir, "run") if _PID >= 0 else ""
    c = config(run_dir)
    ckpt = None
    if stop_after:
        steps = stop_after * PPO["num_epochs"] * PPO["num_mini_batches"]
        ckpt = th.StopAfter(checkpoint.Checkpointer.from_config(c), steps)
    cfg, params = th.tiny_model()
    result = train.train(
        c, train_data=t._prompts(), reward=counted_reward, model_config=cfg, params=params,
        mesh=sharding.make_mesh(2, 2, 1), checkpointer=ckpt,
    )  # fmt: skip
    host = _PID if _PID >= 0 else 0
    with open(os.path.join(out_dir, f"{tag}_host{host}.json"), "w") as f:
        json.dump(calls, f)
    leaves = [
        np.asarray(multihost_utils.process_allgather(x, tiled=True))
        for x in jax.tree.leaves(result.state.params)
    ]
    if host == 0 and not stop_after:
        np.savez(os.path.join(out_dir, f"{tag}.npz"), *leaves)
        with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
            json.dump(result.history, f)


if __name__ == "__main__":
    main()
