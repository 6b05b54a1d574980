"""Shared helpers for the data tests: tiny locally trained tokenizers (no downloads)."""

from __future__ import annotations

import functools
import tempfile

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The sky is blue and the grass is green.",
    "Human: What is two plus two? Assistant: Four, of course.",
    "Hello there, how are you doing today? I am fine, thank you.",
    "Summarize the post in one sentence: my cat ate my homework again.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def add(a, b): return a + b  # a tiny function",
] * 4


@functools.lru_cache(maxsize=2)
def tiny_tokenizer(chat: bool = False):
    """A byte-level BPE tokenizer (vocab ~300) trained here; ChatML template if `chat`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chat else "<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if chat:
        fast.chat_template = CHATML
    # Round-trip through disk so the tests use what AutoTokenizer really loads.
    d = tempfile.mkdtemp(prefix="dpo_jax_tok_")
    fast.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)
