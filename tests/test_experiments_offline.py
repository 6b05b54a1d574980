"""experiments.tldr / experiments.hh (on experiments.offline): upstream-format fixtures,
judges, the reference the win rate is against, the temperature sweep and Best-of-N."""

from __future__ import annotations

import csv
import re
import types

import jax
import numpy as np
import pytest

from dpo_jax import checkpoint, data, evaluation, judge
from dpo_jax.data.formats import detect_format, parse_hh, parse_tldr, parse_tldr_sft
from dpo_jax.errors import UserError
from dpo_jax.metrics import read_jsonl
from experiments import common, driver, hh, offline, offline_phases, phases, tldr


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


def test_tldr_sft_rows_are_the_upstream_tldr_3_filtered_format():
    rows = tldr.make_sft_rows(50, seed=3, split="test")
    for row in rows:
        assert set(row) == {"id", "subreddit", "title", "post", "summary"}
        assert not row["summary"].startswith(" ")  # upstream summaries have no leading space
        assert detect_format(row) == "tldr_sft"
        (ex,) = parse_tldr_sft(row)
        assert ex.completion == " " + row["summary"]
        assert ex.prompt == (
            f"SUBREDDIT: r/{row['subreddit']}\n\nTITLE: {row['title']}\n\nPOST: {row['post']}"
            "\n\nTL;DR:"
        )
    # Human summaries state the title in full about 60% of the time.
    full = np.mean([r["summary"].startswith(r["title"] + " ,") for r in rows])
    assert 0.4 < full < 0.8


def test_title_score_by_hand():
    prompt = "SUBREDDIT: r/cooking\n\nTITLE: bread never rises\n\nPOST: ...\n\nTL;DR:"
    # content words: {bread, never, rises}; summary {bread, rises, help}: P=2/3, R=2/3.
    assert tldr.title_score(prompt, " my bread rises ? help") == pytest.approx(2 / 3)
    assert tldr.title_score(prompt, " the cat") == 0.0
    judge_fn = tldr.title_overlap_judge()
    np.testing.assert_array_equal(
        judge_fn(
            [prompt] * 3, [" bread never rises", " cat", " bread"], [" cat", " bread", " bread"]
        ),
        [1.0, 0.0, 0.5],
    )


def test_hh_fixture_rows_parse_and_the_judge_prefers_chosen():
    rows = hh.make_rows(40, seed=0)
    judge_fn = hh.helpfulness_judge()
    examples = [parse_hh(r)[0] for r in rows]
    assert all(set(r) == {"chosen", "rejected"} for r in rows)
    assert all(
        e.prompt.startswith("\n\nHuman: ") and e.prompt.endswith("\n\nAssistant:") for e in examples
    )
    verdicts = judge_fn(
        [e.prompt for e in examples], [e.chosen for e in examples], [e.rejected for e in examples]
    )
    # Labels agree with the judge except a few ties (vague chosen vs off-topic rejected).
    assert np.all(verdicts >= 0.5) and np.mean(verdicts == 1.0) > 0.9
    # By hand: task words {bake, bread}; step words of "bake bread" are {mix, flour,
    # water, salt, yeast, let, dough, rise, bake}; a refusal costs 1.
    p = "\n\nHuman: how do i bake bread ?\n\nAssistant:"
    assert hh.helpfulness(p, " bake the bread hot") == pytest.approx(1.0 + 0.5 / 9)
    assert hh.helpfulness(p, " bread . i do not know .") == pytest.approx(0.5 - 1.0)


def test_hh_keeps_only_single_turn_dialogues(capsys):
    """The HH task's filter (the paper's single-turn subset), on hand-written upstream
    rows: one Human turn before the final Assistant turn is kept, more are dropped."""
    single = "\n\nHuman: how do i bake bread ?\n\nAssistant:"
    multi = single + " mix flour .\n\nHuman: and then ?\n\nAssistant:"
    rows = [
        {"chosen": single + " knead it .", "rejected": single + " no ."},
        {"chosen": multi + " bake it .", "rejected": multi + " no ."},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: x ?\n\nAssistant: y",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: x ?\n\nAssistant: z"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
    ]  # fmt: skip
    examples = [parse_hh(r)[0] for r in rows]
    assert [hh.is_single_turn(e) for e in examples] == [True, False, False, True]
    kept = offline_phases.keep_examples(hh.TASK, examples, "train")
    assert [e.chosen for e in kept] == [" knead it .", " a"]
    assert "hh train: kept 2 of 4 examples (2 dropped" in capsys.readouterr().out
    assert offline_phases.keep_examples(tldr.TASK, examples, "train") == examples  # no filter


def test_presets_sweep_the_papers_temperatures():
    for module in (tldr, hh):
        for preset in ("mini", "pythia28"):
            assert tuple(module.get_config(preset).eval.temperatures) == (0, 0.25, 0.5, 0.75, 1)
    # The paper's comparison sets: TL;DR with PPO, HH with Best-of-N; three training
    # seeds for the measured presets, one for the smoke tests.
    assert tldr.get_config("mini").methods == ("sft", "preferred_ft", "dpo", "ppo")
    assert hh.get_config("mini").methods == ("preferred_ft", "dpo", "best_of_n")
    assert tldr.get_config("mini").reference_policy == "sft"
    for module in (tldr, hh):
        assert module.get_config("mini").seeds == (0, 1, 2)
        assert module.get_config("smoke").seeds == ()
        # PPO's rollouts are as long as the evaluation's samples, in every preset.
        for preset in module.PRESETS:
            c = module.get_config(preset)
            assert c.online.max_new_tokens == c.eval.max_new_tokens, (module, preset)
    c = hh.get_config("pythia28")
    assert (
        c.methods == ("preferred_ft", "dpo", "best_of_n") and c.reference_policy == "preferred_ft"
    )
    assert c.best_of_n.n == 128 and c.eval.batch_size % 128 == 0


def test_bad_ppo_settings_are_refused_before_any_phase(tmp_path):
    config = tldr.get_config("smoke")
    config.update(run_dir=str(tmp_path / "run"))
    config.online.num_mini_batches = 3  # 8 episodes do not split into 3 updates
    with pytest.raises(UserError, match="online.rollout_batch_size"):
        driver.run(config, tldr.EXPERIMENT)
    assert not (tmp_path / "run").exists()


def test_a_local_checkpoint_initialises_the_policy_in_the_configured_shape(tmp_path):
    import flax.linen as nn
    import jax

    from dpo_jax import models
    from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

    c = hh.get_config("mini")
    c.model.path = str(
        make_tiny_hf_model("gpt_neox", tmp_path / "neox", tokenizer=train_tokenizer())
    )
    c.model.remat = "block"
    # vocabulary and special tokens from config.json
    cfg = common.policy_model_config(c, 0, eos_token_id=0, pad_token_id=0)
    assert cfg.model_type == "gpt_neox" and cfg.remat == "block" and not cfg.scan_layers
    params = driver.initial_params(c, cfg)
    want = nn.meta.unbox(models.abstract_params(cfg))
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, want)


def test_pick_best_of_n_by_hand():
    comps = ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert offline.pick_best_of_n(comps, [0.1, 0.5, 0.2, 3.0, -1.0, 3.0], 3) == ["a1", "b0"]


# ---- judges resolved from the config, with a scripted API judge


def scripted_hh_api(query: str) -> str:
    """An API-style judge for the HH dialogue template: the more helpful response by the
    fixture's score, in the paper's format; no verdict for "can you tell me ..." queries."""
    m = re.search(r"Query: (.*)\n\nResponse A:\n(.*)\n\nResponse B:\n(.*)\n\nFIRST", query, re.S)
    q, first, second = m.groups()
    if "can you tell me" in q:
        return "Comparison: both responses are fine."
    prompt = f"\n\nHuman: {q}\n\nAssistant:"
    better = "A" if hh.helpfulness(prompt, first) >= hh.helpfulness(prompt, second) else "B"
    return f"Comparison: one answers the question.\nMore helpful: {better}"


def test_resolve_judge_specs(tmp_path):
    from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

    c = tldr.get_config("smoke")
    hf_dir = make_tiny_hf_model("gpt2", tmp_path / "judge", tokenizer=train_tokenizer())
    j = offline.resolve_judge(f"llm:hf:{hf_dir}", tldr.TASK, c)
    assert isinstance(j, judge.LLMJudge) and j.template.name == "summarization"
    c = hh.get_config("smoke")
    j = offline.resolve_judge(
        "llm:python:tests.test_experiments_offline:scripted_hh_api", hh.TASK, c
    )
    assert isinstance(j, judge.LLMJudge) and j.template.name == "dialogue" and j.seed == c.seed
    assert offline.resolve_judge("fixture", hh.TASK, c)(["p"], ["a"], ["a"]).tolist() == [0.5]
    for bad in ("llm:api:x", "python:nomodulefunction", "gpt4"):
        with pytest.raises(UserError, match="config key 'judge'"):
            offline.resolve_judge(bad, hh.TASK, c)


# ---- the pipeline end to end (smoke presets)

_SEEN_REFERENCES: list[list[str]] = []


def human_reference_checking_judge():
    """The fixture judge, refusing to compare against anything but the human-written
    reference summaries of the smoke preset's test posts (seed 0 -> test rows seed 1)."""
    refs = {}
    for row in tldr.make_sft_rows(16, seed=1, split="test"):
        (ex,) = parse_tldr_sft(row)
        refs[ex.prompt] = ex.completion
    inner = tldr.title_overlap_judge()

    def judge_fn(prompts, a, b):
        _SEEN_REFERENCES.append(list(b))
        if list(b) != [refs[p] for p in prompts]:
            raise AssertionError("the TL;DR win rate is not against the human references")
        return inner(prompts, a, b)

    return judge_fn


def _results(run_dir):
    with open(run_dir / "results.csv") as f:
        return list(csv.DictReader(f))


# 30-48 s: every TL;DR method, PPO included, and the judge, each phase a tiny compiled
# run. Heavy since the default tier's 10-minute budget ran over: the driver's default-tier
# end-to-end run is test_seeds_run_each_seed_and_summarise_their_results (sft, dpo).
@pytest.mark.heavy
def test_tldr_smoke_is_judged_against_the_human_references(tmp_path):
    config = tldr.get_config("smoke")
    config.run_dir = str(tmp_path)
    config.judge = "python:tests.test_experiments_offline:human_reference_checking_judge"
    _SEEN_REFERENCES.clear()
    run_dir, _ = driver.run(config, tldr.EXPERIMENT)
    for name in ("config.json", "results.csv", "win_rate.png", "samples.jsonl", "sft/metrics.jsonl",
                 "preferred_ft/metrics.jsonl", "dpo/metrics.jsonl", "reward_model/metrics.jsonl",
                 "ppo/metrics.jsonl", "data/tldr_3_filtered/train.jsonl",
                 "data/comparisons/train.jsonl"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    rows = _results(run_dir)
    assert [(r["method"], float(r["temperature"])) for r in rows] == [
        (m, t) for m in ("sft", "preferred_ft", "dpo", "ppo") for t in (0.0, 1.0)
    ]
    check_ppo_phase(run_dir, config, reference="sft")
    assert len(_SEEN_REFERENCES) == len(rows)  # every win rate went through the check
    # The references are the test split's human summaries, as the parser reads them.
    test_file = run_dir / "data" / "tldr_3_filtered" / "test.jsonl"
    examples = data.load_examples({"path": str(test_file), "sft": True}, None, data.RejectLog())
    human = [e.completion for e in examples]
    samples = read_jsonl(run_dir / "samples.jsonl")
    for r in rows:
        assert int(r["wins"]) + int(r["ties"]) + int(r["losses"]) == int(r["num_prompts"]) == 16
        assert int(r["unparseable"]) == 0
        mine = [s for s in samples if s["method"] == r["method"]
                and s["temperature"] == float(r["temperature"])]  # fmt: skip
        assert [s["reference"] for s in mine] == human
        # The reported win rate equals the fixture judge re-run on the saved samples.
        wr = evaluation.win_rate(
            [s["completion"] for s in mine], human, judge=tldr.title_overlap_judge(),
            prompts=[s["prompt"] for s in mine],
        )  # fmt: skip
        assert wr.rate == pytest.approx(float(r["win_rate"]), abs=1e-12)
    # Rerunning the command skips every finished phase and rebuilds the same table.
    before = (run_dir / "results.csv").read_bytes()
    (run_dir / "results.csv").unlink()
    _SEEN_REFERENCES.clear()
    driver.run(config, tldr.EXPERIMENT)
    assert (run_dir / "results.csv").read_bytes() == before and not _SEEN_REFERENCES
    # Greedy is deterministic and temperature 1 samples: the two sweeps differ.
    greedy = [s["completion"] for s in samples if s["method"] == "sft" and s["temperature"] == 0]
    hot = [s["completion"] for s in samples if s["method"] == "sft" and s["temperature"] == 1]
    assert greedy != hot


def check_ppo_phase(run_dir, config, reference: str) -> None:
    """The PPO phase started from and is penalised against `reference`, rewarded by the
    reward_model phase, with the adaptive KL controller's coefficients."""
    from dpo_jax import ppo

    marker = phases.read_marker(run_dir / "ppo")
    assert set(marker["after"]) == {"tokenizer", reference, "reward_model"}
    history = read_jsonl(run_dir / "ppo" / "metrics.jsonl")
    c, on = config.ppo, config.online
    # A row per optimizer step, each carrying its rollout's metrics.
    per_rollout = c.num_epochs * on.num_mini_batches
    rollout_of = [r for r in range(1, on.num_rollouts + 1) for _ in range(per_rollout)]
    assert [h["rollout"] for h in history] == rollout_of
    assert [h["step"] for h in history] == list(range(1, on.num_rollouts * per_rollout + 1))
    ends = history[per_rollout - 1 :: per_rollout]  # each rollout's last step
    for h in history:
        for key in ("objective/kl", "objective/scores", "objective/kl_coef"):
            assert h[key] == ends[h["rollout"] - 1][key], key
    # The first rollout samples the initial policy, the KL penalty's reference: zero KL.
    assert abs(ends[0]["objective/kl"]) < 1e-6
    assert all(np.isfinite(h["objective/scores"]) for h in ends)
    # The controller: beta starts at online.kl_coef and follows Ziegler et al.'s update
    # from each rollout's logged mean KL (below the target here, so beta shrinks).
    coef = np.float32(on.kl_coef)
    for h in ends:
        assert h["objective/kl_coef"] == pytest.approx(float(coef), rel=1e-6)
        coef = ppo.update_kl_coef(coef, h["objective/kl"], on.rollout_batch_size,
                                  target=c.target_kl, horizon=c.kl_horizon)  # fmt: skip
    assert ends[-1]["objective/kl_coef"] < on.kl_coef


@pytest.mark.heavy
def test_hh_smoke_with_best_of_n_ppo_and_an_llm_judge(tmp_path):
    config = hh.get_config("smoke")
    config.run_dir = str(tmp_path)
    config.judge = "llm:python:tests.test_experiments_offline:scripted_hh_api"
    config.methods = (*config.methods, "ppo")  # not the paper's HH set, but it must run
    run_dir, _ = driver.run(config, hh.EXPERIMENT)
    assert (run_dir / "reward_model" / "metrics.jsonl").is_file()
    rows = _results(run_dir)
    # Best-of-N is evaluated only where sampling differs from greedy decoding.
    assert [(r["method"], float(r["temperature"])) for r in rows] == [
        ("preferred_ft", 0.0), ("preferred_ft", 1.0), ("dpo", 0.0), ("dpo", 1.0),
        ("best_of_n", 1.0), ("ppo", 0.0), ("ppo", 1.0),
    ]  # fmt: skip
    check_ppo_phase(run_dir, config, reference="preferred_ft")
    test_rows = hh.make_rows(16, seed=1)
    chosen = [parse_hh(r)[0].chosen for r in test_rows]
    silent_prompts = sum(
        "can you tell me" in r["chosen"].split("\n\nAssistant:")[0] for r in test_rows
    )
    assert silent_prompts == 4
    samples = read_jsonl(run_dir / "samples.jsonl")
    for r in rows:
        mine = [s for s in samples if s["method"] == r["method"]
                and s["temperature"] == float(r["temperature"])]  # fmt: skip
        assert [s["reference"] for s in mine] == chosen  # HH: against the test chosen responses
        # Unparseable replies are counted, not ties or losses, and left out of the rate.
        assert int(r["unparseable"]) == silent_prompts == sum(s["verdict"] is None for s in mine)
        assert int(r["wins"]) + int(r["ties"]) + int(r["losses"]) == 16 - silent_prompts
        # Each verdict maps back through the recorded order to the reported score.
        for s in mine:
            if s["verdict"] is not None:
                assert s["score"] == float((s["verdict"] == "A") == s["policy_shown_first"])
        scores = [s["score"] for s in mine if s["score"] is not None]
        assert float(r["win_rate"]) == pytest.approx(np.mean(scores), abs=1e-12)
    orders = [s["policy_shown_first"] for s in samples]
    assert 0 < sum(orders) < len(orders)


def test_judge_samples_records_the_llm_judges_order_and_reply():
    prompts = ["\n\nHuman: q1\n\nAssistant:", "\n\nHuman: q2\n\nAssistant:"]
    run = types.SimpleNamespace(
        tokens=dict(test_prompt_texts=prompts, references=[" ref one", " ref two"])
    )
    j = judge.LLMJudge(judge.callable_completer(lambda q: "More helpful: A"), "dialogue", seed=1)
    row, lines = offline.judge_samples(j, run, [" mine one", " mine two"])
    first = [judge.presentation_order(1, p, t, r) for p, t, r in zip(
        prompts, [" mine one", " mine two"], [" ref one", " ref two"], strict=True)]  # fmt: skip
    assert [ln["policy_shown_first"] for ln in lines] == first
    assert row["wins"] == sum(first) and row["losses"] == 2 - sum(first)
    assert all(ln["judge_reply"] == "More helpful: A" and ln["verdict"] == "A" for ln in lines)


# ---- training seeds


def word_count_judge():
    """A judge whose verdicts vary with the samples (the smoke models rarely beat the
    references under the fixture judge): the longer text in words wins."""
    return offline.score_judge(lambda prompt, text: len(text.split()))


@pytest.mark.heavy  # two seeds of the offline smoke (~30 s); the default tier's twin is
# test_experiments_sentiment.py::test_training_seeds_share_the_data_and_are_summarised
def test_seeds_run_each_seed_and_summarise_their_results(tmp_path):
    from scipy import stats

    config = tldr.get_config("smoke")
    config.update(run_dir=str(tmp_path), seeds=(0, 1), methods=("sft", "dpo"))
    config.judge = "python:tests.test_experiments_offline:word_count_judge"
    run_dir, _ = driver.run(config, tldr.EXPERIMENT)
    per_seed = [_results(run_dir / f"seed_{s}") for s in (0, 1)]
    # The same data for both seeds (data_seed), different training.
    for name in ("tldr_3_filtered/train.jsonl", "tldr_3_filtered/test.jsonl"):
        assert (run_dir / "seed_0/data" / name).read_bytes() == (
            run_dir / "seed_1/data" / name
        ).read_bytes()
    keys = [(r["method"], r["temperature"]) for r in per_seed[0]]
    assert keys == [(r["method"], r["temperature"]) for r in per_seed[1]]
    win_SxR = np.array([[float(r["win_rate"]) for r in rows] for rows in per_seed])
    assert np.any(win_SxR[0] != win_SxR[1])  # the spread is not trivially zero
    summary = common.read_csv(run_dir / "summary.csv")
    assert list(summary[0]) == common.summary_columns(("method", "temperature"), ("win_rate",))
    assert [(r["method"], r["temperature"]) for r in summary] == keys
    t = stats.t.ppf(0.975, df=1)
    for k, r in enumerate(summary):
        assert int(r["n_seeds"]) == 2
        assert float(r["win_rate_mean"]) == pytest.approx(win_SxR[:, k].mean(), abs=1e-12)
        assert float(r["win_rate_std"]) == pytest.approx(win_SxR[:, k].std(ddof=1), abs=1e-12)
        assert float(r["win_rate_ci95"]) == pytest.approx(
            t * win_SxR[:, k].std(ddof=1) / np.sqrt(2), abs=1e-12
        )
    assert (run_dir / "win_rate.png").is_file()
    assert not (run_dir / "results.csv").exists()  # per seed only


def test_online_dpo_is_wired_into_the_tldr_graph(tmp_path):
    config = tldr.get_config("smoke")
    config.methods = ("sft", "online_dpo")
    graph = {p.name: p for p in offline.build_phases(config, tldr.TASK)}
    assert [n for n in graph if n not in ("data", "tokenizer", "report")] == [
        "sft", "reward_model", "online_dpo", "eval_sft", "eval_online_dpo",
    ]  # fmt: skip
    assert graph["online_dpo"].after == ("tokenizer", "sft", "reward_model")
    assert {"online", "online_dpo", "method_defaults.online_dpo", "loss"} <= set(
        graph["online_dpo"].reads
    )
    run = offline_phases.rollout_config(config, "online_dpo")
    # the method's defaults over the run's online.* (PPO keeps one sample per prompt)
    assert (run.online.samples_per_prompt, config.online.samples_per_prompt) == (2, 1)
    assert (run.objective.name, run.num_steps, run.loss.hyper.beta) == ("online_dpo", 2, 0.5)
    # A bad setting is refused before the run directory exists.
    config.update(run_dir=str(tmp_path / "run"))
    config.method_defaults.online_dpo.samples_per_prompt = 1
    with pytest.raises(UserError, match="online.samples_per_prompt"):
        driver.run(config, tldr.EXPERIMENT)
    assert not (tmp_path / "run").exists()


# ~1-2 min on 2 cores: the TL;DR smoke's SFT, reward model and online DPO (sampler,
# reference scorer and paired step compiled), then two evaluations
@pytest.mark.heavy
def test_tldr_smoke_online_dpo_labelled_by_the_learned_reward(tmp_path):
    config = tldr.get_config("smoke")
    config.update(run_dir=str(tmp_path), methods=("sft", "online_dpo"))
    run_dir, _ = driver.run(config, tldr.EXPERIMENT)
    rows = _results(run_dir)
    assert [(r["method"], float(r["temperature"])) for r in rows] == [
        (m, t) for m in ("sft", "online_dpo") for t in (0.0, 1.0)
    ]
    for r in rows:
        assert int(r["wins"]) + int(r["ties"]) + int(r["losses"]) == int(r["num_prompts"]) == 16
    marker = phases.read_marker(run_dir / "online_dpo")
    assert set(marker["after"]) == {"tokenizer", "sft", "reward_model"}
    log = read_jsonl(run_dir / "online_dpo" / "metrics.jsonl")
    rollouts = [r for r in log if "rollout" in r]
    assert [r["rollout"] for r in rollouts] == [1, 2] and [r["step"] for r in rollouts] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    # It trained from the SFT policy (its params moved) and was evaluated from its own.
    sft, tuned = (checkpoint.load_params(run_dir / p)[2] for p in ("sft", "online_dpo"))
    pairs = zip(jax.tree.leaves(sft), jax.tree.leaves(tuned), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)
