"""Batch builders: stacked, packed and prefix-shared layouts (see docs/CONTRACTS.md).

Every layout is built from the same description of a micro-batch: `B` prompts
and `2B` completions, where completion `k` continues prompt `k mod B`.
- paired: completions are chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1};
- unpaired (KTO): completions are completion_0..completion_{B-1}, then the
  mismatched KL completions: sequence B+i pairs prompt i with completion
  (i-1) mod B, the same cyclic shift as TRL's KTOTrainer
  (`[c[-1]] + c[:-1]`).

A batch is a dict of numpy arrays: input_ids, positions, segment_ids,
sequence_index [N, L] int32; branch_ids [N, L] int32 (prefix_shared only; see
`dpo_jax.models.attention` for the mask rule these describe);
ref_logps [2B] float32 (paired, when precomputed; not for unpaired data, whose
KL rows depend on how batches are drawn); labels [B] int32 (unpaired).
The log-prob of a token marked `k` in sequence_index comes from the logits at
the previous row position, so every completion token follows at least one token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LAYOUTS = ("stacked", "packed", "prefix_shared")
MIN_POW2_BUCKET = 16


def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
    """Smallest bucket >= n; `None` means powers of two (at least 16)."""
    if n < 1:
        raise ValueError(f"sequence length must be positive, got {n}")
    if buckets is None:
        return max(MIN_POW2_BUCKET, 1 << (n - 1).bit_length())
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    raise ValueError(
        f"a batch needs length {n}, longer than the largest bucket {max(buckets)};"
        " add a bucket or lower max_length"
    )


def row_bucket(n: int, max_rows: int) -> int:
    """Row count for packed batches: next power of two, capped at `max_rows`."""
    return min(max_rows, 1 << max(0, (n - 1).bit_length()))


# ----------------------------------------------------------------------------- sequences


def sequences_of(items: Sequence[dict[str, Any]], kind: str) -> tuple[list, list]:
    """(prompts [B], completions [2B]) for paired or unpaired items, as in the module doc.

    Items with a `rejected_prompt` (TRL's per-sequence keep_end) give 2B prompts, one
    per completion; the stacked and packed layouts index prompts by `k % len(prompts)`.
    """
    prompts = [np.asarray(it["prompt"], np.int32) for it in items]
    if kind == "paired":
        comps = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        if "rejected_prompt" in items[0]:  # TRL keep_end: one prompt per sequence (2B)
            prompts += [np.asarray(it["rejected_prompt"], np.int32) for it in items]
    elif kind == "sft":  # single sequences: completion k continues prompt k
        comps = [it["completion"] for it in items]
    elif kind == "unpaired":
        b = len(items)
        if b < 2:
            raise ValueError("unpaired (KTO) batches need at least 2 examples to form KL rows")
        own = [it["completion"] for it in items]
        comps = own + [own[(i - 1) % b] for i in range(b)]
    else:
        raise ValueError(f"kind must be 'paired', 'unpaired' or 'sft', got {kind!r}")
    return prompts, [np.asarray(c, np.int32) for c in comps]


def sequence_lengths(prompt_lens: np.ndarray, comp_lens: np.ndarray) -> np.ndarray:
    """Full length of each of the 2B sequences."""
    n, b = len(comp_lens), len(prompt_lens)  # b is n/2, or n with per-sequence prompts
    return np.asarray(prompt_lens)[np.arange(n) % b] + np.asarray(comp_lens)


def required_length(layout: str, prompt_lens: np.ndarray, comp_lens: np.ndarray) -> int:
    """Row length a layout needs before bucketing (packed: the longest single sequence)."""
    b = len(prompt_lens)
    if layout in ("stacked", "packed"):
        return int(sequence_lengths(prompt_lens, comp_lens).max())
    if layout == "prefix_shared":
        if b == len(comp_lens):
            raise ValueError(
                "the prefix_shared layout needs one prompt per pair; TRL's per-sequence"
                " truncation_mode='keep_end' gives chosen and rejected their own prompts"
            )
        # prompt, first completion, one copied prompt token, second completion
        return int((np.asarray(prompt_lens) + comp_lens[:b] + 1 + comp_lens[b:]).max())
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def pack_plan(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """First-fit packing of sequences (in order) into rows of `row_length`."""
    rows: list[list[int]] = []
    free: list[int] = []
    for k, n in enumerate(lengths):
        if n > row_length:
            raise ValueError(
                f"sequence {k} has {n} tokens, longer than the pack length {row_length}"
            )
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(k)
                free[r] -= n
                break
        else:
            rows.append([k])
            free.append(row_length - n)
    return rows


# ----------------------------------------------------------------------------- layouts


def _empty(n: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.full((n, length), pad_id, np.int32),
        "positions": np.zeros((n, length), np.int32),
        "segment_ids": np.zeros((n, length), np.int32),
        "sequence_index": np.full((n, length), -1, np.int32),
    }


def _put(batch: dict, row: int, start: int, prompt, comp, k: int, segment: int) -> int:
    """Write prompt+completion k at [row, start:]; return the end offset."""
    p, c = len(prompt), len(comp)
    end = start + p + c
    batch["input_ids"][row, start:end] = np.concatenate([prompt, comp])
    batch["positions"][row, start:end] = np.arange(p + c)
    batch["segment_ids"][row, start:end] = segment
    batch["sequence_index"][row, start + p : end] = k
    return end


def build_stacked(prompts, comps, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Row k holds sequence k (N = 2B), right-padded to `length`."""
    b = len(prompts)
    batch = _empty(len(comps), length, pad_id)
    for k, comp in enumerate(comps):
        _put(batch, k, 0, prompts[k % b], comp, k, 1)
    return batch


def context_and_targets(
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    max_length: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Single sequences as (context, targets) int32 arrays: an empty prompt makes the
    first target token the context (nothing predicts it); `max_length` keeps each
    sequence's first tokens."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} target lists")
    ps, ts = [], []
    for k, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        p, t = list(p), list(t)
        if not p:
            p, t = t[:1], t[1:]
        if max_length is not None:
            p, t = p[:max_length], t[: max(0, max_length - len(p))]
        if not p or not t:
            raise ValueError(f"sequence {k} has no target token after its first token")
        ps.append(np.asarray(p, np.int32))
        ts.append(np.asarray(t, np.int32))
    return ps, ts


def build_sequences(
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    length: int | None = None,
    pad_id: int = 0,
    buckets: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """An SFT batch of single sequences: row k = prompt k + targets k, the targets marked
    as sequence k (N = rows), right-padded to `length` (default: the bucket of the longest).

    An empty prompt makes the first target token the context (nothing predicts it);
    sequences longer than `length` keep their first `length` tokens.
    """
    ps, ts = context_and_targets(prompts, targets, length)
    if length is None:
        length = bucket_length(max(len(p) + len(t) for p, t in zip(ps, ts, strict=True)), buckets)
    return build_stacked(ps, ts, length, pad_id)


def build_packed(
    prompts, comps, length: int, pad_id: int = 0, num_rows: int | None = None
) -> dict[str, np.ndarray]:
    """Sequences packed first-fit into rows; segment ids 1, 2, ... per row; positions restart."""
    b = len(prompts)
    lens = [len(prompts[k % b]) + len(c) for k, c in enumerate(comps)]
    plan = pack_plan(lens, length)
    n = num_rows if num_rows is not None else len(plan)
    if n < len(plan):
        raise ValueError(f"packing needs {len(plan)} rows, only {n} allowed")
    batch = _empty(n, length, pad_id)
    for r, ks in enumerate(plan):
        start = 0
        for seg, k in enumerate(ks, start=1):
            start = _put(batch, r, start, prompts[k % b], comps[k], k, seg)
    return batch


def build_prefix_shared(prompts, comps, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One row per prompt: prompt, completion i, a copy of the last prompt token, completion B+i.

    The copy sits at the last prompt position so the first token of the second
    completion is predicted from the same context as in the stacked layout.
    branch_ids (O(L), the attention rule in `dpo_jax.models.attention`): 0 on
    the prompt minus its last token (seen by both branches), 1 on the last
    prompt token and the first completion, 2 on the copy and the second
    completion. So, causally, prompt tokens see the prompt; the first
    completion sees the prompt and itself; the copy and the second completion
    see the prompt minus its last token (the copy replaces it), the copy and
    themselves. Padding (segment 0) sees nothing.
    """
    b = len(prompts)
    batch = _empty(b, length, pad_id)
    branch = np.zeros((b, length), np.int32)
    for i in range(b):
        p, c1, c2 = prompts[i], comps[i], comps[b + i]
        np_, n1, n2 = len(p), len(c1), len(c2)
        s1, sc, s2 = np_, np_ + n1, np_ + n1 + 1  # starts of c1, copy, c2
        end = s2 + n2
        batch["input_ids"][i, :end] = np.concatenate([p, c1, p[-1:], c2])
        batch["positions"][i, :end] = np.concatenate(
            [np.arange(np_ + n1), [np_ - 1], np.arange(np_, np_ + n2)]
        )
        batch["segment_ids"][i, :end] = 1
        batch["sequence_index"][i, s1:sc] = i
        batch["sequence_index"][i, s2:end] = b + i
        branch[i, np_ - 1 : sc] = 1  # last prompt token + first completion
        branch[i, sc:end] = 2  # copy + second completion
    batch["branch_ids"] = branch
    return batch


def build_batch(
    items: Sequence[dict[str, Any]],
    kind: str,
    layout: str = "stacked",
    *,
    buckets: Sequence[int] | None = None,
    length: int | None = None,
    num_rows: int | None = None,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Build one micro-batch from tokenized items (see the module docstring).

    `length` (row length) defaults to the bucket of what the layout needs;
    `num_rows` (packed only) defaults to the rows the packing uses.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    prompts, comps = sequences_of(items, kind)
    need = required_length(
        layout, np.array([len(p) for p in prompts]), np.array([len(c) for c in comps])
    )
    if length is None:
        length = bucket_length(need, buckets)
    elif length < need:
        raise ValueError(f"length {length} is shorter than the {need} tokens this batch needs")
    if layout == "stacked":
        batch = build_stacked(prompts, comps, length, pad_id)
    elif layout == "packed":
        batch = build_packed(prompts, comps, length, pad_id, num_rows)
    else:
        batch = build_prefix_shared(prompts, comps, length, pad_id)
    if kind == "paired" and all("ref_chosen" in it for it in items):
        batch["ref_logps"] = np.asarray(
            [it["ref_chosen"] for it in items] + [it["ref_rejected"] for it in items], np.float32
        )
    if kind == "paired" and all("margin" in it for it in items):
        batch["margin"] = np.asarray([it["margin"] for it in items], np.float32)
    if kind == "unpaired":
        batch["labels"] = np.asarray([it["label"] for it in items], np.int32)
    return batch


# ----------------------------------------------------------------------------- micro-batches


def pad_batch(batch: dict[str, np.ndarray], length: int, num_rows: int, pad_id: int = 0):
    """Pad a batch to `length` columns and `num_rows` rows (padding is unscored)."""
    n, cur = batch["input_ids"].shape
    if length < cur or num_rows < n:
        raise ValueError(f"cannot shrink a batch from ({n}, {cur}) to ({num_rows}, {length})")
    out = dict(batch)
    fills = {
        "input_ids": pad_id, "positions": 0, "segment_ids": 0, "sequence_index": -1,
        "branch_ids": 0,
    }  # fmt: skip
    for key, fill in fills.items():
        if key in batch:
            out[key] = np.pad(
                batch[key], ((0, num_rows - n), (0, length - cur)), constant_values=fill
            )
    return out


def stack_micro_batches(batches: Sequence[dict[str, np.ndarray]], pad_id: int = 0):
    """Stack A micro-batches on a new leading axis, padding them to a common shape."""
    length = max(b["input_ids"].shape[1] for b in batches)
    rows = max(b["input_ids"].shape[0] for b in batches)
    padded = [pad_batch(b, length, rows, pad_id) for b in batches]
    return {k: np.stack([b[k] for b in padded]) for k in padded[0]}
