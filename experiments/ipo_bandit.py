"""IPO's bandit (Azar et al. 2023, sections 5.3-5.4): DPO over-fits deterministic preferences.

As published: three actions, a tabular softmax policy pi = softmax(theta) with a uniform
reference, Adam (lr 0.01) on mini-batches of 9 pairs sampled uniformly from a small
preference dataset, 18,000 steps, 10 seeds, 95% confidence bands (Student t over seeds).
The losses are `dpo_jax.losses.get("sigmoid")` (DPO) and `get("ipo")` (IPO), the same
functions the language-model runs use, with beta = tau. Seeds and taus are vmapped and
steps run in `lax.scan`, so the whole grid takes seconds to minutes.

    python -m experiments.ipo_bandit [--preset=small] [--config.steps=2000] [--config.taus=(0.1,1.0)]

Datasets (`DATASET_LABELS` names each row's origin):
- `total_order` = D1 = {(a,b),(b,c),(a,c)}, the paper's fig. 1.
- `tie_unseen_c` = D3 = {(a,b),(b,a)}, the paper's fig. 2.
- `tie_c_loses` = {(a,b),(b,a),(a,c),(b,c)}: this project's substitute for D3 (not in
  the paper), where the over-fitting the paper describes for D3 does appear.
- `two_actions`: a closed-form check (y1 always preferred), not in the paper.

What IPO should converge to, in closed form: each observed pair (w, l) contributes
(theta_w - theta_l - 1/(2 tau))^2, so the optimum logits solve that least-squares
problem (`ipo_optimum`). Two actions with y1 always preferred give
pi(y1) = sigmoid(1/(2 tau)); the total order a > b > c gives theta_a - theta_b =
theta_b - theta_c = 1/(3 tau). DPO's loss keeps decreasing as any observed loser's
probability goes to 0, so it ends deterministic whatever tau is.

A documented disagreement with the paper's text on D3. The paper describes DPO on D3
driving pi(c) towards 0. Under the paper's own parameterisation that cannot happen: the
logit of c gets no gradient (log pi(a) - log pi(b) does not depend on it), and every
per-pair gradient, hence every Adam update, changes theta_a and theta_b by opposite
amounts, so theta_a + theta_b stays 0 and
pi(c) = 1 / (1 + 2 cosh((theta_a - theta_b)/2)) <= 1/3, which is 1/3 up to the sampling
noise in theta_a - theta_b, for DPO and IPO alike (tested in `tests/test_ipo_bandit.py`).
The over-fitting the paper illustrates appears when c is observed and always loses:
`tie_c_loses`, where DPO drives pi(c) to 0 and IPO keeps pi(c) = e^-k / (2 + e^-k),
k = 1/(2 tau).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpo_jax import losses
from experiments import common

ACTIONS = "abc"
# name -> (number of actions, observed (winner, loser) pairs)
DATASETS: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {
    "total_order": (3, ((0, 1), (1, 2), (0, 2))),
    "tie_unseen_c": (3, ((0, 1), (1, 0))),
    "tie_c_loses": (3, ((0, 1), (1, 0), (0, 2), (1, 2))),
    "two_actions": (2, ((0, 1),)),
}
# name -> where the dataset comes from (the paper's figure, or this project's own check)
DATASET_LABELS = {
    "total_order": "D1, paper fig. 1",
    "tie_unseen_c": "D3, paper fig. 2",
    "tie_c_loses": "substitute for D3 (this project)",
    "two_actions": "closed-form check (this project)",
}
LOSS_LABELS = {"sigmoid": "DPO", "ipo": "IPO"}
CONFIDENCE = 0.95  # the paper's bands
PRESETS = ("default", "small")


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """The paper's setting; preset `small` shortens it for smoke runs."""
    config = ml_collections.ConfigDict()
    config.steps = 18_000
    config.num_seeds = 10
    config.taus = (0.1, 0.25, 0.5, 1.0)
    config.learning_rate = 0.01
    config.batch_size = 9  # pairs sampled uniformly, with replacement, per step (the paper's)
    config.losses = ("sigmoid", "ipo")
    config.datasets = tuple(DATASETS)
    config.seed = 0
    config.log_every = 100  # trajectory resolution kept for the figure
    config.run_dir = ""  # empty: runs/ipo_bandit/TIMESTAMP
    config.plot = True
    if preset == "small":
        config.steps = 2_000
        config.num_seeds = 3
    elif preset != "default":
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    return config


# ------------------------------------------------------------------------------ the policy


def bandit_stats(theta_A: jax.Array, pairs_Bx2: jax.Array) -> losses.PreferenceStats:
    """PreferenceStats of a tabular softmax policy on (winner, loser) pairs; reference uniform."""
    num_actions = theta_A.shape[-1]
    logp_A = jax.nn.log_softmax(theta_A)
    ref_B = jnp.full(pairs_Bx2.shape[:1], -math.log(num_actions), jnp.float32)
    ones_B = jnp.ones(pairs_Bx2.shape[:1], jnp.float32)
    return losses.PreferenceStats(
        chosen_logps=logp_A[pairs_Bx2[:, 0]],
        rejected_logps=logp_A[pairs_Bx2[:, 1]],
        ref_chosen_logps=ref_B,
        ref_rejected_logps=ref_B,
        chosen_lengths=ones_B,  # one "token" per action: IPO's per-token form is the paper's
        rejected_lengths=ones_B,
    )


def train(
    loss_name: str,
    pairs_Px2: jax.Array,
    num_actions: int,
    tau: jax.Array,
    key: jax.Array,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
) -> jax.Array:
    """One run: returns the policy after every step, `[steps, num_actions]`."""
    loss_fn = losses.get(loss_name)
    optimizer = optax.adam(learning_rate)

    def objective(theta_A: jax.Array, batch_Bx2: jax.Array) -> jax.Array:
        per_pair_B, _ = loss_fn(bandit_stats(theta_A, batch_Bx2), beta=tau)
        return jnp.mean(per_pair_B)

    def step(carry, step_key):
        theta_A, opt_state = carry
        rows = jax.random.randint(step_key, (batch_size,), 0, pairs_Px2.shape[0])
        grads = jax.grad(objective)(theta_A, pairs_Px2[rows])
        updates, opt_state = optimizer.update(grads, opt_state, theta_A)
        theta_A = optax.apply_updates(theta_A, updates)
        return (theta_A, opt_state), jax.nn.softmax(theta_A)

    theta_A = jnp.zeros((num_actions,), jnp.float32)  # the uniform reference
    _, probs_TxA = jax.lax.scan(
        step, (theta_A, optimizer.init(theta_A)), jax.random.split(key, steps)
    )
    return probs_TxA


@functools.partial(
    jax.jit,
    static_argnames=("loss_name", "num_actions", "steps", "learning_rate", "batch_size"),
)
def train_grid(
    loss_name: str,
    pairs_Px2: jax.Array,
    num_actions: int,
    taus_K: jax.Array,
    keys_S: jax.Array,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
) -> jax.Array:
    """All taus x seeds at once: `[K, S, steps, num_actions]` policy trajectories."""
    one = functools.partial(
        train,
        loss_name,
        pairs_Px2,
        num_actions,
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
    )
    over_seeds = jax.vmap(one, in_axes=(None, 0))
    return jax.vmap(over_seeds, in_axes=(0, None))(taus_K, keys_S)


def ipo_optimum(num_actions: int, pairs: Sequence[tuple[int, int]], tau: float) -> np.ndarray:
    """IPO's population optimum: softmax of the least-squares solution of
    theta_w - theta_l = 1/(2 tau) over the observed pairs (minimum norm, as from theta = 0).
    """
    A = np.zeros((len(pairs), num_actions))
    for i, (winner, loser) in enumerate(pairs):
        A[i, winner], A[i, loser] = 1.0, -1.0
    theta = np.linalg.lstsq(A, np.full(len(pairs), 1.0 / (2.0 * tau)), rcond=None)[0]
    e = np.exp(theta - theta.max())
    return e / e.sum()


# ------------------------------------------------------------------------------ the run


def run(config: ml_collections.ConfigDict) -> tuple[list[dict], dict]:
    """Trains every (dataset, loss, tau, seed); returns result rows and trajectories.

    A row holds the final policy's mean, std and 95% confidence half-width over seeds per
    action, the dataset's origin (`DATASET_LABELS`) and, for IPO, the closed-form optimum. Trajectories map (dataset, loss) to `[K, S, T/log_every, A]`.
    """
    for name in config.datasets:
        if name not in DATASETS:
            raise KeyError(f"config.datasets: unknown dataset {name!r}; known: {sorted(DATASETS)}")
    taus = jnp.asarray(config.taus, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(config.seed), config.num_seeds)
    rows, trajectories = [], {}
    for dataset in config.datasets:
        num_actions, pairs = DATASETS[dataset]
        for loss_name in config.losses:
            probs = train_grid(
                loss_name,
                jnp.asarray(pairs, jnp.int32),
                num_actions,
                taus,
                keys,
                steps=int(config.steps),
                learning_rate=float(config.learning_rate),
                batch_size=int(config.batch_size),
            )
            probs = np.asarray(probs)  # [K, S, T, A]
            trajectories[(dataset, loss_name)] = probs[
                :, :, config.log_every - 1 :: config.log_every
            ]
            final = probs[:, :, -1]  # [K, S, A]
            for k, tau in enumerate(config.taus):
                row = {
                    "dataset": dataset,
                    "origin": DATASET_LABELS[dataset],
                    "loss": LOSS_LABELS.get(loss_name, loss_name),
                    "tau": float(tau),
                }
                optimum = ipo_optimum(num_actions, pairs, tau) if loss_name == "ipo" else None
                for a in range(num_actions):
                    row[f"pi_{ACTIONS[a]}"] = float(final[k, :, a].mean())
                    row[f"pi_{ACTIONS[a]}_std"] = float(final[k, :, a].std(ddof=1))
                    row[f"pi_{ACTIONS[a]}_ci95"] = float(
                        common.confidence_half_width(final[k, :, a], CONFIDENCE)
                    )
                    if optimum is not None:
                        row[f"ipo_opt_{ACTIONS[a]}"] = float(optimum[a])
                rows.append(row)
    return rows, trajectories


def columns_for(rows: Sequence[dict]) -> list[str]:
    """Table / CSV columns in a stable order."""
    cols = ["dataset", "origin", "loss", "tau"]
    for prefix in ("pi_{}", "pi_{}_ci95", "pi_{}_std", "ipo_opt_{}"):
        cols += [prefix.format(a) for a in ACTIONS if any(prefix.format(a) in r for r in rows)]
    return cols


def plot(trajectories: dict, config: ml_collections.ConfigDict, path: Path) -> None:
    """One panel per (dataset, loss): seed-mean pi(action) against step, a line per tau,
    with its 95% confidence band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets, loss_names = list(config.datasets), list(config.losses)
    fig, axes = plt.subplots(
        len(datasets),
        len(loss_names),
        figsize=(4.5 * len(loss_names), 2.8 * len(datasets)),
        squeeze=False,
        sharey=True,
    )
    styles = ["-", "--", ":", "-."]
    for i, dataset in enumerate(datasets):
        for j, loss_name in enumerate(loss_names):
            ax = axes[i, j]
            runs = trajectories[(dataset, loss_name)]  # [K, S, T', A]
            probs = runs.mean(axis=1)  # [K, T', A]
            bands = np.stack(
                [common.confidence_half_width(runs[k], CONFIDENCE) for k in range(runs.shape[0])]
            )
            steps = np.arange(1, probs.shape[1] + 1) * config.log_every
            for k, tau in enumerate(config.taus):
                for a in range(probs.shape[-1]):
                    ax.plot(
                        steps,
                        probs[k, :, a],
                        styles[k % len(styles)],
                        color=f"C{a}",
                        label=f"pi({ACTIONS[a]}) tau={tau:g}" if i == 0 else None,
                        lw=1.2,
                    )
                    ax.fill_between(
                        steps,
                        probs[k, :, a] - bands[k, :, a],
                        probs[k, :, a] + bands[k, :, a],
                        color=f"C{a}",
                        alpha=0.2,
                        lw=0,
                    )
            ax.set_title(
                f"{LOSS_LABELS.get(loss_name, loss_name)} on {dataset} ({DATASET_LABELS[dataset]})",
                fontsize=8,
            )
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("step")
    axes[0, -1].legend(fontsize=6, ncol=2, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: run the grid, print the table, write the run directory."""
    args = common.parse_args(
        get_config, sys.argv[1:] if argv is None else argv, PRESETS, "ipo_bandit"
    )
    config = args.config
    run_dir = common.make_run_dir(config, "ipo_bandit")
    start = time.perf_counter()
    rows, trajectories = run(config)
    seconds = time.perf_counter() - start
    columns = columns_for(rows)
    common.write_csv(run_dir / "results.csv", rows, columns)
    print(common.format_table(rows, [c for c in columns if not c.endswith("_std")]))
    print(
        f"\n{len(config.datasets) * len(config.losses) * len(config.taus) * config.num_seeds} "
        f"runs of {config.steps} steps in {seconds:.1f} s"
    )
    if config.plot:
        plot(trajectories, config, run_dir / "policies.png")
    print(f"results: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(common.console(main, "ipo_bandit"))
