"""The same 6-step DPO run in TRL 1.16's `DPOTrainer` and in dpo_jax: losses agree to
1e-4 relative, and TRL's other metrics agree too.

Covers a separate reference model (TRL `ref_model`, here `reference.path`), a
precomputed reference (TRL `precompute_ref_log_probs=True`, here `dpo-jax ref-logps
--config` then training on its column) and TRL's default truncation (keep_start; the
sequences are longer than `max_length`, so truncation is active). Everything is offline
on CPU: tiny random Llama checkpoints and a locally trained tokenizer. Needs `trl` (the
`bench` extra); heavy (about a minute per case).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import compare_curves
from dpo_jax import cli, train
from dpo_jax.configs import default
from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

trl = pytest.importorskip("trl")
pytestmark = [
    pytest.mark.heavy,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

STEPS, PAIRS, MAX_LENGTH, LR, BETA = 6, 2, 32, 1e-3, 0.1
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "waves",
    "fold",
    "into",
    "foam",
]


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS, size=k))

    # prompts well under MAX_LENGTH tokens, prompt + completion well over it
    return [
        {"prompt": f"Question {i}: " + text(4) + "?", "chosen": " " + text(30),
         "rejected": " No, " + text(25)}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vs_trl")
    tok = train_tokenizer()
    policy = make_tiny_hf_model("llama", root / "policy", tokenizer=tok, seed=0)
    ref = make_tiny_hf_model("llama", root / "ref", tokenizer=tok, seed=1)
    rows = _rows(STEPS * PAIRS)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = [len(tok(r["prompt"] + r["chosen"])["input_ids"]) for r in rows]
    assert min(lengths) > MAX_LENGTH  # truncation is active on every chosen sequence
    return root, tok, policy, ref, rows


def _trl_run(setup, precompute: bool) -> list[dict]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    root, tok, policy, ref, rows = setup
    torch.manual_seed(0)

    class Logs(TrainerCallback):
        def __init__(self) -> None:
            self.rows: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.rows.append(dict(logs, step=state.global_step))

    logs = Logs()
    config = DPOConfig(
        output_dir=str(root / f"trl_{precompute}"), per_device_train_batch_size=PAIRS,
        max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant", beta=BETA,
        max_length=MAX_LENGTH, use_cpu=True, logging_steps=1, save_strategy="no",
        report_to="none", dataloader_num_workers=0, disable_tqdm=True, seed=0,
        train_sampling_strategy="sequential", precompute_ref_log_probs=precompute,
        bf16=False,  # TRL defaults to bf16 autocast; the project run is float32
    )  # fmt: skip
    ref_model = AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32)
    trainer = DPOTrainer(
        model=str(policy), ref_model=ref_model, args=config,
        train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, callbacks=[logs],
    )  # fmt: skip
    trainer.train()
    assert len(logs.rows) == STEPS
    return logs.rows


def _ours_config(setup, data_path):
    root, _, policy, ref, _ = setup
    c = default.get_config()
    c.model.path, c.reference.path = str(policy), str(ref)
    c.model.dtype = "float32"
    c.data.train = str(data_path)
    c.data.max_length = MAX_LENGTH  # truncation_mode stays TRL's default, keep_start
    c.data.shuffle = False
    c.batch_size, c.grad_accum_steps, c.num_steps = PAIRS, 1, STEPS
    c.optim.learning_rate, c.optim.schedule = LR, "constant"
    c.loss.hyper.beta = BETA
    c.train.log_every, c.train.progress, c.train.tensorboard = 1, False, False
    c.run_dir = ""
    return c


def _assert_same_run(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4, err_msg=f"loss, step {step}")
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                    "logps/rejected", "logits/chosen", "logits/rejected", "entropy"):  # fmt: skip
            np.testing.assert_allclose(
                a[key], b[key], rtol=1e-3, atol=1e-5, err_msg=f"{key}, step {step}"
            )
        assert a["rewards/accuracies"] == pytest.approx(b["rewards/accuracies"])
        assert a["mean_token_accuracy"] == pytest.approx(b["mean_token_accuracy"], abs=1e-6)
        assert a["num_tokens"] == b["num_tokens"], step
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-3, err_msg=str(step))


def test_separate_reference_model_matches_trl(setup):
    root = setup[0]
    config = _ours_config(setup, root / "train.jsonl")
    config.run_dir = str(root / "jax")
    ours = train.train(config).history
    theirs = _trl_run(setup, precompute=False)
    _assert_same_run(ours, theirs)
    # docs/FROM_TRL.md's command on the two logs
    (root / "trl_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in theirs))
    argv = [str(root / "trl_log.jsonl"), str(root / "jax" / "metrics.jsonl"), "--keys", "loss"]
    assert compare_curves.main(argv) == 0
    assert compare_curves.main([*argv[:2], "--keys", "loss", "--rtol", "1e-9"]) == 1


def test_precomputed_reference_matches_trl(setup):
    root, _, policy, ref, _ = setup
    out = root / "train_ref.jsonl"
    args = [
        "ref-logps", "--output", str(out), f"--config.model.path={policy}",
        f"--config.reference.path={ref}", f"--config.data.train={root / 'train.jsonl'}",
        f"--config.data.max_length={MAX_LENGTH}", "--config.model.dtype=float32",  # as TRL's
    ]  # fmt: skip
    assert cli.main(args) == 0
    result = train.train(_ours_config(setup, out))
    assert result.trainer.step_config.reference == "precomputed"
    _assert_same_run(result.history, _trl_run(setup, precompute=True))
