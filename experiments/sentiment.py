"""Controlled sentiment generation (DPO paper, Rafailov et al. 2023, section 6.1 / figure 2).

The paper's IMDb experiment, end to end:

1. an SFT policy learns to continue review prefixes;
2. it samples 4 completions per prefix; the 6 pairs of each 4 are labelled by a
   ground-truth sentiment reward (higher reward = chosen; ties dropped);
3. DPO (beta sweep), Preferred-FT (SFT on the chosen completions), Unlikelihood
   (Welleck et al. 2019: chosen NLL + alpha x -log(1 - p) of rejected tokens), best-of-N
   and other losses of the family (IPO, SimPO, cDPO, R-DPO) start from the SFT policy on
   those pairs (no PPO);
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

The experiment is a phase graph (`experiments.phases`): corpus -> tokenizer -> sft ->
pairs -> reference -> evaluate_sft -> methods/<label> (one `dpo_jax.train.train` run per
method, checkpointed, its evaluation the `eval_hook`) -> report. Rerunning the same
command (same ``--config.workdir``) skips finished phases and resumes an unfinished
training phase from its last checkpoint; ``results.csv`` is assembled only from phase
outputs. The config is a `dpo-jax train` config (`dpo_jax.configs.default`: the
preference runs' ``optim.*``, ``batch_size``, ``num_steps``, ``mesh.*``,
``checkpoint.*``, ...) plus the experiment's sections (``corpus``, ``sft``, ``pairs``,
``methods``, ``eval``, ``reward``). ``--dry_run`` compiles, for each training phase, the
program its run executes (abstract params) and prints its per-device memory.

    python -m experiments.sentiment [--preset=NAME] [--config.key=value ...] [--dry_run]
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import serialization

from dpo_jax import configs, evaluation, models, paths, rewards, train
from dpo_jax.configs import validate
from experiments import common, phases, pipeline, synthetic_reviews
from experiments.phases import Context, Phase

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
    c.reward_model = ml_collections.ConfigDict(dict(num_steps=300, batch_size=32))
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
        c.reward_model.update(num_steps=4, batch_size=8)
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
    return c


# ---------------------------------------------------------------------------- methods


# Methods that are not a preference loss: RLHF on a reward (the learned one, or the
# ground truth for PPO-GT) and best-of-N sampling (selected by the ground truth, an
# oracle, or by the learned reward, the paper's baseline).
PPO_KINDS = ("ppo", "ppo_gt")
BEST_OF_N_KINDS = ("best_of_n", "best_of_n_rm")
# On-policy methods of `experiments.sentiment_online`: GRPO, RLOO and online DPO on the
# Trainer's one loop (online DPO-GT labelled by the ground truth, like PPO-GT), and
# iterative DPO, rounds of sample -> label -> offline DPO as phases.
ONLINE_KINDS = ("grpo", "rloo", "online_dpo", "online_dpo_gt")
ITERATIVE_KINDS = ("iterative_dpo",)
ITERATIVE_ROUNDS = 3  # iterative DPO's rounds unless its spec says `rounds=`
LEARNED_REWARD_KINDS = ("ppo", "best_of_n_rm", "grpo", "rloo", "online_dpo", "iterative_dpo")
# Kinds trained with a paired loss (`loss=` names it, sigmoid by default): they need beta.
PAIRED_ONLINE_KINDS = ("online_dpo", "online_dpo_gt", "iterative_dpo")
# Method-spec keys whose value is a word, not a number, and the kinds that take them
# (`iterative_dpo:beta=0.1:reference=reset:loss=ipo`, `grpo:loss_type=dr_grpo`).
TEXT_KEYS = {
    "grpo": ("loss_type", "scale_rewards"),
    "rloo": ("loss_type", "scale_rewards"),
    "online_dpo": ("loss", "label"),
    "online_dpo_gt": ("loss", "label"),
    "iterative_dpo": ("loss", "reference"),
}
# The comparison set of the on-policy methods (the `online` and `frontier` presets).
# Iterative DPO: 3 rounds of 50 steps, DPO's 150 steps in all.
ONLINE_METHODS = (
    "grpo", "rloo", "online_dpo:beta=0.1", "online_dpo_gt:beta=0.1",
    "iterative_dpo:beta=0.1:steps=50",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Method:
    """One point (or curve) of the frontier: a loss with hyper-parameters, or best-of-N."""

    kind: str  # "dpo", "preferred_ft", "best_of_n", or any registered loss name
    hyper: tuple[tuple[str, float | str], ...]  # a word only for TEXT_KEYS
    seed: int = 0

    @property
    def label(self) -> str:
        parts = [self.kind] + [
            f"{k}={v}" if isinstance(v, str) else f"{k}={v:g}" for k, v in self.hyper
        ]
        if self.seed:
            parts.append(f"seed={self.seed}")
        return ":".join(parts)

    @property
    def loss_name(self) -> str:
        """The `dpo_jax.losses` name this method trains with."""
        return {"dpo": "sigmoid", "cdpo": "sigmoid", "preferred_ft": "sft"}.get(
            self.kind, self.kind
        )

    @property
    def loss_hyper(self) -> dict[str, float | str]:
        return dict(self.hyper)


def parse_method(spec: str) -> Method:
    """``"dpo:beta=0.1"`` -> Method("dpo", (("beta", 0.1),)). ``seed=`` is not a loss hyper."""
    kind, *assignments = spec.split(":")
    hyper: list[tuple[str, float | str]] = []
    seed = 0
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"method {spec!r}: expected key=value after ':', got {item!r}")
        key, value = item.split("=", 1)
        if key in TEXT_KEYS.get(kind, ()):
            hyper.append((key, value))
            continue
        try:
            number = float(value)
        except ValueError as err:
            raise ValueError(f"method {spec!r}: {key}={value!r} is not a number") from err
        if key == "seed":
            seed = int(number)
        else:
            hyper.append((key, number))
    if kind in ("dpo", *PAIRED_ONLINE_KINDS) and "beta" not in dict(hyper):
        raise ValueError(f"method {spec!r}: {kind} needs beta=...")
    if kind in ITERATIVE_KINDS:
        rounds = dict(hyper).get("rounds", ITERATIVE_ROUNDS)
        if rounds != int(rounds) or rounds < 1:
            raise ValueError(f"method {spec!r}: rounds must be a whole number >= 1")
        if dict(hyper).get("reference", "fixed") not in ("fixed", "reset"):
            raise ValueError(f"method {spec!r}: reference must be 'fixed' or 'reset'")
    if kind in BEST_OF_N_KINDS and "n" not in dict(hyper):
        raise ValueError(f"method {spec!r}: {kind} needs n=...")
    return Method(kind=kind, hyper=tuple(hyper), seed=seed)


# ---------------------------------------------------------------------------- pairs


def label_pairs(rewards_PxK: np.ndarray) -> list[tuple[int, int, int]]:
    """All K*(K-1)/2 pairs per prefix as (prefix, chosen sample, rejected sample).

    The higher-reward sample is chosen; exact ties carry no preference and are dropped
    (the paper's ground-truth labels are strict).
    """
    rewards_PxK = np.asarray(rewards_PxK)
    if rewards_PxK.ndim != 2:
        raise ValueError(f"rewards must be [prefixes, samples], got shape {rewards_PxK.shape}")
    out = []
    for p in range(rewards_PxK.shape[0]):
        for i, j in itertools.combinations(range(rewards_PxK.shape[1]), 2):
            ri, rj = rewards_PxK[p, i], rewards_PxK[p, j]
            if ri > rj:
                out.append((p, i, j))
            elif rj > ri:
                out.append((p, j, i))
    return out


# ---------------------------------------------------------------------------- figure

# Method kind -> the name the literature uses, for figure legends. `rdpo` is R-DPO
# (length-regularised, Park et al. 2024); rDPO (Chowdhury et al. 2024) is the `robust` loss.
FAMILY_NAMES = {
    "dpo": "DPO",
    "cdpo": "cDPO",
    "rdpo": "R-DPO",
    "robust": "rDPO",
    "ipo": "IPO",
    "simpo": "SimPO",
    "preferred_ft": "Preferred-FT",
    "best_of_n": "Best-of-N (oracle)",
    "best_of_n_rm": "Best-of-N",
    "ppo": "PPO",
    "ppo_gt": "PPO-GT",
    "unlikelihood": "Unlikelihood",
    "grpo": "GRPO",
    "rloo": "RLOO",
    "online_dpo": "Online DPO",
    "online_dpo_gt": "Online DPO-GT",
    "iterative_dpo": "Iterative DPO",
}


def family_name(method: str) -> str:
    """The display name of a results row's method (its kind's; iterative DPO's says how
    many rounds it ran, from its spec)."""
    kind = method.split(":")[0]
    name = FAMILY_NAMES.get(kind, kind)
    if kind in ITERATIVE_KINDS:
        rounds = int(dict(parse_method(method).hyper).get("rounds", ITERATIVE_ROUNDS))
        name += f" ({rounds} round{'s' if rounds > 1 else ''})"
    return name


def by_family(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]], str]]:
    """(family name, its rows, a marker) per method family, families sorted by name."""
    families: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        families.setdefault(family_name(str(row["method"])), []).append(row)
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


# ---------------------------------------------------------------------------- phases
# Each phase reads the outputs of the phases it comes after (files under the run
# directory), never another phase's memory, so a rerun after a kill computes what an
# uninterrupted run computes.


def load_corpus(config: ml_collections.ConfigDict) -> tuple[list[str], list[str], list[str]]:
    """(SFT texts, texts whose prefixes make the pairs, texts whose prefixes are evaluated)."""
    d = config.corpus
    n_pairs, n_eval = config.pairs.num_prefixes, config.eval.num_prefixes
    if d.source == "synthetic":
        texts = synthetic_reviews.generate_corpus(
            d.num_reviews + n_pairs + n_eval, config.data_seed
        )
        return texts[: d.num_reviews], texts[d.num_reviews : -n_eval], texts[-n_eval:]
    if d.source == "tfds:imdb_reviews":
        import tensorflow_datasets as tfds

        # The paper: SFT and pair prefixes from the train split, evaluation on test prefixes.
        train_split = [r["text"].decode() for r in tfds.data_source("imdb_reviews", split="train")]
        test = [r["text"].decode() for r in tfds.data_source("imdb_reviews", split="test")]
        return train_split[: d.num_reviews], train_split[:n_pairs], test[:n_eval]
    raise ValueError(
        f"config.corpus.source={d.source!r}: expected 'synthetic' or 'tfds:imdb_reviews'"
    )


def make_reward_fn(spec: str):
    """The ground-truth reward: ``vader`` or ``hf:DIR`` (a local sequence classifier)."""
    if spec == "vader":
        return rewards.VaderReward()
    if spec.startswith("hf:"):
        return rewards.HFClassifierReward(spec[3:], label="POSITIVE", score="prob")
    raise ValueError(f"config.reward={spec!r}: expected 'vader' or 'hf:/local/dir'")


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> models.ModelConfig:
    """The policy's ModelConfig (`common.policy_model_config`). The trained BPE's one
    special token (id 0) is BOS, EOS and padding (GPT-2's convention,
    common.train_bpe_tokenizer); the sampler takes them from the tokenizer."""
    return common.policy_model_config(
        config, vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )


def row_length(config: ml_collections.ConfigDict) -> int:
    """Length of a prompt + completion row (prompts are <= prefix_max_len + BOS)."""
    longest = max(config.pairs.max_new_tokens, config.eval.max_new_tokens)
    return config.corpus.prefix_max_len + 1 + longest


def _write_json(path: paths.Path, value: Any) -> None:
    paths.write_atomic(path, json.dumps(value))


def _read_json(path: paths.Path) -> Any:
    return json.loads(path.read_text())


def save_params(path: paths.Path, params: Any) -> None:
    """Params as msgpack (process 0 writes; every process's arrays are gathered)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        paths.write_atomic(path, serialization.to_bytes(jax.device_get(params)))


def load_params(path: paths.Path) -> Any:
    """Params written by `save_params` (a plain nested dict of numpy arrays)."""
    return serialization.msgpack_restore(path.read_bytes())


def load_tokenizer(directory: paths.Path) -> Any:
    """The tokenizer a `tokenizer` phase saved (local or in a bucket)."""
    from transformers import AutoTokenizer

    with paths.local_copy(directory) as local:
        return AutoTokenizer.from_pretrained(local, local_files_only=True)


def corpus_phase(ctx: Context) -> None:
    """The texts of the three splits."""
    sft, pairs, evals = load_corpus(ctx.config)
    if ctx.is_main:
        _write_json(ctx.dir / "texts.json", dict(sft=sft, pairs=pairs, eval=evals))


def tokenizer_phase(ctx: Context) -> None:
    """A BPE trained on the SFT texts (or the configured one), and every split tokenized:
    SFT sequences, BOS + a 2-8 token prefix of each pair / evaluation text."""
    config = ctx.config
    texts = _read_json(ctx.input("corpus") / "texts.json")
    if config.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer, local_files_only=True)
    else:
        tokenizer = common.train_bpe_tokenizer(texts["sft"], config.corpus.tokenizer_vocab_size)
    eos_id = tokenizer.eos_token_id
    encode = lambda xs: [[eos_id] + ids for ids in tokenizer(xs)["input_ids"]]
    d = config.corpus
    cut = lambda xs, seed: [
        [eos_id] + p
        for p in synthetic_reviews.extract_prefixes(
            [ids[1:] for ids in encode(xs)], d.prefix_min_len, d.prefix_max_len, seed
        )
    ]
    tokens = dict(
        sft=[ids + [eos_id] for ids in encode(texts["sft"])],
        pairs=cut(texts["pairs"], config.data_seed + 1),
        eval=cut(texts["eval"], config.data_seed + 2),
    )
    if ctx.is_main:
        with paths.staged_dir(ctx.dir) as local:
            tokenizer.save_pretrained(local)
        _write_json(ctx.dir / "tokens.json", tokens)


@dataclasses.dataclass
class Task:
    """What the phases after SFT share, loaded from the phase outputs."""

    config: ml_collections.ConfigDict
    tokenizer: Any
    model_config: models.ModelConfig
    sft_params: Any
    tokens: dict[str, list[list[int]]]
    reward_fn: Any
    scorer: pipeline.Scorer  # one compiled shape for the pairs' reference and every eval

    @property
    def model(self) -> models.Transformer:
        return models.Transformer(self.model_config)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos_id if pad is None else pad

    @property
    def eval_prefixes(self) -> list[list[int]]:
        return self.tokens["eval"]


def load_task(ctx: Context) -> Task:
    """Tokenizer, tokens, SFT policy, reward and scorer from the finished phases."""

    config = ctx.config
    tokenizer = load_tokenizer(ctx.input("tokenizer"))
    cfg = model_config(config, len(tokenizer))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    return Task(
        config=config, tokenizer=tokenizer, model_config=cfg,
        sft_params=load_params(ctx.input("sft") / "params.msgpack"),
        tokens=_read_json(ctx.input("tokenizer") / "tokens.json"),
        reward_fn=make_reward_fn(config.reward),
        scorer=pipeline.Scorer(
            models.Transformer(cfg), rows=config.eval.batch_size, length=row_length(config),
            pad_id=pad_id,
        ),
    )  # fmt: skip


def sft_config(ctx: Context) -> ml_collections.ConfigDict:
    """The `dpo-jax train` config of the SFT run (`objective.name="sft"`)."""
    c = ctx.config
    return phases.train_config(
        c, ctx, **pipeline.sft_overrides(c.sft), **{"checkpoint.save_every": c.sft.save_every}
    )


def sft_batches(ctx: Context, config: ml_collections.ConfigDict, pad_id: int, seqs: Any):
    """The SFT run's micro-batches (every token after BOS is a target)."""
    return pipeline.SFTBatches(
        seqs, [1] * len(seqs), config.batch_size, ctx.config.sft.max_len, pad_id, config.seed
    )


def sft_phase(ctx: Context) -> train.TrainResult | None:
    """The SFT policy: the configured checkpoint or a fresh GPT-2 shape, fine-tuned on the
    SFT sequences through the Trainer (checkpointed here; skipped with sft.num_steps=0)."""

    config = ctx.config
    tokenizer = load_tokenizer(ctx.input("tokenizer"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    m = config.model
    if m.path:
        cfg, params = models.load_hf(
            m.path, m.dtype, m.param_dtype, remat=m.remat, scan_layers=m.scan_layers
        )
    else:
        cfg = model_config(config, len(tokenizer))
        params = models.init_params(cfg, jax.random.key(config.seed))
    print(f"SFT model: {models.param_count(cfg) / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    result = None
    if config.sft.num_steps > 0:
        run_config = sft_config(ctx)
        seqs = _read_json(ctx.input("tokenizer") / "tokens.json")["sft"]
        result = phases.train_phase(
            run_config,
            train_data=sft_batches(ctx, run_config, pad_id, seqs),
            model_config=cfg,
            params=params,
        )
        params = result.state.params
    save_params(ctx.dir / "params.msgpack", params)
    return result


def sft_dry(ctx: Context) -> Any:
    """The SFT run's program, with abstract params and batches of the run's shapes."""
    if ctx.config.sft.num_steps <= 0:
        return None
    config = sft_config(ctx)
    data = sft_batches(ctx, config, 0, [[0, 0]] * config.batch_size)
    model_config, params = abstract_policy(ctx)
    return phases.train_phase(
        config, train_data=data, model_config=model_config, params=params, dry_run=True
    ).lowered


def label_phase(ctx: Context) -> None:
    """K samples per pair prefix from the SFT policy, labelled by the reward."""
    config = ctx.config
    task = load_task(ctx)
    prefixes = task.tokens["pairs"]
    pr, k = config.pairs, config.pairs.samples_per_prefix
    comps, _ = pipeline.sample(
        task.model, task.sft_params, prefixes, jax.random.key(config.seed + 7), n=k,
        max_new_tokens=pr.max_new_tokens, temperature=pr.temperature, rows=pr.batch_size,
        eos_id=task.eos_id, pad_id=task.pad_id, desc="sample pairs",
        progress=config.train.progress,
    )  # fmt: skip
    texts = pipeline.decode_texts(task.tokenizer, [p for p in prefixes for _ in range(k)], comps)
    rewards_PxK = np.asarray(task.reward_fn(texts)).reshape(-1, k)
    triples = label_pairs(rewards_PxK)
    if not triples:
        raise RuntimeError("every sampled completion got the same reward: no preference pairs")
    ties = len(prefixes) * k * (k - 1) // 2 - len(triples)
    print(
        f"pairs: {len(triples)} from {len(prefixes)} prefixes x {k} samples "
        f"(mean sample reward {rewards_PxK.mean():.3f}; {ties} tied pairs dropped)"
    )
    if not ctx.is_main:
        return
    _write_json(ctx.dir / "tokens.json", dict(
        prompts=[prefixes[p] for p, _, _ in triples],
        chosen=[comps[p * k + i] for p, i, _ in triples],
        rejected=[comps[p * k + j] for p, _, j in triples],
    ))  # fmt: skip
    lines = [
        json.dumps(dict(
            prefix=task.tokenizer.decode(prefixes[p], skip_special_tokens=True),
            chosen_text=texts[p * k + i], rejected_text=texts[p * k + j],
            chosen_reward=float(rewards_PxK[p, i]), rejected_reward=float(rewards_PxK[p, j]),
        )) + "\n"
        for p, i, j in triples
    ]  # fmt: skip
    paths.write_atomic(ctx.dir / "pairs.jsonl", "".join(lines))


def reference_phase(ctx: Context) -> None:
    """The pairs' log-probs under the SFT policy (the DPO paper's reference), once."""
    task = load_task(ctx)
    t = _read_json(ctx.input("pairs") / "tokens.json")
    ref = dict(
        chosen=task.scorer(task.sft_params, t["prompts"], t["chosen"]),
        rejected=task.scorer(task.sft_params, t["prompts"], t["rejected"]),
    )
    if ctx.is_main:
        paths.write_npz(ctx.dir / "ref_logps.npz", ref)


def load_pairs(ctx: Context) -> pipeline.PairData:
    """The labelled pairs with their reference log-probs."""
    t = _read_json(ctx.input("pairs") / "tokens.json")
    ref = paths.read_npz(ctx.input("reference") / "ref_logps.npz")
    return pipeline.PairData(
        t["prompts"], t["chosen"], t["rejected"], ref["chosen"], ref["rejected"]
    )


@dataclasses.dataclass
class Evaluation:
    """One evaluation of a policy on the held-out prefixes."""

    reward: evaluation.Estimate
    kl: evaluation.Estimate
    texts: list[str]
    rewards: np.ndarray
    policy_logps: np.ndarray
    ref_logps: np.ndarray

    def metrics(self) -> dict[str, float]:
        """The numbers of a results.csv row, as `eval/` metrics."""
        return {
            **self.reward.as_metrics("eval/reward"), **self.kl.as_metrics("eval/kl"),
            "eval/num_samples": self.reward.n,
        }  # fmt: skip


def evaluate(task: Task, params: Any) -> Evaluation:
    """Sample the policy once per held-out prefix (temperature 1, the same key for every
    policy: common random numbers make methods comparable), then mean reward and
    KL(pi || pi_sft) = E_pi[log pi(y|x) - log pi_sft(y|x)] from those samples."""
    t, e = task, task.config.eval
    comps, policy_logps = pipeline.sample(
        t.model, params, t.eval_prefixes, jax.random.key(e.seed), n=1,
        max_new_tokens=e.max_new_tokens, temperature=1.0, rows=t.scorer.rows,
        eos_id=t.eos_id, pad_id=t.pad_id,
    )  # fmt: skip
    ref_logps = t.scorer(t.sft_params, t.eval_prefixes, comps)
    texts = pipeline.decode_texts(t.tokenizer, t.eval_prefixes, comps)
    rewards_N = np.asarray(t.reward_fn(texts), np.float64)
    return Evaluation(
        reward=evaluation.mean_and_stderr(rewards_N),
        kl=evaluation.sequence_kl(policy_logps[:, None], ref_logps[:, None]),
        texts=texts, rewards=rewards_N, policy_logps=policy_logps, ref_logps=ref_logps,
    )  # fmt: skip


def write_samples(path: paths.Path, method: str, ev: Evaluation) -> None:
    """The evaluation samples (text, reward, log-probs) of one policy as JSONL."""
    lines = [
        json.dumps(dict(method=method, text=text, reward=float(r), policy_logp=float(lp),
                        ref_logp=float(lr))) + "\n"
        for text, r, lp, lr in zip(ev.texts, ev.rewards, ev.policy_logps, ev.ref_logps, strict=True)
    ]  # fmt: skip
    paths.write_atomic(path, "".join(lines))


def evaluate_sft_phase(ctx: Context) -> None:
    """The SFT policy's evaluation (every method's step 0)."""
    task = load_task(ctx)
    ev = evaluate(task, task.sft_params)
    if ctx.is_main:
        write_samples(ctx.dir / "samples.jsonl", "sft", ev)
        _write_json(ctx.dir / "metrics.json", ev.metrics())


def method_config(ctx: Context, method: Method) -> ml_collections.ConfigDict:
    """The `dpo-jax train` config of one method's run."""
    return phases.train_config(
        ctx.config, ctx, **{"loss.name": method.loss_name, "loss.hyper": method.loss_hyper,
                            "seed": ctx.config.seed + 1000 * method.seed},
    )  # fmt: skip


def method_batches(
    pairs: pipeline.PairData,
    config: ml_collections.ConfigDict,
    pad_id: int,
    length: int,
    num_positions: int,
):
    """This process's host micro-batches of a method's run (its `seed`'s pair order)."""
    return pipeline.pair_batches(
        pairs, config.batch_size // config.grad_accum_steps, length, pad_id, config.seed,
        num_positions=num_positions, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )  # fmt: skip


def train_method_phase(method: Method):
    """The phase that fine-tunes the SFT policy with one loss on the pairs; its
    evaluation (sample, reward, KL) is the Trainer's eval_hook."""

    def run(ctx: Context) -> train.TrainResult:
        task = load_task(ctx)
        config = method_config(ctx, method)

        def eval_hook(step: int, params: Any) -> dict[str, float]:
            ev = evaluate(task, params)
            if step == config.num_steps and ctx.is_main:
                write_samples(ctx.dir / "samples.jsonl", method.label, ev)
            return ev.metrics()

        data = method_batches(
            load_pairs(ctx), config, task.pad_id, row_length(ctx.config),
            ctx.config.pairs.max_new_tokens,
        )  # fmt: skip
        return phases.train_phase(
            config, train_data=data, model_config=task.model_config, params=task.sft_params,
            eval_hook=eval_hook,
        )  # fmt: skip

    def dry(ctx: Context) -> Any:
        config = method_config(ctx, method)
        model_config, params = abstract_policy(ctx)
        b = config.batch_size // config.grad_accum_steps
        dummy = pipeline.PairData([[0]] * b, [[0]] * b, [[0]] * b, np.zeros(b), np.zeros(b))
        data = method_batches(
            dummy, config, 0, row_length(ctx.config), ctx.config.pairs.max_new_tokens
        )
        return phases.train_phase(
            config, train_data=data, model_config=model_config, params=params, dry_run=True
        ).lowered

    return run, dry


def abstract_policy(ctx: Context) -> tuple[models.ModelConfig, Any]:
    """The policy's config and abstract params (ShapeDtypeStructs), for dry runs. A
    from-scratch policy's vocabulary is the tokenizer's of an existing run directory,
    else `corpus.tokenizer_vocab_size` (the most a BPE trained on the corpus has: the
    default corpus gives 697 of 768, so dry-run `--config.workdir` of a run to compile
    its exact program)."""
    import flax.linen as nn

    tok = ctx.run_dir / "tokenizer" / "tokenizer.json"
    vocab = (
        len(load_tokenizer(tok.parent)) if tok.exists() else ctx.config.corpus.tokenizer_vocab_size
    )
    cfg = model_config(ctx.config, int(vocab))
    return cfg, nn.meta.unbox(models.abstract_params(cfg))


def reward_model_phase(ctx: Context) -> train.TrainResult:
    """The learned reward: Bradley-Terry (`objective.name="reward_model"`, a scalar head
    on the SFT policy's weights) on the same labelled pairs as the preference methods;
    its accuracy on those pairs goes to metrics.json."""
    from dpo_jax import reward_model

    task = load_task(ctx)
    r = ctx.config.reward_model
    config = phases.train_config(
        ctx.config, ctx, **{"objective.name": "reward_model", "num_steps": r.num_steps,
                            "batch_size": r.batch_size, "grad_accum_steps": 1},
    )  # fmt: skip
    pairs = load_pairs(ctx)
    data = method_batches(
        pairs, config, task.pad_id, row_length(ctx.config), ctx.config.pairs.max_new_tokens
    )
    result = phases.train_phase(
        config, train_data=data, model_config=task.model_config, params=task.sft_params
    )
    params = jax.device_get(result.state.params)
    batches = itertools.islice(
        method_batches(pairs, config, task.pad_id, row_length(ctx.config), None),
        max(1, len(pairs) // r.batch_size),
    )
    metrics = reward_model.evaluate_reward_model(task.model_config, params, batches)
    print(f"reward model: accuracy {metrics['accuracy']:.3f} on {metrics['num_pairs']:.0f} pairs")
    if ctx.is_main:
        save_params(ctx.dir / "params.msgpack", params)
        _write_json(ctx.dir / "metrics.json", metrics)
    return result


def learned_reward(ctx: Context, task: Task) -> Any:
    """The reward model of the `reward_model` phase as a `reward_model.LearnedReward`."""
    from dpo_jax import reward_model

    params = load_params(ctx.input("reward_model") / "params.msgpack")
    return reward_model.LearnedReward(
        task.model_config, params, task.tokenizer, batch_size=task.scorer.rows
    )


def ppo_method_config(ctx: Context, method: Method) -> ml_collections.ConfigDict:
    """The `dpo-jax train` config of a PPO run: objective "ppo", the method's `ppo.*`
    hyper-parameters (e.g. target_kl), the phase's length as num_steps."""
    from dpo_jax import ppo_loop

    config = phases.train_config(
        ctx.config, ctx, **{"objective.name": "ppo", "seed": ctx.config.seed + 1000 * method.seed}
    )
    for key, value in ppo_hyper(config, method).items():
        section = config.ppo if key in config.ppo else config.online
        section[key] = value
    config.num_steps = ppo_loop.PPOConfig.from_config(config).num_steps
    return config


def ppo_hyper(config: ml_collections.ConfigDict, method: Method) -> dict[str, Any]:
    """A PPO method's `ppo.*` / `online.*` overrides, typed as the config's
    (`ppo:num_rollouts=10`, `ppo:target_kl=6.0`)."""
    out = {}
    for key, value in method.hyper:
        section = config.ppo if key in config.ppo else config.online
        if key not in section:
            raise ValueError(f"method {method.label!r}: ppo has no setting {key!r}")
        out[key] = int(value) if isinstance(section[key], int) else value
    return out


def ppo_num_steps(config: ml_collections.ConfigDict, method: Method) -> int:
    """Optimizer steps of a PPO method's phase (its last evaluation's step)."""
    from dpo_jax import ppo_loop

    cfg = ppo_loop.PPOConfig.from_config(config)
    return dataclasses.replace(cfg, **ppo_hyper(config, method)).num_steps


def ppo_method_phase(method: Method):
    """PPO from the SFT policy on the pair prefixes: rewards from the learned reward
    model (`ppo`) or the ground truth (`ppo_gt`), evaluated as every method is."""
    from dpo_jax import reward_sources

    def run(ctx: Context) -> train.TrainResult:
        task = load_task(ctx)
        config = ppo_method_config(ctx, method)
        if method.kind == "ppo":
            reward = reward_sources.reward_from_ids(learned_reward(ctx, task))
        else:  # the reward the pairs were labelled with (prefix + completion)
            reward = reward_sources.reward_from_texts(
                task.reward_fn, task.tokenizer, with_prompt=True
            )

        def eval_hook(step: int, params: Any) -> dict[str, float]:
            ev = evaluate(task, params["model"])
            if step == config.num_steps and ctx.is_main:
                write_samples(ctx.dir / "samples.jsonl", method.label, ev)
            return ev.metrics()

        return phases.train_phase(
            config, train_data=task.tokens["pairs"], reward=reward,
            model_config=task.model_config, params=task.sft_params, eval_hook=eval_hook,
        )  # fmt: skip

    return run


def best_of_n_phase(method: Method):
    """Best-of-N from the SFT policy (no training), scored by the ground-truth reward.

    `best_of_n` selects with the ground truth: an ORACLE, an upper bound for best-of-N
    at this N. `best_of_n_rm` selects with the reward model learnt from the pairs (the
    paper's baseline). Its KL is the analytic bound log N - (N - 1) / N (Stiennon et al.
    2020; Beirami et al. 2024).
    """

    def run(ctx: Context) -> None:
        task = load_task(ctx)
        n, e = int(method.loss_hyper["n"]), ctx.config.eval
        comps, _ = pipeline.sample(
            task.model, task.sft_params, task.eval_prefixes, jax.random.key(e.seed + n), n=n,
            max_new_tokens=e.max_new_tokens, temperature=1.0, rows=task.scorer.rows,
            eos_id=task.eos_id, pad_id=task.pad_id,
        )  # fmt: skip
        texts = pipeline.decode_texts(
            task.tokenizer, [p for p in task.eval_prefixes for _ in range(n)], comps
        )
        truth = np.asarray(task.reward_fn(texts), np.float64).reshape(-1, n)
        select = truth
        if method.kind == "best_of_n_rm":
            prompts = [p for p in task.eval_prefixes for _ in range(n)]
            ids = [list(p) + list(c) for p, c in zip(prompts, comps, strict=True)]
            select = learned_reward(ctx, task).score_ids(ids).reshape(-1, n)
        best = np.take_along_axis(truth, np.argmax(select, axis=1)[:, None], axis=1)[:, 0]
        reward = evaluation.mean_and_stderr(best)
        if ctx.is_main:
            _write_json(ctx.dir / "metrics.json", {
                **reward.as_metrics("eval/reward"), "eval/kl": float(np.log(n) - (n - 1) / n),
                "eval/kl_stderr": float("nan"), "eval/num_samples": reward.n,
            })  # fmt: skip

    return run


def method_phase_name(method: Method) -> str:
    return "methods/" + method.label.replace(":", "_")


def result_row(method: str, step: int, m: dict[str, Any], final: bool) -> dict[str, Any]:
    """A row of results.csv from an evaluation's `eval/` metrics."""
    return dict(
        method=method, step=step, reward=m["eval/reward"], reward_stderr=m["eval/reward_stderr"],
        kl=m["eval/kl"], kl_stderr=m["eval/kl_stderr"], num_samples=m["eval/num_samples"],
        final=int(final),
    )  # fmt: skip


def collect_rows(ctx: Context, methods: Sequence[Method]) -> list[dict[str, Any]]:
    """results.csv's rows, from the phase outputs only: the SFT evaluation, each trained
    method's eval rows of its metrics.jsonl (the last row per step: a rerun of a finished
    last step repeats it with the same numbers), each best-of-N point."""
    from dpo_jax.metrics import read_jsonl
    from experiments import sentiment_online  # it imports this module

    sft = _read_json(ctx.input("evaluate_sft") / "metrics.json")
    rows = [result_row("sft", 0, sft, final=True)]
    num_steps = ctx.config.num_steps
    for method in methods:
        if method.kind in (*ONLINE_KINDS, *ITERATIVE_KINDS):
            rows += sentiment_online.method_rows(ctx, method, sft)
            continue
        out = ctx.input(method_phase_name(method))
        if method.kind in BEST_OF_N_KINDS:
            rows.append(result_row(method.label, 0, _read_json(out / "metrics.json"), True))
            continue
        by_step = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if "eval/reward" in r}
        last = num_steps
        if method.kind in PPO_KINDS:  # a PPO phase's length is its rollouts' updates
            last = ppo_num_steps(ctx.config, method)
        rows.append(result_row(method.label, 0, sft, final=False))
        rows += [
            result_row(method.label, step, r, final=step == last)
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


# What a preference run's numbers depend on (not where or how often it logs/saves).
TRAINING_READS = ("num_steps", "batch_size", "grad_accum_steps", "optim", "train.eval_every",
                  "seed", "eval", "reward", "pairs.max_new_tokens", "corpus.prefix_max_len")  # fmt: skip


def build_phases(config: ml_collections.ConfigDict) -> list[Phase]:
    """The experiment's phase graph for `config`."""
    from experiments import sentiment_online  # it imports this module

    methods = [parse_method(s) for s in config.methods]
    policy = ("model", "tokenizer", "seed")
    training = TRAINING_READS
    graph = [
        Phase("corpus", corpus_phase,
              reads=("corpus", "pairs.num_prefixes", "eval.num_prefixes", "data_seed")),
        Phase("tokenizer", tokenizer_phase, after=("corpus",),
              reads=("tokenizer", "corpus", "data_seed")),
        Phase("sft", sft_phase, after=("tokenizer",), reads=(*policy, "sft"), dry=sft_dry),
        Phase("pairs", label_phase, after=("tokenizer", "sft"), reads=("pairs", "reward", "eval.batch_size")),
        Phase("reference", reference_phase, after=("tokenizer", "sft", "pairs"),
              reads=("eval.batch_size", "eval.max_new_tokens")),
        Phase("evaluate_sft", evaluate_sft_phase, after=("tokenizer", "sft"),
              reads=("eval", "reward", "pairs.max_new_tokens")),
    ]  # fmt: skip
    if any(m.kind in LEARNED_REWARD_KINDS for m in methods):
        graph.append(Phase("reward_model", reward_model_phase,
                           after=("tokenizer", "sft", "pairs", "reference"),
                           reads=("reward_model", "optim", "seed", "pairs.max_new_tokens",
                                  "eval.max_new_tokens", "corpus.prefix_max_len")))  # fmt: skip
    for method in methods:
        name = method_phase_name(method)
        learned = ("reward_model",) if method.kind in LEARNED_REWARD_KINDS else ()
        if method.kind in BEST_OF_N_KINDS:
            graph.append(Phase(name, best_of_n_phase(method), after=("tokenizer", "sft", *learned),
                               reads=("eval", "reward")))  # fmt: skip
        elif method.kind in (*ONLINE_KINDS, *ITERATIVE_KINDS):
            graph += sentiment_online.method_phases(config, method)
        elif method.kind in PPO_KINDS:
            graph.append(Phase(name, ppo_method_phase(method),
                               after=("tokenizer", "sft", "pairs", *learned),
                               reads=("ppo", "online", "optim", "train.eval_every", "seed", "eval",
                                      "reward", "pairs.max_new_tokens",
                                      "corpus.prefix_max_len")))  # fmt: skip
        else:
            run, dry = train_method_phase(method)
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
        finals = [dict(r, name=family_name(str(r["method"]))) for r in rows if r["final"]]
        print(common.format_table(finals, ("name", *RESULT_COLUMNS[:-1])))
        print(headline(rows))
        print(f"frontier: {run_dir / 'frontier.png'}   table: {run_dir / 'results.csv'}")
        print("timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in times.items()))

    graph.append(Phase("report", report, after=names, marker=False))
    return graph


def execute(config: ml_collections.ConfigDict) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) the experiment, once per training seed of `config.seeds` (each in
    run_dir/seed_<s>, then summary.csv and frontier.png over seeds in run_dir); returns
    the run directory and what the phases that ran in this process returned (TrainResults
    of the methods; with seeds, keyed ``seed_<s>/<phase>``)."""
    configs.migrate_deprecated(config)  # keys set under an old name (ppo.reward, ...)
    validate.validate(config)  # a bad key fails before any phase starts
    run_dir = common.make_run_dir(config, "sentiment")
    print(f"run directory: {run_dir}")
    returned = common.run_seeds(
        config,
        run_dir,
        lambda one, seed_dir: phases.run_phases(build_phases(one), one, seed_dir),
        lambda seed_dirs: write_seed_summary(config, run_dir, seed_dirs),
    )
    return run_dir, returned


SUMMARY_KEYS, SUMMARY_VALUES = ("method",), ("reward", "kl")


def write_seed_summary(
    config: ml_collections.ConfigDict, run_dir: paths.Path, seed_dirs: dict[int, paths.Path]
) -> list[dict[str, Any]]:
    """summary.csv (each method's final reward and KL over the training seeds) and
    frontier.png (means with +-1 std bars) from the per-seed results.csv files."""
    finals = {
        seed: [r for r in common.read_csv(d / "results.csv") if r["final"] == "1"]
        for seed, d in seed_dirs.items()
    }
    title = f"sentiment ({config.preset}): reward vs KL, {len(seed_dirs)} training seeds"

    def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
        plot_frontier_over_seeds(rows, finals, path, title)

    return common.write_seed_summary(
        run_dir, finals, SUMMARY_KEYS, SUMMARY_VALUES, plot, "frontier.png"
    )


def run(config: ml_collections.ConfigDict) -> Path:
    """The whole experiment (resuming what a previous run of it left); returns the run
    directory."""
    return execute(config)[0]


def dry_run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`--dry_run`: each training phase's program, compiled with abstract params on
    `dry_run_devices` simulated devices; prints its per-device memory."""
    from experiments import dry_run as dry

    dry.ensure_cpu_devices(int(config.dry_run_devices))
    configs.migrate_deprecated(config)
    validate.validate(config)
    print(f"dry run: {config.model.path or 'from scratch'}, {len(jax.devices())} "
          f"{jax.devices()[0].platform} devices")  # fmt: skip
    return phases.dry_run_phases(build_phases(config), config, config.workdir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    argv = sys.argv[1:] if argv is None else argv
    args = common.parse_args(get_config, argv, PRESETS, "sentiment")
    if args.dry_run:
        dry_run(args.config)
        return 0
    try:
        run(args.config)
    except phases.Preempted as stop:
        print(stop, file=sys.stderr)
        return 143  # 128 + SIGTERM, as if the signal had ended the process
    return 0


if __name__ == "__main__":
    sys.exit(common.console(main, "sentiment"))
