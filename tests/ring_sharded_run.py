"""Ring attention (context parallelism) on 8 simulated CPU devices, in ONE process.

Executed by tests/test_ring_attention.py in a subprocess (XLA_FLAGS must be set before
jax is imported): `python -m tests.ring_sharded_run CASE... MESH...`. For each case it
scores a batch (per-sequence log-probs) and runs two DPO steps with SGD on one device
and on meshes with a `sequence` axis, and prints one JSON line: per case and mesh the
largest differences from the one-device run in log-probs, loss and parameters (SGD's
update is lr * gradient, so the parameter difference is the gradient difference).
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

from dpo_jax import data, lora, models, scoring, sharding, train, train_step  # noqa: E402
from dpo_jax import trainer as trainer_lib  # noqa: E402
from tests.train_helpers import flat_params, tiny_model_config  # noqa: E402

# name: (layout, model overrides, LoRA)
CASES = {
    "stacked": ("stacked", {}, False),
    "packed": ("packed", {}, False),
    "prefix_shared": ("prefix_shared", {}, False),
    # Mistral-style sliding window + Gemma-2-style soft-capping, on a GQA model
    "window_softcap": ("packed", {"sliding_window": 12, "attn_logit_softcap": 5.0}, False),
    "lora": ("prefix_shared", {}, True),
    # all-to-all variant: 4 heads and 2 kv heads divide a sequence axis of 2
    "ulysses": ("prefix_shared", {"attention_impl": "ulysses"}, False),
}
# name: (data, fsdp, tensor, sequence); each row is longer than one device's share
MESHES = {
    "seq2": (1, 1, 1, 2),
    "seq4": (1, 1, 1, 4),
    "seq8": (1, 1, 1, 8),
    "data2-fsdp2-seq2": (2, 2, 1, 2),
}


def _batch(layout: str) -> dict:
    rng = np.random.default_rng(0)
    draw = lambda lo, hi: rng.integers(3, 60, rng.integers(lo, hi))
    items = [dict(prompt=draw(20, 50), chosen=draw(5, 30), rejected=draw(5, 30)) for _ in range(4)]
    return train.stack_micro_batches([data.build_batch(items, "paired", layout)])


def _run(case: str, mesh: jax.sharding.Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    layout, overrides, with_lora = CASES[case]
    cfg = tiny_model_config(**{"attention_impl": "auto", "attention_block": 16, **overrides})
    params = models.init_params(cfg, jax.random.key(0))
    batch_A = _batch(layout)
    trainer, state = trainer_lib.build_trainer(
        cfg, params, mesh=mesh,
        optim_config=dict(name="sgd", learning_rate=0.5, schedule="constant"),
        total_steps=2, reference="frozen",
        lora_config=lora.LoraConfig(rank=4) if with_lora else None,
        **train_step.default_settings(loss_name="sigmoid", loss_hyper={"beta": 0.1}),
    )  # fmt: skip
    micro = {k: v[0] for k, v in batch_A.items()}
    score = jax.jit(lambda p, b: scoring.score(models.Transformer(cfg).apply, p, b, 8).logps_S)
    with trainer.mesh_context():
        logps = np.asarray(score(params, micro))
        # the split really ran: the ring's K/V rotation is a collective permute,
        # Ulysses' head/length trade an all-to-all
        text = score.lower(params, micro).as_text()
        split = "collective_permute" in text or "all_to_all" in text
    losses = []
    for _ in range(2):
        state, m = trainer.step(state, batch_A, 8)
        losses.append(float(m["loss"]))
    return logps, np.array(losses), flat_params(state.params), split


def main(cases: list[str], meshes: list[str]) -> None:
    out = {}
    for case in cases:
        base = _run(case, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
        out[case] = {"length": int(_batch(CASES[case][0])["input_ids"].shape[-1])}
        for name in meshes:
            d, f, t, s = MESHES[name]
            devices = jax.devices()[: d * f * t * s]
            got = _run(case, sharding.make_mesh(d, f, t, devices, sequence=s))
            out[case][name] = {
                key: float(np.abs(a - b).max())
                for key, a, b in zip(("logps", "loss", "params"), got[:3], base[:3], strict=True)
            }
            out[case][name]["split"] = got[3]
        out[case]["loss_change"] = float(base[1][0] - base[1][1])
    print(json.dumps(out))


if __name__ == "__main__":
    args = sys.argv[1:]
    main([a for a in args if a in CASES], [a for a in args if a in MESHES])
