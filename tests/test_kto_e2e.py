"""KTO end to end: unpaired rows through `train(config)` learn held-out preferences.

Paired synthetic data (prompt, chosen, rejected) is turned into unpaired rows
(`prompt`, `completion`, `label`) with `data.paired_to_unpaired`, written as JSONL and
trained with `loss.name = "kto"` through the same config-driven machinery as DPO (the
loader forms the mismatched KL rows). The proof is on held-out PAIRS, scored by a code
path independent of the trainer: a plain forward of the policy and of the reference,
`logprobs.sequence_logps`, implicit reward beta * (log pi - log pi_ref), and
`evaluation.preference_metrics`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from dpo_jax import data, evaluation, logprobs, losses, models, train
from dpo_jax.configs import tiny
from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

BETA = 0.1
GOOD = ("fine", "good", "great", "happy")
BAD = ("bad", "lazy", "dog", "fox")
RATIO_WARNING = "outside the paper's recommended range"


def synthetic_pairs(n: int, seed: int) -> list[data.PreferenceExample]:
    """Pairs whose chosen answer says "I am <good word>" and rejected "I am <bad word>"."""
    rng = np.random.default_rng(seed)
    return [
        data.PreferenceExample(
            prompt=f"Question {int(rng.integers(1000))}: how are you?",
            chosen=f" I am {rng.choice(GOOD)}.",
            rejected=f" I am {rng.choice(BAD)}.",
        )
        for _ in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def unpaired_rows(pairs: list[data.PreferenceExample]) -> list[dict]:
    """The upstream unpaired format TRL's KTOTrainer reads: prompt, completion, label."""
    return [
        {"prompt": ex.prompt, "completion": ex.completion, "label": ex.label}
        for ex in data.paired_to_unpaired(pairs)
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto")
    tok = train_tokenizer()
    model_dir = make_tiny_hf_model("llama", root / "model", tokenizer=tok)
    train_pairs = synthetic_pairs(48, seed=1)
    held_out = synthetic_pairs(32, seed=2)
    train_file = write_jsonl(root / "train_unpaired.jsonl", unpaired_rows(train_pairs))
    held_out_file = write_jsonl(
        root / "held_out_pairs.jsonl",
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in held_out],
    )
    return root, model_dir, tok, train_file, held_out_file


def kto_config(root: Path, model_dir: Path, train_file: Path, run: str, **hyper):
    config = tiny.get_config("kto")
    config.model.path = str(model_dir)
    config.data.train = str(train_file)
    config.run_dir = str(root / run)
    config.train.tensorboard = False
    config.loss.hyper = dict(beta=BETA, desirable_weight=1.0, undesirable_weight=1.0, **hyper)
    return config


def pair_logps(model_cfg, params, batches) -> tuple[np.ndarray, np.ndarray]:
    """(chosen [P], rejected [P]) summed completion log-probs by a plain forward."""
    model = models.Transformer(model_cfg)
    apply = jax.jit(model.apply)
    chosen, rejected = [], []
    for batch in batches:
        n_seq = batch["input_ids"].shape[0]  # stacked layout: one row per sequence
        logits = apply(
            {"params": params},
            batch["input_ids"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
        )
        seq = np.asarray(logprobs.sequence_logps(logits, batch, n_seq).logps_S)
        chosen.append(seq[: n_seq // 2])
        rejected.append(seq[n_seq // 2 :])
    return np.concatenate(chosen), np.concatenate(rejected)


def held_out_metrics(files, policy_params, policy_cfg=None) -> dict[str, float]:
    root, model_dir, tok, _, held_out_file = files
    model_cfg, ref_params = models.load_hf(model_dir, dtype="float32")
    policy_cfg = policy_cfg or model_cfg  # trained params are laid out for the run's config
    spec = dict(path=str(held_out_file), max_length=32, max_prompt_length=16, cache_dir="")
    pairs = data.load_preference_data(spec, tok, unpaired=False)
    batches = data.eval_batches(pairs, 8, pad_id=tok.pad_token_id)
    pc, pr = pair_logps(policy_cfg, policy_params, batches)
    rc, rr = pair_logps(model_cfg, ref_params, batches)
    assert pc.shape == (len(pairs),)
    return evaluation.preference_metrics(pc, pr, rc, rr, BETA)


@pytest.mark.heavy
def test_kto_on_unpaired_rows_raises_held_out_pair_accuracy(files):
    root, model_dir, tok, train_file, _ = files
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    # paired_to_unpaired: one desirable and one undesirable row per pair, in that order.
    assert len(rows) == 96 and [r["label"] for r in rows[:4]] == [True, False, True, False]

    config = kto_config(root, model_dir, train_file, "kto")
    config.batch_size = 8
    config.grad_accum_steps = 1
    config.num_steps = 16
    config.optim.learning_rate = 3e-3
    config.train.log_every = 4
    result = train.train(config)

    first, second, last = result.history[0], result.history[1], result.history[-1]
    assert [row["step"] for row in result.history] == list(range(1, 17))
    # Step 1 scores the initial policy, which IS the reference: every log-ratio and z0
    # is 0, so each example's loss is weight * (1 - sigmoid(0)) = 0.5 by hand.
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/accuracies"] == 0.0  # zero rewards count as wrong, as in TRL
    # One update later the labels have acted: desirable rewards up, undesirable down.
    assert second["rewards/chosen"] > 0 > second["rewards/rejected"]
    assert last["loss"] < 0.3

    before = held_out_metrics(files, models.load_hf(model_dir, dtype="float32")[1])
    after = held_out_metrics(
        files, jax.device_get(result.state.params), result.trainer.model_config
    )
    # Untrained: policy == reference, every margin is exactly 0 (ties count as wrong).
    assert before["rewards/accuracies"] == 0.0 and before["rewards/margins"] == 0.0
    assert after["num_pairs"] == 32
    assert after["rewards/accuracies"] >= 0.9  # chance is 0.5
    margin, stderr = after["rewards/margins"], after["rewards/margins_stderr"]
    assert margin > 3 * stderr > 0  # clearly separated, not noise
    # KTO raises desirable and lowers undesirable completions in absolute terms.
    assert after["rewards/chosen"] > 0 > after["rewards/rejected"]


def test_kto_ratio_warning_fires_outside_one_to_four_thirds():
    rows = data.paired_to_unpaired(synthetic_pairs(12, seed=3))
    n_d = sum(ex.label for ex in rows)
    n_u = len(rows) - n_d
    assert n_d == n_u == 12

    def silent(*args) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning fails the test
            return losses.check_kto_weights(*args)

    # Balanced data from pairs: the ratio is just desirable_weight / undesirable_weight.
    assert silent(1.0, 1.0, n_d, n_u) == pytest.approx(1.0)
    assert silent(1.3, 1.0, n_d, n_u) == pytest.approx(1.3)
    for lam_d, lam_u, ratio in ((2.0, 1.0, 2.0), (1.0, 1.5, 1 / 1.5), (1.4, 1.0, 1.4)):
        with pytest.warns(UserWarning, match=RATIO_WARNING):
            got = losses.check_kto_weights(lam_d, lam_u, n_d, n_u)
        assert got == pytest.approx(ratio)

    # Drop half the undesirable rows: 12 vs 6 is ratio 2 at equal weights, and the
    # paper's fix (raise undesirable_weight) brings it back to 12 / (1.6 * 6) = 1.25.
    kept = [ex for i, ex in enumerate(rows) if ex.label or i % 4 == 1]
    n_u = len(kept) - n_d
    assert n_u == 6
    with pytest.warns(UserWarning, match=RATIO_WARNING):
        assert losses.check_kto_weights(1.0, 1.0, n_d, n_u) == pytest.approx(2.0)
    assert silent(1.0, 1.6, n_d, n_u) == pytest.approx(1.25)
    with pytest.warns(UserWarning, match="undefined"):
        assert math.isnan(losses.check_kto_weights(1.0, 1.0, n_d, 0))


def test_train_warns_when_kto_weights_are_outside_the_range(files):
    root, model_dir, tok, train_file, _ = files
    config = kto_config(root, model_dir, train_file, "kto_warn")
    config.loss.hyper.desirable_weight = 2.0  # balanced data: ratio 2 > 4/3
    config.num_steps = 1
    config.grad_accum_steps = 1
    with pytest.warns(UserWarning, match=RATIO_WARNING):
        train.train(config)
