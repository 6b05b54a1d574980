"""Learned reward model: last-token readout on every layout, Bradley--Terry training
through the one Trainer on synthetic pairs with a known scoring rule, and the text
RewardFn wrapper."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import data, models, objectives, reward_model, scoring, train
from dpo_jax.configs import tiny

VOCAB, EOS, GOOD = 64, 1, range(2, 14)  # reward rule: number of "good" tokens


@functools.cache
def _cfg_params():
    cfg = models.ModelConfig.tiny("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)
    backbone = models.init_params(cfg, jax.random.key(0))
    return cfg, reward_model.init_reward_params(cfg, backbone, jax.random.key(1))


def _pairs(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Pairs whose chosen completion has at least 2 more good tokens than the rejected."""
    rng = np.random.default_rng(seed)
    items = []
    while len(items) < n:
        prompt = rng.integers(2, VOCAB, size=int(rng.integers(2, 5)))
        a, b = (rng.integers(2, VOCAB, size=8) for _ in range(2))
        ga, gb = (int(np.isin(x, GOOD).sum()) for x in (a, b))
        if abs(ga - gb) < 2:
            continue
        chosen, rejected = (a, b) if ga > gb else (b, a)
        items.append(
            {
                "prompt": prompt.astype(np.int32),
                "chosen": np.append(chosen, EOS).astype(np.int32),
                "rejected": np.append(rejected, EOS).astype(np.int32),
            }
        )
    return items


@functools.partial(jax.jit, static_argnums=0)
def _hidden(cfg, backbone, ids):
    return models.Transformer(cfg).apply({"params": backbone}, ids, return_hidden=True)


def _direct_reward(cfg, params, seq: np.ndarray) -> float:
    """Second code path: a plain causal forward of one sequence (right-padded to 32,
    which cannot change earlier positions), head on the last real token's hidden state."""
    ids = np.zeros((1, 32), np.int32)
    ids[0, : len(seq)] = seq
    hidden = _hidden(cfg, params["model"], jnp.asarray(ids))[0, len(seq) - 1]
    return float(hidden @ params["head"]["kernel"] + params["head"]["bias"])


_rewards_jit = jax.jit(reward_model.sequence_rewards, static_argnums=(0, 3))


def test_last_token_index_by_hand():
    seq = np.array([[-1, 0, 0, -1], [-1, -1, 1, 1], [2, 2, 3, -1]])
    np.testing.assert_array_equal(
        np.asarray(scoring.last_token_index(jnp.asarray(seq), 4)), [2, 7, 9, 10]
    )
    # a sequence with no tokens is reported as -1
    np.testing.assert_array_equal(np.asarray(scoring.last_token_index(jnp.asarray(seq), 5))[4], -1)


@pytest.mark.parametrize("layout", ["stacked", "packed", "prefix_shared"])
def test_sequence_rewards_read_last_token_in_every_layout(layout):
    cfg, params = _cfg_params()
    params = {**params, "head": {"kernel": params["head"]["kernel"] * 50, "bias": jnp.float32(0.3)}}
    items = _pairs(3, seed=5)
    batch = data.build_batch(items, "paired", layout, length=32)
    got = np.asarray(_rewards_jit(cfg, params, batch, 6))
    seqs = [np.concatenate([it["prompt"], it[k]]) for k in ("chosen", "rejected") for it in items]
    want = np.array([_direct_reward(cfg, params, s) for s in seqs])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.ptp(want) > 0.1  # the readout is not trivially constant


def test_bradley_terry_loss_hand_computed():
    r = jnp.asarray([2.0, 0.0, 1.0, 1.0])  # chosen [2, 0], rejected [1, 1]
    loss, m = objectives.bradley_terry_loss(r)
    want = -(np.log(1 / (1 + np.exp(-1.0))) + np.log(1 / (1 + np.exp(1.0)))) / 2
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(m["accuracy"]) == 0.5 and float(m["margin"]) == 0.0
    loss_c, _ = objectives.bradley_terry_loss(r, center_rewards_coefficient=0.1)
    assert float(loss_c) == pytest.approx(want + 0.1 * (9 + 1) / 2, rel=1e-6)
    loss_m, _ = objectives.bradley_terry_loss(r, margin_B=jnp.asarray([1.0, -1.0]))
    assert float(loss_m) == pytest.approx(-2 * np.log(0.5) / 2, rel=1e-6)


@pytest.mark.heavy
def test_training_learns_known_scoring_rule():
    """Train on pairs ranked by 'number of good tokens' (`train.train` with the
    reward_model objective); held-out accuracy must go from chance to >= 0.9 within 250
    steps of 16 pairs, and the Trainer's eval step agrees with `evaluate_reward_model`."""
    cfg, params = _cfg_params()
    train_items, eval_items = _pairs(1024, seed=0), _pairs(256, seed=1)

    def batches():
        rng = np.random.default_rng(2)
        while True:
            idx = rng.choice(len(train_items), 16, replace=False)
            yield data.build_batch([train_items[i] for i in idx], "paired", "stacked", length=16)

    held_out = [
        data.build_batch(eval_items[i : i + 64], "paired", "stacked", length=16)
        for i in range(0, 256, 64)
    ]
    before = reward_model.evaluate_reward_model(cfg, params, held_out)
    config = tiny.get_config()
    config.objective.name = "reward_model"
    config.num_steps, config.batch_size, config.grad_accum_steps = 250, 16, 1
    config.optim.update(learning_rate=3e-3, max_grad_norm=0.0, schedule="constant")
    config.train.update(log_every=50, tensorboard=False)
    config.run_dir = ""
    result = train.train(
        config, train_data=batches(), eval_data=held_out, model_config=cfg, params=params
    )
    history, after = result.history, result.eval_history[-1]
    assert before["accuracy"] < 0.7
    print("reward model held-out accuracy", before["accuracy"], "->", after["eval/accuracy"])
    assert after["eval/accuracy"] >= 0.9, after
    assert after["eval/margin"] > 0
    assert history[-1]["loss"] < history[0]["loss"]
    # the caller's params survive (the Trainer places its own copy)
    assert np.isfinite(np.asarray(params["head"]["kernel"])).all()
    again = reward_model.evaluate_reward_model(cfg, result.state.params, held_out)
    assert again["accuracy"] == pytest.approx(after["eval/accuracy"])
    assert again["margin"] == pytest.approx(after["eval/margin"], rel=1e-4)


def test_learned_reward_on_texts(tokenizer):
    """The RewardFn wrapper scores tokenized text + EOS exactly like the direct path,
    independent of batch composition and padding."""
    cfg = models.ModelConfig.tiny("llama", vocab_size=384, hidden_size=32, intermediate_size=64)
    params = reward_model.init_reward_params(
        cfg, models.init_params(cfg, jax.random.key(3)), jax.random.key(4)
    )
    params = {**params, "head": {"kernel": params["head"]["kernel"] * 50, "bias": jnp.float32(0.0)}}
    texts = ["The quick brown fox", "Hello world!", "A chosen answer is preferred"]
    fn = reward_model.LearnedReward(cfg, params, tokenizer, batch_size=2)
    got = fn(texts)
    assert got.shape == (3,) and got.dtype == np.float32
    for text, g in zip(texts, got, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert g == pytest.approx(_direct_reward(cfg, params, np.asarray(ids)), abs=1e-4)
    np.testing.assert_allclose(fn(texts[1:2]), got[1:2], atol=1e-5)
    with pytest.raises(TypeError, match="one str"):
        fn("a single text")
