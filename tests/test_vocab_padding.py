"""Vocabulary padding: same log-probs and samples as unpadded, export strips it, and the
vocab dim is really sharded on (1, 1, 2) and (2, 2, 2) meshes (8 simulated devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import logprobs, models, sampling
from dpo_jax.models import vocab
from tests.hf_fixtures import load_torch_model, make_tiny_hf_model, torch_logits

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tied: bool) -> models.ModelConfig:
    # vocab 50 divides nothing useful: padded to 256 for a tensor axis of 2
    return models.ModelConfig(
        model_type="llama", vocab_size=50, hidden_size=32, num_layers=1, num_heads=4,
        num_kv_heads=2, intermediate_size=64, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )  # fmt: skip


def test_padded_size_rule():
    assert vocab.padded_size(50257, 2) == 50432  # multiple of 2 * 128
    assert vocab.padded_size(50257, 4) == 50688
    assert vocab.padded_size(256, 2) == 256
    assert vocab.padded_size(50, 1) == 128


@pytest.mark.parametrize("tied", [True, False])
def test_padding_leaves_logprobs_unchanged(tied):
    cfg = _cfg(tied)
    params = models.init_params(cfg, jax.random.key(1))
    pcfg, pparams = models.pad_vocab(cfg, params, 2)
    assert pcfg.vocab_size == 50 and pcfg.embed_vocab_size == 256
    assert pparams["embed"]["embedding"].shape == (256, 32)
    if not tied:
        assert pparams["lm_head"]["kernel"].shape == (32, 256)

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, size=(4, 12)).astype(np.int32)
    seq = -np.ones((4, 12), np.int32)
    for k, (a, b) in enumerate([(3, 9), (2, 5), (4, 12), (2, 10)]):
        seq[k, a:b] = k
    batch = {"input_ids": ids, "sequence_index": seq}
    batch["scored_positions"] = logprobs.scored_positions(seq)

    def paths(c, p):
        model = models.Transformer(c)
        logits = model.apply({"params": p}, ids)
        hidden = model.apply({"params": p}, ids, return_hidden=True)
        unembed = lambda h: model.apply({"params": p}, h, method="logits")
        kw = dict(with_wpo=True, with_metrics=True)
        return logits, {
            "full": logprobs.sequence_logps(logits, batch, 4, **kw),
            "chunked": logprobs.sequence_logps_chunked(hidden, unembed, batch, 4, 5, **kw),
            "scored": logprobs.sequence_logps_scored(hidden, unembed, batch, 4, **kw),
        }

    logits, ref = paths(cfg, params)
    plogits, got = paths(pcfg, pparams)
    assert plogits.shape[-1] == 256
    # A 256-column unembedding may round differently from a 50-column one (XLA CPU's
    # matmul tiling depends on the shape): equal to float32 rounding, not bitwise.
    np.testing.assert_allclose(plogits[..., :50], logits, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(plogits[..., 50:]) == vocab.PADDED_LOGIT)
    for name in ref:
        for field in ref[name]._fields if hasattr(ref[name], "_fields") else vars(ref[name]):
            a, b = getattr(ref[name], field), getattr(got[name], field)
            if a is None:
                assert b is None
                continue
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6, err_msg=f"{name}.{field}")
    # the padded logits really take no mass: exp of the log-probs sums to 1 over real ids
    lp = jax.nn.log_softmax(plogits.astype(jnp.float32), axis=-1)
    np.testing.assert_allclose(np.exp(lp[..., :50]).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.heavy
def test_sampling_same_tokens_with_padding():
    cfg = _cfg(False)
    params = models.init_params(cfg, jax.random.key(2))
    pcfg, pparams = models.pad_vocab(cfg, params, 2)
    prompts = [[3, 4, 5], [7, 8]]
    key = jax.random.key(5)
    for conf in (
        sampling.SamplingConfig(max_new_tokens=6, temperature=1.0),
        sampling.SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=10, top_p=0.9),
    ):
        a = sampling.generate(models.Transformer(cfg), params, prompts, key, conf)
        b = sampling.generate(models.Transformer(pcfg), pparams, prompts, key, conf)
        np.testing.assert_array_equal(b.tokens, a.tokens)
        np.testing.assert_allclose(b.logps, a.logps, rtol=1e-5, atol=1e-6)
    assert int(np.max(b.tokens)) < 50


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_strips_padding_and_reloads_in_transformers(tmp_path, family):
    src = make_tiny_hf_model(family, tmp_path / "src", vocab_size=97)
    cfg, params = models.load_hf(src)
    pcfg, pparams = models.pad_vocab(cfg, params, 2)
    assert pcfg.embed_vocab_size == 256
    # strip is the exact inverse of pad
    scfg, sparams = models.strip_vocab(pcfg, pparams)
    assert scfg == cfg
    jax.tree.map(np.testing.assert_array_equal, sparams, params)
    # params padded under a config that does not record it strip too
    _, sparams = models.strip_vocab(cfg, pparams)
    assert sparams["embed"]["embedding"].shape[0] == 97

    out = models.save_hf(tmp_path / "out", pcfg, pparams)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 97
    torch_model = load_torch_model(out)
    assert torch_model.config.vocab_size == 97
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 9)).astype(np.int32)
    ours = models.Transformer(pcfg).apply({"params": pparams}, ids)[..., :97]
    np.testing.assert_allclose(torch_logits(torch_model, ids), ours, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        torch_logits(torch_model, ids), torch_logits(load_torch_model(src), ids), rtol=0, atol=0
    )


@pytest.fixture(scope="module")
def sharded_specs(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_sharded")
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.vocab_sharded_run", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "specs.json").read_text())


@pytest.mark.heavy
@pytest.mark.parametrize("mesh", ["1x1x2", "2x2x2"])
def test_vocab_is_really_sharded(sharded_specs, mesh):
    s = sharded_specs[mesh]
    # vocab 100 (divides no 2 * 128), padded to 256: the vocab dim splits 2 ways
    assert s["model_vocab"] == [100, 256]
    assert s["embed"] == (["tensor", "fsdp"] if mesh == "2x2x2" else ["tensor"])
    assert s["embed_shard_shape"][0] == 128
    # Adam's moments of the embedding are sharded the same way
    assert s["mu_embed"] == s["embed"] and s["nu_embed"] == s["embed"]
    # and the run is the 1-device unpadded run: same losses
    np.testing.assert_allclose(s["losses"], sharded_specs["1dev"]["losses"], rtol=1e-5)
    # the exported model has the real vocabulary and the 1-device run's weights
    np.testing.assert_allclose(
        s["exported_embed"], sharded_specs["1dev"]["exported_embed"], rtol=1e-4, atol=1e-6
    )
    if mesh == "2x2x2":  # checkpointed: `dpo-jax export` strips the padding
        assert s["cli_vocab"] == 100
        np.testing.assert_allclose(s["cli_embed"], s["exported_embed"], rtol=0, atol=0)


def test_lora_exports_of_a_padded_vocab_strip_it(tmp_path):
    """Adapters on the embedding and lm_head of a padded model: the merged export and the
    PEFT adapter both hold the real vocabulary and reproduce our (padded) logits."""
    from peft import PeftModel

    from dpo_jax import lora

    src = make_tiny_hf_model("llama", tmp_path / "src", vocab_size=97)
    cfg, params = models.load_hf(src)
    pcfg, pbase = models.pad_vocab(cfg, params, 2)
    lcfg = lora.LoraConfig(4, 8.0, "q,v,embed,lm_head")
    adapters = lora.init_adapters(pbase, lcfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.3 * rng.normal(size=x.shape).astype(np.float32)
            if "lora_b" in jax.tree_util.keystr(p)
            else x
        ),
        adapters,
    )
    assert adapters["lm_head"]["lora_b"].shape[-1] == 256
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 9)).astype(np.int32)
    full = lora.apply_adapters(pbase, adapters, lcfg.scale)
    want = np.asarray(models.Transformer(pcfg).apply({"params": full}, ids))[..., :97]

    merged = lora.merge_adapters(lora.load_base(str(src), pcfg), adapters, lcfg.scale)
    out = models.save_hf(tmp_path / "merged", pcfg, jax.device_get(merged))
    got = torch_logits(load_torch_model(out), ids)
    assert got.shape[-1] == 97
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    adir = lora.save_peft(tmp_path / "adapter", adapters, pcfg, lcfg, str(src))
    model = PeftModel.from_pretrained(load_torch_model(src), str(adir)).eval()
    np.testing.assert_allclose(torch_logits(model, ids), want, rtol=1e-4, atol=1e-4)
