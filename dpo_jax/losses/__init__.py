"""The preference-loss catalogue: every DPO-family loss as a pure, jit-able JAX function.

Where things are (everything is reachable as `losses.X`):

- `shared`: the two inputs losses see (`PreferenceStats` for pairs, `UnpairedStats` for
  KTO) and the shared pieces (log-ratios, f-divergence scores, TRL metrics, `chosen_nll`),
- `registry`: the registry (`register`, `get`, `names`, `is_paired`, `needs_reference`),
  loss mixes (`parse_loss_spec`: TRL's `loss_type` list with `loss_weights`) and the
  option checks TRL makes (`check_options`, `accepted_hypers`, `trl_differences`),
- the catalogue, one short function per loss with its paper and formula: `paired`
  (DPO and its relatives, with a reference model), `reference_free` (SimPO, ORPO, SFT,
  unlikelihood) and `unpaired` (KTO-style, on `UnpairedStats`),
- `compute`: the batch-level options TRL users know (`ld_alpha`, WPO `use_weighting`,
  `rpo_alpha`, several `loss_type`s with `loss_weights`) gathered in `compute_loss`, and
  `compute_loss_with_state` for losses with running statistics (`bco_pair_shifted`),
- `dpo_jax.metric_accumulators` (re-exported here): `CountedMean` subset metrics and
  `RunningMean` for BCO's reward shift, which the train loop also aggregates.

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

# The catalogue modules register their losses when imported: paired, then reference_free,
# then unpaired (the order `names()` lists them in; the import sort keeps it).
from dpo_jax.losses.compute import (
    apply_ld_alpha,
    combined,
    compute_loss,
    compute_loss_with_state,
    wpo_weights,
)
from dpo_jax.losses.paired import (
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_pair,
    bco_pair_shifted,
    bco_shift_update,
    discopop,
    dpop,
    exo_pair,
    hinge,
    ipo,
    nca_pair,
    rdpo,
    robust,
    sigmoid,
    sigmoid_norm,
    sppo_hard,
)
from dpo_jax.losses.reference_free import orpo, sft, simpo, unlikelihood

# The registry's tables stay reachable (tests remove the losses they register).
from dpo_jax.losses.registry import _NEEDS_LOG1M as _NEEDS_LOG1M
from dpo_jax.losses.registry import _NEEDS_REFERENCE as _NEEDS_REFERENCE
from dpo_jax.losses.registry import _PAIRED as _PAIRED
from dpo_jax.losses.registry import _REGISTRY as _REGISTRY
from dpo_jax.losses.registry import _STATE as _STATE
from dpo_jax.losses.registry import (
    BATCH_OPTIONS,
    F_OPTIONS,
    LossSpec,
    accepted_hypers,
    check_options,
    get,
    init_loss_state,
    is_paired,
    loss_names,
    names,
    needs_log1m,
    needs_reference,
    parse_loss_spec,
    register,
    trl_differences,
)
from dpo_jax.losses.registry import _accepts as _accepts
from dpo_jax.losses.registry import _check_name as _check_name
from dpo_jax.losses.shared import (
    F_ALPHA_DIVERGENCE_COEF,
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    Array,
    LossFn,
    Metrics,
    PreferenceStats,
    UnpairedStats,
    chosen_nll,
    f_scores,
    log1mexp,
    log_ratios,
    margin,
    mean_logps,
    metrics_from_rewards,
    require,
    reward_metrics,
)
from dpo_jax.losses.unpaired import (
    apo_zero_unpaired,
    check_kto_weights,
    kto,
    kto_reference_point,
)
from dpo_jax.metric_accumulators import (
    CountedMean,
    MeanDifference,
    RunningMean,
    finalize_metrics,
    is_counted,
    subset_mean,
)

__all__ = [
    "BATCH_OPTIONS",
    "F_ALPHA_DIVERGENCE_COEF",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSSES",
    "F_OPTIONS",
    "Array",
    "CountedMean",
    "LossFn",
    "LossSpec",
    "MeanDifference",
    "Metrics",
    "PreferenceStats",
    "RunningMean",
    "UnpairedStats",
    "accepted_hypers",
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "apo_zero_unpaired",
    "apply_ld_alpha",
    "bco_pair",
    "bco_pair_shifted",
    "bco_shift_update",
    "check_kto_weights",
    "check_options",
    "chosen_nll",
    "combined",
    "compute_loss",
    "compute_loss_with_state",
    "discopop",
    "dpop",
    "exo_pair",
    "f_scores",
    "finalize_metrics",
    "get",
    "hinge",
    "init_loss_state",
    "ipo",
    "is_counted",
    "is_paired",
    "kto",
    "kto_reference_point",
    "log1mexp",
    "log_ratios",
    "loss_names",
    "margin",
    "mean_logps",
    "metrics_from_rewards",
    "names",
    "nca_pair",
    "needs_log1m",
    "needs_reference",
    "orpo",
    "parse_loss_spec",
    "rdpo",
    "register",
    "require",
    "reward_metrics",
    "robust",
    "sft",
    "sigmoid",
    "sigmoid_norm",
    "simpo",
    "sppo_hard",
    "subset_mean",
    "trl_differences",
    "unlikelihood",
    "wpo_weights",
]
