"""What a resume trusts: the config check, the metrics log, step directories, the layout.

`dpo_jax.checkpoint.Checkpointer` restores through these rules: a step directory without
Orbax's commit marker or with unreadable metadata (`step_problem`) is moved aside to
``<step>.skipped-<reason>`` (`move_aside`) and an older step is tried, and so is one whose
arrays no longer match their saved fingerprints (`damage`); a config whose math-changing
keys (all but `NON_MATH_KEYS`) differ from the checkpoint's is refused (`check_config`,
`config_diff`); a state that does not fit the saved one is refused, never moved
(`check_structure`); metric rows written after the restored step are dropped
(`truncate_jsonl`). `resolve_checkpoint` finds a complete step for reading back.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dpo_jax import configs, integrity, paths
from dpo_jax.configs import default
from dpo_jax.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"

# Orbax's commit marker: written into a step directory when the step is complete, on
# every file system (on local disks Orbax also renames a temporary directory
# atomically). Completeness is asked through Orbax's public API (`is_committed`);
# the name is kept for messages and tests.
COMMIT_MARKER = ocp.path.atomicity.COMMIT_SUCCESS_FILE
# The one private Orbax name this module relies on: the step metadata file, whose
# presence tells a step directory from a run or checkpoints directory in
# `resolve_checkpoint`. Read it only through `ocp.metadata.get_step_metadata`.
# tests/test_checkpoint.py::test_orbax_private_names_still_hold fails if Orbax renames it.
STEP_METADATA = "_CHECKPOINT_METADATA"
ITEM_NAMES = ("state", "data", "meta")

# Config keys (whole dotted paths of configs/default.py) whose change does not change
# the math of a run: where to write, how often to log, evaluate or save, how the same
# computation is laid out on devices. Every other key -- model, loss and its
# hyper-parameters, batch size, data, seed, optimizer, schedule, number of steps, and
# any key added later -- must match on resume unless checkpoint.force_resume.
# tests/test_resume_safety.py walks every key of get_config() against this list.
NON_MATH_KEYS: tuple[str, ...] = (
    "run_dir",
    "allow_downloads",  # whether a Hub name may be fetched, not what it holds
    "checkpoint.enabled",
    "checkpoint.save_every",
    "checkpoint.keep_last",
    "checkpoint.keep_every",
    "checkpoint.force_resume",
    "checkpoint.async_save",
    "checkpoint.export_hf",
    "mesh.data",  # restore reshards onto any mesh
    "mesh.fsdp",
    "mesh.tensor",
    "mesh.sequence",  # params never name the sequence axis: restore is the same layout
    "mesh.multihost",
    "mesh.rules",  # restore reshards onto any layout
    "model.remat",  # same math, less memory
    "model.attention",  # same math, another kernel (blockwise/cuDNN/splash; float rounding only)
    "data.eval",  # held-out data is only evaluated, never trained on
    "data.num_eval_examples",
    "data.cache_dir",  # where tokenized data is cached, not what it holds (the key hashes it)
    "train.log_every",
    "train.eval_every",
    "train.nan_policy",  # switching stop -> skip after a NaN stop is the point of resuming
    "train.max_skipped_fraction",  # when to give up, not what a step computes
    "train.logps_chunk_size",  # same math, less memory
    "train.unembed_scored_only",  # same math, less work
    "train.progress",
    "train.tensorboard",
    "train.report_to",  # where metric rows are also sent
    "train.token_metrics",  # TRL's entropy/logits/accuracy metrics: logged, never trained on
    # accepting unfingerprinted reference columns changes no number (the data fingerprint
    # still refuses other data); switching it on after a refusal is the point of resuming
    "reference.trust_precomputed",
)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but cannot be used (a user error: the console exits 2)."""


class ConfigMismatchError(CheckpointError):
    """Resuming would silently change the math of the run."""


class SkippedStep(NamedTuple):
    """A step directory resume refused to trust, and where it was moved."""

    step: int
    reason: str
    moved_to: str | None


# ---------------------------------------------------------------- JSON helpers


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types from a config: dataclasses, ConfigDicts, mappings, paths, enums, numpy."""
    if not isinstance(obj, type) and callable(getattr(obj, "to_dict", None)):
        return to_jsonable(obj.to_dict())  # ml_collections.ConfigDict, models.ModelConfig
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray | jax.Array):
        return np.asarray(obj).tolist()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, type) or callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    return repr(obj)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-path view of a nested JSON dict, lists kept as leaves."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        if not tree and prefix:
            out[prefix] = {}
        return out
    return {prefix: tree}


def _is_ignored(path: str, patterns: Iterable[str]) -> bool:
    # Whole dotted keys only: "name" must not hide "loss.name" or "optim.name".
    return any(path == pat or fnmatch.fnmatchcase(path, pat) for pat in patterns)


_MISSING = "<absent>"


def config_diff(
    saved: Any, current: Any, ignore: Iterable[str] = NON_MATH_KEYS, defaults: Any = None
) -> list[tuple[str, Any, Any]]:
    """Math-relevant differences ``(dotted_key, saved_value, current_value)`` between configs.

    With `defaults` (`configs/default.py`'s tree), a key absent from `saved` whose current
    value is its default is no difference: the key was added to dpo_jax after the
    checkpoint, and a new key's default keeps the old behaviour.
    """
    a = _flatten(json.loads(json.dumps(to_jsonable(saved))))
    b = _flatten(json.loads(json.dumps(to_jsonable(current))))
    d = _flatten(json.loads(json.dumps(to_jsonable(defaults)))) if defaults is not None else {}
    ignore = tuple(ignore)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if _is_ignored(key, ignore):
            continue
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va is _MISSING and key in d and vb == d[key]:
            continue
        if va != vb:
            diffs.append((key, va, vb))
    return diffs


def check_config(
    where: Any, saved: Any, current: Any, *, ignore: Iterable[str] = (), force: bool = False
) -> None:
    """Refuse (`ConfigMismatchError`) to resume the checkpoint at `where` when `current`
    changes the math of the run `saved` configured; with `force` the changes are logged.

    `ignore` adds keys (or fnmatch patterns) to `NON_MATH_KEYS`.
    """
    # a checkpoint written before a key moved (ppo.reward -> online.reward) compares
    # under the key's current name
    saved = configs.migrate_saved(json.loads(json.dumps(to_jsonable(saved))))
    diffs = config_diff(
        saved, current, ignore=NON_MATH_KEYS + tuple(ignore), defaults=default.get_config()
    )
    if not diffs:
        return
    lines = "; ".join(f"{k}: checkpoint={a!r} now={b!r}" for k, a, b in diffs)
    if force:
        log.warning("force_resume: resuming %s despite config changes: %s", where, lines)
        return
    raise ConfigMismatchError(
        f"{where}: refusing to resume, the config changes the math of the checkpointed "
        f"run ({lines}); use a new run_dir, or set checkpoint.force_resume=true to resume "
        "anyway"
    )


def damage(where: Any, meta: Mapping[str, Any], state: Any) -> str | None:
    """Why the restored arrays of the step at `where` differ from what was saved (its
    `meta`'s fingerprints, `dpo_jax.integrity`), or None when they match."""
    saved = meta.get("fingerprints")
    if not isinstance(saved, Mapping):
        log.warning(
            "%s: no array fingerprints (written by an older dpo_jax); restored unverified", where
        )
        return None
    bad, unverified = integrity.mismatches(saved, state)
    if unverified:
        log.info("%d arrays restored in another dtype were not verified", len(unverified))
    if not bad:
        return None
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return f"checksum mismatch in {len(bad)} saved array(s) ({shown}): damaged on disk"


def truncate_jsonl(path: str | os.PathLike, step: int, key: str = "step") -> int:
    """Drop lines of a metrics JSONL written after ``step`` (and a torn last line).

    Called on resume so the metrics file reads as if the run had never been killed.
    When the dropped lines are a tail (the normal case) the file is truncated in
    place, so a writer that already holds it open in append mode keeps working.
    A line in the middle that is not JSON (an editor, another writer, disk damage) is
    moved to ``<path>.bad-lines`` with a warning naming its line: the file is a log of
    the run, not its state, so it must not block a resume, and nothing is lost.
    Returns how many lines were dropped. A missing file is fine (returns 0).
    """
    path = paths.as_path(path)
    if not path.exists() or jax.process_index() != 0:
        return 0
    lines = path.read_bytes().splitlines(keepends=True)
    keep: list[bool] = []
    bad: list[bytes] = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            keep.append(False)
            if i == len(lines) - 1:  # torn by a kill mid-write
                continue
            bad.append(line if line.endswith(b"\n") else line + b"\n")
            log.warning(
                "%s:%d: not a JSON line (%s); moved to %s.bad-lines",
                path, i + 1, getattr(e, "msg", e), path.name,
            )  # fmt: skip
            continue
        late = isinstance(row, dict) and isinstance(row.get(key), int) and row[key] > step
        keep.append(not late)
    dropped = keep.count(False)
    if not dropped:
        return 0
    if bad:
        side = path.with_name(path.name + ".bad-lines")
        old = side.read_bytes() if side.exists() else b""
        paths.write_atomic(side, old + b"".join(bad))
    kept = [line for line, k in zip(lines, keep, strict=True) if k]
    prefix = sum(keep[: len(kept)]) == len(kept)
    if prefix and not paths.is_url(path):
        with open(os.fspath(path), "r+b") as f:
            f.truncate(sum(len(line) for line in kept))
            if kept and not kept[-1].endswith(b"\n"):
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
    else:  # a kill leaves the old or the new file
        paths.write_atomic(path, b"".join(k if k.endswith(b"\n") else k + b"\n" for k in kept))
    return dropped


# ----------------------------------------------------------- step directories


def step_dirs(directory: epath.Path) -> dict[int, epath.Path]:
    """Directories named by an integer step (what Orbax lists as steps).

    In a bucket a step directory without Orbax's commit marker is Orbax's in-flight
    temporary (there is no rename there): left to `unfinished_tmp_dirs`.
    """
    if not directory.is_dir():
        return {}
    return {
        int(p.name): p
        for p in directory.iterdir()
        if p.is_dir() and p.name.isdigit() and (not paths.is_url(p) or is_committed(p))
    }


def unfinished_tmp_dirs(directory: epath.Path) -> list[epath.Path]:
    """Orbax's in-flight temporary step directories left behind by a kill."""
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.is_dir() and ocp.step.is_path_temporary(p)]


def is_committed(step_dir: epath.Path) -> bool:
    """Whether Orbax finished this step (its commit marker is there), by Orbax's own test."""
    return bool(
        ocp.step.is_path_finalized(
            step_dir, temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath
        )
    )


def step_problem(step_dir: epath.Path) -> str | None:
    """Why a step directory cannot be trusted, or None when it looks complete."""
    if not is_committed(step_dir):
        return f"no commit marker ({COMMIT_MARKER})"
    try:
        meta = ocp.metadata.get_step_metadata(step_dir)
    except Exception as e:  # noqa: BLE001 -- garbage bytes, bad JSON, wrong types: do not trust
        return f"unreadable step metadata ({type(e).__name__}: {str(e)[:200]})"
    if not getattr(meta, "commit_timestamp_nsecs", None):
        return "step metadata has no commit timestamp"
    for item in ITEM_NAMES:
        if not (step_dir / item).is_dir():
            return f"item '{item}' missing"
    return None


def move_aside(step_dir: epath.Path, reason_tag: str) -> str | None:
    """Rename a bad step out of Orbax's sight, keeping it for inspection."""
    if jax.process_index() != 0:
        return None
    target = step_dir.with_name(f"{step_dir.name}.skipped-{reason_tag}-{int(time.time())}")
    try:
        step_dir.rename(target)
    except OSError as e:  # read-only media: still refuse to use it, just do not move it
        log.warning("could not move %s aside: %s", step_dir, e)
        return None
    return str(target)


_path_name = integrity.path_name


def shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """``'a/b/0/c' -> shape`` for every array leaf; dataclass fields, dict keys,
    NamedTuple fields and list indices all become plain path segments, so the saved
    metadata tree (dicts and lists) and the live state (dataclasses) compare."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_path_name(e) for e in path): tuple(leaf.shape)
        for path, leaf in leaves
        if hasattr(leaf, "shape")
    }


def check_structure(
    where: epath.Path, saved: Mapping[str, tuple[int, ...]], target: Mapping[str, tuple[int, ...]]
) -> None:
    """Refuse (`CheckpointError`) a saved state whose arrays (`shapes_by_path`) are not
    those of the state this run builds: the caller changed, the disk did not."""
    problems = [
        f"  {k}: in the checkpoint, not in the state" for k in sorted(set(saved) - set(target))
    ]
    problems += [
        f"  {k}: in the state, not in the checkpoint" for k in sorted(set(target) - set(saved))
    ]
    problems += [
        f"  {k}: checkpoint shape {saved[k]} != state shape {target[k]}"
        for k in sorted(set(saved) & set(target))
        if tuple(saved[k]) != tuple(target[k])
    ]
    if problems:
        shown = "; ".join(p.strip() for p in problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(
            f"{where}: the saved state does not fit the state this run builds "
            f"(a different model or optimizer?): {shown}{more}"
        )


# ------------------------------------------------------------ reading a checkpoint back


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int]:
    """``(checkpoints_dir, step)`` from a run dir, a checkpoints dir or one step dir.

    Without ``step`` the newest complete step is used; incomplete ones are reported
    and left alone (export never modifies a run).
    """
    path = paths.as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if path.name.isdigit() and (path / STEP_METADATA).exists():
        directory, candidates = path.parent, [int(path.name)]
        if step is not None and step != int(path.name):
            raise UserError(f"{path}: is step {path.name}, but step={step} was asked for")
    else:
        directory = path / CHECKPOINTS_SUBDIR if (path / CHECKPOINTS_SUBDIR).is_dir() else path
        steps = step_dirs(directory)
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"{directory}: no step {step} (steps present: {sorted(steps)})"
                )
            candidates = [step]
        else:
            candidates = sorted(steps, reverse=True)
    for candidate in candidates:
        problem = step_problem(directory / str(candidate))
        if problem is None:
            return directory, candidate
        log.warning("ignoring checkpoint step %d in %s: %s", candidate, directory, problem)
    raise FileNotFoundError(f"{path}: no complete checkpoint step found")
