"""Row sources: local JSONL / JSON / Parquet files, TFDS array_record data sources,
and locally saved or cached Hugging Face `datasets` datasets.

A source is a dict (`read_source`) or a string (`parse_spec`): a file path or glob,
`hf:NAME[:SPLIT]` (a Hub dataset `org/name`, or a `save_to_disk` folder), a
`save_to_disk` folder itself, or `tfds:NAME[/CONFIG][:SPLIT]` (a prepared TFDS builder).

Each source yields `Row(data, source, line)`: `data` is a plain dict of Python
values (strings, numbers, lists, dicts), `source` the file (or dataset name) and
`line` the 1-based line number (JSONL) or record number (everything else), so
that a bad row can be named precisely.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpo_jax import hub, paths
from dpo_jax.data.errors import DataError, RejectLog
from dpo_jax.errors import UserError

FILE_TYPES = ("jsonl", "json", "parquet")


@dataclass(frozen=True)
class Row:
    """One raw input row with where it came from."""

    data: dict[str, Any]
    source: str
    line: int

    def error(self, problem: str, reason: str) -> DataError:
        """A `DataError` located at this row."""
        return DataError(problem, source=self.source, line=self.line, reason=reason)


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Expand globs (sorted, de-duplicated, order of patterns kept); error if one matches nothing."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for pat in patterns:
        matches = paths.glob(pat)
        if not matches:
            raise FileNotFoundError(f"data path {pat!r} matches no file")
        for m in matches:
            if paths.Path(m).is_dir():
                raise DataError(
                    "is a directory, not a data file; give a file or a glob such as "
                    f"{os.path.join(m, '*.jsonl')!r}",
                    source=m,
                    reason="is_a_directory",
                )
        out.extend(m for m in matches if m not in out)
    return out


def file_type(path: str) -> str:
    """Infer 'jsonl' / 'json' / 'parquet' from a file name."""
    name = path.lower()
    for suffix, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json")):
        if name.endswith(suffix):
            return kind
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise UserError(
        f"{path}: cannot tell the file type from its name; pass type= one of {FILE_TYPES}"
    )


def _reject(rejects: RejectLog, raw: Any, problem: str, path: str, line: int, reason: str) -> None:
    """Hand one bad input, located at `path:line`, to the reject log (raises unless skipping)."""
    rejects.handle(DataError(problem, source=path, line=line, reason=reason), raw)


def _json_problem(e: json.JSONDecodeError) -> str:
    return f"malformed JSON ({e.msg} at column {e.colno})"


def utf16_problem(head: bytes) -> str | None:
    """A message if the first bytes of a file look UTF-16 (a BOM, or NUL every other byte)."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        found = "a UTF-16 byte-order mark"
    else:
        sample = head[:64]
        half = len(sample) // 2
        # ASCII text saved as UTF-16 has a NUL in every other byte.
        if half < 2 or max(sample[0::2].count(0), sample[1::2].count(0)) < half * 3 // 4:
            return None
        found = "NUL bytes between the characters"
    return f"the file is UTF-16 ({found}), not UTF-8; re-save it as UTF-8"


def lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where a string of a parsed JSON value holds a lone surrogate (a bad \\uXXXX escape).

    Such a string cannot be encoded as UTF-8, so no tokenizer can read it.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"field {where or 'value'!r} holds a lone surrogate at character {e.start}"
        return None
    if isinstance(value, Mapping):
        items = ((k, v, f"{where}.{k}" if where else str(k)) for k, v in value.items())
    elif isinstance(value, list):
        items = ((i, v, f"{where}[{i}]") for i, v in enumerate(value))
    else:
        return None
    for key, item, path in items:
        found = lone_surrogate(key, where) if isinstance(key, str) else None
        found = found or lone_surrogate(item, path)
        if found:
            return found
    return None


def _check_text(obj: Any, rejects: RejectLog, path: str, line: int, raw: Any = None) -> bool:
    """False (after rejecting the row) if `obj` holds text no tokenizer can encode."""
    where = lone_surrogate(obj)
    if where is None:
        return True
    problem = f"{where} (an unpaired \\uD800-\\uDFFF escape); fix the text or drop the row"
    _reject(rejects, raw if raw is not None else repr(obj), problem, path, line, "invalid_unicode")
    return False


def _empty_file(rejects: RejectLog, path: str) -> None:
    rejects.handle(
        DataError(
            "the file is empty (or holds only blank lines); give a file with data rows",
            source=path,
            reason="empty_file",
        )
    )


def read_jsonl(path: str, rejects: RejectLog) -> Iterator[Row]:
    """Rows of a JSON-lines file; blank lines are ignored, line numbers are 1-based.

    A UTF-8 byte-order mark is skipped; a UTF-16 file or one without any row is one bad
    input as a whole.
    """
    with paths.Path(path).open("rb") as f:
        problem = utf16_problem(f.read(64))
        if problem:
            _reject(rejects, None, problem, path, 1, "utf16")
            return
        f.seek(0)
        any_row = False
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                continue
            any_row = True
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = f"invalid UTF-8 at byte {e.start} of the line"
                _reject(rejects, raw, problem, path, lineno, "invalid_utf8")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                _reject(rejects, text, _json_problem(e), path, lineno, "malformed_json")
                continue
            if not isinstance(obj, dict):
                problem = f"expected a JSON object per line, got {type(obj).__name__}"
                _reject(rejects, obj, problem, path, lineno, "not_an_object")
                continue
            if not _check_text(obj, rejects, path, lineno, text):
                continue
            yield Row(obj, path, lineno)
    if not any_row:
        _empty_file(rejects, path)


def read_json(path: str, rejects: RejectLog) -> Iterator[Row]:
    """Rows of a JSON file holding a list of objects, {"data": [...]}, or a dict of columns.

    A file that is not valid JSON or UTF-8 is one bad input as a whole: it is
    reported with the line of the problem and, when skipping, yields nothing.
    """
    raw = paths.Path(path).read_bytes()
    problem = utf16_problem(raw[:64])
    if problem:
        _reject(rejects, None, problem, path, 1, "utf16")
        return
    if not raw.strip():
        _empty_file(rejects, path)
        return
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is not data
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        _reject(rejects, None, "invalid UTF-8", path, line, "invalid_utf8")
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        _reject(rejects, None, _json_problem(e), path, e.lineno, "malformed_json")
        return
    records = _records_from_json(obj, path)
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, dict):
            problem = f"record {i} is a {type(rec).__name__}, expected an object"
            _reject(rejects, rec, problem, path, i, "not_an_object")
            continue
        if not _check_text(rec, rejects, path, i):
            continue
        yield Row(rec, path, i)


def _records_from_json(obj: Any, path: str) -> list[Any]:
    """Accept a list of records, a wrapper {"data"|"rows"|"train": [...]}, or columns."""
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for key in ("data", "rows", "train"):
            if isinstance(obj.get(key), list) and len(obj) == 1:
                return obj[key]
        if obj and all(isinstance(v, list) for v in obj.values()):
            lengths = {len(v) for v in obj.values()}
            if len(lengths) != 1:
                raise DataError(
                    "column lists have different lengths", source=path, reason="bad_columns"
                )
            n = lengths.pop()
            return [{k: v[i] for k, v in obj.items()} for i in range(n)]
    raise DataError(
        "expected a list of objects or a dict of column lists", source=path, reason="bad_file"
    )


def read_parquet(path: str) -> Iterator[Row]:
    """Rows of a Parquet file (record numbers are 1-based)."""
    import pyarrow.parquet as pq

    with paths.Path(path).open("rb") as f:
        table = pq.read_table(f)
    for i, rec in enumerate(table.to_pylist(), start=1):
        yield Row(rec, path, i)


def read_files(
    paths: str | Sequence[str], rejects: RejectLog, kind: str | None = None
) -> Iterator[Row]:
    """Rows of every file matched by `paths` (globs allowed), in sorted order per pattern."""
    for path in expand_paths(paths):
        t = kind or file_type(path)
        if t == "jsonl":
            yield from read_jsonl(path, rejects)
        elif t == "json":
            yield from read_json(path, rejects)
        elif t == "parquet":
            yield from read_parquet(path)
        else:
            raise UserError(f"{path}: unknown file type {t!r}; expected one of {FILE_TYPES}")


def decode_record(value: Any, where: str, line: int) -> Any:
    """Turn numpy/bytes leaves of a TFDS record into Python strings and numbers."""
    if isinstance(value, Mapping):
        return {k: decode_record(v, where, line) for k, v in value.items()}
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"invalid UTF-8 at byte {e.start}", source=where, line=line, reason="invalid_utf8"
            ) from None
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [decode_record(v, where, line) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [decode_record(v, where, line) for v in value]
    return value


def read_tfds(
    name: Any, split: str, rejects: RejectLog, data_dir: str | None = None
) -> Iterator[Row]:
    """Rows of a prepared TFDS dataset read through `as_data_source` (array_record, no TensorFlow).

    `name` is a registered builder name (import the module defining a custom
    builder first) or a builder instance. The dataset must already be prepared
    (in `data_dir`) with `file_format="array_record"`.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir) if isinstance(name, str) else name
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(
            f"tfds:{name}: no such builder registered nor prepared in data_dir "
            f"{data_dir or tfds.core.constants.DATA_DIR!r}; prepare it there "
            "(file_format='array_record') or set data.tfds_data_dir"
        ) from None
    source = builder.as_data_source(split=split)
    where = f"tfds:{builder.name}/{split}"
    batch = 256
    for start in range(0, len(source), batch):
        idx = list(range(start, min(start + batch, len(source))))
        # __getitems__ reads a block at once (much faster than one record at a time).
        recs = (
            source.__getitems__(idx)
            if hasattr(source, "__getitems__")
            else [source[i] for i in idx]
        )
        for i, rec in zip(idx, recs, strict=True):
            try:
                data = decode_record(rec, where, i + 1)
            except DataError as e:
                rejects.handle(e, None)
                continue
            yield Row(data, where, i + 1)


def read_hf_dataset(
    path_or_name: str,
    split: str | None = None,
    cache_dir: str | None = None,
    allow_download: bool = False,
) -> Iterator[Row]:
    """Rows of a Hugging Face dataset: a `save_to_disk` directory; a Hub dataset `org/name`
    (its repository's snapshot in the Hugging Face cache, `hub.snapshot_dir`, read with
    `datasets.load_dataset`); else a name `datasets.load_dataset` knows.

    Nothing is downloaded unless `allow_download=True`.
    """
    import datasets

    where = f"hf:{path_or_name}" + (f"/{split}" if split else "")
    if is_saved_dataset(path_or_name):  # load_from_disk reads gs:// too (fsspec)
        ds = datasets.load_from_disk(path_or_name)
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                raise UserError(
                    f"{path_or_name} holds splits {list(ds)}; pass split= "
                    f"(on the command line hf:{path_or_name}:SPLIT)"
                )
            ds = ds[split]
    elif hub.is_repo_id(path_or_name):
        local = hub.snapshot_dir(
            path_or_name,
            repo_type="dataset",
            allow_downloads=allow_download,
            where=f"data source 'hf:{path_or_name}'",
        )
        ds = datasets.load_dataset(local, split=split or "train", cache_dir=cache_dir)
    else:
        previous = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = previous or not allow_download
        try:
            ds = datasets.load_dataset(path_or_name, split=split or "train", cache_dir=cache_dir)
        finally:
            datasets.config.HF_HUB_OFFLINE = previous
    for i, rec in enumerate(ds, start=1):
        yield Row(dict(rec), where, i)


SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # save_to_disk


def is_saved_dataset(path: str) -> bool:
    """Whether `path` is a folder `datasets.Dataset(Dict).save_to_disk` wrote."""
    folder = paths.Path(path)
    return folder.is_dir() and any((folder / m).exists() for m in SAVED_MARKERS)


def parse_spec(spec: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The source dict of a string spec (`data.train` / `data.eval` on the command line).

    `hf:NAME[:SPLIT]`: NAME a Hub dataset `org/name` (its snapshot through huggingface_hub,
    downloaded only with `options["allow_downloads"]`) or a `save_to_disk` folder;
    `tfds:NAME[/CONFIG][:SPLIT]` (`options["tfds_data_dir"]`; split default "train"); a
    `save_to_disk` folder; else a file path or glob. SPLIT may hold a slice (`train[:10%]`).
    """
    options = options or {}
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("hf", "tfds"):
        scheme, url, tail = rest.partition("://")  # hf:gs://bucket/dir:split
        name, _, split = tail.partition(":") if url else rest.partition(":")
        name = scheme + url + name if url else name
        if not name:
            raise UserError(f"data source {spec!r}: no name; use {kind}:NAME[:SPLIT]")
        if kind == "tfds":
            data_dir = options.get("tfds_data_dir") or None
            return {"tfds": name, "split": split or "train", "data_dir": data_dir}
        allow = bool(options.get("allow_downloads", False))
        return {"hf": name, "split": split or None, "allow_download": allow}
    if is_saved_dataset(spec):
        return {"hf": spec}
    return {"path": spec}


def read_source(spec: Mapping[str, Any], rejects: RejectLog) -> Iterator[Row]:
    """Rows of one source described by a dict.

    Keys: `path` (file, glob or list of them; `type` optional: jsonl|json|parquet),
    or `tfds` (builder name; `split`, `data_dir`), or `hf` (save_to_disk dir or
    cached hub name; `split`, `cache_dir`, `allow_download`).
    """
    if "path" in spec:
        return read_files(spec["path"], rejects, spec.get("type"))
    if "tfds" in spec:
        return read_tfds(spec["tfds"], spec.get("split", "train"), rejects, spec.get("data_dir"))
    if "hf" in spec:
        return read_hf_dataset(
            spec["hf"],
            spec.get("split"),
            spec.get("cache_dir"),
            bool(spec.get("allow_download", False)),
        )
    raise UserError(f"data source {dict(spec)!r} needs one of the keys 'path', 'tfds', 'hf'")


def read_sources(
    specs: Iterable[Mapping[str, Any] | str],
    rejects: RejectLog,
    options: Mapping[str, Any] | None = None,
) -> Iterator[Row]:
    """Rows of several sources in order; a string is parsed by `parse_spec` (`options`:
    its `allow_downloads` and `tfds_data_dir`)."""
    for spec in specs:
        yield from read_source(
            parse_spec(spec, options) if isinstance(spec, str) else spec, rejects
        )
