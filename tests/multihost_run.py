"""One process of a simulated multi-host run (2 processes x 2 CPU devices each).

Run by tests/test_train_multihost.py: every process initializes jax.distributed on
localhost, feeds only ITS slice of every global batch, and process 0 writes the loss
curve and final params. Argument: process_id, port, output directory.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.experimental.multihost_utils  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402

from dpo_jax import data, sharding, train  # noqa: E402
from dpo_jax.configs import tiny  # noqa: E402
from tests.train_helpers import synthetic_items, tiny_model  # noqa: E402

NUM_PROCESSES = 2


def global_batches() -> list[list[dict]]:
    """Per step: the global list of pairs (4 per micro-batch, 2 micro-batches)."""
    items = synthetic_items(24, seed=21)
    return [items[i : i + 4] for i in range(0, 24, 4)]


def host_batches(process_id: int, process_count: int) -> list[dict]:
    out = []
    for pairs in global_batches():
        per = len(pairs) // process_count
        mine = pairs[process_id * per : (process_id + 1) * per]
        b = data.build_batch(mine, "paired", "stacked", length=16)
        out.append(b)
    return out


def run(process_id: int, process_count: int, mesh) -> dict:
    cfg, params = tiny_model()
    config = tiny.get_config()
    config.run_dir = ""
    config.num_steps = 3
    config.grad_accum_steps = 2
    config.mesh.multihost = "false"  # initialized by main() below
    res = train.train(
        config, train_data=host_batches(process_id, process_count), model_config=cfg,
        params=params, mesh=mesh,
    )  # fmt: skip
    params_np = [
        np.asarray(
            jax.device_get(jax.experimental.multihost_utils.process_allgather(x, tiled=True))
        )
        for x in jax.tree.leaves(res.state.params)
    ]
    return {"losses": [r["loss"] for r in res.history], "params": params_np}


def main() -> None:
    process_id, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if process_id < 0:  # single-process reference run on 1 device
        mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        result = run(0, 1, mesh)
    else:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}", num_processes=NUM_PROCESSES,
            process_id=process_id,
        )  # fmt: skip
        assert jax.device_count() == 4 and jax.local_device_count() == 2
        mesh = sharding.make_mesh(2, 2, 1)
        result = run(process_id, NUM_PROCESSES, mesh)
        if process_id != 0:
            return
    tag = "single" if process_id < 0 else "multi"
    np.savez(os.path.join(out_dir, f"{tag}.npz"), *result["params"])
    with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
        json.dump(result["losses"], f)


if __name__ == "__main__":
    main()
