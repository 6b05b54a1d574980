"""A learned reward model on this repo's transformer: scalar head, Bradley--Terry training.

The reward of a sequence is a linear head on the final hidden state of its last
token (the EOS the data pipeline appends), as in TRL's ``RewardTrainer`` and the
InstructGPT / DPO-paper baselines. Parameters are one pytree::

    {"backbone": <models.Transformer params>, "head": {"kernel": [D], "bias": []}}

so a Hugging Face checkpoint loaded with ``models.load_hf`` becomes a reward
model with :func:`init_reward_params`. Training reads the same micro-batches
as DPO (``dpo_jax.data``: stacked, packed or prefix-shared layouts, with
``sequence_index`` marking completion tokens); sequence ``k < B`` is the chosen
completion of pair ``k``, ``B + k`` the rejected one.

Loss: ``-log sigmoid(r_chosen - r_rejected [- margin])`` averaged over pairs,
plus TRL's optional ``center_rewards_coefficient * mean((r_c + r_r)^2)`` that
keeps rewards centred at zero.

:class:`LearnedReward` wraps trained parameters as a ``rewards.RewardFn``
(texts in, floats out) for best-of-N and PPO baselines.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpo_jax import models
from dpo_jax.rewards import _check_texts

log = logging.getLogger(__name__)

Batch = Mapping[str, Any]


def init_reward_params(cfg: models.ModelConfig, backbone: Any, rng: jax.Array) -> dict[str, Any]:
    """Reward-model params from backbone params (e.g. an SFT model) and a fresh head.

    The head starts near zero (std 1/sqrt(D) * 0.1) so initial rewards are small and
    the first updates do not blow up the Bradley--Terry logits.
    """
    scale = 0.1 / np.sqrt(cfg.hidden_size)
    kernel = scale * jax.random.normal(rng, (cfg.hidden_size,), jnp.float32)
    return {"backbone": backbone, "head": {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}}


def last_token_index(sequence_index_NxL: jax.Array, num_sequences: int) -> jax.Array:
    """Flat index (row * L + col) of the last token of each sequence, ``[S]``.

    Works for every layout because it only reads ``sequence_index``; a sequence
    with no marked tokens gets -1 (callers check that it does not happen).
    """
    n, length = sequence_index_NxL.shape
    flat_seq = sequence_index_NxL.reshape(-1)
    flat_pos = jnp.arange(n * length, dtype=jnp.int32)
    # Tokens of no sequence go to an extra dropped segment.
    seg = jnp.where(flat_seq >= 0, flat_seq, num_sequences)
    last = jax.ops.segment_max(flat_pos, seg, num_segments=num_sequences + 1)[:num_sequences]
    return jnp.where(last < 0, -1, last)


def sequence_rewards(
    cfg: models.ModelConfig, params: Mapping[str, Any], batch: Batch, num_sequences: int
) -> jax.Array:
    """Scalar reward per sequence ``[S]`` from a data batch (float32)."""
    model = models.Transformer(cfg)
    kwargs: dict[str, Any] = {
        "positions": jnp.asarray(batch["positions"]),
        "segment_ids": jnp.asarray(batch["segment_ids"]),
    }
    if "branch_ids" in batch:
        kwargs["branch_ids"] = jnp.asarray(batch["branch_ids"])
    hidden_NxLxD = model.apply(
        {"params": params["backbone"]},
        jnp.asarray(batch["input_ids"]),
        return_hidden=True,
        **kwargs,
    )
    n, length, d = hidden_NxLxD.shape
    last_S = last_token_index(jnp.asarray(batch["sequence_index"]), num_sequences)
    hidden_SxD = hidden_NxLxD.reshape(n * length, d)[jnp.maximum(last_S, 0)].astype(jnp.float32)
    head = params["head"]
    return hidden_SxD @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def bradley_terry_loss(
    rewards_S: jax.Array,
    *,
    margin_B: jax.Array | None = None,
    center_rewards_coefficient: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean ``-log sigmoid(r_c - r_r - margin)`` over pairs; metrics use TRL-like names."""
    num_pairs = rewards_S.shape[0] // 2
    chosen_B, rejected_B = rewards_S[:num_pairs], rewards_S[num_pairs:]
    diff_B = chosen_B - rejected_B
    if margin_B is not None:
        diff_B = diff_B - margin_B
    loss = -jnp.mean(jax.nn.log_sigmoid(diff_B))
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * jnp.mean((chosen_B + rejected_B) ** 2)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((chosen_B > rejected_B).astype(jnp.float32)),
        "margin": jnp.mean(chosen_B - rejected_B),
        "rewards/chosen": jnp.mean(chosen_B),
        "rewards/rejected": jnp.mean(rejected_B),
    }
    return loss, metrics


def _num_pairs(batch: Batch) -> int:
    seq = np.asarray(batch["sequence_index"])
    total = int(seq.max()) + 1
    if total % 2:
        raise ValueError(f"reward-model batch: {total} sequences, expected chosen+rejected pairs")
    return total // 2


@dataclasses.dataclass
class RewardModelTrainer:
    """Jitted Bradley--Terry steps; one compile per batch shape."""

    cfg: models.ModelConfig
    optimizer: optax.GradientTransformation
    center_rewards_coefficient: float = 0.0

    def __post_init__(self) -> None:
        self._step = jax.jit(self._step_impl, static_argnums=(3,), donate_argnums=(0, 1))
        self._eval = jax.jit(self._eval_impl, static_argnums=(2,))

    def _loss(self, params: Any, batch: Batch, num_pairs: int) -> tuple[jax.Array, Any]:
        rewards_S = sequence_rewards(self.cfg, params, batch, 2 * num_pairs)
        return bradley_terry_loss(
            rewards_S,
            margin_B=batch.get("margin"),
            center_rewards_coefficient=self.center_rewards_coefficient,
        )

    def _step_impl(self, params: Any, opt_state: Any, batch: Batch, num_pairs: int):
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        (_, metrics), grads = grad_fn(params, batch, num_pairs)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return params, opt_state, metrics

    def _eval_impl(self, params: Any, batch: Batch, num_pairs: int):
        rewards_S = sequence_rewards(self.cfg, params, batch, 2 * num_pairs)
        return rewards_S[:num_pairs], rewards_S[num_pairs:]

    def init(self, params: Any) -> Any:
        """Optimizer state for ``params``."""
        return self.optimizer.init(params)

    def step(self, params: Any, opt_state: Any, batch: Batch) -> tuple[Any, Any, dict[str, float]]:
        """One update on one micro-batch; returns new params, state and host metrics."""
        params, opt_state, metrics = self._step(
            params, opt_state, _device_batch(batch), _num_pairs(batch)
        )
        return params, opt_state, {k: float(v) for k, v in metrics.items()}

    def pair_rewards(self, params: Any, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """(chosen rewards, rejected rewards) of one batch, host numpy."""
        c, r = self._eval(params, _device_batch(batch), _num_pairs(batch))
        return np.asarray(c), np.asarray(r)


_MODEL_KEYS = ("input_ids", "positions", "segment_ids", "sequence_index", "branch_ids", "margin")


def _device_batch(batch: Batch) -> dict[str, jax.Array]:
    """The arrays the reward model reads (drops ``ref_logps``, ``step``, ...)."""
    return {k: jnp.asarray(batch[k]) for k in _MODEL_KEYS if k in batch}


def evaluate_reward_model(
    cfg: models.ModelConfig,
    params: Any,
    batches: Iterable[Batch],
    trainer: RewardModelTrainer | None = None,
) -> dict[str, float]:
    """Held-out pairwise accuracy (ties wrong), mean margin and mean rewards."""
    from dpo_jax.evaluation import mean_and_stderr

    trainer = trainer or RewardModelTrainer(cfg, optax.identity())
    chosen, rejected = [], []
    for batch in batches:
        c, r = trainer.pair_rewards(params, batch)
        chosen.append(c)
        rejected.append(r)
    if not chosen:
        raise ValueError("evaluate_reward_model: no batches")
    c, r = np.concatenate(chosen), np.concatenate(rejected)
    metrics = mean_and_stderr((c > r).astype(np.float64)).as_metrics("accuracy")
    metrics |= mean_and_stderr(c - r).as_metrics("margin")
    metrics["rewards/chosen"] = float(c.mean())
    metrics["rewards/rejected"] = float(r.mean())
    metrics["num_pairs"] = float(c.size)
    return metrics


def train_reward_model(
    cfg: models.ModelConfig,
    params: Any,
    batches: Iterable[Batch],
    num_steps: int,
    *,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-4,
    center_rewards_coefficient: float = 0.0,
    eval_batches: Sequence[Batch] | None = None,
    eval_every: int = 0,
    log_every: int = 50,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Any, list[dict[str, float]]]:
    """Train a reward model with the Bradley--Terry loss for ``num_steps`` micro-batches.

    Args:
      params: from :func:`init_reward_params`.
      batches: paired micro-batches from ``dpo_jax.data`` (``make_train_iterator``);
        an optional ``margin`` [B] array per batch shifts the loss (Llama-2 style).
      optimizer: any optax transformation (default AdamW at ``learning_rate``).
      eval_batches / eval_every: held-out accuracy every ``eval_every`` steps and at
        the end, recorded in the history under ``eval/*``.
    Returns the trained params and a history of per-step metrics.
    """
    if num_steps < 1:
        raise ValueError(f"train_reward_model: num_steps must be >= 1, got {num_steps}")
    optimizer = optimizer or optax.adamw(learning_rate, weight_decay=0.0)
    trainer = RewardModelTrainer(cfg, optimizer, center_rewards_coefficient)
    # The step donates its params buffers; copy once so the caller's tree (which may
    # share a backbone with a policy) stays valid.
    params = jax.tree.map(jnp.copy, params)
    opt_state = trainer.init(params)
    history: list[dict[str, float]] = []
    it = iter(batches)
    for step in range(1, num_steps + 1):
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(
                f"train_reward_model: batches ran out after {step - 1} of {num_steps} steps"
            ) from None
        params, opt_state, metrics = trainer.step(params, opt_state, batch)
        metrics["step"] = float(step)
        last = step == num_steps
        if eval_batches and ((eval_every and step % eval_every == 0) or last):
            ev = evaluate_reward_model(cfg, params, eval_batches, trainer)
            metrics |= {f"eval/{k}": v for k, v in ev.items()}
        if log_every and (step % log_every == 0 or last):
            log.info("reward model step %d: %s", step, metrics)
        if callback is not None:
            callback(step, metrics)
        history.append(metrics)
    return params, history


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
        from dpo_jax.sampling import bucket_length

        rewards = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            rows = self.batch_size if len(ids) > self.batch_size else len(chunk)
            length = bucket_length(max(len(x) for x in chunk), self.length_buckets)
            batch = _scoring_batch(chunk, rows, length)
            rewards.append(np.asarray(_score(self.cfg, self.params, batch, rows))[: len(chunk)])
        return np.concatenate(rewards).astype(np.float32) if rewards else np.zeros((0,), np.float32)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts, "LearnedReward")
        return self.score_ids(self.encode(texts))


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


@functools.partial(jax.jit, static_argnums=(0, 3))
def _score(cfg: models.ModelConfig, params: Any, batch: Batch, rows: int) -> jax.Array:
    return sequence_rewards(cfg, params, batch, rows)
