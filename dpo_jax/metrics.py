"""Run observability: metrics to JSONL + TensorBoard (+ Weights & Biases), and a progress bar.

Metric names follow TRL (`loss`, `rewards/accuracies`, ...); held-out ones carry an
`eval/` prefix. Every JSONL line has an integer `step` so a resumed run can truncate
the lines written after its checkpoint (`resume.truncate_jsonl`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from dpo_jax import paths
from dpo_jax.errors import config_error

METRICS_FILENAME = "metrics.jsonl"
# Loggers `train.report_to` may name, beside metrics.jsonl (always written: a resume
# reads it) and TensorBoard (`train.tensorboard`).
REPORTERS = ("wandb",)
WANDB_ID_FILENAME = "wandb_run_id"
TENSORBOARD_SUBDIR = "tensorboard"
EVAL_PREFIX = "eval/"


def to_python(value: Any) -> Any:
    """A JSON-able Python scalar from a numpy/jax scalar (NaN/Inf kept as floats)."""
    arr = np.asarray(value)
    if arr.ndim:
        return arr.tolist()
    if arr.dtype.kind in "iu":
        return int(arr)
    if arr.dtype.kind == "b":
        return bool(arr)
    return float(arr)


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class EventFile:
    """One TensorBoard event file, written synchronously (no writer thread, no atexit hook)
    through `dpo_jax.paths`, so it may live in a bucket.

    TensorBoard has no way to delete points, so on opening, the directory's event files
    are replaced by one new file holding `rows` (the run's metrics.jsonl, already trimmed
    to the restored step by the checkpointer): a resumed run shows one curve, not the
    killed run's extra steps on top of the rerun's.
    """

    def __init__(self, directory: paths.PathLike, rows: list[Mapping[str, Any]]):
        from tensorboardX.proto.event_pb2 import Event  # lazy: import stays light

        directory = paths.as_path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # (In a bucket an empty directory does not exist, so it cannot be listed.)
        listed = directory.iterdir() if directory.is_dir() else []
        stale = [p for p in listed if p.name.startswith("events.out.tfevents.")]
        # TensorBoard's file name; a unique suffix: the old file may carry the same
        # timestamp and host name.
        name = (
            f"events.out.tfevents.{str(time.time())[:10]}.{socket.gethostname()}"
            f".{os.getpid()}.{time.time_ns()}"
        )
        self._file = paths.AppendFile(directory / name)
        self._record(Event(wall_time=time.time(), file_version="brain.Event:2"))
        for row in rows:
            self.write(int(row["step"]), row, flush=False)
        self._file.flush()
        # Only now that the replacement is written (a kill in between leaves both files,
        # and the next resume cleans up again).
        for p in stale:
            p.unlink(missing_ok=True)

    def _record(self, event: Any) -> None:
        # A TFRecord: length, its masked CRC-32C, the serialized event, its masked CRC-32C.
        from tensorboardX.record_writer import masked_crc32c

        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(
            header
            + struct.pack("<I", masked_crc32c(header))
            + data
            + struct.pack("<I", masked_crc32c(data)),
            flush=False,
        )

    def write(self, step: int, row: Mapping[str, Any], flush: bool = True) -> None:
        """One event at `step` with every numeric field of `row`."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=v) for k, v in _scalars(row).items()]
        if not values:
            return
        self._record(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
        if flush:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()


def read_events(directory: paths.PathLike) -> list[tuple[int, str, float]]:
    """``(step, tag, value)`` of every scalar in a directory's event files, file by file."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(paths.as_path(directory).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            record = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4  # length, its CRC, the record, its CRC
            event = Event.FromString(record)
            out += [(int(event.step), v.tag, float(v.simple_value)) for v in event.summary.value]
    return out


def parse_report_to(value: Any) -> tuple[str, ...]:
    """`train.report_to` as a tuple of `REPORTERS` ("" / "none": none; a comma string or
    a list); an unknown name, or "wandb" without wandb installed, is a one-line error."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v and v != "none"]
    names = tuple(str(v) for v in value or ())
    for name in names:
        if name == "tensorboard":
            raise config_error(
                "train.report_to", "TensorBoard is train.tensorboard (on by default)"
            )
        if name not in REPORTERS:
            raise config_error(
                "train.report_to", f"unknown logger {name!r}", f"choose from {REPORTERS}"
            )
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise config_error(
            "train.report_to", "names 'wandb', but wandb is not installed",
            "pip install -e '.[wandb]' (or pip install wandb)",
        )  # fmt: skip
    return names


class WandbRun:
    """A Weights & Biases run logging the same rows as metrics.jsonl, at the same steps.

    Its id is kept in `run_dir/wandb_run_id`, so a resumed run continues the same W&B run
    (`resume="allow"`). Files go to `WANDB_DIR`, else the run directory when it is local.
    Project, entity and mode come from wandb's own settings (`WANDB_PROJECT`,
    `WANDB_MODE=offline`, ...); the run is named after the run directory.
    """

    def __init__(self, run_dir: paths.PathLike, config: Mapping[str, Any] | None = None):
        import wandb  # lazy: optional, and heavy

        run_dir = paths.as_path(run_dir)
        id_path = run_dir / WANDB_ID_FILENAME
        run_id = id_path.read_text().strip() if id_path.exists() else secrets.token_hex(4)
        paths.write_atomic(id_path, run_id)
        local = None if paths.is_url(run_dir) or os.environ.get("WANDB_DIR") else str(run_dir)
        self.run = wandb.init(
            id=run_id, resume="allow", name=run_dir.name, dir=local, config=dict(config or {}),
            project=os.environ.get("WANDB_PROJECT", "dpo-jax"),
        )  # fmt: skip

    def write(self, step: int, row: Mapping[str, Any]) -> None:
        """Log the numeric fields of `row` at `step`."""
        self.run.log(_scalars(row), step=int(step))

    def close(self) -> None:
        """Finish the run (uploads, or closes the offline files)."""
        self.run.finish()


class MetricsWriter:
    """Appends metric dicts to `run_dir/metrics.jsonl`, a TensorBoard event file and the
    loggers of `report_to` (`REPORTERS`: a `WandbRun` for "wandb").

    Open it after a resume's checkpoint restore: the event file is rebuilt from the
    (trimmed) metrics.jsonl, see `EventFile`.
    """

    def __init__(
        self,
        run_dir: paths.PathLike,
        tensorboard: bool = True,
        enabled: bool = True,
        report_to: Any = (),
        config: Mapping[str, Any] | None = None,
    ):
        self.run_dir = paths.as_path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILENAME
        self._tb = None
        self._wandb = None
        self._closed = False
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            rows = _readable_rows(self.path)
            self._tb = EventFile(self.run_dir / TENSORBOARD_SUBDIR, rows)
        if "wandb" in parse_report_to(report_to):
            self._wandb = WandbRun(self.run_dir, config)
        self._file = paths.AppendFile(self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record `metrics` at `step`; returns the JSON-able row that was written."""
        row: dict[str, Any] = {"step": int(step)}
        row.update({k: to_python(v) for k, v in metrics.items() if k != "step"})
        if not self.enabled:
            return row
        # json.dumps writes NaN/Infinity, which Python's json reads back.
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            self._tb.write(int(step), row)
        if self._wandb is not None:
            self._wandb.write(int(step), row)
        return row

    def close(self) -> None:
        """Flush and close the files."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        try:
            self._file.close()
        finally:
            try:
                if self._tb is not None:
                    self._tb.close()
            finally:
                if self._wandb is not None:
                    self._wandb.close()


def _readable_rows(path: epath.Path) -> list[dict[str, Any]]:
    # For the TensorBoard rebuild only: a line that is not a JSON object with a step
    # (torn, edited) is left to resume.truncate_jsonl to report, not fatal here.
    rows = []
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def read_jsonl(path: paths.PathLike) -> list[dict[str, Any]]:
    """All rows of a metrics JSONL file."""
    with paths.as_path(path).open("r", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """tqdm bar over training steps showing loss, reward accuracy, tokens/s and ETA."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True
            )

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Move the bar to `step` and show the headline numbers."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        shown = {}
        for key, short in (
            ("loss", "loss"),
            ("rewards/accuracies", "acc"),
            ("tokens_per_second", "tok/s"),
        ):
            if key in metrics and metrics[key] is not None:
                value = float(metrics[key])
                shown[short] = f"{value:.4g}" if math.isfinite(value) else str(value)
        self._bar.set_postfix(shown, refresh=False)

    def write(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is None:
            print(text)
        else:
            self._bar.write(text)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()


class Throughput:
    """Tokens per second between two host-side reads (wall clock, after device sync)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        """Count tokens of batches dispatched since the last `rate()`."""
        self._tokens += int(tokens)

    def rate(self) -> float:
        """Tokens per second since the previous call; resets the window."""
        now = time.perf_counter()
        elapsed = max(now - self._t, 1e-9)
        value = self._tokens / elapsed
        self._t, self._tokens = now, 0
        return value


def mean_metrics(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    """Per-key mean over a list of metric dicts (keys missing from a row are skipped)."""
    keys: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            keys.setdefault(key, []).append(float(value))
    return {k: float(np.mean(v)) for k, v in keys.items()}
