"""Shared pytest fixtures: a local tokenizer and tiny random HF checkpoints (session-cached)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

# The test programs are tiny, so compiling them dominates the suite's time. Two settings
# for the whole run, inherited by every CLI / multi-process child a test starts:
# - one persistent XLA compilation cache: many tests compile the same program, and a
#   cached executable computes the same bits as a fresh compile;
# - JAX's `disable_most_optimizations` (as JAX's own test suite uses): it lowers only the
#   LLVM code generation's optimisation level. The HLO program, its fusion, buffer
#   assignment (memory_analysis) and flop counts are unchanged; float rounding may differ
#   from an optimised build in the last bits, so every comparison between two code paths
#   still runs both under the same setting.
# A user's own JAX_COMPILATION_CACHE_DIR / JAX_DISABLE_MOST_OPTIMIZATIONS are kept.
_TEST_JAX_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
}


def pytest_configure(config: pytest.Config) -> None:
    """Set up the run's compilation cache and compile settings (above)."""
    env = {k: v for k, v in _TEST_JAX_ENV.items() if k not in os.environ}
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache_dir = tempfile.mkdtemp(prefix="dpo_jax_test_xla_cache_")
        config._dpo_jax_cache_dir = cache_dir  # type: ignore[attr-defined]
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    os.environ.update(env)
    if "jax" in sys.modules:  # imported before this hook: its config read the old env
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update(
            "jax_persistent_cache_min_compile_time_secs",
            float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
        )
        jax.config.update(
            "jax_persistent_cache_min_entry_size_bytes",
            int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
        )
        jax.config.update(
            "jax_disable_most_optimizations",
            os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true"),
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    cache_dir = getattr(config, "_dpo_jax_cache_dir", None)
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)


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
