"""Shared test helpers: a locally trained tokenizer and tiny random HF models.

Nothing here downloads anything. Import from other tests as::

    from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

`train_tokenizer()` trains a byte-level BPE in well under a second and returns a
`PreTrainedTokenizerFast` with eos/bos/pad tokens (and optionally a ChatML-like
chat template). `make_tiny_hf_model(family, out_dir)` saves a seeded random
tiny `transformers` model (2 layers, width 64) with `save_pretrained`.

The random weights are deliberately larger than HF's default init (std 0.02)
and norm scales/biases are randomised, so logits are O(1) and attention is far
from uniform: a wrong RoPE, mask or weight layout changes logits by much more
than the 1e-4 tolerances the parity tests use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpo_jax.models import families as _families

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Direct preference optimization trains a policy from pairs of answers.",
    "A chosen answer is preferred to a rejected answer by a human rater.",
    "Question: what is two plus two? Answer: four.",
    "The reference model stays frozen while the policy is trained.",
    "Hello world! How are you today? I am fine, thank you.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ' \" ( ) [ ] { }",
    "User: write a short poem about the sea.\nAssistant: Waves fold into foam.",
)

# Every registered family (the parity tests parametrize over this); each needs a FIXTURES entry.
FAMILIES = _families.names()

# Tokenizer vocabulary is about 300; models get a few spare rows, like real ones.
TOKENIZER_VOCAB = 320
MODEL_VOCAB = 384


def train_tokenizer(
    texts: Sequence[str] | str | os.PathLike | None = None,
    *,
    vocab_size: int = TOKENIZER_VOCAB,
    chat_template: bool | str = False,
    save_dir: str | os.PathLike | None = None,
) -> Any:
    """Trains a byte-level BPE tokenizer locally; returns a PreTrainedTokenizerFast.

    `texts` is a list of training strings (default: a small built-in corpus). For
    convenience a path may be passed instead: it is used as `save_dir`.
    eos = bos = "<|endoftext|>", pad = "<|pad|>", and "<|im_start|>"/"<|im_end|>"
    are special tokens. `chat_template=True` adds a ChatML-like template (or pass
    a Jinja string). With `save_dir` the tokenizer is also `save_pretrained` there.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str | os.PathLike):  # a lone string would be a corpus of characters
        save_dir, texts = texts, None
    corpus = list(texts) if texts is not None else list(DEFAULT_TEXTS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE if chat_template is True else chat_template
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


# Shared by the fixtures below.
_ROPE_LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    # Small so that tiny head dims have high, medium and low frequencies.
    original_max_position_embeddings=32,
)
_DEFAULT_ROPE = dict(rope_type="default", rope_theta=10000.0)


def _llama_sizes(common: dict[str, Any]) -> dict[str, Any]:
    """Sizes the Llama-like fixtures share; each adds only what makes it distinctive."""
    return dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, **common
    )


def _gpt2(tf: Any, common: dict[str, Any], ids: dict[str, Any]) -> Any:
    return tf.GPT2Config(
        vocab_size=common["vocab_size"], n_positions=128, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
    )  # fmt: skip


def _gpt_neox(tf: Any, common: dict[str, Any], ids: dict[str, Any]) -> Any:
    return tf.GPTNeoXConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        use_parallel_residual=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
        tie_word_embeddings=False, **common,
    )  # fmt: skip


# One entry per registered family (dpo_jax.models.families): model_type -> config builder
# (transformers module, common kwargs, token ids) -> a tiny transformers config that
# exercises the family's distinctive features.
FIXTURES: dict[str, Any] = {
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "llama": lambda tf, c, ids: tf.LlamaConfig(
        num_key_value_heads=2, rope_parameters=_ROPE_LLAMA3, tie_word_embeddings=False,
        **_llama_sizes(c),
    ),
    "mistral": lambda tf, c, ids: tf.MistralConfig(
        num_key_value_heads=1,
        sliding_window=6,  # shorter than test sequences, so the window matters
        rope_parameters=_DEFAULT_ROPE, tie_word_embeddings=False, **_llama_sizes(c),
    ),
    "qwen2": lambda tf, c, ids: tf.Qwen2Config(
        num_key_value_heads=2, rope_parameters=_DEFAULT_ROPE, tie_word_embeddings=True,
        # Every layer windowed (layers >= max_window_layers slide); test_families also
        # checks max_window_layers=1 (layer 0 full) with `make_tiny_hf_model(hf_config=)`.
        use_sliding_window=True, sliding_window=5, max_window_layers=0,
        **_llama_sizes(c),
    ),
    "qwen3": lambda tf, c, ids: tf.Qwen3Config(
        num_key_value_heads=2,
        head_dim=24,  # explicit, != hidden / heads
        rope_parameters=_DEFAULT_ROPE, tie_word_embeddings=True, **_llama_sizes(c),
    ),
    "gemma": lambda tf, c, ids: tf.GemmaConfig(
        num_key_value_heads=1, head_dim=32, hidden_act="gelu_pytorch_tanh",
        rope_parameters=_DEFAULT_ROPE, tie_word_embeddings=True, **_llama_sizes(c),
    ),
    "gemma2": lambda tf, c, ids: tf.Gemma2Config(
        num_key_value_heads=2, head_dim=16, hidden_activation="gelu_pytorch_tanh",
        rope_parameters=_DEFAULT_ROPE, tie_word_embeddings=True,
        query_pre_attn_scalar=24,  # != head_dim, so the score scale matters
        # Caps small enough that tanh bends the tiny model's scores and logits.
        attn_logit_softcapping=4.0, final_logit_softcapping=3.0,
        sliding_window=4,  # layers 0, 2 slide; 1, 3 are global: two scanned groups
        **{**_llama_sizes(c), "num_hidden_layers": 4},
    ),
    "gemma3_text": lambda tf, c, ids: tf.Gemma3TextConfig(
        num_key_value_heads=2, head_dim=16, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
            "sliding_attention": dict(rope_type="default", rope_theta=100.0),
        },
        tie_word_embeddings=True, query_pre_attn_scalar=24, sliding_window=4,
        # Six layers: the default 5 local : 1 global pattern.
        **{**_llama_sizes(c), "num_hidden_layers": 6},
    ),
    "phi3": lambda tf, c, ids: tf.Phi3Config(
        num_key_value_heads=2,  # fused qkv_proj with GQA: q, k, v row blocks differ in size
        rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
            # Long factors are used once any position + 1 exceeds 4: every test row.
            original_max_position_embeddings=4,
            short_factor=[1.0, 1.5, 2.0, 3.0], long_factor=[1.0, 2.0, 4.0, 8.0],
        ),
        original_max_position_embeddings=4, tie_word_embeddings=False,
        # Phi-3's default token ids (32000) lie outside the tiny vocabulary.
        **_llama_sizes({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **c}),
    ),
}  # fmt: skip


def _hf_config(family: str, vocab_size: int, tokenizer: Any) -> Any:
    """A tiny `transformers` config exercising the family's distinctive features."""
    import transformers as tf

    ids: dict[str, Any] = {}
    if tokenizer is not None:
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    if family not in FIXTURES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    common = dict(vocab_size=vocab_size, max_position_embeddings=128, **ids)
    return FIXTURES[family](tf, common, ids)


def make_tiny_hf_model(
    family: str,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    vocab_size: int = MODEL_VOCAB,
    seed: int = 0,
    weight_std: float = 0.2,
    torch_dtype: Any = None,
    hf_config: Any = None,
) -> Path:
    """Saves a seeded random tiny HF causal LM of `family` into `out_dir`.

    Families: gpt2 (tied, learned positions), gpt_neox (parallel residual,
    rotary_pct 0.25, untied), llama (GQA, llama3 rope scaling, untied), mistral
    (GQA with one kv head, sliding window 6, untied), qwen2 (qkv bias, tied),
    qwen3 (q/k norm, head_dim 24 != 64/4, tied), gemma (sqrt(D) embedding
    scale, (1 + w) RMSNorm, one kv head, head_dim 32, tied); for gemma2,
    gemma3_text, phi3 and qwen2's window see `FIXTURES`; `hf_config` replaces the
    fixture's config (same random init). The tokenizer,
    if given, is saved alongside. Returns `Path(out_dir)`.
    """
    import torch
    import transformers as tf

    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size={vocab_size}")
    config = hf_config if hf_config is not None else _hf_config(family, vocab_size, tokenizer)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name or name.split(".")[-2].startswith("ln"):
                # Norm scales near 1, biases small but non-zero.
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(weight_std * noise)
    model.eval()
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_torch_model(hf_dir: str | os.PathLike) -> Any:
    """Loads a saved HF model in float32 eval mode with eager attention."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def torch_logits(model: Any, ids: Any, attention_mask: Any = None) -> Any:
    """float32 numpy logits [N, L, V] of a torch causal LM (positions from the mask)."""
    import numpy as np
    import torch

    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    kwargs: dict[str, Any] = {}
    if attention_mask is not None:
        am = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        kwargs["attention_mask"] = am
        # Positions count real tokens so left/right padding match unpadded rows.
        kwargs["position_ids"] = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids_t, **kwargs).logits.float().numpy()
