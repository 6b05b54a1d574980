"""`sharding.maybe_initialize_distributed` reads the cluster from the environment."""

from __future__ import annotations

import jax
import pytest

from dpo_jax import sharding

CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS")


@pytest.fixture
def calls(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    seen: list[int] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: seen.append(1))
    return seen


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, 0),
        ({"SLURM_NTASKS": "1"}, 0),
        ({"SLURM_NTASKS": "4"}, 1),
        ({"TPU_WORKER_HOSTNAMES": "w0"}, 0),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, 1),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, 1),
    ],
)
def test_auto_initializes_exactly_when_the_environment_names_a_cluster(
    calls, monkeypatch, env, expected
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert sharding.maybe_initialize_distributed("auto") is bool(expected)
    assert len(calls) == expected


def test_explicit_flags_override_the_environment(calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert sharding.maybe_initialize_distributed("false") is False
    assert sharding.maybe_initialize_distributed(True) is True
    assert len(calls) == 1
    with pytest.raises(ValueError, match="multihost"):
        sharding.maybe_initialize_distributed("sometimes")
