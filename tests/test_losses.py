"""dpo_jax.losses against values computed here by hand (numpy, float64) and TRL's formulas."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import losses
from dpo_jax.errors import UserError

# ----------------------------------------------------------------------------------------
# Hand-side helpers: numpy float64, written from the papers, independent of dpo_jax.
# ----------------------------------------------------------------------------------------


def log_sig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def sig(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


# Four pairs with varied signs of the margin and varied lengths.
C = np.array([-12.0, -30.5, -7.25, -50.0])  # policy chosen log-probs
R = np.array([-14.0, -28.0, -9.0, -41.5])  # policy rejected
RC = np.array([-13.0, -29.0, -8.0, -47.0])  # reference chosen
RR = np.array([-13.5, -29.5, -8.5, -44.0])  # reference rejected
LC = np.array([4.0, 10.0, 3.0, 20.0])  # chosen lengths
LR = np.array([5.0, 8.0, 3.0, 12.0])  # rejected lengths
C1M = np.array([-0.5, -2.0, -0.25, -3.0])  # chosen sums of log(1 - p_t) (unlikelihood)
R1M = np.array([-1.0, -1.5, -0.75, -4.0])  # rejected sums of log(1 - p_t)
LOGR_C = C - RC  # [1, -1.5, 0.75, -3]
LOGR_R = R - RR  # [-0.5, 1.5, -0.5, 2.5]
H = LOGR_C - LOGR_R  # [1.5, -3, 1.25, -5.5]


def make_stats(dtype=jnp.float32, **extra) -> losses.PreferenceStats:
    kw = dict(
        chosen_logps=C,
        rejected_logps=R,
        ref_chosen_logps=RC,
        ref_rejected_logps=RR,
        chosen_lengths=LC,
        rejected_lengths=LR,
        chosen_log1m_sum=C1M,
        rejected_log1m_sum=R1M,
    )
    kw.update(extra)
    return losses.PreferenceStats(
        **{k: None if v is None else jnp.asarray(v, dtype) for k, v in kw.items()}
    )


def run(name, stats=None, **hyper):
    loss, metrics = losses.get(name)(make_stats() if stats is None else stats, **hyper)
    return np.asarray(loss, np.float64), {k: float(v) for k, v in metrics.items()}


def close(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------
# Every loss against its formula
# ----------------------------------------------------------------------------------------


def test_margins_of_the_fixture_are_what_the_hand_formulas_assume():
    close(H, [1.5, -3.0, 1.25, -5.5])
    close(losses.margin(make_stats()), H)


def test_sigmoid_at_zero_margin_is_log_two():
    st = make_stats(ref_chosen_logps=C, ref_rejected_logps=R)  # h = 0
    loss, _ = run("sigmoid", st, beta=0.3)
    close(loss, [math.log(2.0)] * 4)


def test_sigmoid_and_cdpo():
    beta = 0.2
    close(run("sigmoid", beta=beta)[0], -log_sig(beta * H))
    e = 0.1
    close(
        run("sigmoid", beta=beta, label_smoothing=e)[0],
        -(1 - e) * log_sig(beta * H) - e * log_sig(-beta * H),
    )


def test_robust():
    beta, e = 0.5, 0.2
    expected = (-(1 - e) * log_sig(beta * H) + e * log_sig(-beta * H)) / (1 - 2 * e)
    close(run("robust", beta=beta, label_smoothing=e)[0], expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        run("robust", label_smoothing=0.5)


def test_hinge():
    beta = 0.5
    close(run("hinge", beta=beta)[0], np.maximum(0.0, 1.0 - beta * H))
    close(run("hinge", beta=0.5)[0][0], 0.25)  # 1 - 0.5 * 1.5


def test_ipo_per_token_and_sequence_forms():
    beta = 0.5
    hn = LOGR_C / LC - LOGR_R / LR
    close(run("ipo", beta=beta)[0], (hn - 1 / (2 * beta)) ** 2)
    close(run("ipo", beta=beta, ipo_normalize=False)[0], (H - 1 / (2 * beta)) ** 2)
    # Literal: pair 0 has hn = 1/4 + 0.5/5 = 0.35, so (0.35 - 1)^2 = 0.4225.
    close(run("ipo", beta=beta)[0][0], 0.4225)


def test_exo_pair():
    beta, e = 0.3, 0.05
    x = beta * H
    expected = sig(x) * (log_sig(x) - math.log(1 - e)) + sig(-x) * (log_sig(-x) - math.log(e))
    close(run("exo_pair", beta=beta, label_smoothing=e)[0], expected)
    # The default epsilon is the paper's 1e-3.
    e0 = 1e-3
    expected0 = sig(x) * (log_sig(x) - math.log(1 - e0)) + sig(-x) * (log_sig(-x) - math.log(e0))
    close(run("exo_pair", beta=beta)[0], expected0)
    # epsilon = 0 puts log(0) in the loss: refused, as TRL 1.16 does (never silently 1e-3).
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(UserError, match="loss.hyper.label_smoothing"):
            run("exo_pair", beta=beta, label_smoothing=bad)
        with pytest.raises(UserError, match="loss.hyper.label_smoothing"):
            losses.compute_loss(make_stats(), "exo_pair", label_smoothing=bad)


def test_nca_bco_sppo():
    beta = 0.4
    bc, br = beta * LOGR_C, beta * LOGR_R
    close(run("nca_pair", beta=beta)[0], -log_sig(bc) - 0.5 * log_sig(-bc) - 0.5 * log_sig(-br))
    close(run("bco_pair", beta=beta)[0], -log_sig(bc) - log_sig(-br))
    close(
        run("sppo_hard", beta=beta)[0],
        (LOGR_C - 0.5 / beta) ** 2 + (LOGR_R + 0.5 / beta) ** 2,
    )


def test_aot_sorts_over_the_batch():
    beta = 0.5
    delta = np.sort(C - R) - np.sort(RC - RR)
    close(run("aot", beta=beta)[0], -log_sig(beta * delta))
    delta_u = np.sort(LOGR_C) - np.sort(LOGR_R)
    close(run("aot_unpaired", beta=beta)[0], -log_sig(beta * delta_u))


def test_apo_zero_and_down():
    beta = 0.5
    close(run("apo_zero", beta=beta)[0], 1 - sig(beta * LOGR_C) + sig(beta * LOGR_R))
    close(run("apo_down", beta=beta)[0], sig(beta * LOGR_C) + 1 - sig(beta * H))


def test_discopop():
    beta, tau = 0.5, 0.05
    x = beta * H
    m = sig(x / tau)
    close(
        run("discopop", beta=beta, discopop_tau=tau)[0],
        (1 - m) * -log_sig(x) + m * np.exp(-x),
        rtol=2e-5,
    )


def test_sigmoid_norm():
    beta = 2.0
    close(run("sigmoid_norm", beta=beta)[0], -log_sig(beta * (LOGR_C / LC - LOGR_R / LR)))


def test_rdpo_puts_the_length_gap_inside_the_sigmoid():
    beta, alpha = 0.1, 0.05
    close(run("rdpo", beta=beta, rdpo_alpha=alpha)[0], -log_sig(beta * H + alpha * (LC - LR)))
    close(run("rdpo", rdpo_alpha=0.0)[0], run("sigmoid")[0])


def test_dpop():
    beta, lam = 0.1, 5.0
    x = beta * (H - lam * np.maximum(0.0, RC - C))
    close(run("dpop", beta=beta, dpop_lambda=lam)[0], -log_sig(x))
    # Pairs 0 and 2 raised the chosen log-prob (logr_c > 0): no penalty, plain DPO.
    close(run("dpop", beta=beta, dpop_lambda=lam)[0][[0, 2]], -log_sig(beta * H[[0, 2]]))


def test_simpo():
    beta, gamma = 2.0, 0.7
    x = beta * (C / LC - R / LR) - gamma
    loss, metrics = run("simpo", beta=beta, simpo_gamma=gamma)
    close(loss, -log_sig(x))
    close(metrics["rewards/chosen"], np.mean(beta * C / LC))
    # Reference-free: no reference field is read.
    st = make_stats(ref_chosen_logps=None, ref_rejected_logps=None)
    close(run("simpo", st, beta=beta, simpo_gamma=gamma)[0], -log_sig(x))


def test_orpo():
    beta = 0.25
    pc, pr = np.exp(C / LC), np.exp(R / LR)
    log_odds = np.log(pc / (1 - pc)) - np.log(pr / (1 - pr))
    nll = -C.sum() / LC.sum()
    st = make_stats(ref_chosen_logps=None, ref_rejected_logps=None)
    loss, metrics = run("orpo", st, beta=beta)
    close(loss, nll - beta * log_sig(log_odds))
    close(metrics["nll_loss"], nll)


def test_sft_is_token_mean_nll_of_chosen():
    loss, metrics = run("sft")
    close(loss, [-C.sum() / LC.sum()] * 4)
    close(metrics["nll_loss"], -C.sum() / LC.sum())


# f-divergence scores (Wang et al. 2023), written as the derivative f'(u) of each f.


@pytest.mark.parametrize(
    "kind, coef, score",
    [
        ("reverse_kl", 1.0, lambda r: r),
        ("forward_kl", 1.0, lambda r: 1 - np.exp(-r)),
        ("js_divergence", 1.0, lambda r: np.log(2 * np.exp(r) / (1 + np.exp(r)))),
        ("alpha_divergence", 0.5, lambda r: (np.exp(-0.5 * r) - 1) / -0.5),
        ("alpha_divergence", 2.0, lambda r: np.exp(r) - 1),
        ("alpha_divergence", 1.0, lambda r: r),
    ],
)
def test_f_divergence_scores_in_sigmoid_and_ipo(kind, coef, score):
    beta = 0.3
    hyper = dict(beta=beta, f_divergence_type=kind, f_alpha_divergence_coef=coef)
    sc, sr = score(LOGR_C), score(LOGR_R)
    close(run("sigmoid", **hyper)[0], -log_sig(beta * (sc - sr)), rtol=1e-5)
    close(run("ipo", **hyper)[0], (sc / LC - sr / LR - 1 / (2 * beta)) ** 2, rtol=1e-5)


def test_unknown_f_divergence_is_an_error():
    with pytest.raises(ValueError, match="f_divergence_type"):
        run("sigmoid", f_divergence_type="hellinger")


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def test_trl_metrics():
    beta = 0.1
    _, m = run("sigmoid", beta=beta)
    close(m["rewards/chosen"], np.mean(beta * LOGR_C))
    close(m["rewards/rejected"], np.mean(beta * LOGR_R))
    close(m["rewards/margins"], np.mean(beta * H))
    close(m["rewards/accuracies"], 0.5)  # H > 0 for pairs 0 and 2
    close(m["logps/chosen"], C.mean())
    close(m["logps/rejected"], R.mean())


# ----------------------------------------------------------------------------------------
# Gradients: finite, right sign at easy points, and the limiting cases of the issue
# ----------------------------------------------------------------------------------------


def grads(name, stats, **hyper):
    def total(c, r):
        st = stats.replace(chosen_logps=c, rejected_logps=r)
        return jnp.sum(losses.get(name)(st, **hyper)[0])

    gc, gr = jax.grad(total, argnums=(0, 1))(stats.chosen_logps, stats.rejected_logps)
    return np.asarray(gc, np.float64), np.asarray(gr, np.float64)


# At h = 0 with policy = reference every preference loss should raise the chosen
# log-prob and lower the rejected one. Exceptions: apo_down lowers both by design; sft
# ignores the rejected answer; DiscoPOP is not monotone near x = 0 (its exp branch
# switches on there: d/dx at 0 is 0.25/tau (1 - log 2) - 0.75 > 0 for tau = 0.05), so
# it is probed at h = -10, where it is the logistic loss.
def easy_stats(h: float = 0.0):
    c, r = np.array([-10.0, -20.0]), np.array([-10.0, -20.0])
    return losses.PreferenceStats(
        chosen_logps=jnp.asarray(c + h),
        rejected_logps=jnp.asarray(r),
        ref_chosen_logps=jnp.asarray(c),
        ref_rejected_logps=jnp.asarray(r),
        chosen_lengths=jnp.asarray([5.0, 9.0]),
        rejected_lengths=jnp.asarray([5.0, 9.0]),
        chosen_log1m_sum=jnp.asarray([-0.1, -0.2]),
        rejected_log1m_sum=jnp.asarray([-0.1, -0.2]),
    )


@pytest.mark.parametrize("name", [n for n in losses.names() if losses.is_paired(n)])
def test_gradients_finite_and_signed(name):
    gc, gr = grads(name, easy_stats(-10.0 if name == "discopop" else 0.0))
    assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gr))
    if name not in ("apo_down",):
        assert np.all(gc < 0), (name, gc)
    if name in ("sft", "unlikelihood"):  # unlikelihood reads rejected_log1m_sum instead
        assert np.all(gr == 0)
    else:
        assert np.all(gr > 0), (name, gr)


def test_discopop_is_not_monotone_at_zero_margin():
    tau = 0.05
    d0 = 0.25 / tau * (1 - math.log(2.0)) - 0.75  # derivative of the formula at x = 0
    gc, _ = grads("discopop", easy_stats(), beta=1.0, discopop_tau=tau)
    close(gc, d0, rtol=1e-5)


def test_apo_down_lowers_both_but_rejected_more():
    st = easy_stats().replace(ref_chosen_logps=jnp.asarray([-9.0, -19.0]))  # logr_c = -1
    gc, gr = grads("apo_down", st, beta=1.0)
    assert np.all(gr > 0) and np.all(gc > -gr)


def test_ipo_gradient_vanishes_at_its_optimum():
    beta = 0.25  # optimum: normalised margin = 1/(2 beta) = 2
    st = easy_stats()
    # logr_c / 5 - logr_r / 5 = 2 with logr_r = -4 per 5 tokens... put logr_c = 6, logr_r = -4.
    st = st.replace(
        chosen_logps=st.ref_chosen_logps + jnp.asarray([6.0, 10.0]),
        rejected_logps=st.ref_rejected_logps + jnp.asarray([-4.0, -8.0]),
    )
    close((6 - -4) / 5 - 0, 2.0)  # pair 0
    close(10 / 9 - -8 / 9, 2.0)  # pair 1
    gc, gr = grads("ipo", st, beta=beta)
    close(gc, 0.0, atol=1e-6)
    close(gr, 0.0, atol=1e-6)
    # The sequence form has its optimum at h = 1/(2 beta) = 2 instead.
    st2 = easy_stats().replace(chosen_logps=easy_stats().ref_chosen_logps + 2.0)
    gc, gr = grads("ipo", st2, beta=beta, ipo_normalize=False)
    close(gc, 0.0, atol=1e-6)


def test_cdpo_gradient_vanishes_where_sigmoid_equals_one_minus_e():
    beta, e = 0.5, 0.1
    h_star = math.log((1 - e) / e) / beta  # sigma(beta h*) = 1 - e
    close(sig(beta * h_star), 1 - e)
    st = easy_stats().replace(chosen_logps=easy_stats().ref_chosen_logps + h_star)
    gc, gr = grads("sigmoid", st, beta=beta, label_smoothing=e)
    close(gc, 0.0, atol=1e-6)
    close(gr, 0.0, atol=1e-6)
    # On either side the gradient pushes back toward h*.
    st_lo = st.replace(chosen_logps=st.chosen_logps - 1.0)
    assert np.all(grads("sigmoid", st_lo, beta=beta, label_smoothing=e)[0] < 0)
    st_hi = st.replace(chosen_logps=st.chosen_logps + 1.0)
    assert np.all(grads("sigmoid", st_hi, beta=beta, label_smoothing=e)[0] > 0)


def test_sigmoid_small_beta_is_linear_with_slope_half_beta():
    beta = 1e-4
    # -log sig(beta h) = log 2 - beta h / 2 + O((beta h)^2)
    loss, _ = run("sigmoid", beta=beta)
    close(loss, math.log(2.0) - 0.5 * beta * H, rtol=1e-6, atol=1e-7)
    gc, gr = grads("sigmoid", make_stats(), beta=beta)
    close(gc, -0.5 * beta, rtol=2e-3)
    close(gr, 0.5 * beta, rtol=2e-3)


# ----------------------------------------------------------------------------------------
# jit, bf16, errors, registry
# ----------------------------------------------------------------------------------------


TRL_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def unpaired_stats(dtype=jnp.float32):
    return losses.UnpairedStats(
        logps=jnp.asarray(C, dtype),
        ref_logps=jnp.asarray(RC, dtype),
        kl_logps=jnp.asarray(R, dtype),
        ref_kl_logps=jnp.asarray(RR, dtype),
        labels=jnp.asarray([1, 0, 1, 0]),
        lengths=jnp.asarray(LC, dtype),
    )


@pytest.mark.parametrize("name", losses.names())
def test_every_registered_loss_jits_and_matches_eager(name):
    st = make_stats() if losses.is_paired(name) else unpaired_stats()
    eager_loss, eager_metrics = losses.get(name)(st)
    jit_loss, jit_metrics = jax.jit(losses.get(name))(st)
    close(jit_loss, np.asarray(eager_loss), rtol=1e-6)
    assert jit_loss.shape == (4,)
    assert set(jit_metrics) == set(eager_metrics)
    # every loss logs TRL's names, as finite scalars (subset means of unpaired losses as
    # CountedMean, resolved on the host)
    resolved = losses.finalize_metrics(jax.device_get(jit_metrics))
    for key in TRL_METRICS:
        assert key in resolved and np.shape(resolved[key]) == (), (name, key)
        assert np.isfinite(float(resolved[key])), (name, key)


def big_bf16_stats():
    # |logps| up to 2000 in bfloat16, margins of both signs, one tie.
    c = np.array([-2000.0, -1500.0, -812.0, -3.0])
    r = np.array([-1000.0, -1996.0, -812.0, -1900.0])
    return make_stats(
        jnp.bfloat16,
        chosen_logps=c,
        rejected_logps=r,
        ref_chosen_logps=c + np.array([40.0, -40.0, 0.0, 8.0]),
        ref_rejected_logps=r + np.array([-64.0, 24.0, 0.0, -16.0]),
        chosen_lengths=[900.0, 700.0, 400.0, 2.0],
        rejected_lengths=[500.0, 900.0, 400.0, 950.0],
    )


@pytest.mark.parametrize("name", losses.names())
def test_bf16_inputs_at_large_magnitudes_do_not_nan(name):
    if losses.is_paired(name):
        st = big_bf16_stats()
    else:
        b = big_bf16_stats()
        st = losses.UnpairedStats(
            logps=b.chosen_logps,
            ref_logps=b.ref_chosen_logps,
            kl_logps=b.rejected_logps,
            ref_kl_logps=b.ref_rejected_logps,
            labels=jnp.asarray([1, 0, 1, 0]),
            lengths=b.chosen_lengths,
        )
    fn = losses.get(name)

    def total(s):
        loss, metrics = fn(s)
        return jnp.sum(loss), (loss, metrics)

    # One compilation for value and gradient.
    (_, (loss, metrics)), grad = jax.jit(jax.value_and_grad(total, has_aux=True, allow_int=True))(
        st
    )
    assert loss.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(loss))), (name, loss)
    resolved = losses.finalize_metrics(jax.device_get(metrics))
    assert all(np.isfinite(float(v)) for v in resolved.values()), (name, metrics)
    for leaf in jax.tree.leaves(grad):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert not np.any(np.isnan(np.asarray(leaf, np.float32))), name


def test_bf16_margin_is_exact_after_upcast():
    # -2000 and -1960 are exact in bf16; their difference must come out as 40, not rounded.
    st = make_stats(
        jnp.bfloat16,
        chosen_logps=[-1960.0],
        rejected_logps=[-2000.0],
        ref_chosen_logps=[-2000.0],
        ref_rejected_logps=[-2000.0],
        chosen_lengths=[1.0],
        rejected_lengths=[1.0],
    )
    close(run("sigmoid", st, beta=0.1)[0], -log_sig(0.1 * 40.0))


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_do_not_nan_at_large_magnitudes(kind):
    fn = lambda s: losses.sigmoid(s, f_divergence_type=kind, f_alpha_divergence_coef=0.5)[0]
    st = big_bf16_stats()
    assert not np.any(np.isnan(np.asarray(fn(st))))
    g = jax.grad(lambda c: jnp.sum(fn(st.replace(chosen_logps=c))))(st.chosen_logps)
    assert not np.any(np.isnan(np.asarray(g, np.float32)))


def test_missing_field_is_named():
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        losses.sigmoid(make_stats(ref_chosen_logps=None))
    with pytest.raises(ValueError, match="chosen_lengths"):
        losses.ipo(make_stats(chosen_lengths=None))
    with pytest.raises(ValueError, match="kl_logps"):
        losses.kto(unpaired_stats().replace(kl_logps=None))


def test_registry():
    assert {"sigmoid", "ipo", "kto", "simpo", "orpo", "rdpo", "dpop", "discopop"} <= set(
        losses.names()
    )
    assert losses.is_paired("sigmoid") and not losses.is_paired("kto")
    assert losses.needs_reference("sigmoid") and not losses.needs_reference("simpo")
    assert not losses.needs_reference("orpo")
    with pytest.raises(KeyError, match="sigmoid"):
        losses.get("sigmod")  # the close match is suggested

    try:

        @losses.register("test_cubed", needs_reference=False)
        def cubed(stats, beta=0.1):
            h = stats.chosen_logps - stats.rejected_logps
            return (beta * h) ** 3, {}

        assert losses.get("test_cubed") is cubed and "test_cubed" in losses.names()
        assert not losses.needs_reference("test_cubed")
        close(losses.get("test_cubed")(make_stats(), beta=1.0)[0], (C - R) ** 3)

        second = lambda stats: (stats.chosen_logps, {})
        with pytest.warns(UserWarning, match="replacing"):
            losses.register("test_cubed")(second)  # call form
        assert losses.get("test_cubed") is second
    finally:
        for table in (losses._REGISTRY, losses._PAIRED, losses._NEEDS_REFERENCE):
            table.pop("test_cubed", None)


# ----------------------------------------------------------------------------------------
# compute_loss: several loss types, rpo_alpha, WPO, LD-DPO
# ----------------------------------------------------------------------------------------


def test_compute_loss_weighted_sum_and_rpo():
    beta = 0.2
    loss, metrics = losses.compute_loss(
        make_stats(), ["sigmoid", "ipo"], loss_weights=[0.7, 0.3], rpo_alpha=0.5, beta=beta
    )
    nll = -C.sum() / LC.sum()
    expected = (
        0.7 * -log_sig(beta * H)
        + 0.3 * (LOGR_C / LC - LOGR_R / LR - 1 / (2 * beta)) ** 2
        + 0.5 * nll
    )
    close(loss, expected)
    close(float(metrics["nll_loss"]), nll)
    close(float(metrics["rewards/margins"]), np.mean(beta * H))


def test_compute_loss_rejects_unknown_hypers_and_mismatched_weights():
    with pytest.raises(TypeError, match="bta"):
        losses.compute_loss(make_stats(), "sigmoid", bta=0.1)
    with pytest.raises(TypeError, match="simpo_gamma"):
        losses.compute_loss(make_stats(), "sigmoid", simpo_gamma=0.5)
    with pytest.raises(ValueError, match="loss_weights"):
        losses.compute_loss(make_stats(), ["sigmoid", "ipo"], loss_weights=[1.0])
    # A hyper taken by one of the losses is fine and goes only there.
    losses.compute_loss(make_stats(), ["sigmoid", "simpo"], simpo_gamma=0.5, beta=0.1)


def test_wpo_weighting_multiplies_by_both_weights_without_gradient():
    wc, wr = np.array([0.5, 1.2, 0.9, 0.1]), np.array([0.8, 0.3, 1.0, 2.0])
    st = make_stats(chosen_weights=wc, rejected_weights=wr)
    loss, _ = losses.compute_loss(st, "sigmoid", use_weighting=True, beta=0.1)
    close(loss, -log_sig(0.1 * H) * wc * wr)
    g = jax.grad(
        lambda w: jnp.sum(
            losses.compute_loss(st.replace(chosen_weights=w), "sigmoid", use_weighting=True)[0]
        )
    )(st.chosen_weights)
    close(g, 0.0)
    with pytest.raises(ValueError, match="chosen_weights"):
        losses.compute_loss(make_stats(), "sigmoid", use_weighting=True)


def test_ld_alpha_down_weights_the_tail_of_the_longer_answer():
    pc, pr = np.array([-9.0, -20.0, -7.25, -30.0]), np.array([-14.0, -24.0, -9.0, -41.5])
    a = 0.3
    st = make_stats(chosen_prefix_logps=pc, rejected_prefix_logps=pr)
    ld_c, ld_r = pc + a * (C - pc), pr + a * (R - pr)
    loss, metrics = losses.compute_loss(st, "sigmoid", ld_alpha=a, beta=0.1)
    close(loss, -log_sig(0.1 * ((ld_c - RC) - (ld_r - RR))))
    close(float(metrics["logps/chosen"]), ld_c.mean())
    # With reference prefix sums the reference gets the same treatment (TRL 1.x).
    rpc, rpr = RC + 1.0, RR + 2.0
    st2 = st.replace(
        ref_chosen_prefix_logps=jnp.asarray(rpc), ref_rejected_prefix_logps=jnp.asarray(rpr)
    )
    ref_c, ref_r = rpc + a * (RC - rpc), rpr + a * (RR - rpr)
    loss2, _ = losses.compute_loss(st2, "sigmoid", ld_alpha=a, beta=0.1)
    close(loss2, -log_sig(0.1 * ((ld_c - ref_c) - (ld_r - ref_r))))
    # ld_alpha = 1 is plain DPO.
    close(losses.compute_loss(st, "sigmoid", ld_alpha=1.0)[0], run("sigmoid")[0])


def test_combined_loss_can_be_registered():
    try:
        losses.register("test_mpo")(losses.combined(["sigmoid", "sft"], [1.0, 0.2]))
        loss, _ = losses.get("test_mpo")(make_stats(), beta=0.1)
        close(loss, -log_sig(0.1 * H) + 0.2 * (-C.sum() / LC.sum()))
    finally:
        for table in (losses._REGISTRY, losses._PAIRED, losses._NEEDS_REFERENCE):
            table.pop("test_mpo", None)


# ----------------------------------------------------------------------------------------
# KTO
# ----------------------------------------------------------------------------------------


def test_kto_values_and_reference_point():
    beta, wd, wu = 0.5, 1.5, 0.75
    st = unpaired_stats()
    # KL pairs: R - RR = [-0.5, 1.5, -0.5, 2.5], mean 0.75 -> z0 = 0.75.
    z0 = np.mean(R - RR)
    close(z0, 0.75)
    logr = C - RC
    desirable = np.array([1, 0, 1, 0]) == 1
    expected = np.where(
        desirable, wd * (1 - sig(beta * (logr - z0))), wu * (1 - sig(beta * (z0 - logr)))
    )
    loss, metrics = losses.kto(st, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    metrics = losses.finalize_metrics(metrics)
    close(loss, expected)
    close(float(metrics["kl"]), 0.75)
    close(float(metrics["rewards/chosen"]), np.mean(beta * logr[desirable]))
    close(float(metrics["rewards/rejected"]), np.mean(beta * logr[~desirable]))
    close(float(metrics["logps/chosen"]), np.mean(C[desirable]))


def test_kto_reference_point_is_clamped_and_detached():
    st = unpaired_stats().replace(kl_logps=jnp.asarray(RR - 1.0))  # mean KL log-ratio = -1
    close(float(losses.kto_reference_point(st)), 0.0)
    beta = 0.5
    logr = C - RC
    expected = np.where(
        np.array([1, 0, 1, 0]) == 1, 1 - sig(beta * logr), 1 - sig(beta * (0.0 - logr))
    )
    close(losses.kto(st, beta=beta)[0], expected)
    g = jax.grad(lambda k: jnp.sum(losses.kto(unpaired_stats().replace(kl_logps=k))[0]))(
        unpaired_stats().kl_logps
    )
    close(g, 0.0)


def test_apo_zero_unpaired():
    beta = 0.5
    logr = C - RC
    expected = np.where(np.array([1, 0, 1, 0]) == 1, 1 - sig(beta * logr), sig(beta * logr))
    close(losses.apo_zero_unpaired(unpaired_stats(), beta=beta)[0], expected)


def test_check_kto_weights():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        close(losses.check_kto_weights(1.0, 1.0, 100, 100), 1.0)
        close(losses.check_kto_weights(1.0, 1.0, 130, 100), 1.3)
    with pytest.warns(UserWarning, match=r"\[1, 4/3\]"):
        losses.check_kto_weights(1.0, 1.0, 50, 100)
    with pytest.warns(UserWarning, match=r"\[1, 4/3\]"):
        losses.check_kto_weights(2.0, 1.0, 100, 100)
    with pytest.warns(UserWarning, match="undefined"):
        losses.check_kto_weights(1.0, 1.0, 10, 0)


# ----------------------------------------------------------------------------------------
# TRL's DPOTrainer formulas, restated in PyTorch as its source writes them
# ----------------------------------------------------------------------------------------


def test_against_trl_formulas_in_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    c, r, rc, rr = t(C), t(R), t(RC), t(RR)
    beta, ls, tau = 0.3, 0.1, 0.05
    clr, rlr = c - rc, r - rr
    d = clr - rlr
    trl = {
        "sigmoid": -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls,
        "robust": (-F.logsigmoid(beta * d) * (1 - ls) + F.logsigmoid(-beta * d) * ls)
        / (1 - 2 * ls),
        "exo_pair": torch.sigmoid(beta * d) * (F.logsigmoid(beta * d) - math.log1p(-ls))
        + torch.sigmoid(-beta * d) * (F.logsigmoid(-beta * d) - math.log(ls)),
        "hinge": torch.relu(1 - beta * d),
        "nca_pair": -F.logsigmoid(beta * clr)
        - 0.5 * F.logsigmoid(-beta * clr)
        - 0.5 * F.logsigmoid(-beta * rlr),
        "bco_pair": -F.logsigmoid(beta * clr) - F.logsigmoid(-beta * rlr),
        "apo_zero": 1 - torch.sigmoid(beta * clr) + torch.sigmoid(beta * rlr),
        "apo_down": torch.sigmoid(beta * clr) + 1 - torch.sigmoid(beta * d),
        "discopop": -F.logsigmoid(beta * d) * (1 - torch.sigmoid(beta * d / tau))
        + torch.exp(-beta * d) * torch.sigmoid(beta * d / tau),
        "aot": -F.logsigmoid(beta * (torch.sort(c - r, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]))
        * (1 - ls)
        - F.logsigmoid(-beta * (torch.sort(c - r, dim=0)[0] - torch.sort(rc - rr, dim=0)[0])) * ls,
    }
    for name, expected in trl.items():
        hyper = {"beta": beta}
        if name in ("sigmoid", "robust", "exo_pair", "aot"):
            hyper["label_smoothing"] = ls
        if name == "discopop":
            hyper["discopop_tau"] = tau
        close(run(name, **hyper)[0], expected.numpy(), rtol=2e-5)
