"""The DPO paper's optimisation recipe (Rafailov et al. 2023, appendix B).

RMSprop, learning rate 1e-6, linear warm-up from 0 over 150 steps, batch size 64,
beta 0.1 (0.5 for the controlled-sentiment runs). `get_config("sentiment")` uses 0.5.
"""

from __future__ import annotations

import ml_collections

from dpo_jax.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Default config with the paper's optimizer settings."""
    c = default.get_config()
    c.optim.name = "rmsprop"
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 150
    c.optim.schedule = "constant"
    c.optim.max_grad_norm = 10.0
    c.batch_size = 64
    c.loss.name = "sigmoid"
    c.loss.hyper.beta = 0.5 if arg == "sentiment" else 0.1
    return c
