"""Runs in one process do not leak into each other.

The defect these tests pin (found by bisecting `pytest -m heavy`): the polluter,
`test_families.py::test_qwen2_window_from_max_window_layers_matches_transformers`, calls
the session tokenizer with `padding=True, padding_side="left"` (its greedy parity with
`transformers.generate`). `transformers` leaves that padding switched on in the backend
tokenizer. The victim, `test_ppo_cli.py::test_cli_ppo_trains_as_the_python_api`, then saved
that tokenizer into its policy and reward-model directories. `tokenizer_fingerprint`
hashed the backend's padding state, so the CLI's policy tokenizer (its padding turned off
again by the next plain call) and the reward model's freshly loaded one (padding on, from
the file) had different fingerprints, and `ppo.reward=reward_model:DIR` scored decoded
text instead of the sampled ids: rollout scores -3.47 against the Python API's 2.82.
A notebook that tokenizes a padded batch before saving its tokenizer hits the same.
"""

from __future__ import annotations

import numpy as np
import transformers

from dpo_jax import reward_model, reward_sources
from dpo_jax.configs.default import default_cache_dir
from dpo_jax.data import tokenize
from tests import train_helpers as th
from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer


def _padded_call(tok) -> None:
    """What the polluter does to the tokenizer it is given."""
    tok(["How are you?", "Hi"], return_tensors="np", padding=True, padding_side="left")


def test_fingerprint_does_not_depend_on_the_last_call():
    tok = train_tokenizer(chat_template=True)
    before = tokenize.tokenizer_fingerprint(tok)
    _padded_call(tok)
    assert tok.backend_tokenizer.padding is not None  # the state transformers leaves behind
    assert tokenize.tokenizer_fingerprint(tok) == before
    tok("a b c d e", truncation=True, max_length=2)
    assert tok.backend_tokenizer.truncation is not None
    assert tokenize.tokenizer_fingerprint(tok) == before
    # the state is gone from the hash, the rest is not: another template still differs
    other = train_tokenizer(chat_template=False)
    assert tokenize.tokenizer_fingerprint(other) != before


def test_padded_call_then_ppo_reward_model_scores_the_sampled_ids(tmp_path):
    """Polluter then victim, in one process: a tokenizer called with padding, saved with
    the policy and the reward model; `reward_model:DIR` must still recognise the policy's
    tokenizer and score the sampled ids, as `reward_from_ids` does (the Python API's path)."""
    tok = train_tokenizer(chat_template=True)
    _padded_call(tok)
    policy = make_tiny_hf_model("llama", tmp_path / "policy", tokenizer=tok)
    rm = make_tiny_hf_model("llama", tmp_path / "rm", tokenizer=tok, seed=1)
    rng = np.random.default_rng(0)
    np.savez(rm / reward_model.HEAD_FILE, kernel=rng.normal(size=64).astype(np.float32),
             bias=np.float32(0.5))  # fmt: skip

    # as `dpo-jax train` does: the policy's tokenizer from its directory, used on prompts
    policy_tok = transformers.AutoTokenizer.from_pretrained(str(policy))
    prompts = [policy_tok(p)["input_ids"] for p in ("How are you?", "Tell me about the sea.")]
    eos = policy_tok.eos_token_id
    comps = [[268, 270, eos], [300, 301, 302]]  # one ended with EOS, one cut at max length
    samples = th.sample_output(prompts, comps, finished=[True, False])
    got = reward_sources.from_spec(f"reward_model:{rm}", policy_tok)(samples)
    learned = reward_model.load_exported(str(rm), tokenizer=policy_tok)
    want = reward_sources.reward_from_ids(learned)(samples)
    np.testing.assert_array_equal(got, want)


def test_default_cache_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    """The tokenized-data cache moves with XDG_CACHE_HOME (the test run points it at its
    scratch directory), read when asked rather than at import."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / "dpo_jax" / "tokenized")
    from dpo_jax.configs import default

    assert default.get_config().data.cache_dir == default_cache_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir().endswith("/.cache/dpo_jax/tokenized")
