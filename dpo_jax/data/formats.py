"""Upstream preference formats -> `PreferenceExample` / `UnpairedExample`.

One small parser per format; `detect_format` picks one from a row's columns.
Each parser takes the row dict (and a tokenizer, for chat templates) and returns
a list of examples (most formats give one; StackExchange gives one per answer
pair). Problems raise `DataError` with a short `reason`; `parse_rows` attaches
the file and line.

Formats:
- `explicit`: {"prompt": str, "chosen": str, "rejected": str}
- `implicit`: {"chosen": str, "rejected": str}; the shared prefix is the prompt
- `conversational`: chosen/rejected (and optionally prompt) are lists of
  {"role", "content"} messages, rendered with the tokenizer's chat template; the
  prompt part gets the generation prompt. Without a prompt list, the common
  leading messages of chosen and rejected are the prompt.
- `ultrafeedback`: UltraFeedback binarized: "prompt" str, chosen/rejected full
  conversations (user turn + assistant turn).
- `hh`: Anthropic HH-RLHF raw transcripts {"chosen", "rejected"}; the prompt is
  everything up to and including the last "\\n\\nAssistant:" (as the official DPO
  code splits them).
- `shp`: Stanford SHP {"history" (or "post"), "human_ref_A", "human_ref_B",
  "labels"}, rendered as the DPO code does ("\\n\\nHuman: ...\\n\\nAssistant:").
- `stack_exchange`: {"question", "answers": [{"text", "pm_score"}, ...]}, every
  answer pair ordered by score as in the DPO code; HTML stripped.
- `tldr`: OpenAI summarize-from-feedback comparisons {"info": {"post", "title",
  "subreddit"}, "summaries": [{"text"}, {"text"}], "choice"}.
- `unpaired`: {"prompt", "completion", "label"} rows for KTO-style losses
  (completion may also be a message list with a message-list prompt).

Prompt-only rows (TRL's prompt-only type, `PromptExample`; `objective.name="ppo"`, whose
prompt pool also takes the prompts of the rows above and of prompt-completion rows):
- `prompt`: {"prompt": str} or {"prompt": [messages]} (rendered with the chat template
  and its generation prompt); other columns are ignored.

SFT formats (TRL's SFT dataset types, `SFTExample`; `objective.name="sft"`):
- `sft_text`: {"text": str}, language modelling (every token after the first is a target);
- `sft_completion`: {"prompt", "completion"} (strings, or message lists), prompt-completion:
  only the completion is a target;
- `sft_messages`: {"messages": [...]}, a conversation rendered with the chat template,
  language modelling on all of it (TRL's default `assistant_only_loss=False`).
- `tldr_sft`: the TL;DR SFT split (summarize-from-feedback `tldr_3_filtered`):
  {"id", "subreddit", "title", "post", "summary"}; the post's TL;DR prompt, and its
  human-written summary as the completion.
"""

from __future__ import annotations

import dataclasses
import html.parser
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dpo_jax.data.errors import DataError, RejectLog
from dpo_jax.data.sources import Row
from dpo_jax.errors import UserError

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
REF_CHOSEN_COLUMN = "ref_chosen_logps"
REF_REJECTED_COLUMN = "ref_rejected_logps"
REF_UNPAIRED_COLUMN = "ref_logps"
MARGIN_COLUMN = "margin"  # TRL RewardTrainer: r_chosen - r_rejected must exceed it


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) completion.

    `chat` is True when the text was rendered by a chat template (it already
    holds the special tokens, so tokenization adds none).
    """

    prompt: str
    chosen: str
    rejected: str
    chat: bool = False
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None
    # TRL RewardTrainer's optional `margin` column (reward model objective only)
    margin: float | None = None
    # Where the row came from, so later stages (tokenization) can name it.
    source: str = field(default="", compare=False)
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class UnpairedExample:
    """A prompt with one completion labelled desirable (True) or undesirable (False)."""

    prompt: str
    completion: str
    label: bool
    chat: bool = False
    ref_logp: float | None = None
    source: str = field(default="", compare=False)
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SFTExample:
    """A supervised sequence: `prompt` (context, may be empty) and `completion` (targets)."""

    prompt: str
    completion: str
    chat: bool = False
    source: str = field(default="", compare=False)
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PromptExample:
    """A prompt alone (PPO continues it); `chat`: rendered by the chat template."""

    prompt: str
    chat: bool = False
    source: str = field(default="", compare=False)
    line: int | None = field(default=None, compare=False)


Example = PreferenceExample | UnpairedExample | SFTExample | PromptExample
Parser = Callable[[Mapping[str, Any], Any], list[Example]]


# ----------------------------------------------------------------------------- field checks


def _field(row: Mapping[str, Any], key: str) -> Any:
    if key in row and row[key] is None:
        raise DataError(f"field {key!r} is null; give it a value", reason="null_field")
    if key not in row:
        raise DataError(
            f"missing field {key!r} (row has fields {sorted(row)})", reason="missing_field"
        )
    return row[key]


def _text(row: Mapping[str, Any], key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str):
        raise DataError(
            f"field {key!r} must be a string, got {type(value).__name__}", reason="not_a_string"
        )
    return value


def _check_completions(chosen: str, rejected: str) -> None:
    """Empty or identical completions carry no preference signal: reject them."""
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"empty {name} completion", reason="empty_completion")
    if chosen == rejected:
        raise DataError("chosen and rejected completions are identical", reason="identical")


def _ref(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(
            f"field {key!r} must be a number, got {type(value).__name__}", reason="not_a_number"
        )
    if not math.isfinite(value):
        raise DataError(
            f"field {key!r} is {value}; reference log-probs must be finite "
            "(recompute them with `dpo-jax ref-logps`)",
            reason="not_finite",
        )
    return float(value)


def _number(row: Mapping[str, Any], key: str) -> float | None:
    """An optional finite number column (None when absent or null)."""
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(
            f"field {key!r} must be a finite number, got {value!r}", reason="not_a_number"
        )
    return float(value)


def _pair(row: Mapping[str, Any], prompt: str, chosen: str, rejected: str, chat: bool = False):
    _check_completions(chosen, rejected)
    return PreferenceExample(
        prompt,
        chosen,
        rejected,
        chat,
        _ref(row, REF_CHOSEN_COLUMN),
        _ref(row, REF_REJECTED_COLUMN),
        _number(row, MARGIN_COLUMN),
    )


# ----------------------------------------------------------------------------- plain text


def parse_explicit(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """{"prompt", "chosen", "rejected"} strings."""
    return [_pair(row, _text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected"))]


def split_common_prefix(a: str, b: str) -> int:
    """Length of the shared prefix of `a` and `b`, moved back before a space at the split.

    Keeping the space with the completions matches how BPE tokenizers attach a
    leading space to the next word (and TRL's implicit-prompt extraction).
    """
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    if n > 0 and a[n - 1] == " ":
        n -= 1
    return n


def parse_implicit(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """{"chosen", "rejected"} strings whose shared prefix is the prompt."""
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen == rejected:
        raise DataError("chosen and rejected completions are identical", reason="identical")
    n = split_common_prefix(chosen, rejected)
    return [_pair(row, chosen[:n], chosen[n:], rejected[n:])]


def parse_hh(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """Anthropic HH-RLHF transcripts, split after the last "\\n\\nAssistant:" of chosen."""
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    idx = chosen.rfind(HH_ASSISTANT)
    if idx < 0:
        raise DataError(
            f"HH transcript has no {HH_ASSISTANT!r} turn in 'chosen'", reason="bad_transcript"
        )
    prompt = chosen[: idx + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise DataError(
            "HH 'rejected' transcript does not start with the prompt of 'chosen'",
            reason="bad_transcript",
        )
    return [_pair(row, prompt, chosen[len(prompt) :], rejected[len(prompt) :])]


def hh_prompt(question: str) -> str:
    """The DPO code's single-turn Human/Assistant wrapper."""
    return f"{HH_HUMAN} {question}{HH_ASSISTANT}"


def parse_shp(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """Stanford SHP: labels == 1 means human_ref_A is preferred."""
    post = _text(row, "history") if "history" in row else _text(row, "post")
    a, b = _text(row, "human_ref_A"), _text(row, "human_ref_B")
    label = _field(row, "labels")
    if label not in (0, 1) or isinstance(label, float) and not label.is_integer():
        raise DataError(f"field 'labels' must be 0 or 1, got {label!r}", reason="bad_label")
    chosen, rejected = (a, b) if int(label) == 1 else (b, a)
    return [_pair(row, hh_prompt(post), " " + chosen, " " + rejected)]


class _HtmlText(html.parser.HTMLParser):
    """HTML -> text: block elements become paragraphs, code blocks kept verbatim."""

    BLOCKS = frozenset(
        {"p", "pre", "li", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "div", "br"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.current: list[str] = []

    def _flush(self) -> None:
        text = "".join(self.current).strip()
        if text:
            self.paragraphs.append(text)
        self.current = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        self.current.append(data)


def strip_html(text: str) -> str:
    """Plain text of an HTML fragment, paragraphs separated by blank lines."""
    parser = _HtmlText()
    parser.feed(text)
    parser.close()
    parser._flush()
    return "\n\n".join(parser.paragraphs)


def parse_stack_exchange(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """StackExchange preferences: every answer pair (i < j), higher pm_score chosen.

    As in the DPO code, pair (i, j) is ordered (i, j) if score_i > score_j else
    (j, i); pairs whose answers are identical after HTML stripping are dropped
    only if every pair is, which is reported as a bad row.
    """
    question = strip_html(_text(row, "question"))
    answers = _field(row, "answers")
    if not isinstance(answers, list) or len(answers) < 2:
        raise DataError(
            "field 'answers' must be a list of at least 2 answers", reason="bad_answers"
        )
    texts, scores = [], []
    for k, ans in enumerate(answers):
        if not isinstance(ans, Mapping):
            raise DataError(f"answers[{k}] must be an object", reason="bad_answers")
        texts.append(" " + strip_html(_text(ans, "text")))
        score = _field(ans, "pm_score")
        if not isinstance(score, int | float) or isinstance(score, bool):
            raise DataError(f"answers[{k}].pm_score must be a number", reason="bad_answers")
        scores.append(score)
    prompt = hh_prompt(question)
    out: list[Example] = []
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            c, r = (i, j) if scores[i] > scores[j] else (j, i)
            if texts[c] != texts[r] and texts[c].strip() and texts[r].strip():
                out.append(PreferenceExample(prompt, texts[c], texts[r]))
    if not out:
        raise DataError("no answer pair with two distinct non-empty answers", reason="identical")
    return out


def tldr_prompt(info: Mapping[str, Any]) -> str:
    """The standard TL;DR prompt (as in the DPO/TRL summarization setups)."""
    post = info.get("post")
    if post is None and isinstance(info.get("article"), str):
        return f"ARTICLE: {info['article']}\n\nTL;DR:"
    subreddit = info.get("subreddit")
    title = info.get("title")
    if not isinstance(post, str):
        raise DataError("field 'info.post' must be a string", reason="not_a_string")
    head = ""
    if isinstance(subreddit, str):
        head += f"SUBREDDIT: r/{subreddit}\n\n"
    if isinstance(title, str):
        head += f"TITLE: {title}\n\n"
    return f"{head}POST: {post}\n\nTL;DR:"


def parse_tldr(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """OpenAI TL;DR comparisons: summaries[choice] is chosen, the other rejected."""
    info = _field(row, "info")
    if not isinstance(info, Mapping):
        raise DataError("field 'info' must be an object", reason="not_an_object")
    summaries = _field(row, "summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise DataError("field 'summaries' must be a list of 2 summaries", reason="bad_summaries")
    choice = _field(row, "choice")
    if choice not in (0, 1) or isinstance(choice, bool):
        raise DataError(f"field 'choice' must be 0 or 1, got {choice!r}", reason="bad_label")
    texts = []
    for k, s in enumerate(summaries):
        if not isinstance(s, Mapping):
            raise DataError(f"summaries[{k}] must be an object", reason="bad_summaries")
        texts.append(" " + _text(s, "text").strip())
    return [_pair(row, tldr_prompt(info), texts[choice], texts[1 - choice])]


def parse_tldr_sft(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """TL;DR SFT rows: the post's prompt and its human-written `summary` (a demonstration)."""
    summary = " " + _text(row, "summary").strip()
    if not summary.strip():
        raise DataError("empty summary", reason="empty_completion")
    return [SFTExample(tldr_prompt(row), summary)]


# ----------------------------------------------------------------------------- chat


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(
            f"field {key!r} must be a non-empty list of messages", reason="bad_messages"
        )
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise DataError(
                f"{key}[{k}] must be a {{role, content}} message", reason="bad_messages"
            )
        if not isinstance(m.get("content"), str):
            raise DataError(
                f"{key}[{k}].content must be a string, got {type(m.get('content')).__name__}",
                reason="not_a_string",
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def chat_prompt(tokenizer: Any, prompt_msgs: list[dict[str, str]]) -> str:
    """The prompt messages under the chat template, with its generation prompt."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "conversational rows need a tokenizer with a chat_template", reason="no_chat_template"
        )
    return tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)


def render_chat(
    tokenizer: Any, prompt_msgs: list[dict[str, str]], completion_msgs: list[dict[str, str]]
) -> tuple[str, str]:
    """(prompt text with generation prompt, completion text) under the chat template."""
    prompt = chat_prompt(tokenizer, prompt_msgs)
    full = tokenizer.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(
            "chat template: the rendered conversation does not start with the rendered prompt",
            reason="template_mismatch",
        )
    return prompt, full[len(prompt) :]


def common_prefix_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Number of leading items `a` and `b` share (messages here, token ids in tokenize)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def parse_conversational(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """Message lists; explicit prompt list, or the common leading messages as prompt."""
    chosen = _messages(_field(row, "chosen"), "chosen")
    rejected = _messages(_field(row, "rejected"), "rejected")
    if isinstance(row.get("prompt"), list):
        prompt = _messages(row["prompt"], "prompt")
    else:
        n = common_prefix_length(chosen, rejected)
        if n == 0:
            raise DataError("chosen and rejected share no prompt messages", reason="no_prompt")
        if n == len(chosen) and n == len(rejected):
            raise DataError("chosen and rejected completions are identical", reason="identical")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not chosen or not rejected:
        raise DataError("empty chosen or rejected completion", reason="empty_completion")
    p, c = render_chat(tokenizer, prompt, chosen)
    p2, r = render_chat(tokenizer, prompt, rejected)
    if p != p2:  # a template that renders the same messages differently is unusable
        raise DataError(
            "chat template renders the prompt inconsistently", reason="template_mismatch"
        )
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not "".join(m["content"] for m in msgs).strip():
            raise DataError(f"empty {name} completion", reason="empty_completion")
    if chosen == rejected:
        raise DataError("chosen and rejected completions are identical", reason="identical")
    return [
        PreferenceExample(
            p, c, r, True, _ref(row, REF_CHOSEN_COLUMN), _ref(row, REF_REJECTED_COLUMN)
        )
    ]


def parse_ultrafeedback(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """UltraFeedback binarized: 'prompt' string plus full chosen/rejected conversations."""
    prompt = _text(row, "prompt")
    chosen = _messages(_field(row, "chosen"), "chosen")
    if chosen[0]["role"] == "user" and chosen[0]["content"] != prompt:
        raise DataError(
            "UltraFeedback 'prompt' differs from the first user message of 'chosen'",
            reason="bad_messages",
        )
    return parse_conversational({k: v for k, v in row.items() if k != "prompt"}, tokenizer)


# ----------------------------------------------------------------------------- unpaired


def parse_unpaired(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """{"prompt", "completion", "label"} with label a boolean (or 0/1)."""
    label = _field(row, "label")
    if label not in (0, 1) or isinstance(label, float) and not label.is_integer():
        raise DataError(f"field 'label' must be a boolean, got {label!r}", reason="bad_label")
    chat = isinstance(row.get("completion"), list)
    if chat:
        prompt_msgs = _messages(_field(row, "prompt"), "prompt")
        comp_msgs = _messages(_field(row, "completion"), "completion")
        if not "".join(m["content"] for m in comp_msgs).strip():
            raise DataError("empty completion", reason="empty_completion")
        prompt, completion = render_chat(tokenizer, prompt_msgs, comp_msgs)
    else:
        prompt, completion = _text(row, "prompt"), _text(row, "completion")
        if not completion.strip():
            raise DataError("empty completion", reason="empty_completion")
    return [UnpairedExample(prompt, completion, bool(label), chat, _ref(row, REF_UNPAIRED_COLUMN))]


def parse_sft_text(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """{"text": str}: language modelling on the whole text."""
    text = _text(row, "text")
    if not text.strip():
        raise DataError("empty text", reason="empty_completion")
    return [SFTExample("", text)]


def parse_sft_completion(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """{"prompt", "completion"} (strings or message lists): targets are the completion."""
    if isinstance(row.get("completion"), list):
        prompt_msgs = _messages(_field(row, "prompt"), "prompt")
        comp_msgs = _messages(_field(row, "completion"), "completion")
        if not "".join(m["content"] for m in comp_msgs).strip():
            raise DataError("empty completion", reason="empty_completion")
        prompt, completion = render_chat(tokenizer, prompt_msgs, comp_msgs)
        return [SFTExample(prompt, completion, True)]
    prompt, completion = _text(row, "prompt"), _text(row, "completion")
    if not completion.strip():
        raise DataError("empty completion", reason="empty_completion")
    return [SFTExample(prompt, completion)]


def parse_sft_messages(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """{"messages": [...]}: the rendered conversation, every token a target."""
    msgs = _messages(_field(row, "messages"), "messages")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "conversational rows need a tokenizer with a chat_template", reason="no_chat_template"
        )
    return [SFTExample("", tokenizer.apply_chat_template(msgs, tokenize=False), True)]


def parse_prompt(row: Mapping[str, Any], tokenizer: Any = None) -> list[Example]:
    """{"prompt": str | [messages]}: a prompt to continue (messages: the rendered
    conversation with the generation prompt)."""
    value = _field(row, "prompt")
    if isinstance(value, list):
        return [PromptExample(chat_prompt(tokenizer, _messages(value, "prompt")), True)]
    prompt = _text(row, "prompt")
    if not prompt.strip():
        raise DataError("empty prompt", reason="empty_prompt")
    return [PromptExample(prompt)]


def paired_to_unpaired(examples: Iterable[PreferenceExample]) -> list[UnpairedExample]:
    """Each pair -> (prompt, chosen, desirable) then (prompt, rejected, undesirable).

    Reference log-probs, when present, follow their completion.
    """
    out: list[UnpairedExample] = []
    for ex in examples:
        if not isinstance(ex, PreferenceExample):
            raise TypeError(
                f"paired_to_unpaired expects PreferenceExample, got {type(ex).__name__}"
            )
        for completion, label, ref in (
            (ex.chosen, True, ex.ref_chosen_logp),
            (ex.rejected, False, ex.ref_rejected_logp),
        ):
            out.append(
                UnpairedExample(ex.prompt, completion, label, ex.chat, ref, ex.source, ex.line)
            )
    return out


# ----------------------------------------------------------------------------- registry

PARSERS: dict[str, Parser] = {
    "explicit": parse_explicit,
    "implicit": parse_implicit,
    "conversational": parse_conversational,
    "ultrafeedback": parse_ultrafeedback,
    "hh": parse_hh,
    "shp": parse_shp,
    "stack_exchange": parse_stack_exchange,
    "tldr": parse_tldr,
    "tldr_sft": parse_tldr_sft,
    "unpaired": parse_unpaired,
    "sft_text": parse_sft_text,
    "sft_completion": parse_sft_completion,
    "sft_messages": parse_sft_messages,
    "prompt": parse_prompt,
}
SFT_FORMATS = ("sft_text", "sft_completion", "sft_messages", "tldr_sft")


def detect_format(row: Mapping[str, Any]) -> str:
    """Name of the parser for a row, from its columns (and the types of its values)."""
    keys = set(row)
    if {"completion", "label"} <= keys:
        return "unpaired"
    if {"info", "summaries", "choice"} <= keys:
        return "tldr"
    if {"post", "summary"} <= keys:
        return "tldr_sft"
    if {"human_ref_A", "human_ref_B"} <= keys:
        return "shp"
    if {"question", "answers"} <= keys:
        return "stack_exchange"
    if {"chosen", "rejected"} <= keys:
        if isinstance(row["chosen"], list):
            return "ultrafeedback" if isinstance(row.get("prompt"), str) else "conversational"
        if "prompt" in keys:
            return "explicit"
        chosen = row["chosen"]
        if (
            isinstance(chosen, str)
            and chosen.lstrip("\n").startswith("Human:")
            and HH_ASSISTANT in chosen
        ):
            return "hh"
        return "implicit"
    # SFT rows last: preference rows may carry these columns too (UltraFeedback's messages)
    if not {"chosen", "rejected"} & keys:
        if "text" in keys:
            return "sft_text"
        if "messages" in keys:
            return "sft_messages"
        if {"prompt", "completion"} <= keys:
            return "sft_completion"
        if "prompt" in keys and "completion" not in keys:
            return "prompt"
    raise DataError(
        f"cannot detect the data format from fields {sorted(keys)}; set format= one of {sorted(PARSERS)}",
        reason="unknown_format",
    )


def parse_row(row: Row, fmt: str = "auto", tokenizer: Any = None) -> list[Example]:
    """Parse one located row; errors carry the row's file and line."""
    try:
        name = detect_format(row.data) if fmt == "auto" else fmt
        if name not in PARSERS:
            raise UserError(f"unknown data format {name!r}; known: {sorted(PARSERS)}")
        examples = PARSERS[name](row.data, tokenizer)
    except DataError as e:
        raise e.located(row.source, row.line) from None
    return [dataclasses.replace(ex, source=row.source, line=row.line) for ex in examples]


def parse_rows(
    rows: Iterable[Row], fmt: str = "auto", tokenizer: Any = None, rejects: RejectLog | None = None
) -> list[Example]:
    """Parse every row; bad rows go to `rejects` (which raises unless skipping).

    With `fmt="auto"` the format is detected once per source, from its first
    row that detection accepts, so a later row missing a field is reported as
    such rather than as an unknown format.
    """
    rejects = rejects or RejectLog()
    detected: dict[str, str] = {}
    out: list[Example] = []
    for row in rows:
        try:
            name = fmt
            if fmt == "auto":
                if row.source not in detected:
                    try:
                        detected[row.source] = detect_format(row.data)
                    except DataError as e:
                        raise e.located(row.source, row.line) from None
                name = detected[row.source]
            out.extend(parse_row(row, name, tokenizer))
        except DataError as e:
            rejects.handle(e, row.data)
    kinds = {type(ex) for ex in out}
    if len(kinds) > 1:
        raise UserError(
            "the data mixes kinds of rows (paired, unpaired, SFT); use one kind per dataset"
        )
    return out
