"""`python -m experiments.NAME` speaks the same command line as `dpo-jax`: a real --help,
`--preset X` and `--preset=X`, and a mistake as one line with exit 2."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import common

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("sentiment", "tldr", "hh", "ipo_bandit")
MISTAKES = (
    (["--config.progres=false"], "'progres': no such config key"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--bogus"], "unrecognised argument '--bogus'"),
)


@pytest.mark.parametrize("module", MODULES)
def test_help_and_one_line_errors(module, capsys, monkeypatch):
    """In process, through the `__main__` path (`common.console(main, name)`)."""
    main = importlib.import_module(f"experiments.{module}").main
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as shown:
        common.console(main, module)
    assert shown.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m experiments.{module} [--preset NAME]")
    assert "presets: " in out and "\n  seed " in out
    for argv, message in MISTAKES:
        monkeypatch.setattr(sys, "argv", [module, *argv])
        assert common.console(main, module) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"python -m experiments.{module}: error: ") and message in err, err
        assert "\n" not in err, err


def test_preset_with_and_without_equals():
    from experiments import sentiment

    for argv in (["--preset", "smoke"], ["--preset=smoke"]):
        args = common.parse_args(sentiment.get_config, argv, sentiment.PRESETS, "sentiment")
        assert args.preset == "smoke" and args.config.preset == "smoke"


def test_python_dash_m_prints_one_line_and_exits_2():
    """The real `python -m` path, once (a child process costs seconds)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.sentiment", "--config.progres=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("python -m experiments.sentiment: error: config key")
    assert "\n" not in bad.stderr.strip()
