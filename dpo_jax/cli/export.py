"""`dpo-jax export`: a checkpoint as a Hugging Face directory, or a LoRA run's as a PEFT
adapter (`dpo_jax.export`)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `dpo-jax export`."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="run directory, its checkpoints/ directory, or one step directory",
    )
    parser.add_argument("--output", required=True, help="Hugging Face directory to write")
    parser.add_argument("--step", type=int, default=None, help="step to export (default: latest)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--merge",
        action="store_true",
        help="LoRA run: merge the adapters into the base model (the default for LoRA runs)",
    )
    kind.add_argument(
        "--adapter", action="store_true", help="LoRA run: write a PEFT adapter directory instead"
    )
    parser.add_argument(
        "--pad-token-id",
        type=int,
        default=None,
        help="reward model: the classifier's pad id (default: the tokenizer's; not the EOS)",
    )
    parser.add_argument(
        "--base", default=None, help="LoRA run: base model dir (default: its model.path)"
    )


def run(args: argparse.Namespace) -> int:
    """`dpo-jax export`: checkpoint -> Hugging Face directory (or PEFT adapter)."""
    from dpo_jax import checkpoint, export, lora  # lazy: jax, flax, orbax; not for --help

    if args.adapter or args.merge:  # only a LoRA run takes these; anything else: UserError
        _, meta, _ = checkpoint.load_params(args.checkpoint, args.step)
        lora.require_lora(meta, args.checkpoint)
    if args.adapter:
        out = export.export_adapter(args.checkpoint, args.output, step=args.step, base=args.base)
    else:
        out = export.export_hf(
            args.checkpoint, args.output, step=args.step, base=args.base,
            pad_token_id=args.pad_token_id,
        )  # fmt: skip
    print(f"exported {args.checkpoint} to {out}")
    return 0
