"""GRPO / Dr. GRPO / DAPO / RLOO pieces against hand-computed values (dpo_jax.policy_gradient)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import objectives
from dpo_jax import policy_gradient as pg
from dpo_jax.errors import UserError
from dpo_jax.logprobs import SequenceLogps

EPS = 1e-4
# two groups of K = 3 (group-major)
SCORES = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 6.0], np.float32)


# ------------------------------------------------------------------------ advantages


def test_group_advantages_grpo_group_std():
    adv = np.asarray(pg.group_advantages(jnp.asarray(SCORES), 3))
    # group 1: mean 2, Bessel std sqrt((1 + 0 + 1) / 2) = 1
    # group 2: mean 2, deviations (-2, -2, 4), Bessel std sqrt((4 + 4 + 16) / 2) = sqrt(12)
    expected = [-1 / (1 + EPS), 0.0, 1 / (1 + EPS)]
    expected += [d / (math.sqrt(12.0) + EPS) for d in (-2.0, -2.0, 4.0)]
    np.testing.assert_allclose(adv, expected, rtol=1e-6)


def test_group_advantages_dr_grpo_unscaled_and_batch_std():
    adv = np.asarray(pg.group_advantages(jnp.asarray(SCORES), 3, scale="none"))
    np.testing.assert_allclose(adv, [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0], rtol=1e-6)
    # batch std: all six scores, mean 2, squared deviations 1, 0, 1, 4, 4, 16 -> var 26 / 5
    adv = np.asarray(pg.group_advantages(jnp.asarray(SCORES), 3, scale="batch"))
    std = math.sqrt(26.0 / 5.0)
    np.testing.assert_allclose(adv, np.array([-1, 0, 1, -2, -2, 4]) / (std + EPS), rtol=1e-6)


def test_group_advantages_equal_scores_are_zero():
    adv = pg.group_advantages(jnp.asarray([5.0, 5.0, 1.0, 3.0]), 2)
    # group 2: mean 2, deviations -1, 1, Bessel std sqrt(2)
    s = math.sqrt(2.0) + EPS
    np.testing.assert_allclose(np.asarray(adv), [0.0, 0.0, -1 / s, 1 / s], rtol=1e-6)


def test_rloo_advantages_leave_one_out():
    adv = np.asarray(pg.rloo_advantages(jnp.asarray(SCORES), 3))
    # r_i - mean of the other two
    loo = [1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 3.0, 0 - 3.0, 6 - 0.0]
    np.testing.assert_allclose(adv, loo, rtol=1e-6)
    # = K / (K - 1) * (r - group mean)
    np.testing.assert_allclose(adv, 1.5 * np.array([-1, 0, 1, -2, -2, 4]), rtol=1e-6)


def test_rloo_rewards_subtract_beta_kl():
    kl = jnp.asarray([0.5, -0.25, 2.0, 0.0, 1.0, 4.0])
    out = np.asarray(pg.rloo_rewards(jnp.asarray(SCORES), kl, 0.1))
    np.testing.assert_allclose(out, [0.95, 2.025, 2.8, 0.0, -0.1, 5.6], rtol=1e-6)


def test_dynamic_sampling_mask():
    scores = jnp.asarray([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0])
    mask = np.asarray(pg.dynamic_sampling_mask(scores, 3))
    assert mask.dtype == bool
    assert mask.tolist() == [False] * 3 + [True] * 3 + [False] * 3


def test_bad_groups_and_names_refused():
    with pytest.raises(UserError, match="groups of 4"):
        pg.group_advantages(jnp.asarray(SCORES), 4)
    with pytest.raises(UserError, match="scale"):
        pg.group_advantages(jnp.asarray(SCORES), 3, scale="std")
    with pytest.raises(UserError, match="at least 2"):
        pg.rloo_advantages(jnp.asarray(SCORES), 1)
    mask = jnp.ones((2, 3), bool)
    with pytest.raises(UserError, match="loss_type"):
        pg.aggregate(jnp.ones((2, 3)), mask, "token_mean")
    with pytest.raises(UserError, match="max_completion_length"):
        pg.aggregate(jnp.ones((2, 3)), mask, "dr_grpo")


# ------------------------------------------------------------------------ KL, clipping


def test_kl_k3_values():
    logps = jnp.asarray([[-1.0, -2.0, -0.5]])
    ref = jnp.asarray([[-1.5, -1.0, -0.5]])
    # d = ref - logp = (-0.5, 1, 0): exp(d) - d - 1
    expected = [[math.exp(-0.5) + 0.5 - 1.0, math.e - 2.0, 0.0]]
    np.testing.assert_allclose(np.asarray(pg.kl_k3(logps, ref)), expected, rtol=1e-6)
    masked = pg.kl_k3(logps, ref, jnp.asarray([[True, False, True]]))
    np.testing.assert_allclose(np.asarray(masked), [[expected[0][0], 0.0, 0.0]], rtol=1e-6)


def _clip_case(log_ratio: float, adv: float, eps_low: float, eps_high: float):
    def loss(lp):
        per_token, metrics = pg.clipped_token_loss(
            lp, jnp.zeros((1, 1)), jnp.full((1, 1), adv), jnp.ones((1, 1), bool), eps_low, eps_high
        )
        return per_token[0, 0], metrics

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.full((1, 1), log_ratio))
    return float(value), float(grad[0, 0]), {k: v.value() for k, v in metrics.items()}


def test_asymmetric_clip_high():
    log_ratio = math.log(1.25)  # ratio 1.25, A = 1
    # eps_high = 0.2: clipped at 1.2, no gradient
    value, grad, m = _clip_case(log_ratio, 1.0, 0.2, 0.2)
    assert value == pytest.approx(-1.2, rel=1e-6) and grad == 0.0
    assert m == {
        "clip_ratio/low_mean": 0.0,
        "clip_ratio/high_mean": 1.0,
        "clip_ratio/region_mean": 1.0,
    }
    # eps_high = 0.28 (DAPO's clip-higher): not clipped, d(-A rho)/dlogp = -A rho
    value, grad, m = _clip_case(log_ratio, 1.0, 0.2, 0.28)
    assert value == pytest.approx(-1.25, rel=1e-6) and grad == pytest.approx(-1.25, rel=1e-6)
    assert m["clip_ratio/region_mean"] == 0.0


def test_clip_low_only_for_negative_advantages():
    # ratio 0.7 < 1 - 0.2 with A = -1: -min(-0.7, -0.8) = 0.8, clipped low
    value, grad, m = _clip_case(math.log(0.7), -1.0, 0.2, 0.28)
    assert value == pytest.approx(0.8, rel=1e-6) and grad == 0.0
    assert m["clip_ratio/low_mean"] == 1.0 and m["clip_ratio/high_mean"] == 0.0
    # the same ratio with A = +1 is not clipped (the min keeps the smaller objective)
    value, grad, m = _clip_case(math.log(0.7), 1.0, 0.2, 0.28)
    assert value == pytest.approx(-0.7, rel=1e-6) and grad == pytest.approx(-0.7, rel=1e-6)
    assert m["clip_ratio/region_mean"] == 0.0


# ------------------------------------------------------------------------ aggregation

# ragged rows: lengths 3, 1, 2 and an empty row (padding / dropped sample)
X = np.array(
    [[0.0, 1.0, 2.0, 3.0], [0.0, 4.0, 9.0, 9.0], [0.0, 5.0, 7.0, 9.0], [9.0, 9.0, 9.0, 9.0]],
    np.float32,
)
MASK = np.array(
    [
        [False, True, True, True],
        [False, True, False, False],
        [False, True, True, False],
        [False] * 4,
    ]
)


def test_aggregations_on_ragged_mask():
    x, m = jnp.asarray(X), jnp.asarray(MASK)
    # row means 2, 4, 6 over the 3 non-empty rows
    assert float(pg.aggregate(x, m, "grpo")) == pytest.approx(4.0)
    # 1 + 2 + 3 + 4 + 5 + 7 = 22 over 6 tokens
    assert float(pg.aggregate(x, m, "dapo")) == pytest.approx(22 / 6)
    assert float(pg.aggregate(x, m, "bnpo")) == pytest.approx(22 / 6)
    # 22 / (3 sequences x 8)
    assert float(pg.aggregate(x, m, "dr_grpo", 8)) == pytest.approx(22 / 24)


def test_aggregation_over_micro_batches_uses_whole_batch_counts():
    # micro-batch 0: rows 0, 3 (3 tokens, 1 sequence); micro-batch 1: rows 1, 2 (3 tokens, 2)
    x_A = jnp.asarray(X[[0, 3, 1, 2]].reshape(2, 2, 4))
    m_A = jnp.asarray(MASK[[0, 3, 1, 2]].reshape(2, 2, 4))
    batch_A = {"sequence_index": jnp.where(m_A, 0, -1)}
    ctx = pg.batch_context(batch_A)
    assert float(ctx["tokens"]) == 6.0 and float(ctx["sequences"]) == 3.0

    def step_mean(loss_type, **kw):  # what the step logs and differentiates: mean over A
        return np.mean(
            [float(pg.aggregate(x_A[a], m_A[a], loss_type, context=ctx, num_micro=2, **kw)) for a in range(2)]
        )  # fmt: skip

    # the same as the whole batch in one micro-batch
    assert step_mean("grpo") == pytest.approx(4.0)
    assert step_mean("dapo") == pytest.approx(22 / 6)
    assert step_mean("dr_grpo", max_completion_length=8) == pytest.approx(22 / 24)
    # bnpo is TRL's per-micro-batch token mean: mean(6 / 3, 16 / 3)
    assert step_mean("bnpo") == pytest.approx((6 / 3 + 16 / 3) / 2)


# ------------------------------------------------------------------------ objective_loss

LOGPS = np.array(
    [[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, -0.7, 0.0], [0.0, -2.5, 0.0, 0.0]], np.float32
)
OBJ_MASK = np.array(
    [[False, True, True, True], [False, True, True, False], [False, True, False, False]]
)
ADV_S = np.array([0.5, -2.0, 1.5], np.float32)


def _inp(logps, batch, loss_type="dapo", beta=0.0, context=None, num_micro=1, **hyper):
    hyper = {
        "epsilon_low": 0.2, "epsilon_high": 0.28, "beta": beta, "loss_type": loss_type,
        "max_completion_length": 3, **hyper,
    }  # fmt: skip
    lengths = batch["sequence_index"].__ge__(0).sum(-1).astype(jnp.float32)
    policy = SequenceLogps(
        logps_S=jnp.sum(logps, -1), lengths_S=lengths, token_logps_NxL=logps,
        entropy_sums_S=jnp.asarray([3.0, 1.0, 2.0]),
    )  # fmt: skip
    cfg = SimpleNamespace(objective_hyper=hyper)
    return objectives.ObjectiveInput(cfg, policy, None, batch, None, None, True, context, num_micro)


def _batch(**cols):
    mask = jnp.asarray(OBJ_MASK)
    batch = {
        "sequence_index": jnp.where(mask, jnp.arange(3)[:, None], -1),
        "advantages": jnp.where(mask, jnp.asarray(ADV_S)[:, None], 0.0),
    }
    batch.update(cols)
    return batch


def _grad(batch, **kw):
    def f(lp):
        return pg.objective_loss(_inp(lp, batch, **kw))[0]

    return np.asarray(jax.grad(f)(jnp.asarray(LOGPS)))


@pytest.mark.parametrize(
    "old", ["absent", "same", "on_policy"], ids=["no-old-column", "old-equals-current", "on_policy"]
)
def test_gradient_at_ratio_one_is_minus_advantage_over_count(old):
    cols, hyper = {}, {}
    if old == "same":
        cols["old_logps"] = jnp.asarray(LOGPS)
    elif old == "on_policy":  # the column is ignored
        cols["old_logps"] = jnp.full(LOGPS.shape, 7.0)
        hyper["on_policy"] = True
    batch = _batch(**cols)
    grad = _grad(batch, loss_type="dapo", **hyper)
    expected = np.where(OBJ_MASK, -ADV_S[:, None] / 6.0, 0.0)  # 6 completion tokens
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)
    # "grpo": each sequence's mean, then the mean over the 3 sequences
    grad = _grad(batch, loss_type="grpo", **hyper)
    lengths = OBJ_MASK.sum(-1)
    expected = np.where(OBJ_MASK, -ADV_S[:, None] / (lengths[:, None] * 3.0), 0.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)
    # at ratio 1 the loss value is -mean A over tokens (dapo)
    loss, metrics, _ = pg.objective_loss(_inp(jnp.asarray(LOGPS), batch, **hyper))
    assert float(loss) == pytest.approx(-(0.5 * 3 - 2.0 * 2 + 1.5) / 6, rel=1e-6)
    assert float(metrics["loss"]) == float(loss)


def test_beta_zero_never_reads_reference():
    batch = _batch(ref_token_logps=jnp.full(LOGPS.shape, jnp.nan))
    loss, metrics, _ = pg.objective_loss(_inp(jnp.asarray(LOGPS), batch, beta=0.0))
    assert np.isfinite(float(loss)) and "kl" not in metrics
    assert np.isfinite(_grad(batch, beta=0.0)).all()
    assert set(metrics) == {
        "loss", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
        "policy/entropy",
    }  # fmt: skip
    assert metrics["policy/entropy"].value() == pytest.approx(6.0 / 6.0)


def test_beta_adds_k3_kl_to_the_token_loss():
    ref = np.where(OBJ_MASK, LOGPS - 0.5, 0.0).astype(np.float32)  # ref - logp = -0.5
    batch = _batch(ref_token_logps=jnp.asarray(ref))
    k3 = math.exp(-0.5) + 0.5 - 1.0
    loss, metrics, _ = pg.objective_loss(_inp(jnp.asarray(LOGPS), batch, beta=0.1))
    assert metrics["kl"].value() == pytest.approx(k3, rel=1e-5)
    assert float(loss) == pytest.approx(-(0.5 * 3 - 2.0 * 2 + 1.5) / 6 + 0.1 * k3, rel=1e-5)


def test_objective_loss_jits_with_whole_batch_context():
    batch = _batch()
    batch_A = jax.tree.map(lambda x: x[None], batch)
    ctx = pg.batch_context(batch_A)
    f = jax.jit(lambda lp, c: pg.objective_loss(_inp(lp, batch, "dr_grpo", context=c))[0])
    # ratio 1: -sum(A over tokens) / (3 sequences x max_completion_length 3)
    assert float(f(jnp.asarray(LOGPS), ctx)) == pytest.approx(-(1.5 - 4.0 + 1.5) / 9, rel=1e-6)
