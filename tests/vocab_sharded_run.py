"""A tiny run with a vocabulary (100) that divides no tensor axis, on 1 device and on
(1, 1, 2) and (2, 2, 2) meshes of 8 simulated CPU devices.

Executed by tests/test_vocab_padding.py in a subprocess (XLA_FLAGS must be set before
jax is imported). Writes per mesh the vocab sizes, the embedding's and its Adam moments'
PartitionSpecs, the losses and the exported (stripped) embedding to specs.json.
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

from dpo_jax import cli, models, sharding, train  # noqa: E402
from dpo_jax.configs import tiny  # noqa: E402
from tests.train_helpers import synthetic_batches, tiny_model_config  # noqa: E402

MESHES = {"1dev": None, "1x1x2": (1, 1, 2), "2x2x2": (2, 2, 2)}


def _spec(x) -> list:
    return [None if a is None else str(a) for a in x.sharding.spec]


def main(out_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    cfg = tiny_model_config(vocab_size=100, num_layers=1)
    params0 = models.init_params(cfg, jax.random.key(0))
    batches = synthetic_batches(num=4, pairs=4, seed=1)
    config = tiny.get_config()
    config.run_dir = ""
    config.num_steps = 2
    config.grad_accum_steps = 2
    specs = {}
    for name, shape in MESHES.items():
        if shape is None:
            mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        else:
            mesh = sharding.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
        # the (2, 2, 2) run checkpoints, and `dpo-jax export` writes the real vocabulary
        ckpt = name == "2x2x2"
        config.run_dir = os.path.join(out_dir, name) if ckpt else ""
        config.checkpoint.enabled = ckpt
        config.train.tensorboard = False
        res = train.train(config, train_data=batches, model_config=cfg, params=params0, mesh=mesh)
        mcfg = res.trainer.model_config
        embed = res.state.params["embed"]["embedding"]
        [adam] = [
            x for x in jax.tree.leaves(res.state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(x, "mu")
        ]  # fmt: skip
        _, exported = models.strip_vocab(mcfg, jax.device_get(res.state.params))
        specs[name] = {
            "model_vocab": [mcfg.vocab_size, mcfg.embed_vocab_size],
            "embed": _spec(embed),
            "embed_shard_shape": list(embed.addressable_shards[0].data.shape),
            "mu_embed": _spec(adam.mu["embed"]["embedding"]),
            "nu_embed": _spec(adam.nu["embed"]["embedding"]),
            "losses": [r["loss"] for r in res.history],
            "exported_embed": np.asarray(exported["embed"]["embedding"]).tolist(),
        }
        if ckpt:
            from safetensors.numpy import load_file

            out = os.path.join(out_dir, "export")
            assert cli.main(["export", "--checkpoint", config.run_dir, "--output", out]) == 0
            with open(os.path.join(out, "config.json")) as f:
                specs[name]["cli_vocab"] = json.load(f)["vocab_size"]
            tensors = load_file(os.path.join(out, "model.safetensors"))
            specs[name]["cli_embed"] = tensors["model.embed_tokens.weight"].tolist()
    with open(os.path.join(out_dir, "specs.json"), "w") as f:
        json.dump(specs, f)


if __name__ == "__main__":
    main(sys.argv[1])
