"""Issue 5 at the level of the train loop: kill / SIGTERM / corrupt / NaN, in subprocesses.

Each run is `python -m tests.test_checkpoint_loop RUN_DIR [flags]`: a tiny Llama-style
model trained with `dpo_jax.train.train` on synthetic batches from a resumable loader
(JSON `get_state()/set_state()`), checkpointing through `dpo_jax.checkpoint`. The
parent kills it from outside at a random step after the first checkpoint committed,
reruns the same command until it finishes, and compares with an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 10
SAVE_EVERY = 2
LOG_EVERY = 3  # deliberately not dividing SAVE_EVERY
# Timing fields differ between any two runs; everything else must match bit for bit.
TIMING_KEYS = ("tokens_per_second",)


# ------------------------------------------------------------------ the child run


class ResumableBatches:
    """Deterministic micro-batches with the loader protocol: iterable + get/set_state."""

    def __init__(self, batches: list[dict], sleep: float, nan_step: int | None):
        self.batches = batches
        self.index = 0
        self.sleep = sleep
        self.nan_step = nan_step

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])

    def __iter__(self):
        while self.index < len(self.batches):
            i = self.index
            self.index += 1
            batch = dict(self.batches[i])
            if self.nan_step is not None:
                # Precomputed reference log-probs: 0 everywhere, NaN on one step. A NaN
                # reference makes the loss and every gradient NaN at exactly that step.
                ref = np.zeros(batch["input_ids"].shape[0], np.float32)
                if i + 1 == self.nan_step:
                    ref[:] = np.nan
                batch["ref_logps"] = ref
            print(f"BATCH {i + 1}", flush=True)
            if self.sleep:
                time.sleep(self.sleep)
            yield batch


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--nan-step", type=int, default=None)
    parser.add_argument("--nan-policy", default="stop")
    parser.add_argument("--num-steps", type=int, default=NUM_STEPS)
    args = parser.parse_args(argv)

    import jax

    from dpo_jax import checkpoint, train
    from dpo_jax.configs import tiny
    from tests.train_helpers import synthetic_batches, tiny_model

    cfg, params0 = tiny_model()
    config = tiny.get_config()
    config.run_dir = args.run_dir
    config.num_steps = args.num_steps
    config.grad_accum_steps = 1
    config.batch_size = 2
    config.optim.learning_rate = 1e-2
    config.train.log_every = LOG_EVERY
    config.train.tensorboard = False
    config.train.nan_policy = args.nan_policy
    config.checkpoint.enabled = True
    config.checkpoint.save_every = SAVE_EVERY
    config.checkpoint.keep_last = 3
    config.checkpoint.async_save = True
    batches = synthetic_batches(num=args.num_steps, pairs=2, seed=1)
    loader = ResumableBatches(batches, args.sleep, args.nan_step)
    # train() builds its own checkpointer from config.checkpoint when it can (the path a
    # real run takes); otherwise hand it one.
    ckpt = None
    if not hasattr(train, "make_checkpointer"):
        ckpt = checkpoint.Checkpointer.from_config(config, model_config=cfg)
    try:
        result = train.train(
            config, train_data=loader, model_config=cfg, params=params0, checkpointer=ckpt
        )
    except train.NonFiniteLossError as e:
        print(f"NONFINITE {e}", flush=True)
        sys.exit(3)
    step = int(jax.device_get(result.state.step))
    preempted = step < args.num_steps
    print(f"DONE step={step} preempted={preempted}", flush=True)
    if not preempted:
        flat = {
            jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_leaves_with_path(result.state.params)
        }
        np.savez(pathlib.Path(args.run_dir) / "final_params.npz", **flat)
        skipped = int(jax.device_get(result.state.skipped_steps))
        (pathlib.Path(args.run_dir) / "final.json").write_text(json.dumps({"skipped": skipped}))


# ------------------------------------------------------------------ the parent side


def _cmd(run_dir: pathlib.Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "tests.test_checkpoint_loop", str(run_dir), *flags]


_COMPILE_CACHE: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _shared_compile_cache(tmp_path_factory):
    """One persistent XLA cache for every child run: each run after the first skips
    compilation (about 3x faster here); a cached executable computes the same bits."""
    _COMPILE_CACHE[:] = [str(tmp_path_factory.mktemp("xla_cache"))]
    yield
    _COMPILE_CACHE.clear()


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if _COMPILE_CACHE:
        env.update(
            JAX_COMPILATION_CACHE_DIR=_COMPILE_CACHE[0],
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return env


def run_to_end(run_dir: pathlib.Path, *flags: str, expect_rc: int = 0) -> str:
    proc = subprocess.run(
        _cmd(run_dir, *flags), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == expect_rc, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def committed(run_dir: pathlib.Path, step: int) -> bool:
    return (run_dir / "checkpoints" / str(step) / "commit_success.txt").is_file()


def run_and_signal(
    run_dir: pathlib.Path, sig: int, kill_step: int, after_commit: int, *flags: str
) -> tuple[int, str]:
    """Start a run, send `sig` once batch `kill_step` is drawn and step `after_commit`
    is committed; return (exit code, output)."""
    proc = subprocess.Popen(
        _cmd(run_dir, "--sleep", "0.25", *flags),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = []
    sent = False
    deadline = time.time() + 300
    for line in proc.stdout:
        out.append(line)
        if not sent and line.startswith("BATCH "):
            step = int(line.split()[1])
            if step >= kill_step and committed(run_dir, after_commit):
                proc.send_signal(sig)
                sent = True
        assert time.time() < deadline, "".join(out)[-3000:]
    rc = proc.wait(timeout=120)
    assert sent, "run ended before the signal could be sent:\n" + "".join(out)[-3000:]
    return rc, "".join(out)


def metrics_rows(run_dir: pathlib.Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_run(run_dir: pathlib.Path, reference: pathlib.Path) -> None:
    got = np.load(run_dir / "final_params.npz")
    want = np.load(reference / "final_params.npz")
    assert sorted(got.files) == sorted(want.files)
    for name in want.files:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    rows, ref_rows = metrics_rows(run_dir), metrics_rows(reference)
    assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
    assert rows == ref_rows


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(run_dir)
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 8, 10]  # keep_last=3 of the saves every 2 steps
    return run_dir


def test_checkpoint_holds_policy_not_frozen_reference(reference_run):
    """The frozen reference is the initial policy: rebuilt on resume, never saved."""
    tree = json.loads((reference_run / "checkpoints" / "10" / "state" / "_METADATA").read_text())
    kinds = {k: v["value_metadata"]["value_type"] for k, v in tree["tree_metadata"].items()}
    arrays = {k for k, kind in kinds.items() if kind == "jax.Array"}
    assert any(k.startswith("('params',") for k in arrays)
    assert any(k.startswith("('opt_state',") for k in arrays)
    assert "('rng',)" in arrays and "('step',)" in arrays
    # The field exists in TrainState but holds no data in the checkpoint.
    assert not any("ref_params" in k for k in arrays), sorted(arrays)
    saved = json.loads((reference_run / "checkpoints" / "10" / "data" / "metadata").read_text())
    assert saved == {"index": 10}


def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path, reference_run):
    rng = random.Random(os.environ.get("DPO_JAX_KILL_SEED", "5"))
    run_dir = tmp_path / "run"
    kill_step = rng.randint(SAVE_EVERY + 1, NUM_STEPS - 1)
    # Strict: the save just before the kill has committed, so resume starts from it.
    last_save = (kill_step - 1) // SAVE_EVERY * SAVE_EVERY
    rc, out = run_and_signal(run_dir, signal.SIGKILL, kill_step, last_save)
    assert rc == -signal.SIGKILL, out[-2000:]
    assert not (run_dir / "final_params.npz").exists()
    run_to_end(run_dir)
    assert_same_run(run_dir, reference_run)


@pytest.mark.heavy
def test_sigterm_saves_exits_cleanly_and_resumes_exactly(tmp_path, reference_run):
    rng = random.Random(os.environ.get("DPO_JAX_KILL_SEED", "7"))
    run_dir = tmp_path / "run"
    kill_step = rng.randint(SAVE_EVERY + 1, NUM_STEPS - 1)
    rc, out = run_and_signal(run_dir, signal.SIGTERM, kill_step, SAVE_EVERY)
    assert rc == 0, out[-3000:]
    done = [line for line in out.splitlines() if line.startswith("DONE ")]
    assert done and "preempted=True" in done[0], out[-2000:]
    stopped_at = int(done[0].split("step=")[1].split()[0])
    assert kill_step <= stopped_at < NUM_STEPS
    # The preemption save is the step the run stopped at, committed before exit.
    assert committed(run_dir, stopped_at)
    run_to_end(run_dir)
    assert_same_run(run_dir, reference_run)


@pytest.mark.parametrize(
    "damage", ["no_marker", pytest.param("truncated", marks=pytest.mark.heavy)]
)
@pytest.mark.heavy
def test_corrupt_latest_checkpoint_is_skipped_and_run_finishes(tmp_path, reference_run, damage):
    run_dir = tmp_path / "run"
    # Kill once step 6 is committed, then damage step 6: resume must use step 4.
    rc, out = run_and_signal(run_dir, signal.SIGKILL, 7, 6)
    assert rc == -signal.SIGKILL
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    latest = max(s for s in steps if committed(run_dir, s))
    step_dir = run_dir / "checkpoints" / str(latest)
    if damage == "no_marker":
        (step_dir / "commit_success.txt").unlink()
    else:
        files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
        biggest = max(files, key=lambda p: p.stat().st_size)
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size // 3)
    out = run_to_end(run_dir)
    assert f"ignoring checkpoint step {latest}" in out, out[-3000:]
    moved = [p.name for p in (run_dir / "checkpoints").iterdir() if ".skipped-" in p.name]
    assert any(name.startswith(f"{latest}.skipped-") for name in moved), moved
    assert_same_run(run_dir, reference_run)


NAN_STEP = 5


@pytest.mark.heavy
def test_nan_stop_keeps_good_checkpoints_then_skip_resumes(tmp_path):
    """stop: clear error naming the step, no checkpoint after it, the rest load; then
    resuming the same run with nan_policy=skip equals a run that skipped from the start."""
    run_dir = tmp_path / "run"
    out = run_to_end(run_dir, "--nan-step", str(NAN_STEP), "--nan-policy", "stop", expect_rc=3)
    assert f"step {NAN_STEP}: non-finite loss or gradient" in out, out[-3000:]
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < NAN_STEP, steps
    assert all(committed(run_dir, s) for s in steps)
    from dpo_jax import checkpoint

    for s in steps:
        _, meta, params = checkpoint.load_params(run_dir, step=s)
        assert meta["step"] == s
        assert all(np.isfinite(np.asarray(x)).all() for x in jax_leaves(params))

    out = run_to_end(run_dir, "--nan-step", str(NAN_STEP), "--nan-policy", "skip")
    assert json.loads((run_dir / "final.json").read_text()) == {"skipped": 1}
    rows = {r["step"]: r for r in metrics_rows(run_dir)}
    assert rows[NAN_STEP]["nonfinite"] == 1 and rows[NAN_STEP]["skipped_steps"] == 1
    assert rows[NAN_STEP - 1]["nonfinite"] == 0 and rows[NUM_STEPS]["skipped_steps"] == 1

    fresh = tmp_path / "fresh_skip"
    run_to_end(fresh, "--nan-step", str(NAN_STEP), "--nan-policy", "skip")
    assert_same_run(run_dir, fresh)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.mark.heavy
@pytest.mark.parametrize("seed", range(3))
def test_repeated_sigkills_at_random_steps(tmp_path, reference_run, seed):
    """Killed three times at random points (some during async saves), rerun each time."""
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    first_commit = SAVE_EVERY
    for _ in range(3):
        kill_step = rng.randint(first_commit + 1, NUM_STEPS)
        proc_rc, _ = run_and_signal(run_dir, signal.SIGKILL, kill_step, first_commit)
        if proc_rc == 0:
            break
    if not (run_dir / "final_params.npz").exists():
        run_to_end(run_dir)
    assert_same_run(run_dir, reference_run)


if __name__ == "__main__":
    _child(sys.argv[1:])
