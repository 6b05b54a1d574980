"""The on-policy methods of the controlled-sentiment experiment (`experiments.sentiment`).

Beside PPO and PPO-GT (in `experiments.sentiment_methods`), each starts from the SFT policy, is
evaluated exactly as every method (`sentiment_task.evaluate` as the Trainer's eval_hook:
VADER reward and KL(pi || pi_sft) of samples of the held-out prefixes) and goes to
results.csv and the frontier plot:

* ``grpo``, ``rloo``: GRPO / RLOO (`dpo_jax.group_loop`, objectives "grpo" / "rloo") on
  the pair prefixes, rewarded by the learned reward model (phase ``reward_model``), the
  KL to the SFT policy weighted by ``online.kl_coef``.
* ``online_dpo:beta=B``: online DPO (`dpo_jax.online_dpo`, objective "online_dpo"):
  K completions per prefix from the current policy, the best and worst by the learned
  reward as a pair, the paired loss ``loss=`` (sigmoid) at beta B against the SFT policy.
  ``online_dpo_gt`` labels them by the ground truth (VADER), as PPO-GT does.
* ``iterative_dpo:beta=B``: ``rounds=`` (3) rounds of generate -> label -> offline DPO
  (Xu et al. 2023; Yuan et al. 2024), two phases per round:
  ``methods/<label>/round_<r>_pairs`` samples K completions of every pair prefix from the
  round's starting policy (round 1: SFT; then the previous round's), labels the best
  and worst by the learned reward model (all K tied: no pair) and scores the pairs'
  reference log-probs; ``methods/<label>/round_<r>`` trains ``steps=`` (num_steps)
  offline steps of ``loss=`` (sigmoid) from the previous round's params. The reference
  is the SFT policy (``reference=fixed``) or the round's starting policy
  (``reference=reset``); the evaluation's KL is always to the SFT policy. A round's
  pairs are a function of (seed, method seed, round) and its starting policy only.

A method's settings are the run's ``online.*`` (``grpo.*``, ``online_dpo.*``), then the
experiment's ``method_defaults.<kind>``, then its spec's keys (``grpo:kl_coef=0.05``,
``online_dpo:beta=0.1:samples_per_prompt=8``); a paired kind's other numeric keys are
loss hyper-parameters. Every phase lists those sections in its ``reads``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax import losses, objectives, online, paths, reward_sources, train
from experiments import driver, phases, pipeline, sentiment_methods, sentiment_task
from experiments.phases import Context, Phase
from experiments.sentiment_methods import Method

# The Trainer objective of each on-policy kind.
OBJECTIVES = {"grpo": "grpo", "rloo": "rloo", "online_dpo": "online_dpo",
              "online_dpo_gt": "online_dpo"}  # fmt: skip
# Kinds labelled by the ground-truth reward instead of the learned one.
GROUND_TRUTH_KINDS = ("online_dpo_gt",)
# The config section of each objective's own settings (besides `online.*`).
OWN_SECTION = {"grpo": "grpo", "rloo": "grpo", "online_dpo": "online_dpo"}
# Iterative DPO's own keys, and the `online.*` keys its sampling reads.
ITERATIVE_KEYS = ("rounds", "steps", "reference")
ITERATIVE_ONLINE_KEYS = ("samples_per_prompt", "temperature")
_PAIRS_STREAM = 11  # the rounds' sampling keys: key(seed + this), folded with the round


@dataclasses.dataclass(frozen=True)
class Settings:
    """A method's resolved settings: config-section overrides, its loss, its rounds."""

    sections: dict[str, dict[str, Any]]  # {"online": {...}, "grpo": {...}, ...}
    loss_name: str = "sigmoid"
    loss_hyper: dict[str, float] = dataclasses.field(default_factory=dict)
    rounds: int = sentiment_methods.ITERATIVE_ROUNDS
    steps: int = 0  # iterative DPO's steps per round
    reference: str = "fixed"


def _typed(current: Any, value: Any) -> Any:
    """`value` as the type of the config's `current` value (specs parse numbers as float)."""
    if isinstance(current, bool):
        return bool(value)
    if isinstance(current, int):
        return int(value)
    return value


def settings(config: ml_collections.ConfigDict, method: Method) -> Settings:
    """The method's settings (module docstring): `method_defaults.<kind>`, then its spec.
    An unknown key, or a loss hyper-parameter its loss does not take, is a ValueError."""
    kind = method.kind
    defaults = config.get("method_defaults", {}).get(kind, {})
    items = [*dict(defaults).items(), *method.hyper]
    own = config[OWN_SECTION[OBJECTIVES[kind]]] if kind in OBJECTIVES else None
    online_keys = (
        ITERATIVE_ONLINE_KEYS if kind in sentiment_methods.ITERATIVE_KINDS else config.online
    )
    # the method's own keys: its loss (paired kinds), iterative DPO's rounds
    words = ("loss",) if kind in sentiment_methods.PAIRED_ONLINE_KINDS else ()
    words += ITERATIVE_KEYS if kind in sentiment_methods.ITERATIVE_KINDS else ()
    sections: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    hyper: dict[str, float] = {}
    for key, value in items:
        if key in words:
            extra[key] = value
        elif key in online_keys:
            sections.setdefault("online", {})[key] = _typed(config.online[key], value)
        elif own is not None and key in own:
            section = OWN_SECTION[OBJECTIVES[kind]]
            sections.setdefault(section, {})[key] = _typed(own[key], value)
        elif kind in sentiment_methods.PAIRED_ONLINE_KINDS and not isinstance(value, str):
            hyper[key] = value
        else:
            raise ValueError(f"method {method.label!r}: {kind} has no setting {key!r}")
    loss_name = str(extra.get("loss", "sigmoid"))
    unknown = set(hyper) - losses.accepted_hypers(loss_name)
    if kind in sentiment_methods.PAIRED_ONLINE_KINDS and unknown:
        raise ValueError(
            f"method {method.label!r}: loss {loss_name!r} takes no {sorted(unknown)} "
            f"(and {kind} has no such setting)"
        )
    return Settings(
        sections=sections, loss_name=loss_name, loss_hyper=hyper,
        rounds=int(extra.get("rounds", sentiment_methods.ITERATIVE_ROUNDS)),
        steps=int(extra.get("steps", config.num_steps)),
        reference=str(extra.get("reference", "fixed")),
    )  # fmt: skip


def _apply(config: ml_collections.ConfigDict, s: Settings) -> None:
    for section, values in s.sections.items():
        for key, value in values.items():
            config[section][key] = value


def online_value(config: ml_collections.ConfigDict, s: Settings, key: str) -> Any:
    """`online.<key>` as the method sees it (its settings', else the run's)."""
    return s.sections.get("online", {}).get(key, config.online[key])


def run_seed(config: ml_collections.ConfigDict, method: Method) -> int:
    """The seed of a method's runs (its rollouts, batch order), as every method's."""
    return int(config.seed) + 1000 * method.seed


# ------------------------------------------------------------ on-policy methods


def online_config(
    config: ml_collections.ConfigDict, method: Method, ctx: Context | None = None
) -> ml_collections.ConfigDict:
    """The `dpo-jax train` config of an on-policy method's run (`phases.train_config`
    with `ctx`; without one, a copy of `config` with the same settings, for counting
    steps): its objective, settings and loss, its length as num_steps."""
    s = settings(config, method)
    objective = OBJECTIVES[method.kind]
    overrides: dict[str, Any] = {"objective.name": objective, "seed": run_seed(config, method)}
    if method.kind in sentiment_methods.PAIRED_ONLINE_KINDS:
        overrides.update({"loss.name": s.loss_name, "loss.hyper": s.loss_hyper})
    if ctx is not None:
        out = phases.train_config(config, ctx, **overrides)
    else:
        out = config.copy_and_resolve_references()
        out.objective.name, out.seed = objective, overrides["seed"]
    _apply(out, s)
    out.num_steps = online.METHODS[objective].settings(out).num_steps
    return out


def online_num_steps(config: ml_collections.ConfigDict, method: Method) -> int:
    """Optimizer steps of an on-policy method's phase (its last evaluation's step)."""
    return int(online_config(config, method).num_steps)


def online_method_phase(method: Method):
    """GRPO / RLOO / online DPO from the SFT policy on the pair prefixes, rewarded by the
    learned reward model (or the ground truth: `online_dpo_gt`), evaluated as every
    method is."""

    def run(ctx: Context) -> train.TrainResult:
        task = sentiment_task.load_task(ctx)
        config = online_config(ctx.config, method, ctx)
        if method.kind in GROUND_TRUTH_KINDS:  # what the pairs were labelled with
            reward = reward_sources.reward_from_texts(
                task.reward_fn, task.tokenizer, with_prompt=True
            )
        else:
            reward = reward_sources.reward_from_ids(sentiment_task.learned_reward(ctx, task))
        objective = objectives.get(config.objective.name)

        hook = sentiment_task.eval_hook(
            ctx, task, method.label, config.num_steps,
            policy=lambda params: objectives.split_params(objective, params)[0],
        )  # fmt: skip
        return phases.train_phase(
            config, train_data=task.tokens["pairs"], reward=reward,
            model_config=task.model_config, params=task.sft_params, eval_hook=hook,
        )  # fmt: skip

    def dry(ctx: Context) -> Any:
        model_config, params = sentiment_task.abstract_policy(ctx)
        config = online_config(ctx.config, method, ctx)
        # a pool of the longest prompts (BOS + the longest prefix), a rollout's worth
        longest = [[0] * (ctx.config.corpus.prefix_max_len + 1)] * config.online.rollout_batch_size
        return phases.train_phase(
            config, train_data=longest,
            reward=lambda samples: None, model_config=model_config, params=params, dry_run=True,
        ).lowered  # fmt: skip

    return run, dry


# ------------------------------------------------------------ iterative DPO


def round_phase_name(method: Method, r: int, part: str = "") -> str:
    """``methods/<label>/round_<r>`` (the training) or ``..._pairs`` (its pairs)."""
    return f"{sentiment_methods.method_phase_name(method)}/round_{r}{part}"


def best_and_worst(scores_PxK: np.ndarray) -> list[tuple[int, int, int]]:
    """(prefix, chosen, rejected) per prefix: the first highest-scored completion and
    the last lowest; a prefix whose K scores are all equal gives no pair."""
    s = np.asarray(scores_PxK, np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [prefixes, samples], got shape {s.shape}")
    best = np.argmax(s, axis=1)
    worst = s.shape[1] - 1 - np.argmin(s[:, ::-1], axis=1)
    rows = np.arange(s.shape[0])
    keep = s[rows, best] > s[rows, worst]
    return [(int(p), int(best[p]), int(worst[p])) for p in rows[keep]]


def round_params(ctx: Context, method: Method, r: int, task: sentiment_task.Task) -> Any:
    """The policy after round `r` (round 0: the SFT policy)."""
    if r == 0:
        return task.sft_params
    return driver.trained_params(ctx, round_phase_name(method, r))


def round_pairs_phase(method: Method, r: int):
    """Round r's pairs: K samples per pair prefix from the round's starting policy, the
    best and worst by the learned reward, their reference log-probs."""

    def run(ctx: Context) -> None:
        config, task = ctx.config, sentiment_task.load_task(ctx)
        s = settings(config, method)
        k = int(online_value(config, s, "samples_per_prompt"))
        temperature = float(online_value(config, s, "temperature"))
        if k < 2:
            raise ValueError(f"method {method.label!r}: samples_per_prompt must be >= 2, got {k}")
        policy = round_params(ctx, method, r - 1, task)
        reference = task.sft_params if s.reference == "fixed" else policy
        prefixes = task.tokens["pairs"]
        key = jax.random.fold_in(jax.random.key(run_seed(config, method) + _PAIRS_STREAM), r)
        rows = max(k, config.pairs.batch_size - config.pairs.batch_size % k)
        comps, _ = pipeline.sample(
            task.model, policy, prefixes, key, n=k, max_new_tokens=config.pairs.max_new_tokens,
            temperature=temperature, rows=rows, eos_id=task.eos_id, pad_id=task.pad_id,
        )  # fmt: skip
        ids = [list(prefixes[i // k]) + list(c) for i, c in enumerate(comps)]
        scores_PxK = np.asarray(sentiment_task.learned_reward(ctx, task).score_ids(ids)).reshape(
            -1, k
        )
        triples = best_and_worst(scores_PxK)
        if not triples:
            raise RuntimeError(f"round {r}: every prefix's samples scored the same: no pairs")
        prompts = [prefixes[p] for p, _, _ in triples]
        chosen = [comps[p * k + i] for p, i, _ in triples]
        rejected = [comps[p * k + j] for p, _, j in triples]
        ref = dict(
            chosen=task.scorer(reference, prompts, chosen),
            rejected=task.scorer(reference, prompts, rejected),
        )
        margin = [scores_PxK[p, i] - scores_PxK[p, j] for p, i, j in triples]
        stats = dict(
            round=r, num_pairs=len(triples), num_prefixes=len(prefixes), samples_per_prompt=k,
            mean_learned_reward=float(scores_PxK.mean()), mean_margin=float(np.mean(margin)),
        )  # fmt: skip
        print(f"{method.label} round {r}: {len(triples)} pairs, mean learned reward of the "
              f"samples {stats['mean_learned_reward']:.3f}")  # fmt: skip
        if ctx.is_main:
            tokens = dict(prompts=prompts, chosen=chosen, rejected=rejected)
            paths.write_atomic(ctx.dir / "tokens.json", json.dumps(tokens))
            paths.write_npz(ctx.dir / "ref_logps.npz", ref)
            paths.write_atomic(ctx.dir / "metrics.json", json.dumps(stats))

    return run


def load_round_pairs(ctx: Context, method: Method, r: int) -> pipeline.PairData:
    """Round r's labelled pairs with their reference log-probs."""
    d = ctx.input(round_phase_name(method, r, "_pairs"))
    t = json.loads((d / "tokens.json").read_text())
    ref = paths.read_npz(d / "ref_logps.npz")
    return pipeline.PairData(
        t["prompts"], t["chosen"], t["rejected"], ref["chosen"], ref["rejected"]
    )


def round_config(ctx: Context, method: Method, r: int) -> ml_collections.ConfigDict:
    """The `dpo-jax train` config of round r's offline run: the method's loss, its
    steps, a batch order of its own."""
    s = settings(ctx.config, method)
    return phases.train_config(
        ctx.config, ctx, **{"loss.name": s.loss_name, "loss.hyper": s.loss_hyper,
                            "num_steps": s.steps, "seed": run_seed(ctx.config, method) + r},
    )  # fmt: skip


def round_train_phase(method: Method, r: int):
    """Round r's offline run from the previous round's params on round r's pairs,
    checkpointed and evaluated as every method; its checkpoint is the next round's start."""

    def run(ctx: Context) -> train.TrainResult:
        task = sentiment_task.load_task(ctx)
        config = round_config(ctx, method, r)
        # Only the last round's final evaluation writes the method's samples.
        last_step = config.num_steps if r == settings(ctx.config, method).rounds else None
        data = sentiment_task.method_batches(
            load_round_pairs(ctx, method, r), config, task.pad_id,
            sentiment_task.row_length(ctx.config), ctx.config.pairs.max_new_tokens,
        )  # fmt: skip
        return phases.train_phase(
            config, train_data=data, model_config=task.model_config,
            params=round_params(ctx, method, r - 1, task),
            eval_hook=sentiment_task.eval_hook(ctx, task, method.label, last_step),
        )  # fmt: skip

    def dry(ctx: Context) -> Any:
        return sentiment_task.pair_run_dry(ctx, round_config(ctx, method, r))

    return run, dry


# ------------------------------------------------------------ graph and rows


def check(config: ml_collections.ConfigDict, method: Method) -> None:
    """Refuse a bad method before any phase runs: its settings, and an on-policy
    method's checked by its objective."""
    settings(config, method)
    if method.kind in OBJECTIVES:
        online_config(config, method)


def method_phases(config: ml_collections.ConfigDict, method: Method) -> list[Phase]:
    """The phases of an on-policy method: one training phase, or iterative DPO's two
    per round."""
    check(config, method)
    kind = method.kind
    base = ("tokenizer", "sft")  # the pair prefixes and the SFT policy
    learned = () if kind in GROUND_TRUTH_KINDS else ("reward_model",)
    if kind in OBJECTIVES:
        reads = ("online", OWN_SECTION[OBJECTIVES[kind]], f"method_defaults.{kind}", "optim",
                 "grad_accum_steps", "train.eval_every", "seed", "eval", "reward",
                 "pairs.max_new_tokens", "corpus.prefix_max_len")  # fmt: skip
        run, dry = online_method_phase(method)
        return [Phase(sentiment_methods.method_phase_name(method), run, after=(*base, *learned),
                      reads=reads, dry=dry)]  # fmt: skip
    out = []
    # The rounds' sampling and labelling (pairs.batch_size: the sampler's chunks, hence
    # its keys; eval.batch_size: the scorers' rows).
    sampling = ("online.samples_per_prompt", "online.temperature", f"method_defaults.{kind}",
                "seed", "pairs.max_new_tokens", "pairs.batch_size", "eval.batch_size",
                "eval.max_new_tokens", "corpus.prefix_max_len")  # fmt: skip
    for r in range(1, settings(config, method).rounds + 1):
        previous = (round_phase_name(method, r - 1),) if r > 1 else ()
        pairs = round_phase_name(method, r, "_pairs")
        out.append(Phase(pairs, round_pairs_phase(method, r),
                         after=(*base, *learned, *previous), reads=sampling))  # fmt: skip
        run, dry = round_train_phase(method, r)
        out.append(Phase(round_phase_name(method, r), run, after=(*base, pairs, *previous),
                         reads=(*sentiment_methods.TRAINING_READS, f"method_defaults.{kind}"), dry=dry))  # fmt: skip
    return out


def method_rows(ctx: Context, method: Method, sft: dict[str, Any]) -> list[dict[str, Any]]:
    """A method's results.csv rows: the SFT evaluation at step 0, then its evaluations;
    iterative DPO's rounds one after another (round r's step s is step (r-1) N + s)."""
    from dpo_jax.metrics import read_jsonl

    rows = [sentiment_task.result_row(method.label, 0, sft, final=False)]
    if method.kind in OBJECTIVES:
        runs = [(ctx.input(sentiment_methods.method_phase_name(method)), 0)]
        last = online_num_steps(ctx.config, method)
    else:
        s = settings(ctx.config, method)
        runs = [
            (ctx.input(round_phase_name(method, r)), (r - 1) * s.steps)
            for r in range(1, s.rounds + 1)
        ]
        last = s.rounds * s.steps
    for directory, offset in runs:
        lines = read_jsonl(directory / "metrics.jsonl")
        by_step = {r["step"]: r for r in lines if "eval/reward" in r}  # a rerun's last wins
        rows += [
            sentiment_task.result_row(method.label, offset + step, r, final=offset + step == last)
            for step, r in sorted(by_step.items())
        ]
    return rows
