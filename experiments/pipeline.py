"""The language-model pieces every paper-reproduction experiment strings together:

SFT on token sequences -> sampling in fixed-shape chunks -> scoring completions under a
policy -> preference training on pairs (any `dpo_jax.losses` loss, reference log-probs
precomputed once) with a periodic evaluation callback.

Fixed shapes are the point: every sampler and scorer call has the same number of rows
(the last chunk is padded by repetition), so each compiles once per run; the preference
step compiles once per loss configuration.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from dpo_jax import logprobs, sampling
from dpo_jax.data import batching
from experiments import common


def apply_fn(model: Any) -> Callable[..., jax.Array]:
    """`(params, ids, positions=, segment_ids=) -> logits` of a Transformer module."""

    def fn(params, input_ids, positions=None, segment_ids=None):
        return model.apply(
            {"params": params}, input_ids, positions=positions, segment_ids=segment_ids
        )

    return fn


def train_sft(
    model: Any,
    params: Any,
    sequences: Sequence[Sequence[int]],
    target_starts: Sequence[int],
    sft_config: Mapping[str, Any],
    pad_id: int,
    seed: int,
    log_dir: Path,
    progress: bool = True,
    desc: str = "SFT",
) -> Any:
    """Supervised fine-tuning: tokens at index >= target_starts[i] of sequence i are targets.

    `sft_config`: steps, batch_size, max_len, learning_rate, warmup_steps (AdamW, cosine).
    Runs `dpo_jax.train.train` with `objective.name="sft"` (the one Trainer).
    """
    del desc
    from dpo_jax import data
    from dpo_jax import train as trainer
    from dpo_jax.configs import default

    s = sft_config
    c = default.get_config()
    c.objective.name = "sft"
    c.run_dir, c.seed = str(log_dir), seed
    c.batch_size, c.num_steps = s["batch_size"], s["steps"]
    c.optim.update(learning_rate=s["learning_rate"], warmup_steps=s["warmup_steps"],
                   schedule="cosine", weight_decay=0.01, max_grad_norm=1.0)  # fmt: skip
    c.train.update(log_every=25, progress=progress, tensorboard=False, token_metrics=False)
    prompts = [list(q)[: max(t, 1)] for q, t in zip(sequences, target_starts, strict=True)]
    targets = [list(q)[max(t, 1) :] for q, t in zip(sequences, target_starts, strict=True)]
    dataset = data.sequence_dataset(prompts, targets, s["max_len"])
    batches = data.make_train_iterator(
        dataset, s["batch_size"], buckets=(s["max_len"],), seed=seed, pad_id=pad_id
    )
    result = trainer.train(c, train_data=batches, model_config=model.cfg, params=params)
    return result.state.params


def sample(
    model: Any,
    params: Any,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    rows: int,
    eos_id: int,
    pad_id: int,
    desc: str = "",
    progress: bool = False,
) -> tuple[list[list[int]], np.ndarray]:
    """n completions per prompt (row i*n+j = sample j of prompt i), EOS kept when emitted,
    and their summed log-probs under the sampling model (temperature 1, untruncated).

    Prompts go in chunks of `rows // n` (the last padded by repetition) so the sampler
    compiles once; chunk c samples with `fold_in(key, c)`.
    """
    if rows % n:
        raise ValueError(f"rows={rows} must be a multiple of n={n}")
    per_chunk = rows // n
    config = sampling.SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        n=n,
        eos_token_ids=(eos_id,),
        pad_token_id=pad_id,
    )
    completions: list[list[int]] = []
    logps: list[np.ndarray] = []
    starts = range(0, len(prompts), per_chunk)
    for chunk, start in enumerate(tqdm(starts, desc=desc, disable=not progress, leave=False)):
        part = [list(p) for p in prompts[start : start + per_chunk]]
        real = len(part)
        part += [part[-1]] * (per_chunk - real)
        out = sampling.generate(model, params, part, jax.random.fold_in(key, chunk), config)
        completions += out.completion_ids(keep_eos=True)[: real * n]
        logps.append((out.logps * out.mask).sum(axis=1)[: real * n])
    return completions, np.concatenate(logps).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class Scorer:
    """log p(completion | prompt) under any params, `rows` sequences per compiled call."""

    model: Any
    rows: int
    length: int  # padded row length; prompt + completion must fit
    pad_id: int

    @functools.cached_property
    def _fn(self) -> Callable[[Any, dict[str, np.ndarray]], jax.Array]:
        rows, model = self.rows, self.model

        @jax.jit
        def score(params, batch):
            logits = model.apply(
                {"params": params}, batch["input_ids"], positions=batch["positions"],
                segment_ids=batch["segment_ids"],
            )  # fmt: skip
            return logprobs.sequence_logps(logits, batch, rows).logps_S

        return score

    def __call__(
        self, params: Any, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """Summed completion log-probs, one per (prompt, completion)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts vs {len(completions)} completions")
        out = []
        for start in range(0, len(prompts), self.rows):
            p = list(prompts[start : start + self.rows])
            c = list(completions[start : start + self.rows])
            real = len(p)
            p, c = p + [p[-1]] * (self.rows - real), c + [c[-1]] * (self.rows - real)
            # build_stacked lays out 2*len(p) rows (pairs); with every sequence in the
            # first half, the first `rows` rows are exactly the stacked layout of these.
            batch = batching.build_stacked(p, c, self.length, self.pad_id)
            batch = {k: v[: self.rows] for k, v in batch.items()}
            out.append(np.asarray(self._fn(params, batch))[:real])
        return np.concatenate(out).astype(np.float64)


def decode_texts(
    tokenizer: Any, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
) -> list[str]:
    """Prompt + completion as text (special tokens dropped)."""
    return [
        tokenizer.decode(list(p) + list(c), skip_special_tokens=True)
        for p, c in zip(prompts, completions, strict=True)
    ]


def decode_completions(tokenizer: Any, completions: Sequence[Sequence[int]]) -> list[str]:
    """Completions alone as text (special tokens dropped)."""
    return [tokenizer.decode(list(c), skip_special_tokens=True) for c in completions]


@dataclasses.dataclass
class PairData:
    """Tokenized preference pairs with their reference log-probs (same order)."""

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    ref_chosen: np.ndarray
    ref_rejected: np.ndarray

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(
        self, idx: np.ndarray, length: int, pad_id: int, num_positions: int | None = None
    ) -> dict[str, np.ndarray]:
        """Stacked `[2B, L]` batch of pairs `idx` (chosen rows, then rejected) + ref_logps.

        `num_positions` pins the scored positions' `K` (`logprobs.scored_positions`;
        completions of at most that many tokens), so every step compiles one program
        and a dry run lowers that same program.
        """
        batch = batching.build_stacked(
            [self.prompts[i] for i in idx],
            [self.chosen[i] for i in idx] + [self.rejected[i] for i in idx],
            length,
            pad_id,
        )
        batch["ref_logps"] = np.concatenate([self.ref_chosen[idx], self.ref_rejected[idx]]).astype(
            np.float32
        )
        if num_positions is not None:
            batch["scored_positions"] = logprobs.scored_positions(
                batch["sequence_index"], num_positions
            )
        return batch


def pair_batches(
    pairs: PairData,
    micro_pairs: int,
    length: int,
    pad_id: int,
    seed: int,
    *,
    num_positions: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless host micro-batches of `micro_pairs` pairs (all processes together): a
    seeded permutation of the pairs, drawn afresh when fewer than a micro-batch remain.

    Deterministic, so `train.train` resumes it by skipping what the restored steps
    consumed. Process `p` of `P` gets its `micro_pairs / P` pairs of each micro-batch.
    """
    if len(pairs) < micro_pairs:
        raise ValueError(f"{len(pairs)} pairs are fewer than one micro-batch of {micro_pairs}")
    if micro_pairs % process_count:
        raise ValueError(
            f"{micro_pairs} pairs per micro-batch do not split over {process_count} processes"
        )
    per = micro_pairs // process_count
    rng = np.random.default_rng(seed)
    order, cursor = rng.permutation(len(pairs)), 0
    while True:
        if cursor + micro_pairs > len(order):
            order, cursor = rng.permutation(len(pairs)), 0
        idx = order[cursor : cursor + micro_pairs][process_index * per : (process_index + 1) * per]
        cursor += micro_pairs
        yield pairs.batch(idx, length, pad_id, num_positions)


def pair_data(
    scorer: Scorer,
    ref_params: Any,
    prompts: list[list[int]],
    chosen: list[list[int]],
    rejected: list[list[int]],
) -> PairData:
    """Pairs with reference log-probs computed once under `ref_params` (the DPO paper's
    reference is the SFT model, which never changes during training)."""
    return PairData(
        prompts=prompts,
        chosen=chosen,
        rejected=rejected,
        ref_chosen=scorer(ref_params, prompts, chosen),
        ref_rejected=scorer(ref_params, prompts, rejected),
    )


EvalFn = Callable[[int, Any], Mapping[str, float]]


def train_preference(
    model: Any,
    init_params: Any,
    pairs: PairData,
    *,
    loss_name: str,
    loss_hyper: Mapping[str, float],
    train_config: Mapping[str, Any],
    row_length: int,
    pad_id: int,
    seed: int,
    eval_fn: EvalFn | None,
    log_dir: Path,
    desc: str,
    progress: bool = True,
) -> Any:
    """Train `init_params` on the pairs with one registered loss through the one
    Trainer (`dpo_jax.train.train`, metrics in `log_dir`); returns the final params.

    For the offline experiments (TL;DR, HH) until they are phase graphs: maps their
    `train` section (steps, batch_size, optimizer, learning_rate, warmup_steps, schedule,
    max_grad_norm, eval_every, micro_batches) onto a `dpo-jax train` config.
    """
    from dpo_jax import train
    from dpo_jax.configs import default

    tr = train_config
    config = default.get_config()
    config.run_dir = str(log_dir)
    config.seed = seed
    config.loss.name = loss_name
    config.loss.hyper = dict(loss_hyper)
    config.num_steps = int(tr["steps"])
    config.batch_size = int(tr["batch_size"])
    config.grad_accum_steps = int(tr.get("micro_batches", 1))
    config.optim.update(
        name=tr["optimizer"], learning_rate=tr["learning_rate"], warmup_steps=tr["warmup_steps"],
        schedule=tr["schedule"], max_grad_norm=tr["max_grad_norm"],
    )  # fmt: skip
    config.train.update(eval_every=int(tr["eval_every"]), log_every=int(tr["eval_every"]),
                        progress=progress, tensorboard=True)  # fmt: skip
    micro = config.batch_size // config.grad_accum_steps
    data = pair_batches(pairs, micro, row_length, pad_id, seed)
    result = train.train(config, train_data=data, model=(model.cfg, init_params), eval_hook=eval_fn)
    return jax.device_get(result.state.params)


# ------------------------------------------------------- offline preference datasets
# TL;DR and HH: a fixed preference dataset in an upstream format -> SFT on the chosen
# completions (the reference) -> DPO -> win rate of policy samples against the dataset's
# chosen completions under a pluggable judge.

OFFLINE_RESULT_COLUMNS = (
    "method", "step", "win_rate", "win_rate_stderr", "wins", "ties", "losses", "num_prompts",
    "final",
)  # fmt: skip


def offline_config(fmt: str) -> Any:
    """The fields TL;DR and HH share (each module fills in its own values and presets)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.preset = "mini"
    c.seed = 0
    c.workdir = ""
    c.progress = True
    c.data = ml_collections.ConfigDict(dict(
        format=fmt, train_path="", test_path="",  # empty: write the seeded fixture rows
        num_train=1200, num_test=128, max_prompt_length=64, max_completion_length=24,
        tokenizer_dir="", tokenizer_vocab_size=768,
    ))  # fmt: skip
    c.model = ml_collections.ConfigDict(dict(
        model_dir="", hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=96,
        dtype="float32", param_dtype="float32", remat="none", scan_layers=False,
    ))  # fmt: skip
    # SFT on the chosen completions: the DPO paper's SFT model for TL;DR and its
    # "Preferred-FT on chosen" reference for HH. completion_only: loss on completions only.
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
    c.eval = ml_collections.ConfigDict(
        dict(max_new_tokens=24, temperature=0.0, batch_size=128, seed=4321)
    )
    c.judge = "fixture"  # "fixture" (the module's own), "reward:vader", "hf:DIR", "python:MOD:FN"
    c.dry_run_devices = 8
    return c


def score_judge(score: Callable[[str, str], float]) -> Callable[..., np.ndarray]:
    """A pairwise judge from a per-text score(prompt, text): a wins when it scores higher,
    0.5 on ties."""

    def judge(prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        sa = np.array([score(p, t) for p, t in zip(prompts, a, strict=True)])
        sb = np.array([score(p, t) for p, t in zip(prompts, b, strict=True)])
        return np.where(sa > sb, 1.0, np.where(sa < sb, 0.0, 0.5))

    return judge


def shrink_to_smoke(c: Any) -> None:
    """The `smoke` preset of an offline experiment: the same pipeline in seconds."""
    c.data.update(num_train=96, num_test=16, tokenizer_vocab_size=384)
    c.model.update(hidden_size=32, num_layers=1, num_heads=2)
    c.sft.update(steps=20, batch_size=16)
    c.train.update(steps=4, batch_size=8, eval_every=2)
    c.eval.update(batch_size=16, max_new_tokens=12)
    c.progress = False


def resolve_judge(spec: str, fixture_judge: Callable[[], Any]) -> Any:
    """A pairwise judge `(prompts, a, b) -> P(a better)` from a config string.

    "fixture": the experiment's own judge for its fixture data; "reward:vader" and
    "hf:DIR" wrap a reward function (higher reward wins); "python:MODULE:FUNCTION" calls
    FUNCTION() to build any judge (an LLM judge, say).
    """
    from dpo_jax import evaluation, rewards

    if spec == "fixture":
        return fixture_judge()
    if spec == "reward:vader":
        return evaluation.reward_judge(rewards.VaderReward())
    if spec.startswith("hf:"):
        return evaluation.reward_judge(rewards.HFClassifierReward(spec[3:], label=1))
    if spec.startswith("python:"):
        import importlib

        _, module, function = spec.split(":", 2)
        return getattr(importlib.import_module(module), function)()
    raise ValueError(f"judge {spec!r}: expected fixture, reward:vader, hf:DIR or python:MOD:FN")


def run_offline(
    config: Any,
    experiment: str,
    write_fixture: Callable[[Path, Any], tuple[Path, Path]],
    fixture_judge: Callable[[], Any],
) -> Path:
    """SFT on chosen -> DPO -> win rate vs the test split's chosen completions."""
    from dpo_jax import data, evaluation, models

    wall0 = time.perf_counter()
    run_dir = common.make_run_dir(config, experiment)
    print(f"run directory: {run_dir}")
    d = config.data
    if d.train_path:
        train_path, test_path = Path(d.train_path), Path(d.test_path)
    else:
        train_path, test_path = write_fixture(run_dir / "data", config)
    spec = dict(
        format=d.format, max_prompt_length=d.max_prompt_length,
        max_completion_length=d.max_completion_length, cache_dir="",
    )  # fmt: skip
    if d.tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(d.tokenizer_dir, local_files_only=True)
    else:  # a BPE trained on the training texts (the fixture's own vocabulary)
        examples = data.load_examples(dict(spec, path=str(train_path)), None, data.RejectLog())
        texts = [e.prompt + e.chosen for e in examples] + [e.rejected for e in examples]
        tokenizer = common.train_bpe_tokenizer(texts, d.tokenizer_vocab_size, run_dir / "tokenizer")
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    eos_id = tokenizer.eos_token_id
    train = data.load_preference_data(dict(spec, path=str(train_path)), tokenizer)
    test_examples = data.load_examples(dict(spec, path=str(test_path)), tokenizer, data.RejectLog())
    items = [train[i] for i in range(len(train))]
    prompts = [it["prompt"].tolist() for it in items]
    chosen = [it["chosen"].tolist() for it in items]
    rejected = [it["rejected"].tolist() for it in items]
    row_length = max(
        len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected, strict=True)
    )
    test_prompts = [tokenizer(e.prompt)["input_ids"][-d.max_prompt_length :] for e in test_examples]
    row_length = max(row_length, max(len(p) for p in test_prompts) + config.eval.max_new_tokens)

    m = config.model
    if m.model_dir:
        model_cfg, params = models.load_hf(
            m.model_dir, m.dtype, m.param_dtype, remat=m.remat, scan_layers=m.scan_layers
        )
    else:
        model_cfg = models.ModelConfig.for_family(
            "gpt2", vocab_size=len(tokenizer), hidden_size=m.hidden_size, num_layers=m.num_layers,
            num_heads=m.num_heads, max_position_embeddings=m.max_position_embeddings,
            dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
            eos_token_id=eos_id, pad_token_id=pad_id,
        )  # fmt: skip
        params = models.init_params(model_cfg, jax.random.key(config.seed))
    model = models.Transformer(model_cfg)
    print(f"policy: {models.param_count(model_cfg) / 1e6:.2f}M parameters; {len(items)} train pairs, "
          f"{len(test_examples)} test prompts; row length {row_length}")  # fmt: skip
    sft_seqs = [p + c for p, c in zip(prompts, chosen, strict=True)]
    starts = [len(p) if config.sft.completion_only else 1 for p in prompts]
    sft_params = train_sft(
        model, params, sft_seqs, starts, config.sft, pad_id, config.seed, run_dir / "sft",
        config.progress, desc="SFT on chosen",
    )  # fmt: skip
    scorer = Scorer(model, rows=config.eval.batch_size, length=row_length, pad_id=pad_id)
    pairs = pair_data(scorer, sft_params, prompts, chosen, rejected)
    judge = resolve_judge(config.judge, fixture_judge)
    prompt_texts = [e.prompt for e in test_examples]
    reference_texts = [e.chosen for e in test_examples]
    rows: list[dict[str, Any]] = []
    samples_path = run_dir / "samples.jsonl"

    def win_rate_of(method: str, step: int, params: Any, final: bool) -> dict[str, float]:
        comps, _ = sample(
            model, params, test_prompts, jax.random.key(config.eval.seed), n=1,
            max_new_tokens=config.eval.max_new_tokens, temperature=config.eval.temperature,
            rows=config.eval.batch_size, eos_id=eos_id, pad_id=pad_id,
        )  # fmt: skip
        texts = decode_completions(tokenizer, comps)
        wr = evaluation.win_rate(texts, reference_texts, judge=judge, prompts=prompt_texts)
        rows.append(dict(
            method=method, step=step, win_rate=wr.rate, win_rate_stderr=wr.stderr, wins=wr.wins,
            ties=wr.ties, losses=wr.losses, num_prompts=len(texts), final=int(final),
        ))  # fmt: skip
        if final:
            with open(samples_path, "a") as f:
                for p, t, r, s in zip(
                    prompt_texts, texts, reference_texts, wr.per_pair, strict=True
                ):
                    f.write(json.dumps(dict(method=method, prompt=p, completion=t,
                                            reference=r, score=float(s))) + "\n")  # fmt: skip
        return wr.as_metrics("eval/win_rate")

    win_rate_of("sft", 0, sft_params, final=True)
    label = f"dpo:{config.loss}:beta={config.beta:g}"
    train_preference(
        model, sft_params, pairs, loss_name=config.loss, loss_hyper={"beta": config.beta},
        train_config=config.train, row_length=row_length, pad_id=pad_id, seed=config.seed,
        eval_fn=lambda step, p: win_rate_of(label, step, p, step == config.train.steps),
        log_dir=run_dir / "methods" / label.replace(":", "_"), desc=label,
        progress=config.progress,
    )  # fmt: skip
    common.write_csv(run_dir / "results.csv", rows, OFFLINE_RESULT_COLUMNS)
    _plot_win_rates(rows, run_dir / "win_rate.png", f"{experiment} ({config.preset})")
    print(common.format_table([r for r in rows if r["final"]], OFFLINE_RESULT_COLUMNS[:-1]))
    print(f"win rate vs the dataset's chosen completions (judge: {config.judge}); "
          f"took {time.perf_counter() - wall0:.0f} s; results in {run_dir}")  # fmt: skip
    return run_dir


def _plot_win_rates(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Win rate (with standard error) against training step, the SFT level as a line."""
    plt = common.agg_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    sft_rate = next(r["win_rate"] for r in rows if r["method"] == "sft")
    ax.axhline(sft_rate, color="gray", linestyle="--", label="SFT")
    for method in sorted({r["method"] for r in rows} - {"sft"}):
        mine = [r for r in rows if r["method"] == method]
        ax.errorbar([r["step"] for r in mine], [r["win_rate"] for r in mine],
                    yerr=[r["win_rate_stderr"] for r in mine], marker="o", label=method)  # fmt: skip
    ax.set_xlabel("training step")
    ax.set_ylabel("win rate vs dataset chosen")
    ax.set_ylim(0, 1)
    common.save_figure(fig, ax, title, path)


def offline_main(
    argv: Sequence[str],
    experiment: str,
    get_config: Callable[[str], Any],
    presets: Sequence[str],
    write_fixture: Callable[[Path, Any], tuple[Path, Path]],
    fixture_judge: Callable[[], Any],
) -> int:
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
    run_offline(c, experiment, write_fixture, fixture_judge)
    return 0
