"""Preference training: setup, the loop, the Python API (`dpo-jax train`: dpo_jax/cli/train.py).

    result = dpo_jax.train.train(config)          # config: ml_collections ConfigDict
    result.state, result.history, result.eval_history

`config` follows `dpo_jax/configs/default.py`. From a notebook, `train(config,
train_data=..., eval_data=...)` also accepts iterables of host micro-batches (dicts of
numpy arrays, docs/CONTRACTS.md "Batches"), and a loss registered in the notebook with
`@losses.register("mine")` is used by setting `config.loss.name = "mine"`.

The pure jitted step lives in `dpo_jax.train_step`; this module owns everything with
side effects: the mesh, placing state and batches on it, metrics, evaluation,
checkpoint hooks (`checkpointer.restore_or_none / maybe_save / close`).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from dpo_jax import (
    checkpoint,
    data,
    errors,
    export,
    guards,
    logprobs,
    lora,
    losses,
    models,
    objectives,
    optim,
    paths,
    ppo_loop,
    ref_fingerprint,
    reference,
    scoring,
    sharding,
)
from dpo_jax.configs import validate
from dpo_jax.errors import UserError, config_error
from dpo_jax.metric_accumulators import finalize_metrics, is_counted
from dpo_jax.metrics import MetricsWriter, Progress, Throughput, read_jsonl, to_python
from dpo_jax.models import attention, hf
from dpo_jax.train_step import (
    StepConfig,
    TrainState,
    check_loss_options,
    checkpointable,
    eval_step,
    init_state,
    step_settings,
    train_step,
)

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.json"
Batch = dict[str, np.ndarray]

# Keys of a host micro-batch that the jitted step reads; others (the loader's `step`)
# stay on the host.
# `scored_positions` is optional: a caller that pins K (one compiled shape) supplies it.
BATCH_KEYS = (*scoring.MODEL_KEYS, *scoring.OBJECTIVE_KEYS, "scored_positions")


# ------------------------------------------------------------------------ batches


def stack_micro_batches(micro_batches: Sequence[Mapping[str, Any]], pad_id: int = 0) -> Batch:
    """Stack `A` host micro-batches on a new leading axis (padding lengths to the max).

    Padding uses segment 0 / sequence_index -1 (branch 0), so it changes no number;
    see `dpo_jax.data.stack_micro_batches`.
    """
    if not micro_batches:
        raise ValueError("stack_micro_batches: no micro-batches")
    kept = [{k: np.asarray(v) for k, v in mb.items() if k in BATCH_KEYS} for mb in micro_batches]
    return data.stack_micro_batches(kept, pad_id)


def batch_num_sequences(batch_A: Mapping[str, Any], layout: str = "stacked") -> int:
    """2B of one micro-batch of a stacked `[A, ...]` batch (static for the jitted step)."""
    if "ref_logps" in batch_A:
        return int(np.shape(batch_A["ref_logps"])[-1])
    if "labels" in batch_A:
        return 2 * int(np.shape(batch_A["labels"])[-1])
    if layout == "stacked":
        return int(np.shape(batch_A["input_ids"])[1])
    # Packed rows: one past the largest sequence index (padding sequences count too,
    # the loader numbers every slot).
    return int(np.max(batch_A["sequence_index"])) + 1


def count_tokens(batch: Mapping[str, Any]) -> int:
    """Non-padding tokens of a host batch (for tokens_per_second)."""
    return int(np.sum(np.asarray(batch["segment_ids"]) > 0))


def count_sequence_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens of every sequence, prompt included, as TRL's `num_tokens` counts them (its
    attention mask over stacked rows): a shared prompt counts once per sequence, whatever
    the layout. Sequence k holds `1 + max position` tokens (positions restart per sequence
    and continue past a shared prompt)."""
    si = np.asarray(batch["sequence_index"]).reshape(-1)
    pos = np.asarray(batch["positions"]).reshape(-1)
    scored = si >= 0
    if not scored.any():
        return 0
    top = np.full(int(si.max()) + 1, -1, np.int64)
    np.maximum.at(top, si[scored], pos[scored])
    return int(np.sum(top[top >= 0] + 1))


def _global_count(n: int) -> int:
    """`n` summed over the processes of a multi-host run (each counts its own slice)."""
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(np.sum(np.asarray(multihost_utils.process_allgather(np.int32(n)), np.int64)))


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
        from jax.experimental import multihost_utils

        k = int(np.max(multihost_utils.process_allgather(np.int32(positions.shape[-1]))))
        positions = logprobs.scored_positions(np.asarray(batch_A["sequence_index"]), k)
    out["scored_positions"] = positions
    return out


# ------------------------------------------------------------------------ setup


def resolve_reference_mode(
    mode: str, loss_name: str, data_has_ref_logps: bool, with_lora: bool = False
) -> str:
    """The reference mode the step runs with ("frozen" | "precomputed" | "none" |
    "adapters_off"); with LoRA, auto picks "adapters_off" (the reference costs nothing)."""
    if not losses.needs_reference(loss_name):
        return "none"
    if mode == "adapters_off" and not with_lora:
        raise config_error(
            "reference.mode", "'adapters_off' is the LoRA policy with adapters disabled",
            "set lora.rank > 0 or use reference.mode=frozen",
        )  # fmt: skip
    if mode == "auto":
        if data_has_ref_logps:
            return "precomputed"
        return "adapters_off" if with_lora else "frozen"
    if mode == "cache":
        return "precomputed"
    if mode == "none":
        raise UserError(f"loss {loss_name!r} needs reference log-probs; reference.mode='none'")
    if mode == "precomputed" and not data_has_ref_logps:
        raise UserError(
            "reference.mode='precomputed' but the training batches carry no 'ref_logps' "
            "(write them with `dpo-jax ref-logps` or use reference.mode='cache')"
        )
    if mode not in ("frozen", "precomputed", "adapters_off"):
        raise UserError(f"unknown reference.mode {mode!r}")
    return mode


def make_mesh_from_config(config: ml_collections.ConfigDict) -> Mesh:
    """Mesh from `config.mesh` (after `jax.distributed` if multi-host)."""
    m = config.mesh
    return sharding.make_mesh(m.data, m.fsdp, m.tensor)


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

    def _context(self):
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
        with self._context():
            return fn.lower(state, self.place_batch(batch_A))

    def _run(self, state: TrainState, batch_A: Mapping[str, Any], n_seq: int, train: bool) -> Any:
        batch_A, n_seq = self.prepare_batch(batch_A, n_seq)
        table, step_fn = (self._train_fns, train_step) if train else (self._eval_fns, eval_step)
        fn = self._compiled(table, step_fn, batch_A, n_seq, train)
        with self._context():
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
    loss_state = losses.init_loss_state(loss_name) if obj.name == "preference" else None
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


# ------------------------------------------------------------------------ the loop


class NonFiniteLossError(UserError, FloatingPointError):
    """A step produced a NaN/Inf loss or gradient under nan_policy='stop'.

    A `UserError`: the console script prints its one line (the step and what to do).
    """


# Under nan_policy='skip', never stop for fewer skipped steps than this, so one bad
# batch early in a run (1 of 5 steps) does not end it.
MIN_SKIPS_BEFORE_STOP = 10


def check_skipped(step: int, row: Mapping[str, Any], max_fraction: float) -> None:
    """Warn about a skipped (non-finite) step; raise once too many were skipped.

    `row["skipped_steps"]` counts every skip of the run, resumed parts included.
    """
    skipped = int(row.get("skipped_steps", 0))
    log.warning(
        "step %d: non-finite loss or gradient (loss=%s, grad_norm=%s): update skipped "
        "(%d skipped so far)", step, row.get("loss"), row.get("grad_norm"), skipped,
    )  # fmt: skip
    if skipped > MIN_SKIPS_BEFORE_STOP and skipped > max_fraction * step:
        raise NonFiniteLossError(
            f"step {step}: {skipped} of {step} steps skipped for non-finite loss or gradient, "
            f"more than train.max_skipped_fraction={max_fraction}; the run is diverging "
            "(lower optim.learning_rate, or check the data), or raise the fraction"
        )


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state and the metric rows it logged."""

    state: TrainState
    history: list[dict[str, Any]]
    eval_history: list[dict[str, Any]]
    run_dir: paths.Path | None
    trainer: Trainer
    lowered: jax.stages.Lowered | None = None  # train(dry_run=True): the first step's program


def _group(iterator: Iterator[Mapping[str, Any]], size: int) -> Batch | None:
    micro = []
    for mb in iterator:
        micro.append(mb)
        if len(micro) == size:
            return stack_micro_batches(micro)
    return None


def evaluate(
    trainer: Trainer,
    state: TrainState,
    batches: Iterable[Mapping[str, Any]],
    layout: str = "stacked",
) -> dict[str, float]:
    """Held-out loss/metrics, keys prefixed `eval/`.

    Batches are weighted by their number of examples (SFT: target tokens, the
    objective's `weight_metric`), so a smaller remainder batch counts for what it
    holds: the result is the mean over examples (tokens).
    """
    obj = trainer.step_config.objective_fn
    total: dict[str, float] = {}
    counted: dict[str, Any] = {}  # subset means add sums and counts (CountedMean)
    weight = 0.0
    for mb in batches:
        batch_A = stack_micro_batches([mb])
        n_seq = batch_num_sequences(batch_A, layout)
        metrics = jax.device_get(trainer.evaluate(state, batch_A, n_seq))
        w = float(metrics[obj.weight_metric]) if obj.weight_metric else n_seq / 2
        for k, v in metrics.items():
            if is_counted(v):
                counted[k] = v if k not in counted else counted[k] + v
            else:
                total[k] = total.get(k, 0.0) + w * float(v)
        weight += w
    if not weight:
        raise UserError("evaluation data is empty")
    out = {k: v / weight for k, v in total.items()}
    if obj.weight_metric:  # a sum over the batches, not a mean
        out[obj.weight_metric] = weight
    out = {k: to_python(v) for k, v in obj.derive(out).items()}
    out.update(finalize_metrics(counted))
    return {f"eval/{k}": v for k, v in out.items()}


def run_loop(
    trainer: Trainer,
    state: TrainState,
    train_batches: Iterable[Mapping[str, Any]],
    *,
    num_steps: int,
    grad_accum_steps: int = 1,
    layout: str = "stacked",
    eval_batches: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
    eval_every: int = 0,
    log_every: int = 10,
    steps_per_epoch: float | None = None,
    writer: MetricsWriter | None = None,
    progress: Progress | None = None,
    checkpointer: Any = None,
    data_state: Callable[[], Any] | None = None,
    start_step: int = 0,
    num_tokens_start: int = 0,
    max_skipped_fraction: float = 0.1,
    eval_hook: Callable[[int, Any], Mapping[str, float]] | None = None,
) -> tuple[TrainState, list[dict], list[dict]]:
    """Drive `trainer.step` for steps `start_step+1 .. num_steps`; log, evaluate, save.

    Metrics are fetched from the device only every `log_every` steps (and at the end),
    so dispatch runs ahead of the host. Under nan_policy='stop' a non-finite step
    raises NonFiniteLossError naming it (the state still holds the last good params).
    `num_tokens` is cumulative as in TRL, from `num_tokens_start` (tokens seen before
    `start_step`).
    Under nan_policy='skip' every skipped step is warned about, and once more than
    `max_skipped_fraction` of the steps so far (and more than `MIN_SKIPS_BEFORE_STOP`)
    were skipped the run stops the same way.
    `eval_hook(step, params)` runs with `eval_batches` (every `eval_every` steps and at
    the end); its metrics join that step's eval row, written before the step's
    checkpoint, so a resumed run keeps the rows of the steps before the kill.
    """
    history: list[dict] = []
    eval_history: list[dict] = []
    pending: list[tuple[int, dict, float]] = []
    throughput = Throughput()
    iterator = iter(train_batches)
    nan_stop = trainer.step_config.nan_policy == "stop"
    seen = int(num_tokens_start)

    def flush() -> None:
        if not pending:
            return
        fetched = jax.device_get([m for _, m, _ in pending])
        rate = throughput.rate()
        for (step, _, tokens), metrics in zip(pending, fetched, strict=True):
            row = {k: to_python(v) for k, v in finalize_metrics(metrics).items()}
            if nan_stop and row.get("nonfinite"):
                raise NonFiniteLossError(
                    f"step {step}: non-finite loss or gradient (loss={row.get('loss')}, "
                    f"grad_norm={row.get('grad_norm')}); the update was not applied. "
                    "Set train.nan_policy='skip' to skip such steps instead."
                )
            if row.get("nonfinite"):
                check_skipped(step, row, max_skipped_fraction)
            row["tokens_per_second"] = rate
            row["num_tokens"] = tokens
            if steps_per_epoch:
                row["epoch"] = step / steps_per_epoch
            row["step"] = step
            history.append(row)
            if writer is not None:
                writer.write(step, row)
        if progress is not None:
            progress.update(pending[-1][0], history[-1])
        pending.clear()

    def run_eval(step: int) -> None:
        if eval_batches is None and eval_hook is None:
            return
        row = {} if eval_batches is None else evaluate(trainer, state, eval_batches(), layout)
        if eval_hook is not None:
            row.update({k: to_python(v) for k, v in eval_hook(step, state.params).items()})
        row["step"] = step
        eval_history.append(row)
        if writer is not None:
            writer.write(step, row)
        if progress is not None and eval_batches is not None:
            progress.write(
                f"step {step}: eval loss {row.get('eval/loss', float('nan')):.4f} "
                f"acc {row.get('eval/rewards/accuracies', float('nan')):.3f}"
            )

    for step in range(start_step + 1, num_steps + 1):
        batch_A = _group(iterator, grad_accum_steps)
        if batch_A is None:
            log.warning("training data ran out after %d steps", step - 1)
            break
        throughput.add(count_tokens(batch_A))
        seen += _global_count(count_sequence_tokens(batch_A))
        state, metrics = trainer.step(state, batch_A, batch_num_sequences(batch_A, layout))
        pending.append((step, metrics, seen))
        if step % max(log_every, 1) == 0 or step == num_steps:
            flush()
        if eval_every and step % eval_every == 0 and step != num_steps:
            flush()
            run_eval(step)
        if checkpointer is not None:
            # Rows up to a saved step must be on disk before the save (exact resume), and
            # a NaN step under "stop" must raise before it could be checkpointed.
            should = getattr(checkpointer, "should_save", None)
            if should is None or should(step):
                flush()
            data = data_state() if data_state is not None else None
            cstate = checkpointable(state, trainer.step_config)
            checkpointer.maybe_save(step, cstate, data)  # skipped_steps lives in the state
            # Preempted at the last step: finish normally (its evaluation and final save
            # below), or the run would end complete but without its final evaluation.
            if getattr(checkpointer, "preempted", False) and step < num_steps:
                flush()
                checkpointer.maybe_save(step, cstate, data, force=True)
                log.warning("preempted: saved step %d and stopped", step)
                return state, history, eval_history
    flush()
    last = int(jax.device_get(state.step))
    run_eval(last)
    if checkpointer is not None:
        data = data_state() if data_state is not None else None
        checkpointer.maybe_save(last, checkpointable(state, trainer.step_config), data, force=True)
    return state, history, eval_history


# ------------------------------------------------------------------------ config-driven


def save_config(config: ml_collections.ConfigDict, run_dir: paths.PathLike) -> None:
    """Write the run's config as JSON next to its metrics."""
    run_dir = paths.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(
        run_dir / CONFIG_FILENAME, json.dumps(config.to_dict(), indent=2, default=str)
    )


def _attention_choice(config: ml_collections.ConfigDict) -> str:
    """`model.attention`, checked against the backends of `dpo_jax.models.attention`."""
    choice = config.model.attention
    if choice not in attention.IMPLS:
        raise errors.config_error(
            "model.attention", f"{choice!r} is not an attention backend",
            f"choose one of {', '.join(attention.IMPLS)}",
        )  # fmt: skip
    return choice


def _model_from_config(config: ml_collections.ConfigDict) -> tuple[models.ModelConfig, Any]:
    path = config.model.path
    if not path:
        raise UserError("config.model.path is empty: point it at a Hugging Face model directory")
    # The loader lays the params out for the config (stacked per layer when scanned).
    overrides: dict[str, Any] = {"scan_layers": bool(config.model.scan_layers)}
    if config.model.remat:
        overrides["remat"] = config.model.remat
    overrides["attention_impl"] = _attention_choice(config)
    return hf.load_hf(
        path, dtype=config.model.dtype, param_dtype=config.model.param_dtype, **overrides
    )


def _reference_from_config(
    config: ml_collections.ConfigDict, model_config: models.ModelConfig
) -> Any:
    """Params of `reference.path`, laid out as the policy's (`model_config`'s scan_layers
    and remat: the layout the step's apply expects).

    The reference runs through the policy's model apply, so its architecture must match.
    """
    ref_config, ref_params = hf.load_hf(
        config.reference.path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
        scan_layers=model_config.scan_layers, remat=model_config.remat,
    )  # fmt: skip
    ignore = ("dtype", "param_dtype", "remat", "attention_impl", "bos_token_id",
              "eos_token_id", "pad_token_id", "init_std")  # fmt: skip
    policy = dataclasses.asdict(model_config)
    differs = [
        k for k, v in dataclasses.asdict(ref_config).items()
        if k not in ignore and policy.get(k) != v
    ]  # fmt: skip
    if differs:
        k = differs[0]
        raise config_error(
            "reference.path",
            f"{config.reference.path} has {k}={getattr(ref_config, k)!r}, the policy "
            f"{getattr(model_config, k)!r} ({len(differs)} architecture field(s) differ)",
            "the reference must have the policy's architecture",
        )
    return ref_params


def train(
    config: ml_collections.ConfigDict,
    *,
    train_data: Iterable[Mapping[str, Any]] | None = None,
    eval_data: Iterable[Mapping[str, Any]]
    | Callable[[], Iterable[Mapping[str, Any]]]
    | None = None,
    model_config: models.ModelConfig | None = None,
    params: Any = None,
    ref_params: Any = None,
    checkpointer: Any = None,
    mesh: Mesh | None = None,
    eval_hook: Callable[[int, Any], Mapping[str, float]] | None = None,
    dry_run: bool = False,
    reward: Any = None,
) -> TrainResult:
    """Train a policy as `config` says; returns the final state and metric history.

    `train_data`/`eval_data` (iterables of host micro-batches) and `model_config` +
    `params` override what the config would load, for
    experiments, notebooks and tests; `params` must be reproducible for a resume. With
    `train_data` given, `config.num_steps` must be set. `eval_hook(step, params) ->
    {name: float}` runs every `train.eval_every` steps and at the last step, its metrics
    in that step's `metrics.jsonl` row (see `run_loop`).

    `dry_run=True` builds the same Trainer from the same config and data (params may be
    abstract: `jax.ShapeDtypeStruct` leaves), runs nothing and writes nothing, and
    returns the result with `lowered`: the program of the first training step,
    lowered (`Trainer.lower`) -- exactly what the run would execute.

    `objective.name="ppo"` (`dpo_jax.ppo_loop`): `train_data` is the prompt pool (token
    ids per prompt; default: `data.train`'s prompts), `reward(samples) -> [S]` scores a
    rollout (default: `config.ppo.reward`'s spec), `config.ppo` sets the phase (its
    length replaces `num_steps`); `history` holds one row per rollout.
    """
    # A resolved deep copy: the caller may reuse and mutate its config between runs.
    config = ml_collections.ConfigDict(config).copy_and_resolve_references()
    # Every mistake in the config surfaces here, before any device work or file write.
    validate.validate(config)
    validate.check_paths(
        config, model=model_config is None or params is None, data=train_data is None
    )
    # One name or a TRL-style mix; unknown names fail before any compilation.
    loss_name = losses.parse_loss_spec(config.loss.name, config.loss.weights)
    # LoRA settings are validated before any device work
    lora_config = lora.config_from(config.lora, config.reference)
    if lora_config is not None and config.reference.ref_model_sync_steps > 0:
        raise config_error(
            "reference.ref_model_sync_steps", "TR-DPO syncing needs a full policy, not LoRA",
            "set it to 0 or lora.rank=0",
        )  # fmt: skip
    sharding.maybe_initialize_distributed(config.mesh.multihost)
    # SIGTERM from here on checkpoints at the first step boundary (it used to kill the
    # run without a save while it loaded, compiled or restored).
    sigterm_save = bool(config.checkpoint.enabled or checkpointer) and not dry_run
    with guards.EarlySigterm(enabled=sigterm_save) as sigterm:
        return _train(
            config, sigterm, loss_name, lora_config, train_data=train_data,
            eval_data=eval_data, model_config=model_config, params=params,
            ref_params=ref_params, checkpointer=checkpointer, mesh=mesh,
            eval_hook=eval_hook, dry_run=dry_run, reward=reward,
        )  # fmt: skip


def _train(
    config: ml_collections.ConfigDict,
    sigterm: guards.EarlySigterm,
    loss_name: losses.LossSpec,
    lora_config: lora.LoraConfig | None,
    *,
    train_data: Any,
    eval_data: Any,
    model_config: models.ModelConfig | None,
    params: Any,
    ref_params: Any,
    checkpointer: Any,
    mesh: Mesh | None,
    eval_hook: Callable[[int, Any], Mapping[str, float]] | None = None,
    dry_run: bool = False,
    reward: Any = None,
) -> TrainResult:
    """`train` after validation, inside the early-SIGTERM guard."""
    settings = step_settings(config)  # the step's settings, read once
    hyper = settings["loss_hyper"]
    preference = settings["objective"] == "preference"
    if preference:
        losses.check_options(loss_name, hyper)
        for message in losses.trl_differences(loss_name, hyper):
            log.warning("differs from TRL: %s", message)
    mesh = mesh or make_mesh_from_config(config)
    if model_config is None or params is None:
        model_config, params = _model_from_config(config)
    if preference and config.reference.mode in ("precomputed", "cache"):
        # before the (possibly long) reference cache pass; auto is checked once resolved
        early = resolve_reference_mode(config.reference.mode, loss_name, True)
        check_loss_options(loss_name, hyper, early)

    needs_ref = preference and losses.needs_reference(loss_name)
    ppo_cfg = ppo_loop.PPOConfig.from_config(config) if settings["objective"] == "ppo" else None
    if ppo_cfg is not None:  # prompts and a reward (given, or data.train and ppo.reward)
        train_data, reward = ppo_loop.inputs_from_config(config, train_data, reward)
        needs_ref = True  # the rollouts' reference
    if ref_params is None and config.reference.path and needs_ref:
        ref_params = _reference_from_config(config, model_config)
    if train_data is None:
        train_data, eval_data, steps_per_epoch = load_data(
            config, model_config, params if ref_params is None else ref_params
        )
    else:
        steps_per_epoch = None
    num_steps = int(config.num_steps) if ppo_cfg is None else ppo_cfg.num_steps
    if num_steps <= 0:
        if not steps_per_epoch:
            raise UserError("config.num_steps must be > 0 when the data length is unknown")
        num_steps = max(1, math.ceil(steps_per_epoch * float(config.num_epochs)))

    first_iter = iter(train_data)
    first = next(first_iter, None)
    if first is None:
        raise UserError("training data is empty")
    train_iter = _chain_first(first, first_iter)
    reference = "none"  # SFT and the reward model read no reference model
    if preference:
        reference = resolve_reference_mode(
            config.reference.mode, loss_name, "ref_logps" in first, lora_config is not None
        )

    trainer, state = build_trainer(
        model_config,
        params,
        mesh=mesh,
        optim_config=config.optim.to_dict(),
        total_steps=num_steps,
        reference=reference,
        seed=config.seed,
        ref_params=ref_params,
        lora_config=lora_config,
        rules=sharding.validate_rules(config.mesh.rules),
        **settings,
    )
    if dry_run:  # the first step's batch, grouped and counted as run_loop does
        batch_A = (
            _group(train_iter, config.grad_accum_steps) if ppo_cfg is None
            else ppo_loop.example_step_batch(ppo_cfg, train_data, trainer)  # a PPO update's
        )  # fmt: skip
        if batch_A is None:
            raise UserError(f"fewer than grad_accum_steps={config.grad_accum_steps} batches")
        n_seq = batch_num_sequences(batch_A, config.data.layout)
        lowered = trainer.lower(state, batch_A, n_seq)
        return TrainResult(state, [], [], None, trainer, lowered)
    model_config = trainer.model_config  # padded vocabulary on a tensor axis > 1
    if ppo_cfg is not None:  # the rollouts' frozen reference (never checkpointed)
        ppo_ref = ppo_loop.reference_params(trainer, state, ref_params)
    # The state holds what training needs; drop our reference to the loaded copy (with
    # LoRA it is not the state's (cast) base and would stay resident).
    params = ref_params = None
    run_dir = paths.Path(config.run_dir) if config.run_dir else None
    is_main = jax.process_index() == 0

    if checkpointer is None and config.checkpoint.enabled:
        checkpointer = make_checkpointer(config, model_config, run_dir)
    if checkpointer is not None:
        sigterm.hand_over(checkpointer)
    start_step = num_tokens_start = 0
    restored = None
    if checkpointer is not None:
        try:
            restored = checkpointer.restore_or_none(abstract_checkpointable(trainer, state))
            if restored is not None:
                state = _reattach_reference(restored.state, state)
                start_step = int(restored.step)
                if hasattr(train_data, "set_state") and restored.data_state is not None:
                    train_data.set_state(restored.data_state)  # refuses other data
                    train_iter = iter(train_data)
                else:  # a plain iterable: skip what the restored steps consumed
                    # (from train_iter, which starts at the first batch: a generator's
                    # iter() would continue after the one already taken)
                    skip = start_step * config.grad_accum_steps
                    train_iter = itertools.islice(train_iter, skip, None)
                log.info("resumed from step %d", start_step)
                num_tokens_start = _logged_num_tokens(run_dir, start_step)
        except BaseException as error:  # a refused resume: release Orbax and SIGTERM
            _close_all(checkpointer, failed=error)
            raise
    # Only once the resume was accepted: a refused one leaves config.json, the metrics
    # and the TensorBoard files of the run as they were.
    writer = None
    if run_dir is not None:
        if is_main:
            save_config(config, run_dir)
        writer = MetricsWriter(run_dir, tensorboard=config.train.tensorboard, enabled=is_main)

    eval_fn = None
    if eval_data is not None:
        eval_fn = eval_data if callable(eval_data) else (lambda: eval_data)
    progress = Progress(num_steps, start_step, enabled=config.train.progress and is_main)
    quiet = guards.QuietDiskFull()
    logging.getLogger("absl").addFilter(quiet)
    try:
        loop = run_loop
        if ppo_cfg is not None:  # rollouts, then PPO epochs of the same trainer.step
            restored_data = restored.data_state if restored is not None else None
            loop = ppo_loop.phase_loop(ppo_cfg, config, ppo_ref, train_data, reward, restored_data)
        state, history, eval_history = loop(
            trainer,
            state,
            train_iter,
            num_steps=num_steps,
            grad_accum_steps=config.grad_accum_steps,
            layout=config.data.layout,
            eval_batches=eval_fn,
            eval_every=config.train.eval_every,
            log_every=config.train.log_every,
            steps_per_epoch=steps_per_epoch,
            writer=writer,
            progress=progress,
            checkpointer=checkpointer,
            data_state=getattr(train_data, "get_state", None),
            start_step=start_step,
            num_tokens_start=num_tokens_start,
            max_skipped_fraction=config.train.max_skipped_fraction,
            eval_hook=eval_hook,
        )
        _close_all(progress, writer, checkpointer)
    except BaseException as error:
        # Close what is open without letting a second failure (a full disk fails every
        # write) hide the first; a full disk becomes one line naming the run directory.
        _close_all(progress, writer, checkpointer, failed=error)
        if run_dir is not None and guards.is_disk_full(error):
            raise guards.disk_full_error(run_dir, error) from error
        raise
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    if config.checkpoint.export_hf and run_dir is not None and is_main:
        export.export_hf(run_dir, run_dir / "hf")
    return TrainResult(state, history, eval_history, run_dir, trainer)


def _close_all(*closeables: Any, failed: BaseException | None = None) -> None:
    """Close each of `closeables` (None skipped). After `failed`, errors while closing are
    logged in one line and dropped; otherwise the first is raised after all were closed."""
    first: BaseException | None = None
    for c in closeables:
        if c is None:
            continue
        try:
            c.close()
        except Exception as e:  # noqa: BLE001 -- keep closing the others
            if failed is not None:
                log.warning("while stopping after %s: %s.close() failed: %s",
                            type(failed).__name__, type(c).__name__, e)  # fmt: skip
            elif first is None:
                first = e
    if first is not None:
        raise first


def make_checkpointer(
    config: ml_collections.ConfigDict, model_config: models.ModelConfig, run_dir: paths.Path | None
) -> Any:
    """The Orbax checkpointer `config.checkpoint` asks for (saves under run_dir/checkpoints)."""
    if run_dir is None:
        raise UserError("checkpoint.enabled needs config.run_dir")
    # A tokenizer directory is enough: the checkpointer copies its files for export.
    tokenizer = config.tokenizer or config.model.path or None
    return checkpoint.Checkpointer.from_config(
        config, model_config=model_config, tokenizer=tokenizer
    )


def _logged_num_tokens(run_dir: paths.Path | None, step: int) -> int:
    """`num_tokens` of the metrics row of `step` (a resumed run keeps counting from it)."""
    path = run_dir / "metrics.jsonl" if run_dir is not None else None
    rows = read_jsonl(path) if path is not None and path.exists() else []
    found = [r["num_tokens"] for r in rows if r.get("step") == step and "num_tokens" in r]
    if not found:
        log.warning("no metrics row for step %d: num_tokens restarts from 0", step)
        return 0
    return int(found[-1])


def _reattach_reference(restored: TrainState, fresh: TrainState) -> TrainState:
    if restored.ref_params is None and fresh.ref_params is not None:
        restored = restored.replace(ref_params=fresh.ref_params)
    if restored.base_params is None and fresh.base_params is not None:
        restored = restored.replace(base_params=fresh.base_params)
    return restored


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _check_unpaired_weights(config: ml_collections.ConfigDict, labels: np.ndarray) -> None:
    """KTO's [1, 4/3] rule on the training set's label counts (warns outside it)."""
    names = losses.loss_names(losses.parse_loss_spec(config.loss.name, config.loss.weights))
    fn = losses.get(names[0])
    params = inspect.signature(fn).parameters
    if "desirable_weight" not in params and "undesirable_weight" not in params:
        return
    hyper = config.loss.hyper

    def weight(name: str) -> float:
        if name in hyper:
            return float(hyper[name])
        default = params[name].default if name in params else 1.0
        return float(default) if default is not inspect.Parameter.empty else 1.0

    n_desirable = int(np.sum(labels))
    losses.check_kto_weights(
        weight("desirable_weight"), weight("undesirable_weight"),
        n_desirable, len(labels) - n_desirable,
    )  # fmt: skip


def _check_ref_fingerprints(
    config: ml_collections.ConfigDict, tokenizer: Any, spec: dict[str, Any]
) -> None:
    """Refuse precomputed reference columns computed with other settings (`ref_fingerprint`)."""
    trusted = ref_fingerprint.check_data(config, tokenizer, spec)
    if trusted:
        log.warning(
            "%s: %d rows carry reference log-probs without a fingerprint; used as they are"
            " (reference.trust_precomputed=True): nothing shows they score this run's tokens",
            spec["path"], trusted,
        )  # fmt: skip


def load_data(
    config: ml_collections.ConfigDict, model_config: models.ModelConfig, ref_params: Any
) -> tuple[Any, Callable[[], Iterable[Mapping[str, Any]]] | None, float]:
    """(train iterator, eval-batches factory or None, steps per epoch) from `config.data`.

    Tokenizes with TRL's convention via `dpo_jax.data`. With `reference.mode="cache"`
    (or a held-out split lacking the columns the training split has) the reference
    log-probs are computed in a first pass and cached in the run directory.
    """
    from transformers import AutoTokenizer

    loss_name = losses.parse_loss_spec(config.loss.name, config.loss.weights)
    preference = config.objective.name == "preference"
    paired = losses.is_paired(loss_name) or not preference
    if not config.data.train:
        raise UserError("config.data.train is empty: point it at the training data")
    if config.batch_size % config.grad_accum_steps:
        raise UserError(
            f"batch_size={config.batch_size} is not divisible by grad_accum_steps={config.grad_accum_steps}"
        )
    micro_pairs = config.batch_size // config.grad_accum_steps
    if config.data.layout == "prefix_shared" and config.data.truncation_mode == "keep_end":
        raise config_error(
            "data.truncation_mode",
            "TRL's keep_end truncates chosen and rejected independently, so their prompts"
            " may differ and data.layout='prefix_shared' cannot share them",
            "use keep_start, keep_end_prompt, or the stacked/packed layout",
        )
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    run_dir = config.run_dir or None
    train_spec = data.spec_from_config(config, config.data.train, paired)
    train_set = data.load_preference_data(train_spec, tokenizer, run_dir)
    if not paired:
        _check_unpaired_weights(config, train_set.dense["label"])
    needs_ref = preference and losses.needs_reference(loss_name)
    has_ref = "ref_chosen" in train_set.dense
    if needs_ref and has_ref and config.reference.mode != "frozen":
        _check_ref_fingerprints(config, tokenizer, train_spec)
    if needs_ref and config.reference.mode == "cache" and not has_ref:
        if not run_dir:
            raise UserError("reference.mode='cache' needs config.run_dir for the cache file")
        train_set = reference.cached_ref_logps(
            run_dir, model_config, ref_params, train_set, micro_pairs
        )
        has_ref = True
    train_iter = data.make_train_iterator(
        train_set, micro_pairs, config.data.layout, seed=config.seed,
        shuffle=config.data.shuffle, pad_id=pad_id,
    )  # fmt: skip
    steps_per_epoch = (len(train_set) // micro_pairs) / config.grad_accum_steps
    left_out = len(train_set) % micro_pairs
    if left_out:
        # TRL trains a smaller last batch; static shapes here drop it (docs/FROM_TRL.md).
        log.warning(
            "%d training examples, %d per micro-batch: each epoch leaves out %d of them"
            " (%s); make the data a multiple of batch_size / grad_accum_steps to use all",
            len(train_set), micro_pairs, left_out,
            "a different subset each epoch" if config.data.shuffle else "always the last ones",
        )  # fmt: skip

    eval_fn = None
    if config.data.eval:
        eval_spec = data.spec_from_config(config, config.data.eval, paired)
        eval_set = data.load_preference_data(eval_spec, tokenizer, run_dir)
        if needs_ref and has_ref and "ref_chosen" in eval_set.dense:
            _check_ref_fingerprints(config, tokenizer, eval_spec)
        if needs_ref and has_ref and "ref_chosen" not in eval_set.dense:
            if not run_dir:
                raise UserError("held-out reference log-probs need config.run_dir for the cache")
            eval_set = reference.cached_ref_logps(
                run_dir, model_config, ref_params, eval_set, micro_pairs
            )
        num_eval = config.data.num_eval_examples
        eval_list = data.eval_batches(
            eval_set, min(micro_pairs, len(eval_set)), config.data.layout,
            limit=num_eval if num_eval > 0 else None, process_index=jax.process_index(),
            process_count=jax.process_count(), pad_id=pad_id,
        )  # fmt: skip
        eval_fn = lambda: eval_list

    return train_iter, eval_fn, steps_per_epoch
