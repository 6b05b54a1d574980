"""Reference log-probs computed once, so training runs no reference forward.

`dpo-jax ref-logps --config CONFIG [--config.KEY=V ...] --output OUT [--batch-size N]`
(`dpo_jax.cli.ref_logps`; from Python, `write_ref_logps(config, output)`) takes the
training config (data, format, tokenizer, max lengths, truncation mode; the
reference checkpoint is `reference.path`, else `model.path`; short flags `--model`,
`--data`, `--max-length`, ... override it), reads preference rows (any format the
data package parses into one pair per row, auto-detected as `train` does), tokenizes
them exactly as `train` would, scores chosen and rejected completions under the
checkpoint, and writes the rows back in input order with `ref_chosen_logps` /
`ref_rejected_logps` and a `ref_logps_fingerprint` (see `dpo_jax.ref_fingerprint`)
added; training refuses a column whose fingerprint disagrees with its own settings. The data package reads those columns
into the batches' `ref_logps`, and `train` then uses reference mode "precomputed".

`train` with `reference.mode="cache"` does the same pass over the tokenized training
set itself and caches the result in the run directory (`ref_logps_<fingerprint>.npz`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from dpo_jax import data, models, paths, ref_fingerprint, scoring
from dpo_jax.data.formats import REF_CHOSEN_COLUMN, REF_REJECTED_COLUMN, detect_format, parse_row
from dpo_jax.errors import UserError
from dpo_jax.models import hf
from dpo_jax.paths import Path  # local or gs:// (etils.epath)

SequenceFn = Callable[[dict[str, np.ndarray], int], np.ndarray]


def make_logps_fn(model_config: models.ModelConfig, params: Any) -> SequenceFn:
    """`fn(host_batch, num_sequences) -> logps_S` (numpy float32), jitted per shape.

    Scores through `scoring.host_scorer`: the train step's own scoring pass (scored
    unembedding), so a precomputed column holds the numbers the step would compute.
    """
    scorer = scoring.host_scorer(models.Transformer(model_config).apply)

    def fn(batch: dict[str, np.ndarray], n_seq: int) -> np.ndarray:
        return np.asarray(jax.device_get(scorer(params, batch, n_seq).logps_S), np.float32)

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
        raise UserError(
            "reference log-probs can be precomputed for paired data only: an unpaired (KTO) "
            "batch's KL completions depend on which examples share the batch"
        )
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
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
        cached = paths.read_npz(path)
        return attach_ref_logps(tokenized, cached["chosen"], cached["rejected"])
    fn = make_logps_fn(model_config, ref_params)
    chosen, rejected = dataset_ref_logps(fn, tokenized, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_npz(path, {"chosen": chosen, "rejected": rejected})
    return attach_ref_logps(tokenized, chosen, rejected)


# ------------------------------------------------------- the ref-logps column in a file


def _read_rows(
    sources: list[Any], fmt: str, tokenizer: Any
) -> tuple[list[data.Row], list[Any], list[str]]:
    """Rows, their one example each and the format each was parsed as (auto: detected
    per source, as training's parser does); any bad row raises `DataError` (file:line)."""
    for src in sources:
        if isinstance(src, str) and not any(ch in src for ch in "*?[") and not Path(src).exists():
            raise FileNotFoundError(f"data file {src} does not exist")
    rejects = data.RejectLog(skip_bad_rows=False)
    rows, examples, formats = [], [], []
    detected: dict[str, str] = {}
    for row in data.read_sources(sources, rejects):
        name = fmt
        if fmt == "auto":
            if row.source not in detected:
                try:
                    detected[row.source] = detect_format(row.data)
                except data.DataError as e:
                    raise e.located(row.source, row.line) from None
            name = detected[row.source]
        parsed = parse_row(row, name, tokenizer)
        if len(parsed) != 1 or not isinstance(parsed[0], data.PreferenceExample):
            raise data.DataError(
                f"expected one preference pair per row, got {len(parsed)} example(s)",
                source=row.source,
                line=row.line,
                reason="not_one_pair",
            )
        rows.append(row)
        examples.append(parsed[0])
        formats.append(name)
    if not rows:
        raise UserError(f"{sources}: no rows")
    return rows, examples, formats


def write_ref_logps(
    config: Any, output: str | os.PathLike, batch_size: int = 8, dtype: str = "float32"
) -> tuple[int, int]:
    """Write `config.data.train`'s preference rows to `output` (JSONL, input order) with
    the reference log-prob columns and their fingerprint added (`dpo-jax ref-logps`).

    The rows are tokenized as `train` would with `config`; the checkpoint is
    `config.reference.path`, else `config.model.path`. Returns ``(written, read)``: rows
    that the tokenizer's bad-row policy (`data.skip_bad_rows`) left out are not written.
    """
    from transformers import AutoTokenizer  # lazy: transformers is slow to import

    model_dir = Path(config.reference.path or config.model.path)
    if not str(model_dir) or not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not list(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{model_dir}: no *.safetensors weights (save with safe_serialization)"
        )
    if not config.data.train:
        raise UserError("no data: pass --data or --config.data.train")
    model_config, params = hf.load_hf(model_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(
        str(config.tokenizer or config.model.path or model_dir)
    )
    spec = data.spec_from_config(config, config.data.train, paired=True)
    sources = [spec["path"]] if isinstance(spec["path"], str | dict) else list(spec["path"])
    rows, examples, formats = _read_rows(sources, spec["format"], tokenizer)
    rejects = data.RejectLog(skip_bad_rows=bool(spec["skip_bad_rows"]))
    tokenized = data.tokenize_examples(
        examples, tokenizer, data.tokenize.settings_from_spec(spec), rejects
    )
    dropped = {(r["source"], r["line"]) for r in rejects.rejects}
    kept = [i for i, row in enumerate(rows) if (row.source, row.line) not in dropped]
    if len(kept) != len(tokenized):
        raise UserError(f"{len(rows) - len(tokenized)} rows were dropped during tokenization")
    chosen, rejected = dataset_ref_logps(make_logps_fn(model_config, params), tokenized, batch_size)
    base = ref_fingerprint.base_fingerprint(spec, tokenizer, model_dir, str(dtype))
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for i, c, r in zip(kept, chosen, rejected, strict=True):
            row = rows[i]
            if not (math.isfinite(c) and math.isfinite(r)):
                raise FloatingPointError(f"{row.source}:{row.line}: non-finite log-prob ({c}, {r})")
            record = dict(row.data)
            record[REF_CHOSEN_COLUMN] = float(c)
            record[REF_REJECTED_COLUMN] = float(r)
            record[ref_fingerprint.FINGERPRINT_COLUMN] = ref_fingerprint.with_format(
                base, formats[i]
            )
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(kept), len(rows)
