"""One process of an online DPO phase in a simulated multi-host run (2 processes x 2 CPU
devices, jax.distributed on localhost), or the single-process reference (process id -1,
4 CPU devices): the same (data 2, fsdp 2) mesh either way. Run by
tests/test_online_dpo.py::test_online_dpo_in_two_processes_matches_one.

Arguments: process_id, port, out_dir. Process 0 writes `out_dir/<tag>.npz` (the final
params, gathered) and `out_dir/<tag>.json` (the history); every process writes
`out_dir/<tag>_host<i>.json`: the rows and n_seq it fed each step and how many
completions its reward scored per call.
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

from dpo_jax import sharding, train  # noqa: E402
from dpo_jax import trainer as trainer_lib  # noqa: E402
from tests import test_online_dpo as t  # noqa: E402
from tests import test_ppo_train as ppo_t  # noqa: E402
from tests import train_helpers as th  # noqa: E402

# 32 prompts x 2 completions = 32 pairs per rollout (all hosts together), 2 tokens each;
# 2 updates x 2 micro-batches of 8 pairs: each host feeds 4 pairs = 8 rows, its 4 pairs'
# ref_logps one per data-parallel device (`sharding.shard_batch`'s rule for a host's rows).
ONLINE = dict(
    num_rollouts=2, rollout_batch_size=64, samples_per_prompt=2, max_new_tokens=2,
    num_mini_batches=2, grad_accum_steps=2, label="bradley_terry",
)  # fmt: skip


def reward(samples) -> np.ndarray:
    """Fraction of the completion's tokens in GOOD (ties and gaps both occur)."""
    return (np.isin(samples.tokens, ppo_t.GOOD) & samples.mask).mean(-1).astype(np.float32)


def main() -> None:
    port, out_dir = sys.argv[2], sys.argv[3]
    if _PID >= 0:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}", num_processes=NUM_PROCESSES,
            process_id=_PID,
        )  # fmt: skip
    assert jax.device_count() == 4 and jax.local_device_count() == _LOCAL
    tag = "single" if _PID < 0 else "multi"
    calls: dict[str, list] = {"reward_completions": [], "step_rows": []}

    def counted_reward(samples):
        calls["reward_completions"].append(int(samples.tokens.shape[0]))
        return reward(samples)

    step = trainer_lib.Trainer.step

    def counted_step(self, state, batch_A, n_seq):
        calls["step_rows"].append([*np.shape(batch_A["input_ids"])[:2], n_seq])
        return step(self, state, batch_A, n_seq)

    trainer_lib.Trainer.step = counted_step
    c = t._config(**ONLINE)
    c.mesh.multihost = "false"  # initialized by main()
    # SGD: the final params compare tightly (Adam divides last-bit gradient differences
    # of rarely hit embedding rows by tiny second moments: whole steps of difference)
    c.optim.name = "sgd"
    c.optim.learning_rate = 0.5
    cfg, params = th.tiny_model()
    result = train.train(
        c, train_data=ppo_t._prompts(32), reward=counted_reward, model_config=cfg,
        params=params, mesh=sharding.make_mesh(2, 2, 1),
    )  # fmt: skip
    host = max(_PID, 0)
    with open(os.path.join(out_dir, f"{tag}_host{host}.json"), "w") as f:
        json.dump(calls, f)
    leaves = [
        np.asarray(multihost_utils.process_allgather(x, tiled=True))
        for x in jax.tree.leaves(result.state.params)
    ]
    if host == 0:
        np.savez(os.path.join(out_dir, f"{tag}.npz"), *leaves)
        with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
            json.dump(result.history, f)


if __name__ == "__main__":
    main()
