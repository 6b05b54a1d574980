"""Critic-free on-policy policy gradient (GRPO, Dr. GRPO, DAPO, RLOO): the pure pieces.

No value head: the baseline of a completion is computed from the other completions of
its prompt. Rollouts come in groups: `S = G x K` sequences, the `K` samples of prompt
`g` at positions `g*K .. g*K + K-1` (group-major, as TRL's `repeat_interleave`).

- Advantages, one per sequence (computed once per rollout, host or device):
  `group_advantages` (GRPO, Shao et al. 2024, "DeepSeekMath"; `scale="none"` is
  Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training"), `rloo_advantages`
  with `rloo_rewards` (RLOO, Ahmadian et al. 2024, "Back to Basics"), and
  `dynamic_sampling_mask` (DAPO, Yu et al. 2025: drop groups whose rewards are equal).
- The update (inside the jitted step): `clipped_token_loss` (PPO's clipped ratio with
  DAPO's asymmetric "clip-higher" bounds), `kl_k3` (GRPO's per-token KL penalty against
  the reference), `aggregate` (how per-token losses become one number: `loss_type`), and
  `objective_loss`, the loss of objectives `"grpo"` and `"rloo"` (`objectives.Objective`).

Per-token arrays are `[N, L]` rows aligned with `input_ids` (entry t is about token t),
one sequence per row (the stacked layout, as PPO's), with `mask_NxL` True on the
completion tokens (`sequence_index >= 0`).

Micro-batches and gradient accumulation. The step splits an optimizer batch into `A`
micro-batches, calls the loss once per micro-batch and averages losses and gradients
over `A` (`train_step`). An objective that normalises by a count over the *whole*
optimizer batch therefore returns `A * sum_micro / total` (the SFT objective's
mechanism, `objectives.sft_loss`): the step's loss is then `sum_all / total`, the same
whatever the micro-batching. `batch_context(batch_A)` computes those totals once from
the whole `[A, N, L]` batch (`Objective.batch_context`); `aggregate` takes them through
`context` and `num_micro`:

- `"grpo"`: mean over each sequence's tokens, then the mean over the optimizer batch's
  sequences (TRL: per micro-batch, then divided by the accumulation steps: the same
  when micro-batches hold equally many sequences).
- `"dapo"`: sum over every token / the optimizer batch's token count (DAPO's token-level
  mean; TRL's `"dapo"`, whose `num_items_in_batch` is the count over the whole
  generation batch).
- `"bnpo"`: sum / the *micro-batch's* token count, then averaged over micro-batches by
  the step (TRL's `"bnpo"`); equals `"dapo"` with one micro-batch.
- `"dr_grpo"`: sum / (optimizer batch's sequences x `max_completion_length`), a constant
  normaliser (Dr. GRPO), whatever the lengths.

Sequences count where they have at least one completion token: a row with no
`sequence_index >= 0` (padding, or a sample dropped by dynamic sampling) counts nowhere.
With `context=None` the totals are the micro-batch's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dpo_jax import ppo
from dpo_jax.errors import UserError
from dpo_jax.metric_accumulators import CountedMean, subset_mean

Array = jax.Array

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dapo", "bnpo", "dr_grpo")

# Per-token columns of a GRPO/RLOO batch, `[N, L]` float32 aligned with `input_ids` (0 off
# the completion tokens): the rollout policy's log-probs, the reference's (read only when
# beta > 0) and the sequence's advantage broadcast over its tokens.
BATCH_COLUMNS = ("old_logps", "ref_token_logps", "advantages")
# Hyper-parameters the objective reads from the step's `objective_hyper`: floats, except
# `loss_type` (a string, one of LOSS_TYPES) and `max_completion_length` (an int, read by
# "dr_grpo" only; may be None otherwise). Optional: `on_policy` (bool, default False).
OBJECTIVE_HYPER = ("epsilon_low", "epsilon_high", "beta", "loss_type", "max_completion_length")


# --------------------------------------------------------------------------- advantages


def _groups(scores_S: Array, group_size: int) -> Array:
    """`[G, K]` float32 view of group-major `[S]` scores."""
    S = scores_S.shape[0]
    if group_size < 1 or S % group_size:
        raise UserError(f"{S} sequences do not split into groups of {group_size}")
    return scores_S.astype(jnp.float32).reshape(S // group_size, group_size)


def _std(x: Array, axis: int | None = None) -> Array:
    """Bessel-corrected standard deviation (torch's default `.std()`, which TRL uses);
    0 for a single value (TRL sets the std of one generation to 0)."""
    n = x.size if axis is None else x.shape[axis]
    if n < 2:
        return jnp.zeros_like(jnp.mean(x, axis=axis, keepdims=axis is not None))
    return jnp.std(x, axis=axis, ddof=1, keepdims=axis is not None)


def group_advantages(
    scores_S: Array, group_size: int, *, scale: str = "group", eps: float = 1e-4
) -> Array:
    """GRPO's advantages `(r - mean_group) / (std + eps)`, `[S]` float32.

    `scale` (TRL's `scale_rewards`): "group" divides by the group's std (GRPO, Shao et al.
    2024), "batch" by the std of every score in `scores_S`, "none" not at all (Dr. GRPO,
    Liu et al. 2025: the std scaling weights prompts by how easy or hard they are). The
    std is Bessel-corrected (n - 1), as TRL's torch `.std()`; `eps` is added to the std,
    not the variance (TRL's 1e-4), so a group of equal scores gets advantages 0.
    """
    if scale not in SCALES:
        raise UserError(f"scale={scale!r}: expected one of {SCALES}")
    r_GxK = _groups(scores_S, group_size)
    adv_GxK = r_GxK - jnp.mean(r_GxK, axis=1, keepdims=True)
    if scale == "group":
        adv_GxK = adv_GxK / (_std(r_GxK, axis=1) + eps)
    elif scale == "batch":
        adv_GxK = adv_GxK / (_std(r_GxK) + eps)
    return adv_GxK.reshape(-1)


def rloo_rewards(scores_S: Array, kl_S: Array, beta: float) -> Array:
    """RLOO's rewards `scores - beta * kl` (Ahmadian et al. 2024): the KL penalty enters the
    reward, as a sequence-level sum of per-token k1 KLs (`ppo.kl_per_token(old, ref,
    mask, "k1")` summed over the completion, with the rollout policy's log-probs), before
    the leave-one-out baseline (TRL's RLOOTrainer)."""
    return scores_S.astype(jnp.float32) - beta * kl_S.astype(jnp.float32)


def rloo_advantages(scores_S: Array, group_size: int) -> Array:
    """Leave-one-out advantages `r_i - mean_{j != i} r_j`, `[S]` float32 (Ahmadian et al.
    2024), which equal `K / (K - 1) * (r_i - mean_group)`. Needs `K >= 2`."""
    if group_size < 2:
        raise UserError(f"RLOO needs at least 2 samples per prompt, got {group_size}")
    r_GxK = _groups(scores_S, group_size)
    baseline_GxK = (jnp.sum(r_GxK, axis=1, keepdims=True) - r_GxK) / (group_size - 1)
    return (r_GxK - baseline_GxK).reshape(-1)


def dynamic_sampling_mask(scores_S: Array, group_size: int) -> Array:
    """`[S]` bool: True for the samples of groups whose scores are not all equal (DAPO's
    dynamic sampling keeps only those: a group of equal scores has advantages 0 and only
    dilutes the batch). Equality is exact."""
    r_GxK = _groups(scores_S, group_size)
    varied_G = jnp.max(r_GxK, axis=1) > jnp.min(r_GxK, axis=1)
    return jnp.repeat(varied_G, group_size)


# --------------------------------------------------------------------------- losses


def kl_k3(logps: Array, ref_logps: Array, mask: Array | None = None) -> Array:
    """Per-token k3 KL estimate `exp(ref - logp) - (ref - logp) - 1` (GRPO's penalty;
    Schulman's unbiased, non-negative estimator), float32, 0 where `mask` is False.
    The same as `ppo.kl_per_token(..., "k3")`, which computes it."""
    if mask is None:
        mask = jnp.ones(jnp.shape(logps), bool)
    return ppo.kl_per_token(logps, ref_logps, mask, "k3")


def clipped_token_loss(
    logps_NxL: Array,
    old_logps_NxL: Array,
    advantages_NxL: Array,
    mask_NxL: Array,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[Array, dict[str, CountedMean]]:
    """Per-token `-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`, `rho = p / p_old`.

    Asymmetric bounds are DAPO's clip-higher (eps_high > eps_low leaves room to raise
    unlikely tokens). Returns the `[N, L]` loss (0 off the mask) and TRL's clip metrics,
    as token means over the mask (`CountedMean`, no gradient): `clip_ratio/low_mean`
    (rho < 1 - eps_low with A < 0), `clip_ratio/high_mean` (rho > 1 + eps_high with A > 0),
    `clip_ratio/region_mean` (either): the tokens whose gradient the clip removed.
    """
    log_ratio = logps_NxL.astype(jnp.float32) - old_logps_NxL.astype(jnp.float32)
    # off the mask old log-probs may be anything: keep exp() finite there
    ratio = jnp.exp(jnp.where(mask_NxL, log_ratio, 0.0))
    adv = advantages_NxL.astype(jnp.float32)
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -jnp.minimum(ratio * adv, clipped_ratio * adv)
    sg_ratio = jax.lax.stop_gradient(ratio)
    low = (sg_ratio < 1.0 - epsilon_low) & (adv < 0)
    high = (sg_ratio > 1.0 + epsilon_high) & (adv > 0)
    metrics = {
        "clip_ratio/low_mean": subset_mean(low, mask_NxL),
        "clip_ratio/high_mean": subset_mean(high, mask_NxL),
        "clip_ratio/region_mean": subset_mean(low | high, mask_NxL),
    }
    return jnp.where(mask_NxL, per_token, 0.0), metrics


def batch_context(batch_A: Mapping[str, Array]) -> dict[str, Array]:
    """Counts over the whole `[A, N, L]` optimizer batch that `aggregate` normalises by:
    `tokens` (completion tokens) and `sequences` (rows with at least one), float32."""
    mask_AxNxL = batch_A["sequence_index"] >= 0
    return {
        "tokens": jnp.sum(mask_AxNxL).astype(jnp.float32),
        "sequences": jnp.sum(jnp.any(mask_AxNxL, axis=-1)).astype(jnp.float32),
    }


def aggregate(
    per_token_NxL: Array,
    mask_NxL: Array,
    loss_type: str,
    max_completion_length: int | None = None,
    *,
    context: Mapping[str, Array] | None = None,
    num_micro: int = 1,
) -> Array:
    """One micro-batch's loss from per-token losses (see the module docstring).

    `context` (`batch_context` of the whole optimizer batch) and `num_micro` (its `A`)
    make "grpo", "dapo" and "dr_grpo" normalise over the whole optimizer batch: the
    result is `A * sum / total`, so the step's mean over micro-batches is `sum / total`.
    Without `context` the totals are this micro-batch's. "bnpo" is always the
    micro-batch's token mean (TRL).
    """
    if loss_type not in LOSS_TYPES:
        raise UserError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    mask_f = mask_NxL.astype(jnp.float32)
    x = jnp.where(mask_NxL, per_token_NxL.astype(jnp.float32), 0.0)
    micro_tokens = jnp.sum(mask_f)
    if loss_type == "bnpo":
        return jnp.sum(x) / jnp.maximum(micro_tokens, 1.0)
    if context is None:
        context = {"tokens": micro_tokens, "sequences": jnp.sum(jnp.any(mask_NxL, axis=-1))}
        num_micro = 1
    sequences = jnp.maximum(context["sequences"].astype(jnp.float32), 1.0)
    if loss_type == "grpo":
        lengths_N = jnp.sum(mask_f, axis=-1)
        seq_means_N = jnp.sum(x, axis=-1) / jnp.maximum(lengths_N, 1.0)
        return jnp.sum(seq_means_N) * num_micro / sequences
    if loss_type == "dapo":
        return jnp.sum(x) * num_micro / jnp.maximum(context["tokens"], 1.0)
    if not max_completion_length:
        raise UserError("loss_type='dr_grpo' needs max_completion_length > 0")
    return jnp.sum(x) * num_micro / (sequences * max_completion_length)


# ------------------------------------------------------------ the "grpo"/"rloo" objective


def config_hyper(config: Any, method: str) -> dict[str, Any]:
    """The step's `objective_hyper` of objective "grpo" or "rloo" from a run config
    (`config.grpo`, `config.online`). RLOO's KL is in its reward, so its loss has none.
    One update per rollout (`num_iterations = num_mini_batches = 1`) is exactly on-policy:
    the old log-probs are the step's own (no scoring pass for them)."""
    grpo, shared = config.grpo, config.online
    return {
        "epsilon_low": float(grpo.epsilon_low),
        "epsilon_high": float(grpo.epsilon_high),
        "beta": 0.0 if method == "rloo" else float(shared.kl_coef),
        "loss_type": str(grpo.loss_type),
        "max_completion_length": int(shared.max_new_tokens),
        "on_policy": int(grpo.num_iterations) == 1 and int(shared.num_mini_batches) == 1,
    }


def objective_loss(inp: Any) -> tuple[Array, dict[str, Any], Any]:
    """The loss of objectives `"grpo"` and `"rloo"` (`objectives.ObjectiveInput` in).

    `aggregate(clipped_token_loss + beta * kl_k3)` with the step's `objective_hyper`
    (`OBJECTIVE_HYPER`). GRPO puts the reference KL in the loss (beta > 0); RLOO puts it
    in the rewards (`rloo_rewards`) and runs this with beta = 0. With beta == 0 the
    `ref_token_logps` column is never read.

    The ratio's denominator: the batch's `old_logps` (the rollout policy's log-probs,
    constants); when that column is absent or `objective_hyper["on_policy"]` is true, the
    current log-probs under `stop_gradient` (TRL with `num_iterations == 1`): the ratio is
    then 1 and its gradient `grad log p`, so each token's gradient is `-A grad log p` over
    the normaliser, with no scoring pass for the old log-probs.

    Reads the policy's per-token log-probs (`token_logps_NxL`; `needs` "token_logps") and,
    when the scoring pass has them, its entropy sums for `policy/entropy` ("token_metrics").
    Metrics: `loss`, `clip_ratio/{low,high,region}_mean`, `kl` (beta > 0) and
    `policy/entropy`, the token means as `CountedMean`s (token-weighted over micro-batches,
    as TRL's global masked means).
    """
    policy, batch, hyper = inp.policy, inp.batch, inp.cfg.objective_hyper
    mask = batch["sequence_index"] >= 0
    logps = policy.token_logps_NxL
    if hyper.get("on_policy", False) or "old_logps" not in batch:
        old_logps = jax.lax.stop_gradient(logps)
    else:
        old_logps = batch["old_logps"]
    per_token, metrics = clipped_token_loss(
        logps, old_logps, batch["advantages"], mask,
        float(hyper["epsilon_low"]), float(hyper["epsilon_high"]),
    )  # fmt: skip
    beta = float(hyper["beta"])
    if beta > 0.0:  # beta == 0: the reference is not read (it need not exist)
        kl = kl_k3(logps, batch["ref_token_logps"], mask)
        per_token = per_token + beta * kl
        metrics["kl"] = subset_mean(kl, mask)
    loss = aggregate(
        per_token, mask, hyper["loss_type"], hyper.get("max_completion_length"),
        context=inp.context, num_micro=inp.num_micro,
    )  # fmt: skip
    metrics["loss"] = loss
    if policy.entropy_sums_S is not None:  # mean next-token entropy over completion tokens
        sg = jax.lax.stop_gradient
        metrics["policy/entropy"] = CountedMean(
            jnp.sum(sg(policy.entropy_sums_S)).astype(jnp.float32),
            jnp.sum(policy.lengths_S).astype(jnp.float32),
        )
    return loss, metrics, inp.loss_state
