"""An edited loss body under the same name: its phase reruns, a resume of its run is refused."""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest

from dpo_jax import checkpoint, code_fingerprint, errors, losses, resume, train
from dpo_jax.configs import default
from experiments import phases
from experiments.phases import Phase
from tests.train_helpers import synthetic_batches, tiny_model

NAME = "edited_in_a_notebook"
# The same loss name with two bodies, defined as a notebook cell would (no source file:
# the hash falls back to the code object).
BODY = """
import jax
@losses.register({name!r})
def edited(stats, beta=0.1):
    x = beta * losses.margin(stats, {name!r})
    return -jax.nn.log_sigmoid({scale} * x), losses.reward_metrics(stats, beta)
"""


def _register(scale: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "replacing the loss registered as ..."
        exec(BODY.format(name=NAME, scale=scale), {"losses": losses})


def _batches() -> list[dict]:
    batches = synthetic_batches(num=2, pairs=2, seed=1)
    for b in batches:  # precomputed reference: no reference forward to compile
        b["ref_logps"] = np.zeros(b["input_ids"].shape[0], np.float32)
    return batches


def test_an_edited_loss_reruns_its_phase_and_its_checkpoint_refuses_to_resume(tmp_path):
    """Fast: the phase evaluates the loss on fixed statistics (no training, no compile)."""

    def a(x):
        return x + 1

    def b(x):
        return x + 2

    assert code_fingerprint.function_hash(a) != code_fingerprint.function_hash(b)
    _register(1.0)
    first = code_fingerprint.entry_hash(f"loss:{NAME}")
    _register(1.0)  # the same body again (a re-run cell): the same hash
    assert code_fingerprint.entry_hash(f"loss:{NAME}") == first
    _register(2.0)
    assert code_fingerprint.entry_hash(f"loss:{NAME}") != first
    config = default.get_config()
    config.loss.name = ["sigmoid", "sft"]
    assert list(code_fingerprint.of_config(config)) == [
        "objective:preference", "loss:sigmoid", "loss:sft",
    ]  # fmt: skip

    calls: list[str] = []
    stats = losses.PreferenceStats(
        np.array([-1.0, -2.0]), np.array([-3.0, -1.5]), np.zeros(2), np.zeros(2)
    )

    def score(ctx):
        calls.append("score")
        phases.note_code(phases.train_config(ctx.config, ctx, **{"loss.name": NAME}))
        return float(np.mean(losses.get(NAME)(stats)[0]))

    graph = [Phase("score", score, reads=("seed",)), Phase("next", lambda c: 1, after=("score",))]
    run = lambda: phases.run_phases(graph, default.get_config(), tmp_path, log=lambda _: None)  # noqa: E731
    _register(1.0)
    first = run()["score"]
    # loss = mean(-log sigmoid(0.1 * margin)), margins (2, -0.5), by hand
    assert first == pytest.approx(np.mean(np.log1p(np.exp(-0.1 * np.array([2.0, -0.5])))))
    assert run() == {} and calls == ["score"]  # the same code: skipped
    _register(3.0)  # the cell edited and re-run
    second = run()
    assert calls == ["score", "score"] and set(second) == {"score", "next"}
    assert second["score"] == pytest.approx(np.mean(np.log1p(np.exp(-0.3 * np.array([2.0, -0.5])))))
    assert (tmp_path / "score.stale-1" / "DONE").exists()  # the old outputs, moved aside
    assert run() == {}

    # A checkpoint written with the old body refuses to resume, in one line.
    state = {"w": np.ones((2,), np.float32)}
    config = resume.to_jsonable(default.get_config())
    config["loss"]["name"] = NAME
    _register(1.0)
    with checkpoint.Checkpointer(tmp_path / "run", config=config) as ckpt:
        ckpt.maybe_save(1, state, force=True)
    _register(3.0)
    with (
        checkpoint.Checkpointer(tmp_path / "run", config=config) as ckpt,
        pytest.raises(errors.UserError) as e,
    ):
        ckpt.restore_or_none(jax.tree.map(checkpoint._as_abstract, state))
    assert isinstance(e.value, resume.ConfigMismatchError) and "\n" not in str(e.value)
    assert f"the code of loss {NAME!r} changed since the checkpoint was written" in str(e.value)


@pytest.mark.heavy
def test_an_edited_loss_reruns_its_phase_and_a_resume_with_it_is_refused(tmp_path):
    """The same through real training phases (`train_phase`) and `train.train`."""
    model_config, params = tiny_model()
    calls: list[str] = []

    def dpo(ctx):
        calls.append("dpo")
        cfg = phases.train_config(
            ctx.config, ctx, **{"loss.name": NAME, "num_steps": 2, "batch_size": 2,
                                "grad_accum_steps": 1, "reference.mode": "precomputed",
                                "checkpoint.async_save": False, "train.progress": False,
                                "train.tensorboard": False},
        )  # fmt: skip
        result = phases.train_phase(
            cfg, train_data=_batches(), model_config=model_config, params=params
        )
        return result.history[-1]["loss"]

    graph = [Phase("dpo", dpo, reads=("seed",)), Phase("after", lambda ctx: None, after=("dpo",))]
    config = default.get_config()
    run = lambda: phases.run_phases(graph, config, tmp_path, log=lambda _: None)  # noqa: E731

    _register(1.0)
    first = run()["dpo"]
    marker = json.loads((tmp_path / "dpo" / "DONE").read_text())
    assert set(marker["code"]) == {"objective:preference", f"loss:{NAME}"}
    assert run() == {} and calls == ["dpo"]  # same code: skipped

    _register(3.0)  # the cell edited and re-run: the phase and the one after it rerun
    second = run()
    assert calls == ["dpo", "dpo"] and set(second) == {"dpo", "after"}
    assert second["dpo"] != pytest.approx(first)  # the new body's loss, not the old one
    assert (tmp_path / "dpo.stale-1" / "DONE").exists()  # the old outputs, moved aside

    # The old run's checkpoints with the edited loss: a resume is refused in one line.
    old = tmp_path / "dpo.stale-1"
    config = default.get_config()
    config.update_from_flattened_dict(
        {"run_dir": str(old), "loss.name": NAME, "num_steps": 2, "batch_size": 2,
         "grad_accum_steps": 1, "reference.mode": "precomputed", "checkpoint.enabled": True,
         "train.progress": False, "train.tensorboard": False}
    )  # fmt: skip
    with pytest.raises(errors.UserError) as e:
        train.train(config, train_data=_batches(), model_config=model_config, params=params)
    assert isinstance(e.value, resume.ConfigMismatchError) and "\n" not in str(e.value)
    assert f"the code of loss {NAME!r} changed since the checkpoint was written" in str(e.value)
