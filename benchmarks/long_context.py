"""Long-context train-step memory and speed: blockwise attention against the dense path.

    python -m benchmarks.long_context --shape tiny --lengths 2048,8192,32768 \
        --layouts stacked,packed,prefix_shared --impls xla,blockwise [--time-length 2048] [--json]

For each row length L, layout and attention implementation, the DPO train step (the
Trainer's own jitted step: frozen reference, scan over layers, scored-only unembedding)
is compiled ahead of time (nothing runs) and XLA's `memory_analysis()` gives its
scratch (`temp`) bytes. Every layout holds L tokens per row:
- stacked: one pair, prompt L/2 and completions L/2 (2 rows);
- packed: four pairs, prompt and completions L/4 (eight L/2-token sequences packed
  first-fit two per row: 4 rows);
- prefix_shared: one pair, prompt L/2 - 1, completions L/4 (1 row).
`--time-length` also times `--steps` steps of that length (CPU step time). A compile that
fails (for example out of host memory) is reported as its error, not extrapolated.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np

from benchmarks import common, jax_side


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--lengths", default="2048,8192,32768")
    p.add_argument("--layouts", default="stacked,packed,prefix_shared")
    p.add_argument("--impls", default="xla,blockwise")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--time-length", type=int, default=0, help="also time steps at this length")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternating timing rounds per impl")
    p.add_argument(
        "--max-dense-length",
        type=int,
        default=1 << 30,
        help="skip the xla path above this length (its [N,H,L,L] buffers)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.length_list = [int(x) for x in args.lengths.split(",") if x]
    args.layout_list = [x for x in args.layouts.split(",") if x]
    args.impl_list = [x for x in args.impls.split(",") if x]
    if any(n < 64 or n % 16 for n in args.length_list):
        raise SystemExit(f"{__file__}: --lengths must be multiples of 16, at least 64")
    return args


def items_for(layout: str, length: int, vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """Random pairs whose `layout` rows hold exactly `length` tokens (module doc)."""
    rng = np.random.default_rng(seed)
    draw = lambda n: rng.integers(1, vocab - 1, n).astype(np.int32)
    if layout == "stacked":
        sizes = [(length // 2, length // 2)]
    elif layout == "packed":
        sizes = [(length // 4, length // 4)] * 4
    elif layout == "prefix_shared":
        sizes = [(length // 2 - 1, length // 4)]
    else:
        raise SystemExit(f"{__file__}: unknown layout {layout!r}")
    return [{"prompt": draw(p), "chosen": draw(c), "rejected": draw(c)} for p, c in sizes]


def setup(shape: common.ModelShape, layout: str, length: int, impl: str, dtype: str):
    """(trainer, state, batch_A, n_seq) for one configuration."""
    import jax

    from dpo_jax import data, models, train

    run = jax_side.JaxRunConfig(dtype=dtype, attention_impl=impl)
    cfg = jax_side.model_config(shape, run).replace(max_position_embeddings=length)
    params = models.init_params(cfg, jax.random.key(0))
    trainer, state = jax_side.build_trainer(cfg, params, run, total_steps=10)
    items = items_for(layout, length, shape.vocab)
    batch = data.build_batch(items, "paired", layout, length=length, pad_id=shape.vocab - 1)
    batch_A = train.stack_micro_batches([batch])
    return trainer, state, batch_A, train.batch_num_sequences(batch_A, layout), batch


def memory_row(shape, layout: str, length: int, impl: str, dtype: str) -> dict[str, Any]:
    """AOT-compiled step statistics (no step runs)."""
    trainer, state, batch_A, n_seq, batch = setup(shape, layout, length, impl, dtype)
    stats = jax_side.step_compiled_stats(trainer, state, batch_A, n_seq)
    return {
        "layout": layout,
        "length": length,
        "impl": impl,
        "rows": int(batch["input_ids"].shape[0]),
        **stats,
    }


def time_row(shape, layout: str, length: int, impl: str, dtype: str, steps: int) -> float:
    """Median wall time of `steps` steps after one warm-up (compile) step."""
    import jax

    trainer, state, batch_A, n_seq, _ = setup(shape, layout, length, impl, dtype)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, batch_A, n_seq)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the memory table (and the timing), print it, return the result dict."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    shape = common.MODEL_SHAPES[args.shape]
    rows = []
    for length in args.length_list:
        for layout in args.layout_list:
            for impl in args.impl_list:
                if impl == "xla" and length > args.max_dense_length:
                    rows.append({"layout": layout, "length": length, "impl": impl, "skipped": True})
                    continue
                rows.append(memory_row(shape, layout, length, impl, args.dtype))
                r = rows[-1]
                print(
                    f"  {layout:14s} L={length:6d} {impl:9s} temp={common.fmt_bytes(r.get('temp_bytes'))}"
                    f" compile={r.get('compile_s', float('nan')):.1f}s {r.get('stats_error', '')}",
                    flush=True,
                )
    timing = []
    if args.time_length:
        for layout in args.layout_list:
            per: dict[str, list[float]] = {impl: [] for impl in args.impl_list}
            for r in range(args.rounds):
                order = args.impl_list if r % 2 == 0 else args.impl_list[::-1]
                for impl in order:
                    per[impl].append(
                        time_row(shape, layout, args.time_length, impl, args.dtype, args.steps)
                    )
            timing.append(
                {"layout": layout, "length": args.time_length}
                | {f"{impl}_step_s": statistics.median(v) for impl, v in per.items()}
            )
    result = {
        "benchmark": "long_context",
        "shape": args.shape,
        "dtype": args.dtype,
        "machine": common.machine_info(),
        "memory": rows,
        "timing": timing,
    }
    print_report(result)
    common.emit(result, args.json, args.json_out)
    return result


def print_report(result: dict[str, Any]) -> None:
    """Memory table (temp bytes per layout and length, one column per impl) and timing."""
    print(f"long_context  shape={result['shape']}  dtype={result['dtype']}")
    table: dict[tuple[str, int], dict[str, Any]] = {}
    for r in result["memory"]:
        row = table.setdefault(
            (r["layout"], r["length"]), {"layout": r["layout"], "L": r["length"]}
        )
        if r.get("skipped"):
            row[f"{r['impl']} temp"] = "skipped"
        elif "temp_bytes" in r:
            row[f"{r['impl']} temp"] = common.fmt_bytes(r["temp_bytes"])
            row[f"{r['impl']} compile_s"] = r["compile_s"]
        else:
            row[f"{r['impl']} temp"] = r.get("stats_error", "?")[:40]
    rows = list(table.values())
    if rows:
        common.print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    if result["timing"]:
        common.print_table(result["timing"], list(result["timing"][0]))


if __name__ == "__main__":
    main()
