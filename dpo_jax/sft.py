"""Supervised fine-tuning: the token-level negative log-likelihood objective and a jitted step.

The DPO paper needs SFT three times: to build the SFT policy that samples preference
pairs (and serves as the reference), for the Preferred-FT baseline (SFT on the chosen
completions only) and, in the HH experiment, to make "Preferred-FT on chosen" the
reference model.

An SFT batch is a dict of ``[N, L]`` arrays:

| key | meaning |
|---|---|
| ``input_ids`` int32 | tokens |
| ``positions`` int32 | position ids (optional, default ``arange(L)``) |
| ``segment_ids`` int32 | 0 = padding, as in the preference batches |
| ``loss_mask`` float32 | 1 where the token is a target; its log-prob comes from the logits at the previous position (the same convention as ``sequence_index``) |

The loss is the mean NLL over all target tokens of the batch (what HF Trainer and TRL's
SFTTrainer minimise), so long and short examples weigh by their token counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Batch = Mapping[str, Any]
ApplyFn = Callable[
    ..., jax.Array
]  # apply_fn(params, input_ids, positions=..., segment_ids=...) -> logits


class SFTState(NamedTuple):
    """Parameters, optimizer state and step counter: a pytree, so the step can donate it."""

    params: Any
    opt_state: Any
    step: jax.Array


def init_state(params: Any, optimizer: optax.GradientTransformation) -> SFTState:
    """A fresh SFT state at step 0."""
    return SFTState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def token_logps(logits_NxLxV: jax.Array, input_ids_NxL: jax.Array) -> jax.Array:
    """log p(token_t | tokens_<t) for t >= 1, placed at t; position 0 gets 0.

    The logits at position t-1 predict token t. Computed in float32 whatever the logits'
    dtype, because bf16 log-softmax loses the small differences SFT learns from.
    """
    logits = logits_NxLxV[:, :-1].astype(jnp.float32)
    targets = input_ids_NxL[:, 1:]
    logps = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.pad(logps, ((0, 0), (1, 0)))


def sft_loss(
    params: Any, apply_fn: ApplyFn, batch: Batch
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean token NLL over ``loss_mask`` and metrics (``loss``, ``num_tokens``, ``perplexity``)."""
    input_ids = batch["input_ids"]
    logits = apply_fn(
        params,
        input_ids,
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
    )
    mask = jnp.asarray(batch["loss_mask"], jnp.float32)
    # Position 0 has no previous logits: it can never be a target.
    mask = mask.at[:, 0].set(0.0)
    num_tokens = mask.sum()
    nll = -(token_logps(logits, input_ids) * mask).sum() / jnp.maximum(num_tokens, 1.0)
    return nll, {"loss": nll, "num_tokens": num_tokens, "perplexity": jnp.exp(nll)}


def make_sft_step(
    apply_fn: ApplyFn, optimizer: optax.GradientTransformation
) -> Callable[[SFTState, Batch], tuple[SFTState, dict[str, jax.Array]]]:
    """A jitted ``step(state, batch) -> (state, metrics)`` that donates the old state."""

    def step(state: SFTState, batch: Batch) -> tuple[SFTState, dict[str, jax.Array]]:
        (_, metrics), grads = jax.value_and_grad(sft_loss, has_aux=True)(
            state.params, apply_fn, batch
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return SFTState(params, opt_state, state.step + 1), metrics

    return jax.jit(step, donate_argnums=0)


def make_sft_eval(apply_fn: ApplyFn) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """A jitted ``eval(params, batch) -> metrics`` (no update)."""
    return jax.jit(lambda params, batch: sft_loss(params, apply_fn, batch)[1])


def pad_sft_batch(
    sequences: Sequence[Sequence[int]],
    target_starts: Sequence[int],
    max_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Right-pad token lists into an SFT batch; tokens at index >= target_starts[i] are targets.

    `target_starts[i] = 1` trains on every token after the first (language modelling);
    `len(prompt)` trains on the completion only (Preferred-FT). Sequences longer than
    `max_len` are truncated on the right.
    """
    if len(sequences) != len(target_starts):
        raise ValueError(f"{len(sequences)} sequences but {len(target_starts)} target starts")
    n = len(sequences)
    input_ids = np.full((n, max_len), pad_id, np.int32)
    segment_ids = np.zeros((n, max_len), np.int32)
    loss_mask = np.zeros((n, max_len), np.float32)
    for i, (seq, start) in enumerate(zip(sequences, target_starts, strict=True)):
        seq = list(seq)[:max_len]
        if not seq:
            raise ValueError(f"sequence {i} is empty")
        input_ids[i, : len(seq)] = seq
        segment_ids[i, : len(seq)] = 1
        loss_mask[i, max(start, 1) : len(seq)] = 1.0
    positions = np.broadcast_to(np.arange(max_len, dtype=np.int32), (n, max_len)).copy()
    return {
        "input_ids": input_ids,
        "positions": positions,
        "segment_ids": segment_ids,
        "loss_mask": loss_mask,
    }


def iterate_sft_batches(
    sequences: Sequence[Sequence[int]],
    target_starts: Sequence[int],
    batch_size: int,
    max_len: int,
    pad_id: int,
    seed: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled full batches (a new permutation each epoch; seeded, so reproducible)."""
    n = len(sequences)
    if n < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} sequences, got {n}")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield pad_sft_batch(
                [sequences[i] for i in idx], [target_starts[i] for i in idx], max_len, pad_id
            )
