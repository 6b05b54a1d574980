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


def _phase_memory(text: str) -> dict[str, dict[str, int]]:
    """{phase: {field: bytes}} from a phase-graph dry run's printout."""
    out: dict[str, dict[str, int]] = {}
    phase = None
    for line in text.splitlines():
        m = re.match(r"phase (\w+): per-device memory", line)
        if m:
            phase = out.setdefault(m.group(1), {})
            continue
        m = re.match(r"^\s+(\w+)\s+[\d.]+ GiB\s+\(([\d,]+) bytes\)", line)
        if m and phase is not None:
            phase[m.group(1)] = int(m.group(2).replace(",", ""))
    return out


@pytest.mark.heavy  # ~25 s: three phases compiled for 8 simulated devices
def test_hh_dry_run_of_a_local_checkpoint_on_a_2x2x2_mesh(tmp_path):
    import transformers

    hf_dir = make_tiny_hf_model("gpt_neox", tmp_path / "neox", tokenizer=train_tokenizer())
    count = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).num_parameters()
    out = _dry_run(
        "experiments.hh", "--preset=pythia28", f"--config.model.path={hf_dir}",
        "--config.model.dtype=float32", "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2", "--config.batch_size=8", "--config.grad_accum_steps=2",
        "--config.sft.batch_size=8", "--config.reward_model.batch_size=8",
        "--config.data.max_prompt_length=16", "--config.data.max_completion_length=16",
        "--config.eval.max_new_tokens=16",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    memory = _phase_memory(out.stdout)
    # Every training phase of the graph, and nothing else, compiled its train step.
    assert set(memory) == {"preferred_ft", "dpo", "reward_model"}
    assert "phase eval_best_of_n: no training program" in out.stdout
    for fields in memory.values():
        assert {"argument_size", "temp_size", "peak_estimate"} <= set(fields)
        # Each device holds at least its 1/8 share of the fp32 params (plus optimizer state).
        assert fields["peak_estimate"] >= fields["argument_size"] >= 4 * count / 8
    # Preferred-FT's AdamW keeps two moments, DPO's RMSprop one (the paper's optimizers).
    assert memory["preferred_ft"]["argument_size"] > memory["dpo"]["argument_size"]


def test_tldr_dry_run_refuses_an_unknown_method_before_compiling():
    out = _dry_run("experiments.tldr", "--preset=pythia28", "--config.methods=('sft','rloo')")
    assert out.returncode != 0
    assert "config key 'methods': unknown method 'rloo'" in out.stderr


@pytest.mark.heavy  # 4 min on 2 loaded cores: five training programs on 8 devices
def test_tldr_dry_run_compiles_the_ppo_phase():
    out = _dry_run("experiments.tldr", "--preset=smoke", "--config.mesh.data=2",
                   "--config.mesh.fsdp=4")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    memory = _phase_memory(out.stdout)
    assert set(memory) == {"sft", "preferred_ft", "dpo", "reward_model", "ppo"}
    assert "phase eval_ppo: no training program" in out.stdout
    for fields in memory.values():
        assert fields["peak_estimate"] >= fields["argument_size"] > 0
