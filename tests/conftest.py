"""Shared pytest fixtures: a local tokenizer and tiny random HF checkpoints (session-cached)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """Byte-level BPE tokenizer trained locally (eos/bos, pad, ChatML template)."""
    return train_tokenizer(chat_template=True)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Callable[[str], Path]:
    """`tiny_hf_dir(family)` -> directory of a seeded tiny HF model (built once per session)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"hf_{family}")
            cache[family] = make_tiny_hf_model(family, out, tokenizer=tokenizer)
        return cache[family]

    return get
