"""Evaluation: held-out preference accuracy/margins, sequence KL, mean reward, win rate.

Every function here is host-side numpy on per-example numbers (log-probs,
rewards, judge verdicts), so it works the same from a notebook, from the train
loop's periodic eval, and from a script. The model-facing helpers
(:func:`evaluate_preferences`, :func:`kl_from_samples`) compute those numbers
with the repo's model and then call the pure functions.

Estimates carry a standard error of the mean (sample std with ddof=1 over
sqrt(n)), so a curve can be drawn with error bars and two checkpoints can be
compared honestly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dpo_jax.rewards import RewardFn


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A sample mean with its standard error and sample size."""

    mean: float
    stderr: float
    n: int

    def __float__(self) -> float:
        return self.mean

    def as_metrics(self, name: str) -> dict[str, float]:
        """``{name: mean, name + "_stderr": stderr}`` for a metrics dict."""
        return {name: self.mean, f"{name}_stderr": self.stderr}


def mean_and_stderr(values: Any) -> Estimate:
    """Mean and standard error (ddof=1) of a 1-D sample; stderr is NaN for n < 2."""
    x = np.asarray(values, np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("mean_and_stderr: empty sample")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_and_stderr: {int((~np.isfinite(x)).sum())} non-finite values")
    stderr = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")
    return Estimate(mean=float(x.mean()), stderr=stderr, n=int(x.size))


# ------------------------------------------------------------------ preferences


def implicit_rewards(policy_logps: Any, ref_logps: Any, beta: float) -> np.ndarray:
    """DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` per sequence."""
    p = np.asarray(policy_logps, np.float64)
    r = np.asarray(ref_logps, np.float64)
    if p.shape != r.shape:
        raise ValueError(f"implicit_rewards: policy {p.shape} vs reference {r.shape}")
    return beta * (p - r)


def preference_metrics(
    policy_chosen_logps: Any,
    policy_rejected_logps: Any,
    ref_chosen_logps: Any,
    ref_rejected_logps: Any,
    beta: float,
) -> dict[str, float]:
    """Held-out preference metrics from summed sequence log-probs, with TRL's names.

    ``rewards/accuracies`` counts a pair as correct only when the chosen implicit
    reward is strictly larger (ties are wrong), as TRL does. Standard errors are
    added under ``*_stderr`` keys.
    """
    chosen = implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta)
    rejected = implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta)
    if chosen.shape != rejected.shape:
        raise ValueError(f"preference_metrics: {chosen.shape} chosen vs {rejected.shape} rejected")
    margins = chosen - rejected
    metrics: dict[str, float] = {}
    metrics |= mean_and_stderr(chosen).as_metrics("rewards/chosen")
    metrics |= mean_and_stderr(rejected).as_metrics("rewards/rejected")
    metrics |= mean_and_stderr((margins > 0).astype(np.float64)).as_metrics("rewards/accuracies")
    metrics |= mean_and_stderr(margins).as_metrics("rewards/margins")
    metrics["logps/chosen"] = float(np.mean(policy_chosen_logps))
    metrics["logps/rejected"] = float(np.mean(policy_rejected_logps))
    metrics["num_pairs"] = float(margins.size)
    return metrics


# ------------------------------------------------------------------------- KL


def sequence_kl(policy_logps_NxT: Any, ref_logps_NxT: Any, mask_NxT: Any | None = None) -> Estimate:
    """Monte-Carlo KL(pi || pi_ref) per sequence from samples of pi.

    Each row is one sequence sampled from pi; its estimate is
    ``sum_t mask * (log pi(y_t|...) - log pi_ref(y_t|...))``. The mean over rows is
    unbiased for the sequence-level KL only if the rows were sampled from pi
    itself (temperature 1, no top-k/top-p) and ``policy_logps`` are pi's own
    log-probs of those tokens (``SampleOutput.logps``).
    """
    p = np.asarray(policy_logps_NxT, np.float64)
    r = np.asarray(ref_logps_NxT, np.float64)
    if p.shape != r.shape or p.ndim != 2:
        raise ValueError(
            f"sequence_kl: policy {p.shape} and reference {r.shape} must be equal [N, T]"
        )
    m = np.ones_like(p) if mask_NxT is None else np.asarray(mask_NxT, np.float64)
    if m.shape != p.shape:
        raise ValueError(f"sequence_kl: mask {m.shape} vs log-probs {p.shape}")
    per_seq_N = ((p - r) * m).sum(axis=1)
    return mean_and_stderr(per_seq_N)


# --------------------------------------------------------------------- rewards


def mean_reward(texts: Sequence[str], reward_fn: RewardFn) -> Estimate:
    """Mean reward of texts (policy samples) under a reward function, with its stderr."""
    scores = np.asarray(reward_fn(list(texts)), np.float64)
    if scores.shape != (len(texts),):
        raise ValueError(
            f"mean_reward: reward_fn returned shape {scores.shape} for {len(texts)} texts"
        )
    return mean_and_stderr(scores)


# A pairwise judge: (prompts, candidates_a, candidates_b) -> P(a is better) in [0, 1] per pair
# (a hard judge returns 0/1, an LLM judge may return 0.5 for a tie).
PairwiseJudge = Callable[[Sequence[str], Sequence[str], Sequence[str]], Any]


@dataclasses.dataclass(frozen=True)
class WinRate:
    """Win rate of policy completions over reference completions (ties count half)."""

    rate: float
    stderr: float
    wins: int
    ties: int
    losses: int
    per_pair: np.ndarray  # [n] score in [0, 1] per pair

    def as_metrics(self, name: str = "win_rate") -> dict[str, float]:
        """Metrics-dict form."""
        return {name: self.rate, f"{name}_stderr": self.stderr}


def win_rate(
    policy_texts: Sequence[str],
    reference_texts: Sequence[str],
    *,
    reward_fn: RewardFn | None = None,
    judge: PairwiseJudge | None = None,
    prompts: Sequence[str] | None = None,
    swap: bool = True,
) -> WinRate:
    """Fraction of pairs where the policy completion beats the reference one.

    Give exactly one of:
      reward_fn: scores each text; the policy wins if its reward is larger, a tie
        counts 0.5.
      judge: ``judge(prompts, a, b) -> P(a better)`` per pair. With ``swap`` the
        judge is also asked with the order reversed and the two verdicts are
        averaged, cancelling a judge's position bias (LLM judges have one).
    """
    policy_texts, reference_texts = list(policy_texts), list(reference_texts)
    n = len(policy_texts)
    if len(reference_texts) != n:
        raise ValueError(f"win_rate: {n} policy texts vs {len(reference_texts)} reference texts")
    if (reward_fn is None) == (judge is None):
        raise ValueError("win_rate: give exactly one of reward_fn= or judge=")
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"win_rate: {len(prompts)} prompts for {n} pairs")
    if reward_fn is not None:
        both = np.asarray(reward_fn(policy_texts + reference_texts), np.float64)
        if both.shape != (2 * n,):
            raise ValueError(f"win_rate: reward_fn returned shape {both.shape} for {2 * n} texts")
        diff = both[:n] - both[n:]
        score = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    else:
        prompts = list(prompts) if prompts is not None else [""] * n
        score = _judge_scores(judge, prompts, policy_texts, reference_texts)
        if swap:
            score = 0.5 * (
                score + 1.0 - _judge_scores(judge, prompts, reference_texts, policy_texts)
            )
    est = mean_and_stderr(score)
    return WinRate(
        rate=est.mean,
        stderr=est.stderr,
        wins=int((score > 0.5).sum()),
        ties=int((score == 0.5).sum()),
        losses=int((score < 0.5).sum()),
        per_pair=score,
    )


def _judge_scores(
    judge: PairwiseJudge, prompts: list[str], a: list[str], b: list[str]
) -> np.ndarray:
    """Call a pairwise judge and validate its output."""
    s = np.asarray(judge(prompts, a, b), np.float64).reshape(-1)
    if s.shape != (len(a),):
        raise ValueError(f"win_rate: judge returned {s.shape[0]} verdicts for {len(a)} pairs")
    if np.any((s < 0) | (s > 1)) or np.isnan(s).any():
        raise ValueError("win_rate: judge verdicts must be probabilities in [0, 1]")
    return s


def reward_judge(reward_fn: RewardFn) -> PairwiseJudge:
    """A pairwise judge from a reward function: 1 if a scores higher, 0.5 on ties."""

    def judge(prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        del prompts
        ra = np.asarray(reward_fn(list(a)), np.float64)
        rb = np.asarray(reward_fn(list(b)), np.float64)
        return np.where(ra > rb, 1.0, np.where(ra < rb, 0.0, 0.5))

    return judge
