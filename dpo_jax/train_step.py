"""The pure, jitted train step of every objective, and its state.

`train_step(state, batch) -> (state, metrics)`: the batch carries a leading micro-batch
axis `A`; a `lax.scan` runs one policy scoring pass per micro-batch
(`scoring.score`, with the extras the objective needs), hands it with the reference's
log-probs to the objective (`objectives`: a preference loss, SFT's token NLL, the
Bradley-Terry reward model), and accumulates gradients. One Optax
update follows, then optional TR-DPO reference syncing. No Python side effects inside.

Reference modes (`StepConfig.reference`):
- "frozen": `state.ref_params` (a frozen copy, sharded like the policy) runs a forward
  under `stop_gradient`; TR-DPO may soft-update it every `ref_model_sync_steps`.
- "precomputed": the batch's `ref_logps` column is used; no reference forward runs.
  It holds full-sequence sums only, so LD-DPO (`ld_alpha`) is refused with it.
- "none": reference-free losses (SimPO, ORPO, ...) get no reference log-probs.
- "adapters_off" (LoRA): the reference is the same apply on `state.base_params` alone,
  the policy with its adapters disabled; no second copy of the weights exists.

LoRA (`dpo_jax.lora`): `state.params` holds the trainable adapters and
`state.base_params` the frozen base; the policy forward applies both
(`lora.apply_adapters`), so gradients and optimizer state cover the adapters only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpo_jax import lora, losses, metric_accumulators, objectives, scoring
from dpo_jax.configs import default
from dpo_jax.errors import UserError

REFERENCE_MODES = ("frozen", "precomputed", "none", "adapters_off")
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
    # Running statistics of stateful losses, {loss name: state} (BCO's reward shift,
    # `losses.init_loss_state`); None when the loss keeps none. Checkpointed with the rest.
    loss_state: Any = None
    # LoRA: the frozen base weights (`params` are then the adapters); None without LoRA.
    # Never differentiated, no optimizer state; not checkpointed (rebuilt from model.path).
    base_params: Any = None


# StepConfig fields a run config sets, and their dotted keys in configs/default.py
# (`StepConfig.from_config`); `loss_name`, `loss_hyper` and `objective_hyper` come from
# the `loss` and `objective` sections as a whole.
CONFIG_KEYS: dict[str, str] = {
    "nan_policy": "train.nan_policy",
    "logps_chunk_size": "train.logps_chunk_size",
    "unembed_scored_only": "train.unembed_scored_only",
    "token_metrics": "train.token_metrics",
    "ref_model_sync_steps": "reference.ref_model_sync_steps",
    "ref_model_mixup_alpha": "reference.ref_model_mixup_alpha",
    "objective": "objective.name",
}


def _lookup(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def step_settings(config: Any) -> dict[str, Any]:
    """The `StepConfig` fields a (complete) run config sets: `CONFIG_KEYS`, the loss
    (`loss.name` + `loss.weights`), its hyper-parameters (None = the loss's default,
    left out) and the objective's settings (`objective` less its name)."""
    hyper = config.loss.hyper
    hyper = hyper.to_dict() if hasattr(hyper, "to_dict") else dict(hyper)
    objective = config.objective
    objective = objective.to_dict() if hasattr(objective, "to_dict") else dict(objective)
    out = {field: _lookup(config, key) for field, key in CONFIG_KEYS.items()}
    out.update(
        loss_name=losses.parse_loss_spec(config.loss.name, config.loss.weights),
        loss_hyper={k: v for k, v in hyper.items() if v is not None},
        objective_hyper={k: v for k, v in objective.items() if k != "name"},
    )
    registered = objectives.OBJECTIVES.get(out["objective"])  # unknown: refused by validate
    if registered is not None and registered.hyper is not None:  # settings in its own section
        out["objective_hyper"] = registered.hyper(config)
    return out


def default_settings(**fields: Any) -> dict[str, Any]:
    """`step_settings` of configs/default.py's config with `fields` (StepConfig settings)
    over it: the settings a Python caller with no run config passes (tests, benchmarks).
    A name that is not a step setting is refused."""
    out = step_settings(default.get_config())
    unknown = sorted(set(fields) - set(out))
    if unknown:
        raise TypeError(f"{unknown[0]!r} is not a step setting; known: {', '.join(sorted(out))}")
    out.update(fields)
    return out


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (hashable-by-identity) settings the step is traced with.

    Built once per run by `from_config` (the Trainer); from Python without a run
    config, with `**default_settings(...)`. No field restates a default of
    configs/default.py: every setting is given.
    """

    apply_fn: Callable[..., Any]  # model.apply
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    loss_name: str | losses.LossSpec  # a name or a `losses.parse_loss_spec` mix
    # keyword arguments of the loss; {} = the loss function's own defaults
    loss_hyper: Mapping[str, Any]
    reference: str  # resolved per run (`loading.resolve_reference_mode`)
    nan_policy: str
    # > 0: never materialise [N, L, V] logits (chunked unembedding)
    logps_chunk_size: int
    # The Trainer adds `scored_positions` to host batches, so the step unembeds only the
    # positions that predict a scored token (same numbers, less work).
    unembed_scored_only: bool
    ref_model_sync_steps: int  # TR-DPO: 0 = never
    ref_model_mixup_alpha: float
    # TRL's entropy, logits/chosen, logits/rejected, mean_token_accuracy (paired losses):
    # per-sequence sums from the scoring path, no gradient.
    token_metrics: bool
    # `objectives.OBJECTIVES` name: what the step minimises (preference, sft, reward_model)
    objective: str
    # The objective's own settings (`config.objective` less its name), e.g. the reward
    # model's center_rewards_coefficient.
    objective_hyper: Mapping[str, Any]
    # Not settings but facts of the run the Trainer fills in; None / 0.0 mean "absent".
    grad_shardings: Any = None  # param shardings, to keep the accumulator sharded
    lora_scale: float = 0.0  # LoRA alpha / r (> 0 when state.base_params holds a base)

    @classmethod
    def from_config(cls, config: Any, **runtime: Any) -> StepConfig:
        """The step settings of a run config (`step_settings`), plus what only the
        Trainer knows (`runtime`: apply_fn, optimizer, schedule, reference,
        grad_shardings, lora_scale)."""
        return cls(**step_settings(config), **runtime)

    def __post_init__(self) -> None:
        obj = objectives.get(self.objective)
        if not obj.uses_reference and self.reference != "none":
            raise UserError(
                f"objective {self.objective!r} uses no reference model; reference={self.reference!r}"
            )
        if obj.head is not None and self.lora_scale > 0:
            raise UserError(f"objective {self.objective!r} trains a head; LoRA is not supported")
        if self.reference not in REFERENCE_MODES:
            raise UserError(f"reference mode {self.reference!r} not in {REFERENCE_MODES}")
        if self.nan_policy not in NAN_POLICIES:
            raise UserError(f"nan_policy {self.nan_policy!r} not in {NAN_POLICIES}")
        if self.ref_model_sync_steps and self.reference != "frozen":
            raise UserError(
                "TR-DPO reference syncing (ref_model_sync_steps > 0) needs reference='frozen'"
            )
        if self.ref_model_sync_steps and self.lora_scale > 0:
            raise UserError("TR-DPO reference syncing cannot mix LoRA adapters into a reference")
        if self.reference == "adapters_off" and not self.lora_scale > 0:
            raise UserError("reference='adapters_off' needs LoRA (lora_scale > 0)")
        if self.objective == "preference":
            check_loss_options(self.loss_name, self.loss_hyper, self.reference)

    @property
    def objective_fn(self) -> objectives.Objective:
        """The registered objective this step minimises."""
        return objectives.get(self.objective)

    @property
    def policy_needs(self) -> frozenset[str]:
        """What the policy's scoring pass returns (`scoring.NEEDS`), as the objective says."""
        return self.objective_fn.needs(self)

    @property
    def with_wpo(self) -> bool:
        """WPO (`use_weighting`): the policy pass also yields per-sequence weights."""
        return "wpo" in self.policy_needs

    @property
    def with_log1m(self) -> bool:
        """Unlikelihood: the policy pass also sums log(1 - p_t) per sequence."""
        return "log1m" in self.policy_needs


def check_loss_options(
    loss_name: str | losses.LossSpec, loss_hyper: Mapping[str, Any], reference: str
) -> None:
    """Refuse batch-level loss options the step cannot compute correctly, before compiling.

    Also runs `losses.check_options` (the combinations TRL refuses).

    LD-DPO (`ld_alpha`) splits the reference's log-probs into the shared prefix and the
    longer answer's tail, which needs the reference's per-token sums; a precomputed (or
    cached) `ref_logps` column holds only full-sequence sums, so the reference would
    silently stay un-desensitised.
    """
    if loss_hyper.get("ld_alpha") is not None and reference == "precomputed":
        raise UserError(
            f"loss.hyper.ld_alpha={loss_hyper['ld_alpha']} (LD-DPO) conflicts with a "
            "precomputed reference (reference.mode 'precomputed' or 'cache', or batches "
            "carrying 'ref_logps'): the 'ref_logps' column holds full-sequence sums, but "
            "LD-DPO also needs the reference's shared-prefix sums; use reference.mode='frozen'"
        )
    if loss_hyper.get("use_weighting") and not losses.is_paired(loss_name):
        raise UserError(
            f"loss.hyper.use_weighting (WPO) applies to paired losses only, not {loss_name!r}"
        )
    losses.check_options(loss_name, loss_hyper)


def checkpointable(state: TrainState, step_config: StepConfig) -> TrainState:
    """The part of the state a checkpoint holds.

    A frozen reference that never moves is the initial policy (or another loadable
    checkpoint) and is rebuilt on resume, so it is dropped; a TR-DPO reference moves
    and is kept.
    """
    if step_config.ref_model_sync_steps > 0:
        return state.replace(base_params=None)
    # LoRA's frozen base is the loaded model too: rebuilt on resume, never saved
    return state.replace(ref_params=None, base_params=None)


def init_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    with_reference: bool,
    loss_state: Any = None,
) -> TrainState:
    """A fresh state at step 0; the reference (if any) is a copy of the initial policy.

    `loss_state`: the loss's initial running statistics (`losses.init_loss_state`).
    """
    ref = jax.tree.map(jnp.copy, params) if with_reference else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ref_params=ref,
        rng=rng,
        skipped_steps=jnp.zeros((), jnp.int32),
        loss_state=loss_state,
    )


def policy_params(cfg: StepConfig, params: Any, base: Any) -> Any:
    """The params the policy forward applies: `params`, or LoRA adapters on `base`."""
    return params if base is None else lora.apply_adapters(base, params, cfg.lora_scale)


def _reference_source(state: TrainState, cfg: StepConfig) -> Any:
    # adapters_off: the reference forward is the base alone (the adapters disabled)
    return state.base_params if cfg.reference == "adapters_off" else state.ref_params


def _micro_loss(
    params: Any,
    ref: Any,
    batch: Mapping[str, jax.Array],
    cfg: StepConfig,
    n_seq: int,
    loss_state: Any = None,
    update: bool = True,
    base: Any = None,
    context: Any = None,
    num_micro: int = 1,
) -> tuple[jax.Array, tuple[dict[str, Any], Any]]:
    """The objective's loss of one micro-batch; aux = (metrics, loss state after it).

    With LoRA, `params` are the adapters and `base` the frozen weights they sit beside;
    with a head (`objectives.Head`), `params` are `{"model", "head"}`.
    """
    obj = cfg.objective_fn
    model_params, head = objectives.split_params(obj, params)
    full = policy_params(cfg, model_params, base)
    policy = scoring.score(
        cfg.apply_fn, full, batch, n_seq, needs=cfg.policy_needs, chunk_size=cfg.logps_chunk_size
    )
    inp = objectives.ObjectiveInput(
        cfg, policy, ref, batch, head, loss_state, update, context, num_micro
    )
    loss, metrics, loss_state = obj.loss(inp)
    metrics = dict(metrics)
    metrics["loss"] = loss
    return loss, (metrics, loss_state)


def reference_logps(
    cfg: StepConfig, ref_params: Any, batch: Mapping[str, jax.Array], n_seq: int
) -> Any:
    """The reference's log-probs for one micro-batch, never differentiated.

    A `[2B]` column (precomputed), a `SequenceLogps` (frozen or adapters-off forward;
    its prefix sums serve LD-DPO) or None (reference-free).
    """
    if cfg.reference == "none":
        return None
    if cfg.reference == "precomputed":
        # multi-host batches carry [2, B] (see train.globalize_host_batch); flat is [2B]
        ref = batch["ref_logps"].reshape(-1)
        return jax.lax.stop_gradient(ref.astype(jnp.float32))
    seq = scoring.score(
        cfg.apply_fn, jax.lax.stop_gradient(ref_params), batch, n_seq,
        chunk_size=cfg.logps_chunk_size,
    )  # fmt: skip
    return jax.lax.stop_gradient(seq)


def _scan_micro_batches(
    state: TrainState, batch_A: Mapping[str, jax.Array], cfg: StepConfig, n_seq: int, grads: bool
) -> tuple[Any, dict[str, jax.Array], Any]:
    """Sum of gradients (or None), per-micro-batch metrics stacked on a leading A axis,
    and the loss state after the last micro-batch.

    The loss state (BCO's shift) is carried through the micro-batches in order, each
    one updating it before its loss, as TRL's per-forward update under gradient
    accumulation; evaluation (`grads=False`) reads it without updating.
    With one micro-batch the gradient is taken directly: no scan, no float32 accumulator.
    """
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)
    obj = cfg.objective_fn
    if state.loss_state is None and obj.name == "preference":
        # a state built without `init_state(..., loss_state=)`
        state = state.replace(loss_state=losses.init_loss_state(cfg.loss_name))
    num_micro = jax.tree.leaves(batch_A)[0].shape[0]
    # Statistics of the whole step's batch (SFT: its target-token count), before the scan
    context = obj.batch_context(batch_A) if obj.batch_context is not None else None
    kw = dict(base=state.base_params, context=context, num_micro=num_micro)
    if num_micro == 1:
        micro = jax.tree.map(lambda x: x[0], batch_A)
        ref = reference_logps(cfg, _reference_source(state, cfg), micro, n_seq)
        args = (state.params, ref, micro, cfg, n_seq, state.loss_state)
        if grads:
            (_, (metrics, loss_state)), g = grad_fn(*args, **kw)
        else:
            g = None
            _, (metrics, loss_state) = _micro_loss(*args, update=False, **kw)
        return g, jax.tree.map(lambda m: m[None], metrics), loss_state

    def body(carry: Any, micro: Mapping[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        acc, loss_state = carry
        ref = reference_logps(cfg, _reference_source(state, cfg), micro, n_seq)
        args = (state.params, ref, micro, cfg, n_seq, loss_state)
        if not grads:
            _, (metrics, loss_state) = _micro_loss(*args, update=False, **kw)
            return (acc, loss_state), metrics
        (_, (metrics, loss_state)), g = grad_fn(*args, **kw)
        acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
        if cfg.grad_shardings is not None:
            acc = jax.lax.with_sharding_constraint(acc, cfg.grad_shardings)
        return (acc, loss_state), metrics

    init = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params) if grads else None
    if grads and cfg.grad_shardings is not None:
        init = jax.lax.with_sharding_constraint(init, cfg.grad_shardings)
    (grad_sum, loss_state), metrics_A = jax.lax.scan(body, (init, state.loss_state), batch_A)
    return grad_sum, metrics_A, loss_state


def _mean_over_micro(metrics_A: Mapping[str, Any]) -> dict[str, Any]:
    # Micro-batches hold equally many examples, so the mean of means is the batch mean.
    # Subset means (`metric_accumulators.CountedMean`) add their sums and counts instead.
    return {
        k: jax.tree.map(lambda x: jnp.sum(x.astype(jnp.float32), axis=0), v)
        if metric_accumulators.is_counted(v)
        else jnp.mean(v.astype(jnp.float32), axis=0)
        for k, v in metrics_A.items()
    }


def train_step(
    state: TrainState, batch_A: Mapping[str, jax.Array], cfg: StepConfig, n_seq: int
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from `A` micro-batches (leading axis of every batch array)."""
    num_micro = jax.tree.leaves(batch_A)[0].shape[0]
    grad_sum, metrics_A, loss_state = _scan_micro_batches(state, batch_A, cfg, n_seq, grads=True)
    grads = jax.tree.map(lambda g, p: (g / num_micro).astype(p.dtype), grad_sum, state.params)
    if cfg.grad_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, cfg.grad_shardings)
    metrics = cfg.objective_fn.derive(_mean_over_micro(metrics_A))
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
    # A refused step leaves the loss's running statistics as they were, too.
    if state.loss_state is not None:
        loss_state = jax.tree.map(
            lambda n, o: jnp.where(finite, n, o), loss_state, state.loss_state
        )
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
        skipped_steps=skipped, loss_state=loss_state,
    )  # fmt: skip
    return new_state, metrics


def eval_step(
    state: TrainState, batch_A: Mapping[str, jax.Array], cfg: StepConfig, n_seq: int
) -> dict[str, jax.Array]:
    """Loss and metrics of `A` micro-batches without an update (held-out evaluation)."""
    _, metrics_A, _ = _scan_micro_batches(state, batch_A, cfg, n_seq, grads=False)
    return cfg.objective_fn.derive(_mean_over_micro(metrics_A))
