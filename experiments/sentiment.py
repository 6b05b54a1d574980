"""Controlled sentiment generation (DPO paper, Rafailov et al. 2023, section 6.1 / figure 2).

The paper's IMDb experiment, end to end:

1. an SFT policy learns to continue review prefixes;
2. it samples 4 completions per prefix; the 6 pairs of each 4 are labelled by a
   ground-truth sentiment reward (higher reward = chosen; ties dropped);
3. DPO (beta sweep), Preferred-FT (SFT on the chosen completions), Unlikelihood
   (Welleck et al. 2019: chosen NLL + alpha x -log(1 - p) of rejected tokens), best-of-N
   and other losses of the family (IPO, SimPO, cDPO, R-DPO) start from the SFT policy on
   those pairs; the ``frontier`` preset adds PPO and PPO-GT (RLHF on the learned and on
   the ground-truth reward) and the on-policy methods;
4. every ``train.eval_every`` steps each policy samples completions of held-out prefixes
   (temperature 1), and the run records the mean ground-truth reward and the
   sequence-level KL(pi || pi_sft) estimated from those samples (with standard errors);
5. the reward/KL frontier goes to ``frontier.png``, a table to stdout and ``results.csv``.

Presets (``--preset=NAME``):

* ``default`` - the embedded main job: a SYNTHETIC corpus from
  :mod:`experiments.synthetic_reviews` (seeded grammar, not IMDb), a byte-level BPE
  trained on it, a 0.7M-parameter GPT-2-shaped SFT model trained from scratch, VADER
  (``vaderSentiment``) as the ground-truth reward, DPO at beta in {0.05, 0.1, 1, 5} and
  Preferred-FT. No downloads; measured 5 minutes on a 2-core CPU (experiments/README.md).
* ``frontier`` - the paper's figure 2 (left) comparison set on the same miniature task,
  over 3 training seeds (``seeds``; summary.csv holds mean, std and 95% CI per method):
  DPO at five betas, Preferred-FT, Unlikelihood at the paper's four alphas, PPO with the
  reward model learned on the pairs at four target KLs, PPO-GT (the VADER reward),
  Best-of-N selected by the learned reward and, labelled oracle, by VADER; then the
  on-policy methods of the ``online`` preset.
* ``losses`` - DPO's successors on the same task over 3 seeds: IPO, SimPO, cDPO, R-DPO
  (the `rdpo` loss: length-regularised DPO, Park et al. 2024; not rDPO, which is the
  `robust` loss of Chowdhury et al. 2024).
* ``online`` - the on-policy methods (:mod:`experiments.sentiment_online`: GRPO, RLOO,
  online DPO labelled by the learned reward or by VADER, iterative DPO in rounds) beside
  DPO and PPO, one training seed; ``frontier`` lists them too.
* ``smoke`` - the same pipeline shrunk to seconds, for tests.
* ``imdb_gpt2_large`` - the paper's real setting (TFDS ``imdb_reviews``, prefixes of 2-8
  tokens, ``gpt2-large`` from a local HF directory, the siebert RoBERTa classifier as
  reward, RMSprop lr 1e-6, batch 64). Meant for a TPU slice.

This module is the task declaration (:data:`EXPERIMENT`, run by `experiments.driver`):
its config and presets, its phase graph, results.csv, the frontier figure and the seed
summary. The graph (`experiments.phases`): corpus -> tokenizer -> sft -> pairs ->
reference -> evaluate_sft (`experiments.sentiment_task`) -> methods/<label> (one
`dpo_jax.train.train` run per method, checkpointed, its evaluation the `eval_hook`;
`experiments.sentiment_methods`, the on-policy ones `experiments.sentiment_online`) ->
report. Rerunning the same
command (same ``--config.run_dir``) skips finished phases and resumes an unfinished
training phase from its last checkpoint; ``results.csv`` is assembled only from phase
outputs. The config is a `dpo-jax train` config (`dpo_jax.configs.default`: the
preference runs' ``optim.*``, ``batch_size``, ``num_steps``, ``mesh.*``,
``checkpoint.*``, ...) plus the experiment's sections (``corpus``, ``sft``, ``pairs``,
``methods``, ``eval``, ``reward``). ``--dry_run`` compiles, for each training phase, the
program its run executes (abstract params) and prints its per-device memory.

    python -m experiments.sentiment [--preset=NAME] [--config.key=value ...] [--dry_run]
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from dpo_jax import paths
from experiments import common, driver, phases, sentiment_methods, sentiment_online
from experiments import sentiment_task as task_mod
from experiments.phases import Context, Phase
from experiments.sentiment_methods import (
    BEST_OF_N_KINDS,
    ITERATIVE_KINDS,
    LEARNED_REWARD_KINDS,
    ONLINE_KINDS,
    ONLINE_METHODS,
    PPO_KINDS,
    Method,
)

PRESETS = ("default", "frontier", "losses", "online", "smoke", "imdb_gpt2_large")

# ---------------------------------------------------------------------------- config


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """The experiment's config: `dpo-jax train`'s tree (the preference runs) plus the
    experiment's sections; `preset` is one of PRESETS."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    c = common.experiment_config(
        preset, hidden_size=128, num_layers=3, num_heads=4, max_positions=64
    )
    # Data. "synthetic": the seeded grammar; "tfds:imdb_reviews": the paper's data.
    c.corpus = ml_collections.ConfigDict(
        dict(
            source="synthetic",
            num_reviews=20000,  # SFT corpus (synthetic) / max train reviews (IMDb)
            tokenizer_vocab_size=768,
            prefix_min_len=2,  # the paper: prefixes of 2-8 tokens
            prefix_max_len=8,
        )
    )
    # SFT through the Trainer (objective.name="sft"; mesh, model and checkpoint.* as the
    # preference runs). save_every: a resumed SFT redoes at most that many steps.
    c.sft = ml_collections.ConfigDict(
        dict(num_steps=600, batch_size=32, learning_rate=2e-3, warmup_steps=50, max_len=48,
             save_every=200)
    )  # fmt: skip
    # Preference pairs: K samples per prefix, all K*(K-1)/2 pairs labelled by the reward.
    c.pairs = ml_collections.ConfigDict(
        dict(
            num_prefixes=512,
            samples_per_prefix=4,
            max_new_tokens=24,
            temperature=1.0,
            batch_size=256,
        )
    )
    c.reward = "vader"  # "vader" or "hf:/local/classifier/dir" (siebert for the real config)
    # Each method fine-tunes the SFT policy on the pairs with one loss (a `dpo-jax train`
    # run with the settings below and the method's loss.name / loss.hyper).
    c.methods = (
        "dpo:beta=0.05",
        "dpo:beta=0.1",
        "dpo:beta=1.0",
        "dpo:beta=5.0",
        "preferred_ft",
    )
    c.num_steps = 150
    c.batch_size = 32  # pairs per step
    c.optim.update(
        name="adamw", learning_rate=1e-4, warmup_steps=20, schedule="constant", max_grad_norm=10.0
    )
    c.train.update(eval_every=30, log_every=30)
    # Checkpoints every evaluation: a resumed method redoes at most eval_every steps and
    # no evaluation. Saving 0.7M parameters + Adam moments synchronously takes a few
    # tens of ms, cheaper than a background thread on 2 cores; keep only the newest.
    c.checkpoint.update(enabled=True, save_every=30, keep_last=1, async_save=False)
    c.dry_run_devices = 8  # simulated CPU devices for --dry_run
    c.eval = ml_collections.ConfigDict(
        dict(num_prefixes=256, max_new_tokens=24, batch_size=256, seed=1234)
    )
    # PPO / PPO-GT methods (docs/PPO.md): rollouts of the pair prefixes, 24 new tokens
    # as the pairs and the evaluation; the KL controller's horizon shrunk with the run
    # (Ziegler et al.'s 10,000 episodes would barely move beta in 40 rollouts of 64; at
    # 256, beta can move by up to e^2 either way over the run, so the targets differ).
    c.online.update(num_rollouts=40, rollout_batch_size=64, max_new_tokens=24, kl_coef=0.1)
    c.ppo.update(num_epochs=4, kl_horizon=256.0)
    # The learned reward of PPO and Best-of-N: Bradley-Terry on the same pairs
    # (objective.name="reward_model" on the Trainer), from the SFT policy's weights.
    # val_fraction of the pairs' prefixes held out; the checkpoint (one every eval_every
    # steps) with the best accuracy on them is the reward model, as the paper did.
    c.reward_model = ml_collections.ConfigDict(
        dict(num_steps=300, batch_size=32, val_fraction=0.1, eval_every=50)
    )
    # GRPO, RLOO, online DPO and iterative DPO (experiments/sentiment_online.py): each
    # kind's overrides of the shared `online.*` keys above (PPO's, measured with one
    # sample per prompt), themselves overridden by a method spec's keys. These methods
    # compare completions of a prompt: K = 4 each, as the pairs phase samples. GRPO and
    # RLOO: 150 on-policy updates of 16 prompts x 4 (PPO makes 160 updates, DPO 150);
    # online DPO: 150 updates of 32 pairs (DPO's batch), each the best and worst of 4.
    group = dict(samples_per_prompt=4, num_rollouts=150)
    paired = dict(group, rollout_batch_size=128)
    c.method_defaults = ml_collections.ConfigDict(dict(
        grpo=group, rloo=group, online_dpo=paired, online_dpo_gt=paired,
        iterative_dpo=dict(samples_per_prompt=4),
    ))  # fmt: skip
    if preset == "frontier":
        # The paper's figure 2 (left) comparison set, each over 3 training seeds (the
        # corpus and the evaluation prefixes are the same for every seed: data_seed).
        c.seeds = (0, 1, 2)
        c.methods = (
            "dpo:beta=0.05", "dpo:beta=0.1", "dpo:beta=0.3", "dpo:beta=1.0", "dpo:beta=5.0",
            "preferred_ft",
            "unlikelihood:unlikelihood_alpha=0.05", "unlikelihood:unlikelihood_alpha=0.1",
            "unlikelihood:unlikelihood_alpha=0.5", "unlikelihood:unlikelihood_alpha=1.0",
            # The paper's PPO targets {3, 6, 9, 12} nats span its DPO frontier; the
            # miniature's DPO points span 0.2-17 nats, so the targets span that range.
            "ppo:target_kl=1.0", "ppo:target_kl=3.0", "ppo:target_kl=6.0",
            "ppo:target_kl=12.0", "ppo_gt:target_kl=6.0", "ppo_gt:target_kl=12.0",
            "best_of_n_rm:n=4", "best_of_n_rm:n=16", "best_of_n_rm:n=64",
            "best_of_n:n=4", "best_of_n:n=16", "best_of_n:n=64",
            *ONLINE_METHODS,
        )  # fmt: skip
    elif preset == "online":
        # The on-policy methods beside their offline and PPO anchors, one training seed
        # (the frontier preset has them too, over 3 seeds).
        c.methods = ("dpo:beta=0.1", "ppo:target_kl=3.0", *ONLINE_METHODS)
    elif preset == "losses":
        # DPO's successors on the same task (not in the paper's figure), 3 training seeds.
        c.seeds = (0, 1, 2)
        c.methods = (
            "dpo:beta=0.1", "ipo:beta=0.5", "simpo:beta=2.0:simpo_gamma=0.5",
            "cdpo:beta=0.1:label_smoothing=0.2", "rdpo:beta=0.1:rdpo_alpha=0.05",
        )  # fmt: skip
    elif preset == "smoke":
        # Every sampler/scorer call has 64 rows (16 prompts x 4, or 64 prompts x 1), so
        # each compiles once.
        c.corpus.update(num_reviews=400, tokenizer_vocab_size=384)
        c.model.update(hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=48)
        c.sft.update(num_steps=30, batch_size=16, max_len=40, save_every=10)
        c.pairs.update(num_prefixes=16, max_new_tokens=8, batch_size=64)
        # On-policy methods at smoke size (not in the list below, which the default test
        # tier runs several times): --config.methods="('grpo', 'iterative_dpo:beta=0.1')"
        # rolls out 16 prefixes x 4 = 64 rows twice, 8 new tokens.
        c.online.update(num_rollouts=2, rollout_batch_size=64, max_new_tokens=8)
        c.method_defaults = ml_collections.ConfigDict(
            {kind: dict(samples_per_prompt=4) for kind in (*ONLINE_KINDS, *ITERATIVE_KINDS)}
        )
        c.reward_model.update(num_steps=4, batch_size=8, eval_every=2)
        c.methods = (
            "dpo:beta=0.1", "preferred_ft", "best_of_n:n=4", "unlikelihood:unlikelihood_alpha=1.0",
        )  # fmt: skip
        c.update(num_steps=4, batch_size=8)
        c.train.update(eval_every=2, log_every=2, progress=False)
        c.checkpoint.save_every = 2
        c.eval.update(num_prefixes=64, max_new_tokens=8, batch_size=64)
    elif preset == "imdb_gpt2_large":
        c.corpus.update(source="tfds:imdb_reviews", num_reviews=25000)
        c.tokenizer = "checkpoints/gpt2-large"
        c.model.update(
            path="checkpoints/gpt2-large", dtype="bfloat16", remat="block", scan_layers=True
        )
        # One SFT epoch over the 25,000 training reviews, as in the paper.
        c.sft.update(
            num_steps=25000 // 64, batch_size=64, learning_rate=1e-5, max_len=512, save_every=100
        )
        c.pairs.update(num_prefixes=25000, max_new_tokens=64, batch_size=512)
        c.reward = "hf:checkpoints/siebert-sentiment-roberta-large-english"
        c.update(num_steps=5000, batch_size=64, grad_accum_steps=1)
        c.optim.update(name="rmsprop", learning_rate=1e-6, warmup_steps=150, max_grad_norm=10.0)
        c.train.update(eval_every=500, log_every=10)
        c.mesh.update(data=1, fsdp=-1, tensor=1)
        c.checkpoint.update(save_every=500, keep_last=2, async_save=True)
        c.eval.update(num_prefixes=1024, max_new_tokens=64, batch_size=512)
        # PPO, when listed in `methods` (the paper's figure 2 set), as the paper (appendix
        # B): 1024 episodes per PPO step, rewards normalised (whitened); updates in
        # mini-batches of 64 episodes, the preset's batch. The miniature: 40 rollouts of
        # 64 episodes, one update per epoch, no whitening.
        c.online.update(rollout_batch_size=1024, num_mini_batches=16, max_new_tokens=64)
        c.ppo.whiten_rewards = True
    return c


def build_phases(config: ml_collections.ConfigDict) -> list[Phase]:
    """The experiment's phase graph for `config`."""
    methods = [sentiment_methods.parse_method(s) for s in config.methods]
    policy = ("model", "tokenizer", "seed")
    training = sentiment_methods.TRAINING_READS
    graph = [
        Phase("corpus", task_mod.corpus_phase,
              reads=("corpus", "pairs.num_prefixes", "eval.num_prefixes", "data_seed")),
        Phase("tokenizer", task_mod.tokenizer_phase, after=("corpus",),
              reads=("tokenizer", "corpus", "data_seed")),
        Phase("sft", task_mod.sft_phase, after=("tokenizer",), reads=(*policy, "sft"), dry=task_mod.sft_dry),
        Phase("pairs", task_mod.label_phase, after=("tokenizer", "sft"), reads=("pairs", "reward", "eval.batch_size")),
        Phase("reference", task_mod.reference_phase, after=("tokenizer", "sft", "pairs"),
              reads=("eval.batch_size", "eval.max_new_tokens")),
        Phase("evaluate_sft", task_mod.evaluate_sft_phase, after=("tokenizer", "sft"),
              reads=("eval", "reward", "pairs.max_new_tokens")),
    ]  # fmt: skip
    if any(m.kind in LEARNED_REWARD_KINDS for m in methods):
        graph.append(Phase("reward_model", sentiment_methods.reward_model_phase,
                           after=("tokenizer", "sft", "pairs", "reference"),
                           reads=("reward_model", "optim", "seed", "data_seed", "pairs.max_new_tokens",
                                  "eval.max_new_tokens", "corpus.prefix_max_len")))  # fmt: skip
    for method in methods:
        name = sentiment_methods.method_phase_name(method)
        learned = ("reward_model",) if method.kind in LEARNED_REWARD_KINDS else ()
        if method.kind in BEST_OF_N_KINDS:
            graph.append(Phase(name, sentiment_methods.best_of_n_phase(method), after=("tokenizer", "sft", *learned),
                               reads=("eval", "reward")))  # fmt: skip
        elif method.kind in (*ONLINE_KINDS, *ITERATIVE_KINDS):
            graph += sentiment_online.method_phases(config, method)
        elif method.kind in PPO_KINDS:
            graph.append(Phase(name, sentiment_methods.ppo_method_phase(method),
                               after=("tokenizer", "sft", "pairs", *learned),
                               reads=("ppo", "online", "optim", "train.eval_every", "seed", "eval",
                                      "reward", "pairs.max_new_tokens",
                                      "corpus.prefix_max_len")))  # fmt: skip
        else:
            run, dry = sentiment_methods.train_method_phase(method)
            graph.append(Phase(name, run, after=("tokenizer", "sft", "pairs", "reference"),
                               reads=training, dry=dry))  # fmt: skip
    names = tuple(p.name for p in graph)

    def report(ctx: Context) -> None:
        rows = collect_rows(ctx, methods)
        run_dir = ctx.run_dir
        common.write_csv(run_dir / "results.csv", rows, RESULT_COLUMNS)
        plot_frontier(rows, run_dir / "frontier.png", f"sentiment ({config.preset}): reward vs KL")
        times = phases.timings(graph, run_dir)
        times["total_s"] = sum(times.values())
        paths.write_atomic(run_dir / "timings.json", json.dumps(times, indent=2))
        finals = [
            dict(r, name=sentiment_methods.family_name(str(r["method"])))
            for r in rows
            if r["final"]
        ]
        print(common.format_table(finals, ("name", *RESULT_COLUMNS[:-1])))
        print(headline(rows))
        if line := driver.reward_model_summary(run_dir / "reward_model"):
            print(line)
        print(f"frontier: {run_dir / 'frontier.png'}   table: {run_dir / 'results.csv'}")
        print("timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in times.items()))

    graph.append(Phase("report", report, after=names, marker=False))
    return graph


def by_family(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]], str]]:
    """(family name, its rows, a marker) per method family, families sorted by name."""
    families: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        families.setdefault(sentiment_methods.family_name(str(row["method"])), []).append(row)
    markers = itertools.cycle("os^Dvx*Ph<>pX")  # 13: the frontier preset has 12 families
    return [(name, fam, next(markers)) for name, fam in sorted(families.items())]


def plot_frontier(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> None:
    """Reward (y) against KL(pi || pi_ref) (x): one marker style per method family, every
    evaluation point drawn, as in figure 2 (left) of the DPO paper."""
    plt = common.agg_pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for family, fam_rows, marker in by_family(rows):
        kl = np.array([float(r["kl"]) for r in fam_rows])
        reward = np.array([float(r["reward"]) for r in fam_rows])
        ax.scatter(kl, reward, label=family, marker=marker, alpha=0.75, s=28)
        for r in fam_rows:  # name each method's final point (its hyper-parameters)
            if int(r["final"]) and ":" in str(r["method"]):
                tag = str(r["method"]).split(":", 1)[1]
                ax.annotate(tag, (float(r["kl"]), float(r["reward"])), fontsize=7,
                            xytext=(3, -8), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("KL(pi || pi_ref), nats per sequence")
    ax.set_ylabel("mean ground-truth reward")
    common.save_figure(fig, ax, title, path)


def plot_frontier_over_seeds(
    summary: Sequence[dict[str, Any]],
    finals: dict[int, Sequence[dict[str, Any]]],
    path: str | Path,
    title: str,
) -> None:
    """Each method's final (KL, reward), mean over training seeds with +-1 std bars on
    both axes, over every seed's final point (faint), one marker per method family."""
    plt = common.agg_pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for family, fam_rows, marker in by_family(summary):
        bars = ax.errorbar(
            [r["kl_mean"] for r in fam_rows], [r["reward_mean"] for r in fam_rows],
            xerr=np.nan_to_num([r["kl_std"] for r in fam_rows]),
            yerr=np.nan_to_num([r["reward_std"] for r in fam_rows]),
            fmt=marker, capsize=2, label=family, alpha=0.85, markersize=5,
        )  # fmt: skip
        mine = {r["method"] for r in fam_rows}
        points = [r for rows in finals.values() for r in rows if r["method"] in mine]
        ax.scatter([float(r["kl"]) for r in points], [float(r["reward"]) for r in points],
                   marker=marker, s=10, alpha=0.25, color=bars[0].get_color())  # fmt: skip
        for r in fam_rows:
            if ":" in str(r["method"]):
                ax.annotate(str(r["method"]).split(":", 1)[1], (r["kl_mean"], r["reward_mean"]),
                            fontsize=7, xytext=(3, -8), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("KL(pi || pi_ref), nats per sequence")
    ax.set_ylabel("mean ground-truth reward")
    common.save_figure(fig, ax, title, path)


RESULT_COLUMNS = (
    "method",
    "step",
    "reward",
    "reward_stderr",
    "kl",
    "kl_stderr",
    "num_samples",
    "final",
)


def collect_rows(ctx: Context, methods: Sequence[Method]) -> list[dict[str, Any]]:
    """results.csv's rows, from the phase outputs only: the SFT evaluation, each trained
    method's eval rows of its metrics.jsonl (the last row per step: a rerun of a finished
    last step repeats it with the same numbers), each best-of-N point."""
    from dpo_jax.metrics import read_jsonl

    sft = driver.read_json(ctx.input("evaluate_sft") / "metrics.json")
    rows = [task_mod.result_row("sft", 0, sft, final=True)]
    num_steps = ctx.config.num_steps
    for method in methods:
        if method.kind in (*ONLINE_KINDS, *ITERATIVE_KINDS):
            rows += sentiment_online.method_rows(ctx, method, sft)
            continue
        out = ctx.input(sentiment_methods.method_phase_name(method))
        if method.kind in BEST_OF_N_KINDS:
            rows.append(
                task_mod.result_row(method.label, 0, driver.read_json(out / "metrics.json"), True)
            )
            continue
        by_step = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if "eval/reward" in r}
        last = num_steps
        if method.kind in PPO_KINDS:  # a PPO phase's length is its rollouts' updates
            last = sentiment_methods.ppo_num_steps(ctx.config, method)
        rows.append(task_mod.result_row(method.label, 0, sft, final=False))
        rows += [
            task_mod.result_row(method.label, step, r, final=step == last)
            for step, r in sorted(by_step.items())
        ]
    return rows


def headline(rows: Sequence[dict[str, Any]]) -> str:
    """One line: the best final DPO policy against the SFT policy."""
    sft_row = next(r for r in rows if r["method"] == "sft")
    dpo = [r for r in rows if r["final"] and str(r["method"]).startswith("dpo:")]
    if not dpo:
        return ""
    best = max(dpo, key=lambda r: r["reward"])
    return (
        f"{best['method']}: mean reward {best['reward']:.3f} +- {best['reward_stderr']:.3f} "
        f"at KL {best['kl']:.2f} +- {best['kl_stderr']:.2f} nats vs SFT "
        f"{sft_row['reward']:.3f} +- {sft_row['reward_stderr']:.3f}"
    )


SUMMARY_KEYS, SUMMARY_VALUES = ("method",), ("reward", "kl")


def over_training(tables: dict[int, Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each trained method's reward and KL at each evaluation step over the training
    seeds (mean, 95% t half-width, and the seed mean's sampling standard error from each
    evaluation's own ``*_stderr``); methods evaluated at one step only (SFT, best-of-N)
    are left out. Steps are those every seed evaluated."""
    per_method: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for rows in tables.values():
        for r in rows:
            per_method.setdefault(str(r["method"]), {}).setdefault(int(r["step"]), []).append(r)
    out = []
    for method, by_step in per_method.items():
        steps = sorted(s for s, rs in by_step.items() if len(rs) == len(tables))
        if len(steps) < 2:
            continue
        for step in steps:
            row: dict[str, Any] = {"method": method, "step": step}
            for v in SUMMARY_VALUES:
                x_S = np.array([float(r[v]) for r in by_step[step]])
                se_S = np.array([float(r[f"{v}_stderr"]) for r in by_step[step]])
                row[f"{v}_mean"] = float(x_S.mean())
                row[f"{v}_ci95"] = float(common.confidence_half_width(x_S))
                row[f"{v}_stderr"] = float(np.sqrt((se_S**2).sum()) / len(se_S))
            out.append(row)
    return out


def convergence(curve: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method of :func:`over_training`'s rows: its last two evaluation steps and
    whether their seed-mean reward and KL agree within one standard error of the
    difference (the issue's stopping rule: ``|x_last - x_prev| <= sqrt(se_last^2 +
    se_prev^2)``, the standard errors from the evaluations' samples)."""
    per_method: dict[str, list[dict[str, Any]]] = {}
    for r in curve:
        per_method.setdefault(r["method"], []).append(r)
    out = []
    for method, rows in per_method.items():
        prev, last = rows[-2], rows[-1]
        row: dict[str, Any] = {"method": method, "prev_step": prev["step"], "step": last["step"]}
        for v in SUMMARY_VALUES:
            diff = last[f"{v}_mean"] - prev[f"{v}_mean"]
            se = float(np.hypot(last[f"{v}_stderr"], prev[f"{v}_stderr"]))
            row[f"{v}_diff"], row[f"{v}_diff_se"] = diff, se
            row[f"{v}_agree"] = int(abs(diff) <= se)
        out.append(row)
    return out


def plot_over_training(curve: Sequence[dict[str, Any]], path: str | Path, title: str) -> None:
    """Reward and KL(pi || pi_sft) against training step, one line per method (mean over
    seeds, shaded 95% interval): the sentiment analogue of the DPO paper's figure 3
    (right), which plots win rate against training step."""
    plt = common.agg_pyplot()
    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(15, 5))
    methods = list(dict.fromkeys(r["method"] for r in curve))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(methods), 2)))
    for method, color in zip(methods, colors, strict=False):
        rows = [r for r in curve if r["method"] == method]
        step = np.array([r["step"] for r in rows])
        for ax, v in ((ax_r, "reward"), (ax_kl, "kl")):
            mean = np.array([r[f"{v}_mean"] for r in rows])
            half = np.nan_to_num([r[f"{v}_ci95"] for r in rows])
            ax.plot(step, mean, marker=".", color=color, label=method, linewidth=1.2)
            ax.fill_between(step, mean - half, mean + half, color=color, alpha=0.12)
    for ax in (ax_r, ax_kl):
        ax.set_xlabel("training step")
    ax_r.set_ylabel("mean ground-truth reward (95% interval over seeds)")
    ax_r.set_title(title)
    ax_r.grid(alpha=0.3)
    ax_kl.set_ylabel("KL(pi || pi_sft), nats per sequence")
    common.save_figure(fig, ax_kl, "KL over training", path, legend_outside=True)


def write_training_summary(
    tables: dict[int, Sequence[dict[str, Any]]], png: Any, csv: Any, title: str
) -> list[dict[str, Any]]:
    """The figure `png` (:func:`plot_over_training`) and the table `csv`
    (:func:`convergence`) from per-seed results.csv rows; prints the table and returns
    its rows."""
    curve = over_training(tables)
    plot_over_training(curve, png, title)
    rows = convergence(curve)
    columns = ["method", "prev_step", "step"]
    columns += [f"{v}_{s}" for v in SUMMARY_VALUES for s in ("diff", "diff_se", "agree")]
    common.write_csv(csv, rows, columns)
    print(common.format_table(rows, columns))
    return rows


def training_summary_from_csvs(prefix: str) -> list[dict[str, Any]]:
    """:func:`write_training_summary` from stored per-seed CSVs
    ``<prefix>_results_seed<s>.csv`` (as in experiments/figures/), written beside them as
    ``<prefix>_training.png`` and ``<prefix>_convergence.csv``."""
    found = sorted(Path(prefix).parent.glob(f"{Path(prefix).name}_results_seed*.csv"))
    tables = {int(p.stem.rsplit("seed", 1)[1]): common.read_csv(p) for p in found}
    title = f"{Path(prefix).name}: reward and KL over training, {len(tables)} seeds"
    return write_training_summary(
        tables, f"{prefix}_training.png", f"{prefix}_convergence.csv", title
    )


def write_seed_summary(
    config: ml_collections.ConfigDict, run_dir: paths.Path, seed_dirs: dict[int, paths.Path]
) -> list[dict[str, Any]]:
    """summary.csv (each method's final reward and KL over the training seeds),
    frontier.png (means with +-1 std bars), training.png and convergence.csv (reward and
    KL over steps, :func:`write_training_summary`) from the per-seed results.csv files."""
    finals = {
        seed: [r for r in common.read_csv(d / "results.csv") if r["final"] == "1"]
        for seed, d in seed_dirs.items()
    }
    title = f"sentiment ({config.preset}): reward vs KL, {len(seed_dirs)} training seeds"

    def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
        plot_frontier_over_seeds(rows, finals, path, title)

    tables = {seed: common.read_csv(d / "results.csv") for seed, d in seed_dirs.items()}
    title_t = f"sentiment ({config.preset}): reward and KL over training"
    write_training_summary(tables, run_dir / "training.png", run_dir / "convergence.csv", title_t)
    return common.write_seed_summary(
        run_dir, finals, SUMMARY_KEYS, SUMMARY_VALUES, plot, "frontier.png"
    )


EXPERIMENT = driver.Experiment(
    name="sentiment",
    get_config=get_config,
    presets=PRESETS,
    build_phases=build_phases,
    write_seed_summary=write_seed_summary,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return driver.main(argv, EXPERIMENT)


if __name__ == "__main__":
    sys.exit(common.console(main, "sentiment"))
