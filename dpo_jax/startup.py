"""The start-up summary of a run: what it is about to do, printed once before step 1.

`train.train` calls `announce` after its setup (the Trainer built, a resume restored):
devices and platform (with a warning when an accelerator was expected but JAX runs on
the CPU, `expected_accelerator`), the mesh, trainable and frozen parameter counts, the
tokens of the first step, the run directory and checkpoint cadence, and the reference
mode. The per-device memory of the compiled step comes from
`compiled.memory_analysis()` (`memory_report`): a dry run compiles the step for it; a
real run reports it once the first step has compiled (`FirstStepReport`), because a
compile ahead of the jitted call would not be reused by it and would double start-up
time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax

from dpo_jax.loop import StepBatch, count_tokens, global_count

log = logging.getLogger(__name__)

MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
)
# Device files whose presence says the machine has an accelerator JAX should use.
ACCELERATOR_FILES = {"/dev/nvidia0": "gpu", "/dev/nvidiactl": "gpu", "/dev/accel0": "tpu"}
TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "TPU_WORKER_HOSTNAMES")


def memory_report(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled program (``compiled.memory_analysis()``) and the
    peak estimate: arguments + temporaries + outputs that do not alias a donated input."""
    mem = compiled.memory_analysis()
    out = {}
    for field in MEMORY_FIELDS:
        if mem is not None and hasattr(mem, field):
            out[field.removesuffix("_in_bytes")] = int(getattr(mem, field))
    if out:
        out["peak_estimate"] = (
            out.get("argument_size", 0)
            + out.get("output_size", 0)
            - out.get("alias_size", 0)
            + out.get("temp_size", 0)
        )
    return out


def expected_accelerator(env: Mapping[str, str], present_files: Iterable[str]) -> str | None:
    """Why this machine should run on an accelerator ("gpu: /dev/nvidia0 exists"), or None.

    The rule: `JAX_PLATFORMS` (or `JAX_PLATFORM_NAME`) naming a GPU/TPU platform; a
    `CUDA_VISIBLE_DEVICES` listing devices; a TPU VM's environment (`TPU_ENV`); or an
    accelerator device file (`ACCELERATOR_FILES`). `JAX_PLATFORMS=cpu` is a choice: None.
    """
    platforms = (env.get("JAX_PLATFORMS") or env.get("JAX_PLATFORM_NAME") or "").lower()
    if platforms:
        wanted = [p for p in platforms.split(",") if p.strip() in ("cuda", "gpu", "rocm", "tpu")]
        return f"{wanted[0].strip()}: JAX_PLATFORMS={platforms}" if wanted else None
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "-1":
        return f"gpu: CUDA_VISIBLE_DEVICES={visible}"
    for key in TPU_ENV:
        if env.get(key):
            return f"tpu: {key} is set"
    for path in present_files:
        if path in ACCELERATOR_FILES:
            return f"{ACCELERATOR_FILES[path]}: {path} exists"
    return None


def _count(tree: Any) -> int:
    # `size` of arrays and of ShapeDtypeStructs alike (a dry run's abstract state)
    return int(sum(int(getattr(x, "size", 0)) for x in jax.tree.leaves(tree)))


def parameter_counts(state: Any) -> dict[str, int]:
    """Trainable (`state.params`: the model, its head, or the LoRA adapters), frozen (the
    LoRA base) and reference-copy (a frozen reference held beside the policy) parameters."""
    return {
        "trainable": _count(state.params),
        "frozen": _count(getattr(state, "base_params", None)),
        "reference": _count(getattr(state, "ref_params", None)),
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def memory_line(memory: Mapping[str, int]) -> str:
    """One line of `memory_report`'s numbers."""
    if not memory:
        return "not reported by this backend"
    return (
        f"peak ~{_gib(memory['peak_estimate'])} per device (arguments "
        f"{_gib(memory.get('argument_size', 0))}, temporaries {_gib(memory.get('temp_size', 0))},"
        f" outputs {_gib(memory.get('output_size', 0))}, donated {_gib(memory.get('alias_size', 0))})"
    )


def summary(
    config: Any,
    *,
    devices: list[Any],
    mesh_shape: Mapping[str, int],
    counts: Mapping[str, int],
    reference: str,
    num_steps: int,
    start_step: int = 0,
    tokens: tuple[int, int] | None = None,
    memory: Mapping[str, int] | None = None,
    expected: str | None = None,
    process: tuple[int, int] = (0, 1),
    dry_run: bool = False,
) -> str:
    """The summary text (pure: every fact is an argument). `tokens`: (non-padding tokens,
    token slots) of the first step, all hosts; `memory`: `memory_report` or None (a
    real run reports it after the first step)."""
    objective = config.objective.name
    what = f"objective {objective}"
    if objective in ("preference", "online_dpo"):
        what += f", loss {config.loss.name}"
    resumed = f", resuming after step {start_step}" if start_step else ""
    kinds = sorted({d.device_kind for d in devices})
    platform = devices[0].platform if devices else "?"
    lines = [
        f"dpo-jax {'dry run' if dry_run else 'run'}: {what}, {num_steps} steps{resumed}",
        f"  devices      {len(devices)} x {platform} ({', '.join(kinds)}), "
        f"process {process[0]} of {process[1]}",
    ]
    if expected and platform == "cpu":
        lines.append(
            f"  WARNING      an accelerator was expected ({expected}) but JAX runs on the CPU: "
            "install the jax build for it (pip install -e '.[cuda]' or '.[tpu]'), or set "
            "JAX_PLATFORMS=cpu to run on the CPU on purpose"
        )
    lines.append("  mesh         " + " ".join(f"{k}={v}" for k, v in mesh_shape.items()))
    params = f"trainable {counts['trainable']:,}, frozen {counts['frozen']:,}"
    if counts.get("reference"):
        params += f", reference copy {counts['reference']:,} (frozen)"
    lines.append(f"  parameters   {params}")
    batch = f"{config.batch_size} per step, grad_accum_steps {config.grad_accum_steps}"
    if tokens is not None:
        batch += f"; tokens per step {tokens[0]:,} ({tokens[1]:,} slots with padding)"
    lines.append(f"  batch        {batch}")
    lines.append(f"  reference    {reference}")
    run_dir = config.run_dir or "(none: nothing is written)"
    ckpt = config.checkpoint
    if ckpt.enabled and config.run_dir:
        keep = f"keep last {ckpt.keep_last}" if ckpt.keep_last > 0 else "keep all"
        saves = f"checkpoints every {ckpt.save_every} steps and at the end ({keep})"
    else:
        saves = "checkpoints off: the trained weights are not kept"
    if dry_run:
        saves += " (a dry run writes nothing)"
    lines.append(f"  run dir      {run_dir}; {saves}")
    if memory is not None:
        lines.append(f"  memory       {memory_line(memory)}")
    else:
        lines.append("  memory       reported after the first step compiles")
    return "\n".join(lines)


def step_tokens(step: StepBatch) -> tuple[int, int]:
    """(non-padding tokens, token slots) of one step's batch, summed over the hosts."""
    slots = int(step.batch_A["segment_ids"].size) * jax.process_count()
    return global_count(count_tokens(step.batch_A)), slots


def announce(
    config: Any,
    trainer: Any,
    state: Any,
    *,
    reference: str,
    num_steps: int,
    start_step: int = 0,
    first_step: StepBatch | None = None,
    lowered: Any = None,
) -> str:
    """Build the summary from a run's Trainer and state and log it on process 0; with
    `lowered` (a dry run) its compiled memory is included. Returns the text."""
    present = [p for p in ACCELERATOR_FILES if os.path.exists(p)]
    text = summary(
        config,
        devices=list(trainer.mesh.devices.flat),
        mesh_shape=dict(trainer.mesh.shape),
        counts=parameter_counts(state),
        reference=reference,
        num_steps=num_steps,
        start_step=start_step,
        tokens=step_tokens(first_step) if first_step is not None else None,
        memory=memory_report(lowered.compile()) if lowered is not None else None,
        expected=expected_accelerator(os.environ, present),
        process=(jax.process_index(), jax.process_count()),
        dry_run=lowered is not None,
    )
    if jax.process_index() == 0:
        log.info("%s", text)
    return text


class FirstStepReport:
    """A step source that logs the first step's tokens and its compiled memory.

    It hands out the wrapped source's steps unchanged; when the loop asks for the second
    step, the first one has run, so lowering and compiling it again hit JAX's caches
    and cost nothing.
    """

    def __init__(self, source: Any):
        self._source = source
        self._first: StepBatch | None = None
        self._pending = True

    def __getattr__(self, name: str) -> Any:  # get_state, set_state, at_boundary, ...
        return getattr(self._source, name)

    def next_step(self, trainer: Any, state: Any) -> StepBatch | None:
        """The wrapped source's next step (after reporting the first one's numbers)."""
        if self._first is not None:
            first, self._first, self._pending = self._first, None, False
            compiled = trainer.lower(state, first.batch_A, first.n_seq).compile()
            tokens, slots = step_tokens(first)
            if jax.process_index() == 0:
                log.info(
                    "first step: %s tokens (%s slots with padding); compiled step: %s",
                    f"{tokens:,}", f"{slots:,}", memory_line(memory_report(compiled)),
                )  # fmt: skip
        got = self._source.next_step(trainer, state)
        if self._pending:
            self._first = got
        return got

    def get_state(self) -> Any:
        """The wrapped source's data state."""
        return self._source.get_state()

    def set_state(self, data_state: Any) -> None:
        """Continue the wrapped source from `data_state`."""
        self._source.set_state(data_state)

    def at_boundary(self) -> bool:
        """Whether the wrapped source may checkpoint now."""
        return self._source.at_boundary()
