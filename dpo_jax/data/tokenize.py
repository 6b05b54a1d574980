"""Tokenization with TRL's boundary convention, truncation, and an on-disk cache.

Convention (TRL 1.16, `DPOTrainer` / `KTOTrainer` dataset preparation):
- plain text: the eos token text is appended to each completion (unless it
  already ends with it); prompt ids = tok(prompt), full ids = tok(prompt +
  completion), both with the tokenizer's special tokens (e.g. BOS);
- chat-rendered text (conversational rows): no eos is added (the template ends
  the turn); both parts are encoded with `add_special_tokens=False`, which is
  what `apply_chat_template(..., tokenize=True)` does;
- the prompt length is the common prefix of tok(prompt) with every tok(prompt +
  completion) of the example; completion ids start there. When tok(prompt) is
  not a prefix (a merge across the boundary), the prompt's tail is left out, as
  TRL does; such examples are counted and reported in one warning.

Truncation (all lengths in tokens), applied in this order:
- `max_prompt_length` (no TRL 1.16 equivalent; None by default): keep the END of
  the prompt (the part next to the answer).
- `max_completion_length`: keep the START of each completion.
- `max_length` with `truncation_mode`:
  - "keep_start" (TRL 1.16's default, exactly its per-sequence rule): each
    prompt+completion keeps its first `max_length` tokens, so the completions' ends
    are cut. A prompt that alone needs `max_length` tokens or more is a bad row
    ("prompt_too_long"; TRL drops these silently, here it is an error naming the
    row unless `skip_bad_rows`, which drops and records it).
  - "keep_end" (TRL 1.16, deprecated there): each sequence independently keeps its
    last `max_length` tokens, so chosen and rejected may keep different parts of
    the prompt; the rejected sequence's prompt is then stored as `rejected_prompt`
    (the prefix-shared layout cannot share it). A sequence whose prompt is cut
    away entirely keeps its first remaining token as a one-token prompt, because
    TRL never scores a sequence's first token either.
  - "keep_end_prompt" (this project's prompt-aware mode; a shared prompt, so the
    prefix-shared layout stays exact): a prompt that alone needs `max_length`
    tokens is a bad row; otherwise drop tokens from the shared prompt's start
    (keeping at least one), then cut the completions' ends if still too long.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpo_jax import paths
from dpo_jax.data.batching import context_and_targets
from dpo_jax.data.errors import DataError, RejectLog
from dpo_jax.data.formats import Example, PreferenceExample, SFTExample, common_prefix_length
from dpo_jax.data.spec import complete_spec
from dpo_jax.errors import UserError

CACHE_VERSION = 3  # 3: keep_end is TRL's per-sequence rule
TRUNCATION_MODES = ("keep_start", "keep_end", "keep_end_prompt")


@dataclass(frozen=True)
class TokenizeSettings:
    """Length limits and truncation; part of the cache key. Built by `settings_from_spec`
    (every field given: the defaults are `configs.default.data_spec()`'s)."""

    max_length: int | None
    max_prompt_length: int | None
    max_completion_length: int | None
    truncation_mode: str
    add_eos: bool

    def __post_init__(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(
                f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}"
            )
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be positive, got {v}")


def settings_from_spec(spec: Any = None) -> TokenizeSettings:
    """The tokenize settings a data spec (dict or the trainer's `config.data`, possibly
    partial: `complete_spec`) asks for; no spec: configs/default.py's."""
    spec = complete_spec(spec or {})
    return TokenizeSettings(**{f.name: spec[f.name] for f in dataclasses.fields(TokenizeSettings)})


class Ragged:
    """Variable-length int32 sequences stored flat with offsets (cheap to save and slice)."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values = np.asarray(values, np.int32)
        self.offsets = np.asarray(offsets, np.int64)

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> Ragged:
        """Build from a list of id lists."""
        lengths = np.array([len(s) for s in seqs], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = (
            np.concatenate([np.asarray(s, np.int32) for s in seqs])
            if len(seqs)
            else np.zeros(0, np.int32)
        )
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """Length of every sequence."""
        return np.diff(self.offsets)

    def head(self, n: int) -> Ragged:
        """The first `n` sequences (views, nothing copied)."""
        return Ragged(self.values[: self.offsets[n]], self.offsets[: n + 1])


KINDS = ("paired", "unpaired", "sft")


class TokenizedDataset:
    """Token ids per example, random access; `kind` is 'paired', 'unpaired' or 'sft'.

    Paired items: {"prompt", "chosen", "rejected"} int32 arrays (+ "ref_chosen",
    "ref_rejected" floats when precomputed; + "rejected_prompt" under TRL's
    per-sequence keep_end, where the rejected sequence kept other prompt tokens). Unpaired items: {"prompt",
    "completion"} arrays, "label" int (+ "ref"). SFT items: {"prompt", "completion"}
    (the completion holds the targets).
    """

    def __init__(
        self,
        kind: str,
        ragged: dict[str, Ragged],
        dense: dict[str, np.ndarray],
        stats: dict[str, Any] | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.ragged = ragged
        self.dense = dense
        self.stats = dict(stats or {})

    def __len__(self) -> int:
        return len(self.ragged["prompt"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {k: r[i] for k, r in self.ragged.items()}
        item.update({k: v[i] for k, v in self.dense.items()})
        return item

    def head(self, n: int) -> TokenizedDataset:
        """The first `n` examples."""
        return TokenizedDataset(
            self.kind,
            {k: r.head(n) for k, r in self.ragged.items()},
            {k: v[:n] for k, v in self.dense.items()},
            self.stats,
        )

    @property
    def completion_keys(self) -> tuple[str, ...]:
        """Names of the completion columns."""
        return ("chosen", "rejected") if self.kind == "paired" else ("completion",)

    def sequence_lengths(self) -> np.ndarray:
        """Longest prompt+completion length per example (what padding must fit)."""
        p = self.ragged["prompt"].lengths
        lens = [p + self.ragged[k].lengths for k in self.completion_keys]
        if "rejected_prompt" in self.ragged:
            lens[1] = self.ragged["rejected_prompt"].lengths + self.ragged["rejected"].lengths
        return np.max(lens, axis=0)

    def save(self, path: paths.PathLike) -> None:
        """Write to one .npz file (atomically)."""
        arrays: dict[str, np.ndarray] = {}
        for k, r in self.ragged.items():
            arrays[f"ragged/{k}/values"] = r.values
            arrays[f"ragged/{k}/offsets"] = r.offsets
        for k, v in self.dense.items():
            arrays[f"dense/{k}"] = v
        arrays["meta"] = np.frombuffer(
            json.dumps({"kind": self.kind, "stats": self.stats}).encode(), np.uint8
        )
        paths.write_npz(path, arrays)  # atomic, unique temp name even across hosts

    @classmethod
    def load(cls, path: paths.PathLike) -> TokenizedDataset:
        """Read a file written by `save`."""
        z = paths.read_npz(path)
        meta = json.loads(bytes(z["meta"]).decode())
        ragged, dense = {}, {}
        for name in z:
            parts = name.split("/")
            if parts[0] == "ragged" and parts[2] == "values":
                ragged[parts[1]] = Ragged(z[name], z[f"ragged/{parts[1]}/offsets"])
            elif parts[0] == "dense":
                dense[parts[1]] = z[name]
        # Keep the column order stable (prompt first) regardless of npz ordering.
        order = ["prompt", "chosen", "rejected", "completion", "rejected_prompt"]
        ragged = {k: ragged[k] for k in order if k in ragged}
        return cls(meta["kind"], ragged, dense, meta["stats"])


def sequence_dataset(
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    max_length: int | None = None,
) -> TokenizedDataset:
    """An 'sft' dataset from token lists (context, targets), for `make_train_iterator`
    (`batching.context_and_targets` says how they are cut)."""
    ps, ts = context_and_targets(prompts, targets, max_length)
    ragged = {"prompt": Ragged.from_lists(ps), "completion": Ragged.from_lists(ts)}
    return TokenizedDataset("sft", ragged, {}, {"num_examples": len(ps)})


# ----------------------------------------------------------------------------- core


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"])


def encode_prompts(examples: Sequence[Example], tokenizer: Any) -> list[list[int]]:
    """Token ids of each example's prompt, as `tokenize_examples` encodes prompts: special
    tokens added to plain text, none to chat-rendered text (it holds them)."""
    out: list[list[int]] = [[] for _ in examples]
    for chat in (False, True):
        idx = [i for i, ex in enumerate(examples) if ex.chat == chat]
        for i, ids in zip(
            idx, _encode(tokenizer, [examples[i].prompt for i in idx], not chat), strict=True
        ):
            out[i] = list(ids)
    return out


def split_completions(
    prompt_ids: Sequence[int], full_ids: Sequence[Sequence[int]]
) -> tuple[list[int], list[list[int]], bool]:
    """TRL split: prompt = common prefix with every full sequence; completions = the rest.

    Also returns whether tok(prompt) was a prefix of every full sequence.
    """
    n = min(common_prefix_length(prompt_ids, f) for f in full_ids)
    return list(prompt_ids[:n]), [list(f[n:]) for f in full_ids], n == len(prompt_ids)


def keep_end_per_sequence(
    prompt: list[int], completion: list[int], max_length: int
) -> tuple[list[int], list[int]]:
    """TRL 1.16 keep_end for one sequence: (prompt, completion) of its last `max_length` tokens.

    When the prompt is cut away entirely, the first kept token becomes a one-token
    prompt: TRL never scores a sequence's first token (nothing predicts it).
    """
    drop = max(0, len(prompt) + len(completion) - max_length)
    p, c = prompt[drop:], completion[max(0, drop - len(prompt)) :]
    if not p:
        p, c = c[:1], c[1:]
    return p, c


def truncate(
    prompt: list[int], completions: list[list[int]], settings: TokenizeSettings
) -> tuple[list[int], list[list[int]]]:
    """Apply the length limits described in the module docstring (shared-prompt modes).

    For `truncation_mode="keep_end"` use `truncate_sequences`, which may give each
    completion its own prompt.
    """
    s = settings
    if s.max_prompt_length is not None and len(prompt) > s.max_prompt_length:
        prompt = prompt[len(prompt) - s.max_prompt_length :]
    if s.max_completion_length is not None:
        completions = [c[: s.max_completion_length] for c in completions]
    if s.max_length is not None and s.truncation_mode != "keep_end":
        if len(prompt) >= s.max_length:
            raise DataError(
                f"prompt is {len(prompt)} tokens, leaving no room under max_length={s.max_length}"
                " (TRL drops such rows: set data.skip_bad_rows=True to drop and record them,"
                " or data.max_prompt_length to truncate prompts)",
                reason="prompt_too_long",
            )
        overflow = len(prompt) + max(len(c) for c in completions) - s.max_length
        if overflow > 0 and s.truncation_mode == "keep_end_prompt":
            drop = min(overflow, len(prompt) - 1)
            prompt = prompt[drop:]
        room = s.max_length - len(prompt)
        completions = [c[:room] for c in completions]
    return prompt, completions


def truncate_sequences(
    prompt: list[int], completions: list[list[int]], settings: TokenizeSettings
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt per completion, completions) after every length limit, in any mode."""
    prompt, completions = truncate(prompt, completions, settings)
    if settings.max_length is None or settings.truncation_mode != "keep_end":
        return [prompt] * len(completions), completions
    pairs = [keep_end_per_sequence(prompt, c, settings.max_length) for c in completions]
    if not all(c for _, c in pairs):
        raise DataError(
            f"no completion token is left under max_length={settings.max_length}",
            reason="completion_truncated_away",
        )
    return [p for p, _ in pairs], [c for _, c in pairs]


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    settings: TokenizeSettings | None = None,
    rejects: RejectLog | None = None,
) -> TokenizedDataset:
    """Tokenize parsed examples (all paired or all unpaired) without caching; no
    `settings`: configs/default.py's (`settings_from_spec()`)."""
    settings = settings or settings_from_spec()
    rejects = rejects or RejectLog()
    if not examples:
        raise ValueError("no examples to tokenize")
    paired = isinstance(examples[0], PreferenceExample)
    sft = isinstance(examples[0], SFTExample)
    keys = ("chosen", "rejected") if paired else ("completion",)
    eos = tokenizer.eos_token if settings.add_eos else None
    if settings.add_eos and not eos:
        raise UserError("the tokenizer has no eos_token; set add_eos=False or give it one")

    def completion_text(ex: Example, key: str) -> str:
        text = getattr(ex, key)
        # TRL adds eos to plain-text completions only; chat templates end turns themselves.
        if eos and not ex.chat and not text.endswith(eos):
            text += eos
        return text

    # Batch-encode per special-token mode: chat-rendered text already holds them.
    prompt_ids = encode_prompts(examples, tokenizer)
    full_ids: dict[str, list[list[int]]] = {k: [[] for _ in examples] for k in keys}
    for chat in (False, True):
        idx = [i for i, ex in enumerate(examples) if ex.chat == chat]
        if not idx:
            continue
        for k in keys:
            texts = [examples[i].prompt + completion_text(examples[i], k) for i in idx]
            for i, ids in zip(idx, _encode(tokenizer, texts, not chat), strict=True):
                full_ids[k][i] = ids

    # TRL's keep_end may keep different prompt tokens for the rejected sequence.
    per_sequence_prompts = (
        paired and settings.max_length is not None and settings.truncation_mode == "keep_end"
    )
    cols: dict[str, list] = {k: [] for k in ("prompt", *keys)}
    if per_sequence_prompts:
        cols["rejected_prompt"] = []
    dense: dict[str, list] = (
        {"ref_chosen": [], "ref_rejected": [], "margin": []} if paired else {"label": [], "ref": []}
    )
    if sft:
        dense = {}
    mismatches = 0
    for i, ex in enumerate(examples):
        p, comps, ok = split_completions(prompt_ids[i], [full_ids[k][i] for k in keys])
        mismatches += not ok
        try:
            if sft and not p and comps[0]:
                # Language modelling: the first token has no context, so it is the prompt
                # (TRL never scores a sequence's first token either).
                p, comps = comps[0][:1], [comps[0][1:]]
            if not p:
                raise DataError(
                    "prompt tokenizes to no tokens, so the first completion token has no context",
                    reason="empty_prompt",
                )
            if not all(comps):
                raise DataError("a completion tokenizes to no tokens", reason="empty_completion")
            prompts, comps = truncate_sequences(p, comps, settings)
        except DataError as e:
            rejects.handle(e.located(ex.source or "<examples>", ex.line), dataclasses.asdict(ex))
            continue
        cols["prompt"].append(prompts[0])
        if per_sequence_prompts:
            cols["rejected_prompt"].append(prompts[1])
        for k, c in zip(keys, comps, strict=True):
            cols[k].append(c)
        if paired:
            dense["ref_chosen"].append(ex.ref_chosen_logp)
            dense["ref_rejected"].append(ex.ref_rejected_logp)
            dense["margin"].append(ex.margin)
        elif not sft:
            dense["label"].append(int(ex.label))
            dense["ref"].append(ex.ref_logp)

    if mismatches:
        warnings.warn(
            f"{mismatches} example(s): tok(prompt) is not a prefix of tok(prompt + completion);"
            " the prompt was cut to the common prefix and the completion starts there, as TRL does",
            stacklevel=2,
        )
    dense_arrays: dict[str, np.ndarray] = {}
    for k, vals in dense.items():
        if k == "label":
            dense_arrays[k] = np.asarray(vals, np.int32)
        elif vals and all(v is not None for v in vals):
            dense_arrays[k] = np.asarray(vals, np.float32)
        elif any(v is not None for v in vals) and k == "margin":
            raise UserError(
                "the 'margin' column is present on some rows only; give every row one or none"
            )
        elif any(v is not None for v in vals):
            raise UserError(
                f"reference log-probs ({k}) are present on some rows only; give every row both "
                "columns or none (recompute them with `dpo-jax ref-logps`)"
            )
    stats = {"num_examples": len(cols["prompt"]), "prefix_mismatches": mismatches}
    return TokenizedDataset(
        "paired" if paired else "sft" if sft else "unpaired",
        {k: Ragged.from_lists(v) for k, v in cols.items()},
        dense_arrays,
        stats,
    )


# ----------------------------------------------------------------------------- cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything about a tokenizer that can change token ids.

    The backend's truncation and padding are left out: `transformers` rewrites them in
    place on every call (`tok(x, truncation=True, max_length=n)` leaves truncation on
    until the next call turns it off) and `save_pretrained` writes whatever the last call
    left, while every call here states its own. With them, one tokenizer's fingerprint
    changed with its call history, and a copy saved after such a call differed from the
    original (PPO's `reward_model:DIR` then judged the policy's tokenizer foreign).
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(_backend_without_call_state(backend).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": tokenizer.eos_token_id,
        "bos": getattr(tokenizer, "bos_token_id", None),
        "special": sorted(map(str, getattr(tokenizer, "all_special_tokens", []))),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _backend_without_call_state(backend: Any) -> str:
    """The backend's JSON with truncation and padding off (a copy; `backend` is kept)."""
    if backend.truncation is None and backend.padding is None:
        return backend.to_str()  # the common case, without a copy
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy.to_str()


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """Hash of the parsed examples (content, labels, reference values, origin)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(dataclasses.asdict(ex), sort_keys=True).encode())
        h.update(b"\x00")
    return h.hexdigest()


def cache_key(tokenizer: Any, examples: Sequence[Example], settings: TokenizeSettings) -> str:
    """The cache key: (tokenizer, data, settings, cache format version)."""
    parts = {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": examples_fingerprint(examples),
        "settings": dataclasses.asdict(settings),
        "version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def tokenize_cached(
    examples: Sequence[Example],
    tokenizer: Any,
    settings: TokenizeSettings | None = None,
    rejects: RejectLog | None = None,
    cache_dir: str | None = None,
) -> TokenizedDataset:
    """`tokenize_examples` with a disk cache; a hit skips tokenization entirely.

    Rows rejected while tokenizing are stored with the cache and replayed into
    `rejects` on a hit, so skip/raise behaviour is the same either way. No `settings`:
    configs/default.py's.
    """
    settings = settings or settings_from_spec()
    rejects = rejects or RejectLog()
    if cache_dir is None:
        return tokenize_examples(examples, tokenizer, settings, rejects)
    key = cache_key(tokenizer, examples, settings)
    path = paths.Path(cache_dir) / f"tokenized-{key}.npz"
    if path.exists():
        ds = TokenizedDataset.load(path)
        for rec in ds.stats.get("rejects", []):
            rejects.handle(
                DataError(
                    rec["problem"], source=rec["source"], line=rec["line"], reason=rec["reason"]
                ),
                rec["row"],
            )
        ds.stats["from_cache"] = True
        return ds
    # Collect this stage's rejects separately so the cache can replay them.
    local = RejectLog(skip_bad_rows=True)
    ds = tokenize_examples(examples, tokenizer, settings, local)
    for rec in local.rejects:
        rejects.handle(
            DataError(rec["problem"], source=rec["source"], line=rec["line"], reason=rec["reason"]),
            rec["row"],
        )
    ds.stats["rejects"] = local.rejects
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save(path)
    ds.stats["from_cache"] = False
    return ds
