"""experiments.sentiment from a local Hugging Face checkpoint + tokenizer (the real
configs' path: models.load_hf, SFT fine-tuning of a checkpoint, a non-synthetic tokenizer)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from dpo_jax.metrics import read_jsonl
from experiments import driver, sentiment


@pytest.mark.heavy
def test_smoke_from_a_local_hf_checkpoint_and_tokenizer(tmp_path):
    """The real-config path: policy and tokenizer from a local HF directory (load_hf),
    SFT fine-tunes it, and the SFT policy's KL against itself is ~0 (sampler vs forward)."""
    from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

    hf_dir = make_tiny_hf_model("gpt2", tmp_path / "gpt2", tokenizer=train_tokenizer())
    config = sentiment.get_config("smoke")
    config.run_dir = str(tmp_path / "run")
    config.model.path = str(hf_dir)
    config.tokenizer = str(hf_dir)
    config.methods = ("dpo:beta=0.1",)
    config.batch_size = 4  # the tiny checkpoint's samples tie often: few pairs
    run_dir, _ = driver.run(config, sentiment.EXPERIMENT)
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["sft", "dpo:beta=0.1", "dpo:beta=0.1", "dpo:beta=0.1"]
    assert abs(float(rows[0]["kl"])) < 1e-3
    assert all(np.isfinite(float(r["reward"])) and np.isfinite(float(r["kl"])) for r in rows)
    assert read_jsonl(run_dir / "sft" / "metrics.jsonl")[-1]["step"] == config.sft.num_steps
