"""Run-level guards of `dpo_jax.train.train`: SIGTERM from the first line, disk full.

`EarlySigterm` records a SIGTERM that arrives before the checkpointer exists (model
load, tokenization, compile, restore) so the run still checkpoints and stops at its
first step boundary instead of dying without a save. `disk_full_error` turns a save
that failed for lack of space (ENOSPC, Orbax/TensorStore RESOURCE_EXHAUSTED) into one
`UserError` line naming the run directory and the space needed.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from typing import Any

from dpo_jax import paths
from dpo_jax.errors import UserError

log = logging.getLogger(__name__)

_DISK_FULL_TEXT = ("No space left on device", "RESOURCE_EXHAUSTED", "Disk quota exceeded")


class DiskFullError(UserError):
    """The run directory's file system is full; the last committed checkpoint is intact."""


class EarlySigterm:
    """Context manager: SIGTERM sets `received` until the checkpointer takes over.

    Installed only from the main thread and only for single-process runs (multi-host
    runs leave SIGTERM to jax.distributed's preemption service, as the checkpointer does).
    """

    def __init__(self, enabled: bool = True):
        self.received = threading.Event()
        self._enabled = enabled
        self._previous: Any = None
        self._handed_over = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self._handed_over or self.received.is_set():
            # A second SIGTERM (or the checkpointer's "now" after its own first one)
            # means "stop now": hand the signal to whoever had it before us.
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, previous)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning(
            "SIGTERM received during setup: the run will checkpoint and stop at its first step"
        )
        self.received.set()

    def __enter__(self) -> EarlySigterm:
        import jax

        if (
            self._enabled
            and threading.current_thread() is threading.main_thread()
            and jax.process_count() == 1
        ):
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def hand_over(self, checkpointer: Any) -> None:
        """Pass a SIGTERM received so far on to the checkpointer (its `request_stop`); from
        now on the checkpointer's handler runs first and a SIGTERM reaching this one is
        its "second SIGTERM: stop now"."""
        if self.received.is_set() and hasattr(checkpointer, "request_stop"):
            checkpointer.request_stop()
        self._handed_over = True


def _chain(error: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and all(error is not e for e in seen):
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error` (or one it was raised from) is a full file system."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e) for text in _DISK_FULL_TEXT):
            return True
    return False


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def disk_full_error(run_dir: str | os.PathLike, error: BaseException) -> DiskFullError:
    """One line: the run directory, the free space, what one checkpoint needs, what to do."""
    run_dir = paths.Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    steps = sorted(
        (int(p.name) for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit())
        if checkpoints.is_dir()
        else []
    )
    need = paths.tree_bytes(checkpoints / str(steps[-1])) if steps else 0
    free = paths.free_bytes(run_dir)  # None in a bucket: no free space to report
    text = " ".join(str(e) for e in _chain(error))
    cause = next((t for t in _DISK_FULL_TEXT if t in text), type(error).__name__)
    last = (
        f"the last committed checkpoint, step {steps[-1]}, is intact"
        if steps
        else "no checkpoint was committed"
    )
    need_text = f"; one checkpoint needs about {_gib(need)}" if need else ""
    free_text = f"{_gib(free)} free" if free is not None else "storage quota or bucket full"
    return DiskFullError(
        f"{run_dir}: disk full while writing the run ({cause}); "
        f"{free_text}{need_text}; {last}: free space (or lower checkpoint.keep_last) "
        "and rerun the same command to resume"
    )


class QuietDiskFull(logging.Filter):
    """Drops the traceback (keeps the line) of log records about a full disk.

    Orbax logs every failed background save with its whole exception chain; on a full
    disk that is dozens of tracebacks around the one line `disk_full_error` prints.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and is_disk_full(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True
