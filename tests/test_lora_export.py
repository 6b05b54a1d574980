"""LoRA exports: a merged Hugging Face checkpoint and a PEFT adapter, checked in torch."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import cli, lora, models, train
from dpo_jax.configs import tiny
from dpo_jax.errors import UserError
from tests.hf_fixtures import load_torch_model, torch_logits
from tests.train_helpers import synthetic_batches

# GPT-2: Conv1D layout, fused c_attn (q, k, v adapters become one rank-3r adapter), tied
# embeddings. Llama: scanned layers, GQA, untied, adapters on embeddings and lm_head too.
# llama-int8: an int8 base; the merged export is of the model it trained (family, targets,
# lora.base_dtype).
CASES = {
    "gpt2": ("gpt2", "all-linear", ""),
    "llama": ("llama", "all-linear,embed,lm_head", ""),
    "llama-int8": ("llama", "all-linear", "int8"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def lora_run(request, tmp_path_factory, tiny_hf_dir):
    """Two LoRA DPO steps from a tiny HF model (scanned layers), checkpointed."""
    case = request.param
    family, targets, base_dtype = CASES[case]
    src = tiny_hf_dir(family)
    run_dir = tmp_path_factory.mktemp(f"lora_{case}") / "run"
    config = tiny.get_config()
    config.model.path = str(src)
    config.model.scan_layers = True
    config.run_dir = str(run_dir)
    config.num_steps = 2
    config.grad_accum_steps = 1
    config.batch_size = 2
    config.optim.learning_rate = 5e-2  # big steps: the adapters must move the logits
    config.train.tensorboard = False
    config.checkpoint.enabled = True
    config.lora.rank = 4
    config.lora.alpha = 8.0
    config.lora.targets = targets
    config.lora.base_dtype = base_dtype
    result = train.train(config, train_data=synthetic_batches(num=2, pairs=2, seed=3))
    return case, src, run_dir, result


def _trained_logits(result, ids):
    state = jax.device_get(result.state)
    cfg = result.trainer.model_config
    params = lora.apply_adapters(
        state.base_params, state.params, result.trainer.step_config.lora_scale
    )
    model = models.Transformer(cfg)
    policy = np.asarray(model.apply({"params": params}, jnp.asarray(ids)), np.float32)
    base = np.asarray(model.apply({"params": state.base_params}, jnp.asarray(ids)), np.float32)
    return policy, base


IDS = np.random.default_rng(0).integers(3, 300, size=(2, 12)).astype(np.int32)


def test_export_merge_reloads_in_transformers_with_the_trained_logits(lora_run, tmp_path):
    case, src, run_dir, result = lora_run
    out = tmp_path / "merged"
    assert cli.main(["export", "--checkpoint", str(run_dir), "--output", str(out), "--merge"]) == 0
    want, base = _trained_logits(result, IDS)
    assert float(np.max(np.abs(want - base))) > 1e-2  # the adapters changed the model
    got = torch_logits(load_torch_model(out), IDS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_export_adapter_loads_in_peft_with_the_trained_logits(lora_run, tmp_path):
    from peft import PeftModel

    case, src, run_dir, result = lora_run
    if CASES[case][2] == "int8":
        pytest.skip("PEFT applies the adapter to the float base, not the int8 one trained")
    out = tmp_path / "adapter"
    assert (
        cli.main(["export", "--checkpoint", str(run_dir), "--output", str(out), "--adapter"]) == 0
    )
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(src)
    assert config["fan_in_fan_out"] == (case == "gpt2")
    model = PeftModel.from_pretrained(load_torch_model(src), str(out)).eval()
    want, base = _trained_logits(result, IDS)
    got = torch_logits(model, IDS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with model.disable_adapter():  # PEFT's adapters-off model is our reference
        np.testing.assert_allclose(torch_logits(model, IDS), base, rtol=1e-4, atol=1e-4)


def test_export_adapter_refuses_a_full_fine_tune(tmp_path, tiny_hf_dir):
    src = tiny_hf_dir("llama")
    config = tiny.get_config()
    config.model.path = str(src)
    config.run_dir = str(tmp_path / "run")
    config.num_steps = 1
    config.grad_accum_steps = 1
    config.batch_size = 2
    config.train.tensorboard = False
    config.checkpoint.enabled = True
    train.train(config, train_data=synthetic_batches(num=1, pairs=2, seed=3))
    with pytest.raises(UserError, match="did not train LoRA adapters"):
        cli.main(
            ["export", "--checkpoint", config.run_dir, "--output", str(tmp_path / "a"), "--adapter"]
        )
