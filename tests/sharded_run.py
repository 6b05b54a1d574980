"""Run the same tiny training on several meshes in ONE process with 8 CPU devices.

Executed by tests/test_sharding.py in a subprocess (XLA_FLAGS must be set before jax
is imported). Writes, per mesh, the loss curve, the final params and each param's
PartitionSpec to an .npz / .json under the output directory.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpo_jax import models, sharding, train  # noqa: E402
from dpo_jax.configs import tiny  # noqa: E402
from tests.train_helpers import synthetic_batches, tiny_model_config  # noqa: E402

MESHES = {"1dev": None, "8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}


def main(out_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    cfg = tiny_model_config()
    params0 = models.init_params(cfg, jax.random.key(0))
    batches = synthetic_batches(num=6, pairs=4, seed=1)  # A=2 micro-batches x 3 steps
    config = tiny.get_config()
    config.run_dir = ""
    config.num_steps = 3
    config.grad_accum_steps = 2
    config.optim.weight_decay = 0.01
    specs = {}
    for name, shape in MESHES.items():
        if shape is None:
            mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        else:
            mesh = sharding.make_mesh(*shape)
        res = train.train(config, train_data=batches, model_config=cfg, params=params0, mesh=mesh)
        # the tensor axis pads the vocabulary (64 -> 256); compare the real rows
        _, real = models.strip_vocab(res.trainer.model_config, jax.device_get(res.state.params))
        flat = {
            jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(real)
        }
        mu = res.state.opt_state
        specs[name] = {
            "params": {
                jax.tree_util.keystr(p): [str(a) for a in x.sharding.spec]
                for p, x in jax.tree_util.tree_leaves_with_path(res.state.params)
            },
            "shard_shapes": {
                jax.tree_util.keystr(p): list(x.addressable_shards[0].data.shape)
                for p, x in jax.tree_util.tree_leaves_with_path(res.state.params)
            },
            "opt_specs": sorted(
                {str(x.sharding.spec) for x in jax.tree.leaves(mu) if hasattr(x, "sharding")}
            ),
            "ref_specs_equal": all(
                a.sharding == b.sharding
                for a, b in zip(
                    jax.tree.leaves(res.state.ref_params),
                    jax.tree.leaves(res.state.params),
                    strict=True,
                )
            ),
            "losses": [r["loss"] for r in res.history],
            "accuracies": [r["rewards/accuracies"] for r in res.history],
            "grad_norms": [r["grad_norm"] for r in res.history],
            "num_devices": len(mesh.devices.flat),
        }
        np.savez(os.path.join(out_dir, f"{name}.npz"), **flat)
    with open(os.path.join(out_dir, "specs.json"), "w") as f:
        json.dump(specs, f)


if __name__ == "__main__":
    main(sys.argv[1])
