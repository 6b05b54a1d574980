"""Reward functions: VADER, a tiny local HF classifier, best-of-N selection."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_jax import rewards

WORDS = [
    "the",
    "movie",
    "was",
    "great",
    "awful",
    "good",
    "bad",
    "plot",
    "acting",
    "boring",
    "fun",
    "loved",
    "hated",
    "it",
    "a",
]


def test_vader_reward_is_compound_score():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["I loved this wonderful movie!", "A boring, awful, terrible film.", "It is a film."]
    scores = rewards.VaderReward()(texts)
    assert scores.dtype == np.float32 and scores.shape == (3,)
    analyzer = SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(t)["compound"] for t in texts]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores[0] > 0.5 and scores[1] < -0.5 and abs(scores[2]) < 0.1
    assert isinstance(rewards.VaderReward(), rewards.RewardFn)
    with pytest.raises(TypeError, match="one str"):
        rewards.VaderReward()("a single string")
    with pytest.raises(ValueError, match="unknown field"):
        rewards.VaderReward(field="joy")


def _tiny_classifier(path, family: str) -> None:
    """Save a random 2-class classifier and a word-level tokenizer (no downloads)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        AutoModelForSequenceClassification,
        DistilBertConfig,
        PreTrainedTokenizerFast,
        RobertaConfig,
    )

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(path)
    small = dict(
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    if family == "roberta":
        cfg = RobertaConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=1,
            **small,
        )
    else:
        cfg = DistilBertConfig(
            vocab_size=64,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=64,
            pad_token_id=1,
            **small,
        )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_hf_classifier_reward_matches_unpadded_torch_forward(tmp_path, family):
    """Batched, padded scoring equals a one-text-at-a-time forward (no padding) of the
    same checkpoint, for every score kind and label given by name or index."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _tiny_classifier(tmp_path, family)
    texts = ["the movie was great", "bad", "it was a boring plot and awful acting", "fun"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        logits = np.stack(
            [model(**tok([t], return_tensors="pt")).logits[0].double().numpy() for t in texts]
        )
    shifted = logits - logits.max(1, keepdims=True)
    logprob = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))

    by_name = rewards.HFClassifierReward(str(tmp_path), label="positive", batch_size=3)
    np.testing.assert_allclose(by_name(texts), np.exp(logprob[:, 1]), atol=1e-5)
    assert by_name.label_index == 1
    neg = rewards.HFClassifierReward(str(tmp_path), label=0, score="logit", batch_size=2)
    np.testing.assert_allclose(neg(texts), logits[:, 0], atol=1e-4)
    lp = rewards.HFClassifierReward(str(tmp_path), label=1, score="logprob")
    np.testing.assert_allclose(lp(texts), logprob[:, 1], atol=1e-4)
    margin = rewards.HFClassifierReward(str(tmp_path), label="POSITIVE", score="margin")
    np.testing.assert_allclose(margin(texts), logits[:, 1] - logits[:, 0], atol=1e-4)
    assert by_name([]).shape == (0,)
    with pytest.raises(ValueError, match="not in id2label"):
        rewards.HFClassifierReward(str(tmp_path), label="NEUTRAL")
    with pytest.raises(ValueError, match="out of range"):
        rewards.HFClassifierReward(str(tmp_path), label=2)


def test_best_of_n_indices_picks_max_per_prompt():
    r = np.array([0.1, 0.9, 0.3, -1.0, 2.0, 2.0, 0.0, 0.0, 0.0])
    prompt = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(rewards.best_of_n_indices(r, prompt), [1, 4, 6])
    # interleaved layout (row i -> prompt i % 3)
    np.testing.assert_array_equal(
        rewards.best_of_n_indices(
            np.array([1.0, 5.0, 0.0, 3.0, 2.0, 1.0]), np.array([0, 1, 2, 0, 1, 2])
        ),
        [3, 1, 5],
    )
    with pytest.raises(ValueError, match="NaN"):
        rewards.best_of_n_indices(np.array([np.nan]), np.array([0]))


def test_as_reward_fn_checks_lengths():
    f = rewards.as_reward_fn(lambda texts: [1.0] * (len(texts) + 1), name="bad")
    with pytest.raises(ValueError, match="bad: returned 3 scores for 2 texts"):
        f(["a", "b"])
    g = rewards.as_reward_fn(lambda texts: [len(t) for t in texts])
    np.testing.assert_array_equal(g(["ab", "c"]), np.array([2.0, 1.0], np.float32))
