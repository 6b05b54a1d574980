"""Throughput, FLOP/s, MFU and memory of the dpo_jax train step for one model and batch.

    python -m benchmarks.train_step --shape gpt2-small --pairs 4 --prompt-len 96 \
        --completion-len 32 --steps 5 [--remat block] [--reference precomputed] [--json]
    python -m benchmarks.train_step ... --sweep remat        # none / block / dots_saveable
    python -m benchmarks.train_step ... --sweep reference    # frozen copy vs precomputed
    python -m benchmarks.train_step ... --sweep chunk        # plain vs vocab-chunked logps

MFU is model FLOP/s (the convention in ``benchmarks/common.py``: unembedding only at
scored positions, full-square attention, policy fwd+bwd + reference fwd) over the best
FLOP/s of a large matmul in the same dtype measured in this process on this device.
Peak memory: device ``memory_stats`` where the backend has them, else the process RSS
peak, plus XLA's compiled buffer sizes (``temp_bytes``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks import common, jax_side

SWEEPS = {
    "remat": [{"remat": "none"}, {"remat": "block"}, {"remat": "dots_saveable"}],
    "reference": [{"reference": "frozen"}, {"reference": "precomputed"}],
    "chunk": [{"logps_chunk_size": 0}, {"logps_chunk_size": 64}],
    "dtype": [{"dtype": "float32"}, {"dtype": "bfloat16"}],
    "scan": [{"scan_layers": False}, {"scan_layers": True}],
    "unembed": [{"unembed_scored_only": False}, {"unembed_scored_only": True}],
    "attention": [{"attention_impl": "xla"}, {"attention_impl": "cudnn"}],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--completion-len", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none", choices=["none", "block", "dots_saveable"])
    p.add_argument("--reference", default="frozen", choices=["frozen", "precomputed"])
    p.add_argument("--logps-chunk-size", type=int, default=0)
    p.add_argument("--attention-impl", default="xla", choices=["xla", "cudnn", "auto"])
    p.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="nn.scan over the blocks (default) or one compiled block per layer",
    )
    p.add_argument(
        "--scored-unembed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="unembed only positions that predict a scored token (default) or all",
    )
    p.add_argument(
        "--peak-size",
        type=int,
        default=0,
        help="n of the n x n matmul peak; 0: 2048 on CPU, 8192 on accelerators",
    )
    p.add_argument("--layout", default="stacked", choices=["stacked", "prefix_shared"])
    p.add_argument("--sweep", default=None, choices=sorted(SWEEPS))
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak (no MFU)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    for name in ("pairs", "prompt_len", "completion_len", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"{__file__}: --{name.replace('_', '-')} must be >= 1")
    return args


def measure(
    shape: common.ModelShape,
    b: common.BatchShape,
    run: jax_side.JaxRunConfig,
    layout: str = "stacked",
    steps: int = 5,
    warmup: int = 1,
    peak_flops: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one configuration and derive tokens/s, FLOP/s and MFU."""
    pairs = common.random_pairs(b, shape.vocab, shape.vocab - 1, seed=seed)
    batch = jax_side.layout_batch(layout, pairs, pad_id=shape.vocab - 1)
    with common.RssSampler() as rss:
        res = jax_side.run_dpo_jax(shape, b, pairs, steps, warmup, run=run, batch=batch)
    res["phase_peak_rss_bytes"] = rss.peak
    flops = common.train_step_flops(shape, b, run.reference)
    res.update(
        layout=layout,
        dtype=run.dtype,
        remat=run.remat,
        scan_layers=run.scan_layers,
        unembed_scored_only=run.unembed_scored_only,
        attention_impl=run.attention_impl,
        reference=run.reference,
        logps_chunk_size=run.logps_chunk_size,
        model_flops_per_step=flops,
        model_flops_all_positions=common.train_step_flops(shape, b, run.reference, True),
        flops_per_s=flops / res["median_step_s"],
        matmul_peak_flops=peak_flops,
        mfu=(flops / res["median_step_s"] / peak_flops) if peak_flops else None,
        load_avg_1m=round(common.load_average(), 2),
    )
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or a sweep), print a table, return the result dict."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    shape = common.MODEL_SHAPES[args.shape]
    b = common.BatchShape(args.pairs, args.prompt_len, args.completion_len)
    base = dict(
        dtype=args.dtype,
        remat=args.remat,
        reference=args.reference,
        logps_chunk_size=args.logps_chunk_size,
        attention_impl=args.attention_impl,
        scan_layers=args.scan_layers,
        unembed_scored_only=args.scored_unembed,
    )
    variants = SWEEPS[args.sweep] if args.sweep else [{}]
    peaks: dict[str, float | None] = {}
    rows = []
    for v in variants:
        run = jax_side.JaxRunConfig(**{**base, **v})
        if run.dtype not in peaks:
            peaks[run.dtype] = (
                None if args.no_peak else common.jax_matmul_peak(run.dtype, args.peak_size)
            )
        rows.append(measure(shape, b, run, args.layout, args.steps, args.warmup, peaks[run.dtype]))
    result = {
        "benchmark": "train_step",
        "shape": args.shape,
        "matmul_params": common.matmul_params(shape),
        "pairs": b.pairs,
        "prompt_len": b.prompt_len,
        "completion_len": b.completion_len,
        "tokens_per_step": b.tokens,
        "sweep": args.sweep,
        "machine": common.machine_info(),
        "matmul_peak_flops": peaks,
        "results": rows,
    }
    print_report(result)
    common.emit(result, args.json, args.json_out)
    return result


def print_report(result: dict[str, Any]) -> None:
    """The human-readable table."""
    peaks = ", ".join(
        f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in result["matmul_peak_flops"].items() if v
    )
    print(
        f"train_step  shape={result['shape']}  pairs={result['pairs']}  "
        f"prompt={result['prompt_len']}  completion={result['completion_len']}  "
        f"matmul peak: {peaks or 'not measured'}  load={result['machine']['load_avg_1m']}"
    )
    table = []
    for r in result["results"]:
        table.append(
            {
                "layout": r["layout"],
                "dtype": r["dtype"],
                "remat": r["remat"],
                "scan": r["scan_layers"],
                "scored": r["unembed_scored_only"],
                "attn": r["attention_impl"],
                "reference": r["reference"],
                "chunk": r["logps_chunk_size"],
                "step_s": r["median_step_s"],
                "compile_s": r["compile_s"],
                "tokens/s": r["tokens_per_s"],
                "GFLOP/s": r["flops_per_s"] / 1e9,
                "MFU": r["mfu"] if r["mfu"] is not None else float("nan"),
                "xla/model flops": (r["xla_flops"] / r["model_flops_per_step"])
                if r.get("xla_flops")
                else float("nan"),
                "temp": common.fmt_bytes(r.get("temp_bytes")),
                "peak_RSS": common.fmt_bytes(r["phase_peak_rss_bytes"]),
            }
        )
    common.print_table(table, list(table[0]))


if __name__ == "__main__":
    main()
