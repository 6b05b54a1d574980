"""Prefix sharing (arXiv 2410.20305) against the stacked layout, same pairs, same model.

    python -m benchmarks.prefix_sharing --shape gpt2-small --pairs 4 --completion-len 32 \
        --ratios 3,1,0.25 --steps 5 [--json]

For each prompt:completion ratio the same pairs run through the ``stacked`` layout
(2B rows of P + C tokens) and the ``prefix_shared`` layout (B rows of P + 2C + 1 tokens,
an attention mask keeping the completions apart), alternating, in one process. Both are
credited with the same work (``2B(P+C)`` tokens), so the tokens/s ratio is the speed-up.
Step-0 ``logps/chosen`` and ``logps/rejected`` of the two layouts are reported side by
side: prefix sharing must not change the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

from benchmarks import common, jax_side
from benchmarks.train_step import measure


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--completion-len", type=int, default=8)
    p.add_argument(
        "--ratios",
        default="3,1,0.25",
        help="prompt:completion length ratios (3 = HH-like prompt-heavy, 0.25 = neutral)",
    )
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="alternating (stacked, shared) rounds")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none", choices=["none", "block", "dots_saveable"])
    p.add_argument("--reference", default="frozen", choices=["frozen", "precomputed"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    try:
        args.ratio_list = [float(r) for r in args.ratios.split(",") if r]
    except ValueError as e:
        raise SystemExit(
            f"{__file__}: --ratios must be comma-separated numbers, got {args.ratios!r}"
        ) from e
    if not args.ratio_list or min(args.ratio_list) <= 0:
        raise SystemExit(f"{__file__}: --ratios must be positive")
    return args


def compare(
    shape: common.ModelShape,
    b: common.BatchShape,
    run: jax_side.JaxRunConfig,
    steps: int,
    warmup: int,
    rounds: int,
) -> dict[str, Any]:
    """Stacked vs prefix-shared on one batch shape, alternating ``rounds`` times."""
    runs: dict[str, list[dict[str, Any]]] = {"stacked": [], "prefix_shared": []}
    for r in range(rounds):
        order = ["stacked", "prefix_shared"] if r % 2 == 0 else ["prefix_shared", "stacked"]
        for layout in order:
            runs[layout].append(measure(shape, b, run, layout, steps, warmup))
    out: dict[str, Any] = {"prompt_len": b.prompt_len, "completion_len": b.completion_len}
    for layout, rs in runs.items():
        out[layout] = {
            "median_step_s": statistics.median(x["median_step_s"] for x in rs),
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
            "compile_s": statistics.median(x["compile_s"] for x in rs),
            "rows": rs[0]["rows"],
            "row_length": rs[0]["row_length"],
            "temp_bytes": rs[0].get("temp_bytes"),
            "xla_flops": rs[0].get("xla_flops"),
            "step0_logps_chosen": rs[0]["step0_logps_chosen"],
            "step0_logps_rejected": rs[0]["step0_logps_rejected"],
            "load_avg_1m": rs[-1]["load_avg_1m"],
        }
    out["speedup"] = out["prefix_shared"]["tokens_per_s"] / out["stacked"]["tokens_per_s"]
    out["logps_max_abs_diff"] = max(
        abs(out["prefix_shared"][k] - out["stacked"][k])
        for k in ("step0_logps_chosen", "step0_logps_rejected")
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every ratio, print the table, return the result dict."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    shape = common.MODEL_SHAPES[args.shape]
    run = jax_side.JaxRunConfig(dtype=args.dtype, remat=args.remat, reference=args.reference)
    rows = []
    for ratio in args.ratio_list:
        prompt_len = max(1, round(ratio * args.completion_len))
        b = common.BatchShape(args.pairs, prompt_len, args.completion_len)
        if prompt_len + 2 * args.completion_len + 1 > shape.max_positions:
            raise SystemExit(
                f"{__file__}: ratio {ratio} needs more than {shape.max_positions} positions"
            )
        rows.append(
            {"ratio": ratio, **compare(shape, b, run, args.steps, args.warmup, args.rounds)}
        )
    result = {
        "benchmark": "prefix_sharing",
        "shape": args.shape,
        "pairs": args.pairs,
        "dtype": args.dtype,
        "remat": args.remat,
        "reference": args.reference,
        "machine": common.machine_info(),
        "results": rows,
    }
    print_report(result)
    common.emit(result, args.json, args.json_out)
    return result


def print_report(result: dict[str, Any]) -> None:
    """The human-readable table."""
    print(
        f"prefix_sharing  shape={result['shape']}  pairs={result['pairs']}  dtype={result['dtype']}  "
        f"load={result['machine']['load_avg_1m']}"
    )
    table = [
        {
            "P:C": f"{r['prompt_len']}:{r['completion_len']}",
            "stacked rows x L": f"{r['stacked']['rows']}x{r['stacked']['row_length']}",
            "shared rows x L": f"{r['prefix_shared']['rows']}x{r['prefix_shared']['row_length']}",
            "stacked tok/s": r["stacked"]["tokens_per_s"],
            "shared tok/s": r["prefix_shared"]["tokens_per_s"],
            "speed-up": r["speedup"],
            "|dlogps|": r["logps_max_abs_diff"],
        }
        for r in result["results"]
    ]
    common.print_table(table, list(table[0]))


if __name__ == "__main__":
    main()
