"""The console script reports a user's mistake in one line and exits 2; `main` raises."""

from __future__ import annotations

import pytest

from dpo_jax import cli


def test_console_main_names_the_missing_model_dir(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    argv = [
        "ref-logps",
        "--model",
        str(missing),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "o"),
    ]
    assert cli.console_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpo-jax: error: ") and str(missing) in err
    assert "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(argv)


def test_unknown_subcommand_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.console_main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
