"""experiments.ipo_bandit reproduces Azar et al.'s bandit claims at reduced steps.

The expected IPO policies are derived here by hand from the per-pair loss
(theta_w - theta_l - 1/(2 tau))^2 with a uniform reference, not taken from the module.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from experiments import ipo_bandit

TAUS = (0.1, 0.5, 1.0)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def results():
    config = ipo_bandit.get_config("small")
    config.steps = 2000
    config.num_seeds = 3
    config.taus = TAUS
    rows, trajectories = ipo_bandit.run(config)
    table = {(r["dataset"], r["loss"], r["tau"]): r for r in rows}
    return table, trajectories


def lookup(table, dataset, loss, tau):
    for (d, name, t), row in table.items():
        if d == dataset and name == loss and abs(t - tau) < 1e-9:
            return row
    raise KeyError((dataset, loss, tau))


@pytest.mark.parametrize("tau", TAUS)
def test_dpo_becomes_deterministic_on_the_total_order_for_every_tau(results, tau):
    table, trajectories = results
    row = lookup(table, "total_order", "DPO", tau)
    assert row["pi_a"] > 0.98, row
    # No fixed point short of determinism: the mass off `a` keeps shrinking (at 18,000
    # steps the printed table shows pi(a) = 1.0000 for every tau).
    k = TAUS.index(tau)
    off_a = 1.0 - trajectories[("total_order", "sigmoid")][k, :, :, 0].mean(axis=0)
    half = len(off_a) // 2
    assert off_a[-1] < 0.75 * off_a[half], (off_a[half], off_a[-1])
    assert lookup(table, "total_order", "IPO", tau)["pi_c"] > 1e-3  # IPO at the same tau does not


@pytest.mark.parametrize("tau", TAUS)
def test_dpo_drives_an_always_losing_action_to_zero(results, tau):
    row = lookup(results[0], "tie_c_loses", "DPO", tau)
    assert row["pi_c"] < 0.01, row


@pytest.mark.parametrize("tau", TAUS)
def test_ipo_stays_regularised_at_its_closed_form_optimum(results, tau):
    table = results[0]
    # Total order: stationarity of (x-k)^2 + (y-k)^2 + (x+y-k)^2 in x = theta_a - theta_b,
    # y = theta_b - theta_c, k = 1/(2 tau), gives x = y = 2k/3 = 1/(3 tau).
    d = 1.0 / (3.0 * tau)
    z = 1.0 + math.exp(-d) + math.exp(-2 * d)
    expected = [1.0 / z, math.exp(-d) / z, math.exp(-2 * d) / z]
    row = lookup(table, "total_order", "IPO", tau)
    np.testing.assert_allclose([row["pi_a"], row["pi_b"], row["pi_c"]], expected, atol=0.02)
    assert row["pi_c"] > 1e-3  # not collapsed
    # c always loses, a and b tie: theta_a = theta_b, theta_a - theta_c = k.
    k = 1.0 / (2.0 * tau)
    row = lookup(table, "tie_c_loses", "IPO", tau)
    np.testing.assert_allclose(row["pi_c"], math.exp(-k) / (2 + math.exp(-k)), atol=0.01)
    np.testing.assert_allclose(row["pi_a"] + row["pi_b"], 2 / (2 + math.exp(-k)), atol=0.01)


@pytest.mark.parametrize("tau", TAUS)
def test_ipo_two_action_optimum_is_sigmoid_half_over_tau(results, tau):
    # p(y1 > y2) = 1: the optimal margin is (p - 1/2)/tau * ... = 1/(2 tau), so
    # pi(y1) = sigmoid(1/(2 tau)) = sigmoid(0.5 / tau).
    row = lookup(results[0], "two_actions", "IPO", tau)
    np.testing.assert_allclose(row["pi_a"], sigmoid(0.5 / tau), atol=0.01)
    np.testing.assert_allclose(row["ipo_opt_a"], sigmoid(0.5 / tau), rtol=1e-9)
    assert lookup(results[0], "two_actions", "DPO", tau)["pi_a"] > 0.99


@pytest.mark.parametrize("loss", ["DPO", "IPO"])
def test_unseen_action_keeps_its_mass_when_a_and_b_tie(results, loss):
    """Issue 7's {(a,b),(b,a)}: theta_a + theta_b is conserved, so pi(c) <= 1/3 and ~1/3."""
    table, trajectories = results
    for tau in TAUS:
        row = lookup(table, "tie_unseen_c", loss, tau)
        assert abs(row["pi_c"] - 1 / 3) < 0.01, row
    name = "sigmoid" if loss == "DPO" else "ipo"
    pi_c = trajectories[("tie_unseen_c", name)][..., 2]
    assert pi_c.max() <= 1 / 3 + 1e-5
    # theta_a = -theta_b = x gives pi(c) = 1 / (1 + e^x + e^-x) = 1 / (1 + 2 cosh x).
    pi_a, pi_b = (trajectories[("tie_unseen_c", name)][..., i] for i in (0, 1))
    x = 0.5 * np.log(pi_a / pi_b)
    np.testing.assert_allclose(pi_c, 1 / (1 + 2 * np.cosh(x)), atol=1e-5)


def test_default_config_is_the_papers_protocol():
    config = ipo_bandit.get_config()
    assert (config.batch_size, config.steps, config.num_seeds) == (9, 18_000, 10)
    assert config.learning_rate == 0.01
    assert ipo_bandit.DATASETS["total_order"][1] == ((0, 1), (1, 2), (0, 2))  # D1
    assert ipo_bandit.DATASETS["tie_unseen_c"][1] == ((0, 1), (1, 0))  # D3
    assert "fig. 1" in ipo_bandit.DATASET_LABELS["total_order"]
    assert "fig. 2" in ipo_bandit.DATASET_LABELS["tie_unseen_c"]
    assert "substitute" in ipo_bandit.DATASET_LABELS["tie_c_loses"]


def test_rows_carry_95_percent_t_intervals_over_seeds(results):
    table, trajectories = results
    # Student t quantile t_{0.975, 2 dof} = 4.302653 (3 seeds), from the t table.
    t_975_2 = 4.302652729911275
    for tau in TAUS:
        row = lookup(table, "total_order", "IPO", tau)
        assert row["origin"] == "D1, paper fig. 1"
        final = trajectories[("total_order", "ipo")][TAUS.index(tau), :, -1]  # [S, A]
        for a, name in enumerate("abc"):
            expected = t_975_2 * final[:, a].std(ddof=1) / math.sqrt(3)
            np.testing.assert_allclose(row[f"pi_{name}_ci95"], expected, rtol=1e-5)
            assert row[f"pi_{name}_ci95"] > 0


def test_ipo_optimum_helper_matches_hand_formulas():
    tau = 0.25
    n, pairs = ipo_bandit.DATASETS["total_order"]
    d = 1 / (3 * tau)
    z = 1 + math.exp(-d) + math.exp(-2 * d)
    np.testing.assert_allclose(
        ipo_bandit.ipo_optimum(n, pairs, tau), [1 / z, math.exp(-d) / z, math.exp(-2 * d) / z]
    )


def test_bandit_stats_feed_the_library_losses():
    import jax.numpy as jnp

    theta = jnp.asarray([1.0, 0.0, -1.0])
    st = ipo_bandit.bandit_stats(theta, jnp.asarray([[0, 2]]))
    logp = np.log(np.exp([1.0, 0.0, -1.0]) / np.exp([1.0, 0.0, -1.0]).sum())
    np.testing.assert_allclose(st.chosen_logps, [logp[0]], rtol=1e-6)
    np.testing.assert_allclose(st.rejected_logps, [logp[2]], rtol=1e-6)
    np.testing.assert_allclose(st.ref_chosen_logps, [-math.log(3)], rtol=1e-6)


def test_command_line_writes_the_run_directory(tmp_path, capsys):
    argv = [
        f"--config.run_dir={tmp_path}",
        "--config.steps=50",
        "--config.num_seeds=2",
        "--config.taus=(0.5,)",
        "--config.datasets=('two_actions',)",
        "--config.log_every=10",
    ]
    assert ipo_bandit.main(argv) == 0
    out = capsys.readouterr().out
    assert "two_actions" in out and "IPO" in out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["steps"] == 50
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["loss"] for r in rows} == {"DPO", "IPO"}
    assert (tmp_path / "policies.png").stat().st_size > 1000
