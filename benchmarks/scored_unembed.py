"""Prototype behind a proposal: unembed only the positions that are scored.

    python -m benchmarks.scored_unembed --shape gpt2-small --pairs 4 --prompt-len 96 \
        --completion-len 32 --steps 3 [--json]

dpo_jax's step (``train_step.sequence_logps``) projects every row position through the
``D x V`` unembedding, though DPO scores only completion tokens; TRL's fused LM head
projects only positions whose next-token label is kept. This benchmark times the
policy forward+backward plus the reference forward of the DPO loss two ways on the same
params and batch:

* ``all_positions``: dpo_jax's own ``train_step.sequence_logps`` (the current path);
* ``scored_only``: the same model call with ``return_hidden=True``, a gather of the ``K``
  positions per row that predict a scored token (``K`` static: the batch's largest
  count, known on the host), the unembedding on ``[N, K, D]`` only, then
  ``logprobs.reduce_token_logps``.

It reports time, XLA FLOPs and scratch bytes of each and checks the log-probs agree. The
gather needs only ``sequence_index``, so it works for the stacked, packed and
prefix-shared layouts alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from benchmarks import common, jax_side


def scored_index(sequence_index_NxL: np.ndarray, bucket: int = 8) -> np.ndarray:
    """``[N, K]`` positions ``t`` whose next token ``t + 1`` is scored (padded with -1).

    ``K`` is the largest per-row count rounded up to ``bucket`` so batches share shapes.
    """
    scored_next = sequence_index_NxL[:, 1:] >= 0
    counts = scored_next.sum(1)
    k = max(int(-(-counts.max() // bucket) * bucket), bucket)
    out = np.full((sequence_index_NxL.shape[0], k), -1, np.int32)
    for n, row in enumerate(scored_next):
        pos = np.nonzero(row)[0]
        out[n, : len(pos)] = pos
    return out


def scored_only_logps(apply_fn: Any, params: Any, batch: dict, idx_NxK: Any, n_seq: int) -> Any:
    """Per-sequence log-probs unembedding only the gathered positions."""
    import jax
    import jax.numpy as jnp

    from dpo_jax import logprobs

    variables = {"params": params}
    inputs = {k: batch[k] for k in ("positions", "segment_ids") if k in batch}
    if "attn_mask" in batch:
        inputs["attn_mask"] = batch["attn_mask"]
    hidden_NxLxD = apply_fn(variables, batch["input_ids"], return_hidden=True, **inputs)
    valid_NxK = idx_NxK >= 0
    pos_NxK = jnp.where(valid_NxK, idx_NxK, 0)
    h_NxKxD = jnp.take_along_axis(hidden_NxLxD, pos_NxK[..., None], axis=1)
    logits_NxKxV = apply_fn(variables, h_NxKxD, method="logits").astype(jnp.float32)
    next_ids_NxK = jnp.take_along_axis(batch["input_ids"], pos_NxK + 1, axis=1)
    target = jnp.take_along_axis(logits_NxKxV, next_ids_NxK[..., None], axis=-1)[..., 0]
    logp_NxK = target - jax.nn.logsumexp(logits_NxKxV, axis=-1)
    seq_NxK = jnp.where(
        valid_NxK, jnp.take_along_axis(batch["sequence_index"], pos_NxK + 1, axis=1), -1
    )
    return logprobs.reduce_token_logps(logp_NxK, seq_NxK, n_seq).logps_S


def dpo_loss(policy_S: Any, ref_S: Any, beta: float = 0.1) -> Any:
    """Mean sigmoid DPO loss from stacked ``[2B]`` log-probs."""
    import jax

    b = policy_S.shape[0] // 2
    margin = (policy_S[:b] - ref_S[:b]) - (policy_S[b:] - ref_S[b:])
    return -jax.nn.log_sigmoid(beta * margin).mean()


def build_fns(cfg: Any, n_seq: int) -> dict[str, Any]:
    """The two jitted ``(params, ref_params, batch, idx) -> (loss, grads, logps)`` variants."""
    import jax

    from dpo_jax import models
    from dpo_jax import train_step as ts

    apply_fn = models.Transformer(cfg).apply
    step_cfg = ts.StepConfig(apply_fn=apply_fn, optimizer=None, schedule=None, loss_name="sigmoid")

    def current(p: Any, b: dict, idx: Any) -> Any:
        return ts.sequence_logps(step_cfg, p, b, n_seq).logps_S

    def scored(p: Any, b: dict, idx: Any) -> Any:
        return scored_only_logps(apply_fn, p, b, idx, n_seq)

    def make(logps_fn: Any) -> Any:
        def loss(p: Any, ref: Any, b: dict, idx: Any) -> tuple[Any, Any]:
            ref_S = jax.lax.stop_gradient(logps_fn(ref, b, idx))
            pol_S = logps_fn(p, b, idx)
            return dpo_loss(pol_S, ref_S), pol_S

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    return {"all_positions": make(current), "scored_only": make(scored)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time both variants (alternating), print the table, return the result dict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--completion-len", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))

    import jax
    import jax.numpy as jnp

    shape = common.MODEL_SHAPES[args.shape]
    b = common.BatchShape(args.pairs, args.prompt_len, args.completion_len)
    cfg, params = jax_side.load_or_init(shape, jax_side.JaxRunConfig(), None)
    ref = jax.tree.map(jnp.copy, params)
    host = jax_side.stacked_batch(common.random_pairs(b, shape.vocab, shape.vocab - 1))
    idx = jnp.asarray(scored_index(host["sequence_index"]))
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    fns = build_fns(cfg, 2 * b.pairs)
    rows: dict[str, dict[str, Any]] = {}
    outs = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        compiled = fn.lower(params, ref, batch, idx).compile()
        rows[name] = {"variant": name, "compile_s": time.perf_counter() - t0}
        rows[name].update(common.compiled_stats(compiled))
        outs[name] = jax.block_until_ready(compiled(params, ref, batch, idx))
        rows[name]["times"] = []
        fns[name] = compiled
    for _ in range(args.steps):  # alternate so load changes hit both
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, ref, batch, idx))
            rows[name]["times"].append(time.perf_counter() - t0)
    for r in rows.values():
        r["median_s"] = float(np.median(r.pop("times")))
    (loss_a, logps_a), grads_a = outs["all_positions"]
    (loss_s, logps_s), grads_s = outs["scored_only"]
    grad_diff = max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_s), strict=True)
    )
    result = {
        "benchmark": "scored_unembed",
        "shape": args.shape,
        "pairs": b.pairs,
        "prompt_len": b.prompt_len,
        "completion_len": b.completion_len,
        "machine": common.machine_info(),
        "results": list(rows.values()),
        "speedup": rows["all_positions"]["median_s"] / rows["scored_only"]["median_s"],
        "logps_max_abs_diff": float(jnp.max(jnp.abs(logps_a - logps_s))),
        "grad_max_abs_diff": grad_diff,
        "loss_abs_diff": float(abs(loss_a - loss_s)),
    }
    print(
        f"scored_unembed  shape={args.shape}  pairs={b.pairs}  P={b.prompt_len}  C={b.completion_len}  "
        f"load={result['machine']['load_avg_1m']}"
    )
    table = [
        {
            "variant": r["variant"],
            "fwd+bwd+ref s": r["median_s"],
            "XLA GFLOP": r.get("xla_flops", float("nan")) / 1e9,
            "temp": common.fmt_bytes(r.get("temp_bytes")),
            "compile_s": r["compile_s"],
        }
        for r in rows.values()
    ]
    common.print_table(table, list(table[0]))
    print(
        f"speed-up {result['speedup']:.2f}x  |dlogps| {result['logps_max_abs_diff']:.2e}  "
        f"|dgrad| {grad_diff:.2e}"
    )
    common.emit(result, args.json, args.json_out)
    return result


if __name__ == "__main__":
    main()
