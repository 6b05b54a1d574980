"""Metrics files: JSONL rows with integer steps (NaN kept) and TensorBoard scalars."""

from __future__ import annotations

import math

import numpy as np

from dpo_jax.metrics import MetricsWriter, Progress, mean_metrics, read_jsonl, to_python


def test_writer_round_trips_rows_and_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True)
    w.write(1, {"loss": np.float32(0.5), "rewards/accuracies": np.float64(0.75), "step": 99})
    w.write(2, {"loss": float("nan"), "skipped_steps": np.int32(1)})
    w.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0] == {"step": 1, "loss": 0.5, "rewards/accuracies": 0.75}
    assert rows[1]["step"] == 2 and math.isnan(rows[1]["loss"]) and rows[1]["skipped_steps"] == 1
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    # appending on resume keeps earlier rows
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(3, {"loss": 0.25})
    w.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_disabled_writer_touches_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "x", enabled=False)
    assert w.write(5, {"loss": 1.0}) == {"step": 5, "loss": 1.0}
    w.close()
    assert not (tmp_path / "x").exists()


def test_helpers():
    assert to_python(np.int64(3)) == 3 and isinstance(to_python(np.int64(3)), int)
    assert to_python(np.bool_(True)) is True
    assert mean_metrics([{"a": 1.0, "b": 2.0}, {"a": 3.0}]) == {"a": 2.0, "b": 2.0}
    p = Progress(total=4, enabled=True)
    p.update(2, {"loss": 0.5, "rewards/accuracies": float("nan")})
    p.close()
