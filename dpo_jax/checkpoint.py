"""Reliable training runs: Orbax checkpoints, exact resume, preemption.

A run directory holds ``checkpoints/<step>/`` (one Orbax step per saved step, each
with the items ``state`` (params, optimizer state, step, PRNG key), ``data`` (the
loader's JSON state) and ``meta`` (run config, model config, extra counters)),
``tokenizer/`` (saved once, for export) and whatever the train loop writes.

Resume trusts only finished, intact steps: a step directory without Orbax's commit
marker, one that fails to read, or one whose arrays no longer match the fingerprints
saved with them (``dpo_jax.integrity``) is moved aside to ``<step>.skipped-<reason>``
and reported, and the previous step is used; those rules (and the config check) live in
``dpo_jax.resume``. The file-system layout is Orbax's own, so Orbax tools read these
checkpoints too. ``load_params`` reads one step's params back; Hugging Face and PEFT
export of a checkpoint live in ``dpo_jax.export``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dpo_jax import code_fingerprint, configs, integrity, paths, resume
from dpo_jax.metrics import METRICS_FILENAME
from dpo_jax.resume import CHECKPOINTS_SUBDIR, CheckpointError

log = logging.getLogger(__name__)

TOKENIZER_SUBDIR = "tokenizer"
# 2: `meta` holds per-array fingerprints of `state` (dpo_jax.integrity), verified on restore.
FORMAT_VERSION = 2


def _positive_or_none(value: Any) -> int | None:
    return None if value is None or int(value) <= 0 else int(value)


def _option_values(section: Any = None) -> dict[str, Any]:
    """`CheckpointOptions`' fields from a `checkpoint` section (dict or ConfigDict, possibly
    partial): a key it lacks takes configs/default.py's value (`configs.complete_section`);
    `keep_last` / `keep_every` <= 0 become None (keep all / off)."""
    c = configs.complete_section("checkpoint", section)
    return {
        "save_every": int(c["save_every"]),
        "keep_last": _positive_or_none(c["keep_last"]),
        "keep_every": _positive_or_none(c["keep_every"]),
        "async_save": bool(c["async_save"]),
        "force_resume": bool(c["force_resume"]),
    }


def _default(key: str) -> Any:
    """A field whose default is configs/default.py's, read when an instance is made."""
    return dataclasses.field(default_factory=lambda: _option_values()[key])


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
    save_every: int = _default("save_every")
    keep_last: int | None = _default("keep_last")
    keep_every: int | None = _default("keep_every")
    async_save: bool = _default("async_save")
    force_resume: bool = _default("force_resume")
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
    return resume.to_jsonable(data_state)


def _decode_data_state(data_state: Any) -> Any:
    if isinstance(data_state, dict) and set(data_state) == {"__bytes__"}:
        return data_state["__bytes__"].encode("latin-1")
    return data_state


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
        self.config = resume.to_jsonable(config) if config is not None else {}
        self.model_config = resume.to_jsonable(model_config) if model_config is not None else None
        # hashes of the loss / objective code the run uses, compared on resume
        self.code = code_fingerprint.of_config(self.config) if self.config else {}
        self.skipped: list[resume.SkippedStep] = []
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
        options = CheckpointOptions(**_option_values(config.get("checkpoint", None)))
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
            "code": self.code,
            "extra": resume.to_jsonable(dict(extra or {})),
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
        for p in resume.unfinished_tmp_dirs(self.directory):
            log.warning("ignoring unfinished checkpoint %s (interrupted save; Orbax removes it)", p)
            step = int(p.name.split(".")[0]) if p.name.split(".")[0].isdigit() else -1
            self.skipped.append(
                resume.SkippedStep(step, "unfinished save (temporary directory)", None)
            )

    def _skip(self, step: int, reason: str, tag: str) -> None:
        moved = resume.move_aside(self.directory / str(step), tag)
        log.warning(
            "ignoring checkpoint step %d in %s: %s%s",
            step,
            self.directory,
            reason,
            f" (moved to {moved})" if moved else "",
        )
        self.skipped.append(resume.SkippedStep(step, reason, moved))

    def read_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` item (config, model config, extra) of one step."""
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def _check_config(self, step: int, saved: Mapping[str, Any]) -> None:
        if self.config:
            resume.check_config(
                self.directory / str(step), saved, self.config,
                ignore=self.options.ignore_config_keys, force=self.options.force_resume,
            )  # fmt: skip

    def _check_code(self, step: int, saved: Mapping[str, str] | None) -> None:
        problem = code_fingerprint.resume_problem(saved) if self.config else None
        where = self.directory / str(step)
        if problem and self.options.force_resume:
            log.warning("force_resume: resuming %s although %s", where, problem)
        elif problem:
            raise resume.ConfigMismatchError(
                f"{where}: refusing to resume, {problem}; use a new run_dir, or set "
                "checkpoint.force_resume=true to resume anyway"
            )

    def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        tree_meta = self._manager.item_metadata(step)["state"]
        if tree_meta is None:
            raise CheckpointError("no state metadata")
        return resume.shapes_by_path(getattr(tree_meta, "tree", tree_meta))

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
        for step in sorted(resume.step_dirs(self.directory), reverse=True):
            problem = resume.step_problem(self.directory / str(step))
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
            self._check_code(step, meta.get("code"))
            self._check_code(step, meta.get("code"))
            try:
                saved_shapes = self._saved_shapes(step)
            except Exception as e:  # noqa: BLE001
                self._skip(step, f"unreadable state metadata: {type(e).__name__}: {e}", "corrupt")
                moved_any = True
                continue
            # A structural mismatch is the caller's (changed model or state), not damage
            # on disk: refuse rather than move a good checkpoint aside.
            resume.check_structure(
                self.directory / str(step), saved_shapes, resume.shapes_by_path(target)
            )
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
            damage = resume.damage(self.directory / str(step), meta, restored["state"])
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
        dropped = resume.truncate_jsonl(self.metrics_path, step)
        if dropped:
            log.warning(
                "%s: dropped %d metric rows written after step %d by the interrupted run",
                self.metrics_path,
                dropped,
                step,
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


def load_params(
    path: str | os.PathLike, step: int | None = None
) -> tuple[int, dict[str, Any], Any]:
    """``(step, meta, params)`` of a checkpoint, params as host-local arrays on one device.

    Only the ``params`` entry of the state is read (optimizer state stays on disk).
    """
    directory, step = resume.resolve_checkpoint(path, step)
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
