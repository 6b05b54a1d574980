"""The language-model pieces the paper-reproduction experiments' phases share:

SFT batches and settings for the Trainer -> sampling in fixed-shape chunks -> scoring
completions under a policy (`dpo_jax.scoring`) -> preference pairs with reference
log-probs and their batches for the Trainer.

Fixed shapes are the point: every sampler and scorer call has the same number of rows
(the last chunk is padded by repetition), and batches pin the scored positions' `K`, so
each program compiles once per run and a dry run lowers the program the run executes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from dpo_jax import logprobs, sampling
from dpo_jax.data import batching


def sft_overrides(sft: Mapping[str, Any]) -> dict[str, Any]:
    """The `dpo-jax train` settings of an SFT run (dotted keys, `phases.train_config`):
    token NLL (`objective.name="sft"`), AdamW with cosine decay, from `sft`'s num_steps,
    batch_size, learning_rate, warmup_steps."""
    return {
        "objective.name": "sft", "num_steps": int(sft["num_steps"]),
        "batch_size": int(sft["batch_size"]), "grad_accum_steps": 1, "optim.name": "adamw",
        "optim.learning_rate": float(sft["learning_rate"]),
        "optim.warmup_steps": int(sft["warmup_steps"]), "optim.schedule": "cosine",
        "optim.weight_decay": 0.01, "optim.max_grad_norm": 1.0, "train.log_every": 25,
        "train.eval_every": 0, "train.token_metrics": False,
    }  # fmt: skip


class SFTBatches:
    """SFT micro-batches (`data.make_train_iterator` over `data.sequence_dataset`: tokens
    at index >= target_starts[i] of sequence i are targets, rows padded to `max_len`)
    with `scored_positions` pinned to `max_len - 1`, so every step runs one program and a
    dry run lowers that program. Resumable: `get_state`/`set_state` are the loader's."""

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        target_starts: Sequence[int],
        batch_size: int,
        max_len: int,
        pad_id: int,
        seed: int,
    ):
        from dpo_jax import data

        cut = [max(t, 1) for t in target_starts]  # the first token is context, always
        prompts = [list(q)[:t] for q, t in zip(sequences, cut, strict=True)]
        targets = [list(q)[t:] for q, t in zip(sequences, cut, strict=True)]
        dataset = data.sequence_dataset(prompts, targets, max_len)
        self.max_len = max_len
        self._loader = data.make_train_iterator(
            dataset, batch_size, buckets=(max_len,), seed=seed, pad_id=pad_id
        )

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self._loader:
            positions = logprobs.scored_positions(batch["sequence_index"], self.max_len - 1)
            yield {**batch, "scored_positions": positions}

    def get_state(self) -> Any:
        return self._loader.get_state()

    def set_state(self, state: Any) -> None:
        self._loader.set_state(state)


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
    def _fn(self) -> Callable[[Any, Mapping[str, Any], int], Any]:
        from dpo_jax import scoring

        return scoring.host_scorer(self.model.apply)

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
            # One K for every call (the longest completion), so one compiled program.
            batch["scored_positions"] = logprobs.scored_positions(
                batch["sequence_index"], self.length - 1
            )
            out.append(np.asarray(self._fn(params, batch, self.rows).logps_S)[:real])
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


def split_by_prompt(pairs: PairData, val_fraction: float, seed: int) -> tuple[PairData, PairData]:
    """(train, validation) pairs: every pair of a `val_fraction` share (rounded up) of the
    distinct prompts, drawn with `seed`, is held out (pairs of one prompt stay on one side, so
    validation prompts are unseen in training). Order within each side is kept."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(pairs.prompts):
        groups.setdefault(tuple(prompt), []).append(i)
    keys = list(groups)
    num_val = int(np.ceil(val_fraction * len(keys)))  # at least one prompt held out
    if not 0 < num_val < len(keys):
        raise ValueError(f"val_fraction={val_fraction} of {len(keys)} prompts leaves a side empty")
    held = np.random.default_rng(seed).permutation(len(keys))[:num_val]
    is_val = np.zeros(len(pairs), bool)
    is_val[[i for k in held for i in groups[keys[k]]]] = True

    def subset(mask: np.ndarray) -> PairData:
        idx = np.flatnonzero(mask)
        return PairData([pairs.prompts[i] for i in idx], [pairs.chosen[i] for i in idx],
                        [pairs.rejected[i] for i in idx], pairs.ref_chosen[idx],
                        pairs.ref_rejected[idx])  # fmt: skip

    return subset(~is_val), subset(is_val)


def pair_eval_batches(
    pairs: PairData, micro_pairs: int, length: int, pad_id: int
) -> Iterator[dict[str, np.ndarray]]:
    """Every pair once, in order, in host batches of at most `micro_pairs` pairs (the
    last may be smaller): for scoring all of them on each process, not for training."""
    for start in range(0, len(pairs), micro_pairs):
        yield pairs.batch(np.arange(start, min(start + micro_pairs, len(pairs))), length, pad_id)


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
