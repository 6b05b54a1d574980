"""The Trainer: a jitted train/eval step bound to a mesh, and its initial sharded state.

    trainer, state = dpo_jax.trainer.build_trainer(model_config, params, mesh=mesh, ...)
    state, metrics = trainer.step(state, host_batch_A, n_seq)

The pure step lives in `dpo_jax.train_step`; this module places the state and the
batches on the mesh (host batches renumbered into one global batch across hosts) and
compiles the step once per batch layout. `dpo_jax.train.train` builds one from a config;
the loop (`dpo_jax.loop`), a notebook or a test can drive it directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dpo_jax import logprobs, lora, losses, models, objectives, optim, sharding
from dpo_jax.train_step import (
    StepConfig,
    TrainState,
    checkpointable,
    eval_step,
    init_state,
    train_step,
)

# ------------------------------------------------------------------------ batches


def globalize_host_batch(
    batch_A: Mapping[str, Any],
    n_seq: int,
    process_index: int,
    process_count: int,
    paired: bool = True,
) -> tuple[dict[str, Any], int]:
    """Renumber one host's slice so the hosts' slices form one global batch.

    Each host builds its rows with local sequence numbers (chosen `k < b`, rejected
    `b <= k < 2b`). Concatenated over `P` hosts, the global batch must follow the
    contract's numbering (chosen of pair `j` at `j`, rejected at `B + j`, `B = P b`),
    so host `h`'s chosen `k` becomes `h b + k` and its rejected `k` becomes
    `B + h b + (k - b)`. `ref_logps` `[A, 2b]` becomes `[A, 2, b]`: stitched along the
    last axis it is `[A, 2, B]`, whose flattening is chosen-then-rejected again.
    `labels` `[A, b]` already concatenate in pair order. Returns (batch, global 2B).
    Single sequences (`paired=False`, SFT) are numbered host after host: `h n + k`.
    """
    if process_count == 1:
        return dict(batch_A), n_seq
    if not paired:
        si = np.asarray(batch_A["sequence_index"])
        out = dict(batch_A, sequence_index=np.where(si >= 0, process_index * n_seq + si, -1))
        out["sequence_index"] = out["sequence_index"].astype(np.int32)
        return out, n_seq * process_count
    b = n_seq // 2
    big_b = b * process_count
    out = dict(batch_A)
    si = np.asarray(batch_A["sequence_index"])
    chosen = (si >= 0) & (si < b)
    out["sequence_index"] = np.where(
        chosen, process_index * b + si, np.where(si >= b, big_b + process_index * b + si - b, -1)
    ).astype(np.int32)
    if "ref_logps" in out:
        ref = np.asarray(out["ref_logps"])
        out["ref_logps"] = ref.reshape(ref.shape[0], 2, b)
    return out, 2 * big_b


def with_scored_positions(batch_A: Mapping[str, Any], process_count: int = 1) -> dict[str, Any]:
    """`batch_A` plus `scored_positions` `[A, N, K]` (see `logprobs.scored_positions`).

    Every host of a multi-host step must compile the same `K`, so the hosts agree on
    the largest one.
    """
    out = dict(batch_A)
    positions = logprobs.scored_positions(np.asarray(batch_A["sequence_index"]))
    if process_count > 1:
        k = int(np.max(multihost_utils.process_allgather(np.int32(positions.shape[-1]))))
        positions = logprobs.scored_positions(np.asarray(batch_A["sequence_index"]), k)
    out["scored_positions"] = positions
    return out


def make_mesh_from_config(config: ml_collections.ConfigDict) -> Mesh:
    """Mesh from `config.mesh` (after `jax.distributed` if multi-host)."""
    m = config.mesh
    return sharding.make_mesh(m.data, m.fsdp, m.tensor, sequence=m.sequence)


def state_shardings(
    boxed_state_shapes: TrainState, mesh: Mesh, rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES
) -> TrainState:
    """NamedShardings for every field of an abstract TrainState built from boxed params.

    Params (adapters with LoRA), the frozen base and reference carry their logical names
    as `nn.LogicallyPartitioned` boxes, and so do the optimizer moments optax built from
    them; `sharding.boxed_shardings` maps those names through `rules`, and replicates
    every unboxed leaf (step, counts, rng, loss state).
    """
    return sharding.boxed_shardings(boxed_state_shapes, mesh, rules)


@dataclasses.dataclass
class Trainer:
    """A compiled train/eval step bound to a mesh and the state's shardings.

    `step(state, host_batch_A)` places the batch on the mesh and runs the jitted step;
    the loop, a notebook or a test can drive it directly.
    """

    mesh: Mesh
    model_config: models.ModelConfig
    step_config: StepConfig
    shardings: TrainState
    rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES  # the config's mesh.rules
    _train_fns: dict = dataclasses.field(default_factory=dict)
    _eval_fns: dict = dataclasses.field(default_factory=dict)

    def mesh_context(self) -> Any:
        """The mesh and its logical-axis rules, for calls of jitted functions outside the step."""
        # Linen's activation constraints resolve logical names through these rules.
        return _MeshRules(self.mesh, self.rules)

    def place_batch(self, batch_A: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Put a host `[A, ...]` batch on the mesh (this host's slice when multi-host)."""
        return sharding.shard_batch(dict(batch_A), self.mesh, micro_axis=True)

    def _compiled(
        self, table: dict, fn: Callable, batch: Mapping[str, Any], n_seq: int, train: bool
    ):
        batch_sh = sharding.batch_sharding(dict(batch), self.mesh, micro_axis=True)
        key = (n_seq, tuple(sorted((k, s.spec) for k, s in batch_sh.items())))
        if key not in table:
            step_fn = lambda state, b: fn(state, b, self.step_config, n_seq)
            repl = sharding.replicated(self.mesh)
            if train:
                table[key] = jax.jit(
                    step_fn,
                    in_shardings=(self.shardings, batch_sh),
                    out_shardings=(self.shardings, repl),
                    donate_argnums=(0,),
                )
            else:
                table[key] = jax.jit(
                    step_fn, in_shardings=(self.shardings, batch_sh), out_shardings=repl
                )
        return table[key]

    def step(
        self, state: TrainState, batch_A: Mapping[str, Any], n_seq: int
    ) -> tuple[TrainState, dict]:
        """One optimizer update; `state` is donated (do not reuse it)."""
        return self._run(state, batch_A, n_seq, train=True)

    def evaluate(self, state: TrainState, batch_A: Mapping[str, Any], n_seq: int) -> dict:
        """Loss and metrics without an update."""
        return self._run(state, batch_A, n_seq, train=False)

    def prepare_batch(self, batch_A: Mapping[str, Any], n_seq: int) -> tuple[dict, int]:
        """The host batch and sequence count exactly as the jitted step sees them.

        Globalizes a multi-host batch and adds `scored_positions` when the step unembeds
        only scored positions; `step` does this itself, so call it only to lower or
        inspect the step ahead of time.
        """
        batch_A, n_seq = globalize_host_batch(
            batch_A, n_seq, jax.process_index(), jax.process_count(),
            paired=self.step_config.objective_fn.paired,
        )  # fmt: skip
        if self.step_config.unembed_scored_only and "scored_positions" not in batch_A:
            batch_A = with_scored_positions(batch_A, jax.process_count())
        return batch_A, n_seq

    def lower(
        self, state: TrainState, batch_A: Mapping[str, Any], n_seq: int, train: bool = True
    ) -> jax.stages.Lowered:
        """The program `step` (or `evaluate`) runs on this batch, lowered, not executed.

        The same jitted function, shardings and batch shapes as the run (`_compiled`'s
        table); `state` may be abstract (`jax.ShapeDtypeStruct`s with shardings, what
        `build_trainer` returns for abstract params). `.compile().memory_analysis()` is
        the dry run's per-device memory; `.as_text()` compares two programs.
        """
        batch_A, n_seq = self.prepare_batch(batch_A, n_seq)
        table, step_fn = (self._train_fns, train_step) if train else (self._eval_fns, eval_step)
        fn = self._compiled(table, step_fn, batch_A, n_seq, train)
        with self.mesh_context():
            return fn.lower(state, self.place_batch(batch_A))

    def _run(self, state: TrainState, batch_A: Mapping[str, Any], n_seq: int, train: bool) -> Any:
        batch_A, n_seq = self.prepare_batch(batch_A, n_seq)
        table, step_fn = (self._train_fns, train_step) if train else (self._eval_fns, eval_step)
        fn = self._compiled(table, step_fn, batch_A, n_seq, train)
        with self.mesh_context():
            return fn(state, self.place_batch(batch_A))


def _keep_first(out: list, pair: tuple[Any, Any]) -> Any:
    """Append `pair[0]` to `out`, return `pair[1]` (a config out of a traced function)."""
    out.append(pair[0])
    return pair[1]


class _MeshRules:
    """`jax.set_mesh(mesh)` + `nn.logical_axis_rules(rules)` as one context."""

    def __init__(self, mesh: Mesh, rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES):
        self._mesh_ctx = jax.set_mesh(mesh)
        self._rules_ctx = nn.logical_axis_rules(rules)

    def __enter__(self) -> None:
        self._mesh_ctx.__enter__()
        self._rules_ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._rules_ctx.__exit__(*exc)
        self._mesh_ctx.__exit__(*exc)


def build_trainer(
    model_config: models.ModelConfig,
    params: Any,
    *,
    mesh: Mesh,
    optim_config: Mapping[str, Any],
    total_steps: int,
    reference: str,
    seed: int = 0,
    ref_params: Any = None,
    lora_config: lora.LoraConfig | None = None,
    rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES,
    **step_settings: Any,
) -> tuple[Trainer, TrainState]:
    """A Trainer and its initial, sharded state (policy = `params`).

    `step_settings` are `StepConfig` fields (`loss_name`, `loss_hyper`, `nan_policy`,
    `objective`, ...; `train` passes `step_settings(config)`); one left out
    takes configs/default.py's value. The objective (`objectives.OBJECTIVES`) is what
    the step minimises; one with a head trains `{"model": params, "head": ...}` (a fresh
    head seeded by `seed`, unless `params` already are `{"model", "head"}`).
    `params` may be abstract (`jax.ShapeDtypeStruct` leaves, e.g. `models.abstract_params`
    unboxed): the state is then abstract too (ShapeDtypeStructs with the run's
    shardings) and nothing is allocated -- what a dry run lowers (`Trainer.lower`).

    `ref_params` defaults to a copy of `params` when `reference == "frozen"`. With
    `lora_config`, `params` is the frozen base (cast to `lora_config.base_dtype`) and
    the state's `params` are fresh adapters (seeded by `seed`), the only trained leaves.
    On a mesh with a tensor axis > 1 the vocabulary is padded (`models.pad_vocab`): the
    Trainer's `model_config` records it, and the state's params are padded.
    """
    # Abstract params (a dry run): the same construction, traced, so nothing is allocated.
    shapes_only = bool(jax.tree.leaves(params)) and all(
        isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)
    )
    run = (lambda f, *a: jax.eval_shape(f, *a)) if shapes_only else (lambda f, *a: f(*a))
    # Built (and validated) once, before any device work; the optimizer, schedule,
    # model and shardings are filled in below.
    step_config = StepConfig(
        apply_fn=models.Transformer(model_config).apply, optimizer=optax.identity(),
        schedule=optax.constant_schedule(0.0), reference=reference,
        lora_scale=0.0 if lora_config is None else lora_config.scale, **step_settings,
    )  # fmt: skip
    obj = step_config.objective_fn
    loss_name = step_config.loss_name
    params, head = objectives.split_head(obj, params)  # a trained head passed back in
    tensor = int(mesh.shape["tensor"])
    if tensor > 1:  # the vocab dim then divides the tensor axis and is really sharded
        padded: list[models.ModelConfig] = []
        params = run(
            lambda p: _keep_first(padded, models.pad_vocab(model_config, p, tensor)), params
        )
        model_config = padded[0]
        if ref_params is not None:
            ref_params = models.vocab.resize_vocab(
                ref_params, model_config, model_config.embed_vocab_size
            )
    logical = models.logical_axes(model_config)
    if obj.head is not None:
        head_rng = jax.random.fold_in(jax.random.key(seed), 0x4EAD)
        params = run(lambda p: objectives.with_head(obj, model_config, p, head, head_rng), params)
        logical = objectives.logical_axes(obj, model_config, logical)
    model_logical = base = None
    if lora_config is not None:
        base = run(lambda p: lora.cast_base(p, lora_config), params)
        model_logical = lora.base_logical_axes(logical, base)
        adapter_rng = jax.random.fold_in(jax.random.key(seed), 0x10A)
        # init on the host's default device; device_put below shards them
        params = run(lambda b: lora.init_adapters(b, lora_config, adapter_rng), base)
        logical = lora.adapter_logical_axes(model_logical, params)
    optimizer, schedule = optim.make_optimizer(optim_config, total_steps, params, logical)
    with_ref = reference == "frozen"
    # BCO's running shift, or None
    loss_state = losses.init_loss_state(loss_name) if obj.uses_loss else None
    # Boxed with their logical names, so the optimizer state optax builds from them
    # carries the same names and one rules table shards all of it.
    boxed = sharding.box(logical, jax.eval_shape(lambda p: p, params))
    abstract = jax.eval_shape(
        lambda p: init_state(p, optimizer, jax.random.key(0), with_ref, loss_state), boxed
    )
    if base is not None:  # the reference (if frozen) and the base are model-shaped
        base_shapes = sharding.box(model_logical, jax.eval_shape(lambda b: b, base))
        ref_shapes = base_shapes if with_ref else None
        abstract = abstract.replace(base_params=base_shapes, ref_params=ref_shapes)
    elif obj.head is not None and with_ref:  # a reference is the model, never a head
        abstract = abstract.replace(ref_params=objectives.split_params(obj, boxed)[0])
    shard = state_shardings(abstract, mesh, rules)
    step_config = dataclasses.replace(
        step_config, apply_fn=models.Transformer(model_config).apply, optimizer=optimizer,
        schedule=schedule, grad_shardings=shard.params,
    )  # fmt: skip
    if shapes_only:
        state_shapes = nn.meta.unbox(abstract)
        return Trainer(mesh, model_config, step_config, shard, rules), jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state_shapes, shard
        )
    params = jax.device_put(params, shard.params)
    if base is not None:
        base = jax.device_put(base, shard.base_params)
    if with_ref:
        ref = (params if base is None else base) if ref_params is None else ref_params
        if ref_params is None and base is None:
            ref = objectives.split_params(obj, ref)[0]
        ref_params = jax.device_put(jax.tree.map(jnp.copy, ref), shard.ref_params)

    def make_state(p: Any, r: Any, b: Any) -> TrainState:
        s = init_state(p, optimizer, jax.random.key(seed), False, loss_state)
        return s.replace(ref_params=r, base_params=b)

    with _MeshRules(mesh, rules):
        state = jax.jit(make_state, out_shardings=shard)(
            params, ref_params if with_ref else None, base
        )
    return Trainer(mesh, model_config, step_config, shard, rules), state


def abstract_checkpointable(trainer: Trainer, state: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of `checkpointable(state)`, for restore."""
    part = checkpointable(state, trainer.step_config)
    shard = checkpointable(trainer.shardings, trainer.step_config)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), part, shard
    )
