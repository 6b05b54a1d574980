"""A model to run from a directory: a Hugging Face export or a training run / checkpoint.

    cfg, params, tokenizer = saved_models.load_model(path)

`dpo-jax sample` (`dpo_jax/cli/sample.py`) and the model judge (`judge.py`) load their
models here; training loads its model from the config (`train.py`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from dpo_jax import checkpoint, models
from dpo_jax.errors import UserError


def is_hf_dir(path: str) -> bool:
    """True for a directory holding ``config.json`` and safetensors weights."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        name.endswith(".safetensors") for name in os.listdir(path)
    )


def load_model(
    path: str,
    tokenizer_path: str | None = None,
    dtype: str = "float32",
    step: int | None = None,
    **hf_overrides: Any,
) -> tuple[Any, Any, Any]:
    """``(cfg, params, tokenizer)`` from a Hugging Face directory or a training checkpoint.

    A directory with ``config.json`` and safetensors weights is read with
    ``models.load_hf``; anything else (a run directory holds the training config as
    ``config.json`` but no weights) is treated as a run / checkpoints / step directory
    of ``dpo_jax.checkpoint``
    (model config from the checkpoint's metadata, tokenizer from the run's
    ``tokenizer/`` unless ``tokenizer_path`` is given). ``hf_overrides`` go to
    ``models.load_hf`` (e.g. ``scan_layers=`` to match a checkpoint's layout).
    """
    from transformers import AutoTokenizer  # lazy: transformers is slow to import

    jdtype = jnp.dtype(dtype)
    if is_hf_dir(path):
        cfg, params = models.load_hf(path, dtype=jdtype, param_dtype=jdtype, **hf_overrides)
        tok_dir = tokenizer_path or path
    else:
        _, meta, params = checkpoint.load_params(path, step)
        saved = meta.get("model_config")
        if not saved:
            raise UserError(
                f"{path}: checkpoint has no model config; export it with `dpo-jax export`"
            )
        cfg = models.ModelConfig.from_dict({**saved, "dtype": dtype, "param_dtype": dtype})
        params = jax.tree.map(lambda x: jnp.asarray(x, jdtype), params)
        tok_dir = tokenizer_path
        if tok_dir is None:
            found = checkpoint.run_tokenizer_dir(path)
            tok_dir = None if found is None else os.fspath(found)
        if tok_dir is None:
            raise UserError(f"{path}: no tokenizer/ next to the checkpoint; pass --tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    return cfg, params, tokenizer
