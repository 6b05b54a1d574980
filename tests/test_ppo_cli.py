"""PPO from the command line: `dpo-jax train --config.objective.name=ppo` with the prompts
of a data file (`data.load_prompts`) and a reward spec (`ppo.reward`), and the mistakes it
reports in one line (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpo_jax import cli, data, reward_model, reward_sources, rewards
from dpo_jax.errors import UserError
from tests import train_helpers as th
from tests.hf_fixtures import make_tiny_hf_model

PROMPTS = ["How are you?", "Tell me about the sea.", "What is two plus two?", "Hello there,"]


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """A tiny policy, an exported reward model (HF dir + head.npz) with the same tokenizer,
    and a preference file: each prompt in two pairs (the pool keeps it once)."""
    root = tmp_path_factory.mktemp("ppo_cli")
    policy = make_tiny_hf_model("llama", root / "policy", tokenizer=tokenizer)
    rm = make_tiny_hf_model("llama", root / "rm", tokenizer=tokenizer, seed=1)
    rng = np.random.default_rng(0)
    np.savez(rm / reward_model.HEAD_FILE, kernel=rng.normal(size=64).astype(np.float32),
             bias=np.float32(0.5))  # fmt: skip
    rows = [
        {"prompt": p, "chosen": f" fine {k}", "rejected": f" bad {k}"}
        for k in range(2)
        for p in PROMPTS
    ]
    return root, policy, rm, _write_jsonl(root / "pairs.jsonl", rows)


def _args(policy, train, reward, run_dir, *extra):
    return [
        "train", "--config", "dpo_jax/configs/tiny.py", "--config.objective.name=ppo",
        f"--config.model.path={policy}", f"--config.data.train={train}",
        f"--config.ppo.reward={reward}", f"--config.run_dir={run_dir}",
        "--config.train.tensorboard=False", "--config.grad_accum_steps=1",
        "--config.ppo.num_rollouts=2", "--config.ppo.rollout_batch_size=8",
        "--config.ppo.samples_per_prompt=2", "--config.ppo.max_new_tokens=4",
        "--config.ppo.num_epochs=1", "--config.ppo.num_mini_batches=2",
        "--config.checkpoint.enabled=True", "--config.checkpoint.async_save=False",
        *extra,
    ]  # fmt: skip


@pytest.mark.heavy  # two PPO runs compile the sampler, scorers and step: ~80 s on 2 busy cores
def test_cli_ppo_trains_as_the_python_api(files, tmp_path):
    """The CLI run (prompts read from the preference rows, `reward_model:DIR`) ends with the
    params of `train.train` given the same prompts tokenized by hand and the same reward
    model built by hand: bit-identical, with the same per-rollout scores."""
    from dpo_jax import checkpoint, configs, models, objectives, train
    from dpo_jax.metrics import read_jsonl

    root, policy, rm, pairs = files
    args = _args(policy, pairs, f"reward_model:{rm}", tmp_path / "cli")
    assert cli.main(args) == 0
    logged = read_jsonl(tmp_path / "cli" / "metrics.jsonl")
    _, _, cli_params = checkpoint.load_params(tmp_path / "cli")

    # The same run through the Python API: prompts tokenized here (as the data pipeline
    # tokenizes a prompt: special tokens added; tiny.py keeps the last 16 tokens), the
    # reward model loaded here, scored on the sampled ids (it shares the tokenizer).
    _, overrides = configs.split_overrides(args)
    overrides = [(k, v) for k, v in overrides if k not in ("ppo.reward", "run_dir")]
    config = configs.load("dpo_jax/configs/tiny.py", overrides)
    config.run_dir = ""
    config.checkpoint.enabled = False
    # the tokenizer the CLI reads, from the policy's directory (tests/test_isolation.py:
    # an earlier test's padded call once made the two runs score differently)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(policy))
    prompts = [tokenizer(p)["input_ids"][-16:] for p in PROMPTS]
    rm_cfg, rm_params = models.load_hf(rm)
    with np.load(rm / reward_model.HEAD_FILE) as npz:
        head = {"kernel": npz["kernel"], "bias": npz["bias"]}
    learned = reward_model.LearnedReward(
        rm_cfg, {objectives.MODEL: rm_params, objectives.HEAD: head}, tokenizer
    )
    api = train.train(config, train_data=prompts, reward=reward_sources.reward_from_ids(learned))
    rollout_of = [r["rollout"] for r in logged]  # a row per step, 2 updates per rollout
    assert rollout_of == [1, 1, 2, 2] == [r["rollout"] for r in api.history]
    for a, b in zip(logged, api.history, strict=True):
        assert a["objective/scores"] == b["objective/scores"]
        assert a["loss"] == b["loss"]
    assert len({r["objective/scores"] for r in logged}) == 2  # the reward is not constant
    assert logged[-1]["objective/kl"] != 0.0  # the first rollout's updates moved the policy
    np.testing.assert_array_equal(th.flat_params(cli_params), th.flat_params(api.state.params))


def test_load_prompts_reads_every_kind_once(tmp_path, tokenizer):
    """Prompt-only rows (strings or messages) and the prompts of pairs, each once, in file
    order, tokenized as the data pipeline tokenizes prompts."""
    chat = [{"role": "user", "content": "Hi!"}]
    only = _write_jsonl(tmp_path / "prompts.jsonl",
                        [{"prompt": "How are you?", "id": 1}, {"prompt": chat},
                         {"prompt": "How are you?"}])  # fmt: skip
    got = data.load_prompts({"train": only}, tokenizer, split="train")
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert got == [
        tokenizer("How are you?")["input_ids"],
        tokenizer(rendered, add_special_tokens=False)["input_ids"],
    ]
    rows = [{"prompt": p, "chosen": " a", "rejected": " b"} for p in ("x y z", "u v", "x y z")]
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    got = data.load_prompts({"train": pairs, "max_prompt_length": 2}, tokenizer, split="train")
    assert got == [tokenizer(p)["input_ids"][-2:] for p in ("x y z", "u v")]


def test_prompt_rows_errors_name_file_and_line(tmp_path, tokenizer):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": 3}])
    with pytest.raises(UserError, match=r"bad\.jsonl:2: .*'prompt' must be a string"):
        data.load_prompts({"train": bad}, tokenizer, split="train")
    text = _write_jsonl(tmp_path / "text.jsonl", [{"text": "a whole document"}])
    with pytest.raises(UserError, match=r"text\.jsonl:1: the row has no prompt"):
        data.load_prompts({"train": text}, tokenizer, split="train")
    # prompt-only rows train nothing but PPO
    good = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "ok"}])
    with pytest.raises(UserError, match=r"good\.jsonl:1: prompt-only rows .*'ppo'"):
        data.load_preference_data({"train": good}, tokenizer, split="train")


def test_reward_specs_score_prompt_and_completion(tmp_path, tokenizer):
    """`vader` and `hf:DIR` score the decoded prompt + completion: the numbers of the
    reward functions themselves on those texts."""
    import transformers as tf

    clf = tf.LlamaForSequenceClassification(
        tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=2,
                       pad_token_id=tokenizer.pad_token_id)
    )  # fmt: skip
    clf.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    prompts = [tokenizer(p)["input_ids"] for p in ("I love it.", "This is awful")]
    comps = [tokenizer(c)["input_ids"] for c in (" Great!", " and bad.")]
    samples = th.sample_output(prompts, comps)
    texts = ["I love it. Great!", "This is awful and bad."]
    vader = reward_sources.from_spec("vader", tokenizer)(samples)
    np.testing.assert_array_equal(vader, rewards.VaderReward()(texts))
    assert vader[0] > 0.5 > -0.5 > vader[1]
    hf = reward_sources.from_spec(f"hf:{tmp_path / 'clf'}", tokenizer)(samples)
    want = rewards.HFClassifierReward(str(tmp_path / "clf"), label=1, score="prob")(texts)
    np.testing.assert_array_equal(hf, want)


@pytest.mark.parametrize(
    ("reward", "match"),
    [
        ("nonsense", "'online.reward': 'nonsense' is not a reward"),
        ("hf:", "'online.reward': 'hf:' is not a reward"),
        ("hf:/no/such/dir", "'online.reward': '/no/such/dir' does not exist"),
        ("hf:{policy}", "'online.reward': '{policy}' is not a sequence classifier"),
        ("reward_model:{policy}", "'online.reward': '{policy}' is not a sequence classifier"),
        ("", "'online.reward': is empty"),
    ],
)
def test_cli_ppo_mistakes_exit_2_naming_the_key(files, tmp_path, capsys, reward, match):
    _, policy, _, pairs = files
    argv = _args(policy, pairs, reward.format(policy=policy), tmp_path / "run")
    assert cli.console_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any log lines
    assert err.startswith("dpo-jax: error: config key 'online.reward': ")
    assert match.format(policy=policy) in err


def test_cli_ppo_bad_prompt_row_exits_2_with_file_and_line(files, tmp_path, capsys):
    _, policy, rm, _ = files
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": ""}])
    assert cli.console_main(_args(policy, bad, f"reward_model:{rm}", tmp_path / "r")) == 2
    assert "bad.jsonl:2: empty prompt" in capsys.readouterr().err
