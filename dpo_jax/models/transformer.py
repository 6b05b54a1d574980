"""One Flax Linen decoder-only transformer for every supported family.

`Transformer(cfg)` covers every family in `dpo_jax.models.families` (GPT-2,
GPT-NeoX/Pythia, Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 1/2/3, Phi-3); `ModelConfig`
switches select norms, activations, position embeddings, residual layout, biases, q/k
norm, post-norms, per-layer windows and RoPE bases, soft-caps and tied embeddings.

Full-sequence forward (training, scoring)::

    logits_NxLxV = model.apply({"params": params}, input_ids_NxL,
                               positions=positions_NxL,      # default arange(L)
                               segment_ids=segment_ids_NxL,  # default ones; 0 = padding
                               branch_ids=branch_ids_NxL)    # optional; prefix-shared rows
    hidden_NxLxD = model.apply(..., return_hidden=True)      # after the final norm
    logits = model.apply({"params": params}, hidden, method="logits")

A token attends to keys of the same non-zero segment at an earlier or equal
row index whose branch is 0 or its own (and, with `sliding_window`, fewer than
`sliding_window` positions back); see `dpo_jax.models.attention` for the rule
and the backends (`cfg.attention_impl`). No L x L array is part of the call.
Under a mesh whose `sequence` axis is n > 1 (with attention_impl auto or ring) the
forward is context-parallel: rows are padded to a multiple of 2n, laid out zig-zag
(`ring_attention.to_zigzag`), attended by ring attention and put back in order before
the final hidden states leave the model, so callers see no difference.
Padding rows (segment 0) attend to nothing; their outputs are finite and
meaningless.

KV-cache decoding (used by `dpo_jax.sampling`)::

    cache = init_cache(cfg, batch_size, max_len)   # zeros; one slot per generated/prompt token
    logits_NxTxV, mut = model.apply({"params": params, "cache": cache}, ids_NxT,
                                    positions=pos_NxT,      # required: real positions of the T tokens
                                    kv_mask=kv_mask_NxS,    # False = slot invalid (left padding)
                                    decode=True, mutable=["cache"])
    cache = mut["cache"]

Each call writes the T new keys/values into cache slots [i, i+T) where i is
the number of tokens written so far (the same for every row), and each new
token attends to valid slots <= its own slot. Prefill a left-padded prompt
batch in one call (T = prompt length, kv_mask False on the pad slots and True
elsewhere), then feed one token at a time (T = 1). With left padding the
positions of a row are `slot - num_pad_tokens` (clip at 0 for pad slots).
Writing past `max_len` is not checked inside jit: the caller must keep
i + T <= max_len.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models import attention as attn_lib
from dpo_jax.models import ring_attention as ring_lib
from dpo_jax.models import vocab as vocab_lib
from dpo_jax.models.config import ModelConfig

Array = jax.Array

# Activation logical axis names (see docs/CONTRACTS.md).
BATCH, LENGTH, EMBED_A, HEADS_A, VOCAB_A = (
    "activation_batch",
    "activation_length",
    "activation_embed",
    "activation_heads",
    "activation_vocab",
)


def _constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """Logical sharding constraint; a no-op without mesh rules."""
    return nn.with_logical_constraint(x, names)


def ring_size(cfg: ModelConfig) -> int:
    """Devices a full-sequence forward splits each row over (1 = no context parallelism)."""
    if cfg.attention_impl not in ("auto", "ring", "ulysses"):
        return 1
    return ring_lib.sequence_size()


def _activation(name: str) -> Callable[[Array], Array]:
    """Maps a config activation name to its function (HF semantics)."""
    return {
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
    }[name]


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """RoPE inverse frequencies [rotary_dim/2] in float32, with optional scaling.

    `local=True`: the sliding layers' base `rope_local_theta`, unscaled (Gemma 3).
    """
    dim = cfg.rotary_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv = inv.astype(np.float32)
    rs = None if local else cfg.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "linear":
        return (inv / rs.factor).astype(np.float32)
    if rs.rope_type == "longrope":  # the short factors; rope_sin_cos picks long ones when due
        return (inv / np.asarray(rs.short_factor, np.float32)).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate between.
    old_len = rs.original_max_position_embeddings
    low_wavelen = old_len / rs.low_freq_factor
    high_wavelen = old_len / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_sin_cos(
    cfg: ModelConfig, positions_NxL: Array, local: bool = False
) -> tuple[Array, Array]:
    """sin and cos [N, L, rotary_dim/2] (float32) for the given positions."""
    inv = jnp.asarray(rope_inv_freq(cfg, local))
    rs = None if local else cfg.rope_scaling
    if rs is not None and rs.rope_type == "longrope":
        # As transformers: long factors for the whole call once any position + 1 exceeds
        # the original context (a KV-cache sampler keeps the keys it cached before).
        unscaled = rope_inv_freq(cfg.replace(rope_scaling=None))
        long = jnp.asarray(unscaled / np.asarray(rs.long_factor, np.float32))
        use_long = jnp.max(positions_NxL) + 1 > rs.original_max_position_embeddings
        inv = jnp.where(use_long, long, inv)
    angles = positions_NxL.astype(jnp.float32)[..., None] * inv
    if rs is not None and rs.rope_type == "longrope" and rs.attention_factor != 1.0:
        return jnp.sin(angles) * rs.attention_factor, jnp.cos(angles) * rs.attention_factor
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x_NxLxHxK: Array, sin_NxLxR: Array, cos_NxLxR: Array) -> Array:
    """Rotates the first 2R head dims, NeoX/HF `rotate_half` convention.

    Dim i pairs with dim i + R (not i+1 as in the GPT-J interleaved layout);
    dims past 2R pass through unchanged (partial rotary).
    """
    r = sin_NxLxR.shape[-1]
    rot, rest = x_NxLxHxK[..., : 2 * r], x_NxLxHxK[..., 2 * r :]
    x1, x2 = rot[..., :r], rot[..., r:]
    sin = sin_NxLxR[:, :, None, :].astype(x_NxLxHxK.dtype)
    cos = cos_NxLxR[:, :, None, :].astype(x_NxLxHxK.dtype)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


class Linear(nn.Module):
    """x @ kernel (+ bias) contracting the last `n_in` axes of x.

    kernel has shape (*x.shape[-n_in:], *features) and logical names
    `kernel_axes`; bias has shape `features` and names `kernel_axes[n_in:]`.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    n_in: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the projection in `dtype`."""
        shape = (*x.shape[x.ndim - self.n_in :], *self.features)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.kernel_axes),
            shape,
            self.param_dtype,
        )
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.n_in)
        if self.has_variable("params", "kernel_scale"):
            # int8 LoRA base (dpo_jax.lora): a per-output-channel scale, constant along
            # the contracted axes, so (x @ q) * s == x @ (q * s): dequantised per layer.
            y = y * self.get_variable("params", "kernel_scale").astype(self.dtype)
        if self.has_variable("params", "lora_a"):
            # LoRA (dpo_jax.lora): low-rank update beside the frozen kernel, never merged
            # in the forward; `lora_b` arrives already multiplied by alpha / r.
            a = self.get_variable("params", "lora_a").astype(self.dtype)
            b = self.get_variable("params", "lora_b").astype(self.dtype)
            y = y + jnp.tensordot(jnp.tensordot(x.astype(self.dtype), a, self.n_in), b, 1)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(
                    nn.initializers.zeros_init(), self.kernel_axes[self.n_in :]
                ),
                self.features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class Norm(nn.Module):
    """LayerNorm (scale + bias) or RMSNorm (scale), computed in float32.

    With `scale_offset` (Gemma) the multiplier is `scale_offset + scale` and the
    stored scale starts at `1 - scale_offset`.
    """

    kind: str
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scale_offset: float = 0.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalises the last axis; returns `dtype`."""
        dim = x.shape[-1]
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(
                nn.initializers.constant(1.0 - self.scale_offset), ("norm",)
            ),
            (dim,),
            self.param_dtype,
        )
        xf = x.astype(jnp.float32)
        if self.kind == "rmsnorm":
            y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
            if self.scale_offset:
                # Gemma multiplies in float32, then casts (HF PR 29402).
                return (y * (self.scale_offset + scale.astype(jnp.float32))).astype(self.dtype)
            # Llama casts to the input dtype before the scale multiply.
            return scale.astype(self.dtype) * y.astype(self.dtype)
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
            (dim,),
            self.param_dtype,
        )
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _residual_norm(cfg: ModelConfig, name: str | None = None) -> Norm:
    """The model's norm on the residual stream (block inputs and the final norm)."""
    return Norm(
        cfg.norm_type, cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
        cfg.norm_scale_offset, name=name,
    )  # fmt: skip


class Embed(nn.Module):
    """Token (or position) embedding table [num, D]; `attend` is the tied unembedding."""

    num: int
    features: int
    axes: tuple[str | None, str | None]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_std: float = 0.02

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
            (self.num, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: Array) -> Array:
        """Looks up rows of the table (out-of-range ids are clipped)."""
        out = jnp.take(self.embedding, ids, axis=0, mode="clip").astype(self.dtype)
        if self.has_variable("params", "lora_a"):  # LoRA on the table (dpo_jax.lora)
            a = jnp.take(self.get_variable("params", "lora_a"), ids, axis=0, mode="clip")
            b = self.get_variable("params", "lora_b").astype(self.dtype)
            out = out + a.astype(self.dtype) @ b
        return out

    def attend(self, x_NxLxD: Array, out_dtype: Any) -> Array:
        """x @ table.T, accumulated and returned in `out_dtype`."""
        x = x_NxLxD.astype(self.dtype)
        out = jnp.einsum(
            "nld,vd->nlv", x, self.embedding.astype(self.dtype), preferred_element_type=out_dtype
        )
        if self.has_variable("params", "lora_a"):  # tied LoRA table: x (A B)^T = (x B^T) A^T
            a = self.get_variable("params", "lora_a").astype(self.dtype)
            b = self.get_variable("params", "lora_b").astype(self.dtype)
            xb = jnp.einsum("nld,rd->nlr", x, b)
            out = out + jnp.einsum("nlr,vr->nlv", xb, a, preferred_element_type=out_dtype)
        return out.astype(out_dtype)


def _decode_impl(cfg: ModelConfig) -> str | None:
    """`implementation` of jax.nn.dot_product_attention for KV-cache decoding.

    Decoding attends T new tokens to S cache slots with a small dense [N, 1, T, S]
    mask. "auto"/"cudnn" let JAX choose (cuDNN on GPUs where it can); the others use XLA.
    """
    return None if cfg.attention_impl in ("auto", "cudnn") else "xla"


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with optional RoPE and KV cache.

    `window`: this layer's sliding window (None = full causal attention).
    """

    cfg: ModelConfig
    window: int | None = None

    @nn.compact
    def __call__(
        self,
        x_NxLxD: Array,
        rope: tuple[Array, Array] | None,
        rule: attn_lib.MaskRule | None,
        kv_mask_NxS: Array | None,
    ) -> Array:
        """Self-attention. `kv_mask_NxS` given means decode mode (KV cache), else `rule`."""
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        lin = dict(dtype=dt, param_dtype=pdt, init_std=cfg.init_std)
        h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = Linear((h, d), ("embed", "heads", "head_dim"), use_bias=cfg.qkv_bias, name="q", **lin)(
            x_NxLxD
        )
        key = Linear(
            (k, d), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, name="k", **lin
        )(x_NxLxD)
        value = Linear(
            (k, d), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, name="v", **lin
        )(x_NxLxD)
        if cfg.qk_norm:
            off = cfg.norm_scale_offset  # Gemma 3: (1 + w) like its other norms
            q = Norm("rmsnorm", cfg.norm_eps, dt, pdt, off, name="q_norm")(q)
            key = Norm("rmsnorm", cfg.norm_eps, dt, pdt, off, name="k_norm")(key)
        if rope is not None:
            q = apply_rope(q, *rope)
            key = apply_rope(key, *rope)
        if cfg.query_pre_attn_scalar is not None:
            # Scores use query_pre_attn_scalar**-0.5, not head_dim**-0.5: rescale q so every
            # backend (which divides by sqrt(head_dim)) computes the family's scores.
            q = q * jnp.asarray(math.sqrt(d / cfg.query_pre_attn_scalar), q.dtype)
        q = _constrain(q, (BATCH, LENGTH, HEADS_A, None))

        key, value = key.astype(q.dtype), value.astype(q.dtype)
        if kv_mask_NxS is not None:
            key, value, mask_Nx1xTxS = self._update_cache(key, value, kv_mask_NxS)
            if cfg.attn_logit_softcap is None:
                out = jax.nn.dot_product_attention(
                    q, key, value, mask=mask_Nx1xTxS, implementation=_decode_impl(cfg)
                )
            else:
                out = attn_lib.dense_attention(
                    q, key, value, mask_Nx1xTxS, softcap=cfg.attn_logit_softcap
                )
        elif ring_size(cfg) > 1:
            n = ring_size(cfg)
            ulysses = cfg.attention_impl == "ulysses" and h % n == 0 and k % n == 0
            # Ulysses needs the heads to divide the axis; otherwise the ring serves.
            split = ring_lib.ulysses_attention if ulysses else ring_lib.ring_attention
            out = split(
                q, key, value, rule,
                window=self.window,
                softcap=cfg.attn_logit_softcap,
                block=cfg.attention_block,
            )  # fmt: skip
        else:
            out = attn_lib.attend(
                q, key, value, rule,
                impl=cfg.attention_impl,
                window=self.window,
                softcap=cfg.attn_logit_softcap,
                block=cfg.attention_block,
            )  # fmt: skip
        out = _constrain(out, (BATCH, LENGTH, HEADS_A, None))
        return Linear(
            (cfg.hidden_size,),
            ("heads", "head_dim", "embed"),
            n_in=2,
            use_bias=cfg.attn_out_bias,
            name="o",
            **lin,
        )(out)

    def _update_cache(
        self, key_NxTxKxH: Array, value_NxTxKxH: Array, kv_mask_NxS: Array
    ) -> tuple[Array, Array, Array]:
        """Writes the new keys/values at the cache index; returns full cache and mask."""
        n, t, k, d = key_NxTxKxH.shape
        # During init_cache the input length is the cache length.
        cached_key = self.variable(
            "cache", "cached_key", jnp.zeros, (n, t, k, d), key_NxTxKxH.dtype
        )
        cached_value = self.variable(
            "cache", "cached_value", jnp.zeros, (n, t, k, d), value_NxTxKxH.dtype
        )
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        s = cached_key.value.shape[1]
        if kv_mask_NxS.shape[1] == 0:  # Transformer's "no kv_mask given" marker
            kv_mask_NxS = jnp.ones((n, s), bool)
        if kv_mask_NxS.shape != (n, s):
            raise ValueError(f"kv_mask has shape {kv_mask_NxS.shape}, expected {(n, s)}")
        i = index.value
        keys = jax.lax.dynamic_update_slice(
            cached_key.value, key_NxTxKxH.astype(cached_key.value.dtype), (0, i, 0, 0)
        )
        values = jax.lax.dynamic_update_slice(
            cached_value.value, value_NxTxKxH.astype(cached_value.value.dtype), (0, i, 0, 0)
        )
        cached_key.value, cached_value.value = keys, values
        index.value = i + t
        q_slot_T = i + jnp.arange(t)
        k_slot_S = jnp.arange(s)
        allowed_TxS = k_slot_S[None, :] <= q_slot_T[:, None]
        if self.window is not None:
            # Slots of one row are consecutive positions, so slot distance = position distance.
            allowed_TxS &= (q_slot_T[:, None] - k_slot_S[None, :]) < self.window
        mask = allowed_TxS[None, None] & kv_mask_NxS.astype(bool)[:, None, None, :]
        return keys, values, mask


class Mlp(nn.Module):
    """Plain (down(act(up x))) or gated (down(act(gate x) * up x)) MLP."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_NxLxD: Array) -> Array:
        """Applies the feed-forward block."""
        cfg = self.cfg
        lin = dict(
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            init_std=cfg.init_std,
            use_bias=cfg.mlp_bias,
        )
        f, act = cfg.intermediate_size, _activation(cfg.activation)
        up = Linear((f,), ("embed", "mlp"), name="up", **lin)(x_NxLxD)
        if cfg.gated_mlp:
            up = act(Linear((f,), ("embed", "mlp"), name="gate", **lin)(x_NxLxD)) * up
        else:
            up = act(up)
        up = _constrain(up, (BATCH, LENGTH, "activation_mlp"))
        return Linear((cfg.hidden_size,), ("mlp", "embed"), name="down", **lin)(up)


Ropes = tuple[tuple[Array, Array] | None, tuple[Array, Array] | None]  # (global, local)


class Block(nn.Module):
    """Pre-norm decoder block, sequential or parallel (NeoX) residual.

    `layer` is the layer index (or its index in the scanned group: the layer
    types repeat with `cfg.layer_period`); it selects the window and RoPE base.
    With `cfg.post_norms` (Gemma 2/3) the attention and MLP outputs are normed
    too before the residual add. Returns `(x, None)` so it works inside `nn.scan`.
    """

    cfg: ModelConfig
    layer: int = 0

    @nn.compact
    def __call__(
        self,
        x_NxLxD: Array,
        ropes: Ropes,
        rule: attn_lib.MaskRule | None,
        kv_mask_NxS: Array | None,
    ) -> tuple[Array, None]:
        """One transformer layer."""
        cfg = self.cfg
        rope = ropes[1] if cfg.layer_is_local(self.layer) else ropes[0]
        attn_in = _residual_norm(cfg, name="attn_norm")(x_NxLxD)
        window = cfg.layer_window(self.layer)
        attn = Attention(cfg, window, name="attn")(attn_in, rope, rule, kv_mask_NxS)
        if cfg.post_norms:
            attn = _residual_norm(cfg, name="post_attn_norm")(attn)
        mlp_norm = _residual_norm(cfg, name="mlp_norm")
        if cfg.parallel_residual:
            x = x_NxLxD + attn + Mlp(cfg, name="mlp")(mlp_norm(x_NxLxD))
        else:
            x = x_NxLxD + attn
            mlp = Mlp(cfg, name="mlp")(mlp_norm(x))
            if cfg.post_norms:
                mlp = _residual_norm(cfg, name="post_mlp_norm")(mlp)
            x = x + mlp
        return _constrain(x, (BATCH, LENGTH, EMBED_A)), None


class BlockGroup(nn.Module):
    """`cfg.layer_period` consecutive blocks (e.g. Gemma 2's local + global pair).

    `nn.scan` needs identical bodies; layers whose window or RoPE differ are
    identical as groups, so a model with per-layer types scans over groups.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self, x_NxLxD: Array, ropes: Ropes, rule: attn_lib.MaskRule | None, kv: Array | None
    ) -> tuple[Array, None]:
        """The group's blocks in order."""
        block = _block_class(self.cfg, in_group=True)
        for j in range(self.cfg.layer_period):
            x_NxLxD, _ = block(self.cfg, j, name=f"block_{j}")(x_NxLxD, ropes, rule, kv)
        return x_NxLxD, None


def layer_location(cfg: ModelConfig, layer: int) -> tuple[tuple[str, ...], int | None]:
    """Params path of layer `layer`'s block and its index on the stacked (scanned) axis.

    Unscanned: ("layers_i",), None. Scanned: ("layers",), i; scanned with a group of
    p > 1 layers: ("layers", "block_{i % p}"), i // p.
    """
    if not cfg.scan_layers:
        return (f"layers_{layer}",), None
    p = cfg.layer_period
    if p == 1:
        return ("layers",), layer
    return ("layers", f"block_{layer % p}"), layer // p


_REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_class(cfg: ModelConfig, in_group: bool = False) -> type[nn.Module]:
    """The scanned/looped unit (Block, or BlockGroup when scanning a layer period > 1),
    wrapped in nn.remat when the config asks for rematerialisation."""
    cls: type[nn.Module] = Block
    if cfg.scan_layers and cfg.layer_period > 1 and not in_group:
        return BlockGroup  # its blocks are remat-wrapped one by one
    if cfg.remat == "none":
        return cls
    # prevent_cse is only needed outside scan (scan already blocks CSE).
    return nn.remat(cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def attention_mask(
    cfg: ModelConfig,
    segment_ids_NxL: Array,
    positions_NxL: Array,
    branch_ids_NxL: Array | None = None,
) -> Array:
    """Bool [N, 1, L, L] of the attention rule (for inspection and tests; no path needs it)."""
    rule = attn_lib.make_rule(segment_ids_NxL, positions_NxL, branch_ids_NxL)
    return attn_lib.dense_mask(rule, cfg.sliding_window)


class Transformer(nn.Module):
    """Decoder-only language model; see the module docstring for the call contract."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = Embed(
            cfg.embed_vocab_size, cfg.hidden_size, ("vocab", "embed"), dt, pdt, cfg.init_std
        )
        if cfg.position_embedding == "learned":
            self.pos_embed = Embed(
                cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"), dt, pdt, cfg.init_std
            )
        block = _block_class(cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers // cfg.layer_period,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
        else:
            # A list attribute named `layers` gives submodules layers_0, layers_1, ...
            self.layers = [block(cfg, i) for i in range(cfg.num_layers)]
        self.final_norm = _residual_norm(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(
                (cfg.embed_vocab_size,),
                ("embed", "vocab"),
                dtype=dt,
                param_dtype=pdt,
                init_std=cfg.init_std,
            )

    def __call__(
        self,
        input_ids: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        branch_ids: Array | None = None,
        *,
        kv_mask: Array | None = None,
        decode: bool = False,
        return_hidden: bool = False,
    ) -> Array:
        """Logits [N, L, V] (or final hidden states [N, L, D] with return_hidden)."""
        cfg = self.cfg
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [N, L], got shape {input_ids.shape}")
        n, length = input_ids.shape
        if positions is None:
            if decode:
                raise ValueError("decode=True needs explicit positions [N, T]")
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
        if positions.shape != (n, length):
            raise ValueError(f"positions has shape {positions.shape}, expected {(n, length)}")
        if decode:
            if segment_ids is not None or branch_ids is not None:
                raise ValueError("decode=True takes kv_mask, not segment_ids/branch_ids")
            rule = None
            if kv_mask is None:
                # Cache length is unknown here; an all-valid mask of it is built per layer.
                kv_mask = jnp.ones((n, 0), bool)
        else:
            if kv_mask is not None:
                raise ValueError("kv_mask is only used with decode=True")
            if segment_ids is None:
                segment_ids = jnp.ones((n, length), jnp.int32)
            for name, arr in (("segment_ids", segment_ids), ("branch_ids", branch_ids)):
                if arr is not None and arr.shape != (n, length):
                    raise ValueError(f"{name} has shape {arr.shape}, expected {(n, length)}")
            ring = ring_size(cfg)
            index = None
            if ring > 1:
                input_ids, positions, segment_ids, branch_ids = _to_ring_layout(
                    ring, input_ids, positions, segment_ids, branch_ids
                )
                index = ring_lib.zigzag_index(n, input_ids.shape[1], ring)
            rule = attn_lib.make_rule(segment_ids, positions, branch_ids, index)

        x = self.embed(input_ids)
        if cfg.embed_scale:
            # HF rounds sqrt(D) to the compute dtype before multiplying.
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), x.dtype)
        ropes: Ropes = (None, None)
        if cfg.position_embedding == "learned":
            x = x + self.pos_embed(positions)
        else:
            local = rope_sin_cos(cfg, positions, local=True) if cfg.rope_local_theta else None
            ropes = (rope_sin_cos(cfg, positions), local)
        x = _constrain(x, (BATCH, LENGTH, EMBED_A))

        if cfg.scan_layers:
            x, _ = self.layers(x, ropes, rule, kv_mask)
        else:
            for blk in self.layers:
                x, _ = blk(x, ropes, rule, kv_mask)
        if not decode and ring_size(cfg) > 1:
            x = ring_lib.from_zigzag(x, ring_size(cfg))[:, :length]
            x = _constrain(x, (BATCH, LENGTH, EMBED_A))
        x = self.final_norm(x)
        if return_hidden:
            return x
        return self.logits(x)

    def logits(self, hidden_NxLxD: Array) -> Array:
        """Unembedding (tied or untied): hidden [N, L, D] -> logits [N, L, V].

        V is `cfg.embed_vocab_size`; columns past `cfg.vocab_size` are padding, masked to
        `vocab.PADDED_LOGIT`."""
        cfg = self.cfg
        out_dtype = jnp.float32 if cfg.logits_fp32 else jnp.dtype(cfg.dtype)
        if cfg.tie_word_embeddings:
            logits = self.embed.attend(hidden_NxLxD, out_dtype)
        else:
            logits = self.lm_head(hidden_NxLxD).astype(out_dtype)
        if cfg.final_logit_softcap is not None:
            cap = jnp.asarray(cfg.final_logit_softcap, logits.dtype)
            logits = cap * jnp.tanh(logits / cap)
        # Padding ids (vocab padded to divide the tensor axis) get no probability mass,
        # here once for every caller (log-probs, sampling, metrics).
        logits = vocab_lib.mask_padded_logits(cfg, logits)
        return _constrain(logits, (BATCH, LENGTH, VOCAB_A))


def _to_ring_layout(ring: int, *rows_NxL: Array | None) -> tuple[Array | None, ...]:
    """Rows padded to a multiple of 2*ring (segment 0, so unseen) and laid out zig-zag."""
    length = next(r for r in rows_NxL if r is not None).shape[1]
    pad = ring_lib.padded_length(length, ring) - length
    return tuple(
        None if r is None else ring_lib.to_zigzag(jnp.pad(r, ((0, 0), (0, pad))), ring)
        for r in rows_NxL
    )


def _dummy_ids(batch: int = 1, length: int = 1) -> Array:
    return jnp.zeros((batch, length), jnp.int32)


def abstract_params(cfg: ModelConfig) -> Any:
    """Boxed (LogicallyPartitioned) ShapeDtypeStruct pytree of the params."""
    model = Transformer(cfg)
    return jax.eval_shape(model.init, jax.random.key(0), _dummy_ids())["params"]


def init_params(cfg: ModelConfig, rng: Array) -> Any:
    """Random parameters (plain unboxed pytree in `cfg.param_dtype`)."""
    model = Transformer(cfg)
    variables = jax.jit(model.init)(rng, _dummy_ids())
    return nn.meta.unbox(variables["params"])


def logical_axes(cfg: ModelConfig) -> Any:
    """Params-shaped pytree whose leaves are PartitionSpecs of logical axis names."""
    return nn.get_partition_spec(abstract_params(cfg))


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters (computed from shapes, no allocation)."""
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(cfg)))
    return int(sum(np.prod(x.shape) for x in leaves))


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> Any:
    """Zero KV cache for `batch_size` rows and `max_len` slots (cfg.dtype)."""
    model = Transformer(cfg)
    ids = _dummy_ids(batch_size, max_len)
    pos = jnp.zeros((batch_size, max_len), jnp.int32)
    kv = jnp.ones((batch_size, max_len), bool)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), ids, positions=pos, kv_mask=kv, decode=True)
    )["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
