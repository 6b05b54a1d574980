"""Experiments as phase graphs: resumable, checkpointed, and dry-runnable.

An experiment module declares its phases and hands them to :func:`run_phases`:

    PHASES = [
        Phase("corpus", make_corpus, reads=("corpus", "seed")),
        Phase("sft", train_sft, after=("corpus",), reads=("sft", "model"), dry=dry_sft),
        Phase("report", write_table, after=("sft",), marker=False),
    ]
    run_phases(PHASES, config, run_dir)

Each phase writes its outputs under ``run_dir/<name>/`` (``ctx.dir``) and reads what it
needs from the directories of the phases it comes ``after`` (``ctx.input(name)``).
When its ``run`` returns, the phase is finished: a completion marker ``DONE`` is written
last and atomically (`dpo_jax.paths.write_atomic`), holding

* ``fingerprint``: sha256 of the config sections the phase ``reads`` (dotted keys, JSON)
  together with the fingerprints of the phases it comes after, so a change upstream
  reaches every phase downstream;
* ``seconds``: wall time of the run that finished it (``timings``);
* ``code``: hashes of the loss and objective functions its training runs used
  (`dpo_jax.code_fingerprint`, recorded by :func:`train_phase`).

Rerunning the same command (same run directory):

* a phase with a matching marker is skipped;
* a phase with a marker computed from other settings is REFUSED with a `UserError`
  naming the phase and the differing keys (its outputs do not answer the new config;
  use a new ``--config.run_dir``, or delete ``run_dir/<name>`` to redo that phase and
  every phase after it);
* a phase whose recorded loss or objective code changed since (a loss re-registered
  under the same name with another body) runs again, and so does every phase after it:
  its old directory is moved aside to ``run_dir/<name>.stale-N``;
* a phase without a marker runs again. Its outputs must be rewritten whole (never
  appended), and a training phase passes ``checkpoint.enabled=True`` with
  ``run_dir=ctx.dir`` to `dpo_jax.train.train` (:func:`train_config`), so the Trainer
  resumes it from its last checkpoint, metrics rows included.

Phases with ``marker=False`` (a final table assembled from other phases' outputs) run
every time. Since every result is a phase output and every phase is deterministic, a
run killed at any moment (SIGKILL or SIGTERM) and rerun ends with bit-identical results.

``dry_run_phases`` calls each phase's ``dry(ctx)`` instead: a training phase returns
the program its run would execute (``train(..., dry_run=True).lowered``, abstract
params, nothing loaded), and the dry run prints its per-device memory.

Multi-process runs (``jax.distributed``): every process runs every phase (training is
collective); only process 0 writes markers and shared outputs (``ctx.is_main``), and all
processes wait for each other after each phase. Run-directory I/O goes through
`dpo_jax.paths`, so the run directory may be ``gs://``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from dpo_jax import code_fingerprint, configs, paths
from dpo_jax.errors import UserError
from dpo_jax.startup import memory_report

MARKER = "DONE"


@dataclasses.dataclass(frozen=True)
class Phase:
    """One step of an experiment.

    run: ``run(ctx) -> Any``, writes its outputs under ``ctx.dir``; what it returns is
        kept in memory for the caller of `run_phases` (a TrainResult, say), never read
        by other phases (they read files).
    after: names of the phases whose outputs it reads (they run first).
    reads: dotted config keys or sections its outputs depend on (its fingerprint).
    dry: ``dry(ctx) -> jax.stages.Lowered | None``: the program a training phase runs.
    marker: False for a phase that runs every time (a table assembled from outputs).
    """

    name: str
    run: Callable[[Context], Any]
    after: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    dry: Callable[[Context], Any] | None = None
    marker: bool = True


@dataclasses.dataclass
class Context:
    """What a phase sees: the config, its directory, its inputs' directories."""

    config: ml_collections.ConfigDict
    run_dir: paths.Path
    phase: Phase

    @property
    def dir(self) -> paths.Path:
        """``run_dir/<phase name>/``, created."""
        path = self.run_dir / self.phase.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def input(self, name: str) -> paths.Path:
        """The directory of phase `name`, which this phase must come after."""
        if name not in self.phase.after:
            raise ValueError(f"phase {self.phase.name!r} reads {name!r} but is not after it")
        return self.run_dir / name

    @property
    def is_main(self) -> bool:
        """Whether this process writes shared outputs (process 0)."""
        return jax.process_index() == 0


def _section(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def fingerprint(
    phase: Phase, config: ml_collections.ConfigDict, upstream: Mapping[str, str]
) -> dict:
    """What a phase's outputs are computed from: its config sections, its inputs' prints."""
    inputs = {key: _section(config, key) for key in phase.reads}
    after = {name: upstream[name] for name in phase.after}
    digest = hashlib.sha256(_canonical([inputs, after]).encode()).hexdigest()
    return {"fingerprint": digest, "inputs": json.loads(_canonical(inputs)), "after": after}


def read_marker(phase_dir: paths.Path) -> dict | None:
    """The marker of a finished phase, or None."""
    path = phase_dir / MARKER
    return json.loads(path.read_text()) if path.exists() else None


def _flat(value: Any, prefix: str) -> dict[str, str]:
    """Dotted leaf keys of a (JSON) config section, with canonical values."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: _canonical(value)}


def _default_leaves() -> dict[str, str]:
    from dpo_jax.configs import default

    return _flat(json.loads(_canonical(default.get_config().to_dict())), "")


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The config sections and upstream phases whose prints differ between a marker and
    now. A key absent from the marker whose value now is `configs/default.py`'s default is
    no difference (dpo_jax added it after the phase ran, and a new key's default keeps the
    old behaviour), as when a checkpoint resumes (`resume.config_diff`)."""
    defaults = _default_leaves()
    old = dict(old, inputs=configs.migrate_saved(old["inputs"]))  # keys moved since (ppo.*)
    out = []
    for key in sorted(set(old["inputs"]) | set(new["inputs"])):
        was = _flat(old["inputs"].get(key), f".{key}")
        now = _flat(new["inputs"].get(key), f".{key}")
        added = {k for k in set(now) - set(was) if defaults.get(k) == now[k]}
        if {k: v for k, v in now.items() if k not in added} != was:
            out.append(key)
    out += [f"(phase {n})" for n in sorted(new["after"]) if old["after"].get(n) != new["after"][n]]
    return out


def _ordered(phases: Sequence[Phase]) -> list[Phase]:
    """`phases` in a dependency order (declaration order where free); checks the graph."""
    by_name = {p.name: p for p in phases}
    if len(by_name) != len(phases):
        raise ValueError("two phases share a name")
    done: list[Phase] = []
    placed: set[str] = set()
    pending = list(phases)
    while pending:
        ready = [p for p in pending if all(a in placed for a in p.after)]
        if not ready:
            missing = {a for p in pending for a in p.after if a not in by_name}
            raise ValueError(
                f"phases {[p.name for p in pending]}: unknown or cyclic 'after' {missing or ''}"
            )
        done.append(ready[0])
        placed.add(ready[0].name)
        pending.remove(ready[0])
    return done


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"phase {name}")


def run_phases(
    phases: Sequence[Phase],
    config: ml_collections.ConfigDict,
    run_dir: str | paths.Path,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the phases not finished yet under `run_dir`; returns what each one that ran
    returned, by name (skipped phases are absent). See the module docstring."""
    run_dir = paths.as_path(run_dir)
    prints: dict[str, str] = {}
    returned: dict[str, Any] = {}
    recoded: set[str] = set()  # phases rerun for changed code: their outputs changed
    for phase in _ordered(phases):
        ctx = Context(config, run_dir, phase)
        current = fingerprint(phase, config, prints)
        prints[phase.name] = current["fingerprint"]
        marker = read_marker(run_dir / phase.name) if phase.marker else None
        # (settings that differ are refused below, whatever the code)
        same = marker is not None and (
            marker["fingerprint"] == current["fingerprint"] or not _differences(marker, current)
        )
        if same and (stale := _stale_code(phase, marker, recoded)):
            aside = _move_aside(run_dir, phase.name)
            log(f"phase {phase.name}: {stale} changed since it ran: running it again "
                f"(its old outputs moved to {aside})")  # fmt: skip
            recoded.add(phase.name)
            marker = None
        if marker is not None:
            if marker["fingerprint"] != current["fingerprint"]:
                differ = _differences(marker, current)
                if not differ:
                    # only keys added since, at their defaults: the phase stands, and the
                    # phases after it compare against the print it finished with
                    prints[phase.name] = marker["fingerprint"]
                    log(f"phase {phase.name}: done (skipped)")
                    continue
                raise UserError(
                    f"{run_dir / phase.name}: phase {phase.name!r} finished with other settings "
                    f"({', '.join(differ)} differ); use a new "
                    f"--config.run_dir, or delete {run_dir / phase.name} to redo it and the "
                    "phases after it"
                )
            log(f"phase {phase.name}: done (skipped)")
            continue
        t0 = time.perf_counter()
        with _recording_code() as code:
            returned[phase.name] = phase.run(ctx)
        seconds = time.perf_counter() - t0
        if phase.marker and ctx.is_main:
            marker = dict(current, seconds=seconds, code=code)
            paths.write_atomic(ctx.dir / MARKER, json.dumps(marker, indent=1))
        _sync(phase.name)
    return returned


# The code record of the phase now running (`train_phase` adds to it), else None.
_CODE: dict[str, str] | None = None


@contextlib.contextmanager
def _recording_code() -> Iterator[dict[str, str]]:
    global _CODE
    _CODE = {}
    try:
        yield _CODE
    finally:
        _CODE = None


def note_code(config: Any) -> None:
    """Record in the running phase's marker the loss and objective code `config` uses."""
    if _CODE is not None:
        _CODE.update(code_fingerprint.of_config(config))


def _stale_code(phase: Phase, marker: Mapping[str, Any], recoded: set[str]) -> str:
    """What makes a finished phase's outputs stale by code ("" when nothing): its own
    recorded loss/objective code, or a phase it comes after that reran for code."""
    changes = code_fingerprint.changed(marker.get("code"))
    if changes:
        return f"the code of {code_fingerprint.describe(changes)}"
    upstream = [name for name in phase.after if name in recoded]
    return f"the outputs of phase {upstream[0]!r}" if upstream else ""


def _move_aside(run_dir: paths.Path, name: str) -> paths.Path:
    """Rename ``run_dir/<name>`` to the first free ``<name>.stale-N``; returns it."""
    n = 1
    while (run_dir / f"{name}.stale-{n}").exists():
        n += 1
    target = run_dir / f"{name}.stale-{n}"
    if jax.process_index() == 0:
        (run_dir / name).rename(target)
    _sync(f"move aside {name}")
    return target


def timings(phases: Iterable[Phase], run_dir: str | paths.Path) -> dict[str, float]:
    """Seconds each finished phase took (from its marker: the run that finished it)."""
    out = {}
    for phase in phases:
        marker = read_marker(paths.as_path(run_dir) / phase.name) if phase.marker else None
        if marker is not None:
            out[phase.name] = float(marker["seconds"])
    return out


class Preempted(Exception):
    """A training phase stopped before its last step (SIGTERM: the Trainer saved a
    checkpoint and returned). The phase gets no marker; rerunning resumes it."""


def train_phase(config: ml_collections.ConfigDict, **kwargs: Any) -> Any:
    """`dpo_jax.train.train(config, **kwargs)` for a phase (`config` from
    :func:`train_config`); raises `Preempted` when it stopped early, so no marker is
    written for a half-trained phase."""
    from dpo_jax import train

    if not kwargs.get("dry_run"):
        note_code(config)
    result = train.train(config, **kwargs)
    if not kwargs.get("dry_run") and int(jax.device_get(result.state.step)) < config.num_steps:
        raise Preempted(
            f"{config.run_dir}: stopped at step {int(jax.device_get(result.state.step))} of "
            f"{config.num_steps} (SIGTERM; checkpoint saved): rerun the same command to resume"
        )
    return result


def train_config(
    config: ml_collections.ConfigDict, ctx: Context, **overrides: Any
) -> ml_collections.ConfigDict:
    """The `dpo-jax train` config of a training phase: the keys of
    `dpo_jax.configs.default.get_config()` (not the experiment's own sections, so
    changing those never blocks a resume), ``run_dir=ctx.dir`` and checkpoints on, then
    `overrides` (dotted keys: ``{"loss.name": "sft", "num_steps": 10}``)."""
    from dpo_jax.configs import default

    out = default.get_config()
    _copy_known(config, out)
    out.run_dir = str(ctx.dir)
    out.checkpoint.enabled = True
    for key, value in overrides.items():
        configs.set_value(out, key, value)
    return out


def _copy_known(src: ml_collections.ConfigDict, dst: ml_collections.ConfigDict) -> None:
    """Copy into `dst` the values of `src` at the keys `dst` already has."""
    for key in list(dst.keys()):
        if key not in src:
            continue
        if isinstance(dst[key], ml_collections.ConfigDict) and isinstance(
            src[key], ml_collections.ConfigDict
        ):
            _copy_known(src[key], dst[key])
        else:
            with dst.ignore_type():
                dst[key] = src[key]


def dry_run_phases(
    phases: Sequence[Phase],
    config: ml_collections.ConfigDict,
    run_dir: str | paths.Path = "",
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Each phase's ``dry(ctx)`` (phases without one are listed and skipped): the
    lowered programs of the training phases, by name; prints each one's per-device
    memory from ``compiled.memory_analysis()``. Writes nothing."""
    run_dir = paths.as_path(run_dir or "/nonexistent-dry-run")
    lowered: dict[str, Any] = {}
    for phase in _ordered(phases):
        if phase.dry is None:
            log(f"phase {phase.name}: no training program")
            continue
        program = phase.dry(Context(config, run_dir, phase))
        if program is None:
            continue
        lowered[phase.name] = program
        memory = memory_report(program.compile())
        log(f"phase {phase.name}: per-device memory of its train step")
        for key, value in memory.items():
            log(f"  {key:<22} {value / 2**30:>10.3f} GiB  ({value:,} bytes)")
    return lowered
