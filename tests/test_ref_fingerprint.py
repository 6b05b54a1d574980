"""`dpo-jax ref-logps --config`: the precomputed column scores the tokens training scores
(truncation active, conversational rows auto-detected), and training refuses a column
computed with other settings, naming what differs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpo_jax import cli, train
from dpo_jax.configs import tiny
from dpo_jax.errors import UserError
from dpo_jax.ref_fingerprint import FINGERPRINT_COLUMN
from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

LONG = " The waves fold into foam and the quick brown fox jumps over the lazy dog again."
ROWS = [
    {"prompt": "Hello world!", "chosen": " How are you today?" + LONG, "rejected": " No." + LONG},
    {"prompt": "The sky is", "chosen": " blue," + LONG, "rejected": " green, I think." + LONG},
    {"prompt": "Two plus two", "chosen": " is four." + LONG, "rejected": " is five!" + LONG},
    {"prompt": "A fox", "chosen": " jumps." + LONG, "rejected": " sleeps all day long." + LONG},
]
CHAT = [
    {
        "prompt": [{"role": "user", "content": f"Name colour number {i}."}],
        "chosen": [{"role": "assistant", "content": "Blue, like the sea." + LONG}],
        "rejected": [{"role": "assistant", "content": f"Seven {i} is no colour." + LONG}],
    }
    for i in range(4)
]
MAX_LENGTH = 16  # far below the rows' lengths: truncation cuts every completion
CHAT_MAX_LENGTH = 40  # chat prompts are ~33 tokens


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    tok = train_tokenizer(chat_template=True)
    policy = make_tiny_hf_model("llama", root / "policy", tokenizer=tok, seed=0)
    ref = make_tiny_hf_model("llama", root / "ref", tokenizer=tok, seed=1)
    train_tokenizer().save_pretrained(str(root / "tok_plain"))  # no chat template
    for name, rows in (("plain", ROWS), ("chat", CHAT)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, policy, ref


def _overrides(root, policy, ref, data, **extra):
    kw = {
        "model.path": policy, "reference.path": ref, "data.train": root / f"{data}.jsonl",
        "data.max_length": CHAT_MAX_LENGTH if data == "chat" else MAX_LENGTH,
        "data.max_prompt_length": None, "data.shuffle": False,
        "batch_size": 4, "grad_accum_steps": 1, "num_steps": 2, "train.tensorboard": False,
    }  # fmt: skip
    kw.update(extra)
    return kw


def _config(**kw):
    c = tiny.get_config()
    for key, value in kw.items():
        node = c
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = str(value) if hasattr(value, "is_dir") else value
    return c


def _ref_logps(root, out, **kw):
    args = ["ref-logps", "--config", "dpo_jax/configs/tiny.py", "--output", str(out)]
    args += [f"--config.{k}={v}" for k, v in kw.items()]
    assert cli.main(args) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def plain_ref(files):
    """The plain rows with their reference columns, written once by `ref-logps --config`."""
    root, policy, ref = files
    out = root / "plain_ref.jsonl"
    return out, _ref_logps(root, out, **_overrides(root, policy, ref, "plain"))


@pytest.mark.parametrize("data", ["plain", pytest.param("chat", marks=pytest.mark.heavy)])
def test_precomputed_column_equals_frozen_reference_under_truncation(files, plain_ref, data):
    root, policy, ref = files
    out = root / f"{data}_ref.jsonl"
    rows = (
        plain_ref[1]
        if data == "plain"
        else _ref_logps(root, out, **_overrides(root, policy, ref, data))
    )
    assert rows[0][FINGERPRINT_COLUMN]["format"] == (
        "conversational" if data == "chat" else "explicit"
    )
    assert rows[0][FINGERPRINT_COLUMN]["truncation_mode"] == "keep_start"
    frozen = train.train(
        _config(**_overrides(root, policy, ref, data, **{"reference.mode": "frozen"}), run_dir="")
    )
    pre = train.train(
        _config(**_overrides(root, policy, ref, data, **{"data.train": out}), run_dir="")
    )
    assert pre.trainer.step_config.reference == "precomputed"
    for a, b in zip(frozen.history, pre.history, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"data.max_length": MAX_LENGTH + 4}, "max_length=16 (this run: 20)"),
        (
            {"data.truncation_mode": "keep_end"},
            "truncation_mode='keep_start' (this run: 'keep_end')",
        ),
        ({"tokenizer": "PLAIN_TOK"}, "tokenizer="),
        ({"reference.path": "POLICY"}, "model="),
    ],
)
def test_training_refuses_a_column_computed_otherwise(files, plain_ref, change, named):
    root, policy, ref = files
    out = plain_ref[0]
    named_paths = {"POLICY": policy, "PLAIN_TOK": root / "tok_plain"}
    change = {k: named_paths.get(v, v) for k, v in change.items()}
    cfg = _config(
        **_overrides(root, policy, ref, "plain", **{"data.train": out, **change}), run_dir=""
    )
    with pytest.raises(UserError, match=rf"plain_ref\.jsonl:1: .*{_re(named)}"):
        train.train(cfg)


def _re(text):
    import re

    return re.escape(text)


def test_column_without_fingerprint_needs_trust(files, plain_ref):
    root, policy, ref = files
    rows = plain_ref[1]
    bare = root / "bare.jsonl"
    bare.write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k != FINGERPRINT_COLUMN}) + "\n" for r in rows
        )
    )
    kw = _overrides(root, policy, ref, "plain", **{"data.train": bare, "num_steps": 1})
    with pytest.raises(UserError, match=r"bare\.jsonl:1: .*without a 'ref_logps_fingerprint'"):
        train.train(_config(**kw, run_dir=""))
    result = train.train(_config(**kw, run_dir="", **{"reference.trust_precomputed": True}))
    assert result.trainer.step_config.reference == "precomputed"


def test_short_flags_auto_detect_conversational_rows(files):
    """`--model/--data` alone (no --config, no --format): rows are detected as `train` does."""
    root, policy, _ = files
    out = root / "chat_flags.jsonl"
    args = ["ref-logps", "--model", str(policy), "--data", str(root / "chat.jsonl"),
            "--output", str(out), "--batch-size", "4"]  # fmt: skip
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(CHAT)
    fp = rows[0][FINGERPRINT_COLUMN]
    assert fp["format"] == "conversational" and fp["max_length"] == 1024  # train's defaults
    assert fp["truncation_mode"] == "keep_start" and fp["chat_template"] is not None
    assert all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 for r in rows)
