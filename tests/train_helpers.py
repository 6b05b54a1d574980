"""Shared pieces of the training tests: a tiny model and synthetic preference batches.

Synthetic task: prompts are random tokens; chosen completions draw from a "good" token
range and rejected ones from a "bad" range, so a policy can learn the preference and
generalise it to held-out prompts.
"""

from __future__ import annotations

import numpy as np

from dpo_jax import data, models

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
