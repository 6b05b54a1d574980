"""Unlikelihood training (Welleck et al. 2019), the DPO paper's baseline, end to end.

Expected numbers come from second code paths written here: float64 numpy log-softmax
per scored position for the log(1 - p_t) sums, the formula by hand for the loss, and the
model's logits taken to numpy for the train step (no `dpo_jax.logprobs` / `losses`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import logprobs, losses, models, train
from tests.train_helpers import make_trainer, synthetic_batches, tiny_model

V, D = 29, 8
ALPHA = 0.7

seq_logps = jax.jit(logprobs.sequence_logps, static_argnums=2, static_argnames="with_log1m")


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _completion_logps(logits, ids, seq_index) -> list[np.ndarray]:
    """Per sequence k: log p of each completion token, in token order (float64)."""
    logp = _log_softmax64(logits)
    ids, si = np.asarray(ids), np.asarray(seq_index)
    out = []
    for k in range(int(si.max()) + 1):
        rows, cols = np.nonzero(si == k)  # row-major: the completion in token order
        out.append(logp[rows, cols - 1, ids[rows, cols]])
    return out


def _log1m_sums(terms: list[np.ndarray]) -> np.ndarray:
    return np.array([np.log(1.0 - np.exp(lp)).sum() for lp in terms])


def _batch(rng: np.random.Generator, layout: str) -> tuple[dict, int]:
    if layout == "stacked":  # rows 0..1 chosen, 2..3 rejected
        ids = rng.integers(1, V, size=(4, 11)).astype(np.int32)
        seq = -np.ones((4, 11), np.int32)
        for k, (a, b) in enumerate([(3, 9), (2, 5), (4, 11), (2, 10)]):
            seq[k, a:b] = k
        return {"input_ids": ids, "sequence_index": seq}, 4
    ids = rng.integers(1, V, size=(2, 16)).astype(np.int32)  # packed: 4 sequences, 2 rows
    seq = -np.ones((2, 16), np.int32)
    seq[0, 2:5], seq[0, 8:14], seq[1, 1:7], seq[1, 10:12] = 0, 2, 1, 3
    return {"input_ids": ids, "sequence_index": seq}, 4


def _peaky_logits(rng: np.random.Generator, batch: dict) -> np.ndarray:
    """Random logits where some scored tokens get p close to 1, so log(1 - p) takes the
    log(-expm1) branch there and the log1p(-exp) branch elsewhere."""
    N, L = batch["input_ids"].shape
    logits = rng.normal(size=(N, L, V)) * 2
    for n, t in [(0, 4), (1, 3), (2, 5), (3, 6)][:N]:
        logits[n, t - 1, batch["input_ids"][n, t]] += 9.0  # p ~ 0.99
    return logits.astype(np.float32)


# ---------------------------------------------------------------- logprobs extra


@pytest.mark.parametrize("layout", ["stacked", "packed"])
def test_log1m_sums_match_numpy(layout):
    rng = np.random.default_rng(0)
    batch, S = _batch(rng, layout)
    logits = _peaky_logits(rng, batch)
    seq = seq_logps(jnp.asarray(logits), batch, S, with_log1m=True)
    terms = _completion_logps(logits, batch["input_ids"], batch["sequence_index"])
    assert max(np.exp(lp).max() for lp in terms) > 0.9  # the near-1 branch is exercised
    # rtol 1e-4: at p ~ 0.99, d log(1-p) / d log p = -p/(1-p) ~ -100 amplifies the float32
    # rounding of log p = logit - logsumexp (~1e-6 absolute) a hundredfold.
    np.testing.assert_allclose(seq.log1m_sums_S, _log1m_sums(terms), rtol=1e-4)
    np.testing.assert_allclose(seq.logps_S, [lp.sum() for lp in terms], rtol=1e-5)
    assert seq_logps(jnp.asarray(logits), batch, S).log1m_sums_S is None  # only on request


def test_chunked_log1m_sums_and_gradients_equal_plain():
    rng = np.random.default_rng(1)
    batch, S = _batch(rng, "packed")
    N, L = batch["input_ids"].shape
    hidden = jnp.asarray(rng.normal(size=(N, L, D)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)

    def objective(h, w, chunked):
        if chunked:
            seq = logprobs.sequence_logps_chunked(h, lambda x: x @ w, batch, S, 3, with_log1m=True)
        else:
            seq = logprobs.sequence_logps(h @ w, batch, S, with_log1m=True)
        return jnp.sum(seq.log1m_sums_S * jnp.arange(1.0, S + 1)), seq.log1m_sums_S

    grad = lambda c: jax.jit(jax.value_and_grad(lambda h, w: objective(h, w, c), (0, 1), True))
    (_, plain), g_plain = grad(False)(hidden, W)
    (_, chunk), g_chunk = grad(True)(hidden, W)
    np.testing.assert_allclose(chunk, plain, rtol=1e-5)
    for x, y in zip(g_chunk, g_plain, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
        assert np.abs(np.asarray(y)).max() > 1e-4


def test_log1m_is_finite_with_gradient_at_probability_one():
    # One completion token has p = 1 in float32: log(1 - p) is clamped, not -inf / NaN.
    ids = np.array([[1, 2, 3]], np.int32).repeat(2, 0)
    batch = {"input_ids": ids, "sequence_index": np.array([[-1, 0, -1], [-1, -1, 1]], np.int32)}
    logits = jnp.zeros((2, 3, 5)).at[0, 0, 2].set(200.0)

    def total(z):
        return jnp.sum(logprobs.sequence_logps(z, batch, 2, with_log1m=True).log1m_sums_S)

    value, g = jax.value_and_grad(total)(logits)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(g)))


def test_preference_stats_carries_log1m_sums():
    seq = logprobs.SequenceLogps(
        logps_S=jnp.asarray([-1.0, -2.0, -3.0, -4.0]),
        lengths_S=jnp.ones(4),
        prefix_logps_S=jnp.zeros(4),
        log1m_sums_S=jnp.asarray([-0.1, -0.2, -0.3, -0.4]),
    )
    st = logprobs.preference_stats(seq)
    np.testing.assert_allclose(st.chosen_log1m_sum, [-0.1, -0.2])
    np.testing.assert_allclose(st.rejected_log1m_sum, [-0.3, -0.4])
    plain = logprobs.preference_stats(seq.replace(log1m_sums_S=None))
    assert plain.chosen_log1m_sum is None and plain.rejected_log1m_sum is None


# ---------------------------------------------------------------- the loss


def _stats(**kw) -> losses.PreferenceStats:
    base = dict(
        chosen_logps=[-6.0, -3.0], rejected_logps=[-2.0, -9.0],
        chosen_lengths=[3.0, 2.0], rejected_lengths=[4.0, 3.0],
        rejected_log1m_sum=[-1.2, -0.3],
    )  # fmt: skip
    base.update(kw)
    return losses.PreferenceStats(
        **{k: None if v is None else jnp.asarray(v, jnp.float32) for k, v in base.items()}
    )


def test_unlikelihood_loss_by_hand():
    loss, m = losses.get("unlikelihood")(_stats(), unlikelihood_alpha=ALPHA)
    # pair 0: 6/3 + 0.7 * 1.2/4 = 2.21; pair 1: 3/2 + 0.7 * 0.3/3 = 1.57
    np.testing.assert_allclose(loss, [2.21, 1.57], rtol=1e-6)
    np.testing.assert_allclose(m["nll_loss"], (2.0 + 1.5) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["unlikelihood_loss"], (0.3 + 0.1) / 2, rtol=1e-6)
    # TRL reference-free rewards: per-token mean log-probs (-2, -1.5) vs (-0.5, -3)
    np.testing.assert_allclose(m["rewards/margins"], ((-2.0 + 0.5) + (-1.5 + 3.0)) / 2)
    np.testing.assert_allclose(m["rewards/accuracies"], 0.5)
    np.testing.assert_allclose(m["logps/rejected"], -5.5)
    assert not losses.needs_reference("unlikelihood") and losses.needs_log1m("unlikelihood")
    assert not losses.needs_log1m("sigmoid")


def test_unlikelihood_gradient_pushes_rejected_probability_down():
    st = _stats()

    def total(c, r1m):
        st2 = st.replace(chosen_logps=c, rejected_log1m_sum=r1m)
        return jnp.sum(losses.unlikelihood(st2, unlikelihood_alpha=ALPHA)[0])

    gc, gr = jax.grad(total, (0, 1))(st.chosen_logps, st.rejected_log1m_sum)
    np.testing.assert_allclose(gc, [-1 / 3, -1 / 2], rtol=1e-6)
    np.testing.assert_allclose(gr, [-ALPHA / 4, -ALPHA / 3], rtol=1e-6)


def test_unlikelihood_without_log1m_sums_names_the_field():
    with pytest.raises(ValueError, match="rejected_log1m_sum"):
        losses.unlikelihood(_stats(rejected_log1m_sum=None))
    with pytest.raises(ValueError, match="chosen_lengths"):
        losses.unlikelihood(_stats(chosen_lengths=None))


# ---------------------------------------------------------------- the train step


def _hand_step_terms(cfg, params, batch) -> tuple[float, float]:
    """(mean per-token chosen NLL, mean per-token -log(1 - p) of rejected) over pairs."""
    logits = models.Transformer(cfg).apply(
        {"params": params}, batch["input_ids"],
        positions=batch["positions"], segment_ids=batch["segment_ids"],
    )  # fmt: skip
    terms = _completion_logps(logits, batch["input_ids"], batch["sequence_index"])
    B = len(terms) // 2
    nll = np.mean([-terms[i].mean() for i in range(B)])
    unlikely = np.mean([-np.log(1.0 - np.exp(terms[B + i])).mean() for i in range(B)])
    return float(nll), float(unlikely)


@pytest.fixture(scope="module")
def peaky_model():
    """The tiny model with a 20x unembedding, so log(1 - p) is far from -p."""
    cfg, params = tiny_model()
    return cfg, dict(params, lm_head={"kernel": 20.0 * params["lm_head"]["kernel"]})


@pytest.mark.parametrize("chunk", [0, 4])
def test_step_loss_is_the_hand_unlikelihood_loss(peaky_model, chunk):
    cfg, params = peaky_model
    batch = synthetic_batches(num=1, pairs=3, seed=31)[0]
    trainer, state = make_trainer(
        peaky_model, reference="none", loss="unlikelihood",
        hyper={"unlikelihood_alpha": ALPHA}, logps_chunk_size=chunk,
    )  # fmt: skip
    assert trainer.step_config.with_log1m
    _, m = trainer.step(state, train.stack_micro_batches([batch]), n_seq=6)
    nll, unlikely = _hand_step_terms(cfg, params, batch)
    np.testing.assert_allclose(float(m["loss"]), nll + ALPHA * unlikely, rtol=1e-5)
    np.testing.assert_allclose(float(m["nll_loss"]), nll, rtol=1e-5)
    # log(1 - p), not its first-order -p: those differ by ~p/2 relative, far above rtol.
    np.testing.assert_allclose(float(m["unlikelihood_loss"]), unlikely, rtol=1e-4)
    assert unlikely > 1e-3
