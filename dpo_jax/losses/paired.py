"""The paired losses with a reference model: DPO and its relatives, in registration order.

Each takes `PreferenceStats` and returns `(per_example_loss_B, metrics)`; notation as in
the package docstring (`dpo_jax.losses`). Reference-free paired losses are in
`reference_free`, unpaired (KTO-style) ones in `unpaired`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpo_jax.losses.registry import _check_exo_epsilon, check_options, register
from dpo_jax.losses.shared import (
    _EXP_CAP,
    F_ALPHA_DIVERGENCE_COEF,
    Array,
    Metrics,
    PreferenceStats,
    _smoothed_sigmoid,
    f_scores,
    log_ratios,
    margin,
    require,
    reward_metrics,
)
from dpo_jax.metric_accumulators import RunningMean


@register("sigmoid")
def sigmoid(
    stats: PreferenceStats,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """DPO (Rafailov et al. 2023); cDPO with label_smoothing e (Mitchell 2023).

    loss = -(1-e) s(beta h) - e s(-beta h)

    Differs from TRL 1.16, whose 'sigmoid' ignores label_smoothing (this is the original
    DPO code's cDPO); `train()` logs a warning naming it when e > 0.
    """
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "sigmoid")
    return _smoothed_sigmoid(beta * (c - r), label_smoothing), reward_metrics(stats, beta)


@register("robust")
def robust(
    stats: PreferenceStats,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """rDPO, unbiased under label noise e < 1/2 (Chowdhury et al. 2024).

    loss = (-(1-e) s(beta h) + e s(-beta h)) / (1 - 2e)
    """
    check_options("robust", {"label_smoothing": label_smoothing})
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "robust")
    x = beta * (c - r)
    loss = (
        -(1.0 - label_smoothing) * jax.nn.log_sigmoid(x) + label_smoothing * jax.nn.log_sigmoid(-x)
    ) / (1.0 - 2.0 * label_smoothing)
    return loss, reward_metrics(stats, beta)


@register("hinge")
def hinge(
    stats: PreferenceStats,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """SLiC-HF calibration hinge (Zhao et al. 2023) on the DPO margin.

    loss = max(0, 1 - beta h)
    """
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "hinge")
    return jax.nn.relu(1.0 - beta * (c - r)), reward_metrics(stats, beta)


@register("ipo")
def ipo(
    stats: PreferenceStats,
    beta: float = 0.1,
    ipo_normalize: bool = True,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """IPO (Azar et al. 2023, eq. 17), beta playing tau.

    loss = (h' - 1/(2 beta))^2, h' = logr_c/|y_c| - logr_r/|y_r| (TRL's per-token form,
    default) or h' = h (the paper's sequence form, ipo_normalize=False).
    """
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "ipo")
    if ipo_normalize:
        c = c / jnp.maximum(require(stats, "chosen_lengths", "ipo"), 1.0)
        r = r / jnp.maximum(require(stats, "rejected_lengths", "ipo"), 1.0)
    return (c - r - 1.0 / (2.0 * beta)) ** 2, reward_metrics(stats, beta)


@register("exo_pair")
def exo_pair(
    stats: PreferenceStats,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """EXO-pref (Ji et al. 2024, eq. 16): KL(q || p) with q = softmax over the pair.

    loss = sig(x)(s(x) - log(1-e)) + sig(-x)(s(-x) - log e), x = beta h. The default e is the
    paper's 1e-3; e must lie in (0, 1): e = 0 is refused, as TRL 1.16 does (log 0).
    """
    _check_exo_epsilon(label_smoothing)
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "exo_pair")
    x = beta * (c - r)
    eps = jnp.asarray(label_smoothing, jnp.float32)
    loss = jax.nn.sigmoid(x) * (jax.nn.log_sigmoid(x) - jnp.log1p(-eps)) + jax.nn.sigmoid(-x) * (
        jax.nn.log_sigmoid(-x) - jnp.log(eps)
    )
    return loss, reward_metrics(stats, beta)


@register("nca_pair")
def nca_pair(
    stats: PreferenceStats,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """NCA (Chen et al. 2024, noise-contrastive alignment), pairwise form.

    loss = -s(beta logr_c) - s(-beta logr_c)/2 - s(-beta logr_r)/2
    """
    c, r = log_ratios(stats, "nca_pair")
    loss = (
        -jax.nn.log_sigmoid(beta * c)
        - 0.5 * jax.nn.log_sigmoid(-beta * c)
        - 0.5 * jax.nn.log_sigmoid(-beta * r)
    )
    return loss, reward_metrics(stats, beta)


@register("bco_pair")
def bco_pair(
    stats: PreferenceStats,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """BCO (Jung et al. 2024), pairwise binary classifier, as TRL 1.x: no reward shift.

    loss = -s(beta logr_c) - s(-beta logr_r). The paper's form, with the running reward
    shift delta that older TRL used, is `bco_pair_shifted`.
    """
    c, r = log_ratios(stats, "bco_pair")
    loss = -jax.nn.log_sigmoid(beta * c) - jax.nn.log_sigmoid(-beta * r)
    return loss, reward_metrics(stats, beta)


def bco_shift_update(state: RunningMean, stats: PreferenceStats, beta: float = 0.1) -> RunningMean:
    """BCO's delta after this batch: the running mean of all 2B rewards beta logr_c, beta logr_r."""
    c, r = log_ratios(stats, "bco_pair_shifted")
    return state.update(jnp.concatenate([beta * c, beta * r]))


@register("bco_pair_shifted", state_init=RunningMean.zeros, state_update=bco_shift_update)
def bco_pair_shifted(
    stats: PreferenceStats, beta: float = 0.1, loss_state: RunningMean | None = None
) -> tuple[Array, Metrics]:
    """BCO (Jung et al. 2024, eq. 8) with the paper's running reward shift delta.

    loss = -s(beta logr_c - delta) - s(-(beta logr_r - delta)), delta = the running mean
    (no gradient) of every reward beta logr_c, beta logr_r seen in training, this batch
    included, as older TRL's `bco_pair` and its BCOTrainer. The train step keeps delta in
    `TrainState.loss_state["bco_pair_shifted"]` (checkpointed); with grad_accum_steps A
    each micro-batch adds its 2B rewards before its loss, as TRL's per-forward update;
    evaluation reads delta without adding to it; a skipped (non-finite) step leaves it.
    Called alone (`loss_state=None`) delta is this batch's mean reward. Metric: `delta`.
    """
    if loss_state is None:
        loss_state = bco_shift_update(RunningMean.zeros(), stats, beta)
    c, r = log_ratios(stats, "bco_pair_shifted")
    delta = jax.lax.stop_gradient(loss_state.mean)
    loss = -jax.nn.log_sigmoid(beta * c - delta) - jax.nn.log_sigmoid(-(beta * r - delta))
    metrics = reward_metrics(stats, beta)
    metrics["delta"] = delta
    return loss, metrics


@register("sppo_hard")
def sppo_hard(
    stats: PreferenceStats,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities 1 and 0.

    loss = (logr_c - 1/(2 beta))^2 + (logr_r + 1/(2 beta))^2
    """
    c, r = log_ratios(stats, "sppo_hard")
    loss = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    return loss, reward_metrics(stats, beta)


@register("aot")
def aot(
    stats: PreferenceStats, beta: float = 0.1, label_smoothing: float = 0.0
) -> tuple[Array, Metrics]:
    """AOT (Melnyk et al. 2024), paired: distributional alignment via sorted margins.

    loss_i = cDPO(beta (sort(log pi_c - log pi_r)_i - sort(log ref_c - log ref_r)_i))
    """
    logratio = require(stats, "chosen_logps", "aot") - require(stats, "rejected_logps", "aot")
    ref_logratio = require(stats, "ref_chosen_logps", "aot") - require(
        stats, "ref_rejected_logps", "aot"
    )
    delta = jnp.sort(logratio) - jnp.sort(ref_logratio)
    return _smoothed_sigmoid(beta * delta, label_smoothing), reward_metrics(stats, beta)


@register("aot_unpaired")
def aot_unpaired(
    stats: PreferenceStats, beta: float = 0.1, label_smoothing: float = 0.0
) -> tuple[Array, Metrics]:
    """AOT (Melnyk et al. 2024), unpaired: chosen and rejected log-ratios sorted apart.

    loss_i = cDPO(beta (sort(logr_c)_i - sort(logr_r)_i))
    """
    c, r = log_ratios(stats, "aot_unpaired")
    delta = jnp.sort(c) - jnp.sort(r)
    return _smoothed_sigmoid(beta * delta, label_smoothing), reward_metrics(stats, beta)


@register("apo_zero")
def apo_zero(stats: PreferenceStats, beta: float = 0.1) -> tuple[Array, Metrics]:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): push chosen up, rejected down.

    loss = 1 - sig(beta logr_c) + sig(beta logr_r)
    """
    c, r = log_ratios(stats, "apo_zero")
    loss = 1.0 - jax.nn.sigmoid(beta * c) + jax.nn.sigmoid(beta * r)
    return loss, reward_metrics(stats, beta)


@register("apo_down")
def apo_down(
    stats: PreferenceStats,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): both down, rejected more.

    loss = sig(beta logr_c) + 1 - sig(beta h)
    """
    c, r = log_ratios(stats, "apo_down")
    loss = jax.nn.sigmoid(beta * c) + 1.0 - jax.nn.sigmoid(beta * (c - r))
    return loss, reward_metrics(stats, beta)


@register("discopop")
def discopop(
    stats: PreferenceStats,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, eq. 5), x = beta h.

    loss = (1 - sig(x/tau)) (-s(x)) + sig(x/tau) exp(-x)
    """
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "discopop")
    x = beta * (c - r)
    mix = jax.nn.sigmoid(x / discopop_tau)
    # exp(-x) * sig(x/tau) as one exponent: exp(-x) alone overflows for x << 0 and inf*0 = NaN.
    exp_part = jnp.exp(jnp.minimum(-x + jax.nn.log_sigmoid(x / discopop_tau), _EXP_CAP))
    return (1.0 - mix) * -jax.nn.log_sigmoid(x) + exp_part, reward_metrics(stats, beta)


@register("sigmoid_norm")
def sigmoid_norm(
    stats: PreferenceStats,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """DPO on per-token log-ratios (TRL's length-normalised sigmoid).

    loss = -s(beta (logr_c/|y_c| - logr_r/|y_r|))
    """
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "sigmoid_norm")
    c = c / jnp.maximum(require(stats, "chosen_lengths", "sigmoid_norm"), 1.0)
    r = r / jnp.maximum(require(stats, "rejected_lengths", "sigmoid_norm"), 1.0)
    return -jax.nn.log_sigmoid(beta * (c - r)), reward_metrics(stats, beta)


@register("rdpo")
def rdpo(
    stats: PreferenceStats, beta: float = 0.1, rdpo_alpha: float = 0.01
) -> tuple[Array, Metrics]:
    """R-DPO, length-regularised DPO (Park et al. 2024).

    loss = -s(beta h + alpha (|y_c| - |y_r|)).
    Derivation: maximise E[r(x,y) - alpha |y|] - beta KL(pi || pi_ref). The optimum is
    pi* ~ pi_ref exp((r - alpha|y|)/beta), so r = beta log(pi*/pi_ref) + alpha|y| + const;
    Bradley-Terry on r gives the sigmoid of beta h + alpha (|y_c| - |y_r|). A longer chosen
    answer already earns margin from its length, so the policy is not pushed to lengthen.
    """
    length_gap = require(stats, "chosen_lengths", "rdpo") - require(
        stats, "rejected_lengths", "rdpo"
    )
    x = beta * margin(stats, "rdpo") + rdpo_alpha * length_gap
    return -jax.nn.log_sigmoid(x), reward_metrics(stats, beta)


@register("dpop")
def dpop(
    stats: PreferenceStats, beta: float = 0.1, dpop_lambda: float = 50.0
) -> tuple[Array, Metrics]:
    """DPO-Positive (Pal et al. 2024, Smaug): penalise any drop of the chosen log-prob.

    loss = -s(beta (h - lambda max(0, -logr_c)))
    """
    c, r = log_ratios(stats, "dpop")
    x = beta * (c - r - dpop_lambda * jax.nn.relu(-c))
    return -jax.nn.log_sigmoid(x), reward_metrics(stats, beta)
