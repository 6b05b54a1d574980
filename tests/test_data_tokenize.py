"""Tokenization follows TRL's boundary convention; truncation; the disk cache."""

from __future__ import annotations

import numpy as np
import pytest

import dpo_jax.data.tokenize as tokmod
from dpo_jax.data.errors import DataError, RejectLog
from dpo_jax.data.formats import PreferenceExample, UnpairedExample, parse_row
from dpo_jax.data.sources import Row
from dpo_jax.data.tokenize import settings_from_spec, tokenize_cached, tokenize_examples
from tests.data_helpers import tiny_tokenizer

PAIRS = [
    PreferenceExample("The sky is", " blue.", " green."),
    PreferenceExample("Human: What is two plus two? Assistant:", " Four.", " Five, of course."),
    PreferenceExample("Paris is the capital of", " France.", " Germany and more."),
]


def trl_reference(tok, prompt, completion, chat=False):
    """TRL 1.16's convention written directly with the tokenizer (a second code path).

    Plain text gets the eos text appended; chat-rendered text does not, and is
    encoded without adding special tokens. (tests/test_data_trl_parity.py runs
    TRL's own code when it is installed.)
    """
    if not chat:
        completion += tok.eos_token
    p = tok(prompt, add_special_tokens=not chat)["input_ids"]
    full = tok(prompt + completion, add_special_tokens=not chat)["input_ids"]
    assert full[: len(p)] == p
    return list(p), list(full[len(p) :])


def test_bpe_matches_trl_convention():
    tok = tiny_tokenizer()
    ds = tokenize_examples(PAIRS, tok)
    assert len(ds) == 3 and ds.kind == "paired"
    for i, ex in enumerate(PAIRS):
        item = ds[i]
        p, c = trl_reference(tok, ex.prompt, ex.chosen)
        _, r = trl_reference(tok, ex.prompt, ex.rejected)
        assert item["prompt"].tolist() == p
        assert item["chosen"].tolist() == c
        assert item["rejected"].tolist() == r
        # And the decoded sequence is the text itself plus eos.
        assert tok.decode(p + c) == ex.prompt + ex.chosen + tok.eos_token
        assert c[-1] == tok.eos_token_id
    assert ds.stats["prefix_mismatches"] == 0


def test_prefix_mismatch_is_counted_and_warned():
    tok = tiny_tokenizer()
    # A trailing space in the prompt merges with the next word in prompt+completion.
    ex = PreferenceExample("the sky is ", "blue and the grass", "green and the sky")
    p = tok(ex.prompt)["input_ids"]
    full_c = tok(ex.prompt + ex.chosen + tok.eos_token)["input_ids"]
    full_r = tok(ex.prompt + ex.rejected + tok.eos_token)["input_ids"]
    assert full_c[: len(p)] != p  # precondition: this really is a boundary merge
    n = 0
    while n < len(p) and p[n] == full_c[n] and p[n] == full_r[n]:
        n += 1
    assert 0 < n < len(p)
    with pytest.warns(UserWarning, match=r"^1 example\(s\): tok\(prompt\) is not a prefix"):
        ds = tokenize_examples([ex], tok)
    assert ds.stats["prefix_mismatches"] == 1
    # TRL's rule: the prompt is cut to the common prefix, completions start there.
    assert ds[0]["prompt"].tolist() == p[:n]
    assert ds[0]["chosen"].tolist() == full_c[n:]
    assert ds[0]["rejected"].tolist() == full_r[n:]


def test_chat_template_matches_trl_convention():
    tok = tiny_tokenizer(chat=True)
    row = {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Seven is not a colour."}],
    }
    examples = parse_row(Row(row, "f.jsonl", 1), "auto", tok)
    ds = tokenize_examples(examples, tok)
    prompt_text = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    p, c = trl_reference(tok, prompt_text, "Blue.<|im_end|>\n", chat=True)
    _, r = trl_reference(tok, prompt_text, "Seven is not a colour.<|im_end|>\n", chat=True)
    assert ds[0]["prompt"].tolist() == p
    assert ds[0]["chosen"].tolist() == c
    assert ds[0]["rejected"].tolist() == r
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert p[0] == im_start and p.count(im_start) == 2  # special tokens kept as single ids


def test_unpaired_tokenization():
    tok = tiny_tokenizer()
    exs = [
        UnpairedExample("The sky is", " blue.", True),
        UnpairedExample("The sky is", " red", False),
    ]
    ds = tokenize_examples(exs, tok)
    assert ds.kind == "unpaired"
    assert ds.dense["label"].tolist() == [1, 0]
    p, c = trl_reference(tok, "The sky is", " red")
    assert ds[1]["prompt"].tolist() == p and ds[1]["completion"].tolist() == c


def _untruncated(tok, ex):
    p, c = trl_reference(tok, ex.prompt, ex.chosen)
    _, r = trl_reference(tok, ex.prompt, ex.rejected)
    return p, c, r


def test_prompt_and_completion_length_limits():
    tok = tiny_tokenizer()
    ex = PAIRS[1]
    p, c, r = _untruncated(tok, ex)
    ds = tokenize_examples(
        [ex], tok, settings_from_spec(dict(max_prompt_length=4, max_completion_length=3))
    )
    assert ds[0]["prompt"].tolist() == p[-4:]  # the end of the prompt is kept
    assert ds[0]["chosen"].tolist() == c[:3]
    assert ds[0]["rejected"].tolist() == r[:3]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end_prompt", "keep_end"])
def test_max_length_truncation_modes(mode):
    tok = tiny_tokenizer()
    ex = PAIRS[1]
    p, c, r = _untruncated(tok, ex)
    longest = max(len(c), len(r))
    max_length = len(p) + longest - 5  # 5 tokens too long
    assert len(p) > 6
    ds = tokenize_examples(
        [ex], tok, settings_from_spec(dict(max_length=max_length, truncation_mode=mode))
    )
    item = ds[0]
    if mode == "keep_start":
        room = max_length - len(p)
        assert item["prompt"].tolist() == p
        assert item["chosen"].tolist() == c[:room]
        assert item["rejected"].tolist() == r[:room]
    elif mode == "keep_end_prompt":
        assert item["prompt"].tolist() == p[5:]  # the shared prompt's start is dropped
        assert item["chosen"].tolist() == c and item["rejected"].tolist() == r
    else:  # TRL's keep_end: each sequence keeps its own last max_length tokens
        for key, comp in (("chosen", c), ("rejected", r)):
            prompt_key = "prompt" if key == "chosen" else "rejected_prompt"
            assert item[prompt_key].tolist() + item[key].tolist() == (p + comp)[-max_length:]
            assert item[key].tolist() == comp
        return
    assert len(item["prompt"]) + max(len(item["chosen"]), len(item["rejected"])) == max_length


def test_prompt_longer_than_max_length_names_row():
    tok = tiny_tokenizer()
    ex = parse_row(Row({"prompt": PAIRS[1].prompt, "chosen": " a", "rejected": " b"}, "d.jsonl", 3))
    n = len(tok(PAIRS[1].prompt)["input_ids"])
    with pytest.raises(DataError, match=rf"^d.jsonl:3: prompt is {n} tokens, leaving no room"):
        tokenize_examples(ex, tok, settings_from_spec(dict(max_length=n)))


def test_cache_hit_skips_tokenization(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    settings = settings_from_spec(dict(max_length=40))
    first = tokenize_cached(PAIRS, tok, settings, cache_dir=str(tmp_path))
    assert first.stats["from_cache"] is False
    assert len(list(tmp_path.glob("tokenized-*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(tokmod, "tokenize_examples", boom)
    second = tokenize_cached(PAIRS, tok, settings, cache_dir=str(tmp_path))
    assert second.stats["from_cache"] is True
    for i in range(len(PAIRS)):
        for k in ("prompt", "chosen", "rejected"):
            np.testing.assert_array_equal(first[i][k], second[i][k])
    # Different settings or different data are different keys: they must tokenize.
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_cached(
            PAIRS, tok, settings_from_spec(dict(max_length=41)), cache_dir=str(tmp_path)
        )
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_cached(PAIRS[:2], tok, settings, cache_dir=str(tmp_path))


def test_cache_replays_rejects(tmp_path):
    tok = tiny_tokenizer()
    exs = [*PAIRS, PreferenceExample(PAIRS[1].prompt * 3, " a", " b", source="x.jsonl", line=9)]
    settings = settings_from_spec(dict(max_length=30))
    log1 = RejectLog(skip_bad_rows=True)
    ds1 = tokenize_cached(exs, tok, settings, log1, cache_dir=str(tmp_path))
    log2 = RejectLog(skip_bad_rows=True)
    ds2 = tokenize_cached(exs, tok, settings, log2, cache_dir=str(tmp_path))
    assert ds2.stats["from_cache"] and len(ds1) == len(ds2) == 3
    assert log1.rejects == log2.rejects and log2.counts == {"prompt_too_long": 1}
    assert log2.rejects[0]["source"] == "x.jsonl" and log2.rejects[0]["line"] == 9
    # Without skipping, the cached reject still stops the run.
    with pytest.raises(DataError, match="^x.jsonl:9: prompt is"):
        tokenize_cached(exs, tok, settings, RejectLog(), cache_dir=str(tmp_path))
