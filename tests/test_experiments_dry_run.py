"""experiments.dry_run: AOT compile of the real-scale train step on a simulated 8-device mesh.

The dry run runs in a subprocess because the simulated device count must be fixed before
JAX starts its backend (this pytest process may already have one CPU device).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.dry_run import BatchPlan
from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _dry_run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    return subprocess.run(
        [sys.executable, "-m", module, "--dry_run", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_dry_run_of_a_local_checkpoint_on_a_2x2x2_mesh(tmp_path):
    import transformers

    hf_dir = make_tiny_hf_model("gpt_neox", tmp_path / "neox", tokenizer=train_tokenizer())
    torch_count = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).num_parameters()
    out = _dry_run(
        "experiments.hh", "--preset=pythia28", f"--config.model.model_dir={hf_dir}",
        "--config.model.dtype=float32", "--config.train.mesh=(2,2,2)",
        "--config.train.batch_size=8", "--config.train.micro_batches=2",
        "--config.data.max_prompt_length=16", "--config.data.max_completion_length=16",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    count = int(re.search(r"parameters: ([\d,]+)", text).group(1).replace(",", ""))
    assert count == torch_count  # the abstract params are exactly the checkpoint's
    assert "mesh: {'data': 2, 'fsdp': 2, 'tensor': 2}" in text
    assert "8 pairs/step = 2 micro-batch(es) x 4 pairs (8 stacked rows x 32 tokens)" in text
    assert "2 rows per device per micro-batch over 4 data-parallel shards" in text
    memory = {
        k: int(v.replace(",", ""))
        for k, v in re.findall(r"^\s+(\w+)\s+[\d.]+ GiB\s+\(([\d,]+) bytes\)", text, re.M)
    }
    assert {"argument_size", "temp_size", "peak_estimate"} <= set(memory)
    # Each device holds at least its 1/8 share of the fp32 params (plus optimizer state).
    assert memory["peak_estimate"] >= memory["argument_size"] >= 4 * count / 8


def test_dry_run_refuses_a_batch_that_does_not_split_over_the_mesh(tmp_path):
    hf_dir = make_tiny_hf_model("gpt2", tmp_path / "gpt2", tokenizer=train_tokenizer())
    out = _dry_run(
        "experiments.tldr", "--preset=pythia28", f"--config.model.model_dir={hf_dir}",
        "--config.train.mesh=(8,1,1)", "--config.train.batch_size=6",
        "--config.train.micro_batches=1",
    )  # fmt: skip
    assert out.returncode != 0
    assert "12 rows per micro-batch do not split over 8 data-parallel devices" in out.stderr


def test_batch_plan_arithmetic():
    plan = BatchPlan(global_pairs=64, micro_batches=4, seq_len=100, data_parallel=8)
    assert (plan.pairs_per_micro, plan.rows_per_device, plan.tokens_per_step) == (16, 4, 12800)
    with pytest.raises(ValueError, match="do not split into 3 micro-batches"):
        BatchPlan(global_pairs=64, micro_batches=3, seq_len=100, data_parallel=8)
