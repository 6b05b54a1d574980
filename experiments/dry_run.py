"""Dry runs: compile a training phase's program with abstract shapes and report what it
would cost on the configured mesh.

An experiment's ``--dry_run`` calls `experiments.phases.dry_run_phases`: each training
phase builds its run's `dpo-jax train` config and host batches and calls
`dpo_jax.train.train(..., dry_run=True)` with abstract params (`jax.ShapeDtypeStruct`s:
nothing is loaded or allocated). That is the Trainer of the run -- the same jitted step,
shardings and batch shapes -- lowered for its first step; `compiled.memory_analysis()`
gives the per-device argument / output / temporary bytes, which decide an OOM on a TPU
slice. On a laptop, simulate the slice's devices on the CPU:

    python -m experiments.sentiment --preset=imdb_gpt2_large --dry_run

(the experiment asks for `dry_run_devices` CPU devices before JAX starts its backend; or
set XLA_FLAGS=--xla_force_host_platform_device_count=8 yourself). This module holds what
the dry runs share: simulated devices, model shapes without a checkpoint, the batch plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax

from dpo_jax import models

# What a real-scale run is built from: the same fields for every experiment.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Hugging Face config.json values of the public checkpoints (used when the local
    # checkpoint directory is absent, so the dry run needs no download).
    "gpt2-large": dict(
        model_type="gpt2", vocab_size=50257, hidden_size=1280, num_layers=36, num_heads=20,
        max_position_embeddings=1024,
    ),
    "pythia-2.8b": dict(
        model_type="gpt_neox", vocab_size=50304, hidden_size=2560, num_layers=32, num_heads=32,
        max_position_embeddings=2048, rotary_pct=0.25,
    ),
    "pythia-1b": dict(
        model_type="gpt_neox", vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=8,
        max_position_embeddings=2048, rotary_pct=0.25,
    ),
    "gemma-2-2b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, num_layers=26, num_heads=8,
        num_kv_heads=4, head_dim=256, intermediate_size=9216, max_position_embeddings=8192,
        query_pre_attn_scalar=256.0, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        sliding_window=4096,
        layer_types=("sliding_attention", "full_attention") * 13,  # scanned as 13 pairs
    ),
    "gpt-j-6b": dict(
        model_type="gptj", vocab_size=50400, hidden_size=4096, num_layers=28, num_heads=16,
        max_position_embeddings=2048,
    ),
}  # fmt: skip


def ensure_cpu_devices(num_devices: int) -> None:
    """Ask for `num_devices` simulated CPU devices if the backend has not started yet.

    Must run before anything touches `jax.devices()`; afterwards it only checks.
    """
    flag = f"--xla_force_host_platform_device_count={num_devices}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    # Raises once the backend is initialised: the device count below tells the user.
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", num_devices)
    if len(jax.devices()) < num_devices:
        raise RuntimeError(
            f"dry run wants {num_devices} devices but JAX has {len(jax.devices())}: set "
            f"XLA_FLAGS={flag} before JAX starts (e.g. on the command line)"
        )


def model_config_for(name_or_dir: str, **overrides: Any) -> models.ModelConfig:
    """ModelConfig of a local HF checkpoint directory (its config.json), else of a preset
    in MODEL_PRESETS named by the directory's last component."""
    config_json = Path(name_or_dir) / "config.json"
    if config_json.is_file():
        return models.config_from_hf(json.loads(config_json.read_text()), **overrides)
    key = Path(name_or_dir).name.lower()
    if key not in MODEL_PRESETS:
        raise FileNotFoundError(
            f"{config_json} does not exist and {key!r} is not one of the built-in shapes "
            f"{sorted(MODEL_PRESETS)}"
        )
    spec = dict(MODEL_PRESETS[key])
    family = spec.pop("model_type")
    if family not in models.FAMILY_SWITCHES:
        raise ValueError(
            f"{key}: model family {family!r} is not supported by dpo_jax.models "
            f"(supported: {sorted(models.FAMILY_SWITCHES)})"
        )
    return models.ModelConfig.for_family(family, **spec, **overrides)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's pairs are cut into micro-batches and spread over devices."""

    global_pairs: int  # pairs per optimizer step
    micro_batches: int  # A: gradient-accumulation micro-batches inside the step
    seq_len: int  # L: padded row length (prompt + completion)
    data_parallel: int  # rows are split this many ways

    def __post_init__(self) -> None:
        if self.global_pairs % self.micro_batches:
            raise ValueError(
                f"batch plan: {self.global_pairs} pairs per step do not split into "
                f"{self.micro_batches} micro-batches"
            )
        if (2 * self.pairs_per_micro) % self.data_parallel:
            raise ValueError(
                f"batch plan: {2 * self.pairs_per_micro} rows per micro-batch do not split over "
                f"{self.data_parallel} data-parallel devices; change micro_batches or the mesh"
            )

    @property
    def pairs_per_micro(self) -> int:
        return self.global_pairs // self.micro_batches

    @property
    def rows_per_device(self) -> int:
        return 2 * self.pairs_per_micro // self.data_parallel

    @property
    def tokens_per_step(self) -> int:
        return 2 * self.global_pairs * self.seq_len

    def describe(self) -> str:
        return (
            f"{self.global_pairs} pairs/step = {self.micro_batches} micro-batch(es) x "
            f"{self.pairs_per_micro} pairs ({2 * self.pairs_per_micro} stacked rows x "
            f"{self.seq_len} tokens); {self.rows_per_device} rows per device per micro-batch "
            f"over {self.data_parallel} data-parallel shards; {self.tokens_per_step:,} tokens/step"
        )
