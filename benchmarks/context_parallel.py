"""Context parallelism: per-device memory of the DPO step with mesh.sequence = 1, 2, 4, 8,
and the ring's step-time overhead on CPU.

    python -m benchmarks.context_parallel --shape llama-1b --lengths 32768,65536,131072 \
        --sequence 1,2,4,8 [--time-shape tiny --time-length 8192 --time-sequence 4] [--json]

Memory: one prefix-shared row per step holding a whole pair (`long_context.items_for`:
prompt L/2 - 1, completions L/4, so L tokens per pair), bfloat16 compute, remat per
block, frozen reference, scored-only unembedding. Params are abstract
(`models.abstract_params`, no weights): the Trainer's own jitted step is lowered and
compiled on simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
set here) and XLA's `memory_analysis()` gives each device's temp (activations, scratch)
and argument (params, optimizer state, batch) bytes. Nothing runs.

Timing: `--time-length` tokens per row, the same step run on one device with blockwise
attention and on `--time-sequence` devices with ring and with Ulysses (all-to-all)
attention (each device then has
1/n of the work, on a CPU whose cores the simulated devices share). Communication is
timed apart: the ring's exact ppermute pattern (K, V and the mask rule forward; K, V,
the rule and dK/dV backward) on that layer's per-device shapes, times the layers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

from benchmarks import common, jax_side, long_context  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-1b", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--lengths", default="32768,65536,131072", help="tokens per pair (one row)")
    p.add_argument("--sequence", default="1,2,4,8", help="mesh.sequence sizes")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="block", choices=["none", "block", "dots_saveable"])
    p.add_argument("--time-shape", default="tiny", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--time-length", type=int, default=0, help="also time steps at this length")
    p.add_argument("--time-sequence", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.length_list = [int(x) for x in args.lengths.split(",") if x]
    args.sequence_list = [int(x) for x in args.sequence.split(",") if x]
    return args


def setup(shape: common.ModelShape, length: int, sequence: int, run: Any, abstract: bool):
    """(trainer, state, batch_A, n_seq) on a (1, 1, sequence, 1) mesh."""
    import jax
    from flax import linen as nn

    from dpo_jax import data, models, sharding, train, train_step
    from dpo_jax import trainer as trainer_lib

    cfg = jax_side.model_config(shape, run).replace(max_position_embeddings=length)
    if abstract:
        params = nn.meta.unbox(models.abstract_params(cfg))
    else:
        params = models.init_params(cfg, jax.random.key(0))
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:sequence], sequence=sequence)
    trainer, state = trainer_lib.build_trainer(
        cfg, params, mesh=mesh,
        optim_config={"name": "adamw", "learning_rate": run.learning_rate,
                      "schedule": "constant", "max_grad_norm": 1.0},
        total_steps=10, reference=run.reference,
        **train_step.default_settings(loss_name="sigmoid", loss_hyper={"beta": run.beta}),
    )  # fmt: skip
    items = long_context.items_for("prefix_shared", length, shape.vocab)
    batch = data.build_batch(
        items, "paired", "prefix_shared", length=length, pad_id=shape.vocab - 1
    )
    batch_A = train.stack_micro_batches([batch])
    return trainer, state, batch_A, train.batch_num_sequences(batch_A, "prefix_shared")


def memory_row(shape: common.ModelShape, length: int, sequence: int, args: Any) -> dict[str, Any]:
    """Compiled (not run) step's per-device bytes."""
    run = jax_side.JaxRunConfig(dtype=args.dtype, remat=args.remat, attention_impl="auto")
    trainer, state, batch_A, n_seq = setup(shape, length, sequence, run, abstract=True)
    t0 = time.perf_counter()
    try:
        compiled = trainer.lower(state, batch_A, n_seq).compile()
    except Exception as e:  # noqa: BLE001 - a failed compile is a result, reported as such
        return {"length": length, "sequence": sequence, "error": f"{type(e).__name__}: {e}"[:200]}
    stats = common.compiled_stats(compiled)
    return {"length": length, "sequence": sequence, "compile_s": time.perf_counter() - t0, **stats}


def step_time(
    shape: common.ModelShape, length: int, sequence: int, args: Any, impl: str = "blockwise"
) -> float:
    """Median wall time of `args.steps` steps after a warm-up (compile) step."""
    import jax

    run = jax_side.JaxRunConfig(dtype="float32", attention_impl=impl)
    trainer, state, batch_A, n_seq = setup(shape, length, sequence, run, abstract=False)
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, batch_A, n_seq)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ring_comm_time(shape: common.ModelShape, length: int, sequence: int, steps: int) -> float:
    """Seconds of one step's ring traffic alone: per layer n-1 hops of K, V and the 4 rule
    arrays forward, n-1 hops of K, V, rule, dK, dV and one of dK, dV backward (float32)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    from dpo_jax import sharding
    from dpo_jax.models import ring_attention

    n = sequence
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:n], sequence=n)
    kv = jnp.zeros((1, length, shape.kv_heads, shape.head_dim), jnp.float32)
    rule = jnp.zeros((4, length), jnp.int32)
    perm = [(i, (i + 1) % n) for i in range(n)]
    hop = lambda t: jax.tree.map(lambda x: jax.lax.ppermute(x, "sequence", perm), t)

    def traffic(k: jax.Array, v: jax.Array, r: jax.Array) -> tuple:
        fwd = jax.lax.fori_loop(0, n - 1, lambda _, c: hop(c), (k, v, r))
        bwd = jax.lax.fori_loop(0, n - 1, lambda _, c: hop(c), (k, v, r, k, v))
        return fwd, bwd, hop((bwd[3], bwd[4]))

    spec = PartitionSpec(None, ring_attention.SEQUENCE_AXIS)
    body = jax.shard_map(traffic, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    fn = jax.jit(body)
    jax.block_until_ready(fn(kv, kv, rule))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(shape.n_layer):
            out = fn(kv, kv, rule)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Memory table (and timing); prints it and returns the result dict."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    shape = common.MODEL_SHAPES[args.shape]
    rows = []
    for length in args.length_list:
        for seq in args.sequence_list:
            rows.append(memory_row(shape, length, seq, args))
            print(f"  L={length} sequence={seq}: {rows[-1]}", flush=True)
    timing = {}
    if args.time_length:
        tshape = common.MODEL_SHAPES[args.time_shape]
        one = step_time(tshape, args.time_length, 1, args)
        ring = step_time(tshape, args.time_length, args.time_sequence, args, "ring")
        ulysses = step_time(tshape, args.time_length, args.time_sequence, args, "ulysses")
        comm = ring_comm_time(tshape, args.time_length, args.time_sequence, args.steps)
        timing = {
            "shape": args.time_shape, "length": args.time_length,
            "sequence": args.time_sequence, "one_device_step_s": one,
            "ring_step_s": ring, "ulysses_step_s": ulysses, "ring_comm_s": comm,
        }  # fmt: skip
    result = {
        "benchmark": "context_parallel",
        "shape": args.shape,
        "dtype": args.dtype,
        "remat": args.remat,
        "machine": common.machine_info(),
        "memory": rows,
        "timing": timing,
    }
    print_report(result)
    common.emit(result, args.json, args.json_out)
    return result


def print_report(result: dict[str, Any]) -> None:
    """Per-device temp/argument bytes per length and sequence size, temp vs sequence=1."""
    print(f"context_parallel  shape={result['shape']}  dtype={result['dtype']}")
    base = {r["length"]: r.get("temp_bytes") for r in result["memory"] if r["sequence"] == 1}
    table = []
    for r in result["memory"]:
        row = {"tokens/pair": r["length"], "sequence": r["sequence"]}
        if "error" in r:
            row["temp"] = r["error"][:40]
        else:
            b = base.get(r["length"])
            row |= {
                "temp/device": common.fmt_bytes(r.get("temp_bytes")),
                "args/device": common.fmt_bytes(r.get("arg_bytes")),
                "temp vs seq=1": f"{r['temp_bytes'] / b:.3f}" if b else "",
                "1/n": f"{1 / r['sequence']:.3f}",
            }
        table.append(row)
    common.print_table(table, list(dict.fromkeys(k for r in table for k in r)))
    if result["timing"]:
        common.print_table([result["timing"]], list(result["timing"]))


if __name__ == "__main__":
    main()
