"""experiments.phases: markers, skipping, resuming, refusing outputs of other settings."""

from __future__ import annotations

import json

import ml_collections
import pytest

from dpo_jax.errors import UserError
from experiments import phases
from experiments.phases import Phase


def _config(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(seed=0, a=ml_collections.ConfigDict(dict(n=2, m=1)), b=3))
    c.update(kw)
    return c


def _graph(calls: list, fail_in: str = ""):
    """corpus -> double -> report; each phase records that it ran and writes a file."""

    def corpus(ctx):
        calls.append("corpus")
        (ctx.dir / "xs.json").write_text(json.dumps(list(range(ctx.config.a.n))))

    def double(ctx):
        calls.append("double")
        xs = json.loads((ctx.input("corpus") / "xs.json").read_text())
        if fail_in == "double":
            raise KeyboardInterrupt  # a kill in the middle of the phase
        (ctx.dir / "ys.json").write_text(json.dumps([2 * x + ctx.config.b for x in xs]))
        return "ran"

    def report(ctx):
        calls.append("report")
        ys = json.loads((ctx.input("double") / "ys.json").read_text())
        (ctx.run_dir / "table.txt").write_text(" ".join(map(str, ys)))

    return [
        Phase("report", report, after=("double",), marker=False),  # declared first: ordered
        Phase("corpus", corpus, reads=("a.n", "seed")),
        Phase("double", double, after=("corpus",), reads=("b",)),
    ]


def test_phases_run_in_order_write_markers_and_are_skipped_when_done(tmp_path):
    calls: list[str] = []
    returned = phases.run_phases(_graph(calls), _config(), tmp_path, log=lambda _: None)
    assert calls == ["corpus", "double", "report"]
    assert returned == {"corpus": None, "double": "ran", "report": None}
    assert (tmp_path / "table.txt").read_text() == "3 5"
    marker = json.loads((tmp_path / "double" / "DONE").read_text())
    assert marker["inputs"] == {"b": 3}
    assert (
        marker["after"]["corpus"]
        == json.loads((tmp_path / "corpus" / "DONE").read_text())["fingerprint"]
    )
    assert not (tmp_path / "report" / "DONE").exists()  # marker=False: runs every time
    assert not list(tmp_path.rglob(".*.tmp"))  # the markers were renamed into place
    assert set(phases.timings(_graph([]), tmp_path)) == {"corpus", "double"}

    calls.clear()
    returned = phases.run_phases(_graph(calls), _config(), tmp_path, log=lambda _: None)
    assert calls == ["report"] and returned == {"report": None}
    # A key no phase reads changes nothing.
    phases.run_phases(_graph(calls), _config(unrelated=1), tmp_path, log=lambda _: None)


def test_a_killed_phase_reruns_and_its_predecessors_are_skipped(tmp_path):
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        phases.run_phases(_graph(calls, fail_in="double"), _config(), tmp_path, log=print)
    assert (tmp_path / "corpus" / "DONE").exists() and not (tmp_path / "double" / "DONE").exists()
    calls.clear()
    phases.run_phases(_graph(calls), _config(), tmp_path, log=lambda _: None)
    assert calls == ["double", "report"]
    assert (tmp_path / "table.txt").read_text() == "3 5"


def test_a_finished_phase_of_other_settings_is_refused_and_so_is_everything_after_it(tmp_path):
    phases.run_phases(_graph([]), _config(), tmp_path, log=lambda _: None)
    # A key only `double` reads: `double` is refused, naming the key and what to do.
    with pytest.raises(
        UserError, match=r"phase 'double' finished with other settings \(b differ\)"
    ):
        phases.run_phases(_graph([]), _config(b=4), tmp_path, log=lambda _: None)
    # A key `corpus` reads: corpus is refused first.
    with pytest.raises(UserError, match=r"phase 'corpus' .*\(a.n differ\).*delete"):
        phases.run_phases(_graph([]), _config(a=dict(n=3, m=1)), tmp_path, log=lambda _: None)
    # Deleting the corpus phase redoes it; `double`, downstream, is then refused because
    # its input changed, not one of its own keys.
    config = _config(a=dict(n=3, m=1))
    import shutil

    shutil.rmtree(tmp_path / "corpus")
    with pytest.raises(UserError, match=r"phase 'double' .*\(\(phase corpus\) differ\)"):
        phases.run_phases(_graph([]), config, tmp_path, log=lambda _: None)
    shutil.rmtree(tmp_path / "double")
    phases.run_phases(_graph([]), config, tmp_path, log=lambda _: None)
    assert (tmp_path / "table.txt").read_text() == "3 5 7"


def test_graph_errors():
    noop = lambda ctx: None
    with pytest.raises(ValueError, match="unknown or cyclic"):
        phases.run_phases([Phase("a", noop, after=("b",))], _config(), "/nonexistent")
    with pytest.raises(ValueError, match="share a name"):
        phases.run_phases([Phase("a", noop), Phase("a", noop)], _config(), "/nonexistent")


def test_a_phase_reads_only_what_it_comes_after(tmp_path):
    def sneaky(ctx):
        ctx.input("corpus")

    with pytest.raises(ValueError, match="not after it"):
        phases.run_phases([Phase("x", sneaky)], _config(), tmp_path, log=lambda _: None)


def test_train_config_is_the_dpo_jax_train_tree_of_the_experiment_config(tmp_path):
    from dpo_jax.configs import default

    c = default.get_config()
    c.num_steps = 7
    c.optim.learning_rate = 3e-4
    c.sft = ml_collections.ConfigDict(dict(num_steps=99))  # an experiment section
    ctx = phases.Context(c, tmp_path, Phase("methods/x", lambda ctx: None))
    out = phases.train_config(c, ctx, **{"loss.name": "ipo", "loss.hyper": {"beta": 0.5}})
    assert "sft" not in out
    assert (out.num_steps, out.optim.learning_rate, out.loss.name) == (7, 3e-4, "ipo")
    assert out.loss.hyper.to_dict() == {"beta": 0.5}
    assert out.run_dir == str(tmp_path / "methods" / "x") and out.checkpoint.enabled
    assert set(out.keys()) == set(default.get_config().keys())
    # the one dotted-key setter (`configs.set_value`): a typo is refused, ints widen
    with pytest.raises(UserError, match="optim.leraning_rate"):
        phases.train_config(c, ctx, **{"optim.leraning_rate": 1e-3})
    assert phases.train_config(c, ctx, **{"optim.learning_rate": 1}).optim.learning_rate == 1.0


def test_a_key_added_to_dpo_jax_since_the_phase_ran_is_no_difference_at_its_default(tmp_path):
    """A phase finished before dpo_jax had `online.reward` (its marker's `online` lacks it) is
    skipped while the key keeps configs/default.py's value, and so are the phases after
    it; any other value of the key is a difference."""
    from dpo_jax.configs import default

    def graph(calls):
        def rollouts(ctx):
            calls.append("rollouts")

        def table(ctx):
            calls.append("table")

        return [
            Phase("rollouts", rollouts, reads=("online",)),
            Phase("table", table, after=("rollouts",)),
        ]

    old = default.get_config().online.to_dict()
    del old["reward"]
    phases.run_phases(graph([]), _config(online=old), tmp_path, log=lambda _: None)
    now = _config(online=default.get_config().online.to_dict())
    assert now.online.reward == default.get_config().online.reward
    calls: list[str] = []
    phases.run_phases(graph(calls), now, tmp_path, log=lambda _: None)
    assert calls == []
    changed = _config(online=dict(default.get_config().online.to_dict(), reward="vader"))
    with pytest.raises(UserError, match=r"phase 'rollouts' .*\(online differ\)"):
        phases.run_phases(graph(calls), changed, tmp_path, log=lambda _: None)
    # an old key's value changed is still a difference
    changed = _config(online=dict(old, kl_coef=0.3))
    with pytest.raises(UserError, match=r"phase 'rollouts' .*\(online differ\)"):
        phases.run_phases(graph(calls), changed, tmp_path, log=lambda _: None)
