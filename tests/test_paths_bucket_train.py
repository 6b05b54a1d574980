"""A whole `dpo-jax train` with its run directory, data and caches in a bucket, killed and
resumed, ends bit-identical to an uninterrupted run on local disk.

The bucket is `tests.fake_gcs`: one in-memory store behind both production routes to
GCS (fsspec for `dpo_jax.paths`, tensorstore's own GCS driver for Orbax's arrays). Only
the model directory is local (transformers reads local files).
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from dpo_jax import metrics, paths, train
from dpo_jax.configs import tiny
from tests.fake_gcs import BUCKET, fake_gcs
from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer
from tests.train_helpers import flat_params

GS = f"gs://{BUCKET}"
TIMING = ("tokens_per_second",)  # wall clock: differs between any two runs


class Killed(Exception):
    """Stands for the process dying: raised inside the loop, after a checkpoint."""


def _rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    good, bad = ["fine", "good", "great", "happy"], ["no", "bad", "lazy", "dog"]
    return [
        {"prompt": f"Question {int(rng.integers(100))}: how are you?",
         "chosen": " I am " + str(rng.choice(good)) + ".",
         "rejected": " The " + str(rng.choice(bad)) + "."}
        for _ in range(n)
    ]  # fmt: skip


def _write_data(root: str) -> None:
    """Two training shards (read through a glob) and an eval file under `root`."""
    for name, rows in (
        ("train-0.jsonl", _rows(8, 0)),
        ("train-1.jsonl", _rows(8, 1)),
        ("eval.jsonl", _rows(4, 2)),
    ):
        path = paths.as_path(f"{root}/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _config(model_dir, root: str, run_dir: str):
    config = tiny.get_config()
    config.model.path = str(model_dir)
    config.data.train = f"{root}/data/train-*.jsonl"
    config.data.eval = f"{root}/data/eval.jsonl"
    config.data.cache_dir = f"{root}/cache"
    config.run_dir = run_dir
    config.reference.mode = "cache"  # first-pass reference log-probs cached in run_dir
    config.num_steps = 4
    config.train.eval_every = 2
    config.checkpoint.enabled = True
    config.checkpoint.save_every = 2
    config.checkpoint.export_hf = True
    return config


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The tiny model (a local directory) and an uninterrupted run on local disk."""
    root = tmp_path_factory.mktemp("bucket_train")
    model_dir = make_tiny_hf_model("llama", root / "model", tokenizer=train_tokenizer())
    local_root = str(root / "local")
    _write_data(f"{local_root}/data")
    return model_dir, local_root, train.train(_config(model_dir, local_root, f"{local_root}/run"))


@pytest.mark.heavy
@pytest.mark.parametrize("kill", ["crash", "sigterm"])
def test_train_in_a_bucket_killed_and_resumed_matches_an_uninterrupted_local_run(
    local_run, kill, tmp_path, monkeypatch
):
    """crash: the process dies in step 3, after the checkpoint of step 2 (step 3 is lost
    and its logged row must go); sigterm: a spot VM's preemption notice in step 3 (the
    run saves step 3 out of schedule and exits cleanly)."""
    model_dir, local_root, full = local_run
    monkeypatch.chdir(tmp_path)  # a bucket path mistaken for a local one would land here

    with fake_gcs(monkeypatch) as bucket:
        _write_data(f"{GS}/data")
        run_dir = f"{GS}/runs/part"
        real_write = metrics.MetricsWriter.write

        def dying_write(self, step, values):
            row = real_write(self, step, values)
            if step == 3 and "loss" in values:
                if kill == "crash":
                    raise Killed
                os.kill(os.getpid(), signal.SIGTERM)  # through the run's preemption handler
            return row

        monkeypatch.setattr(metrics.MetricsWriter, "write", dying_write)
        if kill == "crash":
            with pytest.raises(Killed):
                train.train(_config(model_dir, GS, run_dir))
            killed_rows = metrics.read_jsonl(f"{run_dir}/metrics.jsonl")
            assert 3 in [r["step"] for r in killed_rows]  # the lost step was logged
        else:
            stopped = train.train(_config(model_dir, GS, run_dir))
            assert [r["step"] for r in stopped.history] == [1, 2, 3]
        monkeypatch.setattr(metrics.MetricsWriter, "write", real_write)

        resumed = train.train(_config(model_dir, GS, run_dir))

        # The resumed run redid only what the killed one had not checkpointed.
        assert [r["step"] for r in resumed.history] == ([3, 4] if kill == "crash" else [4])
        for name in ("params", "opt_state"):
            np.testing.assert_array_equal(
                flat_params(getattr(resumed.state, name)), flat_params(getattr(full.state, name))
            )
        # metrics.jsonl reads as one uninterrupted run: step 3 of the killed run was trimmed.
        rows = metrics.read_jsonl(f"{run_dir}/metrics.jsonl")
        local_rows = metrics.read_jsonl(f"{local_root}/run/metrics.jsonl")
        assert [r["step"] for r in rows] == [r["step"] for r in local_rows]
        assert _comparable(rows) == _comparable(local_rows)
        # TensorBoard: one event file, rebuilt on resume, same scalars as the local run.
        assert len(paths.glob(f"{run_dir}/tensorboard/events.out.tfevents.*")) == 1
        events = metrics.read_events(f"{run_dir}/tensorboard")
        local_events = metrics.read_events(f"{local_root}/run/tensorboard")
        assert [e for e in events if e[1] not in TIMING] == [
            e for e in local_events if e[1] not in TIMING
        ]

        # Everything the run wrote is in the bucket: checkpoints (Orbax arrays through
        # tensorstore's GCS driver), config, caches, tokenizer, HF export.
        keys = sorted(bucket.store)
        ckpt = f"{BUCKET}/runs/part/checkpoints"
        saved = {k.split("/")[4] for k in keys if k.startswith(ckpt + "/")}
        assert saved == ({"2", "4"} if kill == "crash" else {"2", "3", "4"})
        assert any(k.startswith(f"{ckpt}/4/state/") and "/d/" in k for k in keys)
        assert json.loads(paths.as_path(f"{run_dir}/config.json").read_text())["run_dir"] == run_dir
        # one tokenized cache file each for train and eval: the resumed run hit them
        assert len(paths.glob(f"{GS}/cache/tokenized-*.npz")) == 2
        assert paths.glob(f"{run_dir}/ref_logps_*.npz")
        assert paths.as_path(f"{run_dir}/tokenizer/tokenizer.json").exists()
        assert paths.as_path(f"{run_dir}/hf/model.safetensors").exists()
        assert os.listdir(tmp_path) == []
