"""Model families as modules (dpo_jax.models.families): the registry, and the checks the
parametrized parity tests (test_hf, test_kv_cache, test_reference) do not cover:
greedy generation against transformers for the newer families, LongRoPE's short
factors, Qwen2's window semantics, the grouped scan layout, and the Gemma-2-2B shape."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dpo_jax import models
from dpo_jax.models import config_from_hf, families, load_hf, save_hf
from dpo_jax.models.transformer import layer_location
from tests.hf_fixtures import (
    FAMILIES,
    FIXTURES,
    load_torch_model,
    make_tiny_hf_model,
    torch_logits,
)
from tests.test_sampling import test_greedy_matches_transformers_generate as _greedy_parity

NEW_FAMILIES = ("gemma2", "gemma3_text", "phi3")


def test_every_registered_family_has_a_fixture():
    assert families.names() == FAMILIES
    assert set(FIXTURES) == set(FAMILIES)
    for name in FAMILIES:
        assert models.FAMILY_SWITCHES[name] == families.get(name).switches


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_greedy_generation_matches_transformers(family, tiny_hf_dir, tokenizer):
    """Same check as test_sampling's, for families added with the registry."""
    _greedy_parity(family, tiny_hf_dir, tokenizer)


def test_phi3_longrope_short_factors(tiny_hf_dir):
    """Rows whose largest position + 1 <= original_max_position_embeddings (4) use the
    short factors; the fixture's 16-token rows exercise the long ones."""
    hf_dir = tiny_hf_dir("phi3")
    cfg, params = load_hf(hf_dir)
    assert cfg.rope_scaling.rope_type == "longrope" and cfg.rotary_pct == 0.5
    ids = np.array([[5, 17, 42], [7, 8, 9]], np.int32)
    ref = torch_logits(load_torch_model(hf_dir), ids)
    out = np.asarray(models.Transformer(cfg).apply({"params": params}, ids))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # Negative control: the long factors would change these logits.
    rs = cfg.rope_scaling
    wrong = cfg.replace(
        rope_scaling=rs.__class__(**{**rs.__dict__, "short_factor": rs.long_factor})
    )
    bad = np.asarray(models.Transformer(wrong).apply({"params": params}, ids))
    assert np.abs(bad - ref).max() > 1e-2


def test_qwen2_window_follows_transformers_semantics():
    base = dict(model_type="qwen2", vocab_size=64, hidden_size=32, num_hidden_layers=4,
                num_attention_heads=4, intermediate_size=64, sliding_window=8)  # fmt: skip
    off = config_from_hf({**base, "use_sliding_window": False, "max_window_layers": 1})
    assert off.layer_types is None and off.sliding_window is None
    on = config_from_hf({**base, "use_sliding_window": True, "max_window_layers": 1})
    assert on.layer_types == ("full_attention",) + ("sliding_attention",) * 3
    assert [on.layer_window(i) for i in range(4)] == [None, 8, 8, 8]
    assert on.layer_period == 4  # not periodic below 4: one scanned group
    every = config_from_hf({**base, "use_sliding_window": True, "max_window_layers": 0})
    assert every.layer_types is None and every.sliding_window == 8  # the Mistral form
    assert config_from_hf(models.config_to_hf(on)) == on


@pytest.mark.heavy
def test_qwen2_window_from_max_window_layers_matches_transformers(tmp_path, tokenizer):
    """Layer 0 full, layer 1 windowed: logits (right padding) and greedy generation."""
    import transformers as tf

    hf_cfg = tf.Qwen2Config(
        vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    hf_dir = make_tiny_hf_model("qwen2", tmp_path / "q", tokenizer=tokenizer, hf_config=hf_cfg)
    cfg, params = load_hf(hf_dir)
    assert cfg.layer_types == ("full_attention", "sliding_attention")
    ids = np.random.default_rng(4).integers(0, 320, size=(2, 16)).astype(np.int32)
    real = np.arange(16)[None] < np.array([[16], [11]])
    ref = torch_logits(load_torch_model(hf_dir), ids, real.astype(np.int64))
    for scan in (False, True):
        c, p = load_hf(hf_dir, scan_layers=scan)
        out = np.asarray(
            models.Transformer(c).apply({"params": p}, ids, segment_ids=real.astype(np.int32))
        )
        np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)
    _greedy_parity("qwen2", lambda _family: hf_dir, tokenizer)


def test_gemma2_scans_local_global_pairs(tiny_hf_dir, tmp_path):
    cfg, params = load_hf(tiny_hf_dir("gemma2"), scan_layers=True)
    assert cfg.layer_period == 2
    assert layer_location(cfg, 3) == (("layers", "block_1"), 1)
    q = params["layers"]["block_0"]["attn"]["q"]["kernel"]
    assert q.shape == (2, 64, 4, 16)  # two pairs stacked
    assert set(params["layers"]["block_1"]) >= {"post_attn_norm", "post_mlp_norm"}
    ids = np.arange(12, dtype=np.int32)[None] + 3
    ref = torch_logits(load_torch_model(tiny_hf_dir("gemma2")), ids)
    out = np.asarray(models.Transformer(cfg).apply({"params": params}, ids))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # Export from the scanned layout reloads unscanned with the same weights.
    cfg2, params2 = load_hf(save_hf(tmp_path / "out", cfg, params))
    np.testing.assert_array_equal(
        np.asarray(params2["layers_3"]["attn"]["q"]["kernel"]),
        np.asarray(params["layers"]["block_1"]["attn"]["q"]["kernel"][1]),
    )


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        config_from_hf(dict(model_type="gemma2", vocab_size=64, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            use_bidirectional_attention=True))  # fmt: skip


def test_gemma2_2b_preset_has_the_checkpoint_parameter_count():
    """experiments.dry_run's gemma-2-2b shape equals transformers' Gemma2Config defaults
    (the published 2B config), counted on the meta device."""
    import torch
    import transformers

    from experiments.dry_run import model_config_for

    cfg = model_config_for("checkpoints/gemma-2-2b")
    with torch.device("meta"):
        tm = transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config())
    assert models.param_count(cfg) == tm.num_parameters() == 2_614_341_888
    assert jax.tree.leaves(models.abstract_params(cfg))  # builds the scanned-pairs layout too


@pytest.mark.parametrize(
    "family,ablation",
    [
        ("gemma2", dict(attn_logit_softcap=None)),
        ("gemma2", dict(final_logit_softcap=None)),
        ("gemma2", dict(query_pre_attn_scalar=None)),
        ("gemma2", dict(layer_types=None)),  # every layer windowed
        ("gemma3_text", dict(rope_local_theta=None)),
        ("gemma3_text", dict(sliding_window=None, layer_types=None)),
        ("qwen2", dict(sliding_window=None)),
    ],
)
def test_new_family_feature_matters(tiny_hf_dir, family, ablation):
    """Negative control: switching a feature off breaks parity, so parity tests it."""
    hf_dir = tiny_hf_dir(family)
    cfg, params = load_hf(hf_dir)
    ids = np.random.default_rng(2).integers(0, 320, size=(2, 16)).astype(np.int32)
    ref = torch_logits(load_torch_model(hf_dir), ids)
    ok = np.asarray(models.Transformer(cfg).apply({"params": params}, ids))
    np.testing.assert_allclose(ok, ref, atol=1e-4, rtol=0)
    bad = np.asarray(models.Transformer(cfg.replace(**ablation)).apply({"params": params}, ids))
    assert np.abs(bad - ref).max() > 1e-2
