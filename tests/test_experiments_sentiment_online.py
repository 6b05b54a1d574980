"""experiments.sentiment's on-policy methods (experiments/sentiment_online.py): GRPO,
RLOO, online DPO (learned reward and VADER) and iterative DPO's rounds as phases.

The specs, settings, phase graph and fingerprints are checked without running anything;
the smoke preset runs every new method end to end once (heavy), stopped after iterative
DPO's first round and resumed, then rerun (every phase skipped, the same results.csv) and
with round 1's pairs regenerated (the same bytes)."""

from __future__ import annotations

import csv
import json
import shutil

import jax
import numpy as np
import pytest

from dpo_jax import checkpoint
from dpo_jax.metrics import read_jsonl
from experiments import driver, phases, sentiment, sentiment_methods, sentiment_online


def _smoke(methods: tuple[str, ...], workdir: str = "") -> object:
    config = sentiment.get_config("smoke")
    config.methods = methods
    config.run_dir = workdir
    return config


def _prints(config) -> dict[str, str]:
    """Each phase's fingerprint, as `phases.run_phases` computes them (the report has no
    marker)."""
    out: dict[str, str] = {}
    for phase in phases._ordered(sentiment.build_phases(config)):
        out[phase.name] = phases.fingerprint(phase, config, out)["fingerprint"]
    del out["report"]
    return out


def test_online_specs_parse_and_get_display_names():
    labels = {
        "grpo": "GRPO",
        "rloo:kl_coef=0.02": "RLOO",
        "online_dpo:beta=0.1": "Online DPO",
        "online_dpo_gt:beta=0.1:loss=ipo": "Online DPO-GT",
        "iterative_dpo:beta=0.1": "Iterative DPO (3 rounds)",
        "iterative_dpo:beta=0.1:rounds=2:reference=reset": "Iterative DPO (2 rounds)",
        "iterative_dpo:beta=0.1:rounds=1": "Iterative DPO (1 round)",
    }
    for spec, name in labels.items():
        method = sentiment_methods.parse_method(spec)
        assert method.label == spec  # words stay words, numbers print as given
        assert sentiment_methods.family_name(method.label) == name
    m = sentiment_methods.parse_method("iterative_dpo:beta=0.5:reference=reset:loss=ipo:seed=2")
    assert m.hyper == (("beta", 0.5), ("reference", "reset"), ("loss", "ipo")) and m.seed == 2
    for spec, match in [
        ("online_dpo", "online_dpo needs beta"),
        ("iterative_dpo:rounds=2", "iterative_dpo needs beta"),
        ("iterative_dpo:beta=0.1:rounds=0", "rounds must be"),
        ("iterative_dpo:beta=0.1:rounds=1.5", "rounds must be"),
        ("iterative_dpo:beta=0.1:reference=sft", "reference must be"),
        ("dpo:beta=0.1:loss=ipo", "not a number"),  # words only for the kinds that take them
        ("grpo:label=argmax", "not a number"),
    ]:
        with pytest.raises(ValueError, match=match):
            sentiment_methods.parse_method(spec)
    # Every preset's methods parse; the comparison set is in `online` and `frontier`.
    for preset in ("online", "frontier"):
        methods = sentiment.get_config(preset).methods
        assert set(sentiment_methods.ONLINE_METHODS) <= set(methods)
        assert {sentiment_methods.parse_method(s).kind for s in methods} >= {
            *sentiment_methods.ONLINE_KINDS, *sentiment_methods.ITERATIVE_KINDS
        }  # fmt: skip


def test_settings_are_online_then_method_defaults_then_the_spec():
    config = sentiment.get_config("online")
    s = sentiment_online.settings(
        config,
        sentiment_methods.parse_method("grpo:kl_coef=0.05:epsilon_high=0.28:loss_type=dr_grpo"),
    )
    assert s.sections == {
        "online": {"samples_per_prompt": 4, "num_rollouts": 150, "kl_coef": 0.05},
        "grpo": {"epsilon_high": 0.28, "loss_type": "dr_grpo"},
    }
    # typed as the config's (a spec's numbers parse as floats), and the phase's length
    m = sentiment_methods.parse_method("rloo:num_rollouts=3:samples_per_prompt=2")
    s = sentiment_online.settings(config, m)
    assert s.sections["online"]["num_rollouts"] == 3
    assert isinstance(s.sections["online"]["num_rollouts"], int)
    assert sentiment_online.online_num_steps(config, m) == 3
    run = sentiment_online.online_config(config, m)
    assert (run.objective.name, run.online.samples_per_prompt, run.num_steps) == ("rloo", 2, 3)
    assert config.online.samples_per_prompt == 1  # PPO's own setting is untouched
    # paired kinds: `loss=` and the loss's hyper-parameters; online_dpo.* by name
    s = sentiment_online.settings(
        config,
        sentiment_methods.parse_method(
            "online_dpo_gt:beta=0.2:label_smoothing=0.1:label=bradley_terry"
        ),
    )
    assert (s.loss_name, s.loss_hyper) == ("sigmoid", {"beta": 0.2, "label_smoothing": 0.1})
    assert s.sections["online_dpo"] == {"label": "bradley_terry"}
    assert s.sections["online"]["rollout_batch_size"] == 128
    s = sentiment_online.settings(
        config,
        sentiment_methods.parse_method("iterative_dpo:beta=0.3:loss=ipo:steps=7:reference=reset"),
    )
    assert (s.loss_name, s.loss_hyper, s.steps, s.rounds, s.reference) == (
        "ipo", {"beta": 0.3}, 7, 3, "reset",
    )  # fmt: skip
    assert sentiment_online.settings(
        config, sentiment_methods.parse_method("iterative_dpo:beta=0.3")
    ).steps == config.num_steps  # fmt: skip
    for spec, match in [
        ("grpo:bogus=1", "grpo has no setting 'bogus'"),
        ("rloo:label=1", "rloo has no setting 'label'"),  # online DPO's key
        ("online_dpo:beta=0.1:bogus=1", r"takes no \['bogus'\]"),
        ("iterative_dpo:beta=0.1:kl_coef=0.1", r"takes no \['kl_coef'\]"),  # not sampled
    ]:
        with pytest.raises(ValueError, match=match):
            sentiment_online.settings(config, sentiment_methods.parse_method(spec))
    # refused when the graph is built, before any phase runs
    config.methods = ("grpo:samples_per_prompt=3",)  # 64 rows are not groups of 3
    with pytest.raises(Exception, match="online.rollout_batch_size"):
        sentiment.build_phases(config)


def test_iterative_rounds_are_chained_phases_with_their_own_fingerprints():
    spec = "iterative_dpo:beta=0.1:rounds=3:reference=reset"
    config = _smoke(("grpo", spec))
    graph = {p.name: p for p in sentiment.build_phases(config)}
    base = "methods/iterative_dpo_beta=0.1_rounds=3_reference=reset"
    rounds = [f"{base}/round_{r}{part}" for r in (1, 2, 3) for part in ("_pairs", "")]
    assert [n for n in graph if n.startswith(base)] == rounds
    assert "reward_model" in graph  # the rounds' labels and GRPO's reward
    assert graph[f"{base}/round_1_pairs"].after == ("tokenizer", "sft", "reward_model")
    assert graph[f"{base}/round_2_pairs"].after[-1] == f"{base}/round_1"
    assert graph[f"{base}/round_2"].after == ("tokenizer", "sft", f"{base}/round_2_pairs",
                                              f"{base}/round_1")  # fmt: skip
    assert graph[f"{base}/round_3"].dry is not None
    assert set(graph["report"].after) >= set(rounds) | {"methods/grpo"}
    # Fingerprints: a round's sampling setting reaches every round (they chain), not GRPO;
    # GRPO's KL weight reaches GRPO only.
    before = _prints(config)
    more = config.copy_and_resolve_references()
    more.method_defaults.iterative_dpo.samples_per_prompt = 8
    after = _prints(more)
    assert {n for n in before if before[n] != after[n]} == set(rounds)
    more = config.copy_and_resolve_references()
    more.online.kl_coef = 0.5
    after = _prints(more)
    assert {n for n in before if before[n] != after[n]} == {"methods/grpo"}
    more = config.copy_and_resolve_references()
    more.num_steps = 6  # the rounds' steps, so round 2's start, so its pairs
    after = _prints(more)
    changed = {n for n in before if before[n] != after[n]}
    assert set(rounds) - {f"{base}/round_1_pairs"} <= changed
    assert f"{base}/round_1_pairs" not in changed and "methods/grpo" not in changed


def test_best_and_worst_by_hand():
    scores = np.array([[0.5, -0.2, 0.5, 0.9], [0.3, 0.3, 0.3, 0.3], [1.0, -1.0, -1.0, 1.0]])
    # prefix 0: best 3, worst 1; prefix 1: all tied, no pair; prefix 2: the first best
    # and the last worst
    assert sentiment_online.best_and_worst(scores) == [(0, 3, 1), (2, 0, 2)]
    with pytest.raises(ValueError, match="prefixes, samples"):
        sentiment_online.best_and_worst(np.zeros(4))


def _rows(run_dir) -> list[dict]:
    with open(run_dir / "results.csv") as f:
        return list(csv.DictReader(f))


# 49-103 s measured on 2 cores (load 4-11): the smoke SFT and reward model, 4-5 on-policy programs
# (GRPO, RLOO, online DPO twice, 2 DPO rounds) compiled, 3 reruns and a dry run.
@pytest.mark.heavy
def test_online_methods_run_resume_and_rerun_identically(tmp_path):
    iterative = "iterative_dpo:beta=0.1:rounds=2"
    methods = ("grpo", "rloo", "online_dpo:beta=0.1", "online_dpo_gt:beta=0.1", iterative)
    config = _smoke(methods, str(tmp_path))
    graph = sentiment.build_phases(config)
    base = "methods/iterative_dpo_beta=0.1_rounds=2"
    # A run stopped between the rounds: everything up to round 1's training.
    first = {p.name for p in graph}
    first -= {f"{base}/round_2_pairs", f"{base}/round_2", "report"}
    done = phases.run_phases([p for p in graph if p.name in first], config, tmp_path)
    assert set(done) == first
    # The rerun skips round 1 (and everything else finished) and runs round 2.
    run_dir, returned = driver.run(config, sentiment.EXPERIMENT)
    assert set(returned) == {f"{base}/round_2_pairs", f"{base}/round_2", "report"}
    results = (run_dir / "results.csv").read_bytes()
    rows = _rows(run_dir)
    final = {r["method"]: r for r in rows if r["final"] == "1"}
    assert set(final) == {"sft", *methods}
    for r in rows:
        assert np.isfinite(float(r["reward"])) and np.isfinite(float(r["kl"])), r
        assert int(r["num_samples"]) == config.eval.num_prefixes
    # On-policy runs: 2 rollouts of one update, an evaluation at step 2 (eval_every 2).
    for m in methods:
        if m != iterative:
            assert [int(r["step"]) for r in rows if r["method"] == m] == [0, 2], m
            log = read_jsonl(run_dir / sentiment_methods.method_phase_name(sentiment_methods.parse_method(m))
                             / "metrics.jsonl")  # fmt: skip
            assert [r["rollout"] for r in log if "rollout" in r] == [1, 2], m
    # Iterative DPO: round r's steps follow round r-1's (4 steps each, evals every 2).
    assert [int(r["step"]) for r in rows if r["method"] == iterative] == [0, 2, 4, 6, 8]
    assert int(final[iterative]["step"]) == 8
    for r in (1, 2):
        log = read_jsonl(run_dir / f"{base}/round_{r}/metrics.jsonl")
        assert [ln["step"] for ln in log if "loss" in ln] == [1, 2, 3, 4]
        pairs = json.loads((run_dir / f"{base}/round_{r}_pairs/metrics.json").read_text())
        assert pairs["round"] == r and 0 < pairs["num_pairs"] <= config.pairs.num_prefixes
    # Each round moved the policy it started from (SFT, then round 1's).
    flat = lambda path: np.concatenate(
        [np.ravel(x) for x in jax.tree.leaves(checkpoint.load_params(run_dir / path)[2])]
    )  # fmt: skip
    sft, one, two = (flat(f) for f in ("sft", f"{base}/round_1", f"{base}/round_2"))
    assert not np.array_equal(sft, one) and not np.array_equal(one, two)
    # Rerun: every phase skipped, the same table.
    _, returned = driver.run(config, sentiment.EXPERIMENT)
    assert set(returned) == {"report"}
    assert (run_dir / "results.csv").read_bytes() == results
    # Round 1's pairs regenerated from (seed, round) alone: the same bytes, and nothing
    # after them reruns (their fingerprint is the same).
    saved = tmp_path / "saved_round_1_pairs"
    shutil.move(run_dir / f"{base}/round_1_pairs", saved)
    _, returned = driver.run(config, sentiment.EXPERIMENT)
    assert set(returned) == {f"{base}/round_1_pairs", "report"}
    for name in ("tokens.json", "ref_logps.npz", "metrics.json"):
        assert (run_dir / f"{base}/round_1_pairs" / name).read_bytes() == (
            saved / name
        ).read_bytes(), name
    assert (run_dir / "results.csv").read_bytes() == results
    # --dry_run lowers every training phase's program, the on-policy ones included.
    dry = _smoke(methods, str(tmp_path))
    dry.dry_run_devices = 1
    online_phases = {
        sentiment_methods.method_phase_name(sentiment_methods.parse_method(m)) for m in methods
    }
    online_phases -= {
        sentiment_methods.method_phase_name(sentiment_methods.parse_method(iterative))
    }
    assert set(driver.dry_run(dry, sentiment.EXPERIMENT)) == {
        "sft", f"{base}/round_1", f"{base}/round_2", *online_phases
    }  # fmt: skip
