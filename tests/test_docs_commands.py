"""Every command the README and docs/ print runs, exactly as printed.

A doc's fenced blocks are of three kinds:

- ```` ```bash ````: commands, run in order in a scratch directory that holds the
  placeholders the docs use (`HF_DIR`, `pairs.jsonl`, ... see `_workspace`). `dpo-jax ...`
  runs in this process through the console entry (`cli.console_main`, exit status 0
  expected); `python -m MODULE ...` runs as a child process.
- ```` ```flags ````: one line of `--config.KEY=VALUE` flags each, to add to a train
  command: each line must load and validate on the default config.
- ```` ```jsonl ````: example data rows: each must parse in the format it shows.

A block that cannot run here is marked on the line before it with
`<!-- docs-test: skip (REASON) -->`, REASON one of `SKIP_REASONS`. The default suite
checks that every block is runnable or marked, and the flags and rows (no device work);
the heavy tier runs the commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_jax import cli, configs
from dpo_jax.configs import validate
from dpo_jax.data import formats
from dpo_jax.data.sources import Row

ROOT = Path(__file__).resolve().parent.parent
DOCS = (
    "README.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
    "experiments/README.md",
    "benchmarks/README.md",
    "tests/README.md",
)
SKIP_REASONS = (
    "needs a Cloud TPU VM",
    "needs a GPU cluster",
    "needs the Hub",
    "needs a TRL run",
    "installs packages",
    "a full measurement, minutes to hours",
    "runs the test suite",
)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+?)\)\s*-->\s*$")
RUN_KINDS = ("bash", "sh", "shell", "console")


def blocks(doc: str) -> list[tuple[str, str, str | None, int]]:
    """`(kind, body, skip_reason, line)` of every fenced block of `doc`."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rpartition("\n")[2]
        mark = MARK.search(before)
        out.append(
            (
                m.group(1),
                m.group(2),
                mark.group(1) if mark else None,
                text.count("\n", 0, m.start()) + 1,
            )
        )
    return out


def commands(body: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", body)
    out = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def _runnable(argv: list[str]) -> str | None:
    """Why `argv` cannot be run by this test, or None."""
    if argv[0] == "dpo-jax" or argv[0].endswith("/dpo-jax"):
        return None
    if argv[0].rsplit("/", 1)[-1] in ("python", "python3") and argv[1:2] == ["-m"]:
        return None
    return f"`{argv[0]}` is neither dpo-jax nor `python -m`"


def test_every_block_runs_or_is_marked_and_every_flag_and_row_checks(tokenizer):
    """No device work: the blocks' shapes, the flags against the config, the rows' formats."""
    seen_runnable = 0
    for doc in DOCS:
        for kind, body, reason, line in blocks(doc):
            where = f"{doc}:{line}"
            if reason is not None:
                assert reason in SKIP_REASONS, f"{where}: unknown skip reason {reason!r}"
                continue
            if kind in RUN_KINDS:
                for argv in commands(body):
                    problem = _runnable(argv)
                    assert problem is None, f"{where}: {problem}; mark the block (module docstring)"
                    seen_runnable += 1
            elif kind == "flags":
                for argv in commands(body):
                    rest, overrides = configs.split_overrides(argv)
                    assert not rest, f"{where}: {rest[0]!r} is not a --config.KEY=VALUE flag"
                    validate.validate(configs.load("default", overrides))
            elif kind == "jsonl":
                for i, text in enumerate(body.splitlines()):
                    row = Row(json.loads(text), source=doc, line=line + 1 + i)
                    assert formats.parse_row(row, "auto", tokenizer), f"{where}: {text}"
    assert seen_runnable >= 10, "the docs test found almost no commands"


# ------------------------------------------------------------------ the heavy tier


def _rows(n: int, seed: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = [
        "good",
        "bad",
        "movie",
        "film",
        "great",
        "awful",
        "plot",
        "actor",
        "scene",
        "fine",
        "dull",
        "bright",
        "story",
    ]
    out = []
    for _ in range(n):
        prompt = "Review: " + " ".join(rng.choice(words, 4))
        out.append(
            {
                "prompt": prompt,
                "chosen": " " + " ".join(rng.choice(words, 3)),
                "rejected": " " + " ".join(rng.choice(words, 2)),
            }
        )
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def base_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Everything the docs' placeholders name, built once: a tiny Llama with a chat
    tokenizer, data files of every kind, a python reward, a reward model."""
    from tests import hf_fixtures

    base = tmp_path_factory.mktemp("docs_inputs")
    tok = hf_fixtures.train_tokenizer(chat_template=True)
    hf_fixtures.make_tiny_hf_model("llama", base / "HF_DIR", tokenizer=tok, seed=1)
    pairs = _rows(64, 0)
    _write_jsonl(base / "pairs.jsonl", pairs)
    _write_jsonl(base / "held_out.jsonl", _rows(16, 1))
    _write_jsonl(base / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pairs[:16]])
    _write_jsonl(
        base / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs]
    )
    unpaired = [
        {"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
        for r in pairs[:32]
        for k in ("chosen", "rejected")
    ]
    _write_jsonl(base / "unpaired.jsonl", unpaired)
    (base / "my_rewards.py").write_text(
        "def reward(prompts, completions, **kwargs):\n"
        "    return [float(c.count('good') - c.count('bad')) for c in completions]\n"
        "\n\nfn = reward\n",
        encoding="utf-8",
    )
    # RM_DIR: an exported reward model, made with the commands the README prints.
    cwd = os.getcwd()
    os.chdir(base)
    try:
        for argv in (
            ["train", "--config", "tiny", "--config.objective.name=reward_model",
             "--config.model.path=HF_DIR", "--config.data.train=pairs.jsonl",
             "--config.run_dir=runs/rm", "--config.checkpoint.enabled=True"],
            ["export", "--checkpoint", "runs/rm", "--output", "RM_DIR"],
        ):  # fmt: skip
            assert cli.console_main(argv) == 0, argv
    finally:
        os.chdir(cwd)
    shutil.rmtree(base / "runs")
    return base


def _workspace(base: Path, tmp: Path) -> Path:
    """A fresh scratch directory with the inputs and the repository's packages in it."""
    work = tmp / "work"
    shutil.copytree(base, work, symlinks=True)
    for name in ("dpo_jax", "experiments", "benchmarks", "notebooks"):
        (work / name).symlink_to(ROOT / name)
    for alias in ("POLICY_DIR", "REF_DIR", "SFT_DIR"):
        (work / alias).symlink_to(work / "HF_DIR")
    return work


def _run(argv: list[str], work: Path, where: str) -> None:
    if argv[0].endswith("dpo-jax"):
        rc = cli.console_main(argv[1:])
    else:
        env = dict(os.environ, PYTHONPATH=f"{work}{os.pathsep}{ROOT}")
        proc = subprocess.run(
            [sys.executable, *argv[1:]], cwd=work, env=env, capture_output=True, text=True
        )
        rc = proc.returncode
        if rc:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
    assert rc == 0, f"{where}: `{shlex.join(argv)}` exited {rc}"


RUN_DOCS = [d for d in DOCS if any(k in RUN_KINDS and r is None for k, _, r, _ in blocks(d))]


@pytest.mark.heavy  # every printed command of one doc, in order (tiny model; ~10 s each)
@pytest.mark.parametrize("doc", RUN_DOCS)
def test_doc_commands_run_as_printed(doc, base_inputs, tmp_path, monkeypatch):
    work = _workspace(base_inputs, tmp_path)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))  # python:my_rewards:fn
    for kind, body, reason, line in blocks(doc):
        if kind not in RUN_KINDS or reason is not None:
            continue
        for argv in commands(body):
            _run(argv, work, f"{doc}:{line}")
