"""Bucketed padding, pad-to-max and packing on a realistic length distribution.

    python -m benchmarks.padding --shape gpt2-small --pairs 4 --max-length 512 \
        --batches 8 [--json]

Lengths follow an HH-RLHF-like shape: log-normal prompts (median ``--prompt-median``)
and completions (median ``--completion-median``), each pair's chosen and rejected drawn
independently, clipped so prompt + completion fits ``--max-length``. The same ``--batches``
micro-batches of ``--pairs`` pairs then run through the dpo_jax Trainer as

* ``pad_to_max``: stacked rows, every batch padded to ``--max-length`` (one compile);
* ``bucketed``: stacked rows padded to the next power of two (a few compiles);
* ``packed``: sequences packed first-fit into rows of the bucketed longest sequence,
  row count rounded to a power of two;
* ``prefix_shared``: one row per pair, bucketed.

A first pass compiles every shape (reported as ``compile_s``); the timed pass runs every
batch once more. tokens/s counts real tokens only (``sum(P + C)`` over sequences), so
padding and packing show up directly; ``fill`` is real tokens / computed row slots.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np

from benchmarks import common, jax_side

STRATEGIES = ("pad_to_max", "bucketed", "packed", "prefix_shared")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--prompt-median", type=float, default=0.0, help="0 = max_length / 4")
    p.add_argument("--completion-median", type=float, default=0.0, help="0 = max_length / 8")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.strategy_list = [s for s in args.strategies.split(",") if s]
    for s in args.strategy_list:
        if s not in STRATEGIES:
            raise SystemExit(f"{__file__}: unknown strategy {s!r}; choose from {STRATEGIES}")
    if args.max_length < 4 or args.batches < 1 or args.pairs < 1:
        raise SystemExit(f"{__file__}: need --max-length >= 4, --batches >= 1, --pairs >= 1")
    return args


def sample_items(
    n_pairs: int,
    vocab: int,
    max_length: int,
    prompt_median: float,
    completion_median: float,
    seed: int,
) -> list[dict[str, np.ndarray]]:
    """Random-token pairs with log-normal lengths (sigma 0.6), clipped to ``max_length``."""
    rng = np.random.default_rng(seed)

    def lengths(median: float, size: int) -> np.ndarray:
        return np.maximum(1, np.round(rng.lognormal(np.log(median), 0.6, size))).astype(int)

    prompts = np.minimum(lengths(prompt_median, n_pairs), max_length // 2)
    items = []
    for p in prompts:
        room = max_length - p
        c, r = np.minimum(lengths(completion_median, 2), room)
        items.append(
            {
                "prompt": rng.integers(0, vocab - 1, p, dtype=np.int32),
                "chosen": rng.integers(0, vocab - 1, c, dtype=np.int32),
                "rejected": rng.integers(0, vocab - 1, r, dtype=np.int32),
            }
        )
    return items


def build(strategy: str, items: list[dict[str, np.ndarray]], max_length: int, pad_id: int) -> dict:
    """One micro-batch of ``items`` under ``strategy``."""
    from dpo_jax.data import batching

    if strategy == "pad_to_max":
        return batching.build_batch(items, "paired", "stacked", length=max_length, pad_id=pad_id)
    if strategy == "bucketed":
        return batching.build_batch(items, "paired", "stacked", pad_id=pad_id)
    if strategy == "prefix_shared":
        return batching.build_batch(items, "paired", "prefix_shared", pad_id=pad_id)
    # packed: rows as long as the (bucketed) longest sequence, row count a power of two
    # so that batches share a few compiled shapes.
    batch = batching.build_batch(items, "paired", "packed", pad_id=pad_id)
    rows = batching.row_bucket(batch["input_ids"].shape[0], 2 * len(items))
    return batching.pad_batch(batch, batch["input_ids"].shape[1], rows, pad_id)


def real_tokens(items: list[dict[str, np.ndarray]]) -> int:
    """Tokens of the stacked work: every sequence's prompt + completion."""
    return sum(2 * len(it["prompt"]) + len(it["chosen"]) + len(it["rejected"]) for it in items)


def run_strategy(
    strategy: str,
    batches_items: list[list[dict[str, np.ndarray]]],
    trainer: Any,
    state: Any,
    max_length: int,
    pad_id: int,
) -> tuple[dict[str, Any], Any]:
    """Compile pass then timed pass over every batch; returns figures and the new state."""
    import jax

    host = [
        jax_side.add_micro_axis(build(strategy, it, max_length, pad_id)) for it in batches_items
    ]
    n_seq = 2 * len(batches_items[0])
    shapes = {b["input_ids"].shape for b in host}
    t0 = time.perf_counter()
    for b in host:
        state, _ = trainer.step(state, b, n_seq)
    jax.block_until_ready(state)
    first_pass = time.perf_counter() - t0
    times = []
    for b in host:
        t0 = time.perf_counter()
        state, _ = trainer.step(state, b, n_seq)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    tokens = sum(real_tokens(it) for it in batches_items)
    slots = sum(int(np.prod(b["input_ids"].shape)) for b in host)
    total = sum(times)
    return {
        "strategy": strategy,
        "distinct_shapes": len(shapes),
        "shapes": sorted(tuple(int(x) for x in s[1:]) for s in shapes),
        "compile_s": max(first_pass - total, 0.0),
        "timed_s": total,
        "median_batch_s": statistics.median(times),
        "real_tokens": tokens,
        "row_slots": slots,
        "fill": tokens / slots,
        "tokens_per_s": tokens / total,
        "load_avg_1m": round(common.load_average(), 2),
    }, state


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every strategy on the same batches, print the table, return the result dict."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    shape = common.MODEL_SHAPES[args.shape]
    if args.max_length > shape.max_positions:
        raise SystemExit(f"{__file__}: --max-length exceeds {shape.max_positions} positions")
    pm = args.prompt_median or args.max_length / 4
    cm = args.completion_median or args.max_length / 8
    items = sample_items(args.pairs * args.batches, shape.vocab, args.max_length, pm, cm, args.seed)
    batches_items = [items[i : i + args.pairs] for i in range(0, len(items), args.pairs)]
    run = jax_side.JaxRunConfig(dtype=args.dtype)
    cfg, params = jax_side.load_or_init(shape, run, None)
    trainer, state = jax_side.build_trainer(cfg, params, run, 10**6)
    del params
    rows = []
    for strategy in args.strategy_list:
        row, state = run_strategy(
            strategy, batches_items, trainer, state, args.max_length, shape.vocab - 1
        )
        rows.append(row)
    base = next((r for r in rows if r["strategy"] == "pad_to_max"), rows[0])
    for r in rows:
        r["speedup_vs_" + base["strategy"]] = r["tokens_per_s"] / base["tokens_per_s"]
    result = {
        "benchmark": "padding",
        "shape": args.shape,
        "pairs": args.pairs,
        "batches": args.batches,
        "max_length": args.max_length,
        "prompt_median": pm,
        "completion_median": cm,
        "mean_prompt_len": float(np.mean([len(it["prompt"]) for it in items])),
        "mean_completion_len": float(
            np.mean([len(it[k]) for it in items for k in ("chosen", "rejected")])
        ),
        "machine": common.machine_info(),
        "results": rows,
    }
    print_report(result, base["strategy"])
    common.emit(result, args.json, args.json_out)
    return result


def print_report(result: dict[str, Any], base: str) -> None:
    """The human-readable table."""
    print(
        f"padding  shape={result['shape']}  pairs={result['pairs']}  batches={result['batches']}  "
        f"max_length={result['max_length']}  mean P={result['mean_prompt_len']:.0f}  "
        f"mean C={result['mean_completion_len']:.0f}  load={result['machine']['load_avg_1m']}"
    )
    table = [
        {
            "strategy": r["strategy"],
            "shapes": r["distinct_shapes"],
            "fill": r["fill"],
            "compile_s": r["compile_s"],
            "tokens/s": r["tokens_per_s"],
            f"vs {base}": r["speedup_vs_" + base],
        }
        for r in result["results"]
    ]
    common.print_table(table, list(table[0]))


if __name__ == "__main__":
    main()
