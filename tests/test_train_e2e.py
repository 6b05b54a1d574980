"""End to end: a tiny DPO run learns held-out preferences; `dpo-jax train --config` runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dpo_jax import cli, train
from dpo_jax.configs import tiny
from dpo_jax.errors import UserError
from dpo_jax.metrics import read_jsonl
from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer
from tests.train_helpers import synthetic_batches, tiny_model

TRL_NAMES = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "tokens_per_second",
    "epoch", "step",
)  # fmt: skip


def test_dpo_raises_held_out_reward_accuracy():
    cfg, params = tiny_model()
    config = tiny.get_config()
    config.run_dir = ""
    config.num_steps = 24
    config.grad_accum_steps = 1
    config.optim.learning_rate = 3e-3
    config.train.eval_every = 8
    config.train.log_every = 8
    train_batches = synthetic_batches(num=24, pairs=8, seed=10)
    held_out = synthetic_batches(num=2, pairs=8, seed=999)  # unseen prompts and completions

    result = train.train(
        config, train_data=train_batches, eval_data=held_out, model_config=cfg, params=params
    )
    evals = result.eval_history
    assert [e["step"] for e in evals] == [8, 16, 24]
    # At step 0 the policy is the reference: every reward is 0 and the loss is log 2.
    assert evals[0]["eval/loss"] < math.log(2)
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"] > 0
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] < math.log(2)
    assert result.history[-1]["step"] == 24


@pytest.fixture(scope="module")
def tiny_run_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    tok = train_tokenizer()
    model_dir = make_tiny_hf_model("llama", root / "model", tokenizer=tok)
    rng = np.random.default_rng(0)
    good = ["fine", "good", "great", "happy", "thank you"]
    bad = ["no", "bad", "lazy", "dog", "fox"]

    def rows(n):
        return [
            {"prompt": f"Question {int(rng.integers(100))}: how are you?",
             "chosen": " I am " + str(rng.choice(good)) + ".",
             "rejected": " The " + str(rng.choice(bad)) + "."}
            for _ in range(n)
        ]  # fmt: skip

    for name, n in (("train", 16), ("eval", 4)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    return root, model_dir


def _cli_train(root, model_dir, run, *extra):
    args = [
        "train", "--config", "dpo_jax/configs/tiny.py",
        f"--config.model.path={model_dir}", f"--config.data.train={root / 'train.jsonl'}",
        f"--config.data.eval={root / 'eval.jsonl'}", f"--config.run_dir={root / run}",
        "--config.train.eval_every", "2", *extra,
    ]  # fmt: skip
    assert cli.main(args) == 0
    return read_jsonl(root / run / "metrics.jsonl")


# The tiny llama's parameters by hand (tests/hf_fixtures.py: V 384, D 64, 2 layers, 4
# heads of 16, 2 kv heads, MLP 96, untied): embed + layers + final norm + lm_head.
TINY_LLAMA_PARAMS = (
    384 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96 + 2 * 64) + 64 + 64 * 384
)


def test_cli_train_runs_end_to_end_and_writes_the_run_dir(tiny_run_files, capsys):
    root, model_dir = tiny_run_files
    rows = _cli_train(root, model_dir, "frozen", "--config.reference.mode=frozen")
    # the start-up summary (logged to stderr), its first-step line after step 1
    err = capsys.readouterr().err
    assert "dpo-jax run: objective preference, loss sigmoid, 4 steps" in err
    assert f"parameters   trainable {TINY_LLAMA_PARAMS:,}, frozen 0, " in err
    assert f"reference copy {TINY_LLAMA_PARAMS:,} (frozen)" in err
    assert "reference    frozen" in err and f"run dir      {root / 'frozen'}; " in err
    assert "first step: " in err and "compiled step: peak ~" in err
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for name in TRL_NAMES:
        assert name in train_rows[0], name
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert train_rows[0]["epoch"] == pytest.approx(0.25)  # 16 pairs, 4 pairs per update
    assert [r["step"] for r in eval_rows] == [2, 4]
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"} <= set(eval_rows[0])
    saved = json.loads((root / "frozen" / "config.json").read_text())
    assert saved["model"]["path"] == str(model_dir) and saved["train"]["eval_every"] == 2
    assert list((root / "frozen" / "tensorboard").glob("events.out.tfevents.*"))

    # The same run with reference log-probs precomputed in a first pass (cached in the
    # run dir) gives the same losses and rewards without any reference forward.
    cached = _cli_train(root, model_dir, "cache", "--config.reference.mode=cache")
    assert list((root / "cache").glob("ref_logps_*.npz"))
    cached_rows = [r for r in cached if "loss" in r]
    for a, b in zip(train_rows, cached_rows, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_cli_dry_run_prints_the_summary_compiles_and_writes_nothing(tiny_run_files, capsys):
    root, model_dir = tiny_run_files
    args = [
        "train", "--config", "dpo_jax/configs/tiny.py", f"--config.model.path={model_dir}",
        f"--config.data.train={root / 'train.jsonl'}", f"--config.run_dir={root / 'dry'}",
        "--config.lora.rank=4", "--dry_run",
    ]  # fmt: skip
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["dry_run"] and report["memory"]["peak_estimate"] > 0
    # LoRA rank 4 on every linear of the blocks: r (in + out) per kernel; the base is frozen, and its
    # adapters-off self is the reference (no copy)
    per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 96) * 2 + (96 + 64))
    adapters = 2 * per_layer  # (PEFT's all-linear leaves lm_head out)
    assert f"parameters   trainable {adapters:,}, frozen {TINY_LLAMA_PARAMS:,}\n" in err
    assert "reference    adapters_off" in err and "memory       peak ~" in err
    assert "tokens per step " in err
    assert not (root / "dry").exists()


def test_cli_rejects_unknown_config_key(tiny_run_files):
    root, model_dir = tiny_run_files
    with pytest.raises(UserError, match="'optim.leraning_rate': no such config key; did you mean"):
        cli.main(["train", "--config", "dpo_jax/configs/tiny.py", "--config.optim.leraning_rate=1"])
