"""AOT dry run of a real-scale experiment: build everything with abstract shapes, lower and
compile the train step for the configured mesh, and report what it would cost.

Nothing is allocated: parameters and optimizer state come from `jax.eval_shape`, the batch
is `jax.ShapeDtypeStruct`s with the shardings the loop would give it, and
`jax.jit(step, in_shardings=..., out_shardings=...).lower(...).compile()` runs XLA's
partitioner and buffer assignment for the mesh. `compiled.memory_analysis()` then gives
the per-device argument / output / temporary bytes, which is what decides an OOM on a TPU
slice. On a laptop, simulate the slice's devices on the CPU:

    python -m experiments.sentiment --preset=imdb_gpt2_large --dry_run

(the experiment asks for `num_devices` CPU devices before JAX starts its backend; or set
XLA_FLAGS=--xla_force_host_platform_device_count=8 yourself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from dpo_jax import lora, losses, models, optim, sharding, train, train_step

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


@dataclasses.dataclass(frozen=True)
class DryRunReport:
    """What the dry run measured."""

    param_count: int
    param_bytes: int
    mesh: dict[str, int]
    plan: BatchPlan
    memory: dict[str, int]  # per device, from compiled.memory_analysis()

    def summary(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB"
        lines = [
            f"parameters: {self.param_count:,} ({gib(self.param_bytes)} in param_dtype)",
            f"mesh: {self.mesh}",
            f"batch plan: {self.plan.describe()}",
            "per-device memory of the compiled train step:",
        ]
        lines += [f"  {k:<22} {gib(v):>12}  ({v:,} bytes)" for k, v in self.memory.items()]
        # XLA's cost analysis counts a scanned layer once, so estimate from the shapes.
        train_flops = 6 * self.param_count * self.plan.tokens_per_step
        lines.append(f"train FLOPs/step (6 x params x tokens): {train_flops / 1e12:.1f} TFLOP")
        return "\n".join(lines)


def _abstract_batch(plan: BatchPlan, reference: str, mesh: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one step's `[A, 2B, L]` stacked batch with the loop's shardings."""
    a, n, length = plan.micro_batches, 2 * plan.pairs_per_micro, plan.seq_len
    shapes = {
        "input_ids": np.zeros((a, n, length), np.int32),
        "positions": np.zeros((a, n, length), np.int32),
        "segment_ids": np.zeros((a, n, length), np.int32),
        "sequence_index": np.zeros((a, n, length), np.int32),
    }
    if reference == "precomputed":
        shapes["ref_logps"] = np.zeros((a, n), np.float32)
    shardings = sharding.batch_sharding(shapes, mesh, micro_axis=True)
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in shapes.items()
    }


def dry_run(
    model_cfg: models.ModelConfig,
    *,
    mesh_shape: tuple[int, int, int],
    plan_pairs: int,
    micro_batches: int,
    seq_len: int,
    loss_name: str,
    loss_hyper: Mapping[str, Any],
    optim_config: Mapping[str, Any],
    total_steps: int,
    reference: str = "frozen",
    logps_chunk_size: int = 0,
    lora_config: lora.LoraConfig | None = None,
) -> DryRunReport:
    """Lower and compile one train step for `mesh_shape` with abstract state and batch.

    With `lora_config` the state holds the frozen base (in `lora_config.base_dtype`)
    and trains adapters only, as `train.build_trainer` builds it.
    """
    mesh = sharding.make_mesh(*mesh_shape)
    abstract = nn.meta.unbox(models.abstract_params(model_cfg))
    logical = models.logical_axes(model_cfg)
    model_abstract, model_logical, base = abstract, None, None
    if lora_config is not None:
        base = jax.eval_shape(lambda p: lora.cast_base(p, lora_config), abstract)
        model_logical = lora.base_logical_axes(logical, base)
        abstract = jax.eval_shape(
            lambda b: lora.init_adapters(b, lora_config, jax.random.key(0)), base
        )
        logical = lora.adapter_logical_axes(model_logical, abstract)
    optimizer, schedule = optim.make_optimizer(optim_config, total_steps, abstract, logical)
    if not losses.needs_reference(loss_name):
        reference = "none"
    with_ref = reference == "frozen"
    # Boxed with their logical names, as `train.build_trainer` builds the state.
    boxed = sharding.box(logical, abstract)
    boxed_state = jax.eval_shape(
        lambda p: train_step.init_state(p, optimizer, jax.random.key(0), with_ref), boxed
    )
    if base is not None:
        boxed_base = sharding.box(model_logical, base)
        boxed_state = boxed_state.replace(
            base_params=boxed_base, ref_params=boxed_base if with_ref else None
        )
    state_sh = train.state_shardings(boxed_state, mesh)
    state_shapes = nn.meta.unbox(boxed_state)
    step_cfg = train_step.StepConfig(
        apply_fn=models.Transformer(model_cfg).apply,
        optimizer=optimizer,
        schedule=schedule,
        loss_name=loss_name,
        loss_hyper=dict(loss_hyper),
        reference=reference,
        logps_chunk_size=logps_chunk_size,
        grad_shardings=state_sh.params,
        lora_scale=0.0 if lora_config is None else lora_config.scale,
    )
    dp = sharding.data_parallel_size(mesh)
    plan = BatchPlan(plan_pairs, micro_batches, seq_len, dp)
    batch = _abstract_batch(plan, reference, mesh)
    state_in = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, state_sh
    )
    repl = NamedSharding(mesh, jax.sharding.PartitionSpec())
    fn = jax.jit(
        functools.partial(train_step.train_step, cfg=step_cfg, n_seq=2 * plan.pairs_per_micro),
        in_shardings=(state_sh, {k: v.sharding for k, v in batch.items()}),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )
    # Linen's activation constraints resolve logical names through the mesh + rule table.
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        compiled = fn.lower(state_in, batch).compile()
    mem = compiled.memory_analysis()
    memory = {}
    for field in (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    ):
        if mem is not None and hasattr(mem, field):
            memory[field.removesuffix("_in_bytes")] = int(getattr(mem, field))
    if memory:
        # Donated state aliases its outputs: live memory is arguments + temporaries +
        # outputs that are not aliases of arguments.
        memory["peak_estimate"] = (
            memory.get("argument_size", 0)
            + memory.get("output_size", 0)
            - memory.get("alias_size", 0)
            + memory.get("temp_size", 0)
        )
    leaves = jax.tree.leaves(model_abstract)
    return DryRunReport(
        param_count=int(sum(np.prod(x.shape) for x in leaves)),
        param_bytes=int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)),
        mesh=dict(zip(sharding.MESH_AXES, (int(s) for s in mesh.devices.shape), strict=True)),
        plan=plan,
        memory=memory,
    )
