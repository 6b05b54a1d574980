"""The PPO phase on a 1-device mesh and on 8 CPU devices (data 2 x fsdp 2 x tensor 2: the
vocabulary is padded and sharded), in ONE process. Executed by tests/test_ppo_train.py in
a subprocess (XLA_FLAGS must be set before jax is imported); writes each mesh's
history (a row per optimizer step) and value head to a JSON file."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpo_jax import sharding, train  # noqa: E402
from tests import test_ppo_train as t  # noqa: E402
from tests import train_helpers as th  # noqa: E402


def main(out_path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    model_config, params = th.tiny_model()  # hidden 32 and GQA heads divide every mesh axis
    prompts = t._prompts()
    out = {}
    for name, mesh in (
        ("1dev", sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])),
        ("2x2x2", sharding.make_mesh(2, 2, 2)),
    ):
        config = t._config(num_rollouts=2)
        result = train.train(
            config,
            train_data=prompts,
            reward=t._reward,
            model_config=model_config,
            params=params,
            mesh=mesh,
        )
        head = jax.device_get(result.state.params["head"])
        spec = result.state.params["model"]["embed"]["embedding"].sharding.spec
        out[name] = dict(
            history=result.history,
            head=np.asarray(head["kernel"]).tolist(),
            embed_spec=[str(a) for a in spec],
        )
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
