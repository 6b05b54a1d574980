"""The phases of the offline preference experiments (`experiments.offline`) up to the
trained policies: what a task declares (:class:`Task`), the data and tokenizer phases,
the loaded tokenizer outputs (:func:`load`) and the training phases (SFT, Preferred-FT,
the reference log-probs, DPO, the reward model, PPO and online DPO). Each training
phase's params are its Trainer checkpoints (`driver.trained_params`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from dpo_jax import data, models, paths
from dpo_jax.data.formats import SFT_FORMATS
from dpo_jax.data.tokenize import settings_from_spec, tokenize_examples
from experiments import common, driver, phases, pipeline
from experiments.phases import Context


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between TL;DR and HH.

    write_fixture(directory, config) writes the SYNTHETIC fixture files and returns their
    paths by role: ``train`` (comparisons), ``test`` (the evaluation prompts and their
    references) and, when the task has demonstrations, ``sft``.
    test_format: the `dpo_jax.data` format of the test file; its examples' prompts are
    the evaluation prompts and ``reference`` names the field the win rate is against.
    """

    name: str
    write_fixture: Callable[[epath.Path, Any], dict[str, epath.Path]]
    test_format: str
    reference: str  # "completion" (a demonstration's) or "chosen" (a pair's)
    fixture_judge: Callable[[], Any]
    judge_template: str  # a dpo_jax.judge.TEMPLATES name
    reference_label: str  # how figures and tables name the reference
    # Which parsed comparisons and test examples the task keeps (HH: single-turn
    # dialogues, as the paper); None keeps every one.
    keep_example: Callable[[Any], bool] | None = None


def keep_examples(task: Task, examples: list, role: str) -> list:
    """The `examples` of `role` that `task.keep_example` keeps, with the count printed."""
    if task.keep_example is None:
        return examples
    kept = [e for e in examples if task.keep_example(e)]
    print(f"{task.name} {role}: kept {len(kept)} of {len(examples)} examples "
          f"({len(examples) - len(kept)} dropped by the task's filter)")  # fmt: skip
    return kept


def row_length(config: ml_collections.ConfigDict) -> int:
    """Length of every training row (prompt + completion) and sampling row: fixed by the
    config, so the dry run compiles the run's shapes."""
    d = config.data
    return d.max_prompt_length + max(d.max_completion_length, config.eval.max_new_tokens)


# ---------------------------------------------------------------- data and the model


def data_phase(task: Task) -> Callable[[Context], None]:
    """The data files by role: the configured ones, or the fixture written here."""

    def run(ctx: Context) -> None:
        d = ctx.config.data
        if d.train:
            files = {"train": d.train, "test": d.test}
            if d.demonstrations:
                files["sft"] = d.demonstrations
        else:
            written = task.write_fixture(ctx.dir, ctx.config) if ctx.is_main else {}
            files = {role: str(path) for role, path in written.items()}
        if ctx.is_main:
            driver.write_json(ctx.dir / "paths.json", files)

    return run


def tokenizer_phase(task: Task) -> Callable[[Context], None]:
    """The tokenizer (the configured one, or a BPE trained on the training texts) and
    every split tokenized: pairs, demonstrations, test prompts with their references
    (pairs and test examples after the task's `keep_example` filter)."""

    def run(ctx: Context) -> None:
        config, d = ctx.config, ctx.config.data
        files = driver.read_json(ctx.input("data") / "paths.json")
        load = lambda role, fmt: data.load_examples(  # noqa: E731
            dict(d, path=files[role], format=fmt, sft=fmt in SFT_FORMATS), None, data.RejectLog()
        )
        comparisons = keep_examples(task, load("train", d.format), "train")
        demos = load("sft", "tldr_sft") if "sft" in files else []
        test = keep_examples(task, load("test", task.test_format), "test")
        if config.tokenizer:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(config.tokenizer, local_files_only=True)
        else:
            texts = [e.prompt + e.chosen for e in comparisons] + [e.rejected for e in comparisons]
            texts += [e.prompt + e.completion for e in demos]
            tok = common.train_bpe_tokenizer(texts, d.tokenizer_vocab_size)
        settings = settings_from_spec(d)
        pairs = tokenize_examples(comparisons, tok, settings)
        tokens: dict[str, Any] = {k: [pairs[i][k].tolist() for i in range(len(pairs))]
                                  for k in ("prompt", "chosen", "rejected")}  # fmt: skip
        if demos:
            sft = tokenize_examples(demos, tok, settings)
            for k in ("prompt", "completion"):
                tokens[f"demo_{k}"] = [sft[i][k].tolist() for i in range(len(sft))]
        tokens["test_prompt_texts"] = [e.prompt for e in test]
        tokens["references"] = [getattr(e, task.reference) for e in test]
        tokens["test_prompts"] = [
            tok(e.prompt, add_special_tokens=False)["input_ids"][-d.max_prompt_length :]
            for e in test
        ]
        if ctx.is_main:
            with paths.staged_dir(ctx.dir) as local:
                tok.save_pretrained(local)
            driver.write_json(ctx.dir / "tokens.json", tokens)
        print(f"{len(tokens['prompt'])} train pairs, {len(tokens.get('demo_prompt', []))} "
              f"demonstrations, {len(test)} test prompts, vocabulary {len(tok)}")  # fmt: skip

    return run


def model_config(config: ml_collections.ConfigDict, tok: Any) -> models.ModelConfig:
    """The policy's ModelConfig (`common.policy_model_config`) for tokenizer `tok`: its
    vocabulary, EOS and padding (EOS when it has no padding token) ids."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return common.policy_model_config(
        config, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=pad
    )


@dataclasses.dataclass
class Loaded:
    """What the later phases read: the tokenizer phase's outputs and the model config."""

    config: ml_collections.ConfigDict
    tokenizer: Any
    tokens: dict[str, Any]
    cfg: models.ModelConfig

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def sample(self, params: Any, temperature: float, key: jax.Array, n: int = 1):
        """n completions per test prompt (row i*n+j = sample j of prompt i) and their
        log-probs, `eval.batch_size` rows per sampler call."""
        c = self.config.eval
        return pipeline.sample(
            models.Transformer(self.cfg), params, self.tokens["test_prompts"], key, n=n,
            max_new_tokens=c.max_new_tokens, temperature=temperature, rows=c.batch_size,
            eos_id=self.eos_id, pad_id=self.pad_id,
        )  # fmt: skip


def load(ctx: Context) -> Loaded:
    """The tokenizer phase's outputs (this phase must come after `tokenizer`)."""
    directory = ctx.input("tokenizer")
    tok = driver.load_tokenizer(directory)
    return Loaded(
        ctx.config, tok, driver.read_json(directory / "tokens.json"), model_config(ctx.config, tok)
    )


# ------------------------------------------------------------------ training phases


def _dry_model_config(ctx: Context) -> models.ModelConfig:
    """The policy's ModelConfig without running the data phases: `model.path`'s shape, or
    the from-scratch shape for the run directory's tokenizer if there is one, else for
    `data.tokenizer_vocab_size` (a BPE trained on enough text has that many tokens; its
    one special token, id 0, is EOS and padding)."""
    directory = ctx.run_dir / "tokenizer"
    if ctx.config.model.path or not (directory / "tokenizer.json").exists():
        vocab = int(ctx.config.data.tokenizer_vocab_size)
        return common.policy_model_config(ctx.config, vocab, eos_token_id=0, pad_token_id=0)
    return model_config(ctx.config, driver.load_tokenizer(directory))


def sft_phase(source: str) -> tuple[Callable[[Context], Any], Callable[[Context], Any]]:
    """SFT (`objective.name="sft"`, `pipeline.sft_overrides`) from the initial policy on
    the demonstrations (`source="demo"`) or on the pairs' chosen completions (`"chosen"`,
    Preferred-FT): the completion tokens are the targets with `sft.completion_only`, else
    every token after the first."""

    def sft_config(ctx: Context) -> ml_collections.ConfigDict:
        return phases.train_config(ctx.config, ctx, **pipeline.sft_overrides(ctx.config.sft))

    def batches(ctx: Context, config: Any, prompts: list, completions: list, pad_id: int):
        seqs = [p + x for p, x in zip(prompts, completions, strict=True)]
        starts = [len(p) if ctx.config.sft.completion_only else 1 for p in prompts]
        return pipeline.SFTBatches(
            seqs, starts, config.batch_size, row_length(ctx.config), pad_id, config.seed
        )

    def run(ctx: Context) -> Any:
        task = load(ctx)
        config = sft_config(ctx)
        t = task.tokens
        prompts, completions = (
            (t["demo_prompt"], t["demo_completion"]) if source == "demo" else (t["prompt"], t["chosen"])
        )  # fmt: skip
        params = driver.initial_params(ctx.config, task.cfg)
        return phases.train_phase(
            config, train_data=batches(ctx, config, prompts, completions, task.pad_id),
            model_config=task.cfg, params=params,
        )  # fmt: skip

    def dry(ctx: Context) -> Any:
        config = sft_config(ctx)
        cfg = _dry_model_config(ctx)
        b = config.batch_size
        return phases.train_phase(
            config, train_data=batches(ctx, config, [[0]] * b, [[0]] * b, 0),
            model_config=cfg, params=driver.abstract_params(cfg), dry_run=True,
        ).lowered  # fmt: skip

    return run, dry


def reference_phase(ctx: Context) -> None:
    """Log-probs of every pair under the reference policy, computed once (the DPO paper's
    reference never changes during training)."""
    task = load(ctx)
    t = task.tokens
    scorer = pipeline.Scorer(
        models.Transformer(task.cfg), rows=ctx.config.eval.batch_size,
        length=row_length(ctx.config), pad_id=task.pad_id,
    )  # fmt: skip
    ref = driver.trained_params(ctx, ctx.config.reference_policy)
    pairs = pipeline.pair_data(scorer, ref, t["prompt"], t["chosen"], t["rejected"])
    if ctx.is_main:
        driver.write_json(ctx.dir / "ref_logps.json",
                    dict(chosen=pairs.ref_chosen.tolist(), rejected=pairs.ref_rejected.tolist()))  # fmt: skip


def _pair_batches(config: Any, ctx: Context, pairs: pipeline.PairData, pad_id: int):
    return pipeline.pair_batches(
        pairs, config.batch_size // config.grad_accum_steps, row_length(ctx.config), pad_id,
        config.seed, num_positions=ctx.config.data.max_completion_length,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip


def _dummy_pairs(config: Any) -> pipeline.PairData:
    b = config.batch_size // config.grad_accum_steps
    return pipeline.PairData([[0]] * b, [[0]] * b, [[0]] * b, np.zeros(b), np.zeros(b))


def pair_training_phase(
    objective: str,
) -> tuple[Callable[[Context], Any], Callable[[Context], Any]]:
    """DPO (`"preference"`: the config's loss on the pairs with the reference log-probs)
    or the reward model (`"reward_model"`), from the reference policy."""

    def pair_config(ctx: Context) -> ml_collections.ConfigDict:
        if objective == "preference":
            return phases.train_config(ctx.config, ctx, **{"reference.mode": "precomputed"})
        rm = ctx.config.reward_model
        return phases.train_config(ctx.config, ctx, **{
            "objective.name": "reward_model", "num_steps": rm.num_steps,
            "batch_size": rm.batch_size, "seed": ctx.config.seed + 1,
            "optim.learning_rate": rm.learning_rate, "optim.warmup_steps": 0,
            "optim.schedule": "constant",
        }, **driver.reward_model_overrides(rm))  # fmt: skip

    def run(ctx: Context) -> Any:
        task = load(ctx)
        config = pair_config(ctx)
        t = task.tokens
        if objective == "preference":
            ref = driver.read_json(ctx.input("reference") / "ref_logps.json")
            ref_c, ref_r = np.asarray(ref["chosen"]), np.asarray(ref["rejected"])
        else:  # the reward model reads no reference
            ref_c = ref_r = np.zeros(len(t["prompt"]))
        pairs = pipeline.PairData(t["prompt"], t["chosen"], t["rejected"], ref_c, ref_r)
        params = driver.trained_params(ctx, ctx.config.reference_policy)
        if objective == "reward_model":
            return driver.reward_model_run(
                ctx, config, pairs, cfg=task.cfg, params=params, length=row_length(ctx.config),
                train_batches=lambda p: _pair_batches(config, ctx, p, task.pad_id),
                pad_id=task.pad_id,
            )  # fmt: skip
        return phases.train_phase(
            config, train_data=_pair_batches(config, ctx, pairs, task.pad_id),
            model_config=task.cfg, params=params,
        )  # fmt: skip

    def dry(ctx: Context) -> Any:
        config = pair_config(ctx)
        cfg = _dry_model_config(ctx)
        data_it = _pair_batches(config, ctx, _dummy_pairs(config), 0)
        return phases.train_phase(
            config,
            train_data=data_it,
            model_config=cfg,
            params=driver.abstract_params(cfg),
            dry_run=True,
        ).lowered

    return run, dry


def rollout_config(
    config: ml_collections.ConfigDict, objective: str, ctx: Context | None = None
) -> ml_collections.ConfigDict:
    """The `dpo-jax train` config of on-policy method `objective` (`phases.train_config`
    with `ctx`; without one a copy, to check its settings): the run's `online.*` with the
    method's `method_defaults` over them, a seed of its own (its own stream of rollouts,
    apart from DPO's and the reward model's), its rollouts' updates as num_steps."""
    from dpo_jax import online

    overrides = {"objective.name": objective, "seed": config.seed + ROLLOUT_SEEDS[objective]}
    if ctx is not None:
        out = phases.train_config(config, ctx, **overrides)
    else:
        out = config.copy_and_resolve_references()
        out.objective.name, out.seed = objective, overrides["seed"]
    for key, value in config.get("method_defaults", {}).get(objective, {}).items():
        out.online[key] = value
    out.num_steps = online.METHODS[objective].settings(out).num_steps
    return out


# Seed offsets of the on-policy phases' runs (PPO's predates online DPO).
ROLLOUT_SEEDS = {"ppo": 2, "online_dpo": 3}


def rollout_phase(objective: str) -> tuple[Callable[[Context], Any], Callable[[Context], Any]]:
    """An on-policy method from the reference policy, which is also its frozen reference,
    on the training comparisons' prompts, scored by the learned reward model (phase
    `reward_model`, `reward_sources.reward_from_ids`): PPO (`objective="ppo"`,
    `dpo_jax.ppo_loop`, Ziegler et al.'s KL penalty and controller) or online DPO
    (`"online_dpo"`, `dpo_jax.online_dpo`: the best and worst of each prompt's samples as
    a pair, the DPO run's loss and beta)."""
    from dpo_jax import reward_sources

    def run(ctx: Context) -> Any:
        task = load(ctx)
        reward = reward_sources.reward_from_ids(
            driver.learned_reward(ctx, task.cfg, task.tokenizer)
        )
        return phases.train_phase(
            rollout_config(ctx.config, objective, ctx), train_data=task.tokens["prompt"],
            reward=reward, model_config=task.cfg,
            params=driver.trained_params(ctx, ctx.config.reference_policy),
        )  # fmt: skip

    def dry(ctx: Context) -> Any:
        cfg = _dry_model_config(ctx)
        longest = [[0] * int(ctx.config.data.max_prompt_length)]  # the widest prompt bucket
        return phases.train_phase(
            rollout_config(ctx.config, objective, ctx), train_data=longest,
            reward=lambda samples: None, model_config=cfg, params=driver.abstract_params(cfg), dry_run=True,
        ).lowered  # fmt: skip

    return run, dry


def ppo_phase() -> tuple[Callable[[Context], Any], Callable[[Context], Any]]:
    """PPO (`objective.name="ppo"`, `dpo_jax.ppo_loop`): `rollout_phase("ppo")`."""
    return rollout_phase("ppo")
