"""Hugging Face import/export: Flax logits equal transformers logits on the same checkpoint."""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dpo_jax.models import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    Transformer,
    config_from_hf,
    config_to_hf,
    load_hf,
    save_hf,
)
from tests.hf_fixtures import FAMILIES, load_torch_model, torch_logits

ATOL = 1e-4
VOCAB = 320  # tokens the tiny tokenizer can produce


def _ids(n: int = 3, length: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, length)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg: ModelConfig, params, ids, segment_ids):
    return Transformer(cfg).apply({"params": params}, ids, segment_ids=segment_ids)


def _flax_logits(cfg: ModelConfig, params, ids, segment_ids=None) -> np.ndarray:
    """Jitted forward; tests share shapes [3, 16] so each config compiles once."""
    if segment_ids is None:
        segment_ids = np.ones(ids.shape, np.int32)
    return np.asarray(_forward(cfg, params, jnp.asarray(ids), jnp.asarray(segment_ids)))


@pytest.fixture(scope="module")
def loaded(tiny_hf_dir):
    """family -> (hf_dir, cfg, params, torch model)."""
    out = {}
    for fam in FAMILIES:
        d = tiny_hf_dir(fam)
        cfg, params = load_hf(d)
        out[fam] = (d, cfg, params, load_torch_model(d))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_with_right_padding(loaded, family):
    """Row 0 is unpadded; rows 1-2 are right-padded (segment_ids vs torch attention_mask)."""
    _, cfg, params, tm = loaded[family]
    lengths = np.array([16, 9, 5])
    real = np.arange(16)[None, :] < lengths[:, None]
    ids = np.where(real, _ids(seed=1), 1)  # 1 = pad id
    ref = torch_logits(tm, ids, attention_mask=real.astype(np.int64))
    assert ref[real].std() > 0.5  # the fixture's logits are O(1), so 1e-4 is a strict bound
    out = _flax_logits(cfg, params, ids, segment_ids=real.astype(np.int32))
    assert np.isfinite(out).all()  # padded positions included
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)
    # A padded row equals its unpadded forward in torch.
    alone = torch_logits(tm, ids[2:3, :5])
    np.testing.assert_allclose(out[2, :5], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "family,ablation",
    [
        ("llama", dict(rope_scaling=None)),
        ("gpt_neox", dict(rotary_pct=1.0)),
        ("gpt_neox", dict(parallel_residual=False)),
        ("mistral", dict(sliding_window=None)),
        ("qwen3", dict(qk_norm=False)),
        ("gemma", dict(embed_scale=False)),
        ("gemma", dict(norm_scale_offset=0.0)),
    ],
)
def test_family_feature_matters(loaded, family, ablation):
    """Negative control: switching a family feature off breaks parity, so it is tested."""
    _, cfg, params, tm = loaded[family]
    ids = _ids(seed=2)
    ref = torch_logits(tm, ids)
    if "qk_norm" in ablation:
        params = jax.tree.map(lambda x: x, params)
        for name in ("layers_0", "layers_1"):
            params[name]["attn"] = {
                k: v for k, v in params[name]["attn"].items() if not k.endswith("_norm")
            }
    out = _flax_logits(cfg.replace(**ablation), params, ids)
    assert np.abs(out - ref).max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_in_transformers(loaded, family, tmp_path, tokenizer):
    _, cfg, params, tm = loaded[family]
    out_dir = save_hf(tmp_path / "export", cfg, params, tokenizer=tokenizer)
    assert (out_dir / "tokenizer.json").exists()
    ids = _ids(seed=3)
    reloaded = torch_logits(load_torch_model(out_dir), ids)
    np.testing.assert_allclose(reloaded, torch_logits(tm, ids), atol=1e-6, rtol=0)
    np.testing.assert_allclose(reloaded, _flax_logits(cfg, params, ids), atol=ATOL, rtol=0)
    cfg2, params2 = load_hf(out_dir)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_export_and_import(loaded, tmp_path):
    d, cfg, params, tm = loaded["llama"]
    out_dir = save_hf(tmp_path / "sharded", cfg, params, max_shard_bytes=40_000)
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    files = sorted({v for v in index["weight_map"].values()})
    assert len(files) > 2 and all((out_dir / f).exists() for f in files)
    assert not (out_dir / "model.safetensors").exists()
    cfg2, params2 = load_hf(out_dir)
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    ids = _ids(seed=4)
    np.testing.assert_allclose(
        torch_logits(load_torch_model(out_dir), ids), torch_logits(tm, ids), atol=1e-6, rtol=0
    )


def test_scanned_layers_load_gives_same_logits(loaded, tmp_path):
    d, cfg, params, _ = loaded["qwen2"]
    cfg_s, params_s = load_hf(d, scan_layers=True, remat="block")
    assert params_s["layers"]["attn"]["q"]["kernel"].shape[0] == cfg.num_layers
    np.testing.assert_array_equal(
        params_s["layers"]["mlp"]["down"]["kernel"][1], params["layers_1"]["mlp"]["down"]["kernel"]
    )
    ids = _ids(seed=5)
    np.testing.assert_allclose(
        _flax_logits(cfg_s, params_s, ids), _flax_logits(cfg, params, ids), atol=1e-5, rtol=0
    )
    # Export from the scanned layout writes the same checkpoint.
    _, params_back = load_hf(save_hf(tmp_path / "from_scan", cfg_s, params_s))
    jax.tree.map(np.testing.assert_array_equal, params_back, params)


def test_load_into_shardings(loaded):
    from flax import linen as nn

    from dpo_jax import sharding
    from dpo_jax.models import logical_axes
    from dpo_jax.sharding import LOGICAL_AXIS_RULES

    d, cfg, params, _ = loaded["gpt_neox"]
    mesh = jax.make_mesh(
        (1, 1, 1, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4
    )
    _, sharded = load_hf(
        d,
        scan_layers=True,
        shardings=lambda c: nn.logical_to_mesh_sharding(logical_axes(c), mesh, LOGICAL_AXIS_RULES),
    )
    q = sharded["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.mesh.shape == mesh.shape and q.sharding.spec == jax.P(
        None, "fsdp", "tensor", None
    )
    np.testing.assert_array_equal(q[1], params["layers_1"]["attn"]["q"]["kernel"])


def test_bf16_compute_and_bf16_checkpoint(loaded, tmp_path):
    d, cfg, params, _ = loaded["llama"]
    ids = _ids(seed=6)
    cfg16, params16 = load_hf(d, dtype=jnp.bfloat16)
    assert cfg16.dtype == "bfloat16" and params16["embed"]["embedding"].dtype == jnp.float32
    out16 = _flax_logits(cfg16, params16, ids)
    out32 = _flax_logits(cfg, params, ids)
    assert out16.dtype == np.float32 and np.isfinite(out16).all()
    assert np.abs(out16 - out32).mean() < 0.05 * np.abs(out32).mean()
    # bf16 on disk: params come back as the bf16-rounded originals.
    out_dir = save_hf(tmp_path / "bf16", cfg, params, hf_dtype=jnp.bfloat16)
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    cfg_b, params_b = load_hf(out_dir, param_dtype=jnp.bfloat16)
    assert params_b["lm_head"]["kernel"].dtype == jnp.bfloat16
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(a.dtype))),
        params_b,
        params,
    )


def test_config_round_trip_and_unexportable():
    for fam in SUPPORTED_MODEL_TYPES:
        cfg = ModelConfig.tiny(fam, eos_token_id=(3, 4))
        assert config_from_hf(config_to_hf(cfg)) == cfg
    with pytest.raises(ValueError, match="qkv_bias"):
        config_to_hf(ModelConfig.tiny("qwen2", qkv_bias=False))
    with pytest.raises(ValueError, match="parallel_residual"):
        config_to_hf(ModelConfig.tiny("llama", parallel_residual=True))


def test_old_style_hf_config_keys():
    """Pre-rope_parameters config.json keys (Pythia / Llama 3.1 as published)."""
    neox = config_from_hf(
        dict(
            model_type="gpt_neox",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            rotary_pct=0.5,
            rotary_emb_base=500.0,
            vocab_size=100,
        )
    )
    assert (neox.rotary_pct, neox.rope_theta, neox.parallel_residual) == (0.5, 500.0, True)
    llama = config_from_hf(
        dict(
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            vocab_size=100,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        )
    )
    assert llama.rope_theta == 500000.0 and llama.rope_scaling.factor == 8.0
    assert llama.num_kv_heads == 4 and llama.head_dim == 16


def test_original_gpt2_names_without_prefix(loaded, tmp_path):
    """Hub GPT-2 stores h.0... without "transformer." and extra attn.bias buffers."""
    d, cfg, params, _ = loaded["gpt2"]
    tensors = load_file(str(d / "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    renamed["h.0.attn.bias"] = np.ones((1, 1, 4, 4), np.float32)
    out = tmp_path / "gpt2_old"
    out.mkdir()
    shutil.copy(d / "config.json", out / "config.json")
    save_file(renamed, str(out / "model.safetensors"))
    _, params2 = load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


# ---------------------------------------------------------------------------- errors


def test_error_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_hf(tmp_path / "nope")


def test_error_no_safetensors(loaded, tmp_path):
    shutil.copy(loaded["llama"][0] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_hf(tmp_path)


def test_error_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert'.*supported: gpt2, gpt_neox, llama, .*gemma"):
        load_hf(tmp_path)


def test_error_bad_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n oops}')
    with pytest.raises(ValueError, match="config.json: line 2"):
        load_hf(tmp_path)


def test_error_missing_tensor(loaded, tmp_path):
    d = loaded["qwen3"][0]
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    shutil.copy(d / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="'model.layers.1.self_attn.k_norm.weight' is missing"):
        load_hf(tmp_path)


def test_error_shape_mismatch(loaded, tmp_path):
    d = loaded["mistral"][0]
    hf_cfg = json.loads((d / "config.json").read_text())
    hf_cfg["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    shutil.copy(d / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match="gate_proj.weight.*(config.json implies|config.json does not imply)"
    ):
        load_hf(tmp_path)
