"""The pure, jitted preference train step and its state.

`train_step(state, batch) -> (state, metrics)`: the batch carries a leading micro-batch
axis `A`; a `lax.scan` runs one policy forward per micro-batch over the stacked
chosen/rejected rows, gets per-sequence log-probs, builds `PreferenceStats` with the
reference log-probs, applies the configured loss, and accumulates gradients. One Optax
update follows, then optional TR-DPO reference syncing. No Python side effects inside.

Reference modes (`StepConfig.reference`):
- "frozen": `state.ref_params` (a frozen copy, sharded like the policy) runs a forward
  under `stop_gradient`; TR-DPO may soft-update it every `ref_model_sync_steps`.
- "precomputed": the batch's `ref_logps` column is used; no reference forward runs.
  It holds full-sequence sums only, so LD-DPO (`ld_alpha`) is refused with it.
- "none": reference-free losses (SimPO, ORPO, ...) get no reference log-probs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpo_jax import logprobs, losses

REFERENCE_MODES = ("frozen", "precomputed", "none")
NAN_POLICIES = ("stop", "skip")


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree, so the step can donate it.

    The reference params are a separate field rather than a masked half of one
    policy+reference pytree: the optimizer then never sees (or allocates moments for)
    frozen weights without an optax mask, sharding and donation still come for free
    because the field is part of the same state pytree, and `ref_params=None` costs
    nothing when the reference is precomputed or absent. The checkpointer drops the
    field when the reference is the initial policy (rebuilt on resume), see
    `checkpointable`.
    """

    step: jax.Array  # int32 scalar: completed update steps (skipped ones included)
    params: Any
    opt_state: Any
    ref_params: Any  # None unless reference == "frozen"
    rng: jax.Array  # typed PRNG key
    skipped_steps: jax.Array  # int32 scalar: steps whose update was skipped (non-finite)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (hashable-by-identity) settings the step is traced with."""

    apply_fn: Callable[..., Any]  # model.apply
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    loss_name: str
    loss_hyper: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reference: str = "frozen"
    nan_policy: str = "stop"
    logps_chunk_size: int = 0  # > 0: never materialise [N, L, V] logits (chunked unembedding)
    # The Trainer adds `scored_positions` to host batches, so the step unembeds only the
    # positions that predict a scored token (same numbers, less work).
    unembed_scored_only: bool = True
    ref_model_sync_steps: int = 0  # TR-DPO: 0 = reference never moves
    ref_model_mixup_alpha: float = 0.6
    grad_shardings: Any = None  # param shardings, to keep the accumulator sharded

    def __post_init__(self) -> None:
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference mode {self.reference!r} not in {REFERENCE_MODES}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy {self.nan_policy!r} not in {NAN_POLICIES}")
        if self.ref_model_sync_steps and self.reference != "frozen":
            raise ValueError(
                "TR-DPO reference syncing (ref_model_sync_steps > 0) needs reference='frozen'"
            )
        check_loss_options(self.loss_name, self.loss_hyper, self.reference)

    @property
    def with_wpo(self) -> bool:
        """WPO (`use_weighting`): the policy forward also yields per-sequence weights."""
        return bool(self.loss_hyper.get("use_weighting", False))

    @property
    def with_log1m(self) -> bool:
        """Unlikelihood: the policy forward also sums log(1 - p_t) per sequence."""
        return losses.needs_log1m(self.loss_name)


def check_loss_options(loss_name: str, loss_hyper: Mapping[str, Any], reference: str) -> None:
    """Refuse batch-level loss options the step cannot compute correctly, before compiling.

    LD-DPO (`ld_alpha`) splits the reference's log-probs into the shared prefix and the
    longer answer's tail, which needs the reference's per-token sums; a precomputed (or
    cached) `ref_logps` column holds only full-sequence sums, so the reference would
    silently stay un-desensitised.
    """
    if loss_hyper.get("ld_alpha") is not None and reference == "precomputed":
        raise ValueError(
            f"loss.hyper.ld_alpha={loss_hyper['ld_alpha']} (LD-DPO) conflicts with a "
            "precomputed reference (reference.mode 'precomputed' or 'cache', or batches "
            "carrying 'ref_logps'): the 'ref_logps' column holds full-sequence sums, but "
            "LD-DPO also needs the reference's shared-prefix sums; use reference.mode='frozen'"
        )
    if loss_hyper.get("use_weighting") and not losses.is_paired(loss_name):
        raise ValueError(
            f"loss.hyper.use_weighting (WPO) applies to paired losses only, not {loss_name!r}"
        )


def init_state(
    params: Any, optimizer: optax.GradientTransformation, rng: jax.Array, with_reference: bool
) -> TrainState:
    """A fresh state at step 0; the reference (if any) is a copy of the initial policy."""
    ref = jax.tree.map(jnp.copy, params) if with_reference else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ref_params=ref,
        rng=rng,
        skipped_steps=jnp.zeros((), jnp.int32),
    )


def sequence_logps(
    cfg: StepConfig,
    params: Any,
    batch: Mapping[str, jax.Array],
    n_seq: int,
    with_wpo: bool = False,
    with_log1m: bool = False,
) -> Any:
    """Per-sequence log-probs of one micro-batch under `params` (one forward).

    `with_wpo` adds the WPO weights (the policy's only: WPO never weights by the reference);
    `with_log1m` the sums of log(1 - p_t) (unlikelihood, also the policy's only). A batch
    with `scored_positions` (added by the Trainer when `unembed_scored_only`) unembeds
    only the scored positions; otherwise every position is unembedded.
    """
    extras = dict(with_wpo=with_wpo, with_log1m=with_log1m)
    inputs = dict(
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
    )
    if "branch_ids" in batch:
        inputs["branch_ids"] = batch["branch_ids"]
    variables = {"params": params}
    unembed = lambda h: cfg.apply_fn(variables, h, method="logits")
    if "scored_positions" in batch:
        hidden = cfg.apply_fn(variables, batch["input_ids"], return_hidden=True, **inputs)
        return logprobs.sequence_logps_scored(
            hidden, unembed, batch, n_seq, chunk_size=cfg.logps_chunk_size, **extras
        )
    if cfg.logps_chunk_size > 0:
        hidden = cfg.apply_fn(variables, batch["input_ids"], return_hidden=True, **inputs)
        return logprobs.sequence_logps_chunked(
            hidden, unembed, batch, n_seq, cfg.logps_chunk_size, **extras
        )
    logits = cfg.apply_fn(variables, batch["input_ids"], **inputs)
    return logprobs.sequence_logps(logits, batch, n_seq, **extras)


def _micro_loss(
    params: Any,
    ref: Any,
    batch: Mapping[str, jax.Array],
    cfg: StepConfig,
    n_seq: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    policy = sequence_logps(
        cfg, params, batch, n_seq, with_wpo=cfg.with_wpo, with_log1m=cfg.with_log1m
    )
    if losses.is_paired(cfg.loss_name):
        stats = logprobs.preference_stats(policy, ref)
    else:
        stats = logprobs.unpaired_stats(policy, ref, batch["labels"])
    per_example, metrics = losses.compute_loss(stats, cfg.loss_name, **dict(cfg.loss_hyper))
    loss = jnp.mean(per_example)
    metrics = dict(metrics)
    metrics["loss"] = loss
    return loss, metrics


def reference_logps(
    cfg: StepConfig, ref_params: Any, batch: Mapping[str, jax.Array], n_seq: int
) -> Any:
    """The reference's log-probs for one micro-batch, never differentiated.

    A `[2B]` column (precomputed), a `SequenceLogps` (frozen forward; its prefix sums
    serve LD-DPO) or None (reference-free).
    """
    if cfg.reference == "none":
        return None
    if cfg.reference == "precomputed":
        # multi-host batches carry [2, B] (see train.globalize_host_batch); flat is [2B]
        ref = batch["ref_logps"].reshape(-1)
        return jax.lax.stop_gradient(ref.astype(jnp.float32))
    seq = sequence_logps(cfg, jax.lax.stop_gradient(ref_params), batch, n_seq)
    return jax.lax.stop_gradient(seq)


def _scan_micro_batches(
    state: TrainState, batch_A: Mapping[str, jax.Array], cfg: StepConfig, n_seq: int, grads: bool
) -> tuple[Any, dict[str, jax.Array]]:
    """Sum of gradients (or None) and per-micro-batch metrics stacked on a leading A axis.

    With one micro-batch the gradient is taken directly: no scan, no float32 accumulator.
    """
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)
    if jax.tree.leaves(batch_A)[0].shape[0] == 1:
        micro = jax.tree.map(lambda x: x[0], batch_A)
        ref = reference_logps(cfg, state.ref_params, micro, n_seq)
        if grads:
            (_, metrics), g = grad_fn(state.params, ref, micro, cfg, n_seq)
        else:
            g, (_, metrics) = None, _micro_loss(state.params, ref, micro, cfg, n_seq)
        return g, jax.tree.map(lambda m: m[None], metrics)

    def body(acc: Any, micro: Mapping[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        ref = reference_logps(cfg, state.ref_params, micro, n_seq)
        if not grads:
            _, metrics = _micro_loss(state.params, ref, micro, cfg, n_seq)
            return acc, metrics
        (_, metrics), g = grad_fn(state.params, ref, micro, cfg, n_seq)
        acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
        if cfg.grad_shardings is not None:
            acc = jax.lax.with_sharding_constraint(acc, cfg.grad_shardings)
        return acc, metrics

    init = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params) if grads else None
    if grads and cfg.grad_shardings is not None:
        init = jax.lax.with_sharding_constraint(init, cfg.grad_shardings)
    return jax.lax.scan(body, init, batch_A)


def _mean_over_micro(metrics_A: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    # Micro-batches hold equally many examples, so the mean of means is the batch mean.
    return {k: jnp.mean(v.astype(jnp.float32), axis=0) for k, v in metrics_A.items()}


def train_step(
    state: TrainState, batch_A: Mapping[str, jax.Array], cfg: StepConfig, n_seq: int
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from `A` micro-batches (leading axis of every batch array)."""
    num_micro = jax.tree.leaves(batch_A)[0].shape[0]
    grad_sum, metrics_A = _scan_micro_batches(state, batch_A, cfg, n_seq, grads=True)
    grads = jax.tree.map(lambda g, p: (g / num_micro).astype(p.dtype), grad_sum, state.params)
    if cfg.grad_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, cfg.grad_shardings)
    metrics = _mean_over_micro(metrics_A)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def apply(_: None) -> tuple[Any, Any]:
        updates, opt_state = cfg.optimizer.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    def keep(_: None) -> tuple[Any, Any]:
        return state.params, state.opt_state

    # Both policies refuse a non-finite update; "stop" makes the loop raise (naming
    # the step) while the state still holds the last good params.
    params, opt_state = jax.lax.cond(finite, apply, keep, None)
    skipped = state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32)
    step = state.step + 1
    ref_params = state.ref_params
    if cfg.ref_model_sync_steps > 0:
        alpha = cfg.ref_model_mixup_alpha
        ref_params = jax.lax.cond(
            step % cfg.ref_model_sync_steps == 0,
            lambda _: jax.tree.map(
                lambda r, p: (alpha * p + (1.0 - alpha) * r).astype(r.dtype),
                state.ref_params,
                params,
            ),
            lambda _: state.ref_params,
            None,
        )
    rng, _ = jax.random.split(state.rng)
    metrics.update(
        grad_norm=grad_norm,
        # the optimizer's own count skips refused updates, so the lr shown does too
        learning_rate=cfg.schedule(state.step - state.skipped_steps),
        nonfinite=jnp.logical_not(finite).astype(jnp.int32),
        skipped_steps=skipped,
    )
    new_state = state.replace(
        step=step, params=params, opt_state=opt_state, ref_params=ref_params, rng=rng,
        skipped_steps=skipped,
    )  # fmt: skip
    return new_state, metrics


def eval_step(
    state: TrainState, batch_A: Mapping[str, jax.Array], cfg: StepConfig, n_seq: int
) -> dict[str, jax.Array]:
    """Loss and metrics of `A` micro-batches without an update (held-out evaluation)."""
    _, metrics_A = _scan_micro_batches(state, batch_A, cfg, n_seq, grads=False)
    return _mean_over_micro(metrics_A)
