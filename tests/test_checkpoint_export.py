"""Export: a trained run's checkpoint -> Hugging Face directory that transformers loads."""

from __future__ import annotations

import filecmp

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import checkpoint, cli, export, models, train
from dpo_jax.configs import tiny
from tests.hf_fixtures import load_torch_model, torch_logits
from tests.train_helpers import synthetic_batches


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_hf_dir):
    """Two DPO steps from a tiny HF Llama, checkpointed with its tokenizer."""
    src = tiny_hf_dir("llama")
    cfg, params0 = models.load_hf(src, dtype=jnp.float32, param_dtype=jnp.float32)
    run_dir = tmp_path_factory.mktemp("export") / "run"
    config = tiny.get_config()
    config.run_dir = str(run_dir)
    config.num_steps = 2
    config.grad_accum_steps = 1
    config.batch_size = 2
    config.optim.learning_rate = 5e-2  # big steps: exported weights must differ from the source
    config.train.tensorboard = False
    config.checkpoint.enabled = True
    ckpt = checkpoint.Checkpointer.from_config(config, model_config=cfg, tokenizer=src)
    result = train.train(
        config,
        train_data=synthetic_batches(num=2, pairs=2, seed=3),
        model_config=cfg,
        params=params0,
        checkpointer=ckpt,
    )
    return src, cfg, params0, run_dir, result


def test_export_loads_in_transformers_with_the_trained_logits(trained_run, tmp_path, tokenizer):
    src, cfg, params0, run_dir, result = trained_run
    out = export.export_hf(run_dir, tmp_path / "hf")
    trained = jax.device_get(result.state.params)
    # The export is of the trained policy, not of the source weights.
    moved = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params0), strict=True)
    )
    assert moved > 1e-3

    ids = np.random.default_rng(0).integers(3, 300, size=(2, 12)).astype(np.int32)
    want = np.asarray(
        models.Transformer(cfg).apply({"params": trained}, jnp.asarray(ids)), np.float32
    )
    got = torch_logits(load_torch_model(out), ids)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    # And not merely close to the source model's logits.
    before = np.asarray(models.Transformer(cfg).apply({"params": params0}, jnp.asarray(ids)))
    assert np.max(np.abs(got - before)) > 1e-2

    from transformers import AutoTokenizer

    exported_tok = AutoTokenizer.from_pretrained(out)
    text = "the cat sat on the mat"
    assert exported_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert exported_tok.eos_token == tokenizer.eos_token


def test_export_cli_and_step_selection(trained_run, tmp_path):
    _, cfg, _, run_dir, _ = trained_run
    via_api = export.export_hf(run_dir / "checkpoints", tmp_path / "api")
    assert (
        cli.main(["export", "--checkpoint", str(run_dir), "--output", str(tmp_path / "cli")]) == 0
    )
    for name in ("config.json", "model.safetensors"):
        assert filecmp.cmp(via_api / name, tmp_path / "cli" / name, shallow=False), name

    # A specific step (the step-1 save does not exist: save_every is 500, so only the
    # final forced save at step 2 is there) and a step directory path.
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]
    with pytest.raises(FileNotFoundError, match="no step 1"):
        export.export_hf(run_dir, tmp_path / "x", step=1)
    step_dir = export.export_hf(run_dir / "checkpoints" / "2", tmp_path / "stepdir")
    assert filecmp.cmp(via_api / "model.safetensors", step_dir / "model.safetensors", shallow=False)


def test_export_of_a_missing_dir_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        export.export_hf(tmp_path / "nowhere", tmp_path / "out")


def test_saved_models_loads_a_checkpoint_with_the_runs_tokenizer(trained_run, tokenizer):
    """`saved_models.load_model` and `export_hf` find the run's tokenizer/ the same way, from
    the run, checkpoints or step directory."""
    from dpo_jax import saved_models

    _, cfg, _, run_dir, result = trained_run
    want = jax.device_get(result.state.params)
    expected_tok = run_dir / checkpoint.TOKENIZER_SUBDIR
    text = "the cat sat on the mat"
    # the run dir holds the training config.json: it must not be taken for an HF dir
    for where in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "2"):
        assert checkpoint.run_tokenizer_dir(where) == checkpoint.as_path(expected_tok)
        got_cfg, got, tok = saved_models.load_model(str(where))
        assert got_cfg.hidden_size == cfg.hidden_size and got_cfg.num_layers == cfg.num_layers
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert checkpoint.run_tokenizer_dir(run_dir.parent) is None
