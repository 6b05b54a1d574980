"""Training objectives: the one thing that differs between the runs the Trainer drives.

`config.objective.name` picks one of `OBJECTIVES`; the jitted step (`train_step`) scores
each micro-batch with `scoring.score(..., needs=objective.needs(cfg))` and hands the
result to `objective.loss`. Everything else (mesh, micro-batch scan, gradient
accumulation, NaN policy, checkpoints, resume, metrics) is the Trainer's, shared.

- `"preference"`: any `losses` loss, paired or unpaired (today's DPO family).
- `"sft"`: token NLL, `-sum(log p of target tokens) / number of target tokens` over the
  whole optimizer batch (all micro-batches together), as HF Trainer's loss with
  `num_items_in_batch` (the target count over every gradient-accumulation micro-batch);
  micro-batching does not change the loss (TRL's per-micro-batch mean would).
  Batches are single sequences (`data.batching.build_sequences`): row k = sequence k,
  `sequence_index` marks the target tokens, N = rows.
- `"reward_model"`: Bradley-Terry on preference batches (chosen `k`, rejected `B + k`);
  the reward is a linear head on the final hidden state of each sequence's last token
  (TRL RewardTrainer), with TRL's `center_rewards_coefficient` and an optional
  `margin` column `[B]`.

Objectives with a head (`Objective.head`) train params `{"model": <Transformer params>,
"head": <head params>}` (`MODEL`/`HEAD`): the head lives in the train state, so it is
sharded (its logical axes), checkpointed and resumed with the model. A value head (PPO)
uses the same mechanism.

Add one: write `loss(inp: ObjectiveInput) -> (loss, metrics, loss_state)` and register
`Objective(name, loss, needs=...)` in `OBJECTIVES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from dpo_jax import logprobs, losses, policy_gradient, ppo
from dpo_jax.logprobs import SequenceLogps

Array = jax.Array
MODEL, HEAD = "model", "head"


class ObjectiveInput(NamedTuple):
    """What an objective's loss sees for one micro-batch (inside the jitted step)."""

    cfg: Any  # the step's `train_step.StepConfig` (loss name / hyper-parameters)
    policy: SequenceLogps  # the policy's scoring pass, with the extras `needs` asked for
    ref: Any  # the reference's log-probs (preference only) or None
    batch: Mapping[str, Array]  # the micro-batch (for columns such as labels or margin)
    head: Any  # the head's params (objectives with a head) or None
    loss_state: Any  # running statistics of a stateful loss (BCO) or None
    update: bool  # False in evaluation: read the loss state, do not update it
    context: Any  # `Objective.batch_context` of the whole `[A, ...]` batch, or None
    num_micro: int  # A: micro-batches in this optimizer step


@dataclasses.dataclass(frozen=True)
class Head:
    """Params an objective trains beside the model: init and logical axes."""

    init: Callable[[Any, Array], Any]  # (model_config, rng) -> params
    logical_axes: Callable[[Any], Any]  # model_config -> logical names, same tree


@dataclasses.dataclass(frozen=True)
class Objective:
    """A pure loss over one micro-batch's scoring pass, plus what it needs from the step."""

    name: str
    loss: Callable[[ObjectiveInput], tuple[Array, dict[str, Any], Any]]
    needs: Callable[[Any], frozenset[str]]  # step config -> the policy pass's `score` needs
    uses_reference: bool = False  # reads a reference model's log-probs
    head: Head | None = None
    # Computed once from the whole `[A, ...]` batch before the micro-batch scan (SFT: the
    # target-token count that normalises every micro-batch).
    batch_context: Callable[[Mapping[str, Array]], Any] | None = None
    # Held-out batches are weighted by this metric (default: examples, n_seq / 2).
    weight_metric: str | None = None
    # Metrics derived from the batch means (after the micro-batch mean and after the
    # held-out weighting), e.g. perplexity = exp(loss).
    derive: Callable[[dict[str, Any]], dict[str, Any]] = lambda m: m
    # Batches hold chosen/rejected (or example/KL) halves, 2B sequences; False: single
    # sequences (multi-host batches are then numbered host after host).
    paired: bool = True
    # Trained on rollouts of the current policy: its step source is
    # `dpo_jax.online.METHODS[name]` (instead of the data pipeline's batches).
    rollouts: bool = False
    # Reads `loss.name` / `loss.hyper` (a `dpo_jax.losses` loss, paired or unpaired).
    uses_loss: bool = False
    # run config -> the step's `objective_hyper` (default: the `objective` section less
    # its name).
    hyper: Callable[[Any], dict[str, Any]] | None = None


# ------------------------------------------------------------------------ preference


def _preference_needs(cfg: Any) -> frozenset[str]:
    needs = {"logps"}
    if cfg.loss_hyper.get("use_weighting", False):
        needs.add("wpo")  # the policy's only: WPO never weights by the reference
    if losses.needs_log1m(cfg.loss_name):
        needs.add("log1m")
    if cfg.token_metrics and losses.is_paired(cfg.loss_name):
        needs.add("token_metrics")
    return frozenset(needs)


def preference_loss(inp: ObjectiveInput) -> tuple[Array, dict[str, Any], Any]:
    """Any `losses` loss on `PreferenceStats` (paired) or `UnpairedStats` (KTO family)."""
    cfg, policy = inp.cfg, inp.policy
    if losses.is_paired(cfg.loss_name):
        stats = logprobs.preference_stats(policy, inp.ref)
    else:
        stats = logprobs.unpaired_stats(policy, inp.ref, inp.batch["labels"])
    per_example, metrics, loss_state = losses.compute_loss_with_state(
        stats, cfg.loss_name, inp.loss_state, update=inp.update, **dict(cfg.loss_hyper)
    )
    loss = jnp.mean(per_example)
    metrics = dict(metrics)
    if policy.entropy_sums_S is not None:
        metrics.update(logprobs.token_metrics(policy))
    return loss, metrics, loss_state


# ------------------------------------------------------------------------ SFT


def count_targets(batch_A: Mapping[str, Array]) -> Array:
    """Target tokens of a whole `[A, N, L]` batch (float32)."""
    return jnp.sum(batch_A["sequence_index"] >= 0).astype(jnp.float32)


def sft_loss(inp: ObjectiveInput) -> tuple[Array, dict[str, Any], Any]:
    """Token NLL of one micro-batch, normalised by the whole step's target tokens.

    The step averages micro-batch losses (and gradients) over `A`, so each micro-batch
    contributes `A * sum(log p) / total`: the step's loss is `sum / total` over all its
    target tokens, whatever the micro-batching.
    """
    total = jnp.maximum(inp.context, 1.0)
    nll_sum = -jnp.sum(inp.policy.logps_S)
    loss = nll_sum * inp.num_micro / total
    return loss, {"num_target_tokens": inp.context}, inp.loss_state


def _sft_derive(metrics: dict[str, Any]) -> dict[str, Any]:
    return {**metrics, "perplexity": jnp.exp(metrics["loss"])}


# ------------------------------------------------------------------------ reward model


def init_reward_head(model_config: Any, rng: Array) -> dict[str, Array]:
    """A fresh scalar head `{"kernel": [D], "bias": []}` (float32).

    It starts near zero (std 0.1 / sqrt(D)) so initial rewards are small and the first
    updates do not blow up the Bradley-Terry logits.
    """
    d = model_config.hidden_size
    kernel = (0.1 / np.sqrt(d)) * jax.random.normal(rng, (d,), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}


def reward_head_axes(model_config: Any) -> dict[str, PartitionSpec]:
    """Logical axes of the scalar head: the kernel follows the model's embed axis."""
    del model_config
    return {"kernel": PartitionSpec("embed"), "bias": PartitionSpec()}


def head_rewards(head: Mapping[str, Array], last_hidden_SxD: Array) -> Array:
    """`[S]` float32 rewards: the linear head on each sequence's last hidden state."""
    h = last_hidden_SxD.astype(jnp.float32)
    return h @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def bradley_terry_loss(
    rewards_S: Array, *, margin_B: Array | None = None, center_rewards_coefficient: float = 0.0
) -> tuple[Array, dict[str, Array]]:
    """Mean `-log sigmoid(r_c - r_r - margin)` over pairs (+ TRL's centring term)."""
    num_pairs = rewards_S.shape[0] // 2
    chosen_B, rejected_B = rewards_S[:num_pairs], rewards_S[num_pairs:]
    diff_B = chosen_B - rejected_B
    if margin_B is not None:
        diff_B = diff_B - margin_B
    loss = -jnp.mean(jax.nn.log_sigmoid(diff_B))
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * jnp.mean((chosen_B + rejected_B) ** 2)
    metrics = {
        "accuracy": jnp.mean((chosen_B > rejected_B).astype(jnp.float32)),
        "margin": jnp.mean(chosen_B - rejected_B),
        "rewards/chosen": jnp.mean(chosen_B),
        "rewards/rejected": jnp.mean(rejected_B),
    }
    return loss, metrics


def reward_model_loss(inp: ObjectiveInput) -> tuple[Array, dict[str, Any], Any]:
    """Bradley-Terry on the head's rewards; `objective.center_rewards_coefficient`."""
    rewards_S = head_rewards(inp.head, inp.policy.last_hidden_SxD)
    margin = inp.batch.get("margin")
    coef = inp.cfg.objective_hyper["center_rewards_coefficient"]
    loss, metrics = bradley_terry_loss(rewards_S, margin_B=margin, center_rewards_coefficient=coef)
    return loss, metrics, inp.loss_state


def _policy_gradient_objective(name: str) -> Objective:
    """GRPO (Shao et al. 2024) or RLOO (Ahmadian et al. 2024): critic-free, group or
    leave-one-out baselines (`dpo_jax.policy_gradient`, `dpo_jax.group_loop`); the two
    differ in their batches' advantages and in `config_hyper` (RLOO's KL is in the reward)."""
    return Objective(
        name,
        policy_gradient.objective_loss,
        needs=lambda cfg: frozenset({"token_logps", "token_metrics"}),
        batch_context=policy_gradient.batch_context,
        paired=False,
        rollouts=True,
        hyper=lambda config: policy_gradient.config_hyper(config, name),
    )


OBJECTIVES: dict[str, Objective] = {
    "preference": Objective(
        "preference",
        preference_loss,
        needs=_preference_needs,
        uses_reference=True,
        uses_loss=True,
    ),  # fmt: skip
    # Online DPO (Guo et al. 2024): pairs sampled from the current policy and labelled by
    # a reward or judge (`dpo_jax.online_dpo`), any paired loss, the reference's
    # log-probs precomputed by the rollout's scoring pass.
    "online_dpo": Objective(
        "online_dpo",
        preference_loss,
        needs=_preference_needs,
        uses_reference=True,
        uses_loss=True,
        rollouts=True,
    ),  # fmt: skip
    # GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024): critic-free, group or
    # leave-one-out baselines (`dpo_jax.policy_gradient`, `dpo_jax.group_loop`).
    **{name: _policy_gradient_objective(name) for name in ("grpo", "rloo")},
    "sft": Objective(
        "sft",
        sft_loss,
        needs=lambda cfg: frozenset({"logps"}),
        batch_context=count_targets,
        weight_metric="num_target_tokens",
        derive=_sft_derive,
        paired=False,
    ),  # fmt: skip
    "reward_model": Objective(
        "reward_model",
        reward_model_loss,
        needs=lambda cfg: frozenset({"last_hidden"}),
        head=Head(init_reward_head, reward_head_axes),
    ),  # fmt: skip
    # PPO's update (dpo_jax/ppo.py; the rollouts are the phase's, dpo_jax/ppo_loop.py):
    # per-token log-probs and a value head on every hidden state; the reference enters
    # through the rollout's rewards, not the step.
    "ppo": Objective(
        "ppo",
        ppo.objective_loss,
        head=Head(init_reward_head, reward_head_axes),
        needs=lambda cfg: frozenset({"token_logps", "token_metrics", "hidden"}),
        paired=False,  # one episode per row: hosts' rows numbered host after host
        rollouts=True,
        hyper=ppo.config_hyper,
    ),  # fmt: skip
}


def get(name: str) -> Objective:
    """The registered objective `name`."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def split_params(objective: Objective, params: Any) -> tuple[Any, Any]:
    """(model params, head params or None) of the state's params."""
    if objective.head is None:
        return params, None
    return params[MODEL], params[HEAD]


def with_head(objective: Objective, model_config: Any, params: Any, head: Any, rng: Array) -> Any:
    """The trained params of `objective`: the model's, or `{"model", "head"}` with `head`
    (a fresh one from `rng` when None)."""
    if objective.head is None:
        return params
    if head is None:
        head = objective.head.init(model_config, rng)
    return {MODEL: params, HEAD: head}


def split_head(objective: Objective, params: Any) -> tuple[Any, Any]:
    """(model params, head or None) of params that may already carry a head (a trained
    reward model passed back in)."""
    if objective.head is not None and isinstance(params, Mapping) and HEAD in params:
        return params[MODEL], params[HEAD]
    return params, None


def logical_axes(objective: Objective, model_config: Any, model_axes: Any) -> Any:
    """Logical axes of `with_head`'s params."""
    if objective.head is None:
        return model_axes
    return {MODEL: model_axes, HEAD: objective.head.logical_axes(model_config)}
