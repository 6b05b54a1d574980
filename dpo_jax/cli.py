"""The `dpo-jax` command: one subcommand per capability, each owned by its module."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help). Modules are imported lazily so `dpo-jax --help` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dpo_jax.train", "train a policy with a preference loss"),
    "ref-logps": ("dpo_jax.reference", "precompute reference log-probs for preference rows"),
    "export": ("dpo_jax.checkpoint", "export a checkpoint as a Hugging Face directory"),
    "sample": ("dpo_jax.sampling", "sample completions for prompts"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Parser with every subcommand; only the chosen one's module is imported."""
    parser = argparse.ArgumentParser(prog="dpo-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return int(args.run(args) or 0)


def console_main(argv: list[str] | None = None) -> int:
    """The console script: a user's mistake (bad path, bad row, bad config) prints one line
    naming it and exits 2, instead of a traceback; `main` itself raises, for tests and callers."""
    try:
        return main(argv)
    except (FileNotFoundError, ValueError) as error:  # DataError is a ValueError
        print(f"dpo-jax: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console_main())
