"""PPO on the one loop: `PPOSource`, the step source of objective "ppo".

    rollout r:  `rollouts.RolloutSource.sample` (policy, temperature 1)
                -> rows (prompt + completion, the data pipeline's stacked layout)
                -> one scoring pass: policy per-token log-probs and values, reference
                   per-token log-probs; scores from the reward
                -> KL-penalised rewards, GAE advantages and returns (`dpo_jax.ppo`)
    then        num_epochs x num_mini_batches steps of `train.run_loop` (the one jitted
                train step, objective "ppo"), rows shuffled per epoch
    and         the KL controller's update from the rollout's mean KL.

The controller's coefficient and the next rollout index are the data state at a rollout
boundary (`rollouts.RolloutSource`): a killed run resumes at the first unfinished
rollout and continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import objectives, ppo, reward_sources, rollouts, sampling, scoring
from dpo_jax.errors import config_error
from dpo_jax.rollouts import RolloutConfig
from dpo_jax.sampling import from_tokens, to_tokens


@dataclasses.dataclass(frozen=True)
class PPOConfig(RolloutConfig):
    """PPO's settings: the shared `online.*` ones and `config.ppo` (configs/default.py
    holds every default; there are none here)."""

    num_epochs: int  # PPO epochs over each rollout
    target_kl: float | None  # None: fixed coefficient; else Ziegler's controller
    kl_horizon: float
    kl_estimator: str
    gamma: float
    lam: float
    whiten_rewards: bool
    whiten_advantages: bool
    clip: float
    value_clip: float
    vf_coef: float

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> PPOConfig:
        """From `config.online`, `config.ppo` and the run's `grad_accum_steps`."""
        shared = {f.name for f in dataclasses.fields(RolloutConfig)} - {"grad_accum_steps"}
        own = {f.name for f in dataclasses.fields(cls)} - shared - {"grad_accum_steps"}
        out = cls(
            grad_accum_steps=int(config.grad_accum_steps),
            **{k: config.online[k] for k in shared}, **{k: config.ppo[k] for k in own},
        )  # fmt: skip
        out.check()
        return out

    def check(self) -> None:
        super().check()
        if self.num_epochs < 1:
            raise config_error("ppo.num_epochs", f"must be >= 1, got {self.num_epochs}")
        if self.temperature != 1.0:
            raise config_error(
                "online.temperature", f"PPO samples from the policy itself, got {self.temperature}",
                "set it to 1.0 (the ratios and the KL estimate assume it)",
            )  # fmt: skip
        if self.kl_estimator not in ppo.KL_ESTIMATORS:
            raise config_error(
                "ppo.kl_estimator", f"{self.kl_estimator!r} is not an estimator",
                f"choose one of {ppo.KL_ESTIMATORS}",
            )  # fmt: skip
        if self.target_kl is not None and not self.target_kl > 0:
            raise config_error("ppo.target_kl", f"must be > 0 or None, got {self.target_kl}")

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer updates per rollout."""
        return self.num_epochs * self.num_mini_batches

    @property
    def num_steps(self) -> int:
        """Optimizer updates of the whole phase (the schedule's length)."""
        return self.num_rollouts * self.steps_per_rollout


# ------------------------------------------------------------------------ rollouts


@functools.partial(
    jax.jit,
    static_argnames=("estimator", "gamma", "lam", "whiten_rewards", "whiten_advantages"),
)
def advantages(
    scores_S: jax.Array,
    logps_SxM: jax.Array,
    ref_logps_SxM: jax.Array,
    values_SxM: jax.Array,
    mask_SxM: jax.Array,
    kl_coef: jax.Array,
    *,
    estimator: str,
    gamma: float,
    lam: float,
    whiten_rewards: bool,
    whiten_advantages: bool,
) -> dict[str, jax.Array]:
    """KL-penalised rewards (optionally whitened, mean kept), GAE advantages (optionally
    whitened) and returns of one rollout, plus its per-sequence KL sums."""
    rewards, kl = ppo.penalised_rewards(
        scores_S, logps_SxM, ref_logps_SxM, mask_SxM, kl_coef, estimator
    )
    if whiten_rewards:
        rewards = ppo.masked_whiten(rewards, mask_SxM, shift_mean=False)
    adv, returns = ppo.gae(rewards, values_SxM, mask_SxM, gamma, lam)
    if whiten_advantages:
        adv = ppo.masked_whiten(adv, mask_SxM)
    return {"advantages": adv, "returns": returns, "rewards": rewards, "kl_S": jnp.sum(kl, -1)}


@dataclasses.dataclass
class Rollout:
    """One rollout: the PPO batch (`[S, L]` rows + `ppo.BATCH_COLUMNS`) and its statistics."""

    batch: dict[str, np.ndarray]
    samples: sampling.SampleOutput
    scores: np.ndarray  # [S]
    kl: np.ndarray  # [S] per-sequence KL estimate (sum over the completion)
    metrics: dict[str, float]


def collect_rollout(
    trainer: Any,
    state: Any,
    ref_params: Any,
    prompts: Sequence[Sequence[int]],
    reward: reward_sources.RolloutReward,
    cfg: PPOConfig,
    key: jax.Array,
    kl_coef: float,
    *,
    samples: sampling.SampleOutput | None = None,
) -> Rollout:
    """Sample (unless `samples` are given), score and compute advantages for one rollout
    of `len(prompts) * n` episodes."""
    params = state.params
    if samples is None:
        eos_ids, pad_id = rollouts.special_ids(trainer.model_config)
        samples = sampling.generate(
            trainer.model_config, params[objectives.MODEL], prompts, key,
            cfg.sampling(eos_ids, pad_id), mesh=trainer.mesh,
        )  # fmt: skip
    _, pad_id = rollouts.special_ids(trainer.model_config)
    rows, mask = sampling.stacked_rows(samples, pad_id)
    if trainer.step_config.unembed_scored_only:  # one K for the phase: max_new_tokens
        from dpo_jax import logprobs

        rows["scored_positions"] = logprobs.scored_positions(rows["sequence_index"], mask.shape[1])
    scores = rollouts.reward_scores(reward, samples)
    step_cfg = trainer.step_config
    fn = rollouts.jitted(token_stats, step_cfg.apply_fn, step_cfg.logps_chunk_size)
    stats = rollouts.score_rows(trainer, fn, (params, ref_params), rows, cfg.rows_per_micro)
    comp = {k: from_tokens(v, mask, rows["sequence_index"]) for k, v in stats.items()}
    out = jax.device_get(
        advantages(
            scores, comp["logps"], comp["ref_logps"], comp["values"], mask,
            jnp.float32(kl_coef), estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=cfg.lam,
            whiten_rewards=cfg.whiten_rewards, whiten_advantages=cfg.whiten_advantages,
        )
    )  # fmt: skip
    batch = dict(rows)
    batch["old_logps"] = to_tokens(comp["logps"], mask, rows["sequence_index"])
    batch["old_values"] = to_tokens(comp["values"], mask, rows["sequence_index"])
    batch["advantages"] = to_tokens(out["advantages"], mask, rows["sequence_index"])
    batch["returns"] = to_tokens(out["returns"], mask, rows["sequence_index"])
    kl = np.asarray(out["kl_S"], np.float64)
    non_score = -float(kl_coef) * kl
    metrics = {
        # TRL's names: mean per-sequence KL, scores, -logp (entropy), KL-penalised return
        "objective/kl": float(kl.mean()),
        "objective/scores": float(scores.mean()),
        "objective/entropy": float(-np.sum(comp["logps"] * mask, -1).mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/rlhf_reward": float(non_score.mean() + scores.mean()),
        "objective/kl_coef": float(kl_coef),
        "val/num_eos_tokens": float(samples.finished.sum()),
        "val/completion_length": float(samples.lengths.mean()),
    }
    return Rollout(batch, samples, scores, kl, metrics)


class PPOSource(rollouts.RolloutSource):
    """Objective "ppo"'s step source: rollout r, then its `num_epochs x num_mini_batches`
    updates; the KL controller moves after each rollout."""

    def __init__(
        self,
        cfg: PPOConfig,
        prompts: Sequence[Sequence[int]],
        reward: reward_sources.RolloutReward,
        ref_params: Any,
        seed: int,
        mesh: Any,
    ):
        super().__init__(cfg, prompts, reward, ref_params, seed, mesh)
        self.ppo = cfg
        self.kl_coef = float(np.float32(cfg.kl_coef))
        self._kl = 0.0

    def collect(self, trainer: Any, state: Any, rollout: int) -> tuple[list[dict], dict]:
        cfg = self.ppo
        roll = collect_rollout(
            trainer, state, self.ref_params, self.rollout_prompts(rollout), self.reward, cfg,
            self.rollout_key(rollout), self.kl_coef,
        )  # fmt: skip
        self._kl = roll.metrics["objective/kl"]
        return self.passes(roll.batch, rollout, cfg.num_epochs), roll.metrics

    def finish(self, rollout: int) -> None:
        self.kl_coef = float(
            ppo.update_kl_coef(
                self.kl_coef, self._kl, self.ppo.rollout_batch_size,
                target=self.ppo.target_kl, horizon=self.ppo.kl_horizon,
            )
        )  # fmt: skip

    def controller_state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef}

    def load_controller(self, data_state: Mapping[str, Any]) -> None:
        self.kl_coef = float(data_state["kl_coef"])


def token_stats(
    apply_fn: Any,
    params: Mapping[str, Any],
    ref_params: Any,
    batch: Mapping[str, jax.Array],
    n_seq: int,
    chunk_size: int = 0,
) -> dict[str, jax.Array]:
    """The rollout's scoring pass: per-token policy log-probs and values (the step's own
    `scoring.score` and value head, so the first update's ratios are 1 up to float
    rounding) and the reference's per-token log-probs. All `[N, L]`, token-aligned."""
    policy = scoring.score(
        apply_fn, params[objectives.MODEL], batch, n_seq, needs=("token_logps", "hidden"),
        chunk_size=chunk_size,
    )  # fmt: skip
    ref = scoring.score(
        apply_fn, ref_params, batch, n_seq, needs=("token_logps",), chunk_size=chunk_size
    )
    return {
        "logps": policy.token_logps_NxL,
        "values": ppo.token_values(params[objectives.HEAD], policy.hidden_NxLxD),
        "ref_logps": ref.token_logps_NxL,
    }


def example_columns() -> tuple[str, ...]:
    """The batch columns of a PPO update (zeros in a dry run's example step)."""
    return ppo.BATCH_COLUMNS
