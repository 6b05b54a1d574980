"""GRPO and RLOO on the one loop (`dpo_jax.group_loop`, objectives "grpo" / "rloo").

The task is test_ppo_train's: a tiny random transformer continues a prompt with ONE
token, the reward is 1 for a token in `GOOD`. RLOO puts the KL to the reference in the
reward, `r(y) - beta (log pi(y) - log pi_ref(y))`, whose expectation under pi is
`E_pi[r] - beta KL(pi || pi_ref)`; the leave-one-out baseline keeps the policy gradient
unbiased, so RLOO converges to `pi*(y) ∝ pi_ref(y) exp(r(y) / beta)`.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import pytest

from dpo_jax import group_loop, sampling
from dpo_jax.errors import UserError
from tests import test_ppo_train as ppo_task
from tests import train_helpers as th


def _config(method: str, run_dir: str = "", **grpo_kw):
    c = ppo_task._config(run_dir)
    c.objective.name = method
    c.online.kl_coef = 0.1
    for k, v in grpo_kw.items():
        (c.grpo if k in c.grpo else c.online)[k] = v
    return c


def _run(config, prompts, model=None, **kw):
    from dpo_jax import train

    cfg, params = model or th.tiny_model()
    return train.train(
        config, train_data=prompts, reward=ppo_task._reward, model_config=cfg, params=params, **kw
    )


def _source_and_state(config, prompts):
    """A real Trainer and state (a dry run builds them without training) and the run's
    step source, as `train` builds it."""
    from dpo_jax import online

    cfg, params = th.tiny_model()
    dry = _run(config, prompts, model=(cfg, params), dry_run=True)
    source = online.build_source(config, dry.trainer, dry.state, prompts, ppo_task._reward, None)
    return dry.trainer, dry.state, source


def _per_sequence(batch, col="advantages"):
    """Per-row value of a column broadcast on the row's completion tokens (NaN: no token)."""
    si = batch["sequence_index"]
    return np.array([batch[col][k][si[k] >= 0][0] if (si[k] >= 0).any() else np.nan
                     for k in range(si.shape[0])])  # fmt: skip


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("grpo", {}),  # the default tier's end-to-end run of a method
        pytest.param(
            "grpo", {"scale_rewards": "none", "loss_type": "dr_grpo"}, marks=pytest.mark.heavy
        ),  # Dr. GRPO
        pytest.param("rloo", {}, marks=pytest.mark.heavy),
    ],
)
def test_rollout_advantages_equal_a_hand_computation(method, kw):
    """One real rollout of the source: the advantages on its tokens are the paper's formula
    computed here in numpy from the sampled tokens' rewards (and, for RLOO, the KL of
    the sampler's own log-probs to the reference's)."""
    from dpo_jax import scoring

    prompts = ppo_task._prompts()
    config = _config(method, **kw)
    trainer, state, source = _source_and_state(config, prompts)
    batch, samples, metrics = source.rollout_batch(trainer, state, 0)
    cfg = source.group
    assert len(source.collect(trainer, state, 0)[0]) == cfg.steps_per_rollout == 2
    scores = ppo_task._reward(samples).astype(np.float64)
    k = cfg.samples_per_prompt
    groups = scores.reshape(-1, k)
    if method == "grpo" and kw.get("scale_rewards") == "none":
        want = (groups - groups.mean(1, keepdims=True)).reshape(-1)
    elif method == "grpo":
        std = groups.std(1, ddof=1, keepdims=True)
        want = ((groups - groups.mean(1, keepdims=True)) / (std + 1e-4)).reshape(-1)
    else:
        rows, mask = sampling.stacked_rows(samples, 0)
        ref = scoring.score(
            trainer.step_config.apply_fn, source.ref_params,
            {k_: jax.numpy.asarray(v) for k_, v in rows.items()}, rows["input_ids"].shape[0],
            needs=("token_logps",),
        ).token_logps_NxL  # fmt: skip
        ref = sampling.from_tokens(np.asarray(ref), mask, rows["sequence_index"])
        kl = np.sum(np.where(mask, samples.logps - ref, 0.0), -1).astype(np.float64)
        r = (scores - cfg.kl_coef * kl).reshape(-1, k)
        want = (r - (r.sum(1, keepdims=True) - r) / (k - 1)).reshape(-1)
        np.testing.assert_allclose(metrics["objective/kl"], kl.mean(), rtol=1e-4, atol=1e-6)
    assert 0 < scores.mean() < 1  # the seed samples both rewards
    np.testing.assert_allclose(_per_sequence(batch), want, rtol=1e-4, atol=1e-5)
    assert metrics["objective/scores"] == pytest.approx(scores.mean())


def test_dynamic_sampling_drops_groups_with_equal_rewards():
    """DAPO's dynamic sampling: rows of a group whose rewards are all equal carry no
    scored token (out of the loss and its token counts); the others keep theirs."""
    prompts = ppo_task._prompts()
    config = _config("grpo", dynamic_sampling=True, loss_type="dapo", epsilon_high=0.28)
    trainer, state, source = _source_and_state(config, prompts)
    batch, samples, metrics = source.rollout_batch(trainer, state, 0)
    groups = ppo_task._reward(samples).reshape(-1, source.group.samples_per_prompt)
    kept = ~np.all(groups == groups[:, :1], axis=1)
    assert 0 < kept.mean() < 1  # the seed gives both kinds
    assert metrics["dynamic_sampling/kept_fraction"] == pytest.approx(kept.mean())
    scored = np.any(batch["sequence_index"] >= 0, -1)
    np.testing.assert_array_equal(scored, np.repeat(kept, source.group.samples_per_prompt))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("samples_per_prompt", 1, "online.samples_per_prompt"),
        ("temperature", 0.7, "online.temperature"),
        ("loss_type", "mean", "grpo.loss_type"),
        ("scale_rewards", "std", "grpo.scale_rewards"),
        ("epsilon_low", 1.5, "grpo.epsilon_low"),
        ("num_iterations", 0, "grpo.num_iterations"),
    ],
)
def test_bad_settings_name_their_key(key, value, match):
    from dpo_jax.configs import validate

    config = _config("grpo", **{key: value})
    with pytest.raises(UserError, match=match):
        validate.validate(config)


@pytest.mark.heavy
def test_rloo_reaches_the_kl_regularised_optimum():
    """RLOO with the KL in the reward converges to pi* = pi_ref exp(r / beta) / Z."""
    beta = 1.0
    cfg, params = th.tiny_model()
    prompts = ppo_task._prompts()
    pi_ref = ppo_task._next_token_probs(cfg, params, prompts)
    want = ppo_task._optimum(pi_ref, beta)
    config = _config(
        "rloo", num_rollouts=100, rollout_batch_size=64, samples_per_prompt=8,
        num_mini_batches=1, kl_coef=beta,
    )  # fmt: skip
    config.optim.schedule = "cosine"
    result = _run(config, prompts, model=(cfg, params))
    pi = ppo_task._next_token_probs(cfg, result.state.params, prompts)
    good, best = ppo_task._good(pi), ppo_task._good(want)
    np.testing.assert_allclose(good, best, atol=0.03)
    assert abs(good.mean() - best.mean()) < 0.01


@pytest.mark.heavy
def test_stop_in_the_middle_of_a_rollout_resumes_bit_identically(tmp_path):
    """SIGTERM (a stop request) arrives while rollout 2's updates run and a periodic save
    falls inside a rollout: both wait for the rollout's end, and the resumed run ends
    with the uninterrupted run's params and per-step metrics."""
    from dpo_jax import checkpoint, train

    prompts = ppo_task._prompts()
    kw = dict(num_rollouts=3, num_iterations=2, num_mini_batches=2)  # 4 steps a rollout

    def config(name):
        c = _config("grpo", str(tmp_path / name), **kw)
        c.checkpoint.enabled = True
        c.checkpoint.save_every = 3  # inside rollout 1: deferred to step 4
        c.checkpoint.async_save = False
        return c

    cfg, params = th.tiny_model()
    full = train.train(config("full"), train_data=prompts, reward=ppo_task._reward,
                       model_config=cfg, params=params)  # fmt: skip
    assert sorted(int(p.name) for p in (tmp_path / "full" / "checkpoints").iterdir()) == [4, 8, 12]

    c = config("cut")
    ckpt = checkpoint.Checkpointer.from_config(c)
    calls = []

    def reward(samples):
        calls.append(1)
        if len(calls) == 2:  # collecting rollout 2 (before step 5): "SIGTERM" now
            ckpt.request_stop()
        return ppo_task._reward(samples)

    stopped = train.train(c, train_data=prompts, reward=reward, model_config=cfg,
                          params=params, checkpointer=ckpt)  # fmt: skip
    assert [r["step"] for r in stopped.history][-1] == 8  # finished rollout 2, then stopped
    resumed = train.train(config("cut"), train_data=prompts, reward=ppo_task._reward,
                          model_config=cfg, params=params)  # fmt: skip
    assert [r["step"] for r in resumed.history] == [9, 10, 11, 12]
    np.testing.assert_array_equal(th.flat_params(resumed.state.params),
                                  th.flat_params(full.state.params))  # fmt: skip
    timing = ("tokens_per_second",)
    for a, b in zip(resumed.history, full.history[8:], strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }


REWARD_MODULE = '''
import numpy as np

def reward(prompts, completions, **kwargs):
    """1 for a completion with an 'e' in it."""
    return [float("e" in c) for c in completions]
'''


@pytest.mark.heavy  # two runs compile the sampler, scorers and step
def test_cli_grpo_trains_as_the_python_api(tmp_path, tokenizer, monkeypatch):
    """`dpo-jax train --config.objective.name=grpo --config.online.reward=python:MOD:FN`
    ends with the params of `train.train` given the same prompts and the same function
    through `reward_sources.from_spec`: bit-identical."""
    from dpo_jax import checkpoint, cli, configs, reward_sources, train
    from tests.hf_fixtures import make_tiny_hf_model

    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    policy = make_tiny_hf_model("llama", tmp_path / "policy", tokenizer=tokenizer)
    texts = ["How are you?", "Tell me about the sea.", "What is two plus two?", "Hello there,"]
    data_file = tmp_path / "prompts.jsonl"
    data_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    args = [
        "train", "--config", "dpo_jax/configs/tiny.py", "--config.objective.name=grpo",
        f"--config.model.path={policy}", f"--config.data.train={data_file}",
        "--config.online.reward=python:my_rewards:reward", f"--config.run_dir={tmp_path / 'cli'}",
        "--config.train.tensorboard=False", "--config.grad_accum_steps=1",
        "--config.online.num_rollouts=2", "--config.online.rollout_batch_size=8",
        "--config.online.samples_per_prompt=4", "--config.online.max_new_tokens=6",
        "--config.online.num_mini_batches=2", "--config.grpo.num_iterations=2",
        "--config.checkpoint.enabled=True", "--config.checkpoint.async_save=False",
    ]  # fmt: skip
    assert cli.main(args) == 0
    _, _, cli_params = checkpoint.load_params(tmp_path / "cli")
    _, overrides = configs.split_overrides(args)
    overrides = [(k, v) for k, v in overrides if k not in ("online.reward", "run_dir")]
    config = configs.load("dpo_jax/configs/tiny.py", overrides)
    config.run_dir = ""
    config.checkpoint.enabled = False
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(policy))
    prompts = [tok(t)["input_ids"][-16:] for t in texts]
    reward = reward_sources.from_spec("python:my_rewards:reward", tok)
    api = train.train(config, train_data=prompts, reward=reward)
    np.testing.assert_array_equal(th.flat_params(cli_params), th.flat_params(api.state.params))
    assert api.history[-1]["step"] == 2 * 2 * 2


@pytest.mark.heavy
def test_nan_policy_skip_applies_to_on_policy_steps():
    """A rollout whose reward is NaN makes non-finite updates: under nan_policy='skip'
    they are skipped and counted (the loop's rule, as for DPO), the params unchanged by
    them; under 'stop' the run stops naming the step."""
    from dpo_jax import train

    prompts = ppo_task._prompts()

    def reward(samples):
        out = ppo_task._reward(samples)
        return np.full_like(out, np.nan)

    cfg, params = th.tiny_model()
    config = _config("rloo", num_rollouts=1)
    config.train.nan_policy = "skip"
    result = train.train(config, train_data=prompts, reward=reward, model_config=cfg, params=params)
    assert result.history[-1]["skipped_steps"] == 2
    np.testing.assert_array_equal(th.flat_params(result.state.params), th.flat_params(params))
    config.train.nan_policy = "stop"
    with pytest.raises(train.NonFiniteLossError, match="step 1"):
        train.train(config, train_data=prompts, reward=reward, model_config=cfg, params=params)


def test_group_config_counts_steps():
    config = _config("grpo", num_iterations=3, num_mini_batches=2, num_rollouts=5)
    cfg = group_loop.GroupConfig.from_config(config)
    assert cfg.steps_per_rollout == 6 and cfg.num_steps == 30 and not cfg.on_policy


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--config.online.reward=python:no_such_module_xyz:fn"], "online.reward"),
        (["--config.online.reward=vader,python:os:getcwd"], "online.reward"),
        (["--config.online.reward=vader,vader", "--config.online.reward_weights=(1.0,)"],
         "online.reward_weights"),
        (["--config.online.reward=vader", "--config.grpo.loss_type=mean"], "grpo.loss_type"),
        (["--config.online.reward=vader", "--config.online.samples_per_prompt=1"],
         "online.samples_per_prompt"),
        (["--config.online.reward=vader", "--config.ppo.kl_coef=0.3",
          "--config.online.kl_coef=0.2"], None),  # the deprecated name, then the new: fine
    ],
)  # fmt: skip
def test_cli_bad_on_policy_settings_exit_2_in_one_line(tmp_path, capsys, flags, key):
    """Every bad spec or incompatible option of an on-policy run: exit 2 and one line
    naming the key, before any model loads."""
    from dpo_jax import cli

    data_file = tmp_path / "prompts.jsonl"
    data_file.write_text('{"prompt": "hi"}\n')
    argv = [
        "train", "--config", "dpo_jax/configs/tiny.py", "--config.objective.name=grpo",
        f"--config.model.path={tmp_path / 'model'}", f"--config.data.train={data_file}",
        f"--config.run_dir={tmp_path / 'run'}", "--config.online.samples_per_prompt=2",
        *flags,
    ]  # fmt: skip
    (tmp_path / "model").mkdir()  # a directory without a model: loading it would fail
    code = cli.console_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    if key is None:  # got past the on-policy settings: the empty model dir is what stops it
        assert "online" not in err[-1] and "model" in err[-1], err[-1]
        return
    assert err[-1].startswith(f"dpo-jax: error: config key '{key}'"), err[-1]


@pytest.mark.parametrize("method", ["ppo", "grpo", "rloo", "online_dpo"])
def test_lora_is_refused_by_every_on_policy_method(method):
    """Rollouts sample the full policy: LoRA is refused in one line, not half-applied."""
    from dpo_jax.configs import validate

    config = _config(method)
    config.lora.rank = 4
    with pytest.raises(UserError, match="'lora.rank'"):
        validate.validate(config)
