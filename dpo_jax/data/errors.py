"""Bad-input handling for the data pipeline.

Every problem with a row becomes a `DataError` that names the file, the line
(or record number) and the problem. By default it is raised. With
`skip_bad_rows=True` a `RejectLog` records it instead: counted by reason,
written to `rejects.jsonl` in the run directory, counts printed. Nothing is
dropped silently.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Any

from dpo_jax import paths
from dpo_jax.errors import UserError

REJECTS_FILENAME = "rejects.jsonl"


class DataError(UserError):
    """A bad input row: carries the source file, line/record number and a short reason."""

    def __init__(
        self, problem: str, *, source: str = "<unknown>", line: int | None = None, reason: str = ""
    ):
        self.problem = problem
        self.source = source
        self.line = line
        # `reason` is a stable short key used for counting ("missing_field", ...).
        self.reason = reason or "bad_row"
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {problem}")

    def located(self, source: str, line: int | None) -> DataError:
        """Return a copy of this error attached to a file and line."""
        return DataError(self.problem, source=source, line=line, reason=self.reason)


@dataclass
class RejectLog:
    """Collects bad rows when `skip_bad_rows` is on; raises them otherwise."""

    skip_bad_rows: bool = False
    run_dir: str | None = None
    counts: collections.Counter = field(default_factory=collections.Counter)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def handle(self, err: DataError, raw: Any = None) -> None:
        """Raise `err`, or (skip mode) record it with the raw row for the rejects file."""
        if not self.skip_bad_rows:
            raise err
        self.counts[err.reason] += 1
        self.rejects.append(
            {
                "source": err.source,
                "line": err.line,
                "reason": err.reason,
                "problem": err.problem,
                "row": _jsonable(raw),
            }
        )

    @property
    def total(self) -> int:
        """Number of rejected rows so far."""
        return sum(self.counts.values())

    def finalize(self) -> str | None:
        """Write the rejects file (if any rows were rejected) and print the counts.

        Returns the rejects file path, or None when nothing was rejected.
        """
        if not self.rejects:
            return None
        if self.run_dir is None:
            raise ValueError("skip_bad_rows=True needs a run_dir to write the rejects file into")
        paths.Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        path = os.path.join(self.run_dir, REJECTS_FILENAME)
        lines = [json.dumps(rec, ensure_ascii=False) + "\n" for rec in self.rejects]
        paths.write_atomic(path, "".join(lines))
        summary = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        print(f"[dpo_jax.data] skipped {self.total} bad rows ({summary}); see {path}")
        return path


def _jsonable(raw: Any) -> Any:
    """Best-effort JSON-safe copy of a raw row (bytes become replacement-decoded text)."""
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    try:
        json.dumps(raw)
        return raw
    except (TypeError, ValueError):
        return repr(raw)
