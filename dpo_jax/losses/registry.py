"""The loss registry, loss mixes and the option checks TRL makes.

`register`, `get`, `names` (registration order), `is_paired`, `needs_reference`,
`needs_log1m`; `parse_loss_spec` reads `loss.name` / `loss.weights` into a `LossSpec`
(TRL's `loss_type` list with `loss_weights`); `accepted_hypers`, `check_options` and
`trl_differences` check `loss.hyper` before any compile; `init_loss_state` starts the
running statistics of stateful losses (`register(..., state_init=, state_update=)`).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dpo_jax.errors import config_error
from dpo_jax.losses.shared import F_DIVERGENCE_LOSSES, F_DIVERGENCES, Array, LossFn

_REGISTRY: dict[str, LossFn] = {}
_PAIRED: dict[str, bool] = {}
_NEEDS_REFERENCE: dict[str, bool] = {}
_NEEDS_LOG1M: dict[str, bool] = {}
# Losses with running statistics carried in the train state: name -> (init, update).
_STATE: dict[str, tuple[Callable[[], Any], Callable[..., Any]]] = {}

# A loss specification: (name, weight) terms summed as TRL's `loss_type` / `loss_weights`.
LossSpec = tuple[tuple[str, float], ...]


def register(
    name: str,
    fn: LossFn | None = None,
    *,
    paired: bool = True,
    needs_reference: bool = True,
    needs_log1m: bool = False,
    state_init: Callable[[], Any] | None = None,
    state_update: Callable[..., Any] | None = None,
):
    """Registers `fn` as loss `name`; works as `@register("x")` and `register("x")(fn)`.

    `paired` says the loss takes `PreferenceStats` (False: `UnpairedStats`);
    `needs_reference` tells the trainer whether to compute reference log-probs;
    `needs_log1m` whether the policy forward must also sum log(1 - p_t) per sequence.
    A loss with running statistics (BCO's reward shift) gives `state_init() -> state`
    and `state_update(state, stats, **hyper) -> state`; the train step keeps the state
    in `TrainState.loss_state[name]`, updates it before each micro-batch's loss and
    passes the updated state to `fn` as `loss_state=`.
    Registering a taken name replaces it with a warning (notebook cells get re-run).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"losses.register: name must be a non-empty string, got {name!r}")
    if (state_init is None) != (state_update is None):
        raise ValueError(f"losses.register({name!r}): give both state_init and state_update")

    def decorator(loss_fn: LossFn) -> LossFn:
        if not callable(loss_fn):
            raise TypeError(f"losses.register({name!r}): {loss_fn!r} is not callable")
        if name in _REGISTRY and _REGISTRY[name] is not loss_fn:
            warnings.warn(
                f"losses.register: replacing the loss registered as {name!r}", stacklevel=2
            )
        _REGISTRY[name] = loss_fn
        _PAIRED[name] = paired
        _NEEDS_REFERENCE[name] = needs_reference
        _NEEDS_LOG1M[name] = needs_log1m
        _STATE.pop(name, None)
        if state_init is not None:
            _STATE[name] = (state_init, state_update)
        return loss_fn

    return decorator if fn is None else decorator(fn)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(f"unknown loss {name!r}.{hint} Registered losses: {sorted(_REGISTRY)}")


def get(name: str) -> LossFn:
    """The loss registered as `name`; a KeyError lists the registered names."""
    _check_name(name)
    return _REGISTRY[name]


def names() -> list[str]:
    """Every registered loss name, in registration order."""
    return list(_REGISTRY)


def loss_names(loss: str | Sequence[Any]) -> list[str]:
    """The loss names of a name, a list of names or a `LossSpec`."""
    if isinstance(loss, str):
        return [loss]
    return [term if isinstance(term, str) else term[0] for term in loss]


def is_paired(loss: str | Sequence[Any]) -> bool:
    """True if the loss (a name or a mix) takes `PreferenceStats`, False if `UnpairedStats`.

    A mix of paired and unpaired losses is a `UserError`.
    """
    kinds = set()
    for name in loss_names(loss):
        _check_name(name)
        kinds.add(_PAIRED[name])
    if len(kinds) > 1:
        raise config_error(
            "loss.name",
            f"{loss_names(loss)} mixes paired and unpaired (KTO-style) losses",
            "a mix takes one kind of data: use losses of one kind",
        )
    return kinds.pop()


def needs_reference(loss: str | Sequence[Any]) -> bool:
    """True if the loss (or any loss of a mix) reads reference log-probs."""
    for name in loss_names(loss):
        _check_name(name)
    return any(_NEEDS_REFERENCE[n] for n in loss_names(loss))


def needs_log1m(loss: str | Sequence[Any]) -> bool:
    """True if the loss (or any of a mix) reads `PreferenceStats.{chosen,rejected}_log1m_sum`."""
    for name in loss_names(loss):
        _check_name(name)
    return any(_NEEDS_LOG1M[n] for n in loss_names(loss))


def _parse_list(value: Any, key: str) -> list[Any]:
    """A list from a list/tuple, a scalar, `"[a, b]"` / `"(a, b)"` or `"a,b"` (command line)."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[(":
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError) as e:
                raise config_error(key, f"cannot parse {value!r} as a list ({e})") from None
            return list(parsed) if isinstance(parsed, list | tuple) else [parsed]
        return [part.strip().strip("'\"") for part in text.split(",")]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def parse_loss_spec(name: Any, weights: Any = None) -> LossSpec:
    """`loss.name` / `loss.weights` as ((name, weight), ...), TRL's `loss_type` / `loss_weights`.

    `name` is one name, a list, or its command-line string `"['sigmoid','sft']"` or
    `"sigmoid,sft"`; `weights` None (all 1.0), a number, a matching list or its string.
    Unknown or repeated names, a weight count that does not match, or a mix of paired
    and unpaired losses raise `UserError` naming the config key.
    """
    loss_list = [str(n).strip() for n in _parse_list(name, "loss.name")]
    if not loss_list or any(not n for n in loss_list):
        raise config_error(
            "loss.name", f"no loss name in {name!r}", f"valid names: {sorted(_REGISTRY)}"
        )
    unknown = [n for n in loss_list if n not in _REGISTRY]
    if unknown:
        close = [c for n in unknown for c in difflib.get_close_matches(n, _REGISTRY, n=2)]
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise config_error(
            "loss.name",
            f"unknown loss {', '.join(map(repr, unknown))}",
            f"{hint}valid names: {sorted(_REGISTRY)}",
        )
    repeated = sorted({n for n in loss_list if loss_list.count(n) > 1})
    if repeated:
        raise config_error(
            "loss.name",
            f"{repeated} listed twice",
            "give each loss once and set its weight in loss.weights",
        )
    if (
        weights is None
        or (isinstance(weights, str) and not weights.strip())
        or (isinstance(weights, list | tuple) and not weights)
    ):
        weight_list = [1.0] * len(loss_list)
    else:
        try:
            weight_list = [float(w) for w in _parse_list(weights, "loss.weights")]
        except (TypeError, ValueError):
            raise config_error("loss.weights", f"{weights!r} is not a list of numbers") from None
    if len(weight_list) != len(loss_list):
        raise config_error(
            "loss.weights",
            f"{len(weight_list)} weights {weight_list} for {len(loss_list)} losses {loss_list}",
            "give one weight per loss in loss.name",
        )
    if not all(math.isfinite(w) for w in weight_list):
        raise config_error("loss.weights", f"weights must be finite, got {weight_list}")
    spec = tuple(zip(loss_list, weight_list, strict=True))
    is_paired(spec)  # refuses a paired/unpaired mix
    return spec


# --------------------------------------------------------------------------------------
# Hyper-parameters: what each loss accepts, and the checks TRL makes
# --------------------------------------------------------------------------------------

# Batch-level options `compute_loss` takes itself (paired losses), as TRL's DPOConfig.
BATCH_OPTIONS = ("rpo_alpha", "use_weighting", "ld_alpha")
# f-divergence options: every DPOConfig carries them, so a loss that ignores them does not
# make them "unused" (`check_options` refuses an f other than reverse_kl where TRL does).
F_OPTIONS = ("f_divergence_type", "f_alpha_divergence_coef")
_NOT_HYPERS = ("stats", "loss_state")


def _accepts(fn: Callable[..., Any], hyper: str) -> bool:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return True  # e.g. a `combined(...)` loss forwards everything
    p = params.get(hyper)
    return p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)


def accepted_hypers(loss: str | Sequence[Any]) -> frozenset[str]:
    """Every `loss.hyper` key the loss (or mix) accepts: its keyword arguments plus the
    batch-level options (paired losses) and the f-divergence options.

    For config validation: a key outside this set is a typo. A loss taking `**kwargs`
    contributes no names (it forwards to other losses, whose names count).
    """
    accepted = set(F_OPTIONS)
    for name in loss_names(loss):
        for p in list(inspect.signature(get(name)).parameters.values())[1:]:
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _NOT_HYPERS:
                accepted.add(p.name)
    if is_paired(loss):
        accepted.update(BATCH_OPTIONS)
    return frozenset(accepted)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_options(loss: str | Sequence[Any], hyper: Mapping[str, Any]) -> None:
    """Refuse what TRL 1.16 refuses, before any compile; raises `UserError` naming the key.

    An f-divergence other than reverse_kl with a loss that takes plain log-ratios (see
    `F_DIVERGENCE_LOSSES`), an unknown f-divergence, `exo_pair` with epsilon
    (`label_smoothing`) outside (0, 1), `robust` with label_smoothing outside [0, 0.5),
    WPO weighting with the sorting `aot` losses. Traced (sweep) values are not checked.
    """
    names_ = loss_names(loss)
    kind = hyper.get("f_divergence_type", "reverse_kl")
    if kind not in F_DIVERGENCES:
        raise config_error(
            "loss.hyper.f_divergence_type",
            f"unknown f-divergence {kind!r}",
            f"use one of {F_DIVERGENCES}",
        )
    if kind != "reverse_kl":
        takes = [n for n in names_ if _accepts(get(n), "f_divergence_type")]
        refused = [n for n in names_ if n not in takes and _NEEDS_REFERENCE[n]]
        if refused or not takes:
            raise config_error(
                "loss.hyper.f_divergence_type",
                f"{kind!r} does not apply to {refused or names_} (TRL 1.16 allows it only with "
                f"{list(F_DIVERGENCE_LOSSES)}, plus 'sft' in a mix)",
                "use f_divergence_type='reverse_kl' with these losses",
            )
    coef = hyper.get("f_alpha_divergence_coef")
    if kind == "alpha_divergence" and _is_number(coef) and not math.isfinite(coef):
        raise config_error("loss.hyper.f_alpha_divergence_coef", f"must be finite, got {coef}")
    smoothing = hyper.get("label_smoothing")
    if "exo_pair" in names_ and smoothing is not None:
        _check_exo_epsilon(smoothing)
    if "robust" in names_ and _is_number(smoothing) and not 0.0 <= smoothing < 0.5:
        raise config_error(
            "loss.hyper.label_smoothing",
            f"robust needs 0 <= label_smoothing < 0.5 (the label-noise rate), got {smoothing}",
        )
    sorting = [n for n in names_ if n in ("aot", "aot_unpaired")]
    if hyper.get("use_weighting") and sorting:
        raise config_error(
            "loss.hyper.use_weighting",
            f"WPO weighting does not apply to {sorting}: they sort pairs, misaligning the weights",
            "as TRL 1.16, set use_weighting=False with these losses",
        )


def trl_differences(loss: str | Sequence[Any], hyper: Mapping[str, Any]) -> list[str]:
    """Settings whose meaning here differs from TRL 1.16 `DPOTrainer`, one message each.

    `train()` logs them once at start, so a ported config does not change meaning
    silently. Today: label_smoothing on `sigmoid` is cDPO here and ignored by TRL 1.16.
    """
    messages = []
    smoothing = hyper.get("label_smoothing")
    if (
        "sigmoid" in loss_names(loss)
        and smoothing is not None
        and not (_is_number(smoothing) and smoothing == 0)
    ):
        messages.append(
            f"loss.hyper.label_smoothing={smoothing} with loss 'sigmoid' is conservative DPO "
            "(cDPO, as the original DPO code): -(1-e) log s(beta h) - e log s(-beta h). "
            "TRL 1.16 ignores label_smoothing for 'sigmoid'; set it to 0 for TRL's numbers"
        )
    return messages


def init_loss_state(loss: str | Sequence[Any]) -> dict[str, Any] | None:
    """The initial running statistics of the stateful losses of `loss`, or None if none."""
    state = {n: _STATE[n][0]() for n in loss_names(loss) if n in _STATE}
    return state or None


# exo_pair's epsilon, checked by `check_options` and by the loss itself (losses.paired).
def _check_exo_epsilon(label_smoothing: float | Array) -> None:
    # Python numbers only: a traced sweep value cannot be checked here.
    if isinstance(label_smoothing, int | float) and not 0.0 < label_smoothing < 1.0:
        raise config_error(
            "loss.hyper.label_smoothing",
            f"exo_pair needs 0 < label_smoothing < 1 (its epsilon), got {label_smoothing}",
            "the EXO paper uses 1e-3",
        )
