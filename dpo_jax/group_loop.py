"""GRPO and RLOO on the one loop: `GroupSource`, the step source of objectives "grpo"
and "rloo" (no critic, `dpo_jax.policy_gradient`).

    rollout r:  `rollouts.RolloutSource.sample`: K = online.samples_per_prompt completions
                of each drawn prompt (a group), at temperature 1
                -> scores from the reward (minus online.missing_eos_penalty)
                -> GRPO: group-normalised advantages (Shao et al. 2024; Dr. GRPO without
                   the std, Liu et al. 2025); RLOO: the KL to the reference in the reward,
                   then the leave-one-out baseline (Ahmadian et al. 2024)
                -> DAPO's dynamic sampling (optional): groups whose rewards are all equal
                   are dropped from the loss (their rows carry no scored token)
    then        grpo.num_iterations x online.num_mini_batches steps of the one loop.

The old log-probs are the step's own when each rollout gets one update (exactly
on-policy, no scoring pass for them); the reference's per-token log-probs are scored only
when the KL is used (online.kl_coef > 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax import objectives, policy_gradient, rollouts, sampling
from dpo_jax.errors import config_error
from dpo_jax.rollouts import RolloutConfig
from dpo_jax.sampling import from_tokens, to_tokens

METHODS = ("grpo", "rloo")


@dataclasses.dataclass(frozen=True)
class GroupConfig(RolloutConfig):
    """GRPO's / RLOO's settings: `online.*`, `grpo.*` and the method."""

    method: str  # "grpo" | "rloo"
    num_iterations: int
    epsilon_low: float
    epsilon_high: float
    loss_type: str
    scale_rewards: str
    dynamic_sampling: bool
    missing_eos_penalty: float | None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> GroupConfig:
        shared = {f.name for f in dataclasses.fields(RolloutConfig)} - {"grad_accum_steps"}
        own = {"num_iterations", "epsilon_low", "epsilon_high", "loss_type", "scale_rewards",
               "dynamic_sampling"}  # fmt: skip
        out = cls(
            grad_accum_steps=int(config.grad_accum_steps), method=str(config.objective.name),
            missing_eos_penalty=config.online.missing_eos_penalty,
            **{k: config.online[k] for k in shared}, **{k: config.grpo[k] for k in own},
        )  # fmt: skip
        out.check()
        return out

    def check(self) -> None:
        super().check()
        if self.samples_per_prompt < 2:
            raise config_error(
                "online.samples_per_prompt", f"{self.method} compares completions of a "
                f"prompt, got {self.samples_per_prompt}", "set it to 2 or more (TRL num_generations)",
            )  # fmt: skip
        if self.temperature != 1.0:
            raise config_error(
                "online.temperature", f"{self.method} samples from the policy itself, got "
                f"{self.temperature}", "set it to 1.0 (the ratios and the KL assume it)",
            )  # fmt: skip
        if self.num_iterations < 1:
            raise config_error("grpo.num_iterations", f"must be >= 1, got {self.num_iterations}")
        if not 0 <= self.epsilon_low < 1:
            raise config_error("grpo.epsilon_low", f"must be in [0, 1), got {self.epsilon_low}")
        if not self.epsilon_high >= 0:
            raise config_error("grpo.epsilon_high", f"must be >= 0, got {self.epsilon_high}")
        if self.loss_type not in policy_gradient.LOSS_TYPES:
            raise config_error(
                "grpo.loss_type", f"{self.loss_type!r} is not a loss type",
                f"choose one of {policy_gradient.LOSS_TYPES}",
            )  # fmt: skip
        if self.scale_rewards not in policy_gradient.SCALES:
            raise config_error(
                "grpo.scale_rewards", f"{self.scale_rewards!r} is not a scaling",
                f"choose one of {policy_gradient.SCALES}",
            )  # fmt: skip

    @property
    def steps_per_rollout(self) -> int:
        return self.num_iterations * self.num_mini_batches

    @property
    def num_steps(self) -> int:
        return self.num_rollouts * self.steps_per_rollout

    @property
    def on_policy(self) -> bool:
        """One update per rollout: the old log-probs are the step's own."""
        return self.steps_per_rollout == 1


def scoring_pass(
    apply_fn: Any,
    params: Any,
    ref_params: Any,
    batch: Any,
    n_seq: int,
    chunk_size: int = 0,
    *,
    policy: bool = True,
    reference: bool = True,
) -> dict[str, jax.Array]:
    """Per-token log-probs `[N, L]` of the policy and/or the reference on a micro-batch."""
    out = {}
    if policy:
        out["logps"] = rollouts.token_logps(apply_fn, params, batch, n_seq, chunk_size)
    if reference:
        out["ref_logps"] = rollouts.token_logps(apply_fn, ref_params, batch, n_seq, chunk_size)
    return out


def _policy_and_reference(apply_fn, params, ref_params, batch, n_seq, chunk_size=0):
    return scoring_pass(apply_fn, params, ref_params, batch, n_seq, chunk_size)


def _policy_only(apply_fn, params, batch, n_seq, chunk_size=0):
    return scoring_pass(apply_fn, params, None, batch, n_seq, chunk_size, reference=False)


def _reference_only(apply_fn, ref_params, batch, n_seq, chunk_size=0):
    return scoring_pass(apply_fn, None, ref_params, batch, n_seq, chunk_size, policy=False)


class GroupSource(rollouts.RolloutSource):
    """Objectives "grpo" and "rloo"'s step source."""

    @property
    def group(self) -> GroupConfig:
        """The method's settings (`self.cfg`, typed)."""
        return self.cfg  # type: ignore[return-value]

    def collect(self, trainer: Any, state: Any, rollout: int) -> tuple[list[dict], dict]:
        batch, _, metrics = self.rollout_batch(trainer, state, rollout)
        return self.passes(batch, rollout, self.group.num_iterations), metrics

    def rollout_batch(
        self, trainer: Any, state: Any, rollout: int
    ) -> tuple[dict[str, np.ndarray], Any, dict[str, Any]]:
        """Rollout `rollout` as one `[S, L]` batch (row k = sample k, prompt-major), its
        samples and metrics."""
        cfg = self.group
        model_params, _ = objectives.split_params(trainer.step_config.objective_fn, state.params)
        samples = self.sample(trainer, model_params, rollout)
        _, pad_id = rollouts.special_ids(trainer.model_config)
        rows, mask = sampling.stacked_rows(samples, pad_id)
        self.scored_positions(trainer, rows, mask.shape[1])
        scores = rollouts.reward_scores(self.reward, samples)
        if cfg.missing_eos_penalty is not None:  # TRL: a completion cut off at the cap
            scores = scores - np.float32(cfg.missing_eos_penalty) * (~samples.finished)
        stats = self._score(trainer, model_params, rows, mask)
        k = cfg.samples_per_prompt
        metrics: dict[str, Any] = {}
        if "ref_logps" in stats:
            # the KL of the sampled completions: log pi_old - log pi_ref per token (k1),
            # pi_old from the sampler (the policy's own log-probs of its samples)
            old = stats.get("logps", samples.logps)
            kl_S = np.sum(np.where(mask, old - stats["ref_logps"], 0.0), -1)
            metrics["objective/kl"] = float(kl_S.mean())
        if cfg.method == "rloo":
            rewards = scores
            if cfg.kl_coef > 0:
                rewards = np.asarray(policy_gradient.rloo_rewards(scores, kl_S, cfg.kl_coef))
            adv_S = np.asarray(policy_gradient.rloo_advantages(rewards, k))
            metrics["objective/rlhf_reward"] = float(np.mean(rewards))
        else:
            adv_S = np.asarray(policy_gradient.group_advantages(scores, k, scale=cfg.scale_rewards))
        keep_S = np.ones(scores.shape, bool)
        if cfg.dynamic_sampling:
            keep_S = np.asarray(policy_gradient.dynamic_sampling_mask(scores, k))
        batch = dict(rows)
        si = rows["sequence_index"]
        batch["sequence_index"] = np.where(keep_S[:, None], si, -1).astype(np.int32)
        batch["advantages"] = to_tokens(np.broadcast_to(adv_S[:, None], mask.shape), mask, si)
        if "logps" in stats:
            batch["old_logps"] = to_tokens(stats["logps"], mask, si)
        if cfg.method == "grpo" and cfg.kl_coef > 0:
            batch["ref_token_logps"] = to_tokens(stats["ref_logps"], mask, si)
        groups = scores.reshape(-1, k)
        metrics.update({
            # TRL's GRPO names
            "objective/scores": float(scores.mean()),
            "reward": float(scores.mean()),
            "reward_std": float(np.std(groups, axis=1, ddof=1).mean()),
            "frac_reward_zero_std": float(np.mean(np.all(groups == groups[:, :1], axis=1))),
            "completions/mean_length": float(samples.lengths.mean()),
            "completions/clipped_ratio": float(np.mean(~samples.finished)),
            "val/num_eos_tokens": float(samples.finished.sum()),
        })  # fmt: skip
        if cfg.dynamic_sampling:
            metrics["dynamic_sampling/kept_fraction"] = float(keep_S.mean())
        return batch, samples, metrics

    def _score(
        self, trainer: Any, model_params: Any, rows: dict, mask: np.ndarray
    ) -> dict[str, np.ndarray]:
        """The scoring pass the method needs: the old policy's per-token log-probs when a
        rollout gets several updates, the reference's when the KL is used."""
        cfg = self.group
        want_policy = not cfg.on_policy
        want_ref = cfg.kl_coef > 0
        if not (want_policy or want_ref):
            return {}
        step_cfg = trainer.step_config
        if want_policy and want_ref:
            fn, args = _policy_and_reference, (model_params, self.ref_params)
        elif want_policy:
            fn, args = _policy_only, (model_params,)
        else:
            fn, args = _reference_only, (self.ref_params,)
        jitted = rollouts.jitted(fn, step_cfg.apply_fn, step_cfg.logps_chunk_size)
        stats = rollouts.score_rows(trainer, jitted, args, rows, cfg.rows_per_micro)
        return {k: from_tokens(v, mask, rows["sequence_index"]) for k, v in stats.items()}


def batch_columns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The per-token columns of this run's step batches (zeros in a dry run's example)."""
    cfg = GroupConfig.from_config(config)
    cols = ["advantages"]
    if not cfg.on_policy:
        cols.append("old_logps")
    if cfg.method == "grpo" and cfg.kl_coef > 0:
        cols.append("ref_token_logps")
    return tuple(cols)
