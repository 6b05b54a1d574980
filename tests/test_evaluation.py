"""Evaluation math: KL estimate vs exact KL, preference metrics, win rate, stderr."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import data, evaluation, models, rewards, sampling


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


# ------------------------------------------------------------------ with a model


@functools.cache
def _model(vocab: int, seed: int, scale: float = 1.0):
    cfg = models.ModelConfig.tiny("llama", vocab_size=vocab, hidden_size=32, intermediate_size=64)
    params = models.init_params(cfg, jax.random.key(seed))
    params = {**params, "lm_head": jax.tree.map(lambda w: w * scale, params["lm_head"])}
    return cfg, params


@functools.partial(jax.jit, static_argnums=0)
def _log_softmax_forward(cfg, params, ids):
    return jax.nn.log_softmax(models.Transformer(cfg).apply({"params": params}, ids), axis=-1)


def test_kl_from_samples_matches_exact_two_token_kl():
    """Two generated tokens, vocabulary 64: the exact sequence KL is
    KL(p1 || q1) + sum_y p1(y) KL(p2(.|y) || q2(.|y)), computed by enumerating y."""
    cfg, pol = _model(64, 0, 15.0)
    _, ref = _model(64, 1, 15.0)
    prompt = [5, 17, 3]
    ids = np.asarray([prompt + [y] for y in range(64)], np.int32)
    lp_pol = np.asarray(_log_softmax_forward(cfg, pol, jnp.asarray(ids)), np.float64)
    lp_ref = np.asarray(_log_softmax_forward(cfg, ref, jnp.asarray(ids)), np.float64)
    p1, p2 = np.exp(lp_pol[0, 2]), np.exp(lp_pol[:, 3])
    kl1 = float((p1 * (lp_pol[0, 2] - lp_ref[0, 2])).sum())
    kl2 = float((p1 * (p2 * (lp_pol[:, 3] - lp_ref[:, 3])).sum(-1)).sum())
    exact = kl1 + kl2

    config = sampling.SamplingConfig(max_new_tokens=2, n=4000)
    samples = sampling.generate(cfg, pol, [prompt], jax.random.key(0), config)
    est = evaluation.kl_from_samples(cfg, ref, samples)
    assert exact > 0.5
    assert abs(est.mean - exact) < 4 * est.stderr, (est, exact)
    # power: dropping the second token's term (a per-token/off-by-one bug) is rejected
    assert abs(kl1 - exact) > 6 * est.stderr
    # KL of a policy against itself is exactly zero sample by sample
    zero = evaluation.kl_from_samples(cfg, pol, samples)
    assert abs(zero.mean) < 1e-5 and zero.stderr < 1e-5
    biased = dataclasses_replace(samples, temperature=0.7)
    with pytest.raises(ValueError, match="temperature 1"):
        evaluation.kl_from_samples(cfg, ref, biased)


def dataclasses_replace(samples, **config_changes):
    import dataclasses

    return dataclasses.replace(
        samples, config=dataclasses.replace(samples.config, **config_changes)
    )


def test_evaluate_preferences_matches_direct_log_probs():
    cfg, pol = _model(64, 0)
    _, ref = _model(64, 1)
    rng = np.random.default_rng(0)
    items = [
        {
            "prompt": rng.integers(2, 64, size=int(rng.integers(2, 6))).astype(np.int32),
            "chosen": rng.integers(2, 64, size=int(rng.integers(2, 8))).astype(np.int32),
            "rejected": rng.integers(2, 64, size=int(rng.integers(2, 8))).astype(np.int32),
        }
        for _ in range(6)
    ]
    batches = [data.build_batch(items[i : i + 3], "paired", "stacked", length=16) for i in (0, 3)]

    def direct(params, prompt, comp):
        ids = np.zeros((1, 16), np.int32)
        seq = np.concatenate([prompt, comp])
        ids[0, : len(seq)] = seq
        lp = np.asarray(_log_softmax_forward(cfg, params, jnp.asarray(ids)), np.float64)[0]
        return sum(lp[len(prompt) - 1 + t, comp[t]] for t in range(len(comp)))

    want = {
        (name, side): np.array([direct(p, it["prompt"], it[side]) for it in items])
        for name, p in (("pol", pol), ("ref", ref))
        for side in ("chosen", "rejected")
    }
    beta = 0.5
    expected = evaluation.preference_metrics(
        want["pol", "chosen"],
        want["pol", "rejected"],
        want["ref", "chosen"],
        want["ref", "rejected"],
        beta,
    )
    got = evaluation.evaluate_preferences(cfg, pol, batches, beta, ref_params=ref)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-4), k
    # precomputed reference log-probs in the batch give the same numbers
    for b, start in zip(batches, (0, 3), strict=True):
        sl = slice(start, start + 3)
        b["ref_logps"] = np.concatenate(
            [want["ref", "chosen"][sl], want["ref", "rejected"][sl]]
        ).astype(np.float32)
    got2 = evaluation.evaluate_preferences(cfg, pol, batches, beta)
    assert got2["rewards/margins"] == pytest.approx(expected["rewards/margins"], abs=1e-4)
    with pytest.raises(ValueError, match="no 'ref_logps'"):
        evaluation.evaluate_preferences(
            cfg, pol, [data.build_batch(items[:2], "paired", "stacked", length=16)], beta
        )


def test_generation_metrics_and_best_of_n(tokenizer):
    cfg, params = _model(384, 2)
    prompts = ["The quick brown fox", "Hello"]
    length_reward = rewards.as_reward_fn(lambda texts: [len(t) for t in texts])
    common = dict(max_new_tokens=6, n=3)
    metrics, samples = evaluation.generation_metrics(
        cfg,
        params,
        tokenizer,
        prompts,
        jax.random.key(0),
        ref_params=params,
        reward_fn=length_reward,
        reference_completions=["", "a much longer reference text"],
        **common,
    )
    assert len(samples.texts) == 6
    assert metrics["eval/kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["eval/reward"] == pytest.approx(
        np.mean([len(t) for t in samples.texts]), rel=1e-6
    )
    want_wr = np.mean(
        [1.0 if len(t) > 0 else 0.5 for t in samples.texts[:3]]
        + [1.0 if len(t) > 27 else (0.5 if len(t) == 27 else 0.0) for t in samples.texts[3:]]
    )
    assert metrics["eval/win_rate"] == pytest.approx(want_wr)
    assert metrics["eval/gen_length"] == pytest.approx(samples.lengths.mean())

    # best-of-N with the same key and settings draws the same samples and keeps the longest
    best = rewards.best_of_n(
        cfg, params, tokenizer, prompts, length_reward, 3, jax.random.key(0), max_new_tokens=6
    )
    np.testing.assert_array_equal(best.samples.tokens, samples.tokens)
    for p in range(2):
        lens = [len(t) for t in samples.texts[3 * p : 3 * p + 3]]
        assert len(best.texts[p]) == max(lens)
        assert best.indices[p] == 3 * p + int(np.argmax(lens))
    np.testing.assert_allclose(
        best.rewards, [max(len(t) for t in samples.texts[3 * p : 3 * p + 3]) for p in range(2)]
    )
