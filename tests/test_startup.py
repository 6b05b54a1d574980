"""The start-up summary's CPU-fallback rule (pure: no devices needed)."""

from __future__ import annotations

import types

from dpo_jax import startup
from dpo_jax.configs import default


def test_expected_accelerator_rule_and_the_cpu_fallback_warning():
    expect = startup.expected_accelerator
    assert expect({}, []) is None
    assert expect({"JAX_PLATFORMS": "cpu"}, ["/dev/nvidia0"]) is None  # CPU on purpose
    assert expect({"JAX_PLATFORMS": "cuda,cpu"}, []) == "cuda: JAX_PLATFORMS=cuda,cpu"
    assert expect({"CUDA_VISIBLE_DEVICES": "0,1"}, []) == "gpu: CUDA_VISIBLE_DEVICES=0,1"
    assert expect({"CUDA_VISIBLE_DEVICES": "-1"}, []) is None  # GPUs hidden on purpose
    assert expect({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, []) == "tpu: TPU_ACCELERATOR_TYPE is set"
    assert expect({}, ["/dev/accel0"]) == "tpu: /dev/accel0 exists"

    cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100")
    kw = dict(mesh_shape={"data": 1}, counts={"trainable": 10, "frozen": 0}, reference="frozen",
              num_steps=5, expected="gpu: /dev/nvidia0 exists")  # fmt: skip
    text = startup.summary(default.get_config(), devices=[cpu], **kw)
    warning = [line for line in text.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "(gpu: /dev/nvidia0 exists) but JAX runs on the CPU" in warning[0]
    assert "WARNING" not in startup.summary(default.get_config(), devices=[gpu], **kw)
