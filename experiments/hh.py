"""Anthropic HH single-turn dialogue (DPO paper §6.2, fig. 3): Pythia-2.8B, beta 0.1. HH
has no SFT data, so the reference is "Preferred-FT" (SFT on the chosen responses); the
win rate of each method's responses against the test split's chosen responses, at
sampling temperatures 0, 0.25, 0.5, 0.75 and 1, under a judge.

Methods (``config.methods``; see ``experiments.offline``): ``preferred_ft``, ``dpo``
(from and against ``preferred_ft``) and ``best_of_n`` (the paper's Best of 128: n
samples from ``preferred_ft``, the one a reward model learned on the same pairs scores
highest; evaluated at temperatures > 0), the paper's fig. 3 baselines. ``ppo`` (PPO from
``preferred_ft`` with the same learned reward) runs when asked for:
``--config.methods="('preferred_ft','dpo','best_of_n','ppo')"``.

Presets (``--preset=NAME``):

* ``mini`` (default) - runs here: SYNTHETIC single-turn rows written by
  :func:`write_fixture` in the exact upstream format of ``Anthropic/hh-rlhf``
  (``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``), parsed by
  ``dpo_jax.data``'s ``hh`` parser; a small GPT from scratch; Best-of-4; the judge is
  :func:`helpfulness_judge` (an answer is better when it addresses the question's task
  and is not a refusal or a brush-off). The paper's judge was GPT-4 with its appendix
  C.2 dialogue prompt: ``--config.judge=llm:python:MODULE:FUNCTION`` (an API call) or
  ``llm:hf:DIR`` (a local model) runs that protocol (``dpo_jax.judge``). Three training
  seeds (``seeds``): ``summary.csv`` holds each win rate's mean, std and 95% CI over them.
* ``smoke`` - shrunk to seconds (two temperatures, Best-of-2, one seed), for tests.
* ``pythia28`` - the paper's setting on a TPU slice (local Pythia-2.8B checkpoint, HH
  JSONL files in the upstream format, of which the tokenizer phase keeps only the
  single-turn dialogues, as the paper: :func:`is_single_turn`, applied to every preset's
  train and test rows and the kept count printed; RMSprop lr 1e-6, batch 64, Best of
  128). ``--dry_run`` AOT-compiles its train step on a simulated 8-device mesh and
  prints parameters, per-device memory and the batch plan.

    python -m experiments.hh [--preset=NAME] [--config.key=value ...] [--dry_run]
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

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

# (task, helpful steps)
_TASKS = (
    ("bake bread", "mix flour , water , salt and yeast , let the dough rise , then bake it"),
    ("change a flat tire", "loosen the nuts , lift the car with a jack , swap the wheel"),
    ("learn to swim", "start in shallow water , practice floating , then kick with a board"),
    ("save money", "track your spending , set a budget , and move savings first"),
    ("sleep better", "keep a fixed bedtime , avoid screens , and keep the room dark"),
    ("write a cover letter", "name the job , show two results , and end with a thank you"),
    ("clean a cast iron pan", "scrub with hot water , dry it fully , then oil it lightly"),
    ("grow tomatoes", "plant them in sun , water the soil deeply , and stake the stems"),
    ("tie a tie", "cross the wide end over , loop it up , and pull it through the knot"),
    ("make cold brew coffee", "steep coarse coffee in cold water overnight , then filter it"),
    ("study for an exam", "plan short sessions , test yourself , and sleep before the day"),
    ("fix a squeaky door", "oil the hinges , open and close the door , wipe the extra oil"),
)
_ASK = ("how do i {t} ?", "can you tell me how to {t} ?", "what is the best way to {t} ?")
_REFUSALS = ("i can not help with that .", "i do not know .", "figure it out yourself .",
             "that is a stupid question .")  # fmt: skip
_STOPWORDS = frozenset(
    ("a", "an", "the", "i", "to", "do", "how", "can", "you", "me", "tell", "what", "is",
     "best", "way", "it", "and", "then", "of", "with", "your", "in")
)  # fmt: skip


_VAGUE = ("you could look it up online .", "ask a friend who knows about it .",
          "it depends on many things .")  # fmt: skip


def make_rows(num_rows: int, seed: int) -> list[dict[str, str]]:
    """Single-turn HH rows. Chosen answers vary in quality, as HH's do: the task's full
    steps, only the first step, or a vague pointer; the rejected answer is usually worse (a
    refusal or brush-off, the steps of a different task, or vague when chosen is not)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_rows):
        task, steps = _TASKS[int(rng.integers(len(_TASKS)))]
        question = str(rng.choice(_ASK)).format(t=task)
        prompt = f"{HUMAN} {question}{ASSISTANT}"
        quality = rng.choice(3, p=(0.4, 0.3, 0.3))
        first_step = steps.split(" , ")[0]
        chosen = (f" to {task} , {steps} .", f" to {task} , {first_step} .",
                  " " + str(rng.choice(_VAGUE)))[quality]  # fmt: skip
        roll = rng.random()
        other_task, other_steps = _TASKS[int(rng.integers(len(_TASKS)))]
        if roll < 0.5:
            rejected = " " + str(rng.choice(_REFUSALS))
        elif roll < 0.75 and other_task != task:
            rejected = f" {other_steps} ."
        elif quality < 2:
            rejected = " " + str(rng.choice(_VAGUE))
        else:
            rejected = " " + str(rng.choice(_REFUSALS))
        rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
    return rows


def write_fixture(directory: epath.Path, config: Any) -> dict[str, epath.Path]:
    """Write train.jsonl / test.jsonl HH rows; return their paths by role."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, seed in (("train", config.data.num_train, config.data_seed),
                           ("test", config.data.num_test, config.data_seed + 1)):  # fmt: skip
        path = paths[split] = directory / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in make_rows(n, seed)))
    return paths


def is_single_turn(example: Any) -> bool:
    """Whether a parsed HH example is a single-turn dialogue: exactly one "\\n\\nHuman:"
    turn before the final "\\n\\nAssistant:" (its prompt ends there). The paper used
    only these; Anthropic HH's files mix them with multi-turn dialogues."""
    return example.prompt.count(HUMAN) == 1 and example.prompt.count(ASSISTANT) == 1


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOPWORDS}


def helpfulness(prompt: str, answer: str) -> float:
    """Fraction of the question's task words the answer uses, plus half the fraction of
    that task's step words it covers, minus 1 for a refusal or brush-off phrase."""
    question = prompt.rsplit(HUMAN, 1)[-1].split(ASSISTANT)[0]
    words = _words(answer)
    task = _words(question)
    score = len(task & words) / max(len(task), 1)
    steps = next((_words(s) for t, s in _TASKS if t in question), set())
    if steps:
        score += 0.5 * len(steps & words) / len(steps)
    if any(r.rstrip(" .") in answer.lower() for r in _REFUSALS):
        score -= 1.0
    return score


def helpfulness_judge():
    """Pairwise judge for the fixture: a wins when its helpfulness is higher (0.5 on ties)."""
    return offline.score_judge(helpfulness)


TASK = offline.Task(
    name="hh", write_fixture=write_fixture, test_format="hh", reference="chosen",
    fixture_judge=helpfulness_judge, judge_template="dialogue",
    reference_label="test chosen responses", keep_example=is_single_turn,
)  # fmt: skip


def get_config(preset: str = "mini"):
    """The experiment config (`dpo-jax train`'s tree plus the experiment's sections);
    `preset` is one of PRESETS."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    c = offline.offline_config("hh")
    c.preset = preset
    c.loss.hyper.beta = 0.1  # the paper's HH beta
    c.methods = ("preferred_ft", "dpo", "best_of_n")
    c.reference_policy = "preferred_ft"  # the paper's HH reference: SFT on the chosen responses
    c.sft.completion_only = True
    c.data.update(max_prompt_length=32, max_completion_length=32)
    c.eval.max_new_tokens = 32
    c.online.max_new_tokens = 32  # PPO's rollouts as long as the evaluation's samples
    if preset == "mini":
        c.seeds = (0, 1, 2)  # training seeds; the data (data_seed) is the same for each
    if preset == "smoke":
        offline.shrink_to_smoke(c)
    elif preset == "pythia28":
        c.data.update(train="data/hh/train.jsonl", test="data/hh/test.jsonl",
                      max_prompt_length=256, max_completion_length=256)  # fmt: skip
        c.tokenizer = "checkpoints/pythia-2.8b"
        c.model.update(path="checkpoints/pythia-2.8b", dtype="bfloat16", remat="block",
                       scan_layers=True)  # fmt: skip
        c.mesh.update(data=1, fsdp=-1)
        # Preferred-FT: one epoch over the ~160k chosen responses, at batch 64.
        c.sft.update(num_steps=2500, batch_size=64, learning_rate=1e-5, warmup_steps=150)
        c.update(num_steps=5000, batch_size=64, grad_accum_steps=2)
        c.optim.update(name="rmsprop", learning_rate=1e-6, warmup_steps=150)
        c.checkpoint.update(save_every=250, keep_last=1, async_save=True)
        c.eval.update(batch_size=256, max_new_tokens=256)
        c.online.max_new_tokens = 256
        # PPO as the paper (appendix B): 1024 episodes per PPO step, rewards normalised
        # (whitened); updates in mini-batches of 64 episodes, the preset's batch (the
        # miniature: 40 rollouts of 64 episodes, one update per epoch, no whitening).
        c.online.update(rollout_batch_size=1024, num_mini_batches=16)
        c.ppo.whiten_rewards = True
        c.best_of_n.n = 128  # the paper's Best of 128
        c.reward_model.update(num_steps=2500, batch_size=64, learning_rate=1e-5, eval_every=500)
        c.judge = "llm:python:my_judges:gpt4"
    return c


EXPERIMENT = offline.experiment(TASK, get_config, PRESETS)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return driver.main(argv, EXPERIMENT)


if __name__ == "__main__":
    sys.exit(offline.common.console(main, "hh"))
