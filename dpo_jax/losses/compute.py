"""Batch-level options and combining losses, as TRL's DPOConfig exposes them.

`compute_loss` (TRL's front door: several `loss_type`s with `loss_weights`, `rpo_alpha`,
WPO `use_weighting`, LD-DPO `ld_alpha`), `compute_loss_with_state` for losses with
running statistics (`bco_pair_shifted`), and `combined` to register a fixed mix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from dpo_jax.losses.registry import (
    _STATE,
    F_OPTIONS,
    LossSpec,
    _accepts,
    _check_name,
    check_options,
    get,
    init_loss_state,
    is_paired,
    loss_names,
)
from dpo_jax.losses.shared import (
    Array,
    LossFn,
    Metrics,
    PreferenceStats,
    UnpairedStats,
    _f32,
    _mean,
    chosen_nll,
    require,
)


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
