"""Do the cuDNN and blockwise attention paths give the XLA path's numbers? (GPU or CPU)

    python -m benchmarks.attention_check [--json-out FILE]

A small Llama-shaped model scores packed rows (two segments and right padding per row)
and stacked rows (one right-padded sequence per row) several ways: XLA attention in
float32 (the reference), then XLA, blockwise and ``attention_impl="cudnn"`` in bfloat16.
Reports the largest difference of per-sequence log-probs and of their parameter
gradients from the float32 reference, so each error can be read against bfloat16's own.
cuDNN serves only the stacked rows (packed rows take its run-time fallback to blockwise);
off GPU, "cudnn" falls back to blockwise with a logged reason.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from benchmarks import common


def packed_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of two sequences each plus right padding, in the packed batch layout."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros((rows, length), np.int32)
    seq = np.full((rows, length), -1, np.int32)
    for r in range(rows):
        first = length // 2 - r
        second = length - 3 - first - r
        seg[r, :first], seg[r, first : first + second] = 1, 2
        pos[r, :first] = np.arange(first)
        pos[r, first : first + second] = np.arange(second)
        # the last third of each sequence is its scored completion
        seq[r, 2 * first // 3 : first] = 2 * r
        seq[r, first + 2 * second // 3 : first + second] = 2 * r + 1
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "sequence_index": seq}


def stacked_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of one right-padded sequence each (the layout cuDNN serves), 2 scored spans."""
    batch = packed_batch(rows, length, vocab, seed)
    seg = batch["segment_ids"]
    used = (seg != 0).sum(1)
    batch["segment_ids"] = (seg != 0).astype(np.int32)
    batch["positions"] = np.where(seg != 0, np.arange(length)[None], 0).astype(np.int32)
    for r in range(rows):
        assert (seg[r, : used[r]] != 0).all()  # packed rows have no holes
    return batch


def logps_and_grads(cfg: Any, params: Any, batch: dict, n_seq: int) -> tuple[np.ndarray, Any]:
    """Per-sequence log-probs and the gradient of their sum w.r.t. ``params``."""
    import jax
    import jax.numpy as jnp

    from dpo_jax import models, scoring

    apply_fn = models.Transformer(cfg).apply
    jb = {k: jnp.asarray(v) for k, v in batch.items()}

    def total(p: Any) -> tuple[jax.Array, jax.Array]:
        logps = scoring.score(apply_fn, p, jb, n_seq).logps_S
        return jnp.sum(logps), logps

    (_, logps), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
    return np.asarray(logps, np.float64), jax.tree.map(lambda g: np.asarray(g, np.float64), grads)


def max_tree_diff(a: Any, b: Any) -> float:
    """Largest |a - b| over matching leaves, relative to the largest |b|."""
    import jax

    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b))
    scale = max(float(np.max(np.abs(y))) for y in jax.tree.leaves(b))
    return max(diffs) / scale


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the three paths and print their errors against float32 XLA."""
    import jax

    from dpo_jax import models

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    base = models.ModelConfig.for_family(
        "llama",
        vocab_size=1024,
        hidden_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=512,
        max_position_embeddings=args.length,
        param_dtype="float32",
        dtype="float32",
        attention_impl="xla",
        attention_block=64,  # several blocks at the default length
    )
    params = models.init_params(base, jax.random.key(0))
    n_seq = 2 * args.rows
    rows = []
    for layout, make in (("packed", packed_batch), ("stacked", stacked_batch)):
        batch = make(args.rows, args.length, 1024)
        ref_logps, ref_grads = logps_and_grads(base, params, batch, n_seq)
        for dtype, impl in (("float32", "blockwise"), ("bfloat16", "xla"),
                          ("bfloat16", "blockwise"), ("bfloat16", "cudnn")):  # fmt: skip
            cfg = base.replace(dtype=dtype, attention_impl=impl)
            logps, grads = logps_and_grads(cfg, params, batch, n_seq)
            rows.append(
                {
                    "layout": layout,
                    "dtype": dtype,
                    "attention": impl,
                    "max_logp_abs_err": float(np.max(np.abs(logps - ref_logps))),
                    "max_logp_rel_err": float(
                        np.max(np.abs(logps - ref_logps) / np.abs(ref_logps))
                    ),
                    "max_grad_rel_err": max_tree_diff(grads, ref_grads),
                }
            )
    result = {
        "benchmark": "attention_check",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "rows": args.rows,
        "length": args.length,
        "results": rows,
    }
    common.print_table(rows, list(rows[0]))
    common.emit(result, False, args.json_out)
    return result


if __name__ == "__main__":
    main()
