"""experiments.sentiment: the shrunken pipeline end to end, plus its pure pieces.

The end-to-end test runs the `smoke` preset once (module-scoped fixture) and checks the
run directory against second computations: VADER re-run on the saved texts, KL recomputed
from the saved per-sequence log-probs, the SFT policy's KL against itself (sampler
log-probs vs a full forward of the same params: two code paths), and the pairs' labels.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from dpo_jax import checkpoint, train
from dpo_jax.errors import UserError
from dpo_jax.metrics import read_jsonl
from experiments import (
    common,
    driver,
    phases,
    pipeline,
    sentiment,
    sentiment_methods,
    sentiment_task,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    config = sentiment.get_config("smoke")
    config.run_dir = str(tmp_path_factory.mktemp("sentiment_smoke"))
    run_dir, _ = driver.run(config, sentiment.EXPERIMENT)
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return run_dir, config, rows


def _samples(run_dir) -> list[dict]:
    """Every policy's final evaluation samples (the SFT policy's and each method's)."""
    out = read_jsonl(run_dir / "evaluate_sft" / "samples.jsonl")
    for path in sorted((run_dir / "methods").glob("*/samples.jsonl")):
        out += read_jsonl(path)
    return out


def test_run_dir_has_every_artifact(smoke_run):
    run_dir, config, rows = smoke_run
    for name in ("config.json", "results.csv", "frontier.png", "evaluate_sft/samples.jsonl",
                 "pairs/pairs.jsonl", "timings.json", "tokenizer/tokenizer.json",
                 "sft/metrics.jsonl", "sft/checkpoints/30/_CHECKPOINT_METADATA"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    # Every phase finished with its marker; the report runs every time and has none.
    phase_names = [p.name for p in sentiment.build_phases(config)]
    assert phase_names[-1] == "report" and not (run_dir / "report" / "DONE").exists()
    for name in phase_names[:-1]:
        assert (run_dir / name / "DONE").is_file(), name
    timings = json.loads((run_dir / "timings.json").read_text())
    assert set(timings) == set(phase_names[:-1]) | {"total_s"}
    assert (run_dir / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "config.json").read_text())["methods"] == list(config.methods)
    with open(run_dir / "results.csv") as f:
        assert tuple(next(csv.reader(f))) == sentiment.RESULT_COLUMNS
    methods = {r["method"] for r in rows}
    assert methods == {
        "sft", "dpo:beta=0.1", "preferred_ft", "best_of_n:n=4", "unlikelihood:unlikelihood_alpha=1",
    }  # fmt: skip
    # Unlikelihood trained and was evaluated like the other losses, with finite numbers.
    ul = [r for r in rows if r["method"] == "unlikelihood:unlikelihood_alpha=1"]
    assert [int(r["step"]) for r in ul] == [0, 2, 4] and ul[-1]["final"] == "1"
    assert all(np.isfinite(float(r["reward"])) and np.isfinite(float(r["kl"])) for r in ul)
    # Trained methods: an eval at step 0 (the SFT policy) and every eval_every steps.
    dpo_steps = [int(r["step"]) for r in rows if r["method"] == "dpo:beta=0.1"]
    assert dpo_steps == [0, 2, 4]
    for row in rows:
        assert np.isfinite(float(row["reward"])) and -1.0 <= float(row["reward"]) <= 1.0
        assert np.isfinite(float(row["kl"]))
        assert int(row["num_samples"]) == config.eval.num_prefixes
    # Per-method metrics (the Trainer's metrics.jsonl): training rows every log_every
    # steps, and the eval_hook's rows (reward, KL) every eval_every steps and at the end.
    lines = read_jsonl(run_dir / "methods" / "dpo_beta=0.1" / "metrics.jsonl")
    train_rows = [ln for ln in lines if "loss" in ln]
    eval_rows = [ln for ln in lines if "eval/reward" in ln]
    assert [ln["step"] for ln in train_rows] == [1, 2, 3, 4]
    assert [ln["step"] for ln in eval_rows] == [2, 4]
    assert all(np.isfinite(ln["loss"]) for ln in train_rows)
    dpo_rows = [r for r in rows if r["method"] == "dpo:beta=0.1"][1:]
    for ln, row in zip(eval_rows, dpo_rows, strict=True):  # results.csv is those rows
        assert float(row["reward"]) == ln["eval/reward"] and float(row["kl"]) == ln["eval/kl"]
    assert list((run_dir / "methods" / "dpo_beta=0.1" / "tensorboard").iterdir())
    # The run checkpointed (the Trainer's Orbax checkpoints, newest kept).
    assert (run_dir / "methods" / "dpo_beta=0.1" / "checkpoints" / "4").is_dir()
    # Unlikelihood at alpha = 1: loss = chosen NLL + unlikelihood term, both logged.
    ul_lines = read_jsonl(
        run_dir / "methods" / "unlikelihood_unlikelihood_alpha=1" / "metrics.jsonl"
    )
    ul_lines = [ln for ln in ul_lines if "loss" in ln]
    assert [ln["step"] for ln in ul_lines] == [1, 2, 3, 4]
    for ln in ul_lines:
        np.testing.assert_allclose(ln["loss"], ln["nll_loss"] + ln["unlikelihood_loss"], rtol=1e-5)
        assert ln["unlikelihood_loss"] > 0


def _start(workdir, *args: str) -> subprocess.Popen:
    """`python -m experiments.sentiment --preset=smoke` in a subprocess."""
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.sentiment", "--preset=smoke",
         f"--config.run_dir={workdir}", *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def _wait_for(proc: subprocess.Popen, path, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before {path}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory):
    """The smoke experiment SIGKILLed once its DPO phase has checkpointed step 2, then
    rerun with the same command (in this process): (workdir, config, phase returns)."""
    workdir = tmp_path_factory.mktemp("sentiment_killed")
    proc = _start(workdir)
    phase = workdir / "methods" / "dpo_beta=0.1"
    _wait_for(proc, phase / "checkpoints" / "2")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (phase / "DONE").exists() and (workdir / "reference" / "DONE").exists()
    config = sentiment.get_config("smoke")
    config.run_dir = str(workdir)
    _, returned = driver.run(config, sentiment.EXPERIMENT)
    return workdir, config, returned


def test_sigkill_in_a_training_phase_then_rerun_gives_the_same_table(smoke_run, killed_and_rerun):
    """The phases before DPO are skipped, DPO resumes from step 2, and results.csv is
    bit-identical to the uninterrupted run's."""
    run_dir = smoke_run[0]
    workdir, config, returned = killed_and_rerun
    assert "sft" not in returned and "pairs" not in returned
    steps = [r["step"] for r in returned["methods/dpo_beta=0.1"].history]
    assert steps[0] > 2 and steps[-1] == config.num_steps
    assert (workdir / "results.csv").read_bytes() == (run_dir / "results.csv").read_bytes()


def test_dry_run_compiles_the_program_the_run_executed(killed_and_rerun):
    """`--dry_run` (abstract params, nothing loaded) lowers, for a training phase, the
    very program its run executed: same text, at the same size."""
    workdir, config, returned = killed_and_rerun
    name = "methods/dpo_beta=0.1"
    result = returned[name]
    assert len(result.trainer._train_fns) == 1  # the run executed one train program
    phase = next(p for p in sentiment.build_phases(config) if p.name == name)
    ctx = phases.Context(config, epath.Path(workdir), phase)
    task = sentiment_task.load_task(ctx)
    first = next(iter(sentiment_task.method_batches(
        sentiment_task.load_pairs(ctx), sentiment_methods.method_config(ctx, sentiment_methods.parse_method("dpo:beta=0.1")),
        task.pad_id, sentiment_task.row_length(config), config.pairs.max_new_tokens,
    )))  # fmt: skip
    batch_A = train.stack_micro_batches([first])
    executed = result.trainer.lower(result.state, batch_A, train.batch_num_sequences(batch_A))
    dry_config = sentiment.get_config("smoke")
    dry_config.update(run_dir=str(workdir), dry_run_devices=1)
    lowered = driver.dry_run(dry_config, sentiment.EXPERIMENT)
    trained = {"sft", name, "methods/preferred_ft", "methods/unlikelihood_unlikelihood_alpha=1"}
    assert set(lowered) == trained
    assert lowered[name].as_text() == executed.as_text()
    assert lowered["methods/preferred_ft"].as_text() != executed.as_text()


@pytest.mark.heavy  # seven starts of the smoke experiment: minutes
def test_kills_at_random_moments_in_every_phase_then_rerun_give_the_same_table(smoke_run, tmp_path):
    """SIGKILL and SIGTERM (alternating) at a random moment after each of several phases
    began, each time rerunning the same command; the last run finishes, and results.csv
    is bit-identical to the uninterrupted run's."""
    run_dir = smoke_run[0]
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 31))
    rng = np.random.default_rng(seed)
    targets = ["tokenizer", "sft", "pairs", "evaluate_sft", "methods/dpo_beta=0.1",
               "methods/preferred_ft", "methods/unlikelihood_unlikelihood_alpha=1"]  # fmt: skip
    for i, target in enumerate(targets):
        proc = _start(tmp_path)
        _wait_for(proc, tmp_path / target)  # the phase began (or began in an earlier start)
        time.sleep(float(rng.uniform(0.0, 2.0)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if i % 2 else signal.SIGKILL)
        proc.wait()
    proc = _start(tmp_path)
    assert proc.wait() == 0, proc.stderr.read()
    same = (tmp_path / "results.csv").read_bytes() == (run_dir / "results.csv").read_bytes()
    assert same, f"results.csv differs (kill moments drawn with seed {seed})"


def test_reward_and_kl_agree_with_a_second_computation(smoke_run):
    run_dir, config, rows = smoke_run
    vader = SentimentIntensityAnalyzer()
    samples = _samples(run_dir)
    final = {r["method"]: r for r in rows if r["final"] == "1"}
    for method in ("sft", "dpo:beta=0.1", "preferred_ft"):
        mine = [s for s in samples if s["method"] == method]
        assert len(mine) == config.eval.num_prefixes
        rewards = [vader.polarity_scores(s["text"])["compound"] for s in mine]
        np.testing.assert_allclose(np.mean(rewards), float(final[method]["reward"]), atol=1e-6)
        np.testing.assert_allclose([s["reward"] for s in mine], rewards, atol=1e-6)
        kl = np.mean([s["policy_logp"] - s["ref_logp"] for s in mine])
        np.testing.assert_allclose(kl, float(final[method]["kl"]), atol=1e-6)
    # pi = pi_sft: the sampler's own log-probs (KV-cache decode) and a full forward of the
    # same params agree token for token, so the KL estimate of SFT against itself is ~0.
    sft = [s for s in samples if s["method"] == "sft"]
    np.testing.assert_allclose(
        [s["policy_logp"] for s in sft], [s["ref_logp"] for s in sft], atol=2e-3, rtol=1e-4
    )
    # The trained policies moved away from the SFT policy.
    assert float(final["preferred_ft"]["kl"]) != 0.0


def test_pairs_are_labelled_by_vader(smoke_run):
    run_dir, config, _ = smoke_run
    vader = SentimentIntensityAnalyzer()
    pairs = read_jsonl(run_dir / "pairs" / "pairs.jsonl")
    k = config.pairs.samples_per_prefix
    assert 0 < len(pairs) <= config.pairs.num_prefixes * k * (k - 1) // 2
    for p in pairs:
        assert p["chosen_reward"] > p["rejected_reward"]
        assert vader.polarity_scores(p["chosen_text"])["compound"] == pytest.approx(
            p["chosen_reward"], abs=1e-6
        )
        assert vader.polarity_scores(p["rejected_text"])["compound"] == pytest.approx(
            p["rejected_reward"], abs=1e-6
        )
        assert p["chosen_text"].startswith(p["prefix"])


def test_best_of_n_is_at_least_the_sft_mean_and_its_kl_is_analytic(smoke_run):
    _, _, rows = smoke_run
    bon = next(r for r in rows if r["method"] == "best_of_n:n=4")
    np.testing.assert_allclose(float(bon["kl"]), np.log(4) - 3 / 4, rtol=1e-9)
    # The max of 4 samples beats the mean of 1 sample on average: 64 prompts make the
    # gap far larger than the noise (rewards are in [-1, 1]).
    sft = next(r for r in rows if r["method"] == "sft")
    assert float(bon["reward"]) > float(sft["reward"])


def test_label_pairs_by_hand():
    rewards = np.array([[0.5, -0.2, 0.5, 0.9], [0.0, 0.0, 0.0, 0.0]])
    pairs = sentiment_task.label_pairs(rewards)
    # Prefix 0: 6 pairs minus the tie (0, 2); prefix 1: all ties.
    assert pairs == [(0, 0, 1), (0, 3, 0), (0, 2, 1), (0, 3, 1), (0, 3, 2)]


def test_over_training_and_convergence_by_hand(tmp_path):
    """Per-step seed means, the combined sampling stderr sqrt(sum se^2) / S, and the
    last-two-evaluations rule on hand-written rows; single-step methods are dropped."""

    def row(method, step, reward, kl, se):
        return dict(method=method, step=str(step), reward=str(reward), reward_stderr=str(se),
                    kl=str(kl), kl_stderr=str(se))  # fmt: skip

    tables = {
        0: [row("sft", 0, 0.2, 0, 0.1), row("m", 0, 0.2, 0, 0.1), row("m", 10, 0.5, 1.0, 0.03),
            row("m", 20, 0.6, 1.0, 0.04)],
        1: [row("sft", 0, 0.2, 0, 0.1), row("m", 0, 0.2, 0, 0.1), row("m", 10, 0.7, 3.0, 0.04),
            row("m", 20, 0.6, 2.0, 0.03)],
    }  # fmt: skip
    curve = sentiment.over_training(tables)
    assert [(r["method"], r["step"]) for r in curve] == [("m", 0), ("m", 10), ("m", 20)]
    assert curve[1]["reward_mean"] == pytest.approx(0.6)
    assert curve[1]["reward_stderr"] == pytest.approx(0.05 / 2)  # sqrt(.03^2 + .04^2) / 2
    assert curve[1]["kl_ci95"] == pytest.approx(12.706204736174707 * np.sqrt(2) / np.sqrt(2))
    (conv,) = sentiment.convergence(curve)
    assert (conv["prev_step"], conv["step"]) == (10, 20)
    assert conv["reward_diff"] == pytest.approx(0.0) and conv["reward_agree"] == 1
    assert conv["kl_diff"] == pytest.approx(-0.5)
    assert conv["kl_diff_se"] == pytest.approx(np.hypot(0.025, 0.025))
    assert conv["kl_agree"] == 0
    rows = sentiment.write_training_summary(
        tables, tmp_path / "t.png", tmp_path / "c.csv", "hand rows"
    )
    assert common.read_csv(tmp_path / "c.csv")[0]["kl_agree"] == str(rows[0]["kl_agree"])
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_split_by_prompt_holds_out_whole_prompts():
    prompts = [[1], [2], [1], [3], [2], [4]]
    pairs = pipeline.PairData(prompts, [[i] for i in range(6)], [[9]] * 6, np.arange(6.0),
                              -np.arange(6.0))  # fmt: skip
    train, val = pipeline.split_by_prompt(pairs, 0.5, seed=0)  # 2 of the 4 prompts
    assert len(train) + len(val) == 6
    assert {tuple(p) for p in train.prompts}.isdisjoint({tuple(p) for p in val.prompts})
    assert len({tuple(p) for p in val.prompts}) == 2
    for side in (train, val):  # rows stay aligned, in their original order
        idx = [c[0] for c in side.chosen]
        assert idx == sorted(idx) and side.prompts == [prompts[i] for i in idx]
        np.testing.assert_array_equal(side.ref_chosen, idx)
    again = pipeline.split_by_prompt(pairs, 0.5, seed=0)[1]
    assert again.chosen == val.chosen  # the split is a function of the seed
    with pytest.raises(ValueError, match="leaves a side empty"):
        pipeline.split_by_prompt(pairs, 1.0, seed=0)


def test_parse_method():
    m = sentiment_methods.parse_method("cdpo:beta=0.1:label_smoothing=0.2:seed=3")
    assert (m.kind, m.loss_name, m.loss_hyper, m.seed) == (
        "cdpo",
        "sigmoid",
        {"beta": 0.1, "label_smoothing": 0.2},
        3,
    )
    assert sentiment_methods.parse_method("preferred_ft").loss_name == "sft"
    with pytest.raises(ValueError, match="needs beta"):
        sentiment_methods.parse_method("dpo")
    with pytest.raises(ValueError, match="not a number"):
        sentiment_methods.parse_method("dpo:beta=abc")


def test_command_line_overrides_and_presets():
    args = common.parse_args(
        sentiment.get_config,
        ["--preset=frontier", "--config.num_steps=7", "--config.optim.learning_rate=1",
         "--config.methods=('dpo:beta=0.5',)", "--config.train.progress=false",
         "--config.mesh.fsdp=2"],
        sentiment.PRESETS,
    )  # fmt: skip
    c = args.config
    assert (c.preset, c.num_steps, c.optim.learning_rate, c.methods, c.train.progress) == (
        "frontier", 7, 1.0, ("dpo:beta=0.5",), False,
    )  # fmt: skip
    # The experiment's config is a `dpo-jax train` config: every key of default.py is
    # there.
    from dpo_jax.configs import default

    def keys(cfg, prefix=""):
        for k, v in cfg.items():
            if hasattr(v, "items"):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield prefix + k

    assert set(keys(default.get_config())) <= set(keys(c))
    with pytest.raises(UserError, match="'train.stepz': no such config key"):
        common.parse_args(sentiment.get_config, ["--config.train.stepz=1"], sentiment.PRESETS)
    with pytest.raises(UserError, match="'train.optimizer': no such config key"):
        common.parse_args(sentiment.get_config, ["--config.train.optimizer=sgd"], sentiment.PRESETS)
    with pytest.raises(UserError, match="unknown preset"):
        common.parse_args(sentiment.get_config, ["--preset=nope"], sentiment.PRESETS)
    # Every preset's methods parse and name registered losses.
    from dpo_jax import losses

    for preset in ("default", "frontier", "losses", "online"):
        for spec in sentiment.get_config(preset).methods:
            m = sentiment_methods.parse_method(spec)
            other = (*sentiment_methods.BEST_OF_N_KINDS, *sentiment_methods.PPO_KINDS, *sentiment_methods.ONLINE_KINDS,
                     *sentiment_methods.ITERATIVE_KINDS)  # not a loss  # fmt: skip
            assert m.kind in other or m.loss_name in losses.names(), spec


# over 120 s: the README's main job itself, end to end (~7 CPU-minutes alone, ~13 min
# beside another xdist worker); it is what the README's table claims
@pytest.mark.heavy
def test_default_main_job_dpo_beats_sft(tmp_path):
    """The README's claim, end to end (about 7 CPU-minutes): the default run's DPO policies
    reach a higher mean VADER reward than the SFT policy, beyond their standard errors,
    at finite reported KL."""
    config = sentiment.get_config("default")
    config.run_dir = str(tmp_path)
    config.train.progress = False
    run_dir, _ = driver.run(config, sentiment.EXPERIMENT)
    with open(run_dir / "results.csv") as f:
        final = {r["method"]: r for r in csv.DictReader(f) if r["final"] == "1"}
    sft = final["sft"]
    for beta in ("0.05", "0.1", "1", "5"):
        dpo = final[f"dpo:beta={beta}"]
        gap = float(dpo["reward"]) - float(sft["reward"])
        assert gap > 2 * (float(dpo["reward_stderr"]) + float(sft["reward_stderr"])), beta
        assert 0 < float(dpo["kl"]) < np.inf


def test_training_seeds_share_the_data_and_are_summarised(smoke_run, tmp_path):
    """`seeds=(0, 1)`: seed 0 is the smoke run itself (copied in: its phases are skipped,
    so the fingerprints of a seed's run ignore `seeds`), seed 1 trains from the same
    corpus and evaluation prefixes (`data_seed`) with other training randomness, and
    summary.csv is the numpy mean / std (ddof 1) / 95% t half-width of the two tables."""
    import shutil

    run_dir, config, _ = smoke_run
    shutil.copytree(run_dir, tmp_path / "seed_0")
    seeded = config.copy_and_resolve_references()
    seeded.run_dir, seeded.seeds = str(tmp_path), (0, 1)
    _, returned = driver.run(seeded, sentiment.EXPERIMENT)
    # Nothing of seed 0 reran (its report, a table assembled from outputs, runs always).
    assert [k for k in returned if k.startswith("seed_0/")] == ["seed_0/report"]
    assert "seed_1/sft" in returned
    assert (tmp_path / "seed_0/results.csv").read_bytes() == (run_dir / "results.csv").read_bytes()
    for name in ("corpus", "tokenizer"):  # the data: identical files
        for f in sorted((tmp_path / "seed_0" / name).rglob("*")):
            if f.is_file() and f.name != phases.MARKER:
                other = tmp_path / "seed_1" / f.relative_to(tmp_path / "seed_0")
                assert other.read_bytes() == f.read_bytes(), f
    sft = [checkpoint.load_params(epath.Path(tmp_path) / f"seed_{s}/sft")[2] for s in (0, 1)]
    import jax

    leaves = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]) for p in sft]
    assert leaves[0].shape == leaves[1].shape and not np.allclose(leaves[0], leaves[1])

    finals = {
        s: [r for r in common.read_csv(tmp_path / f"seed_{s}/results.csv") if r["final"] == "1"]
        for s in (0, 1)
    }
    summary = common.read_csv(tmp_path / "summary.csv")
    assert [r["method"] for r in summary] == [r["method"] for r in finals[0]]
    t_975_1dof = 12.706204736174707  # scipy.stats.t.ppf(0.975, 1)
    for row in summary:
        for v in ("reward", "kl"):
            x = np.array(
                [float(r[v]) for s in (0, 1) for r in finals[s] if r["method"] == row["method"]]
            )
            assert int(row["n_seeds"]) == 2
            np.testing.assert_allclose(float(row[f"{v}_mean"]), x.mean(), rtol=1e-12)
            np.testing.assert_allclose(
                float(row[f"{v}_std"]), x.std(ddof=1), rtol=1e-12, atol=1e-15
            )
            np.testing.assert_allclose(
                float(row[f"{v}_ci95"]),
                t_975_1dof * x.std(ddof=1) / np.sqrt(2),
                rtol=1e-9,
                atol=1e-15,
            )
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    assert (tmp_path / "training.png").stat().st_size > 1000  # reward and KL over steps
    assert {r["method"] for r in common.read_csv(tmp_path / "convergence.csv")} == {
        r["method"] for r in finals[0] if r["method"] != "sft" and "best_of_n" not in r["method"]
    }
