"""Bad input: each case stops with file:line: problem, or is skipped, counted and written out."""

from __future__ import annotations

import json
import re

import pytest

from dpo_jax.data import DataError, load_preference_data
from dpo_jax.errors import UserError
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
    (json.dumps({"prompt": "a", "chosen": " b", "rejected": None}).encode() + b"\n", "null_field",
     r"field 'rejected' is null; give it a value"),
    (b'{"prompt": "a", "chosen": " b", "rejected": " c", "ref_chosen_logps": NaN, '
     b'"ref_rejected_logps": -1.5}\n', "not_finite",
     r"field 'ref_chosen_logps' is nan; reference log-probs must be finite"),
    (b'{"prompt": "a", "chosen": " b", "rejected": " c", "ref_chosen_logps": -1.5, '
     b'"ref_rejected_logps": -Infinity}\n', "not_finite",
     r"field 'ref_rejected_logps' is -inf; reference log-probs must be finite"),
    (b'{"prompt": "a", "chosen": " b\\ud800", "rejected": " c"}\n', "invalid_unicode",
     r"field 'chosen' holds a lone surrogate at character 2 \(an unpaired"),
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


# ---------------------------------------------------------------- whole-file problems


def _load(path, **spec):
    return load_preference_data({"path": str(path), "cache_dir": None, **spec}, tiny_tokenizer(),
                                str(path.parent / "run"))  # fmt: skip


@pytest.mark.parametrize("name,content", [("e.jsonl", b""), ("b.jsonl", b"\n  \n\n"),
                                          ("e.json", b""), ("b.json", b" \n")])  # fmt: skip
def test_empty_or_blank_file_is_named(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{path}: the file is empty \(or holds only blank"):
        _load(path)


def test_empty_file_among_others_is_counted_when_skipping(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "b.jsonl").write_text("")
    ds = _load(tmp_path / "*.jsonl", skip_bad_rows=True)
    assert len(ds) == 1 and ds.stats["rejected"] == {"empty_file": 1}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_file_is_named_as_utf16(tmp_path, encoding):
    """With a byte-order mark ("utf-16") or without one (-le, -be): NUL between characters."""
    for name in ("t.jsonl", "t.json"):
        path = tmp_path / name
        rows = [GOOD, GOOD]
        text = json.dumps(rows) if name.endswith(".json") else "".join(
            json.dumps(r) + "\n" for r in rows
        )  # fmt: skip
        path.write_bytes(text.encode(encoding))
        with pytest.raises(
            DataError, match=rf"^{path}:1: the file is UTF-16 .*re-save it as UTF-8"
        ):
            _load(path)


def test_utf8_bom_is_not_data(tmp_path):
    """A UTF-8 byte-order mark (Windows editors write one) does not reject the first row."""
    rows = [GOOD, {**GOOD, "chosen": " grey."}]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    for path in (jsonl, as_json):
        ds = _load(path)
        assert len(ds) == 2 and ds.stats["rejected"] == {}


def test_non_finite_reference_logps_are_rejected_when_skipping(tmp_path):
    ok = {**GOOD, "ref_chosen_logps": -2.0, "ref_rejected_logps": -3.0}
    path = tmp_path / "ref.jsonl"
    path.write_bytes(
        (json.dumps(ok) + "\n").encode()
        + b'{"prompt": "a", "chosen": " b", "rejected": " c", "ref_chosen_logps": Infinity, '
        b'"ref_rejected_logps": -1.0}\n' + (json.dumps({**ok, "chosen": " grey."}) + "\n").encode()
    )
    ds = _load(path, skip_bad_rows=True)
    assert len(ds) == 2
    assert ds.dense["ref_chosen"].tolist() == [-2.0, -2.0]  # the finite rows, unchanged
    rejects = [json.loads(x) for x in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "not_finite")]


def test_lone_surrogate_in_json_file(tmp_path):
    """In a .json file too; with skip_bad_rows the row is counted and written out."""
    path = tmp_path / "s.json"
    path.write_text('[{"prompt": "a", "chosen": " b", "rejected": " c"},\n'
                    ' {"prompt": "\\udc80x", "chosen": " b", "rejected": " c"}]')  # fmt: skip
    with pytest.raises(DataError, match=rf"^{path}:2: field 'prompt' holds a lone surrogate"):
        _load(path)
    ds = _load(path, skip_bad_rows=True)
    assert len(ds) == 1 and ds.stats["rejected"] == {"invalid_unicode": 1}
    assert (tmp_path / "run" / "rejects.jsonl").read_text().count("\n") == 1


def test_directory_given_as_data_file(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(DataError, match=rf"^{data_dir}: is a directory, not a data file"):
        _load(data_dir)


def test_no_usable_examples_names_the_source(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({**GOOD, "rejected": GOOD["chosen"]}) + "\n")
    with pytest.raises(UserError, match=rf"^{path}: no usable examples; see .*rejects.jsonl"):
        _load(path, skip_bad_rows=True)
