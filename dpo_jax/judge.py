"""An LLM judge for pairwise win rates, with the DPO paper's GPT-4 prompts (appendix C.2).

The DPO paper (Rafailov et al. 2023, §6.2 and appendix C.2) measures TL;DR and HH win
rates with GPT-4: the judge sees the post (or the user's query) and two answers in a
random order, writes a one-sentence comparison, then ``Preferred: A`` / ``B``
(summaries) or ``More helpful: A`` / ``B`` (dialogue). This module is that protocol
for any judge model:

- :data:`TEMPLATES` hold the paper's three prompts: ``summarization`` (the paper's
  "(C)" concise prompt, the one behind its main TL;DR results), ``summarization_simple``
  (its "(S)" prompt) and ``dialogue``. The wording is the paper's appendix C.2 as
  reproduced in the public copies of the paper found here (the HackerNoon reprint of
  the appendix and reimplementations that quote it); the paper's layout breaks lines
  with ``\\`` inside sentences, written here as one line.
- The order of the two answers is drawn per comparison from a seeded hash of
  ``(seed, prompt, a, b)``: reproducible, independent of batching and of the order in
  which comparisons are asked (so a resumed experiment judges exactly as an
  uninterrupted one), and recorded in :class:`Comparison.a_first`.
- The verdict is parsed from the reply (:func:`parse_verdict`); a reply without one is
  *unparseable*: its score is NaN, which ``evaluation.win_rate`` leaves out of the
  rate and counts in ``WinRate.undecided`` (so the reported win rate is over the
  comparisons the judge decided, and the count of the others is reported beside it;
  they are never silently ties or losses).

The judge model is either a local Hugging Face causal LM run through ``dpo_jax``
sampling (:func:`hf_completer`: greedy, fixed-shape chunks, one compile per prompt
bucket) or any Python callable ``(prompt_text) -> reply_text`` (an API judge such as
GPT-4: :func:`callable_completer`).

    judge = LLMJudge(hf_completer("checkpoints/judge"), TEMPLATES["summarization"])
    wr = evaluation.win_rate(policy, references, judge=judge, prompts=posts, swap=False)
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence

import numpy as np

from dpo_jax.errors import UserError

# Completer: judge prompts in, replies out (same length, same order).
Completer = Callable[[Sequence[str]], list[str]]

_INSTRUCTION_SUMMARY = (
    "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer "
    'and why. SECOND, on a new line, state only "A" or "B" to indicate your choice. Your '
    "response should use the format:\n"
    "Comparison: <one-sentence comparison and explanation>\n"
    'Preferred: <"A" or "B">'
)


@dataclasses.dataclass(frozen=True)
class Template:
    """A judge prompt: ``text`` has ``{query}``, ``{a}`` and ``{b}``; the verdict line is
    ``verdict_key: A`` or ``verdict_key: B``; ``query`` turns the experiment's prompt
    into what the template shows (the post alone, the user's query)."""

    name: str
    text: str
    verdict_key: str
    query: Callable[[str], str]

    def render(self, prompt: str, a: str, b: str) -> str:
        """The judge prompt with answer ``a`` shown as A and ``b`` as B."""
        return self.text.format(query=self.query(prompt), a=a.strip(), b=b.strip())


def tldr_post(prompt: str) -> str:
    """The post body of a TL;DR prompt (``... POST: <post>\\n\\nTL;DR:``), as the paper's
    template shows it; other prompts are returned stripped."""
    match = re.search(r"POST:(.*?)(?:\n\s*TL;DR:\s*)?$", prompt, flags=re.S)
    return (match.group(1) if match else prompt).strip()


def dialogue_query(prompt: str) -> str:
    """The user's query of an HH prompt: the single human turn of a one-turn dialogue,
    the whole transcript (without the final ``Assistant:`` cue) of a longer one."""
    text = re.sub(r"\s*Assistant:\s*$", "", prompt).strip()
    if text.count("Human:") == 1 and "Assistant:" not in text:
        text = text.split("Human:", 1)[1].strip()
    return text


TEMPLATES: dict[str, Template] = {
    "summarization": Template(
        "summarization",
        "Which of the following summaries does a better job of summarizing the most important "
        "points in the given forum post, without including unimportant or irrelevant details? "
        "A good summary is both precise and concise.\n\n"
        "Post:\n{query}\n\nSummary A:\n{a}\n\nSummary B:\n{b}\n\n" + _INSTRUCTION_SUMMARY,
        "Preferred",
        tldr_post,
    ),
    "summarization_simple": Template(
        "summarization_simple",
        "Which of the following summaries does a better job of summarizing the most important "
        "points in the given forum post?\n\n"
        "Post:\n{query}\n\nSummary A:\n{a}\n\nSummary B:\n{b}\n\n" + _INSTRUCTION_SUMMARY,
        "Preferred",
        tldr_post,
    ),
    "dialogue": Template(
        "dialogue",
        "For the following query to a chatbot, which response is more helpful?\n\n"
        "Query: {query}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
        "FIRST provide a one-sentence comparison of the two responses and explain which you "
        'feel is more helpful. SECOND, on a new line, state only "A" or "B" to indicate which '
        "response is more helpful. Your response should use the format:\n"
        "Comparison: <one-sentence comparison and explanation>\n"
        'More helpful: <"A" or "B">',
        "More helpful",
        dialogue_query,
    ),
}


def parse_verdict(reply: str, verdict_key: str) -> str | None:
    """``"A"`` or ``"B"`` from the last ``verdict_key: X`` line of a reply, else None.

    Tolerates case, quotes, angle brackets and markdown emphasis around the letter
    (``Preferred: "A"``, ``**More helpful:** B``); anything else (no verdict line, a
    letter other than A/B, ``A or B``) is unparseable.
    """
    key = re.escape(verdict_key)
    pattern = rf"^[\s*_#>-]*{key}[\s*_]*:[\s*_\"'<`]*([AB])[\s*_\"'>`.]*$"
    found = re.findall(pattern, reply, flags=re.I | re.M)
    return found[-1].upper() if found else None


def presentation_order(seed: int, prompt: str, a: str, b: str) -> bool:
    """True when answer ``a`` is shown first (as A): a fair coin from a hash of the
    comparison and the seed, so the same comparison always gets the same order."""
    digest = hashlib.sha256(repr((int(seed), prompt, a, b)).encode()).digest()
    return bool(digest[0] & 1)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One judged comparison: which answer was shown first, the reply, the verdict."""

    prompt: str
    a: str
    b: str
    a_first: bool  # a was shown as "A"
    reply: str
    choice: str | None  # "A", "B" or None (unparseable)

    @property
    def score(self) -> float:
        """P(a better): 1 if the judge chose a, 0 if b, NaN if unparseable."""
        if self.choice is None:
            return float("nan")
        return 1.0 if (self.choice == "A") == self.a_first else 0.0


class LLMJudge:
    """A pairwise judge ``(prompts, a, b) -> P(a better)`` for ``evaluation.win_rate``.

    Every comparison is recorded in :attr:`records` (order shown, reply, verdict);
    :attr:`unparseable` counts replies without a verdict. The judge randomises the
    order itself, so call ``win_rate(..., swap=False)`` as the paper does (one
    judgement per comparison); ``swap=True`` also works and asks both orders.
    """

    def __init__(self, complete: Completer, template: Template | str, seed: int = 0) -> None:
        if isinstance(template, str):
            if template not in TEMPLATES:
                raise UserError(f"judge template {template!r}: expected one of {sorted(TEMPLATES)}")
            template = TEMPLATES[template]
        self.complete, self.template, self.seed = complete, template, int(seed)
        self.records: list[Comparison] = []

    @property
    def unparseable(self) -> int:
        """Replies so far with no parseable verdict."""
        return sum(r.choice is None for r in self.records)

    def compare(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
    ) -> list[Comparison]:
        """Judge each ``(prompt, a, b)``; returns (and records) the comparisons."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"LLMJudge: {len(prompts)} prompts, {len(a)} a, {len(b)} b")
        first = [
            presentation_order(self.seed, p, x, y) for p, x, y in zip(prompts, a, b, strict=True)
        ]
        queries = [
            self.template.render(p, x, y) if f else self.template.render(p, y, x)
            for p, x, y, f in zip(prompts, a, b, first, strict=True)
        ]
        replies = list(self.complete(queries))
        if len(replies) != len(queries):
            raise ValueError(f"LLMJudge: {len(replies)} replies for {len(queries)} prompts")
        out = [
            Comparison(p, x, y, f, r, parse_verdict(r, self.template.verdict_key))
            for p, x, y, f, r in zip(prompts, a, b, first, replies, strict=True)
        ]
        self.records += out
        return out

    def __call__(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        return np.array([c.score for c in self.compare(prompts, a, b)], np.float64)


def callable_completer(fn: Callable[[str], str]) -> Completer:
    """A completer from a one-prompt function (an API client: GPT-4, Claude, ...)."""

    def complete(queries: Sequence[str]) -> list[str]:
        replies = [fn(q) for q in queries]
        bad = [type(r).__name__ for r in replies if not isinstance(r, str)]
        if bad:
            raise UserError(f"judge callable returned {bad[0]}, expected the reply text (str)")
        return replies

    return complete


def hf_completer(
    model_dir: str,
    *,
    max_new_tokens: int = 64,
    rows: int = 8,
    dtype: str = "float32",
) -> Completer:
    """A completer running a local Hugging Face causal LM (or a dpo_jax checkpoint)
    through ``dpo_jax.sampling.generate``: greedy, ``rows`` prompts per call (the last
    chunk padded by repetition, so each prompt bucket compiles once). Judge prompts
    longer than the model's context keep their end (the answers and the instructions).
    """
    import jax

    from dpo_jax import sampling, saved_models  # lazy: jax; judge stays jax-free

    cfg, params, tokenizer = saved_models.load_model(model_dir, dtype=dtype)
    learned = getattr(cfg, "position_embedding", None) == "learned"  # a hard context limit
    limit = cfg.max_position_embeddings - max_new_tokens if learned else None
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = sampling.SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=0.0, max_prompt_length=limit,
        eos_token_ids=() if eos is None else (eos,), pad_token_id=pad or 0,
    )  # fmt: skip

    def complete(queries: Sequence[str]) -> list[str]:
        replies: list[str] = []
        for start in range(0, len(queries), rows):
            chunk = list(queries[start : start + rows])
            real = len(chunk)
            chunk += [chunk[-1]] * (rows - real)
            # Greedy decoding ignores the key; a fixed one keeps the call pure.
            out = sampling.generate_text(cfg, params, tokenizer, chunk, jax.random.key(0), config)
            replies += out.texts[:real]
        return replies

    return complete
