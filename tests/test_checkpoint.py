"""Unit tests of dpo_jax.checkpoint on hand-built train states (no train loop needed)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpo_jax import checkpoint, resume

CONFIG = {
    "model": {"hidden": 32, "layers": 2},
    "loss": {"name": "dpo", "beta": 0.1},
    "optimizer": {"name": "adamw", "lr": 1e-3},
    "batch_size": 4,
    "seed": 0,
    "train": {"log_every": 1},
    "checkpoint": {"save_every": 2},
}


def make_state(seed: int = 0) -> dict:
    """params + Adam state + typed PRNG key + step, as a train loop would hold them."""
    rng = np.random.default_rng(seed)
    params = {
        "embed": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
        "layer": {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.bfloat16)},
    }
    opt_state = optax.adamw(1e-3).init(params)
    # One real update so mu/nu/count are not their trivial initial values.
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt_state = optax.adamw(1e-3).update(grads, opt_state, params)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(seed, jnp.int32),
        "rng": jax.random.fold_in(jax.random.key(42), seed),
    }


def assert_trees_equal(a, b) -> None:
    la, ta = jax.tree.flatten(checkpoint._keys_to_data(a))
    lb, tb = jax.tree.flatten(checkpoint._keys_to_data(b))
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def abstract_of(state):
    return jax.tree.map(checkpoint._as_abstract, state)


def new_ckpt(run_dir, config=CONFIG, **opts) -> checkpoint.Checkpointer:
    opts.setdefault("save_every", 2)
    opts.setdefault("keep_last", 10)
    return checkpoint.Checkpointer(
        run_dir, options=checkpoint.CheckpointOptions(**opts), config=config
    )


def test_roundtrip_is_bit_exact_and_keeps_key_type(tmp_path):
    state = make_state(3)
    with new_ckpt(tmp_path) as ckpt:
        assert ckpt.restore_or_none(abstract_of(state)) is None
        assert ckpt.maybe_save(4, state, {"epoch": 1, "index": 17}, extra={"nan_skips": 2})
        ckpt.wait()
    with new_ckpt(tmp_path) as ckpt:
        restored = ckpt.restore_or_none(abstract_of(make_state(0)))
    assert restored is not None and restored.step == 4
    assert_trees_equal(restored.state, state)
    assert jax.dtypes.issubdtype(restored.state["rng"].dtype, jax.dtypes.prng_key)
    assert restored.data_state == {"epoch": 1, "index": 17}
    assert restored.extra == {"nan_skips": 2}
    assert restored.config["optimizer"]["lr"] == 1e-3
    # Same key => same random numbers after resume.
    np.testing.assert_array_equal(
        jax.random.normal(restored.state["rng"], (3,)), jax.random.normal(state["rng"], (3,))
    )


def test_bytes_data_state_roundtrip(tmp_path):
    state = make_state()
    blob = bytes(range(256))
    with new_ckpt(tmp_path) as ckpt:
        ckpt.maybe_save(2, state, blob)
    with new_ckpt(tmp_path) as ckpt:
        assert ckpt.restore_or_none(abstract_of(state)).data_state == blob


def test_save_interval_and_retention(tmp_path):
    state = make_state()
    with new_ckpt(tmp_path, save_every=2, keep_last=2, keep_every=4) as ckpt:
        started = [s for s in range(1, 13) if ckpt.maybe_save(s, state, {"i": s})]
        # A forced save off the interval, then a repeat of an existing step (no-op).
        assert ckpt.maybe_save(13, state, {"i": 13}, force=True)
        assert not ckpt.maybe_save(13, state, {"i": 13}, force=True)
        ckpt.wait()
        steps = ckpt.all_steps()
    assert started == [2, 4, 6, 8, 10, 12]
    # keep_last=2 keeps {12, 13}; keep_every=4 also keeps 4 and 8.
    assert steps == [4, 8, 12, 13]
    assert (
        sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
        == steps
    )


def _save_steps(run_dir, steps, **opts):
    states = {}
    with new_ckpt(run_dir, **opts) as ckpt:
        for s in steps:
            states[s] = make_state(s)
            assert ckpt.maybe_save(s, states[s], {"i": s}, force=True)
    return states


def test_markerless_latest_is_skipped_reported_and_moved(tmp_path, caplog):
    states = _save_steps(tmp_path, [2, 4])
    (tmp_path / "checkpoints" / "4" / resume.COMMIT_MARKER).unlink()
    with caplog.at_level(logging.WARNING, logger="dpo_jax.checkpoint"), new_ckpt(tmp_path) as ckpt:
        restored = ckpt.restore_or_none(abstract_of(states[2]))
        assert restored.step == 2
        assert_trees_equal(restored.state, states[2])
        assert [s.step for s in ckpt.skipped] == [4]
        assert "commit marker" in ckpt.skipped[0].reason
        assert "step 4" in caplog.text and "commit marker" in caplog.text
        # The bad step is out of Orbax's way: the run can save step 4 again.
        assert ckpt.all_steps() == [2]
        assert ckpt.maybe_save(4, states[4], {"i": 4})
        ckpt.wait()
    moved = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".skipped-" in p.name]
    assert len(moved) == 1 and moved[0].startswith("4.skipped-incomplete")
    with new_ckpt(tmp_path) as ckpt:
        assert_trees_equal(ckpt.restore_or_none(abstract_of(states[2])).state, states[4])


@pytest.mark.parametrize("damage", ["truncate_array_file", "delete_state_metadata", "garble_meta"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage):
    states = _save_steps(tmp_path, [2, 4, 6])
    step_dir = tmp_path / "checkpoints" / "6"
    if damage == "truncate_array_file":
        # The merged OCDBT data files restore reads (per-process ones are merged at commit).
        files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
        biggest = max(files, key=lambda p: p.stat().st_size)
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size // 2)
    elif damage == "delete_state_metadata":
        (step_dir / "state" / "_METADATA").unlink()
    else:
        (step_dir / "meta" / "metadata").write_text('{"format": 1, "conf')
    with new_ckpt(tmp_path) as ckpt:
        restored = ckpt.restore_or_none(abstract_of(states[2]))
        assert [s.step for s in ckpt.skipped] == [6]
        assert ckpt.all_steps() == [2, 4]
    assert restored.step == 4
    assert_trees_equal(restored.state, states[4])
    assert restored.data_state == {"i": 4}


def test_all_steps_bad_gives_none(tmp_path):
    states = _save_steps(tmp_path, [2])
    (tmp_path / "checkpoints" / "2" / resume.COMMIT_MARKER).unlink()
    with new_ckpt(tmp_path) as ckpt:
        assert ckpt.restore_or_none(abstract_of(states[2])) is None
        assert [s.step for s in ckpt.skipped] == [2]


def test_unfinished_tmp_dir_is_ignored_and_reported(tmp_path):
    states = _save_steps(tmp_path, [2])
    tmp_dir = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
    (tmp_dir / "state").mkdir(parents=True)
    with new_ckpt(tmp_path) as ckpt:
        assert [s.step for s in ckpt.skipped] == [4]
        assert ckpt.restore_or_none(abstract_of(states[2])).step == 2


def test_changed_math_config_refuses_with_list_of_differences(tmp_path):
    states = _save_steps(tmp_path, [2])
    changed = json.loads(json.dumps(CONFIG))
    changed["optimizer"]["lr"] = 2e-3
    changed["loss"]["beta"] = 0.5
    changed["batch_size"] = 8
    changed["train"]["log_every"] = 10  # not math: never blocks
    changed["checkpoint"]["save_every"] = 5  # not math
    with (
        new_ckpt(tmp_path, config=changed) as ckpt,
        pytest.raises(resume.ConfigMismatchError) as e,
    ):
        ckpt.restore_or_none(abstract_of(states[2]))
    msg = str(e.value)
    assert "optimizer.lr: checkpoint=0.001 now=0.002" in msg
    assert "loss.beta: checkpoint=0.1 now=0.5" in msg
    assert "batch_size: checkpoint=4 now=8" in msg
    assert "log_every" not in msg and "save_every" not in msg
    assert str(tmp_path / "checkpoints" / "2") in msg
    # The refused step is left alone, not treated as corrupt.
    assert (tmp_path / "checkpoints" / "2").is_dir()
    with new_ckpt(tmp_path, config=changed, force_resume=True) as ckpt:
        assert ckpt.restore_or_none(abstract_of(states[2])).step == 2


def test_non_math_changes_resume(tmp_path):
    states = _save_steps(tmp_path, [2])
    changed = dict(
        CONFIG, train={"log_every": 7}, run_dir="/elsewhere", checkpoint={"save_every": 9}
    )
    with new_ckpt(tmp_path, config=changed) as ckpt:
        assert ckpt.restore_or_none(abstract_of(states[2])).step == 2


def test_config_diff_reports_added_and_removed_keys():
    diffs = resume.config_diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"d": 3}})
    assert diffs == [("b.c", 2, "<absent>"), ("b.d", "<absent>", 3)]


def test_restore_into_target_sharding(tmp_path):
    state = make_state(1)
    with new_ckpt(tmp_path) as ckpt:
        ckpt.maybe_save(2, state, None, force=True)
    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    abstract = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
            if x.ndim
            else jax.ShapeDtypeStruct(
                x.shape,
                x.dtype,
                sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
            )
        ),
        state,
    )
    with new_ckpt(tmp_path) as ckpt:
        restored = ckpt.restore_or_none(abstract)
    assert restored.state["params"]["embed"].sharding == sharding
    assert_trees_equal(restored.state, state)


def test_sigterm_sets_preempted_and_forces_save(tmp_path):
    state = make_state()
    previous = signal.getsignal(signal.SIGTERM)
    with new_ckpt(tmp_path, save_every=100) as ckpt:
        assert not ckpt.preempted
        os.kill(os.getpid(), signal.SIGTERM)
        assert ckpt.preempted
        # Step 3 is not on the interval, but a pending preemption forces the save.
        assert ckpt.maybe_save(3, state, {"i": 3})
        ckpt.wait()
        assert ckpt.all_steps() == [3]
    assert signal.getsignal(signal.SIGTERM) == previous


def test_truncate_jsonl_drops_later_steps_and_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": s / 10} for s in range(1, 7)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo'
    path.write_text(text)
    assert resume.truncate_jsonl(path, 4) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:4]
    assert resume.truncate_jsonl(path, 4) == 0
    assert resume.truncate_jsonl(tmp_path / "absent.jsonl", 4) == 0


def test_truncate_jsonl_moves_a_garbage_middle_line_aside_naming_it(tmp_path, caplog):
    """A metrics line that is not JSON must not block a resume, nor vanish: it is moved to
    metrics.jsonl.bad-lines with a warning naming file and line."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\nnot json\n{"step": 2}\n\xf1\xff\n{"step": 3}\n')
    with caplog.at_level(logging.WARNING, logger="dpo_jax.checkpoint"):
        assert resume.truncate_jsonl(path, 2) == 3  # two bad lines + step 3
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert (tmp_path / "metrics.jsonl.bad-lines").read_bytes() == b"not json\n\xf1\xff\n"
    assert "metrics.jsonl:2: not a JSON line" in caplog.text
    assert "metrics.jsonl:4: not a JSON line" in caplog.text


def test_options_validation():
    with pytest.raises(ValueError, match="save_every"):
        checkpoint.CheckpointOptions(save_every=0)
    with pytest.raises(ValueError, match="keep_last"):
        checkpoint.CheckpointOptions(keep_last=0)


def test_tokenizer_dir_copied_once(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"x": 1}')
    (src / "tokenizer_config.json").write_text("{}")
    (src / "model.safetensors").write_text("weights are not copied")
    run = tmp_path / "run"
    ckpt = checkpoint.Checkpointer(run, config=CONFIG, tokenizer=src)
    ckpt.close()
    assert sorted(p.name for p in (run / "tokenizer").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert pathlib.Path(run / "tokenizer" / "tokenizer.json").read_text() == '{"x": 1}'


def test_from_config_reads_checkpoint_section(tmp_path):
    import ml_collections

    config = ml_collections.ConfigDict(
        {
            "run_dir": str(tmp_path / "run"),
            "seed": 1,
            "checkpoint": {"save_every": 3, "keep_last": 0, "keep_every": 6, "async_save": False},
        }
    )
    with checkpoint.Checkpointer.from_config(config) as ckpt:
        assert ckpt.options == checkpoint.CheckpointOptions(
            save_every=3, keep_last=None, keep_every=6, async_save=False, force_resume=False
        )
        assert ckpt.directory == checkpoint.as_path(tmp_path / "run" / "checkpoints")
        assert ckpt.config == {
            "run_dir": str(tmp_path / "run"),
            "seed": 1,
            "checkpoint": {"save_every": 3, "keep_last": 0, "keep_every": 6, "async_save": False},
        }
        assert not ckpt.should_save(2) and ckpt.should_save(3)
    config.run_dir = ""
    with pytest.raises(ValueError, match="run_dir"):
        checkpoint.Checkpointer.from_config(config)


def test_tokenizer_object_saved_with_save_pretrained(tmp_path, tokenizer):
    run = tmp_path / "run"
    checkpoint.Checkpointer(run, config=CONFIG, tokenizer=tokenizer).close()
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert again("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    assert not list(run.glob("tokenizer.tmp-*"))


def test_truncate_in_place_keeps_an_open_append_handle_working(tmp_path):
    path = tmp_path / "metrics.jsonl"
    handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- like MetricsWriter
    for s in range(1, 6):
        handle.write(json.dumps({"step": s}) + "\n")
    handle.flush()
    assert resume.truncate_jsonl(path, 2) == 3
    handle.write(json.dumps({"step": 3, "again": True}) + "\n")
    handle.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"step": 1},
        {"step": 2},
        {"step": 3, "again": True},
    ]


def test_restore_truncates_the_runs_metrics_file(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    state = make_state()
    opts = checkpoint.CheckpointOptions(save_every=2)
    with checkpoint.Checkpointer(tmp_path, options=opts, config=CONFIG, metrics_path=metrics) as c:
        assert c.restore_or_none(abstract_of(state)) is None
    assert metrics.read_text() == ""  # nothing checkpointed: a rerun starts from scratch
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    with checkpoint.Checkpointer(tmp_path, options=opts, config=CONFIG, metrics_path=metrics) as c:
        c.maybe_save(4, state, None)
    with checkpoint.Checkpointer(tmp_path, options=opts, config=CONFIG, metrics_path=metrics) as c:
        assert c.restore_or_none(abstract_of(state)).step == 4
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_state_of_another_shape_refuses_and_leaves_checkpoint_alone(tmp_path):
    states = _save_steps(tmp_path, [2])
    other = make_state()
    other["params"]["embed"] = jnp.zeros((32, 8), jnp.float32)  # a bigger vocabulary
    del other["params"]["layer"]
    with new_ckpt(tmp_path) as ckpt, pytest.raises(checkpoint.CheckpointError) as e:
        ckpt.restore_or_none(abstract_of(other))
    msg = str(e.value)
    assert "params/embed: checkpoint shape (16, 8) != state shape (32, 8)" in msg
    assert "params/layer/w: in the checkpoint, not in the state" in msg
    assert str(tmp_path / "checkpoints" / "2") in msg
    with new_ckpt(tmp_path) as ckpt:
        assert ckpt.all_steps() == [2] and not ckpt.skipped
        assert_trees_equal(ckpt.restore_or_none(abstract_of(states[2])).state, states[2])
