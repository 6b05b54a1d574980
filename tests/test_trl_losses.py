"""Issue 17's loss items against TRL: loss mixes from the config/command line, TRL 1.16's
f-divergence scores and refusals, the cDPO warning, exo epsilon, BCO's running reward
shift in the train state, and KTO's count-weighted subset metrics.

TRL's own `DPOTrainer._compute_loss` is called on the same log-probs (a stand-in model
returns them), so these compare with TRL's code, not a restatement of it.
"""

from __future__ import annotations

import collections
import logging
import re
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import checkpoint, configs, data, losses, train, train_step
from dpo_jax.configs import tiny
from dpo_jax.errors import UserError
from tests.train_helpers import StopAfter, make_trainer, synthetic_batches, tiny_model

# The fixture of tests/test_losses.py: four pairs, varied margins and lengths.
C = np.array([-12.0, -30.5, -7.25, -50.0])
R = np.array([-14.0, -28.0, -9.0, -41.5])
RC = np.array([-13.0, -29.0, -8.0, -47.0])
RR = np.array([-13.5, -29.5, -8.5, -44.0])
LC = np.array([4.0, 10.0, 3.0, 20.0])
LR = np.array([5.0, 8.0, 3.0, 12.0])


def log_sig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def make_stats(c=C, r=R, rc=RC, rr=RR) -> losses.PreferenceStats:
    f = lambda a: jnp.asarray(a, jnp.float32)
    return losses.PreferenceStats(
        chosen_logps=f(c), rejected_logps=f(r), ref_chosen_logps=f(rc),
        ref_rejected_logps=f(rr), chosen_lengths=f(LC), rejected_lengths=f(LR),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------
# TRL 1.16's DPOTrainer._compute_loss on given per-sequence log-probs
# ----------------------------------------------------------------------------------------


def trl_dpo_loss(loss_types, loss_weights=None, beta=0.1, label_smoothing=0.0,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
                 discopop_tau=0.05, c=C, r=R, rc=RC, rr=RR) -> float:  # fmt: skip
    """TRL's loss (mean over pairs) with a stand-in model whose per-token log-probs sum to
    `c` / `r` over completions of lengths LC / LR (reference log-probs precomputed)."""
    torch = pytest.importorskip("torch")
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    b = len(c)
    n = np.r_[LC, LR].astype(int)
    length = int(n.max()) + 2
    logps = np.r_[c, r]
    completion_mask = torch.zeros(2 * b, length, dtype=torch.long)
    per_token = torch.zeros(2 * b, length - 1, dtype=torch.float32)
    for i in range(2 * b):  # position 0 is the prompt; TRL scores shifted positions
        completion_mask[i, 1 : 1 + n[i]] = 1
        per_token[i, : n[i]] = logps[i] / n[i]
    zeros = torch.zeros_like(per_token)
    outputs = types.SimpleNamespace(
        log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
    )
    same = lambda x: x
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=same, gather=same),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        loss_types=list(loss_types), loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=discopop_tau),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = dict(
        input_ids=torch.ones(2 * b, length, dtype=torch.long),
        attention_mask=torch.ones(2 * b, length, dtype=torch.long),
        completion_mask=completion_mask,
        ref_chosen_logps=torch.tensor(rc, dtype=torch.float32),
        ref_rejected_logps=torch.tensor(rr, dtype=torch.float32),
    )
    return float(dpo_trainer.DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False))


def ours(spec, **hyper) -> float:
    return float(jnp.mean(losses.compute_loss(make_stats(), spec, **hyper)[0]))


def trl_source() -> str:
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    return Path(dpo_trainer.__file__).read_text()


# ----------------------------------------------------------------------------------------
# Loss mixes: loss.name / loss.weights, TRL's loss_type / loss_weights
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, weights, expected",
    [
        ("sigmoid", None, (("sigmoid", 1.0),)),
        (["sigmoid", "sft"], None, (("sigmoid", 1.0), ("sft", 1.0))),
        ("['sigmoid','sft']", "[1.0, 0.25]", (("sigmoid", 1.0), ("sft", 0.25))),
        ("sigmoid,sft", (2, 0.5), (("sigmoid", 2.0), ("sft", 0.5))),
        (" sigmoid , ipo ", "0.5,1", (("sigmoid", 0.5), ("ipo", 1.0))),
        (("kto",), 0.5, (("kto", 0.5),)),
    ],
)
def test_parse_loss_spec_forms(name, weights, expected):
    assert losses.parse_loss_spec(name, weights) == expected


@pytest.mark.parametrize(
    "name, weights, key, text",
    [
        ("['sigmoid','sigmod']", None, "loss.name", "'sigmod'"),
        ("bogus", None, "loss.name", "valid names"),
        ("sigmoid,sft", "[1.0]", "loss.weights", "1 weights"),
        ("sigmoid,sft", "a,b", "loss.weights", "not a list of numbers"),
        ("sigmoid,kto", None, "loss.name", "paired and unpaired"),
        ("sigmoid,sigmoid", None, "loss.name", "twice"),
    ],
)
def test_parse_loss_spec_refuses_with_one_line_naming_the_key(name, weights, key, text):
    with pytest.raises(UserError, match=re.escape(text)) as err:
        losses.parse_loss_spec(name, weights)
    message = str(err.value)
    assert f"'{key}'" in message and "\n" not in message
    if key == "loss.name" and "valid names" in message:
        assert "'sigmoid'" in message and "'kto'" in message


def test_mix_from_the_command_line_is_the_weighted_sum_of_its_losses():
    config = configs.load(
        "dpo_jax/configs/default.py",
        [("loss.name", "['sigmoid','sft']"), ("loss.weights", "[1.0, 0.25]")],
    )
    spec = losses.parse_loss_spec(config.loss.name, config.loss.weights)
    beta = 0.2
    loss, metrics = losses.compute_loss(make_stats(), spec, beta=beta)
    h = (C - RC) - (R - RR)
    nll = -C.sum() / LC.sum()  # token mean over the batch's chosen completions
    np.testing.assert_allclose(loss, -log_sig(beta * h) + 0.25 * nll, rtol=1e-6)
    # the same as each registered loss on the same stats, weighted by hand
    single = {n: np.asarray(losses.get(n)(make_stats(), **({"beta": beta} if n != "sft" else {}))[0]) for n in ("sigmoid", "sft")}  # fmt: skip
    np.testing.assert_allclose(loss, single["sigmoid"] + 0.25 * single["sft"], rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss/sft"]), nll, rtol=1e-6)
    # a Python config file may assign the list itself
    config.loss.name = ["sigmoid", "sft"]
    assert losses.parse_loss_spec(config.loss.name, None) == (("sigmoid", 1.0), ("sft", 1.0))


def test_mix_matches_trls_own_loss_type_list():
    spec = losses.parse_loss_spec("['sigmoid','sft']", "[1.0, 0.25]")
    np.testing.assert_allclose(
        ours(spec, beta=0.2), trl_dpo_loss(["sigmoid", "sft"], [1.0, 0.25], beta=0.2), rtol=1e-5
    )


def test_train_with_a_mix_from_the_override_string_and_the_cdpo_warning(tmp_path, caplog):
    model_cfg, params = tiny_model()
    overrides = [
        ("loss.name", "['sigmoid','sft']"), ("loss.weights", "1.0,0.5"),
        ("loss.hyper.label_smoothing", "0.1"), ("num_steps", "2"), ("grad_accum_steps", "1"),
        ("run_dir", str(tmp_path)), ("train.tensorboard", "False"),
    ]  # fmt: skip
    config = configs.load("tiny", overrides)
    batches = synthetic_batches(num=2, pairs=2, seed=3)
    with caplog.at_level(logging.WARNING, logger="dpo_jax.train"):
        result = train.train(config, train_data=batches, model_config=model_cfg, params=params)
    # The step's loss is the weighted sum of the two terms, both logged under TRL's names.
    for row in result.history:
        np.testing.assert_allclose(
            row["loss"], row["loss/sigmoid"] + 0.5 * row["loss/sft"], rtol=1e-5
        )
    # Step 1 (initial policy = reference): cDPO at h = 0 is log 2 whatever e is, and the
    # SFT term is the token-mean NLL of the chosen completions.
    np.testing.assert_allclose(result.history[0]["loss/sigmoid"], np.log(2.0), rtol=1e-5)
    assert result.history[1]["loss/sigmoid"] != pytest.approx(np.log(2.0))  # it trained
    # The cDPO difference from TRL 1.16 is logged once, naming the key.
    warned = [r for r in caplog.records if "label_smoothing" in r.getMessage()]
    assert len(warned) == 1 and "cDPO" in warned[0].getMessage()
    assert "TRL 1.16 ignores" in warned[0].getMessage()


def test_unknown_loss_in_a_mix_fails_before_any_model_work(tmp_path):
    config = configs.load("tiny", [("loss.name", "['sigmoid','sfft']"), ("run_dir", str(tmp_path))])
    with pytest.raises(UserError, match=r"'loss.name'.*'sfft'.*did you mean 'sft'"):
        train.train(config)  # no model.path: the loss is checked first


def test_no_trl_difference_warning_without_label_smoothing():
    assert losses.trl_differences((("sigmoid", 1.0),), {"beta": 0.1}) == []
    assert losses.trl_differences("sigmoid", {"label_smoothing": 0.0}) == []
    assert losses.trl_differences("robust", {"label_smoothing": 0.1}) == []  # same as TRL
    assert len(losses.trl_differences(["sigmoid", "sft"], {"label_smoothing": 0.2})) == 1


def test_accepted_hypers_for_config_validation():
    assert {"beta", "label_smoothing", "rpo_alpha", "ld_alpha", "use_weighting"} <= set(
        losses.accepted_hypers("sigmoid")
    )
    assert "loss_state" not in losses.accepted_hypers("bco_pair_shifted")
    assert "simpo_gamma" in losses.accepted_hypers(["sigmoid", "simpo"])
    kto = losses.accepted_hypers("kto")
    assert {"desirable_weight", "undesirable_weight"} <= kto and "rpo_alpha" not in kto


# ----------------------------------------------------------------------------------------
# f-divergences: TRL 1.16's scores, default coefficient and refusals
# ----------------------------------------------------------------------------------------

TRL_F_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")
F_KINDS = [
    ("reverse_kl", 0.5),
    ("forward_kl", 0.5),
    ("js_divergence", 0.5),
    ("alpha_divergence", 0.5),
    ("alpha_divergence", 0.3),
    ("alpha_divergence", 2.0),
]


def test_f_divergence_losses_and_default_are_trls():
    source = trl_source()
    allowed = re.search(r"f_divergence_loss_types = \{([^}]*)\}", source).group(1)
    trl_set = set(re.findall(r'"(\w+)"', allowed))
    assert trl_set == set(TRL_F_LOSSES) | {"sft"} == set(losses.F_DIVERGENCE_LOSSES) | {"sft"}
    dpo_config = pytest.importorskip("trl.trainer.dpo_config")
    field = dpo_config.DPOConfig.__dataclass_fields__["f_alpha_divergence_coef"]
    assert field.default == losses.F_ALPHA_DIVERGENCE_COEF == 0.5
    # alpha_divergence alone with the default coefficient is not plain DPO any more
    assert (
        abs(ours("ipo", beta=0.1, f_divergence_type="alpha_divergence") - ours("ipo", beta=0.1))
        > 0.1
    )


@pytest.mark.parametrize("kind, coef", F_KINDS)
@pytest.mark.parametrize("loss", TRL_F_LOSSES)
def test_f_divergence_matches_trls_own_loss(loss, kind, coef):
    beta = 0.2
    hyper = dict(beta=beta, f_divergence_type=kind, f_alpha_divergence_coef=coef)
    trl_kw = dict(hyper)
    if loss in ("exo_pair", "robust"):
        hyper["label_smoothing"] = trl_kw["label_smoothing"] = 0.05
    if loss == "discopop":
        hyper["discopop_tau"] = trl_kw["discopop_tau"] = 0.5
    expected = trl_dpo_loss([loss], **trl_kw)
    np.testing.assert_allclose(ours(loss, **hyper), expected, rtol=2e-5, atol=1e-6)
    # in a mix with sft, as TRL allows
    mix = trl_dpo_loss([loss, "sft"], [0.7, 0.3], **trl_kw)
    np.testing.assert_allclose(ours(((loss, 0.7), ("sft", 0.3)), **hyper), mix, rtol=2e-5)


@pytest.mark.parametrize(
    "loss", ["nca_pair", "bco_pair", "sppo_hard", "apo_down", "apo_zero", "aot", "aot_unpaired"]
)
def test_f_divergence_is_refused_where_trl_refuses_it(loss):
    with pytest.raises(UserError, match="loss.hyper.f_divergence_type"):
        losses.check_options(loss, {"f_divergence_type": "js_divergence"})
    with pytest.raises(UserError, match=loss):
        losses.compute_loss(make_stats(), ["sigmoid", loss], f_divergence_type="forward_kl")
    # reverse_kl (TRL's default, present in every ported DPOConfig) is fine
    losses.compute_loss(make_stats(), loss, f_divergence_type="reverse_kl")
    with pytest.raises(UserError, match="unknown f-divergence"):
        losses.check_options("sigmoid", {"f_divergence_type": "hellinger"})
    with pytest.raises(UserError, match="does not apply"):  # nothing would use it
        losses.check_options("simpo", {"f_divergence_type": "forward_kl"})


def test_exo_epsilon_zero_is_refused_as_trl_does():
    with pytest.raises(UserError, match="loss.hyper.label_smoothing"):
        losses.check_options(["exo_pair", "sft"], {"label_smoothing": 0.0})
    assert "label_smoothing == 0.0" in trl_source()  # TRL 1.16 raises on it
    np.testing.assert_allclose(
        ours("exo_pair", beta=0.1, label_smoothing=1e-3),
        trl_dpo_loss(["exo_pair"], beta=0.1, label_smoothing=1e-3),
        rtol=2e-5,
    )


def test_label_smoothing_on_sigmoid_is_cdpo_where_trl_ignores_it():
    beta, e = 0.2, 0.1
    h = (C - RC) - (R - RR)
    cdpo = np.mean(-(1 - e) * log_sig(beta * h) - e * log_sig(-beta * h))
    np.testing.assert_allclose(ours("sigmoid", beta=beta, label_smoothing=e), cdpo, rtol=1e-6)
    plain = trl_dpo_loss(["sigmoid"], beta=beta, label_smoothing=e)
    np.testing.assert_allclose(plain, np.mean(-log_sig(beta * h)), rtol=1e-6)  # ignored there


# ----------------------------------------------------------------------------------------
# BCO with the running reward shift (bco_pair_shifted); bco_pair stays TRL 1.16's
# ----------------------------------------------------------------------------------------


class OlderTrlBco:
    """Older TRL `DPOTrainer` bco_pair: RunningMoments fed each batch's mean reward, the
    shift (mean after the update) subtracted inside both sigmoids; restated in torch."""

    def __init__(self, beta):
        self.beta, self.mean, self.count = beta, 0.0, 1e-24

    def __call__(self, c, r, rc, rr):
        import torch
        import torch.nn.functional as F

        t = lambda a: torch.tensor(a, dtype=torch.float64)
        chosen, rejected = self.beta * (t(c) - t(rc)), self.beta * (t(r) - t(rr))
        batch_mean = float(torch.cat((chosen, rejected)).mean())
        total = self.count + 1
        self.mean += (batch_mean - self.mean) * 1 / total
        self.count = total
        return (-F.logsigmoid(chosen - self.mean) - F.logsigmoid(-(rejected - self.mean))).numpy()


def test_bco_pair_shifted_equals_older_trls_formula_over_batches():
    pytest.importorskip("torch")
    beta = 0.5
    rng = np.random.default_rng(0)
    older = OlderTrlBco(beta)
    state = losses.init_loss_state("bco_pair_shifted")
    for _ in range(3):
        c, r = C + rng.normal(0, 2, 4), R + rng.normal(0, 2, 4)
        st = make_stats(c=c, r=r)
        loss, metrics, state = losses.compute_loss_with_state(
            st, "bco_pair_shifted", state, beta=beta
        )
        np.testing.assert_allclose(loss, older(c, r, RC, RR), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(metrics["delta"]), older.mean, rtol=1e-5, atol=1e-7)
    assert float(state["bco_pair_shifted"].count) == 3 * 8


def test_bco_shift_has_no_gradient_and_bco_pair_is_trl_116s():
    beta = 0.5
    # the shift carries no gradient; bco_pair (TRL 1.16) has no shift
    g = jax.grad(lambda c: jnp.sum(losses.bco_pair_shifted(make_stats(c=c), beta=beta)[0]))(
        jnp.asarray(C, jnp.float32)
    )
    bc = beta * (C - RC)
    delta = np.mean(np.r_[bc, beta * (R - RR)])
    np.testing.assert_allclose(g, -beta * (1 - 1 / (1 + np.exp(-(bc - delta)))), rtol=1e-5)
    br = beta * (R - RR)
    np.testing.assert_allclose(ours("bco_pair", beta=beta), np.mean(-log_sig(bc) - log_sig(-br)), rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(
        ours("bco_pair", beta=beta), trl_dpo_loss(["bco_pair"], beta=beta), rtol=1e-5
    )


def test_bco_shift_in_the_train_step_over_three_steps_of_two_micro_batches():
    """delta by hand: each micro-batch adds its 2B rewards (read with an evaluation that
    does not move delta) to the running mean before its loss, as TRL per forward."""
    model_cfg, params = tiny_model()
    ref_params = jax.tree.map(lambda p: p * 0.9, params)  # a reference unlike the policy
    trainer, state = make_trainer(
        (model_cfg, params), loss="bco_pair_shifted", hyper={"beta": 0.5}, ref_params=ref_params
    )
    assert float(state.loss_state["bco_pair_shifted"].count) == 0.0
    micro = synthetic_batches(num=6, pairs=2, seed=11)
    seen, deltas_per_step = [], []
    for step in range(3):
        pair = micro[2 * step : 2 * step + 2]
        used = []
        for mb in pair:
            m = trainer.evaluate(state, train.stack_micro_batches([mb]), n_seq=4)
            seen.append((float(m["rewards/chosen"]) + float(m["rewards/rejected"])) / 2)
            used.append(np.mean(seen))  # equal counts: the mean of the micro-batch means
        before = float(state.loss_state["bco_pair_shifted"].mean)
        state, metrics = trainer.step(state, train.stack_micro_batches(pair), n_seq=4)
        np.testing.assert_allclose(float(metrics["delta"]), np.mean(used), rtol=1e-5, atol=1e-7)
        deltas_per_step.append(used[-1])
        assert before != float(state.loss_state["bco_pair_shifted"].mean)
    shift = state.loss_state["bco_pair_shifted"]
    np.testing.assert_allclose(float(shift.mean), np.mean(seen), rtol=1e-5, atol=1e-7)
    assert float(shift.count) == 6 * 4
    assert abs(deltas_per_step[-1]) > 1e-4  # a real shift, not a trivially zero one
    # A refused (non-finite) step leaves the shift as it was, like the params.
    kept = float(shift.mean)
    state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
    state, metrics = trainer.step(state, train.stack_micro_batches(micro[:2]), n_seq=4)
    assert int(metrics["nonfinite"]) == 1
    assert float(state.loss_state["bco_pair_shifted"].mean) == kept
    assert float(state.loss_state["bco_pair_shifted"].count) == 6 * 4


def test_bco_shift_is_checkpointed_and_resumed(tmp_path):
    model_cfg, params = tiny_model()
    batches = synthetic_batches(num=8, pairs=2, seed=7)  # 4 steps x A=2
    config = tiny.get_config("bco_pair_shifted")
    config.loss.hyper.beta = 0.5
    config.optim.learning_rate = 1e-2
    config.train.tensorboard = False
    ref_params = jax.tree.map(lambda p: p * 0.9, params)
    config.num_steps = 4
    opts = checkpoint.CheckpointOptions(save_every=100, async_save=False, handle_sigterm=False)

    def run(run_dir, stop_after=None):
        config.run_dir = str(run_dir)
        ckpt = checkpoint.Checkpointer(
            run_dir, options=opts, config=config.to_dict(), model_config=model_cfg,
            metrics_path=run_dir / "metrics.jsonl",
        )  # fmt: skip
        if stop_after is not None:
            ckpt = StopAfter(ckpt, stop_after)  # preempted after that step, as SIGTERM
        return train.train(
            config, train_data=batches, model_config=model_cfg, params=params,
            ref_params=ref_params, checkpointer=ckpt,
        )  # fmt: skip

    full = run(tmp_path / "full")
    first = run(tmp_path / "part", stop_after=2)
    assert [r["step"] for r in first.history] == [1, 2]
    at_two = float(first.state.loss_state["bco_pair_shifted"].mean)
    resumed = run(tmp_path / "part")  # restores step 2, delta included
    assert [r["step"] for r in resumed.history] == [3, 4]
    for got, want in zip(resumed.history, full.history[2:], strict=True):
        np.testing.assert_allclose(got["delta"], want["delta"], rtol=1e-6)
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    a, b = resumed.state.loss_state["bco_pair_shifted"], full.state.loss_state["bco_pair_shifted"]
    np.testing.assert_allclose(float(a.mean), float(b.mean), rtol=1e-6)
    assert float(a.count) == float(b.count) == 4 * 2 * 4
    assert at_two != 0.0 and float(a.mean) != at_two


# ----------------------------------------------------------------------------------------
# KTO: subset metrics count-weighted, absent subsets omitted
# ----------------------------------------------------------------------------------------


def unpaired(labels, seed):
    rng = np.random.default_rng(seed)
    items = [
        dict(prompt=rng.integers(3, 30, size=3).astype(np.int32),
             completion=rng.integers(30, 60, size=rng.integers(2, 5)).astype(np.int32), label=int(y))
        for y in labels
    ]  # fmt: skip
    return data.build_batch(items, "unpaired", "stacked", length=16)


def test_kto_absent_subset_is_omitted_not_zero():
    st = losses.UnpairedStats(
        logps=jnp.asarray(C), ref_logps=jnp.asarray(RC), kl_logps=jnp.asarray(R),
        ref_kl_logps=jnp.asarray(RR), labels=jnp.asarray([1, 1, 1, 1]),
    )  # fmt: skip
    _, metrics = losses.compute_loss(st, "kto", beta=0.5)
    row = losses.finalize_metrics(jax.device_get(metrics))
    assert "rewards/rejected" not in row and "logps/rejected" not in row
    assert "rewards/margins" not in row  # needs both subsets
    np.testing.assert_allclose(row["rewards/chosen"], np.mean(0.5 * (C - RC)), rtol=1e-6)
    np.testing.assert_allclose(row["logps/chosen"], C.mean(), rtol=1e-6)


def test_kto_metrics_are_count_weighted_over_unequal_micro_batches():
    model_cfg, params = tiny_model()
    ref_params = jax.tree.map(lambda p: p * 0.9, params)
    trainer, state = make_trainer(
        (model_cfg, params), loss="kto", hyper={"beta": 0.5}, ref_params=ref_params
    )
    # micro-batch 1: three desirable, one undesirable; micro-batch 2: all desirable
    mb1, mb2 = unpaired([1, 1, 1, 0], seed=1), unpaired([1, 1, 1, 1], seed=2)
    per_micro = [
        losses.finalize_metrics(trainer.evaluate(state, train.stack_micro_batches([mb]), 8))
        for mb in (mb1, mb2)
    ]
    assert "rewards/rejected" not in per_micro[1]  # absent there
    # held-out evaluation over both batches: count-weighted, the absent subset skipped
    held_out = train.evaluate(trainer, state, [mb1, mb2])
    state, metrics = trainer.step(state, train.stack_micro_batches([mb1, mb2]), n_seq=8)
    row = losses.finalize_metrics(jax.device_get(metrics))
    for got in (row, {k.removeprefix("eval/"): v for k, v in held_out.items()}):
        for key in ("rewards/chosen", "logps/chosen"):
            weighted = (3 * per_micro[0][key] + 4 * per_micro[1][key]) / 7
            unweighted = (per_micro[0][key] + per_micro[1][key]) / 2
            np.testing.assert_allclose(got[key], weighted, rtol=1e-5)
            assert abs(weighted - unweighted) > 1e-6 * max(1.0, abs(weighted))
        for key in ("rewards/rejected", "logps/rejected"):  # only micro-batch 1 has them
            np.testing.assert_allclose(got[key], per_micro[0][key], rtol=1e-5)
        np.testing.assert_allclose(
            got["rewards/margins"], got["rewards/chosen"] - got["rewards/rejected"], rtol=1e-5
        )
    # a step whose micro-batches all lack undesirable rows logs no rejected metrics
    _, metrics = trainer.step(
        state, train.stack_micro_batches([mb2, unpaired([1, 1, 1, 1], seed=3)]), n_seq=8
    )
    row = losses.finalize_metrics(jax.device_get(metrics))
    assert "rewards/chosen" in row and "rewards/rejected" not in row
    assert "rewards/margins" not in row


def test_mean_over_micro_sums_counted_metrics():
    metrics_A = {
        "loss": jnp.asarray([1.0, 3.0]),
        "rewards/chosen": losses.CountedMean(jnp.asarray([6.0, 0.0]), jnp.asarray([3.0, 0.0])),
    }
    out = losses.finalize_metrics(train_step._mean_over_micro(metrics_A))
    assert out["loss"] == 2.0 and out["rewards/chosen"] == 2.0
