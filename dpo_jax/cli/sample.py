"""`dpo-jax sample`: completions for a file of prompts, one JSONL line per sample.

The model is a Hugging Face directory or a training run / checkpoint
(`dpo_jax.saved_models.load_model`); generation is `dpo_jax.sampling.generate_text`.
Prompts are plain text lines, or JSONL rows whose `prompt` is a string or a message
list (rendered with the tokenizer's chat template and its generation prompt, as
`train` and the on-policy prompt pool render them).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dpo_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dpo-jax sample``."""
    parser.add_argument(
        "--model", required=True, help="Hugging Face model directory or a training run/checkpoint"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--prompts",
        required=True,
        help="text file (one prompt a line) or JSONL with a 'prompt' field (text or messages)",
    )
    parser.add_argument("--output", required=True, help="JSONL to write, one line per sample")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-length", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")


def run(args: argparse.Namespace) -> int:
    """``dpo-jax sample``: write one JSONL line per (prompt, sample)."""
    import jax  # lazy: jax and flax; `dpo-jax sample --help` stays light

    from dpo_jax import models, paths, sampling, saved_models  # lazy: flax and jax, not for --help

    cfg, params, tokenizer = saved_models.load_model(
        args.model, args.tokenizer, args.dtype, args.step
    )
    prompts = read_prompts(args.prompts, tokenizer)
    config = sampling.SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        n=args.n,
        eos_token_ids=sampling.eos_ids(tokenizer),
        pad_token_id=sampling.pad_id(tokenizer),
        max_prompt_length=args.max_prompt_length,
    )
    key = jax.random.key(args.seed)
    model = models.Transformer(cfg)
    with paths.Path(args.output).open("w", encoding="utf-8") as f:
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            # A short last chunk is filled with copies so every call has one shape
            # (one compile); the filler rows are dropped.
            filled = chunk + [chunk[0]] * (min(args.batch_size, len(prompts)) - len(chunk))
            out = sampling.generate_text(
                model, params, tokenizer, filled, jax.random.fold_in(key, start), config
            )
            for row in range(len(chunk) * config.n):
                p = int(out.prompt_index[row])
                n = int(out.lengths[row])
                record = {
                    "prompt_index": start + p,
                    "sample_index": row % config.n,
                    "prompt": chunk[p],
                    "completion": out.texts[row],
                    "num_tokens": n,
                    "finished": bool(out.finished[row]),
                    "logp": float(out.logps[row, :n].sum()),
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(prompts) * config.n} samples for {len(prompts)} prompts to {args.output}")
    return 0


def read_prompts(path: str, tokenizer: Any = None) -> list[str]:
    """Prompts from a plain text file (one a line) or a JSONL file with a ``prompt``
    field per line: a string, or a message list rendered by ``tokenizer``'s chat template
    with its generation prompt (`data.formats.parse_prompt`, as the prompt pool does)."""
    from dpo_jax import paths  # lazy: etils; `dpo-jax sample --help` stays light
    from dpo_jax.data import formats  # lazy: the data stack, not for --help
    from dpo_jax.data.errors import DataError

    prompts: list[str] = []
    with paths.Path(path).open("r", encoding="utf-8") as f:
        lines = f.read().splitlines()
    as_jsonl = path.endswith((".jsonl", ".json")) or (lines and lines[0].lstrip().startswith("{"))
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not as_jsonl:
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        value = row.get("prompt") if isinstance(row, dict) else None
        if isinstance(value, list):
            try:
                prompts.append(formats.parse_prompt(row, tokenizer)[0].prompt)
            except DataError as e:
                raise e.located(path, lineno) from None
            continue
        if not isinstance(value, str):
            raise UserError(
                f"{path}:{lineno}: expected an object with a string or message-list 'prompt' field"
            )
        prompts.append(value)
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts
