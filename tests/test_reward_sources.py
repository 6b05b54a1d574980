"""`dpo_jax.reward_sources`: reward and judge specs of the on-policy methods.

The user modules a spec names are written into `tmp_path` and put on `sys.path`; no
model is loaded (the `reward_model:` choice between ids and text runs on a stand-in)."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest

from dpo_jax import judge, reward_model, reward_sources, rewards, sampling
from dpo_jax.errors import UserError
from tests import train_helpers as th

MODULE = "rs_user_rewards"
BROKEN = "rs_user_broken"
SOURCE = """
import re

import numpy as np

CALLS = []
NOT_CALLABLE = 3


def length(prompts, completions, completion_ids, **kwargs):
    CALLS.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                      **kwargs))
    return [float(len(c)) for c in completions]


def prompt_words(completions, prompts):  # no **kwargs: given only what it names
    return np.array([len(p.split()) for p in prompts])


def bad_is_none(completions, **kwargs):  # None: "does not apply"
    return [None if "bad" in c else 1.0 for c in completions]


def great_is_none(completions, **kwargs):
    return (None if "Great" in c else -2.0 for c in completions)  # any iterable


def short(completions, **kwargs):
    return [1.0]


def words(completions, **kwargs):
    return ["high" for _ in completions]


def no_completions(prompts):
    return [0.0 for _ in prompts]


def make_judge():
    def judge(prompts, a, b):
        return np.array([0.25 if len(x) > len(y) else 0.75 for x, y in zip(a, b)])

    return judge


def judge_itself(prompts, a, b):
    return [0.5 for _ in a]


def not_a_judge():
    return 3


def api(prompt_text):
    first, second = re.search(
        r"Response A:\\n(.*)\\n\\nResponse B:\\n(.*)\\n\\nFIRST", prompt_text, re.S
    ).groups()
    return "Comparison: one is good.\\nMore helpful: " + ("A" if "good" in first else "B")
"""


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The user module (fresh per test: its `CALLS` start empty)."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    (tmp_path / f"{BROKEN}.py").write_text('raise RuntimeError("boom\\non two lines")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in (MODULE, BROKEN):
        sys.modules.pop(name, None)
    yield __import__(MODULE)
    for name in (MODULE, BROKEN):
        sys.modules.pop(name, None)


PROMPTS = ["I love it.", "This is awful"]
COMPLETIONS = [" Great!", " and bad."]


@pytest.fixture
def samples(tokenizer):
    """Two rows: the first emitted the EOS (dropped from the decoded text)."""
    eos = tokenizer.eos_token_id
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    comps = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    return th.sample_output(prompts, [comps[0] + [eos], comps[1]], finished=[True, False])


def _one_line_error(excinfo, *names):
    message = str(excinfo.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)
    return message


# ------------------------------------------------------------ python: rewards


def test_python_reward_gets_trl_arguments(user, samples, tokenizer):
    """The function gets each row's decoded prompt and completion (special tokens, the
    EOS, skipped) and the completion ids with the EOS; its floats are the scores."""
    got = reward_sources.from_spec(f"python:{MODULE}:length", tokenizer)(samples)
    np.testing.assert_array_equal(got, [len(" Great!"), len(" and bad.")])
    assert got.dtype == np.float32
    (call,) = user.CALLS
    assert call["prompts"] == PROMPTS and call["completions"] == COMPLETIONS
    ids = samples.completion_ids(keep_eos=True)
    assert call["completion_ids"] == ids and ids[0][-1] == tokenizer.eos_token_id
    # Without **kwargs it gets only the arguments it names; numpy output is fine.
    got = reward_sources.from_spec(f"python:{MODULE}:prompt_words", tokenizer)(samples)
    np.testing.assert_array_equal(got, [3, 3])


def test_weighted_sum_of_rewards(user, samples, tokenizer):
    """TRL's reward_weights: the weighted sum, as a string or as lists."""
    want = 0.5 * np.array([7.0, 9.0]) + 2.0 * np.array([3.0, 3.0])
    spec = f"python:{MODULE}:length, python:{MODULE}:prompt_words"
    reward = reward_sources.from_spec(spec, tokenizer, weights="0.5, 2")
    np.testing.assert_allclose(reward(samples), want)
    np.testing.assert_array_equal(reward.last_KxS, [[7, 9], [3, 3]])
    listed = reward_sources.from_spec(
        [f"python:{MODULE}:length", f"python:{MODULE}:prompt_words"], tokenizer, weights=(0.5, 2)
    )
    np.testing.assert_allclose(listed(samples), want)
    unweighted = reward_sources.from_spec(spec, tokenizer)
    np.testing.assert_allclose(unweighted(samples), [10.0, 12.0])


def test_none_scores_are_left_out_of_the_sum(user, samples, tokenizer, caplog):
    """None = "does not apply": TRL's nansum over the rewards; a completion no reward
    scored gets 0, with a warning."""
    spec = f"python:{MODULE}:bad_is_none,python:{MODULE}:great_is_none"
    got = reward_sources.from_spec(spec, tokenizer, weights=[3.0, 0.5])(samples)
    np.testing.assert_allclose(got, [3.0 * 1.0, 0.5 * -2.0])
    with caplog.at_level(logging.WARNING, logger="dpo_jax.reward_sources"):
        got = reward_sources.from_spec(f"python:{MODULE}:bad_is_none", tokenizer)(samples)
    np.testing.assert_array_equal(got, [1.0, 0.0])
    assert "1 of 2 completions" in caplog.text


@pytest.mark.parametrize(
    ("function", "problem"),
    [
        ("short", "returned 1 scores for 2 completions"),
        ("words", "returned a score of type str"),
    ],
)
def test_bad_python_output_is_one_line(user, samples, tokenizer, function, problem):
    reward = reward_sources.from_spec(f"python:{MODULE}:{function}", tokenizer)
    with pytest.raises(UserError) as excinfo:
        reward(samples)
    _one_line_error(excinfo, "online.reward", f"python:{MODULE}:{function}", problem)


def test_builtin_rewards_as_before(user, samples, tokenizer):
    """`vader` scores the decoded prompt + completion (TRL's PPOTrainer's query +
    response), also inside a weighted sum."""
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    vader = rewards.VaderReward()(texts)
    np.testing.assert_array_equal(reward_sources.from_spec("vader", tokenizer)(samples), vader)
    both = reward_sources.from_spec(f"vader,python:{MODULE}:prompt_words", tokenizer, weights="2,1")
    np.testing.assert_allclose(both(samples), 2 * vader + 3, rtol=1e-6)


def test_reward_model_scores_ids_with_the_policy_tokenizer(
    tmp_path, monkeypatch, samples, tokenizer
):
    """`reward_model:DIR` reads the sampled ids when its tokenizer is the policy's, else
    the decoded text (a stand-in for the exported model: no model loads)."""
    from tests.hf_fixtures import train_tokenizer

    (tmp_path / reward_model.HEAD_FILE).write_bytes(b"")

    class Learned:
        def __init__(self, tok):
            self.tokenizer, self.calls = tok, []

        def score_ids(self, ids):
            self.calls.append(("ids", ids))
            return np.array([len(x) for x in ids], np.float32)

        def __call__(self, texts):
            self.calls.append(("texts", texts))
            return np.zeros(len(texts), np.float32)

    learned = Learned(tokenizer)
    monkeypatch.setattr(reward_model, "load_exported", lambda directory: learned)
    reward_sources.from_spec(f"reward_model:{tmp_path}", tokenizer)(samples)
    comps = samples.completion_ids(keep_eos=True)
    prompts = [samples.prompt_ids[k, -samples.prompt_lengths[k] :].tolist() for k in range(2)]
    assert learned.calls == [("ids", [p + c for p, c in zip(prompts, comps, strict=True)])]
    learned = Learned(train_tokenizer(chat_template=False))
    reward_sources.from_spec(f"reward_model:{tmp_path}", tokenizer)(samples)
    assert learned.calls == [("texts", [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])]


def test_text_and_id_adapters():
    """`reward_from_texts` (prompt padding and the EOS dropped) and `reward_from_ids`
    (the emitted EOS kept)."""
    samples = sampling.SampleOutput(
        prompt_ids=np.array([[0, 7, 8], [5, 6, 9]], np.int32),
        prompt_lengths=np.array([2, 3], np.int32),
        tokens=np.array([[11, 1, 0], [12, 13, 14]], np.int32),
        lengths=np.array([2, 3], np.int32), logps=np.zeros((2, 3), np.float32),
        sampling_logps=np.zeros((2, 3), np.float32), finished=np.array([True, False]),
        prompt_index=np.arange(2, dtype=np.int32),
        config=sampling.SamplingConfig(eos_token_ids=(1,)),
    )  # fmt: skip

    class Tok:
        def batch_decode(self, ids, skip_special_tokens):
            return [" ".join(map(str, x)) for x in ids]

    got = []
    fn = reward_sources.reward_from_texts(lambda t: got.extend(t) or [1.0, 2.0], Tok(), True)
    np.testing.assert_array_equal(fn(samples), [1.0, 2.0])
    assert got == ["7 8 11", "5 6 9 12 13 14"]
    got.clear()
    reward_sources.reward_from_texts(lambda t: got.extend(t) or [0, 0], Tok())(samples)
    assert got == ["11", "12 13 14"]

    class Learned:
        def score_ids(self, ids):
            got.append(ids)
            return np.array([len(x) for x in ids], np.float32)

    got.clear()
    np.testing.assert_array_equal(reward_sources.reward_from_ids(Learned())(samples), [4, 6])
    assert got[0] == [[7, 8, 11, 1], [5, 6, 9, 12, 13, 14]]


# ------------------------------------------------------------------ bad specs


def _dirs(tmp_path):
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "file").write_text("")
    return lm


@pytest.mark.parametrize(
    ("spec", "weights", "names"),
    [
        ("nonsense", None, ["'nonsense' is not a reward"]),
        ("vader:x", None, ["'vader:x' is not a reward"]),
        ("", None, ["is empty"]),
        ("vader,", None, ["'vader,' has an empty entry"]),
        (f"python:{MODULE}", None, [f"python:{MODULE}", "python:MODULE:FUNCTION"]),
        ("python:rs_no_such_module:f", None, ["python:rs_no_such_module:f", "no module named"]),
        (f"python:{BROKEN}:f", None, [f"python:{BROKEN}:f", "RuntimeError: boom on two lines"]),
        (f"python:{MODULE}:missing", None, [f"python:{MODULE}:missing", "no attribute 'missing'"]),
        (f"python:{MODULE}:NOT_CALLABLE", None, [f"python:{MODULE}:NOT_CALLABLE", "not callable"]),
        (f"python:{MODULE}:no_completions", None, ["takes no argument `completions`"]),
        ("vader,vader", "1,2,3", ["online.reward_weights", "3 weights", "'vader,vader'"]),
        ("vader", "1,x", ["online.reward_weights", "'x'"]),
        ("vader", [float("nan")], ["online.reward_weights", "not finite"]),
        ("hf:{tmp}/missing", None, ["/missing' does not exist"]),
        ("hf:{tmp}/file", None, ["/file' is not a directory"]),
        ("hf:{tmp}/lm", None, ["is not a sequence classifier", "GPT2LMHeadModel"]),
        ("reward_model:{tmp}/lm", None, ["has no head.npz"]),
        ("vader,hf:{tmp}/missing", None, ["/missing' (in 'vader,hf:", "does not exist"]),
    ],
)
def test_bad_reward_specs_are_one_line(user, tmp_path, tokenizer, spec, weights, names):
    _dirs(tmp_path)
    spec = spec.replace("{tmp}", str(tmp_path))
    for check in (
        lambda: reward_sources.check_spec(spec, weights=weights),
        lambda: reward_sources.from_spec(spec, tokenizer, weights=weights),
    ):
        with pytest.raises(UserError) as excinfo:
            check()
        _one_line_error(excinfo, "config key 'online.reward", *names)


def test_spec_parsing_and_key(user, tmp_path):
    lm = _dirs(tmp_path)
    assert reward_sources.parse(f" vader , hf:{lm},python:{MODULE}:length") == [
        ("vader", ""), ("hf", str(lm)), ("python", f"{MODULE}:length"),
    ]  # fmt: skip
    with pytest.raises(UserError, match="config key 'ppo.reward': 'x' is not a reward"):
        reward_sources.check_spec("x", key="ppo.reward")
    reward_sources.check_spec(f"vader,python:{MODULE}:length", weights=[1, -0.5])
    for weights, want in [(None, [1, 1]), ("  ", [1, 1]), ((), [1, 1]), ("0.5, -2", [0.5, -2]),
                          (np.array([3, 4]), [3, 4]), (["1", 2.5], [1, 2.5])]:  # fmt: skip
        np.testing.assert_array_equal(reward_sources.weights_of(weights, 2), want)
    np.testing.assert_array_equal(reward_sources.weights_of(3.0, 1), [3.0])


# ------------------------------------------------------------------------ judges


def test_python_judge_is_the_factory_product(user):
    j = reward_sources.judge_from_spec(f"python:{MODULE}:make_judge")
    np.testing.assert_array_equal(j(["p", "q"], ["long", "a"], ["b", "longer"]), [0.25, 0.75])


def test_llm_python_judge_with_a_fake_completer(user):
    """The LLM judge protocol around FUNCTION(prompt_text) -> reply: the answers' order is
    drawn per comparison, the verdict maps back to P(a preferred); the default template
    is the dialogue one."""
    j = reward_sources.judge_from_spec(f"llm:python:{MODULE}:api", seed=3)
    assert isinstance(j, judge.LLMJudge) and j.template.name == "dialogue" and j.seed == 3
    a = ["good one", "meh", "good too", "nope"]
    b = ["meh", "good one", "nope", "good too"]
    np.testing.assert_array_equal(j(["q1", "q2", "q3", "q4"], a, b), [1.0, 0.0, 1.0, 0.0])
    assert len({r.a_first for r in j.records}) == 2  # both orders were shown
    j = reward_sources.judge_from_spec(f"llm:python:{MODULE}:api", template="summarization")
    assert j.template.name == "summarization"


@pytest.mark.parametrize(
    ("spec", "template", "names"),
    [
        ("gpt4", None, ["'gpt4' is not a judge"]),
        ("", None, ["is empty"]),
        ("llm:api:x", None, ["'llm:api:x' is not a judge"]),
        ("python:nomodulefunction", None, ["needs MODULE:FUNCTION"]),
        (f"python:{MODULE}:judge_itself", None, ["judge_itself needs arguments", "FACTORY()"]),
        (f"python:{MODULE}:not_a_judge", None, ["returned int, not a judge"]),
        (f"llm:python:{MODULE}:missing", None, ["no attribute 'missing'"]),
        (f"llm:python:{MODULE}:api", "poetry", ["judge template 'poetry'"]),
        ("llm:hf:{tmp}/missing", None, ["/missing' does not exist"]),
    ],
)
def test_bad_judge_specs_are_one_line(user, tmp_path, spec, template, names):
    spec = spec.replace("{tmp}", str(tmp_path))
    with pytest.raises(UserError) as excinfo:
        reward_sources.judge_from_spec(spec, template=template)
    _one_line_error(excinfo, "config key 'online.judge'", *names)
    if "not_a_judge" not in spec:  # only building it finds what the factory returns
        with pytest.raises(UserError, match="online.judge"):
            reward_sources.check_judge_spec(spec, template=template)
