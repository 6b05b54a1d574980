"""Cost of the per-array checkpoint fingerprints (dpo_jax.integrity) at GPT-2-small size.

Builds the state a dpo_jax checkpoint holds for GPT-2 small (124M float32 params and
AdamW's two moments, on dpo_jax's mesh over every local device) and times
`integrity.fingerprints` on it: the one jitted pass each save and each restore adds.
With `--save`, also times a synchronous save of the same state by `dpo_jax.checkpoint`
(fingerprint included) to a temporary directory, for the fraction it adds.

    python -m benchmarks.checkpoint_fingerprint [--model gpt2-small] [--steps 5] [--save]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Any

import jax

from benchmarks import common, jax_side


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags of this benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="gpt2-small", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--steps", type=int, default=5, help="timed calls (median reported)")
    p.add_argument("--save", action="store_true", help="also time a synchronous checkpoint save")
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def checkpoint_state(shape: common.ModelShape) -> Any:
    """The tree `Checkpointer.maybe_save` writes for a DPO run of `shape` (no reference)."""
    from dpo_jax import checkpoint, train_step

    run = jax_side.JaxRunConfig(reference="precomputed")
    cfg, params = jax_side.load_or_init(shape, run, None)
    trainer, state = jax_side.build_trainer(cfg, params, run, total_steps=10)
    return checkpoint._keys_to_data(train_step.checkpointable(state, trainer.step_config))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and prints) its result."""
    from dpo_jax import checkpoint, integrity

    args = parse_args(argv)
    shape = common.MODEL_SHAPES[args.model]
    tree = checkpoint_state(shape)
    leaves = jax.tree.leaves(tree)
    nbytes = sum(x.size * x.dtype.itemsize for x in leaves)
    timing = common.time_steps(lambda: integrity.fingerprints(tree), args.steps)
    result: dict[str, Any] = {
        "benchmark": "checkpoint_fingerprint",
        "model": shape.name,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "arrays": len(leaves),
        "state_bytes": nbytes,
        "first_call_s": timing["first_step_s"],
        "fingerprint_s": timing["median_step_s"],
        "gb_per_s": nbytes / timing["median_step_s"] / 1e9,
        "machine": common.machine_info(),
    }
    if args.save:
        with tempfile.TemporaryDirectory() as run_dir:
            options = checkpoint.CheckpointOptions(async_save=False, keep_last=1)
            with checkpoint.Checkpointer(run_dir, options=options, config={"bench": 1}) as ckpt:
                t0 = time.perf_counter()
                ckpt.maybe_save(1, tree, force=True)
                ckpt.wait()
                result["save_s"] = time.perf_counter() - t0
        result["fingerprint_fraction_of_save"] = result["fingerprint_s"] / result["save_s"]
    rows = [{k: v for k, v in result.items() if k != "machine"}]
    common.print_table(rows, [k for k in rows[0] if k != "benchmark"])
    common.emit(result, args.json, args.json_out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
