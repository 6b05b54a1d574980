"""The PPO phase in two real JAX processes (jax.distributed on localhost, 2 CPU devices
each) trains like one process on the same 4 devices and mesh: the same episodes, split
across the hosts (`online.rollout_batch_size` counts all hosts together), the same updates;
and the checkpoint the two processes write mid-run resumes (tests/ppo_multihost_run.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpo_jax.metrics import read_jsonl
from tests.test_train_multihost import _free_port

ROOT = Path(__file__).resolve().parents[1]


def _launch(
    runs: list[tuple[str, str]], out: Path, timeout: int = 900, objective: str = "ppo"
) -> None:
    """Start one `tests.ppo_multihost_run` process per (process id, stop_after), wait."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    port = str(_free_port())
    cmd = [sys.executable, "-m", "tests.ppo_multihost_run"]
    procs = [
        subprocess.Popen(cmd + [pid, port, str(out), stop, objective], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid, stop in runs
    ]  # fmt: skip
    for p in procs:
        text, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, text[-4000:]


@pytest.mark.heavy  # five processes compile the sampler, the scorer and the step
def test_ppo_in_two_processes_matches_one_and_resumes(tmp_path):
    # Two processes stop after rollout 2 (checkpointed); the single process runs all 3.
    _launch([("0", "2"), ("1", "2"), ("-1", "0")], tmp_path)
    first = [json.loads((tmp_path / f"multi_host{h}.json").read_text()) for h in (0, 1)]
    # Rollouts split across hosts: of each rollout's 32 episodes every host scored 16,
    # and fed 4 of every micro-batch's 8 rows to each step ([A=2, 4] per host).
    for calls in first:
        assert calls["reward_episodes"] == [16, 16]
        assert calls["step_rows"] == [[2, 4]] * (2 * 2 * 2)
    single_calls = json.loads((tmp_path / "single_host0.json").read_text())
    assert single_calls["reward_episodes"] == [32] * 3
    assert single_calls["step_rows"] == [[2, 8]] * (3 * 2 * 2)

    # The same two processes again: they resume from rollout 2's checkpoint.
    _launch([("0", "0"), ("1", "0")], tmp_path)
    resumed = json.loads((tmp_path / "multi.json").read_text())
    single = json.loads((tmp_path / "single.json").read_text())
    # A row per optimizer step: 2 epochs x 2 mini-batches = 4 per rollout.
    assert [r["rollout"] for r in resumed] == [3] * 4
    logged = read_jsonl(tmp_path / "run" / "metrics.jsonl")  # both launches' rows
    rollout_of = [1] * 4 + [2] * 4 + [3] * 4
    assert [r["rollout"] for r in logged] == rollout_of == [r["rollout"] for r in single]
    assert [r["step"] for r in logged] == list(range(1, 3 * 2 * 2 + 1))  # rollouts x epochs x mini
    assert [r["step"] for r in single] == list(range(1, 3 * 2 * 2 + 1))
    for m, s in zip(logged, single, strict=True):
        # The same samples, rewards and KL controller (the rollouts are bit-identical
        # functions of the same params; no reduction crosses hosts before them) ...
        for key in ("objective/scores", "val/completion_length", "val/num_eos_tokens"):
            assert m[key] == s[key], key
        # ... and the same updates, up to the order of float reductions: the same program
        # on the same mesh, but gloo's cross-process all-reduce sums the 4 devices' partial
        # gradients and statistics in another order than the in-process one. Measured
        # per step: metrics within 1e-6 relative, except objective/kl 2.2e-6 (a difference
        # of two nearly equal log-prob sums) and loss 7.8e-6 (1.5e-7 absolute: a near-zero
        # policy loss plus the value loss); params within 1.8e-7 absolute after 12 steps.
        # (`val/clipfrac` is left out: it counts tokens where two quantities equal in
        # exact arithmetic differ in the last bit, `V_old + (V - V_old)` vs `V`.)
        for key in ("objective/kl", "objective/kl_coef", "loss", "loss/value",
                    "grad_norm", "policy/approxkl", "policy/entropy"):  # fmt: skip
            np.testing.assert_allclose(m[key], s[key], rtol=1e-5, atol=1e-7, err_msg=key)
    pm, ps = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    assert pm.files == ps.files
    for key in ps.files:
        np.testing.assert_allclose(pm[key], ps[key], rtol=0, atol=5e-7, err_msg=key)


@pytest.mark.heavy  # three processes compile the sampler, two scorers and the step
def test_grpo_in_two_processes_matches_one(tmp_path):
    """GRPO (2 passes per rollout: the old-policy scoring pass; the k3 term: the
    reference's) in two processes equals one process on the same 4 devices: each host
    rewards half of every rollout and feeds half of every micro-batch, the advantages
    are the whole rollout's groups'."""
    _launch([("0", "0"), ("1", "0"), ("-1", "0")], tmp_path, objective="grpo")
    for h in (0, 1):
        calls = json.loads((tmp_path / f"multi_grpo_host{h}.json").read_text())
        assert calls["reward_episodes"] == [16] * 3
        assert calls["step_rows"] == [[2, 4]] * (3 * 2 * 2)
    multi = json.loads((tmp_path / "multi_grpo.json").read_text())
    single = json.loads((tmp_path / "single_grpo.json").read_text())
    assert [r["step"] for r in multi] == [r["step"] for r in single] == list(range(1, 13))
    for m, s in zip(multi, single, strict=True):
        for key in ("objective/scores", "reward_std", "completions/mean_length"):
            assert m[key] == s[key], key  # the same samples and rewards
        for key in ("objective/kl", "loss", "grad_norm", "kl"):
            np.testing.assert_allclose(m[key], s[key], rtol=1e-5, atol=1e-7, err_msg=key)
    pm, ps = np.load(tmp_path / "multi_grpo.npz"), np.load(tmp_path / "single_grpo.npz")
    for key in ps.files:
        np.testing.assert_allclose(pm[key], ps[key], rtol=0, atol=5e-7, err_msg=key)
