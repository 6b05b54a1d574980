"""Grain input pipeline: deterministic per-epoch shuffling, multi-host sharding,
bucketed micro-batches, and an iterator state that is plain JSON.

Every host walks the same global plan: step `s` is in epoch `s // steps_per_epoch`;
an epoch is a permutation of the example indices drawn from `(seed, epoch)`, cut
into global batches of `pairs_per_batch` examples (a trailing partial batch is
dropped). Host `h` of `P` takes the h-th contiguous slice of each global batch.
The row length is chosen from the whole global batch (and packed row counts from
the largest host slice), so every host produces the same shapes.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from dpo_jax.data.batching import (
    LAYOUTS,
    bucket_length,
    build_batch,
    pack_plan,
    required_length,
    row_bucket,
    sequence_lengths,
)
from dpo_jax.data.tokenize import TokenizedDataset
from dpo_jax.errors import UserError

# Effectively unbounded: MapDataset.range is lazy.
_INFINITE_STEPS = 1 << 50


class BatchPlan:
    """Which example indices each host uses at each step; pure function of its arguments."""

    def __init__(
        self,
        num_examples: int,
        pairs_per_batch: int,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if pairs_per_batch % process_count:
            raise ValueError(
                f"pairs_per_batch={pairs_per_batch} must divide evenly over {process_count} processes"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if num_examples < pairs_per_batch:
            raise UserError(
                f"{num_examples} examples cannot fill one batch of {pairs_per_batch} examples; "
                "lower batch_size or add data"
            )
        self.num_examples = num_examples
        self.pairs_per_batch = pairs_per_batch
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.steps_per_epoch = num_examples // pairs_per_batch
        self.per_host = pairs_per_batch // process_count

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a plan lives as long as its iterator
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example order of one epoch."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of the global batch at `step` (all hosts)."""
        epoch, j = divmod(step, self.steps_per_epoch)
        g = self.pairs_per_batch
        return self.epoch_order(epoch)[j * g : (j + 1) * g]

    def host_slices(self, step: int) -> list[np.ndarray]:
        """The global batch cut into one slice per host."""
        idx = self.global_indices(step)
        return [idx[h * self.per_host : (h + 1) * self.per_host] for h in range(self.process_count)]


class _StepToBatch:
    """Picklable map function: step -> this host's micro-batch."""

    def __init__(
        self,
        data: TokenizedDataset,
        plan: BatchPlan,
        layout: str,
        buckets,
        pad_id: int,
        pack_length,
    ):
        self.data, self.plan, self.layout = data, plan, layout
        self.buckets, self.pad_id, self.pack_length = buckets, pad_id, pack_length
        self.prompt_lens = data.ragged["prompt"].lengths
        self.comp_lens = [data.ragged[k].lengths for k in data.completion_keys]
        rp = data.ragged.get("rejected_prompt")
        self.rejected_prompt_lens = None if rp is None else rp.lengths

    def _lengths(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.prompt_lens[idx]
        if self.rejected_prompt_lens is not None:  # one prompt per sequence
            p = np.concatenate([p, self.rejected_prompt_lens[idx]])
        if self.data.kind == "paired":
            c = np.concatenate([self.comp_lens[0][idx], self.comp_lens[1][idx]])
        elif self.data.kind == "sft":
            c = self.comp_lens[0][idx]
        else:
            own = self.comp_lens[0][idx]
            c = np.concatenate([own, np.roll(own, 1)])  # KL row i: completion i-1
        return p, c

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        slices = self.plan.host_slices(int(step))
        per_host = [self._lengths(s) for s in slices]
        num_rows = None
        if self.layout == "packed":
            longest = max(required_length("packed", p, c) for p, c in per_host)
            length = self.pack_length or bucket_length(longest, self.buckets)
            rows = max(len(pack_plan(sequence_lengths(p, c), length)) for p, c in per_host)
            num_rows = row_bucket(rows, 2 * self.plan.per_host)
        else:
            length = bucket_length(
                max(required_length(self.layout, p, c) for p, c in per_host), self.buckets
            )
        items = [self.data[int(i)] for i in slices[self.plan.process_index]]
        batch = build_batch(
            items, self.data.kind, self.layout, length=length, num_rows=num_rows, pad_id=self.pad_id
        )
        batch["step"] = np.asarray(step, np.int64)
        return batch


class TrainIterator:
    """Iterator of micro-batches with JSON-able `get_state()` / `set_state()`.

    Each batch also carries `step` (int64 scalar), the global step it was built for.
    """

    def __init__(
        self, dataset: grain.MapDataset, fingerprint: str, read_options: grain.ReadOptions
    ):
        self._fingerprint = fingerprint
        self._it = dataset.to_iter_dataset(read_options).__iter__()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """Plain-JSON state (save it with the checkpoint, e.g. `ocp.args.JsonSave`)."""
        return {"grain": self._it.get_state(), "fingerprint": self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume exactly after the batch where `get_state` was called."""
        if state.get("fingerprint") != self._fingerprint:
            raise UserError(
                "refusing to resume: the checkpointed data iterator belongs to a different "
                "data/batching setup (the training data's tokens, or how it is batched, "
                f"changed: fingerprint {state.get('fingerprint')!r}, now {self._fingerprint!r}); "
                "restore the original data.train file, or use a new run_dir"
            )
        self._it.set_state(state["grain"])


def content_fingerprint(tokenized: TokenizedDataset) -> str:
    """Hash of every token id (and reference value, label) of a tokenized dataset, in order."""
    h = hashlib.sha256(tokenized.kind.encode())
    for key in sorted(tokenized.ragged):
        r = tokenized.ragged[key]
        h.update(key.encode())
        start, stop = int(r.offsets[0]), int(r.offsets[-1])
        h.update(np.ascontiguousarray(r.values[start:stop]).tobytes())
        h.update(np.ascontiguousarray(r.offsets - start).tobytes())
    for key in sorted(tokenized.dense):
        h.update(key.encode())
        h.update(np.ascontiguousarray(tokenized.dense[key]).tobytes())
    return h.hexdigest()[:16]


def make_train_iterator(
    tokenized: TokenizedDataset,
    pairs_per_batch: int,
    layout: str = "stacked",
    buckets: Sequence[int] | None = None,
    seed: int = 0,
    *,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    pad_id: int = 0,
    pack_length: int | None = None,
    num_threads: int = 1,
    prefetch: int = 2,
) -> TrainIterator:
    """Micro-batch iterator for the train loop.

    `pairs_per_batch` is the GLOBAL number of pairs (or unpaired examples) per
    micro-batch; each of `process_count` hosts gets an equal slice. Process
    index/count default to `jax.process_index()` / `jax.process_count()`.
    `buckets`: allowed row lengths (None = powers of two >= 16). `pack_length`
    fixes the row length of the packed layout. `num_epochs=None` repeats forever.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    plan = BatchPlan(len(tokenized), pairs_per_batch, seed, shuffle, process_index, process_count)
    steps = _INFINITE_STEPS if num_epochs is None else num_epochs * plan.steps_per_epoch
    fn = _StepToBatch(tokenized, plan, layout, buckets, pad_id, pack_length)
    ds = grain.MapDataset.range(steps).map(fn)
    setup = {
        "n": len(tokenized),
        "kind": tokenized.kind,
        "pairs": pairs_per_batch,
        "seed": seed,
        "shuffle": shuffle,
        "layout": layout,
        "buckets": list(buckets) if buckets is not None else None,
        "lengths": hashlib.sha256(tokenized.sequence_lengths().tobytes()).hexdigest()[:16],
        # The token ids themselves: text edited in place with the same lengths is other data.
        "content": content_fingerprint(tokenized),
    }
    # Host count is left out on purpose: the plan is global, so a run may resume
    # on a different number of hosts.
    fingerprint = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return TrainIterator(ds, fingerprint, read_options)


def eval_batches(
    tokenized: TokenizedDataset,
    pairs_per_batch: int,
    layout: str = "stacked",
    buckets: Sequence[int] | None = None,
    *,
    limit: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    pad_id: int = 0,
    pack_length: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Every example once, in order, as this host's micro-batches (for evaluation).

    Full global batches are split over hosts like training batches. On one host
    the remainder becomes one last, smaller batch (one extra compiled shape);
    with several hosts it is dropped, since hosts must agree on shapes. An
    unpaired remainder of one example is dropped too (it cannot form a KL row).
    """
    n = len(tokenized) if limit is None or limit < 0 else min(limit, len(tokenized))
    full = n // pairs_per_batch
    it = make_train_iterator(
        tokenized.head(n), pairs_per_batch, layout, buckets, 0, shuffle=False, num_epochs=1,
        process_index=process_index, process_count=process_count, pad_id=pad_id,
        pack_length=pack_length,
    ) if full else iter(())  # fmt: skip
    out = list(it)
    rest = n - full * pairs_per_batch
    min_rest = 2 if tokenized.kind == "unpaired" else 1
    if process_count == 1 and rest >= min_rest:
        items = [tokenized[i] for i in range(full * pairs_per_batch, n)]
        batch = build_batch(
            items, tokenized.kind, layout, buckets=buckets, pad_id=pad_id,
            length=pack_length if layout == "packed" else None,
        )  # fmt: skip
        batch["step"] = np.asarray(full, np.int64)
        out.append(batch)
    return out
