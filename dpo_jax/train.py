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
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    configs,
    data,
    errors,
    export,
    guards,
    logprobs,
    lora,
    losses,
    models,
    objectives,
    online,
    optim,
    paths,
    ref_fingerprint,
    reference,
    sharding,
)
from dpo_jax.configs import validate
from dpo_jax.errors import UserError, config_error
from dpo_jax.loop import (  # noqa: F401  (re-exported: the loop's names as train.X)
    BATCH_KEYS,
    MIN_SKIPS_BEFORE_STOP,
    MicroBatchSource,
    NonFiniteLossError,
    StepBatch,
    StepSource,
    batch_num_sequences,
    check_skipped,
    count_sequence_tokens,
    count_tokens,
    evaluate,
    global_count,
    group_micro_batches,
    run_loop,
    stack_micro_batches,
)
from dpo_jax.metrics import MetricsWriter, Progress, read_jsonl
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


# ------------------------------------------------------------------------ the loop


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state and the metric rows it logged."""

    state: TrainState
    history: list[dict[str, Any]]
    eval_history: list[dict[str, Any]]
    run_dir: paths.Path | None
    trainer: Trainer
    lowered: jax.stages.Lowered | None = None  # train(dry_run=True): the first step's program


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

    On-policy objectives (`dpo_jax.online`: "ppo", ...): `train_data` is the prompt pool
    (token ids per prompt; default: `data.train`'s prompts), `reward(samples) -> [S]`
    scores a rollout (default: `config.online.reward`'s spec), `config.online` and the
    method's section set the phase (its length replaces `num_steps`); each `history` row
    carries its rollout's metrics (`objective/*`, `rollout`).
    """
    # A resolved deep copy: the caller may reuse and mutate its config between runs.
    config = ml_collections.ConfigDict(config).copy_and_resolve_references()
    configs.migrate_deprecated(config)  # keys set under an old name (ppo.reward, ...)
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
    # An objective that reads `loss.*` (offline preference, online DPO)
    preference = objectives.get(settings["objective"]).uses_loss
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

    on_policy = online.method(config)  # trained on rollouts instead of the data's batches
    if on_policy is not None:  # prompts and a reward (given, or data.train and online.reward)
        train_data, reward = online.inputs_from_config(config, train_data, reward)
    # the rollouts' scoring pass reads a reference (online.METHODS: PPO's KL penalty, ...)
    needs_ref = on_policy is not None or (preference and losses.needs_reference(loss_name))
    if ref_params is None and config.reference.path and needs_ref:
        ref_params = _reference_from_config(config, model_config)
    if train_data is None:
        train_data, eval_data, steps_per_epoch = load_data(
            config, model_config, params if ref_params is None else ref_params
        )
    else:
        steps_per_epoch = None
    num_steps = int(config.num_steps)
    if on_policy is not None:  # the phase's length: rollouts x updates per rollout
        num_steps = on_policy.settings(config).num_steps
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
    if on_policy is not None:  # the reference is in the rollout's batch columns, if any
        reference = on_policy.step_reference(config)
    elif preference:
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
    source: StepSource = MicroBatchSource(
        train_iter, config.grad_accum_steps, config.data.layout,
        getattr(train_data, "get_state", None),
    )  # fmt: skip
    if on_policy is not None:
        source = online.build_source(
            config, trainer, state, train_data, reward, ref_params, dry_run=dry_run
        )
    if dry_run:  # the first step's batch, as the loop gets it from the source
        first_step = (
            source.example_step(trainer, on_policy.columns(config)) if on_policy is not None
            else source.next_step(trainer, state)
        )  # fmt: skip
        if first_step is None:
            raise UserError(f"fewer than grad_accum_steps={config.grad_accum_steps} batches")
        lowered = trainer.lower(state, first_step.batch_A, first_step.n_seq)
        return TrainResult(state, [], [], None, trainer, lowered)
    model_config = trainer.model_config  # padded vocabulary on a tensor axis > 1
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
                if on_policy is not None:  # the next rollout and the method's controller
                    source.set_state(restored.data_state)
                elif hasattr(train_data, "set_state") and restored.data_state is not None:
                    train_data.set_state(restored.data_state)  # refuses other data
                    source = MicroBatchSource(
                        iter(train_data), config.grad_accum_steps, config.data.layout,
                        train_data.get_state,
                    )  # fmt: skip
                else:  # a plain iterable: skip what the restored steps consumed
                    # (from train_iter, which starts at the first batch: a generator's
                    # iter() would continue after the one already taken)
                    skip = start_step * config.grad_accum_steps
                    source = MicroBatchSource(
                        itertools.islice(train_iter, skip, None), config.grad_accum_steps,
                        config.data.layout,
                    )  # fmt: skip
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
        state, history, eval_history = run_loop(
            trainer,
            state,
            source,
            num_steps=num_steps,
            layout=config.data.layout,
            eval_batches=eval_fn,
            eval_every=config.train.eval_every,
            log_every=config.train.log_every,
            steps_per_epoch=steps_per_epoch,
            writer=writer,
            progress=progress,
            checkpointer=checkpointer,
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
