"""Checkpoint integrity: per-array fingerprints computed on device.

A fingerprint is two 32-bit sums over an array's bit patterns, taken as unsigned
words: the plain sum and the sum weighted by ``2 * linear_index + 1`` (odd, so any
change of any one word changes it; the weights also catch swapped words). Integer
sums modulo 2**32 are exact and order-free, so the result does not depend on how the
array is sharded: a checkpoint restored onto another mesh verifies the same. It is
one elementwise pass and a reduction per array, with no host copy, cheap enough to
keep on by default (benchmarks/checkpoint_fingerprint.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_UINT_OF_SIZE = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _words(x: jax.Array) -> jax.Array | None:
    """The array's bits as uint32 words (one per element; two for 64-bit types)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    if size in _UINT_OF_SIZE:
        bits = (
            x
            if x.dtype == _UINT_OF_SIZE[size]
            else lax.bitcast_convert_type(x, _UINT_OF_SIZE[size])
        )
        return bits.astype(jnp.uint32)
    if size == 8 and not jnp.issubdtype(x.dtype, jnp.complexfloating):
        return lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    return None


def _linear_index(shape: tuple[int, ...]) -> jax.Array:
    # Built from per-axis iotas instead of a reshape(-1), which could force a
    # sharded array to be gathered.
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _leaf_fingerprint(x: jax.Array) -> jax.Array | None:
    words = _words(x)
    if words is None:
        return None
    weights = _linear_index(words.shape) * jnp.uint32(2) + jnp.uint32(1)
    plain = jnp.sum(words, dtype=jnp.uint32)
    weighted = jnp.sum(words * weights, dtype=jnp.uint32)
    return jnp.stack([plain, weighted])


# One small program per (shape, dtype, sharding), cached by jit: the params and both
# Adam moments share them, and a scanned model has few distinct shapes. (One program
# over the whole tree compiles every leaf anew: ~3x the compile time.)
_leaf_fingerprint_jit = jax.jit(_leaf_fingerprint)


def path_name(entry: Any) -> str:
    """One segment of a pytree key path as plain text (dict key, field name or index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaf_paths(tree: Any) -> dict[str, Any]:
    """``'a/b/0/c' -> leaf`` for every array leaf (dataclass fields, keys, indices)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(path_name(e) for e in path): leaf
        for path, leaf in leaves
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    }


def fingerprints(tree: Any) -> dict[str, str]:
    """``path -> "<dtype>:<16 hex digits>"`` for every array leaf of ``tree``.

    Computed on the arrays' devices (one jitted call per leaf, one host sync); only
    8 bytes per leaf come back to the host. Leaves of types without a bit view (complex) are left out.
    """
    leaves = leaf_paths(tree)
    if not leaves:
        return {}
    if jax.process_count() == 1:
        # Dispatched for every leaf first, fetched together: one host sync in all.
        sums = jax.device_get({path: _leaf_fingerprint_jit(leaf) for path, leaf in leaves.items()})
    else:
        # Several processes: one leaf at a time. Independent programs in flight together
        # may run their cross-process collectives in different orders on different hosts
        # (XLA:CPU with gloo deadlocked so, at random, in two-process PPO runs).
        sums = {path: jax.device_get(_leaf_fingerprint_jit(leaf)) for path, leaf in leaves.items()}
    out = {}
    for path, leaf in leaves.items():
        s = sums[path]
        if s is not None:
            plain, weighted = (int(v) for v in np.asarray(s, np.uint32))
            out[path] = f"{np.dtype(leaf.dtype).name}:{plain:08x}{weighted:08x}"
    return out


def mismatches(saved: Mapping[str, str], tree: Any) -> tuple[list[str], list[str]]:
    """``(mismatching paths, unverifiable paths)`` of ``tree`` against saved fingerprints.

    A leaf restored in another dtype than it was saved in (a cast on restore) cannot
    be verified and is reported as unverifiable, not as damage.
    """
    current = fingerprints(tree)
    bad, unverified = [], []
    for path, value in sorted(saved.items()):
        now = current.get(path)
        value = str(value)
        if now is None or now.split(":")[0] != value.split(":")[0]:
            unverified.append(path)
        elif now != value:
            bad.append(path)
    return bad, unverified
