"""Hashes of the code a run's numbers come from: its loss and objective functions.

A config names its loss (`loss.name`, a `losses` registry entry, perhaps registered in a
notebook) and its objective (`objective.name`); editing a loss's body under the same
name changes the run's math without changing its config. `of_config(config)` records a
hash per function the config uses; an experiment phase's marker and a checkpoint's
metadata keep that record, and `changed(saved)` names the entries whose code differs
now, so a stale phase reruns and a resume is refused (experiments/phases.py,
dpo_jax/checkpoint.py).

A function's hash is the sha256 of its source (`inspect.getsource`), or, where no source
can be found (code typed into `exec`, a REPL), of its code object: bytecode, constants
and names, nested code objects included. A function defined inside dpo_jax also hashes
the package version: a release may change the helpers it calls, not only its own body.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

from dpo_jax import __version__, losses, objectives
from dpo_jax.errors import UserError

# (kind, registry lookup) per entry prefix: "loss:NAME", "objective:NAME".
_LOOKUPS: dict[str, Callable[[str], Any]] = {"loss": losses.get, "objective": objectives.get}


def _code_bytes(code: types.CodeType) -> bytes:
    """Bytecode, constants and names of `code`, nested code objects recursed into (their
    repr would carry a memory address and line numbers)."""
    parts = [code.co_code, repr(code.co_names).encode(), repr(code.co_varnames).encode()]
    for const in code.co_consts:
        parts.append(
            _code_bytes(const) if isinstance(const, types.CodeType) else repr(const).encode()
        )
    return b"\x00".join(parts)


def _callable_bytes(fn: Any) -> bytes:
    """What identifies `fn`'s code: its source, else its code object, else its repr."""
    if isinstance(fn, functools.partial):
        return _callable_bytes(fn.func) + repr((fn.args, sorted(fn.keywords.items()))).encode()
    fn = inspect.unwrap(fn) if callable(fn) else fn
    try:
        return inspect.getsource(fn).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        return _code_bytes(code) if code is not None else repr(fn).encode()


def function_hash(fn: Any) -> str:
    """sha256 (hex, 16 characters) of `fn`'s code; dpo_jax's own functions add the version."""
    digest = hashlib.sha256(_callable_bytes(fn))
    if str(getattr(inspect.unwrap(fn), "__module__", "")).startswith("dpo_jax."):
        digest.update(f"dpo_jax=={__version__}".encode())
    return digest.hexdigest()[:16]


def _objective_hash(objective: objectives.Objective) -> str:
    """One hash over every function an objective carries (its loss, needs, head, ...)."""
    digest = hashlib.sha256()
    for field in dataclasses.fields(objective):
        value = getattr(objective, field.name)
        if isinstance(value, objectives.Head):
            value = (value.init, value.logical_axes)
        for fn in value if isinstance(value, tuple) else (value,):
            if callable(fn):
                digest.update(f"{field.name}={function_hash(fn)};".encode())
    return digest.hexdigest()[:16]


def entry_hash(entry: str) -> str | None:
    """The current hash of a record entry ("loss:NAME" | "objective:NAME"); None when the
    name is not registered now (nothing to compare against)."""
    kind, _, name = entry.partition(":")
    try:
        found = _LOOKUPS[kind](name)
    except KeyError:
        return None
    return _objective_hash(found) if kind == "objective" else function_hash(found)


def _get(config: Mapping[str, Any] | Any, dotted: str, default: Any = None) -> Any:
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def entries(config: Mapping[str, Any] | Any) -> list[str]:
    """The code a run config uses: its objective and, if the objective reads `loss.*`,
    each loss of `loss.name` (a mix names several)."""
    objective, loss = _get(config, "objective.name"), _get(config, "loss.name")
    if objective is None and loss is None:  # not a run config (a test's {"a": 1})
        return []
    name = str(objective or "preference")
    out = [f"objective:{name}"]
    try:
        uses_loss = objectives.get(name).uses_loss
    except KeyError:
        return out
    if uses_loss and loss is not None:
        try:
            spec = losses.parse_loss_spec(loss, _get(config, "loss.weights"))
        except UserError:  # no such loss: no code to record (validation says so elsewhere)
            return out
        out += [f"loss:{n}" for n in losses.loss_names(spec)]
    return out


def of_config(config: Mapping[str, Any] | Any) -> dict[str, str]:
    """`{entry: hash}` of the code `config` uses (see `entries`)."""
    return {entry: h for entry in entries(config) if (h := entry_hash(entry)) is not None}


def changed(saved: Mapping[str, str] | None) -> list[str]:
    """The entries of a saved record whose code differs now (a name no longer registered
    is no difference: nothing shows its code changed)."""
    out = []
    for entry, old in (saved or {}).items():
        now = entry_hash(entry)
        if now is not None and now != old:
            out.append(entry)
    return out


def describe(changes: list[str]) -> str:
    """`loss 'mine'` / `objective 'sft'`, joined, for one-line messages."""
    return ", ".join(f"{e.partition(':')[0]} {e.partition(':')[2]!r}" for e in changes)


def resume_problem(saved: Mapping[str, str] | None) -> str | None:
    """Why a checkpoint written with the code record `saved` must not resume now, or None."""
    changes = changed(saved)
    if not changes:
        return None
    return f"the code of {describe(changes)} changed since the checkpoint was written"
