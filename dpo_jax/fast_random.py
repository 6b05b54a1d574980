"""Categorical draws equal to `jax.random.categorical`, cheaper on XLA:CPU.

jax.random.categorical(key, logits) = argmax(gumbel(key) + logits). On XLA:CPU at a
50k vocabulary two parts of it cost more than the noise needs (GPT-2 small, batch 8,
one decode step): the threefry hash is lowered as a 5-iteration while loop that
writes two [N, V] uint32 arrays per iteration, and the argmax is a variadic (value,
index) reduction that XLA:CPU runs unvectorised, with the Gumbel transform's two logs
fused into it. `categorical` draws the same integers and computes the same floats
(the float code is jax's own `gumbel`) with neither: an unrolled hash (one fused
loop) and a max + first-index reduction pair over the materialised perturbed logits.
The sampler (`dpo_jax.sampling`) is its one user.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _rotate_left32(x: jax.Array, r: int) -> jax.Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _threefry2x32(
    k1: jax.Array, k2: jax.Array, x0: jax.Array, x1: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32, 20 rounds, unrolled: the integers of jax's `threefry2x32_p`."""
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ _rotate_left32(x1, r)
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _threefry_random_bits(key_data: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    """jax's threefry `random_bits` (partitionable layout) through the unrolled hash.

    Element i (row-major) hashes the counter pair (i >> 32, i & 0xffffffff) and keeps
    the XOR of the two output words, as jax does with ``jax_threefry_partitionable``.
    """
    from jax.extend import random as jex_random  # lazy: only traced when sampling

    size = math.prod(shape)
    if bit_width != 32 or not shape or size >= 2**32:
        return jex_random.threefry_prng_impl.random_bits(key_data, bit_width, shape)
    count = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):  # sum of iotas: XLA can partition it
        count = count + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride)
        stride *= shape[dim]
    k1 = jnp.broadcast_to(key_data[0], shape)
    k2 = jnp.broadcast_to(key_data[1], shape)
    hi, lo = _threefry2x32(k1, k2, jnp.zeros(shape, jnp.uint32), count)
    return hi ^ lo


@functools.cache
def _unrolled_threefry() -> Any:
    """A PRNG implementation equal to threefry2x32 except for how its bits are lowered."""
    from jax.extend import random as jex_random  # lazy: only traced when sampling

    base = jex_random.threefry_prng_impl
    return jex_random.define_prng_impl(
        key_shape=base.key_shape,
        seed=base.seed,
        split=base.split,
        random_bits=_threefry_random_bits,
        fold_in=base.fold_in,
        name="threefry2x32_unrolled",
        tag="fry_u",
    )


def fast_key(key: jax.Array) -> jax.Array:
    """``key`` re-wrapped for the unrolled hash where that gives jax's own bits; else as is."""
    if not jax.config.jax_threefry_partitionable:
        return key
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32[2] key: the default impl
    if str(jax.random.key_impl(key)) != "threefry2x32":
        return key
    return jax.random.wrap_key_data(jax.random.key_data(key), impl=_unrolled_threefry())


def first_argmax(x_NxV: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` (first maximum; a NaN counts as the maximum), int32.

    Two plain reductions instead of XLA:CPU's unvectorised (value, index) reduction.
    """
    max_N1 = jnp.max(x_NxV, axis=-1, keepdims=True)
    hit_NxV = (x_NxV == max_N1) | jnp.isnan(x_NxV)
    index_NxV = jax.lax.broadcasted_iota(jnp.int32, x_NxV.shape, x_NxV.ndim - 1)
    return jnp.min(jnp.where(hit_NxV, index_NxV, x_NxV.shape[-1]), axis=-1)


def categorical(key: jax.Array, logits_NxV: jax.Array) -> jax.Array:
    """``jax.random.categorical(key, logits, axis=-1)``: the same draws, int32."""
    perturbed_NxV = (
        jax.random.gumbel(fast_key(key), logits_NxV.shape, logits_NxV.dtype) + logits_NxV
    )
    return first_argmax(perturbed_NxV)
