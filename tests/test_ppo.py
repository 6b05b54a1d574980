"""PPO's pure pieces against numpy loops and hand-computed values (dpo_jax.ppo)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import ppo
from dpo_jax.errors import UserError


def _ragged(seed: int, S: int = 5, T: int = 7, holes: bool = False):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, T + 1, size=S)
    lengths[0] = T  # one full row
    mask = np.arange(T)[None, :] < lengths[:, None]
    if holes:  # masked-out positions inside rows too
        mask &= rng.random((S, T)) > 0.3
    rewards = rng.normal(size=(S, T)).astype(np.float32)
    values = rng.normal(size=(S, T)).astype(np.float32)
    return rewards, values, mask


def _gae_numpy_trl(rewards, values, mask, gamma, lam):
    """TRL's loop: values and rewards zeroed after the end, V = 0 past T."""
    r = np.where(mask, rewards, 0.0)
    v = np.where(mask, values, 0.0)
    S, T = r.shape
    adv = np.zeros((S, T))
    last = np.zeros(S)
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t < T - 1 else 0.0
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return np.where(mask, adv, 0.0), np.where(mask, adv + v, 0.0)


def _gae_numpy_compressed(rewards, values, mask, gamma, lam):
    """Each row's masked positions taken out as one episode, plain GAE, put back."""
    adv = np.zeros(rewards.shape)
    ret = np.zeros(rewards.shape)
    for s in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[s])
        r, v = rewards[s, idx].astype(np.float64), values[s, idx].astype(np.float64)
        a = np.zeros(len(idx))
        running = 0.0
        for i in reversed(range(len(idx))):
            next_v = v[i + 1] if i + 1 < len(idx) else 0.0
            running = r[i] + gamma * next_v - v[i] + gamma * lam * running
            a[i] = running
        adv[s, idx] = a
        ret[s, idx] = a + v
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_numpy_loop_ragged_right_padding(gamma, lam):
    rewards, values, mask = _ragged(0)
    adv, ret = jax.jit(ppo.gae, static_argnums=(3, 4))(rewards, values, mask, gamma, lam)
    want_adv, want_ret = _gae_numpy_trl(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[~mask] == 0) and np.all(np.asarray(ret)[~mask] == 0)


def test_gae_skips_masked_holes():
    rewards, values, mask = _ragged(1, S=6, T=9, holes=True)
    adv, ret = ppo.gae(rewards, values, mask, 0.97, 0.9)
    want_adv, want_ret = _gae_numpy_compressed(rewards, values, mask, 0.97, 0.9)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)


def test_gae_lambda_one_returns_are_reward_to_go():
    # gamma = lam = 1: returns = sum of future rewards, independent of the values
    rewards, values, mask = _ragged(2)
    _, ret = ppo.gae(rewards, values, mask, 1.0, 1.0)
    r = np.where(mask, rewards, 0.0)
    to_go = np.flip(np.cumsum(np.flip(r, -1), -1), -1)
    np.testing.assert_allclose(np.asarray(ret), np.where(mask, to_go, 0.0), rtol=1e-5, atol=1e-5)


def test_penalised_rewards_score_at_last_token_and_kl():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    logps = np.log(np.array([[0.5, 0.25, 0.5, 0.9], [0.2, 0.3, 0.3, 0.3], [0.1] * 4]))
    ref = np.log(np.array([[0.25, 0.25, 1.0, 0.1], [0.4, 0.3, 0.3, 0.3], [0.2] * 4]))
    scores = np.array([2.0, -1.0, 5.0], np.float32)
    rewards, kl = ppo.penalised_rewards(scores, logps, ref, mask, 0.1)
    want_kl = np.array([[np.log(2), 0.0, np.log(0.5), 0], [np.log(0.5), 0, 0, 0], [0] * 4])
    np.testing.assert_allclose(np.asarray(kl), want_kl, atol=1e-6)
    want = -0.1 * want_kl
    want[0, 2] += 2.0
    want[1, 0] += -1.0  # an empty row gets no score
    np.testing.assert_allclose(np.asarray(rewards), want, atol=1e-6)
    # k3: (q/p - 1) - log(q/p) >= 0
    _, kl3 = ppo.penalised_rewards(scores, logps, ref, mask, 0.1, "k3")
    r = np.exp(ref - logps)
    np.testing.assert_allclose(np.asarray(kl3), np.where(mask, r - 1 - np.log(r), 0), atol=1e-6)
    with pytest.raises(UserError, match="kl_estimator"):
        ppo.kl_per_token(logps, ref, mask, "k2")


def test_policy_loss_hand_values():
    # ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, +1, -2, -2 (clip 0.2); a masked 5th
    old = np.zeros((1, 5), np.float32)
    logps = np.log(np.array([[1.5, 0.5, 0.5, 1.5, 3.0]], np.float32))
    adv = np.array([[1.0, 1.0, -2.0, -2.0, 7.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 0]], bool)
    loss, m = ppo.policy_loss(logps, old, adv, mask, clip=0.2)
    # max(-A r, -A clip(r)): max(-1.5,-1.2)=-1.2, max(-0.5,-0.8)=-0.5, max(1.0,1.6)=1.6, max(3,2.4)=3
    np.testing.assert_allclose(float(loss), (-1.2 - 0.5 + 1.6 + 3.0) / 4, rtol=1e-6)
    np.testing.assert_allclose(float(m["policy/clipfrac"]), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(m["val/ratio"]), 1.0, rtol=1e-6)
    want_kl = 0.5 * np.mean(np.log([1.5, 0.5, 0.5, 1.5]) ** 2)
    np.testing.assert_allclose(float(m["policy/approxkl"]), want_kl, rtol=1e-6)
    # the gradient flows only through unclipped tokens: d/dlogp of -A r = -A r
    g = jax.grad(lambda lp: ppo.policy_loss(lp, old, adv, mask, 0.2)[0])(jnp.asarray(logps))
    np.testing.assert_allclose(np.asarray(g), [[0.0, -0.5 / 4, 0.0, 3.0 / 4, 0.0]], rtol=1e-6)


def test_value_loss_hand_values():
    old = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)
    v = np.array([[1.5, 1.1, 0.0, 9.0]], np.float32)
    ret = np.array([[2.0, 0.0, 1.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], bool)
    loss, m = ppo.value_loss(v, old, ret, mask, clip=0.2)
    # token 0: clipped v 1.2: max((1.5-2)^2, (1.2-2)^2) = 0.64 (clipped larger)
    # token 1: clipped v 1.1: max(1.21, 1.21) = 1.21 (tie: not counted as clipped)
    # token 2: clipped v 0.8: max((0-1)^2, (0.8-1)^2) = 1.0
    np.testing.assert_allclose(float(loss), 0.5 * (0.64 + 1.21 + 1.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(m["val/clipfrac"]), 1 / 3, rtol=1e-6)


def test_ppo_loss_combines_with_vf_coef():
    rng = np.random.default_rng(3)
    shape = (3, 4)
    mask = rng.random(shape) > 0.3
    stats = dict(logps=rng.normal(size=shape), values=rng.normal(size=shape))
    batch = {
        k: rng.normal(size=shape) for k in ("old_logps", "advantages", "returns", "old_values")
    }
    loss, m = ppo.ppo_loss(stats, batch, mask, clip=0.1, value_clip=0.3, vf_coef=0.25)
    pg, _ = ppo.policy_loss(stats["logps"], batch["old_logps"], batch["advantages"], mask, 0.1)
    vf, _ = ppo.value_loss(stats["values"], batch["old_values"], batch["returns"], mask, 0.3)
    np.testing.assert_allclose(float(loss), float(pg) + 0.25 * float(vf), rtol=1e-6)
    np.testing.assert_allclose(float(m["loss/value"]), float(vf), rtol=1e-6)


def test_masked_whiten_against_numpy():
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 3.0, size=(4, 6)).astype(np.float32)
    mask = rng.random((4, 6)) > 0.4
    vals = x[mask].astype(np.float64)
    mean, std = vals.mean(), vals.std(ddof=1)  # Bessel-corrected, as TRL
    white = np.asarray(ppo.masked_whiten(x, mask))
    np.testing.assert_allclose(white[mask], (vals - mean) / std, rtol=1e-4, atol=1e-5)
    assert np.all(white[~mask] == 0)
    kept = np.asarray(ppo.masked_whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(kept[mask], (vals - mean) / std + mean, rtol=1e-4, atol=1e-5)


def test_kl_controller_hand_values():
    # Ziegler et al.: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon
    up = ppo.update_kl_coef(0.2, 9.0, 64, target=6.0, horizon=10000)  # error 0.5 -> 0.2
    np.testing.assert_allclose(float(up), 0.2 * (1 + 0.2 * 64 / 10000), rtol=1e-6)
    down = ppo.update_kl_coef(0.2, 5.4, 64, target=6.0, horizon=10000)  # error -0.1
    np.testing.assert_allclose(float(down), 0.2 * (1 - 0.1 * 64 / 10000), rtol=1e-6)
    floor = ppo.update_kl_coef(0.2, 0.0, 500, target=6.0, horizon=1000)  # error -1 -> -0.2
    np.testing.assert_allclose(float(floor), 0.2 * (1 - 0.2 * 0.5), rtol=1e-6)
    assert float(ppo.update_kl_coef(0.2, 50.0, 64, target=None, horizon=10000)) == np.float32(0.2)
    # jittable, with a traced KL
    jitted = jax.jit(lambda c, k: ppo.update_kl_coef(c, k, 64, target=6.0, horizon=10000))
    np.testing.assert_allclose(float(jitted(0.2, 9.0)), float(up), rtol=1e-7)


# ------------------------------------------------------------ per-token scoring, rollouts


def test_token_values_align_with_tokens():
    rng = np.random.default_rng(6)
    hidden = rng.normal(size=(2, 5, 3)).astype(np.float32)
    head = {"kernel": rng.normal(size=(3,)).astype(np.float32), "bias": np.float32(0.5)}
    v = np.asarray(ppo.token_values(head, hidden))
    assert np.all(v[:, 0] == 0)
    np.testing.assert_allclose(v[:, 1:], hidden[:, :-1] @ head["kernel"] + 0.5, rtol=1e-6)


def test_stacked_rows_and_token_placement_round_trip():
    from dpo_jax import sampling

    prompt_ids = np.array([[0, 0, 7, 8], [5, 6, 7, 8], [0, 0, 0, 9]], np.int32)
    tokens = np.array([[11, 12, 1], [13, 0, 0], [14, 15, 16]], np.int32)
    samples = sampling.SampleOutput(
        prompt_ids=prompt_ids, prompt_lengths=np.array([2, 4, 1], np.int32), tokens=tokens,
        lengths=np.array([3, 1, 3], np.int32), logps=np.zeros((3, 3), np.float32),
        sampling_logps=np.zeros((3, 3), np.float32), finished=np.array([True, False, False]),
        prompt_index=np.arange(3, dtype=np.int32), config=sampling.SamplingConfig(),
    )  # fmt: skip
    rows, mask = sampling.stacked_rows(samples, pad_id=0)
    assert rows["input_ids"].shape == (3, 7)
    np.testing.assert_array_equal(rows["input_ids"][0], [7, 8, 11, 12, 1, 0, 0])
    np.testing.assert_array_equal(rows["sequence_index"][0], [-1, -1, 0, 0, 0, -1, -1])
    np.testing.assert_array_equal(rows["input_ids"][1], [5, 6, 7, 8, 13, 0, 0])
    np.testing.assert_array_equal(rows["sequence_index"][2], [-1, 2, 2, 2, -1, -1, -1])
    np.testing.assert_array_equal(rows["positions"][2], [0, 1, 2, 3, 0, 0, 0])
    x = np.arange(9, dtype=np.float32).reshape(3, 3) + 1
    on_tokens = sampling.to_tokens(x, mask, rows["sequence_index"])
    np.testing.assert_array_equal(on_tokens[0], [0, 0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(on_tokens[1], [0, 0, 0, 0, 4, 0, 0])
    back = sampling.from_tokens(on_tokens, mask, rows["sequence_index"])
    np.testing.assert_array_equal(back, np.where(mask, x, 0))


def test_rollout_rewards_see_prompt_and_completion():
    from dpo_jax import reward_sources, sampling

    samples = sampling.SampleOutput(
        prompt_ids=np.array([[0, 7, 8], [5, 6, 9]], np.int32),
        prompt_lengths=np.array([2, 3], np.int32),
        tokens=np.array([[11, 1, 0], [12, 13, 14]], np.int32),
        lengths=np.array([2, 3], np.int32), logps=np.zeros((2, 3), np.float32),
        sampling_logps=np.zeros((2, 3), np.float32), finished=np.array([True, False]),
        prompt_index=np.arange(2, dtype=np.int32),
        config=sampling.SamplingConfig(eos_token_ids=(1,)),
    )  # fmt: skip

    class Tok:
        def batch_decode(self, ids, skip_special_tokens):
            return [" ".join(map(str, x)) for x in ids]

    got = []
    fn = reward_sources.reward_from_texts(
        lambda texts: got.extend(texts) or [1.0, 2.0], Tok(), True
    )
    np.testing.assert_array_equal(fn(samples), [1.0, 2.0])
    assert got == ["7 8 11", "5 6 9 12 13 14"]  # EOS (1) dropped, prompt padding dropped
    got.clear()
    reward_sources.reward_from_texts(lambda texts: got.extend(texts) or [0, 0], Tok())(samples)
    assert got == ["11", "12 13 14"]

    class Learned:
        def score_ids(self, ids):
            got.append(ids)
            return np.array([len(x) for x in ids], np.float32)

    got.clear()
    np.testing.assert_array_equal(reward_sources.reward_from_ids(Learned())(samples), [4, 6])
    assert got[0] == [[7, 8, 11, 1], [5, 6, 9, 12, 13, 14]]  # the emitted EOS is kept


def test_micro_batches_number_their_rows_and_hosts_take_equal_shares(monkeypatch):
    """Each micro-batch's rows are its sequences 0..n-1 (not the episodes' numbers, which
    a step of n sequences would drop from its per-sequence sums); host h of P takes rows
    [h n/P, (h+1) n/P), numbered 0..n/P-1 (`Trainer.step` numbers them host after host)."""
    from dpo_jax import ppo_loop, rollouts

    S, L = 8, 5
    si = np.where(np.arange(L)[None, :] >= 2, np.arange(S)[:, None], -1).astype(np.int32)
    si[3, 4] = -1  # a shorter completion
    batch = {"sequence_index": si, "input_ids": np.arange(S * L).reshape(S, L)}
    from dpo_jax.configs import default

    config = default.get_config()
    config.online.update(rollout_batch_size=S, num_mini_batches=2)
    config.grad_accum_steps = 2
    cfg = ppo_loop.PPOConfig.from_config(config)
    seen = []
    for batch_A in rollouts.mini_batches(cfg, batch, rollout=1, epoch=0, seed=3):
        assert batch_A["sequence_index"].shape == (2, 2, L)
        for micro_si, micro_ids in zip(
            batch_A["sequence_index"], batch_A["input_ids"], strict=True
        ):
            episodes = micro_ids[:, 0] // L
            want = np.where(si[episodes] >= 0, np.arange(2)[:, None], -1)
            np.testing.assert_array_equal(micro_si, want)
            seen.extend(episodes.tolist())
    assert sorted(seen) == list(range(S))  # every episode once per epoch
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    rows = rollouts.host_rows(4)
    assert rows == slice(2, 4)
    big = {"sequence_index": si.reshape(2, 4, L), "input_ids": batch["input_ids"].reshape(2, 4, L)}
    mine = rollouts.host_share(big, rows)
    np.testing.assert_array_equal(mine["input_ids"], big["input_ids"][:, 2:4])
    np.testing.assert_array_equal(mine["sequence_index"][1], np.where(si[6:8] >= 0, [[0], [1]], -1))
    with pytest.raises(UserError, match="online.rollout_batch_size"):
        rollouts.check_hosts(rows_per_micro=6, data_parallel=2)  # 3 rows per host


def test_prompt_indices_are_epoch_permutations_and_pure():
    from dpo_jax import rollouts

    got = [rollouts.prompt_indices(10, 4, r, seed=3) for r in range(5)]  # 20 draws, 2 passes
    flat = np.concatenate(got)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:20])  # a fresh order per pass
    np.testing.assert_array_equal(rollouts.prompt_indices(10, 4, 3, seed=3), got[3])


def test_ppo_config_mistakes_name_the_key():
    from dpo_jax import ppo_loop
    from dpo_jax.configs import default, validate

    c = default.get_config()
    c.objective.name = "ppo"
    validate.validate(c)  # the defaults are valid
    cfg = ppo_loop.PPOConfig.from_config(c)
    assert cfg.num_steps == 100 * 4 * 1 and ppo.config_hyper(c)["vf_coef"] == 0.1
    for key, value, match in (
        ("samples_per_prompt", 5, "online.rollout_batch_size"),
        ("num_mini_batches", 3, "online.rollout_batch_size"),
        ("temperature", 0.7, "online.temperature"),
        ("kl_estimator", "k2", "ppo.kl_estimator"),
        ("target_kl", -1.0, "ppo.target_kl"),
        ("num_epochs", 0, "ppo.num_epochs"),
    ):
        bad = default.get_config()
        bad.objective.name = "ppo"
        (bad.ppo if key in bad.ppo else bad.online)[key] = value
        with pytest.raises(UserError, match=match):
            validate.validate(bad)
