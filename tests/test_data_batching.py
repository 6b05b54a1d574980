"""Batch layouts checked by hand: ids, positions, segment ids, sequence index, masks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.data.batching import (
    bucket_length,
    build_batch,
    pack_plan,
    stack_micro_batches,
)
from dpo_jax.models import attention

A = np.asarray


def _pairs():
    return [
        {"prompt": A([11, 12]), "chosen": A([21, 22]), "rejected": A([31])},
        {"prompt": A([13]), "chosen": A([23]), "rejected": A([32, 33, 34])},
    ]


def test_bucket_lengths():
    assert bucket_length(5) == 16 and bucket_length(16) == 16 and bucket_length(17) == 32
    assert bucket_length(5, [12, 8]) == 8 and bucket_length(9, [8, 12]) == 12
    with pytest.raises(ValueError, match="needs length 13, longer than the largest bucket 12"):
        bucket_length(13, [8, 12])


def test_stacked_layout_by_hand():
    b = build_batch(_pairs(), "paired", "stacked", buckets=[6])
    P = 0
    assert b["input_ids"].tolist() == [
        [11, 12, 21, 22, P, P],  # chosen of pair 0
        [13, 23, P, P, P, P],  # chosen of pair 1
        [11, 12, 31, P, P, P],  # rejected of pair 0
        [13, 32, 33, 34, P, P],  # rejected of pair 1
    ]
    assert b["positions"].tolist() == [
        [0, 1, 2, 3, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 1, 2, 0, 0, 0],
        [0, 1, 2, 3, 0, 0],
    ]
    assert b["segment_ids"].tolist() == [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
    ]
    assert b["sequence_index"].tolist() == [
        [-1, -1, 0, 0, -1, -1],
        [-1, 1, -1, -1, -1, -1],
        [-1, -1, 2, -1, -1, -1],
        [-1, 3, 3, 3, -1, -1],
    ]
    assert "attn_mask" not in b and "ref_logps" not in b
    for k in ("input_ids", "positions", "segment_ids", "sequence_index"):
        assert b[k].dtype == np.int32


def test_packed_layout_by_hand():
    # Sequence lengths 4, 2, 3, 4 into rows of 8, first fit: [0, 1], [2, 3].
    assert pack_plan([4, 2, 3, 4], 8) == [[0, 1], [2, 3]]
    b = build_batch(_pairs(), "paired", "packed", length=8)
    assert b["input_ids"].tolist() == [
        [11, 12, 21, 22, 13, 23, 0, 0],
        [11, 12, 31, 13, 32, 33, 34, 0],
    ]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 2, 2, 2, 2, 0]]
    assert b["positions"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 0], [0, 1, 2, 0, 1, 2, 3, 0]]
    assert b["sequence_index"].tolist() == [
        [-1, -1, 0, 0, -1, 1, -1, -1],
        [-1, -1, 2, -1, 3, 3, 3, -1],
    ]
    # A fixed row count pads with empty rows.
    b4 = build_batch(_pairs(), "paired", "packed", length=8, num_rows=4)
    assert b4["segment_ids"][2:].sum() == 0 and (b4["sequence_index"][2:] == -1).all()


def test_prefix_shared_layout_by_hand():
    b = build_batch(_pairs(), "paired", "prefix_shared", buckets=[8])
    assert b["input_ids"].tolist() == [
        [11, 12, 21, 22, 12, 31, 0, 0],  # prompt, chosen, copy of last prompt token, rejected
        [13, 23, 13, 32, 33, 34, 0, 0],
    ]
    assert b["positions"].tolist() == [[0, 1, 2, 3, 1, 2, 0, 0], [0, 1, 0, 1, 2, 3, 0, 0]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]]
    assert b["sequence_index"].tolist() == [
        [-1, -1, 0, 0, -1, 2, -1, -1],
        [-1, 1, -1, 3, 3, 3, -1, -1],
    ]
    visible = [  # padding (columns 6, 7) sees nothing
        [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 4], [0, 4, 5], [], []],
        [[0], [0, 1], [2], [2, 3], [2, 3, 4], [2, 3, 4, 5], [], []],
    ]
    assert "attn_mask" not in b and b["branch_ids"].shape == (2, 8)
    mask = _rule_mask(b)
    for r in range(2):
        for i in range(8):
            assert np.flatnonzero(mask[r, i]).tolist() == visible[r][i], (r, i)


def _rule_mask(b):
    """Dense [N, L, L] mask of a batch's O(L) attention rule (models.attention)."""
    rule = attention.make_rule(
        jnp.asarray(b["segment_ids"]), jnp.asarray(b["positions"]),
        None if "branch_ids" not in b else jnp.asarray(b["branch_ids"]),
    )  # fmt: skip
    return np.asarray(attention.dense_mask(rule))[:, 0]


def _context(ids, pos, mask_row):
    return sorted(zip(ids[mask_row].tolist(), pos[mask_row].tolist(), strict=True))


def test_prefix_shared_contexts_equal_stacked_contexts():
    """Every scored token is predicted from the same (token, position) context in both layouts."""
    rng = np.random.default_rng(0)
    items = []
    for _ in range(4):
        items.append(
            {
                "prompt": rng.integers(1, 50, rng.integers(1, 6)),
                "chosen": rng.integers(1, 50, rng.integers(1, 6)),
                "rejected": rng.integers(1, 50, rng.integers(1, 6)),
            }
        )
    st = build_batch(items, "paired", "stacked")
    ps = build_batch(items, "paired", "prefix_shared")
    ps_mask = _rule_mask(ps)
    L = st["input_ids"].shape[1]
    causal = np.tril(np.ones((L, L), bool))
    for k in range(8):
        r_st = k
        t_st = np.flatnonzero(st["sequence_index"][r_st] == k)
        r_ps = k % 4
        t_ps = np.flatnonzero(ps["sequence_index"][r_ps] == k)
        assert len(t_st) == len(t_ps) > 0
        for a, c in zip(t_st, t_ps, strict=True):
            assert st["input_ids"][r_st, a] == ps["input_ids"][r_ps, c]
            assert st["positions"][r_st, a] == ps["positions"][r_ps, c]
            seg = st["segment_ids"][r_st]
            st_vis = causal[a - 1] & (seg == seg[a - 1])
            ctx_st = _context(st["input_ids"][r_st], st["positions"][r_st], st_vis)
            ctx_ps = _context(ps["input_ids"][r_ps], ps["positions"][r_ps], ps_mask[r_ps, c - 1])
            assert ctx_st == ctx_ps


def test_unpaired_kl_rows_and_labels():
    items = [
        {"prompt": A([1]), "completion": A([10]), "label": 1},
        {"prompt": A([2]), "completion": A([20, 21]), "label": 0},
        {"prompt": A([3]), "completion": A([30]), "label": 1},
    ]
    b = build_batch(items, "unpaired", "stacked", buckets=[4])
    assert b["input_ids"].tolist() == [
        [1, 10, 0, 0],
        [2, 20, 21, 0],
        [3, 30, 0, 0],
        [1, 30, 0, 0],  # KL row: prompt 0 with completion (0 - 1) mod 3 = 2 (TRL's shift)
        [2, 10, 0, 0],  # prompt 1 with completion 0
        [3, 20, 21, 0],  # prompt 2 with completion 1
    ]
    assert b["sequence_index"].tolist() == [
        [-1, 0, -1, -1],
        [-1, 1, 1, -1],
        [-1, 2, -1, -1],
        [-1, 3, -1, -1],
        [-1, 4, -1, -1],
        [-1, 5, 5, -1],
    ]
    assert b["labels"].tolist() == [1, 0, 1] and b["labels"].dtype == np.int32
    with pytest.raises(ValueError, match="at least 2 examples"):
        build_batch(items[:1], "unpaired", "stacked")


def test_ref_logps_follow_sequence_index():
    items = [dict(p, ref_chosen=-1.0 - i, ref_rejected=-10.0 - i) for i, p in enumerate(_pairs())]
    b = build_batch(items, "paired", "stacked")
    assert b["ref_logps"].tolist() == [-1.0, -2.0, -10.0, -11.0]
    assert b["ref_logps"].dtype == np.float32


def test_stack_micro_batches_pads_to_common_shape():
    b1 = build_batch(_pairs(), "paired", "prefix_shared", length=8)
    b2 = build_batch(_pairs()[:1] * 2, "paired", "prefix_shared", length=6)
    s = stack_micro_batches([b1, b2])
    assert s["input_ids"].shape == (2, 2, 8) and s["branch_ids"].shape == (2, 2, 8)
    np.testing.assert_array_equal(s["input_ids"][0], b1["input_ids"])
    np.testing.assert_array_equal(s["input_ids"][1, :, :6], b2["input_ids"])
    assert (s["input_ids"][1, :, 6:] == 0).all() and (s["sequence_index"][1, :, 6:] == -1).all()
    np.testing.assert_array_equal(s["branch_ids"][1, :, :6], b2["branch_ids"])
    assert (s["branch_ids"][1, :, 6:] == 0).all() and (s["segment_ids"][1, :, 6:] == 0).all()
    np.testing.assert_array_equal(
        _rule_mask(s_row := {k: v[1] for k, v in s.items()})[:, :6, :6], _rule_mask(b2)
    )
    assert not _rule_mask(s_row)[:, 6:, :].any()  # padding sees nothing
