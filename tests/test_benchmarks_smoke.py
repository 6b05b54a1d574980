"""Seconds-long smoke runs of every benchmark's main() at a tiny shape.

Timings here mean nothing (shared CI machine); the assertions check that each script
produces sane fields and that the numbers it reports agree with a second code path:
the FLOP formula against the parameter count of a real HF GPT-2, XLA's own FLOP count
and the two layouts' / two log-prob paths' step-0 log-probs against each other, and
TRL's step-0 and step-1 figures against dpo_jax's on the same weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import common, jax_side

# Each train-step compile costs ~4 s of CPU whatever the model size; these runs compile
# 2-7 steps each, so they stay out of the default run (pytest -m heavy runs them).
HEAVY_COMPILES = pytest.mark.heavy

TINY = ["--shape", "micro", "--pairs", "2", "--steps", "2"]


def test_matmul_params_equal_the_hf_gpt2_weights_in_matmuls():
    """The FLOP formula's weight count equals a real GPT-2's 2-D weights minus wpe."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = common.MODEL_SHAPES["tiny"]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=shape.vocab,
            n_positions=shape.max_positions,
            n_embd=shape.d_model,
            n_layer=shape.n_layer,
            n_head=shape.n_head,
        )
    )
    in_matmuls = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.ndim == 2 and "wpe" not in name  # wte doubles as the (tied) unembedding
    )
    assert common.matmul_params(shape) == in_matmuls
    # GPT-2 small: 124,439,808 parameters, of which 123,532,032 sit in matmuls.
    assert common.matmul_params(common.MODEL_SHAPES["gpt2-small"]) == 123_532_032


def test_train_step_flops_by_hand():
    shape = common.ModelShape("t", n_layer=1, d_model=4, n_head=2, vocab=10, max_positions=8)
    b = common.BatchShape(pairs=1, prompt_len=3, completion_len=2)
    # body: attn 4*(2+4)*2 + 2*2*4 = 64, mlp 2*4*16 = 128 -> 192 weights
    body = 2 * 192 * 5
    unembed = 2 * 4 * 10 * 2  # completion positions only
    attention = 4 * 1 * 2 * 2 * 5 * 5
    per_seq = body + unembed + attention
    assert common.forward_flops_per_sequence(shape, 3, 2) == per_seq
    assert common.train_step_flops(shape, b, "frozen") == 4 * 2 * per_seq
    assert common.train_step_flops(shape, b, "precomputed") == 3 * 2 * per_seq
    all_pos = per_seq + 2 * 4 * 10 * 3
    assert common.train_step_flops(shape, b, "frozen", unembed_all=True) == 4 * 2 * all_pos
    with pytest.raises(ValueError, match="reference"):
        common.train_step_flops(shape, b, "none")


def test_stacked_batch_matches_the_data_pipeline():
    from dpo_jax.data import batching

    b = common.BatchShape(2, 5, 3)
    pairs = common.random_pairs(b, 64, 63, seed=1)
    assert (pairs["chosen_BxC"][:, -1] == 63).all()
    assert (pairs["prompt_BxP"] != 63).all()
    ours = jax_side.stacked_batch(pairs)
    items = [
        {"prompt": p, "chosen": c, "rejected": r}
        for p, c, r in zip(
            pairs["prompt_BxP"], pairs["chosen_BxC"], pairs["rejected_BxC"], strict=True
        )
    ]
    theirs = batching.build_batch(items, "paired", "stacked", length=8)
    for key in ("input_ids", "positions", "segment_ids", "sequence_index"):
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_word_level_tokenizer_round_trips_ids(tmp_path):
    from transformers import AutoTokenizer

    d = common.word_level_tokenizer(50, 49, str(tmp_path))
    tok = AutoTokenizer.from_pretrained(d)
    ids = [3, 17, 0, 48]
    text = common.ids_to_text(ids + [49], 49, leading_space=True)
    assert tok(text + tok.eos_token)["input_ids"] == ids + [49]


@pytest.mark.heavy
def test_train_step_main_reports_sane_figures():
    from benchmarks import train_step

    res = train_step.main([*TINY, "--prompt-len", "12", "--completion-len", "4"])
    (row,) = res["results"]
    assert row["tokens_per_s"] > 0 and row["median_step_s"] > 0
    assert 0 < row["mfu"] <= 1
    assert 0 < res["matmul_peak_flops"]["float32"] < 1e15
    assert math.isclose(row["step0_loss"], math.log(2), rel_tol=1e-5)
    assert row["step0_logps_chosen"] < 0
    # XLA counts at least the needed matmuls, and not wildly more than projecting every
    # position would cost (elementwise work adds a little on a tiny model).
    assert row["model_flops_per_step"] < row["model_flops_all_positions"]
    assert (
        0.9 * row["model_flops_per_step"]
        <= row["xla_flops"]
        <= 3 * row["model_flops_all_positions"]
    )
    assert row["temp_bytes"] > 0 and row["phase_peak_rss_bytes"] > 0


@HEAVY_COMPILES
def test_prefix_sharing_main_keeps_logps():
    from benchmarks import prefix_sharing

    res = prefix_sharing.main([*TINY, "--completion-len", "4", "--ratios", "3"])
    (row,) = res["results"]
    assert row["prefix_shared"]["rows"] == 2 and row["stacked"]["rows"] == 4
    assert row["prefix_shared"]["row_length"] == 12 + 2 * 4 + 1
    assert row["speedup"] > 0
    assert row["logps_max_abs_diff"] < 1e-3 * abs(row["stacked"]["step0_logps_chosen"])


@HEAVY_COMPILES
def test_logprobs_memory_main_chunked_is_smaller_and_equal():
    from benchmarks import logprobs_memory

    # N*L (4 rows x 64) well above the width: at L=16 the [N, L, V] logits are no larger
    # than the embedding gradient [V, D], and scratch memory cannot show the saving.
    res = logprobs_memory.main(
        [*TINY, "--vocab", "4096", "--prompt-len", "60", "--completion-len", "4"]
        + ["--chunks", "0,8", "--inprocess"]
    )
    plain, chunked = res["results"]
    assert plain["logps_chunk_size"] == 0 and chunked["logps_chunk_size"] == 8
    assert chunked["temp_bytes"] < 0.5 * plain["temp_bytes"]
    assert chunked["logps_max_abs_diff_vs_plain"] < 1e-3 * abs(plain["step0_logps_chosen"])


@HEAVY_COMPILES
def test_padding_main_fill_orders_strategies():
    from benchmarks import padding

    res = padding.main(["--shape", "micro", "--pairs", "2", "--batches", "2", "--max-length", "64"])
    rows = {r["strategy"]: r for r in res["results"]}
    assert set(rows) == set(padding.STRATEGIES)
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and 0 < r["fill"] <= 1
        assert r["real_tokens"] == rows["pad_to_max"]["real_tokens"]
    assert rows["pad_to_max"]["distinct_shapes"] == 1
    assert rows["bucketed"]["fill"] >= rows["pad_to_max"]["fill"]
    assert rows["packed"]["fill"] >= rows["bucketed"]["fill"]


def test_vs_trl_main_agrees_with_trl_on_the_same_weights():
    pytest.importorskip("trl")
    from benchmarks import vs_trl

    res = vs_trl.main(
        [*TINY, "--prompt-len", "12", "--completion-len", "4", "--inprocess", "--no-peak"]
        + ["--learning-rate", "1e-3"]
    )
    trl, ours = res["frameworks"]["trl"], res["frameworks"]["dpo_jax"]
    for s in (trl, ours):
        assert s["tokens_per_s"] > 0 and s["peak_rss_bytes"] > 0
        assert math.isclose(s["step0_loss"], math.log(2), rel_tol=1e-5)
    # Same random GPT-2, same tokens: the policy log-probs at step 0 must match.
    for k in ("step0_logps_chosen", "step0_logps_rejected"):
        assert math.isclose(trl[k], ours[k], rel_tol=1e-4), (k, trl[k], ours[k])
    # One AdamW step (lr 1e-3, clip 1.0) later both losses moved off log 2 the same way.
    assert abs(trl["step1_loss"] - math.log(2)) > 1e-3
    assert math.isclose(trl["step1_loss"], ours["step1_loss"], rel_tol=1e-3)
    assert res["speedup_tokens_per_s"] > 0


def test_checkpoint_fingerprint_main_times_every_array_of_the_state():
    import jax

    from benchmarks import checkpoint_fingerprint

    res = checkpoint_fingerprint.main(["--model", "micro", "--steps", "1", "--save"])
    tree = checkpoint_fingerprint.checkpoint_state(
        checkpoint_fingerprint.common.MODEL_SHAPES["micro"]
    )
    leaves = jax.tree.leaves(tree)
    assert res["arrays"] == len(leaves)
    assert res["state_bytes"] == sum(x.size * x.dtype.itemsize for x in leaves)
    assert res["fingerprint_s"] > 0 and res["save_s"] > 0


def test_long_context_rows_hold_exactly_l_tokens():
    """benchmarks/long_context.py: every layout's rows are full (L real tokens, no padding)."""
    from benchmarks import long_context
    from dpo_jax import data

    for layout, rows in (("stacked", 2), ("packed", 4), ("prefix_shared", 1)):
        items = long_context.items_for(layout, 256, vocab=128)
        batch = data.build_batch(items, "paired", layout, length=256)
        assert batch["input_ids"].shape == (rows, 256), layout
        assert (batch["segment_ids"] != 0).all(), layout
