"""Token ids and stacked batches equal TRL 1.16's own dataset preparation and collators.

Runs TRL's `DPOTrainer._prepare_dataset` / `KTOTrainer._prepare_dataset` (with a stub
trainer: no model needed) and its collators on the same rows, and compares with
`dpo_jax.data`. Skipped when `trl` is not installed (it is the `bench` extra).
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from dpo_jax.data.batching import build_batch
from dpo_jax.data.formats import parse_rows
from dpo_jax.data.sources import Row
from dpo_jax.data.tokenize import settings_from_spec, tokenize_examples
from tests.data_helpers import tiny_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
# TRL's configs warn that `gradient_checkpointing` is renamed; irrelevant here.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PLAIN = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Human: What is two plus two? Assistant:", "chosen": " Four.", "rejected": " Five!"},
    # Boundary merge: TRL cuts the prompt to the common token prefix.
    {"prompt": "the sky is ", "chosen": "blue and the grass", "rejected": "green and the sky"},
    {"prompt": "Paris is the capital of", "chosen": " France.<|endoftext|>", "rejected": " Rome"},
]
IMPLICIT = [{"chosen": "The sky is blue.", "rejected": "The sky is green today."}]
CHAT = [
    {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Seven is not a colour."}],
    },
    {
        "chosen": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ],
        "rejected": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Go away, I am busy."},
        ],
    },
]


def _trl_dpo(rows, tok, **kw):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir="/tmp/dpo_jax_trl_parity", report_to=[], use_cpu=True, **kw)
    stub = types.SimpleNamespace(_tokenizer=tok)
    return DPOTrainer._prepare_dataset(stub, datasets.Dataset.from_list(rows), tok, args, "train")


def _ours(rows, tok, settings=None, fmt="auto"):
    examples = parse_rows([Row(r, "rows", i + 1) for i, r in enumerate(rows)], fmt, tok)
    return tokenize_examples(examples, tok, settings)


def _assert_same_ids(trl_ds, ours, keys):
    assert len(trl_ds) == len(ours)
    for i in range(len(ours)):
        for ours_key, trl_key in keys:
            assert ours[i][ours_key].tolist() == trl_ds[i][trl_key], (i, ours_key)


DPO_KEYS = [("prompt", "prompt_ids"), ("chosen", "chosen_ids"), ("rejected", "rejected_ids")]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dpo_plain_text_ids_equal_trl():
    tok = tiny_tokenizer()
    _assert_same_ids(_trl_dpo(PLAIN, tok), _ours(PLAIN, tok), DPO_KEYS)
    _assert_same_ids(_trl_dpo(IMPLICIT, tok), _ours(IMPLICIT, tok), DPO_KEYS)


def test_dpo_conversational_ids_equal_trl():
    tok = tiny_tokenizer(chat=True)
    for rows in (CHAT[:1], CHAT[1:]):  # explicit prompt; implicit prompt (message prefix)
        _assert_same_ids(_trl_dpo(rows, tok), _ours(rows, tok), DPO_KEYS)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_stacked_batch_equals_trl_collator_keep_start():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = tiny_tokenizer()
    # Room for every prompt plus two completion tokens, so completions really are cut.
    max_length = max(len(tok(r["prompt"])["input_ids"]) for r in PLAIN) + 2
    trl_ds = _trl_dpo(PLAIN, tok, max_length=max_length, truncation_mode="keep_start")
    collated = DataCollatorForPreference(
        pad_token_id=tok.pad_token_id, max_length=max_length, truncation_mode="keep_start"
    )([{k: trl_ds[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(4)])
    ours = _ours(
        PLAIN, tok, settings_from_spec(dict(max_length=max_length, truncation_mode="keep_start"))
    )
    batch = build_batch([ours[i] for i in range(4)], "paired", "stacked", pad_id=tok.pad_token_id)
    n = collated["input_ids"].shape[1]
    assert n == max_length
    assert batch["input_ids"].shape[1] >= n
    np.testing.assert_array_equal(batch["input_ids"][:, :n], collated["input_ids"].numpy())
    np.testing.assert_array_equal(
        batch["segment_ids"][:, :n] > 0, collated["attention_mask"].numpy() > 0
    )
    np.testing.assert_array_equal(
        batch["sequence_index"][:, :n] >= 0, collated["completion_mask"].numpy() > 0
    )
    assert (batch["segment_ids"][:, n:] == 0).all()


def _collated_equal(tok, rows, max_length, mode, layout="stacked"):
    """Our batch for `rows` under TRL's truncation equals TRL's collator output."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trl_ds = _trl_dpo(rows, tok, max_length=max_length, truncation_mode=mode)
    n_rows = len(trl_ds)
    collated = DataCollatorForPreference(
        pad_token_id=tok.pad_token_id, max_length=max_length, truncation_mode=mode
    )([{k: trl_ds[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
       for i in range(n_rows)])  # fmt: skip
    ours = _ours(rows, tok, settings_from_spec(dict(max_length=max_length, truncation_mode=mode)))
    assert len(ours) == n_rows
    batch = build_batch([ours[i] for i in range(n_rows)], "paired", layout, pad_id=tok.pad_token_id)
    n = collated["input_ids"].shape[1]
    assert batch["input_ids"].shape[1] >= n and (batch["segment_ids"][:, n:] == 0).all()
    np.testing.assert_array_equal(batch["input_ids"][:, :n], collated["input_ids"].numpy())
    np.testing.assert_array_equal(
        batch["segment_ids"][:, :n] > 0, collated["attention_mask"].numpy() > 0
    )
    # TRL scores completion_mask[:, 1:] (a sequence's first token has no prediction).
    np.testing.assert_array_equal(
        batch["sequence_index"][:, 1:n] >= 0, collated["completion_mask"].numpy()[:, 1:] > 0
    )
    assert (batch["sequence_index"][:, 0] < 0).all()
    return ours


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("max_length", [3, 6, 9, 14])
def test_keep_end_per_sequence_equals_trl_collator(max_length):
    tok = tiny_tokenizer()
    ours = _collated_equal(tok, PLAIN, max_length, "keep_end")
    # Some pair really keeps different prompt tokens for chosen and rejected.
    if max_length in (6, 9):
        assert any(
            ours[i]["prompt"].tolist() != ours[i]["rejected_prompt"].tolist()
            for i in range(len(ours))
        )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_keep_end_conversational_and_packed_equal_trl_collator():
    tok = tiny_tokenizer(chat=True)
    _collated_equal(tok, CHAT[:1], 12, "keep_end")
    tok = tiny_tokenizer()
    ours = _ours(PLAIN, tok, settings_from_spec(dict(max_length=9, truncation_mode="keep_end")))
    items = [ours[i] for i in range(len(ours))]
    stacked = build_batch(items, "paired", "stacked", pad_id=tok.pad_token_id)
    packed = build_batch(items, "paired", "packed", pad_id=tok.pad_token_id)
    # Every sequence of the packed rows is the stacked row with the same sequence index.
    for k in range(2 * len(items)):
        r = np.nonzero((packed["sequence_index"] == k).any(1))[0][0]
        seg = packed["segment_ids"][r][packed["sequence_index"][r] == k][0]
        got = packed["input_ids"][r][packed["segment_ids"][r] == seg]
        want = stacked["input_ids"][k][stacked["segment_ids"][k] > 0]
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="prefix_shared"):
        build_batch(items, "paired", "prefix_shared", pad_id=tok.pad_token_id)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("max_length", [10, 14])
def test_keep_start_equals_trl_collator(max_length):
    # Rows whose prompt alone fills max_length are left out on both sides (TRL filters
    # them; here they are bad rows, so this test keeps only rows that fit).
    tok = tiny_tokenizer()
    rows = [r for r in PLAIN if len(tok(r["prompt"])["input_ids"]) < max_length]
    assert rows
    _collated_equal(tok, rows, max_length, "keep_start")


def test_kto_ids_and_kl_rows_equal_trl():
    from trl import KTOConfig, KTOTrainer

    tok = tiny_tokenizer()
    rows = [
        {"prompt": "The sky is", "completion": " blue.", "label": True},
        {"prompt": "Paris is the capital of", "completion": " France.", "label": True},
        {"prompt": "Two plus two is", "completion": " five", "label": False},
        {"prompt": "Hello there,", "completion": " go away.", "label": False},
    ]
    args = KTOConfig(output_dir="/tmp/dpo_jax_trl_parity", report_to=[], use_cpu=True,
                     per_device_train_batch_size=4)  # fmt: skip
    stub = types.SimpleNamespace(_tokenizer=tok, calculate_KL=True)
    trl_ds = KTOTrainer._prepare_dataset(stub, datasets.Dataset.from_list(rows), tok, args, "train")
    ours = _ours(rows, tok)
    _assert_same_ids(trl_ds, ours, [("prompt", "prompt_ids"), ("completion", "completion_ids")])
    batch = build_batch([ours[i] for i in range(4)], "unpaired", "stacked")
    for i in range(4):
        # Row B+i holds prompt i followed by TRL's KL completion for example i.
        row = batch["input_ids"][4 + i][batch["segment_ids"][4 + i] > 0].tolist()
        assert row == trl_ds[i]["prompt_ids"] + trl_ds[i]["KL_completion_ids"]
    assert batch["labels"].tolist() == [int(r["label"]) for r in rows]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_keep_end_dataset_through_the_train_iterator(tmp_path):
    """Per-sequence prompts survive the cache and the loader (bucket from both prompts)."""
    from dpo_jax.data import make_train_iterator
    from dpo_jax.data.tokenize import TokenizedDataset

    tok = tiny_tokenizer()
    ours = _ours(PLAIN, tok, settings_from_spec(dict(max_length=9, truncation_mode="keep_end")))
    ours.save(str(tmp_path / "ds.npz"))
    loaded = TokenizedDataset.load(str(tmp_path / "ds.npz"))
    assert list(loaded.ragged) == ["prompt", "chosen", "rejected", "rejected_prompt"]
    assert (loaded.sequence_lengths() <= 9).all()
    it = make_train_iterator(loaded, 2, "stacked", seed=0, shuffle=False, num_epochs=1,
                             process_index=0, process_count=1)  # fmt: skip
    for step, batch in enumerate(it):
        want = build_batch([ours[2 * step], ours[2 * step + 1]], "paired", "stacked", length=16)
        np.testing.assert_array_equal(batch["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(batch["sequence_index"], want["sequence_index"])
