"""Batched autoregressive generation with a KV cache, compiled once per shape.

Two jitted programs do the whole generation, with nothing going back to the host
between them: the prefill, one forward over the left-padded prompts that fills the
KV cache, and the decode, a ``lax.while_loop`` that samples one token per step for
every row and feeds it back, until every row has emitted an end-of-sequence token or
``max_new_tokens`` is reached. The prefill is compiled once per (rows, prompt bucket,
max_new_tokens), the decode once per those and the decoding mode; temperature, top-p,
the EOS ids, the prompts, the key and the parameter values are traced, so successive
rollouts and rounds of an on-policy run reuse both (``tests/test_sampler_compiles.py``).

Decoding (`token_choice`): greedy (``temperature=0``), or a temperature with optional
top-k then top-p, as Hugging Face's ``generate``. A fixed ``jax.random`` key gives the
same samples on every run and every mesh (threefry is partitionable).

Log-probs returned per generated token:

- ``logps``: log pi(token | prefix) under the *model's own distribution*
  (temperature 1, no truncation). This is what a KL estimate, PPO and a
  reference-model comparison need.
- ``sampling_logps``: the log-prob under the distribution actually sampled from
  (after temperature, top-k and top-p). Equal to ``logps`` at temperature 1
  without truncation; 0 for greedy.

Both are 0 at positions after a row finished (see ``SampleOutput.mask``).

Row order: ``n`` samples per prompt are consecutive rows, row ``i * n + j`` is
sample ``j`` of prompt ``i`` (``SampleOutput.prompt_index``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dpo_jax import models, scoring, sharding, token_choice
from dpo_jax.data import batching
from dpo_jax.errors import UserError

DEFAULT_PROMPT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to decode. ``temperature=0`` means greedy; ``top_k=0`` and ``top_p=1`` mean off."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS
    # Longer prompts keep their last tokens (the end of a prompt matters most for a
    # continuation); None = refuse prompts longer than the model's context.
    max_prompt_length: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(
                f"SamplingConfig: max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if not self.temperature >= 0:
            raise UserError(f"SamplingConfig: temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"SamplingConfig: top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"SamplingConfig: top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise UserError(f"SamplingConfig: n must be >= 1, got {self.n}")
        if not self.prompt_buckets or any(b < 1 for b in self.prompt_buckets):
            raise UserError(f"SamplingConfig: bad prompt_buckets {self.prompt_buckets}")
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax."""
        return self.temperature == 0.0

    @property
    def is_unbiased(self) -> bool:
        """True when samples come from the model's own distribution (KL estimates need this)."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0


@dataclasses.dataclass
class SampleOutput:
    """Generated tokens for ``N = num_prompts * n`` rows (host numpy arrays)."""

    prompt_ids: np.ndarray  # [N, P] int32, left-padded with pad_token_id
    prompt_lengths: np.ndarray  # [N] int32
    tokens: np.ndarray  # [N, M] int32, pad_token_id after a row finished
    lengths: np.ndarray  # [N] int32, generated tokens including the EOS if emitted
    logps: np.ndarray  # [N, M] float32, model log-probs (temperature 1, untruncated)
    sampling_logps: np.ndarray  # [N, M] float32, log-probs under the sampling distribution
    finished: np.ndarray  # [N] bool, emitted an EOS token
    prompt_index: np.ndarray  # [N] int32, which prompt each row continues
    config: SamplingConfig
    texts: list[str] | None = None  # decoded completions (EOS and padding dropped)
    logits: np.ndarray | None = None  # [N, M, V] float32, only with return_logits=True

    @property
    def mask(self) -> np.ndarray:
        """[N, M] bool: True at generated tokens (including the EOS), False after."""
        return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

    def completion_ids(self, keep_eos: bool = False) -> list[list[int]]:
        """Generated token ids per row, without padding (and without the EOS by default)."""
        out = []
        for row, length, fin in zip(self.tokens, self.lengths, self.finished, strict=True):
            ids = row[: int(length)].tolist()
            if fin and not keep_eos:
                ids = ids[:-1]
            out.append(ids)
        return out


# --------------------------------------------------------------------- the model


def _model_and_cfg(model: Any) -> tuple[Any, Any]:
    """Accept a ``models.Transformer`` or a ``models.ModelConfig``."""
    if isinstance(model, models.ModelConfig):
        return models.Transformer(model), model
    for attr in ("cfg", "config"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, models.ModelConfig):
            return model, cfg
    raise TypeError(
        f"sampling: expected a models.Transformer or models.ModelConfig, got {type(model).__name__}"
    )


def _max_positions(cfg: Any) -> int | None:
    """Hard position limit: only a learned position table has one (RoPE extrapolates)."""
    if getattr(cfg, "position_embedding", None) == "learned":
        return int(cfg.max_position_embeddings)
    return None


def _prefill_core(
    model: Any,
    cfg: Any,
    params: Any,
    prompt_ids_NxP: jax.Array,
    prompt_lengths_N: jax.Array,
    *,
    max_new_tokens: int,
) -> tuple[Any, jax.Array, jax.Array]:
    """The prompt forward: ``(cache, logits_NxV, kv_mask_NxS)``; pure, meant to be jitted.

    ``logits_NxV`` (float32, the real vocabulary) predicts each row's first new token.
    """
    num_rows, prompt_len = prompt_ids_NxP.shape
    cache_len = prompt_len + max_new_tokens
    pad_N = prompt_len - prompt_lengths_N
    # Left padding: slot s of row n is a real key iff s >= pad_n; generated slots all are.
    kv_mask_NxS = jnp.arange(cache_len)[None, :] >= pad_N[:, None]
    positions_NxP = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad_N[:, None], 0)

    cache = models.init_cache(cfg, num_rows, cache_len)
    hidden_NxPxD, mutated = model.apply(
        {"params": params, "cache": cache},
        prompt_ids_NxP,
        positions=positions_NxP.astype(jnp.int32),
        kv_mask=kv_mask_NxS,
        decode=True,
        return_hidden=True,
        mutable=["cache"],
    )
    # Unembed only the last prompt slot (always a real token with left padding): the
    # full [N, P, V] prefill logits would dominate memory at large vocabularies.
    logits_Nx1xV = model.apply({"params": params}, hidden_NxPxD[:, -1:], method="logits")
    # Only the real vocabulary: padding ids (masked by the model) are never drawn, and the
    # random draws have the same shape as for the unpadded model (same key, same tokens).
    logits_NxV = logits_Nx1xV[:, 0, : cfg.vocab_size].astype(jnp.float32)
    return mutated["cache"], logits_NxV, kv_mask_NxS


def _decode_core(
    model: Any,
    cfg: Any,
    params: Any,
    cache: Any,
    logits_NxV: jax.Array,
    kv_mask_NxS: jax.Array,
    prompt_lengths_N: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    eos_E: jax.Array,
    pad_token_id: jax.Array,
    *,
    max_new_tokens: int,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
    return_logits: bool,
) -> dict[str, jax.Array]:
    """Sample up to ``max_new_tokens`` per row from the prefill's cache; pure, jitted.

    A ``while_loop`` step samples token t from the current logits and feeds it through
    the model for the next logits, until every row has ended. The last token is sampled
    after the loop: its forward would feed nothing, so a call runs one decode forward
    fewer than it samples tokens.

    ``eos_E`` holds the EOS ids padded with -1 (never a token), so a different EOS
    set or pad id reuses the compiled function.
    """
    num_rows = logits_NxV.shape[0]
    steps = max_new_tokens
    vocab = cfg.vocab_size

    def sample(s: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Token t for every live row from ``s["logits"]``; writes column t."""
        t = s["t"]
        tok_N, slogp_N = token_choice.sample_logits(
            s["logits"],
            jax.random.fold_in(key, t),
            temperature,
            greedy=greedy,
            top_k=top_k,
            top_p=top_p,
            use_top_p=use_top_p,
        )
        logp_N = token_choice.token_logps(s["logits"], tok_N)
        live_N = ~s["done"]
        tok_N = jnp.where(live_N, tok_N, pad_token_id)
        new = dict(s)
        new["tokens"] = jax.lax.dynamic_update_slice(s["tokens"], tok_N[:, None], (0, t))
        new["logps"] = jax.lax.dynamic_update_slice(
            s["logps"], jnp.where(live_N, logp_N, 0.0)[:, None], (0, t)
        )
        new["sampling_logps"] = jax.lax.dynamic_update_slice(
            s["sampling_logps"], jnp.where(live_N, slogp_N, 0.0)[:, None], (0, t)
        )
        if return_logits:
            # A step after every row ended keeps its zeros (the loop never reaches one).
            step_logits = jnp.where(jnp.any(live_N), s["logits"], 0.0)
            new["all_logits"] = jax.lax.dynamic_update_slice(
                s["all_logits"], step_logits[:, None, :], (0, t, 0)
            )
        new["lengths"] = s["lengths"] + live_N.astype(jnp.int32)
        new["done"] = s["done"] | (live_N & jnp.isin(tok_N, eos_E))
        new["tok"] = tok_N
        return new

    def cond(s: dict[str, jax.Array]) -> jax.Array:
        return (s["t"] < steps - 1) & ~jnp.all(s["done"])

    def body(s: dict[str, jax.Array]) -> dict[str, jax.Array]:
        new = sample(s)
        positions_N1 = (prompt_lengths_N + s["t"])[:, None].astype(jnp.int32)
        step_logits, mutated = model.apply(
            {"params": params, "cache": s["cache"]},
            new["tok"][:, None],
            positions=positions_N1,
            kv_mask=kv_mask_NxS,
            decode=True,
            mutable=["cache"],
        )
        new["cache"] = mutated["cache"]
        new["logits"] = step_logits[:, 0, :vocab].astype(jnp.float32)
        new["t"] = s["t"] + 1
        return new

    state = dict(
        t=jnp.zeros((), jnp.int32),
        cache=cache,
        logits=logits_NxV,
        tok=jnp.zeros((num_rows,), jnp.int32),
        tokens=jnp.full((num_rows, steps), pad_token_id, jnp.int32),
        logps=jnp.zeros((num_rows, steps), jnp.float32),
        sampling_logps=jnp.zeros((num_rows, steps), jnp.float32),
        lengths=jnp.zeros((num_rows,), jnp.int32),
        done=jnp.zeros((num_rows,), bool),
    )
    if return_logits:
        state["all_logits"] = jnp.zeros((num_rows, steps, vocab), jnp.float32)
    # Stopped early (every row ended), this last sample changes nothing: no row is live.
    final = sample(jax.lax.while_loop(cond, body, state))
    out = {k: final[k] for k in ("tokens", "logps", "sampling_logps", "lengths", "done")}
    if return_logits:
        out["logits"] = final["all_logits"]
    return out


def _static(config: SamplingConfig, return_logits: bool) -> tuple[Any, ...]:
    """The decode program's static settings (one compile each); the rest are traced."""
    return (
        config.max_new_tokens,
        config.greedy,
        int(config.top_k),
        config.top_p < 1.0,
        bool(return_logits),
    )


@functools.lru_cache(maxsize=64)
def _prefill_program(model: Any, cfg: Any, max_new_tokens: int) -> Any:
    """The jitted prompt forward per (model, cache length); jit caches per input shape."""
    return jax.jit(functools.partial(_prefill_core, model, cfg, max_new_tokens=max_new_tokens))


@functools.lru_cache(maxsize=64)
def _decode_program(model: Any, cfg: Any, static: tuple[Any, ...]) -> Any:
    """The jitted decode loop per (model, decoding mode); jit caches per input shape."""
    names = ("max_new_tokens", "greedy", "top_k", "use_top_p", "return_logits")
    kwargs = dict(zip(names, static, strict=True))
    return jax.jit(functools.partial(_decode_core, model, cfg, **kwargs))


# --------------------------------------------------------------------- batching


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= length; beyond the largest, the next multiple of it."""
    for b in sorted(buckets):
        if b >= length:
            return b
    top = max(buckets)
    return int(math.ceil(length / top) * top)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, buckets: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token-id prompts to a bucket length: ``(ids_BxP, lengths_B)``."""
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if lengths.size == 0:
        raise UserError("sampling: no prompts")
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise UserError(
            f"sampling: prompt {int(empty[0])} is empty (need at least one token, e.g. BOS)"
        )
    width = bucket_length(int(lengths.max()), buckets)
    ids = np.full((len(prompts), width), pad_token_id, np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = np.asarray(p, np.int32)
    return ids, lengths


def _data_parallel_size(mesh: Any) -> int:
    return int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.shape]))


def generate(
    model: Any,
    params: Any,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    config: SamplingConfig = SamplingConfig(),
    *,
    mesh: Any = None,
    return_logits: bool = False,
) -> SampleOutput:
    """Generate ``config.n`` continuations of each token-id prompt.

    Args:
      model: a ``models.Transformer`` or ``models.ModelConfig``.
      params: the model's parameter pytree (already sharded if ``mesh`` is given).
      prompts: token ids per prompt, any lengths >= 1 (left-padded here).
      key: ``jax.random`` key; the same key gives the same samples.
      config: decoding settings.
      mesh: the training mesh; rows are split over its data-parallel axes
        (padded with dummy rows to a multiple of their size, then dropped).
      return_logits: also return every step's full logits (tests, debugging).
    """
    model, cfg = _model_and_cfg(model)
    prompts = [list(p) for p in prompts]
    if config.max_prompt_length is not None:
        prompts = [p[-config.max_prompt_length :] for p in prompts]
    ids_BxP, lengths_B = left_pad(prompts, config.pad_token_id, config.prompt_buckets)
    bad = np.argwhere((ids_BxP < 0) | (ids_BxP >= cfg.vocab_size))
    if bad.size:
        row, col = (int(v) for v in bad[0])
        raise UserError(
            f"sampling: prompt {row} holds token id {int(ids_BxP[row, col])} outside the "
            f"model's vocabulary [0, {cfg.vocab_size})"
        )
    max_pos = _max_positions(cfg)
    need = int(lengths_B.max()) + config.max_new_tokens
    if max_pos is not None and need > max_pos:
        raise UserError(
            f"sampling: longest prompt ({int(lengths_B.max())}) + max_new_tokens "
            f"({config.max_new_tokens}) = {need} exceeds the model's {max_pos} positions; "
            "set max_prompt_length or lower max_new_tokens"
        )
    num_prompts = ids_BxP.shape[0]
    prompt_index_N = np.repeat(np.arange(num_prompts, dtype=np.int32), config.n)
    ids_NxP, lengths_N = ids_BxP[prompt_index_N], lengths_B[prompt_index_N]
    num_rows = ids_NxP.shape[0]

    padded_rows = num_rows
    if mesh is not None:
        dp = _data_parallel_size(mesh)
        padded_rows = int(math.ceil(num_rows / dp) * dp)
    if padded_rows != num_rows:
        extra = padded_rows - num_rows
        ids_NxP = np.concatenate([ids_NxP, np.repeat(ids_NxP[-1:], extra, axis=0)])
        lengths_N = np.concatenate([lengths_N, np.repeat(lengths_N[-1:], extra)])

    static = _static(config, return_logits)
    num_eos = 4 * max(1, math.ceil(len(config.eos_token_ids) / 4))
    eos_E = np.full((num_eos,), -1, np.int32)
    eos_E[: len(config.eos_token_ids)] = config.eos_token_ids
    prefill = _prefill_program(model, cfg, config.max_new_tokens)
    decode = _decode_program(model, cfg, static)
    args = (
        jnp.asarray(ids_NxP),
        jnp.asarray(lengths_N),
        key,
        jnp.asarray(max(config.temperature, 1e-6), jnp.float32),
        jnp.asarray(config.top_p, jnp.float32),
        jnp.asarray(eos_E),
        jnp.asarray(config.pad_token_id, jnp.int32),
    )
    if mesh is None:
        out = _run(prefill, decode, params, args)
    else:
        out = _run_sharded(prefill, decode, mesh, params, args)
        if jax.process_count() > 1:  # rows live on other hosts too: gather them
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
    out = jax.device_get(out)
    keep = slice(0, num_rows)
    return SampleOutput(
        prompt_ids=ids_NxP[keep],
        prompt_lengths=lengths_N[keep],
        tokens=np.asarray(out["tokens"][keep]),
        lengths=np.asarray(out["lengths"][keep]),
        logps=np.asarray(out["logps"][keep]),
        sampling_logps=np.asarray(out["sampling_logps"][keep]),
        finished=np.asarray(out["done"][keep]),
        prompt_index=prompt_index_N,
        config=config,
        logits=np.asarray(out["logits"][keep]) if return_logits else None,
    )


def _run(prefill: Any, decode: Any, params: Any, args: tuple[Any, ...]) -> dict[str, jax.Array]:
    """Prompt forward, then the decode loop on its cache (both stay on the device)."""
    ids, lengths, *scalars = args
    cache, logits, kv_mask = prefill(params, ids, lengths)
    return decode(params, cache, logits, kv_mask, lengths, *scalars)


def _run_sharded(
    prefill: Any, decode: Any, mesh: Any, params: Any, args: tuple[Any, ...]
) -> dict[str, jax.Array]:
    """Place rows on the data-parallel axes and run under the mesh and the rule table."""
    batch_axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.shape)
    rows = NamedSharding(mesh, PartitionSpec(batch_axes))
    ids, lengths, *scalars = args
    ids = jax.device_put(ids, NamedSharding(mesh, PartitionSpec(batch_axes, None)))
    lengths = jax.device_put(lengths, rows)
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(x: jax.Array) -> jax.Array:
        # device_put refuses a typed PRNG key for devices of other hosts: move its data
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(jax.random.key_data(x), replicated)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(x, replicated)

    scalars = [put(x) for x in scalars]
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        return _run(prefill, decode, params, (ids, lengths, *scalars))


# ----------------------------------------------------------------- text helpers


def eos_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's end-of-sequence id(s), for `SamplingConfig.eos_token_ids`."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


def generate_text(
    model: Any,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    key: jax.Array,
    config: SamplingConfig | None = None,
    *,
    mesh: Any = None,
    add_special_tokens: bool = False,
    return_logits: bool = False,
    **overrides: Any,
) -> SampleOutput:
    """Tokenize text prompts, generate, and decode completions into ``SampleOutput.texts``.

    EOS and pad ids default to the tokenizer's; ``overrides`` replace fields of
    ``config`` (e.g. ``n=4, temperature=0.7``). Completions are decoded without
    the EOS and with special tokens skipped, as TRL does.
    """
    if isinstance(prompts, str):
        raise TypeError("generate_text: prompts must be a list of strings, got one str")
    base = config or SamplingConfig(
        eos_token_ids=eos_ids(tokenizer),
        pad_token_id=pad_id(tokenizer),
    )
    config = dataclasses.replace(base, **overrides) if overrides else base
    ids = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    if not add_special_tokens and getattr(tokenizer, "bos_token_id", None) is not None:
        ids = [x if x else [tokenizer.bos_token_id] for x in ids]
    out = generate(model, params, ids, key, config, mesh=mesh, return_logits=return_logits)
    out.texts = tokenizer.batch_decode(out.completion_ids(), skip_special_tokens=True)
    return out


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (`SamplingConfig.pad_token_id`)."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


# ------------------------------------------------------ samples as rows, scored


def stacked_rows(samples: SampleOutput, pad_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The samples as a stacked batch (row k = sample k: its prompt, then its completion
    with the EOS; `sequence_index` marks the completion) and the `[S, M]` completion mask.

    Rows have one length per sampler shape: the sampler's prompt bucket + max_new_tokens
    (one compile of the step for the whole phase when prompts share a bucket).
    """
    prompt_len = samples.prompt_ids.shape[1]
    prompts = [
        row[prompt_len - int(n) :]
        for row, n in zip(samples.prompt_ids, samples.prompt_lengths, strict=True)
    ]
    comps = [np.asarray(c, np.int32) for c in samples.completion_ids(keep_eos=True)]
    length = prompt_len + samples.tokens.shape[1]
    return batching.build_stacked(prompts, comps, length, pad_id), samples.mask


def to_tokens(
    x_SxM: np.ndarray, mask_SxM: np.ndarray, sequence_index_SxL: np.ndarray
) -> np.ndarray:
    """Completion-aligned `[S, M]` values placed on their tokens `[S, L]` (0 elsewhere)."""
    out = np.zeros(sequence_index_SxL.shape, np.float32)
    out[sequence_index_SxL >= 0] = np.asarray(x_SxM, np.float32)[mask_SxM]
    return out


def from_tokens(
    x_SxL: np.ndarray, mask_SxM: np.ndarray, sequence_index_SxL: np.ndarray
) -> np.ndarray:
    """Token-aligned `[S, L]` values of the completion tokens, as `[S, M]` (0 past the end)."""
    out = np.zeros(mask_SxM.shape, np.float32)
    out[mask_SxM] = np.asarray(x_SxL, np.float32)[sequence_index_SxL >= 0]
    return out


def score_samples(model: Any, params: Any, samples: SampleOutput) -> np.ndarray:
    """Log-probs ``[N, M]`` of the generated tokens under ``params``, zero after each
    row's end: `scoring.score` over the samples as stacked rows (`stacked_rows`).

    Used for the reference model's log-probs in a KL estimate, and as the
    non-cached path that checks the KV-cache decode.
    """
    model, _ = _model_and_cfg(model)
    rows, mask_NxM = stacked_rows(samples, samples.config.pad_token_id)
    stats = _token_scorer(model)(params, rows, rows["input_ids"].shape[0])
    return from_tokens(np.asarray(stats.token_logps_NxL), mask_NxM, rows["sequence_index"])


@functools.lru_cache(maxsize=16)
def _token_scorer(model: Any) -> Any:
    """The host scorer of per-token log-probs for one model, built once."""
    return scoring.host_scorer(model.apply, needs=("token_logps",))
