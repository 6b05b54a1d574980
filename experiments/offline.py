"""Offline preference experiments as in the DPO paper (§6.2): TL;DR summarization and
Anthropic HH single-turn dialogue, as phase graphs on the one Trainer. A task module
declares an :class:`Task` and runs ``driver.main(argv, experiment(task, ...))``
(`experiments.driver`); the data, tokenizer and training phases are in
`experiments.offline_phases`, the methods' evaluation, graph and report here.

A fixed preference dataset in an upstream format trains every method from one policy
initialisation; each method then samples one completion per test prompt at every
temperature of ``eval.temperatures`` (the paper's 0, 0.25, 0.5, 0.75, 1) and a judge
compares it with the test prompt's *reference* completion, which the task defines:
the human-written summary of the TL;DR SFT split, the chosen response of the HH test
split. ``results.csv`` has one row per (method, temperature).

Methods (``config.methods``; :data:`METHODS`):

- ``sft``: SFT on the task's human demonstrations (TL;DR: the reference summaries of
  the SFT split's training posts).
- ``preferred_ft``: SFT on the chosen completions of the preference data (the paper's
  Preferred-FT; for HH, which has no SFT data, also the paper's reference model).
- ``dpo``: ``loss.name`` at ``loss.hyper`` on the pairs (the run's `dpo-jax train`
  keys: ``num_steps``, ``batch_size``, ``optim``, ...), from and against the
  ``config.reference_policy`` method's policy, its log-probs computed once (phase
  ``reference``).
- ``best_of_n``: ``best_of_n.n`` samples from the reference policy per prompt, the one a
  Bradley-Terry reward model learned on the same pairs scores highest (phase
  ``reward_model``: the Trainer's ``objective.name="reward_model"``). At temperature 0
  all n samples are the same greedy one, so it is evaluated at temperatures > 0 only.
- ``ppo``: PPO (the Trainer's ``objective.name="ppo"``, ``dpo_jax.ppo_loop``, docs/PPO.md)
  from the reference policy: rollouts of the training comparisons' prompts, rewarded by
  the same learned reward model (phase ``reward_model``), a per-token KL penalty against
  the reference policy with Ziegler et al.'s adaptive controller (``ppo.target_kl``);
  the run's ``ppo.*`` keys and ``optim`` (the DPO run's optimizer).
- ``online_dpo``: online DPO (``objective.name="online_dpo"``, Guo et al. 2024) from the
  reference policy: the best and worst of each prompt's samples of the current policy
  by the same learned reward model as a pair, the DPO run's loss against the reference
  policy; ``online.*`` with ``method_defaults.online_dpo`` over them.

Phases (``experiments.phases``; each writes ``run_dir/<phase>/`` and a ``DONE`` marker,
a rerun skips finished phases and resumes a training phase from its checkpoint):
``data`` -> ``tokenizer`` -> the training phases (``sft``, ``preferred_ft``, ``reference``
log-probs, ``dpo``, ``reward_model``, ``ppo``, ``online_dpo``, as the methods need) -> ``eval_<method>``
(samples at every temperature, judged) -> ``report`` (``results.csv`` and ``win_rate.png``
from the eval phases' outputs). ``--dry_run`` lowers each training phase's program with
abstract params (`train(..., dry_run=True)`) and prints its per-device memory.

Training seeds (``config.seeds``, `common.seed_runs`): the whole graph once per seed in
``run_dir/seed_<s>/`` (the data, fixed by ``data_seed``, is the same for every seed),
then ``summary.csv`` (each method's win rate per temperature: mean, std and 95% CI over
the seeds, with their count) and ``win_rate.png`` (means with +-1 std bars) in
``run_dir``.

Judges (``config.judge``, :func:`resolve_judge`): the task's lexical fixture judge
(miniatures), a reward function, or an LLM judge with the paper's appendix C.2 prompt
(``dpo_jax.judge``), which randomises the answer order per comparison and counts the
replies it cannot parse (``unparseable``; left out of the win rate).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from dpo_jax import errors as dpo_errors
from dpo_jax import evaluation, objectives, paths
from experiments import common, driver, pipeline
from experiments.offline_phases import (
    ROLLOUT_SEEDS,
    Loaded,
    Task,
    data_phase,
    load,
    pair_training_phase,
    ppo_phase,
    reference_phase,
    rollout_config,
    rollout_phase,
    sft_phase,
    tokenizer_phase,
)
from experiments.phases import Context, Phase

OFFLINE_RESULT_COLUMNS = (
    "method", "temperature", "win_rate", "win_rate_stderr", "wins", "ties", "losses",
    "unparseable", "num_prompts",
)  # fmt: skip
PAPER_TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------------------- config


def offline_config(fmt: str) -> ml_collections.ConfigDict:
    """The config TL;DR and HH share: `dpo-jax train`'s tree (the DPO run's keys) plus
    the experiment's sections; each module fills in its own values and presets."""
    c = common.experiment_config(
        "mini", hidden_size=64, num_layers=2, num_heads=4, max_positions=96
    )
    # data.train: the comparisons; data.demonstrations: TL;DR's SFT split; data.test: the
    # evaluation prompts with their references. All empty: write the fixture.
    c.data.update(format=fmt, max_length=None, max_prompt_length=64)
    c.data.max_completion_length = 24
    c.data.demonstrations = ""
    c.data.test = ""
    c.data.num_sft, c.data.num_train, c.data.num_test = 1200, 1200, 128
    c.data.tokenizer_vocab_size = 768
    c.methods = ("sft", "preferred_ft", "dpo")
    c.reference_policy = "sft"  # the policy DPO starts from and is regularised to; Best-of-N's base
    # SFT and Preferred-FT (AdamW, cosine). completion_only: loss on completions only.
    c.sft = ml_collections.ConfigDict(dict(
        num_steps=300, batch_size=32, learning_rate=2e-3, warmup_steps=30,
        completion_only=False,
    ))  # fmt: skip
    # DPO: the `dpo-jax train` keys themselves.
    c.loss.hyper.beta = 0.1
    c.num_steps = 150
    c.batch_size = 32  # pairs per step
    c.optim.update(name="adamw", learning_rate=3e-5, warmup_steps=10, schedule="constant",
                   max_grad_norm=10.0)  # fmt: skip
    c.train.update(log_every=25, tensorboard=False, token_metrics=False)
    # A resumed phase redoes at most save_every steps; keep only the newest checkpoint
    # (it is also where later phases read the trained params from).
    c.checkpoint.update(save_every=50, keep_last=1, async_save=False)
    # Best-of-N: n samples per prompt from the reference policy, a reward model learned on
    # the pairs picks one. The paper's n is 128; eval.batch_size must divide by n.
    c.best_of_n = ml_collections.ConfigDict(dict(n=4))
    # 400 steps: after 150 the TL;DR reward model ranked ~81% of a training batch right
    # (~97% after 400) and PPO on it learned to drop title words.
    # val_fraction of the prompts' pairs held out; the checkpoint (one every eval_every
    # steps) with the best accuracy on them is the reward model, as the paper did.
    c.reward_model = ml_collections.ConfigDict(
        dict(num_steps=400, batch_size=32, learning_rate=1e-4, val_fraction=0.1, eval_every=100)
    )
    # PPO: `dpo-jax train`'s ppo.* keys (docs/PPO.md) and the DPO run's `optim`. Rollouts
    # of the comparisons' prompts as long as the evaluation's samples; the adaptive KL
    # controller with its horizon shrunk to the run (a horizon of 10,000 episodes would
    # barely move beta in 40 rollouts of 64).
    c.online.update(num_rollouts=40, rollout_batch_size=64, max_new_tokens=24, kl_coef=0.1)
    c.ppo.update(num_epochs=4, target_kl=1.0, kl_horizon=256.0)
    # Online DPO (objective.name="online_dpo", docs/ONLINE.md): the `online.*` keys above
    # with these overrides, and the DPO run's loss and beta. Two samples per prompt (TRL's
    # OnlineDPOTrainer), so a rollout of 64 is 32 pairs, DPO's batch; 150 rollouts of one
    # update each: DPO's 150 steps.
    c.method_defaults = ml_collections.ConfigDict(
        dict(online_dpo=dict(samples_per_prompt=2, num_rollouts=150))
    )
    c.eval = ml_collections.ConfigDict(
        dict(max_new_tokens=24, temperatures=PAPER_TEMPERATURES, batch_size=128, seed=4321)
    )
    # "fixture" (the task's own), "reward:vader", "hf:DIR" (a classifier reward),
    # "python:MOD:FN" (FN() builds a pairwise judge), "llm:hf:DIR" (a local causal LM with
    # the paper's C.2 prompt), "llm:python:MOD:FN" (FN(prompt_text) -> reply_text, an API).
    c.judge = "fixture"
    c.llm_judge = ml_collections.ConfigDict(dict(max_new_tokens=64, rows=8, dtype="float32"))
    c.dry_run_devices = 8  # simulated CPU devices for --dry_run
    return c


def shrink_to_smoke(c: ml_collections.ConfigDict) -> None:
    """The `smoke` preset of an offline experiment: the same pipeline in seconds."""
    c.data.update(num_sft=96, num_train=96, num_test=16, tokenizer_vocab_size=384)
    c.model.update(hidden_size=32, num_layers=1, num_heads=2)
    c.sft.update(num_steps=20, batch_size=16)
    c.update(num_steps=4, batch_size=8)
    c.checkpoint.save_every = 1000  # the final save only (what later phases read)
    c.reward_model.update(num_steps=4, batch_size=8, eval_every=2)
    c.best_of_n.n = 2
    c.online.update(num_rollouts=2, rollout_batch_size=8, max_new_tokens=12)
    c.method_defaults.online_dpo.num_rollouts = 2
    c.ppo.num_epochs = 2
    c.eval.update(batch_size=16, max_new_tokens=12, temperatures=(0.0, 1.0))
    c.train.progress = False


# ---------------------------------------------------------------------------- judges


def score_judge(score: Callable[[str, str], float]) -> Callable[..., np.ndarray]:
    """A pairwise judge from a per-text score(prompt, text): a wins when it scores higher,
    0.5 on ties."""

    def judge(prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        sa = np.array([score(p, t) for p, t in zip(prompts, a, strict=True)])
        sb = np.array([score(p, t) for p, t in zip(prompts, b, strict=True)])
        return np.where(sa > sb, 1.0, np.where(sa < sb, 0.0, 0.5))

    return judge


def resolve_judge(spec: str, task: Task, config: Any) -> Any:
    """A pairwise judge `(prompts, a, b) -> P(a better)` from `config.judge` (see
    `offline_config`). `fixture`, `reward:vader` and `hf:DIR` are the experiments' own;
    `python:`, `llm:hf:` and `llm:python:` are `reward_sources.judge_from_spec`'s, LLM
    judges with the task's C.2 template, seeded by `config.seed`."""
    from dpo_jax import reward_sources, rewards

    if spec == "fixture":
        return task.fixture_judge()
    if spec == "reward:vader":
        return evaluation.reward_judge(rewards.VaderReward())
    if spec.startswith("hf:"):
        return evaluation.reward_judge(rewards.HFClassifierReward(spec[3:], label=1))
    if spec.startswith(("python:", "llm:")):
        lj = config.llm_judge
        return reward_sources.judge_from_spec(
            spec, key="judge", template=task.judge_template, seed=config.seed,
            max_new_tokens=lj.max_new_tokens, rows=lj.rows, dtype=lj.dtype,
        )  # fmt: skip
    raise dpo_errors.config_error(
        "judge",
        f"{spec!r} is not a judge",
        "use fixture, reward:vader, hf:DIR, python:MOD:FN, llm:hf:DIR or llm:python:MOD:FN",
    )


# ----------------------------------------------------------------------- evaluation

# A policy samples one completion per test prompt: (temperature, key) -> token ids.
Policy = Callable[[float, jax.Array], list[list[int]]]


def _sampling_policy(method: str, part: str | None = None) -> Callable[[Context, Loaded], Policy]:
    """Samples from training phase `method`'s params (their `part`: PPO's state also holds
    its value head)."""

    def build(ctx: Context, task: Loaded) -> Policy:
        params = driver.trained_params(ctx, method)
        params = params if part is None else params[part]
        return lambda temperature, key: task.sample(params, temperature, key)[0]

    return build


def pick_best_of_n(completions: Sequence[Any], rewards_K: Any, n: int) -> list[Any]:
    """Per prompt, the completion with the highest reward among its n consecutive ones
    (the first on ties)."""
    best = np.asarray(rewards_K).reshape(-1, n).argmax(axis=1)
    return [completions[i * n + int(j)] for i, j in enumerate(best)]


def best_of_n_policy(ctx: Context, task: Loaded) -> Policy:
    """`best_of_n.n` samples per prompt from the reference policy; the learned reward
    (phase `reward_model`) of prompt + completion picks one."""
    c = ctx.config
    n = int(c.best_of_n.n)
    base = driver.trained_params(ctx, c.reference_policy)
    reward = driver.learned_reward(ctx, task.cfg, task.tokenizer)
    prompts = task.tokens["test_prompts"]

    def policy(temperature: float, key: jax.Array) -> list[list[int]]:
        comps, _ = task.sample(base, temperature, key, n=n)
        full = [prompts[k // n] + x for k, x in enumerate(comps)]
        return pick_best_of_n(comps, reward.score_ids(full), n)

    return policy


@dataclasses.dataclass(frozen=True)
class Method:
    """An evaluated method: how to build its policy, the phases it reads, whether it is
    only defined when sampling (its greedy output is another method's)."""

    policy: Callable[[Context, Loaded], Policy]
    needs: Callable[[ml_collections.ConfigDict], tuple[str, ...]]
    sampling_only: bool = False


# Every evaluable method by name. A new one is an entry here, plus its training phase in
# TRAINING_PHASES.
METHODS: dict[str, Method] = {
    "sft": Method(_sampling_policy("sft"), lambda c: ("sft",)),
    "preferred_ft": Method(_sampling_policy("preferred_ft"), lambda c: ("preferred_ft",)),
    "dpo": Method(_sampling_policy("dpo"), lambda c: ("dpo",)),
    "best_of_n": Method(best_of_n_policy, lambda c: (c.reference_policy, "reward_model"), True),
    "ppo": Method(_sampling_policy("ppo", objectives.MODEL), lambda c: ("ppo",)),
    "online_dpo": Method(_sampling_policy("online_dpo"), lambda c: ("online_dpo",)),
}


def judge_samples(
    judge: Any, task: Loaded, texts: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The win rate of `texts` against the references (one judgement per pair; an LLM
    judge randomises the order itself), and one samples.jsonl line per pair."""
    from dpo_jax.judge import LLMJudge

    refs, prompts = task.tokens["references"], task.tokens["test_prompt_texts"]
    wr = evaluation.win_rate(texts, refs, judge=judge, prompts=prompts, swap=False)
    row = dict(
        win_rate=wr.rate, win_rate_stderr=wr.stderr, wins=wr.wins, ties=wr.ties,
        losses=wr.losses, unparseable=wr.undecided, num_prompts=len(texts),
    )  # fmt: skip
    lines = []
    records = judge.records[-len(texts) :] if isinstance(judge, LLMJudge) else [None] * len(texts)
    for p, t, r, s, rec in zip(prompts, texts, refs, wr.per_pair, records, strict=True):
        line = dict(prompt=p, completion=t, reference=r, score=None if np.isnan(s) else float(s))
        if rec is not None:
            line.update(policy_shown_first=rec.a_first, judge_reply=rec.reply, verdict=rec.choice)
        lines.append(line)
    return row, lines


def eval_phase(method: str, task_def: Task) -> Callable[[Context], None]:
    """Sample the method's completions at every temperature, judge them against the
    references; rows.json and samples.jsonl in the phase directory."""

    def run(ctx: Context) -> None:
        c = ctx.config
        task = load(ctx)
        policy = METHODS[method].policy(ctx, task)
        judge = resolve_judge(c.judge, task_def, c)
        rows, lines = [], []
        eval_key = jax.random.key(c.eval.seed)
        for k, temperature in enumerate(c.eval.temperatures):
            if temperature == 0 and METHODS[method].sampling_only:
                continue
            # The same key for every method at a temperature (common random numbers).
            comps = policy(float(temperature), jax.random.fold_in(eval_key, k))
            texts = pipeline.decode_completions(task.tokenizer, comps)
            row, mine = judge_samples(judge, task, texts)
            rows.append(dict(method=method, temperature=float(temperature), **row))
            lines += [dict(method=method, temperature=float(temperature), **x) for x in mine]
        if ctx.is_main:
            driver.write_json(ctx.dir / "rows.json", rows)
            paths.write_atomic(
                ctx.dir / "samples.jsonl", "".join(json.dumps(x) + "\n" for x in lines)
            )

    return run


# ---------------------------------------------------------------------------- graph

# Training phases by name: (run, dry), and the phases each comes after.
TRAINING_PHASES: dict[str, tuple[Any, Callable[[ml_collections.ConfigDict], tuple[str, ...]]]] = {
    "sft": (sft_phase("demo"), lambda c: ("tokenizer",)),
    "preferred_ft": (sft_phase("chosen"), lambda c: ("tokenizer",)),
    "dpo": (
        pair_training_phase("preference"),
        lambda c: ("tokenizer", "reference", c.reference_policy),
    ),
    "reward_model": (
        pair_training_phase("reward_model"),
        lambda c: ("tokenizer", c.reference_policy),
    ),
    "ppo": (ppo_phase(), lambda c: ("tokenizer", c.reference_policy, "reward_model")),
    "online_dpo": (
        rollout_phase("online_dpo"),
        lambda c: ("tokenizer", c.reference_policy, "reward_model"),
    ),
}


def _needed(config: ml_collections.ConfigDict) -> list[str]:
    """The training phases the methods need, with what those need (in graph order)."""
    want: set[str] = set()
    for m in config.methods:
        want.update(METHODS[m].needs(config))
    if "dpo" in want:
        want |= {"reference", config.reference_policy}
    if want & set(ROLLOUT_SEEDS):  # the on-policy methods' reward is the learned one
        want.add("reward_model")
    if "reward_model" in want:
        want.add(config.reference_policy)
    order = ["sft", "preferred_ft", "reference", "dpo", "reward_model", "ppo", "online_dpo"]
    return [p for p in order if p in want]


def build_phases(config: ml_collections.ConfigDict, task: Task) -> list[Phase]:
    """The experiment's phase graph for `config`."""
    for m in config.methods:
        if m not in METHODS:
            raise dpo_errors.config_error(
                "methods", f"unknown method {m!r}", f"choose from {sorted(METHODS)}"
            )
    if config.reference_policy not in ("sft", "preferred_ft"):
        raise dpo_errors.config_error(
            "reference_policy",
            f"{config.reference_policy!r} is not a policy",
            "use 'sft' or 'preferred_ft'",
        )
    if "best_of_n" in config.methods and config.eval.batch_size % config.best_of_n.n:
        raise dpo_errors.config_error(
            "best_of_n.n", f"{config.best_of_n.n} does not divide eval.batch_size="
            f"{config.eval.batch_size}", "make eval.batch_size a multiple of n",
        )  # fmt: skip
    needed = _needed(config)
    for objective in set(needed) & set(ROLLOUT_SEEDS):  # refused before any phase runs
        rollout_config(config, objective)
    policy = ("model", "tokenizer", "seed", "data")
    dpo_keys = ("num_steps", "batch_size", "grad_accum_steps", "optim", "loss", "seed", "mesh")
    reads = {
        "sft": (*policy, "sft"), "preferred_ft": (*policy, "sft"),
        "reference": ("reference_policy", "eval.batch_size"), "dpo": dpo_keys,
        "reward_model": ("reward_model", "mesh", "seed", "data_seed"),
        "ppo": ("ppo", "online", "optim", "grad_accum_steps", "seed", "mesh"),
        "online_dpo": ("online", "online_dpo", "method_defaults.online_dpo", "loss", "optim",
                       "grad_accum_steps", "seed", "mesh"),
    }  # fmt: skip
    graph = [
        Phase("data", data_phase(task), reads=("data", "data_seed")),
        Phase(
            "tokenizer",
            tokenizer_phase(task),
            after=("data",),
            reads=("tokenizer", "data", "eval.max_new_tokens"),
        ),  # fmt: skip
    ]
    for name in needed:
        if name == "reference":
            graph.append(Phase("reference", reference_phase,
                               after=("tokenizer", config.reference_policy), reads=reads[name]))  # fmt: skip
            continue
        (run, dry), after = TRAINING_PHASES[name]
        graph.append(Phase(name, run, after=after(config), reads=reads[name], dry=dry))
    evals = []
    for m in config.methods:
        name = f"eval_{m}"
        evals.append(name)
        graph.append(Phase(name, eval_phase(m, task), after=("tokenizer", *METHODS[m].needs(config)),
                           reads=("eval", "judge", "llm_judge", "best_of_n", "seed")))  # fmt: skip

    def report(ctx: Context) -> None:
        rows = [r for name in evals for r in driver.read_json(ctx.run_dir / name / "rows.json")]
        samples = "".join((ctx.run_dir / name / "samples.jsonl").read_text() for name in evals)
        if ctx.is_main:
            common.write_csv(ctx.run_dir / "results.csv", rows, OFFLINE_RESULT_COLUMNS)
            paths.write_atomic(ctx.run_dir / "samples.jsonl", samples)
            plot_win_rates(rows, ctx.run_dir / "win_rate.png",
                           f"{task.name} ({config.preset})", task.reference_label)  # fmt: skip
        print(common.format_table(rows, OFFLINE_RESULT_COLUMNS))
        if line := driver.reward_model_summary(ctx.run_dir / "reward_model"):
            print(line)
        print(f"win rate against the {task.reference_label} (judge: {config.judge}); "
              f"results in {ctx.run_dir}")  # fmt: skip

    graph.append(Phase("report", report, after=tuple(evals), marker=False))
    return graph


def plot_win_rates(
    rows: Sequence[Mapping[str, Any]],
    path: Any,
    title: str,
    reference_label: str,
    value: str = "win_rate",
    error: str = "win_rate_stderr",
) -> None:
    """Win rate against sampling temperature, one line per method, with `error` bars: one
    run's table (rate, standard error) or a seed summary's (``win_rate_mean`` with
    ``win_rate_std``)."""
    plt = common.agg_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ax.errorbar([float(r["temperature"]) for r in mine], [float(r[value]) for r in mine],
                    yerr=np.nan_to_num([float(r[error]) for r in mine]), marker="o",
                    capsize=3, label=method)  # fmt: skip
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel(f"win rate vs {reference_label}")
    ax.set_ylim(0, 1)
    common.save_figure(fig, ax, title, str(path))


SUMMARY_KEYS, SUMMARY_VALUES = ("method", "temperature"), ("win_rate",)


def write_seed_summary(
    config: ml_collections.ConfigDict,
    task: Task,
    run_dir: epath.Path,
    seed_dirs: Mapping[int, epath.Path],
) -> list[dict[str, Any]]:
    """summary.csv (each method's win rate per temperature over the training seeds) and
    win_rate.png (means, +-1 std bars) from the per-seed results.csv files."""
    tables = {seed: common.read_csv(d / "results.csv") for seed, d in seed_dirs.items()}
    title = f"{task.name} ({config.preset}), {len(seed_dirs)} training seeds"

    def plot(rows: Sequence[Mapping[str, Any]], path: epath.Path) -> None:
        plot_win_rates(rows, path, title, task.reference_label, "win_rate_mean", "win_rate_std")

    return common.write_seed_summary(
        run_dir, tables, SUMMARY_KEYS, SUMMARY_VALUES, plot, "win_rate.png"
    )


def experiment(
    task: Task, get_config: Callable[[str], ml_collections.ConfigDict], presets: Sequence[str]
) -> driver.Experiment:
    """The driver's declaration of offline task `task` (`python -m experiments.{tldr,hh}`
    is ``driver.main(argv, experiment(...))``)."""
    return driver.Experiment(
        name=task.name,
        get_config=get_config,
        presets=presets,
        build_phases=lambda config: build_phases(config, task),
        write_seed_summary=lambda config, run_dir, seed_dirs: write_seed_summary(
            config, task, run_dir, seed_dirs
        ),
    )
