"""Online DPO (objective "online_dpo", dpo_jax/online_dpo.py; Guo et al. 2024) on the one
Trainer: the labels, the paired step batches and their reference column, the config's
one-line errors, the KL-regularised optimum of Bradley-Terry labels, an exact resume.

The task of the heavy tests is tests/test_ppo_train.py's: a tiny random transformer
continues a prompt with ONE token, the reward is 1 for a token in `GOOD`, else 0.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from dpo_jax import models, online_dpo, rollouts, scoring
from dpo_jax.configs import default, validate
from dpo_jax.errors import UserError
from tests import train_helpers as th
from tests.test_ppo_train import _good, _next_token_probs, _optimum, _prompts, _reward

BETA = 1.0


def _config(run_dir: str = "", **kw) -> ml_collections.ConfigDict:
    c = default.get_config()
    c.run_dir = run_dir
    c.objective.name = "online_dpo"
    c.model.dtype = "float32"
    c.loss.name = "sigmoid"
    c.loss.hyper.beta = BETA
    c.optim.learning_rate = 1e-2
    c.optim.schedule = "constant"
    c.train.progress = False
    c.train.tensorboard = False
    c.online.num_rollouts = 2
    c.online.rollout_batch_size = 16
    c.online.samples_per_prompt = 2
    c.online.max_new_tokens = 1
    c.online.num_mini_batches = 2
    c.online_dpo.label = "bradley_terry"
    for k, v in kw.items():
        section = next(s for s in (c.online_dpo, c.online, c) if k in s)
        section[k] = v
    return c


def _run(config, prompts, model=None, **kw):
    from dpo_jax import train

    cfg, params = model or th.tiny_model()
    return train.train(
        config, train_data=prompts, reward=_reward, model_config=cfg, params=params, **kw
    )


# ------------------------------------------------------------------------ labels


def test_argmax_pairs_the_best_and_the_worst():
    scores = np.array([
        [0.1, 0.9, 0.5, 0.2],
        [3.0, -1.0, 2.0, -1.0],  # two worst: the last one is rejected
        [1.0, 1.0, 1.0, 1.0],  # all equal: the first and the last, never one completion
        [0.0, 0.0, 0.5, 0.5],  # two best: the first one is chosen
    ])  # fmt: skip
    chosen, rejected = online_dpo.pair_indices(scores, "argmax", np.random.default_rng(0))
    np.testing.assert_array_equal(chosen, [1, 0, 0, 2])
    np.testing.assert_array_equal(rejected, [0, 3, 3, 1])
    # K = 2 ties choose the first, as TRL's `first >= second`
    chosen, rejected = online_dpo.pair_indices(
        np.array([[1.0, 1.0], [0.0, 2.0]]), "argmax", np.random.default_rng(0)
    )
    np.testing.assert_array_equal(chosen, [0, 1])
    np.testing.assert_array_equal(rejected, [1, 0])
    # a judge: P(first preferred) >= 0.5 chooses the first; undecided (NaN) is a tie
    chosen, rejected = online_dpo.judge_pair_indices(
        np.array([0.9, 0.1, 0.5, np.nan]), "argmax", np.random.default_rng(0)
    )
    np.testing.assert_array_equal(chosen, [0, 1, 0, 0])
    np.testing.assert_array_equal(rejected, [1, 0, 1, 1])


def test_bradley_terry_labels_follow_the_sigmoid_of_the_score_gap():
    """K = 2: the first is chosen with probability sigmoid(r_1 - r_2), whichever is
    better; K = 4: the best and the worst, the best chosen w.p. sigmoid of their gap."""
    n = 20000
    gaps = np.array([-2.0, -0.5, 0.0, 1.0, 3.0])
    scores = np.stack([np.repeat(gaps, n), np.zeros(n * len(gaps))], axis=1)
    chosen, rejected = online_dpo.pair_indices(scores, "bradley_terry", np.random.default_rng(1))
    assert np.all(chosen != rejected)
    first = (chosen == 0).reshape(len(gaps), n).mean(1)
    want = 1 / (1 + np.exp(-gaps))
    np.testing.assert_allclose(first, want, atol=4 * np.sqrt(0.25 / n))
    # the draws are a pure function of the generator's seed (an exact resume)
    again = online_dpo.pair_indices(scores, "bradley_terry", np.random.default_rng(1))
    np.testing.assert_array_equal(again[0], chosen)

    four = np.tile([[0.2, 1.5, -0.5, 0.7]], (n, 1))
    chosen, rejected = online_dpo.pair_indices(four, "bradley_terry", np.random.default_rng(2))
    assert set(np.unique(chosen)) == {1, 2} and np.all(chosen + rejected == 3)
    np.testing.assert_allclose(np.mean(chosen == 1), 1 / (1 + np.exp(-2.0)), atol=0.015)

    p = np.array([0.8] * n + [np.nan] * n)
    chosen, _ = online_dpo.judge_pair_indices(p, "bradley_terry", np.random.default_rng(3))
    np.testing.assert_allclose(np.mean(chosen[:n] == 0), 0.8, atol=0.015)
    np.testing.assert_allclose(np.mean(chosen[n:] == 0), 0.5, atol=0.015)


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(loss="kto"), "loss.name"),  # unpaired: no chosen/rejected pairs
        (dict(samples_per_prompt=1), "online.samples_per_prompt"),
        (dict(label="best_of_n"), "online_dpo.label"),
        # 16 completions / 2 = 8 pairs, not 2 updates x 8 micro-batches
        (dict(grad_accum_steps=8), "online.rollout_batch_size"),
        (dict(judge="python:m:f", samples_per_prompt=4), "online.samples_per_prompt"),
        (dict(judge="python:m:f", reward="vader"), "online.judge"),
        (dict(lora=4), "lora.rank"),
        (dict(reference="none"), "reference.mode"),
    ],
)
def test_a_bad_config_is_one_line_naming_its_key(change, key):
    c = _config()
    if "loss" in change:
        c.loss.name = change.pop("loss")
    if "lora" in change:
        c.lora.rank = change.pop("lora")
    if "reference" in change:
        c.reference.mode = change.pop("reference")
    for k, v in change.items():
        section = next(s for s in (c.online_dpo, c.online, c) if k in s)
        section[k] = v
    with pytest.raises(UserError, match=f"'{key}'"):
        validate.validate(c)


def test_config_counts_pairs():
    c = _config(rollout_batch_size=32, samples_per_prompt=4, grad_accum_steps=2)
    cfg = online_dpo.OnlineDPOConfig.from_config(c)
    assert (cfg.prompts_per_rollout, cfg.pairs_per_micro, cfg.rows_per_micro) == (8, 2, 4)
    assert cfg.num_steps == 2 * 2  # rollouts x num_mini_batches
    c.loss.name = "simpo"  # reference-free: no reference pass, no column
    assert online_dpo.batch_columns(c) == () and online_dpo.step_reference(c) == "none"
    assert online_dpo.step_reference(_config()) == "precomputed"


# ------------------------------------------------------------------------ batches


def _token_reward(samples) -> np.ndarray:
    """A reward with few ties: the completion's token id (one-token completions)."""
    return samples.tokens[:, 0].astype(np.float32) / th.VOCAB


def test_pairs_and_their_reference_column_match_a_direct_scoring():
    """Argmax over K = 4: each pair's chosen completion out-scores its rejected one, both
    continue the same prompt; the `ref_logps` column is the reference's own scoring of
    the rows (another model than the policy), and the dry run lowers the very step the
    collected batch runs."""
    from dpo_jax import train

    model = th.tiny_model()
    ref_params = models.init_params(model[0], jax.random.key(7))  # not the policy
    prompts = _prompts(8)
    c = _config(label="argmax", samples_per_prompt=4, rollout_batch_size=32, grad_accum_steps=2)
    dry = train.train(
        c, train_data=prompts, reward=_token_reward, model_config=model[0], params=model[1],
        ref_params=ref_params, dry_run=True,
    )  # fmt: skip
    trainer, state = dry.trainer, dry.state
    ref = rollouts.reference_params(trainer, state, ref_params)
    source = online_dpo.build_source(c, prompts, _token_reward, ref, trainer.mesh)
    steps, metrics = source.collect(trainer, state, 0)
    score = scoring.host_scorer(trainer.step_config.apply_fn, needs=("logps",))  # jitted score()
    assert len(steps) == 2  # num_mini_batches
    b = 2  # 8 prompts -> 8 pairs, 2 updates x 2 micro-batches
    for batch_A in steps:
        assert batch_A["input_ids"].shape[:2] == (2, 2 * b)
        assert batch_A["ref_logps"].shape == (2, 2 * b)
        for a in range(2):
            mb = {k: v[a] for k, v in batch_A.items() if k != "ref_logps"}
            si = mb["sequence_index"]
            comp = np.where(si >= 0, mb["input_ids"], -1).max(-1)  # the one completion token
            assert np.all(comp[:b] > comp[b:])  # distinct tokens here (seed 0)
            np.testing.assert_array_equal(np.max(si, -1), np.arange(2 * b))
            prompt = np.where((si < 0) & (mb["segment_ids"] > 0), mb["input_ids"], -1)
            np.testing.assert_array_equal(prompt[:b], prompt[b:])
            direct = score(ref_params, mb, 2 * b).logps_S
            np.testing.assert_allclose(batch_A["ref_logps"][a], direct, rtol=1e-5, atol=1e-5)
    assert metrics["objective/scores_margin"] > 0
    assert metrics["completions/mean_length"] == 1.0 and metrics["val/contain_eos_token"] == 0
    host, n_seq = source.share(steps[0])
    assert n_seq == 2 * b and all(np.array_equal(host[k], steps[0][k]) for k in host)
    assert dry.lowered.as_text() == trainer.lower(state, host, n_seq).as_text()


def test_one_host_share_is_the_whole_batch_and_pairs_stay_whole():
    """`share_pairs`: a host's pairs are its chosen AND rejected rows, renumbered as a
    paired batch of their own; `ref_logps` follows."""
    b, length = 4, 3
    rows = np.arange(2 * b)[None, :, None] * np.ones((1, 1, length), np.int32)
    batch = {
        "input_ids": rows, "sequence_index": rows.copy(),
        "ref_logps": np.arange(2 * b, dtype=np.float32)[None],
    }  # fmt: skip
    second = online_dpo.share_pairs(batch, slice(2, 4))  # host 1 of 2
    np.testing.assert_array_equal(second["input_ids"][0, :, 0], [2, 3, 6, 7])
    np.testing.assert_array_equal(second["sequence_index"][0, :, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(second["ref_logps"][0], [2, 3, 6, 7])
    whole = online_dpo.share_pairs(batch, slice(0, b))
    for k in batch:
        np.testing.assert_array_equal(whole[k], batch[k])


def make_judge():
    """`python:tests.test_online_dpo:make_judge`: prefers the text that sorts later,
    undecided (NaN) on equal texts."""

    def judge(prompts, a, b):
        assert len(prompts) == len(a) == len(b) and all(isinstance(p, str) for p in prompts)
        a, b = np.asarray(a), np.asarray(b)
        return np.where(a == b, np.nan, (a > b).astype(np.float64))

    return judge


def test_a_judge_labels_the_pairs_on_decoded_text(tokenizer, tmp_path):
    """`online.judge` (no reward): `online.inputs_from_config` hands the method the judge
    on decoded samples; each pair's chosen completion is the one the judge preferred."""
    from dpo_jax import online

    tokenizer.save_pretrained(tmp_path)
    model = th.tiny_model()
    prompts = _prompts(8)
    c = _config(label="argmax", judge="python:tests.test_online_dpo:make_judge")
    c.tokenizer = str(tmp_path)
    got_prompts, judge = online.inputs_from_config(c, prompts, None)
    assert got_prompts is prompts and isinstance(judge, online_dpo.SampleJudge)
    with pytest.raises(UserError, match="'online.judge'"):
        online.inputs_from_config(c, prompts, _reward)  # a judge and reward= both
    trainer, state = th.make_trainer(model, reference="precomputed", objective="online_dpo")
    ref = rollouts.reference_params(trainer, state)
    source = online_dpo.build_source(c, prompts, judge, ref, trainer.mesh)
    steps, metrics = source.collect(trainer, state, 0)
    assert 0 < metrics["judge/decided"] <= 1 and "objective/scores" not in metrics
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    for batch_A in steps:
        mb = {k: v[0] for k, v in batch_A.items()}
        b = mb["input_ids"].shape[0] // 2
        rows = zip(mb["input_ids"], mb["sequence_index"], strict=True)
        comp = [decode(ids[si >= 0]) for ids, si in rows]
        for k in range(b):  # preferred (later), or undecided: the first is chosen
            assert comp[k] >= comp[b + k]


# ------------------------------------------------------------------------ end to end


@pytest.mark.heavy  # 200 rollouts of 128 pairs: 40-65 s on 2 (shared) CPU cores
def test_bradley_terry_labels_reach_the_kl_regularised_optimum():
    """On-policy pairs labelled y_1 > y_2 with probability sigmoid(r_1 - r_2), trained
    with the sigmoid loss at beta: the fixed point is pi* = pi_ref exp(r / beta) / Z
    (dpo_jax/online_dpo.py's docstring: the expected loss of every pair is a logistic
    cross-entropy whose minimum is beta * margin = r_1 - r_2, whatever draws the pair).
    Argmax labels in the same run end at P(GOOD) = 0.95, not pi*'s 0.45 (measured)."""
    cfg, params = th.tiny_model()
    prompts = _prompts(128)
    pi_ref = _next_token_probs(cfg, params, prompts)
    want = _optimum(pi_ref, BETA)
    config = _config(num_rollouts=200, rollout_batch_size=256, num_mini_batches=1)
    # The labels are noisy (a pair of two bad tokens is a coin flip): a cosine decay lets
    # the last iterate settle. No gradient clipping: clipping a noisy gradient biases its
    # mean (E[clip(g)] != clip(E[g])), and pi* is where the mean gradient vanishes.
    config.optim.schedule = "cosine"
    config.optim.max_grad_norm = 0.0
    result = _run(config, prompts, model=(cfg, params))
    pi = _next_token_probs(cfg, result.state.params, prompts)
    assert _good(want).mean() - _good(pi_ref).mean() > 0.2  # a long way from the start
    # the mean over prompts: seeds 0-2 end within 0.007 of pi*'s
    assert abs(_good(pi).mean() - _good(want).mean()) < 0.015
    np.testing.assert_allclose(_good(pi), _good(want), atol=0.06)  # each prompt
    assert np.all((want * np.log(want / pi)).sum(-1) < 0.04)  # KL(pi* || pi)
    assert {r["rollout"] for r in result.history} == set(range(1, 201))
    assert np.isfinite(result.history[-1]["objective/kl"])


@pytest.mark.heavy
def test_online_dpo_resume_after_stop_is_bit_identical(tmp_path):
    """Stop after the second rollout (as SIGTERM does), rerun: the resumed run ends with
    the uninterrupted run's params and metric rows (samples, Bradley-Terry draws and the
    pairs' shuffle are functions of (seed, rollout))."""
    from dpo_jax import checkpoint

    prompts = _prompts()

    def config(name):
        c = _config(str(tmp_path / name), num_rollouts=4)
        c.checkpoint.enabled = True
        c.checkpoint.save_every = 2
        c.checkpoint.async_save = False
        return c

    full = _run(config("full"), prompts)

    class StopAfter(checkpoint.Checkpointer):
        def maybe_save(self, step, *args, **kwargs):
            if step == 4:
                self.request_stop()
            return super().maybe_save(step, *args, **kwargs)

    c = config("cut")
    stopped = _run(c, prompts, checkpointer=StopAfter.from_config(c))
    assert [r["rollout"] for r in stopped.history] == [1, 1, 2, 2]
    resumed = _run(config("cut"), prompts)
    assert [r["rollout"] for r in resumed.history] == [3, 3, 4, 4]
    np.testing.assert_array_equal(
        th.flat_params(resumed.state.params), th.flat_params(full.state.params)
    )
    timing = ("tokens_per_second",)
    for a, b in zip(resumed.history, full.history[4:], strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }


@pytest.mark.heavy  # three processes compile the sampler, the reference pass and the step
def test_online_dpo_in_two_processes_matches_one(tmp_path):
    """Two JAX processes (2 CPU devices each) train like one process on the same 4
    devices and mesh: each host rewards half the completions and feeds its pairs' chosen
    AND rejected rows (`OnlineDPOSource.share`), and the reference column lines up with
    the step's global sequences (tests/online_dpo_multihost_run.py)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_train_multihost import _free_port

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    port = str(_free_port())
    cmd = [sys.executable, "-m", "tests.online_dpo_multihost_run"]
    procs = [
        subprocess.Popen(cmd + [pid, port, str(tmp_path)], cwd=root, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid in ("0", "1", "-1")
    ]  # fmt: skip
    for p in procs:
        text, _ = p.communicate(timeout=900)
        assert p.returncode == 0, text[-4000:]
    for h in (0, 1):  # of 64 completions each host rewarded 32; fed 4 of 8 pairs per micro
        calls = json.loads((tmp_path / f"multi_host{h}.json").read_text())
        assert calls["reward_completions"] == [32, 32]
        assert calls["step_rows"] == [[2, 8, 8]] * 4  # [A, 2 x 4 rows], n_seq
    single_calls = json.loads((tmp_path / "single_host0.json").read_text())
    assert single_calls["reward_completions"] == [64, 64]
    assert single_calls["step_rows"] == [[2, 16, 16]] * 4
    multi = json.loads((tmp_path / "multi.json").read_text())
    single = json.loads((tmp_path / "single.json").read_text())
    assert len(multi) == len(single) == 4
    for m, s in zip(multi, single, strict=True):
        # the same samples, scores and Bradley-Terry pairs ...
        for key in ("objective/scores", "objective/scores_margin", "rollout"):
            assert m[key] == s[key], key
        # ... and the same updates up to the order of float reductions across processes
        for key in ("objective/kl", "loss", "grad_norm", "rewards/margins", "logps/chosen"):
            np.testing.assert_allclose(m[key], s[key], rtol=1e-5, atol=1e-6, err_msg=key)
    pm, ps = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    for key in ps.files:  # SGD (the run's optimizer): last-bit gradient differences stay small
        np.testing.assert_allclose(pm[key], ps[key], rtol=0, atol=5e-7, err_msg=key)
