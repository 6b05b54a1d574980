"""The PPO phase: rollouts with the KV-cache sampler, then PPO epochs of `Trainer.step`.

    rollout r:  prompts -> sampling.generate (policy, temperature 1)
                -> rows (prompt + completion, the data pipeline's stacked layout)
                -> one scoring pass: policy per-token log-probs and values, reference
                   per-token log-probs; scores from the reward
                -> KL-penalised rewards, GAE advantages and returns (`dpo_jax.ppo`)
    then        num_epochs x num_mini_batches calls of `Trainer.step` (the one jitted
                train step, objective "ppo"), rows shuffled per epoch
    then        the KL controller's update from the rollout's mean KL.

Multi-host: every host draws the same prompts and holds the whole rollout (the sampler
runs on all devices, rows split over the data-parallel axes, and gathers its output); the
work on it is split: each host scores its share of the episodes with the reward, feeds
its share of each scoring micro-batch and of each update's micro-batches (`host_rows`),
and the results are gathered back in episode order. `ppo.rollout_batch_size` counts the
episodes of all hosts together.

Everything random is a function of `(seed, rollout index)`: the prompts a rollout draws,
the sampler's key and each epoch's shuffle. The controller's coefficient and the next
rollout index are the checkpoint's data state, saved at rollout boundaries only (a
rollout is not checkpointed): a killed run resumes at the first unfinished rollout and
continues bit-identically (SIGTERM finishes the current rollout's updates, then saves).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import (
    data,
    logprobs,
    models,
    objectives,
    ppo,
    reward_model,
    rewards,
    sampling,
    scoring,
    sharding,
)
from dpo_jax.data import batching, tokenize
from dpo_jax.errors import UserError, config_error
from dpo_jax.train_step import checkpointable

log = logging.getLogger(__name__)

# `reward(samples) -> [S]` float scores of a rollout's completions (host side).
RolloutReward = Callable[[sampling.SampleOutput], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """The PPO phase's settings (`config.ppo`, see `configs/default.py`)."""

    num_rollouts: int = 100
    rollout_batch_size: int = 64  # episodes per rollout (prompts x samples_per_prompt)
    samples_per_prompt: int = 1
    max_new_tokens: int = 24
    num_epochs: int = 4  # PPO epochs over each rollout
    num_mini_batches: int = 1  # optimizer updates per epoch
    grad_accum_steps: int = 1  # micro-batches per update (the step's A)
    kl_coef: float = 0.05  # initial (or fixed) beta of the per-token KL penalty
    target_kl: float | None = None  # None: fixed coefficient; else Ziegler's controller
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1

    def __post_init__(self) -> None:
        s = self.rollout_batch_size
        if s % self.samples_per_prompt:
            raise config_error(
                "ppo.rollout_batch_size", f"{s} is not a multiple of "
                f"ppo.samples_per_prompt={self.samples_per_prompt}", "make it one",
            )  # fmt: skip
        rows = self.num_mini_batches * self.grad_accum_steps
        if s % rows:
            raise config_error(
                "ppo.rollout_batch_size", f"{s} episodes do not split into "
                f"ppo.num_mini_batches={self.num_mini_batches} x grad_accum_steps="
                f"{self.grad_accum_steps} equal micro-batches", "make it a multiple of their product",
            )  # fmt: skip
        for key in ("num_rollouts", "num_epochs", "num_mini_batches", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise config_error(f"ppo.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.kl_estimator not in ppo.KL_ESTIMATORS:
            raise config_error(
                "ppo.kl_estimator", f"{self.kl_estimator!r} is not an estimator",
                f"choose one of {ppo.KL_ESTIMATORS}",
            )  # fmt: skip
        if self.target_kl is not None and not self.target_kl > 0:
            raise config_error("ppo.target_kl", f"must be > 0 or None, got {self.target_kl}")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> PPOConfig:
        """From `config.ppo` and the run's `grad_accum_steps`."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"grad_accum_steps"}
        kw = {k: v for k, v in config.ppo.to_dict().items() if k in fields}
        return cls(grad_accum_steps=int(config.grad_accum_steps), **kw)

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer updates per rollout."""
        return self.num_epochs * self.num_mini_batches

    @property
    def num_steps(self) -> int:
        """Optimizer updates of the whole phase (the schedule's length)."""
        return self.num_rollouts * self.steps_per_rollout

    @property
    def objective_hyper(self) -> dict[str, float]:
        """What the step's objective reads (`StepConfig.objective_hyper`)."""
        return {k: float(getattr(self, k)) for k in ppo.OBJECTIVE_HYPER}

    def sampling(self, eos_token_ids: Sequence[int], pad_token_id: int) -> sampling.SamplingConfig:
        """Rollout decoding: the policy's own distribution (temperature 1, no truncation),
        which the importance ratios and the KL estimate assume."""
        return sampling.SamplingConfig(
            max_new_tokens=self.max_new_tokens, n=self.samples_per_prompt,
            eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id,
        )  # fmt: skip


# ------------------------------------------------------------------------ rewards


def _prompt_ids(samples: sampling.SampleOutput, k: int) -> list[int]:
    n = int(samples.prompt_lengths[k])
    return samples.prompt_ids[k, samples.prompt_ids.shape[1] - n :].tolist()


def reward_from_texts(
    reward_fn: Callable[[Sequence[str]], np.ndarray], tokenizer: Any, with_prompt: bool = False
) -> RolloutReward:
    """A text reward (`rewards.RewardFn`: VADER, a classifier, a `LearnedReward`) on the
    decoded completions, or on prompt + completion decoded together with `with_prompt`
    (special tokens, the EOS among them, dropped)."""

    def reward(samples: sampling.SampleOutput) -> np.ndarray:
        comps = samples.completion_ids()
        if with_prompt:
            comps = [_prompt_ids(samples, k) + c for k, c in enumerate(comps)]
        texts = tokenizer.batch_decode(comps, skip_special_tokens=True)
        return np.asarray(reward_fn(texts), np.float32)

    return reward


def reward_from_ids(learned: Any) -> RolloutReward:
    """A learned reward model (`reward_model.LearnedReward`, the policy's tokenizer) on the
    token ids of prompt + completion, the EOS kept when one was emitted: the sequences
    of sampled pairs it was trained on (its head reads the last token)."""

    def reward(samples: sampling.SampleOutput) -> np.ndarray:
        comps = samples.completion_ids(keep_eos=True)
        ids = [_prompt_ids(samples, k) + c for k, c in enumerate(comps)]
        return np.asarray(learned.score_ids(ids), np.float32)

    return reward


# ------------------------------------------------------------------------ rollouts


def host_rows(num_rows: int) -> slice:
    """This process's rows of `num_rows` global ones: equal consecutive shares in process
    order (the whole range on one host). `run` checks that they divide."""
    size = num_rows // jax.process_count()
    return slice(jax.process_index() * size, (jax.process_index() + 1) * size)


def gather_hosts(x: Any) -> Any:
    """Host numpy of `x` on every host: a global array's value (one host: `device_get`),
    or each host's local numpy array concatenated along axis 0 in process order."""
    if jax.process_count() == 1:
        return jax.device_get(x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def number_rows(sequence_index_NxL: np.ndarray) -> np.ndarray:
    """Sequence numbers of stacked rows (`[..., N, L]`): row `k` is sequence `k`, the
    numbering of a batch of `n_seq = N` (the rollout's rows carry their episode numbers)."""
    rows = np.arange(sequence_index_NxL.shape[-2], dtype=np.int32)[:, None]
    return np.where(sequence_index_NxL >= 0, rows, -1).astype(np.int32)


def host_share(batch_A: Mapping[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    """This host's rows of a `[A, N, ...]` batch, numbered as a batch of their own (what
    `Trainer.step` takes from each host: `train.globalize_host_batch` numbers them
    globally, host after host)."""
    out = {k: v[:, rows] for k, v in batch_A.items()}
    out["sequence_index"] = number_rows(out["sequence_index"])
    return out


def sample_rows(samples: sampling.SampleOutput, rows: slice) -> sampling.SampleOutput:
    """The episodes `rows` of a rollout's samples (what one host's reward scores)."""
    cut = {
        f.name: getattr(samples, f.name)[rows]
        for f in dataclasses.fields(samples)
        if isinstance(getattr(samples, f.name), np.ndarray)
    }
    if samples.texts is not None:
        cut["texts"] = samples.texts[rows]
    return dataclasses.replace(samples, **cut)


def prompt_indices(num_prompts: int, per_rollout: int, rollout: int, seed: int) -> np.ndarray:
    """Which prompts rollout `rollout` continues: consecutive slices of a fresh
    permutation per pass over the prompts (a pure function of its arguments)."""
    start = rollout * per_rollout
    out = []
    while len(out) < per_rollout:
        epoch, offset = divmod(start + len(out), num_prompts)
        order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
        out.extend(order[offset : offset + per_rollout - len(out)].tolist())
    return np.asarray(out, np.int64)


def rollout_rows(
    samples: sampling.SampleOutput, pad_id: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The rollout as a stacked batch (row k = episode k: its prompt, then its completion
    with the EOS; `sequence_index` marks the completion) and the `[S, M]` completion mask.

    Rows have one length per rollout shape: the sampler's prompt bucket + max_new_tokens
    (one compile of the step for the whole phase when prompts share a bucket).
    """
    prompt_len = samples.prompt_ids.shape[1]
    prompts = [
        row[prompt_len - int(n) :]
        for row, n in zip(samples.prompt_ids, samples.prompt_lengths, strict=True)
    ]
    comps = [np.asarray(c, np.int32) for c in samples.completion_ids(keep_eos=True)]
    length = prompt_len + samples.tokens.shape[1]
    return batching.build_stacked(prompts, comps, length, pad_id), samples.mask


def to_tokens(
    x_SxM: np.ndarray, mask_SxM: np.ndarray, sequence_index_SxL: np.ndarray
) -> np.ndarray:
    """Completion-aligned `[S, M]` values placed on their tokens `[S, L]` (0 elsewhere)."""
    out = np.zeros(sequence_index_SxL.shape, np.float32)
    out[sequence_index_SxL >= 0] = np.asarray(x_SxM, np.float32)[mask_SxM]
    return out


def from_tokens(
    x_SxL: np.ndarray, mask_SxM: np.ndarray, sequence_index_SxL: np.ndarray
) -> np.ndarray:
    """Token-aligned `[S, L]` values of the completion tokens, as `[S, M]` (0 past the end)."""
    out = np.zeros(mask_SxM.shape, np.float32)
    out[mask_SxM] = np.asarray(x_SxL, np.float32)[sequence_index_SxL >= 0]
    return out


def token_stats(
    apply_fn: Callable[..., Any],
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
    reward: RolloutReward,
    cfg: PPOConfig,
    key: jax.Array,
    kl_coef: float,
    *,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
) -> Rollout:
    """Sample, score and compute advantages for one rollout of `len(prompts) * n` episodes."""
    params = state.params
    samples = sampling.generate(
        trainer.model_config, params[objectives.MODEL], prompts, key,
        cfg.sampling(eos_token_ids, pad_token_id), mesh=trainer.mesh,
    )  # fmt: skip
    rows, mask = rollout_rows(samples, pad_token_id)
    if trainer.step_config.unembed_scored_only:  # one K for the phase: max_new_tokens
        rows["scored_positions"] = logprobs.scored_positions(rows["sequence_index"], mask.shape[1])
    share = host_rows(mask.shape[0])  # each host scores its episodes, then they are gathered
    mine = np.asarray(reward(sample_rows(samples, share)), np.float32).reshape(-1)
    if mine.shape[0] != share.stop - share.start:
        raise UserError(
            f"ppo reward: {mine.shape[0]} scores for {share.stop - share.start} completions"
        )
    scores = np.asarray(gather_hosts(mine), np.float32)
    stats = _score_rollout(trainer, params, ref_params, rows, cfg)
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


def _score_rollout(
    trainer: Any, params: Any, ref_params: Any, rows: Mapping[str, np.ndarray], cfg: PPOConfig
) -> dict[str, np.ndarray]:
    """`token_stats` of every row, one micro-batch of rows at a time (the step's size; each
    host feeds its share of the micro-batch's rows, as to the step)."""
    step_cfg = trainer.step_config
    fn = _jitted_token_stats(step_cfg.apply_fn, step_cfg.logps_chunk_size)
    per_micro = cfg.rollout_batch_size // (cfg.num_mini_batches * cfg.grad_accum_steps)
    share = host_rows(per_micro)
    num_rows = rows["input_ids"].shape[0]
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, num_rows, per_micro):
        chunk = host_share({k: v[None, start : start + per_micro] for k, v in rows.items()}, share)
        host, n_seq = trainer.prepare_batch(chunk, share.stop - share.start)
        placed = trainer.place_batch(host)
        micro = {k: v[0] for k, v in placed.items()}
        with trainer._context():
            stats = fn(params, ref_params, micro, n_seq)
        parts.append(_in_sequence_order(gather_hosts(stats), gather_hosts(micro["sequence_index"])))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _in_sequence_order(
    stats: Mapping[str, np.ndarray], sequence_index_NxL: np.ndarray
) -> dict[str, np.ndarray]:
    """Rows of a gathered micro-batch sorted by their sequence number: host `h`'s row `k`
    is sequence `h n + k` (`host_share`; objective "ppo" is unpaired, so
    `train.globalize_host_batch` numbers host after host), i.e. the rollout's order,
    whatever order the mesh's devices put the hosts' rows in (one host: unchanged)."""
    order = np.argsort(np.max(sequence_index_NxL, axis=-1), kind="stable")
    return {k: np.asarray(v)[order] for k, v in stats.items()}


@functools.lru_cache(maxsize=8)
def _jitted_token_stats(apply_fn: Callable[..., Any], chunk_size: int) -> Callable[..., Any]:
    return jax.jit(
        functools.partial(token_stats, apply_fn, chunk_size=chunk_size), static_argnums=(3,)
    )


# ------------------------------------------------------------------------ the phase


@dataclasses.dataclass
class PPOResult:
    """What `run` returns: the final state, one metrics row per rollout, the controller."""

    state: Any
    history: list[dict[str, Any]]
    kl_coef: float
    rollouts_done: int


def mini_batches(
    cfg: PPOConfig, batch: Mapping[str, np.ndarray], rollout: int, epoch: int, seed: int
):
    """The epoch's `[A, N/A, ...]` step batches: rows shuffled by `(seed, rollout, epoch)`,
    split into `num_mini_batches` updates of `grad_accum_steps` micro-batches each (each
    micro-batch's rows numbered as its sequences `0 .. N/A - 1`)."""
    num_rows = batch["input_ids"].shape[0]
    order = np.random.default_rng([seed, rollout, epoch, 0x990]).permutation(num_rows)
    size = num_rows // cfg.num_mini_batches
    for m in range(cfg.num_mini_batches):
        rows = order[m * size : (m + 1) * size]
        out = {k: v[rows].reshape(cfg.grad_accum_steps, -1, *v.shape[1:]) for k, v in batch.items()}
        out["sequence_index"] = number_rows(out["sequence_index"])
        yield out


def run(
    trainer: Any,
    state: Any,
    *,
    ref_params: Any,
    prompts: Sequence[Sequence[int]],
    reward: RolloutReward,
    cfg: PPOConfig,
    seed: int = 0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    start_rollout: int = 0,
    kl_coef: float | None = None,
    checkpointer: Any = None,
    save_every: int = 0,
    writer: Any = None,
    eval_hook: Callable[[int, Any], Mapping[str, float]] | None = None,
    eval_every: int = 0,
) -> PPOResult:
    """Rollouts `start_rollout .. cfg.num_rollouts - 1`, each followed by its PPO updates.

    `state`: the Trainer's state (objective "ppo": params `{"model", "head"}`), at step
    `start_rollout * cfg.steps_per_rollout`. `ref_params`: the frozen SFT reference
    (model params, sharded like the policy's). `kl_coef`: the controller's coefficient at
    `start_rollout` (None: `cfg.kl_coef`). The checkpointer saves at the end of a rollout
    whose updates crossed a multiple of `save_every` steps, at a SIGTERM, and at the end,
    with data state `{"rollout": next rollout, "kl_coef": ...}` (`resume_point`).
    `eval_hook(step, params) -> {name: value}` runs at the end of a rollout whose updates
    crossed a multiple of `eval_every` steps, and at the end; its values join that
    rollout's metrics row.
    """
    if len(prompts) * cfg.samples_per_prompt < cfg.rollout_batch_size:
        raise UserError(
            f"ppo: {len(prompts)} prompts x {cfg.samples_per_prompt} samples is fewer than "
            f"ppo.rollout_batch_size={cfg.rollout_batch_size}"
        )
    coef = float(np.float32(cfg.kl_coef if kl_coef is None else kl_coef))
    per_rollout = cfg.rollout_batch_size // cfg.samples_per_prompt
    base_key = jax.random.key(seed)
    history: list[dict[str, Any]] = []
    n_micro = cfg.rollout_batch_size // (cfg.num_mini_batches * cfg.grad_accum_steps)
    check_hosts(n_micro, sharding.data_parallel_size(trainer.mesh))
    mine = host_rows(n_micro)  # this host's rows of every micro-batch
    r = start_rollout
    while r < cfg.num_rollouts:
        idx = prompt_indices(len(prompts), per_rollout, r, seed)
        roll = collect_rollout(
            trainer, state, ref_params, [prompts[i] for i in idx], reward, cfg,
            jax.random.fold_in(base_key, r), coef, eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
        )  # fmt: skip
        step_metrics = []
        for epoch in range(cfg.num_epochs):
            for batch_A in mini_batches(cfg, roll.batch, r, epoch, seed):
                state, m = trainer.step(state, host_share(batch_A, mine), mine.stop - mine.start)
                step_metrics.append(m)
        fetched = jax.device_get(step_metrics)
        row = dict(roll.metrics)
        for k in fetched[0]:
            row[f"{k}_avg" if "/" in k else k] = float(np.mean([float(m[k]) for m in fetched]))
        if any(int(m.get("nonfinite", 0)) for m in fetched):
            raise UserError(
                f"ppo rollout {r}: non-finite loss or gradient; lower optim.learning_rate"
            )
        coef = float(
            ppo.update_kl_coef(
                coef, roll.metrics["objective/kl"], cfg.rollout_batch_size,
                target=cfg.target_kl, horizon=cfg.kl_horizon,
            )
        )  # fmt: skip
        r += 1
        step = int(jax.device_get(state.step))
        row["rollout"] = r
        row["step"] = step
        if eval_hook is not None and (
            _crossed(step, cfg.steps_per_rollout, eval_every) or r == cfg.num_rollouts
        ):
            row.update(eval_hook(step, state.params))
        history.append(row)
        if writer is not None:
            writer.write(step, row)
        log.info("ppo rollout %d/%d (step %d): %s", r, cfg.num_rollouts, step, _brief(row))
        if checkpointer is not None:
            data = {"rollout": r, "kl_coef": coef}
            cstate = checkpointable(state, trainer.step_config)
            if _crossed(step, cfg.steps_per_rollout, save_every) or r == cfg.num_rollouts:
                checkpointer.maybe_save(step, cstate, data, force=True)
            if getattr(checkpointer, "preempted", False):
                checkpointer.maybe_save(step, cstate, data, force=True)  # no-op if saved
                if r < cfg.num_rollouts:
                    log.warning("preempted: saved rollout %d (step %d) and stopped", r, step)
                    break
    return PPOResult(state, history, coef, r)


def check_hosts(rows_per_micro: int, data_parallel: int) -> None:
    """Each host feeds an equal share of a micro-batch's rows, a multiple of the
    data-parallel devices (`sharding.shard_batch`'s rule for a host's rows)."""
    hosts = jax.process_count()
    if hosts > 1 and (rows_per_micro % hosts or rows_per_micro // hosts % data_parallel):
        raise config_error(
            "ppo.rollout_batch_size", f"micro-batches of {rows_per_micro} episodes "
            f"(rollout_batch_size / (num_mini_batches x grad_accum_steps)) do not split into "
            f"{hosts} hosts' equal shares of a multiple of {data_parallel} data-parallel devices",
            f"make it a multiple of {hosts * data_parallel} per micro-batch",
        )  # fmt: skip


def _crossed(step: int, steps: int, every: int) -> bool:
    """Whether the `steps` updates ending at `step` passed a multiple of `every` (> 0)."""
    return every > 0 and step // every > (step - steps) // every


def resume_point(data_state: Mapping[str, Any] | None, cfg: PPOConfig) -> tuple[int, float]:
    """(next rollout, KL coefficient) from a restored checkpoint's data state."""
    if not data_state:
        return 0, float(np.float32(cfg.kl_coef))
    return int(data_state["rollout"]), float(data_state["kl_coef"])


def _brief(row: Mapping[str, Any]) -> str:
    keys = ("objective/scores", "objective/kl", "objective/kl_coef", "loss")
    return ", ".join(f"{k}={row[k]:.4g}" for k in keys if k in row and math.isfinite(row[k]))


# ------------------------------------------------------------ as a phase of `train`


REWARD_SPECS = "vader, hf:DIR (a sequence classifier) or reward_model:DIR (`dpo-jax export` of a reward_model run)"


def parse_reward_spec(spec: str) -> tuple[str, str]:
    """(kind, directory) of a `ppo.reward` spec: `vader`, `hf:DIR` or `reward_model:DIR`."""
    kind, sep, target = str(spec).partition(":")
    if (kind == "vader" and not sep) or (sep and kind in ("hf", "reward_model") and target):
        return kind, target
    raise config_error("ppo.reward", f"{spec!r} is not a reward", f"use {REWARD_SPECS}")


def check_reward_paths(spec: str) -> None:
    """What a `ppo.reward` spec points at, before anything loads: the directory exists; an
    `hf:` one is a sequence classifier, a `reward_model:` one has its exported head."""
    import json
    import os
    import pathlib

    kind, target = parse_reward_spec(spec)
    if not target:
        return
    if not os.path.isdir(target):
        problem = "is not a directory" if os.path.exists(target) else "does not exist"
        raise config_error("ppo.reward", f"{target!r} {problem}", f"use {REWARD_SPECS}")
    if kind == "reward_model" and not os.path.isfile(os.path.join(target, reward_model.HEAD_FILE)):
        raise config_error(
            "ppo.reward", f"{target!r} has no {reward_model.HEAD_FILE}",
            "export a reward_model run with `dpo-jax export`",
        )  # fmt: skip
    if kind == "hf":
        config_file = pathlib.Path(target) / "config.json"
        arch = None
        if config_file.is_file():
            arch = json.loads(config_file.read_text()).get("architectures")
        if not any(a.endswith("ForSequenceClassification") for a in arch or ()):
            hint = (
                "reward_model:DIR"
                if os.path.isfile(os.path.join(target, reward_model.HEAD_FILE))
                else REWARD_SPECS
            )
            raise config_error(
                "ppo.reward", f"{target!r} is not a sequence classifier (architectures {arch})",
                f"use {hint}",
            )  # fmt: skip


def reward_from_spec(spec: str, tokenizer: Any) -> RolloutReward:
    """The rollouts' reward of a `ppo.reward` spec (`tokenizer`: the policy's).

    `vader` and `hf:DIR` (the probability of class 1, the positive class of a binary
    classifier) score the decoded prompt + completion, as TRL's PPOTrainer scores query +
    response. `reward_model:DIR` scores the sampled token ids when its tokenizer is the
    policy's (`reward_from_ids`, the sequences it was trained on), else the decoded text.
    """
    kind, target = parse_reward_spec(spec)
    if kind == "vader":
        return reward_from_texts(rewards.VaderReward(), tokenizer, with_prompt=True)
    if kind == "hf":
        return reward_from_texts(
            rewards.HFClassifierReward(target, label=1), tokenizer, with_prompt=True
        )
    learned = reward_model.load_exported(target)
    if tokenize.tokenizer_fingerprint(learned.tokenizer) == tokenize.tokenizer_fingerprint(
        tokenizer
    ):
        return reward_from_ids(learned)
    log.info("ppo.reward: %s has another tokenizer than the policy: it scores decoded text", target)
    return reward_from_texts(learned, tokenizer, with_prompt=True)


def inputs_from_config(
    config: ml_collections.ConfigDict, prompts: Any, reward: Any
) -> tuple[Sequence[Sequence[int]], RolloutReward]:
    """The prompt pool and the reward of objective "ppo": `train(..., train_data=prompts,
    reward=fn)` when given, else from `data.train` (`data.load_prompts`) and `ppo.reward`
    (`reward_from_spec`), as `dpo-jax train` runs it."""
    spec = config.ppo.reward
    if reward is not None and spec:
        raise config_error(
            "ppo.reward", f"{spec!r}, and train() was given reward= too", "give one of them"
        )  # fmt: skip
    if reward is None and not spec:
        raise config_error(
            "ppo.reward", "is empty: PPO scores its rollouts with a reward",
            f"use {REWARD_SPECS} (Python: train(..., reward=fn), docs/PPO.md)",
        )  # fmt: skip
    if prompts is not None and reward is not None:
        return prompts, reward
    from transformers import AutoTokenizer

    name = config.tokenizer or config.model.path
    if not name:
        raise config_error(
            "tokenizer", "is empty and so is model.path", "name the policy's tokenizer"
        )
    tokenizer = AutoTokenizer.from_pretrained(name)
    if prompts is None:
        prompts = data.load_prompts(config.data, tokenizer, config.run_dir or None, split="train")
        log.info("ppo: %d distinct prompts from %s", len(prompts), config.data.train)
    return prompts, reward if reward is not None else reward_from_spec(spec, tokenizer)


def reference_params(trainer: Any, state: Any, ref_params: Any = None) -> Any:
    """The rollouts' frozen reference, sharded like the policy: a copy of the initial
    policy (`state.params["model"]`), or `ref_params` (e.g. `reference.path`) with the
    vocabulary padded as the Trainer padded the policy's."""
    shardings = trainer.shardings.params[objectives.MODEL]
    if ref_params is None:
        return jax.tree.map(jnp.copy, state.params[objectives.MODEL])
    cfg = trainer.model_config
    if cfg.embed_vocab_size != cfg.vocab_size:
        ref_params = models.vocab.resize_vocab(ref_params, cfg, cfg.embed_vocab_size)
    return jax.device_put(ref_params, shardings)


def _special_ids(model_config: Any) -> tuple[tuple[int, ...], int]:
    eos = model_config.eos_token_id
    eos_ids = () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(eos)
    pad = model_config.pad_token_id
    return eos_ids, int(pad if pad is not None else (eos_ids[0] if eos_ids else 0))


def phase_loop(
    cfg: PPOConfig,
    config: ml_collections.ConfigDict,
    ref_params: Any,
    prompts: Sequence[Sequence[int]],
    reward: RolloutReward,
    restored_data_state: Mapping[str, Any] | None,
) -> Callable[..., tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]]:
    """A loop with `train.run_loop`'s signature that runs the PPO phase instead, so
    `train` sets up (mesh, state, checkpoints, resume, metrics) once for every objective."""
    start, coef = resume_point(restored_data_state, cfg)

    def loop(trainer: Any, state: Any, _batches: Any, *, writer: Any = None,
             checkpointer: Any = None, eval_hook: Any = None,
             **_run_loop_kwargs: Any) -> tuple[Any, list, list]:  # fmt: skip
        eos_ids, pad_id = _special_ids(trainer.model_config)
        result = run(
            trainer, state, ref_params=ref_params, prompts=list(prompts), reward=reward,
            cfg=cfg, seed=int(config.seed), eos_token_ids=eos_ids, pad_token_id=pad_id,
            start_rollout=start, kl_coef=coef, checkpointer=checkpointer,
            save_every=int(config.checkpoint.save_every), writer=writer, eval_hook=eval_hook,
            eval_every=int(config.train.eval_every),
        )  # fmt: skip
        return result.state, result.history, []

    return loop


def example_step_batch(cfg: PPOConfig, prompts: Sequence[Sequence[int]], trainer: Any) -> dict:
    """A host `[A, n, L]` batch shaped as the phase's PPO updates (the longest prompt's
    bucket), for `train(..., dry_run=True)` to lower the step the run executes."""
    width = sampling.bucket_length(max(len(p) for p in prompts), sampling.DEFAULT_PROMPT_BUCKETS)
    share = host_rows(cfg.rollout_batch_size // (cfg.num_mini_batches * cfg.grad_accum_steps))
    n = share.stop - share.start  # this host's rows, as `run` feeds the step
    m = cfg.max_new_tokens
    rows = batching.build_stacked([[1] * width] * n, [[1] * m] * n, width + m)
    if trainer.step_config.unembed_scored_only:
        rows["scored_positions"] = logprobs.scored_positions(rows["sequence_index"], m)
    rows.update({k: np.zeros(rows["input_ids"].shape, np.float32) for k in ppo.BATCH_COLUMNS})
    return {k: np.stack([v] * cfg.grad_accum_steps) for k, v in rows.items()}
