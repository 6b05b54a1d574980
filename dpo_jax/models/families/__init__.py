"""Model families: one module per Hugging Face `model_type`, each registering a `Family`.

Adding a family = one new module here (imported below) + one fixture entry in
`tests/hf_fixtures.py`; see docs/MODEL_FAMILIES.md.
"""

from __future__ import annotations

# Registration order is the order error messages and tests list the families in.
# isort: off
from dpo_jax.models.families import gpt2, gpt_neox, llama, mistral, qwen2, qwen3  # noqa: F401
from dpo_jax.models.families import gemma, gemma2, gemma3, phi3  # noqa: F401

# isort: on
from dpo_jax.models.families.base import (
    LORA_ALL_LINEAR,
    LORA_TARGETS,
    REGISTRY,
    Family,
    PeftLayout,
    Tensor,
    register,
)


def get(model_type: str | None) -> Family:
    """The registered family of `model_type` (ValueError naming the supported ones)."""
    if model_type not in REGISTRY:
        raise ValueError(f"unknown model_type {model_type!r}; supported: {', '.join(REGISTRY)}")
    return REGISTRY[model_type]


def names() -> tuple[str, ...]:
    """Registered model_types, in registration order."""
    return tuple(REGISTRY)


__all__ = [
    "LORA_ALL_LINEAR", "LORA_TARGETS", "REGISTRY", "Family", "PeftLayout", "Tensor", "get",
    "names", "register",
]  # fmt: skip
