"""Two real JAX processes (jax.distributed on localhost, 2 CPU devices each), each feeding
only its own slice of every batch, train exactly like one process seeing whole batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.heavy  # three processes compile the step: ~35 s CPU, minutes on a loaded box
def test_two_processes_match_one(tmp_path):
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [sys.executable, "-m", "tests.multihost_run"]
    procs = [
        subprocess.Popen(cmd + [pid, port, str(tmp_path)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid in ("0", "1", "-1")
    ]  # fmt: skip
    for p in procs:
        out, _ = p.communicate(timeout=400)
        assert p.returncode == 0, out[-4000:]
    multi = json.loads((tmp_path / "multi.json").read_text())
    single = json.loads((tmp_path / "single.json").read_text())
    assert len(multi) == 3 and multi[-1] < multi[0]
    np.testing.assert_allclose(multi, single, rtol=1e-5, atol=1e-6)
    pm, ps = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    for key in ps.files:
        np.testing.assert_allclose(pm[key], ps[key], rtol=1e-4, atol=1e-6, err_msg=key)
