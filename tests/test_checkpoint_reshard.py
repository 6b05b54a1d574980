"""Save on one mesh, restore onto another: 8 simulated CPU devices in a subprocess."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _child(run_dir: str) -> None:
    """Runs with 8 CPU devices: saves on (8,1,1), (1,8,1) and sequence=8 (context
    parallelism: no param names the sequence axis), restores on (2,2,2)."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import PartitionSpec as P

    from dpo_jax import checkpoint, sharding

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    params = {
        "embed": rng.normal(size=(64, 16)).astype(np.float32),
        "mlp": {"wi": rng.normal(size=(16, 32)).astype(np.float32)},
        "norm": rng.normal(size=(16,)).astype(np.float32),
    }
    logical = {"embed": P("vocab", "embed"), "mlp": {"wi": P("embed", "mlp")}, "norm": P("norm")}
    tx = optax.adamw(1e-2)

    def place(mesh):
        p_sh = sharding.tree_shardings(logical, params, mesh)
        p = jax.device_put(params, p_sh)
        opt = jax.jit(tx.init)(p)
        grads = jax.tree.map(lambda x: jnp.full_like(x, 0.25), p)
        _, opt = tx.update(grads, opt, p)
        # optimizer state from boxed params keeps the logical names: one rules table
        o_sh = sharding.boxed_shardings(jax.eval_shape(tx.init, sharding.box(logical, p)), mesh)
        opt = jax.device_put(opt, o_sh)
        rep = sharding.replicated(mesh)
        state = {
            "params": p,
            "opt_state": opt,
            "step": jax.device_put(jnp.int32(7), rep),
            "rng": jax.device_put(jax.random.key(3), rep),
        }
        shardings = {"params": p_sh, "opt_state": o_sh, "step": rep, "rng": rep}
        return state, shardings

    saved = {}
    for step, shape, seq in ((1, (8, 1, 1), 1), (2, (1, 8, 1), 1), (3, (1, 1, 1), 8)):
        mesh = sharding.make_mesh(*shape, sequence=seq)
        state, _ = place(mesh)
        with checkpoint.Checkpointer(
            run_dir, options=checkpoint.CheckpointOptions(save_every=1, keep_last=None)
        ) as ckpt:
            ckpt.maybe_save(step, state, {"step": step})
        saved[step] = state

    target_mesh = sharding.make_mesh(2, 2, 2)
    target_state, target_shardings = place(target_mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        target_state,
        target_shardings,
    )
    report = {}
    for step in (1, 2, 3):
        with checkpoint.Checkpointer(run_dir) as ckpt:
            # Each step explicitly (restore_or_none always takes the newest).
            restored = ckpt._manager.restore(
                step,
                args=checkpoint.ocp.args.Composite(
                    state=checkpoint.ocp.args.StandardRestore(
                        checkpoint._abstract_keys_to_data(abstract)
                    )
                ),
            )["state"]
            restored = checkpoint._data_to_keys(restored, abstract)
        leaves = jax.tree.leaves(checkpoint._keys_to_data(restored))
        want = jax.tree.leaves(checkpoint._keys_to_data(saved[step]))
        shards = jax.tree.leaves(
            jax.tree.map(lambda x: x.sharding, checkpoint._keys_to_data(restored))
        )
        report[step] = {
            "equal": all(
                np.array_equal(np.asarray(a), np.asarray(b)) and a.dtype == b.dtype
                for a, b in zip(leaves, want, strict=True)
            ),
            "mesh_shapes": sorted({str(dict(s.mesh.shape)) for s in shards}),
            "embed_spec": list(restored["params"]["embed"].sharding.spec),
            "wi_spec": list(restored["params"]["mlp"]["wi"].sharding.spec),
            "mu_wi_spec": list(restored["opt_state"][0].mu["mlp"]["wi"].sharding.spec),
            "embed_shard_shape": list(restored["params"]["embed"].addressable_shards[0].data.shape),
            "rng_is_key": bool(jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)),
        }
    # And the public path: restore_or_none takes the newest step into the target mesh.
    with checkpoint.Checkpointer(run_dir) as ckpt:
        latest = ckpt.restore_or_none(abstract)
    report["latest_step"] = latest.step
    report["latest_embed_spec"] = list(latest.state["params"]["embed"].sharding.spec)
    print("REPORT " + json.dumps(report))


@pytest.mark.heavy
def test_save_on_8x1x1_restore_on_2x2x2(tmp_path):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_checkpoint_reshard", str(tmp_path / "run")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    report = json.loads(lines[-1][len("REPORT ") :])
    for step in ("1", "2", "3"):
        r = report[step]
        assert r["equal"], r
        assert r["mesh_shapes"] == ["{'data': 2, 'fsdp': 2, 'sequence': 1, 'tensor': 2}"], r
        # vocab -> tensor, embed -> fsdp under the one rule table.
        assert r["embed_spec"] == ["tensor", "fsdp"], r
        assert r["wi_spec"] == ["fsdp", "tensor"], r
        assert r["mu_wi_spec"] == ["fsdp", "tensor"], r
        assert r["embed_shard_shape"] == [32, 8], r
        assert r["rng_is_key"]
    assert report["latest_step"] == 3
    assert report["latest_embed_spec"] == ["tensor", "fsdp"]


if __name__ == "__main__":
    _child(sys.argv[1])
