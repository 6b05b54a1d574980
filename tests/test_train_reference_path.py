"""`reference.path`: a reference checkpoint other than the policy, under the default
`scan_layers=True`, in frozen and cache modes; step-1 numbers equal PyTorch's."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dpo_jax import train
from dpo_jax.configs import tiny
from dpo_jax.errors import UserError
from tests.hf_fixtures import load_torch_model, make_tiny_hf_model, train_tokenizer
from tests.test_reference import ROWS, _torch_completion_logp

BETA = 0.1


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("refpath")
    tok = train_tokenizer()
    policy = make_tiny_hf_model("llama", root / "policy", tokenizer=tok, seed=0)
    ref = make_tiny_hf_model("llama", root / "ref", tokenizer=tok, seed=1)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    return root, tok, policy, ref


def _config(root, policy, ref, mode, run):
    c = tiny.get_config()
    c.model.path = str(policy)
    c.reference.path = str(ref)
    c.reference.mode = mode
    c.data.train = str(root / "train.jsonl")
    c.data.shuffle = False
    c.data.max_length = 128
    c.data.max_prompt_length = 128
    c.batch_size = 4
    c.grad_accum_steps = 1
    c.num_steps = 1
    c.train.tensorboard = False
    c.run_dir = str(root / run)
    assert c.model.scan_layers  # the default layout that used to crash
    return c


def _torch_logps(model_dir, tok):
    model = load_torch_model(model_dir)
    return np.array(
        [
            [_torch_completion_logp(model, tok, r["prompt"], r[k]) for k in ("chosen", "rejected")]
            for r in ROWS[:4]
        ]
    )


@pytest.mark.parametrize("mode", ["frozen", "cache"])
def test_reference_path_step1_equals_torch(two_models, mode):
    root, tok, policy, ref = two_models
    result = train.train(_config(root, policy, ref, mode, f"run_{mode}"))
    m = result.history[0]
    pol, rf = _torch_logps(policy, tok), _torch_logps(ref, tok)
    margin = BETA * ((pol[:, 0] - rf[:, 0]) - (pol[:, 1] - rf[:, 1]))
    want_loss = float(np.mean(np.logaddexp(0.0, -margin)))  # -log sigmoid
    assert abs(want_loss - math.log(2)) > 1e-2  # a different reference really is used
    np.testing.assert_allclose(m["loss"], want_loss, rtol=2e-4)
    np.testing.assert_allclose(m["logps/chosen"], pol[:, 0].mean(), rtol=2e-4)
    ref_chosen = m["logps/chosen"] - m["rewards/chosen"] / BETA
    np.testing.assert_allclose(ref_chosen, rf[:, 0].mean(), rtol=2e-4)


def test_reference_path_with_other_architecture_is_a_user_error(two_models, tmp_path):
    root, tok, policy, _ = two_models
    other = make_tiny_hf_model("gpt2", tmp_path / "gpt2", tokenizer=tok)
    with pytest.raises(UserError, match="reference.path"):
        train.train(_config(root, policy, other, "frozen", "run_bad"))
