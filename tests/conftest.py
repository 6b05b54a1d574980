"""Shared pytest fixtures (a local tokenizer, tiny random HF checkpoints, session-cached) and
the run's settings: one scratch directory per run, compile settings, and the test order.

Tiers and budgets: tests/README.md.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

# Everything a run writes outside a test's own tmp_path goes under one scratch directory
# made for the run and removed after it, inherited by every CLI / multi-process child
# through the environment:
# - XDG_CACHE_HOME: the tokenized-data cache (`configs.default.default_cache_dir`) and
#   the Hugging Face caches, so no test reads or writes the user's ~/.cache;
# - JAX's persistent compilation cache: the test programs are tiny, so compiling them
#   dominates the suite's time, and many tests (and their child processes) compile the
#   same program. A cached executable is the compiled program itself: it computes the
#   same bits as a fresh compile.
# - JAX's `disable_most_optimizations` (as JAX's own test suite uses): it lowers only the
#   LLVM code generation's optimisation level. The HLO program, its fusion, buffer
#   assignment (memory_analysis) and flop counts are unchanged; float rounding may differ
#   from an optimised build in the last bits, so every comparison between two code paths
#   runs both under the same setting.
# A user's own JAX_* settings are kept.
_JAX_SETTINGS = {  # env name -> (jax.config name, parser, the run's value; None: per run)
    "JAX_DISABLE_MOST_OPTIMIZATIONS": (
        "jax_disable_most_optimizations", lambda v: v.lower() in ("1", "true"), "1"
    ),
    "JAX_COMPILATION_CACHE_DIR": ("jax_compilation_cache_dir", str, None),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": (
        "jax_persistent_cache_min_compile_time_secs", float, "0.2"
    ),
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": (
        "jax_persistent_cache_min_entry_size_bytes", int, "0"
    ),
}  # fmt: skip
_ORDERS = ("file", "reverse", "random")
_SCRATCH_ENV = "DPO_JAX_TEST_SCRATCH"  # the controller's scratch dir, for xdist workers
_SEED_ENV = "DPO_JAX_TEST_ORDER_SEED"  # the controller's random-order seed, for workers


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dpo_jax")
    group.addoption(
        "--test-order", choices=_ORDERS, default="file",
        help="file (default), reverse, or random: modules shuffled, then the tests inside "
        "each module (module fixtures are still built once per module)",
    )  # fmt: skip
    group.addoption(
        "--test-order-seed", type=int, default=None,
        help="seed of --test-order=random (default: a fresh one, printed in the header)",
    )  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    """One scratch directory for the run, and the compile settings (above). pytest-xdist's
    workers inherit the controller's environment: they share its scratch directory (and
    so its compilation cache) and its --test-order-seed."""
    scratch = os.environ.get(_SCRATCH_ENV) if hasattr(config, "workerinput") else None
    if scratch is None:
        scratch = tempfile.mkdtemp(prefix="dpo_jax_tests_")
        config._dpo_jax_owns_scratch = True  # type: ignore[attr-defined]
        os.environ[_SCRATCH_ENV] = scratch
    config._dpo_jax_scratch = scratch  # type: ignore[attr-defined]
    os.environ["XDG_CACHE_HOME"] = os.path.join(scratch, "cache")
    for name, (_, _, value) in _JAX_SETTINGS.items():
        os.environ.setdefault(name, value or os.path.join(scratch, "xla"))
    if "jax" in sys.modules:  # imported before this hook: its flags read the old env
        import jax

        for name, (flag, parse, _) in _JAX_SETTINGS.items():
            jax.config.update(flag, parse(os.environ[name]))
    if config.getoption("test_order") == "random" and config.getoption("test_order_seed") is None:
        seed = os.environ.get(_SEED_ENV) if hasattr(config, "workerinput") else None
        config.option.test_order_seed = (
            int(seed) if seed is not None else random.SystemRandom().randrange(2**31)
        )
        os.environ[_SEED_ENV] = str(config.option.test_order_seed)


def pytest_unconfigure(config: pytest.Config) -> None:
    if getattr(config, "_dpo_jax_owns_scratch", False):
        shutil.rmtree(config._dpo_jax_scratch, ignore_errors=True)  # type: ignore[attr-defined]


def _order_line(config: pytest.Config) -> str:
    order, seed = config.getoption("test_order"), config.getoption("test_order_seed")
    return f"--test-order={order}" + (f" --test-order-seed={seed}" if order == "random" else "")


def pytest_report_header(config: pytest.Config) -> str:
    return f"dpo_jax: {_order_line(config)}; scratch {config._dpo_jax_scratch}"  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The order again at the end (`-q` hides the header), to replay a failing order."""
    if config.getoption("test_order") != "file":
        terminalreporter.write_line(f"dpo_jax: tests ran in {_order_line(config)}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Reorder by --test-order, keeping each module's tests together (so a module-scoped
    fixture is built once, as in file order)."""
    order = config.getoption("test_order")
    if order == "file":
        return
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    groups = list(modules.values())
    if order == "reverse":
        groups = [g[::-1] for g in groups[::-1]]
    else:
        rng = random.Random(config.getoption("test_order_seed"))
        rng.shuffle(groups)
        for g in groups:
            rng.shuffle(g)
    items[:] = [item for g in groups for item in g]


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """Byte-level BPE tokenizer trained locally (eos/bos, pad, ChatML template)."""
    return train_tokenizer(chat_template=True)


@pytest.fixture(autouse=True)
def _session_tokenizer_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that changes the shared tokenizer's ids (template, special tokens, vocab)
    fails here instead of changing the tests after it."""
    if "tokenizer" not in request.fixturenames:
        yield
        return
    from dpo_jax.data.tokenize import tokenizer_fingerprint

    tok = request.getfixturevalue("tokenizer")
    before = tokenizer_fingerprint(tok)
    yield
    if tokenizer_fingerprint(tok) != before:
        pytest.fail("this test changed the session `tokenizer` fixture in place; copy it first")


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
