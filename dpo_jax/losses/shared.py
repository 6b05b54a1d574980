"""What a loss sees and the pieces every loss shares.

`PreferenceStats` (pairs) and `UnpairedStats` (KTO) are a loss's input; `require`,
`log_ratios`, `margin`, `mean_logps` read them in float32; `f_scores` are the f-DPO
scores (`F_DIVERGENCES`); `reward_metrics` / `metrics_from_rewards` give TRL's six metric
scalars; `chosen_nll` is the SFT / RPO term and `log1mexp` the log(1 - p) of ORPO and
unlikelihood. Notation as in the package docstring (`dpo_jax.losses`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from dpo_jax.errors import config_error

Array = jax.Array
Metrics = dict[str, Array]
LossFn = Callable[..., tuple[Array, Metrics]]


@flax.struct.dataclass
class PreferenceStats:
    """Per-pair sequence statistics of a preference batch; every array is `[B]`.

    Log-probs are sums over completion tokens. Optional fields are None when absent;
    a loss that needs one raises a ValueError naming it.
    """

    chosen_logps: Array
    rejected_logps: Array
    ref_chosen_logps: Array | None = None
    ref_rejected_logps: Array | None = None
    chosen_lengths: Array | None = None  # completion token counts
    rejected_lengths: Array | None = None
    # WPO (Zhou et al. 2024) per-sequence weight exp(mean_t[log p_t - log sum_v p_v^2]).
    chosen_weights: Array | None = None
    rejected_weights: Array | None = None
    # LD-DPO (Liu et al. 2024): log-prob sums over the first min(len_c, len_r) tokens.
    chosen_prefix_logps: Array | None = None
    rejected_prefix_logps: Array | None = None
    ref_chosen_prefix_logps: Array | None = None
    ref_rejected_prefix_logps: Array | None = None
    # Unlikelihood (Welleck et al. 2019): sums of log(1 - p_t) over completion tokens.
    chosen_log1m_sum: Array | None = None
    rejected_log1m_sum: Array | None = None


@flax.struct.dataclass
class UnpairedStats:
    """Per-example statistics of an unpaired (KTO) batch; every array is `[B]`.

    `kl_logps` / `ref_kl_logps` score a mismatched completion for the same prompt (the
    batch's KL pairs), used only to estimate the KTO reference point z0.
    """

    logps: Array
    ref_logps: Array | None = None
    kl_logps: Array | None = None
    ref_kl_logps: Array | None = None
    labels: Array | None = None  # 1 desirable, 0 undesirable
    lengths: Array | None = None


def _f32(x: Array) -> Array:
    # Everything is computed in float32: bf16 keeps 8 mantissa bits, so two log-probs near
    # -2000 differ by multiples of 8 there, and exp() of them overflows.
    return jnp.asarray(x, jnp.float32)


def require(stats: Any, name: str, loss: str) -> Array:
    """`stats.<name>` as float32, or a ValueError naming the missing field and the loss."""
    value = getattr(stats, name, None)
    if value is None:
        raise ValueError(
            f"loss {loss!r} needs {type(stats).__name__}.{name}, which is None "
            f"(build the stats with it, e.g. pass reference log-probs or lengths)"
        )
    return _f32(value)


def log_ratios(stats: PreferenceStats, loss: str = "?") -> tuple[Array, Array]:
    """(logr_c, logr_r): policy minus reference log-probs of chosen and rejected."""
    chosen = require(stats, "chosen_logps", loss) - require(stats, "ref_chosen_logps", loss)
    rejected = require(stats, "rejected_logps", loss) - require(stats, "ref_rejected_logps", loss)
    return chosen, rejected


def margin(stats: PreferenceStats, loss: str = "?") -> Array:
    """h = logr_c - logr_r, the DPO margin `[B]`."""
    chosen, rejected = log_ratios(stats, loss)
    return chosen - rejected


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_ALPHA_DIVERGENCE_COEF = 0.5  # TRL's DPOConfig default (at 1.0 the alpha-divergence is DPO)
# The losses TRL 1.16 allows under an f-divergence other than reverse_kl: the f-DPO
# reparameterisation leaves a beta log Z(x) term that cancels only in a chosen-minus-
# rejected score, so nca_pair, bco_pair, sppo_hard, apo_zero/down and aot take plain
# log-ratios and are refused with another f (`check_options`). `sft` ignores scores.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")
_EXP_CAP = 80.0  # exp(80) ~ 5e34 stays finite in float32 (TRL caps its alpha-divergence there too)


def f_scores(
    stats: PreferenceStats,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
    loss: str = "?",
) -> tuple[Array, Array]:
    """Chosen and rejected scores f'(u) of the ratio u = pi/pi_ref (Wang et al. 2023, f-DPO).

    With r = log u, as TRL 1.16 (constants included: they cancel in the margin of
    `sigmoid`, but not once `ipo` / `sigmoid_norm` divide each score by its length):
    reverse_kl: r (plain DPO); forward_kl: 1 - e^(-r); js_divergence: log 2 + s(r);
    alpha_divergence: (e^((a-1) r) - 1)/(a-1), reverse_kl at a = 1.
    """
    chosen, rejected = log_ratios(stats, loss)
    if f_divergence_type == "reverse_kl":
        return chosen, rejected
    if f_divergence_type == "forward_kl":
        score = lambda r: 1.0 - jnp.exp(jnp.minimum(-r, _EXP_CAP))
    elif f_divergence_type == "js_divergence":
        score = lambda r: math.log(2.0) + jax.nn.log_sigmoid(r)
    elif f_divergence_type == "alpha_divergence":
        a = float(f_alpha_divergence_coef)
        if abs(a - 1.0) < 1e-6:  # the limit a -> 1 is log u
            return chosen, rejected
        score = lambda r: (jnp.exp(jnp.minimum((a - 1.0) * r, _EXP_CAP)) - 1.0) / (a - 1.0)
    else:
        raise config_error(
            "loss.hyper.f_divergence_type",
            f"unknown f-divergence {f_divergence_type!r} (loss {loss!r})",
            f"use one of {F_DIVERGENCES}",
        )
    return score(chosen), score(rejected)


def _mean(x: Array) -> Array:
    return jnp.mean(jax.lax.stop_gradient(_f32(x)))


def metrics_from_rewards(
    chosen_rewards: Array, rejected_rewards: Array, chosen_logps: Array, rejected_logps: Array
) -> Metrics:
    """TRL's six metric scalars from per-example rewards and log-probs (no gradient)."""
    return {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/accuracies": _mean(chosen_rewards > rejected_rewards),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "logps/chosen": _mean(chosen_logps),
        "logps/rejected": _mean(rejected_logps),
    }


def reward_metrics(stats: PreferenceStats, beta: float | Array, loss: str = "?") -> Metrics:
    """TRL metrics with implicit rewards beta * log-ratio (what DPOTrainer logs)."""
    chosen, rejected = log_ratios(stats, loss)
    return metrics_from_rewards(
        beta * chosen, beta * rejected, stats.chosen_logps, stats.rejected_logps
    )


def mean_logps(stats: PreferenceStats, loss: str = "?") -> tuple[Array, Array]:
    """Per-token average policy log-probs (chosen, rejected); lengths are clamped at 1."""
    chosen = require(stats, "chosen_logps", loss) / jnp.maximum(
        require(stats, "chosen_lengths", loss), 1.0
    )
    rejected = require(stats, "rejected_logps", loss) / jnp.maximum(
        require(stats, "rejected_lengths", loss), 1.0
    )
    return chosen, rejected


def _smoothed_sigmoid(x: Array, label_smoothing: float | Array) -> Array:
    # -(1-e) s(x) - e s(-x): the Bradley-Terry likelihood with labels flipped w.p. e.
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(x) - label_smoothing * jax.nn.log_sigmoid(
        -x
    )


def log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); x is clamped < 0."""
    x = jnp.minimum(x, -1e-6)  # x = 0 is probability 1: the odds are infinite
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def chosen_nll(stats: PreferenceStats, loss: str = "sft") -> Array:
    """Token-mean NLL of the chosen completions over the batch, broadcast to `[B]`.

    Matches TRL's cross-entropy over all chosen tokens (its SFT / RPO term).
    """
    total = jnp.sum(require(stats, "chosen_logps", loss))
    tokens = jnp.maximum(jnp.sum(require(stats, "chosen_lengths", loss)), 1.0)
    return jnp.broadcast_to(-total / tokens, stats.chosen_logps.shape)
