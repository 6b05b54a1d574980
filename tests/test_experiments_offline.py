"""experiments.tldr / experiments.hh: upstream-format fixtures, judges, and the shrunken
SFT -> DPO -> win-rate pipeline end to end."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from dpo_jax import data, evaluation
from dpo_jax.data.formats import parse_hh, parse_tldr
from dpo_jax.metrics import read_jsonl
from experiments import hh, tldr


def test_tldr_fixture_rows_parse_with_the_upstream_parser():
    rows = tldr.make_rows(200, seed=0, split="train")
    assert rows == tldr.make_rows(200, seed=0, split="train")  # seeded
    agree = []
    for row in rows:
        assert set(row) == {"info", "split", "summaries", "choice", "worker", "batch"}
        assert set(row["info"]) == {"id", "post", "title", "subreddit"}
        (ex,) = parse_tldr(row)
        assert ex.prompt.endswith("\n\nTL;DR:") and f"TITLE: {row['info']['title']}" in ex.prompt
        assert ex.chosen == " " + row["summaries"][row["choice"]]["text"].strip()
        agree.append(
            tldr.title_score(ex.prompt, ex.chosen) > tldr.title_score(ex.prompt, ex.rejected)
        )
    # The judge agrees with the labels up to a little noise (as human labels have).
    assert np.mean(agree) > 0.95


def test_title_score_by_hand():
    prompt = "SUBREDDIT: r/cooking\n\nTITLE: bread never rises\n\nPOST: ...\n\nTL;DR:"
    # content words: {bread, never, rises}; summary {bread, rises, help}: P=2/3, R=2/3.
    assert tldr.title_score(prompt, " my bread rises ? help") == pytest.approx(2 / 3)
    assert tldr.title_score(prompt, " the cat") == 0.0
    judge = tldr.title_overlap_judge()
    np.testing.assert_array_equal(
        judge([prompt] * 3, [" bread never rises", " cat", " bread"], [" cat", " bread", " bread"]),
        [1.0, 0.0, 0.5],
    )


def test_hh_fixture_rows_parse_and_the_judge_prefers_chosen():
    rows = hh.make_rows(40, seed=0)
    judge = hh.helpfulness_judge()
    examples = [parse_hh(r)[0] for r in rows]
    assert all(set(r) == {"chosen", "rejected"} for r in rows)
    assert all(
        e.prompt.startswith("\n\nHuman: ") and e.prompt.endswith("\n\nAssistant:") for e in examples
    )
    verdicts = judge(
        [e.prompt for e in examples], [e.chosen for e in examples], [e.rejected for e in examples]
    )
    # Labels agree with the judge except a few ties (vague chosen vs off-topic rejected).
    assert np.all(verdicts >= 0.5) and np.mean(verdicts == 1.0) > 0.9
    # By hand: task words {bake, bread}; step words of "bake bread" are {mix, flour,
    # water, salt, yeast, let, dough, rise, bake}; a refusal costs 1.
    p = "\n\nHuman: how do i bake bread ?\n\nAssistant:"
    assert hh.helpfulness(p, " bake the bread hot") == pytest.approx(1.0 + 0.5 / 9)
    assert hh.helpfulness(p, " bread . i do not know .") == pytest.approx(0.5 - 1.0)


@pytest.mark.parametrize("module", [tldr, hh], ids=["tldr", "hh"])
def test_smoke_pipeline_end_to_end(module, tmp_path):
    config = module.get_config("smoke")
    config.workdir = str(tmp_path)
    run_dir = module.pipeline.run_offline(
        config, module.__name__.split(".")[-1], module.write_fixture,
        module.title_overlap_judge if module is tldr else module.helpfulness_judge,
    )  # fmt: skip
    for name in ("config.json", "results.csv", "win_rate.png", "samples.jsonl",
                 "data/train.jsonl", "sft/metrics.jsonl"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], int(r["step"])) for r in rows] == [
        ("sft", 0), (f"dpo:sigmoid:beta={config.beta:g}", 2), (f"dpo:sigmoid:beta={config.beta:g}", 4)
    ]  # fmt: skip
    for r in rows:
        assert (
            int(r["wins"]) + int(r["ties"]) + int(r["losses"])
            == int(r["num_prompts"])
            == config.data.num_test
        )
    # The reported win rate equals the judge re-run on the saved samples (a second computation).
    samples = read_jsonl(run_dir / "samples.jsonl")
    judge = module.title_overlap_judge() if module is tldr else module.helpfulness_judge()
    for method in ("sft", rows[-1]["method"]):
        mine = [s for s in samples if s["method"] == method]
        wr = evaluation.win_rate(
            [s["completion"] for s in mine], [s["reference"] for s in mine],
            judge=judge, prompts=[s["prompt"] for s in mine],
        )  # fmt: skip
        row = next(r for r in rows if r["method"] == method and r["final"] == "1")
        assert wr.rate == pytest.approx(float(row["win_rate"]), abs=1e-12)
    # The references are the test split's chosen completions, as the parser reads them.
    test_file = run_dir / "data" / ("valid1.jsonl" if module is tldr else "test.jsonl")
    examples = data.load_examples(
        {"path": str(test_file), "format": config.data.format}, None, data.RejectLog()
    )
    assert [s["reference"] for s in samples if s["method"] == "sft"] == [e.chosen for e in examples]
