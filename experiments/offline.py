"""Offline preference experiments as in the DPO paper (§6.2): TL;DR summarization and
Anthropic HH single-turn dialogue, as phase graphs on the one Trainer.

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

Phases (``experiments.phases``; each writes ``workdir/<phase>/`` and a ``DONE`` marker,
a rerun skips finished phases and resumes a training phase from its checkpoint):
``data`` -> ``tokenizer`` -> the training phases (``sft``, ``preferred_ft``, ``reference``
log-probs, ``dpo``, ``reward_model``, ``ppo``, ``online_dpo``, as the methods need) -> ``eval_<method>``
(samples at every temperature, judged) -> ``report`` (``results.csv`` and ``win_rate.png``
from the eval phases' outputs). ``--dry_run`` lowers each training phase's program with
abstract params (`train(..., dry_run=True)`) and prints its per-device memory.

Training seeds (``config.seeds``, `common.seed_runs`): the whole graph once per seed in
``workdir/seed_<s>/`` (the data, fixed by ``data_seed``, is the same for every seed),
then ``summary.csv`` (each method's win rate per temperature: mean, std and 95% CI over
the seeds, with their count) and ``win_rate.png`` (means with +-1 std bars) in
``workdir``.

Judges (``config.judge``, :func:`resolve_judge`): the task's lexical fixture judge
(miniatures), a reward function, or an LLM judge with the paper's appendix C.2 prompt
(``dpo_jax.judge``), which randomises the answer order per comparison and counts the
replies it cannot parse (``unparseable``; left out of the win rate).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from dpo_jax import checkpoint, configs, data, evaluation, models, objectives, paths
from dpo_jax import errors as dpo_errors
from dpo_jax.configs import validate
from dpo_jax.data.formats import SFT_FORMATS
from dpo_jax.data.tokenize import settings_from_spec, tokenize_examples
from experiments import common, phases, pipeline
from experiments.phases import Context, Phase

OFFLINE_RESULT_COLUMNS = (
    "method", "temperature", "win_rate", "win_rate_stderr", "wins", "ties", "losses",
    "unparseable", "num_prompts",
)  # fmt: skip
PAPER_TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0)


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
    c.reward_model = ml_collections.ConfigDict(
        dict(num_steps=400, batch_size=32, learning_rate=1e-4)
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
    c.reward_model.update(num_steps=4, batch_size=8)
    c.best_of_n.n = 2
    c.online.update(num_rollouts=2, rollout_batch_size=8, max_new_tokens=12)
    c.method_defaults.online_dpo.num_rollouts = 2
    c.ppo.num_epochs = 2
    c.eval.update(batch_size=16, max_new_tokens=12, temperatures=(0.0, 1.0))
    c.train.progress = False


def row_length(config: ml_collections.ConfigDict) -> int:
    """Length of every training row (prompt + completion) and sampling row: fixed by the
    config, so the dry run compiles the run's shapes."""
    d = config.data
    return d.max_prompt_length + max(d.max_completion_length, config.eval.max_new_tokens)


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


# ---------------------------------------------------------------- data and the model


def _write_json(path: epath.Path, value: Any) -> None:
    paths.write_atomic(path, json.dumps(value))


def _read_json(path: epath.Path) -> Any:
    return json.loads(path.read_text())


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
            _write_json(ctx.dir / "paths.json", files)

    return run


def tokenizer_phase(task: Task) -> Callable[[Context], None]:
    """The tokenizer (the configured one, or a BPE trained on the training texts) and
    every split tokenized: pairs, demonstrations, test prompts with their references."""

    def run(ctx: Context) -> None:
        config, d = ctx.config, ctx.config.data
        files = _read_json(ctx.input("data") / "paths.json")
        load = lambda role, fmt: data.load_examples(  # noqa: E731
            dict(d, path=files[role], format=fmt, sft=fmt in SFT_FORMATS), None, data.RejectLog()
        )
        comparisons = load("train", d.format)
        demos = load("sft", "tldr_sft") if "sft" in files else []
        test = load("test", task.test_format)
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
            _write_json(ctx.dir / "tokens.json", tokens)
        print(f"{len(tokens['prompt'])} train pairs, {len(tokens.get('demo_prompt', []))} "
              f"demonstrations, {len(test)} test prompts, vocabulary {len(tok)}")  # fmt: skip

    return run


def model_config(
    config: ml_collections.ConfigDict, vocab_size: int, eos_id: int, pad_id: int
) -> models.ModelConfig:
    """The policy's ModelConfig (`common.policy_model_config`) with the tokenizer's EOS
    and padding ids."""
    return common.policy_model_config(config, vocab_size, eos_token_id=eos_id, pad_token_id=pad_id)


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
    from transformers import AutoTokenizer

    directory = ctx.input("tokenizer")
    with paths.local_copy(directory) as local:
        tok = AutoTokenizer.from_pretrained(local, local_files_only=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cfg = model_config(ctx.config, len(tok), tok.eos_token_id, pad)
    return Loaded(ctx.config, tok, _read_json(directory / "tokens.json"), cfg)


def initial_params(config: ml_collections.ConfigDict, cfg: models.ModelConfig) -> Any:
    """The initial policy: `model.path`'s weights (as `model_config` reads its shape) or
    a seeded fresh init."""
    m = config.model
    if m.path:
        kw = dict(scan_layers=m.scan_layers) | ({"remat": m.remat} if m.remat else {})
        return models.load_hf(m.path, m.dtype, m.param_dtype, **kw)[1]
    return models.init_params(cfg, jax.random.key(config.seed))


def trained_params(ctx: Context, phase: str) -> Any:
    """The final params of training phase `phase` (its last checkpoint)."""
    return checkpoint.load_params(ctx.input(phase))[2]


# ------------------------------------------------------------------ training phases


def _abstract(cfg: models.ModelConfig) -> Any:
    import flax.linen as nn

    return nn.meta.unbox(models.abstract_params(cfg))


def _dry_model_config(ctx: Context) -> models.ModelConfig:
    """The policy's ModelConfig without running the data phases: `model.path`'s shape, or
    the from-scratch shape for the run directory's tokenizer if there is one, else for
    `data.tokenizer_vocab_size` (a BPE trained on enough text has that many tokens; its
    one special token, id 0, is EOS and padding)."""
    from transformers import AutoTokenizer

    directory = ctx.run_dir / "tokenizer"
    if ctx.config.model.path or not (directory / "tokenizer.json").exists():
        return model_config(ctx.config, int(ctx.config.data.tokenizer_vocab_size), 0, 0)
    with paths.local_copy(directory) as local:
        tok = AutoTokenizer.from_pretrained(local, local_files_only=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model_config(ctx.config, len(tok), tok.eos_token_id, pad)


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
        params = initial_params(ctx.config, task.cfg)
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
            model_config=cfg, params=_abstract(cfg), dry_run=True,
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
    ref = trained_params(ctx, ctx.config.reference_policy)
    pairs = pipeline.pair_data(scorer, ref, t["prompt"], t["chosen"], t["rejected"])
    if ctx.is_main:
        _write_json(ctx.dir / "ref_logps.json",
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
        })  # fmt: skip

    def run(ctx: Context) -> Any:
        task = load(ctx)
        config = pair_config(ctx)
        t = task.tokens
        if objective == "preference":
            ref = _read_json(ctx.input("reference") / "ref_logps.json")
            ref_c, ref_r = np.asarray(ref["chosen"]), np.asarray(ref["rejected"])
        else:  # the reward model reads no reference
            ref_c = ref_r = np.zeros(len(t["prompt"]))
        pairs = pipeline.PairData(t["prompt"], t["chosen"], t["rejected"], ref_c, ref_r)
        params = trained_params(ctx, ctx.config.reference_policy)
        return phases.train_phase(
            config, train_data=_pair_batches(config, ctx, pairs, task.pad_id),
            model_config=task.cfg, params=params,
        )  # fmt: skip

    def dry(ctx: Context) -> Any:
        config = pair_config(ctx)
        cfg = _dry_model_config(ctx)
        data_it = _pair_batches(config, ctx, _dummy_pairs(config), 0)
        return phases.train_phase(
            config, train_data=data_it, model_config=cfg, params=_abstract(cfg), dry_run=True
        ).lowered

    return run, dry


def learned_reward(ctx: Context, task: Loaded) -> Any:
    """The reward model of phase `reward_model` (prompt + completion ids -> score)."""
    from dpo_jax import reward_model

    params = trained_params(ctx, "reward_model")
    return reward_model.LearnedReward(task.cfg, params, task.tokenizer, ctx.config.eval.batch_size)


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
        reward = reward_sources.reward_from_ids(learned_reward(ctx, task))
        return phases.train_phase(
            rollout_config(ctx.config, objective, ctx), train_data=task.tokens["prompt"],
            reward=reward, model_config=task.cfg,
            params=trained_params(ctx, ctx.config.reference_policy),
        )  # fmt: skip

    def dry(ctx: Context) -> Any:
        cfg = _dry_model_config(ctx)
        longest = [[0] * int(ctx.config.data.max_prompt_length)]  # the widest prompt bucket
        return phases.train_phase(
            rollout_config(ctx.config, objective, ctx), train_data=longest,
            reward=lambda samples: None, model_config=cfg, params=_abstract(cfg), dry_run=True,
        ).lowered  # fmt: skip

    return run, dry


def ppo_phase() -> tuple[Callable[[Context], Any], Callable[[Context], Any]]:
    """PPO (`objective.name="ppo"`, `dpo_jax.ppo_loop`): `rollout_phase("ppo")`."""
    return rollout_phase("ppo")


# ----------------------------------------------------------------------- evaluation

# A policy samples one completion per test prompt: (temperature, key) -> token ids.
Policy = Callable[[float, jax.Array], list[list[int]]]


def _sampling_policy(method: str, part: str | None = None) -> Callable[[Context, Loaded], Policy]:
    """Samples from training phase `method`'s params (their `part`: PPO's state also holds
    its value head)."""

    def build(ctx: Context, task: Loaded) -> Policy:
        params = trained_params(ctx, method)
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
    base = trained_params(ctx, c.reference_policy)
    reward = learned_reward(ctx, task)
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
            _write_json(ctx.dir / "rows.json", rows)
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
        "reward_model": ("reward_model", "mesh", "seed"),
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
        rows = [r for name in evals for r in _read_json(ctx.run_dir / name / "rows.json")]
        samples = "".join((ctx.run_dir / name / "samples.jsonl").read_text() for name in evals)
        if ctx.is_main:
            common.write_csv(ctx.run_dir / "results.csv", rows, OFFLINE_RESULT_COLUMNS)
            paths.write_atomic(ctx.run_dir / "samples.jsonl", samples)
            plot_win_rates(rows, ctx.run_dir / "win_rate.png",
                           f"{task.name} ({config.preset})", task.reference_label)  # fmt: skip
        print(common.format_table(rows, OFFLINE_RESULT_COLUMNS))
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


def run_offline(config: ml_collections.ConfigDict, task: Task) -> epath.Path:
    """Run (or resume) the experiment, once per training seed of `config.seeds` (each in
    run_dir/seed_<s>, then summary.csv and win_rate.png over seeds in run_dir); returns
    the run directory."""
    configs.migrate_deprecated(config)  # keys set under an old name (ppo.reward, ...)
    validate.validate(config)  # a bad key fails before any phase starts
    build_phases(config, task)  # and a bad method or setting before the run directory
    run_dir = common.make_run_dir(config, task.name)
    print(f"run directory: {run_dir}")
    common.run_seeds(
        config,
        run_dir,
        lambda one, seed_dir: phases.run_phases(build_phases(one, task), one, seed_dir),
        lambda seed_dirs: write_seed_summary(config, task, run_dir, seed_dirs),
    )
    return run_dir


def dry_run(config: ml_collections.ConfigDict, task: Task) -> dict[str, Any]:
    """`--dry_run`: each training phase's program, compiled with abstract params on
    `dry_run_devices` simulated devices; prints its per-device memory."""
    from experiments import dry_run as dry

    dry.ensure_cpu_devices(int(config.dry_run_devices))
    configs.migrate_deprecated(config)
    validate.validate(config)
    print(f"dry run: {config.model.path or 'from scratch'}, {len(jax.devices())} "
          f"{jax.devices()[0].platform} devices")  # fmt: skip
    return phases.dry_run_phases(build_phases(config, task), config, config.workdir)


def offline_main(
    argv: Sequence[str], task: Task, get_config: Callable[[str], Any], presets: Sequence[str]
) -> int:
    """`python -m experiments.{tldr,hh}`: the run, or with --dry_run the per-phase dry run."""
    args = common.parse_args(get_config, argv, presets, task.name)
    if args.dry_run:
        dry_run(args.config, task)
        return 0
    try:
        run_offline(args.config, task)
    except phases.Preempted as stop:
        print(stop, file=sys.stderr)
        return 143  # 128 + SIGTERM, as if the signal had ended the process
    return 0
