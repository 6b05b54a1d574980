"""The controlled-sentiment experiment's methods (`experiments.sentiment`): the method
spec (``kind:key=value:...``, :func:`parse_method`), the names figures give each kind,
and the phases that train or sample each offline kind from the SFT policy on the
labelled pairs (the on-policy kinds' phases: `experiments.sentiment_online`).

A preference loss (DPO, Preferred-FT, Unlikelihood, IPO, ...) is one `dpo-jax train`
run with the method's ``loss.name`` / ``loss.hyper``, its evaluation the Trainer's
``eval_hook`` (`sentiment_task.evaluate`). PPO / PPO-GT run the Trainer's ``ppo``
objective on the pair prefixes; Best-of-N samples N completions per held-out prefix and
keeps the one the ground truth (oracle) or the learned reward (phase ``reward_model``,
Bradley-Terry on the same pairs) scores highest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax import evaluation, train
from experiments import driver, phases, pipeline
from experiments import sentiment_task as task_mod
from experiments.phases import Context

# Methods that are not a preference loss: RLHF on a reward (the learned one, or the
# ground truth for PPO-GT) and best-of-N sampling (selected by the ground truth, an
# oracle, or by the learned reward; this project's addition: the paper used Best-of-N
# only for TL;DR and HH).
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


def method_phase_name(method: Method) -> str:
    return "methods/" + method.label.replace(":", "_")


# What a preference run's numbers depend on (not where or how often it logs/saves).
TRAINING_READS = ("num_steps", "batch_size", "grad_accum_steps", "optim", "train.eval_every",
                  "seed", "eval", "reward", "pairs.max_new_tokens", "corpus.prefix_max_len")  # fmt: skip


# ---------------------------------------------------------------------------- phases


def method_config(ctx: Context, method: Method) -> ml_collections.ConfigDict:
    """The `dpo-jax train` config of one method's run."""
    return phases.train_config(
        ctx.config, ctx, **{"loss.name": method.loss_name, "loss.hyper": method.loss_hyper,
                            "seed": ctx.config.seed + 1000 * method.seed},
    )  # fmt: skip


def train_method_phase(method: Method):
    """The phase that fine-tunes the SFT policy with one loss on the pairs; its
    evaluation (sample, reward, KL) is the Trainer's eval_hook."""

    def run(ctx: Context) -> train.TrainResult:
        task = task_mod.load_task(ctx)
        config = method_config(ctx, method)

        data = task_mod.method_batches(
            task_mod.load_pairs(ctx), config, task.pad_id, task_mod.row_length(ctx.config),
            ctx.config.pairs.max_new_tokens,
        )  # fmt: skip
        return phases.train_phase(
            config, train_data=data, model_config=task.model_config, params=task.sft_params,
            eval_hook=task_mod.eval_hook(ctx, task, method.label, config.num_steps),
        )  # fmt: skip

    def dry(ctx: Context) -> Any:
        return task_mod.pair_run_dry(ctx, method_config(ctx, method))

    return run, dry


def reward_model_phase(ctx: Context) -> train.TrainResult:
    """The learned reward: Bradley-Terry (`objective.name="reward_model"`, a scalar head
    on the SFT policy's weights) on the labelled pairs, its checkpoint selected by
    accuracy on held-out prefixes' pairs (`driver.reward_model_run`)."""
    task = task_mod.load_task(ctx)
    r = ctx.config.reward_model
    config = phases.train_config(
        ctx.config, ctx, **{"objective.name": "reward_model", "num_steps": r.num_steps,
                            "batch_size": r.batch_size, "grad_accum_steps": 1},
        **driver.reward_model_overrides(r),
    )  # fmt: skip
    length = task_mod.row_length(ctx.config)
    return driver.reward_model_run(
        ctx, config, task_mod.load_pairs(ctx), cfg=task.model_config, params=task.sft_params,
        train_batches=lambda p: task_mod.method_batches(
            p, config, task.pad_id, length, ctx.config.pairs.max_new_tokens),
        length=length, pad_id=task.pad_id,
    )  # fmt: skip


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
        task = task_mod.load_task(ctx)
        config = ppo_method_config(ctx, method)
        if method.kind == "ppo":
            reward = reward_sources.reward_from_ids(task_mod.learned_reward(ctx, task))
        else:  # the reward the pairs were labelled with (prefix + completion)
            reward = reward_sources.reward_from_texts(
                task.reward_fn, task.tokenizer, with_prompt=True
            )

        hook = task_mod.eval_hook(
            ctx, task, method.label, config.num_steps, policy=lambda params: params["model"]
        )
        return phases.train_phase(
            config, train_data=task.tokens["pairs"], reward=reward,
            model_config=task.model_config, params=task.sft_params, eval_hook=hook,
        )  # fmt: skip

    return run


def best_of_n_phase(method: Method):
    """Best-of-N from the SFT policy (no training), scored by the ground-truth reward.

    `best_of_n` selects with the ground truth: an ORACLE, an upper bound for best-of-N
    at this N. `best_of_n_rm` selects with the reward model learnt from the pairs (this
    project's addition on IMDb: the paper used Best-of-N only for TL;DR and HH). Its KL is the analytic bound log N - (N - 1) / N (Stiennon et al.
    2020; Beirami et al. 2024).
    """

    def run(ctx: Context) -> None:
        task = task_mod.load_task(ctx)
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
            select = task_mod.learned_reward(ctx, task).score_ids(ids).reshape(-1, n)
        best = np.take_along_axis(truth, np.argmax(select, axis=1)[:, None], axis=1)[:, 0]
        reward = evaluation.mean_and_stderr(best)
        if ctx.is_main:
            driver.write_json(ctx.dir / "metrics.json", {
                **reward.as_metrics("eval/reward"), "eval/kl": float(np.log(n) - (n - 1) / n),
                "eval/kl_stderr": float("nan"), "eval/num_samples": reward.n,
            })  # fmt: skip

    return run
