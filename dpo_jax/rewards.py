"""Reward functions behind one protocol: a batch of texts in, a float32 array out.

Three scorers ship here:

- :class:`VaderReward`: the VADER lexicon sentiment score (``vaderSentiment``
  ships its lexicon, so nothing is downloaded);
- :class:`HFClassifierReward`: any Hugging Face sequence-classification
  checkpoint, run host-side through ``transformers`` + torch (the DPO paper's
  IMDb experiment used ``siebert/sentiment-roberta-large-english``);
- :class:`dpo_jax.reward_model.LearnedReward`: a Bradley--Terry reward model on
  this repo's own transformer (lives in ``reward_model.py``).

Plus the best-of-N selection that a best-of-N baseline needs
(:func:`best_of_n_indices`, :func:`best_of_n`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class RewardFn(Protocol):
    """A batched reward: ``reward_fn(texts) -> float32 array of shape [len(texts)]``."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def _check_texts(texts: Sequence[str], who: str) -> list[str]:
    """Reject a bare string (a classic bug: it iterates as characters) and non-strings."""
    if isinstance(texts, str):
        raise TypeError(f"{who}: expected a sequence of strings, got one str; wrap it in a list")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{who}: texts[{i}] is {type(t).__name__}, expected str")
    return out


def as_reward_fn(fn: Callable[[Sequence[str]], Any], name: str = "reward_fn") -> RewardFn:
    """Wrap any callable texts -> numbers so it returns a checked float32 vector."""

    def wrapped(texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts, name)
        scores = np.asarray(fn(texts), dtype=np.float32).reshape(-1)
        if scores.shape[0] != len(texts):
            raise ValueError(f"{name}: returned {scores.shape[0]} scores for {len(texts)} texts")
        return scores

    return wrapped


# --------------------------------------------------------------------------- VADER

VaderField = Literal["compound", "pos", "neg", "neu"]


@dataclasses.dataclass
class VaderReward:
    """VADER sentiment of each text; ``field="compound"`` is in [-1, 1], positive = positive.

    ``vaderSentiment`` is pure Python and ships its lexicon; scoring is host-side.
    """

    field: VaderField = "compound"

    def __post_init__(self) -> None:
        if self.field not in ("compound", "pos", "neg", "neu"):
            raise ValueError(f"VaderReward: unknown field {self.field!r}")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts, "VaderReward")
        return np.asarray(
            [self._analyzer.polarity_scores(t)[self.field] for t in texts], dtype=np.float32
        )


# ------------------------------------------------------------ HF sequence classifier

ClassifierScore = Literal["prob", "logit", "logprob", "margin"]


@dataclasses.dataclass
class HFClassifierReward:
    """Score texts with a Hugging Face sequence-classification checkpoint (host-side torch).

    Args:
      model: a local directory or a hub name (a hub name may download; a local
        directory never does).
      label: the class whose score is the reward: an index or a label name from
        ``config.id2label`` (case-insensitive), e.g. ``"POSITIVE"``.
      score: ``"prob"`` softmax probability of ``label`` (what the DPO paper's
        IMDb frontier plots), ``"logprob"`` its log, ``"logit"`` the raw logit,
        ``"margin"`` logit of ``label`` minus the largest other logit.
      batch_size: texts per forward; results do not depend on it (padding is masked).
      max_length: truncation length in tokens (default: the tokenizer's limit).
    """

    model: str
    label: int | str = 1
    score: ClassifierScore = "prob"
    batch_size: int = 32
    max_length: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        import os

        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if self.score not in ("prob", "logit", "logprob", "margin"):
            raise ValueError(f"HFClassifierReward: unknown score {self.score!r}")
        if self.batch_size < 1:
            raise ValueError(f"HFClassifierReward: batch_size must be >= 1, got {self.batch_size}")
        local = os.path.isdir(self.model)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model, local_files_only=local)
        self._model = AutoModelForSequenceClassification.from_pretrained(
            self.model, local_files_only=local
        )
        self._model.eval().to(self.device)  # eval(): dropout off, scores are deterministic
        self._torch = torch
        self.label_index = _resolve_label(self.label, self._model.config, self.model)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts, "HFClassifierReward")
        torch = self._torch
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            enc = self._tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                logits_BxC = self._model(**enc).logits.float()
            out.append(_classifier_score(logits_BxC.cpu().numpy(), self.label_index, self.score))
        if not out:
            return np.zeros((0,), np.float32)
        return np.concatenate(out).astype(np.float32)


def _resolve_label(label: int | str, config: Any, where: str) -> int:
    """Class index from an index or a case-insensitive ``id2label`` name."""
    num = int(config.num_labels)
    if isinstance(label, int):
        if not 0 <= label < num:
            raise ValueError(f"{where}: label index {label} out of range for {num} classes")
        return label
    names = {str(v).lower(): int(k) for k, v in config.id2label.items()}
    if label.lower() not in names:
        raise ValueError(f"{where}: label {label!r} not in id2label {dict(config.id2label)}")
    return names[label.lower()]


def _classifier_score(logits_BxC: np.ndarray, label: int, score: ClassifierScore) -> np.ndarray:
    """Turn classifier logits into the reward selected by ``score``."""
    logits_BxC = logits_BxC.astype(np.float64)
    if score == "logit":
        return logits_BxC[:, label]
    if score == "margin":
        others = np.delete(logits_BxC, label, axis=1)
        return logits_BxC[:, label] - others.max(axis=1)
    shifted = logits_BxC - logits_BxC.max(axis=1, keepdims=True)
    logprob_BxC = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    if score == "logprob":
        return logprob_BxC[:, label]
    return np.exp(logprob_BxC[:, label])


# -------------------------------------------------------------------- best of N


def best_of_n_indices(rewards_N: np.ndarray, prompt_index_N: np.ndarray) -> np.ndarray:
    """For each prompt, the row index of its highest-reward sample (first one on ties).

    Returns an int array of shape [num_prompts] ordered by prompt index.
    """
    rewards_N = np.asarray(rewards_N, np.float64).reshape(-1)
    prompt_index_N = np.asarray(prompt_index_N).reshape(-1)
    if rewards_N.shape != prompt_index_N.shape:
        raise ValueError(
            f"best_of_n_indices: {rewards_N.shape[0]} rewards vs {prompt_index_N.shape[0]} prompt indices"
        )
    if np.isnan(rewards_N).any():
        raise ValueError("best_of_n_indices: rewards contain NaN")
    prompts = np.unique(prompt_index_N)
    # lexsort: last key is primary. Sort by prompt, then reward descending, then row ascending.
    rows = np.arange(rewards_N.shape[0])
    order = np.lexsort((rows, -rewards_N, prompt_index_N))
    first = np.searchsorted(prompt_index_N[order], prompts, side="left")
    return order[first]


@dataclasses.dataclass
class BestOfN:
    """Best-of-N result: one completion per prompt plus every candidate's reward."""

    texts: list[str]
    rewards: np.ndarray  # [num_prompts] reward of the kept completion
    indices: np.ndarray  # [num_prompts] row of the kept completion in ``samples``
    all_rewards: np.ndarray  # [num_prompts * n]
    samples: Any  # the sampler's output (dpo_jax.sampling.SampleOutput)


def best_of_n(
    model: Any,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    n: int,
    key: Any,
    *,
    score_with_prompt: bool = False,
    **sampling_kwargs: Any,
) -> BestOfN:
    """Sample ``n`` completions per prompt with :func:`dpo_jax.sampling.generate_text`
    and keep the one the reward function scores highest.

    ``score_with_prompt`` scores ``prompt + completion`` (what a sentiment reward on
    IMDb continuations wants); otherwise the completion alone.
    """
    from dpo_jax import sampling  # lazy: jax and the model stack; rewards stays jax-free

    if n < 1:
        raise ValueError(f"best_of_n: n must be >= 1, got {n}")
    prompts = _check_texts(prompts, "best_of_n")
    out = sampling.generate_text(model, params, tokenizer, prompts, key, n=n, **sampling_kwargs)
    scored = (
        [prompts[p] + t for p, t in zip(out.prompt_index.tolist(), out.texts, strict=True)]
        if score_with_prompt
        else out.texts
    )
    all_rewards = np.asarray(reward_fn(scored), np.float32)
    idx = best_of_n_indices(all_rewards, out.prompt_index)
    return BestOfN(
        texts=[out.texts[i] for i in idx.tolist()],
        rewards=all_rewards[idx],
        indices=idx,
        all_rewards=all_rewards,
        samples=out,
    )
