"""Grain loader: per-epoch shuffling, fake multi-host sharding, exact resume in a new process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpo_jax.data.loader import eval_batches, make_train_iterator
from dpo_jax.data.tokenize import Ragged, TokenizedDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic(n: int = 10, kind: str = "paired") -> TokenizedDataset:
    """Example i has prompt [100 + i, ...] (so batches reveal which examples they hold)."""
    rng = np.random.default_rng(123)
    prompts = [[100 + i] + rng.integers(1, 50, i % 3).tolist() for i in range(n)]
    if kind == "paired":
        ragged = {
            "prompt": Ragged.from_lists(prompts),
            "chosen": Ragged.from_lists(
                [rng.integers(1, 50, 1 + i % 4).tolist() for i in range(n)]
            ),
            "rejected": Ragged.from_lists(
                [rng.integers(1, 50, 1 + i % 5).tolist() for i in range(n)]
            ),
        }
        return TokenizedDataset("paired", ragged, {})
    ragged = {
        "prompt": Ragged.from_lists(prompts),
        "completion": Ragged.from_lists(
            [rng.integers(1, 50, 1 + i % 4).tolist() for i in range(n)]
        ),
    }
    return TokenizedDataset("unpaired", ragged, {"label": np.arange(n, dtype=np.int32) % 2})


def example_ids(batch, pairs: int) -> list[int]:
    """The example of each chosen (paired) row, read off the prompt's first token."""
    return (batch["input_ids"][:pairs, 0] - 100).tolist()


def _it(ds, **kw):
    args = dict(pairs_per_batch=4, layout="stacked", buckets=None, seed=3, process_index=0,
                process_count=1)  # fmt: skip
    args.update(kw)
    return make_train_iterator(ds, **args)


def test_each_epoch_is_a_fresh_permutation():
    ds = synthetic(8)
    it = _it(ds, num_epochs=3)
    epochs = []
    for _ in range(3):
        seen = example_ids(next(it), 4) + example_ids(next(it), 4)
        assert sorted(seen) == list(range(8))  # every example exactly once per epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    with pytest.raises(StopIteration):
        next(it)
    # Same seed -> same order; another seed -> another order.
    again = _it(ds, num_epochs=1)
    assert example_ids(next(again), 4) == epochs[0][:4]
    other = _it(ds, num_epochs=1, seed=4)
    assert example_ids(next(other), 4) + example_ids(next(other), 4) != epochs[0]


def test_no_shuffle_keeps_order_and_drops_remainder():
    it = _it(synthetic(10), shuffle=False, num_epochs=1)
    assert example_ids(next(it), 4) == [0, 1, 2, 3]
    assert example_ids(next(it), 4) == [4, 5, 6, 7]
    with pytest.raises(StopIteration):  # 10 // 4 = 2 full batches
        next(it)


@pytest.mark.parametrize("layout", ["stacked", "packed", "prefix_shared"])
def test_two_fake_hosts_split_the_global_batch(layout):
    ds = synthetic(12)
    one = _it(ds, layout=layout)
    h0 = _it(ds, layout=layout, process_index=0, process_count=2)
    h1 = _it(ds, layout=layout, process_index=1, process_count=2)
    for _ in range(4):
        g, a, b = next(one), next(h0), next(h1)
        # Both hosts build the same shapes (lengths chosen from the global batch).
        for k in a:
            assert a[k].shape == b[k].shape, k
        assert a["input_ids"].shape[1] == g["input_ids"].shape[1]
        if layout == "stacked":
            assert example_ids(a, 2) + example_ids(b, 2) == example_ids(g, 4)
        scored = lambda x: sorted(np.unique(x["sequence_index"][x["sequence_index"] >= 0]))
        assert scored(a) == scored(b) == [0, 1, 2, 3]


def test_unpaired_batches_carry_labels():
    ds = synthetic(6, "unpaired")
    b = next(_it(ds, pairs_per_batch=3, shuffle=False))
    assert b["labels"].tolist() == [0, 1, 0] and b["input_ids"].shape[0] == 6


def test_state_is_json_and_checked():
    ds = synthetic(8)
    it = _it(ds)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    with pytest.raises(ValueError, match="different data/batching setup"):
        _it(ds, seed=99).set_state(state)


RESUME_SCRIPT = r"""
import json, sys
import numpy as np
from dpo_jax.data.loader import eval_batches, make_train_iterator
from dpo_jax.data.tokenize import TokenizedDataset
data_path, state_path, out_path, layout = sys.argv[1:5]
ds = TokenizedDataset.load(data_path)
it = make_train_iterator(ds, 4, layout, None, 7, process_index=0, process_count=1)
with open(state_path) as f:
    it.set_state(json.load(f))
arrays = {}
for i in range(3):
    for k, v in next(it).items():
        arrays[f"{i}/{k}"] = v
np.savez(out_path, **arrays)
"""


@pytest.mark.parametrize("layout", ["stacked", "packed"])
def test_resume_in_a_new_process(tmp_path, layout):
    ds = synthetic(10)
    data_path = str(tmp_path / "data.npz")
    ds.save(data_path)
    it = make_train_iterator(ds, 4, layout, None, 7, process_index=0, process_count=1)
    for _ in range(4):  # crosses the epoch boundary (2 steps per epoch)
        next(it)
    state_path = tmp_path / "state.json"
    state_path.write_text(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]

    out = tmp_path / "next.npz"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, data_path, str(state_path), str(out), layout],
        check=True,
        env=env,
        timeout=120,
    )
    with np.load(out) as got:
        for i, batch in enumerate(expected):
            assert {k.split("/", 1)[1] for k in got.files if k.startswith(f"{i}/")} == set(batch)
            for k, v in batch.items():
                np.testing.assert_array_equal(got[f"{i}/{k}"], v, err_msg=f"batch {i} key {k}")
    assert int(expected[0]["step"]) == 4


def test_eval_batches_cover_every_example_once():
    ds = synthetic(10)
    batches = eval_batches(ds, 4, "stacked")
    assert [b["input_ids"].shape[0] for b in batches] == [8, 8, 4]  # 4 + 4 + remainder 2 pairs
    seen = example_ids(batches[0], 4) + example_ids(batches[1], 4) + example_ids(batches[2], 2)
    assert seen == list(range(10))
    assert len(eval_batches(ds, 4, limit=8)) == 2
    # Two hosts: full batches only, split between them.
    h0 = eval_batches(ds, 4, process_index=0, process_count=2)
    h1 = eval_batches(ds, 4, process_index=1, process_count=2)
    assert [example_ids(a, 2) + example_ids(b, 2) for a, b in zip(h0, h1, strict=True)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]
    # Unpaired: a remainder of one example cannot form a KL row and is dropped.
    assert len(eval_batches(synthetic(5, "unpaired"), 2)) == 2
