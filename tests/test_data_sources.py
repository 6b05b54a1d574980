"""Sources (JSONL/JSON/Parquet globs, TFDS array_record, local HF datasets) and the
high-level `load_preference_data`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpo_jax.data import load_preference_data
from dpo_jax.data.errors import RejectLog
from dpo_jax.data.sources import read_source, read_sources
from tests.data_helpers import tiny_tokenizer

ROWS = [
    {"prompt": f"Question {i}:", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(6)
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_files_globs_and_row_tags(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_jsonl(tmp_path / "a-1.jsonl", ROWS[:2])
    (tmp_path / "a-0.jsonl").write_text(json.dumps(ROWS[2]) + "\n\n" + json.dumps(ROWS[3]) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(ROWS[4:5]))
    pq.write_table(pa.Table.from_pylist(ROWS[5:]), tmp_path / "c.parquet")
    rows = list(
        read_sources(
            [str(tmp_path / "a-*.jsonl"), {"path": str(tmp_path / "b.json")},
             str(tmp_path / "c.parquet")],
            RejectLog(),
        )
    )  # fmt: skip
    got = [(r.data["prompt"], r.source.rsplit("/", 1)[1], r.line) for r in rows]
    assert got == [
        ("Question 2:", "a-0.jsonl", 1),
        ("Question 3:", "a-0.jsonl", 3),  # the blank line 2 is skipped, numbering is not
        ("Question 0:", "a-1.jsonl", 1),
        ("Question 1:", "a-1.jsonl", 2),
        ("Question 4:", "b.json", 1),
        ("Question 5:", "c.parquet", 1),
    ]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list(read_sources([str(tmp_path / "nope-*.jsonl")], RejectLog()))


def test_json_columns_layout(tmp_path):
    cols = {k: [r[k] for r in ROWS[:3]] for k in ROWS[0]}
    (tmp_path / "cols.json").write_text(json.dumps(cols))
    rows = list(read_source({"path": str(tmp_path / "cols.json")}, RejectLog()))
    assert [r.data for r in rows] == ROWS[:3]


def test_tfds_array_record_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class DpoJaxTestPrefs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            text = tfds.features.Text()
            feats = tfds.features.FeaturesDict({k: text for k in ("prompt", "chosen", "rejected")})
            return tfds.core.DatasetInfo(builder=self, features=feats)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield from enumerate(ROWS)

    builder = DpoJaxTestPrefs(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    rows = list(read_source({"tfds": builder, "split": "train"}, RejectLog()))
    # Data sources return records in hashed order; the content must be all rows, decoded.
    assert sorted((r.data for r in rows), key=lambda d: d["prompt"]) == ROWS
    assert {r.line for r in rows} == set(range(1, 7))
    assert rows[0].source == "tfds:dpo_jax_test_prefs/train"


def test_hf_saved_dataset_and_splits(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:4]),
            "test": datasets.Dataset.from_list(ROWS[4:]),
        }
    ).save_to_disk(str(tmp_path / "dict"))
    flat = list(read_source({"hf": str(tmp_path / "flat")}, RejectLog()))
    assert [r.data for r in flat] == ROWS and flat[2].line == 3
    test = list(read_source({"hf": str(tmp_path / "dict"), "split": "test"}, RejectLog()))
    assert [r.data for r in test] == ROWS[4:]
    with pytest.raises(ValueError, match="pass split="):
        list(read_source({"hf": str(tmp_path / "dict")}, RejectLog()))


def test_load_preference_data_end_to_end(tmp_path):
    tok = tiny_tokenizer()
    _write_jsonl(tmp_path / "train.jsonl", ROWS)
    spec = {
        "sources": [str(tmp_path / "*.jsonl")],
        "max_length": 32,
        "cache_dir": str(tmp_path / "c"),
    }
    ds = load_preference_data(spec, tok, str(tmp_path / "run"))
    assert ds.kind == "paired" and len(ds) == 6 and not ds.stats["from_cache"]
    p = tok(ROWS[3]["prompt"])["input_ids"]
    full = tok(ROWS[3]["prompt"] + ROWS[3]["chosen"])["input_ids"]
    assert ds[3]["prompt"].tolist() == p
    assert ds[3]["chosen"].tolist() == full[len(p) :] + [tok.eos_token_id]
    again = load_preference_data(spec, tok, str(tmp_path / "run2"))
    assert again.stats["from_cache"]
    np.testing.assert_array_equal(again.ragged["chosen"].values, ds.ragged["chosen"].values)
    # Unpaired (KTO) view of the same pairs: chosen -> label 1, rejected -> label 0.
    un = load_preference_data({**spec, "unpaired": True}, tok, str(tmp_path / "run3"))
    assert un.kind == "unpaired" and len(un) == 12
    assert un.dense["label"].tolist() == [1, 0] * 6
    np.testing.assert_array_equal(un[6]["completion"], ds[3]["chosen"])
    np.testing.assert_array_equal(un[7]["completion"], ds[3]["rejected"])


def test_load_accepts_config_dict(tmp_path):
    import ml_collections

    _write_jsonl(tmp_path / "t.jsonl", ROWS[:2])
    cfg = ml_collections.ConfigDict({"path": str(tmp_path / "t.jsonl"), "format": "explicit",
                                     "cache_dir": ""})  # fmt: skip
    ds = load_preference_data(cfg, tiny_tokenizer(), None)
    assert len(ds) == 2 and "from_cache" not in ds.stats


def test_load_from_trainer_style_config(tmp_path):
    import ml_collections

    _write_jsonl(tmp_path / "train.jsonl", ROWS[:4])
    _write_jsonl(tmp_path / "eval.jsonl", ROWS[4:])
    cfg = ml_collections.ConfigDict(
        {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"),
         "format": "auto", "max_length": 32, "max_prompt_length": 16,
         "truncation_mode": "keep_end", "layout": "stacked", "shuffle": True,
         "skip_bad_rows": False, "cache_dir": ""}
    )  # fmt: skip
    tok = tiny_tokenizer()
    train = load_preference_data(cfg, tok, str(tmp_path), split="train")
    ev = load_preference_data(cfg, tok, str(tmp_path), split="eval", unpaired=True)
    assert len(train) == 4 and train.kind == "paired"
    assert len(ev) == 4 and ev.kind == "unpaired"
    assert ev[0]["prompt"].tolist() == tok(ROWS[4]["prompt"])["input_ids"]
