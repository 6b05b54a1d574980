"""The one error type for user mistakes and config problems.

A `UserError` names the file, line or config key at fault and says what to do.
The console script (`dpo_jax.cli.console_main`) prints it as one line on stderr
and exits with code 2; library callers and tests see the exception itself.
Data-row problems (`dpo_jax.data.errors.DataError`) are a kind of `UserError`.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix: bad config key or value, bad file, refused resume.

    Subclasses `ValueError` so code that already catches `ValueError` keeps working.
    The message is one line: `<where>: <problem>[; <what to do>]`.
    """


def config_error(key: str, problem: str, hint: str = "") -> UserError:
    """A `UserError` for config key `key` (dotted, e.g. `loss.hyper.beta`)."""
    message = f"config key '{key}': {problem}"
    return UserError(f"{message}; {hint}" if hint else message)
