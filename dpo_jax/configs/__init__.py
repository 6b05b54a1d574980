"""ml_collections config files for `dpo-jax train`, big_vision style.

`dpo-jax train --config dpo_jax/configs/FILE.py[:ARG] [--config.key=value ...]` loads
`FILE.py`, calls its `get_config(ARG)` and applies the dotted overrides. Overrides are
parsed as Python literals (falling back to the raw string) and type-checked by the
ConfigDict; an unknown key is an error, so a typo never silently does nothing.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from dpo_jax.errors import UserError, config_error

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent

# Keys that moved: old dotted name -> new one. The old name still works (an override,
# or a key a config file or notebook sets) with a deprecation warning.
MOVED_KEYS = {
    f"ppo.{k}": f"online.{k}"
    for k in ("num_rollouts", "rollout_batch_size", "samples_per_prompt", "max_new_tokens",
              "num_mini_batches", "kl_coef", "reward")
}  # fmt: skip

# Sections whose keys are free-form (a loss's keyword arguments differ per loss), so an
# override may add a key there instead of failing as a typo.
OPEN_SECTIONS = ("loss.hyper",)
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def parse_value(text: str) -> Any:
    """A literal if the text is one (numbers, tuples, booleans, None), else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/file.py[:arg]` -> the file's `get_config(arg)` (or `get_config()`).

    A bare name (`tiny`, `tiny:arg`) is looked up in `dpo_jax/configs/`.
    """
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.exists() and not file.suffix and (CONFIG_DIR / f"{path}.py").exists():
        file = CONFIG_DIR / f"{path}.py"
    if not file.exists():
        raise UserError(
            f"config file {path!r} does not exist; give a path or a name in {str(CONFIG_DIR)!r}"
        )
    module_name = f"_dpo_jax_config_{abs(hash(str(file.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"{file}: cannot be imported as a Python config file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{file}: defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"{file}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def apply_override(config: ml_collections.ConfigDict, dotted_key: str, raw: str) -> None:
    """Set `config.a.b` from `"a.b"` and a command-line string (`parse_value`), through
    `set_value`."""
    set_value(config, dotted_key, parse_value(raw), raw)


def set_value(
    config: ml_collections.ConfigDict, dotted_key: str, value: Any, raw: str | None = None
) -> None:
    """Set `config.a.b = value` from `"a.b"`, type-checked: the one dotted-key setter
    (command-line overrides, experiments' phase configs). A deprecated key is moved
    (`MOVED_KEYS`); a mapping replaces a section; `raw` is the command-line text, kept
    as it is for a string key. An unknown key or a value of the wrong type is a
    `UserError` naming the key.
    """
    if dotted_key in MOVED_KEYS:
        log.warning("config key %s is deprecated: it is now %s", dotted_key, MOVED_KEYS[dotted_key])
        dotted_key = MOVED_KEYS[dotted_key]
    *parents, leaf = dotted_key.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            sections = [k for k, v in node.items() if isinstance(v, ml_collections.ConfigDict)]
            raise config_error(
                ".".join(parents[: i + 1]), "no such config section", _did_you_mean(part, sections)
            )
        node = node[part]
    if leaf not in node and ".".join(parents) in OPEN_SECTIONS:
        node[leaf] = value
        return
    if leaf not in node:
        raise config_error(dotted_key, "no such config key", _did_you_mean(leaf, list(node.keys())))
    current = node[leaf]
    # ConfigDict is strict about int vs float and str vs literal: coerce the obvious cases.
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, str) and not isinstance(value, str) and raw is not None:
        value = raw
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, Mapping):
        value = ml_collections.ConfigDict(dict(value))
    try:
        node[leaf] = value
    except TypeError:
        kind = _KINDS.get(type(current), f"a {type(current).__name__}")
        shown = raw if raw is not None else value
        raise config_error(dotted_key, f"{shown!r} is not {kind}", f"e.g. {current!r}") from None


def migrate_deprecated(config: ml_collections.ConfigDict) -> None:
    """Move keys set under an old name (`MOVED_KEYS`) to their new one, in place, with a
    deprecation warning. Both names set to different values is a config error."""
    from dpo_jax.configs import default  # lazy: default imports data and sharding (jax)

    defaults = None
    for old, new in MOVED_KEYS.items():
        old_section, leaf = old.split(".")
        new_section, new_leaf = new.split(".")
        section = config.get(old_section)
        if section is None or leaf not in section:
            continue
        value = section[leaf]
        del section[leaf]
        if new_section not in config:
            continue
        defaults = defaults or default.get_config()
        now = config[new_section][new_leaf]
        if now != value and now != defaults[new_section][new_leaf]:
            raise config_error(old, f"is {value!r} and {new} is {now!r}", f"set only {new}")
        log.warning("config key %s is deprecated: it is now %s", old, new)
        config[new_section][new_leaf] = value


def migrate_saved(saved: Any) -> Any:
    """A saved config (plain nested dict, e.g. a checkpoint's or a phase marker's) with
    keys under their current names (`MOVED_KEYS`), so one written before a key moved
    compares equal to today's. Anything not a dict is returned as it is."""
    if not isinstance(saved, dict):
        return saved
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for old, new in MOVED_KEYS.items():
        old_section, leaf = old.split(".")
        new_section, new_leaf = new.split(".")
        section = out.get(old_section)
        if isinstance(section, dict) and leaf in section:
            out.setdefault(new_section, {})
            if isinstance(out[new_section], dict):
                out[new_section].setdefault(new_leaf, section.pop(leaf))
    return out


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    listed = f"known: {', '.join(sorted(known))}"
    return f"did you mean {close[0]!r}? {listed}" if close else listed


def accept_overrides(parser: Any) -> None:
    """Let `parser` take `--config.KEY=VALUE` flags: they are pulled out before argparse
    (which rejects unknown flags) and left on the namespace as `config_overrides`."""
    original = parser.parse_known_args

    def parse_known_args(args: Sequence[str] | None = None, namespace: Any = None):
        rest, overrides = split_overrides(list(args or []))
        ns, extra = original(rest, namespace)
        ns.config_overrides = overrides
        return ns, extra

    parser.parse_known_args = parse_known_args


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate `--config.k=v` / `--config.k v` overrides from the other arguments."""
    rest: list[str] = []
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg}: missing value; write {arg}=VALUE")
                value = argv[i + 1]
                i += 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """Config file plus overrides, the same thing `dpo-jax train` builds."""
    config = load_config_file(os.fspath(spec))
    for key, value in overrides:
        apply_override(config, key, value)
    return config


def complete_section(name: str, given: Any = None) -> dict[str, Any]:
    """`configs/default.py`'s section `name` with the keys of `given` (a dict or
    ConfigDict, possibly partial) over it: the one place a missing setting gets its
    default. A key the section does not have is refused (a typo never does nothing)."""
    from dpo_jax.configs import default  # lazy: default imports data and sharding (jax)

    out = default.get_config()[name].to_dict()
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given or {})
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise config_error(
            f"{name}.{unknown[0]}", "no such config key", _did_you_mean(unknown[0], list(out))
        )
    out.update(given)
    return out
