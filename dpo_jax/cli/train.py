"""`dpo-jax train [--config FILE.py|NAME[:ARG]] [--config.KEY=VALUE ...] [--dry_run]`: `dpo_jax.train.train`."""

from __future__ import annotations

import argparse
import json
import logging
import time

from dpo_jax import configs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`dpo-jax train --config FILE.py[:ARG] [--config.key=value ...]`."""
    parser.add_argument(
        "--config",
        default="default",
        help="config file (path/to/file.py[:ARG]) or a name in dpo_jax/configs (default, tiny, "
        "dpo_paper; NAME:ARG, e.g. default:ipo); default: default. Override fields with "
        "--config.KEY=VALUE",
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="print the start-up summary and compile the first step, without training or "
        "writing anything (its per-device memory from the compiled program)",
    )
    configs.accept_overrides(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of `dpo-jax train`."""
    # lazy: jax, flax and orbax; `dpo-jax train --help` stays light
    from dpo_jax import startup, train

    # force: importing orbax logs through absl, which already called basicConfig() with
    # the WARNING default, and INFO lines ("resumed from step N") would be lost.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    config = configs.load(args.config, getattr(args, "config_overrides", []))
    t0 = time.perf_counter()
    if getattr(args, "dry_run", False):  # train() logs the summary, memory included
        result = train.train(config, dry_run=True)
        memory = startup.memory_report(result.lowered.compile())  # cached: compiled already
        print(json.dumps({"dry_run": True, "memory": memory, "run_dir": config.run_dir}))
        return 0
    result = train.train(config)
    last = result.history[-1] if result.history else {}
    print(
        json.dumps(
            {
                "steps": last.get("step"),
                "loss": last.get("loss"),
                "rewards/accuracies": last.get("rewards/accuracies"),
                **{k: last[k] for k in ("objective/scores", "objective/kl") if k in last},  # PPO
                "seconds": round(time.perf_counter() - t0, 2),
                "run_dir": str(result.run_dir),
            }
        )
    )
    return 0
