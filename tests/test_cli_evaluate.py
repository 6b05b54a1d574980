"""`dpo-jax evaluate`: held-out preference metrics and the reward of saved samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpo_jax import cli, data, evaluation, rewards, sampling, saved_models
from dpo_jax.configs import default
from tests.hf_fixtures import make_tiny_hf_model


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("evaluate")
    policy = make_tiny_hf_model("llama", root / "policy", tokenizer=tokenizer, seed=1)
    ref = make_tiny_hf_model("llama", root / "ref", tokenizer=tokenizer, seed=2)
    pairs = [
        {"prompt": f"Question {i}:", "chosen": " a fine answer" * (1 + i % 3), "rejected": " no"}
        for i in range(6)
    ]
    return root, str(policy), str(ref), _write(root / "pairs.jsonl", pairs)


def _evaluate(capsys, *argv: str) -> dict:
    assert cli.console_main(["evaluate", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_preference_metrics_and_sample_rewards(models, capsys, tmp_path):
    """Against a second path (the library's own evaluate_preferences over eval batches,
    beta the sigmoid loss's default 0.1) and exact values (a policy against itself)."""
    root, policy, ref, pairs = models
    got = _evaluate(
        capsys, "--model", policy, "--reference", ref, "--data", pairs, "--batch-size", "4"
    )
    cfg, pol_params, tok = saved_models.load_model(policy)
    _, ref_params, _ = saved_models.load_model(ref)
    config = default.get_config()
    tokenized = data.load_preference_data(data.spec_from_config(config, pairs, paired=True), tok)
    batches = data.eval_batches(tokenized, 4, pad_id=sampling.pad_id(tok))
    want = evaluation.evaluate_preferences(cfg, pol_params, batches, 0.1, ref_params=ref_params)
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/rejected"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert got["num_pairs"] == 6
    same = _evaluate(capsys, "--model", policy, "--reference", policy, "--data", pairs)
    assert same["rewards/margins"] == 0.0 and same["rewards/accuracies"] == 0.0  # ties are wrong

    samples = [
        {"prompt_index": i, "sample_index": 0, "prompt": "The film", "completion": c}
        for i, c in enumerate([" was wonderful and great.", " was awful.", " was a film."])
    ]
    base = [dict(s, completion=" was a film.") for s in samples]
    s_path, b_path = _write(tmp_path / "s.jsonl", samples), _write(tmp_path / "b.jsonl", base)
    out = _evaluate(
        capsys, "--model", policy, "--samples", s_path, "--baseline", b_path, "--reward", "vader"
    )
    scores = rewards.VaderReward()([s["prompt"] + s["completion"] for s in samples])
    base_scores = rewards.VaderReward()([s["prompt"] + s["completion"] for s in base])
    assert out["reward"] == pytest.approx(float(np.mean(scores)), abs=1e-6)
    wins = np.where(scores > base_scores, 1.0, np.where(scores < base_scores, 0.0, 0.5))
    assert out["win_rate"] == pytest.approx(float(wins.mean()), abs=1e-6)
    assert wins.tolist() == [1.0, 0.0, 0.5]


def test_mistakes_are_one_line_exit_2(models, capsys, tmp_path):
    root, policy, _, pairs = models
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n', encoding="utf-8")
    cases = [
        ([], "nothing to evaluate"),
        (["--samples", str(bad)], "--samples and --reward go together"),
        (
            ["--samples", str(bad), "--reward", "vader"],
            "bad.jsonl:1: not a `dpo-jax sample` record",
        ),
        (["--samples", str(bad), "--reward", "nonsense"], "'--reward'"),
    ]
    for extra, message in cases:
        assert cli.console_main(["evaluate", "--model", policy, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dpo-jax: error: ") and message in err and "\n" not in err, err
