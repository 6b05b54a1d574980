"""Offline preference experiments as in the DPO paper (§6.2): TL;DR summarization and
Anthropic HH single-turn dialogue.

A fixed preference dataset in an upstream format trains every method from one policy
initialisation; each method then samples one completion per test prompt at every
temperature of ``eval.temperatures`` (the paper's 0, 0.25, 0.5, 0.75, 1) and a judge
compares it with the test prompt's *reference* completion, which the task defines:
the human-written summary of the TL;DR SFT split, the chosen response of the HH test
split. ``results.csv`` has one row per (method, temperature).

Methods (``config.methods``, in :data:`METHODS`; a new one is one entry):

- ``sft``: SFT on the task's human demonstrations (TL;DR: the reference summaries of
  the SFT split's training posts).
- ``preferred_ft``: SFT on the chosen completions of the preference data (the paper's
  Preferred-FT; for HH, which has no SFT data, also the paper's reference model).
- ``dpo``: ``config.loss`` at ``config.beta`` on the pairs, from and against the
  ``config.reference`` method's policy, reference log-probs computed once.
- ``best_of_n``: ``best_of_n.n`` samples from the reference policy per prompt, the one a
  Bradley-Terry reward model learned on the same pairs scores highest (``dpo_jax.
  reward_model``). At temperature 0 all n samples are the same greedy one, so it is
  evaluated only at temperatures > 0.

Judges (``config.judge``, :func:`resolve_judge`): the task's lexical fixture judge
(miniatures), a reward function, or an LLM judge with the paper's appendix C.2 prompt
(``dpo_jax.judge``), which randomises the answer order per comparison and counts the
replies it cannot parse (``unparseable``; left out of the win rate).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import data, evaluation, models
from dpo_jax import errors as dpo_errors
from dpo_jax.data.formats import SFT_FORMATS
from dpo_jax.data.tokenize import settings_from_spec, tokenize_examples
from experiments import common, pipeline

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
    write_fixture: Callable[[Path, Any], dict[str, Path]]
    test_format: str
    reference: str  # "completion" (a demonstration's) or "chosen" (a pair's)
    fixture_judge: Callable[[], Any]
    judge_template: str  # a dpo_jax.judge.TEMPLATES name
    reference_label: str  # how figures and tables name the reference


def offline_config(fmt: str) -> Any:
    """The fields TL;DR and HH share (each module fills in its own values and presets)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.preset = "mini"
    c.seed = 0
    c.workdir = ""
    c.progress = True
    c.data = ml_collections.ConfigDict(dict(
        format=fmt, train_path="", test_path="", sft_path="",  # empty: write the fixture
        num_sft=1200, num_train=1200, num_test=128, max_prompt_length=64,
        max_completion_length=24, tokenizer_dir="", tokenizer_vocab_size=768,
    ))  # fmt: skip
    c.model = ml_collections.ConfigDict(dict(
        model_dir="", hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=96,
        dtype="float32", param_dtype="float32", remat="none", scan_layers=False,
    ))  # fmt: skip
    c.methods = ("sft", "preferred_ft", "dpo")
    c.reference = "sft"  # the policy DPO starts from and is regularised to; Best-of-N's base
    # SFT and Preferred-FT (AdamW, cosine). completion_only: loss on completions only.
    c.sft = ml_collections.ConfigDict(dict(
        steps=300, batch_size=32, learning_rate=2e-3, warmup_steps=30, max_len=88,
        completion_only=False,
    ))  # fmt: skip
    c.loss = "sigmoid"
    c.beta = 0.1
    c.train = ml_collections.ConfigDict(dict(
        steps=150, batch_size=32, optimizer="adamw", learning_rate=3e-5, warmup_steps=10,
        schedule="constant", max_grad_norm=10.0, eval_every=50, mesh=(-1, 1, 1), micro_batches=1,
    ))  # fmt: skip
    # Best-of-N: n samples per prompt from the reference policy, a reward model learned on
    # the pairs picks one. The paper's n is 128; rows = eval.batch_size must divide by n.
    c.best_of_n = ml_collections.ConfigDict(dict(n=4))
    c.reward_model = ml_collections.ConfigDict(dict(steps=150, batch_size=32, learning_rate=1e-4))
    c.eval = ml_collections.ConfigDict(
        dict(max_new_tokens=24, temperatures=PAPER_TEMPERATURES, batch_size=128, seed=4321)
    )
    # "fixture" (the task's own), "reward:vader", "hf:DIR" (a classifier reward),
    # "python:MOD:FN" (FN() builds a pairwise judge), "llm:hf:DIR" (a local causal LM with
    # the paper's C.2 prompt), "llm:python:MOD:FN" (FN(prompt_text) -> reply_text, an API).
    c.judge = "fixture"
    c.llm_judge = ml_collections.ConfigDict(dict(max_new_tokens=64, rows=8, dtype="float32"))
    c.dry_run_devices = 8
    return c


def shrink_to_smoke(c: Any) -> None:
    """The `smoke` preset of an offline experiment: the same pipeline in seconds."""
    c.data.update(num_sft=96, num_train=96, num_test=16, tokenizer_vocab_size=384)
    c.model.update(hidden_size=32, num_layers=1, num_heads=2)
    c.sft.update(steps=20, batch_size=16)
    c.train.update(steps=4, batch_size=8, eval_every=2)
    c.reward_model.update(steps=4, batch_size=8)
    c.best_of_n.n = 2
    c.eval.update(batch_size=16, max_new_tokens=12, temperatures=(0.0, 1.0))
    c.progress = False


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
    `offline_config`). LLM judges use the task's C.2 template, seeded by `config.seed`."""
    import importlib

    from dpo_jax import judge, rewards

    def python_object(path: str) -> Any:
        module, _, function = path.partition(":")
        if not function:
            raise dpo_errors.config_error("judge", f"{spec!r} needs MODULE:FUNCTION", "")
        return getattr(importlib.import_module(module), function)

    if spec == "fixture":
        return task.fixture_judge()
    if spec == "reward:vader":
        return evaluation.reward_judge(rewards.VaderReward())
    if spec.startswith("hf:"):
        return evaluation.reward_judge(rewards.HFClassifierReward(spec[3:], label=1))
    if spec.startswith("python:"):
        return python_object(spec[len("python:") :])()
    if spec.startswith("llm:"):
        lj = config.llm_judge
        kind, _, target = spec[len("llm:") :].partition(":")
        if kind == "hf":
            complete = judge.hf_completer(
                target, max_new_tokens=lj.max_new_tokens, rows=lj.rows, dtype=lj.dtype
            )
        elif kind == "python":
            complete = judge.callable_completer(python_object(target))
        else:
            complete = None
        if complete is not None:
            return judge.LLMJudge(complete, task.judge_template, seed=config.seed)
    raise dpo_errors.config_error(
        "judge",
        f"{spec!r} is not a judge",
        "use fixture, reward:vader, hf:DIR, python:MOD:FN, llm:hf:DIR or llm:python:MOD:FN",
    )


# ------------------------------------------------------------------------- the run


class Run:
    """One experiment's data, model and trained policies (each trained once, on demand)."""

    def __init__(self, config: Any, task: Task, run_dir: Path) -> None:
        self.config, self.task, self.run_dir = config, task, run_dir
        d = config.data
        if d.train_path:
            paths = {"train": Path(d.train_path), "test": Path(d.test_path)}
            if d.sft_path:
                paths["sft"] = Path(d.sft_path)
        else:
            paths = task.write_fixture(run_dir / "data", config)
        self.paths = paths
        spec = dict(
            max_prompt_length=d.max_prompt_length, max_completion_length=d.max_completion_length,
            cache_dir="",
        )  # fmt: skip
        self.spec = spec
        comparisons = data.load_examples(
            dict(spec, path=str(paths["train"]), format=d.format), None, data.RejectLog()
        )
        demos = (
            data.load_examples(dict(spec, path=str(paths["sft"]), format="auto", sft=True),
                               None, data.RejectLog())
            if "sft" in paths else []
        )  # fmt: skip
        self.tokenizer = self._tokenizer(comparisons, demos)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_id = tok.eos_token_id
        settings = settings_from_spec(spec)
        self.pairs = pairs = tokenize_examples(comparisons, tok, settings)
        items = [pairs[i] for i in range(len(pairs))]
        self.prompts = [it["prompt"].tolist() for it in items]
        self.chosen = [it["chosen"].tolist() for it in items]
        self.rejected = [it["rejected"].tolist() for it in items]
        self.demos: tuple[list[list[int]], list[list[int]]] = ([], [])
        if demos:
            sft = tokenize_examples(demos, tok, settings)
            self.demos = (
                [sft[i]["prompt"].tolist() for i in range(len(sft))],
                [sft[i]["completion"].tolist() for i in range(len(sft))],
            )
        test_spec = dict(spec, path=str(paths["test"]), format=task.test_format,
                         sft=task.test_format in SFT_FORMATS)  # fmt: skip
        test = data.load_examples(test_spec, None, data.RejectLog())
        # The evaluation set: the test prompts and the references the win rate is against.
        self.test_prompt_texts = [e.prompt for e in test]
        self.reference_texts = [getattr(e, task.reference) for e in test]
        self.test_prompts = [
            tok(p, add_special_tokens=False)["input_ids"][-d.max_prompt_length :]
            for p in self.test_prompt_texts
        ]
        seqs = [p + c for p, c in zip(self.prompts, self.chosen, strict=True)]
        seqs += [p + r for p, r in zip(self.prompts, self.rejected, strict=True)]
        seqs += [p + c for p, c in zip(*self.demos, strict=True)]
        self.row_length = max(
            max(len(s) for s in seqs),
            max(len(p) for p in self.test_prompts) + config.eval.max_new_tokens,
        )
        self.model_cfg, self.init_params = self._model()
        self.model = models.Transformer(self.model_cfg)
        print(f"policy: {models.param_count(self.model_cfg) / 1e6:.2f}M parameters; "
              f"{len(self.prompts)} train pairs, {len(self.demos[0])} demonstrations, "
              f"{len(self.test_prompts)} test prompts; row length {self.row_length}")  # fmt: skip

    def _tokenizer(self, comparisons: list, demos: list) -> Any:
        d = self.config.data
        if d.tokenizer_dir:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(d.tokenizer_dir, local_files_only=True)
        # A BPE trained on the training texts (the fixture's own vocabulary).
        texts = [e.prompt + e.chosen for e in comparisons] + [e.rejected for e in comparisons]
        texts += [e.prompt + e.completion for e in demos]
        vocab = d.tokenizer_vocab_size
        return common.train_bpe_tokenizer(texts, vocab, self.run_dir / "tokenizer")

    def _model(self) -> tuple[Any, Any]:
        m = self.config.model
        if m.model_dir:
            return models.load_hf(
                m.model_dir, m.dtype, m.param_dtype, remat=m.remat, scan_layers=m.scan_layers
            )
        cfg = models.ModelConfig.for_family(
            "gpt2", vocab_size=len(self.tokenizer), hidden_size=m.hidden_size,
            num_layers=m.num_layers, num_heads=m.num_heads,
            max_position_embeddings=m.max_position_embeddings, dtype=m.dtype,
            param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id,
        )  # fmt: skip
        return cfg, models.init_params(cfg, jax.random.key(self.config.seed))

    @functools.cache  # noqa: B019 - one Run per experiment; each policy is trained once
    def params(self, method: str) -> Any:
        """The trained parameters of a parametric method (see PARAM_METHODS)."""
        if method not in PARAM_METHODS:
            raise dpo_errors.config_error(
                "reference", f"{method!r} has no parameters", f"use one of {sorted(PARAM_METHODS)}"
            )
        return PARAM_METHODS[method](self)

    def sample(self, params: Any, temperature: float, key: jax.Array, n: int = 1):
        """n completions per test prompt (row i*n+j = sample j of prompt i) and their
        log-probs, at a fixed number of rows per sampler call."""
        c = self.config.eval
        return pipeline.sample(
            self.model, params, self.test_prompts, key, n=n, max_new_tokens=c.max_new_tokens,
            temperature=temperature, rows=c.batch_size, eos_id=self.eos_id, pad_id=self.pad_id,
        )  # fmt: skip

    def train(
        self, name: str, objective: str, batches: Any, steps: int, batch_size: int,
        optim: Mapping[str, Any], params: Any, **loss: Any,
    ) -> Any:  # fmt: skip
        """One training run on the one Trainer (`dpo_jax.train.train`) from `params`;
        metrics under `run_dir/<name>/`. Returns the trained params."""
        from dpo_jax import train as trainer
        from dpo_jax.configs import default

        c = self.config
        t = default.get_config()
        t.objective.name = objective
        t.run_dir, t.seed = str(self.run_dir / name), c.seed
        t.batch_size, t.num_steps = batch_size, steps
        t.model.update(dtype=c.model.dtype, param_dtype=c.model.param_dtype)
        t.mesh.data, t.mesh.fsdp, t.mesh.tensor = c.train.mesh
        t.optim.update(**optim)
        t.train.update(log_every=25, progress=c.progress, tensorboard=False, token_metrics=False)
        if "loss_name" in loss:
            t.loss.name, t.loss.hyper.beta = loss["loss_name"], loss["beta"]
            t.reference.mode = "frozen"  # the initial policy, frozen
        # The step donates its params: train a copy (the caller's policy stays valid).
        params = jax.tree.map(jnp.copy, params)
        return trainer.train(t, train_data=batches, model=(self.model_cfg, params)).state.params

    def train_sft(self, prompts: list[list[int]], completions: list[list[int]], name: str) -> Any:
        """SFT (token NLL) from the initial policy on (prompt, completion) token lists: the
        completion tokens are the targets (`sft.completion_only`), else every token."""
        c = self.config
        if not c.sft.completion_only:  # language modelling on prompt + completion
            seqs = [p + x for p, x in zip(prompts, completions, strict=True)]
            prompts, completions = [q[:1] for q in seqs], [q[1:] for q in seqs]
        dataset = data.sequence_dataset(prompts, completions, c.sft.max_len)
        batches = data.make_train_iterator(
            dataset, c.sft.batch_size, buckets=(c.sft.max_len,), seed=c.seed, pad_id=self.pad_id
        )
        optim = dict(learning_rate=c.sft.learning_rate, warmup_steps=c.sft.warmup_steps,
                     schedule="cosine", weight_decay=0.01, max_grad_norm=1.0)  # fmt: skip
        return self.train(
            name, "sft", batches, c.sft.steps, c.sft.batch_size, optim, self.init_params
        )

    def pair_batches(self, batch_size: int, seed: int) -> Any:
        """Shuffled micro-batches of the preference pairs, one row length."""
        return data.make_train_iterator(
            self.pairs, batch_size, buckets=(self.row_length,), seed=seed, pad_id=self.pad_id
        )


def _sft(run: Run) -> Any:
    if not run.demos[0]:
        raise dpo_errors.config_error(
            "methods", f"'sft' needs demonstrations, and {run.task.name} has none",
            "drop 'sft' (HH's reference is 'preferred_ft') or set data.sft_path",
        )  # fmt: skip
    return run.train_sft(*run.demos, "sft")


def _preferred_ft(run: Run) -> Any:
    return run.train_sft(run.prompts, run.chosen, "preferred_ft")


def _dpo(run: Run) -> Any:
    c, tr = run.config, run.config.train
    optim = dict(name=tr.optimizer, learning_rate=tr.learning_rate, warmup_steps=tr.warmup_steps,
                 schedule=tr.schedule, max_grad_norm=tr.max_grad_norm)  # fmt: skip
    return run.train(
        "dpo", "preference", run.pair_batches(tr.batch_size, c.seed), tr.steps, tr.batch_size,
        optim, run.params(c.reference), loss_name=c.loss, beta=c.beta,
    )  # fmt: skip


# Methods whose policy is a set of parameters, by name.
PARAM_METHODS: dict[str, Callable[[Run], Any]] = {
    "sft": _sft,
    "preferred_ft": _preferred_ft,
    "dpo": _dpo,
}

# A policy samples one completion per test prompt: (temperature, key) -> token ids.
Policy = Callable[[float, jax.Array], list[list[int]]]


def _sampling_policy(method: str) -> Callable[[Run], Policy]:
    def build(run: Run) -> Policy:
        params = run.params(method)
        return lambda temperature, key: run.sample(params, temperature, key)[0]

    return build


def learned_reward(run: Run) -> Any:
    """A Bradley-Terry reward model trained on the pairs by the Trainer
    (`objective.name="reward_model"`) from the reference policy, as a scorer of token-id
    sequences (`reward_model.LearnedReward`)."""
    from dpo_jax import reward_model

    c, rm = run.config, run.config.reward_model
    optim = dict(learning_rate=rm.learning_rate, warmup_steps=0, schedule="constant")
    params = run.train(
        "reward_model",
        "reward_model",
        run.pair_batches(rm.batch_size, c.seed + 1),
        rm.steps,
        rm.batch_size,
        optim,
        run.params(c.reference),
    )  # {"model": backbone, "head": {"kernel", "bias"}}
    return reward_model.LearnedReward(run.model_cfg, params, run.tokenizer, c.eval.batch_size)


def best_of_n_policy(run: Run) -> Policy:
    """`best_of_n.n` samples per prompt from the reference policy; the learned reward of
    prompt + completion picks one."""
    n = int(run.config.best_of_n.n)
    if run.config.eval.batch_size % n:
        raise dpo_errors.config_error(
            "best_of_n.n", f"{n} does not divide eval.batch_size={run.config.eval.batch_size}",
            "make eval.batch_size a multiple of n",
        )  # fmt: skip
    base = run.params(run.config.reference)
    reward = learned_reward(run)

    def policy(temperature: float, key: jax.Array) -> list[list[int]]:
        comps, _ = run.sample(base, temperature, key, n=n)
        full = [run.test_prompts[k // n] + c for k, c in enumerate(comps)]
        return pick_best_of_n(comps, reward.score_ids(full), n)

    return policy


def pick_best_of_n(completions: Sequence[Any], rewards_K: Any, n: int) -> list[Any]:
    """Per prompt, the completion with the highest reward among its n consecutive ones
    (the first on ties)."""
    best = np.asarray(rewards_K).reshape(-1, n).argmax(axis=1)
    return [completions[i * n + int(j)] for i, j in enumerate(best)]


# Every evaluable method: name -> (run) -> Policy. Add a method (PPO, say) here.
METHODS: dict[str, Callable[[Run], Policy]] = {
    **{name: _sampling_policy(name) for name in PARAM_METHODS},
    "best_of_n": best_of_n_policy,
}
# Methods that are their reference's greedy output at temperature 0 (not evaluated there).
SAMPLING_ONLY = frozenset({"best_of_n"})


def run_offline(config: Any, task: Task) -> Path:
    """Train every method of `config.methods`, evaluate each at every temperature against
    the task's references, write results.csv / win_rate.png / samples.jsonl."""
    wall0 = time.perf_counter()
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise dpo_errors.config_error(
            "methods", f"unknown method {unknown[0]!r}", f"choose from {sorted(METHODS)}"
        )
    run_dir = common.make_run_dir(config, task.name)
    print(f"run directory: {run_dir}")
    run = Run(config, task, run_dir)
    judge = resolve_judge(config.judge, task, config)
    rows: list[dict[str, Any]] = []
    eval_key = jax.random.key(config.eval.seed)
    with open(run_dir / "samples.jsonl", "w") as samples:
        for method in config.methods:
            policy = METHODS[method](run)
            for k, temperature in enumerate(config.eval.temperatures):
                if temperature == 0 and method in SAMPLING_ONLY:
                    continue
                # The same key for every method at a temperature (common random numbers).
                comps = policy(float(temperature), jax.random.fold_in(eval_key, k))
                texts = pipeline.decode_completions(run.tokenizer, comps)
                row, lines = judge_samples(judge, run, texts)
                rows.append(dict(method=method, temperature=float(temperature), **row))
                for line in lines:
                    samples.write(json.dumps(dict(method=method, temperature=temperature,
                                                  **line)) + "\n")  # fmt: skip
    common.write_csv(run_dir / "results.csv", rows, OFFLINE_RESULT_COLUMNS)
    plot_win_rates(rows, run_dir / "win_rate.png", f"{task.name} ({config.preset})",
                   task.reference_label)  # fmt: skip
    print(common.format_table(rows, OFFLINE_RESULT_COLUMNS))
    print(f"win rate against the {task.reference_label} (judge: {config.judge}); "
          f"took {time.perf_counter() - wall0:.0f} s; results in {run_dir}")  # fmt: skip
    return run_dir


def judge_samples(
    judge: Any, run: Run, texts: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The win rate of `texts` against the run's references (one judgement per pair; an
    LLM judge randomises the order itself), and one samples.jsonl line per pair."""
    from dpo_jax.judge import LLMJudge

    refs, prompts = run.reference_texts, run.test_prompt_texts
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


def plot_win_rates(
    rows: Sequence[Mapping[str, Any]], path: Path, title: str, reference_label: str
) -> None:
    """Win rate (with standard error) against sampling temperature, one line per method."""
    plt = common.agg_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ax.errorbar([r["temperature"] for r in mine], [r["win_rate"] for r in mine],
                    yerr=[r["win_rate_stderr"] for r in mine], marker="o", capsize=3,
                    label=method)  # fmt: skip
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel(f"win rate vs {reference_label}")
    ax.set_ylim(0, 1)
    common.save_figure(fig, ax, title, path)


def offline_main(argv: Sequence[str], task: Task, get_config: Callable[[str], Any],
                 presets: Sequence[str]) -> int:  # fmt: skip
    """`python -m experiments.{tldr,hh}`: the run, or with --dry_run the AOT dry run."""
    args = common.parse_args(get_config, argv, presets)
    c = args.config
    if args.dry_run:
        from experiments import dry_run

        dry_run.run_from_config(
            c, loss_name=c.loss, loss_hyper={"beta": c.beta},
            seq_len=c.data.max_prompt_length + c.data.max_completion_length, reference="precomputed",
        )  # fmt: skip
        return 0
    run_offline(c, task)
    return 0
