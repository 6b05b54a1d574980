"""WPO (`use_weighting`) and LD-DPO (`ld_alpha`) through the jitted train step.

The expected numbers come from a second code path: the model's logits taken to float64
numpy, a full log-softmax per scored position, and the papers' formulas written out
per sequence (no `dpo_jax.logprobs`, no `dpo_jax.losses`).
"""

from __future__ import annotations

import numpy as np
import pytest

from dpo_jax import models, train
from dpo_jax.configs import tiny
from tests.train_helpers import flat_params, make_trainer, synthetic_batches, tiny_model

BETA = 0.1


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def peaky_model(model):
    """The tiny model with a 20x unembedding: peaked next-token distributions, so WPO
    weights are far from 1 (near-uniform ones would make WPO look like plain DPO)."""
    cfg, params = model
    params = dict(params, lm_head={"kernel": 20.0 * params["lm_head"]["kernel"]})
    return cfg, params


def _token_terms(cfg, params, batch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sequence k: (log p of each completion token, log sum_v p_v^2 at its position)."""
    logits = models.Transformer(cfg).apply(
        {"params": params}, batch["input_ids"],
        positions=batch["positions"], segment_ids=batch["segment_ids"],
    )  # fmt: skip
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    log_sum_p2 = np.log(np.exp(2.0 * logp).sum(-1))
    ids, si = np.asarray(batch["input_ids"]), np.asarray(batch["sequence_index"])
    out = []
    for k in range(int(si.max()) + 1):
        rows, cols = np.nonzero(si == k)  # row-major: the completion in token order
        out.append((logp[rows, cols - 1, ids[rows, cols]], log_sum_p2[rows, cols - 1]))
    return out


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _dpo_terms(policy, ref, ld_alpha=None):
    """Per-pair DPO loss (LD-DPO when `ld_alpha`) and WPO pair weights, from token terms."""
    B = len(policy) // 2

    def seq_logp(lp: np.ndarray, partner_len: int) -> float:
        if ld_alpha is None:
            return lp.sum()
        m = min(len(lp), partner_len)  # shared prefix; the longer answer's tail is scaled
        return lp[:m].sum() + ld_alpha * lp[m:].sum()

    def side(terms, k):
        return seq_logp(terms[k][0], len(terms[(k + B) % (2 * B)][0]))

    loss, weight = [], []
    for i in range(B):
        h = (side(policy, i) - side(ref, i)) - (side(policy, B + i) - side(ref, B + i))
        loss.append(-_log_sigmoid(BETA * h))
        w = [np.exp(np.mean(lp - p2)) for lp, p2 in (policy[i], policy[B + i])]
        weight.append(w[0] * w[1])
    return np.array(loss), np.array(weight)


def test_wpo_step_loss_is_the_weighted_dpo_loss(model, peaky_model):
    cfg, policy = peaky_model
    _, ref = model  # a different reference, so the margins are not zero
    batch = synthetic_batches(num=1, pairs=3, seed=21)[0]
    trainer, state = make_trainer(
        peaky_model, hyper={"beta": BETA, "use_weighting": True}, ref_params=ref
    )
    _, m = trainer.step(state, train.stack_micro_batches([batch]), n_seq=6)

    loss_B, w_B = _dpo_terms(_token_terms(cfg, policy, batch), _token_terms(cfg, ref, batch))
    np.testing.assert_allclose(float(m["loss"]), np.mean(loss_B * w_B), rtol=1e-5)
    assert w_B.max() < 0.9  # the weights matter: plain DPO's loss is far off
    assert abs(np.mean(loss_B * w_B) - np.mean(loss_B)) > 0.1 * np.mean(loss_B)


@pytest.mark.heavy
def test_wpo_update_is_the_dpo_update_times_the_pair_weight(peaky_model):
    """One pair, SGD, no clipping: the WPO gradient is w_c * w_r times DPO's (the weight
    carries no gradient). WPO runs the chunked log-prob path, DPO the full one."""
    cfg, params = peaky_model
    batch_A = train.stack_micro_batches(synthetic_batches(num=1, pairs=1, seed=22))
    # a large step so the update, not float32 rounding of the params, dominates the delta
    sgd = dict(name="sgd", learning_rate=50.0, schedule="constant", max_grad_norm=0.0)

    def update(hyper, **kw):
        trainer, state = make_trainer(peaky_model, hyper=hyper, optim_cfg=sgd, **kw)
        state, m = trainer.step(state, batch_A, n_seq=2)
        return flat_params(state.params) - flat_params(params), float(m["grad_norm"])

    d_dpo, norm_dpo = update({"beta": BETA})
    d_wpo, norm_wpo = update({"beta": BETA, "use_weighting": True}, logps_chunk_size=4)
    terms = _token_terms(cfg, params, {k: v[0] for k, v in batch_A.items()})
    (w,) = _dpo_terms(terms, terms)[1]
    assert w < 0.9  # so an unweighted update would fail both checks below
    np.testing.assert_allclose(norm_wpo, w * norm_dpo, rtol=1e-5)
    scale = np.abs(d_dpo).max()
    np.testing.assert_allclose(d_wpo, w * d_dpo, rtol=1e-3, atol=1e-4 * scale)


def test_ld_alpha_with_frozen_reference_desensitises_policy_and_reference(model, peaky_model):
    cfg, policy = peaky_model
    _, ref = model
    batch = synthetic_batches(num=1, pairs=3, seed=23)[0]
    lengths = np.bincount(batch["sequence_index"][batch["sequence_index"] >= 0])
    assert (lengths[:3] != lengths[3:]).any()  # some pair has a tail for ld_alpha to scale
    alpha = 0.3
    trainer, state = make_trainer(
        peaky_model, hyper={"beta": BETA, "ld_alpha": alpha}, ref_params=ref
    )
    _, m = trainer.step(state, train.stack_micro_batches([batch]), n_seq=6)

    p_terms, r_terms = _token_terms(cfg, policy, batch), _token_terms(cfg, ref, batch)
    loss_B, _ = _dpo_terms(p_terms, r_terms, ld_alpha=alpha)
    np.testing.assert_allclose(float(m["loss"]), np.mean(loss_B), rtol=1e-5)
    plain_B, _ = _dpo_terms(p_terms, r_terms)
    assert abs(np.mean(loss_B) - np.mean(plain_B)) > 1e-3  # ld_alpha changed the numbers


def test_ld_alpha_refuses_a_precomputed_reference(model, tmp_path):
    with pytest.raises(ValueError, match=r"ld_alpha=0\.5 \(LD-DPO\) conflicts with a precomputed"):
        make_trainer(model, reference="precomputed", hyper={"beta": BETA, "ld_alpha": 0.5})

    cfg, params = model
    batches = synthetic_batches(num=2, pairs=2, seed=24)
    config = tiny.get_config()
    config.run_dir = str(tmp_path)
    config.loss.hyper.ld_alpha = 0.5
    # cache mode fails before the reference pass; auto fails once the column is seen
    config.reference.mode = "cache"
    with pytest.raises(ValueError, match="reference.mode='frozen'"):
        train.train(config, train_data=batches, model_config=cfg, params=params)
    config.reference.mode = "auto"
    with_column = [dict(b, ref_logps=np.zeros(4, np.float32)) for b in batches]
    with pytest.raises(ValueError, match="ld_alpha.*conflicts with a precomputed"):
        train.train(config, train_data=with_column, model_config=cfg, params=params)
    # reference-free losses take ld_alpha with no reference at all
    simpo = {"beta": 2.0, "simpo_gamma": 0.5, "ld_alpha": 0.5}
    trainer, _ = make_trainer(model, reference="none", loss="simpo", hyper=simpo)
    assert trainer.step_config.reference == "none"


def test_wpo_refuses_unpaired_losses(model):
    with pytest.raises(ValueError, match="use_weighting \\(WPO\\) applies to paired losses"):
        make_trainer(model, loss="kto", hyper={"beta": BETA, "use_weighting": True})
