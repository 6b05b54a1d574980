"""Evaluation math: KL estimate vs exact KL, preference metrics, win rate, stderr."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_jax import evaluation


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_mean_and_stderr_hand_computed():
    est = evaluation.mean_and_stderr([1.0, 2.0, 3.0, 6.0])
    # mean 3, sample variance ((4+1+0+9)/3) = 14/3, stderr sqrt(14/3)/2
    assert est.mean == pytest.approx(3.0)
    assert est.stderr == pytest.approx(np.sqrt(14 / 3) / 2)
    assert est.n == 4
    with pytest.raises(ValueError, match="empty"):
        evaluation.mean_and_stderr([])
    with pytest.raises(ValueError, match="non-finite"):
        evaluation.mean_and_stderr([1.0, np.nan])


def test_sequence_kl_matches_exact_kl_on_categorical_sequences():
    """Sequences of T independent categorical tokens: the exact sequence KL is the sum of
    per-step KLs; the Monte-Carlo estimate from samples of p must land within a few
    standard errors of it, and its standard error must match the analytic one."""
    rng = np.random.default_rng(0)
    T, V, N = 3, 6, 20000
    p_TxV = _softmax(rng.normal(size=(T, V)) * 1.5)
    q_TxV = _softmax(rng.normal(size=(T, V)) * 1.5)
    log_ratio_TxV = np.log(p_TxV) - np.log(q_TxV)
    exact = float((p_TxV * log_ratio_TxV).sum())
    reverse = float((q_TxV * -log_ratio_TxV).sum())

    tokens_NxT = np.stack([rng.choice(V, size=N, p=p_TxV[t]) for t in range(T)], axis=1)
    pol_NxT = np.log(p_TxV[np.arange(T), tokens_NxT])
    ref_NxT = np.log(q_TxV[np.arange(T), tokens_NxT])
    est = evaluation.sequence_kl(pol_NxT, ref_NxT)

    # Analytic variance of the per-sequence log ratio (sum of independent steps).
    var = sum(
        float((p_TxV[t] * log_ratio_TxV[t] ** 2).sum() - (p_TxV[t] * log_ratio_TxV[t]).sum() ** 2)
        for t in range(T)
    )
    assert est.n == N
    assert abs(est.mean - exact) < 4 * est.stderr
    assert est.stderr == pytest.approx(np.sqrt(var / N), rel=0.05)
    # The test has power: the reverse KL (a classic sign/argument mix-up) is far away.
    assert abs(reverse - exact) > 10 * est.stderr


def test_sequence_kl_mask_drops_padding():
    pol = np.array([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    ref = np.array([[-1.5, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    est = evaluation.sequence_kl(pol, ref, mask)
    # row 0: 0.5 - 1.0 = -0.5 ; row 1: 3 * 0.5 = 1.5
    assert est.mean == pytest.approx(0.5)
    assert est.stderr == pytest.approx(np.std([-0.5, 1.5], ddof=1) / np.sqrt(2))
    with pytest.raises(ValueError, match="mask"):
        evaluation.sequence_kl(pol, ref, mask[:, :2])


def test_preference_metrics_hand_computed():
    beta = 0.1
    pc = np.array([-10.0, -12.0, -8.0])
    pr = np.array([-11.0, -10.0, -9.0])
    rc = np.array([-11.0, -11.0, -8.0])
    rr = np.array([-10.0, -11.0, -8.0])
    m = evaluation.preference_metrics(pc, pr, rc, rr, beta)
    chosen = beta * np.array([1.0, -1.0, 0.0])
    rejected = beta * np.array([-1.0, 1.0, -1.0])
    assert m["rewards/chosen"] == pytest.approx(chosen.mean())
    assert m["rewards/rejected"] == pytest.approx(rejected.mean())
    assert m["rewards/margins"] == pytest.approx((chosen - rejected).mean())
    assert m["rewards/accuracies"] == pytest.approx(2 / 3)  # margins 0.2, -0.2, 0.1
    assert m["logps/chosen"] == pytest.approx(-10.0)
    assert m["logps/rejected"] == pytest.approx(-10.0)
    # a tie is not counted as correct (TRL semantics)
    tie = evaluation.preference_metrics([-1.0], [-1.0], [-1.0], [-1.0], beta)
    assert tie["rewards/accuracies"] == 0.0


def test_win_rate_with_reward_fn_counts_ties_half():
    reward = lambda texts: np.array([len(t) for t in texts], np.float32)
    wr = evaluation.win_rate(["aaa", "a", "aa", "aaaa"], ["a", "aaa", "bb", "b"], reward_fn=reward)
    assert (wr.wins, wr.ties, wr.losses) == (2, 1, 1)
    assert wr.rate == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert wr.stderr == pytest.approx(np.std([1, 0, 0.5, 1], ddof=1) / 2)


def test_win_rate_judge_swap_cancels_position_bias():
    always_first = lambda prompts, a, b: np.ones(len(a))
    biased = evaluation.win_rate(["x", "y"], ["u", "v"], judge=always_first, swap=False)
    assert biased.rate == 1.0
    fair = evaluation.win_rate(["x", "y"], ["u", "v"], judge=always_first, swap=True)
    assert fair.rate == 0.5
    # an unbiased judge built from a reward function agrees with reward_fn mode
    reward = lambda texts: np.array([len(t) for t in texts], np.float32)
    a, b = ["aaa", "a", "aa"], ["a", "aaa", "bb"]
    via_judge = evaluation.win_rate(a, b, judge=evaluation.reward_judge(reward))
    via_reward = evaluation.win_rate(a, b, reward_fn=reward)
    np.testing.assert_allclose(via_judge.per_pair, via_reward.per_pair)


def test_win_rate_rejects_bad_input():
    reward = lambda texts: np.zeros(len(texts))
    with pytest.raises(ValueError, match="exactly one"):
        evaluation.win_rate(["a"], ["b"])
    with pytest.raises(ValueError, match="2 policy texts vs 1"):
        evaluation.win_rate(["a", "b"], ["c"], reward_fn=reward)
    with pytest.raises(ValueError, match="probabilities"):
        evaluation.win_rate(["a"], ["b"], judge=lambda p, a, b: np.array([2.0]))


def test_mean_reward():
    reward = lambda texts: np.array([len(t) for t in texts], np.float32)
    est = evaluation.mean_reward(["a", "abc"], reward)
    assert est.mean == pytest.approx(2.0)
    assert est.stderr == pytest.approx(1.0)  # std ddof=1 = sqrt(2), / sqrt(2)
