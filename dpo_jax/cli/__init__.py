"""The `dpo-jax` command: one subcommand per capability, each owned by its module."""

# One module per subcommand in this package, each with `add_arguments(parser)` and
# `run(args)`. They import only the standard library and light dpo_jax modules at the
# top, so `dpo-jax --help` and `dpo-jax SUB --help` import no jax; `run` imports the
# library module that does the work.

from __future__ import annotations

import argparse
import importlib
import sys

from dpo_jax.errors import UserError

# subcommand -> (module, help). Modules are imported lazily so `dpo-jax --help` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "dpo_jax.cli.train",
        "train a policy: a preference loss, SFT, a reward model, or on-policy (PPO, GRPO, ...)",
    ),
    "ref-logps": ("dpo_jax.cli.ref_logps", "precompute reference log-probs for preference rows"),
    "export": ("dpo_jax.cli.export", "export a checkpoint as a Hugging Face directory"),
    "sample": ("dpo_jax.cli.sample", "sample completions for prompts"),
    "evaluate": (
        "dpo_jax.cli.evaluate",
        "held-out preference accuracy of a policy; reward and win rate of its samples",
    ),
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


# OS errors that always concern a path the user gave (a missing model directory, a
# data "file" that is a directory, a run_dir without write permission).
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined with '; ')."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def console_main(argv: list[str] | None = None) -> int:
    """The console script: a user's mistake prints `dpo-jax: error: <one line>`, exit 2.

    Mistakes are `errors.UserError` (bad config key or value, bad data row or file,
    refused resume, NaN under nan_policy='stop') and OS errors about a path the user gave
    (`PATH_ERRORS`). Anything else is a bug and keeps its traceback; `main` itself
    raises, for tests and callers.
    """
    try:
        return main(argv)
    except (UserError, *PATH_ERRORS) as error:
        print(f"dpo-jax: error: {one_line(error)}", file=sys.stderr)
        return 2
