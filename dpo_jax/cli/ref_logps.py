"""`dpo-jax ref-logps`: reference log-prob columns for preference rows.

The flags build the training config (`--config` and `--config.KEY=V`, short flags on
top); `dpo_jax.reference.write_ref_logps` does the work.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dpo_jax import configs

DEFAULT_CONFIG = str(Path(__file__).parent.parent / "configs" / "default.py")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `dpo-jax ref-logps`: the train config (`--config` and `--config.KEY=V`)
    decides data, format, tokenizer and truncation; the short flags override it."""
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="the training config (default: dpo_jax/configs/default.py); --config.KEY=VALUE overrides",
    )
    parser.add_argument("--output", required=True, help="JSONL written with the two ref columns")
    parser.add_argument(
        "--model", default=None, help="checkpoint (default: reference.path, else model.path)"
    )
    parser.add_argument("--data", default=None, help="preference rows (default: data.train)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    parser.add_argument("--max-length", type=int, default=None, help="sets data.max_length")
    parser.add_argument("--max-prompt-length", type=int, default=None)
    parser.add_argument("--truncation-mode", default=None, help="sets data.truncation_mode")
    parser.add_argument("--format", default=None, help="sets data.format (default auto)")
    parser.add_argument("--tokenizer", default=None, help="sets tokenizer (default: model.path)")
    parser.add_argument(
        "--dtype",
        default=None,
        help="compute dtype (default: the config's model.dtype, as train computes it; recorded "
        "in each row's fingerprint)",
    )
    configs.accept_overrides(parser)


def config_from_args(args: argparse.Namespace) -> Any:
    """The train config `args` describe, with the short flags applied on top."""
    config = configs.load(args.config, getattr(args, "config_overrides", []))
    flags = {
        "data.train": args.data, "data.max_length": args.max_length,
        "data.max_prompt_length": args.max_prompt_length,
        "data.truncation_mode": args.truncation_mode, "data.format": args.format,
        "tokenizer": args.tokenizer,
    }  # fmt: skip
    for key, value in flags.items():
        if value is not None:
            node = config
            *parents, leaf = key.split(".")
            for name in parents:
                node = node[name]
            node[leaf] = value
    if args.model:
        config.reference.path = args.model
    return config


def run(args: argparse.Namespace) -> int:
    """Entry point of `dpo-jax ref-logps`."""
    from dpo_jax import paths, reference  # lazy: jax; `dpo-jax ref-logps --help` stays light
    from dpo_jax.configs import validate

    config = config_from_args(args)
    validate.resolve_hub_names(config)  # model.path / reference.path / tokenizer=org/name
    written, read = reference.write_ref_logps(
        config, args.output, batch_size=args.batch_size, dtype=args.dtype or config.model.dtype
    )
    out = paths.Path(args.output)
    skipped = f" ({read - written} bad rows left out)" if written < read else ""
    print(f"wrote {written} rows with reference log-probs to {out}{skipped}")
    return 0
