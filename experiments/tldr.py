"""TL;DR summarisation (DPO paper §6.2, fig. 2 right): SFT on the human-written TL;DR
summaries, then DPO (beta 0.5) on the OpenAI comparisons; the win rate of each method's
summaries against the human-written reference summaries of the test posts, at sampling
temperatures 0, 0.25, 0.5, 0.75 and 1, under a judge.

Methods (``config.methods``; see ``experiments.offline``): ``sft`` (SFT on the reference
summaries of the SFT split), ``preferred_ft`` (SFT on the comparisons' chosen summaries),
``dpo`` (from and against ``sft``) and ``ppo`` (from ``sft``, KL-penalised against it,
rewarded by a reward model learned on the comparisons), the paper's comparison set;
``online_dpo`` (online DPO from ``sft``, pairs of its own samples labelled by that reward
model) runs when asked.

Presets (``--preset=NAME``):

* ``mini`` (default) - runs here, SYNTHETIC data written by :func:`write_fixture` in the
  exact upstream formats of ``openai/summarize-from-feedback``: the TL;DR SFT split
  ``tldr_3_filtered/{train,test}.jsonl`` (``{"id", "subreddit", "title", "post",
  "summary"}``, one human-written summary per post) and the comparisons
  (``info.post/title/subreddit``, two ``summaries``, ``choice``), parsed by
  ``dpo_jax.data`` (formats ``tldr_sft`` and ``tldr``) like the real files; a small GPT
  trained from scratch; the judge is :func:`title_overlap_judge` (a summary is better
  when its content words match the post's title, which the grammar makes the gist of
  the post). The paper's judge was GPT-4 with its appendix C.2 prompt:
  ``--config.judge=llm:python:MODULE:FUNCTION`` (an API call) or ``llm:hf:DIR`` (a
  local model) runs that protocol (``dpo_jax.judge``). Three training seeds
  (``seeds``): ``summary.csv`` holds each win rate's mean, std and 95% CI over them.
* ``smoke`` - the mini pipeline shrunk to seconds (two temperatures, one seed), for tests.
* ``pythia28`` - the paper's setting on a TPU slice: a local Pythia-2.8B checkpoint (the
  paper used GPT-J-6B, whose architecture ``dpo_jax.models`` does not implement yet), the
  real TL;DR SFT and comparison JSONL files, beta 0.5, RMSprop lr 1e-6, batch 64.
  ``--dry_run`` AOT-compiles its train step on a simulated 8-device mesh and prints
  parameters, per-device memory and the batch plan.

    python -m experiments.tldr [--preset=NAME] [--config.key=value ...] [--dry_run]
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from experiments import driver, offline

PRESETS = ("mini", "smoke", "pythia28")

# (subreddit, title = the gist, detail sentence) - the post's facts live in the title.
_PROBLEMS = (
    ("relationships", "boyfriend forgot my birthday", "he said he was busy at work all week"),
    ("relationships", "girlfriend reads my messages", "she goes through my phone when i sleep"),
    ("relationships", "roommate never cleans kitchen", "the dishes pile up for days"),
    ("relationships", "best friend moved away", "we used to talk every single day"),
    ("personalfinance", "credit card debt keeps growing", "i only pay the minimum each month"),
    ("personalfinance", "should i buy a used car", "my old car broke down last week"),
    ("personalfinance", "saving for a house deposit", "rent takes half of my salary"),
    ("jobs", "boss takes credit for my work", "he presented my report as his own"),
    ("jobs", "got a job offer abroad", "the salary is double but i would move alone"),
    ("jobs", "coworker is always late", "i have to cover her shifts"),
    ("fitness", "cannot stick to running", "i stop after two weeks every time"),
    ("fitness", "knee hurts after squats", "the pain starts the next morning"),
    ("cooking", "bread never rises", "i follow the recipe exactly"),
    ("cooking", "burnt rice every time", "the bottom of the pot turns black"),
)
_AGES = ("19", "22", "24", "27", "31", "35", "42")
_GENDERS = ("m", "f")
_FILLERS = (
    "i have been thinking about it a lot",
    "my family does not know yet",
    "it has been going on for a while",
    "i am not sure who else to ask",
    "this is my first post here",
)
_ASKS = ("what should i do ?", "any advice ?", "how do i handle this ?", "am i overreacting ?")
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "i",
        "my",
        "me",
        "is",
        "am",
        "are",
        "was",
        "were",
        "be",
        "to",
        "of",
        "and",
        "or",
        "in",
        "on",
        "at",
        "for",
        "with",
        "it",
        "this",
        "that",
        "he",
        "she",
        "her",
        "his",
        "we",
        "our",
        "you",
        "your",
        "do",
        "does",
        "not",
        "so",
        "but",
    ]
)


def _post(rng: np.random.Generator, problem: tuple[str, str, str]) -> dict[str, Any]:
    subreddit, title, detail = problem
    age, gender = rng.choice(_AGES), rng.choice(_GENDERS)
    filler, ask = rng.choice(_FILLERS), rng.choice(_ASKS)
    post = f"i ({age}{gender}) have a problem : {title} . {detail} . {filler} . {ask}"
    return {"subreddit": subreddit, "title": title, "post": post}


def _partial(rng: np.random.Generator, title: str) -> str:
    """The title with 1-2 words left out: a summary that misses part of the gist."""
    words = title.split()
    drop = set(
        rng.choice(
            len(words), size=min(len(words) - 1, int(rng.integers(1, 3))), replace=False
        ).tolist()
    )
    return " ".join(w for i, w in enumerate(words) if i not in drop)


def make_rows(num_rows: int, seed: int, split: str) -> list[dict[str, Any]]:
    """Comparison rows in the upstream format. Each summary states a title's facts in full
    or with a word or two missing (equally often, so completeness alone does not predict
    the label). The preferred one is about this post; the other is about another post, a
    vague line, or - when the preferred one is complete - an incomplete version of it.
    `choice` indexes the preferred one."""
    rng = np.random.default_rng(seed)
    gist = lambda title: title if rng.random() < 0.5 else _partial(rng, title)
    rows = []
    for k in range(num_rows):
        problem = _PROBLEMS[int(rng.integers(len(_PROBLEMS)))]
        info = _post(rng, problem)
        good_gist = gist(problem[1])
        other = _PROBLEMS[int(rng.integers(len(_PROBLEMS)))]
        roll = rng.random()
        if roll < 0.4 and other != problem:
            bad_gist = gist(other[1])
        elif roll < 0.7 and good_gist == problem[1]:
            bad_gist = _partial(rng, problem[1])
        else:
            bad_gist = str(rng.choice(_FILLERS))
        good, bad = f"{good_gist} , {rng.choice(_ASKS)}", f"{bad_gist} , {rng.choice(_ASKS)}"
        choice = int(rng.integers(2))
        summaries = [None, None]
        summaries[choice] = {"text": " " + good, "policy": "ref", "note": None}
        summaries[1 - choice] = {"text": " " + bad, "policy": "sup2", "note": None}
        rows.append(dict(
            info=dict(id=f"t3_{split}{k:05d}", **info), split=split, summaries=summaries,
            choice=choice, worker=f"w{int(rng.integers(20))}", batch="batch_fixture",
        ))  # fmt: skip
    return rows


def make_sft_rows(num_rows: int, seed: int, split: str) -> list[dict[str, Any]]:
    """TL;DR SFT rows in the upstream ``tldr_3_filtered`` format: a post and the summary
    its author wrote (``summary``, no leading space, as upstream). Humans state the
    title's facts in full 60% of the time and miss a word or two otherwise, so a policy
    can beat the references."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(num_rows):
        problem = _PROBLEMS[int(rng.integers(len(_PROBLEMS)))]
        info = _post(rng, problem)
        gist = problem[1] if rng.random() < 0.6 else _partial(rng, problem[1])
        rows.append(dict(id=f"t3_{split}{k:05d}", **info, summary=f"{gist} , {rng.choice(_ASKS)}"))
    return rows


def write_fixture(directory: epath.Path, config: Any) -> dict[str, epath.Path]:
    """Write the SFT split (train/test posts with human summaries) and the training
    comparisons; return their paths by role (sft, test, train)."""
    d = config.data
    files = {
        "sft": ("tldr_3_filtered/train.jsonl", make_sft_rows(d.num_sft, config.data_seed, "train")),
        "test": (
            "tldr_3_filtered/test.jsonl",
            make_sft_rows(d.num_test, config.data_seed + 1, "test"),
        ),
        "train": ("comparisons/train.jsonl", make_rows(d.num_train, config.data_seed + 2, "train")),
    }
    paths = {}
    for role, (name, rows) in files.items():
        path = paths[role] = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOPWORDS}


def title_score(prompt: str, summary: str) -> float:
    """F1 between the content words of the summary and of the post's TITLE line."""
    match = re.search(r"TITLE: (.*)", prompt)
    title = _content_words(match.group(1) if match else "")
    words = _content_words(summary)
    overlap = len(title & words)
    if not overlap:
        return 0.0
    precision, recall = overlap / len(words), overlap / len(title)
    return 2 * precision * recall / (precision + recall)


def title_overlap_judge():
    """Pairwise judge for the fixture: a wins when its title F1 is higher (0.5 on ties)."""
    return offline.score_judge(title_score)


TASK = offline.Task(
    name="tldr", write_fixture=write_fixture, test_format="tldr_sft", reference="completion",
    fixture_judge=title_overlap_judge, judge_template="summarization",
    reference_label="human-written reference summaries",
)  # fmt: skip


def get_config(preset: str = "mini"):
    """The experiment config (`dpo-jax train`'s tree plus the experiment's sections);
    `preset` is one of PRESETS."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    c = offline.offline_config("tldr")
    c.preset = preset
    c.loss.hyper.beta = 0.5  # the paper's TL;DR beta
    c.methods = ("sft", "preferred_ft", "dpo", "ppo")  # the paper's fig. 2 (right)
    c.reference_policy = "sft"
    if preset == "mini":
        c.seeds = (0, 1, 2)  # training seeds; the data (data_seed) is the same for each
    if preset == "smoke":
        offline.shrink_to_smoke(c)
    elif preset == "pythia28":
        c.data.update(
            demonstrations="data/tldr/tldr_3_filtered/train.jsonl",
            test="data/tldr/tldr_3_filtered/test.jsonl",
            train="data/tldr/comparisons_train.jsonl",
            max_prompt_length=512, max_completion_length=128,
        )  # fmt: skip
        c.tokenizer = "checkpoints/pythia-2.8b"
        c.model.update(path="checkpoints/pythia-2.8b", dtype="bfloat16", remat="block",
                       scan_layers=True)  # fmt: skip
        c.mesh.update(data=1, fsdp=-1)
        # SFT: one epoch over the ~117k posts of the TL;DR SFT split, at batch 64.
        c.sft.update(num_steps=1800, batch_size=64, learning_rate=1e-5, warmup_steps=150,
                     completion_only=True)  # fmt: skip
        c.update(num_steps=3000, batch_size=64, grad_accum_steps=2)
        c.optim.update(name="rmsprop", learning_rate=1e-6, warmup_steps=150)
        c.checkpoint.update(save_every=250, keep_last=1, async_save=True)
        c.eval.update(batch_size=256, max_new_tokens=128)
        c.online.max_new_tokens = 128
        # PPO as the paper (appendix B): 1024 episodes per PPO step, rewards normalised
        # (whitened); updates in mini-batches of 64 episodes, the preset's batch (the
        # miniature: 40 rollouts of 64 episodes, one update per epoch, no whitening).
        c.online.update(rollout_batch_size=1024, num_mini_batches=16)
        c.ppo.whiten_rewards = True
        c.best_of_n.n = 128
        c.reward_model.update(num_steps=1500, batch_size=64, learning_rate=1e-5, eval_every=500)
        c.judge = "llm:python:my_judges:gpt4"
    return c


EXPERIMENT = offline.experiment(TASK, get_config, PRESETS)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return driver.main(argv, EXPERIMENT)


if __name__ == "__main__":
    sys.exit(offline.common.console(main, "tldr"))
