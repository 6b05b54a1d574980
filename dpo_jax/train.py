"""Preference training: setup, the loop, the Python API (`dpo-jax train`: dpo_jax/cli/train.py).

    result = dpo_jax.train.train(config)          # config: ml_collections ConfigDict
    result.state, result.history, result.eval_history

`config` follows `dpo_jax/configs/default.py`. From a notebook, `train(config,
train_data=..., eval_data=...)` also accepts iterables of host micro-batches (dicts of
numpy arrays, docs/CONTRACTS.md "Batches"), and a loss registered in the notebook with
`@losses.register("mine")` is used by setting `config.loss.name = "mine"`.

`train` is a run's setup, cut into named steps: validate the config, load the model,
reference and data (`dpo_jax.loading`), build the Trainer (`dpo_jax.trainer`), restore
the newest usable checkpoint (`dpo_jax.checkpoint`), then run the one loop
(`dpo_jax.loop`) with metrics, evaluation and checkpoint hooks. The pure jitted step
lives in `dpo_jax.train_step`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dpo_jax import (
    checkpoint,
    configs,
    export,
    guards,
    loading,
    lora,
    losses,
    models,
    objectives,
    online,
    paths,
    sharding,
    startup,
)
from dpo_jax import trainer as trainer_lib
from dpo_jax.callbacks import Callbacks
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
from dpo_jax.train_step import TrainState, check_loss_options, step_settings

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.json"
Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state and the metric rows it logged."""

    state: TrainState
    history: list[dict[str, Any]]
    eval_history: list[dict[str, Any]]
    run_dir: paths.Path | None
    trainer: trainer_lib.Trainer
    lowered: jax.stages.Lowered | None = None  # train(dry_run=True): the first step's program


def save_config(config: ml_collections.ConfigDict, run_dir: paths.PathLike) -> None:
    """Write the run's config as JSON next to its metrics."""
    run_dir = paths.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(
        run_dir / CONFIG_FILENAME, json.dumps(config.to_dict(), indent=2, default=str)
    )


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
    callbacks: Callbacks | None = None,
) -> TrainResult:
    """Train a policy as `config` says; returns the final state and metric history.

    `train_data`/`eval_data` (iterables of host micro-batches) and `model_config` +
    `params` override what the config would load, for
    experiments, notebooks and tests; `params` must be reproducible for a resume. With
    `train_data` given, `config.num_steps` must be set. `eval_hook(step, params) ->
    {name: float}` runs every `train.eval_every` steps and at the last step, its metrics
    in that step's `metrics.jsonl` row (see `run_loop`); `callbacks`
    (`dpo_jax.callbacks.Callbacks`) adds `on_log`, `on_eval` (as `eval_hook`), `on_save`.

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
    sigterm_save = (
        bool(config.checkpoint.enabled and config.run_dir or checkpointer) and not dry_run
    )
    with guards.EarlySigterm(enabled=sigterm_save) as sigterm:
        return _train(
            config, sigterm, loss_name, lora_config, train_data=train_data,
            eval_data=eval_data, model_config=model_config, params=params,
            ref_params=ref_params, checkpointer=checkpointer, mesh=mesh,
            eval_hook=eval_hook, dry_run=dry_run, reward=reward, callbacks=callbacks,
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
    callbacks: Callbacks | None = None,
) -> TrainResult:
    """`train` after validation, inside the early-SIGTERM guard."""
    settings = step_settings(config)  # the step's settings, read once
    preference = _check_loss(loss_name, settings)
    mesh = mesh or trainer_lib.make_mesh_from_config(config)
    if model_config is None or params is None:
        model_config, params = loading.model_from_config(config)
    on_policy = online.method(config)  # trained on rollouts instead of the data's batches
    train_data, eval_data, ref_params, reward, steps_per_epoch = _load_inputs(
        config, loss_name, settings, preference, on_policy, model_config, params,
        train_data=train_data, eval_data=eval_data, ref_params=ref_params, reward=reward,
    )  # fmt: skip
    num_steps = _num_steps(config, on_policy, steps_per_epoch)
    first_iter = iter(train_data)
    first = next(first_iter, None)
    if first is None:
        raise UserError("training data is empty")
    train_iter = _chain_first(first, first_iter)
    reference = _step_reference(config, loss_name, preference, on_policy, first, lora_config)

    trainer, state = trainer_lib.build_trainer(
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
    if dry_run:
        return _dry_run(config, trainer, state, source, on_policy, reference, num_steps)
    model_config = trainer.model_config  # padded vocabulary on a tensor axis > 1
    # The state holds what training needs; drop our reference to the loaded copy (with
    # LoRA it is not the state's (cast) base and would stay resident).
    params = ref_params = None
    run_dir = paths.Path(config.run_dir) if config.run_dir else None

    # (no run_dir: nothing is written, checkpoints included)
    if checkpointer is None and config.checkpoint.enabled and run_dir is not None:
        checkpointer = make_checkpointer(config, model_config, run_dir)
    if checkpointer is not None:
        sigterm.hand_over(checkpointer)
    start_step = num_tokens_start = 0
    if checkpointer is not None:
        state, source, start_step, num_tokens_start = _resume(
            config, checkpointer, trainer, state, source, on_policy,
            train_data=train_data, train_iter=train_iter, run_dir=run_dir,
        )  # fmt: skip
    return _run(
        config, trainer, state, source, checkpointer, run_dir,
        num_steps=num_steps, steps_per_epoch=steps_per_epoch, start_step=start_step,
        num_tokens_start=num_tokens_start, eval_data=eval_data, eval_hook=eval_hook,
        reference=reference, callbacks=callbacks,
    )  # fmt: skip


def _check_loss(loss_name: losses.LossSpec, settings: Mapping[str, Any]) -> bool:
    """Whether the objective reads `loss.*` (offline preference, online DPO); if so its
    options are checked and where they differ from TRL is logged."""
    preference = objectives.get(settings["objective"]).uses_loss
    if preference:
        hyper = settings["loss_hyper"]
        losses.check_options(loss_name, hyper)
        for message in losses.trl_differences(loss_name, hyper):
            log.warning("differs from TRL: %s", message)
    return preference


def _load_inputs(
    config: ml_collections.ConfigDict,
    loss_name: losses.LossSpec,
    settings: Mapping[str, Any],
    preference: bool,
    on_policy: Any,
    model_config: models.ModelConfig,
    params: Any,
    *,
    train_data: Any,
    eval_data: Any,
    ref_params: Any,
    reward: Any,
) -> tuple[Any, Any, Any, Any, float | None]:
    """(train data, eval data, reference params, reward, steps per epoch): what the caller
    gave, the rest loaded as the config says (`dpo_jax.loading`, `online`)."""
    if preference and config.reference.mode in ("precomputed", "cache"):
        # before the (possibly long) reference cache pass; auto is checked once resolved
        early = loading.resolve_reference_mode(config.reference.mode, loss_name, True)
        check_loss_options(loss_name, settings["loss_hyper"], early)
    if on_policy is not None:  # prompts and a reward (given, or data.train and online.reward)
        train_data, reward = online.inputs_from_config(config, train_data, reward)
    # the rollouts' scoring pass reads a reference (online.METHODS: PPO's KL penalty, ...)
    needs_ref = on_policy is not None or (preference and losses.needs_reference(loss_name))
    if ref_params is None and config.reference.path and needs_ref:
        ref_params = loading.reference_from_config(config, model_config)
    steps_per_epoch = None
    if train_data is None:
        train_data, eval_data, steps_per_epoch = loading.load_data(
            config, model_config, params if ref_params is None else ref_params
        )
    return train_data, eval_data, ref_params, reward, steps_per_epoch


def _num_steps(config: ml_collections.ConfigDict, on_policy: Any, steps_per_epoch: Any) -> int:
    """The run's optimizer steps: `num_steps`, the on-policy phase's length, or epochs."""
    num_steps = int(config.num_steps)
    if on_policy is not None:  # the phase's length: rollouts x updates per rollout
        num_steps = on_policy.settings(config).num_steps
    if num_steps <= 0:
        if not steps_per_epoch:
            raise UserError("config.num_steps must be > 0 when the data length is unknown")
        num_steps = max(1, math.ceil(steps_per_epoch * float(config.num_epochs)))
    return num_steps


def _step_reference(
    config: ml_collections.ConfigDict,
    loss_name: losses.LossSpec,
    preference: bool,
    on_policy: Any,
    first: Mapping[str, Any],
    lora_config: lora.LoraConfig | None,
) -> str:
    """The reference the step reads, given the first batch (`first`)."""
    if on_policy is not None:  # the reference is in the rollout's batch columns, if any
        return on_policy.step_reference(config)
    if preference:
        return loading.resolve_reference_mode(
            config.reference.mode, loss_name, "ref_logps" in first, lora_config is not None
        )
    return "none"  # SFT and the reward model read no reference model


def _dry_run(
    config: ml_collections.ConfigDict,
    trainer: trainer_lib.Trainer,
    state: TrainState,
    source: StepSource,
    on_policy: Any,
    reference: str,
    num_steps: int,
) -> TrainResult:
    """The result of `train(dry_run=True)`: the first step's batch, as the loop gets it
    from the source, lowered; the start-up summary with its compiled memory."""
    first_step = (
        source.example_step(trainer, on_policy.columns(config)) if on_policy is not None
        else source.next_step(trainer, state)
    )  # fmt: skip
    if first_step is None:
        raise UserError(f"fewer than grad_accum_steps={config.grad_accum_steps} batches")
    lowered = trainer.lower(state, first_step.batch_A, first_step.n_seq)
    startup.announce(config, trainer, state, reference=reference, num_steps=num_steps,
                     first_step=first_step, lowered=lowered)  # fmt: skip
    return TrainResult(state, [], [], None, trainer, lowered)


def _resume(
    config: ml_collections.ConfigDict,
    checkpointer: Any,
    trainer: trainer_lib.Trainer,
    state: TrainState,
    source: StepSource,
    on_policy: Any,
    *,
    train_data: Any,
    train_iter: Iterator[Any],
    run_dir: paths.Path | None,
) -> tuple[TrainState, StepSource, int, int]:
    """(state, source, start step, tokens so far) after restoring the newest usable
    checkpoint; what was passed in when there is none."""
    start_step = num_tokens_start = 0
    try:
        restored = checkpointer.restore_or_none(trainer_lib.abstract_checkpointable(trainer, state))
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
    return state, source, start_step, num_tokens_start


def _run(
    config: ml_collections.ConfigDict,
    trainer: trainer_lib.Trainer,
    state: TrainState,
    source: StepSource,
    checkpointer: Any,
    run_dir: paths.Path | None,
    *,
    num_steps: int,
    steps_per_epoch: float | None,
    start_step: int,
    num_tokens_start: int,
    eval_data: Any,
    eval_hook: Callable[[int, Any], Mapping[str, float]] | None,
    reference: str,
    callbacks: Callbacks | None,
) -> TrainResult:
    """Run the loop from `start_step` with metrics, progress and checkpoints; close them,
    and export the run when `checkpoint.export_hf` asks."""
    is_main = jax.process_index() == 0
    # Only once the resume was accepted: a refused one leaves config.json, the metrics
    # and the TensorBoard files of the run as they were.
    writer = None
    if run_dir is not None:
        if is_main:
            save_config(config, run_dir)
        writer = MetricsWriter(
            run_dir, tensorboard=config.train.tensorboard, enabled=is_main,
            report_to=config.train.report_to, config=config.to_dict(),
        )  # fmt: skip

    eval_fn = None
    if eval_data is not None:
        eval_fn = eval_data if callable(eval_data) else (lambda: eval_data)
    startup.announce(config, trainer, state, reference=reference, num_steps=num_steps,
                     start_step=start_step)  # fmt: skip
    source = startup.FirstStepReport(source)  # logs its tokens and compiled memory
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
            callbacks=callbacks,
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
