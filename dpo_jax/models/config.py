"""Model configuration: one frozen dataclass with per-family switches.

A single `ModelConfig` describes every supported decoder-only family (one module
each in `dpo_jax.models.families`). The `Transformer` module
reads only these switches, never `model_type`; `model_type` matters only for
Hugging Face import/export (`dpo_jax.models.hf`).

The dataclass is frozen and hashable so it can be a static argument of
`jax.jit` and a field of a Flax module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

NormType = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu_new", "gelu", "silu", "relu"]
PositionEmbedding = Literal["learned", "rope"]
RematPolicy = Literal["none", "block", "dots_saveable"]
AttentionImpl = Literal["auto", "xla", "blockwise", "cudnn", "splash", "ring", "ulysses"]

_NORMS = ("layernorm", "rmsnorm")
_ACTIVATIONS = ("gelu_new", "gelu", "silu", "relu")
_POSITIONS = ("learned", "rope")
_REMATS = ("none", "block", "dots_saveable")
_ATTN_IMPLS = ("auto", "xla", "blockwise", "cudnn", "splash", "ring", "ulysses")
_ROPE_TYPES = ("linear", "llama3", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in Hugging Face `rope_parameters`.

    `rope_type="linear"` divides every inverse frequency by `factor`.
    `rope_type="llama3"` (Llama 3.1+) divides only the low frequencies by
    `factor` and interpolates smoothly between `high_freq_factor` and
    `low_freq_factor` wavelengths of `original_max_position_embeddings`.
    `rope_type="longrope"` (Phi-3 LongRoPE, "su") divides inverse frequency i by
    `short_factor[i]`, or by `long_factor[i]` when the batch's largest position + 1
    exceeds `original_max_position_embeddings`, and multiplies sin/cos by
    `attention_factor`.
    """

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("short_factor", "long_factor"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if self.rope_type == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise ValueError("RopeScaling: longrope needs short_factor and long_factor")
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"RopeScaling.rope_type={self.rope_type!r} is not supported; "
                f"choose one of {_ROPE_TYPES}"
            )
        if self.factor <= 0:
            raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                "RopeScaling: llama3 needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}"
            )


def _dtype_name(value: Any, field: str) -> str:
    """Normalises a dtype given as a string, numpy or jnp type to its name."""
    try:
        return jnp.dtype(value).name
    except TypeError as e:
        raise ValueError(f"ModelConfig.{field}={value!r} is not a dtype") from e


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every switch the decoder-only `Transformer` understands.

    Sizes: `head_dim` defaults to hidden_size // num_heads, `num_kv_heads` to
    `num_heads` (multi-head attention; fewer = grouped-query attention), and
    `intermediate_size` to 4 * hidden_size.

    Dtypes are stored as names ("float32", "bfloat16"): `dtype` is the compute
    dtype, `param_dtype` the storage dtype of parameters.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int = 4096

    norm_type: NormType = "rmsnorm"
    norm_eps: float = 1e-6
    activation: Activation = "silu"
    gated_mlp: bool = True

    position_embedding: PositionEmbedding = "rope"
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0  # fraction of head_dim that is rotated (NeoX partial rotary)
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # Mistral: a token sees at most this many positions back
    # Per-layer attention kind, HF names "full_attention" / "sliding_attention" (Gemma 2/3,
    # Qwen2 use_sliding_window). None: every layer uses `sliding_window` (Mistral).
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # Gemma 3: RoPE base of sliding layers (no scaling)

    parallel_residual: bool = False  # NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    tie_word_embeddings: bool = False
    embed_scale: bool = False  # Gemma: token embeddings times sqrt(hidden_size)
    norm_scale_offset: float = 0.0  # Gemma: RMSNorm multiplies by (offset + scale)
    post_norms: bool = False  # Gemma 2/3: norms on the attention and MLP outputs too
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: scores scaled by this**-0.5
    final_logit_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)

    dtype: str = "float32"
    param_dtype: str = "float32"
    logits_fp32: bool = True  # unembedding accumulates and returns float32 logits
    remat: RematPolicy = "none"
    scan_layers: bool = False
    # Attention backend (dpo_jax.models.attention): auto picks cudnn on GPU, splash on TPU,
    # and on CPU xla below 1024 tokens per row, blockwise from there.
    attention_impl: AttentionImpl = "auto"
    attention_block: int = 512  # blockwise attention: query/key block size (tokens)
    attn_logit_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    init_std: float = 0.02
    # Embedding/unembedding rows (>= vocab_size; 0 = vocab_size): rows past vocab_size are
    # padding so the vocab dim divides the tensor axis (dpo_jax.models.vocab); their
    # logits are masked, exports strip them. Token ids always live in [0, vocab_size).
    padded_vocab_size: int = 0

    # Token ids carried through Hugging Face import/export (None = unknown).
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("dtype", _dtype_name(self.dtype, "dtype"))
        set_("param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelConfig: hidden_size={self.hidden_size} is not divisible by "
                    f"num_heads={self.num_heads}; pass head_dim explicitly"
                )
            set_("head_dim", self.hidden_size // self.num_heads)
        if self.intermediate_size is None:
            set_("intermediate_size", 4 * self.hidden_size)
        if isinstance(self.rope_scaling, dict):
            set_("rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.layer_types, list):
            set_("layer_types", tuple(self.layer_types))
        self._validate()

    def _validate(self) -> None:
        choices = {
            "norm_type": _NORMS,
            "activation": _ACTIVATIONS,
            "position_embedding": _POSITIONS,
            "remat": _REMATS,
            "attention_impl": _ATTN_IMPLS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"ModelConfig.{name}={getattr(self, name)!r} is not supported; "
                    f"choose one of {allowed}"
                )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"ModelConfig.rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.position_embedding == "rope" and self.rotary_dim % 2:
            raise ValueError(
                f"ModelConfig: rotary dim int(head_dim * rotary_pct) = {self.rotary_dim} must be even"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be > 0, got {self.sliding_window}")
        if self.attention_block < 16 or self.attention_block & (self.attention_block - 1):
            raise ValueError(
                f"ModelConfig.attention_block must be a power of two >= 16, got {self.attention_block}"
            )
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"ModelConfig.layer_types has {len(self.layer_types)} entries, "
                    f"num_layers={self.num_layers}"
                )
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"ModelConfig.layer_types: {bad} not in {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("ModelConfig.layer_types has sliding layers but no sliding_window")

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of layer `layer` (None = full causal attention)."""
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def layer_is_local(self, layer: int) -> bool:
        """Whether layer `layer` uses the local RoPE base (`rope_local_theta`)."""
        return (
            self.rope_local_theta is not None
            and self.layer_types is not None
            and self.layer_types[layer] == "sliding_attention"
        )

    @property
    def layer_period(self) -> int:
        """Smallest p dividing num_layers with layer p+i like layer i (the scanned group)."""
        types = self.layer_types
        if types is None:
            return 1
        n = self.num_layers
        return next(
            p
            for p in range(1, n + 1)
            if n % p == 0 and all(types[i] == types[i % p] for i in range(n))
        )

    @property
    def embed_vocab_size(self) -> int:
        """Rows of the embedding and unembedding: the padded vocabulary, if padded."""
        return max(self.vocab_size, self.padded_vocab_size)

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that RoPE rotates (HF: int(head_dim * pct))."""
        return int(self.head_dim * self.rotary_pct)

    def replace(self, **changes: Any) -> ModelConfig:
        """Returns a copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (inverse of `ModelConfig.from_dict`)."""
        d = dataclasses.asdict(self)
        for k in ("eos_token_id", "layer_types"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Builds a config from `to_dict` output; unknown keys are an error."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def for_family(cls, model_type: str, **overrides: Any) -> ModelConfig:
        """Family switches of `model_type` (see FAMILY_SWITCHES) plus overrides."""
        if model_type not in FAMILY_SWITCHES:
            raise ValueError(
                f"unknown model_type {model_type!r}; supported: {sorted(FAMILY_SWITCHES)}"
            )
        return cls(**{"model_type": model_type, **FAMILY_SWITCHES[model_type], **overrides})

    @classmethod
    def tiny(cls, model_type: str = "llama", **overrides: Any) -> ModelConfig:
        """A tiny model of the given family for tests and smoke runs."""
        sizes: dict[str, Any] = dict(
            vocab_size=256,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2 if FAMILY_SWITCHES.get(model_type, {}).get("gated_mlp") else None,
            intermediate_size=128,
            max_position_embeddings=128,
        )
        return cls.for_family(model_type, **{**sizes, **overrides})

    @classmethod
    def gpt2_small(cls, **overrides: Any) -> ModelConfig:
        """GPT-2 small (124M parameters)."""
        return gpt2_small(**overrides)


# Per-family architecture switches (sizes come from the checkpoint or the caller), filled
# by each family module in `dpo_jax.models.families` when it registers itself. This module
# imports no family: `dpo_jax.models` (the package, imported before any of its modules)
# imports `families`, so every family has registered before `for_family` can be called.
FAMILY_SWITCHES: dict[str, dict[str, Any]] = {}


def gpt2_small(**overrides: Any) -> ModelConfig:
    """GPT-2 small: 12 layers, width 768, 12 heads, 50257 tokens, 1024 positions."""
    sizes: dict[str, Any] = dict(
        vocab_size=50257,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        max_position_embeddings=1024,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    return ModelConfig.for_family("gpt2", **{**sizes, **overrides})
