"""Compare two metric logs step by step: a TRL run's and a dpo_jax run's.

    python -m benchmarks.compare_curves trl_log.jsonl runs/dpo/metrics.jsonl \
        --keys loss rewards/margins --rtol 1e-4

Each file is JSONL with a `step` field per row: dpo_jax's `metrics.jsonl`, or TRL's
`trainer.state.log_history` written one dict per line (docs/FROM_TRL.md shows how).
Prints one line per step and key, and exits 1 when any relative difference exceeds
`--rtol` (rows present in only one file are reported, not compared).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_rows(path: str) -> dict[int, dict]:
    """Training rows (those with a `loss`) by step; later rows of a step win."""
    rows: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "loss" in row and "step" in row:
                rows[int(row["step"])] = row
    return rows


def compare(a: dict[int, dict], b: dict[int, dict], keys: list[str]) -> tuple[float, list[str]]:
    """(largest relative difference over shared steps and keys, printable lines)."""
    worst, lines = 0.0, []
    for step in sorted(set(a) & set(b)):
        for key in keys:
            if key not in a[step] or key not in b[step]:
                continue
            x, y = float(a[step][key]), float(b[step][key])
            rel = abs(x - y) / max(abs(x), abs(y), 1e-12)
            worst = max(worst, rel)
            lines.append(f"step {step:5d} {key:20s} {x:+.6e} {y:+.6e} rel {rel:.2e}")
    only = sorted(set(a) ^ set(b))
    if only:
        lines.append(f"steps in one file only: {only[:10]}{' ...' if len(only) > 10 else ''}")
    return worst, lines


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 when every shared value agrees within `--rtol`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--keys", nargs="+", default=["loss"])
    parser.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    worst, lines = compare(read_rows(args.first), read_rows(args.second), args.keys)
    print("\n".join(lines))
    print(f"largest relative difference {worst:.2e} (rtol {args.rtol:g})")
    return 0 if worst <= args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
