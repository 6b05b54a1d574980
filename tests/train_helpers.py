"""Shared pieces of the training tests: a tiny model and synthetic preference batches.

Synthetic task: prompts are random tokens; chosen completions draw from a "good" token
range and rejected ones from a "bad" range, so a policy can learn the preference and
generalise it to held-out prompts.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from dpo_jax import data, models, sampling, sharding, train, train_step
from dpo_jax import trainer as trainer_lib

VOCAB = 64
GOOD = (30, 45)
BAD = (45, 60)
EOS = 1


def tiny_model_config(**overrides) -> models.ModelConfig:
    """2-layer Llama-style model, GQA, hidden 32: every mesh axis divides its dims."""
    kw = dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    kw.update(overrides)
    return models.ModelConfig(**kw)


def tiny_model(num_layers: int = 1) -> tuple[models.ModelConfig, Any]:
    """(config, params) of `tiny_model_config`; one block by default: half the compile
    time of two, same code paths."""
    cfg = tiny_model_config(num_layers=num_layers)
    return cfg, models.init_params(cfg, jax.random.key(0))


@functools.cache
def one_device_mesh() -> jax.sharding.Mesh:
    """A (1, 1, 1) mesh on the first device, built once per process."""
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def make_trainer(
    model: tuple[models.ModelConfig, Any],
    reference: str = "frozen",
    loss: str = "sigmoid",
    hyper: dict | None = None,
    optim_cfg: dict | None = None,
    **kw: Any,
) -> tuple[trainer_lib.Trainer, train.TrainState]:
    """`trainer_lib.build_trainer` on `one_device_mesh` with the tests' defaults (DPO, beta 0.1,
    AdamW lr 1e-2 with clipping, 10 total steps). `kw`: step settings
    (`train_step.default_settings`) and `build_trainer`'s other keywords."""
    cfg, params = model
    optim_cfg = optim_cfg or dict(
        name="adamw", learning_rate=1e-2, schedule="constant", max_grad_norm=1.0
    )
    settings = train_step.default_settings(loss_name=loss, loss_hyper=hyper or {"beta": 0.1})
    settings.update({k: kw.pop(k) for k in list(kw) if k in settings})
    return trainer_lib.build_trainer(
        cfg, params, mesh=one_device_mesh(), optim_config=optim_cfg, total_steps=10,
        reference=reference, **settings, **kw,
    )  # fmt: skip


def flat_params(tree: Any) -> np.ndarray:
    """All leaves of `tree` as one flat numpy vector (to compare whole param trees)."""
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


def synthetic_items(n: int, seed: int) -> list[dict]:
    """`n` tokenized pairs: random prompt, chosen from GOOD tokens, rejected from BAD."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        prompt = rng.integers(3, 30, size=rng.integers(2, 6)).astype(np.int32)
        chosen = np.r_[rng.integers(*GOOD, size=rng.integers(2, 5)), EOS].astype(np.int32)
        rejected = np.r_[rng.integers(*BAD, size=rng.integers(2, 5)), EOS].astype(np.int32)
        items.append(dict(prompt=prompt, chosen=chosen, rejected=rejected))
    return items


def synthetic_batches(num: int, pairs: int, seed: int, length: int = 16) -> list[dict]:
    """`num` stacked micro-batches of `pairs` pairs each, rows padded to `length`."""
    items = synthetic_items(num * pairs, seed)
    return [
        data.build_batch(items[i * pairs : (i + 1) * pairs], "paired", "stacked", length=length)
        for i in range(num)
    ]


class StopAfter:
    """Wraps a Checkpointer and raises the preemption flag after `step` (like SIGTERM)."""

    def __init__(self, inner: Any, step: int):
        self.inner, self.stop_step = inner, step

    def restore_or_none(self, abstract):
        return self.inner.restore_or_none(abstract)

    def maybe_save(self, step, state, data_state=None, extra=None, force=False):
        if step == self.stop_step:
            self.inner.request_stop()
        return self.inner.maybe_save(step, state, data_state, extra, force)

    @property
    def preempted(self):
        return self.inner.preempted

    def close(self):
        self.inner.close()


def sample_output(
    prompts: list[list[int]], completions: list[list[int]], finished: Any = None
) -> sampling.SampleOutput:
    """A `SampleOutput` holding these prompt and completion ids as the sampler lays them out
    (prompts left-padded, completions right-padded, with 0), for reward tests."""
    width, steps = max(map(len, prompts)), max(map(len, completions))
    rows = len(prompts)
    return sampling.SampleOutput(
        prompt_ids=np.array([[0] * (width - len(p)) + p for p in prompts], np.int32),
        prompt_lengths=np.array([len(p) for p in prompts], np.int32),
        tokens=np.array([c + [0] * (steps - len(c)) for c in completions], np.int32),
        lengths=np.array([len(c) for c in completions], np.int32),
        logps=np.zeros((rows, steps), np.float32),
        sampling_logps=np.zeros((rows, steps), np.float32),
        finished=np.zeros(rows, bool) if finished is None else np.asarray(finished, bool),
        prompt_index=np.arange(rows, dtype=np.int32),
        config=sampling.SamplingConfig(),
    )
