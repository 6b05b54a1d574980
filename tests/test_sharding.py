"""Mesh, logical-axis rules, and the same training run on 1 device and three 8-device meshes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dpo_jax import sharding

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_mesh_shape():
    assert sharding.resolve_mesh_shape((-1, 2, 1, 1), 8) == (4, 2, 1, 1)
    assert sharding.resolve_mesh_shape((2, 1, 2, 2), 8) == (2, 1, 2, 2)
    with pytest.raises(ValueError, match="at most one"):
        sharding.resolve_mesh_shape((-1, -1, 1, 1), 8)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.resolve_mesh_shape((3, 2, 1, 1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.resolve_mesh_shape((-1, 3, 1, 1), 8)


class _FakeMesh:
    """Just the `.shape` mapping the rule resolution reads."""

    def __init__(self, data: int, fsdp: int, tensor: int):
        self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


def test_logical_rules_map_names_to_mesh_axes():
    mesh = _FakeMesh(2, 2, 2)
    spec = sharding.logical_to_mesh_spec
    assert spec(P("vocab", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    assert spec(P("embed", "mlp"), (32, 64), mesh) == P("fsdp", "tensor")
    assert spec(P("heads", "head_dim", "embed"), (4, 8, 32), mesh) == P("tensor", None, "fsdp")
    assert spec(P("norm"), (32,), mesh) == P()
    assert spec(P("layers", "embed", "mlp"), (2, 32, 64), mesh) == P(None, "fsdp", "tensor")
    # a dim that does not divide its mesh axes stays whole instead of failing
    assert spec(P("embed", "kv_heads", "head_dim"), (32, 1, 8), mesh) == P("fsdp")
    # size-1 mesh axes are dropped (the spec says what is really split)
    assert spec(P("vocab", "embed"), (64, 32), _FakeMesh(8, 1, 1)) == P()
    with pytest.raises(KeyError, match="no rule"):
        spec(P("nonsense"), (4,), mesh)


def test_batch_spec_splits_rows_over_data_axes():
    assert sharding.batch_spec(3) == P(None, ("data", "fsdp"))
    assert sharding.batch_spec(2, micro_axis=False) == P(("data", "fsdp"))


def test_single_device_mesh_and_shard_batch():
    mesh = sharding.make_mesh(-1, 1, 1, devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1}
    batch = {"input_ids": np.zeros((2, 4, 8), np.int32), "ref_logps": np.ones((2, 4), np.float32)}
    placed = sharding.shard_batch(batch, mesh)
    np.testing.assert_array_equal(np.asarray(placed["ref_logps"]), batch["ref_logps"])


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharded_run", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    specs = json.loads((out / "specs.json").read_text())
    params = {name: dict(np.load(out / f"{name}.npz")) for name in specs}
    return specs, params


@pytest.mark.heavy
def test_same_loss_curve_and_params_on_every_mesh(sharded_runs):
    specs, params = sharded_runs
    base = specs["1dev"]
    assert base["num_devices"] == 1
    assert len(base["losses"]) == 3
    assert base["losses"][-1] < base["losses"][0]  # it trained
    for name in ("8x1x1", "2x4x1", "2x2x2"):
        assert specs[name]["num_devices"] == 8
        np.testing.assert_allclose(specs[name]["losses"], base["losses"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(specs[name]["grad_norms"], base["grad_norms"], rtol=1e-5)
        for key, value in params["1dev"].items():
            np.testing.assert_allclose(params[name][key], value, rtol=1e-4, atol=1e-6, err_msg=key)
        # frozen reference is sharded exactly like the policy
        assert specs[name]["ref_specs_equal"]


@pytest.mark.heavy
def test_params_are_sharded_as_the_rules_say(sharded_runs):
    specs, _ = sharded_runs
    s = specs["2x2x2"]["params"]
    shapes = specs["2x2x2"]["shard_shapes"]
    # embedding [vocab=64 padded to 256, embed=32]: vocab over tensor (2), embed over fsdp (2)
    assert s["['embed']['embedding']"] == ["tensor", "fsdp"]
    assert shapes["['embed']['embedding']"] == [128, 16]
    # MLP up [embed, mlp]: fsdp x tensor; down [mlp, embed]: tensor x fsdp
    assert s["['layers_0']['mlp']['up']['kernel']"] == ["fsdp", "tensor"]
    assert shapes["['layers_0']['mlp']['up']['kernel']"] == [16, 32]
    assert s["['layers_0']['mlp']['down']['kernel']"] == ["tensor", "fsdp"]
    assert s["['lm_head']['kernel']"] == ["fsdp", "tensor"]
    assert s["['final_norm']['scale']"] == []  # norms replicated
    # fsdp=4, tensor=1: only the embed dims are split, 4 ways
    s4 = specs["2x4x1"]["params"]
    assert s4["['layers_1']['mlp']['up']['kernel']"] == ["fsdp"]
    assert specs["2x4x1"]["shard_shapes"]["['layers_1']['mlp']['up']['kernel']"] == [8, 64]
    # pure data parallelism replicates every param
    assert all(v == [] for v in specs["8x1x1"]["params"].values())
    # Adam moments follow the params' shardings (mu/nu of [embed, mlp] kernels)
    assert "P('fsdp', 'tensor')" in specs["2x2x2"]["opt_specs"]
    assert "P('tensor', 'fsdp')" in specs["2x2x2"]["opt_specs"]


def test_unshardable_dim_warns_and_says_why(caplog):
    mesh = _FakeMesh(1, 2, 4)
    with caplog.at_level("WARNING", logger="dpo_jax.sharding"):
        spec = sharding.logical_to_mesh_spec(
            P("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh, name="['attn']['k']"
        )
    assert spec == P("fsdp")  # kv_heads (2) does not divide tensor (4): left whole
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    msg = record.getMessage()
    assert "['attn']['k']" in msg and "dim 1 (kv_heads) of size 2" in msg
    assert "('tensor',) of size 4" in msg
    caplog.clear()
    with caplog.at_level("WARNING", logger="dpo_jax.sharding"):
        sharding.logical_to_mesh_spec(P("embed", "kv_heads"), (32, 4), mesh)
    assert not caplog.records  # everything divides: silent
    # the same case in one tree (a param, its Adam moments, the reference) warns once
    warned: set = set()
    with caplog.at_level("WARNING", logger="dpo_jax.sharding"):
        for name in ("k", "mu.k", "nu.k"):
            spec = sharding.logical_to_mesh_spec(
                P("embed", "kv_heads"), (32, 2), mesh, name=name, warned=warned
            )
            assert spec == P("fsdp")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["k"]


def test_rules_table_is_validated_and_overrides_the_default():
    from dpo_jax.configs import default, validate
    from dpo_jax.errors import UserError

    rules = sharding.validate_rules([["vocab", None], ["embed", ["fsdp", "tensor"]]])
    assert rules == (("vocab", None), ("embed", ("fsdp", "tensor")))
    # a user table replaces the default one: embed over fsdp x tensor, vocab whole
    mesh = _FakeMesh(1, 2, 2)
    assert sharding.logical_to_mesh_spec(P("vocab", "embed"), (8, 8), mesh, rules) == P(
        None, ("fsdp", "tensor")
    )
    with pytest.raises(UserError, match=r"'mesh.rules\[1\]'.*unknown mesh axes \['model'\]"):
        sharding.validate_rules([("vocab", "tensor"), ("embed", "model")])
    with pytest.raises(UserError, match=r"'mesh.rules\[1\]'.*appears twice"):
        sharding.validate_rules([("vocab", "tensor"), ("vocab", None)])
    with pytest.raises(UserError, match="'mesh.rules'"):
        sharding.validate_rules("vocab=tensor")
    config = default.get_config()
    assert sharding.validate_rules(config.mesh.rules) == sharding.LOGICAL_AXIS_RULES
    config.mesh.rules = (("vocab", "tensr"),)
    with pytest.raises(UserError, match=r"mesh.rules\[0\]"):
        validate.validate(config)
    with pytest.raises(KeyError, match="embed"):  # a name missing from the table fails loudly
        sharding.logical_to_mesh_spec(P("embed"), (8,), mesh, (("vocab", "tensor"),))


@pytest.mark.parametrize("name", ["adamw", "rmsprop", "sgd"])
def test_optimizer_state_keeps_the_params_logical_names(name):
    """No structure walk: optax built from boxed params boxes its moments the same way."""
    from flax import linen as nn

    from dpo_jax import models, optim

    cfg = models.ModelConfig(
        model_type="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    logical = models.logical_axes(cfg)
    optim_cfg = dict(name=name, weight_decay=0.1, momentum=0.9, max_grad_norm=1.0)
    tx, _ = optim.make_optimizer(optim_cfg, 10, params, logical)
    opt = jax.eval_shape(tx.init, sharding.box(logical, params))
    specs = nn.get_partition_spec(opt)
    is_spec = lambda x: isinstance(x, P)
    flat_logical = jax.tree.leaves(logical, is_leaf=is_spec)
    n_param_leaves = len(flat_logical)
    # every params-shaped moment carries exactly the params' logical names, in order
    moments = [
        node
        for node in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, dict))
        if isinstance(node, dict)
    ]
    assert moments, "no params-shaped moment found"
    for tree in moments:
        assert jax.tree.leaves(tree, is_leaf=is_spec) == flat_logical
    unboxed = [
        x for x in jax.tree.leaves(opt, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        if not isinstance(x, nn.Partitioned)
    ]  # fmt: skip
    assert all(x.shape == () for x in unboxed)  # only counts are left unnamed -> replicated
    assert len(jax.tree.leaves(specs, is_leaf=is_spec)) == n_param_leaves * len(moments) + len(
        unboxed
    )
