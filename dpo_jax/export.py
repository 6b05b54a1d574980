"""A training checkpoint as a Hugging Face directory, or a LoRA run's as a PEFT adapter.

    export.export_hf(run_dir, out_dir)        # policy weights, model config, tokenizer
                                              # (a reward model: a sequence classifier)
    export.export_adapter(run_dir, out_dir)   # LoRA run: PEFT adapter directory

Both read one step's params with ``checkpoint.load_params`` (a run directory, its
``checkpoints/`` directory or one step directory; the newest complete step unless
``step`` is given) and never modify the run. `dpo-jax export` is ``dpo_jax.cli.export``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from dpo_jax import checkpoint, lora, models, objectives, paths, reward_model
from dpo_jax.errors import UserError

log = logging.getLogger(__name__)


def export_hf(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    step: int | None = None,
    model_config: Any = None,
    tokenizer: Any = None,
    base: str | os.PathLike | None = None,
    pad_token_id: int | None = None,
) -> pathlib.Path | epath.Path:
    """Write the policy of a checkpoint as a Hugging Face directory (weights, config, tokenizer).

    ``path`` is a run directory, its ``checkpoints`` directory or one step directory.
    The model config and tokenizer saved with the run are used unless given. A LoRA
    run's adapters are merged into its base model (the run's ``model.path`` or ``base``).
    A reward model (``objective.name=reward_model``) is written as the family's
    ``AutoModelForSequenceClassification`` (`reward_classifier`; ``pad_token_id``: see there).
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
    write_hf(output_dir, model_config, params, tokenizer, pad_token_id, where=path)
    log.info("exported step %d of %s to %s", step, path, output_dir)
    return paths.as_path(output_dir) if paths.is_url(output_dir) else pathlib.Path(output_dir)


def write_hf(
    output_dir: str | os.PathLike,
    model_config: Any,
    params: Any,
    tokenizer: Any = None,
    pad_token_id: int | None = None,
    where: Any = "export",
) -> None:
    """Params as a Hugging Face directory: a causal LM, or for reward-model params
    (`{"model", "head"}`) the family's sequence classifier (`reward_classifier`).
    `where` names the source in errors."""
    score_weight, bias = None, 0.0
    if isinstance(params, Mapping) and set(params) == {objectives.MODEL, objectives.HEAD}:
        params, head = params[objectives.MODEL], params[objectives.HEAD]
        model_config, score_weight, bias = reward_classifier(
            model_config, head, tokenizer, pad_token_id, where
        )
        if tokenizer is not None and tokenizer.pad_token_id != model_config.pad_token_id:
            # transformers pads with the tokenizer's pad token: the one the model skips
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model_config.pad_token_id)
    with paths.staged_dir(output_dir) as local:  # save_hf writes local files
        local = pathlib.Path(local)
        models.save_hf(local, model_config, params, tokenizer=tokenizer, score_weight=score_weight)
        if bias:
            # transformers' score head has no bias: record ours (read back by
            # reward_model.load_exported); transformers' scores are ours minus it
            hf_cfg = json.loads((local / "config.json").read_text())
            hf_cfg[reward_model.REWARD_BIAS_KEY] = bias
            (local / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))


def reward_classifier(
    model_config: Any, head: Mapping[str, Any], tokenizer: Any, pad_token_id: int | None, path: Any
) -> tuple[Any, np.ndarray, float]:
    """(model config with its pad id, `score.weight` [1, D], head bias) of a reward model.

    transformers' classifier scores the rightmost token that is not `pad_token_id`; ours
    scores each sequence's last token, the EOS the data appends. So the pad id must not
    be an EOS id: `pad_token_id`, else the tokenizer's pad token, else the model's.
    """
    eos = model_config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, tuple) else {eos}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    candidates = [pad_token_id, getattr(tokenizer, "pad_token_id", None)]
    candidates.append(model_config.pad_token_id)
    pad = next((p for p in candidates if p is not None), None)
    if pad is None or pad in eos_ids:
        raise UserError(
            f"{path}: a reward model exports as a sequence classifier, which scores the last "
            f"token that is not the pad token, but the pad token ({pad}) is "
            f"{'unset' if pad is None else 'the EOS'}; pass --pad-token-id (pad_token_id=) "
            "with an id that never ends a sequence (e.g. a reserved special token)"
        )
    kernel = np.asarray(jax.device_get(head["kernel"]), np.float32).reshape(1, -1)
    bias = float(np.asarray(jax.device_get(head["bias"]), np.float32))
    if bias:
        log.warning(
            "%s: the reward head's bias %.6g is not part of a transformers classifier (its "
            "score head has none): transformers' scores are ours minus it (preferences, "
            "a difference of scores, are unchanged)", path, bias,
        )  # fmt: skip
    return dataclasses.replace(model_config, pad_token_id=int(pad)), kernel, bias


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
