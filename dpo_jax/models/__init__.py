"""Decoder-only transformer models and Hugging Face import/export.

Public API (see docs/CONTRACTS.md): `ModelConfig`, `Transformer`, `init_params`,
`logical_axes`, `init_cache`, `load_hf`, `save_hf`, `config_from_hf`,
`config_to_hf`.
"""

# `families` first: importing it registers every family into `config.FAMILY_SWITCHES`,
# which `ModelConfig.for_family` reads (config itself imports no family).
from dpo_jax.models import families  # noqa: F401  # isort: skip
from dpo_jax.models.config import FAMILY_SWITCHES, ModelConfig, RopeScaling, gpt2_small
from dpo_jax.models.hf import (
    SCORE_TENSOR,
    SUPPORTED_MODEL_TYPES,
    classifier_architecture,
    config_from_hf,
    config_to_hf,
    is_classifier,
    load_hf,
    read_hf_tensor,
    save_hf,
)
from dpo_jax.models.transformer import (
    Transformer,
    abstract_params,
    attention_mask,
    init_cache,
    init_params,
    logical_axes,
    param_count,
)
from dpo_jax.models.vocab import pad_vocab, strip_vocab

__all__ = [
    "FAMILY_SWITCHES",
    "ModelConfig",
    "RopeScaling",
    "SCORE_TENSOR",
    "SUPPORTED_MODEL_TYPES",
    "Transformer",
    "abstract_params",
    "attention_mask",
    "classifier_architecture",
    "config_from_hf",
    "config_to_hf",
    "gpt2_small",
    "init_cache",
    "init_params",
    "is_classifier",
    "load_hf",
    "logical_axes",
    "pad_vocab",
    "param_count",
    "read_hf_tensor",
    "save_hf",
    "strip_vocab",
]
