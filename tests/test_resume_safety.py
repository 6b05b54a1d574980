"""Issue 16, resume safety: no silent wrong resume, checksummed checkpoints, clean stops.

Unit tests on hand-built states and the loop; the loss-name refusal and the checksum
fallback also run through the real command line (`python -m dpo_jax.cli train`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import checkpoint, errors, guards, integrity, resume, train
from dpo_jax.configs import default, tiny
from dpo_jax.metrics import MetricsWriter, read_events, read_jsonl
from tests.train_helpers import synthetic_batches, tiny_model

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------ 1. math keys on resume


def _leaves() -> dict[str, object]:
    return resume._flatten(resume.to_jsonable(default.get_config()))


def _changed(value: object) -> object:
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_changed"
    if isinstance(value, list):
        return [*value, value[-1] if value else 1]
    if isinstance(value, dict):
        return {"added": 1}
    return "changed"


def _set(tree: dict, key: str, value: object) -> None:
    *parents, last = key.split(".")
    for p in parents:
        tree = tree[p]
    tree[last] = value


@pytest.mark.parametrize("key", sorted(_leaves()))
def test_every_default_config_key_refuses_resume_unless_listed_non_math(key):
    """Walks configs/default.py dynamically: a key added later is math (refuses) unless
    it is put on resume.NON_MATH_KEYS on purpose."""
    saved = resume.to_jsonable(default.get_config())
    now = json.loads(json.dumps(saved))
    _set(now, key, _changed(_leaves()[key]))
    diffs = resume.config_diff(saved, now)
    if key in resume.NON_MATH_KEYS:
        assert diffs == []
    else:
        assert [d[0] for d in diffs] == [key]


def test_non_math_list_names_only_existing_whole_keys():
    leaves = _leaves()
    assert [k for k in resume.NON_MATH_KEYS if k not in leaves] == []
    # The defect of issue 16: "name" matched as a segment hid loss.name and optim.name.
    for key in ("loss.name", "optim.name", "model.path", "data.train", "loss.hyper.beta"):
        assert key not in resume.NON_MATH_KEYS


def test_refused_resume_is_a_one_line_user_error(tmp_path):
    state = {"w": jnp.ones((4,), jnp.float32)}
    config = resume.to_jsonable(default.get_config())
    with checkpoint.Checkpointer(tmp_path, config=config) as ckpt:
        ckpt.maybe_save(1, state, force=True)
    config["loss"]["name"] = "ipo"
    with (
        checkpoint.Checkpointer(tmp_path, config=config) as ckpt,
        pytest.raises(errors.UserError) as e,
    ):
        ckpt.restore_or_none(jax.tree.map(checkpoint._as_abstract, state))
    assert isinstance(e.value, resume.ConfigMismatchError)
    assert "\n" not in str(e.value)
    assert "loss.name: checkpoint='sigmoid' now='ipo'" in str(e.value)


# ------------------------------------------------------------ 2. array fingerprints


def _numpy_fingerprint(x: np.ndarray) -> str:
    """Second code path: the two 32-bit sums computed on the host with Python ints."""
    x = np.asarray(x)
    words = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64)
    words = words.reshape(-1)
    weights = 2 * np.arange(words.size, dtype=np.uint64) + 1
    plain = int(words.sum()) % 2**32
    weighted = int((words * weights % 2**32).sum()) % 2**32
    return f"{x.dtype.name}:{plain:08x}{weighted:08x}"


def test_fingerprint_matches_a_host_computation_and_catches_a_bit_flip_and_a_swap():
    rng = np.random.default_rng(0)
    tree = {
        "a": rng.normal(size=(3, 5, 7)).astype(np.float32),
        "b": rng.normal(size=(64,)).astype(jnp.bfloat16),
        "c": np.arange(6, dtype=np.int32).reshape(2, 3),
        "s": np.float32(2.5),
    }
    fps = integrity.fingerprints(jax.tree.map(jnp.asarray, tree))
    assert fps == {k: _numpy_fingerprint(v) for k, v in tree.items()}

    flipped = tree["a"].copy()
    flipped.reshape(-1).view(np.uint8)[37] ^= 0x10  # one bit of one byte
    swapped = tree["a"].copy()
    swapped[0, 0, [1, 2]] = swapped[0, 0, [2, 1]]  # same words, other order
    for damaged in (flipped, swapped):
        bad, unverified = integrity.mismatches(fps, dict(tree, a=jnp.asarray(damaged)))
        assert bad == ["a"] and unverified == []
    # A leaf restored in another dtype cannot be compared: unverifiable, not "damaged".
    bad, unverified = integrity.mismatches(fps, dict(tree, c=tree["c"].astype(np.float32)))
    assert bad == [] and unverified == ["c"]


def _random_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    # Random bits do not compress: the array bytes lie verbatim in the data file.
    return {
        "params": {"w": jnp.asarray(rng.integers(0, 2**32, size=(64, 64), dtype=np.uint32))},
        "step": jnp.asarray(seed, jnp.int32),
    }


def _flip_byte_inside(step_dir: pathlib.Path, array: np.ndarray) -> pathlib.Path:
    """Flip one byte in the middle of `array`'s bytes in the step's data files."""
    needle = np.asarray(array).tobytes()[2000:2064]
    for path in sorted((step_dir / "state").rglob("*")):
        if path.is_file():
            data = bytearray(path.read_bytes())
            at = data.find(needle)
            if at >= 0:
                data[at + 10] ^= 0xFF
                path.write_bytes(bytes(data))
                return path
    raise AssertionError(f"array bytes not found in {step_dir}: Orbax's file format changed")


def test_flipped_byte_in_array_file_falls_back_to_previous_step_with_warning(tmp_path, caplog):
    states = {s: _random_state(s) for s in (2, 4)}
    with checkpoint.Checkpointer(tmp_path, config={"a": 1}) as ckpt:
        for s, state in states.items():
            ckpt.maybe_save(s, state, {"i": s}, force=True)
    _flip_byte_inside(tmp_path / "checkpoints" / "4", states[4]["params"]["w"])
    abstract = jax.tree.map(checkpoint._as_abstract, states[2])
    with (
        caplog.at_level(logging.WARNING, logger="dpo_jax.checkpoint"),
        checkpoint.Checkpointer(tmp_path, config={"a": 1}) as ckpt,
    ):
        restored = ckpt.restore_or_none(abstract)
    assert restored.step == 2
    np.testing.assert_array_equal(restored.state["params"]["w"], states[2]["params"]["w"])
    assert "ignoring checkpoint step 4" in caplog.text
    assert "checksum mismatch in 1 saved array(s) (params/w)" in caplog.text
    moved = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".skipped-" in p.name]
    assert [m.split("-")[0] for m in moved] == ["4.skipped"]
    assert "checksum" in moved[0]


# ------------------------------------------------------------ 5, 6. step metadata, Orbax names


def test_garbage_step_metadata_falls_back_to_previous_step(tmp_path, caplog):
    states = {s: _random_state(s) for s in (2, 4)}
    with checkpoint.Checkpointer(tmp_path, config={"a": 1}) as ckpt:
        for s, state in states.items():
            ckpt.maybe_save(s, state, force=True)
    (tmp_path / "checkpoints" / "4" / resume.STEP_METADATA).write_bytes(b"\xf1\x00\xff junk")
    with (
        caplog.at_level(logging.WARNING, logger="dpo_jax.checkpoint"),
        checkpoint.Checkpointer(tmp_path, config={"a": 1}) as ckpt,
    ):
        restored = ckpt.restore_or_none(jax.tree.map(checkpoint._as_abstract, states[2]))
    assert restored.step == 2
    assert "ignoring checkpoint step 4" in caplog.text and "unreadable step metadata" in caplog.text


def test_orbax_private_names_still_hold(tmp_path):
    """Fails when Orbax renames what checkpoint.py names: the step metadata file (read
    through Orbax's public `get_step_metadata`), the commit marker, the temporary suffix."""
    import orbax.checkpoint as ocp

    with checkpoint.Checkpointer(tmp_path, config={"a": 1}) as ckpt:
        ckpt.maybe_save(2, _random_state(2), force=True)
    step_dir = tmp_path / "checkpoints" / "2"
    assert (step_dir / resume.STEP_METADATA).is_file()
    assert ocp.metadata.get_step_metadata(step_dir).commit_timestamp_nsecs
    assert resume.step_problem(step_dir) is None
    assert (step_dir / resume.COMMIT_MARKER).is_file()
    (step_dir / resume.COMMIT_MARKER).unlink()
    assert not resume.is_committed(step_dir)
    tmp = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-99"
    tmp.mkdir()
    assert resume.unfinished_tmp_dirs(tmp_path / "checkpoints") == [tmp]


# ------------------------------------------------------------ loop-level: skip cap, SIGTERM


def _loop_config(run_dir: pathlib.Path | str, **train_keys: object):
    config = tiny.get_config()
    config.run_dir = str(run_dir)
    config.grad_accum_steps = 1
    config.batch_size = 2
    config.train.tensorboard = False
    config.reference.mode = "precomputed"
    for k, v in train_keys.items():
        config.train[k] = v
    return config


def _nan_batches(num: int, nan_from: int) -> list[dict]:
    batches = synthetic_batches(num=num, pairs=2, seed=1)
    for i, b in enumerate(batches):
        ref = np.zeros(b["input_ids"].shape[0], np.float32)
        if i + 1 >= nan_from:
            ref[:] = np.nan
        b["ref_logps"] = ref
    return batches


def test_skip_cap_rule(caplog):
    """More than MIN_SKIPS_BEFORE_STOP skips and more than the fraction of steps: stop."""
    assert train.MIN_SKIPS_BEFORE_STOP == 10
    with caplog.at_level(logging.WARNING, logger="dpo_jax.train"):
        train.check_skipped(3, {"skipped_steps": 1, "loss": float("nan")}, 0.1)  # 1 of 3
        train.check_skipped(100, {"skipped_steps": 10}, 0.1)  # at the minimum count
        train.check_skipped(200, {"skipped_steps": 20}, 0.1)  # at the fraction
        with pytest.raises(train.NonFiniteLossError, match="21 of 200 steps skipped"):
            train.check_skipped(200, {"skipped_steps": 21}, 0.1)
        with pytest.raises(train.NonFiniteLossError, match="11 of 11 steps skipped"):
            train.check_skipped(11, {"skipped_steps": 11}, 0.5)
    assert caplog.text.count("update skipped") == 5
    assert "step 3: non-finite loss or gradient (loss=nan" in caplog.text


@pytest.mark.heavy
def test_nan_skip_warns_every_skip_and_stops_past_the_cap(tmp_path, caplog):
    cfg, params = tiny_model()
    config = _loop_config(tmp_path, nan_policy="skip", max_skipped_fraction=0.1)
    config.num_steps = 30
    with (
        caplog.at_level(logging.WARNING, logger="dpo_jax.train"),
        pytest.raises(train.NonFiniteLossError, match="11 of 13 steps skipped") as e,
    ):
        train.train(config, train_data=_nan_batches(30, 3), model_config=cfg, params=params)
    assert "train.max_skipped_fraction=0.1" in str(e.value)
    skips = [r for r in caplog.records if "update skipped" in r.getMessage()]
    assert [r.getMessage().split(":")[0] for r in skips] == [f"step {s}" for s in range(3, 14)]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))  # step 13 raised before its row
    # One early skip among few steps is below the minimum count: the run goes on.
    config = _loop_config(tmp_path / "one", nan_policy="skip")
    config.num_steps = 4
    batches = _nan_batches(4, 2)
    for b in batches[2:]:
        b["ref_logps"][:] = 0.0
    result = train.train(config, train_data=batches, model_config=cfg, params=params)
    assert int(result.state.skipped_steps) == 1 and int(result.state.step) == 4


def test_sigterm_during_setup_checkpoints_at_the_first_step(tmp_path):
    cfg, params = tiny_model()
    config = _loop_config(tmp_path)
    config.num_steps = 6
    config.checkpoint.enabled = True
    config.checkpoint.save_every = 100
    config.checkpoint.async_save = False

    def batches():
        # train() reads the first batch before it builds the trainer, compiles, creates
        # the checkpointer or restores: a SIGTERM here is one "before the handler".
        os.kill(os.getpid(), signal.SIGTERM)
        yield from _nan_batches(6, 99)

    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: got.append(1))  # no fix: run goes on
    try:
        result = train.train(config, train_data=batches(), model_config=cfg, params=params)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert got == []  # train's own handler took it
    assert int(result.state.step) == 1
    assert checkpoint.Checkpointer(tmp_path, config=None).all_steps() == [1]


def test_early_sigterm_hands_over_and_a_later_one_goes_to_the_previous_handler():
    got: list[str] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: got.append("previous"))

    class Ckpt:
        def request_stop(self):
            got.append("request_stop")

    try:
        with guards.EarlySigterm() as early:
            os.kill(os.getpid(), signal.SIGTERM)
            assert early.received.is_set() and got == []
            early.hand_over(Ckpt())
            assert got == ["request_stop"]
            # What the checkpointer's "second SIGTERM: now" reaches: the handler before.
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == ["request_stop", "previous"]
        assert signal.getsignal(signal.SIGTERM) is not early._handler
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------ 4. refused resume writes nothing


def test_refused_resume_leaves_config_json_metrics_and_events_alone(tmp_path):
    cfg, params = tiny_model()
    config = _loop_config(tmp_path, tensorboard=True)
    config.num_steps = 1
    config.checkpoint.enabled = True
    config.checkpoint.async_save = False
    config.checkpoint.save_every = 1
    batches = _nan_batches(1, 99)
    train.train(config, train_data=batches, model_config=cfg, params=params)
    before = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file() and "checkpoints" not in p.parts
    }
    config.loss.hyper.beta = 0.5
    with pytest.raises(resume.ConfigMismatchError, match="loss.hyper.beta"):
        train.train(config, train_data=batches, model_config=cfg, params=params)
    after = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file() and "checkpoints" not in p.parts
    }
    assert after == before
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["hyper"]["beta"] == 0.1


# ------------------------------------------------------------ TensorBoard after a resume


def test_tensorboard_shows_one_curve_after_a_resume(tmp_path):
    run = tmp_path
    writer = MetricsWriter(run)
    for s in range(1, 7):
        writer.write(s, {"loss": s / 10, "rewards/accuracies": 0.5})
    writer.close()  # killed at step 6, last checkpoint at step 4
    assert resume.truncate_jsonl(run / "metrics.jsonl", 4) == 2
    writer = MetricsWriter(run)
    for s in range(5, 8):
        writer.write(s, {"loss": s / 10 + 1})
    writer.close()
    events = read_events(run / "tensorboard")
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    losses = [(s, v) for s, tag, v in events if tag == "loss"]
    expected = [(s, s / 10) for s in range(1, 5)] + [(s, s / 10 + 1) for s in range(5, 8)]
    assert [s for s, _ in losses] == [s for s, _ in expected]
    np.testing.assert_allclose([v for _, v in losses], [v for _, v in expected], rtol=1e-6)
    assert [s for s, tag, _ in events if tag == "rewards/accuracies"] == [1, 2, 3, 4]


# ------------------------------------------------------------ disk full


def test_disk_full_is_one_line_naming_the_run_dir_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch
):
    cfg, params = tiny_model()
    config = _loop_config(tmp_path, tensorboard=True)
    config.num_steps = 6
    config.checkpoint.enabled = True
    config.checkpoint.async_save = False
    config.checkpoint.save_every = 2
    real_save = checkpoint.Checkpointer.maybe_save

    def save(self, step, *args, **kwargs):
        if step >= 4:  # as Orbax reports it from its commit thread
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    def close(self):  # the metrics writer fails too, as on a really full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.Checkpointer, "maybe_save", save)
    monkeypatch.setattr(MetricsWriter, "close", close)
    with pytest.raises(guards.DiskFullError) as e:
        train.train(config, train_data=_nan_batches(6, 99), model_config=cfg, params=params)
    msg = str(e.value)
    assert isinstance(e.value, errors.UserError) and "\n" not in msg
    assert msg.startswith(f"{tmp_path}: disk full") and "No space left on device" in msg
    assert "free" in msg and "one checkpoint needs about" in msg
    assert "step 2, is intact" in msg
    assert resume.step_problem(tmp_path / "checkpoints" / "2") is None


# ------------------------------------------------------------ through the real command line


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A finished 4-step run of `python -m dpo_jax.cli train` with checkpoints at 2 and 4."""
    from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

    root = tmp_path_factory.mktemp("cli")
    model_dir = make_tiny_hf_model("llama", root / "model", tokenizer=train_tokenizer())
    rng = np.random.default_rng(0)
    rows = [
        {"prompt": f"Question {int(rng.integers(100))}: how are you?",
         "chosen": " I am " + str(rng.choice(["fine", "good", "great"])) + ".",
         "rejected": " The " + str(rng.choice(["no", "bad", "dog"])) + "."}
        for _ in range(16)
    ]  # fmt: skip
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [
        sys.executable, "-m", "dpo_jax.cli", "train", "--config", "dpo_jax/configs/tiny.py",
        f"--config.model.path={model_dir}", f"--config.data.train={root / 'train.jsonl'}",
        f"--config.run_dir={root / 'run'}", "--config.checkpoint.enabled=true",
        "--config.checkpoint.save_every=2", "--config.checkpoint.async_save=false",
        "--config.data.shuffle=false",
    ]  # fmt: skip
    out = _run(base)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, base


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.heavy
def test_cli_refuses_a_changed_loss_name_with_exit_2_and_leaves_the_run_alone(cli_run):
    root, base = cli_run
    run = root / "run"
    config_before = (run / "config.json").read_bytes()
    out = _run([*base, "--config.loss.name=ipo"])
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("dpo-jax: error:")]
    assert len(error_lines) == 1
    assert "loss.name: checkpoint='sigmoid' now='ipo'" in error_lines[0]
    assert (run / "config.json").read_bytes() == config_before


@pytest.mark.heavy
def test_cli_checksum_mismatch_falls_back_and_reruns_to_the_same_numbers(cli_run):
    root, base = cli_run
    run = root / "run"
    before = read_jsonl(run / "metrics.jsonl")
    # The damage: the middle byte of the latest step's largest array file flipped
    # (zstd-coded weights: most such flips decode silently to other numbers).
    files = [p for p in (run / "checkpoints" / "4" / "state").rglob("*") if p.parent.name == "d"]
    biggest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))

    out = _run(base)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "ignoring checkpoint step 4" in out.stderr
    assert "checksum mismatch in 1 saved array(s)" in out.stderr
    assert "resumed from step 2" in out.stderr
    after = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    for a, b in zip(before, after, strict=True):  # steps 3-4 rerun from step 2: same bits
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    steps = [s for s, tag, _ in read_events(run / "tensorboard") if tag == "loss"]
    assert steps == [1, 2, 3, 4]


# ------------------------------------------------------------ 3. data edited in place


def test_data_fingerprint_covers_token_ids_not_only_lengths():
    from dpo_jax.data.loader import make_train_iterator
    from dpo_jax.data.tokenize import Ragged, TokenizedDataset

    def dataset(chosen_first: list[int]) -> TokenizedDataset:
        ragged = {
            "prompt": Ragged.from_lists([[5, 6], [7]]),
            "chosen": Ragged.from_lists([chosen_first, [9]]),
            "rejected": Ragged.from_lists([[10], [11, 12]]),
        }
        return TokenizedDataset("paired", ragged, {})

    a, b = dataset([8, 8]), dataset([8, 13])  # same lengths, one token id differs
    np.testing.assert_array_equal(a.sequence_lengths(), b.sequence_lengths())
    state = make_train_iterator(a, 1, process_index=0, process_count=1).get_state()
    make_train_iterator(a, 1, process_index=0, process_count=1).set_state(state)
    with pytest.raises(errors.UserError, match="different data/batching setup"):
        make_train_iterator(b, 1, process_index=0, process_count=1).set_state(state)


@pytest.mark.heavy
def test_data_edited_in_place_with_the_same_token_lengths_is_refused(cli_run, capsys):
    from transformers import AutoTokenizer

    from dpo_jax import cli

    root, base = cli_run
    data = root / "edited.jsonl"
    text = (root / "train.jsonl").read_text()
    data.write_text(text)
    argv = [a for a in base[3:] if not a.startswith(("--config.data.train", "--config.run_dir"))]
    argv += [f"--config.data.train={data}", f"--config.run_dir={root / 'edited_run'}"]
    assert cli.console_main(argv) == 0
    # Change one letter of one chosen completion, keeping its token length (the old
    # length-only fingerprint could not tell the two files apart).
    tok = AutoTokenizer.from_pretrained(root / "model")
    old = next(w for w in ("fine", "good", "great") if f" I am {w}." in text)
    n_old = len(tok(f" I am {old}.")["input_ids"])
    new = next(
        cand
        for i in range(len(old))
        for c in "abcdefghijklmnopqrstuvwxyz"
        if (cand := old[:i] + c + old[i + 1 :]) != old
        and len(tok(f" I am {cand}.")["input_ids"]) == n_old
    )
    data.write_text(text.replace(f" I am {old}.", f" I am {new}.", 1))
    capsys.readouterr()
    assert cli.console_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "refusing to resume: the checkpointed data iterator belongs to a different" in err


@pytest.mark.heavy
def test_really_full_disk_on_a_tmpfs_is_one_line_and_resumes_after_freeing_space(tmp_path):
    """A 3 MiB tmpfs (needs root and Linux; skipped otherwise) fills up mid-run."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        cfg, params = tiny_model()
        config = _loop_config(mount_point / "run", tensorboard=True)
        config.num_steps = 40
        config.checkpoint.enabled = True
        config.checkpoint.save_every = 1
        config.checkpoint.keep_last = 0  # keep all: the disk must fill up
        batches = _nan_batches(40, 99)
        with pytest.raises(guards.DiskFullError) as e:
            train.train(config, train_data=batches, model_config=cfg, params=params)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{mount_point / 'run'}: disk full")
        last = int(msg.split("the last committed checkpoint, step ")[1].split(",")[0])
        assert 0 < last < 40
        assert resume.step_problem(mount_point / "run" / "checkpoints" / str(last)) is None
        subprocess.run(["mount", "-o", "remount,size=40m", str(mount_point)], check=True)
        result = train.train(config, train_data=batches, model_config=cfg, params=params)
        assert int(result.state.step) == 40
        assert [r["step"] for r in read_jsonl(mount_point / "run" / "metrics.jsonl")] == list(
            range(1, 41)
        )
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _flatten_values(tree: dict) -> list:
    return [v for v in resume._flatten(tree).values()]


def _drop(tree: dict, key: str) -> None:
    *parents, last = key.split(".")
    for p in parents:
        tree = tree[p]
    del tree[last]


def test_a_key_added_after_the_checkpoint_resumes_at_its_default_only():
    """A checkpoint written before a config key existed (`online.reward`, say) resumes when the
    run keeps that key's default (the old behaviour) and refuses when it changes it."""
    defaults = default.get_config()
    for key, value in sorted(_leaves().items()):
        saved = resume.to_jsonable(defaults)
        _drop(saved, key)
        if {} in _flatten_values(saved):  # the key's section had only it (loss.hyper)
            continue
        now = resume.to_jsonable(defaults)
        assert resume.config_diff(saved, now, defaults=defaults) == [], key
        if key in resume.NON_MATH_KEYS:
            continue
        assert [d[0] for d in resume.config_diff(saved, now)] == [key]  # no defaults: refuses
        _set(now, key, _changed(value))
        assert [d[0] for d in resume.config_diff(saved, now, defaults=defaults)] == [key]
