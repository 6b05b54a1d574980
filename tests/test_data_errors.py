"""Bad input: each case stops with file:line: problem, or is skipped, counted and written out."""

from __future__ import annotations

import json
import re

import pytest

from dpo_jax.data import DataError, load_preference_data
from tests.data_helpers import tiny_tokenizer

GOOD = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
LONG_PROMPT = "Hello there, how are you doing today? " * 3

# (raw line, reason key, message pattern) -- one per bad-input case of the issue.
BAD = [
    (b'{"prompt": "a", "chosen": " b", "rejected": \n', "malformed_json", r"malformed JSON \("),
    (json.dumps({"prompt": "a", "chosen": " b"}).encode() + b"\n", "missing_field",
     r"missing field 'rejected'"),
    (json.dumps({"prompt": "a", "chosen": 5, "rejected": " c"}).encode() + b"\n", "not_a_string",
     r"field 'chosen' must be a string, got int"),
    (json.dumps({"prompt": "a", "chosen": " ", "rejected": " c"}).encode() + b"\n",
     "empty_completion", r"empty chosen completion"),
    (json.dumps({"prompt": "a", "chosen": " c", "rejected": ""}).encode() + b"\n",
     "empty_completion", r"empty rejected completion"),
    (json.dumps({"prompt": "a", "chosen": " same", "rejected": " same"}).encode() + b"\n",
     "identical", r"chosen and rejected completions are identical"),
    (json.dumps({"prompt": LONG_PROMPT, "chosen": " x", "rejected": " y"}).encode() + b"\n",
     "prompt_too_long", r"prompt is \d+ tokens, leaving no room under max_length=24"),
    (b'{"prompt": "caf\xe9", "chosen": " b", "rejected": " c"}\n', "invalid_utf8",
     r"invalid UTF-8 at byte 15 of the line"),  # 0-based offset of \xe9
]  # fmt: skip


def _write(path, bad_line: bytes) -> None:
    with open(path, "wb") as f:
        f.write(json.dumps(GOOD).encode() + b"\n")
        f.write(bad_line)  # always line 2
        f.write(json.dumps(GOOD).encode() + b"\n")


@pytest.mark.parametrize("raw,reason,pattern", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_row_stops_with_file_line_and_problem(tmp_path, raw, reason, pattern):
    path = tmp_path / "train.jsonl"
    _write(path, raw)
    spec = {"path": str(path), "max_length": 24, "cache_dir": None}
    with pytest.raises(DataError, match=rf"^{path}:2: {pattern}") as info:
        load_preference_data(spec, tiny_tokenizer(), str(tmp_path / "run"))
    assert (info.value.source, info.value.line, info.value.reason) == (str(path), 2, reason)


def test_skip_bad_rows_counts_and_writes_rejects(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps(GOOD).encode() + b"\n")
        for raw, _, _ in BAD:
            f.write(raw)
        f.write(json.dumps({**GOOD, "chosen": " grey."}).encode() + b"\n")
    run_dir = tmp_path / "run"
    spec = {"path": str(path), "max_length": 24, "skip_bad_rows": True, "cache_dir": None}
    ds = load_preference_data(spec, tiny_tokenizer(), str(run_dir))
    assert len(ds) == 2  # the two good rows
    rejects = [json.loads(line) for line in (run_dir / "rejects.jsonl").read_text().splitlines()]
    # Rejects are written in the order found: reading errors first, then parsing in file
    # order, then tokenization; each names its file and line.
    by_line = {r["line"]: r for r in rejects}
    assert sorted(by_line) == list(range(2, 2 + len(BAD)))
    for i, (_, reason, pattern) in enumerate(BAD):
        rec = by_line[2 + i]
        assert rec["source"] == str(path) and rec["reason"] == reason
        assert re.search(pattern, rec["problem"]), rec
    assert by_line[4]["row"] == {"prompt": "a", "chosen": 5, "rejected": " c"}
    assert by_line[9]["row"].startswith('{"prompt": "caf\ufffd"')
    out = capsys.readouterr().out
    assert f"skipped {len(BAD)} bad rows (" in out
    assert "empty_completion=2" in out and "malformed_json=1" in out
    assert ds.stats["rejected"]["empty_completion"] == 2


def test_bad_json_file_names_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"prompt": "a", "chosen": " b", "rejected": " c"},\n  {oops}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON"):
        load_preference_data({"path": str(path), "cache_dir": None}, tiny_tokenizer(), None)


def test_skip_needs_run_dir(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(ValueError, match="needs a run_dir"):
        load_preference_data({"path": str(path), "skip_bad_rows": True}, tiny_tokenizer(), None)
