"""Reference log-probs computed once, so training runs no reference forward.

`dpo-jax ref-logps --model DIR --data FILE --output OUT [--batch-size N] [--max-length L]`
reads preference rows (JSONL, any format the data package parses into one pair per
row), tokenizes them with TRL's convention (`dpo_jax.data`), scores chosen and rejected
completions under the checkpoint, and writes the rows back in input order with
`ref_chosen_logps` / `ref_rejected_logps` added. The data package reads those columns
into the batches' `ref_logps`, and `train` then uses reference mode "precomputed".

`train` with `reference.mode="cache"` does the same pass over the tokenized training
set itself and caches the result in the run directory (`ref_logps_<fingerprint>.npz`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dpo_jax import data, logprobs, models
from dpo_jax.data.formats import REF_CHOSEN_COLUMN, REF_REJECTED_COLUMN

SequenceFn = Callable[[dict[str, np.ndarray], int], np.ndarray]


def make_logps_fn(model_config: models.ModelConfig, params: Any) -> SequenceFn:
    """`fn(host_batch, num_sequences) -> logps_S` (numpy float32), jitted per shape."""
    model = models.Transformer(model_config)
    keys = ("input_ids", "positions", "segment_ids", "sequence_index", "branch_ids")

    def logps(p: Any, batch: dict[str, jax.Array], n_seq: int) -> jax.Array:
        logits = model.apply(
            {"params": p},
            batch["input_ids"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            branch_ids=batch.get("branch_ids"),
        )
        return logprobs.sequence_logps(logits, batch, n_seq).logps_S

    jitted = jax.jit(logps, static_argnums=(2,))

    def fn(batch: dict[str, np.ndarray], n_seq: int) -> np.ndarray:
        arrays = {k: np.asarray(v) for k, v in batch.items() if k in keys}
        return np.asarray(jax.device_get(jitted(params, arrays, n_seq)), np.float32)

    return fn


def dataset_ref_logps(
    logps_fn: SequenceFn,
    tokenized: data.TokenizedDataset,
    batch_size: int = 8,
    buckets: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen_logps_N, rejected_logps_N) of every pair, in dataset order.

    The last batch is filled with repeats of its final pair (scored and dropped) so
    every batch has the same number of rows and few shapes get compiled; rows are
    scored independently, so neither that nor the length padding changes a number.
    """
    if tokenized.kind != "paired":
        raise ValueError(
            "reference log-probs can be precomputed for paired data only: an unpaired (KTO) "
            "batch's KL completions depend on which examples share the batch"
        )
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    n = len(tokenized)
    chosen = np.empty(n, np.float32)
    rejected = np.empty(n, np.float32)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        real = len(idx)
        idx += [idx[-1]] * (batch_size - real)
        items = [tokenized[i] for i in idx]
        batch = data.build_batch(items, "paired", "stacked", buckets=buckets)
        logps_S = logps_fn(batch, 2 * batch_size)
        chosen[start : start + real] = logps_S[:real]
        rejected[start : start + real] = logps_S[batch_size : batch_size + real]
    return chosen, rejected


def attach_ref_logps(
    tokenized: data.TokenizedDataset, chosen: np.ndarray, rejected: np.ndarray
) -> data.TokenizedDataset:
    """Store the columns where the batcher reads them (`ref_chosen`, `ref_rejected`)."""
    if len(chosen) != len(tokenized) or len(rejected) != len(tokenized):
        raise ValueError(
            f"{len(chosen)}/{len(rejected)} reference log-probs for {len(tokenized)} pairs"
        )
    tokenized.dense["ref_chosen"] = np.asarray(chosen, np.float32)
    tokenized.dense["ref_rejected"] = np.asarray(rejected, np.float32)
    return tokenized


def _dataset_fingerprint(tokenized: data.TokenizedDataset, params: Any) -> str:
    h = hashlib.sha256()
    for key in sorted(tokenized.ragged):
        r = tokenized.ragged[key]
        for arr in (getattr(r, "values", None), getattr(r, "lengths", None)):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
    for leaf in jax.tree.leaves(params)[:4]:  # enough to tell checkpoints apart cheaply
        h.update(np.asarray(jax.device_get(leaf)).ravel()[:64].tobytes())
    return h.hexdigest()[:16]


def cached_ref_logps(
    run_dir: str | os.PathLike,
    model_config: models.ModelConfig,
    ref_params: Any,
    tokenized: data.TokenizedDataset,
    batch_size: int,
) -> data.TokenizedDataset:
    """First-pass reference log-probs for the training set, cached in the run dir."""
    path = Path(run_dir) / f"ref_logps_{_dataset_fingerprint(tokenized, ref_params)}.npz"
    if path.exists():
        cached = np.load(path)
        return attach_ref_logps(tokenized, cached["chosen"], cached["rejected"])
    fn = make_logps_fn(model_config, ref_params)
    chosen, rejected = dataset_ref_logps(fn, tokenized, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, chosen=chosen, rejected=rejected)
    return attach_ref_logps(tokenized, chosen, rejected)


# ------------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `dpo-jax ref-logps`."""
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--data", required=True, help="JSONL preference rows")
    parser.add_argument("--output", required=True, help="JSONL written with the two ref columns")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    parser.add_argument("--max-length", type=int, default=None, help="truncate prompt+completion")
    parser.add_argument("--max-prompt-length", type=int, default=None)
    parser.add_argument(
        "--format",
        default="explicit",
        help="row format (default explicit: prompt/chosen/rejected; auto detects)",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    parser.add_argument("--dtype", default="float32", help="compute dtype")


def _read_rows(path: str, fmt: str, tokenizer: Any) -> tuple[list[data.Row], list[Any]]:
    """Rows and their one example each; any bad row raises `DataError` (file:line)."""
    from dpo_jax.data.formats import parse_row

    if not Path(path).is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    rejects = data.RejectLog(skip_bad_rows=False)
    rows, examples = [], []
    for row in data.read_sources([path], rejects):
        parsed = parse_row(row, fmt, tokenizer)
        if len(parsed) != 1 or not isinstance(parsed[0], data.PreferenceExample):
            raise data.DataError(
                f"expected one preference pair per row, got {len(parsed)} example(s)",
                source=row.source,
                line=row.line,
                reason="not_one_pair",
            )
        rows.append(row)
        examples.append(parsed[0])
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows, examples


def run(args: argparse.Namespace) -> int:
    """Entry point of `dpo-jax ref-logps`."""
    from transformers import AutoTokenizer

    from dpo_jax.models import hf

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not list(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{model_dir}: no *.safetensors weights (save with safe_serialization)"
        )
    model_config, params = hf.load_hf(model_dir, dtype=args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer or model_dir))
    rows, examples = _read_rows(args.data, args.format, tokenizer)
    settings = data.TokenizeSettings(
        max_length=args.max_length, max_prompt_length=args.max_prompt_length
    )
    tokenized = data.tokenize_examples(examples, tokenizer, settings, data.RejectLog(False))
    if len(tokenized) != len(rows):
        raise ValueError(f"{len(rows) - len(tokenized)} rows were dropped during tokenization")
    chosen, rejected = dataset_ref_logps(
        make_logps_fn(model_config, params), tokenized, args.batch_size
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row, c, r in zip(rows, chosen, rejected, strict=True):
            if not (math.isfinite(c) and math.isfinite(r)):
                raise FloatingPointError(f"{row.source}:{row.line}: non-finite log-prob ({c}, {r})")
            record = dict(row.data)
            record[REF_CHOSEN_COLUMN] = float(c)
            record[REF_REJECTED_COLUMN] = float(r)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows with reference log-probs to {out}")
    return 0
