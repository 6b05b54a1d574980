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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dpo_jax import logprobs, losses, optim, sampling, train_step
from dpo_jax import metrics as dpo_metrics
from dpo_jax.data import batching


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

    def batch(self, idx: np.ndarray, length: int, pad_id: int) -> dict[str, np.ndarray]:
        """Stacked `[2B, L]` batch of pairs `idx` (chosen rows, then rejected) + ref_logps."""
        batch = batching.build_stacked(
            [self.prompts[i] for i in idx],
            [self.chosen[i] for i in idx] + [self.rejected[i] for i in idx],
            length,
            pad_id,
        )
        batch["ref_logps"] = np.concatenate([self.ref_chosen[idx], self.ref_rejected[idx]]).astype(
            np.float32
        )
        return batch


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
    """Train `init_params` on the pairs with one registered loss; returns the final params.

    `train_config`: steps, batch_size (pairs), optimizer, learning_rate, warmup_steps,
    schedule, max_grad_norm, eval_every. `eval_fn(step, params)` runs every eval_every
    steps and at the last step; its metrics are logged next to the training metrics.
    """
    tr = train_config
    if loss_name not in losses.names():
        raise ValueError(f"no loss {loss_name!r} in dpo_jax.losses (have {losses.names()})")
    reference = "precomputed" if losses.needs_reference(loss_name) else "none"
    optimizer, schedule = optim.make_optimizer(
        dict(name=tr["optimizer"], learning_rate=tr["learning_rate"],
             warmup_steps=tr["warmup_steps"], schedule=tr["schedule"],
             max_grad_norm=tr["max_grad_norm"]),
        tr["steps"],
        init_params,
    )  # fmt: skip
    step_cfg = train_step.StepConfig(
        apply_fn=model.apply, optimizer=optimizer, schedule=schedule,
        loss_name=loss_name, loss_hyper=dict(loss_hyper), reference=reference,
    )  # fmt: skip
    b = int(tr["batch_size"])
    if len(pairs) < b:
        raise ValueError(f"{len(pairs)} pairs are fewer than one batch of {b}")
    step_fn = jax.jit(
        functools.partial(train_step.train_step, cfg=step_cfg, n_seq=2 * b), donate_argnums=0
    )
    params = jax.tree.map(jnp.copy, init_params)  # the step donates its input state
    state = train_step.init_state(params, optimizer, jax.random.key(seed), False)
    rng = np.random.default_rng(seed)
    order, cursor = rng.permutation(len(pairs)), 0
    writer = dpo_metrics.MetricsWriter(log_dir)
    bar = tqdm(range(1, tr["steps"] + 1), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        if cursor + b > len(order):
            order, cursor = rng.permutation(len(pairs)), 0
        batch = pairs.batch(order[cursor : cursor + b], row_length, pad_id)
        cursor += b
        state, m = step_fn(state, {k: v[None] for k, v in batch.items()})
        if step % tr["eval_every"] == 0 or step == tr["steps"]:
            m = dict(jax.device_get(m))
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(f"{desc}: non-finite loss at step {step}")
            if eval_fn is not None:
                m.update(eval_fn(step, state.params))
            writer.write(step, m)
            bar.set_postfix({k: f"{float(v):.3g}" for k, v in m.items() if k in _SHOWN})
    writer.close()
    return state.params


_SHOWN = ("loss", "rewards/accuracies", "eval/reward", "eval/kl", "eval/win_rate")
