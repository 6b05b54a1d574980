"""The prefix-shared (and packed) layouts give the same per-sequence log-probs as stacked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import logprobs, models
from dpo_jax.data.batching import build_batch


def _items(rng, b, vocab, kind):
    items = []
    for i in range(b):
        item = {"prompt": rng.integers(1, vocab, rng.integers(1, 7))}
        if kind == "paired":
            item["chosen"] = rng.integers(1, vocab, rng.integers(1, 7))
            item["rejected"] = rng.integers(1, vocab, rng.integers(1, 7))
        else:
            item["completion"] = rng.integers(1, vocab, rng.integers(1, 7))
            item["label"] = i % 2
        items.append(item)
    return items


def _logps(model, params, batch, num_sequences):
    """Model forward with the batch's positions/segments/mask, then per-sequence sums."""

    @jax.jit
    def f(params, arrays):
        kw = {k: arrays[k] for k in ("positions", "segment_ids", "branch_ids") if k in arrays}
        logits = model.apply({"params": params}, arrays["input_ids"], **kw)
        return logits, logprobs.sequence_logps(logits, arrays, num_sequences).logps_S

    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    logits, lp = f(params, arrays)
    return np.asarray(logits), np.asarray(lp)


def _numpy_stacked_logps(logits, batch, num_sequences):
    """Hand sum for the stacked layout: token t of sequence k scored by logits at t-1."""
    x = logits.astype(np.float64)
    logp = (
        x
        - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - x.max(-1, keepdims=True)
    )
    out = np.zeros(num_sequences)
    for r, t in zip(*np.nonzero(batch["sequence_index"] >= 0), strict=True):
        out[batch["sequence_index"][r, t]] += logp[r, t - 1, batch["input_ids"][r, t]]
    return out


@pytest.mark.parametrize(
    "family,kind",
    [
        ("llama", "paired"),
        # Learned positions (GPT-2) and KTO's KL rows; slower, kept for `pytest -m heavy`.
        pytest.param("gpt2", "unpaired", marks=pytest.mark.heavy),
        pytest.param("llama", "unpaired", marks=pytest.mark.heavy),
        pytest.param("gpt2", "paired", marks=pytest.mark.heavy),
    ],
)
def test_prefix_shared_equals_stacked_logps(family, kind):
    vocab = 64
    if family == "llama":
        cfg = models.ModelConfig(
            vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=64, max_position_embeddings=64, init_std=0.3,
        )  # fmt: skip
    else:
        cfg = models.ModelConfig(
            model_type="gpt2", vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4,
            intermediate_size=64, max_position_embeddings=64, norm_type="layernorm",
            activation="gelu_new", gated_mlp=False, position_embedding="learned",
            qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_word_embeddings=True,
            init_std=0.3,
        )  # fmt: skip
    model = models.Transformer(cfg)
    params = models.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    b = 3
    items = _items(rng, b, vocab, kind)
    stacked = build_batch(items, kind, "stacked")
    shared = build_batch(items, kind, "prefix_shared")
    assert shared["input_ids"].shape[0] == b and stacked["input_ids"].shape[0] == 2 * b
    logits_stacked, lp_stacked = _logps(model, params, stacked, 2 * b)
    _, lp_shared = _logps(model, params, shared, 2 * b)
    packed = build_batch(items, kind, "packed", length=stacked["input_ids"].shape[1] * 2)
    assert packed["input_ids"].shape[0] < 2 * b  # several sequences really share rows
    _, lp_packed = _logps(model, params, packed, 2 * b)
    np.testing.assert_allclose(
        lp_stacked, _numpy_stacked_logps(logits_stacked, stacked, 2 * b), atol=1e-4, rtol=0
    )
    np.testing.assert_allclose(lp_shared, lp_stacked, atol=1e-4, rtol=0)
    np.testing.assert_allclose(lp_packed, lp_stacked, atol=1e-4, rtol=0)
    assert np.all(np.abs(lp_stacked) > 1.0)  # non-trivial values were compared
