"""Optax optimizers and learning-rate schedules for preference training.

AdamW (TRL's default) and RMSprop (the DPO paper: lr 1e-6, 150 linear warm-up steps,
batch 64), linear / cosine / constant schedules with linear warm-up, global-norm
clipping, and a weight-decay mask that skips norms and biases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec

from dpo_jax import configs

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "rmsprop", "sgd")

# Leaf names that are never weight-decayed (HF Trainer skips biases and LayerNorm weights).
_NO_DECAY_LEAF_NAMES = ("bias", "scale")


def make_schedule(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "linear",
    final_lr_fraction: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then constant / linear / cosine decay.

    Matches transformers' `get_linear_schedule_with_warmup` and
    `get_cosine_schedule_with_warmup`: lr(step) = lr * step / warmup during warm-up, then
    decays to `final_lr_fraction * lr` at `total_steps`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} and total_steps={total_steps} must be >= 0")
    warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    decay_steps = max(total_steps - warmup_steps, 1)
    end = learning_rate * final_lr_fraction
    if schedule == "constant":
        after = optax.constant_schedule(learning_rate)
    elif schedule == "linear":
        after = optax.linear_schedule(learning_rate, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=final_lr_fraction)
    if warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


def _path_names(path: tuple[Any, ...]) -> list[str]:
    names = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        names.append(str(key))
    return names


def weight_decay_mask(params: Any, logical_axes: Any | None = None) -> Any:
    """Pytree of bools: True where weight decay applies.

    Skipped: biases and norm scales, recognised by leaf name (`bias`, `scale`, any path
    entry containing `norm` or starting with `ln`) and, when `logical_axes` is given, by
    having at most one logical dimension besides `layers` or a `norm` axis. The logical
    test keeps a scanned model's `[layers, D]` norm scale out of decay, which a rank test
    alone would decay.
    """

    def decays(path: tuple[Any, ...], leaf: Any, spec: Any = None) -> bool:
        names = [n.lower() for n in _path_names(path)]
        if names and names[-1] in _NO_DECAY_LEAF_NAMES:
            return False
        if any("norm" in n or n.startswith("ln") for n in names):
            return False
        if spec is not None:
            dims = [d for d in tuple(spec) if d != "layers"]
            if "norm" in dims or len(dims) <= 1:
                return False
        return getattr(leaf, "ndim", 0) >= 2

    if logical_axes is None:
        return jax.tree_util.tree_map_with_path(decays, params)
    return jax.tree_util.tree_map_with_path(
        decays, params, logical_axes, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def make_optimizer(
    config: Mapping[str, Any],
    total_steps: int,
    params: Any | None = None,
    logical_axes: Any | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The configured optimizer chain and its schedule.

    `config` keys (ml_collections ConfigDict or dict): name (adamw | rmsprop | sgd),
    learning_rate, warmup_steps, schedule, final_lr_fraction, weight_decay,
    max_grad_norm (<= 0 disables clipping), b1, b2, eps (adamw), decay, eps, momentum
    (rmsprop); a key it lacks takes `configs/default.py`'s `optim` value (the only
    default), a key that section lacks is refused. `params`/`logical_axes` feed the
    weight-decay mask.

    RMSprop follows torch.optim.RMSprop (what the DPO paper ran): eps outside the square
    root, smoothing 0.99, L2 weight decay added to the gradient.
    """
    c = configs.complete_section("optim", config)  # defaults: configs/default.py only
    name = c["name"]
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    schedule = make_schedule(
        float(c["learning_rate"]),
        total_steps,
        int(c["warmup_steps"]),
        c["schedule"],
        float(c["final_lr_fraction"]),
    )
    weight_decay = float(c["weight_decay"])
    mask: Any = None
    if params is not None:
        mask = weight_decay_mask(params, logical_axes)
    parts: list[optax.GradientTransformation] = []
    max_grad_norm = float(c["max_grad_norm"])
    if max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    if name == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=float(c["b1"]),
                b2=float(c["b2"]),
                eps=float(c["eps"]),
                weight_decay=weight_decay,
                mask=mask,
            )
        )
    elif name == "rmsprop":
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay, mask))
        momentum = float(c["momentum"])
        parts.append(
            optax.rmsprop(
                schedule,
                decay=float(c["decay"]),
                eps=float(c["eps"]),
                eps_in_sqrt=False,
                momentum=momentum or None,
            )
        )
    else:
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay, mask))
        parts.append(optax.sgd(schedule, momentum=float(c["momentum"]) or None))
    return optax.chain(*parts), schedule
