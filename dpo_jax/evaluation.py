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
import functools
from collections.abc import Callable, Iterable, Sequence
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
# (a hard judge returns 0/1, an LLM judge may return 0.5 for a tie), or NaN for a
# comparison it could not decide (an LLM reply with no parseable verdict, dpo_jax.judge).
PairwiseJudge = Callable[[Sequence[str], Sequence[str], Sequence[str]], Any]


@dataclasses.dataclass(frozen=True)
class WinRate:
    """Win rate of policy completions over reference completions (ties count half).

    Undecided pairs (the judge returned NaN) are left out of ``rate`` and ``stderr``
    and counted in ``undecided``; ``wins + ties + losses + undecided`` is the number
    of pairs.
    """

    rate: float
    stderr: float
    wins: int
    ties: int
    losses: int
    per_pair: np.ndarray  # [n] score in [0, 1] per pair, NaN where undecided
    undecided: int = 0

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
        A judge may return NaN for a pair it could not decide: that pair (with
        ``swap``, either of its two verdicts) is left out of the rate and counted in
        ``WinRate.undecided``.
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
        return win_rate_from_scores(both[:n], both[n:])
    prompts = list(prompts) if prompts is not None else [""] * n
    score = _judge_scores(judge, prompts, policy_texts, reference_texts)
    if swap:
        score = 0.5 * (score + 1.0 - _judge_scores(judge, prompts, reference_texts, policy_texts))
    return _win_rate_of(score)


def win_rate_from_scores(policy_scores: Any, reference_scores: Any) -> WinRate:
    """Win rate of per-pair rewards already computed: the policy wins a pair when its
    score is larger, a tie counts 0.5, a NaN score leaves the pair undecided."""
    diff = np.asarray(policy_scores, np.float64) - np.asarray(reference_scores, np.float64)
    score = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    return _win_rate_of(np.where(np.isnan(diff), np.nan, score))


def _win_rate_of(score: np.ndarray) -> WinRate:
    """A `WinRate` from per-pair scores in [0, 1] (NaN = undecided)."""
    decided = ~np.isnan(score)
    est = mean_and_stderr(score[decided]) if decided.any() else Estimate(np.nan, np.nan, 0)
    return WinRate(
        rate=est.mean,
        stderr=est.stderr,
        wins=int((score[decided] > 0.5).sum()),
        ties=int((score[decided] == 0.5).sum()),
        losses=int((score[decided] < 0.5).sum()),
        per_pair=score,
        undecided=int((~decided).sum()),
    )


def _judge_scores(
    judge: PairwiseJudge, prompts: list[str], a: list[str], b: list[str]
) -> np.ndarray:
    """Call a pairwise judge and validate its output."""
    s = np.asarray(judge(prompts, a, b), np.float64).reshape(-1)
    if s.shape != (len(a),):
        raise ValueError(f"win_rate: judge returned {s.shape[0]} verdicts for {len(a)} pairs")
    if np.any((s < 0) | (s > 1)) or np.isinf(s).any():
        raise ValueError("win_rate: judge verdicts must be probabilities in [0, 1] (or NaN)")
    return s


def reward_judge(reward_fn: RewardFn) -> PairwiseJudge:
    """A pairwise judge from a reward function: 1 if a scores higher, 0.5 on ties."""

    def judge(prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        del prompts
        ra = np.asarray(reward_fn(list(a)), np.float64)
        rb = np.asarray(reward_fn(list(b)), np.float64)
        return np.where(ra > rb, 1.0, np.where(ra < rb, 0.0, 0.5))

    return judge


# ------------------------------------------------------- with the model (host loop)


def _pairs_in(batch: Any) -> int:
    """Number of pairs B of a paired batch (its sequences are 0 .. 2B-1)."""
    total = int(np.asarray(batch["sequence_index"]).max()) + 1
    if total % 2:
        raise ValueError(f"evaluate_preferences: batch has {total} sequences, expected 2B")
    return total // 2


@functools.lru_cache(maxsize=16)
def _scorer(cfg: Any) -> Any:
    """The host scorer (`scoring.host_scorer`) of one model config, built once."""
    from dpo_jax import models, scoring  # lazy: jax/flax; evaluation stays jax-free

    return scoring.host_scorer(models.Transformer(cfg).apply)


def sequence_logps(cfg: Any, params: Any, batch: Any) -> np.ndarray:
    """Summed completion log-probs ``[2B]`` of a paired data batch under ``params``."""
    num_pairs = _pairs_in(batch)
    return np.asarray(_scorer(cfg)(params, batch, 2 * num_pairs).logps_S, np.float64)


def evaluate_preferences(
    cfg: Any,
    policy_params: Any,
    batches: Iterable[Any],
    beta: float,
    ref_params: Any | None = None,
) -> dict[str, float]:
    """Held-out preference accuracy and margins of the implicit DPO reward.

    ``batches`` are paired micro-batches from ``dpo_jax.data.eval_batches``. The
    reference log-probs come from ``batch["ref_logps"]`` when present (precomputed
    with ``dpo-jax ref-logps``), otherwise from a forward under ``ref_params``.
    """
    pol, ref = [], []
    for i, batch in enumerate(batches):
        num_pairs = _pairs_in(batch)
        pol.append(sequence_logps(cfg, policy_params, batch))
        if "ref_logps" in batch:
            ref.append(np.asarray(batch["ref_logps"], np.float64)[: 2 * num_pairs])
        elif ref_params is not None:
            ref.append(sequence_logps(cfg, ref_params, batch))
        else:
            raise ValueError(
                f"evaluate_preferences: batch {i} has no 'ref_logps' and no ref_params were given"
            )
    if not pol:
        raise ValueError("evaluate_preferences: no batches")
    chosen_p, rejected_p = zip(*(np.split(p, 2) for p in pol), strict=True)
    chosen_r, rejected_r = zip(*(np.split(r, 2) for r in ref), strict=True)
    return preference_metrics(
        np.concatenate(chosen_p),
        np.concatenate(rejected_p),
        np.concatenate(chosen_r),
        np.concatenate(rejected_r),
        beta,
    )


def kl_from_samples(
    model: Any, ref_params: Any, samples: Any, *, allow_biased: bool = False
) -> Estimate:
    """Sequence-level KL(pi || pi_ref) from the sampler's output.

    ``samples`` is a ``sampling.SampleOutput`` drawn from pi; its ``logps`` are pi's
    own log-probs. The reference log-probs of the same tokens come from one full
    forward under ``ref_params`` (same architecture). Samples drawn at a
    temperature other than 1 or with top-k/top-p come from another distribution and
    give a biased estimate: refused unless ``allow_biased``.
    """
    from dpo_jax import sampling  # lazy: jax; evaluation stays jax-free

    if not samples.config.is_unbiased and not allow_biased:
        raise ValueError(
            "kl_from_samples: samples were drawn with temperature="
            f"{samples.config.temperature}, top_k={samples.config.top_k}, "
            f"top_p={samples.config.top_p}; KL(pi || pi_ref) needs temperature 1 and no "
            "truncation (pass allow_biased=True to estimate anyway)"
        )
    ref_logps = sampling.score_samples(model, ref_params, samples)
    return sequence_kl(samples.logps, ref_logps, samples.mask)


def generation_metrics(
    model: Any,
    policy_params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    key: Any,
    *,
    ref_params: Any | None = None,
    reward_fn: RewardFn | None = None,
    reference_completions: Sequence[str] | None = None,
    judge: PairwiseJudge | None = None,
    score_with_prompt: bool = False,
    prefix: str = "eval/",
    **sampling_kwargs: Any,
) -> tuple[dict[str, float], Any]:
    """Sample from the policy once and compute what the train loop's eval reports.

    Returns ``(metrics, samples)``. Metrics: ``kl`` (with ``ref_params``, needs
    temperature 1), ``reward`` (with ``reward_fn``), ``win_rate`` (with
    ``reference_completions`` and a ``judge`` or ``reward_fn``), ``gen_length``, each
    with ``_stderr`` where it applies, under ``prefix``.
    """
    from dpo_jax import sampling  # lazy: jax; evaluation stays jax-free

    samples = sampling.generate_text(
        model, policy_params, tokenizer, prompts, key, **sampling_kwargs
    )
    texts = samples.texts or []
    rows_prompts = [prompts[i] for i in samples.prompt_index.tolist()]
    scored = (
        [p + t for p, t in zip(rows_prompts, texts, strict=True)] if score_with_prompt else texts
    )
    metrics: dict[str, float] = {}
    metrics |= mean_and_stderr(samples.lengths).as_metrics(f"{prefix}gen_length")
    if ref_params is not None:
        metrics |= kl_from_samples(model, ref_params, samples).as_metrics(f"{prefix}kl")
    if reward_fn is not None:
        metrics |= mean_reward(scored, reward_fn).as_metrics(f"{prefix}reward")
    if reference_completions is not None:
        refs = [reference_completions[i] for i in samples.prompt_index.tolist()]
        if score_with_prompt:
            refs = [p + r for p, r in zip(rows_prompts, refs, strict=True)]
        wr = win_rate(
            scored, refs, reward_fn=None if judge else reward_fn, judge=judge, prompts=rows_prompts
        )
        metrics |= wr.as_metrics(f"{prefix}win_rate")
    return metrics, samples
