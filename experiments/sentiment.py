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
* ``frontier`` - the figure a reviewer asks for on the same miniature task: more DPO
  betas, Preferred-FT seeds, Best-of-N for several N, Unlikelihood at the paper's four
  alphas, IPO, SimPO, cDPO, R-DPO (the `rdpo` loss: length-regularised DPO, Park et al.
  2024; not rDPO, which is the `robust` loss of Chowdhury et al. 2024).
* ``smoke`` - the same pipeline shrunk to seconds, for tests.
* ``imdb_gpt2_large`` - the paper's real setting (TFDS ``imdb_reviews``, prefixes of 2-8
  tokens, ``gpt2-large`` from a local HF directory, the siebert RoBERTa classifier as
  reward, RMSprop lr 1e-6, batch 64). Meant for a TPU slice; ``--dry_run`` builds it with
  abstract shapes and AOT-compiles the train step for the configured mesh.

    python -m experiments.sentiment [--preset=NAME] [--config.key=value ...] [--dry_run]
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax import evaluation, models, rewards
from experiments import common, pipeline, synthetic_reviews

PRESETS = ("default", "frontier", "smoke", "imdb_gpt2_large")

# ---------------------------------------------------------------------------- config


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """The experiment's config; `preset` is one of PRESETS."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    c.workdir = ""  # empty: runs/sentiment/TIMESTAMP
    c.progress = True

    # Data. "synthetic": the seeded grammar; "tfds:imdb_reviews": the paper's data.
    c.data = ml_collections.ConfigDict(
        dict(
            source="synthetic",
            num_reviews=20000,  # SFT corpus (synthetic) / max train reviews (IMDb)
            tokenizer_vocab_size=768,
            tokenizer_dir="",  # a local HF tokenizer dir (real configs); empty = train one
            prefix_min_len=2,  # the paper: prefixes of 2-8 tokens
            prefix_max_len=8,
        )
    )
    # SFT policy: from scratch (model_dir empty) or a local HF checkpoint.
    c.model = ml_collections.ConfigDict(
        dict(
            model_dir="",
            hidden_size=128,
            num_layers=3,
            num_heads=4,
            max_position_embeddings=64,
            dtype="float32",  # compute dtype
            param_dtype="float32",
            remat="none",
            scan_layers=False,
        )
    )
    c.sft = ml_collections.ConfigDict(
        dict(steps=600, batch_size=32, learning_rate=2e-3, warmup_steps=50, max_len=48)
    )
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
    # Each method fine-tunes the SFT policy on the pairs with one loss.
    c.methods = (
        "dpo:beta=0.05",
        "dpo:beta=0.1",
        "dpo:beta=1.0",
        "dpo:beta=5.0",
        "preferred_ft",
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=150,
            batch_size=32,  # pairs per step
            optimizer="adamw",
            learning_rate=1e-4,
            warmup_steps=20,
            schedule="constant",
            max_grad_norm=10.0,
            eval_every=30,
            mesh=(-1, 1, 1),  # (data, fsdp, tensor)
            micro_batches=1,  # gradient accumulation inside the step
        )
    )
    c.dry_run_devices = 8  # simulated CPU devices for --dry_run
    c.eval = ml_collections.ConfigDict(
        dict(num_prefixes=256, max_new_tokens=24, batch_size=256, seed=1234)
    )
    if preset == "frontier":
        c.methods = (
            "dpo:beta=0.02", "dpo:beta=0.05", "dpo:beta=0.1", "dpo:beta=0.3",
            "dpo:beta=1.0", "dpo:beta=5.0",
            "preferred_ft:seed=0", "preferred_ft:seed=1", "preferred_ft:seed=2",
            "best_of_n:n=2", "best_of_n:n=4", "best_of_n:n=16", "best_of_n:n=64",
            "unlikelihood:unlikelihood_alpha=0.05", "unlikelihood:unlikelihood_alpha=0.1",
            "unlikelihood:unlikelihood_alpha=0.5", "unlikelihood:unlikelihood_alpha=1.0",
            "ipo:beta=0.1", "ipo:beta=0.5", "simpo:beta=2.0:simpo_gamma=0.5",
            "cdpo:beta=0.1:label_smoothing=0.2", "rdpo:beta=0.1:rdpo_alpha=0.05",
        )  # fmt: skip
    elif preset == "smoke":
        # Every sampler/scorer call has 64 rows (16 prompts x 4, or 64 prompts x 1), so
        # each compiles once.
        c.data.update(num_reviews=400, tokenizer_vocab_size=384)
        c.model.update(hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=48)
        c.sft.update(steps=30, batch_size=16, max_len=40)
        c.pairs.update(num_prefixes=16, max_new_tokens=8, batch_size=64)
        c.methods = (
            "dpo:beta=0.1", "preferred_ft", "best_of_n:n=4", "unlikelihood:unlikelihood_alpha=1.0",
        )  # fmt: skip
        c.train.update(steps=4, batch_size=8, eval_every=2)
        c.eval.update(num_prefixes=64, max_new_tokens=8, batch_size=64)
        c.progress = False
    elif preset == "imdb_gpt2_large":
        c.data.update(
            source="tfds:imdb_reviews", num_reviews=25000, tokenizer_dir="checkpoints/gpt2-large"
        )
        c.model.update(
            model_dir="checkpoints/gpt2-large", dtype="bfloat16", remat="block", scan_layers=True
        )
        # One SFT epoch over the 25,000 training reviews, as in the paper.
        c.sft.update(steps=25000 // 64, batch_size=64, learning_rate=1e-5, max_len=512)
        c.pairs.update(num_prefixes=25000, max_new_tokens=64, batch_size=512)
        c.reward = "hf:checkpoints/siebert-sentiment-roberta-large-english"
        c.train.update(
            steps=5000, batch_size=64, optimizer="rmsprop", learning_rate=1e-6,
            warmup_steps=150, max_grad_norm=10.0, eval_every=500, mesh=(1, -1, 1), micro_batches=1,
        )  # fmt: skip
        c.eval.update(num_prefixes=1024, max_new_tokens=64, batch_size=512)
    return c


# ---------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """One point (or curve) of the frontier: a loss with hyper-parameters, or best-of-N."""

    kind: str  # "dpo", "preferred_ft", "best_of_n", or any registered loss name
    hyper: tuple[tuple[str, float], ...]
    seed: int = 0

    @property
    def label(self) -> str:
        parts = [self.kind] + [f"{k}={v:g}" for k, v in self.hyper]
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
    def loss_hyper(self) -> dict[str, float]:
        return dict(self.hyper)


def parse_method(spec: str) -> Method:
    """``"dpo:beta=0.1"`` -> Method("dpo", (("beta", 0.1),)). ``seed=`` is not a loss hyper."""
    kind, *assignments = spec.split(":")
    hyper: list[tuple[str, float]] = []
    seed = 0
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"method {spec!r}: expected key=value after ':', got {item!r}")
        key, value = item.split("=", 1)
        try:
            number = float(value)
        except ValueError as err:
            raise ValueError(f"method {spec!r}: {key}={value!r} is not a number") from err
        if key == "seed":
            seed = int(number)
        else:
            hyper.append((key, number))
    if kind == "dpo" and "beta" not in dict(hyper):
        raise ValueError(f"method {spec!r}: dpo needs beta=...")
    if kind == "best_of_n" and "n" not in dict(hyper):
        raise ValueError(f"method {spec!r}: best_of_n needs n=...")
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
    "unlikelihood": "Unlikelihood",
}


def plot_frontier(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> None:
    """Reward (y) against KL(pi || pi_ref) (x): one marker style per method family, every
    evaluation point drawn, as in figure 2 (left) of the DPO paper."""
    plt = common.agg_pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    families: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        kind = str(row["method"]).split(":")[0]
        families.setdefault(FAMILY_NAMES.get(kind, kind), []).append(row)
    markers = itertools.cycle("os^Dvx*Ph<")
    for family, fam_rows in sorted(families.items()):
        kl = np.array([float(r["kl"]) for r in fam_rows])
        reward = np.array([float(r["reward"]) for r in fam_rows])
        ax.scatter(kl, reward, label=family, marker=next(markers), alpha=0.75, s=28)
        for r in fam_rows:  # name each method's final point (its hyper-parameters)
            if int(r["final"]) and ":" in str(r["method"]):
                tag = str(r["method"]).split(":", 1)[1]
                ax.annotate(tag, (float(r["kl"]), float(r["reward"])), fontsize=7,
                            xytext=(3, -8), textcoords="offset points")  # fmt: skip
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


# ---------------------------------------------------------------------------- pipeline


@dataclasses.dataclass
class Task:
    """Everything the methods share once the SFT policy and the pairs exist."""

    config: ml_collections.ConfigDict
    tokenizer: Any
    model: Any
    sft_params: Any
    pad_id: int
    eos_id: int
    reward_fn: Any
    pairs: pipeline.PairData
    eval_prefixes: list[list[int]]
    scorer: pipeline.Scorer  # one compiled shape for the pairs' reference and every eval
    run_dir: Path

    @property
    def row_length(self) -> int:
        """Length of a prompt + completion row (prompts are <= prefix_max_len + BOS)."""
        return self.config.data.prefix_max_len + 1 + self.config.pairs.max_new_tokens


def load_corpus(config: ml_collections.ConfigDict) -> tuple[list[str], list[str], list[str]]:
    """(SFT texts, texts whose prefixes make the pairs, texts whose prefixes are evaluated)."""
    d = config.data
    n_pairs, n_eval = config.pairs.num_prefixes, config.eval.num_prefixes
    if d.source == "synthetic":
        texts = synthetic_reviews.generate_corpus(d.num_reviews + n_pairs + n_eval, config.seed)
        return texts[: d.num_reviews], texts[d.num_reviews : -n_eval], texts[-n_eval:]
    if d.source == "tfds:imdb_reviews":
        import tensorflow_datasets as tfds

        # The paper: SFT and pair prefixes from the train split, evaluation on test prefixes.
        train = [r["text"].decode() for r in tfds.data_source("imdb_reviews", split="train")]
        test = [r["text"].decode() for r in tfds.data_source("imdb_reviews", split="test")]
        return train[: d.num_reviews], train[:n_pairs], test[:n_eval]
    raise ValueError(
        f"config.data.source={d.source!r}: expected 'synthetic' or 'tfds:imdb_reviews'"
    )


def make_reward_fn(spec: str):
    """The ground-truth reward: ``vader`` or ``hf:DIR`` (a local sequence classifier)."""
    if spec == "vader":
        return rewards.VaderReward()
    if spec.startswith("hf:"):
        return rewards.HFClassifierReward(spec[3:], label="POSITIVE", score="prob")
    raise ValueError(f"config.reward={spec!r}: expected 'vader' or 'hf:/local/dir'")


def make_model(config: ml_collections.ConfigDict, vocab_size: int, pad_id: int, eos_id: int):
    """(ModelConfig, params) of the SFT model: a local HF checkpoint or a fresh GPT-2 shape."""
    m = config.model
    if m.model_dir:
        return models.load_hf(
            m.model_dir, m.dtype, m.param_dtype, remat=m.remat, scan_layers=m.scan_layers
        )
    cfg = models.ModelConfig.for_family(
        "gpt2",
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        max_position_embeddings=m.max_position_embeddings,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        remat=m.remat,
        scan_layers=m.scan_layers,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    return cfg, models.init_params(cfg, jax.random.key(config.seed))


def build_task(config: ml_collections.ConfigDict, run_dir: Path, timings: dict[str, float]) -> Task:
    """Corpus -> tokenizer -> SFT policy -> sampled completions -> labelled pairs."""
    t0 = time.perf_counter()
    sft_texts, pair_texts, eval_texts = load_corpus(config)
    if config.data.tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer_dir, local_files_only=True)
    else:
        tokenizer = common.train_bpe_tokenizer(
            sft_texts, config.data.tokenizer_vocab_size, run_dir / "tokenizer"
        )
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    encode = lambda texts: [[eos_id] + ids for ids in tokenizer(texts)["input_ids"]]
    sft_seqs = [ids + [eos_id] for ids in encode(sft_texts)]
    # Prefixes: BOS + 2-8 tokens of a held-out review (the paper's IMDb prefixes).
    d = config.data
    cut = lambda texts, seed: [
        [eos_id] + p
        for p in synthetic_reviews.extract_prefixes(
            [ids[1:] for ids in encode(texts)], d.prefix_min_len, d.prefix_max_len, seed
        )
    ]
    pair_prefixes = cut(pair_texts, config.seed + 1)
    eval_prefixes = cut(eval_texts, config.seed + 2)
    timings["data_and_tokenizer_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model_cfg, params = make_model(config, len(tokenizer), pad_id, eos_id)
    model = models.Transformer(model_cfg)
    print(
        f"SFT model: {models.param_count(model_cfg) / 1e6:.2f}M parameters, vocab {len(tokenizer)}"
    )
    if config.sft.steps > 0:  # from scratch, or fine-tuning a checkpoint on the corpus
        params = pipeline.train_sft(
            model, params, sft_seqs, [1] * len(sft_seqs), config.sft, pad_id, config.seed,
            run_dir / "sft", config.progress,
        )  # fmt: skip
    timings["sft_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pr, k = config.pairs, config.pairs.samples_per_prefix
    comps, _ = pipeline.sample(
        model, params, pair_prefixes, jax.random.key(config.seed + 7), n=k,
        max_new_tokens=pr.max_new_tokens, temperature=pr.temperature, rows=pr.batch_size,
        eos_id=eos_id, pad_id=pad_id, desc="sample pairs", progress=config.progress,
    )  # fmt: skip
    reward_fn = make_reward_fn(config.reward)
    texts = pipeline.decode_texts(tokenizer, [p for p in pair_prefixes for _ in range(k)], comps)
    rewards_PxK = np.asarray(reward_fn(texts)).reshape(-1, k)
    triples = label_pairs(rewards_PxK)
    if not triples:
        raise RuntimeError("every sampled completion got the same reward: no preference pairs")
    scorer = pipeline.Scorer(
        model, rows=config.eval.batch_size, length=d.prefix_max_len + 1 + pr.max_new_tokens,
        pad_id=pad_id,
    )  # fmt: skip
    pairs = pipeline.pair_data(
        scorer,
        params,
        [pair_prefixes[p] for p, _, _ in triples],
        [comps[p * k + i] for p, i, _ in triples],
        [comps[p * k + j] for p, _, j in triples],
    )
    timings["pairs_s"] = time.perf_counter() - t0
    ties = len(pair_prefixes) * k * (k - 1) // 2 - len(triples)
    print(
        f"pairs: {len(triples)} from {len(pair_prefixes)} prefixes x {k} samples "
        f"(mean sample reward {rewards_PxK.mean():.3f}; {ties} tied pairs dropped)"
    )
    with open(run_dir / "pairs.jsonl", "w") as f:
        for p, i, j in triples:
            f.write(json.dumps(dict(
                prefix=tokenizer.decode(pair_prefixes[p], skip_special_tokens=True),
                chosen_text=texts[p * k + i], rejected_text=texts[p * k + j],
                chosen_reward=float(rewards_PxK[p, i]), rejected_reward=float(rewards_PxK[p, j]),
            )) + "\n")  # fmt: skip
    return Task(
        config=config, tokenizer=tokenizer, model=model, sft_params=params, pad_id=pad_id,
        eos_id=eos_id, reward_fn=reward_fn, pairs=pairs, eval_prefixes=eval_prefixes,
        scorer=scorer, run_dir=run_dir,
    )  # fmt: skip


@dataclasses.dataclass
class Evaluation:
    """One evaluation of a policy on the held-out prefixes."""

    reward: evaluation.Estimate
    kl: evaluation.Estimate
    texts: list[str]
    rewards: np.ndarray
    policy_logps: np.ndarray
    ref_logps: np.ndarray


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


def result_row(method: str, step: int, ev: Evaluation, final: bool) -> dict[str, Any]:
    """A row of results.csv."""
    return dict(
        method=method, step=step, reward=ev.reward.mean, reward_stderr=ev.reward.stderr,
        kl=ev.kl.mean, kl_stderr=ev.kl.stderr, num_samples=ev.reward.n, final=int(final),
    )  # fmt: skip


def write_samples(path: Path, method: str, ev: Evaluation) -> None:
    """Append the evaluation samples (text, reward, log-probs) of one policy to a JSONL."""
    with open(path, "a") as f:
        for text, r, lp, lr in zip(
            ev.texts, ev.rewards, ev.policy_logps, ev.ref_logps, strict=True
        ):
            f.write(json.dumps(dict(method=method, text=text, reward=float(r),
                                    policy_logp=float(lp), ref_logp=float(lr))) + "\n")  # fmt: skip


def train_method(task: Task, method: Method, sft_eval: Evaluation) -> list[dict[str, Any]]:
    """Fine-tune the SFT policy with one loss on the pairs; evaluate every eval_every steps."""
    c = task.config
    rows = [result_row(method.label, 0, sft_eval, final=False)]

    def eval_fn(step: int, params: Any) -> dict[str, float]:
        ev = evaluate(task, params)
        rows.append(result_row(method.label, step, ev, final=step == c.train.steps))
        if step == c.train.steps:
            write_samples(task.run_dir / "samples.jsonl", method.label, ev)
        return {**ev.reward.as_metrics("eval/reward"), **ev.kl.as_metrics("eval/kl")}

    pipeline.train_preference(
        task.model, task.sft_params, task.pairs, loss_name=method.loss_name,
        loss_hyper=method.loss_hyper, train_config=c.train, row_length=task.row_length,
        pad_id=task.pad_id, seed=c.seed + 1000 * method.seed, eval_fn=eval_fn,
        log_dir=task.run_dir / "methods" / method.label.replace(":", "_"), desc=method.label,
        progress=c.progress,
    )  # fmt: skip
    return rows


def best_of_n(task: Task, method: Method) -> list[dict[str, Any]]:
    """Best-of-N from the SFT policy, selected by the ground-truth reward.

    This is an ORACLE selector (the paper selects with a reward model learnt from the
    pairs), so the point is an upper bound for best-of-N at this N. Its KL is the
    analytic bound log N - (N - 1) / N (Stiennon et al. 2020; Beirami et al. 2024).
    """
    n, t, e = int(method.loss_hyper["n"]), task, task.config.eval
    comps, _ = pipeline.sample(
        t.model, t.sft_params, t.eval_prefixes, jax.random.key(e.seed + n), n=n,
        max_new_tokens=e.max_new_tokens, temperature=1.0, rows=t.scorer.rows,
        eos_id=t.eos_id, pad_id=t.pad_id,
    )  # fmt: skip
    texts = pipeline.decode_texts(
        t.tokenizer, [p for p in t.eval_prefixes for _ in range(n)], comps
    )
    best = np.asarray(t.reward_fn(texts), np.float64).reshape(-1, n).max(axis=1)
    reward = evaluation.mean_and_stderr(best)
    return [
        dict(method=method.label, step=0, reward=reward.mean, reward_stderr=reward.stderr,
             kl=float(np.log(n) - (n - 1) / n), kl_stderr=float("nan"), num_samples=reward.n,
             final=1)
    ]  # fmt: skip


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


def run(config: ml_collections.ConfigDict) -> Path:
    """The whole experiment; returns the run directory."""
    wall0 = time.perf_counter()
    methods = [parse_method(s) for s in config.methods]
    run_dir = common.make_run_dir(config, "sentiment")
    print(f"run directory: {run_dir}")
    timings: dict[str, float] = {}
    task = build_task(config, run_dir, timings)
    t0 = time.perf_counter()
    sft_eval = evaluate(task, task.sft_params)
    write_samples(run_dir / "samples.jsonl", "sft", sft_eval)
    rows = [result_row("sft", 0, sft_eval, final=True)]
    for method in methods:
        if method.kind == "best_of_n":
            rows += best_of_n(task, method)
        else:
            rows += train_method(task, method, sft_eval)
    timings["methods_s"] = time.perf_counter() - t0
    common.write_csv(run_dir / "results.csv", rows, RESULT_COLUMNS)
    plot_frontier(rows, run_dir / "frontier.png", f"sentiment ({config.preset}): reward vs KL")
    timings["total_s"] = time.perf_counter() - wall0
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    print(common.format_table([r for r in rows if r["final"]], RESULT_COLUMNS[:-1]))
    print(headline(rows))
    print(f"frontier: {run_dir / 'frontier.png'}   table: {run_dir / 'results.csv'}")
    print("timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    return run_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    argv = sys.argv[1:] if argv is None else argv
    args = common.parse_args(get_config, argv, PRESETS)
    if args.dry_run:
        from experiments import dry_run

        c = args.config
        dpo = [parse_method(m) for m in c.methods if m.startswith("dpo:")]
        dry_run.run_from_config(
            c,
            loss_name="sigmoid",
            loss_hyper=dpo[0].loss_hyper if dpo else {"beta": 0.1},
            seq_len=c.data.prefix_max_len + 1 + c.pairs.max_new_tokens,
            reference="precomputed",
        )
        return 0
    run(args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
