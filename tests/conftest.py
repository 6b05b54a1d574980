"""Shared pytest fixtures: a local tokenizer and tiny random HF checkpoints (session-cached)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

# The test programs are tiny, so compiling them dominates the suite's time. The run uses
# JAX's `disable_most_optimizations` (as JAX's own test suite does), inherited by every
# CLI / multi-process child a test starts: it lowers only the LLVM code generation's
# optimisation level. The HLO program, its fusion, buffer assignment (memory_analysis)
# and flop counts are unchanged; float rounding may differ from an optimised build in the
# last bits, so every comparison between two code paths runs both under the same setting.
# A user's own JAX_DISABLE_MOST_OPTIMIZATIONS is kept. (A persistent compilation cache
# shared by the whole run was tried and dropped while a heavy-run failure was unexplained.)


def pytest_configure(config: pytest.Config) -> None:
    """Compile the run's programs with JAX's `disable_most_optimizations` (above)."""
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    if "jax" in sys.modules:  # imported before this hook: its flag read the old env
        import jax

        flag = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true")
        jax.config.update("jax_disable_most_optimizations", flag)


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
