"""Ring attention (context parallelism over the `sequence` mesh axis).

The default test runs ring attention on 4 simulated devices against the dense reference
(values and gradients; tests/ring_attention_run.py). The heavy ones run whole DPO steps
on meshes with a `sequence` axis against one device (tests/ring_sharded_run.py):
per-sequence log-probs, loss, and parameters after two SGD steps (the gradients).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models import ring_attention as R

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ring_attention_equals_dense_reference():
    """Zig-zag layout by hand, then packed + prefix-shared rows, GQA, a sliding window and
    soft-capping on a 4-device ring: output and dq, dk, dv equal the dense reference."""
    # 2 devices, 4 chunks of 2: device 0 holds chunks 0 and 3, device 1 chunks 1 and 2.
    row = jnp.arange(8)[None]
    np.testing.assert_array_equal(R.to_zigzag(row, 2)[0], [0, 1, 6, 7, 2, 3, 4, 5])
    np.testing.assert_array_equal(R.from_zigzag(R.to_zigzag(row, 2), 2), row)
    assert R.padded_length(100, 4) == 104
    out = _run("tests.ring_attention_run")
    assert out["grad_scale"] > 0.1
    for key in ("out", "dq", "dk", "dv"):
        assert out[key] < 2e-5, out


@pytest.mark.heavy
@pytest.mark.parametrize(
    "cases, meshes",
    [
        pytest.param(["stacked"], ["seq4", "seq8"], id="stacked"),
        pytest.param(["packed"], ["seq4", "seq8"], id="packed"),
        pytest.param(["prefix_shared"], ["seq4", "seq8", "data2-fsdp2-seq2"], id="prefix_shared"),
        pytest.param(["window_softcap"], ["seq4", "seq8"], id="window_softcap"),
        pytest.param(["lora"], ["seq4", "seq8"], id="lora"),
        pytest.param(["ulysses"], ["seq2", "data2-fsdp2-seq2"], id="ulysses"),
    ],
)
def test_dpo_step_with_sequence_axis_equals_one_device(cases, meshes):
    """Per-sequence log-probs, loss and SGD-updated params on sequence meshes (4 and 8
    devices; composed with data and fsdp) equal the 1-device run to float32 tolerance."""
    out = _run("tests.ring_sharded_run", *cases, *meshes)
    assert set(out) == set(cases)
    for case, per_mesh in out.items():
        assert per_mesh["loss_change"] > 1e-4, case  # the steps really trained
        for mesh in meshes:
            r = per_mesh[mesh]
            assert r["split"], (case, mesh)
            assert r["logps"] < 1e-4 and r["loss"] < 1e-5 and r["params"] < 1e-5, (case, mesh, r)
