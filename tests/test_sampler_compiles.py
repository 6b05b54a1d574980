"""The sampler compiles once: successive rollouts and rounds reuse its programs.

An on-policy run calls `sampling.generate` once per rollout with new prompts (same
bucket), a new key and, after each update, new parameter values, always with the same
`SamplingConfig`. Every one of those calls after the first must reuse the compiled
prefill and decode programs: a recompile per rollout would cost more than the rollout.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import jax
import numpy as np
import pytest

from dpo_jax import models, sampling

# jax records this around every XLA compile, persistent-cache hits included: it counts
# each executable jax had to build, which is what a recompile costs.
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compiles() -> Iterator[collections.Counter[str]]:
    """Counts XLA compilations by jitted function name while the test runs."""
    counts: collections.Counter[str] = collections.Counter()

    def listener(event: str, duration: float, **kwargs: object) -> None:
        if event == BACKEND_COMPILE:
            counts[str(kwargs.get("fun_name", "?"))] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_rollouts_and_rounds_compile_the_sampler_once(compiles):
    # A shape no other test uses, so the first call below is this program's first.
    cfg = models.ModelConfig.tiny("llama", vocab_size=53, hidden_size=24)
    model = models.Transformer(cfg)
    params = models.init_params(cfg, jax.random.key(0))
    # Later rounds' parameters: new values, same shapes (made here: eager ops compile too)
    updated = [jax.tree.map(lambda p, s=s: p * s, params) for s in (1.01, 0.99)]
    config = sampling.SamplingConfig(max_new_tokens=6, n=2, eos_token_ids=(7,), prompt_buckets=(8,))
    rng = np.random.default_rng(0)

    def rollout(params, seed: int) -> sampling.SampleOutput:
        # 3 prompts of 1..8 tokens: always the 8-token bucket, a different padding each time
        prompts = [rng.integers(1, 53, size=rng.integers(1, 9)).tolist() for _ in range(3)]
        return sampling.generate(model, params, prompts, jax.random.key(seed), config)

    compiles.clear()
    rollout(params, 0)
    first = dict(compiles)
    assert first.get("jit(_prefill_core)") == 1 and first.get("jit(_decode_core)") == 1, first

    compiles.clear()
    outs = [rollout(params, seed) for seed in (1, 2, 3)]  # rollouts: new prompts, new keys
    outs += [rollout(p, 10 + i) for i, p in enumerate(updated)]  # rounds: new parameters
    assert not compiles, f"rollouts after the first compiled again: {dict(compiles)}"
    assert len({o.tokens.tobytes() for o in outs}) == len(outs)  # they did sample anew

    prefill = sampling._prefill_program(model, cfg, config.max_new_tokens)
    decode = sampling._decode_program(model, cfg, sampling._static(config, False))
    assert prefill._cache_size() == 1 and decode._cache_size() == 1
