"""Callbacks on log, eval and save; the optional Weights & Biases logger, offline."""

from __future__ import annotations

import importlib.util
import json
import struct

import jax
import numpy as np
import pytest

from dpo_jax import callbacks, train
from dpo_jax.configs import tiny
from dpo_jax.metrics import read_jsonl
from tests.train_helpers import synthetic_batches, tiny_model

HAS_WANDB = importlib.util.find_spec("wandb") is not None


def _norm(params) -> float:
    """A number of the params, computed on the host (the second code path)."""
    return float(
        np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(params)))
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run with callbacks (and W&B offline where wandb is installed)."""
    root = tmp_path_factory.mktemp("cb")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(root / "wandb_dir"))
    mp.setenv("WANDB_SILENT", "true")
    (root / "wandb_dir").mkdir()
    config = tiny.get_config()
    config.update_from_flattened_dict(
        {"run_dir": str(root / "run"), "batch_size": 2, "grad_accum_steps": 1,
         "reference.mode": "precomputed", "train.tensorboard": False, "train.eval_every": 2,
         "checkpoint.enabled": True, "checkpoint.save_every": 2, "checkpoint.async_save": False,
         "train.report_to": "wandb" if HAS_WANDB else ""}
    )  # fmt: skip
    batches = synthetic_batches(num=4, pairs=2, seed=1)
    for b in batches:
        b["ref_logps"] = np.zeros(b["input_ids"].shape[0], np.float32)
    seen: dict[str, list] = {"log": [], "eval": [], "save": []}
    cb = callbacks.Callbacks(
        on_log=lambda step, row: seen["log"].append(dict(row)),
        on_eval=lambda step, params: seen["eval"].append(step) or {"param_norm": _norm(params)},
        on_save=lambda step, path: seen["save"].append((step, path)),
    )
    model_config, params = tiny_model()
    try:
        result = train.train(
            config, train_data=batches, model_config=model_config, params=params, callbacks=cb
        )
    finally:
        mp.undo()
    return root, result, seen


def test_callbacks_on_log_eval_and_save(run):
    root, result, seen = run
    rows = read_jsonl(root / "run" / "metrics.jsonl")
    assert seen["log"] == rows  # every row written, train and eval, as written
    assert seen["eval"] == [2, 4]
    eval_rows = [r for r in rows if "param_norm" in r]
    assert [r["step"] for r in eval_rows] == [2, 4]
    # the last evaluation saw the final params: its metric equals the host's number
    assert eval_rows[-1]["param_norm"] == pytest.approx(_norm(result.state.params), rel=1e-6)
    assert [s for s, _ in seen["save"]] == [2, 4]
    for step, path in seen["save"]:
        assert path == root / "run" / "checkpoints" / str(step) and path.exists()


def _wandb_history(run_file) -> dict[int, dict]:
    """History rows of an offline W&B run file (LevelDB-log records of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, buf, out = run_file.read_bytes(), 7, b"", {}  # 7: the ":W&B" header
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # a block's padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                out[record.history.step.num] = {
                    k: v for k, v in items.items() if not k.startswith("_")
                }
    return out


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install -e '.[wandb]')")
def test_wandb_offline_history_equals_the_jsonl_metrics(run):
    import wandb

    root, _, _ = run
    wandb.teardown()  # the service writes the offline file out by the time it stops
    (run_file,) = (root / "wandb_dir").glob("wandb/offline-run-*/run-*.wandb")
    run_id = (root / "run" / "wandb_run_id").read_text()
    assert run_file.name == f"run-{run_id}.wandb"
    expected: dict[int, dict] = {}
    for row in read_jsonl(root / "run" / "metrics.jsonl"):  # a step's train and eval rows merge
        expected.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if k != "step" and not isinstance(v, bool)}
        )
    got = _wandb_history(run_file)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step, row in expected.items():
        assert got[step] == pytest.approx(row, rel=1e-12), step
