"""dpo_jax.judge: the paper's C.2 prompts, seeded answer order, verdict parsing and
unparseable counting, through a scripted API-style judge and a tiny random HF model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dpo_jax import evaluation, judge
from dpo_jax.errors import UserError
from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

TLDR_PROMPT = "SUBREDDIT: r/cooking\n\nTITLE: bread never rises\n\nPOST: {post}\n\nTL;DR:"


def test_templates_render_the_papers_prompts():
    t = judge.TEMPLATES["summarization"]
    text = t.render(TLDR_PROMPT.format(post="my dough stays flat"), " flat dough ", "bread")
    assert text.startswith(
        "Which of the following summaries does a better job of summarizing the most important "
        "points in the given forum post, without including unimportant or irrelevant details? "
        "A good summary is both precise and concise.\n\nPost:\nmy dough stays flat\n\n"
        "Summary A:\nflat dough\n\nSummary B:\nbread\n\nFIRST provide a one-sentence comparison"
    )
    assert text.endswith(
        'Comparison: <one-sentence comparison and explanation>\nPreferred: <"A" or "B">'
    )
    d = judge.TEMPLATES["dialogue"].render(
        "\n\nHuman: how do i bake bread ?\n\nAssistant:", "x", "y"
    )
    assert d.startswith(
        "For the following query to a chatbot, which response is more helpful?\n\n"
        "Query: how do i bake bread ?\n\nResponse A:\nx\n\nResponse B:\ny\n\n"
    )
    assert d.endswith('More helpful: <"A" or "B">')
    multi = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"
    assert judge.dialogue_query(multi) == "Human: hi\n\nAssistant: hello\n\nHuman: and?"
    with pytest.raises(UserError, match="judge template 'nope'"):
        judge.LLMJudge(lambda q: q, "nope")


@pytest.mark.parametrize(
    "reply, key, want",
    [
        ("Comparison: A is shorter.\nPreferred: A", "Preferred", "A"),
        ('Comparison: ...\nPreferred: "B"', "Preferred", "B"),
        ("Comparison: ...\n**More helpful:** b.", "More helpful", "B"),
        ("Preferred: A\nComparison: on reflection\nPreferred: B", "Preferred", "B"),  # last wins
        ("Comparison: both fine.\nPreferred: A or B", "Preferred", None),
        ("Comparison: both fine.\nPreferred: C", "Preferred", None),
        ("I prefer A.", "Preferred", None),
        ("More helpful: A", "Preferred", None),  # the other template's key
    ],
)
def test_parse_verdict(reply, key, want):
    assert judge.parse_verdict(reply, key) == want


def _shown(query: str) -> tuple[str, str]:
    """The two summaries as shown in a rendered summarization prompt."""
    m = re.search(r"Summary A:\n(.*)\n\nSummary B:\n(.*)\n\nFIRST", query, flags=re.S)
    return m.group(1), m.group(2)


def test_scripted_judge_exact_counts_with_the_recorded_order():
    # 40 comparisons; the scripted judge prefers the summary containing "good", answers
    # garbage when the post says "skip", and is otherwise a content judge, so the counts
    # are known whatever order the seed draws - but only if the order is inverted right.
    rng = np.random.default_rng(0)
    n = 40
    prompts = [
        TLDR_PROMPT.format(post=("skip " if k % 10 == 3 else "") + f"post {k}") for k in range(n)
    ]
    policy_good = rng.random(n) < 0.6
    a = [("good " if g else "bad ") + f"summary {k}" for k, g in enumerate(policy_good)]
    b = [("bad " if g else "good ") + f"reference {k}" for k, g in enumerate(policy_good)]
    seen = []

    def api(query: str) -> str:
        first, second = _shown(query)
        seen.append((first, second))
        if "skip" in query:
            return "I cannot decide."
        return f"Comparison: one is good.\nPreferred: {'A' if first.startswith('good') else 'B'}"

    j = judge.LLMJudge(judge.callable_completer(api), "summarization", seed=7)
    wr = evaluation.win_rate(a, b, judge=j, prompts=prompts, swap=False)
    skipped = np.array(["skip" in p for p in prompts])
    assert wr.undecided == j.unparseable == skipped.sum() == 4
    assert wr.wins == (policy_good & ~skipped).sum()
    assert wr.losses == (~policy_good & ~skipped).sum()
    assert wr.ties == 0
    assert wr.rate == pytest.approx(policy_good[~skipped].mean())
    assert np.isnan(wr.per_pair[skipped]).all()
    # The recorded order is the one the judge saw, it is a seeded coin per comparison,
    # and both orders occur.
    order = np.array([r.a_first for r in j.records])
    assert [s[0] for s in seen] == [x if f else y for x, y, f in zip(a, b, order, strict=True)]
    assert order.tolist() == [
        judge.presentation_order(7, p, x, y) for p, x, y in zip(prompts, a, b, strict=True)
    ]
    assert 0 < order.sum() < n
    assert order.tolist() != [
        judge.presentation_order(8, p, x, y) for p, x, y in zip(prompts, a, b, strict=True)
    ]
    # A judge that always says "A" wins exactly where the policy was shown first.
    always_a = judge.LLMJudge(
        judge.callable_completer(lambda q: "Preferred: A"), "summarization", 7
    )
    biased = evaluation.win_rate(a, b, judge=always_a, prompts=prompts, swap=False)
    assert biased.wins == order.sum() and biased.losses == n - order.sum()
    # Same comparisons asked in another order and batching: same presentation, same verdicts.
    again = judge.LLMJudge(judge.callable_completer(lambda q: "Preferred: A"), "summarization", 7)
    rev = again(prompts[::-1], a[::-1], b[::-1])
    np.testing.assert_array_equal(rev[::-1], biased.per_pair)


def test_win_rate_all_undecided_and_swap():
    j = judge.LLMJudge(judge.callable_completer(lambda q: "no idea"), "dialogue")
    wr = evaluation.win_rate(["x", "y"], ["u", "v"], judge=j, prompts=["p", "q"])
    assert (wr.undecided, wr.wins, wr.ties, wr.losses) == (2, 0, 0, 0) and np.isnan(wr.rate)
    assert len(j.records) == 4  # swap asked both orders
    with pytest.raises(UserError, match="returned int"):
        judge.LLMJudge(judge.callable_completer(lambda q: 1), "dialogue")(["p"], ["a"], ["b"])


def test_hf_judge_through_dpo_jax_sampling_matches_transformers_greedy(tmp_path):
    import torch
    import transformers as tf

    tok = train_tokenizer()
    model_dir = make_tiny_hf_model("gpt2", tmp_path / "judge", tokenizer=tok)
    max_new = 6
    complete = judge.hf_completer(str(model_dir), max_new_tokens=max_new, rows=4)
    j = judge.LLMJudge(complete, "summarization", seed=0)
    prompts = [TLDR_PROMPT.format(post=f"post number {k}") for k in range(5)]  # 2 chunks of 4
    a, b = [f"summary {k}" for k in range(5)], [f"reference {k}" for k in range(5)]
    wr = evaluation.win_rate(a, b, judge=j, prompts=prompts, swap=False)
    # A random model writes no verdict: every comparison is counted as unparseable.
    assert len(j.records) == 5 and j.unparseable == wr.undecided == 5 and np.isnan(wr.rate)
    assert [r.a_first for r in j.records] == [
        judge.presentation_order(0, p, x, y) for p, x, y in zip(prompts, a, b, strict=True)
    ]
    # Each reply is transformers' greedy continuation of the same (left-truncated) prompt.
    hf = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    keep = 128 - max_new  # gpt2's learned positions: the judge keeps the prompt's end
    for rec in j.records[:2]:
        first, second = (rec.a, rec.b) if rec.a_first else (rec.b, rec.a)
        query = judge.TEMPLATES["summarization"].render(rec.prompt, first, second)
        ids = tok(query, add_special_tokens=False)["input_ids"][-keep:]
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )  # fmt: skip
        assert rec.reply == tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
