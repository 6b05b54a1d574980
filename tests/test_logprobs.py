"""dpo_jax.logprobs against a numpy float64 reference written here and PyTorch's log_softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import logprobs, losses

V, D = 29, 8

# Jitted once per shape: eager op-by-op dispatch is what makes small tests slow on CPU.
seq_logps = jax.jit(logprobs.sequence_logps, static_argnums=2, static_argnames="with_wpo")


def reference(logits, ids, seq_index, S):
    """Per-sequence sums, lengths, LD-DPO prefix sums and WPO weights, by hand in float64."""
    z = np.asarray(logits, np.float64)
    logp = (
        z
        - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - z.max(-1, keepdims=True)
    )
    p = np.exp(logp)
    tokens = {k: [] for k in range(S)}  # (log p, log sum p^2) in row-major order
    N, L = ids.shape
    for n in range(N):
        for t in range(L):
            k = seq_index[n, t]
            if k >= 0:
                tokens[k].append((logp[n, t - 1, ids[n, t]], np.log((p[n, t - 1] ** 2).sum())))
    B = S // 2
    lengths = np.array([len(tokens[k]) for k in range(S)], np.float64)
    sums = np.array([sum(a for a, _ in tokens[k]) for k in range(S)])
    prefix = np.zeros(S)
    wpo = np.zeros(S)
    for k in range(S):
        partner = k + B if k < B else k - B
        shared = int(min(lengths[k], lengths[partner]))
        prefix[k] = sum(a for a, _ in tokens[k][:shared])
        wpo[k] = np.exp(np.mean([a - b for a, b in tokens[k]])) if tokens[k] else 1.0
    return sums, lengths, prefix, wpo


def stacked_batch(rng, B=2, L=11):
    """Rows 0..B-1 chosen, B..2B-1 rejected; prompt then completion then padding."""
    N = 2 * B
    ids = rng.integers(1, V, size=(N, L)).astype(np.int32)
    seq = -np.ones((N, L), np.int32)
    spans = [(3, 9), (2, 5), (4, 11), (2, 10)][:N]  # completion [start, end)
    for k, (a, b) in enumerate(spans):
        seq[k, a:b] = k
    return {"input_ids": ids, "sequence_index": seq}, N


def packed_batch(rng, L=16):
    """Two rows, four sequences (2 pairs) packed: a row may hold chosen and rejected."""
    ids = rng.integers(1, V, size=(2, L)).astype(np.int32)
    seq = -np.ones((2, L), np.int32)
    seq[0, 2:5] = 0  # chosen of pair 0
    seq[0, 8:14] = 2  # rejected of pair 0
    seq[1, 1:7] = 1  # chosen of pair 1
    seq[1, 10:12] = 3  # rejected of pair 1
    return {"input_ids": ids, "sequence_index": seq}, 4


def test_token_logps_by_hand():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, V)).astype(np.float32) * 3
    ids = rng.integers(0, V, size=(3, 6)).astype(np.int32)
    out = np.asarray(logprobs.token_logps(jnp.asarray(logits), jnp.asarray(ids)))
    z = logits.astype(np.float64)
    for n in range(3):
        assert out[n, 0] == 0.0
        for t in range(1, 6):
            expected = z[n, t - 1, ids[n, t]] - np.log(np.exp(z[n, t - 1]).sum())
            np.testing.assert_allclose(out[n, t], expected, rtol=1e-5, atol=1e-5)


def test_token_logps_bf16_logits_are_scored_in_float32():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(2, 5, V)) * 20).astype(np.float32)
    ids = rng.integers(0, V, size=(2, 5)).astype(np.int32)
    bf = jnp.asarray(logits, jnp.bfloat16)
    out = logprobs.token_logps(bf, jnp.asarray(ids))
    assert out.dtype == jnp.float32
    # Same numbers as float32 logits that hold the bf16-rounded values.
    exact = logprobs.token_logps(bf.astype(jnp.float32), jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(out), np.asarray(exact), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("layout", ["stacked", "packed"])
def test_sequence_logps_matches_hand_reference(layout):
    rng = np.random.default_rng(2)
    batch, S = stacked_batch(rng) if layout == "stacked" else packed_batch(rng)
    N, L = batch["input_ids"].shape
    logits = rng.normal(size=(N, L, V)).astype(np.float32) * 2
    seq = seq_logps(jnp.asarray(logits), batch, S, with_wpo=True)
    sums, lengths, prefix, wpo = reference(logits, batch["input_ids"], batch["sequence_index"], S)
    np.testing.assert_allclose(seq.lengths_S, lengths)
    np.testing.assert_allclose(seq.logps_S, sums, rtol=1e-5)
    np.testing.assert_allclose(seq.prefix_logps_S, prefix, rtol=1e-5)
    np.testing.assert_allclose(seq.wpo_weights_S, wpo, rtol=1e-5)
    # The prefix really is a strict part where lengths differ, the whole where they tie.
    B = S // 2
    for k in range(S):
        partner = (k + B) % S
        if lengths[k] > lengths[partner]:
            assert abs(prefix[k] - sums[k]) > 1e-3
        else:
            np.testing.assert_allclose(seq.prefix_logps_S[k], seq.logps_S[k], rtol=1e-6)


def test_prefix_shared_layout_matches_stacked():
    """One row per pair (prompt, chosen, copy of last prompt token, rejected) = stacked rows."""
    rng = np.random.default_rng(3)
    P, Lc, Lr = 3, 4, 2  # prompt, chosen, rejected lengths
    W = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    prompt = rng.integers(1, V, size=P)
    chosen = rng.integers(1, V, size=Lc)
    rejected = rng.integers(1, V, size=Lr)

    # A toy "model" whose logits at a position depend only on that token: then the
    # prefix-shared row and the stacked rows see identical contexts for every scored token.
    @jax.jit
    def logits_of(ids):
        return emb[ids] @ W

    stacked_ids = np.zeros((2, P + Lc), np.int32)
    stacked_ids[0] = np.concatenate([prompt, chosen])
    stacked_ids[1, : P + Lr] = np.concatenate([prompt, rejected])
    stacked_seq = -np.ones((2, P + Lc), np.int32)
    stacked_seq[0, P : P + Lc] = 0
    stacked_seq[1, P : P + Lr] = 1
    shared_ids = np.concatenate([prompt, chosen, prompt[-1:], rejected])[None].astype(np.int32)
    shared_seq = -np.ones_like(shared_ids)
    shared_seq[0, P : P + Lc] = 0
    shared_seq[0, P + Lc + 1 :] = 1
    a = seq_logps(
        logits_of(stacked_ids), {"input_ids": stacked_ids, "sequence_index": stacked_seq}, 2
    )
    b = seq_logps(logits_of(shared_ids), {"input_ids": shared_ids, "sequence_index": shared_seq}, 2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5)
    np.testing.assert_allclose(a.lengths_S, [Lc, Lr])


def test_against_pytorch_log_softmax_gather():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    batch, S = stacked_batch(rng)
    N, L = batch["input_ids"].shape
    logits = rng.normal(size=(N, L, V)).astype(np.float32) * 4
    # TRL's recipe: shift, log_softmax, gather, mask, sum over the completion.
    tl = torch.from_numpy(logits)[:, :-1]
    labels = torch.from_numpy(batch["input_ids"]).long()[:, 1:]
    mask = torch.from_numpy(batch["sequence_index"] >= 0)[:, 1:]
    per_tok = torch.gather(tl.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    expected = (per_tok * mask).sum(-1).numpy()
    seq = seq_logps(jnp.asarray(logits), batch, S)
    np.testing.assert_allclose(seq.logps_S, expected, rtol=1e-5)
    np.testing.assert_allclose(seq.lengths_S, mask.sum(-1).numpy())


@pytest.mark.parametrize("chunk_size", [4, 5, 64])
def test_chunked_path_equals_plain_path_values_and_gradients(chunk_size):
    rng = np.random.default_rng(5)
    batch, S = stacked_batch(rng)
    N, L = batch["input_ids"].shape
    hidden = jnp.asarray(rng.normal(size=(N, L, D)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    ref = jnp.asarray(rng.normal(size=(S,)) - 20.0, jnp.float32)

    def objective(h, w, chunked):
        if chunked:
            seq = logprobs.sequence_logps_chunked(h, lambda x: x @ w, batch, S, chunk_size)
        else:
            seq = logprobs.sequence_logps(h @ w, batch, S)
        stats = logprobs.preference_stats(seq, ref)
        loss, _ = losses.compute_loss(stats, ["sigmoid", "ipo"], ld_alpha=0.5, beta=0.1)
        return jnp.mean(loss), seq

    (v_plain, seq_plain), g_plain = jax.jit(
        jax.value_and_grad(lambda h, w: objective(h, w, False), argnums=(0, 1), has_aux=True)
    )(hidden, W)
    (v_chunk, seq_chunk), g_chunk = jax.jit(
        jax.value_and_grad(lambda h, w: objective(h, w, True), argnums=(0, 1), has_aux=True)
    )(hidden, W)
    np.testing.assert_allclose(v_chunk, v_plain, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(seq_chunk), jax.tree.leaves(seq_plain), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    for x, y in zip(g_chunk, g_plain, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        assert np.abs(np.asarray(y)).max() > 1e-4  # the gradient is not trivially zero


def test_chunked_wpo_weights_equal_plain():
    rng = np.random.default_rng(6)
    batch, S = packed_batch(rng)
    N, L = batch["input_ids"].shape
    hidden = jnp.asarray(rng.normal(size=(N, L, D)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    a = seq_logps(hidden @ W, batch, S, with_wpo=True)
    b = jax.jit(
        lambda h, w: logprobs.sequence_logps_chunked(h, lambda x: x @ w, batch, S, 3, with_wpo=True)
    )(hidden, W)
    np.testing.assert_allclose(b.wpo_weights_S, a.wpo_weights_S, rtol=1e-5)


def _avals(jaxpr):
    """Every intermediate array shape in a (closed) jaxpr, nested jaxprs included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for p in eqn.params.values():
            subs = p if isinstance(p, list | tuple) else [p]
            for sub in subs:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    shapes += _avals(inner if hasattr(inner, "eqns") else inner.jaxpr)
    return shapes


def test_chunked_backward_never_holds_full_logits():
    rng = np.random.default_rng(7)
    batch, S = stacked_batch(rng, B=2, L=16)
    N, L = batch["input_ids"].shape
    Vbig, C = 97, 4
    hidden = jnp.asarray(rng.normal(size=(N, L, D)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(D, Vbig)), jnp.float32)
    chunked = lambda h, w: logprobs.sequence_logps_chunked(h, lambda x: x @ w, batch, S, C)
    plain = lambda h, w: logprobs.sequence_logps(h @ w, batch, S)
    for fn, expect_full in ((chunked, False), (plain, True)):
        grad_fn = jax.grad(lambda h, w, fn=fn: fn(h, w).logps_S.sum(), argnums=(0, 1))
        shapes = _avals(jax.make_jaxpr(grad_fn)(hidden, W).jaxpr)
        vocab_sized = [s for s in shapes if s and s[-1] == Vbig and np.prod(s) > D * Vbig]
        biggest = max(int(np.prod(s)) for s in vocab_sized)
        if expect_full:
            assert biggest >= N * L * Vbig
        else:
            assert biggest <= N * C * Vbig, sorted(vocab_sized)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_plain_forward_holds_at_most_one_float32_copy_of_the_logits(dtype):
    N, L, Vbig = 4, 64, 8192
    f32_bytes = N * L * Vbig * 4
    ids = jax.ShapeDtypeStruct((N, L), jnp.int32)
    fn = jax.jit(
        lambda lg, ids, si: (
            logprobs.sequence_logps(
                lg, {"input_ids": ids, "sequence_index": si}, N, with_wpo=True
            ).logps_S
        )
    )
    compiled = fn.lower(jax.ShapeDtypeStruct((N, L, Vbig), dtype), ids, ids).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 1.05 * f32_bytes, temp / f32_bytes
    if dtype == jnp.float32:
        assert temp < 0.05 * f32_bytes, temp / f32_bytes  # read in place


def test_preference_and_unpaired_stats_split_chosen_then_rejected():
    seq = logprobs.SequenceLogps(
        logps_S=jnp.asarray([-1.0, -2.0, -3.0, -4.0]),
        lengths_S=jnp.asarray([1.0, 2.0, 3.0, 4.0]),
        prefix_logps_S=jnp.asarray([-1.0, -2.0, -2.5, -3.0]),
        wpo_weights_S=jnp.asarray([0.1, 0.2, 0.3, 0.4]),
    )
    ref = jnp.asarray([-5.0, -6.0, -7.0, -8.0])
    st = logprobs.preference_stats(seq, ref)
    np.testing.assert_allclose(st.chosen_logps, [-1, -2])
    np.testing.assert_allclose(st.rejected_logps, [-3, -4])
    np.testing.assert_allclose(st.ref_chosen_logps, [-5, -6])
    np.testing.assert_allclose(st.ref_rejected_logps, [-7, -8])
    np.testing.assert_allclose(st.chosen_lengths, [1, 2])
    np.testing.assert_allclose(st.rejected_prefix_logps, [-2.5, -3])
    np.testing.assert_allclose(st.rejected_weights, [0.3, 0.4])
    assert st.ref_chosen_prefix_logps is None
    st_free = logprobs.preference_stats(seq, None)
    assert st_free.ref_chosen_logps is None
    st_seq = logprobs.preference_stats(seq, seq)
    np.testing.assert_allclose(st_seq.ref_chosen_prefix_logps, [-1, -2])
    with pytest.raises(ValueError, match="shape"):
        logprobs.preference_stats(seq, jnp.zeros(3))

    u = logprobs.unpaired_stats(seq, ref, jnp.asarray([1, 0]))
    np.testing.assert_allclose(u.logps, [-1, -2])
    np.testing.assert_allclose(u.kl_logps, [-3, -4])
    np.testing.assert_allclose(u.ref_kl_logps, [-7, -8])
    np.testing.assert_allclose(u.lengths, [1, 2])
    with pytest.raises(ValueError, match="labels"):
        logprobs.unpaired_stats(seq, ref, jnp.asarray([1, 0, 1]))
    with pytest.raises(ValueError, match=r"reference log-probs have shape \(6,\); expected \(4,\)"):
        logprobs.unpaired_stats(seq, jnp.zeros(6), jnp.asarray([1, 0]))


def test_bad_batches_are_named():
    rng = np.random.default_rng(8)
    batch, S = stacked_batch(rng)
    logits = jnp.zeros(batch["input_ids"].shape + (V,))
    with pytest.raises(KeyError, match="sequence_index"):
        logprobs.sequence_logps(logits, {"input_ids": batch["input_ids"]}, S)
    bad = dict(batch, sequence_index=np.where(batch["sequence_index"] >= 0, 7, -1))
    with pytest.raises(ValueError, match=r"sequence_index.*\[-1, 7\]"):
        logprobs.sequence_logps(logits, bad, S)
    first = batch["sequence_index"].copy()
    first[0, 0] = 0
    with pytest.raises(ValueError, match="position 0"):
        logprobs.sequence_logps(logits, dict(batch, sequence_index=first), S)
    with pytest.raises(ValueError, match="logits have shape"):
        logprobs.sequence_logps(logits[:, :-1], batch, S)
    with pytest.raises(ValueError, match="positive"):
        logprobs.sequence_logps(logits, batch, 0)
    # an odd count is single sequences (SFT rows): no chosen/rejected partner, no prefix
    single = dict(
        batch, sequence_index=np.where(batch["sequence_index"] > 2, -1, batch["sequence_index"])
    )
    assert logprobs.sequence_logps(logits, single, 3).prefix_logps_S is None
