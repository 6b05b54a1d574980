"""Device mesh, the one logical-axis rule table, and NamedSharding helpers.

Every array that crosses a jit boundary gets its sharding from here: parameters and
optimizer state through `LOGICAL_AXIS_RULES` (logical names -> mesh axes), batches
through `batch_sharding` (leading micro-batch axis replicated, rows split over the
data-parallel axes). The same code path serves 1 CPU device, N local accelerators and
a multi-host slice.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax.errors import UserError, config_error

log = logging.getLogger(__name__)

# `sequence` (context parallelism) sits inside the data axes and outside `tensor`, so
# tensor-parallel groups stay on the closest devices and the ring's neighbours next.
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "sequence", "tensor")

# The axis activations' length is split over (ring attention, models/ring_attention.py).
SEQUENCE_AXIS = "sequence"

# Rows of a batch are split over both data-parallel axes: fsdp shards parameters *and*
# data (ZeRO-3 style), so it must also carry a slice of the batch.
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

# The one table. Weights: `embed` is split over fsdp (each device holds a slice of every
# matrix and all-gathers it at use), the Megatron dims (`mlp`, `heads`, `kv_heads`,
# `vocab`) over tensor. Activations: batch over the data axes, the Megatron dims over
# tensor, length over `sequence` (whole while mesh.sequence is 1); widths stay whole.
# No weight names `sequence`: params and optimizer state are laid out the same for any
# mesh.sequence, which is why a checkpoint restores across sequence sizes.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),  # LoRA adapters: the rank axis is small, every device holds it
    ("activation_batch", BATCH_AXES),
    ("activation_length", SEQUENCE_AXIS),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace the single `-1` in `shape` by the devices left over; check the product.

    `shape` lists the sizes in MESH_AXES order (data, fsdp, sequence, tensor).

    >>> resolve_mesh_shape((-1, 2, 1, 1), 8)
    (4, 2, 1, 1)
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise UserError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise UserError(f"mesh shape {shape}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise UserError(f"mesh shape {shape}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise UserError(
                f"mesh shape {shape}: {num_devices} devices are not divisible by {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise UserError(
            f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} "
            f"devices but {num_devices} are in use"
        )
    return shape


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[Any] | None = None,
    *,
    sequence: int = 1,
) -> Mesh:
    """A (data, fsdp, sequence, tensor) mesh over `devices` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape((data, fsdp, sequence, tensor), len(devices))
    # jax>=0.10 defaults to Explicit axes, under which classic jit-with-shardings and
    # Linen's with_logical_constraint refuse to run; Auto keeps the GSPMD behaviour.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def maybe_initialize_distributed(multihost: str | bool = "auto") -> bool:
    """Call `jax.distributed.initialize()` when asked or when the environment says so.

    `multihost`: True/"true" forces it, False/"false" never, "auto" initializes when a
    coordinator is configured (JAX_COORDINATOR_ADDRESS), on a TPU pod slice's several
    workers (TPU_WORKER_HOSTNAMES), or in a SLURM job step of several tasks (SLURM_NTASKS);
    `jax.distributed.initialize()` reads the rest from that environment.
    Must run before any other JAX call. Returns whether it initialized.
    """
    flag = str(multihost).lower()
    if flag in ("false", "0", "no"):
        return False
    if flag == "auto":
        env_says = (
            bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
            or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
            or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
        )
        if not env_says:
            return False
    elif flag not in ("true", "1", "yes"):
        raise UserError(f"multihost must be 'auto', true or false, got {multihost!r}")
    jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


Rules = Sequence[tuple[str, Any]]


def validate_rules(rules: Any, key: str = "mesh.rules") -> tuple[tuple[str, Any], ...]:
    """`rules` as a tuple of `(logical name, mesh axes)` pairs, or a UserError naming `key`.

    Mesh axes are None, one of MESH_AXES, or a sequence of them; a logical name appears
    once. The model's and LoRA's logical names must all have a rule (checked at use).
    """
    hint = "a sequence of (logical_name, None | mesh axis | (mesh axes...)) pairs"
    if isinstance(rules, str | bytes) or not isinstance(rules, Sequence):
        raise config_error(key, f"must be a table of rules, got {rules!r}", hint)
    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2:
            raise config_error(f"{key}[{i}]", f"must be a (name, axes) pair, got {rule!r}", hint)
        name, axes = rule
        if not isinstance(name, str) or not name:
            raise config_error(f"{key}[{i}]", f"logical name must be a string, got {name!r}")
        if name in seen:
            raise config_error(f"{key}[{i}]", f"logical name {name!r} appears twice")
        seen.add(name)
        if axes is not None:
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise config_error(
                    f"{key}[{i}]", f"{name!r} maps to unknown mesh axes {bad}",
                    f"mesh axes are {MESH_AXES} or None",
                )  # fmt: skip
            axes = axes[0] if len(axes) == 1 else axes
        out.append((name, axes))
    return tuple(out)


def _axes_tuple(axes: Any) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh_spec(
    logical_spec: PartitionSpec | Sequence[str | None],
    shape: Sequence[int] | None,
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    name: str = "array",
    warned: set | None = None,
) -> PartitionSpec:
    """Mesh PartitionSpec for one array from its logical names (Flax's rule resolution).

    Flax's `nn.logical_to_mesh_axes` picks the mesh axes (a mesh axis is used at most
    once per array; the earlier rule of the table wins). A dimension whose size is not divisible by
    its mesh axes is then left whole rather than failing, with a WARNING naming `name`,
    the dimension, the mesh axes and their size: the run still works, only less sharded.
    `warned` (one set per tree) keeps the same case (logical name, size, mesh axes) of
    the params, their optimizer moments and the reference from warning more than once.
    """
    logical = tuple(logical_spec)
    missing = [n for n in logical if n is not None and n not in dict(rules)]
    if missing:
        raise KeyError(f"logical axes {missing} of {name} have no rule in the rules table")
    mesh_axes = tuple(nn.logical_to_mesh_axes(logical, rules))
    out: list[Any] = []
    for dim, axes in enumerate(mesh_axes):
        axes = tuple(a for a in _axes_tuple(axes) if a in mesh.shape and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        case = (logical[dim], None if shape is None else shape[dim], axes)
        if shape is not None and axes and shape[dim] % size:
            if warned is not None and case in warned:
                out.append(None)
                continue
            if warned is not None:
                warned.add(case)
            log.warning(
                "%s: dim %d (%s) of size %d is not divisible by mesh axes %s of size %d; "
                "that dim is replicated instead of sharded",
                name, dim, logical[dim], shape[dim], axes, size,
            )  # fmt: skip
            axes = ()
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def box(logical_tree: Any, tree: Any) -> Any:
    """`tree` with every leaf boxed as `nn.LogicallyPartitioned` with its logical names.

    Optax states built from boxed params keep the boxes on their params-shaped moments,
    so `nn.get_partition_spec` then names every optimizer-state axis too.
    """
    is_spec = lambda x: isinstance(x, PartitionSpec)
    return jax.tree.map(
        lambda spec, leaf: nn.LogicallyPartitioned(leaf, tuple(spec)),
        logical_tree,
        tree,
        is_leaf=is_spec,
    )


def boxed_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a (possibly abstract) tree whose leaves may be logically boxed.

    Boxed leaves take the mesh axes of their logical names (`nn.get_partition_spec`, then
    the rules table); unboxed leaves (step counts, scalars) are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    values = nn.meta.unbox(boxed_tree)
    flat, treedef = jax.tree_util.tree_flatten_with_path(values)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    warned: set = set()
    out = [
        NamedSharding(
            mesh,
            logical_to_mesh_spec(spec, leaf.shape, mesh, rules, jax.tree_util.keystr(path), warned),
        )
        for (path, leaf), spec in zip(flat, spec_leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def tree_shardings(
    logical_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES
) -> Any:
    """NamedShardings for a pytree given its logical PartitionSpecs and its shapes.

    `shapes_tree` may hold arrays or ShapeDtypeStructs (anything with `.shape`).
    """
    return boxed_shardings(box(logical_tree, shapes_tree), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array every device holds whole."""
    return NamedSharding(mesh, PartitionSpec())


def batch_spec(ndim: int, micro_axis: bool = True) -> PartitionSpec:
    """PartitionSpec of one batch array: `[A, N, ...]` (or `[N, ...]` without the A axis)."""
    if ndim == 0:
        return PartitionSpec()
    if micro_axis:
        return PartitionSpec(None, BATCH_AXES) if ndim >= 2 else PartitionSpec()
    return PartitionSpec(BATCH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the rows of a batch are split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


# Per-sequence / per-example columns have their rows on the last axis: `ref_logps`
# [A, 2B] (or [A, 2, B] when stitched from several hosts), `labels` [A, B].
_LAST_AXIS_ROWS = ("ref_logps", "labels")


def batch_sharding(batch: dict[str, Any], mesh: Mesh, micro_axis: bool = True) -> dict[str, Any]:
    """NamedShardings for a batch dict; rows not divisible by the data axes stay replicated.

    Token arrays `[A, N, ...]` split rows (axis 1); per-sequence columns split their
    last axis.
    """
    dp = data_parallel_size(mesh)
    out = {}
    for key, value in batch.items():
        shape = np.shape(value)
        if not shape:
            out[key] = replicated(mesh)
            continue
        row_dim = len(shape) - 1 if key in _LAST_AXIS_ROWS else (1 if micro_axis else 0)
        if row_dim >= len(shape) or (micro_axis and row_dim == 0):
            out[key] = replicated(mesh)
            continue
        spec = [None] * (row_dim + 1)
        spec[row_dim] = BATCH_AXES
        if dp == 1 or shape[row_dim] % dp:
            # Several hosts must split rows; one host may keep them whole.
            spec = []
        out[key] = NamedSharding(mesh, PartitionSpec(*spec))
    return out


def shard_batch(batch: dict[str, Any], mesh: Mesh, micro_axis: bool = True) -> dict[str, jax.Array]:
    """Put a host batch on the mesh.

    Single process: `batch` is the global batch. Several processes: `batch` is this
    host's slice (rows), stitched into the global array with
    `jax.make_array_from_process_local_data`, so no host ever loads the full batch.
    """
    shardings = batch_sharding(batch, mesh, micro_axis)
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), shardings[k]) for k, v in batch.items()}
    for key, value in batch.items():
        if np.ndim(value) >= 2 and shardings[key].spec == PartitionSpec():
            raise UserError(
                f"batch[{key!r}] of shape {np.shape(value)}: its rows do not divide the "
                f"{data_parallel_size(mesh)} data-parallel devices, and with "
                f"{jax.process_count()} hosts every host must feed its own rows"
            )
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
        for k, v in batch.items()
    }
