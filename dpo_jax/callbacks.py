"""Callbacks of the training loop: code of yours run on log, evaluation and save.

    cb = callbacks.Callbacks(on_log=..., on_eval=..., on_save=...)
    train.train(config, callbacks=cb)

Every field is optional; each runs on every process (guard side effects with
`jax.process_index() == 0`). README "Callbacks" has an `on_eval` that samples from the
policy and scores a win rate against the reference every N steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Callbacks:
    """Functions `loop.run_loop` calls.

    on_log(step, row): after each metrics row is written (training rows every
        `train.log_every` steps, and evaluation rows), `row` as in metrics.jsonl.
    on_eval(step, params) -> {name: float} | None: at each evaluation (every
        `train.eval_every` steps and at the end, with or without held-out data), after the
        held-out metrics; what it returns joins that step's evaluation row (metrics.jsonl,
        TensorBoard, W&B), written before the step's checkpoint. `params` are the policy's
        (with LoRA, the adapters; `train.TrainResult.trainer` and `lora` merge them).
    on_save(step, directory): after the checkpoint of `step` was started, `directory`
        its step directory (an async save completes in the background).
    """

    on_log: Callable[[int, Mapping[str, Any]], None] | None = None
    on_eval: Callable[[int, Any], Mapping[str, float] | None] | None = None
    on_save: Callable[[int, Any], None] | None = None
