"""Online DPO on the one loop: `OnlineDPOSource`, the step source of objective
"online_dpo" (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback").

    rollout r:  `rollouts.RolloutSource.sample`: K = online.samples_per_prompt completions
                of each drawn prompt, at online.temperature, from the current policy
                -> scores from the reward (minus online.missing_eos_penalty for a
                   completion without EOS, as TRL), or P(first preferred) from the pairwise
                   judge `online.judge` (K = 2)
                -> one pair per prompt (`pair_indices`, `judge_pair_indices`):
                   online_dpo.label "argmax": the best chosen, the worst rejected;
                   "bradley_terry": the order drawn, the first chosen with probability
                   sigmoid(r_1 - r_2) (K > 2: the best and the worst, then their order)
                -> the pairs shuffled into num_mini_batches x grad_accum_steps paired
                   micro-batches (prompt + chosen rows, then prompt + rejected rows; the
                   completions keep their EOS, as `sampling.stacked_rows`), and the frozen
                   reference's sequence log-probs of each row as the `ref_logps` column
                   (skipped for a reference-free loss: simpo, orpo, ...)
    then        online.num_mini_batches steps of the one loop: objective "online_dpo",
                `objectives.preference_loss` with loss.name (any paired loss), the step's
                reference "precomputed" (or "none").

Why Bradley-Terry labels give the KL-regularised optimum. A pair (y_1, y_2) of on-policy
samples is labelled y_1 > y_2 with probability sigma(r_1 - r_2), and the sigmoid loss with
beta sees h = beta (log pi/pi_ref (y_1) - log pi/pi_ref (y_2)). The expected loss of the
pair is the cross-entropy -s log sigma(h) - (1 - s) log sigma(-h), s = sigma(r_1 - r_2):
its gradient in h is sigma(h) - s, zero exactly where h = r_1 - r_2, i.e. where
beta log pi/pi_ref = r + const, i.e. at pi* = pi_ref exp(r / beta) / Z. That holds pair by
pair, whatever distribution the pairs are drawn from (the current policy's, at any
online.temperature), so pi* is a fixed point of the on-policy updates, and the only one
where every pair of the policy's support has positive probability (the cross-entropy is
strictly convex in the margins).
Argmax labels (the paper's and TRL's) instead push every preferred completion up without
bound: they converge toward the reward's argmax, at a rate beta sets.

Multi-host: each host feeds its share of every micro-batch's pairs, its chosen AND its
rejected rows numbered as a paired batch of its own (`OnlineDPOSource.share`;
`trainer.globalize_host_batch` numbers them globally), and the reference pass runs on the
step's own global micro-batches, so its `[2B]` log-probs line up with the step's sequences.

Everything random is a function of (seed, rollout): the samples (`rollout_key`), the
Bradley-Terry draws (`numpy` Generator seeded (seed, rollout, 0x0D0)) and the pairs'
shuffle ((seed, rollout, 0x0D1)); the data state at a rollout boundary is `{"rollout": r}`
and a resumed run continues bit-identically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax import losses, objectives, reward_sources, rollouts, sampling, scoring, sharding
from dpo_jax.data import batching
from dpo_jax.errors import UserError, config_error
from dpo_jax.loop import StepBatch
from dpo_jax.rollouts import RolloutConfig

LABELS = ("argmax", "bradley_terry")
# numpy streams of a rollout: the Bradley-Terry draws, and the pairs' shuffle
_LABEL_STREAM, _SHUFFLE_STREAM = 0x0D0, 0x0D1


@dataclasses.dataclass(frozen=True)
class OnlineDPOConfig(RolloutConfig):
    """Online DPO's settings: `online.*`, `online_dpo.label` and the paired loss."""

    label: str  # "argmax" | "bradley_terry"
    missing_eos_penalty: float | None
    loss_name: Any  # `losses.LossSpec` of loss.name / loss.weights
    judged: bool  # labelled by `online.judge` (no reward)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> OnlineDPOConfig:
        """From `config.online`, `config.online_dpo`, `config.loss` and the run's
        `grad_accum_steps`, checked (one config error each)."""
        shared = {f.name for f in dataclasses.fields(RolloutConfig)} - {"grad_accum_steps"}
        online = config.online
        if online.judge and online.reward:
            raise config_error(
                "online.judge", f"{online.judge!r}, and online.reward={online.reward!r} too",
                "give one of them: the judge labels the pairs, or the reward scores them",
            )  # fmt: skip
        out = cls(
            grad_accum_steps=int(config.grad_accum_steps), label=str(config.online_dpo.label),
            missing_eos_penalty=online.missing_eos_penalty,
            loss_name=losses.parse_loss_spec(config.loss.name, config.loss.weights),
            judged=bool(online.judge), **{k: online[k] for k in shared},
        )  # fmt: skip
        out.check()
        if config.reference.mode == "none" and losses.needs_reference(out.loss_name):
            raise config_error(
                "reference.mode", f"'none', but loss.name={config.loss.name!r} reads the "
                "reference's log-probs", "leave it at auto, or use a reference-free loss (simpo, orpo)",
            )  # fmt: skip
        return out

    def check(self) -> None:
        """Pairs of completions of one prompt, and micro-batches of whole pairs."""
        k = self.samples_per_prompt
        if k < 2:
            raise config_error(
                "online.samples_per_prompt", f"online DPO pairs completions of a prompt, got {k}",
                "set it to 2 or more (TRL samples 2)",
            )  # fmt: skip
        if self.judged and k != 2:
            raise config_error(
                "online.samples_per_prompt", f"the pairwise judge online.judge compares two "
                f"completions, got {k}", "set it to 2, or score with online.reward",
            )  # fmt: skip
        if self.label not in LABELS:
            raise config_error(
                "online_dpo.label", f"{self.label!r} is not a labelling", f"choose one of {LABELS}"
            )  # fmt: skip
        s, micro = self.rollout_batch_size, self.num_mini_batches * self.grad_accum_steps
        if s >= 1 and s % k == 0 and micro >= 1 and (s // k) % micro:
            raise config_error(
                "online.rollout_batch_size", f"{s} completions are {s // k} pairs (one per "
                f"prompt of online.samples_per_prompt={k}), which do not split into "
                f"online.num_mini_batches={self.num_mini_batches} x grad_accum_steps="
                f"{self.grad_accum_steps} equal micro-batches", f"make it a multiple of {k * micro}",
            )  # fmt: skip
        super().check()
        if not losses.is_paired(self.loss_name):
            raise config_error(
                "loss.name", f"{losses.loss_names(self.loss_name)} is unpaired (KTO-style); "
                "online DPO trains on chosen/rejected pairs", "use a paired loss (sigmoid, ipo, simpo, ...)",
            )  # fmt: skip

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer updates per rollout: one pass over its pairs."""
        return self.num_mini_batches

    @property
    def num_steps(self) -> int:
        """Optimizer updates of the whole phase (the schedule's length)."""
        return self.num_rollouts * self.steps_per_rollout

    @property
    def pairs_per_micro(self) -> int:
        """Pairs in one micro-batch of an update (all hosts)."""
        return self.prompts_per_rollout // (self.num_mini_batches * self.grad_accum_steps)

    @property
    def rows_per_micro(self) -> int:
        """Rows (sequences) in one micro-batch: its pairs' chosen and rejected rows."""
        return 2 * self.pairs_per_micro


# ------------------------------------------------------------------------ labels


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def pair_indices(
    scores_PxK: np.ndarray, label: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) `[P]` completion indices within each prompt's K scores.

    "argmax": the first best is chosen, the last worst rejected (all K equal: the first
    and the last, so K = 2 ties choose the first, as TRL's `first >= second`).
    "bradley_terry": the same two completions, the best chosen with probability
    sigmoid(r_best - r_worst), else the worst; for K = 2 the first is chosen with
    probability sigmoid(r_1 - r_2) exactly. `rng` draws one uniform per prompt under
    either label, so the draws of a rollout never depend on the labelling.
    """
    s = np.asarray(scores_PxK, np.float64)
    k = s.shape[1]
    u = rng.random(s.shape[0])
    best = np.argmax(s, axis=1)
    worst = k - 1 - np.argmin(s[:, ::-1], axis=1)
    if label == "argmax":
        return best, worst
    if label != "bradley_terry":
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    rows = np.arange(s.shape[0])
    keep = u < _sigmoid(s[rows, best] - s[rows, worst])
    return np.where(keep, best, worst), np.where(keep, worst, best)


def judge_pair_indices(
    first_preferred_P: np.ndarray, label: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) `[P]` indices (0 or 1) from a judge's P(the first preferred).

    "argmax": the first is chosen when P >= 0.5 (TRL: the judge's rank); "bradley_terry":
    with probability P. An undecided pair (NaN: an unparseable LLM reply) counts as 0.5,
    a tie: "argmax" chooses the first, "bradley_terry" flips a coin.
    """
    p = np.asarray(first_preferred_P, np.float64)
    p = np.where(np.isnan(p), 0.5, p)
    u = rng.random(p.shape[0])
    if label == "argmax":
        first = p >= 0.5
    elif label == "bradley_terry":
        first = u < p
    else:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    chosen = np.where(first, 0, 1)
    return chosen, 1 - chosen


class SampleJudge:
    """A pairwise judge (`reward_sources.Judge`) on a rollout's samples: the prompts and
    completions decoded with the policy's tokenizer, special tokens (the EOS among them)
    dropped, as TRL hands its judge text."""

    def __init__(self, judge: reward_sources.Judge, tokenizer: Any):
        self.judge = judge
        self.tokenizer = tokenizer

    def __call__(
        self, samples: sampling.SampleOutput, a_P: np.ndarray, b_P: np.ndarray
    ) -> np.ndarray:
        """P(completion `a` preferred over `b`) `[P]` for sample rows `a_P`, `b_P` of the
        same prompts (NaN: undecided)."""
        width = samples.prompt_ids.shape[1]
        prompts = [
            samples.prompt_ids[i, width - int(samples.prompt_lengths[i]) :].tolist() for i in a_P
        ]
        comps = samples.completion_ids()
        decode = lambda ids: self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        out = self.judge(decode(prompts), decode([comps[i] for i in a_P]),
                         decode([comps[i] for i in b_P]))  # fmt: skip
        return np.asarray(out, np.float64).reshape(-1)


# ------------------------------------------------------------------------ batches


def pair_micro_batches(
    rows: Mapping[str, np.ndarray],
    chosen_P: np.ndarray,
    rejected_P: np.ndarray,
    num_micro: int,
    order: np.ndarray,
) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """The rollout's pairs as `num_micro` paired stacked micro-batches `[2b, L]`: pairs
    taken in `order`, each micro-batch's chosen rows (sequences `k < b`) then its rejected
    rows (`b + k`), and the sample row of each (`[2b]` indices into `rows`)."""
    b = len(order) // num_micro
    micro, picked = [], []
    for m in range(num_micro):
        pairs = order[m * b : (m + 1) * b]
        idx = np.concatenate([chosen_P[pairs], rejected_P[pairs]])
        mb = {k: v[idx] for k, v in rows.items()}
        mb["sequence_index"] = rollouts.number_rows(mb["sequence_index"])
        micro.append(mb)
        picked.append(idx)
    return micro, picked


def check_host_pairs(pairs_per_micro: int, data_parallel: int, with_reference: bool) -> None:
    """Each host feeds whole pairs, an equal share of every micro-batch's; its `ref_logps`
    `[2, b]` split their pairs over the data-parallel devices (`sharding.shard_batch`'s
    rule for a host's rows; `rollouts.check_hosts` checked its `2b` token rows)."""
    hosts = jax.process_count()
    if hosts == 1:
        return
    unit = hosts * data_parallel if with_reference else hosts
    if pairs_per_micro % unit:
        why = (
            f" of {data_parallel} data-parallel devices (the ref_logps column)"
            if with_reference
            else ""
        )
        raise config_error(
            "online.rollout_batch_size",
            f"micro-batches of {pairs_per_micro} pairs do not split into {hosts} hosts' "
            f"equal shares{why}",
            f"make the pairs per micro-batch a multiple of {unit}",
        )


def share_pairs(batch_A: Mapping[str, np.ndarray], pairs: slice) -> dict[str, np.ndarray]:
    """The pairs `pairs` of every micro-batch of a paired `[A, 2B, ...]` batch: their
    chosen then their rejected rows, numbered as a paired batch of their own (chosen
    `k < b`, rejected `b + k`), `ref_logps` `[A, 2b]` to match."""
    big_b = batch_A["input_ids"].shape[1] // 2
    idx = np.r_[pairs.start : pairs.stop, big_b + pairs.start : big_b + pairs.stop]
    out = {k: v[:, idx] for k, v in batch_A.items()}
    out["sequence_index"] = rollouts.number_rows(out["sequence_index"])
    return out


def sequence_logps(
    apply_fn: Any, params: Any, batch: Mapping[str, jax.Array], n_seq: int, chunk_size: int = 0
) -> jax.Array:
    """`[n_seq]` sequence log-probs of `params` on a micro-batch: the step's own
    `scoring.score` (what a "frozen" reference would compute inside the step)."""
    out = scoring.score(apply_fn, params, batch, n_seq, needs=("logps",), chunk_size=chunk_size)
    return out.logps_S


# ------------------------------------------------------------------------ the source


class OnlineDPOSource(rollouts.RolloutSource):
    """Objective "online_dpo"'s step source: rollout r, its pairs, then its
    `online.num_mini_batches` updates (no controller: the data state is the rollout)."""

    def __init__(
        self,
        cfg: OnlineDPOConfig,
        prompts: Sequence[Sequence[int]],
        reward: reward_sources.RolloutReward | None,
        ref_params: Any,
        seed: int,
        mesh: Any,
        judge: SampleJudge | None = None,
    ):
        super().__init__(cfg, prompts, reward, ref_params, seed, mesh)  # 2b rows per micro
        if (reward is None) == (judge is None):
            raise ValueError("OnlineDPOSource: give a reward or a judge (exactly one)")
        if judge is not None and cfg.samples_per_prompt != 2:
            raise config_error(
                "online.samples_per_prompt", f"a pairwise judge compares two completions, "
                f"got {cfg.samples_per_prompt}", "set it to 2",
            )  # fmt: skip
        self.with_reference = losses.needs_reference(cfg.loss_name)
        check_host_pairs(
            cfg.pairs_per_micro, sharding.data_parallel_size(mesh), self.with_reference
        )
        self.dpo = cfg
        self.judge = judge
        self._pairs = rollouts.host_rows(cfg.pairs_per_micro)

    def share(self, batch_A: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """This host's pairs of every micro-batch, chosen and rejected rows (one host: the
        batch as it is)."""
        return share_pairs(batch_A, self._pairs), 2 * (self._pairs.stop - self._pairs.start)

    def collect(self, trainer: Any, state: Any, rollout: int) -> tuple[list[dict], dict]:
        cfg = self.dpo
        model_params, _ = objectives.split_params(trainer.step_config.objective_fn, state.params)
        samples = self.sample(trainer, model_params, rollout)
        _, pad_id = rollouts.special_ids(trainer.model_config)
        rows, mask = sampling.stacked_rows(samples, pad_id)
        self.scored_positions(trainer, rows, mask.shape[1])
        k = cfg.samples_per_prompt
        num_prompts = samples.tokens.shape[0] // k
        first = np.arange(num_prompts) * k  # sample row of each prompt's first completion
        rng = np.random.default_rng([self.seed, rollout, _LABEL_STREAM])
        metrics: dict[str, Any] = {}
        if self.judge is not None:
            p = self._judged(samples, first)
            chosen, rejected = judge_pair_indices(p, cfg.label, rng)
            metrics["judge/decided"] = float(np.mean(~np.isnan(p)))
            metrics["judge/first_preferred"] = float(np.nanmean(p)) if np.any(~np.isnan(p)) else 0.5
        else:
            scores = rollouts.reward_scores(self.reward, samples)
            if cfg.missing_eos_penalty is not None:  # TRL: a completion cut off at the cap
                scores = scores - np.float32(cfg.missing_eos_penalty) * (~samples.finished)
            chosen, rejected = pair_indices(scores.reshape(num_prompts, k), cfg.label, rng)
            metrics["objective/scores"] = float(scores.mean())
            metrics["objective/scores_margin"] = float(
                np.mean(scores[first + chosen] - scores[first + rejected])
            )
        num_micro = cfg.num_mini_batches * cfg.grad_accum_steps
        order = np.random.default_rng([self.seed, rollout, _SHUFFLE_STREAM]).permutation(
            num_prompts
        )
        micro, picked = pair_micro_batches(rows, first + chosen, first + rejected, num_micro, order)
        policy_S = np.sum(np.where(mask, samples.logps, 0.0), -1)  # the sampler's, temperature 1
        if self.with_reference:
            ref = self._reference_logps(trainer, micro)
            for mb, r in zip(micro, ref, strict=True):
                mb["ref_logps"] = r
            # TRL's objective/kl: log pi - log pi_ref summed over each paired completion
            kl = np.concatenate([policy_S[i] - r for i, r in zip(picked, ref, strict=True)])
            metrics["objective/kl"] = float(kl.mean())
        metrics.update({
            "objective/entropy": float(-policy_S.mean()),
            "val/contain_eos_token": float(np.mean(samples.finished)),
            "completions/mean_length": float(samples.lengths.mean()),
        })  # fmt: skip
        a = cfg.grad_accum_steps
        steps = [
            {key: np.stack([mb[key] for mb in micro[m * a : (m + 1) * a]]) for key in micro[0]}
            for m in range(cfg.num_mini_batches)
        ]
        return steps, metrics

    def _judged(self, samples: sampling.SampleOutput, first: np.ndarray) -> np.ndarray:
        """P(first completion preferred) `[P]`: each host judges its share of the prompts,
        gathered in prompt order."""
        share = rollouts.host_rows(len(first))
        mine = np.asarray(self.judge(samples, first[share], first[share] + 1), np.float64)
        if mine.shape != (share.stop - share.start,):
            raise UserError(
                f"online.judge: {mine.shape[0]} answers for {share.stop - share.start} pairs"
            )
        return np.asarray(rollouts.gather_hosts(mine), np.float64)

    def _reference_logps(
        self, trainer: Any, micro: Sequence[Mapping[str, np.ndarray]]
    ) -> list[np.ndarray]:
        """The frozen reference's `[2B]` sequence log-probs of each global micro-batch.

        Each runs through the step's own path (this host's pairs, `Trainer.prepare_batch`,
        `place_batch`), so the global sequence numbers are the step's: chosen of pair `j`
        at `j`, rejected at `B + j`, the micro-batch's own order. (`rollouts.score_rows`
        restores rows in the order of unpaired host numbering, which paired batches of
        several hosts do not follow.)"""
        step_cfg = trainer.step_config
        fn = rollouts.jitted(sequence_logps, step_cfg.apply_fn, step_cfg.logps_chunk_size)
        out = []
        for mb in micro:
            host, n_seq = self.share({k: v[None] for k, v in mb.items()})
            host, n_seq = trainer.prepare_batch(host, n_seq)
            placed = trainer.place_batch(host)
            with trainer.mesh_context():
                logps = fn(self.ref_params, {k: v[0] for k, v in placed.items()}, n_seq)
            out.append(np.asarray(rollouts.gather_hosts(logps), np.float32).reshape(-1))
        return out

    def example_step(self, trainer: Any, columns: Sequence[str]) -> StepBatch:
        """A host step batch shaped as the phase's paired updates (`[A, 2b, L]`, `ref_logps`
        `[A, 2b]` when the loss reads the reference), for `train(..., dry_run=True)`."""
        cfg = self.dpo
        width = sampling.bucket_length(
            max(len(p) for p in self.prompts), sampling.DEFAULT_PROMPT_BUCKETS
        )
        b = self._pairs.stop - self._pairs.start  # this host's pairs, as the steps feed them
        m = cfg.max_new_tokens
        rows = batching.build_stacked([[1] * width] * b, [[1] * m] * (2 * b), width + m)
        self.scored_positions(trainer, rows, m)
        batch_A = {k: np.stack([v] * cfg.grad_accum_steps) for k, v in rows.items()}
        if "ref_logps" in columns:
            batch_A["ref_logps"] = np.zeros((cfg.grad_accum_steps, 2 * b), np.float32)
        return StepBatch(batch_A, 2 * b)


# ------------------------------------------------------------------------ registry


def build_source(
    config: ml_collections.ConfigDict,
    prompts: Sequence[Sequence[int]],
    reward: reward_sources.RolloutReward | SampleJudge,
    ref_params: Any,
    mesh: Any,
) -> OnlineDPOSource:
    """Objective "online_dpo"'s source from a run config (`online.METHODS`); `reward` is
    the rollouts' reward, or the `SampleJudge` of `online.judge`
    (`online.inputs_from_config`)."""
    cfg = OnlineDPOConfig.from_config(config)
    judge = reward if isinstance(reward, SampleJudge) else None
    return OnlineDPOSource(
        cfg, prompts, None if judge is not None else reward, ref_params, int(config.seed), mesh,
        judge=judge,
    )  # fmt: skip


def batch_columns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The step batches' reference column: `ref_logps` unless the loss is reference-free."""
    loss = losses.parse_loss_spec(config.loss.name, config.loss.weights)
    return ("ref_logps",) if losses.needs_reference(loss) else ()


def step_reference(config: ml_collections.ConfigDict) -> str:
    """The step's reference mode: the rollout's precomputed `ref_logps`, or none."""
    return "precomputed" if batch_columns(config) else "none"
