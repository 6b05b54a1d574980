"""The controlled-sentiment task's data phases and evaluation (`experiments.sentiment`).

Phases before the methods: ``corpus`` (the texts of three splits) -> ``tokenizer`` (a
BPE trained on the SFT texts, every split tokenized) -> ``sft`` (the SFT policy through
the Trainer) -> ``pairs`` (K samples per prefix labelled by the ground-truth reward) ->
``reference`` (the pairs' log-probs under the SFT policy) -> ``evaluate_sft``. A method
phase reads them through :func:`load_task` and evaluates its policy with
:func:`evaluate` (mean ground-truth reward and KL(pi || pi_sft) of samples of the
held-out prefixes).

Each phase reads the outputs of the phases it comes after (files under the run
directory), never another phase's memory, so a rerun after a kill computes what an
uninterrupted run computes. Params are the Trainer's Orbax checkpoints
(`driver.trained_params`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax import evaluation, models, paths, rewards, train
from experiments import common, driver, phases, pipeline, synthetic_reviews
from experiments.phases import Context


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


def corpus_phase(ctx: Context) -> None:
    """The texts of the three splits."""
    sft, pairs, evals = load_corpus(ctx.config)
    if ctx.is_main:
        driver.write_json(ctx.dir / "texts.json", dict(sft=sft, pairs=pairs, eval=evals))


def tokenizer_phase(ctx: Context) -> None:
    """A BPE trained on the SFT texts (or the configured one), and every split tokenized:
    SFT sequences, BOS + a 2-8 token prefix of each pair / evaluation text."""
    config = ctx.config
    texts = driver.read_json(ctx.input("corpus") / "texts.json")
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
        driver.write_json(ctx.dir / "tokens.json", tokens)


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
    tokenizer = driver.load_tokenizer(ctx.input("tokenizer"))
    cfg = model_config(config, len(tokenizer))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    return Task(
        config=config, tokenizer=tokenizer, model_config=cfg,
        sft_params=sft_params(ctx, cfg),
        tokens=driver.read_json(ctx.input("tokenizer") / "tokens.json"),
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
    """The SFT policy: the configured checkpoint or a fresh GPT-2 shape
    (`driver.initial_params`), fine-tuned on the SFT sequences through the Trainer (its
    checkpoints here are the policy later phases read; sft.num_steps=0 skips it)."""
    config = ctx.config
    tokenizer = driver.load_tokenizer(ctx.input("tokenizer"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cfg = model_config(config, len(tokenizer))
    print(f"SFT model: {models.param_count(cfg) / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    if config.sft.num_steps <= 0:
        return None
    run_config = sft_config(ctx)
    seqs = driver.read_json(ctx.input("tokenizer") / "tokens.json")["sft"]
    return phases.train_phase(
        run_config,
        train_data=sft_batches(ctx, run_config, pad_id, seqs),
        model_config=cfg,
        params=driver.initial_params(config, cfg),
    )


def sft_params(ctx: Context, cfg: models.ModelConfig) -> Any:
    """The SFT policy's params: the `sft` phase's checkpoint, or the initial policy when
    sft.num_steps=0 (no SFT run, so no checkpoint)."""
    if ctx.config.sft.num_steps > 0:
        return driver.trained_params(ctx, "sft")
    return driver.initial_params(ctx.config, cfg)


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
    driver.write_json(ctx.dir / "tokens.json", dict(
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
    t = driver.read_json(ctx.input("pairs") / "tokens.json")
    ref = dict(
        chosen=task.scorer(task.sft_params, t["prompts"], t["chosen"]),
        rejected=task.scorer(task.sft_params, t["prompts"], t["rejected"]),
    )
    if ctx.is_main:
        paths.write_npz(ctx.dir / "ref_logps.npz", ref)


def load_pairs(ctx: Context) -> pipeline.PairData:
    """The labelled pairs with their reference log-probs."""
    t = driver.read_json(ctx.input("pairs") / "tokens.json")
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


def eval_hook(
    ctx: Context, task: Task, label: str, last_step: int | None, policy: Any = None
) -> Any:
    """A method phase's Trainer `eval_hook`: :func:`evaluate` the params (their
    `policy(params)` part: an on-policy run's state also holds a value head); at
    `last_step` also write the samples to the phase's samples.jsonl."""

    def hook(step: int, params: Any) -> dict[str, float]:
        ev = evaluate(task, params if policy is None else policy(params))
        if step == last_step and ctx.is_main:
            write_samples(ctx.dir / "samples.jsonl", label, ev)
        return ev.metrics()

    return hook


def evaluate_sft_phase(ctx: Context) -> None:
    """The SFT policy's evaluation (every method's step 0)."""
    task = load_task(ctx)
    ev = evaluate(task, task.sft_params)
    if ctx.is_main:
        write_samples(ctx.dir / "samples.jsonl", "sft", ev)
        driver.write_json(ctx.dir / "metrics.json", ev.metrics())


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


def abstract_policy(ctx: Context) -> tuple[models.ModelConfig, Any]:
    """The policy's config and abstract params (ShapeDtypeStructs), for dry runs. A
    from-scratch policy's vocabulary is the tokenizer's of an existing run directory,
    else `corpus.tokenizer_vocab_size` (the most a BPE trained on the corpus has: the
    default corpus gives 697 of 768, so dry-run `--config.run_dir` of a run to compile
    its exact program)."""
    tok = ctx.run_dir / "tokenizer" / "tokenizer.json"
    vocab = ctx.config.corpus.tokenizer_vocab_size
    if tok.exists():
        vocab = len(driver.load_tokenizer(tok.parent))
    cfg = model_config(ctx.config, int(vocab))
    return cfg, driver.abstract_params(cfg)


def pair_run_dry(ctx: Context, config: ml_collections.ConfigDict) -> Any:
    """The program of a run on the pairs (`config` its `dpo-jax train` config), lowered
    with abstract params and dummy batches of the run's shapes, for dry runs."""
    model_config, params = abstract_policy(ctx)
    b = config.batch_size // config.grad_accum_steps
    dummy = pipeline.PairData([[0]] * b, [[0]] * b, [[0]] * b, np.zeros(b), np.zeros(b))
    data = method_batches(dummy, config, 0, row_length(ctx.config), ctx.config.pairs.max_new_tokens)
    return phases.train_phase(
        config, train_data=data, model_config=model_config, params=params, dry_run=True
    ).lowered


def learned_reward(ctx: Context, task: Task) -> Any:
    """The reward model of the `reward_model` phase (`driver.learned_reward`)."""
    return driver.learned_reward(ctx, task.model_config, task.tokenizer)


def result_row(method: str, step: int, m: dict[str, Any], final: bool) -> dict[str, Any]:
    """A row of results.csv from an evaluation's `eval/` metrics."""
    return dict(
        method=method, step=step, reward=m["eval/reward"], reward_stderr=m["eval/reward_stderr"],
        kl=m["eval/kl"], kl_stderr=m["eval/kl_stderr"], num_samples=m["eval/num_samples"],
        final=int(final),
    )  # fmt: skip
