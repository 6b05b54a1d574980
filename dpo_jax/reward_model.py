"""A learned reward model on this repo's transformer: a scalar head, as a reward function.

Training is the Trainer's (`dpo-jax train --config.objective.name=reward_model`, or
`dpo_jax.train.train(config)` with `config.objective.name = "reward_model"`): the
Bradley-Terry objective (`objectives.reward_model_loss`) on preference batches, with
TRL's `center_rewards_coefficient` and an optional `margin` column. The reward of a
sequence is a linear head on the final hidden state of its last token (the EOS the data
pipeline appends), as in TRL's `RewardTrainer`. Parameters are one pytree, the trained
state's params:

    {"model": <models.Transformer params>, "head": {"kernel": [D], "bias": []}}

:class:`LearnedReward` wraps them as a ``rewards.RewardFn`` (texts in, floats out) for
best-of-N and PPO baselines; `evaluate_reward_model` gives held-out accuracy with its
standard error. Both score through `scoring` (the one forward-then-statistics path).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from dpo_jax import models, objectives, scoring
from dpo_jax.errors import UserError
from dpo_jax.evaluation import mean_and_stderr
from dpo_jax.rewards import _check_texts
from dpo_jax.sampling import bucket_length

Batch = Mapping[str, Any]


def init_reward_params(cfg: models.ModelConfig, backbone: Any, rng: jax.Array) -> dict[str, Any]:
    """Reward-model params from model params (e.g. an SFT model) and a fresh head."""
    return {objectives.MODEL: backbone, objectives.HEAD: objectives.init_reward_head(cfg, rng)}


def sequence_rewards(
    cfg: models.ModelConfig, params: Mapping[str, Any], batch: Batch, num_sequences: int
) -> jax.Array:
    """Scalar reward per sequence `[S]` (float32) from a data batch (traceable)."""
    seq = scoring.score(
        models.Transformer(cfg).apply, params[objectives.MODEL], batch, num_sequences,
        needs={"last_hidden"},
    )  # fmt: skip
    return objectives.head_rewards(params[objectives.HEAD], seq.last_hidden_SxD)


@functools.lru_cache(maxsize=16)
def _host_scorer(cfg: models.ModelConfig) -> Any:
    # one compiled scorer per model config (the frozen dataclass hashes every field, and
    # the scorer closes over nothing else), shared by every caller; bounded for notebooks
    return scoring.host_scorer(models.Transformer(cfg).apply, needs={"last_hidden"})


def host_rewards(
    cfg: models.ModelConfig, params: Any, batch: Batch, num_sequences: int
) -> np.ndarray:
    """`sequence_rewards` of a host batch (through `scoring.host_scorer`), host numpy."""
    seq = _host_scorer(cfg)(params[objectives.MODEL], batch, num_sequences)
    return np.asarray(objectives.head_rewards(params[objectives.HEAD], seq.last_hidden_SxD))


def _num_pairs(batch: Batch) -> int:
    total = int(np.asarray(batch["sequence_index"]).max()) + 1
    if total % 2:
        raise ValueError(f"reward-model batch: {total} sequences, expected chosen+rejected pairs")
    return total // 2


def evaluate_reward_model(
    cfg: models.ModelConfig, params: Any, batches: Iterable[Batch]
) -> dict[str, float]:
    """Held-out pairwise accuracy (ties wrong) and mean margin, each with its standard
    error, mean rewards and the pair count."""
    chosen, rejected = [], []
    for batch in batches:
        b = _num_pairs(batch)
        r = host_rewards(cfg, params, batch, 2 * b)
        chosen.append(r[:b])
        rejected.append(r[b:])
    if not chosen:
        raise ValueError("evaluate_reward_model: no batches")
    c, r = np.concatenate(chosen), np.concatenate(rejected)
    metrics = mean_and_stderr((c > r).astype(np.float64)).as_metrics("accuracy")
    metrics |= mean_and_stderr(c - r).as_metrics("margin")
    metrics["rewards/chosen"] = float(c.mean())
    metrics["rewards/rejected"] = float(r.mean())
    metrics["num_pairs"] = float(c.size)
    return metrics


# ------------------------------------------------------------ as a reward function


@dataclasses.dataclass
class LearnedReward:
    """A trained reward model as a ``RewardFn``: texts in, rewards out.

    Each text is tokenized whole (prompt and completion together, no special
    tokens) and the EOS is appended when ``add_eos`` (the data pipeline appends
    it to every completion, so that is the token the head was trained on).
    Rows are right-padded to a bucket of ``length_buckets`` to limit compiles.
    """

    cfg: models.ModelConfig
    params: Any
    tokenizer: Any
    batch_size: int = 32
    max_length: int | None = None
    add_eos: bool = True
    length_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (truncated from the left to ``max_length``)."""
        out = []
        eos = self.tokenizer.eos_token_id
        for t in texts:
            ids = list(self.tokenizer(t, add_special_tokens=False)["input_ids"])
            if self.add_eos and eos is not None:
                ids.append(int(eos))
            if not ids:
                raise ValueError("LearnedReward: a text tokenized to nothing and add_eos is off")
            if self.max_length is not None:
                ids = ids[-self.max_length :]  # keep the end: the scored token is the last
            out.append(ids)
        return out

    def score_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Rewards of token-id sequences (the last token of each is scored)."""
        rewards = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            rows = self.batch_size if len(ids) > self.batch_size else len(chunk)
            length = bucket_length(max(len(x) for x in chunk), self.length_buckets)
            batch = _scoring_batch(chunk, rows, length)
            rewards.append(host_rewards(self.cfg, self.params, batch, rows)[: len(chunk)])
        return np.concatenate(rewards).astype(np.float32) if rewards else np.zeros((0,), np.float32)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts, "LearnedReward")
        return self.score_ids(self.encode(texts))


HEAD_FILE = "head.npz"  # beside the HF files of an older export (before sequence classifiers)
REWARD_BIAS_KEY = "dpo_jax_reward_bias"  # config.json: the head's bias (`export.export_hf`)


def not_a_reward_model(directory: str) -> str | None:
    """Why `directory` is not a reward model `load_exported` reads (None when it is): a
    one-label sequence classifier (`dpo-jax export` of a reward_model run) or an older
    export's HF directory with `head.npz`."""
    if os.path.isfile(os.path.join(directory, HEAD_FILE)):
        return None
    config_file = os.path.join(directory, "config.json")
    try:
        with open(config_file) as f:
            hf_cfg = json.load(f)
    except (OSError, ValueError):
        return "has no readable config.json"
    if not isinstance(hf_cfg, dict) or not models.is_classifier(hf_cfg):
        arch = hf_cfg.get("architectures") if isinstance(hf_cfg, dict) else None
        return f"is not a sequence classifier (architectures {arch}) and has no {HEAD_FILE}"
    labels = len(hf_cfg.get("id2label") or {0: "", 1: ""})  # transformers' default: 2
    if labels != 1:
        return f"is a classifier of {labels} labels, not a reward model (1 label)"
    return None


def _load_head(directory: str, cfg: models.ModelConfig) -> dict[str, np.ndarray]:
    """The head `{"kernel": [D], "bias": []}` of an export: `head.npz`, else the
    classifier's `score.weight` and the bias recorded in config.json."""
    head_file = os.path.join(directory, HEAD_FILE)
    if os.path.isfile(head_file):
        with np.load(head_file) as npz:
            head = {k: np.asarray(npz[k], np.float32) for k in ("kernel", "bias") if k in npz}
        if set(head) != {"kernel", "bias"}:
            raise UserError(f"{head_file}: expected arrays 'kernel' and 'bias', got {sorted(head)}")
    else:
        where = os.path.join(directory, models.SCORE_TENSOR)
        score = models.read_hf_tensor(directory, models.SCORE_TENSOR)
        if score is None or score.shape[0] != 1:
            raise UserError(f"{where}: missing or not of shape [1, D]")
        with open(os.path.join(directory, "config.json")) as f:
            bias = float(json.load(f).get(REWARD_BIAS_KEY, 0.0))
        head, head_file = {"kernel": score[0].astype(np.float32), "bias": np.float32(bias)}, where
    if head["kernel"].shape != (cfg.hidden_size,):
        raise UserError(
            f"{head_file}: kernel of shape {head['kernel'].shape}, the model's hidden size is "
            f"{cfg.hidden_size}"
        )
    return head


def load_exported(directory: str, tokenizer: Any = None, **kw: Any) -> LearnedReward:
    """The reward model `dpo-jax export` wrote for an `objective.name=reward_model` run (a
    one-label `AutoModelForSequenceClassification` directory, or an older export's HF
    directory with `head.npz`) as a `LearnedReward`, with the directory's tokenizer
    unless one is given. `kw`: `LearnedReward`'s options."""
    from transformers import AutoTokenizer

    problem = not_a_reward_model(directory)
    if problem is not None:
        raise UserError(f"{directory} {problem}; export a reward_model run with `dpo-jax export`")
    cfg, params = models.load_hf(directory)
    head = _load_head(directory, cfg)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    params = {objectives.MODEL: params, objectives.HEAD: head}
    return LearnedReward(cfg, params, tokenizer, **kw)


def _scoring_batch(ids: Sequence[Sequence[int]], rows: int, length: int) -> dict[str, np.ndarray]:
    """Right-padded rows, one sequence each; every token marked as part of its sequence."""
    batch = {
        "input_ids": np.zeros((rows, length), np.int32),
        "positions": np.zeros((rows, length), np.int32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "sequence_index": np.full((rows, length), -1, np.int32),
    }
    for k in range(rows):
        x = ids[k] if k < len(ids) else ids[0]  # filler rows repeat a real one, then dropped
        n = len(x)
        batch["input_ids"][k, :n] = x
        batch["positions"][k, :n] = np.arange(n)
        batch["segment_ids"][k, :n] = 1
        batch["sequence_index"][k, :n] = k
    return batch
