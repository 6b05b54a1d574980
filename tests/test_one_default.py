"""One source per default: `dpo_jax/configs/default.py` (issue 28). The readers take
the config (or a spec completed from default.py once, at its entry) and restate no
default: no dataclass field defaults, no `.get(key, fallback)` on a config or spec."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from dpo_jax import train_step
from dpo_jax.configs import default
from dpo_jax.data import complete_spec, tokenize

ROOT = Path(__file__).resolve().parent.parent / "dpo_jax"
# Readers of config sections and data specs that once had fallbacks of their own.
READERS = (
    "train_step.py", "objectives.py", "online.py", "online_dpo.py", "rollouts.py",
    "group_loop.py", "ppo_loop.py", "configs/__init__.py", "configs/validate.py",
    "data/__init__.py", "data/spec.py", "data/tokenize.py",
)  # fmt: skip
FALLBACK = re.compile(r"\b(config|spec|settings)\b[\w.\[\]\"']*\.get\([^()]*,")


def test_readers_restate_no_default():
    users = [p.name for p in ROOT.rglob("*.py") if "_default_of" in p.read_text()]
    assert not users, f"train_step._default_of is gone (StepConfig takes its settings): {users}"
    for name in READERS:
        for i, line in enumerate((ROOT / name).read_text().splitlines(), 1):
            assert not FALLBACK.search(line), f"{name}:{i}: a fallback beside default.py: {line}"
    # the step's and the tokenizer's settings are all given (from the config / a spec)
    runtime = {"grad_shardings", "lora_scale"}  # facts of the run, not settings
    for cls, allowed in ((train_step.StepConfig, runtime), (tokenize.TokenizeSettings, set())):
        for f in dataclasses.fields(cls):
            has_default = f.default is not dataclasses.MISSING
            has_default |= f.default_factory is not dataclasses.MISSING
            assert not has_default or f.name in allowed, f"{cls.__name__}.{f.name}"
    # a partial data spec is completed from default.py's data section
    spec = complete_spec({"path": "x.jsonl", "max_prompt_length": 3})
    d = default.get_config().data
    assert (spec["max_prompt_length"], spec["max_length"]) == (3, d.max_length)
    assert spec["truncation_mode"] == d.truncation_mode and spec["cache_dir"] == d.cache_dir
    assert tokenize.settings_from_spec({"add_eos": False}).max_length == d.max_length
