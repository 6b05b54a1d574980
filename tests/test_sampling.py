"""Sampler: decode path vs full forward, distribution of samples, EOS, reproducibility,
greedy parity with transformers' generate."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import fast_random, models, sampling, token_choice

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3")
PROMPTS = [[5, 17, 3, 9, 11, 2, 8], [4], [30, 31, 32]]  # mixed lengths -> left padding


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _tv(samples: np.ndarray, probs: np.ndarray) -> float:
    """Total-variation distance between the empirical distribution of samples and probs."""
    counts = np.bincount(samples.reshape(-1), minlength=probs.shape[-1]).astype(np.float64)
    return 0.5 * float(np.abs(counts / counts.sum() - probs).sum())


@functools.cache
def _tiny(family: str = "llama", **overrides):
    cfg = models.ModelConfig.tiny(family, vocab_size=64, hidden_size=32, **overrides)
    params = models.init_params(cfg, jax.random.key(0))
    return cfg, params


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids):
    """Full-sequence logits, no cache (jitted: eager Linen apply is slow on CPU)."""
    return models.Transformer(cfg).apply({"params": params}, ids)


def _last_logits(cfg, params, prompt: list[int]) -> np.ndarray:
    """Float64 logits [len(prompt), V] of an unpadded prompt (right-padded to 16 so
    every call shares one compile; trailing pads do not affect earlier positions)."""
    ids = np.zeros((1, 16), np.int32)
    ids[0, : len(prompt)] = prompt
    return np.asarray(_forward(cfg, params, jnp.asarray(ids)), np.float64)[0, : len(prompt)]


def _peaked(params, scale: float):
    """Scale the unembedding so the next-token distribution is far from uniform (a
    near-uniform model would let a wrong sampler pass a distribution test)."""
    if "lm_head" in params:
        return {**params, "lm_head": jax.tree.map(lambda w: w * scale, params["lm_head"])}
    return {**params, "embed": jax.tree.map(lambda w: w * scale, params["embed"])}


# ------------------------------------------------------------ sample_logits alone


def test_sample_logits_temperature_one_matches_softmax():
    rng = np.random.default_rng(0)
    logits_V = rng.normal(size=12).astype(np.float32) * 2.0
    n = 20000
    toks, slogp = token_choice.sample_logits(jnp.tile(logits_V, (n, 1)), jax.random.key(0), 1.0)
    toks = np.asarray(toks)
    p = _softmax(logits_V.astype(np.float64))
    assert _tv(toks, p) < 0.02
    # power: the same bound rejects a sampler that applied temperature 2 or took argmax
    assert _tv(toks, _softmax(logits_V / 2.0)) > 0.05
    np.testing.assert_allclose(np.asarray(slogp), np.log(p[toks]), atol=1e-5)


def test_sample_logits_temperature_scales():
    logits_V = np.array([2.0, 1.0, 0.0, -1.0, 0.5], np.float32)
    n = 20000
    toks, slogp = token_choice.sample_logits(jnp.tile(logits_V, (n, 1)), jax.random.key(1), 0.5)
    p = _softmax(logits_V / 0.5)
    assert _tv(np.asarray(toks), p) < 0.02
    assert _tv(np.asarray(toks), _softmax(logits_V)) > 0.1
    np.testing.assert_allclose(np.asarray(slogp), np.log(p[np.asarray(toks)]), atol=1e-5)


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.7), (4, 0.8)])
def test_sample_logits_truncation_matches_renormalized_softmax(top_k, top_p):
    logits_V = np.array([0.3, 2.0, -1.0, 1.5, 0.0, 1.0, -0.5, 0.8], np.float32)
    # Expected support by hand: top-k by value, then the smallest prefix of the
    # descending order whose mass (renormalized over top-k) reaches top_p.
    order = np.argsort(-logits_V)
    kept = order[:top_k] if top_k else order
    probs = _softmax(logits_V[kept].astype(np.float64))
    mass_before = np.cumsum(probs) - probs
    kept = kept[mass_before < top_p]
    expected = np.zeros(8)
    expected[kept] = _softmax(logits_V[kept].astype(np.float64))
    assert 1 < len(kept) < 8

    n = 20000
    for use_top_p in (None, True):  # python-float and traced top-p paths
        toks, slogp = token_choice.sample_logits(
            jnp.tile(logits_V, (n, 1)),
            jax.random.key(2),
            1.0,
            top_k=top_k,
            top_p=top_p if use_top_p is None else jnp.float32(top_p),
            use_top_p=use_top_p,
        )
        toks = np.asarray(toks)
        assert set(np.unique(toks)) == set(kept.tolist())
        assert _tv(toks, expected) < 0.02
        np.testing.assert_allclose(np.asarray(slogp), np.log(expected[toks]), atol=1e-5)
    # filter_logits agrees on the support
    filtered = np.asarray(token_choice.filter_logits(jnp.asarray(logits_V)[None], top_k, top_p))[0]
    assert set(np.flatnonzero(np.isfinite(filtered)).tolist()) == set(kept.tolist())


def test_sample_logits_greedy():
    logits = jnp.asarray([[0.0, 3.0, 1.0], [5.0, -1.0, 4.9]])
    toks, slogp = token_choice.sample_logits(logits, jax.random.key(0), greedy=True)
    np.testing.assert_array_equal(np.asarray(toks), [1, 0])
    np.testing.assert_array_equal(np.asarray(slogp), [0.0, 0.0])


# ------------------------------------------------- the sampler's draws are jax's


@pytest.mark.parametrize("shape", [(8, 50257), (3, 7), (5,), (2, 3, 4)])
def test_unrolled_threefry_bits_are_jax_bits(shape):
    """The sampler's unrolled hash gives jax's own threefry bits, typed or raw key."""
    for key in (jax.random.fold_in(jax.random.key(3), 7), jax.random.PRNGKey(5)):
        np.testing.assert_array_equal(
            np.asarray(jax.random.bits(fast_random.fast_key(key), shape, jnp.uint32)),
            np.asarray(jax.random.bits(key, shape, jnp.uint32)),
        )


def test_categorical_and_argmax_are_jax_draws():
    """`fast_random.categorical` draws exactly jax.random.categorical's tokens (same key, same
    logits, -inf entries included) and `first_argmax` is jnp.argmax: first maximum on
    ties, a NaN counts as the maximum, an all -inf row gives 0."""
    rng = np.random.default_rng(0)
    ref = jax.jit(lambda k, x: jax.random.categorical(k, x, axis=-1))
    ours = jax.jit(fast_random.categorical)
    for trial in range(12):
        logits = rng.normal(size=(8, 300)).astype(np.float32) * [0.01, 1.0, 5.0][trial % 3]
        if trial % 2:
            logits[:, ::3] = -np.inf  # truncated (top-k / top-p) logits
        key = jax.random.key(trial)
        np.testing.assert_array_equal(np.asarray(ours(key, logits)), np.asarray(ref(key, logits)))

    ties = rng.integers(0, 3, size=(6, 40)).astype(np.float32)
    ties[1, [4, 9]] = np.nan
    ties[2] = -np.inf
    ties[3, 7] = np.inf
    got = np.asarray(jax.jit(fast_random.first_argmax)(ties))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(ties), axis=-1)))
    assert got[1] == 4 and got[2] == 0 and got[3] == 7
    assert got.dtype == np.int32


# -------------------------------------------------------------- with the model


TEXT_PROMPTS = ["The quick brown fox jumps", "Hello", "A chosen answer is preferred to a"]
GREEDY_STEPS = 8


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(family, tiny_hf_dir, tokenizer):
    """Greedy decoding of left-padded mixed-length prompts equals transformers'
    generate(do_sample=False) token for token, and every decode step's logits equal
    a torch full forward over the final sequences (KV cache vs no cache, 1e-4)."""
    from tests.hf_fixtures import load_torch_model, torch_logits

    hf_dir = tiny_hf_dir(family)
    cfg, params = models.load_hf(hf_dir)
    out = sampling.generate_text(
        models.Transformer(cfg),
        params,
        tokenizer,
        TEXT_PROMPTS,
        jax.random.key(0),
        max_new_tokens=GREEDY_STEPS,
        temperature=0.0,
        return_logits=True,
    )
    torch_model = load_torch_model(hf_dir)
    enc = tokenizer(TEXT_PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    gen = torch_model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=GREEDY_STEPS,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    hf_new = gen[:, enc["input_ids"].shape[1] :].numpy()
    ours = out.tokens[:, : hf_new.shape[1]]
    np.testing.assert_array_equal(ours, hf_new)
    assert (out.tokens[:, hf_new.shape[1] :] == tokenizer.pad_token_id).all()
    assert out.texts == tokenizer.batch_decode(out.completion_ids(), skip_special_tokens=True)

    # KV-cache step logits vs a torch full forward over prompt + generated tokens.
    full_ids = np.concatenate([out.prompt_ids, out.tokens], axis=1)
    pad = out.prompt_ids.shape[1] - out.prompt_lengths
    col = np.arange(full_ids.shape[1])[None]
    attn = (col >= pad[:, None]).astype(np.int64)
    ref = torch_logits(torch_model, full_ids, attn)
    prompt_len = out.prompt_ids.shape[1]
    ref_steps = ref[:, prompt_len - 1 : prompt_len - 1 + GREEDY_STEPS]
    mask = out.mask
    np.testing.assert_allclose(out.logits[mask], ref_steps[mask], atol=1e-4, rtol=1e-4)
    ref_lp = jax.nn.log_softmax(jnp.asarray(ref_steps), axis=-1)
    ref_lp = np.take_along_axis(np.asarray(ref_lp), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logps, np.where(mask, ref_lp, 0.0), atol=1e-4)
    # the padded batched re-scoring path (no cache) agrees too
    np.testing.assert_allclose(sampling.score_samples(cfg, params, out), out.logps, atol=1e-4)


def test_temperature_one_samples_follow_model_distribution():
    """First token: empirical frequencies over 3000 samples vs the model's softmax.
    Second token, conditioned on the most frequent first token: vs the softmax of
    a full forward on prompt + that token (checks the token is fed back correctly)."""
    cfg, params = _tiny("llama")
    params = _peaked(params, 20.0)
    model = models.Transformer(cfg)
    prompt = [5, 17, 3]
    n = 3000
    out = sampling.generate(
        model, params, [prompt], jax.random.key(7), sampling.SamplingConfig(max_new_tokens=2, n=n)
    )
    full = _last_logits(cfg, params, prompt)
    p1 = _softmax(full[-1])
    assert p1.max() < 0.9 and p1.max() > 0.1  # neither flat nor degenerate
    tv1 = _tv(out.tokens[:, 0], p1)
    assert tv1 < 0.05
    # power: the next-but-one position's or a temperature-2 distribution is rejected
    assert _tv(out.tokens[:, 0], _softmax(full[-2])) > 0.15
    assert _tv(out.tokens[:, 0], _softmax(full[-1] / 2.0)) > 0.1

    first = int(np.bincount(out.tokens[:, 0]).argmax())
    rows = out.tokens[:, 0] == first
    assert rows.sum() > 300
    cond = _last_logits(cfg, params, prompt + [first])[-1]
    tv2 = _tv(out.tokens[rows, 1], _softmax(cond))
    assert tv2 < 3.0 / np.sqrt(rows.sum())


def test_top_k_then_top_p_on_the_model():
    """top_k=5 then top_p=0.8 on the model: the support is exactly the hand-computed
    set and frequencies follow the renormalized softmax; ``logps`` stay the model's
    untruncated log-probs, ``sampling_logps`` the truncated ones."""
    cfg, params = _tiny("llama")
    params = _peaked(params, 20.0)
    prompt = [5, 17, 3]
    logits = _last_logits(cfg, params, prompt)[-1]
    order = np.argsort(-logits)[:5]
    probs = _softmax(logits[order])
    kept = order[(np.cumsum(probs) - probs) < 0.8]
    assert 1 < len(kept) < 5
    expected = np.zeros_like(logits)
    expected[kept] = _softmax(logits[kept])
    out = sampling.generate(
        models.Transformer(cfg),
        params,
        [prompt],
        jax.random.key(8),
        sampling.SamplingConfig(max_new_tokens=2, n=3000, top_k=5, top_p=0.8),
    )
    first = out.tokens[:, 0]
    assert set(np.unique(first).tolist()) == set(kept.tolist())
    assert _tv(first, expected) < 0.05
    np.testing.assert_allclose(out.logps[:, 0], np.log(_softmax(logits))[first], atol=1e-4)
    np.testing.assert_allclose(out.sampling_logps[:, 0], np.log(expected[first]), atol=1e-4)


def test_reproducible_with_fixed_key():
    cfg, params = _tiny("llama")
    params = _peaked(params, 20.0)
    model = models.Transformer(cfg)
    # same shapes and mode as the distribution test: reuses its compile
    config = sampling.SamplingConfig(max_new_tokens=2, n=3000)
    a = sampling.generate(model, params, [[5, 17, 3]], jax.random.key(11), config)
    b = sampling.generate(model, params, [[5, 17, 3]], jax.random.key(11), config)
    c = sampling.generate(model, params, [[5, 17, 3]], jax.random.key(12), config)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logps, b.logps)
    assert (a.tokens != c.tokens).any()
    # the n samples of one prompt are not copies of each other
    assert len(np.unique(a.tokens[:, 0])) > 3


def test_per_row_eos_stopping():
    cfg, params = _tiny("llama")
    model = models.Transformer(cfg)

    def greedy(eos: tuple[int, ...], pad: int = 0):
        config = sampling.SamplingConfig(
            max_new_tokens=10, temperature=0.0, eos_token_ids=eos, pad_token_id=pad
        )
        return sampling.generate(
            model, params, PROMPTS, jax.random.key(0), config, return_logits=True
        )

    base = greedy(())
    assert not base.finished.any() and (base.lengths == 10).all()
    eos = int(base.tokens[0, 2])  # row 0 stops at step 2; other rows when (if) they hit it
    pad = 63
    out = greedy((eos,), pad)
    for row in range(3):
        hits = np.flatnonzero(base.tokens[row] == eos)
        stop = int(hits[0]) + 1 if hits.size else 10
        assert out.lengths[row] == stop
        assert out.finished[row] == bool(hits.size)
        np.testing.assert_array_equal(out.tokens[row, :stop], base.tokens[row, :stop])
        assert (out.tokens[row, stop:] == pad).all()
        assert (out.logps[row, stop:] == 0).all()
        np.testing.assert_allclose(out.logps[row, :stop], base.logps[row, :stop], atol=1e-5)
    assert out.lengths[0] == 3
    np.testing.assert_array_equal(out.mask.sum(1), out.lengths)
    assert out.completion_ids()[0] == base.tokens[0, :2].tolist()
    assert out.completion_ids(keep_eos=True)[0] == base.tokens[0, :3].tolist()

    # When every row has finished, the loop stops: later steps never run (zero logits).
    early = greedy(tuple(int(t) for t in base.tokens[:, 0]))
    assert (early.lengths == 1).all() and early.finished.all()
    assert (early.logits[:, 1:] == 0).all() and (early.logits[:, 0] != 0).any()


def test_bad_input_errors():
    cfg, params = _tiny("gpt2")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampling.generate(cfg, params, [[1], []], jax.random.key(0))
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        sampling.generate(
            cfg, params, [[1] * 100], jax.random.key(0), sampling.SamplingConfig(max_new_tokens=40)
        )
    with pytest.raises(ValueError, match="token id 64 outside the model's vocabulary"):
        sampling.generate(cfg, params, [[1], [2, 64]], jax.random.key(0))
    with pytest.raises(ValueError, match="top_p"):
        sampling.SamplingConfig(top_p=0.0)
    with pytest.raises(TypeError, match="Transformer or models.ModelConfig"):
        sampling.generate("llama", params, [[1]], jax.random.key(0))
    assert sampling.bucket_length(17, (16, 32)) == 32
    assert sampling.bucket_length(70, (16, 32)) == 96


_SHARDED_SCRIPT = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
from dpo_jax import models, sampling, sharding
cfg = models.ModelConfig.tiny("llama", vocab_size=64, hidden_size=32)
params = models.init_params(cfg, jax.random.key(0))
prompts = json.loads(sys.argv[1])
config = sampling.SamplingConfig(max_new_tokens=5, n=1, temperature=1.0)
results = {}
for name, shape in (("data4", dict(data=4)), ("fsdp2_tensor2", dict(data=1, fsdp=2, tensor=2))):
    mesh = sharding.make_mesh(**shape)
    placed = jax.device_put(params, sharding.tree_shardings(models.logical_axes(cfg), params, mesh))
    out = sampling.generate(models.Transformer(cfg), placed, prompts, jax.random.key(5), config, mesh=mesh)
    results[name] = {"tokens": out.tokens.tolist(), "logps": out.logps.tolist()}
print(json.dumps(results))
"""


@pytest.mark.heavy
def test_sharded_over_data_axis_matches_single_device():
    """Rows split over a 4-device data axis (3 prompts -> padded to 4 rows), and rows
    over fsdp=2 with params sharded fsdp x tensor, give the same samples as one device:
    the key, not the placement, decides the sample."""
    cfg, params = _tiny("llama")
    config = sampling.SamplingConfig(max_new_tokens=5, n=1, temperature=1.0)
    ref = sampling.generate(models.Transformer(cfg), params, PROMPTS, jax.random.key(5), config)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT, json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("data4", "fsdp2_tensor2"):
        np.testing.assert_array_equal(np.asarray(got[name]["tokens"]), ref.tokens, err_msg=name)
        np.testing.assert_allclose(
            np.asarray(got[name]["logps"]), ref.logps, atol=1e-4, err_msg=name
        )


def test_cli_sample_writes_jsonl(tiny_hf_dir, tokenizer, tmp_path):
    """`dpo-jax sample` equals `generate_text` on text prompts and on a message-list
    prompt (rendered by the chat template with its generation prompt, as in training)."""
    from dpo_jax import cli
    from dpo_jax.cli import sample as cli_sample

    hf_dir = tiny_hf_dir("gpt2")
    messages = [{"role": "user", "content": "Hello there"}]
    chat_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat_text.startswith("<|im_start|>user") and chat_text.endswith("assistant\n")
    all_prompts = [*TEXT_PROMPTS, chat_text]
    prompts = tmp_path / "prompts.jsonl"
    rows_in = [{"prompt": p} for p in TEXT_PROMPTS] + [{"prompt": messages}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows_in))
    out_path = tmp_path / "samples.jsonl"
    argv = ["sample", "--model", str(hf_dir), "--prompts", str(prompts), "--output", str(out_path)]
    argv += [
        "--temperature",
        "0",
        "--max-new-tokens",
        str(GREEDY_STEPS),
        "--n",
        "2",
        "--batch-size",
        "2",
    ]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert len(rows) == 2 * len(all_prompts)
    cfg, params = models.load_hf(hf_dir)
    want = sampling.generate_text(
        cfg,
        params,
        tokenizer,
        all_prompts,
        jax.random.key(0),
        max_new_tokens=GREEDY_STEPS,
        temperature=0.0,
    )
    for r in rows:  # greedy: both samples of a prompt equal the one-sample greedy output
        i = r["prompt_index"]
        assert r["prompt"] == all_prompts[i]
        assert r["completion"] == want.texts[i]
        assert r["num_tokens"] == int(want.lengths[i])
        assert r["logp"] == pytest.approx(float(want.logps[i].sum()), abs=1e-4)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string or"):
        cli_sample.read_prompts(str(bad), tokenizer)
    bad.write_text('{"prompt": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: prompt\[0\].content must be a string"):
        cli_sample.read_prompts(str(bad), tokenizer)
