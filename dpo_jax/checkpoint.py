"""Reliable training runs: Orbax checkpoints, exact resume, preemption.

A run directory holds ``checkpoints/<step>/`` (one Orbax step per saved step, each
with the items ``state`` (params, optimizer state, step, PRNG key), ``data`` (the
loader's JSON state) and ``meta`` (run config, model config, extra counters)),
``tokenizer/`` (saved once, for export) and whatever the train loop writes.

Resume trusts only finished, intact steps: a step directory without Orbax's commit
marker, one that fails to read, or one whose arrays no longer match the fingerprints
saved with them (``dpo_jax.integrity``) is moved aside to ``<step>.skipped-<reason>``
and reported, and the previous step is used. The file-system layout is Orbax's own, so
Orbax tools read these checkpoints too. ``load_params`` reads one step's params back;
Hugging Face and PEFT export of a checkpoint live in ``dpo_jax.export``.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dpo_jax import configs, integrity, paths
from dpo_jax.errors import UserError
from dpo_jax.metrics import METRICS_FILENAME

log = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
TOKENIZER_SUBDIR = "tokenizer"
# Orbax's commit marker: written into a step directory when the step is complete, on
# every file system (on local disks Orbax also renames a temporary directory
# atomically). Completeness is asked through Orbax's public API (`_is_committed`);
# the name is kept for messages and tests.
COMMIT_MARKER = ocp.path.atomicity.COMMIT_SUCCESS_FILE
# The one private Orbax name this module relies on: the step metadata file, whose
# presence tells a step directory from a run or checkpoints directory in
# `resolve_checkpoint`. Read it only through `ocp.metadata.get_step_metadata`.
# tests/test_checkpoint.py::test_orbax_private_names_still_hold fails if Orbax renames it.
STEP_METADATA = "_CHECKPOINT_METADATA"
ITEM_NAMES = ("state", "data", "meta")
# 2: `meta` holds per-array fingerprints of `state` (dpo_jax.integrity), verified on restore.
FORMAT_VERSION = 2

# Config keys (whole dotted paths of configs/default.py) whose change does not change
# the math of a run: where to write, how often to log, evaluate or save, how the same
# computation is laid out on devices. Every other key -- model, loss and its
# hyper-parameters, batch size, data, seed, optimizer, schedule, number of steps, and
# any key added later -- must match on resume unless checkpoint.force_resume.
# tests/test_resume_safety.py walks every key of get_config() against this list.
NON_MATH_KEYS: tuple[str, ...] = (
    "run_dir",
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
    "train.token_metrics",  # TRL's entropy/logits/accuracy metrics: logged, never trained on
    # accepting unfingerprinted reference columns changes no number (the data fingerprint
    # still refuses other data); switching it on after a refusal is the point of resuming
    "reference.trust_precomputed",
)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but cannot be used (a user error: the console exits 2)."""


class ConfigMismatchError(CheckpointError):
    """Resuming would silently change the math of the run."""


def _positive_or_none(value: Any) -> int | None:
    return None if value is None or int(value) <= 0 else int(value)


def _default(key: str) -> Any:
    """`configs/default.py`'s `checkpoint.KEY`, as `CheckpointOptions` holds it."""
    value = configs.complete_section("checkpoint")[key]
    return _positive_or_none(value) if key in ("keep_last", "keep_every") else value


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """How often to save and what to keep.

    save_every: save when ``step % save_every == 0`` (and on force / SIGTERM).
    keep_last: keep the newest K steps (None keeps all).
    keep_every: additionally never delete steps divisible by M (None: off).
    async_save: write in a background thread; the train step goes on meanwhile.
    force_resume: resume even when math-changing config keys differ (they are logged).
    ignore_config_keys: more keys whose differences never block resume: whole dotted
        keys, or fnmatch patterns matched against the whole dotted key (``"lora.*"``).
    handle_sigterm: install a SIGTERM handler that sets ``Checkpointer.preempted``.
    """

    # defaults: configs/default.py's `checkpoint` section (the only default of each)
    save_every: int = dataclasses.field(default_factory=lambda: _default("save_every"))
    keep_last: int | None = dataclasses.field(default_factory=lambda: _default("keep_last"))
    keep_every: int | None = dataclasses.field(default_factory=lambda: _default("keep_every"))
    async_save: bool = dataclasses.field(default_factory=lambda: _default("async_save"))
    force_resume: bool = dataclasses.field(default_factory=lambda: _default("force_resume"))
    ignore_config_keys: tuple[str, ...] = ()
    handle_sigterm: bool = True

    def __post_init__(self) -> None:
        if self.save_every < 1:
            raise ValueError(f"CheckpointOptions.save_every must be >= 1, got {self.save_every}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(
                f"CheckpointOptions.keep_last must be >= 1 or None, got {self.keep_last}"
            )
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(
                f"CheckpointOptions.keep_every must be >= 1 or None, got {self.keep_every}"
            )


class Restored(NamedTuple):
    """What a resumed run gets back."""

    step: int
    state: Any
    data_state: Any
    extra: dict[str, Any]
    config: dict[str, Any]


class SkippedStep(NamedTuple):
    """A step directory resume refused to trust, and where it was moved."""

    step: int
    reason: str
    moved_to: str | None


# ---------------------------------------------------------------- paths


as_path = paths.as_path  # local paths made absolute; gs:// kept (what Orbax takes)


def _copy_tree_files(source: epath.Path, target: epath.Path, keep: Callable[[str], bool]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for p in source.iterdir():
        if p.is_file() and keep(p.name):
            p.copy(target / p.name, overwrite=True)


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith(("tokenizer", "special_tokens", "vocab")) or name in (
        "merges.txt",
        "chat_template.jinja",
        "added_tokens.json",
    )


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
    path = as_path(path)
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


# ----------------------------------------------------------- PRNG key handling
# Orbax stores plain arrays; typed PRNG keys are saved as their uint32 key data and
# re-wrapped on restore with the impl of the target abstract leaf.


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(abstract: Any) -> Any:
    def convert(x: Any) -> Any:
        if not _is_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(convert, abstract)


def _data_to_keys(tree: Any, abstract: Any) -> Any:
    def convert(x: Any, a: Any) -> Any:
        return jax.random.wrap_key_data(x, impl=a.dtype._impl) if _is_key(a) else x

    return jax.tree.map(convert, tree, abstract)


def _encode_data_state(data_state: Any) -> Any:
    # grain's own iterators return bytes; keep the JSON item valid either way.
    if isinstance(data_state, bytes):
        return {"__bytes__": data_state.decode("latin-1")}
    return to_jsonable(data_state)


def _decode_data_state(data_state: Any) -> Any:
    if isinstance(data_state, dict) and set(data_state) == {"__bytes__"}:
        return data_state["__bytes__"].encode("latin-1")
    return data_state


# ----------------------------------------------------------- step directories


def _step_dirs(directory: epath.Path) -> dict[int, epath.Path]:
    """Directories named by an integer step (what Orbax lists as steps).

    In a bucket a step directory without Orbax's commit marker is Orbax's in-flight
    temporary (there is no rename there): left to `_unfinished_tmp_dirs`.
    """
    if not directory.is_dir():
        return {}
    return {
        int(p.name): p
        for p in directory.iterdir()
        if p.is_dir() and p.name.isdigit() and (not paths.is_url(p) or _is_committed(p))
    }


def _unfinished_tmp_dirs(directory: epath.Path) -> list[epath.Path]:
    """Orbax's in-flight temporary step directories left behind by a kill."""
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.is_dir() and ocp.step.is_path_temporary(p)]


def _is_committed(step_dir: epath.Path) -> bool:
    """Whether Orbax finished this step (its commit marker is there), by Orbax's own test."""
    return bool(
        ocp.step.is_path_finalized(
            step_dir, temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath
        )
    )


def step_problem(step_dir: epath.Path) -> str | None:
    """Why a step directory cannot be trusted, or None when it looks complete."""
    if not _is_committed(step_dir):
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


def _move_aside(step_dir: epath.Path, reason_tag: str) -> str | None:
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


def _item_handlers(state_handler: Any = None) -> dict[str, Any]:
    return {
        "state": state_handler or ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(name)


# ------------------------------------------------------------------ Checkpointer


class Checkpointer:
    """Orbax CheckpointManager for one run directory, with the hooks the train loop calls.

    See docs/CONTRACTS.md "Checkpointing" for the calling protocol.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        options: CheckpointOptions | None = None,
        config: Any = None,
        model_config: Any = None,
        tokenizer: Any = None,
        metrics_path: str | os.PathLike | None = None,
    ) -> None:
        self.run_dir = as_path(run_dir)
        # On resume, metric rows written after the restored step are dropped from here.
        self.metrics_path = as_path(metrics_path) if metrics_path is not None else None
        self.directory = self.run_dir / CHECKPOINTS_SUBDIR
        self.options = options or CheckpointOptions()
        self.config = to_jsonable(config) if config is not None else {}
        self.model_config = to_jsonable(model_config) if model_config is not None else None
        self.skipped: list[SkippedStep] = []
        self._preempted = threading.Event()
        self._previous_sigterm: Any = None
        self._last_step: int | None = None
        self._closed = False

        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tokenizer is not None:
                self._save_tokenizer(tokenizer)
        _sync("dpo_jax_checkpoint_mkdir")
        self._report_unfinished()

        opts = self.options
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=opts.save_every,
                max_to_keep=opts.keep_last,
                keep_period=opts.keep_every,
                enable_async_checkpointing=opts.async_save,
                cleanup_tmp_directories=True,
                create=True,
            ),
            item_handlers=_item_handlers(),
        )
        if opts.handle_sigterm:
            self._install_sigterm()

    # -- preemption

    def _install_sigterm(self) -> None:
        if jax.process_count() > 1:
            # Multi-host: jax.distributed's preemption service owns SIGTERM and makes
            # every host stop at the same step (see `preempted`); a local flag would
            # let hosts save different steps and hang in the collective save.
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM will not trigger a checkpoint")
            return
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._preempted.is_set():
            # A second SIGTERM means "now": fall back to the previous behaviour.
            previous = self._previous_sigterm
            signal.signal(signal.SIGTERM, previous if callable(previous) else signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("SIGTERM received: the run will checkpoint and stop after this step")
        self._preempted.set()

    def _preemption_due(self, step: int | None) -> bool:
        if jax.process_count() > 1:
            # The same answer on every host for the same step (a global sync point).
            return step is not None and bool(self._manager.reached_preemption(step))
        return self._preempted.is_set()

    @property
    def preempted(self) -> bool:
        """True once SIGTERM arrived (multi-host: once the hosts agreed on a preemption step)."""
        return self._preempted.is_set() or self._preemption_due(self._last_step)

    def request_stop(self) -> None:
        """Same as receiving SIGTERM (for tests and for callers with their own signals)."""
        self._preempted.set()

    @classmethod
    def from_config(
        cls, config: Any, *, model_config: Any = None, tokenizer: Any = None
    ) -> Checkpointer:
        """A Checkpointer for ``config.run_dir`` with options from ``config.checkpoint``.

        Reads ``save_every``, ``keep_last`` (<= 0: keep all), ``keep_every``
        (<= 0: off), ``async_save`` and ``force_resume``; a missing key takes
        ``configs/default.py``'s value.
        """
        c = configs.complete_section("checkpoint", config.get("checkpoint", None))
        options = CheckpointOptions(
            save_every=int(c["save_every"]),
            keep_last=_positive_or_none(c["keep_last"]),
            keep_every=_positive_or_none(c["keep_every"]),
            async_save=bool(c["async_save"]),
            force_resume=bool(c["force_resume"]),
        )
        if not config.get("run_dir", None):
            raise ValueError("checkpointing needs config.run_dir")

        return cls(
            config["run_dir"],
            options=options,
            config=config,
            model_config=model_config,
            tokenizer=tokenizer,
            metrics_path=as_path(config["run_dir"]) / METRICS_FILENAME,
        )

    # -- saving

    def should_save(self, step: int) -> bool:
        """Whether ``maybe_save(step, ...)`` will save (so the loop can flush metrics first)."""
        step = int(step)
        due = step % self.options.save_every == 0 or self._preemption_due(step)
        return due and step not in self._manager.all_steps()

    def _save_tokenizer(self, tokenizer: Any) -> None:
        target = self.run_dir / TOKENIZER_SUBDIR
        if target.exists():
            return
        # Written under a temporary name and renamed, so a kill never leaves half of it.
        tmp = self.run_dir / f"{TOKENIZER_SUBDIR}.tmp-{os.getpid()}"
        if tmp.exists():
            tmp.rmtree()
        if isinstance(tokenizer, str | os.PathLike):
            _copy_tree_files(as_path(tokenizer), tmp, _is_tokenizer_file)
        else:
            with paths.staged_dir(tmp) as local:  # save_pretrained writes locally
                tokenizer.save_pretrained(local)
        tmp.rename(target)

    def maybe_save(
        self,
        step: int,
        state: Any,
        data_state: Any = None,
        extra: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Start an (async) save of ``state`` after ``step`` updates when due; True if started.

        Due means ``step % save_every == 0``, ``force``, or a pending preemption.
        Saving a step that already exists is a no-op (e.g. the final forced save
        right after a periodic one).
        """
        step = int(step)
        self._last_step = step
        force = force or self._preemption_due(step)
        if step in self._manager.all_steps():
            return False
        # Our own rule, not Orbax's should_save (which also saves the first step it sees).
        if not force and step % self.options.save_every != 0:
            return False
        saved_state = _keys_to_data(state)
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "config": self.config,
            "model_config": self.model_config,
            "extra": to_jsonable(dict(extra or {})),
            "time": time.time(),
            # Checked on restore: damage inside the array files falls back to an older step.
            "fingerprints": integrity.fingerprints(saved_state),
        }
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(saved_state),
            data=ocp.args.JsonSave(_encode_data_state(data_state)),
            meta=ocp.args.JsonSave(meta),
        )
        return bool(self._manager.save(step, args=args, force=True))

    def wait(self) -> None:
        """Block until every started save is on disk (committed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for saves, release Orbax resources, give SIGTERM back."""
        if self._closed:
            return
        self._closed = True
        self._manager.wait_until_finished()
        self._manager.close()
        if self._previous_sigterm is not None and (
            threading.current_thread() is threading.main_thread()
        ):
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- restoring

    def all_steps(self) -> list[int]:
        """Steps Orbax lists (complete or not; restore_or_none checks them)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Newest step Orbax lists, or None."""
        return self._manager.latest_step()

    def _report_unfinished(self) -> None:
        for p in _unfinished_tmp_dirs(self.directory):
            log.warning("ignoring unfinished checkpoint %s (interrupted save; Orbax removes it)", p)
            step = int(p.name.split(".")[0]) if p.name.split(".")[0].isdigit() else -1
            self.skipped.append(SkippedStep(step, "unfinished save (temporary directory)", None))

    def _skip(self, step: int, reason: str, tag: str) -> None:
        moved = _move_aside(self.directory / str(step), tag)
        log.warning(
            "ignoring checkpoint step %d in %s: %s%s",
            step,
            self.directory,
            reason,
            f" (moved to {moved})" if moved else "",
        )
        self.skipped.append(SkippedStep(step, reason, moved))

    def read_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` item (config, model config, extra) of one step."""
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def _check_config(self, step: int, saved: Mapping[str, Any]) -> None:
        if not self.config:
            return
        from dpo_jax.configs import default  # lazy: default imports data (grain) and flax

        # a checkpoint written before a key moved (ppo.reward -> online.reward) compares
        # under the key's current name
        saved = configs.migrate_saved(json.loads(json.dumps(to_jsonable(saved))))
        diffs = config_diff(
            saved,
            self.config,
            ignore=NON_MATH_KEYS + tuple(self.options.ignore_config_keys),
            defaults=default.get_config(),
        )
        if not diffs:
            return
        lines = "; ".join(f"{k}: checkpoint={a!r} now={b!r}" for k, a, b in diffs)
        where = self.directory / str(step)
        if self.options.force_resume:
            log.warning("force_resume: resuming %s despite config changes: %s", where, lines)
            return
        raise ConfigMismatchError(
            f"{where}: refusing to resume, the config changes the math of the checkpointed "
            f"run ({lines}); use a new run_dir, or set checkpoint.force_resume=true to resume "
            "anyway"
        )

    def _verify(self, step: int, meta: Mapping[str, Any], state: Any) -> str | None:
        """Why the restored arrays differ from what was saved, or None when they match."""
        saved = meta.get("fingerprints")
        if not isinstance(saved, Mapping):
            log.warning(
                "%s: no array fingerprints (written by an older dpo_jax); restored unverified",
                self.directory / str(step),
            )
            return None
        bad, unverified = integrity.mismatches(saved, state)
        if unverified:
            log.info("%d arrays restored in another dtype were not verified", len(unverified))
        if not bad:
            return None
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        return f"checksum mismatch in {len(bad)} saved array(s) ({shown}): damaged on disk"

    def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        tree_meta = self._manager.item_metadata(step)["state"]
        if tree_meta is None:
            raise CheckpointError("no state metadata")
        return _shapes_by_path(getattr(tree_meta, "tree", tree_meta))

    def restore_or_none(self, abstract_state: Any) -> Restored | None:
        """Restore the newest complete step into the shardings of ``abstract_state``.

        ``abstract_state`` mirrors the saved state; leaves are
        ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` (or arrays, whose
        sharding is used). Steps without a commit marker, or that fail to read, are
        moved aside and reported, and older steps are tried. Returns None when no
        usable step exists. Raises ConfigMismatchError when the newest usable step
        was written by a run with a math-changing different config.
        """
        abstract = jax.tree.map(_as_abstract, abstract_state)
        target = _abstract_keys_to_data(abstract)
        moved_any = False
        for step in sorted(_step_dirs(self.directory), reverse=True):
            problem = step_problem(self.directory / str(step))
            if problem is not None:
                self._skip(step, problem, "incomplete")
                moved_any = True
                continue
            if moved_any:
                _sync("dpo_jax_checkpoint_skip")
                self._manager.reload()
                moved_any = False
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 -- any read failure means "do not trust"
                self._skip(step, f"unreadable meta: {type(e).__name__}: {e}", "corrupt")
                moved_any = True
                continue
            self._check_config(step, meta.get("config") or {})
            try:
                saved_shapes = self._saved_shapes(step)
            except Exception as e:  # noqa: BLE001
                self._skip(step, f"unreadable state metadata: {type(e).__name__}: {e}", "corrupt")
                moved_any = True
                continue
            # A structural mismatch is the caller's (changed model or state), not damage
            # on disk: refuse rather than move a good checkpoint aside.
            _check_structure(self.directory / str(step), saved_shapes, _shapes_by_path(target))
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target),
                        data=ocp.args.JsonRestore(),
                    ),
                )
                jax.block_until_ready(restored["state"])
            except Exception as e:  # noqa: BLE001
                self._skip(step, f"unreadable state: {type(e).__name__}: {str(e)[:500]}", "corrupt")
                moved_any = True
                continue
            damage = self._verify(step, meta, restored["state"])
            if damage is not None:
                self._skip(step, damage, "checksum")
                moved_any = True
                continue
            state = _data_to_keys(restored["state"], abstract)
            data_state = _decode_data_state(restored["data"])
            log.info("resumed from %s", self.directory / str(step))
            self._last_step = step
            self._truncate_metrics(step)
            return Restored(
                step, state, data_state, dict(meta.get("extra") or {}), meta.get("config") or {}
            )
        if moved_any:
            _sync("dpo_jax_checkpoint_skip")
            self._manager.reload()
        self._truncate_metrics(0)  # a rerun from scratch starts its metrics afresh
        return None

    def _truncate_metrics(self, step: int) -> None:
        if self.metrics_path is None:
            return
        dropped = truncate_jsonl(self.metrics_path, step)
        if dropped:
            log.warning(
                "%s: dropped %d metric rows written after step %d by the interrupted run",
                self.metrics_path,
                dropped,
                step,
            )


_path_name = integrity.path_name


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """``'a/b/0/c' -> shape`` for every array leaf; dataclass fields, dict keys,
    NamedTuple fields and list indices all become plain path segments, so the saved
    metadata tree (dicts and lists) and the live state (dataclasses) compare."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_path_name(e) for e in path): tuple(leaf.shape)
        for path, leaf in leaves
        if hasattr(leaf, "shape")
    }


def _check_structure(
    where: epath.Path, saved: Mapping[str, tuple[int, ...]], target: Mapping[str, tuple[int, ...]]
) -> None:
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


def _as_abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        # Host arrays restore onto the first local device; the loop places them.
        device = jax.local_devices()[0]
        return jax.ShapeDtypeStruct(
            np.shape(x), x.dtype, sharding=jax.sharding.SingleDeviceSharding(device)
        )
    return x


# ------------------------------------------------------------ reading a checkpoint back


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int]:
    """``(checkpoints_dir, step)`` from a run dir, a checkpoints dir or one step dir.

    Without ``step`` the newest complete step is used; incomplete ones are reported
    and left alone (export never modifies a run).
    """
    path = as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if path.name.isdigit() and (path / STEP_METADATA).exists():
        directory, candidates = path.parent, [int(path.name)]
        if step is not None and step != int(path.name):
            raise UserError(f"{path}: is step {path.name}, but step={step} was asked for")
    else:
        directory = path / CHECKPOINTS_SUBDIR if (path / CHECKPOINTS_SUBDIR).is_dir() else path
        steps = _step_dirs(directory)
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


def load_params(
    path: str | os.PathLike, step: int | None = None
) -> tuple[int, dict[str, Any], Any]:
    """``(step, meta, params)`` of a checkpoint, params as host-local arrays on one device.

    Only the ``params`` entry of the state is read (optimizer state stays on disk).
    """
    directory, step = resolve_checkpoint(path, step)
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        # PyTree handler: it supports partial restore (params only).
        item_handlers=_item_handlers(ocp.PyTreeCheckpointHandler()),
    )
    try:
        meta = dict(
            manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        )
        tree_meta = manager.item_metadata(step)["state"]
        tree = getattr(tree_meta, "tree", tree_meta)
        if not isinstance(tree, Mapping) or "params" not in tree:
            keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise CheckpointError(
                f"{directory / str(step)}: the saved state has no top-level 'params' entry "
                f"(found {keys})"
            )
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = {
            "params": jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree["params"]
            )
        }
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), abstract)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=restore_args, partial_restore=True
                )
            ),
        )
    finally:
        manager.close()
    return step, meta, restored["state"]["params"]


def run_tokenizer_dir(path: str | os.PathLike) -> epath.Path | None:
    """The `tokenizer/` saved with the run that `path` (run, checkpoints or step dir) is in."""
    # The run dir is the step dir's grandparent or the checkpoints dir's parent.
    start = as_path(path)
    for candidate in (start, start.parent, start.parent.parent):
        if (candidate / TOKENIZER_SUBDIR).is_dir():
            return candidate / TOKENIZER_SUBDIR
    return None
