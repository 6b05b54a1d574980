"""Metric accumulators: values that aggregate by adding sums and counts, not by averaging.

A loss returns a `CountedMean` (a mean over a subset of the batch, e.g. KTO's desirable
examples) or a `MeanDifference` of two where a plain float32 scalar would be wrong; the
train step adds them over micro-batches (`is_counted`), `train.evaluate` over held-out
batches, and the loop's `finalize_metrics` turns them into floats, omitting empty subsets.
`RunningMean` is the count-weighted running mean a stateful loss carries in the train
state (BCO's reward shift).

Imported by the losses (`dpo_jax.losses` re-exports every name here) and by the train
loop; it imports nothing from `dpo_jax`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


def _f32(x: Array) -> Array:
    return jnp.asarray(x, jnp.float32)


@flax.struct.dataclass
class CountedMean:
    """A metric that is a mean over a subset of the examples, kept as (sum, count).

    Micro-batches, steps and held-out batches add their sums and counts, so the logged
    value is the count-weighted mean; a subset absent everywhere is omitted rather than
    logged as 0 (TRL's KTOTrainer). `finalize_metrics` turns it into a float.
    """

    total: Array
    count: Array

    def __add__(self, other: CountedMean) -> CountedMean:
        return CountedMean(self.total + other.total, self.count + other.count)

    def value(self) -> float | None:
        """total / count, or None when the subset is empty."""
        count = float(self.count)
        return float(self.total) / count if count > 0 else None


@flax.struct.dataclass
class MeanDifference:
    """The difference of two `CountedMean`s (KTO's rewards/margins); None if either is empty."""

    first: CountedMean
    second: CountedMean

    def __add__(self, other: MeanDifference) -> MeanDifference:
        return MeanDifference(self.first + other.first, self.second + other.second)

    def value(self) -> float | None:
        """first.value() - second.value(), or None when either subset is empty."""
        a, b = self.first.value(), self.second.value()
        return None if a is None or b is None else a - b


def is_counted(value: Any) -> bool:
    """True for metrics that aggregate by summing (`CountedMean`, `MeanDifference`)."""
    return isinstance(value, CountedMean | MeanDifference)


def subset_mean(values: Array, mask: Array) -> CountedMean:
    """`CountedMean` of `values` where `mask` is 1 (no gradient)."""
    mask = _f32(mask)
    return CountedMean(jnp.sum(jax.lax.stop_gradient(_f32(values)) * mask), jnp.sum(mask))


def finalize_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Host-side metrics with counted ones resolved to floats and empty subsets omitted."""
    out = {}
    for key, value in metrics.items():
        if is_counted(value):
            value = value.value()
            if value is None:
                continue
        out[key] = value
    return out


@flax.struct.dataclass
class RunningMean:
    """Count-weighted running mean of every value seen (BCO's reward shift delta).

    `update` adds a batch: mean += (batch_mean - mean) n / (count + n), count += n,
    as TRL's `RunningMoments` (its initial count 1e-24 is 0 here). Kept without gradient.
    """

    mean: Array
    count: Array

    @classmethod
    def zeros(cls) -> RunningMean:
        """No values seen yet: mean 0, count 0."""
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

    def update(self, values: Array) -> RunningMean:
        """The running mean after also seeing `values` (any shape)."""
        values = jax.lax.stop_gradient(_f32(values)).reshape(-1)
        n = float(values.size)
        count = self.count + n
        mean = self.mean + (jnp.mean(values) - self.mean) * (n / count)
        return RunningMean(mean, count)
