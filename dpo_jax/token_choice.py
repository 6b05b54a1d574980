"""Picking one token per row from logits, as Hugging Face's ``generate`` picks it.

Greedy (the first argmax), or a draw at a temperature with optional top-k then top-p
(nucleus) truncation, in that order; the draw is `jax.random.categorical`'s
(`fast_random.categorical`). The sampler (`dpo_jax.sampling`) runs these inside its
jitted decode loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpo_jax import fast_random


def _top_p_keep(sorted_logits_NxK: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep mask over descending-sorted logits: the smallest prefix with mass >= top_p.

    A token is kept iff the probability mass strictly before it is < top_p, which
    always keeps the first token (HF's ``min_tokens_to_keep=1``).
    """
    probs = jax.nn.softmax(sorted_logits_NxK, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return mass_before < top_p


def filter_logits(
    logits_NxV: jax.Array,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
    use_top_p: bool | None = None,
) -> jax.Array:
    """Set logits outside the top-k and then outside the top-p nucleus to -inf.

    ``top_k`` is static (0 = off); ``top_p`` may be traced. ``use_top_p`` (static)
    skips the vocabulary sort when False; by default it is ``top_p < 1`` for a
    Python float and True for a traced value.
    """
    if use_top_p is None:
        use_top_p = not isinstance(top_p, int | float) or top_p < 1.0
    vocab = logits_NxV.shape[-1]
    neg_inf = jnp.asarray(-jnp.inf, logits_NxV.dtype)
    if 0 < top_k < vocab:
        kth_N1 = jax.lax.top_k(logits_NxV, top_k)[0][:, -1:]
        logits_NxV = jnp.where(logits_NxV < kth_N1, neg_inf, logits_NxV)
    if use_top_p:
        sorted_NxV = -jnp.sort(-logits_NxV, axis=-1)
        keep_NxV = _top_p_keep(sorted_NxV, jnp.asarray(top_p, jnp.float32))
        last_kept_N1 = jnp.sum(keep_NxV, axis=-1, keepdims=True) - 1
        threshold_N1 = jnp.take_along_axis(sorted_NxV, last_kept_N1, axis=-1)
        logits_NxV = jnp.where(logits_NxV < threshold_N1, neg_inf, logits_NxV)
    return logits_NxV


def sample_logits(
    logits_NxV: jax.Array,
    key: jax.Array,
    temperature: float | jax.Array = 1.0,
    *,
    greedy: bool = False,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
    use_top_p: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row; returns ``(tokens_N, sampling_logps_N)``.

    Order as in HF: logits / temperature, then top-k, then top-p. With top-k the
    nucleus is computed over the k survivors only (no vocabulary-wide sort).
    ``sampling_logps`` is the chosen token's log-prob under that final
    distribution (0 for greedy).
    """
    logits_NxV = logits_NxV.astype(jnp.float32)
    if greedy:
        tokens_N = fast_random.first_argmax(logits_NxV)
        return tokens_N, jnp.zeros(tokens_N.shape, jnp.float32)
    if use_top_p is None:
        use_top_p = not isinstance(top_p, int | float) or top_p < 1.0
    scaled_NxV = logits_NxV / jnp.asarray(temperature, jnp.float32)
    vocab = scaled_NxV.shape[-1]
    if 0 < top_k < vocab:
        # Work on the k best only: already sorted descending by lax.top_k.
        vals_NxK, idx_NxK = jax.lax.top_k(scaled_NxV, top_k)
        if use_top_p:
            keep = _top_p_keep(vals_NxK, jnp.asarray(top_p, jnp.float32))
            vals_NxK = jnp.where(keep, vals_NxK, -jnp.inf)
        choice_N = fast_random.categorical(key, vals_NxK)
        tokens_N = jnp.take_along_axis(idx_NxK, choice_N[:, None], axis=-1)[:, 0]
        logp_N = jnp.take_along_axis(
            jax.nn.log_softmax(vals_NxK, axis=-1), choice_N[:, None], axis=-1
        )[:, 0]
        return tokens_N.astype(jnp.int32), logp_N
    if use_top_p:
        scaled_NxV = filter_logits(scaled_NxV, 0, top_p, use_top_p=True)
    tokens_N = fast_random.categorical(key, scaled_NxV)
    logp_N = jnp.take_along_axis(jax.nn.log_softmax(scaled_NxV, axis=-1), tokens_N[:, None], -1)[
        :, 0
    ]
    return tokens_N, logp_N


def token_logps(logits_NxV: jax.Array, tokens_N: jax.Array) -> jax.Array:
    """log softmax(logits)[token] per row, in float32."""
    logits_NxV = logits_NxV.astype(jnp.float32)
    lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
    return jnp.take_along_axis(logits_NxV, tokens_N[:, None], axis=-1)[:, 0] - lse_N
