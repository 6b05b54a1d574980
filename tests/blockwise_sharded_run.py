"""Blockwise attention on data/fsdp-sharded meshes of 4 CPU devices, in ONE process.

Executed by tests/test_attention.py (heavy) in a subprocess (XLA_FLAGS must be set before
jax is imported). Two prefix-shared DPO steps per mesh; prints one JSON line with the
largest loss and parameter differences from the 1-device dense (xla) run.
"""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpo_jax import data, models, sharding, train, train_step  # noqa: E402
from dpo_jax import trainer as trainer_lib  # noqa: E402
from tests.train_helpers import flat_params, tiny_model_config  # noqa: E402

RUNS = {
    "1dev-xla": (None, "xla"),
    "1dev-blockwise": (None, "blockwise"),
    "2x2x1-blockwise": ((2, 2, 1), "blockwise"),
    "4x1x1-blockwise": ((4, 1, 1), "blockwise"),
}


def main() -> None:
    rng = np.random.default_rng(0)
    draw = lambda lo, hi: rng.integers(3, 60, rng.integers(lo, hi))
    items = [dict(prompt=draw(10, 40), chosen=draw(5, 20), rejected=draw(5, 20)) for _ in range(4)]
    batch_A = train.stack_micro_batches([data.build_batch(items, "paired", "prefix_shared")])
    results = {}
    for name, (shape, impl) in RUNS.items():
        cfg = tiny_model_config(attention_impl=impl, attention_block=16)
        params = models.init_params(cfg, jax.random.key(0))
        if shape is None:
            mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        else:
            mesh = sharding.make_mesh(*shape)
        trainer, state = trainer_lib.build_trainer(
            cfg, params, mesh=mesh,
            optim_config=dict(name="sgd", learning_rate=0.5, schedule="constant"),
            total_steps=2, reference="frozen",
            **train_step.default_settings(loss_name="sigmoid", loss_hyper={"beta": 0.1}),
        )  # fmt: skip
        losses = []
        for _ in range(2):
            state, m = trainer.step(state, batch_A, 8)
            losses.append(float(m["loss"]))
        results[name] = (np.array(losses), flat_params(state.params))
    base_loss, base_params = results["1dev-xla"]
    out = {
        name: {
            "loss_diff": float(np.abs(loss - base_loss).max()),
            "param_diff": float(np.abs(p - base_params).max()),
            "loss_change": float(loss[0] - loss[1]),
        }
        for name, (loss, p) in results.items()
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
