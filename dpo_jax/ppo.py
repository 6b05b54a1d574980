"""PPO for RLHF (Ziegler et al. 2019, Stiennon et al. 2020): the pure, jittable pieces.

Everything here works on per-token arrays over the completion tokens of `S` rollouts,
`[S, T]` with a `mask_SxT` (True at generated tokens, the EOS included). Rows may be
ragged: masked positions are skipped (GAE carries its state over them) and never count
in a mean.

- `penalised_rewards`: per-token reward `-kl_coef * KL_t` (the KL penalty against the
  SFT reference) plus the sequence's score at its last completion token.
- `gae`: GAE(lambda) advantages and returns by a reverse `lax.scan`.
- `masked_whiten`: reward whitening (no mean shift) and advantage whitening.
- `policy_loss` / `value_loss`: the clipped PPO surrogate and the clipped value loss.
- `update_kl_coef`: the adaptive KL controller of Ziegler et al. (a pure state update).

The train step sees only per-token statistics (policy log-probs, values, entropies) from
the one scoring pass; rollout assembly and the phase loop live in `dpo_jax.ppo_loop`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from dpo_jax.errors import UserError

Array = jax.Array

KL_ESTIMATORS = ("k1", "k3")


# ------------------------------------------------------------------ masked statistics


def masked_sum(x: Array, mask: Array) -> Array:
    """Sum of `x` where `mask`, in float32."""
    return jnp.sum(jnp.where(mask, x.astype(jnp.float32), 0.0))


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of `x` over the `mask`ed entries (0 when none)."""
    count = jnp.sum(mask.astype(jnp.float32))
    return masked_sum(x, mask) / jnp.maximum(count, 1.0)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance over the masked entries; `unbiased` applies Bessel's n / (n - 1) (as TRL)."""
    count = jnp.sum(mask.astype(jnp.float32))
    var = masked_mean(jnp.square(x - masked_mean(x, mask)), mask)
    if unbiased:
        var = var * count / jnp.maximum(count - 1.0, 1.0)
    return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """`(x - mean) / sqrt(var + eps)` over the masked entries; zero where not masked.

    `shift_mean=False` keeps the mean (only rescales): the reward whitening of TRL's
    `whiten_rewards`, which must not turn the KL penalty into a bonus on average.
    """
    mean = masked_mean(x, mask)
    white = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        white = white + mean
    return jnp.where(mask, white, 0.0)


# --------------------------------------------------------------------- rewards, GAE


def kl_per_token(
    logps_SxT: Array, ref_logps_SxT: Array, mask_SxT: Array, estimator: str = "k1"
) -> Array:
    """Per-token KL estimate of policy against reference on the sampled tokens.

    "k1": `log p - log q` (unbiased, can be negative); "k3": `(r - 1) - log r` with
    `r = q / p` (unbiased, non-negative, lower variance; Schulman's note). Zero where masked.
    """
    if estimator not in KL_ESTIMATORS:
        raise UserError(f"ppo.kl_estimator={estimator!r}: expected one of {KL_ESTIMATORS}")
    log_r = ref_logps_SxT.astype(jnp.float32) - logps_SxT.astype(jnp.float32)
    kl = -log_r if estimator == "k1" else jnp.expm1(log_r) - log_r
    return jnp.where(mask_SxT, kl, 0.0)


def last_token_onehot(mask_SxT: Array) -> Array:
    """`[S, T]` float32: 1 at each row's last masked position (all 0 for an empty row)."""
    T = mask_SxT.shape[-1]
    idx_T = jnp.arange(T)
    last_S = jnp.max(jnp.where(mask_SxT, idx_T, -1), axis=-1)
    return (idx_T[None, :] == last_S[:, None]).astype(jnp.float32)


def penalised_rewards(
    scores_S: Array,
    logps_SxT: Array,
    ref_logps_SxT: Array,
    mask_SxT: Array,
    kl_coef: Array | float,
    estimator: str = "k1",
) -> tuple[Array, Array]:
    """Per-token rewards `-kl_coef * KL_t`, plus `scores_S` at each last completion token.

    Returns `(rewards_SxT, kl_SxT)`; both are zero where masked.
    """
    kl_SxT = kl_per_token(logps_SxT, ref_logps_SxT, mask_SxT, estimator)
    rewards = -jnp.asarray(kl_coef, jnp.float32) * kl_SxT
    rewards = rewards + scores_S.astype(jnp.float32)[:, None] * last_token_onehot(mask_SxT)
    return jnp.where(mask_SxT, rewards, 0.0), kl_SxT


def gae(
    rewards_SxT: Array,
    values_SxT: Array,
    mask_SxT: Array,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Array, Array]:
    """GAE(lambda) advantages and returns (`advantages + values`), both zero where masked.

    `delta_t = r_t + gamma V_{t'} - V_t` and `A_t = delta_t + gamma lam A_{t'}`, where `t'`
    is the next masked position of the row (none after the last: `V = A = 0` there, the
    episode ends). A reverse `lax.scan` over `T` carries `(V_{t'}, A_{t'})` per row and
    leaves it unchanged over masked-out positions.
    """
    r_TxS = jnp.where(mask_SxT, rewards_SxT, 0.0).astype(jnp.float32).T
    v_TxS = jnp.where(mask_SxT, values_SxT, 0.0).astype(jnp.float32).T
    m_TxS = mask_SxT.T

    def step(carry: tuple[Array, Array], xs: tuple[Array, Array, Array]) -> tuple:
        next_v_S, next_a_S = carry
        r_S, v_S, m_S = xs
        delta_S = r_S + gamma * next_v_S - v_S
        a_S = delta_S + gamma * lam * next_a_S
        carry = (jnp.where(m_S, v_S, next_v_S), jnp.where(m_S, a_S, next_a_S))
        return carry, jnp.where(m_S, a_S, 0.0)

    zeros_S = jnp.zeros(r_TxS.shape[1], jnp.float32)
    _, adv_TxS = jax.lax.scan(step, (zeros_S, zeros_S), (r_TxS, v_TxS, m_TxS), reverse=True)
    advantages_SxT = adv_TxS.T
    returns_SxT = jnp.where(mask_SxT, advantages_SxT + v_TxS.T, 0.0)
    return advantages_SxT, returns_SxT


# --------------------------------------------------------------------------- losses


def policy_loss(
    logps_SxT: Array,
    old_logps_SxT: Array,
    advantages_SxT: Array,
    mask_SxT: Array,
    clip: float = 0.2,
) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate `mean_t max(-A r_t, -A clip(r_t, 1-eps, 1+eps))`, `r = p / p_old`.

    Metrics (no gradient): `policy/clipfrac` (share of tokens where the clipped term is
    the larger), `policy/approxkl` (`0.5 mean (log r)^2`, as TRL), `val/ratio` (TRL's names).
    """
    log_ratio = logps_SxT.astype(jnp.float32) - old_logps_SxT.astype(jnp.float32)
    ratio = jnp.exp(jnp.where(mask_SxT, log_ratio, 0.0))
    adv = advantages_SxT.astype(jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask_SxT)
    sg = jax.lax.stop_gradient
    metrics = {
        "policy/clipfrac": masked_mean((sg(clipped) > sg(unclipped)).astype(jnp.float32), mask_SxT),
        "policy/approxkl": 0.5 * masked_mean(jnp.square(sg(log_ratio)), mask_SxT),
        "val/ratio": masked_mean(sg(ratio), mask_SxT),
    }
    return loss, metrics


def value_loss(
    values_SxT: Array,
    old_values_SxT: Array,
    returns_SxT: Array,
    mask_SxT: Array,
    clip: float = 0.2,
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss `0.5 mean_t max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2)`.

    Metrics: `val/clipfrac`, `val/mean` (no gradient).
    """
    v = values_SxT.astype(jnp.float32)
    old = old_values_SxT.astype(jnp.float32)
    ret = returns_SxT.astype(jnp.float32)
    clipped_v = old + jnp.clip(v - old, -clip, clip)
    loss1 = jnp.square(v - ret)
    loss2 = jnp.square(clipped_v - ret)
    loss = 0.5 * masked_mean(jnp.maximum(loss1, loss2), mask_SxT)
    sg = jax.lax.stop_gradient
    metrics = {
        "val/clipfrac": masked_mean((sg(loss2) > sg(loss1)).astype(jnp.float32), mask_SxT),
        "val/mean": masked_mean(sg(v), mask_SxT),
    }
    return loss, metrics


def ppo_loss(
    stats: Mapping[str, Array],
    batch: Mapping[str, Array],
    mask: Array,
    *,
    clip: float = 0.2,
    value_clip: float = 0.2,
    vf_coef: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """`policy_loss + vf_coef * value_loss` from per-token statistics and the PPO batch.

    `stats`: the scoring pass's per-token `logps` and `values`, aligned with `mask`;
    `batch`: the rollout's `old_logps`, `advantages`, `returns` and `old_values` in the
    same alignment.
    """
    pg, pg_metrics = policy_loss(
        stats["logps"], batch["old_logps"], batch["advantages"], mask, clip
    )
    vf, vf_metrics = value_loss(
        stats["values"], batch["old_values"], batch["returns"], mask, value_clip
    )
    loss = pg + vf_coef * vf
    metrics = {"loss": loss, "loss/policy": pg, "loss/value": vf, **pg_metrics, **vf_metrics}
    return loss, metrics


# ------------------------------------------------------------------ KL controller


def update_kl_coef(
    coef: Array | float,
    kl: Array | float,
    n_steps: int,
    *,
    target: float | None,
    horizon: float,
    max_error: float = 0.2,
) -> Array:
    """One step of Ziegler et al.'s adaptive KL controller (a pure state update).

    `coef * (1 + clip(kl / target - 1, -max_error, max_error) * n_steps / horizon)`, where
    `kl` is the rollout batch's mean sequence KL and `n_steps` its number of episodes.
    `target=None` is the fixed-coefficient controller (returns `coef`).
    """
    coef = jnp.asarray(coef, jnp.float32)
    if target is None:
        return coef
    error = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -max_error, max_error)
    return coef * (1.0 + error * n_steps / horizon)


# ------------------------------------------------------------ the "ppo" objective


def token_values(head: Mapping[str, Array], hidden_NxLxD: Array) -> Array:
    """`[N, L]` float32 values aligned with the tokens: entry t is the value of the state
    that emits token t, the linear head on the hidden state at position t - 1 (the one
    whose logits score token t); entry 0 is 0."""
    h = hidden_NxLxD.astype(jnp.float32)
    v_NxL = h @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)
    return jnp.concatenate([jnp.zeros_like(v_NxL[:, :1]), v_NxL[:, :-1]], axis=1)


# Per-token columns of a PPO batch, `[N, L]` float32 aligned with `input_ids` (0 off the
# completion tokens): the rollout's old log-probs and values, advantages and returns.
BATCH_COLUMNS = ("old_logps", "old_values", "advantages", "returns")
# Hyper-parameters the objective reads from the step's `objective_hyper`.
OBJECTIVE_HYPER = ("clip", "value_clip", "vf_coef")


def config_hyper(config: object) -> dict[str, float]:
    """The "ppo" objective's `objective_hyper` from a run config (`config.ppo`)."""
    return {k: float(config.ppo[k]) for k in OBJECTIVE_HYPER}  # type: ignore[attr-defined]


def objective_loss(inp: object) -> tuple[Array, dict[str, Array], object]:
    """The `"ppo"` objective of the one train step (`objectives.ObjectiveInput` in).

    Reads only statistics of the policy's scoring pass: per-token log-probs
    (`token_logps_NxL`), the final hidden states under the value head, and the
    per-sequence entropy sums for the `policy/entropy` metric; plus the PPO batch
    columns. The step's `objective_hyper` holds `clip`, `value_clip`, `vf_coef`
    (`config.ppo`, `train_step.step_settings`).
    """
    policy, batch = inp.policy, inp.batch
    hyper = inp.cfg.objective_hyper
    mask = batch["sequence_index"] >= 0
    stats = {"logps": policy.token_logps_NxL, "values": token_values(inp.head, policy.hidden_NxLxD)}
    loss, metrics = ppo_loss(
        stats, batch, mask, clip=hyper["clip"], value_clip=hyper["value_clip"],
        vf_coef=hyper["vf_coef"],
    )  # fmt: skip
    if policy.entropy_sums_S is not None:  # mean next-token entropy over completion tokens
        tokens = jnp.maximum(jnp.sum(policy.lengths_S), 1.0)
        metrics["policy/entropy"] = jnp.sum(policy.entropy_sums_S) / tokens
    return loss, metrics, inp.loss_state
