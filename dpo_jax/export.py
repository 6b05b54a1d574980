"""A training checkpoint as a Hugging Face directory, or a LoRA run's as a PEFT adapter.

    export.export_hf(run_dir, out_dir)        # policy weights, model config, tokenizer
    export.export_adapter(run_dir, out_dir)   # LoRA run: PEFT adapter directory

Both read one step's params with ``checkpoint.load_params`` (a run directory, its
``checkpoints/`` directory or one step directory; the newest complete step unless
``step`` is given) and never modify the run. `dpo-jax export` is ``dpo_jax.cli.export``.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from dpo_jax import checkpoint, lora, models, paths
from dpo_jax.errors import UserError

log = logging.getLogger(__name__)


def export_hf(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    step: int | None = None,
    model_config: Any = None,
    tokenizer: Any = None,
    base: str | os.PathLike | None = None,
) -> pathlib.Path | epath.Path:
    """Write the policy of a checkpoint as a Hugging Face directory (weights, config, tokenizer).

    ``path`` is a run directory, its ``checkpoints`` directory or one step directory.
    The model config and tokenizer saved with the run are used unless given. A LoRA
    run's adapters are merged into its base model (the run's ``model.path`` or ``base``).
    """
    step, meta, params = checkpoint.load_params(path, step)
    if model_config is None:
        saved = meta.get("model_config")
        if not saved:
            raise checkpoint.CheckpointError(
                f"{path}: step {step} has no model config (the run did not pass "
                "model_config= to Checkpointer); pass model_config= to export_hf"
            )
        model_config = models.ModelConfig.from_dict(saved)
    if lora.config_of_run(meta.get("config")) is not None:
        params = lora.merged_checkpoint_params(meta, params, model_config, base, path)
    if tokenizer is None:
        tok_dir = checkpoint.run_tokenizer_dir(path)
        if tok_dir is not None:
            tokenizer = _load_tokenizer(tok_dir)
        else:
            log.warning("%s: no saved tokenizer found; exporting weights and config only", path)
    elif isinstance(tokenizer, str | os.PathLike):
        tokenizer = _load_tokenizer(paths.as_path(tokenizer))
    head = None
    if isinstance(params, Mapping) and set(params) == {"model", "head"}:
        # an objective with a head (reward model): the HF directory holds the model, and
        # head.npz beside it the head (objectives.HEAD)
        params, head = params["model"], params["head"]
    with paths.staged_dir(output_dir) as local:  # save_hf writes local files
        models.save_hf(pathlib.Path(local), model_config, params, tokenizer=tokenizer)
        if head is not None:
            np.savez(
                pathlib.Path(local) / "head.npz", **{k: np.asarray(v) for k, v in head.items()}
            )
    log.info("exported step %d of %s to %s", step, path, output_dir)
    return paths.as_path(output_dir) if paths.is_url(output_dir) else pathlib.Path(output_dir)


def export_adapter(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    step: int | None = None,
    base: str | os.PathLike | None = None,
) -> pathlib.Path:
    """`dpo-jax export --adapter`: a LoRA checkpoint -> a PEFT adapter directory."""
    step, meta, adapters = checkpoint.load_params(path, step)
    lcfg = lora.require_lora(meta, path)
    saved = meta.get("model_config")
    if not saved:
        raise UserError(f"{path}: step {step} has no model config; it cannot be exported")
    model_config = models.ModelConfig.from_dict(saved)
    return lora.save_peft(
        output_dir, adapters, model_config, lcfg, lora.base_model_path(meta, base)
    )


def _load_tokenizer(directory: epath.Path) -> Any:
    from transformers import AutoTokenizer  # lazy: transformers is slow to import

    with paths.local_copy(directory) as local:  # transformers reads local files only
        return AutoTokenizer.from_pretrained(local)
