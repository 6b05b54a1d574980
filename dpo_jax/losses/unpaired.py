"""Unpaired (KTO-style) losses: they take `UnpairedStats`, one completion per example.

`kto` and `apo_zero_unpaired` (`register(..., paired=False)`), KTO's reference point z0
and `check_kto_weights`. Their subset metrics are `CountedMean`s
(`dpo_jax.metric_accumulators`): omitted when a batch holds no example of a kind.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from dpo_jax.losses.registry import register
from dpo_jax.losses.shared import Array, Metrics, UnpairedStats, _mean, require
from dpo_jax.metric_accumulators import MeanDifference, subset_mean


def kto_reference_point(stats: UnpairedStats, loss: str = "kto") -> Array:
    """KTO's z0: batch mean of KL-pair log-ratios, detached and clamped at 0 (TRL KTOTrainer)."""
    kl = jnp.mean(require(stats, "kl_logps", loss) - require(stats, "ref_kl_logps", loss))
    return jnp.maximum(jax.lax.stop_gradient(kl), 0.0)


def _unpaired_metrics(stats: UnpairedStats, rewards: Array, desirable: Array, loss: str) -> Metrics:
    # Subset means as CountedMean: count-weighted over micro-batches and held-out batches,
    # omitted when the subset is absent (TRL's KTOTrainer), never logged as 0.
    logps = require(stats, "logps", loss)
    undesirable = 1.0 - desirable
    chosen, rejected = subset_mean(rewards, desirable), subset_mean(rewards, undesirable)
    correct = jnp.where(desirable > 0, rewards > 0, rewards < 0)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": _mean(correct),
        "rewards/margins": MeanDifference(chosen, rejected),
        "logps/chosen": subset_mean(logps, desirable),
        "logps/rejected": subset_mean(logps, undesirable),
    }


@register("kto", paired=False)
def kto(
    stats: UnpairedStats,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Array, Metrics]:
    """KTO (Ethayarajh et al. 2024), z0 = max(0, stopgrad mean(kl log-ratio)).

    loss = lambda_D (1 - sig(beta (logr - z0))) if desirable else lambda_U (1 - sig(beta (z0 - logr)))
    """
    logr = require(stats, "logps", "kto") - require(stats, "ref_logps", "kto")
    desirable = require(stats, "labels", "kto")
    z0 = kto_reference_point(stats)
    loss = jnp.where(
        desirable > 0,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logr - z0))),
        undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - logr))),
    )
    metrics = _unpaired_metrics(stats, beta * logr, desirable, "kto")
    metrics["kl"] = z0
    return loss, metrics


@register("apo_zero_unpaired", paired=False)
def apo_zero_unpaired(
    stats: UnpairedStats,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Array, Metrics]:
    """APO-zero (D'Oosterlinck et al. 2024) on unpaired data, as TRL's KTOTrainer.

    loss = lambda_D (1 - sig(beta logr)) if desirable else lambda_U sig(beta logr)
    """
    logr = require(stats, "logps", "apo_zero_unpaired") - require(
        stats, "ref_logps", "apo_zero_unpaired"
    )
    desirable = require(stats, "labels", "apo_zero_unpaired")
    loss = jnp.where(
        desirable > 0,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * logr)),
        undesirable_weight * jax.nn.sigmoid(beta * logr),
    )
    return loss, _unpaired_metrics(stats, beta * logr, desirable, "apo_zero_unpaired")


def check_kto_weights(
    desirable_weight: float, undesirable_weight: float, n_desirable: int, n_undesirable: int
) -> float:
    """Warns if lambda_D n_D / (lambda_U n_U) is outside [1, 4/3] (KTO paper, eq. 9); returns it.

    Call it once at config time with the dataset's label counts, outside jit.
    """
    if n_desirable <= 0 or n_undesirable <= 0 or undesirable_weight <= 0:
        warnings.warn(
            f"KTO: {n_desirable} desirable and {n_undesirable} undesirable examples with "
            f"undesirable_weight={undesirable_weight}; the weighting ratio is undefined",
            UserWarning,
            stacklevel=2,
        )
        return float("nan")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if not 1.0 <= ratio <= 4.0 / 3.0:
        warnings.warn(
            f"KTO: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = "
            f"{ratio:.3f} is outside the paper's recommended range [1, 4/3]; adjust "
            f"desirable_weight={desirable_weight} or undesirable_weight={undesirable_weight}",
            UserWarning,
            stacklevel=2,
        )
    return ratio
