"""Row sources: local JSONL / JSON / Parquet files, TFDS array_record data sources,
and locally saved or cached Hugging Face `datasets` datasets.

Each source yields `Row(data, source, line)`: `data` is a plain dict of Python
values (strings, numbers, lists, dicts), `source` the file (or dataset name) and
`line` the 1-based line number (JSONL) or record number (everything else), so
that a bad row can be named precisely.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpo_jax.data.errors import DataError, RejectLog

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
        matches = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        if not matches:
            raise FileNotFoundError(f"data path {pat!r} matches no file")
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
    raise ValueError(
        f"{path}: cannot tell the file type from its name; pass type= one of {FILE_TYPES}"
    )


def _reject(rejects: RejectLog, raw: Any, problem: str, path: str, line: int, reason: str) -> None:
    """Hand one bad input, located at `path:line`, to the reject log (raises unless skipping)."""
    rejects.handle(DataError(problem, source=path, line=line, reason=reason), raw)


def _json_problem(e: json.JSONDecodeError) -> str:
    return f"malformed JSON ({e.msg} at column {e.colno})"


def read_jsonl(path: str, rejects: RejectLog) -> Iterator[Row]:
    """Rows of a JSON-lines file; blank lines are ignored, line numbers are 1-based."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
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
            yield Row(obj, path, lineno)


def read_json(path: str, rejects: RejectLog) -> Iterator[Row]:
    """Rows of a JSON file holding a list of objects, {"data": [...]}, or a dict of columns.

    A file that is not valid JSON or UTF-8 is one bad input as a whole: it is
    reported with the line of the problem and, when skipping, yields nothing.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
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

    table = pq.read_table(path)
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
            raise ValueError(f"{path}: unknown file type {t!r}; expected one of {FILE_TYPES}")


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

    builder = tfds.builder(name, data_dir=data_dir) if isinstance(name, str) else name
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
    """Rows of a Hugging Face dataset: a `save_to_disk` directory, else a cached hub dataset.

    Nothing is downloaded unless `allow_download=True`.
    """
    import datasets

    where = f"hf:{path_or_name}" + (f"/{split}" if split else "")
    if os.path.isdir(path_or_name) and (
        os.path.exists(os.path.join(path_or_name, "dataset_info.json"))
        or os.path.exists(os.path.join(path_or_name, "dataset_dict.json"))
    ):
        ds = datasets.load_from_disk(path_or_name)
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                raise ValueError(f"{path_or_name} holds splits {list(ds)}; pass split=")
            ds = ds[split]
    else:
        previous = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = previous or not allow_download
        try:
            ds = datasets.load_dataset(path_or_name, split=split or "train", cache_dir=cache_dir)
        finally:
            datasets.config.HF_HUB_OFFLINE = previous
    for i, rec in enumerate(ds, start=1):
        yield Row(dict(rec), where, i)


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
    raise ValueError(f"data source {dict(spec)!r} needs one of the keys 'path', 'tfds', 'hf'")


def read_sources(specs: Iterable[Mapping[str, Any] | str], rejects: RejectLog) -> Iterator[Row]:
    """Rows of several sources in order; a bare string is a file path or glob."""
    for spec in specs:
        yield from read_source({"path": spec} if isinstance(spec, str) else spec, rejects)
