"""A reward model exported as transformers' `AutoModelForSequenceClassification` (one
label, the family's `score` head): transformers' scores equal ours, right- and
left-padded; `reward_model:DIR` and `hf:DIR` read the directory."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from dpo_jax import cli, export, models, reward_model, reward_sources
from dpo_jax.errors import UserError
from tests import train_helpers as th
from tests.hf_fixtures import DEFAULT_TEXTS

TEXTS = list(DEFAULT_TEXTS[:5])


def _reward_params(src, seed: int = 0, bias: float = 0.0):
    cfg, backbone = models.load_hf(src)
    kernel = np.random.default_rng(seed).normal(size=cfg.hidden_size).astype(np.float32)
    return cfg, {"model": backbone, "head": {"kernel": kernel, "bias": np.float32(bias)}}


def _hf_scores(out, texts, side: str) -> tuple[np.ndarray, list[list[int]]]:
    """transformers' scores of `texts` + EOS, padded on `side` by the exported tokenizer.
    Right padding is TRL's call (GRPO/RLOO reward models: `from_pretrained(DIR,
    num_labels=1)`, the directory's tokenizer, `padding_side="right"`,
    `add_special_tokens=False`, `logits[:, 0]`); left-padded rows get positions counted
    from their first real token, as any transformers model needs."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    tok.padding_side = side
    enc = tok([t + tok.eos_token for t in texts], padding=True, add_special_tokens=False,
              return_tensors="pt")  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(
        out, num_labels=1, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    mask = enc["attention_mask"]
    ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], mask, strict=True)]
    with torch.no_grad():
        logits = model(**enc, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert logits.shape == (len(texts), 1)
    return logits[:, 0].numpy(), ids


def _check_export(src, tokenizer, tmp_path, bias: float = 0.0):
    cfg, params = _reward_params(src, bias=bias)
    out = tmp_path / "rm"
    export.write_hf(out, cfg, params, tokenizer)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == [models.classifier_architecture(cfg.model_type)]
    assert hf_cfg["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
    ours_fn = reward_model.LearnedReward(cfg, params, tokenizer)
    ours = ours_fn(TEXTS)
    for side in ("right", "left"):
        hf, ids = _hf_scores(out, TEXTS, side)
        assert ids == ours_fn.encode(TEXTS)  # the same tokens, EOS last
        np.testing.assert_allclose(hf + bias, ours, rtol=1e-5, atol=1e-5)
    assert np.ptp(ours) > 0.1  # the texts score differently: a wrong position would show
    # our own reader: the same model, bias included
    np.testing.assert_allclose(reward_model.load_exported(str(out))(TEXTS), ours, atol=1e-5)
    return out, ours


def test_reward_model_exports_as_a_sequence_classifier(tiny_hf_dir, tokenizer, tmp_path):
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as NAMES,
    )

    _check_export(tiny_hf_dir("llama"), tokenizer, tmp_path)
    for family in models.SUPPORTED_MODEL_TYPES:
        assert models.classifier_architecture(family) == NAMES[family]
    # a pad token that is the EOS would make transformers score the token before it
    cfg, params = _reward_params(tiny_hf_dir("llama"))
    with pytest.raises(UserError, match="pad token .* is the EOS; pass --pad-token-id"):
        export.write_hf(tmp_path / "x", cfg, params, tokenizer, pad_token_id=tokenizer.eos_token_id)


@pytest.mark.heavy
def test_hf_spec_scores_a_reward_models_logit(tiny_hf_dir, tokenizer, tmp_path):
    """online.reward=hf:DIR of a one-label classifier: its logit of prompt + completion as
    its tokenizer encodes the text (a binary classifier keeps P(class 1))."""
    import torch
    from transformers import AutoModelForSequenceClassification

    cfg, params = _reward_params(tiny_hf_dir("llama"))
    out = tmp_path / "rm"
    export.write_hf(out, cfg, params, tokenizer)
    prompts = [tokenizer(t[:20])["input_ids"] for t in TEXTS[:2]]
    comps = [tokenizer(t[20:])["input_ids"] for t in TEXTS[:2]]
    got = reward_sources.from_spec(f"hf:{out}", tokenizer)(th.sample_output(prompts, comps))
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = [float(model(**tokenizer(t, return_tensors="pt")).logits[0, 0]) for t in TEXTS[:2]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    reward_sources.check_spec(f"reward_model:{out}")
    binary = tmp_path / "binary"
    binary.mkdir()
    labels = {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "N", "1": "P"}}
    (binary / "config.json").write_text(json.dumps(labels))
    assert reward_sources._num_labels(str(binary)) == 2
    with pytest.raises(UserError, match="classifier of 2 labels, not a reward model"):
        reward_sources.check_spec(f"reward_model:{binary}")


@pytest.mark.heavy
def test_gpt2_reward_model_with_a_bias(tiny_hf_dir, tokenizer, tmp_path):
    """GPT-2 (tied embeddings, learned positions); a non-zero head bias is recorded in
    config.json: transformers' scores are ours minus it, `load_exported` restores it."""
    _check_export(tiny_hf_dir("gpt2"), tokenizer, tmp_path, bias=0.75)


@pytest.mark.heavy  # trains two reward-model steps: compiles the step
def test_cli_exports_a_trained_reward_model(tiny_hf_dir, tokenizer, tmp_path):
    """`dpo-jax train --config.objective.name=reward_model`, then `dpo-jax export`: the
    directory transformers loads scores as the trained params do."""
    from dpo_jax import checkpoint, train
    from dpo_jax.configs import tiny

    src = tiny_hf_dir("llama")
    cfg, params0 = _reward_params(src)
    config = tiny.get_config()
    config.objective.name = "reward_model"
    config.run_dir = str(tmp_path / "run")
    config.num_steps, config.batch_size, config.grad_accum_steps = 2, 2, 1
    config.optim.learning_rate = 5e-2
    config.train.tensorboard = False
    config.checkpoint.enabled = True
    ckpt = checkpoint.Checkpointer.from_config(config, model_config=cfg, tokenizer=src)
    result = train.train(
        config, train_data=th.synthetic_batches(num=2, pairs=2, seed=3), model_config=cfg,
        params=params0, checkpointer=ckpt,
    )  # fmt: skip
    assert (
        cli.main(["export", "--checkpoint", config.run_dir, "--output", str(tmp_path / "o")]) == 0
    )
    trained = jax.device_get(result.state.params)
    ours = reward_model.LearnedReward(cfg, trained, tokenizer)(TEXTS)
    hf, _ = _hf_scores(tmp_path / "o", TEXTS, "right")
    np.testing.assert_allclose(hf + float(trained["head"]["bias"]), ours, rtol=1e-5, atol=1e-5)
