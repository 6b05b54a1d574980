"""Preference data: sources, upstream formats, tokenization, batches and loaders.

The trainer calls `load_preference_data(spec, tokenizer, run_dir)` and then
`make_train_iterator(tokenized, pairs_per_batch, layout, buckets, seed)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpo_jax.data.batching import (
    LAYOUTS,
    bucket_length,
    build_batch,
    build_sequences,
    pad_batch,
    stack_micro_batches,
)
from dpo_jax.data.errors import DataError, RejectLog
from dpo_jax.data.formats import (
    PARSERS,
    PreferenceExample,
    PromptExample,
    SFTExample,
    UnpairedExample,
    detect_format,
    paired_to_unpaired,
    parse_rows,
)
from dpo_jax.data.loader import TrainIterator, eval_batches, make_train_iterator
from dpo_jax.data.sources import Row, read_sources
from dpo_jax.data.spec import complete_spec
from dpo_jax.data.tokenize import (
    TokenizedDataset,
    TokenizeSettings,
    encode_prompts,
    sequence_dataset,
    settings_from_spec,
    tokenize_cached,
    tokenize_examples,
)
from dpo_jax.errors import UserError

__all__ = [
    "LAYOUTS",
    "PARSERS",
    "DataError",
    "PreferenceExample",
    "PromptExample",
    "RejectLog",
    "Row",
    "SFTExample",
    "TokenizeSettings",
    "TokenizedDataset",
    "TrainIterator",
    "UnpairedExample",
    "bucket_length",
    "build_batch",
    "build_sequences",
    "complete_spec",
    "detect_format",
    "eval_batches",
    "load_examples",
    "load_preference_data",
    "load_prompts",
    "make_train_iterator",
    "pad_batch",
    "paired_to_unpaired",
    "parse_rows",
    "read_sources",
    "sequence_dataset",
    "spec_from_config",
    "stack_micro_batches",
    "tokenize_cached",
    "tokenize_examples",
]


def _sources(spec: dict[str, Any], split: str | None) -> list:
    """Where a complete spec reads from: `sources`, else `path`, else `spec[split]`."""
    if spec["sources"]:
        sources = spec["sources"]
    elif spec["path"]:
        sources = spec["path"]
    elif split is not None and spec.get(split):  # a split name, not a setting
        sources = spec[split]  # the trainer's config: data.train / data.eval
    else:
        where = f"'{split}', " if split else ""
        raise ValueError(
            f"data spec needs {where}'sources' or 'path' (paths, globs or source dicts)"
        )
    if isinstance(sources, str | Mapping):
        sources = [sources]
    return list(sources)


def spec_from_config(config: Any, path: Any, paired: bool) -> dict[str, Any]:
    """The data spec (`load_preference_data`'s keys) of a run config's `path` (data.train or
    data.eval): the trainer, `dpo-jax ref-logps` and `ref_fingerprint` read data through it."""
    d = config.data
    sft = config.objective.name == "sft"
    return dict(
        sft=sft,
        path=path,
        format=d.format,
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        truncation_mode=d.truncation_mode,
        skip_bad_rows=d.skip_bad_rows,
        unpaired=not paired and not sft,
        cache_dir=d.cache_dir,
        # string sources `hf:` / `tfds:` (data.sources.parse_spec)
        allow_downloads=config.allow_downloads,
        tfds_data_dir=d.tfds_data_dir,
    )


def load_examples(spec: Any, tokenizer: Any, rejects: RejectLog, split: str | None = None) -> list:
    """Read and parse the sources of `spec` (see `load_preference_data`)."""
    spec = complete_spec(spec)
    sources = _sources(spec, split)
    examples = parse_rows(read_sources(sources, rejects, spec), spec["format"], tokenizer, rejects)
    if not spec["prompts"]:  # PPO's prompt pool takes every kind's prompts
        _check_kind(examples, bool(spec["sft"]))
    if spec["unpaired"] and examples and isinstance(examples[0], PreferenceExample):
        examples = paired_to_unpaired(examples)
    limit = spec["limit"]
    if limit is not None:
        examples = examples[: int(limit)]
    return examples


def _check_kind(examples: list, sft: bool) -> None:
    """SFT runs read SFT rows only, preference runs preference rows only (one line naming
    the first row of the wrong kind)."""
    for ex in examples:
        if isinstance(ex, PromptExample):
            raise UserError(
                f"{ex.source}:{ex.line}: prompt-only rows have nothing to train on but for "
                "objective.name='ppo', which continues them"
            )
        if isinstance(ex, SFTExample) != sft:
            want = (
                "SFT rows ({'text'}, {'prompt', 'completion'} or {'messages'})"
                if sft
                else ("preference rows")
            )
            hint = "" if sft else "; set objective.name='sft' to fine-tune on them"
            raise UserError(
                f"{ex.source}:{ex.line}: objective needs {want}, got {type(ex).__name__}{hint}"
            )


def load_preference_data(
    spec: Any,
    tokenizer: Any,
    run_dir: str | None = None,
    split: str | None = None,
    unpaired: bool | None = None,
) -> TokenizedDataset:
    """Read, parse, check and tokenize a preference (or unpaired) dataset.

    Config keys (dict or ConfigDict; a key left out takes `configs.default.data_spec()`'s
    value (`complete_spec`); other keys are ignored, so the trainer's whole
    `config.data` can be passed):
      sources: list of sources; each a string (`sources.parse_spec`: a path/glob,
        `hf:NAME[:SPLIT]`, `tfds:NAME[/CONFIG][:SPLIT]`, a save_to_disk folder; with
        `allow_downloads` and `tfds_data_dir`), or a dict with `path`
        (+ `type`: jsonl|json|parquet), `tfds` (+ `split`, `data_dir`) or `hf`
        (save_to_disk dir or cached hub name; + `split`, `cache_dir`,
        `allow_download`, default False). `path` alone is a shorthand; without
        either, `spec[split]` is used (e.g. `split="train"` reads `data.train`).
      format: "auto" (detected per row) or one of `PARSERS` (explicit, implicit,
        conversational, ultrafeedback, hh, shp, stack_exchange, tldr, unpaired).
      sft: read SFT rows (`objective.name="sft"`; `formats.SFT_FORMATS`) into an 'sft'
        dataset; other rows are refused, as SFT rows are without it.
      unpaired: convert pairs to unpaired rows (chosen desirable, rejected not);
        the `unpaired` argument, when given, overrides it (the trainer passes
        `not losses.is_paired(loss)`).
      limit: keep only the first N examples.
      max_length, max_prompt_length, max_completion_length, truncation_mode
        ("keep_start" | "keep_end" | "keep_end_prompt"), add_eos: see `dpo_jax.data.tokenize`.
      skip_bad_rows: False raises `DataError` (file:line: problem) on the first
        bad row; True skips bad rows, counts them by reason, writes
        `run_dir/rejects.jsonl` and prints the counts.
      cache_dir: tokenization cache (None or "" disables it).
    """
    spec = complete_spec(spec)
    rejects = RejectLog(skip_bad_rows=bool(spec["skip_bad_rows"]), run_dir=run_dir)
    if rejects.skip_bad_rows and run_dir is None:
        raise UserError("skip_bad_rows=True needs a run_dir for the rejects file")
    if unpaired is not None:
        spec["unpaired"] = unpaired
    examples = load_examples(spec, tokenizer, rejects, split)
    if not examples:
        path = rejects.finalize()
        where = ", ".join(str(s) for s in _sources(spec, split))
        seen = f"; see {path}" if path else ""
        raise UserError(f"{where}: no usable examples{seen}")
    settings = settings_from_spec(spec)
    cache_dir = spec["cache_dir"] or None
    tokenized = tokenize_cached(examples, tokenizer, settings, rejects, cache_dir)
    tokenized.stats["rejected"] = dict(rejects.counts)
    path = rejects.finalize()
    if len(tokenized) == 0:
        where = ", ".join(str(s) for s in _sources(spec, split))
        raise UserError(f"{where}: every example was rejected; see {path}")
    return tokenized


def load_prompts(
    spec: Any, tokenizer: Any, run_dir: str | None = None, split: str | None = None
) -> list[list[int]]:
    """PPO's prompt pool: the token ids of each distinct prompt, in file order.

    Rows of any kind with a prompt: prompt-only rows (`formats.parse_prompt`), preference,
    unpaired and prompt-completion rows (their prompt; a pair's prompt is kept once).
    Keys of `spec` as in `load_preference_data` (sources, format, skip_bad_rows,
    max_prompt_length: keep the prompt's last N tokens). Prompts are tokenized as
    `tokenize_examples` tokenizes them (special tokens added unless chat-rendered).
    Bad rows raise `DataError` naming file:line, or are skipped with `skip_bad_rows`.
    """
    spec = dict(complete_spec(spec), prompts=True, unpaired=False)
    rejects = RejectLog(skip_bad_rows=bool(spec["skip_bad_rows"]), run_dir=run_dir)
    if rejects.skip_bad_rows and run_dir is None:
        raise UserError("skip_bad_rows=True needs a run_dir for the rejects file")
    seen: set[tuple[str, bool]] = set()
    examples = []
    for ex in load_examples(spec, tokenizer, rejects, split):
        if not ex.prompt:  # an SFT language-modelling row
            error = DataError("the row has no prompt to continue", reason="empty_prompt")
            rejects.handle(error.located(ex.source, ex.line), {})
        elif (ex.prompt, ex.chat) not in seen:
            seen.add((ex.prompt, ex.chat))
            examples.append(ex)
    limit = spec["max_prompt_length"]
    out = []
    for ex, ids in zip(examples, encode_prompts(examples, tokenizer), strict=True):
        if not ids:
            error = DataError("prompt tokenizes to no tokens", reason="empty_prompt")
            rejects.handle(error.located(ex.source, ex.line), {"prompt": ex.prompt})
            continue
        out.append(ids[-int(limit) :] if limit is not None else ids)
    path = rejects.finalize()
    if not out:
        where = ", ".join(str(s) for s in _sources(spec, split))
        raise UserError(f"{where}: no usable prompts" + (f"; see {path}" if path else ""))
    return out
