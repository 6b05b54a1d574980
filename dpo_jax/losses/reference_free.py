"""Reference-free paired losses: SimPO, ORPO, SFT and unlikelihood training.

They read no reference log-probs (`register(..., needs_reference=False)`). Their implicit
reward is beta x (mean log-prob), as TRL's CPOTrainer / ORPOTrainer log it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpo_jax.losses.registry import register
from dpo_jax.losses.shared import (
    Array,
    Metrics,
    PreferenceStats,
    _f32,
    _mean,
    _smoothed_sigmoid,
    chosen_nll,
    log1mexp,
    mean_logps,
    metrics_from_rewards,
    require,
)


def _avg_logp_metrics(stats: PreferenceStats, beta: float | Array, loss: str) -> Metrics:
    avg_c, avg_r = mean_logps(stats, loss)
    return metrics_from_rewards(
        beta * avg_c, beta * avg_r, stats.chosen_logps, stats.rejected_logps
    )


@register("simpo", needs_reference=False)
def simpo(
    stats: PreferenceStats,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Array, Metrics]:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, target margin gamma.

    loss = cDPO(beta (log pi_c/|y_c| - log pi_r/|y_r|) - gamma)
    """
    avg_c, avg_r = mean_logps(stats, "simpo")
    x = beta * (avg_c - avg_r) - simpo_gamma
    return _smoothed_sigmoid(x, label_smoothing), _avg_logp_metrics(stats, beta, "simpo")


@register("orpo", needs_reference=False)
def orpo(stats: PreferenceStats, beta: float = 0.1) -> tuple[Array, Metrics]:
    """ORPO (Hong et al. 2024): chosen NLL plus beta x odds-ratio term, no reference.

    loss = NLL_c - beta s(log odds(y_c) - log odds(y_r)), odds(y) = p/(1-p), p = exp(mean log pi)
    """
    avg_c, avg_r = mean_logps(stats, "orpo")
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    ratio = jax.nn.log_sigmoid(log_odds)
    metrics = _avg_logp_metrics(stats, beta, "orpo")
    metrics["log_odds_ratio"] = _mean(ratio)
    metrics["nll_loss"] = _mean(chosen_nll(stats, "orpo"))
    return chosen_nll(stats, "orpo") - beta * ratio, metrics


@register("sft", needs_reference=False)
def sft(stats: PreferenceStats) -> tuple[Array, Metrics]:
    """Supervised NLL of the chosen completions (TRL's `sft` loss type; MPO / RPO term).

    loss = -sum log pi(y_c) / sum |y_c| over the batch
    """
    zeros = jnp.zeros_like(_f32(stats.chosen_logps))
    nll = chosen_nll(stats)
    metrics = metrics_from_rewards(zeros, zeros, stats.chosen_logps, stats.rejected_logps)
    metrics["nll_loss"] = _mean(nll)
    return nll, metrics


@register("unlikelihood", needs_reference=False, needs_log1m=True)
def unlikelihood(stats: PreferenceStats, unlikelihood_alpha: float = 1.0) -> tuple[Array, Metrics]:
    """Unlikelihood training (Welleck et al. 2019) as the DPO paper's baseline, per-token means.

    loss = -log pi(y_c)/|y_c| - alpha sum_t log(1 - pi(y_r,t | x, y_r,<t))/|y_r|
    """
    avg_c, _ = mean_logps(stats, "unlikelihood")
    r_len = jnp.maximum(require(stats, "rejected_lengths", "unlikelihood"), 1.0)
    unlikely = -require(stats, "rejected_log1m_sum", "unlikelihood") / r_len
    metrics = _avg_logp_metrics(stats, 1.0, "unlikelihood")
    metrics["nll_loss"] = _mean(-avg_c)
    metrics["unlikelihood_loss"] = _mean(unlikely)
    return -avg_c + unlikelihood_alpha * unlikely, metrics
