"""Every user mistake through the real console script: exit 2, one error line, no traceback.

Each case runs `python -m dpo_jax.cli train ...` in a subprocess. The subprocesses of
the quick cases start together in one module-scoped fixture (about 4 s of imports
each), so the file costs a few of those, not one per case. Config mistakes must fail
before the model loads: their stderr is exactly the error line.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GOOD = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
PREFIX = "dpo-jax: error: "


@dataclass(frozen=True)
class Case:
    """A command line (`{root}` is the fixture directory) and what its error line names."""

    args: tuple[str, ...]
    names: tuple[str, ...]
    before_model: bool = True  # a config mistake: nothing else may reach stderr


CASES = {
    "unknown_loss": Case(("--config.loss.name=sigmoidd",), ("'loss.name'", "'sigmoid'")),
    "typo_key": Case(("--config.loss.bta=0.1",), ("'loss.bta'", "no such config key")),
    "typo_section": Case(("--config.los.beta=0.1",), ("'los'", "did you mean 'loss'")),
    "typo_hyper": Case(("--config.loss.hyper.bta=0.1",), ("'loss.hyper.bta'", "'beta'")),
    "bad_type": Case(("--config.batch_size=four",), ("'batch_size'", "'four'")),
    "batch_size_0": Case(("--config.batch_size=0",), ("'batch_size'", "got 0")),
    "grad_accum_0": Case(("--config.grad_accum_steps=0",), ("'grad_accum_steps'", "got 0")),
    "data_is_directory": Case(("--config.data.train={root}/data_dir",), ("{root}/data_dir",)),
    "run_dir_under_file": Case(("--config.run_dir={root}/a_file/run",), ("'run_dir'", "a_file")),
    "run_dir_not_writable": Case(("--config.run_dir={unwritable}/run",), ("'run_dir'",)),
    "truncated_safetensors": Case(
        ("--config.model.path={root}/truncated",),
        ("{root}/truncated/model.safetensors", "truncated"),
        before_model=False,
    ),
    "lone_surrogate": Case(
        ("--config.data.train={root}/surrogate.jsonl",),
        ("{root}/surrogate.jsonl:2", "lone surrogate"),
        before_model=False,
    ),
}
# Through a compile and two train steps: lr 1e30 makes step 2's loss non-finite.
NAN_STOP = Case(
    ("--config.optim.learning_rate=1e30", "--config.grad_accum_steps=1", "--config.num_steps=3"),
    ("step 2", "non-finite", "nan_policy"),
    before_model=False,
)


def _unwritable(root: pathlib.Path) -> str:
    """A directory nobody may create files in (root ignores permission bits: use /sys)."""
    if os.geteuid() != 0:
        locked = root / "locked"
        locked.mkdir(mode=0o500, exist_ok=True)
        return str(locked)
    try:
        (pathlib.Path("/sys") / "dpo-jax-probe").mkdir()
    except OSError:
        return "/sys"
    pytest.skip("no unwritable directory available as root")


def _write_rows(path: pathlib.Path, rows: list[str]) -> None:
    path.write_text("".join(r + "\n" for r in rows))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir) -> pathlib.Path:
    """The session's tiny Llama checkpoint, good and bad data, a damaged copy."""
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "model").symlink_to(tiny_hf_dir("llama"), target_is_directory=True)
    good = json.dumps(GOOD)
    _write_rows(root / "good.jsonl", [good] * 8)
    # Line 2 holds a lone surrogate: valid JSON, text no tokenizer can encode.
    _write_rows(root / "surrogate.jsonl", [good, good.replace("blue", "bl\\ud800ue")] + [good] * 6)
    (root / "data_dir").mkdir()
    (root / "a_file").write_text("not a directory\n")
    shutil.copytree(root / "model", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return root


def _argv(case: Case, root: pathlib.Path, run_name: str, unwritable: str) -> list[str]:
    args = [
        "train", "--config", "tiny", f"--config.model.path={root}/model",
        f"--config.data.train={root}/good.jsonl", f"--config.run_dir={root}/runs/{run_name}",
        "--config.train.tensorboard=False",
    ]  # fmt: skip
    args += [a.format(root=root, unwritable=unwritable) for a in case.args]
    return [sys.executable, "-m", "dpo_jax.cli", *args]


def _run(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def results(root: pathlib.Path) -> dict[str, tuple[Case, subprocess.CompletedProcess, str]]:
    """Every quick case, run concurrently (a few at a time: each is mostly imports)."""
    unwritable = _unwritable(root)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(_run, _argv(case, root, name, unwritable))
            for name, case in CASES.items()
        }
        return {name: (CASES[name], f.result(), unwritable) for name, f in futures.items()}


def _check(case: Case, proc: subprocess.CompletedProcess, root: pathlib.Path, unwritable: str):
    err = proc.stderr
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{err[-4000:]}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(PREFIX)]
    assert len(errors) == 1, err
    if case.before_model:
        assert lines == errors, f"more than the error line on stderr:\n{err}"
    for name in case.names:
        assert name.format(root=root, unwritable=unwritable) in errors[0], errors[0]


@pytest.mark.parametrize("name", list(CASES))
def test_mistake_is_one_line_exit_2(results, root, name):
    case, proc, unwritable = results[name]
    _check(case, proc, root, unwritable)


def test_config_mistakes_leave_run_dir_untouched(results, root):
    """Validation runs before anything is written: no run directory was created."""
    for name, (case, _, _) in results.items():
        if case.before_model and not name.startswith("run_dir"):
            assert not (root / "runs" / name).exists(), name


@pytest.mark.heavy
def test_nan_stop_is_one_line_exit_2(root):
    proc = _run(_argv(NAN_STOP, root, "nan_stop", ""))
    _check(NAN_STOP, proc, root, "")
