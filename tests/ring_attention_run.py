"""Ring attention against the dense reference on 4 simulated CPU devices, in ONE process.

Executed by tests/test_ring_attention.py in a subprocess (XLA_FLAGS must be set before
jax is imported). One batch holds every case the mask rules express: a packed row (two
segments, padding) and a prefix-shared row (branches 1 and 2), with GQA, a sliding
window and logit soft-capping, laid out zig-zag over the `sequence` axis. Prints one JSON
line: the largest differences in output and in the gradients of q, k and v.
"""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dpo_jax import sharding  # noqa: E402
from dpo_jax.models import attention as A  # noqa: E402
from dpo_jax.models import ring_attention as R  # noqa: E402

N, L, H, KV, D, RING = 2, 64, 4, 2, 8, 4
WINDOW, CAP = 20, 5.0


def _rule() -> A.MaskRule:
    seg = np.ones((N, L), np.int32)
    seg[0, 40:56], seg[0, 56:], seg[1, 50:] = 2, 0, 0
    pos = np.tile(np.arange(L, dtype=np.int32), (N, 1))
    pos[0, 40:] -= 40
    branch = np.zeros((N, L), np.int32)
    # prefix-shared: prompt 0..19, chosen 20..34, copy of the last prompt token + rejected
    branch[1, 20:35], branch[1, 35:50] = 1, 2
    pos[1, 35:50] = np.arange(19, 34)
    return A.make_rule(jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(branch))


def main() -> None:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(N, L, h, D)), jnp.float32) for h in (H, KV, KV))
    rule = _rule()
    opts = dict(window=WINDOW, softcap=CAP)

    def ring(q, k, v):
        z = lambda x: R.to_zigzag(x, RING)
        zr = A.make_rule(
            z(rule.segment), z(rule.position), z(rule.branch), R.zigzag_index(N, L, RING)
        )
        return R.from_zigzag(R.ring_attention(z(q), z(k), z(v), zr, block=16, **opts), RING)

    dense = lambda q, k, v: A.reference_attention(q, k, v, rule, **opts)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    mesh = sharding.make_mesh(1, 1, 1, sequence=RING)
    with jax.set_mesh(mesh):
        out = jax.jit(ring)(q, k, v)
        grads = jax.jit(jax.grad(loss(ring), argnums=(0, 1, 2)))(q, k, v)
    ref_out = dense(q, k, v)
    ref_grads = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    diff = lambda a, b: float(jnp.abs(a - b).max())
    print(json.dumps({
        "out": diff(out, ref_out),
        **{f"d{n}": diff(a, b) for n, a, b in zip("qkv", grads, ref_grads, strict=True)},
        "grad_scale": float(max(jnp.abs(g).max() for g in ref_grads)),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
