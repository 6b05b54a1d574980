"""One spec for the rewards and pairwise judges of every on-policy method.

PPO, GRPO, RLOO and online DPO score their rollouts with a *rollout reward*
(`RolloutReward`: the sampler's `SampleOutput` in, one float32 score per completion out),
built from a config string (`online.reward`) by `from_spec`:

    vader                    VADER sentiment of the decoded prompt + completion
    hf:DIR                   a Hugging Face sequence classifier on prompt + completion: the
                             logit of a one-label one (a reward model), else P(class 1)
    reward_model:DIR         `dpo-jax export` of a reward_model run (our forward, EOS appended
                             as in training): the sampled token ids
                             when it shares the policy's tokenizer, else the decoded text
    python:MODULE:FUNCTION   a TRL-style reward function (TRL `reward_funcs`):
                             FUNCTION(prompts=[str], completions=[str], completion_ids=[[int]],
                             **kwargs) -> one float (or None) per completion

Several rewards are joined with `,` (or given as a list) and summed with weights
(`online.reward_weights`, TRL `reward_weights`; default 1.0 each). As in TRL, a reward
may answer None ("does not apply") for a completion: None (and NaN) count as missing and
the weighted sum runs over the rewards that answered (`nansum`); a completion no reward
answered for scores 0, with a warning.

Online DPO labels its pairs with a *judge* (`Judge`: prompts and two completions each in,
P(the first preferred) out), built from `online.judge` by `judge_from_spec`:

    python:MODULE:FACTORY    FACTORY() (no arguments) returns the judge, a callable
                             (prompts, completions_a, completions_b) -> P(a preferred) [n]
    llm:hf:DIR               a local causal LM asked with a `dpo_jax.judge` template
    llm:python:MODULE:FN     FN(prompt_text) -> reply_text (an API judge) with a template

`check_spec` and `check_judge_spec` validate a spec before anything loads (config
validation); every problem is one `UserError` line naming the config key and the spec.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import logging
import math
import numbers
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dpo_jax import judge, models, reward_model, rewards, sampling
from dpo_jax.data import tokenize
from dpo_jax.errors import config_error

log = logging.getLogger(__name__)

# `reward(samples) -> [S]` float32 scores of a rollout's completions (host side).
RolloutReward = Callable[[sampling.SampleOutput], np.ndarray]
# `judge(prompts, completions_a, completions_b) -> [n]` P(a preferred), in [0, 1]; NaN for
# a pair the judge could not decide (an unparseable LLM reply).
Judge = Callable[[Sequence[str], Sequence[str], Sequence[str]], np.ndarray]

# A reward spec, or several (a list, or one string joined with ",").
Spec = str | Sequence[str]

SPECS = (
    "vader, hf:DIR (a sequence classifier), reward_model:DIR (`dpo-jax export` of a "
    "reward_model run) or python:MODULE:FUNCTION (fn(prompts=, completions=, **kwargs) -> "
    "floats), several joined with ','"
)
JUDGE_SPECS = (
    "python:MODULE:FACTORY (FACTORY() returns the judge), llm:hf:DIR (a local causal LM) "
    "or llm:python:MODULE:FUNCTION (FUNCTION(prompt_text) -> reply_text)"
)
# The judge prompt of LLM judges when none is given: the paper's HH "more helpful" prompt
# (appendix C.2), the one of `judge.TEMPLATES` that fits any query (the summarization
# ones ask about a forum post).
DEFAULT_JUDGE_TEMPLATE = "dialogue"


# ------------------------------------------------------------------ rollout rewards


def _prompt_ids(samples: sampling.SampleOutput, k: int) -> list[int]:
    n = int(samples.prompt_lengths[k])
    return samples.prompt_ids[k, samples.prompt_ids.shape[1] - n :].tolist()


def reward_from_texts(
    reward_fn: Callable[[Sequence[str]], np.ndarray], tokenizer: Any, with_prompt: bool = False
) -> RolloutReward:
    """A text reward (`rewards.RewardFn`: VADER, a classifier, a `LearnedReward`) on the
    decoded completions, or on prompt + completion decoded together with `with_prompt`
    (special tokens, the EOS among them, dropped)."""

    def reward(samples: sampling.SampleOutput) -> np.ndarray:
        comps = samples.completion_ids()
        if with_prompt:
            comps = [_prompt_ids(samples, k) + c for k, c in enumerate(comps)]
        texts = tokenizer.batch_decode(comps, skip_special_tokens=True)
        return np.asarray(reward_fn(texts), np.float32)

    return reward


def reward_from_ids(learned: Any) -> RolloutReward:
    """A learned reward model (`reward_model.LearnedReward`, the policy's tokenizer) on the
    token ids of prompt + completion, the EOS kept when one was emitted: the sequences
    of sampled pairs it was trained on (its head reads the last token)."""

    def reward(samples: sampling.SampleOutput) -> np.ndarray:
        comps = samples.completion_ids(keep_eos=True)
        ids = [_prompt_ids(samples, k) + c for k, c in enumerate(comps)]
        return np.asarray(learned.score_ids(ids), np.float32)

    return reward


def _keywords(fn: Callable[..., Any]) -> set[str] | None:
    """The keyword arguments `fn` takes, or None when it takes any (`**kwargs`) or its
    signature cannot be read (a C callable): then it is given all of them."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds}


def _scores(out: Any, n: int, name: str, key: str) -> np.ndarray:
    """A user reward's answer as float64 [n], None -> NaN; else one-line `UserError`."""
    if hasattr(out, "tolist") and not isinstance(out, (str, bytes)):
        out = out.tolist()  # numpy / torch / jax arrays
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__iter__"):
        raise config_error(
            key, f"{name!r} returned {type(out).__name__}, not a sequence of scores",
            "return one float (or None) per completion",
        )  # fmt: skip
    out = list(out)
    if len(out) != n:
        raise config_error(
            key, f"{name!r} returned {len(out)} scores for {n} completions",
            "return one float (or None) per completion",
        )  # fmt: skip
    bad = [x for x in out if x is not None and not isinstance(x, numbers.Real)]
    if bad:
        raise config_error(
            key, f"{name!r} returned a score of type {type(bad[0]).__name__}",
            "return one float (or None) per completion",
        )  # fmt: skip
    return np.array([math.nan if x is None else float(x) for x in out], np.float64)


def python_reward(
    fn: Callable[..., Any],
    tokenizer: Any,
    *,
    name: str = "python reward",
    key: str = "online.reward",
) -> RolloutReward:
    """A TRL-style reward function as a rollout reward.

    `fn(prompts=, completions=, completion_ids=)` gets, per completion, its row's prompt
    and the completion decoded with special tokens skipped (TRL's standard, not
    conversational, format) and the completion's token ids with the EOS kept when one was
    emitted (TRL's `completion_ids`). A function without `**kwargs` is given only the
    arguments it names. It returns one float or None per completion (None -> NaN: "does
    not apply", see the module docstring); anything else is a `UserError` naming `name`.
    """
    accepts = _keywords(fn)

    def reward(samples: sampling.SampleOutput) -> np.ndarray:
        rows = len(samples.lengths)
        # Rows continuing one prompt share its text: decode each distinct prompt once.
        prompt_ids = [tuple(_prompt_ids(samples, k)) for k in range(rows)]
        distinct = list(dict.fromkeys(prompt_ids))
        decoded = tokenizer.batch_decode([list(p) for p in distinct], skip_special_tokens=True)
        texts = dict(zip(distinct, decoded, strict=True))
        args = {
            "prompts": [texts[p] for p in prompt_ids],
            "completions": tokenizer.batch_decode(
                samples.completion_ids(), skip_special_tokens=True
            ),
            "completion_ids": samples.completion_ids(keep_eos=True),
        }
        if accepts is not None:
            args = {k: v for k, v in args.items() if k in accepts}
        return _scores(fn(**args), rows, name, key).astype(np.float32)

    return reward


@dataclasses.dataclass
class WeightedReward:
    """The weighted sum of several rollout rewards (TRL `reward_funcs` + `reward_weights`).

    NaN scores (a python reward's None) are left out of each completion's sum, as TRL's
    `nansum`; a completion with no score at all gets 0 and a warning. `last_KxS` holds the
    latest call's unweighted scores, one row per reward (in `names` order), for metrics.
    """

    names: list[str]
    rewards: list[RolloutReward]
    weights: np.ndarray  # [K] float64
    key: str = "online.reward"
    last_KxS: np.ndarray | None = None

    def __call__(self, samples: sampling.SampleOutput) -> np.ndarray:
        rows = len(samples.lengths)
        scores_KxS = np.stack(
            [np.asarray(r(samples), np.float64).reshape(rows) for r in self.rewards]
        )
        self.last_KxS = scores_KxS.astype(np.float32)
        missing_S = np.isnan(scores_KxS).all(axis=0)
        if missing_S.any():
            log.warning(
                "%s: no reward of %s scored %d of %d completions (all None/NaN); they score 0",
                self.key, ",".join(self.names), int(missing_S.sum()), rows,
            )  # fmt: skip
        return np.nansum(scores_KxS * self.weights[:, None], axis=0).astype(np.float32)


# -------------------------------------------------------------------- parsing specs


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _entries(spec: Any, key: str) -> list[str]:
    """The specs of `spec` (a string joined with ",", or a list of them), stripped."""
    if spec is None or isinstance(spec, str):
        parts = [spec or ""]
    elif isinstance(spec, Sequence):
        parts = list(spec)
    else:
        raise config_error(key, f"{spec!r} is not a reward spec", f"use {SPECS}")
    bad = [p for p in parts if not isinstance(p, str)]
    if bad:
        raise config_error(key, f"{bad[0]!r} in {spec!r} is not a string", f"use {SPECS}")
    joined = ",".join(parts)
    if not joined.strip():
        raise config_error(key, "is empty", f"use {SPECS}")
    entries = [e.strip() for e in joined.split(",")]
    if not all(entries):
        raise config_error(key, f"{joined!r} has an empty entry", f"use {SPECS}")
    return entries


def _is_dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _module_function(target: str) -> tuple[str, str] | None:
    """(module, attribute path) of `MODULE:FUNCTION`, or None when malformed."""
    module, _, function = target.partition(":")
    return (module, function) if _is_dotted(module) and _is_dotted(function) else None


def parse(spec: Spec, key: str = "online.reward") -> list[tuple[str, str]]:
    """(kind, target) of each reward of `spec`: ("vader", ""), ("hf", DIR),
    ("reward_model", DIR) or ("python", "MODULE:FUNCTION"); syntax only."""
    entries = _entries(spec, key)
    out = []
    for entry in entries:
        kind, sep, target = entry.partition(":")
        ok = (
            (kind == "vader" and not sep)
            or (kind in ("hf", "reward_model") and bool(target))
            or (kind == "python" and _module_function(target) is not None)
        )
        if not ok:
            where = "" if len(entries) == 1 else f" (in {','.join(entries)!r})"
            hint = "use python:MODULE:FUNCTION" if kind == "python" else f"use {SPECS}"
            raise config_error(key, f"{entry!r}{where} is not a reward", hint)
        out.append((kind, target))
    return out


def weights_of(weights: Any, count: int, spec: Spec = "", key: str = "online.reward") -> np.ndarray:
    """The float64 [count] weights of `count` rewards: None, "" or () -> all 1.0; else one
    finite number per reward (a list or a string joined with ","). Errors name
    `<key>_weights` (`online.reward_weights`)."""
    wkey = f"{key}_weights"
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        return np.ones(count, np.float64)
    if isinstance(weights, Sequence) and not len(weights):
        return np.ones(count, np.float64)
    if isinstance(weights, str):
        items = weights.split(",")
    elif isinstance(weights, np.ndarray):
        items = weights.reshape(-1).tolist()
    elif isinstance(weights, Sequence):
        items = list(weights)
    else:
        items = [weights]  # one number for one reward
    values = []
    for w in items:
        try:
            values.append(float(w.strip() if isinstance(w, str) else w))
        except (TypeError, ValueError):
            raise config_error(
                wkey, f"{w!r} of {weights!r} is not a number", "give one float per reward"
            ) from None
    if len(values) != count:
        raise config_error(
            wkey, f"{len(values)} weights {values} for {count} rewards {spec!r}",
            "give one weight per reward, in the rewards' order",
        )  # fmt: skip
    if not all(math.isfinite(v) for v in values):
        raise config_error(wkey, f"{values} is not finite", "give finite weights")
    return np.asarray(values, np.float64)


# ------------------------------------------------------------ python objects by name


def _python_object(target: str, spec: str, key: str) -> Any:
    """MODULE:ATTR (ATTR may be dotted) imported, or a one-line `config_error`."""
    parsed = _module_function(target)
    if parsed is None:
        raise config_error(key, f"{spec!r} needs MODULE:FUNCTION", "use python:MODULE:FUNCTION")
    module_name, attr = parsed
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise config_error(
                key, f"{spec!r}: no module named {e.name!r}",
                "is its directory on PYTHONPATH (the console script does not add the current one)?",
            ) from None  # fmt: skip
        raise config_error(key, f"{spec!r}: importing {module_name!r} failed: {e}") from None
    except Exception as e:  # the user's module raised on import: say which and why
        raise config_error(
            key, f"{spec!r}: importing {module_name!r} failed: {type(e).__name__}: {_one_line(e)}"
        ) from None
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = ".".join([module_name, *attr.split(".")[:i]])
            raise config_error(key, f"{spec!r}: {where!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise config_error(
            key, f"{spec!r}: {attr!r} is not callable (it is of type {type(obj).__name__})"
        )
    return obj


def _python_reward_function(target: str, spec: str, key: str) -> Callable[..., Any]:
    fn = _python_object(target, spec, key)
    accepts = _keywords(fn)
    if accepts is not None and "completions" not in accepts:
        raise config_error(
            key, f"{spec!r} takes no argument `completions`",
            "define fn(prompts, completions, **kwargs) as TRL's reward functions",
        )  # fmt: skip
    return fn


# ------------------------------------------------------------------- checking specs


def _hf_config(target: str) -> dict[str, Any] | None:
    """config.json of a directory as a dict, or None when absent or unreadable."""
    try:
        hf_cfg = json.loads((pathlib.Path(target) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return hf_cfg if isinstance(hf_cfg, dict) else None


def _num_labels(target: str) -> int:
    """A classifier directory's label count (transformers' default: 2)."""
    return len((_hf_config(target) or {}).get("id2label") or {0: "", 1: ""})


def _check_dir(kind: str, target: str, key: str, where: str = "") -> None:
    """What an `hf:` / `reward_model:` spec points at, before anything loads: the
    directory exists; an `hf:` one is a sequence classifier, a `reward_model:` one is
    an export of a reward_model run. `where`: the whole spec, when it has several rewards."""
    if not os.path.isdir(target):
        problem = "is not a directory" if os.path.exists(target) else "does not exist"
        raise config_error(key, f"{target!r}{where} {problem}", f"use {SPECS}")
    if kind == "reward_model":
        problem = reward_model.not_a_reward_model(target)
        if problem is not None:
            raise config_error(
                key,
                f"{target!r}{where} {problem}",
                "export a reward_model run with `dpo-jax export`",
            )
    if kind == "hf":
        hf_cfg = _hf_config(target) or {}
        if not models.is_classifier(hf_cfg):
            head = os.path.isfile(os.path.join(target, reward_model.HEAD_FILE))
            raise config_error(
                key,
                f"{target!r}{where} is not a sequence classifier "
                f"(architectures {hf_cfg.get('architectures')})",
                f"use {'reward_model:DIR' if head else SPECS}",
            )


def check_spec(spec: Spec, key: str = "online.reward", weights: Any = None) -> None:
    """Validate a reward spec and its weights without loading a model: the syntax; the
    directory of `hf:` (a sequence classifier) and `reward_model:` (an exported head);
    `python:`'s module imports and its function is callable (this imports the module);
    `vader`'s package is installed; one finite weight per reward."""
    parsed = parse(spec, key)
    where = "" if len(parsed) == 1 else f" (in {','.join(_entries(spec, key))!r})"
    for kind, target in parsed:
        if kind in ("hf", "reward_model"):
            _check_dir(kind, target, key, where)
        elif kind == "python":
            _python_reward_function(target, f"python:{target}", key)
        elif importlib.util.find_spec("vaderSentiment") is None:
            raise config_error(key, "'vader' needs the package vaderSentiment", "pip install it")
    weights_of(weights, len(parsed), spec, key)


# ------------------------------------------------------------------ building rewards


def _text_scorer(kind: str, target: str) -> Any:
    """The text reward (`rewards.RewardFn`) of a `vader`, `hf:DIR` or `reward_model:DIR`
    entry. `hf:DIR`: a reward model (one label, e.g. `dpo-jax export` of a reward_model
    run or a TRL RewardTrainer's) gives its logit; a binary classifier P(class 1)."""
    if kind == "vader":
        return rewards.VaderReward()
    if kind == "hf":
        one = _num_labels(target) == 1
        return rewards.HFClassifierReward(
            target, label=0 if one else 1, score="logit" if one else "prob"
        )
    return reward_model.load_exported(target)


def _one_reward(kind: str, target: str, tokenizer: Any, key: str) -> RolloutReward:
    """One reward of a spec (`tokenizer`: the policy's).

    `vader` and `hf:DIR` (a one-label classifier's logit, the reward of a reward
    model; else the probability of class 1, the positive class of a binary classifier)
    score the decoded prompt + completion, as TRL's PPOTrainer scores query +
    response. `reward_model:DIR` scores the sampled token ids when its tokenizer is the
    policy's (`reward_from_ids`, the sequences it was trained on), else the decoded text.
    """
    if kind in ("vader", "hf"):
        return reward_from_texts(_text_scorer(kind, target), tokenizer, with_prompt=True)
    if kind == "python":
        spec = f"python:{target}"
        fn = _python_reward_function(target, spec, key)
        return python_reward(fn, tokenizer, name=spec, key=key)
    learned = reward_model.load_exported(target)
    if tokenize.tokenizer_fingerprint(learned.tokenizer) == tokenize.tokenizer_fingerprint(
        tokenizer
    ):
        return reward_from_ids(learned)
    log.info("%s: %s has another tokenizer than the policy: it scores decoded text", key, target)
    return reward_from_texts(learned, tokenizer, with_prompt=True)


def from_spec(
    spec: Spec, tokenizer: Any, *, weights: Any = None, key: str = "online.reward"
) -> WeightedReward:
    """The rollouts' reward of a spec (see the module docstring; `tokenizer`: the
    policy's): the weighted sum of its rewards (`weights`: see `weights_of`). Checks the
    spec first (`check_spec`), so a bad one fails before any model loads."""
    check_spec(spec, key, weights)
    parsed = parse(spec, key)
    names = [f"{kind}:{target}" if target else kind for kind, target in parsed]
    built = [_one_reward(kind, target, tokenizer, key) for kind, target in parsed]
    return WeightedReward(names, built, weights_of(weights, len(parsed), spec, key), key)


# ------------------------------------------------------------------ pairwise judges


def parse_judge(spec: str, key: str = "online.judge") -> tuple[str, str]:
    """(kind, target) of a judge spec: ("python", "MODULE:FACTORY"), ("llm:hf", DIR) or
    ("llm:python", "MODULE:FUNCTION"); syntax only."""
    if spec is not None and not isinstance(spec, str):
        raise config_error(key, f"{spec!r} is not a judge spec", f"use {JUDGE_SPECS}")
    if not spec or not spec.strip():
        raise config_error(key, "is empty", f"use {JUDGE_SPECS}")
    spec = spec.strip()
    head, _, rest = spec.partition(":")
    if head == "llm":
        sub, _, target = rest.partition(":")
        kind = f"llm:{sub}"
    else:
        kind, target = head, rest
    if kind in ("python", "llm:python") and _module_function(target) is None:
        raise config_error(key, f"{spec!r} needs MODULE:FUNCTION", f"use {JUDGE_SPECS}")
    if kind in ("python", "llm:python") or (kind == "llm:hf" and target):
        return kind, target
    raise config_error(key, f"{spec!r} is not a judge", f"use {JUDGE_SPECS}")


def _template(template: judge.Template | str | None, key: str) -> judge.Template:
    if template is None:
        template = DEFAULT_JUDGE_TEMPLATE
    if isinstance(template, judge.Template):
        return template
    if template not in judge.TEMPLATES:
        raise config_error(
            key, f"judge template {template!r} is not one of {sorted(judge.TEMPLATES)}",
            "name one of dpo_jax.judge.TEMPLATES or pass a judge.Template",
        )  # fmt: skip
    return judge.TEMPLATES[template]


def _judge_factory(target: str, spec: str, key: str) -> Callable[[], Any]:
    factory = _python_object(target, spec, key)
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise config_error(
            key, f"{spec!r}: {target.partition(':')[2]} needs arguments, but it is called with none",
            "python:MODULE:FACTORY names a factory: FACTORY() returns the judge "
            "(prompts, completions_a, completions_b) -> P(a preferred)",
        ) from None  # fmt: skip
    except ValueError:
        pass  # no readable signature (a C callable): it is called and may still work
    return factory


def check_judge_spec(
    spec: str, key: str = "online.judge", template: judge.Template | str | None = None
) -> None:
    """Validate a judge spec without loading a model: the syntax; `python:`'s module
    imports and its factory takes no arguments, `llm:python:`'s function is callable
    (both import the module); `llm:hf:`'s directory exists; the template is known."""
    kind, target = parse_judge(spec, key)
    spec = spec.strip()
    if kind == "python":
        _judge_factory(target, spec, key)
        return
    _template(template, key)
    if kind == "llm:python":
        _python_object(target, spec, key)
    elif not os.path.isdir(target):
        problem = "is not a directory" if os.path.exists(target) else "does not exist"
        raise config_error(key, f"{spec!r}: {target!r} {problem}", f"use {JUDGE_SPECS}")


def judge_from_spec(
    spec: str,
    *,
    key: str = "online.judge",
    template: judge.Template | str | None = None,
    seed: int = 0,
    max_new_tokens: int = 64,
    rows: int = 8,
    dtype: str = "float32",
) -> Judge:
    """The pairwise judge of a spec (see the module docstring).

    `python:MODULE:FACTORY` returns what FACTORY() returns (FACTORY is called once, with
    no arguments: write `def make(): return my_judge` for a plain judge function). The
    LLM judges are `judge.LLMJudge`s with `template` (a `judge.TEMPLATES` name or a
    `judge.Template`; default `DEFAULT_JUDGE_TEMPLATE`) and `seed` (the answers' order per
    comparison); `llm:hf:DIR` runs the model greedily with `judge.hf_completer`
    (`max_new_tokens`, `rows` prompts per call, `dtype`).
    """
    check_judge_spec(spec, key, template)
    kind, target = parse_judge(spec, key)
    spec = spec.strip()
    if kind == "python":
        made = _judge_factory(target, spec, key)()
        if not callable(made):
            raise config_error(
                key, f"{spec!r}: the factory returned {type(made).__name__}, not a judge",
                "return a callable (prompts, completions_a, completions_b) -> P(a preferred)",
            )  # fmt: skip
        return made
    if kind == "llm:python":
        complete = judge.callable_completer(_python_object(target, spec, key))
    else:
        complete = judge.hf_completer(target, max_new_tokens=max_new_tokens, rows=rows, dtype=dtype)
    return judge.LLMJudge(complete, _template(template, key), seed=seed)


# ------------------------------------------------------------- rewards of saved texts


def text_reward(spec: str, key: str = "--reward") -> Callable[[list[str], list[str]], np.ndarray]:
    """One reward spec as `fn(prompts, completions) -> [n]` float64, for texts already
    sampled (`dpo-jax evaluate --samples`). Text rewards (`vader`, `hf:DIR`,
    `reward_model:DIR`) score prompt + completion, as during rollouts; a python reward
    gets `prompts=` and `completions=`."""
    check_spec(spec, key)
    parsed = parse(spec, key)
    if len(parsed) != 1:
        raise config_error(key, f"{spec!r} names {len(parsed)} rewards", "give one")
    kind, target = parsed[0]
    if kind == "python":
        fn = _python_reward_function(target, spec, key)
        accepts = _keywords(fn)

        def python_texts(prompts: list[str], completions: list[str]) -> np.ndarray:
            args = {"prompts": prompts, "completions": completions}
            if accepts is not None:
                args = {k: v for k, v in args.items() if k in accepts}
            return _scores(fn(**args), len(prompts), spec, key)

        return python_texts
    scorer = _text_scorer(kind, target)  # the rollouts' own text rewards

    def texts(prompts: list[str], completions: list[str]) -> np.ndarray:
        joined = [p + c for p, c in zip(prompts, completions, strict=True)]
        return np.asarray(scorer(joined), np.float64)

    return texts
