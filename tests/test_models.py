"""The Flax Transformer on its own: masking semantics, remat/scan, RoPE, config, sharding."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models import (
    ModelConfig,
    RopeScaling,
    Transformer,
    attention_mask,
    gpt2_small,
    init_params,
    logical_axes,
    param_count,
)
from dpo_jax.models.transformer import apply_rope, rope_inv_freq, rope_sin_cos

# init_std 0.2 makes logits O(1) so equalities below are not trivially true.
CFG = ModelConfig.tiny("llama", vocab_size=128, init_std=0.2, max_position_embeddings=64)


@functools.partial(jax.jit, static_argnums=0)
def _fwd(cfg, params, ids, positions, segment_ids, branch_ids=None):
    return Transformer(cfg).apply(
        {"params": params},
        ids,
        positions=positions,
        segment_ids=segment_ids,
        branch_ids=branch_ids,
    )


def _arange(n, length, start=0):
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int32), (n, length))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=shape).astype(np.int32)


def test_packed_row_equals_separate_rows(params):
    a, b = _ids((1, 7), 1), _ids((1, 5), 2)
    packed = np.concatenate([a, b, np.zeros((1, 4), np.int32)], axis=1)
    seg = np.array([[1] * 7 + [2] * 5 + [0] * 4], np.int32)
    pos = np.concatenate([np.arange(7), np.arange(5), np.zeros(4)])[None].astype(np.int32)
    out = np.asarray(_fwd(CFG, params, packed, pos, seg))
    ref_a = np.asarray(_fwd(CFG, params, a, _arange(1, 7), np.ones((1, 7), np.int32)))
    ref_b = np.asarray(_fwd(CFG, params, b, _arange(1, 5), np.ones((1, 5), np.int32)))
    assert np.abs(ref_a).max() > 1.0
    np.testing.assert_allclose(out[0, :7], ref_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 7:12], ref_b[0], atol=1e-5)
    assert np.isfinite(out).all()  # padding rows attend to nothing, still finite


def test_prefix_shared_branch_ids(params):
    """[prompt, chosen, rejected] with branches 0, 1, 2 == [prompt, rejected] alone."""
    prompt, chosen, rejected = _ids((1, 4), 3), _ids((1, 3), 4), _ids((1, 3), 5)
    row = np.concatenate([prompt, chosen, rejected], axis=1)
    pos = np.array([[0, 1, 2, 3, 4, 5, 6, 4, 5, 6]], np.int32)
    branch = np.array([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]], np.int32)  # rejected does not see chosen
    out = np.asarray(_fwd(CFG, params, row, pos, np.ones((1, 10), np.int32), branch))
    ref = np.asarray(
        _fwd(
            CFG,
            params,
            np.concatenate([prompt, rejected], 1),
            _arange(1, 7),
            np.ones((1, 7), np.int32),
        )
    )
    np.testing.assert_allclose(out[0, 7:], ref[0, 4:], atol=1e-5)
    np.testing.assert_allclose(
        out[0, :7],
        np.asarray(_fwd(CFG, params, row[:, :7], _arange(1, 7), np.ones((1, 7), np.int32)))[0],
        atol=1e-5,
    )


def test_attention_mask_by_hand():
    cfg = CFG.replace(sliding_window=2)
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    pos = jnp.array([[0, 1, 2, 0, 1, 0]])
    got = np.asarray(attention_mask(cfg, seg, pos, None))[0, 0]
    want = np.zeros((6, 6), bool)
    for q, k in [(0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (3, 3), (4, 3), (4, 4)]:
        want[q, k] = True  # (2, 0) is outside the window of 2
    np.testing.assert_array_equal(got, want)


def test_padding_gives_finite_grads(params):
    ids = _ids((2, 8), 6)
    seg = np.array([[1] * 8, [1] * 3 + [0] * 5], np.int32)

    def loss(p):
        logits = Transformer(CFG).apply({"params": p}, ids, segment_ids=seg)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * seg)

    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def _stack_layers(params, num_layers):
    """Unscanned params -> scanned layout (layers_i stacked on a leading axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(num_layers)]
    )
    return out


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grad(cfg, params, ids):
    def loss(p):
        return jnp.mean(jax.nn.log_softmax(Transformer(cfg).apply({"params": p}, ids))[..., 1])

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize(
    "variant", [dict(remat="block"), dict(remat="dots_saveable", scan_layers=True)]
)
def test_remat_and_scan_same_values_and_grads(params, variant):
    cfg = CFG.replace(**variant)
    p2 = _stack_layers(params, CFG.num_layers) if cfg.scan_layers else params
    ids = _ids((2, 8), 7)
    v1, g1 = _value_and_grad(CFG, params, ids)
    v2, g2 = _value_and_grad(cfg, p2, ids)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    if cfg.scan_layers:
        g1 = _stack_layers(g1, CFG.num_layers)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_return_hidden_and_logits_method(params):
    ids = _ids((2, 8), 8)
    model = Transformer(CFG)
    hidden = jax.jit(lambda p, x: model.apply({"params": p}, x, return_hidden=True))(params, ids)
    assert hidden.shape == (2, 8, CFG.hidden_size)
    logits = jax.jit(lambda p, h: model.apply({"params": p}, h, method="logits"))(params, hidden)
    full = _fwd(CFG, params, ids, _arange(2, 8), np.ones((2, 8), np.int32))
    np.testing.assert_allclose(logits, full, atol=1e-6)


def test_logical_axes_match_params(params):
    axes = logical_axes(CFG)
    allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm", None}
    leaves_p, tree_p = jax.tree.flatten(params)
    leaves_a, tree_a = jax.tree.flatten(axes, is_leaf=lambda x: isinstance(x, jax.P))
    assert tree_p == tree_a
    for p, a in zip(leaves_p, leaves_a, strict=True):
        assert len(a) == p.ndim and set(a) <= allowed
    assert axes["layers_0"]["attn"]["k"]["kernel"] == jax.P("embed", "kv_heads", "head_dim")
    scanned = logical_axes(CFG.replace(scan_layers=True))
    assert scanned["layers"]["mlp"]["down"]["kernel"] == jax.P("layers", "mlp", "embed")


def test_sharded_forward_with_project_rules(params):
    from dpo_jax import sharding
    from dpo_jax.sharding import LOGICAL_AXIS_RULES

    mesh = jax.make_mesh(
        (1, 1, 1, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4
    )
    ids = _ids((2, 8), 9)
    ref = np.asarray(_fwd(CFG, params, ids, _arange(2, 8), np.ones((2, 8), np.int32)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        shardings = nn.logical_to_mesh_sharding(logical_axes(CFG), mesh, LOGICAL_AXIS_RULES)
        p = jax.device_put(params, shardings)
        out = jax.jit(lambda p, x: Transformer(CFG).apply({"params": p}, x))(p, ids)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


@pytest.mark.parametrize("impl", ["auto", "blockwise", "cudnn", "splash"])
def test_attention_impl_choices_agree_on_cpu(params, impl):
    """Every choice runs on CPU (cudnn/splash fall back to blockwise) and equals xla."""
    ids, pos, seg = _ids((2, 8), 11), _arange(2, 8), np.ones((2, 8), np.int32)
    np.testing.assert_allclose(
        _fwd(CFG.replace(attention_impl=impl), params, ids, pos, seg),
        _fwd(CFG.replace(attention_impl="xla"), params, ids, pos, seg),
        atol=1e-5,
    )


def test_gpt2_small_parameter_count():
    # Published GPT-2 small size: 124,439,808 parameters (tied embeddings).
    assert param_count(gpt2_small()) == 124_439_808


@pytest.mark.parametrize(
    "scaling",
    [
        RopeScaling("llama3", 8.0, 1.0, 4.0, 32),
        RopeScaling("linear", 4.0),
    ],
)
def test_rope_inv_freq_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(rope_type=scaling.rope_type, rope_theta=10000.0, factor=scaling.factor)
    if scaling.rope_type == "llama3":
        params.update(
            low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
        )
    hf = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters=params)
    want, _ = ROPE_INIT_FUNCTIONS[scaling.rope_type](hf, "cpu")
    cfg = ModelConfig.tiny("llama", num_heads=2, rope_scaling=scaling)
    got = rope_inv_freq(cfg)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    # Not a no-op: it differs from unscaled frequencies.
    assert np.abs(got - rope_inv_freq(cfg.replace(rope_scaling=None))).max() > 1e-3


def test_partial_rope_is_relative_and_leaves_tail():
    cfg = ModelConfig.tiny("gpt_neox", head_dim=16, num_heads=4, hidden_size=64)
    assert cfg.rotary_dim == 4
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def rot(x, pos):
        return apply_rope(x, *rope_sin_cos(cfg, jnp.array([[pos]])))

    np.testing.assert_array_equal(rot(q, 5)[..., 4:], q[..., 4:])  # unrotated tail
    d1 = jnp.sum(rot(q, 7) * rot(k, 3))
    d2 = jnp.sum(rot(q, 14) * rot(k, 10))  # same distance
    np.testing.assert_allclose(d1, d2, rtol=1e-5)
    assert abs(float(jnp.sum(rot(q, 9) * rot(k, 3)) - d1)) > 1e-3
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 11)), jnp.linalg.norm(q), rtol=1e-6)


def test_bf16_compute_fp32_params(params):
    cfg = CFG.replace(dtype=jnp.bfloat16)
    assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"
    ids, pos, seg = _ids((2, 8), 10), _arange(2, 8), np.ones((2, 8), np.int32)
    out16 = _fwd(cfg, params, ids, pos, seg)
    out32 = _fwd(CFG, params, ids, pos, seg)
    assert out16.dtype == jnp.float32 and bool(jnp.isfinite(out16).all())
    assert float(jnp.abs(out16 - out32).mean()) < 0.05 * float(jnp.abs(out32).mean())
    p16 = jax.eval_shape(
        lambda: init_params(CFG.replace(param_dtype="bfloat16"), jax.random.key(1))
    )
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))


def test_config_errors():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        ModelConfig.tiny("llama", num_kv_heads=3)
    with pytest.raises(ValueError, match="norm_type='batchnorm'"):
        ModelConfig.tiny("llama", norm_type="batchnorm")
    with pytest.raises(ValueError, match="unknown model_type 'bert'"):
        ModelConfig.tiny("bert")
    with pytest.raises(ValueError, match="rotary dim"):
        ModelConfig.tiny("gpt_neox", rotary_pct=0.2)  # int(16 * 0.2) = 3 is odd
    with pytest.raises(ValueError, match="rope_type"):
        RopeScaling("yarn")


def test_config_dict_round_trip():
    cfg = ModelConfig.tiny("qwen3", rope_scaling=RopeScaling("linear", 2.0), eos_token_id=(1, 2))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(ModelConfig.from_dict(cfg.to_dict()))
