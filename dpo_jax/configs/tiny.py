"""A test-sized run on CPU: point it at a tiny checkpoint and a JSONL file.

    dpo-jax train --config dpo_jax/configs/tiny.py \
        --config.model.path=DIR --config.data.train=train.jsonl --config.run_dir=OUT
"""

from __future__ import annotations

import ml_collections

from dpo_jax.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Small batches, a few steps, float32, no progress bar."""
    c = default.get_config(arg)
    c.model.dtype = "float32"
    c.data.max_length = 32
    c.data.max_prompt_length = 16
    c.batch_size = 4
    c.grad_accum_steps = 2
    c.num_steps = 4
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "constant"
    c.train.log_every = 1
    c.train.progress = False
    c.train.tensorboard = True
    # Tests train many runs: checkpoints only where a test asks (the default keeps them)
    c.checkpoint.enabled = False
    # On-policy objectives: two short rollouts of 8 completions.
    c.online.num_rollouts = 2
    c.online.rollout_batch_size = 8
    c.online.max_new_tokens = 8
    return c
