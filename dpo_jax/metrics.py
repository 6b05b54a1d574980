"""Run observability: metrics to JSONL + TensorBoard, and a terminal progress bar.

Metric names follow TRL (`loss`, `rewards/accuracies`, ...); held-out ones carry an
`eval/` prefix. Every JSONL line has an integer `step` so a resumed run can truncate
the lines written after its checkpoint (`checkpoint.truncate_jsonl`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILENAME = "metrics.jsonl"
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


class MetricsWriter:
    """Appends metric dicts to `run_dir/metrics.jsonl` and TensorBoard event files."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILENAME
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives with the run
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazy: keeps `import dpo_jax.metrics` light

            self._tb = SummaryWriter(logdir=str(self.run_dir / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record `metrics` at `step`; returns the JSON-able row that was written."""
        row: dict[str, Any] = {"step": int(step)}
        row.update({k: to_python(v) for k, v in metrics.items() if k != "step"})
        if not self.enabled:
            return row
        # json.dumps writes NaN/Infinity, which Python's json reads back.
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, int(step))
        return row

    def close(self) -> None:
        """Flush and close the files."""
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a metrics JSONL file."""
    with open(path, encoding="utf-8") as f:
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
