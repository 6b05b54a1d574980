"""Model, reference and data from a config: what `dpo_jax.train.train` loads before it
builds the Trainer.

    model_config, params = loading.model_from_config(config)
    ref_params = loading.reference_from_config(config, model_config)
    train_iter, eval_fn, steps_per_epoch = loading.load_data(config, model_config, ref_params)

`resolve_reference_mode` decides which reference the step reads (frozen params, the
adapters-off base, precomputed columns, or none) from the config and the data.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax import data, losses, models, ref_fingerprint, reference
from dpo_jax.errors import UserError, config_error
from dpo_jax.models import attention, hf

log = logging.getLogger(__name__)


def resolve_reference_mode(
    mode: str, loss_name: str, data_has_ref_logps: bool, with_lora: bool = False
) -> str:
    """The reference mode the step runs with ("frozen" | "precomputed" | "none" |
    "adapters_off"); with LoRA, auto picks "adapters_off" (the reference costs nothing)."""
    if not losses.needs_reference(loss_name):
        return "none"
    if mode == "adapters_off" and not with_lora:
        raise config_error(
            "reference.mode", "'adapters_off' is the LoRA policy with adapters disabled",
            "set lora.rank > 0 or use reference.mode=frozen",
        )  # fmt: skip
    if mode == "auto":
        if data_has_ref_logps:
            return "precomputed"
        return "adapters_off" if with_lora else "frozen"
    if mode == "cache":
        return "precomputed"
    if mode == "none":
        raise UserError(f"loss {loss_name!r} needs reference log-probs; reference.mode='none'")
    if mode == "precomputed" and not data_has_ref_logps:
        raise UserError(
            "reference.mode='precomputed' but the training batches carry no 'ref_logps' "
            "(write them with `dpo-jax ref-logps` or use reference.mode='cache')"
        )
    if mode not in ("frozen", "precomputed", "adapters_off"):
        raise UserError(f"unknown reference.mode {mode!r}")
    return mode


def attention_choice(config: ml_collections.ConfigDict) -> str:
    """`model.attention`, checked against the backends of `dpo_jax.models.attention`."""
    choice = config.model.attention
    if choice not in attention.IMPLS:
        raise config_error(
            "model.attention", f"{choice!r} is not an attention backend",
            f"choose one of {', '.join(attention.IMPLS)}",
        )  # fmt: skip
    return choice


def model_from_config(config: ml_collections.ConfigDict) -> tuple[models.ModelConfig, Any]:
    """(model config, params) of the Hugging Face directory `model.path`, laid out as
    `model.scan_layers`, `model.remat` and `model.attention` ask."""
    path = config.model.path
    if not path:
        raise UserError("config.model.path is empty: point it at a Hugging Face model directory")
    # The loader lays the params out for the config (stacked per layer when scanned).
    overrides: dict[str, Any] = {"scan_layers": bool(config.model.scan_layers)}
    if config.model.remat:
        overrides["remat"] = config.model.remat
    overrides["attention_impl"] = attention_choice(config)
    return hf.load_hf(
        path, dtype=config.model.dtype, param_dtype=config.model.param_dtype, **overrides
    )


def reference_from_config(
    config: ml_collections.ConfigDict, model_config: models.ModelConfig
) -> Any:
    """Params of `reference.path`, laid out as the policy's (`model_config`'s scan_layers
    and remat: the layout the step's apply expects).

    The reference runs through the policy's model apply, so its architecture must match.
    """
    ref_config, ref_params = hf.load_hf(
        config.reference.path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
        scan_layers=model_config.scan_layers, remat=model_config.remat,
    )  # fmt: skip
    ignore = ("dtype", "param_dtype", "remat", "attention_impl", "bos_token_id",
              "eos_token_id", "pad_token_id", "init_std")  # fmt: skip
    policy = dataclasses.asdict(model_config)
    differs = [
        k for k, v in dataclasses.asdict(ref_config).items()
        if k not in ignore and policy.get(k) != v
    ]  # fmt: skip
    if differs:
        k = differs[0]
        raise config_error(
            "reference.path",
            f"{config.reference.path} has {k}={getattr(ref_config, k)!r}, the policy "
            f"{getattr(model_config, k)!r} ({len(differs)} architecture field(s) differ)",
            "the reference must have the policy's architecture",
        )
    return ref_params


def _check_unpaired_weights(config: ml_collections.ConfigDict, labels: np.ndarray) -> None:
    """KTO's [1, 4/3] rule on the training set's label counts (warns outside it)."""
    names = losses.loss_names(losses.parse_loss_spec(config.loss.name, config.loss.weights))
    fn = losses.get(names[0])
    params = inspect.signature(fn).parameters
    if "desirable_weight" not in params and "undesirable_weight" not in params:
        return
    hyper = config.loss.hyper

    def weight(name: str) -> float:
        if name in hyper:
            return float(hyper[name])
        default = params[name].default if name in params else 1.0
        return float(default) if default is not inspect.Parameter.empty else 1.0

    n_desirable = int(np.sum(labels))
    losses.check_kto_weights(
        weight("desirable_weight"), weight("undesirable_weight"),
        n_desirable, len(labels) - n_desirable,
    )  # fmt: skip


def _check_ref_fingerprints(
    config: ml_collections.ConfigDict, tokenizer: Any, spec: dict[str, Any]
) -> None:
    """Refuse precomputed reference columns computed with other settings (`ref_fingerprint`)."""
    trusted = ref_fingerprint.check_data(config, tokenizer, spec)
    if trusted:
        log.warning(
            "%s: %d rows carry reference log-probs without a fingerprint; used as they are"
            " (reference.trust_precomputed=True): nothing shows they score this run's tokens",
            spec["path"], trusted,
        )  # fmt: skip


def load_data(
    config: ml_collections.ConfigDict, model_config: models.ModelConfig, ref_params: Any
) -> tuple[Any, Callable[[], Iterable[Mapping[str, Any]]] | None, float]:
    """(train iterator, eval-batches factory or None, steps per epoch) from `config.data`.

    Tokenizes with TRL's convention via `dpo_jax.data`. With `reference.mode="cache"`
    (or a held-out split lacking the columns the training split has) the reference
    log-probs are computed in a first pass and cached in the run directory.
    """
    from transformers import AutoTokenizer  # lazy: transformers is slow to import

    loss_name = losses.parse_loss_spec(config.loss.name, config.loss.weights)
    preference = config.objective.name == "preference"
    paired = losses.is_paired(loss_name) or not preference
    if not config.data.train:
        raise UserError("config.data.train is empty: point it at the training data")
    if config.batch_size % config.grad_accum_steps:
        raise UserError(
            f"batch_size={config.batch_size} is not divisible by grad_accum_steps={config.grad_accum_steps}"
        )
    micro_pairs = config.batch_size // config.grad_accum_steps
    if config.data.layout == "prefix_shared" and config.data.truncation_mode == "keep_end":
        raise config_error(
            "data.truncation_mode",
            "TRL's keep_end truncates chosen and rejected independently, so their prompts"
            " may differ and data.layout='prefix_shared' cannot share them",
            "use keep_start, keep_end_prompt, or the stacked/packed layout",
        )
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    run_dir = config.run_dir or None
    train_spec = data.spec_from_config(config, config.data.train, paired)
    train_set = data.load_preference_data(train_spec, tokenizer, run_dir)
    if not paired:
        _check_unpaired_weights(config, train_set.dense["label"])
    needs_ref = preference and losses.needs_reference(loss_name)
    has_ref = "ref_chosen" in train_set.dense
    if needs_ref and has_ref and config.reference.mode != "frozen":
        _check_ref_fingerprints(config, tokenizer, train_spec)
    if needs_ref and config.reference.mode == "cache" and not has_ref:
        if not run_dir:
            raise UserError("reference.mode='cache' needs config.run_dir for the cache file")
        train_set = reference.cached_ref_logps(
            run_dir, model_config, ref_params, train_set, micro_pairs
        )
        has_ref = True
    train_iter = data.make_train_iterator(
        train_set, micro_pairs, config.data.layout, seed=config.seed,
        shuffle=config.data.shuffle, pad_id=pad_id,
    )  # fmt: skip
    steps_per_epoch = (len(train_set) // micro_pairs) / config.grad_accum_steps
    left_out = len(train_set) % micro_pairs
    if left_out:
        # TRL trains a smaller last batch; static shapes here drop it (docs/FROM_TRL.md).
        log.warning(
            "%d training examples, %d per micro-batch: each epoch leaves out %d of them"
            " (%s); make the data a multiple of batch_size / grad_accum_steps to use all",
            len(train_set), micro_pairs, left_out,
            "a different subset each epoch" if config.data.shuffle else "always the last ones",
        )  # fmt: skip

    eval_fn = None
    if config.data.eval:
        eval_spec = data.spec_from_config(config, config.data.eval, paired)
        eval_set = data.load_preference_data(eval_spec, tokenizer, run_dir)
        if needs_ref and has_ref and "ref_chosen" in eval_set.dense:
            _check_ref_fingerprints(config, tokenizer, eval_spec)
        if needs_ref and has_ref and "ref_chosen" not in eval_set.dense:
            if not run_dir:
                raise UserError("held-out reference log-probs need config.run_dir for the cache")
            eval_set = reference.cached_ref_logps(
                run_dir, model_config, ref_params, eval_set, micro_pairs
            )
        num_eval = config.data.num_eval_examples
        eval_list = data.eval_batches(
            eval_set, min(micro_pairs, len(eval_set)), config.data.layout,
            limit=num_eval if num_eval > 0 else None, process_index=jax.process_index(),
            process_count=jax.process_count(), pad_id=pad_id,
        )  # fmt: skip
        eval_fn = lambda: eval_list

    return train_iter, eval_fn, steps_per_epoch
