"""Vocabulary-chunked log-probs against full logits: peak memory, time, identical numbers.

    python -m benchmarks.logprobs_memory --vocab 128256 --pairs 2 --prompt-len 96 \
        --completion-len 32 --chunks 0,128 --steps 3 [--json]

A GPT-2-style body (``--shape``, default ``tiny``) with a large vocabulary, where the
``[N, L, V]`` logits dominate memory. Chunk 0 is the plain path (full logits); chunk
``c`` unembeds ``c`` positions at a time and recomputes them in the backward pass. Each
variant runs in its own process (``--inprocess`` to share one) so its RSS peak is its
own; XLA's compiled scratch size (``temp_bytes``) is exact either way. Step-0 log-probs
of every variant are reported: chunking must not change them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from typing import Any

from benchmarks import common, jax_side
from benchmarks.train_step import measure


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama 3: 128256)")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--completion-len", type=int, default=32)
    p.add_argument("--chunks", default="0,128", help="comma list of chunk sizes; 0 = plain")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--inprocess", action="store_true", help="one process (RSS peaks overlap)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", default=None)
    p.add_argument("--only-chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.chunk_list = [int(c) for c in args.chunks.split(",") if c != ""]
    except ValueError as e:
        raise SystemExit(f"{__file__}: --chunks must be comma-separated integers") from e
    if not args.chunk_list or min(args.chunk_list) < 0:
        raise SystemExit(f"{__file__}: --chunks must be integers >= 0")
    if args.vocab < 2:
        raise SystemExit(f"{__file__}: --vocab must be >= 2")
    return args


def one_variant(args: argparse.Namespace, chunk: int) -> dict[str, Any]:
    """Measure one chunk size in this process."""
    base = common.MODEL_SHAPES[args.shape]
    shape = dataclasses.replace(base, name=f"{base.name}-v{args.vocab}", vocab=args.vocab)
    b = common.BatchShape(args.pairs, args.prompt_len, args.completion_len)
    # All positions unembedded: the figure is the [N, L, V] logits that chunking avoids.
    run = jax_side.JaxRunConfig(dtype=args.dtype, logps_chunk_size=chunk, unembed_scored_only=False)
    res = measure(shape, b, run, "stacked", args.steps, args.warmup)
    res["logits_bytes_fp32"] = 4 * 2 * b.pairs * b.seq_len * args.vocab
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every chunk size, print the table, return the result dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.only_chunk is not None:
        res = one_variant(args, args.only_chunk)
        common.emit(res, False, args.json_out)
        return res
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in args.chunk_list:
            if args.inprocess:
                rows.append(one_variant(args, chunk))
            else:
                sub = [a for a in argv if a != "--json"] + ["--only-chunk", str(chunk)]
                out = os.path.join(tmp, f"chunk{chunk}.json")
                rows.append(common.spawn_json("benchmarks.logprobs_memory", sub, out))
    plain = next((r for r in rows if r["logps_chunk_size"] == 0), rows[0])
    for r in rows:
        r["temp_ratio_vs_plain"] = (
            r["temp_bytes"] / plain["temp_bytes"]
            if r.get("temp_bytes") and plain.get("temp_bytes")
            else None
        )
        r["logps_max_abs_diff_vs_plain"] = max(
            abs(r[k] - plain[k]) for k in ("step0_logps_chosen", "step0_logps_rejected")
        )
    result = {
        "benchmark": "logprobs_memory",
        "shape": args.shape,
        "vocab": args.vocab,
        "pairs": args.pairs,
        "prompt_len": args.prompt_len,
        "completion_len": args.completion_len,
        "dtype": args.dtype,
        "isolated_processes": not args.inprocess,
        "machine": common.machine_info(),
        "results": rows,
    }
    print_report(result)
    common.emit(result, args.json, args.json_out)
    return result


def print_report(result: dict[str, Any]) -> None:
    """The human-readable table."""
    print(
        f"logprobs_memory  shape={result['shape']}  vocab={result['vocab']}  pairs={result['pairs']}  "
        f"L={result['prompt_len'] + result['completion_len']}  load={result['machine']['load_avg_1m']}"
    )
    table = [
        {
            "chunk": r["logps_chunk_size"] or "plain",
            "step_s": r["median_step_s"],
            "XLA temp": common.fmt_bytes(r.get("temp_bytes")),
            "temp vs plain": r["temp_ratio_vs_plain"] or float("nan"),
            "peak RSS": common.fmt_bytes(r["peak_rss_bytes"]),
            "logits fp32": common.fmt_bytes(r["logits_bytes_fp32"]),
            "|dlogps|": r["logps_max_abs_diff_vs_plain"],
        }
        for r in result["results"]
    ]
    common.print_table(table, list(table[0]))


if __name__ == "__main__":
    main()
