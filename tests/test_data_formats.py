"""Each upstream format, in its exact field layout, parsed to prompt/chosen/rejected."""

from __future__ import annotations

import pytest

from dpo_jax.data.errors import DataError
from dpo_jax.data.formats import (
    PreferenceExample,
    UnpairedExample,
    detect_format,
    paired_to_unpaired,
    parse_row,
    strip_html,
)
from dpo_jax.data.sources import Row
from tests.data_helpers import tiny_tokenizer


def _parse(data, fmt="auto", tokenizer=None):
    return parse_row(Row(data, "fixture.jsonl", 7), fmt, tokenizer)


def test_hh_multi_turn_split_at_last_assistant():
    # Anthropic/hh-rlhf rows: two full transcripts, no prompt field.
    row = {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?"
        "\n\nAssistant: I don't know.",
    }
    assert detect_format(row) == "hh"
    (ex,) = _parse(row)
    assert ex.prompt == "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    assert ex.chosen == " 6."
    assert ex.rejected == " I don't know."
    assert (ex.source, ex.line) == ("fixture.jsonl", 7)


def test_hh_rejected_with_different_history_is_an_error():
    row = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
        "rejected": "\n\nHuman: Yo\n\nAssistant: Hello",
    }
    with pytest.raises(DataError, match=r"fixture.jsonl:7: HH 'rejected' transcript"):
        _parse(row)


def test_explicit_and_implicit_prompt():
    (ex,) = _parse({"prompt": "Q: sky?", "chosen": " blue", "rejected": " green"})
    assert ex == PreferenceExample("Q: sky?", " blue", " green")
    row = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    assert detect_format(row) == "implicit"
    (ex,) = _parse(row)
    # The shared prefix is the prompt; the space before the first differing word
    # stays with the completions.
    assert (ex.prompt, ex.chosen, ex.rejected) == ("The sky is", " blue.", " green.")


def test_shp_both_label_values():
    # stanfordnlp/SHP row layout (all columns, as in the release).
    base = {
        "post_id": "himc90",
        "domain": "askacademia_train",
        "upvote_ratio": 0.99,
        "history": "Is a PhD worth it?",
        "c_root_id_A": "fvnyx8r",
        "c_root_id_B": "fvo2b9e",
        "created_at_utc_A": 1591360356,
        "created_at_utc_B": 1591363312,
        "score_A": 52,
        "score_B": 5,
        "human_ref_A": "Yes, if you love research.",
        "human_ref_B": "No.",
        "labels": 1,
        "seconds_difference": 2956.0,
        "score_ratio": 10.4,
    }
    assert detect_format(base) == "shp"
    (ex,) = _parse(base)
    assert ex.prompt == "\n\nHuman: Is a PhD worth it?\n\nAssistant:"
    assert (ex.chosen, ex.rejected) == (" Yes, if you love research.", " No.")
    (ex,) = _parse({**base, "labels": 0})
    assert (ex.chosen, ex.rejected) == (" No.", " Yes, if you love research.")


def test_stack_exchange_pairs_ordered_by_score():
    # HuggingFaceH4/stack-exchange-preferences row layout.
    row = {
        "qid": 11,
        "question": "<p>How do I reverse a list?</p>\n<pre><code>xs = [1, 2]</code></pre>",
        "answers": [
            {
                "answer_id": 1,
                "author": "a",
                "author_id": 1,
                "author_profile": "u/1",
                "pm_score": 3,
                "selected": False,
                "text": "<p>Use <code>reversed</code>.</p>",
            },
            {
                "answer_id": 2,
                "author": "b",
                "author_id": 2,
                "author_profile": "u/2",
                "pm_score": 5,
                "selected": True,
                "text": "<p>Use slicing: xs[::-1]</p>",
            },
            {
                "answer_id": 3,
                "author": "c",
                "author_id": 3,
                "author_profile": "u/3",
                "pm_score": 1,
                "selected": False,
                "text": "<p>Write a loop.</p>",
            },
        ],
        "date": "2008/08/01",
        "metadata": ["https://stackoverflow.com/questions/11"],
    }
    assert detect_format(row) == "stack_exchange"
    exs = _parse(row)
    prompt = "\n\nHuman: How do I reverse a list?\n\nxs = [1, 2]\n\nAssistant:"
    a0, a1, a2 = " Use reversed.", " Use slicing: xs[::-1]", " Write a loop."
    # pairs (0,1), (0,2), (1,2): the higher-scored answer of each is chosen.
    assert exs == [
        PreferenceExample(prompt, a1, a0),
        PreferenceExample(prompt, a0, a2),
        PreferenceExample(prompt, a1, a2),
    ]


def test_strip_html_paragraphs():
    assert strip_html("<p>a &amp; b</p><p>c<br>d</p>") == "a & b\n\nc\n\nd"


def test_ultrafeedback_binarized_rendered_with_chat_template():
    tok = tiny_tokenizer(chat=True)
    # HuggingFaceH4/ultrafeedback_binarized row layout.
    row = {
        "prompt": "Name a colour.",
        "prompt_id": "abc123",
        "chosen": [
            {"content": "Name a colour.", "role": "user"},
            {"content": "Blue.", "role": "assistant"},
        ],
        "rejected": [
            {"content": "Name a colour.", "role": "user"},
            {"content": "Seven.", "role": "assistant"},
        ],
        "messages": [
            {"content": "Name a colour.", "role": "user"},
            {"content": "Blue.", "role": "assistant"},
        ],
        "score_chosen": 8.0,
        "score_rejected": 2.5,
    }
    assert detect_format(row) == "ultrafeedback"
    (ex,) = _parse(row, tokenizer=tok)
    # ChatML written out by hand: the prompt carries the generation prompt.
    assert ex.prompt == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert ex.chosen == "Blue.<|im_end|>\n"
    assert ex.rejected == "Seven.<|im_end|>\n"
    assert ex.chat


def test_conversational_explicit_prompt_and_no_template_error():
    tok = tiny_tokenizer(chat=True)
    row = {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    assert detect_format(row) == "conversational"
    (ex,) = _parse(row, tokenizer=tok)
    assert ex.prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert (ex.chosen, ex.rejected) == ("Hello!<|im_end|>\n", "Go away.<|im_end|>\n")
    with pytest.raises(DataError, match="fixture.jsonl:7: .*chat_template"):
        _parse(row, tokenizer=tiny_tokenizer(chat=False))


def test_tldr_comparisons():
    # openai/summarize_from_feedback "comparisons" row layout.
    row = {
        "info": {
            "id": "t3_abc",
            "post": "My roommate never washes the dishes.",
            "title": "Roommate trouble",
            "subreddit": "relationships",
            "site": None,
            "article": None,
        },
        "summaries": [
            {"text": " Roommate leaves dishes.", "policy": "sup2", "note": None},
            {"text": "Dishes.", "policy": "ppo_xl", "note": None},
        ],
        "choice": 1,
        "worker": "w7",
        "batch": "batch5",
        "split": "train",
        "extra": {"confidence": 8},
    }
    assert detect_format(row) == "tldr"
    (ex,) = _parse(row)
    assert ex.prompt == (
        "SUBREDDIT: r/relationships\n\nTITLE: Roommate trouble\n\n"
        "POST: My roommate never washes the dishes.\n\nTL;DR:"
    )
    assert (ex.chosen, ex.rejected) == (" Dishes.", " Roommate leaves dishes.")


def test_unpaired_rows_and_paired_to_unpaired():
    # trl-lib/kto-mix style rows.
    row = {"prompt": "Say hi.", "completion": " Hi!", "label": True}
    assert detect_format(row) == "unpaired"
    (ex,) = _parse(row)
    assert ex == UnpairedExample("Say hi.", " Hi!", True)
    (ex,) = _parse({"prompt": "Say hi.", "completion": " No.", "label": False})
    assert ex.label is False
    pairs = [
        PreferenceExample("p1", " a", " b", ref_chosen_logp=-1.0, ref_rejected_logp=-2.0),
        PreferenceExample("p2", " c", " d"),
    ]
    assert paired_to_unpaired(pairs) == [
        UnpairedExample("p1", " a", True, ref_logp=-1.0),
        UnpairedExample("p1", " b", False, ref_logp=-2.0),
        UnpairedExample("p2", " c", True),
        UnpairedExample("p2", " d", False),
    ]


def test_reference_logps_columns_are_carried():
    (ex,) = _parse(
        {
            "prompt": "p",
            "chosen": " a",
            "rejected": " b",
            "ref_chosen_logps": -3.5,
            "ref_rejected_logps": -4,
        }
    )
    assert (ex.ref_chosen_logp, ex.ref_rejected_logp) == (-3.5, -4.0)
