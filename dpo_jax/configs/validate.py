"""Config validation: every value `dpo-jax train` reads, checked before any device work.

`validate(config)` checks values alone (ranges, choices, the loss's hyper-parameters);
`check_paths(config, ...)` checks what the config points at on disk (model, data,
run_dir) without writing anything there. `train()` calls both first, so a mistake costs
seconds, not a model load and a compile. Each problem raises `errors.config_error(key,
problem, hint)`: one line naming the dotted key and what to do.

The loss checks work per loss or per mix (`validate_loss(names, hyper)`); a hyper-parameter
is valid when some loss of the mix, or `losses.compute_loss` itself (`rpo_alpha`,
`ld_alpha`, `use_weighting`), takes it as a keyword argument.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpo_jax import hub, losses, metrics, objectives, online, optim, sharding
from dpo_jax.data import LAYOUTS, PARSERS
from dpo_jax.data.sources import expand_paths, parse_spec
from dpo_jax.data.tokenize import TRUNCATION_MODES
from dpo_jax.errors import UserError, config_error
from dpo_jax.train_step import NAN_POLICIES

_MISSING = object()

# Reference modes a config may ask for (docs/CONTRACTS.md "Reference modes").
REFERENCE_MODES = ("auto", "frozen", "precomputed", "cache", "none", "adapters_off")
REMATS = ("", "none", "block", "dots_saveable")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")

# Ranges of the loss hyper-parameters, by keyword name (dpo_jax/losses documents each):
# name -> (low, low_inclusive, high, high_inclusive, what it is).
HYPER_RANGES: dict[str, tuple[float, bool, float, bool, str]] = {
    "beta": (0.0, False, math.inf, False, "the KL strength (TRL default 0.1)"),
    "label_smoothing": (0.0, True, 0.5, False, "the assumed label-flip probability"),
    "desirable_weight": (0.0, False, math.inf, False, "KTO's lambda_D"),
    "undesirable_weight": (0.0, False, math.inf, False, "KTO's lambda_U"),
    "discopop_tau": (0.0, False, math.inf, False, "DiscoPOP's temperature"),
    "simpo_gamma": (0.0, True, math.inf, False, "SimPO's target margin"),
    "rdpo_alpha": (0.0, True, math.inf, False, "R-DPO's length penalty"),
    "dpop_lambda": (0.0, True, math.inf, False, "DPO-Positive's penalty"),
    "unlikelihood_alpha": (0.0, True, math.inf, False, "the unlikelihood weight"),
    "rpo_alpha": (0.0, True, math.inf, False, "the weight of the chosen NLL (RPO)"),
    "ld_alpha": (0.0, True, 1.0, True, "LD-DPO's weight of the longer answer's tail"),
}
HYPER_CHOICES: dict[str, tuple[str, ...]] = {"f_divergence_type": losses.F_DIVERGENCES}


# ----------------------------------------------------------------------------- helpers


def _get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "get") or part not in node:
            return _MISSING
        node = node[part]
    return node


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _interval(low: float, low_incl: bool, high: float, high_incl: bool) -> str:
    if high == math.inf:
        return f"{'>=' if low_incl else '>'} {low:g}"
    left = "[" if low_incl else "("
    right = "]" if high_incl else ")"
    return f"in {left}{low:g}, {high:g}{right}"


def _check_number(
    key: str, value: Any, low: float, low_incl: bool, high: float, high_incl: bool, hint: str = ""
) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise config_error(key, f"must be a finite number, got {value!r}", hint)
    ok_low = value >= low if low_incl else value > low
    ok_high = value <= high if high_incl else value < high
    if not (ok_low and ok_high):
        raise config_error(
            key, f"must be {_interval(low, low_incl, high, high_incl)}, got {value!r}", hint
        )


def _check_int(key: str, value: Any, minimum: int, hint: str = "") -> None:
    if not _is_int(value):
        raise config_error(key, f"must be an integer, got {value!r}", hint)
    if value < minimum:
        raise config_error(key, f"must be >= {minimum}, got {value}", hint)


def _check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"did you mean {close[0]!r}?" if close else ""
        shown = ", ".join(repr(c) for c in choices)
        raise config_error(key, f"{value!r} is not one of {shown}", hint)


# ----------------------------------------------------------------------------- losses


def _keyword_params(fn: Any, skip: Sequence[str] = ()) -> dict[str, inspect.Parameter]:
    params = list(inspect.signature(fn).parameters.values())[1:]  # the stats argument
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name: p for p in params if p.kind in kinds and p.name not in skip}


def batch_options() -> dict[str, inspect.Parameter]:
    """Keyword options of `losses.compute_loss` that apply to any loss (`rpo_alpha`, ...)."""
    return _keyword_params(losses.compute_loss, skip=("loss_type", "loss_weights"))


def loss_params(name: str) -> dict[str, inspect.Parameter]:
    """Keyword hyper-parameters of loss `name` (its function's keyword arguments)."""
    return _keyword_params(losses.get(name))


def _takes_any(name: str) -> bool:
    params = inspect.signature(losses.get(name)).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _check_hyper_value(key: str, value: Any, param: inspect.Parameter | None) -> None:
    hyper = key.rsplit(".", 1)[-1]
    default = param.default if param is not None else inspect.Parameter.empty
    if hyper in HYPER_CHOICES:
        _check_choice(key, value, HYPER_CHOICES[hyper])
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise config_error(key, f"must be true or false, got {value!r}")
    elif _is_number(default) and not _is_number(value):
        raise config_error(key, f"must be a number, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise config_error(key, f"must be a string, got {value!r}")
    if hyper in HYPER_RANGES:
        low, low_incl, high, high_incl, what = HYPER_RANGES[hyper]
        _check_number(key, value, low, low_incl, high, high_incl, f"it is {what}")


def validate_loss(
    names: str | Sequence[str], hyper: Mapping[str, Any], key: str = "loss.hyper"
) -> None:
    """Check a loss (or a mix of losses) and its hyper-parameters, before any compile.

    Every name must be registered; every key of `hyper` must be taken by some loss of
    the mix or by `compute_loss`; values must have the type of the default and lie in
    `HYPER_RANGES`. A `None` value means "not set" (the loss's default) and is skipped.
    """
    # One parser for loss names (registered, no repeats): the one `train()` uses.
    names = losses.loss_names(losses.parse_loss_spec(names))
    options = batch_options()
    taken: dict[str, inspect.Parameter] = {}
    for name in names:
        for param_name, param in loss_params(name).items():
            taken.setdefault(param_name, param)
    open_ended = any(_takes_any(n) for n in names)
    for hyper_name, value in hyper.items():
        if value is None:
            continue
        where = f"{key}.{hyper_name}"
        param = taken.get(hyper_name, options.get(hyper_name))
        if param is None and not open_ended:
            known = sorted({*taken, *options})
            close = difflib.get_close_matches(hyper_name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            hint += f"{'/'.join(names)} takes: {', '.join(known)}"
            if hyper_name == "beta":
                hint += f"; set --config.{where}=None to drop it"
            loss_desc = f"loss {names[0]!r}" if len(names) == 1 else f"no loss of {names}"
            verb = "takes no" if len(names) == 1 else "takes"
            raise config_error(where, f"{loss_desc} {verb} hyper-parameter {hyper_name!r}", hint)
        _check_hyper_value(where, value, param)
    if hyper.get("use_weighting") and not all(losses.is_paired(n) for n in names):
        raise config_error(f"{key}.use_weighting", "WPO applies to paired losses only")
    if len({losses.is_paired(n) for n in names}) > 1:
        raise config_error("loss.name", f"cannot mix paired and unpaired losses {names}")


def _hyper_dict(config: Any) -> dict[str, Any]:
    hyper = _get(config, "loss.hyper")
    if hyper is _MISSING or hyper is None:
        return {}
    return dict(hyper.to_dict()) if hasattr(hyper, "to_dict") else dict(hyper)


# ----------------------------------------------------------------------------- the config


def _validate_objective(value: Any) -> None:
    """`objective.*`, and the settings an objective other than "preference" cannot use."""
    name = value("objective.name")
    if name is _MISSING:
        return
    _check_choice("objective.name", name, tuple(objectives.OBJECTIVES))
    coef = value("objective.center_rewards_coefficient")
    if coef is not _MISSING:
        _check_number("objective.center_rewards_coefficient", coef, 0.0, True, math.inf, False)
    if name == "preference":
        return
    if name == "sft" and value("data.layout") == "prefix_shared":
        raise config_error(
            "data.layout", "'prefix_shared' shares a prompt between two completions; SFT rows "
            "are single sequences", "use data.layout=stacked or packed",
        )  # fmt: skip
    lora_rank = value("lora.rank")
    if objectives.get(name).head is not None and lora_rank not in (_MISSING, 0, None):
        raise config_error(
            "lora.rank", f"objective {name!r} trains a head beside the model, not LoRA adapters",
            "set lora.rank=0",
        )  # fmt: skip
    mode = value("reference.mode")
    if mode not in (_MISSING, "auto", "none"):
        # online DPO's reference is scored by its rollouts (a precomputed column)
        how = (
            "scores its reference in the rollouts"
            if objectives.get(name).uses_reference
            else "uses no reference model"
        )
        raise config_error(
            "reference.mode", f"{mode!r}, but objective {name!r} {how}", "leave it at auto",
        )  # fmt: skip
    if value("reference.ref_model_sync_steps") not in (_MISSING, 0):
        raise config_error(
            "reference.ref_model_sync_steps", f"objective {name!r} has no reference to sync",
            "set it to 0",
        )  # fmt: skip


def validate(config: Any) -> None:
    """Raise `UserError` (via `config_error`) for the first bad value of `config`.

    Pure: reads nothing from disk, touches no device. Keys a config lacks are skipped,
    so partial configs from notebooks and tests validate too.
    """

    def value(key: str) -> Any:
        return _get(config, key)

    def check(key: str, fn: Any, *args: Any) -> None:
        v = value(key)
        if v is not _MISSING:
            fn(key, v, *args)

    batch_size = value("batch_size")
    check("batch_size", _check_int, 1, "pairs per optimizer update, all hosts together")
    check("grad_accum_steps", _check_int, 1, "micro-batches per update")
    accum = value("grad_accum_steps")
    if _is_int(batch_size) and _is_int(accum) and batch_size % accum:
        raise config_error(
            "grad_accum_steps",
            f"{accum} does not divide batch_size={batch_size}",
            "pick a divisor, so every micro-batch holds the same number of pairs",
        )
    steps = value("num_steps")
    if steps is not _MISSING and (not _is_int(steps) or (steps < 1 and steps != -1)):
        raise config_error("num_steps", f"must be >= 1, or -1 to train num_epochs, got {steps!r}")
    if steps == -1:
        check("num_epochs", _check_number, 0.0, False, math.inf, False)

    check("optim.name", _check_choice, optim.OPTIMIZERS)
    check("optim.schedule", _check_choice, optim.SCHEDULES)
    check(
        "optim.learning_rate", _check_number, 0.0, False, math.inf, False,
        "try 1e-6 (TRL's default) to 1e-5",
    )  # fmt: skip
    check("optim.warmup_steps", _check_int, 0)
    check("optim.final_lr_fraction", _check_number, 0.0, True, 1.0, True)
    check("optim.weight_decay", _check_number, 0.0, True, math.inf, False)
    check("optim.max_grad_norm", _check_number, -math.inf, False, math.inf, False)
    for k in ("optim.b1", "optim.b2", "optim.decay", "optim.momentum"):
        check(k, _check_number, 0.0, True, 1.0, False)
    check("optim.eps", _check_number, 0.0, False, math.inf, False)

    check("model.dtype", _check_choice, FLOAT_DTYPES)
    check("model.param_dtype", _check_choice, FLOAT_DTYPES)
    check("model.remat", _check_choice, REMATS)

    for k in ("data.max_length", "data.max_prompt_length"):
        if value(k) is not None:
            check(k, _check_int, 1)
    check("data.truncation_mode", _check_choice, TRUNCATION_MODES)
    check("data.layout", _check_choice, LAYOUTS)
    check("data.format", _check_choice, ("auto", *PARSERS))

    _validate_objective(value)
    if value("online.num_rollouts") is not _MISSING:  # an on-policy method's settings
        online.check(config)

    check("reference.mode", _check_choice, REFERENCE_MODES)
    check("reference.ref_model_sync_steps", _check_int, 0)
    check("reference.ref_model_mixup_alpha", _check_number, 0.0, True, 1.0, True)

    rest = None
    for axis in ("mesh.data", "mesh.fsdp", "mesh.sequence", "mesh.tensor"):
        v = value(axis)
        if v is not _MISSING and (not _is_int(v) or (v < 1 and v != -1)):
            raise config_error(axis, f"must be >= 1, or -1 for the devices left, got {v!r}")
        if v == -1 and rest is not None:
            raise config_error(
                axis, f"-1, but {rest} is -1 already", "at most one axis takes the rest"
            )
        rest = axis if v == -1 else rest
    rules = value("mesh.rules")
    if rules is not _MISSING:
        sharding.validate_rules(rules)

    check("train.nan_policy", _check_choice, NAN_POLICIES)
    check("train.log_every", _check_int, 1)
    check("train.eval_every", _check_int, 0)
    check("train.logps_chunk_size", _check_int, 0)
    check("checkpoint.save_every", _check_int, 1)
    check("checkpoint.keep_every", _check_int, 0)
    if value("checkpoint.export_hf") is True and value("checkpoint.enabled") is False:
        raise config_error(
            "checkpoint.export_hf", "exports the run's last checkpoint, but checkpoint.enabled=False",
            "set checkpoint.enabled=true (or export_hf=false)",
        )  # fmt: skip
    check("train.report_to", lambda _, v: metrics.parse_report_to(v))

    name = value("loss.name")
    if name is not _MISSING:
        weights = value("loss.weights")
        spec = losses.parse_loss_spec(name, None if weights is _MISSING else weights)
        names = losses.loss_names(spec)
        for _, weight in spec:
            _check_number("loss.weights", weight, -math.inf, False, math.inf, False)
        validate_loss(names, _hyper_dict(config))
        micro = batch_size // accum if _is_int(batch_size) and _is_int(accum) else 2
        if micro < 2 and not all(losses.is_paired(n) for n in names):
            raise config_error(
                "batch_size",
                f"{batch_size} / grad_accum_steps={accum} gives micro-batches of 1 example, but "
                f"{names} pairs each example with another of its micro-batch (KL rows)",
                "use at least 2 examples per micro-batch",
            )


# ----------------------------------------------------------------------------- paths


def check_run_dir(path: str | os.PathLike, key: str = "run_dir") -> None:
    """Refuse a run_dir that cannot be created or written, writing nothing inside it.

    The nearest existing ancestor must be a directory in which a file can be created (a
    probe file is created there and removed at once: permission bits alone do not tell,
    e.g. for root or a read-only mount).
    """
    if "://" in os.fspath(path):
        return  # a remote file system (gs://...): its client reports its own errors
    target = Path(path).expanduser()
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == target else f"is under {str(existing)!r}, a file"
        raise config_error(key, f"{str(target)!r} {where}", "choose a directory path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dpo-jax-write-test-", dir=existing)
    except OSError as e:
        raise config_error(
            key,
            f"cannot create {str(target)!r}: {str(existing)!r} is not writable ({e.strerror})",
            "choose a writable directory",
        ) from None
    os.close(fd)
    os.unlink(probe)


def resolve_hub_names(config: Any) -> None:
    """Replace Hub names (`org/name`) in the model keys by their local snapshot dirs."""
    allow = _get(config, "allow_downloads") is True
    for key in ("model.path", "reference.path", "tokenizer"):
        name = _get(config, key)
        if isinstance(name, str) and hub.is_repo_id(name):
            local = hub.snapshot_dir(name, allow_downloads=allow, where=f"config key '{key}'")
            *parents, last = key.split(".")
            node = config
            for part in parents:
                node = node[part]
            node[last] = local


def check_paths(config: Any, *, model: bool = True, data: bool = True) -> None:
    """Check what `config` points at on disk, before loading anything (writes nothing).

    `model`: `model.path` (and `reference.path`) must be existing directories; a Hub name
    `org/name` there or in `tokenizer` is replaced by its snapshot directory in the Hugging
    Face cache (`hub.snapshot_dir`, fetched first when `allow_downloads`); `data`:
    `data.train` / `data.eval` must match files, or be `hf:` / `tfds:` specs or
    `save_to_disk` folders (`sources.parse_spec`); `run_dir` must be creatable and writable.
    """
    if model:
        resolve_hub_names(config)
        keys = ["model.path"] + (["reference.path"] if _get(config, "reference.path") else [])
        for key in keys:
            path = _get(config, key)
            if path is _MISSING:
                continue
            if not path:
                raise config_error(key, "is empty", "point it at a Hugging Face model directory")
            if not os.path.isdir(path):
                problem = "is not a directory" if os.path.exists(path) else "does not exist"
                raise config_error(
                    key, f"{path!r} {problem}", "point it at a Hugging Face model directory"
                )
    if data:
        for key in ("data.train", "data.eval"):
            spec = _get(config, key)
            if key == "data.train" and not spec:
                raise config_error(key, "is empty", "point it at the training data file(s)")
            if isinstance(spec, str) and spec and "path" in parse_spec(spec):
                try:
                    expand_paths(spec)
                except (UserError, FileNotFoundError) as e:
                    raise config_error(key, str(e)) from None
    if _get(config, "online.reward") is not _MISSING:
        online.check_paths(config)
    run_dir = _get(config, "run_dir")
    if run_dir not in (_MISSING, None, ""):
        check_run_dir(run_dir)
