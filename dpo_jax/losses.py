"""The preference-loss catalogue: every DPO-family loss as a pure, jit-able JAX function.

Read this file top to bottom:

1. the two inputs losses see (`PreferenceStats` for pairs, `UnpairedStats` for KTO),
2. the registry (`register`, `get`, `names`, `is_paired`, `needs_reference`), loss mixes
   (`parse_loss_spec`: TRL's `loss_type` list with `loss_weights`) and the option checks
   TRL makes (`check_options`, `accepted_hypers`, `trl_differences`),
3. the shared pieces (log-ratios, f-divergence scores, TRL metrics, `CountedMean` subset
   metrics, `RunningMean` for BCO's reward shift),
4. the catalogue itself, one short function per loss with its paper and formula,
5. the batch-level options TRL users know (`ld_alpha`, WPO `use_weighting`, `rpo_alpha`,
   several `loss_type`s with `loss_weights`) gathered in `compute_loss`, and
   `compute_loss_with_state` for losses with running statistics (`bco_pair_shifted`).

Notation used in every docstring (all per example, summed over completion tokens):

    logr_c = log pi(y_c|x) - log pi_ref(y_c|x)     chosen log-ratio
    logr_r = log pi(y_r|x) - log pi_ref(y_r|x)     rejected log-ratio
    h      = logr_c - logr_r                       the DPO margin
    |y|    = completion length in tokens
    s      = log_sigmoid,  sig = sigmoid
    cDPO(x) = -(1-e) s(x) - e s(-x)                label-smoothed logistic loss, e = label_smoothing

A loss is `fn(stats, **hyper) -> (per_example_loss_B, metrics)`, metrics being float32
scalars under TRL's names (`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
`rewards/margins`, `logps/chosen`, `logps/rejected`), or `CountedMean`s for means over a
subset of the batch (KTO). Hyper-parameters are keyword
arguments named as in TRL and are plain Python numbers or (for sweeps) JAX scalars;
string options (`f_divergence_type`) are static. Inputs are upcast to float32 first, so
bf16 log-probs in the thousands do not overflow or lose the margin.

Add your own loss next to these, in a notebook or a module:

    @losses.register("my_loss")
    def my_loss(stats, beta=0.1):
        h = losses.margin(stats)
        return -jax.nn.log_sigmoid(beta * h) ** 3, losses.reward_metrics(stats, beta)
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from dpo_jax.errors import config_error
from dpo_jax.metric_accumulators import CountedMean as CountedMean  # re-exported
from dpo_jax.metric_accumulators import MeanDifference, RunningMean, subset_mean
from dpo_jax.metric_accumulators import finalize_metrics as finalize_metrics  # re-exported
from dpo_jax.metric_accumulators import is_counted as is_counted  # re-exported

Array = jax.Array
Metrics = dict[str, Array]
LossFn = Callable[..., tuple[Array, Metrics]]

# --------------------------------------------------------------------------------------
# 1. What a loss sees
# --------------------------------------------------------------------------------------


@flax.struct.dataclass
class PreferenceStats:
    """Per-pair sequence statistics of a preference batch; every array is `[B]`.

    Log-probs are sums over completion tokens. Optional fields are None when absent;
    a loss that needs one raises a ValueError naming it.
    """

    chosen_logps: Array
    rejected_logps: Array
    ref_chosen_logps: Array | None = None
    ref_rejected_logps: Array | None = None
    chosen_lengths: Array | None = None  # completion token counts
    rejected_lengths: Array | None = None
    # WPO (Zhou et al. 2024) per-sequence weight exp(mean_t[log p_t - log sum_v p_v^2]).
    chosen_weights: Array | None = None
    rejected_weights: Array | None = None
    # LD-DPO (Liu et al. 2024): log-prob sums over the first min(len_c, len_r) tokens.
    chosen_prefix_logps: Array | None = None
    rejected_prefix_logps: Array | None = None
    ref_chosen_prefix_logps: Array | None = None
    ref_rejected_prefix_logps: Array | None = None
    # Unlikelihood (Welleck et al. 2019): sums of log(1 - p_t) over completion tokens.
    chosen_log1m_sum: Array | None = None
    rejected_log1m_sum: Array | None = None


@flax.struct.dataclass
class UnpairedStats:
    """Per-example statistics of an unpaired (KTO) batch; every array is `[B]`.

    `kl_logps` / `ref_kl_logps` score a mismatched completion for the same prompt (the
    batch's KL pairs), used only to estimate the KTO reference point z0.
    """

    logps: Array
    ref_logps: Array | None = None
    kl_logps: Array | None = None
    ref_kl_logps: Array | None = None
    labels: Array | None = None  # 1 desirable, 0 undesirable
    lengths: Array | None = None


# --------------------------------------------------------------------------------------
# 2. The registry
# --------------------------------------------------------------------------------------

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
# 2b. Hyper-parameters: what each loss accepts, and the checks TRL makes
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


# --------------------------------------------------------------------------------------
# 3. Shared pieces
# --------------------------------------------------------------------------------------


def _f32(x: Array) -> Array:
    # Everything is computed in float32: bf16 keeps 8 mantissa bits, so two log-probs near
    # -2000 differ by multiples of 8 there, and exp() of them overflows.
    return jnp.asarray(x, jnp.float32)


def require(stats: Any, name: str, loss: str) -> Array:
    """`stats.<name>` as float32, or a ValueError naming the missing field and the loss."""
    value = getattr(stats, name, None)
    if value is None:
        raise ValueError(
            f"loss {loss!r} needs {type(stats).__name__}.{name}, which is None "
            f"(build the stats with it, e.g. pass reference log-probs or lengths)"
        )
    return _f32(value)


def log_ratios(stats: PreferenceStats, loss: str = "?") -> tuple[Array, Array]:
    """(logr_c, logr_r): policy minus reference log-probs of chosen and rejected."""
    chosen = require(stats, "chosen_logps", loss) - require(stats, "ref_chosen_logps", loss)
    rejected = require(stats, "rejected_logps", loss) - require(stats, "ref_rejected_logps", loss)
    return chosen, rejected


def margin(stats: PreferenceStats, loss: str = "?") -> Array:
    """h = logr_c - logr_r, the DPO margin `[B]`."""
    chosen, rejected = log_ratios(stats, loss)
    return chosen - rejected


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_ALPHA_DIVERGENCE_COEF = 0.5  # TRL's DPOConfig default (at 1.0 the alpha-divergence is DPO)
# The losses TRL 1.16 allows under an f-divergence other than reverse_kl: the f-DPO
# reparameterisation leaves a beta log Z(x) term that cancels only in a chosen-minus-
# rejected score, so nca_pair, bco_pair, sppo_hard, apo_zero/down and aot take plain
# log-ratios and are refused with another f (`check_options`). `sft` ignores scores.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")
_EXP_CAP = 80.0  # exp(80) ~ 5e34 stays finite in float32 (TRL caps its alpha-divergence there too)


def f_scores(
    stats: PreferenceStats,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
    loss: str = "?",
) -> tuple[Array, Array]:
    """Chosen and rejected scores f'(u) of the ratio u = pi/pi_ref (Wang et al. 2023, f-DPO).

    With r = log u, as TRL 1.16 (constants included: they cancel in the margin of
    `sigmoid`, but not once `ipo` / `sigmoid_norm` divide each score by its length):
    reverse_kl: r (plain DPO); forward_kl: 1 - e^(-r); js_divergence: log 2 + s(r);
    alpha_divergence: (e^((a-1) r) - 1)/(a-1), reverse_kl at a = 1.
    """
    chosen, rejected = log_ratios(stats, loss)
    if f_divergence_type == "reverse_kl":
        return chosen, rejected
    if f_divergence_type == "forward_kl":
        score = lambda r: 1.0 - jnp.exp(jnp.minimum(-r, _EXP_CAP))
    elif f_divergence_type == "js_divergence":
        score = lambda r: math.log(2.0) + jax.nn.log_sigmoid(r)
    elif f_divergence_type == "alpha_divergence":
        a = float(f_alpha_divergence_coef)
        if abs(a - 1.0) < 1e-6:  # the limit a -> 1 is log u
            return chosen, rejected
        score = lambda r: (jnp.exp(jnp.minimum((a - 1.0) * r, _EXP_CAP)) - 1.0) / (a - 1.0)
    else:
        raise config_error(
            "loss.hyper.f_divergence_type",
            f"unknown f-divergence {f_divergence_type!r} (loss {loss!r})",
            f"use one of {F_DIVERGENCES}",
        )
    return score(chosen), score(rejected)


def _mean(x: Array) -> Array:
    return jnp.mean(jax.lax.stop_gradient(_f32(x)))


def metrics_from_rewards(
    chosen_rewards: Array, rejected_rewards: Array, chosen_logps: Array, rejected_logps: Array
) -> Metrics:
    """TRL's six metric scalars from per-example rewards and log-probs (no gradient)."""
    return {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/accuracies": _mean(chosen_rewards > rejected_rewards),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "logps/chosen": _mean(chosen_logps),
        "logps/rejected": _mean(rejected_logps),
    }


def reward_metrics(stats: PreferenceStats, beta: float | Array, loss: str = "?") -> Metrics:
    """TRL metrics with implicit rewards beta * log-ratio (what DPOTrainer logs)."""
    chosen, rejected = log_ratios(stats, loss)
    return metrics_from_rewards(
        beta * chosen, beta * rejected, stats.chosen_logps, stats.rejected_logps
    )


def mean_logps(stats: PreferenceStats, loss: str = "?") -> tuple[Array, Array]:
    """Per-token average policy log-probs (chosen, rejected); lengths are clamped at 1."""
    chosen = require(stats, "chosen_logps", loss) / jnp.maximum(
        require(stats, "chosen_lengths", loss), 1.0
    )
    rejected = require(stats, "rejected_logps", loss) / jnp.maximum(
        require(stats, "rejected_lengths", loss), 1.0
    )
    return chosen, rejected


def _smoothed_sigmoid(x: Array, label_smoothing: float | Array) -> Array:
    # -(1-e) s(x) - e s(-x): the Bradley-Terry likelihood with labels flipped w.p. e.
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(x) - label_smoothing * jax.nn.log_sigmoid(
        -x
    )


# --------------------------------------------------------------------------------------
# 4. The catalogue. Paired losses with a reference model first.
# --------------------------------------------------------------------------------------


@register("sigmoid")
def sigmoid(
    stats: PreferenceStats,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """DPO (Rafailov et al. 2023); cDPO with label_smoothing e (Mitchell 2023).

    loss = -(1-e) s(beta h) - e s(-beta h)

    Differs from TRL 1.16, whose 'sigmoid' ignores label_smoothing (this is the original
    DPO code's cDPO); `train()` logs a warning naming it when e > 0.
    """
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "sigmoid")
    return _smoothed_sigmoid(beta * (c - r), label_smoothing), reward_metrics(stats, beta)


@register("robust")
def robust(
    stats: PreferenceStats,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """rDPO, unbiased under label noise e < 1/2 (Chowdhury et al. 2024).

    loss = (-(1-e) s(beta h) + e s(-beta h)) / (1 - 2e)
    """
    check_options("robust", {"label_smoothing": label_smoothing})
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "robust")
    x = beta * (c - r)
    loss = (
        -(1.0 - label_smoothing) * jax.nn.log_sigmoid(x) + label_smoothing * jax.nn.log_sigmoid(-x)
    ) / (1.0 - 2.0 * label_smoothing)
    return loss, reward_metrics(stats, beta)


@register("hinge")
def hinge(
    stats: PreferenceStats,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """SLiC-HF calibration hinge (Zhao et al. 2023) on the DPO margin.

    loss = max(0, 1 - beta h)
    """
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "hinge")
    return jax.nn.relu(1.0 - beta * (c - r)), reward_metrics(stats, beta)


@register("ipo")
def ipo(
    stats: PreferenceStats,
    beta: float = 0.1,
    ipo_normalize: bool = True,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """IPO (Azar et al. 2023, eq. 17), beta playing tau.

    loss = (h' - 1/(2 beta))^2, h' = logr_c/|y_c| - logr_r/|y_r| (TRL's per-token form,
    default) or h' = h (the paper's sequence form, ipo_normalize=False).
    """
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "ipo")
    if ipo_normalize:
        c = c / jnp.maximum(require(stats, "chosen_lengths", "ipo"), 1.0)
        r = r / jnp.maximum(require(stats, "rejected_lengths", "ipo"), 1.0)
    return (c - r - 1.0 / (2.0 * beta)) ** 2, reward_metrics(stats, beta)


def _check_exo_epsilon(label_smoothing: float | Array) -> None:
    # Python numbers only: a traced sweep value cannot be checked here.
    if isinstance(label_smoothing, int | float) and not 0.0 < label_smoothing < 1.0:
        raise config_error(
            "loss.hyper.label_smoothing",
            f"exo_pair needs 0 < label_smoothing < 1 (its epsilon), got {label_smoothing}",
            "the EXO paper uses 1e-3",
        )


@register("exo_pair")
def exo_pair(
    stats: PreferenceStats,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """EXO-pref (Ji et al. 2024, eq. 16): KL(q || p) with q = softmax over the pair.

    loss = sig(x)(s(x) - log(1-e)) + sig(-x)(s(-x) - log e), x = beta h. The default e is the
    paper's 1e-3; e must lie in (0, 1): e = 0 is refused, as TRL 1.16 does (log 0).
    """
    _check_exo_epsilon(label_smoothing)
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "exo_pair")
    x = beta * (c - r)
    eps = jnp.asarray(label_smoothing, jnp.float32)
    loss = jax.nn.sigmoid(x) * (jax.nn.log_sigmoid(x) - jnp.log1p(-eps)) + jax.nn.sigmoid(-x) * (
        jax.nn.log_sigmoid(-x) - jnp.log(eps)
    )
    return loss, reward_metrics(stats, beta)


@register("nca_pair")
def nca_pair(
    stats: PreferenceStats,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """NCA (Chen et al. 2024, noise-contrastive alignment), pairwise form.

    loss = -s(beta logr_c) - s(-beta logr_c)/2 - s(-beta logr_r)/2
    """
    c, r = log_ratios(stats, "nca_pair")
    loss = (
        -jax.nn.log_sigmoid(beta * c)
        - 0.5 * jax.nn.log_sigmoid(-beta * c)
        - 0.5 * jax.nn.log_sigmoid(-beta * r)
    )
    return loss, reward_metrics(stats, beta)


@register("bco_pair")
def bco_pair(
    stats: PreferenceStats,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """BCO (Jung et al. 2024), pairwise binary classifier, as TRL 1.x: no reward shift.

    loss = -s(beta logr_c) - s(-beta logr_r). The paper's form, with the running reward
    shift delta that older TRL used, is `bco_pair_shifted`.
    """
    c, r = log_ratios(stats, "bco_pair")
    loss = -jax.nn.log_sigmoid(beta * c) - jax.nn.log_sigmoid(-beta * r)
    return loss, reward_metrics(stats, beta)


def bco_shift_update(state: RunningMean, stats: PreferenceStats, beta: float = 0.1) -> RunningMean:
    """BCO's delta after this batch: the running mean of all 2B rewards beta logr_c, beta logr_r."""
    c, r = log_ratios(stats, "bco_pair_shifted")
    return state.update(jnp.concatenate([beta * c, beta * r]))


@register("bco_pair_shifted", state_init=RunningMean.zeros, state_update=bco_shift_update)
def bco_pair_shifted(
    stats: PreferenceStats, beta: float = 0.1, loss_state: RunningMean | None = None
) -> tuple[Array, Metrics]:
    """BCO (Jung et al. 2024, eq. 8) with the paper's running reward shift delta.

    loss = -s(beta logr_c - delta) - s(-(beta logr_r - delta)), delta = the running mean
    (no gradient) of every reward beta logr_c, beta logr_r seen in training, this batch
    included, as older TRL's `bco_pair` and its BCOTrainer. The train step keeps delta in
    `TrainState.loss_state["bco_pair_shifted"]` (checkpointed); with grad_accum_steps A
    each micro-batch adds its 2B rewards before its loss, as TRL's per-forward update;
    evaluation reads delta without adding to it; a skipped (non-finite) step leaves it.
    Called alone (`loss_state=None`) delta is this batch's mean reward. Metric: `delta`.
    """
    if loss_state is None:
        loss_state = bco_shift_update(RunningMean.zeros(), stats, beta)
    c, r = log_ratios(stats, "bco_pair_shifted")
    delta = jax.lax.stop_gradient(loss_state.mean)
    loss = -jax.nn.log_sigmoid(beta * c - delta) - jax.nn.log_sigmoid(-(beta * r - delta))
    metrics = reward_metrics(stats, beta)
    metrics["delta"] = delta
    return loss, metrics


@register("sppo_hard")
def sppo_hard(
    stats: PreferenceStats,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities 1 and 0.

    loss = (logr_c - 1/(2 beta))^2 + (logr_r + 1/(2 beta))^2
    """
    c, r = log_ratios(stats, "sppo_hard")
    loss = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    return loss, reward_metrics(stats, beta)


@register("aot")
def aot(
    stats: PreferenceStats, beta: float = 0.1, label_smoothing: float = 0.0
) -> tuple[Array, Metrics]:
    """AOT (Melnyk et al. 2024), paired: distributional alignment via sorted margins.

    loss_i = cDPO(beta (sort(log pi_c - log pi_r)_i - sort(log ref_c - log ref_r)_i))
    """
    logratio = require(stats, "chosen_logps", "aot") - require(stats, "rejected_logps", "aot")
    ref_logratio = require(stats, "ref_chosen_logps", "aot") - require(
        stats, "ref_rejected_logps", "aot"
    )
    delta = jnp.sort(logratio) - jnp.sort(ref_logratio)
    return _smoothed_sigmoid(beta * delta, label_smoothing), reward_metrics(stats, beta)


@register("aot_unpaired")
def aot_unpaired(
    stats: PreferenceStats, beta: float = 0.1, label_smoothing: float = 0.0
) -> tuple[Array, Metrics]:
    """AOT (Melnyk et al. 2024), unpaired: chosen and rejected log-ratios sorted apart.

    loss_i = cDPO(beta (sort(logr_c)_i - sort(logr_r)_i))
    """
    c, r = log_ratios(stats, "aot_unpaired")
    delta = jnp.sort(c) - jnp.sort(r)
    return _smoothed_sigmoid(beta * delta, label_smoothing), reward_metrics(stats, beta)


@register("apo_zero")
def apo_zero(stats: PreferenceStats, beta: float = 0.1) -> tuple[Array, Metrics]:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): push chosen up, rejected down.

    loss = 1 - sig(beta logr_c) + sig(beta logr_r)
    """
    c, r = log_ratios(stats, "apo_zero")
    loss = 1.0 - jax.nn.sigmoid(beta * c) + jax.nn.sigmoid(beta * r)
    return loss, reward_metrics(stats, beta)


@register("apo_down")
def apo_down(
    stats: PreferenceStats,
    beta: float = 0.1,
) -> tuple[Array, Metrics]:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): both down, rejected more.

    loss = sig(beta logr_c) + 1 - sig(beta h)
    """
    c, r = log_ratios(stats, "apo_down")
    loss = jax.nn.sigmoid(beta * c) + 1.0 - jax.nn.sigmoid(beta * (c - r))
    return loss, reward_metrics(stats, beta)


@register("discopop")
def discopop(
    stats: PreferenceStats,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, eq. 5), x = beta h.

    loss = (1 - sig(x/tau)) (-s(x)) + sig(x/tau) exp(-x)
    """
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "discopop")
    x = beta * (c - r)
    mix = jax.nn.sigmoid(x / discopop_tau)
    # exp(-x) * sig(x/tau) as one exponent: exp(-x) alone overflows for x << 0 and inf*0 = NaN.
    exp_part = jnp.exp(jnp.minimum(-x + jax.nn.log_sigmoid(x / discopop_tau), _EXP_CAP))
    return (1.0 - mix) * -jax.nn.log_sigmoid(x) + exp_part, reward_metrics(stats, beta)


@register("sigmoid_norm")
def sigmoid_norm(
    stats: PreferenceStats,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> tuple[Array, Metrics]:
    """DPO on per-token log-ratios (TRL's length-normalised sigmoid).

    loss = -s(beta (logr_c/|y_c| - logr_r/|y_r|))
    """
    c, r = f_scores(stats, f_divergence_type, f_alpha_divergence_coef, "sigmoid_norm")
    c = c / jnp.maximum(require(stats, "chosen_lengths", "sigmoid_norm"), 1.0)
    r = r / jnp.maximum(require(stats, "rejected_lengths", "sigmoid_norm"), 1.0)
    return -jax.nn.log_sigmoid(beta * (c - r)), reward_metrics(stats, beta)


@register("rdpo")
def rdpo(
    stats: PreferenceStats, beta: float = 0.1, rdpo_alpha: float = 0.01
) -> tuple[Array, Metrics]:
    """R-DPO, length-regularised DPO (Park et al. 2024).

    loss = -s(beta h + alpha (|y_c| - |y_r|)).
    Derivation: maximise E[r(x,y) - alpha |y|] - beta KL(pi || pi_ref). The optimum is
    pi* ~ pi_ref exp((r - alpha|y|)/beta), so r = beta log(pi*/pi_ref) + alpha|y| + const;
    Bradley-Terry on r gives the sigmoid of beta h + alpha (|y_c| - |y_r|). A longer chosen
    answer already earns margin from its length, so the policy is not pushed to lengthen.
    """
    length_gap = require(stats, "chosen_lengths", "rdpo") - require(
        stats, "rejected_lengths", "rdpo"
    )
    x = beta * margin(stats, "rdpo") + rdpo_alpha * length_gap
    return -jax.nn.log_sigmoid(x), reward_metrics(stats, beta)


@register("dpop")
def dpop(
    stats: PreferenceStats, beta: float = 0.1, dpop_lambda: float = 50.0
) -> tuple[Array, Metrics]:
    """DPO-Positive (Pal et al. 2024, Smaug): penalise any drop of the chosen log-prob.

    loss = -s(beta (h - lambda max(0, -logr_c)))
    """
    c, r = log_ratios(stats, "dpop")
    x = beta * (c - r - dpop_lambda * jax.nn.relu(-c))
    return -jax.nn.log_sigmoid(x), reward_metrics(stats, beta)


# Reference-free paired losses. Their implicit reward is beta x (mean log-prob), as TRL's
# CPOTrainer / ORPOTrainer log it.


def _avg_logp_metrics(stats: PreferenceStats, beta: float | Array, loss: str) -> Metrics:
    avg_c, avg_r = mean_logps(stats, loss)
    return metrics_from_rewards(
        beta * avg_c, beta * avg_r, stats.chosen_logps, stats.rejected_logps
    )


@register("simpo", needs_reference=False)
def simpo(
    stats: PreferenceStats,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Array, Metrics]:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, target margin gamma.

    loss = cDPO(beta (log pi_c/|y_c| - log pi_r/|y_r|) - gamma)
    """
    avg_c, avg_r = mean_logps(stats, "simpo")
    x = beta * (avg_c - avg_r) - simpo_gamma
    return _smoothed_sigmoid(x, label_smoothing), _avg_logp_metrics(stats, beta, "simpo")


def log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); x is clamped < 0."""
    x = jnp.minimum(x, -1e-6)  # x = 0 is probability 1: the odds are infinite
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def chosen_nll(stats: PreferenceStats, loss: str = "sft") -> Array:
    """Token-mean NLL of the chosen completions over the batch, broadcast to `[B]`.

    Matches TRL's cross-entropy over all chosen tokens (its SFT / RPO term).
    """
    total = jnp.sum(require(stats, "chosen_logps", loss))
    tokens = jnp.maximum(jnp.sum(require(stats, "chosen_lengths", loss)), 1.0)
    return jnp.broadcast_to(-total / tokens, stats.chosen_logps.shape)


@register("orpo", needs_reference=False)
def orpo(stats: PreferenceStats, beta: float = 0.1) -> tuple[Array, Metrics]:
    """ORPO (Hong et al. 2024): chosen NLL plus beta x odds-ratio term, no reference.

    loss = NLL_c - beta s(log odds(y_c) - log odds(y_r)), odds(y) = p/(1-p), p = exp(mean log pi)
    """
    avg_c, avg_r = mean_logps(stats, "orpo")
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    ratio = jax.nn.log_sigmoid(log_odds)
    metrics = _avg_logp_metrics(stats, beta, "orpo")
    metrics["log_odds_ratio"] = _mean(ratio)
    metrics["nll_loss"] = _mean(chosen_nll(stats, "orpo"))
    return chosen_nll(stats, "orpo") - beta * ratio, metrics


@register("sft", needs_reference=False)
def sft(stats: PreferenceStats) -> tuple[Array, Metrics]:
    """Supervised NLL of the chosen completions (TRL's `sft` loss type; MPO / RPO term).

    loss = -sum log pi(y_c) / sum |y_c| over the batch
    """
    zeros = jnp.zeros_like(_f32(stats.chosen_logps))
    nll = chosen_nll(stats)
    metrics = metrics_from_rewards(zeros, zeros, stats.chosen_logps, stats.rejected_logps)
    metrics["nll_loss"] = _mean(nll)
    return nll, metrics


@register("unlikelihood", needs_reference=False, needs_log1m=True)
def unlikelihood(stats: PreferenceStats, unlikelihood_alpha: float = 1.0) -> tuple[Array, Metrics]:
    """Unlikelihood training (Welleck et al. 2019) as the DPO paper's baseline, per-token means.

    loss = -log pi(y_c)/|y_c| - alpha sum_t log(1 - pi(y_r,t | x, y_r,<t))/|y_r|
    """
    avg_c, _ = mean_logps(stats, "unlikelihood")
    r_len = jnp.maximum(require(stats, "rejected_lengths", "unlikelihood"), 1.0)
    unlikely = -require(stats, "rejected_log1m_sum", "unlikelihood") / r_len
    metrics = _avg_logp_metrics(stats, 1.0, "unlikelihood")
    metrics["nll_loss"] = _mean(-avg_c)
    metrics["unlikelihood_loss"] = _mean(unlikely)
    return -avg_c + unlikelihood_alpha * unlikely, metrics


# Unpaired losses (take UnpairedStats).


def kto_reference_point(stats: UnpairedStats, loss: str = "kto") -> Array:
    """KTO's z0: batch mean of KL-pair log-ratios, detached and clamped at 0 (TRL KTOTrainer)."""
    kl = jnp.mean(require(stats, "kl_logps", loss) - require(stats, "ref_kl_logps", loss))
    return jnp.maximum(jax.lax.stop_gradient(kl), 0.0)


def _unpaired_metrics(stats: UnpairedStats, rewards: Array, desirable: Array, loss: str) -> Metrics:
    # Subset means as CountedMean: count-weighted over micro-batches and held-out batches,
    # omitted when the subset is absent (TRL's KTOTrainer), never logged as 0.
    logps = require(stats, "logps", loss)
    undesirable = 1.0 - desirable
    chosen, rejected = subset_mean(rewards, desirable), subset_mean(rewards, undesirable)
    correct = jnp.where(desirable > 0, rewards > 0, rewards < 0)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": _mean(correct),
        "rewards/margins": MeanDifference(chosen, rejected),
        "logps/chosen": subset_mean(logps, desirable),
        "logps/rejected": subset_mean(logps, undesirable),
    }


@register("kto", paired=False)
def kto(
    stats: UnpairedStats,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Array, Metrics]:
    """KTO (Ethayarajh et al. 2024), z0 = max(0, stopgrad mean(kl log-ratio)).

    loss = lambda_D (1 - sig(beta (logr - z0))) if desirable else lambda_U (1 - sig(beta (z0 - logr)))
    """
    logr = require(stats, "logps", "kto") - require(stats, "ref_logps", "kto")
    desirable = require(stats, "labels", "kto")
    z0 = kto_reference_point(stats)
    loss = jnp.where(
        desirable > 0,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logr - z0))),
        undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - logr))),
    )
    metrics = _unpaired_metrics(stats, beta * logr, desirable, "kto")
    metrics["kl"] = z0
    return loss, metrics


@register("apo_zero_unpaired", paired=False)
def apo_zero_unpaired(
    stats: UnpairedStats,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Array, Metrics]:
    """APO-zero (D'Oosterlinck et al. 2024) on unpaired data, as TRL's KTOTrainer.

    loss = lambda_D (1 - sig(beta logr)) if desirable else lambda_U sig(beta logr)
    """
    logr = require(stats, "logps", "apo_zero_unpaired") - require(
        stats, "ref_logps", "apo_zero_unpaired"
    )
    desirable = require(stats, "labels", "apo_zero_unpaired")
    loss = jnp.where(
        desirable > 0,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * logr)),
        undesirable_weight * jax.nn.sigmoid(beta * logr),
    )
    return loss, _unpaired_metrics(stats, beta * logr, desirable, "apo_zero_unpaired")


def check_kto_weights(
    desirable_weight: float, undesirable_weight: float, n_desirable: int, n_undesirable: int
) -> float:
    """Warns if lambda_D n_D / (lambda_U n_U) is outside [1, 4/3] (KTO paper, eq. 9); returns it.

    Call it once at config time with the dataset's label counts, outside jit.
    """
    if n_desirable <= 0 or n_undesirable <= 0 or undesirable_weight <= 0:
        warnings.warn(
            f"KTO: {n_desirable} desirable and {n_undesirable} undesirable examples with "
            f"undesirable_weight={undesirable_weight}; the weighting ratio is undefined",
            UserWarning,
            stacklevel=2,
        )
        return float("nan")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if not 1.0 <= ratio <= 4.0 / 3.0:
        warnings.warn(
            f"KTO: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = "
            f"{ratio:.3f} is outside the paper's recommended range [1, 4/3]; adjust "
            f"desirable_weight={desirable_weight} or undesirable_weight={undesirable_weight}",
            UserWarning,
            stacklevel=2,
        )
    return ratio


# --------------------------------------------------------------------------------------
# 5. Batch-level options and combining losses, as TRL's DPOConfig exposes them
# --------------------------------------------------------------------------------------


def apply_ld_alpha(stats: PreferenceStats, ld_alpha: float | Array) -> PreferenceStats:
    """LD-DPO (Liu et al. 2024): log-probs become prefix + ld_alpha * (total - prefix).

    The prefix is the first min(|y_c|, |y_r|) completion tokens, so the excess length of
    the longer answer counts with weight ld_alpha. Reference log-probs get the same split
    when their prefix sums are present (TRL 1.x); otherwise they stay full sums.
    """

    def desensitise(total: Array, prefix_name: str) -> Array:
        prefix = require(stats, prefix_name, f"ld_alpha={ld_alpha}")
        return prefix + ld_alpha * (_f32(total) - prefix)

    updates = {
        "chosen_logps": desensitise(stats.chosen_logps, "chosen_prefix_logps"),
        "rejected_logps": desensitise(stats.rejected_logps, "rejected_prefix_logps"),
    }
    if stats.ref_chosen_prefix_logps is not None and stats.ref_rejected_prefix_logps is not None:
        updates["ref_chosen_logps"] = desensitise(stats.ref_chosen_logps, "ref_chosen_prefix_logps")
        updates["ref_rejected_logps"] = desensitise(
            stats.ref_rejected_logps, "ref_rejected_prefix_logps"
        )
    return stats.replace(**updates)


def wpo_weights(stats: PreferenceStats) -> Array:
    """WPO (Zhou et al. 2024, eq. 2) per-pair weight w_c * w_r, without gradient."""
    w = require(stats, "chosen_weights", "use_weighting") * require(
        stats, "rejected_weights", "use_weighting"
    )
    return jax.lax.stop_gradient(w)


def _as_spec(loss_type: str | Sequence[Any], loss_weights: Sequence[float] | None) -> LossSpec:
    terms = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not terms:
        raise ValueError("compute_loss: loss_type is empty")
    if all(isinstance(t, tuple) for t in terms):  # already a LossSpec
        if loss_weights is not None:
            raise ValueError("compute_loss: a (name, weight) spec takes no loss_weights")
        return tuple((str(n), float(w)) for n, w in terms)
    weights = [1.0] * len(terms) if loss_weights is None else list(loss_weights)
    if len(weights) != len(terms):
        raise ValueError(
            f"compute_loss: {len(weights)} loss_weights for {len(terms)} loss types {terms}"
        )
    return tuple(zip(terms, weights, strict=True))


def compute_loss(
    stats: PreferenceStats | UnpairedStats,
    loss_type: str | Sequence[Any] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    rpo_alpha: float | None = None,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
    **hyper: Any,
) -> tuple[Array, Metrics]:
    """TRL's DPOConfig front door: sum_k w_k loss_k, then + rpo_alpha NLL, then x WPO weight.

    `loss_type` is a name, a list of names (with `loss_weights`) or a `LossSpec`. Each
    loss receives the hypers its signature names; a hyper no selected loss accepts is
    an error (catches typos). Metrics come from the first loss; with several losses
    `loss/<name>` is added, with `rpo_alpha` `nll_loss`. A stateful loss (see
    `register`) starts from its initial state: `compute_loss_with_state` carries it.
    Returns (per_example_loss_B, metrics).
    """
    total, metrics, _ = compute_loss_with_state(
        stats, loss_type, None, loss_weights=loss_weights, rpo_alpha=rpo_alpha,
        use_weighting=use_weighting, ld_alpha=ld_alpha, **hyper,
    )  # fmt: skip
    return total, metrics


def compute_loss_with_state(
    stats: PreferenceStats | UnpairedStats,
    loss_type: str | Sequence[Any],
    loss_state: Mapping[str, Any] | None,
    *,
    update: bool = True,
    loss_weights: Sequence[float] | None = None,
    rpo_alpha: float | None = None,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
    **hyper: Any,
) -> tuple[Array, Metrics, dict[str, Any] | None]:
    """`compute_loss` that also carries stateful losses' running statistics.

    `loss_state` maps each stateful loss name to its state (None: the initial state).
    With `update` each state first takes in this batch, then the loss reads it (TRL's
    order: BCO's shift includes the current batch); evaluation passes `update=False`.
    Returns (per_example_loss_B, metrics, new_loss_state or None).
    """
    spec = _as_spec(loss_type, loss_weights)
    fns = [get(name) for name, _ in spec]
    unused = [k for k in hyper if k not in F_OPTIONS and not any(_accepts(f, k) for f in fns)]
    if unused:
        raise TypeError(
            f"compute_loss: no loss in {loss_names(spec)} takes hyper-parameter(s) {sorted(unused)}"
        )
    is_paired(spec)  # refuses a paired/unpaired mix
    check_options(spec, dict(hyper, use_weighting=use_weighting))
    if not isinstance(stats, PreferenceStats) and (rpo_alpha, ld_alpha) != (None, None):
        raise ValueError(
            "compute_loss: rpo_alpha and ld_alpha apply to paired PreferenceStats only"
        )
    if not isinstance(stats, PreferenceStats) and use_weighting:
        raise ValueError("compute_loss: use_weighting (WPO) applies to paired PreferenceStats only")

    scored = stats if ld_alpha is None else apply_ld_alpha(stats, ld_alpha)
    new_state = dict(loss_state) if loss_state is not None else init_loss_state(spec)
    total, metrics = None, None
    for (name, weight), fn in zip(spec, fns, strict=True):
        kwargs = {k: v for k, v in hyper.items() if _accepts(fn, k)}
        if name in _STATE:
            state = new_state[name]
            if update:
                state_update = _STATE[name][1]
                state = state_update(
                    state, scored, **{k: v for k, v in kwargs.items() if _accepts(state_update, k)}
                )
                new_state[name] = state
            kwargs["loss_state"] = state
        loss, m = fn(scored, **kwargs)
        total = weight * loss if total is None else total + weight * loss
        metrics = m if metrics is None else metrics
        if len(spec) > 1:
            metrics[f"loss/{name}"] = _mean(loss)
    if rpo_alpha is not None:
        nll = chosen_nll(stats, "rpo_alpha")  # on full sums: ld_alpha does not touch the NLL
        total = total + rpo_alpha * nll
        metrics["nll_loss"] = _mean(nll)
    if use_weighting:
        total = total * wpo_weights(stats)
    return total, metrics, new_state


def combined(loss_names: Sequence[str], weights: Sequence[float] | None = None) -> LossFn:
    """A loss function summing `loss_names` with `weights` (TRL's loss_type list).

    The result can be registered: `losses.register("mpo")(losses.combined([...], [...]))`.
    """
    loss_names = list(loss_names)
    for name in loss_names:
        _check_name(name)

    def combined_loss(stats, **hyper):
        return compute_loss(stats, loss_names, weights, **hyper)

    combined_loss.__name__ = "+".join(loss_names)
    combined_loss.__doc__ = f"Weighted sum of {loss_names} with weights {weights}."
    return combined_loss
