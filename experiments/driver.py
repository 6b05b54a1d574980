"""The one experiment driver: an experiment is a task declaration (:class:`Experiment`:
its config, presets, phase graph and seed summary) and this module runs it.

``python -m experiments.NAME`` is ``driver.main(argv, NAME.EXPERIMENT)``:

1. `common.parse_args`: the preset's config with the command line's overrides;
2. the config's deprecated keys migrated and validated (`dpo_jax.configs.validate`), the
   phase graph built once (a bad method or setting fails before the run directory);
3. `common.make_run_dir` (``runs/NAME/TIMESTAMP`` or ``config.run_dir``);
4. per training seed (`common.run_seeds`), `phases.run_phases` of the graph in
   ``run_dir`` or ``run_dir/seed_<s>``, then the experiment's seed summary;
5. with ``--dry_run``, `phases.dry_run_phases` instead: each training phase's program
   compiled with abstract params on ``dry_run_devices`` simulated devices.

Storage every task shares: a phase writes JSON (:func:`write_json`), its tokenizer
(:func:`load_tokenizer` reads it back) and, for a training phase, the Trainer's Orbax
checkpoints in its directory; later phases read a phase's trained params from there
(:func:`trained_params`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from dpo_jax import checkpoint, configs, models, paths
from dpo_jax.configs import validate
from experiments import common, phases, pipeline
from experiments.phases import Context, Phase


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A task declaration: what the driver needs to run an experiment.

    name: the run directory's parent (``runs/<name>/TIMESTAMP``).
    get_config(preset): the config (a `dpo-jax train` tree plus the task's sections).
    presets: the names get_config takes, the default first.
    build_phases(config): the phase graph of one training seed.
    write_seed_summary(config, run_dir, {seed: seed_dir}): summary.csv and its figure
    over the seeds' results, when ``config.seeds`` lists several.
    """

    name: str
    get_config: Callable[[str], ml_collections.ConfigDict]
    presets: Sequence[str]
    build_phases: Callable[[ml_collections.ConfigDict], list[Phase]]
    write_seed_summary: Callable[[ml_collections.ConfigDict, paths.Path, Mapping], Any]


# --------------------------------------------------------------------------- storage


def write_json(path: paths.Path, value: Any) -> None:
    """A phase output as JSON, written atomically."""
    paths.write_atomic(path, json.dumps(value))


def read_json(path: paths.Path) -> Any:
    """A JSON phase output."""
    return json.loads(path.read_text())


def load_tokenizer(directory: paths.Path) -> Any:
    """The tokenizer a `tokenizer` phase saved (local or in a bucket)."""
    from transformers import AutoTokenizer

    with paths.local_copy(directory) as local:
        return AutoTokenizer.from_pretrained(local, local_files_only=True)


# A training phase that selects one of its checkpoints (the reward model, by validation
# accuracy) names its step here; otherwise its newest checkpoint is its params.
SELECTED = "selected.json"


def trained_params(ctx: Context, phase: str) -> Any:
    """The params of training phase `phase` (:func:`phase_params` of its directory)."""
    return phase_params(ctx.input(phase))


def phase_params(directory: paths.Path) -> Any:
    """A training phase's params: its Orbax checkpoint (the Trainer's, in the phase
    directory; `phases.train_config` turns checkpoints on) at the step its selected.json
    names, else its newest, as host numpy arrays: a multi-process run's Trainer places
    them on its global mesh, which it cannot do from arrays committed to one process's
    device."""
    step = read_json(directory / SELECTED)["step"] if (directory / SELECTED).exists() else None
    return jax.device_get(checkpoint.load_params(directory, step)[2])


def reward_model_overrides(rm: Any) -> dict[str, Any]:
    """`phases.train_config` overrides of a reward-model phase that selects its checkpoint
    by validation accuracy (``rm.val_fraction > 0``): an evaluation and a checkpoint kept
    every ``rm.eval_every`` steps (and at the last). Empty without a validation split."""
    if not float(rm.val_fraction):
        return {}
    every = int(rm.eval_every)
    return {"train.eval_every": every, "checkpoint.save_every": every,
            "checkpoint.keep_every": every}  # fmt: skip


def validation_hook(cfg: models.ModelConfig, val_batches: Callable[[], Any]) -> Any:
    """A reward-model run's Trainer `eval_hook`: pairwise accuracy on the held-out pairs
    (`reward_model.evaluate_reward_model` over a fresh `val_batches()`)."""
    from dpo_jax import reward_model

    def hook(step: int, params: Any) -> dict[str, float]:
        m = reward_model.evaluate_reward_model(cfg, params, val_batches())
        return {"eval/val_accuracy": m["accuracy"],
                "eval/val_accuracy_stderr": m["accuracy_stderr"],
                "eval/val_num_pairs": m["num_pairs"]}  # fmt: skip

    return hook


def reward_model_run(
    ctx: Context,
    config: ml_collections.ConfigDict,
    pairs: Any,
    *,
    cfg: models.ModelConfig,
    params: Any,
    train_batches: Callable[[Any], Any],
    length: int,
    pad_id: int,
) -> Any:
    """A reward-model phase's run (`config` its `dpo-jax train` config, with
    :func:`reward_model_overrides`) on `pairs` (`pipeline.PairData`) from `params`;
    `train_batches(pairs)` are its training micro-batches. With
    ``reward_model.val_fraction`` > 0 the pairs of that share of the prompts are held out
    (`pipeline.split_by_prompt`, drawn by ``data_seed``: validation prompts are unseen),
    their accuracy is the Trainer's evaluation every ``reward_model.eval_every`` steps and
    the best step's checkpoint is the phase's params (:func:`select_checkpoint`), as the
    paper did. metrics.json: that step and its params' accuracy on the held-out pairs
    (``val_*``) and on the training pairs."""
    from dpo_jax import reward_model

    rm, val = ctx.config.reward_model, None
    if float(rm.val_fraction):
        pairs, val = pipeline.split_by_prompt(pairs, float(rm.val_fraction), ctx.config.data_seed)
    micro = config.batch_size // config.grad_accum_steps

    def scoring(p: Any) -> Any:  # every pair once
        return pipeline.pair_eval_batches(p, micro, length, pad_id)

    hook = None if val is None else validation_hook(cfg, lambda: scoring(val))
    result = phases.train_phase(config, train_data=train_batches(pairs), model_config=cfg,
                                params=params, eval_hook=hook)  # fmt: skip
    metrics: dict[str, Any] = {"step": int(rm.num_steps)}
    if val is None:
        trained = jax.device_get(result.state.params)
    else:
        metrics["step"] = select_checkpoint(ctx)["step"]
        trained = phase_params(ctx.dir)
        val_metrics = reward_model.evaluate_reward_model(cfg, trained, scoring(val))
        metrics |= {f"val_{k}": v for k, v in val_metrics.items()}
    metrics |= reward_model.evaluate_reward_model(cfg, trained, scoring(pairs))
    if ctx.is_main:
        write_json(ctx.dir / "metrics.json", metrics)
    print(reward_model_summary(ctx.dir))
    return result


def reward_model_summary(directory: paths.Path) -> str:
    """One line from a reward-model phase's metrics.json: its step and its accuracy on the
    held-out and the training pairs; empty when the run has no such phase."""
    if not (directory / "metrics.json").exists():
        return ""
    m = read_json(directory / "metrics.json")
    line = f"reward model (step {m['step']}): "
    if "val_accuracy" in m:
        line += (f"validation accuracy {m['val_accuracy']:.3f} +- "
                 f"{m['val_accuracy_stderr']:.3f} on {m['val_num_pairs']:.0f} held-out pairs, ")  # fmt: skip
    return line + f"{m['accuracy']:.3f} on its {m['num_pairs']:.0f} training pairs"


def select_checkpoint(ctx: Context, metric: str = "eval/val_accuracy") -> dict[str, Any]:
    """The evaluated step of phase `ctx` with the highest `metric` in its metrics.jsonl
    (the earliest of ties; a resumed run's repeated step counts once), written to its
    selected.json: ``step``, the metric with its stderr, and every evaluated step's value."""
    from dpo_jax.metrics import read_jsonl

    by_step = {r["step"]: r for r in read_jsonl(ctx.dir / "metrics.jsonl") if metric in r}
    step = max(sorted(by_step), key=lambda s: by_step[s][metric])
    selected = {
        "step": step, "metric": metric, "value": by_step[step][metric],
        "stderr": by_step[step].get(f"{metric}_stderr"),
        "curve": {str(s): by_step[s][metric] for s in sorted(by_step)},
    }  # fmt: skip
    if ctx.is_main:
        write_json(ctx.dir / SELECTED, selected)
    return selected


def initial_params(config: ml_collections.ConfigDict, cfg: models.ModelConfig) -> Any:
    """The initial policy: `model.path`'s weights (as `common.policy_model_config` reads
    its shape) or a fresh init of `cfg` seeded by `config.seed`."""
    m = config.model
    if m.path:
        kw = dict(scan_layers=m.scan_layers) | ({"remat": m.remat} if m.remat else {})
        return models.load_hf(m.path, m.dtype, m.param_dtype, **kw)[1]
    return models.init_params(cfg, jax.random.key(config.seed))


def learned_reward(ctx: Context, cfg: models.ModelConfig, tokenizer: Any) -> Any:
    """The reward model of phase `reward_model` (prompt + completion ids -> score), scoring
    `eval.batch_size` rows per call."""
    from dpo_jax import reward_model

    params = trained_params(ctx, "reward_model")
    return reward_model.LearnedReward(cfg, params, tokenizer, batch_size=ctx.config.eval.batch_size)


def abstract_params(cfg: models.ModelConfig) -> Any:
    """The policy's params as ShapeDtypeStructs, for dry runs."""
    import flax.linen as nn

    return nn.meta.unbox(models.abstract_params(cfg))


# ------------------------------------------------------------------------------ run


def _checked(config: ml_collections.ConfigDict, experiment: Experiment) -> None:
    configs.migrate_deprecated(config)  # keys set under an old name (ppo.reward, ...)
    validate.validate(config)  # a bad key fails before any phase starts
    experiment.build_phases(config)  # and a bad method or setting before the run directory


def run(
    config: ml_collections.ConfigDict, experiment: Experiment
) -> tuple[paths.Path, dict[str, Any]]:
    """Run (or resume) the experiment, once per training seed of `config.seeds` (each in
    run_dir/seed_<s>, then the experiment's summary over seeds in run_dir); returns the
    run directory and what the phases that ran in this process returned (TrainResults of
    the training phases; with seeds, keyed ``seed_<s>/<phase>``)."""
    _checked(config, experiment)
    run_dir = common.make_run_dir(config, experiment.name)
    print(f"run directory: {run_dir}")
    returned = common.run_seeds(
        config,
        run_dir,
        lambda one, seed_dir: phases.run_phases(experiment.build_phases(one), one, seed_dir),
        lambda seed_dirs: experiment.write_seed_summary(config, run_dir, seed_dirs),
    )
    return run_dir, returned


def dry_run(config: ml_collections.ConfigDict, experiment: Experiment) -> dict[str, Any]:
    """`--dry_run`: each training phase's program, compiled with abstract params on
    `dry_run_devices` simulated devices; prints its per-device memory."""
    from experiments import dry_run as dry

    dry.ensure_cpu_devices(int(config.dry_run_devices))
    configs.migrate_deprecated(config)
    validate.validate(config)
    print(f"dry run: {config.model.path or 'from scratch'}, {len(jax.devices())} "
          f"{jax.devices()[0].platform} devices")  # fmt: skip
    return phases.dry_run_phases(experiment.build_phases(config), config, config.run_dir)


def main(argv: Sequence[str] | None, experiment: Experiment) -> int:
    """`python -m experiments.NAME`: the run, or with --dry_run the per-phase dry run."""
    argv = sys.argv[1:] if argv is None else argv
    args = common.parse_args(experiment.get_config, argv, experiment.presets, experiment.name)
    if args.dry_run:
        dry_run(args.config, experiment)
        return 0
    try:
        run(args.config, experiment)
    except phases.Preempted as stop:
        print(stop, file=sys.stderr)
        return 143  # 128 + SIGTERM, as if the signal had ended the process
    return 0
