"""The one training loop: `run_loop` drives `Trainer.step` for every objective.

Whole optimizer steps come from a *step source* (`StepSource`): offline data is a
`MicroBatchSource` over the data pipeline's micro-batches; an on-policy objective's
source (`dpo_jax.online`) samples from the state it is handed, scores and rewards the
samples, and yields the rollout's steps. The loop owns what every objective shares: the
NaN policy and its skip cap, metric rows and their cadence, the progress bar, held-out
evaluation, checkpoints (saved only where the source says its data state resumes
exactly) and the SIGTERM save.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from dpo_jax import data, scoring
from dpo_jax.callbacks import Callbacks
from dpo_jax.errors import UserError
from dpo_jax.metric_accumulators import finalize_metrics, is_counted
from dpo_jax.metrics import MetricsWriter, Progress, Throughput, to_python
from dpo_jax.train_step import checkpointable

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

# Keys of a host micro-batch that the jitted step reads; others (the loader's `step`)
# stay on the host.
# `scored_positions` is optional: a caller that pins K (one compiled shape) supplies it.
BATCH_KEYS = (*scoring.MODEL_KEYS, *scoring.OBJECTIVE_KEYS, "scored_positions")

# Under nan_policy='skip', never stop for fewer skipped steps than this, so one bad
# batch early in a run (1 of 5 steps) does not end it.
MIN_SKIPS_BEFORE_STOP = 10


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


def global_count(n: int) -> int:
    """`n` summed over the processes of a multi-host run (each counts its own slice)."""
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(np.sum(np.asarray(multihost_utils.process_allgather(np.int32(n)), np.int64)))


class NonFiniteLossError(UserError, FloatingPointError):
    """A step produced a NaN/Inf loss or gradient under nan_policy='stop'.

    A `UserError`: the console script prints its one line (the step and what to do).
    """


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


def group_micro_batches(iterator: Iterator[Mapping[str, Any]], size: int) -> Batch | None:
    micro = []
    for mb in iterator:
        micro.append(mb)
        if len(micro) == size:
            return stack_micro_batches(micro)
    return None


def evaluate(
    trainer: Any,
    state: Any,
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


# ------------------------------------------------------------------------ step sources


@dataclasses.dataclass
class StepBatch:
    """One optimizer step's host batch `[A, ...]`, its static `n_seq`, and host metrics
    of where it came from (a rollout's `objective/*`), joined to the step's row."""

    batch_A: Batch
    n_seq: int
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class StepSource(Protocol):
    """What feeds `run_loop` whole steps (docs/CONTRACTS.md, "On-policy training")."""

    def next_step(self, trainer: Any, state: Any) -> StepBatch | None:
        """The next step's batch, built with `state` (the state it will update); None
        when the data ran out."""

    def get_state(self) -> Any:
        """JSON-able position, taken after the last batch handed out was consumed."""

    def set_state(self, data_state: Any) -> None:
        """Continue from a `get_state` (a restored checkpoint's data state)."""

    def at_boundary(self) -> bool:
        """Whether `get_state` now resumes exactly (a checkpoint may be taken)."""


class MicroBatchSource:
    """Offline data: groups `grad_accum_steps` micro-batches into each step.

    `data_state` is the loader's `get_state` (None: a plain iterable, which a resume
    skips through instead). Every step is a boundary.
    """

    def __init__(
        self,
        micro_batches: Iterable[Mapping[str, Any]],
        grad_accum_steps: int = 1,
        layout: str = "stacked",
        data_state: Callable[[], Any] | None = None,
    ):
        self._iterator = iter(micro_batches)
        self._grad_accum_steps = grad_accum_steps
        self._layout = layout
        self._data_state = data_state

    def next_step(self, trainer: Any, state: Any) -> StepBatch | None:
        batch_A = group_micro_batches(self._iterator, self._grad_accum_steps)
        if batch_A is None:
            return None
        return StepBatch(batch_A, batch_num_sequences(batch_A, self._layout))

    def get_state(self) -> Any:
        return self._data_state() if self._data_state is not None else None

    def set_state(self, data_state: Any) -> None:
        raise NotImplementedError("the loader restores itself (train.train)")

    def at_boundary(self) -> bool:
        return True


def run_loop(
    trainer: Any,
    state: Any,
    train_batches: StepSource | Iterable[Mapping[str, Any]],
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
    callbacks: Callbacks | None = None,
) -> tuple[Any, list[dict], list[dict]]:
    """Drive `trainer.step` for steps `start_step+1 .. num_steps`; log, evaluate, save.

    `train_batches` is a `StepSource`, or an iterable of host micro-batches (grouped by
    `grad_accum_steps`, resumed through `data_state`: a `MicroBatchSource`).
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
    A checkpoint (periodic or at SIGTERM) due while the source is not at a boundary (in
    the middle of a rollout) is taken at its next boundary.
    `callbacks` (`dpo_jax.callbacks.Callbacks`): `on_log` after each row written,
    `on_eval` beside `eval_hook` (the same contract), `on_save` after each save started.
    """
    cb = callbacks or Callbacks()
    eval_hooks = [h for h in (eval_hook, cb.on_eval) if h is not None]

    def log_row(step: int, row: dict) -> None:
        if writer is not None:
            writer.write(step, row)
        if cb.on_log is not None:
            cb.on_log(step, row)

    def save(step: int, cstate: Any, data_now: Any, force: bool) -> None:
        started = checkpointer.maybe_save(step, cstate, data_now, force=force)
        if started and cb.on_save is not None:
            directory = getattr(checkpointer, "directory", None)
            cb.on_save(step, directory / str(step) if directory is not None else None)

    source = train_batches
    if not isinstance(source, StepSource):
        source = MicroBatchSource(train_batches, grad_accum_steps, layout, data_state)
    history: list[dict] = []
    eval_history: list[dict] = []
    pending: list[tuple[int, dict, float, Mapping[str, Any]]] = []
    throughput = Throughput()
    nan_stop = trainer.step_config.nan_policy == "stop"
    seen = int(num_tokens_start)
    deferred_save = False

    def flush() -> None:
        if not pending:
            return
        fetched = jax.device_get([m for _, m, _, _ in pending])
        rate = throughput.rate()
        for (step, _, tokens, extra), metrics in zip(pending, fetched, strict=True):
            row = {k: to_python(v) for k, v in finalize_metrics(metrics).items()}
            if nan_stop and row.get("nonfinite"):
                raise NonFiniteLossError(
                    f"step {step}: non-finite loss or gradient (loss={row.get('loss')}, "
                    f"grad_norm={row.get('grad_norm')}); the update was not applied. "
                    "Set train.nan_policy='skip' to skip such steps instead."
                )
            if row.get("nonfinite"):
                check_skipped(step, row, max_skipped_fraction)
            row.update(extra)
            row["tokens_per_second"] = rate
            row["num_tokens"] = tokens
            if steps_per_epoch:
                row["epoch"] = step / steps_per_epoch
            row["step"] = step
            history.append(row)
            log_row(step, row)
        if progress is not None:
            progress.update(pending[-1][0], history[-1])
        pending.clear()

    def run_eval(step: int) -> None:
        if eval_batches is None and not eval_hooks:
            return
        row = {} if eval_batches is None else evaluate(trainer, state, eval_batches(), layout)
        for hook in eval_hooks:
            row.update({k: to_python(v) for k, v in (hook(step, state.params) or {}).items()})
        row["step"] = step
        eval_history.append(row)
        log_row(step, row)
        if progress is not None and eval_batches is not None:
            progress.write(
                f"step {step}: eval loss {row.get('eval/loss', float('nan')):.4f} "
                f"acc {row.get('eval/rewards/accuracies', float('nan')):.3f}"
            )

    for step in range(start_step + 1, num_steps + 1):
        got = source.next_step(trainer, state)
        if got is None:
            log.warning("training data ran out after %d steps", step - 1)
            break
        throughput.add(count_tokens(got.batch_A))
        seen += global_count(count_sequence_tokens(got.batch_A))
        state, metrics = trainer.step(state, got.batch_A, got.n_seq)
        pending.append((step, metrics, seen, got.metrics))
        if step % max(log_every, 1) == 0 or step == num_steps:
            flush()
        if eval_every and step % eval_every == 0 and step != num_steps:
            flush()
            run_eval(step)
        if checkpointer is None:
            continue
        # Rows up to a saved step must be on disk before the save (exact resume), and a
        # NaN step under "stop" must raise before it could be checkpointed.
        should = getattr(checkpointer, "should_save", None)
        due = should is None or should(step)
        if not source.at_boundary():  # in the middle of a rollout: save at its end
            deferred_save = deferred_save or bool(should is not None and due)
            continue
        if due or deferred_save:
            flush()
        data_now = source.get_state()
        cstate = checkpointable(state, trainer.step_config)
        save(step, cstate, data_now, deferred_save)
        deferred_save = False
        # Preempted at the last step: finish normally (its evaluation and final save
        # below), or the run would end complete but without its final evaluation.
        if getattr(checkpointer, "preempted", False) and step < num_steps:
            flush()
            save(step, cstate, data_now, True)
            log.warning("preempted: saved step %d and stopped", step)
            return state, history, eval_history
    flush()
    last = int(jax.device_get(state.step))
    run_eval(last)
    if checkpointer is not None:
        save(last, checkpointable(state, trainer.step_config), source.get_state(), True)
    return state, history, eval_history
