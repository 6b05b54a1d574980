"""`dpo_jax.paths`: run-directory and data I/O in a bucket does what it does on local disk.

Each test does the same thing under a local directory and under `gs://` (the in-memory
bucket of `tests.fake_gcs`) and compares the two: same bytes, same rows, same arrays.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest

from dpo_jax import data, guards, metrics, paths, resume, train
from dpo_jax.configs import tiny
from tests.data_helpers import tiny_tokenizer
from tests.fake_gcs import BUCKET, fake_gcs
from tests.test_checkpoint import abstract_of, assert_trees_equal, make_state, new_ckpt

GS = f"gs://{BUCKET}"


@pytest.fixture
def bucket(monkeypatch):
    with fake_gcs(monkeypatch) as fs:
        yield fs


def _roots(tmp_path) -> tuple[str, str]:
    return str(tmp_path / "local"), f"{GS}/remote"


def _metrics_run(root: str) -> None:
    """Log 3 steps, get killed with a garbage line in the file, resume at 2, log step 3."""
    run = f"{root}/run"
    w = metrics.MetricsWriter(run)
    for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step, "rewards/accuracies": 0.25 * step})
    w.close()
    path = paths.as_path(f"{run}/metrics.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"{not json\n" + b"".join(lines[1:]))
    assert resume.truncate_jsonl(path, step=2) == 2  # the garbage line and step 3
    w = metrics.MetricsWriter(run)  # a resumed run: TensorBoard rebuilt from the file
    w.write(3, {"loss": 0.3, "rewards/accuracies": 0.7})
    w.close()


def test_metrics_jsonl_and_tensorboard_in_a_bucket_match_local(tmp_path, bucket):
    local, remote = _roots(tmp_path)
    for root in (local, remote):
        _metrics_run(root)
    for name in ("metrics.jsonl", "metrics.jsonl.bad-lines"):
        a = paths.as_path(f"{local}/run/{name}").read_bytes()
        assert a == paths.as_path(f"{remote}/run/{name}").read_bytes()
    assert [r["step"] for r in metrics.read_jsonl(f"{remote}/run/metrics.jsonl")] == [1, 2, 3]
    assert paths.as_path(f"{remote}/run/metrics.jsonl.bad-lines").read_text() == "{not json\n"
    events = metrics.read_events(f"{remote}/run/tensorboard")
    assert events == metrics.read_events(f"{local}/run/tensorboard")
    assert [(s, t) for s, t, _ in events] == [
        (s, t) for s in (1, 2, 3) for t in ("loss", "rewards/accuracies")
    ]
    assert events[-1][2] == pytest.approx(0.7)
    # One event file: the killed run's was replaced by the rebuilt one.
    assert len(paths.glob(f"{remote}/run/tensorboard/events.out.tfevents.*")) == 1
    assert not paths.glob(f"{GS}/**/*.tmp.*")
    assert all(k.startswith(f"{BUCKET}/remote/run/") for k in bucket.store)


def _write_sources(root: str) -> None:
    rows = [
        {"prompt": f"Question {i}: how are you?", "chosen": " I am fine.", "rejected": " No."}
        for i in range(6)
    ]
    for name, part in (("train-0.jsonl", rows[:3]), ("train-1.jsonl", rows[3:])):
        p = paths.as_path(f"{root}/data/{name}")
        p.parent.mkdir(parents=True, exist_ok=True)
        bad = "[1, 2]\n" if name == "train-1.jsonl" else ""  # one bad row, skipped
        p.write_text("".join(json.dumps(r) + "\n" for r in part) + bad)
    paths.as_path(f"{root}/data/more.json").write_text(json.dumps(rows[:2]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows[2:4]), buf)
    paths.as_path(f"{root}/data/more.parquet").write_bytes(buf.getvalue())


def _load(root: str):
    spec = {
        "sources": [f"{root}/data/train-*.jsonl", f"{root}/data/more.json",
                    {"path": f"{root}/data/more.parquet"}],
        "cache_dir": f"{root}/cache", "max_length": 32, "skip_bad_rows": True,
    }  # fmt: skip
    return data.load_preference_data(spec, tiny_tokenizer(), run_dir=f"{root}/run")


def test_data_sources_tokenized_cache_and_rejects_in_a_bucket_match_local(tmp_path, bucket):
    local, remote = _roots(tmp_path)
    for root in (local, remote):
        _write_sources(root)
    assert paths.glob(f"{remote}/data/train-*.jsonl") == [
        f"{remote}/data/train-0.jsonl",
        f"{remote}/data/train-1.jsonl",
    ]
    rows = list(data.read_sources([f"{remote}/data/train-*.jsonl"], data.RejectLog(True)))
    assert [(r.source, r.line) for r in rows] == [
        (f"{remote}/data/train-0.jsonl", i) for i in (1, 2, 3)
    ] + [(f"{remote}/data/train-1.jsonl", i) for i in (1, 2, 3)]
    first = {root: _load(root) for root in (local, remote)}
    again = _load(remote)
    assert not first[remote].stats["from_cache"] and again.stats["from_cache"]
    assert len(first[remote]) == len(first[local]) == 10
    for ds in (again, first[remote]):
        for k, r in first[local].ragged.items():
            np.testing.assert_array_equal(ds.ragged[k].values, r.values)
            np.testing.assert_array_equal(ds.ragged[k].offsets, r.offsets)
    assert len(paths.glob(f"{remote}/cache/tokenized-*.npz")) == 1
    rejects = metrics.read_jsonl(f"{remote}/run/rejects.jsonl")
    assert [(r["source"], r["line"]) for r in rejects] == [(f"{remote}/data/train-1.jsonl", 4)]


def test_config_npz_and_free_space_in_a_bucket(tmp_path, bucket):
    local, remote = _roots(tmp_path)
    config = tiny.get_config()
    for root in (local, remote):
        train.save_config(config, f"{root}/run")
        paths.write_npz(f"{root}/a.npz", {"x": np.arange(5.0), "y": np.eye(2, dtype=np.int8)})
    name = train.CONFIG_FILENAME
    text = paths.as_path(f"{remote}/run/{name}").read_text()
    assert text == paths.as_path(f"{local}/run/{name}").read_text()
    assert json.loads(text)["batch_size"] == config.batch_size
    arrays = paths.read_npz(f"{remote}/a.npz")
    np.testing.assert_array_equal(arrays["x"], np.arange(5.0))
    assert arrays["y"].dtype == np.int8
    assert paths.free_bytes(remote) is None and paths.free_bytes(tmp_path) > 0
    message = str(guards.disk_full_error(f"{remote}/run", OSError(28, "No space left on device")))
    assert message.startswith(f"{remote}/run: disk full") and "GiB free" not in message


def test_checkpoints_in_a_bucket_roundtrip_and_drop_a_step_without_commit_marker(bucket, caplog):
    """Orbax in the bucket: arrays through tensorstore's GCS driver, the rest through epath."""
    run = f"{GS}/run"
    states = {s: make_state(s) for s in (2, 4)}
    with new_ckpt(run, async_save=False) as ckpt:
        for s, state in states.items():
            assert ckpt.maybe_save(s, state, {"i": s})
    assert any(k.startswith(f"{BUCKET}/run/checkpoints/4/state/") for k in bucket.store)
    paths.as_path(f"{run}/checkpoints/4/{resume.COMMIT_MARKER}").unlink()
    with caplog.at_level(logging.WARNING, logger="dpo_jax.checkpoint"), new_ckpt(run) as ckpt:
        restored = ckpt.restore_or_none(abstract_of(states[2]))
        # In a bucket the commit marker is Orbax's only sign of a finished step (no
        # atomic rename), so a step without it is an interrupted save: reported, and
        # removed by Orbax (on local disk it is moved aside, tests/test_checkpoint.py).
        assert [(s.step, s.reason) for s in ckpt.skipped] == [
            (4, "unfinished save (temporary directory)")
        ]
    assert restored.step == 2 and restored.data_state == {"i": 2}
    assert_trees_equal(restored.state, states[2])
    assert "checkpoints/4" in caplog.text
    assert [p.name for p in paths.as_path(f"{run}/checkpoints").iterdir()] == ["2"]
    # a full bucket: the message names the last step and its size, and no free space
    step_bytes = sum(len(f.getvalue()) for k, f in bucket.store.items() if "/checkpoints/2/" in k)
    assert paths.tree_bytes(f"{run}/checkpoints/2") == step_bytes > 0
    message = str(guards.disk_full_error(run, OSError(28, "No space left on device")))
    assert "step 2, is intact" in message and "storage quota or bucket full" in message
