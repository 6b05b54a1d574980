"""An experiment phase in two real JAX processes (jax.distributed on localhost, 2 CPU
devices each; each process feeds only its half of every batch) trains and evaluates like
one process: the sentiment smoke experiment's DPO phase, resumed from finished earlier
phases."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpo_jax.metrics import read_jsonl
from tests.test_train_multihost import _free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.heavy  # the smoke experiment's early phases + three processes compiling
def test_a_phase_in_two_processes_matches_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    base = tmp_path / "base"
    # The phases before the methods, once (no method: the report has only the SFT row).
    subprocess.run(
        [sys.executable, "-m", "experiments.sentiment", "--preset=smoke",
         f"--config.run_dir={base}", "--config.methods=()"],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    assert (base / "reference" / "DONE").exists()
    for tag in ("multi", "single"):
        shutil.copytree(base, tmp_path / tag)
    port = str(_free_port())
    cmd = [sys.executable, "-m", "tests.multihost_phase_run"]
    runs = [("0", "multi"), ("1", "multi"), ("-1", "single")]
    procs = [
        subprocess.Popen(cmd + [pid, port, str(tmp_path / tag)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid, tag in runs
    ]  # fmt: skip
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-4000:]
    phase = Path("methods") / "dpo_beta=0.1"
    multi = read_jsonl(tmp_path / "multi" / phase / "metrics.jsonl")
    single = read_jsonl(tmp_path / "single" / phase / "metrics.jsonl")
    assert [r["step"] for r in multi] == [r["step"] for r in single] == [1, 2, 2, 3, 4, 4]
    for m, s in zip(multi, single, strict=True):
        assert set(m) - {"tokens_per_second"} == set(s) - {"tokens_per_second"}
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            if key in s:
                np.testing.assert_allclose(m[key], s[key], rtol=1e-5, atol=1e-6, err_msg=key)
        if "eval/reward" in s:  # the eval_hook sampled the same completions
            assert m["eval/reward"] == pytest.approx(s["eval/reward"], abs=1e-9)
            assert m["eval/kl"] == pytest.approx(s["eval/kl"], abs=1e-5)
    assert (tmp_path / "multi" / phase / "DONE").exists()
    assert (tmp_path / "multi" / "results.csv").read_text().count("dpo:beta=0.1") == 3
