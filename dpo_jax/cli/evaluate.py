"""`dpo-jax evaluate`: held-out preference metrics of a trained policy, and the reward of
its samples (mean, and win rate against a baseline's samples)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dpo_jax import configs
from dpo_jax.errors import UserError

if TYPE_CHECKING:
    import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`dpo-jax evaluate --model M [--reference R] [--data PAIRS] [--samples S --reward SPEC]`."""
    parser.add_argument(
        "--model", required=True, help="the policy: a Hugging Face directory or a run directory"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--reference",
        default=None,
        help="the reference policy's Hugging Face directory (default: config.reference.path, "
        "else config.model.path); needed with --data",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="held-out preference rows: implicit-reward accuracy and margins (TRL's eval names)",
    )
    parser.add_argument(
        "--samples", default=None, help="`dpo-jax sample` output to score with --reward"
    )
    parser.add_argument(
        "--baseline", default=None, help="a second sample file: win rate of --samples against it"
    )
    parser.add_argument(
        "--reward",
        default=None,
        help="reward for --samples: vader, hf:DIR, reward_model:DIR or python:MODULE:FUNCTION",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="config whose data settings tokenize --data and whose loss.hyper.beta scales the "
        "implicit reward (default: the run's own config.json for a run directory, else "
        "dpo_jax/configs/default.py)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")
    parser.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    configs.accept_overrides(parser)


def _config(args: argparse.Namespace) -> Any:
    """--config (default: the run's own `config.json` when --model is a run directory,
    else `default`) with the --config.KEY=VALUE overrides."""
    import ml_collections

    from dpo_jax import paths, saved_models  # lazy: etils, jax; `--help` stays light

    overrides = getattr(args, "config_overrides", [])
    saved = paths.Path(args.model) / "config.json"
    if args.config is None and saved.exists() and not saved_models.is_hf_dir(args.model):
        config = ml_collections.ConfigDict(
            configs.migrate_saved(json.loads(saved.read_text(encoding="utf-8")))
        )
        for key, value in overrides:
            configs.apply_override(config, key, value)
        return config
    return configs.load(args.config or "default", overrides)


def _shapes(params: Any) -> Any:
    """The parameter tree's shapes: the same architecture has the same ones."""
    import jax

    return jax.tree.map(lambda x: tuple(x.shape), params)


def _beta(config: Any) -> float:
    """The implicit reward's beta: loss.hyper.beta, else the loss function's own default."""
    from dpo_jax.configs import validate  # lazy: the loss registry imports jax

    hyper = dict(config.loss.hyper)
    if "beta" in hyper:
        return float(hyper["beta"])
    name = config.loss.name
    param = validate.loss_params(name).get("beta") if isinstance(name, str) else None
    if param is None or param.default is param.empty:
        raise UserError(f"loss {name!r} has no default beta: pass --config.loss.hyper.beta")
    return float(param.default)


def _read_samples(path: str) -> dict[tuple[int, int], dict]:
    """`(prompt_index, sample_index) -> record` of a `dpo-jax sample` file."""
    from dpo_jax import paths  # lazy: etils, jax; `--help` stays light

    out = {}
    with paths.Path(path).open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = (int(row["prompt_index"]), int(row["sample_index"]))
                out[key] = {"prompt": str(row["prompt"]), "completion": str(row["completion"])}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise UserError(
                    f"{path}:{lineno}: not a `dpo-jax sample` record ({type(e).__name__}: {e})"
                ) from None
    if not out:
        raise UserError(f"{path}: no samples")
    return out


def sample_metrics(
    samples: dict[tuple[int, int], dict],
    baseline: dict[tuple[int, int], dict] | None,
    reward_fn: Callable[[list[str], list[str]], np.ndarray],
    names: tuple[str, str],
) -> dict[str, float]:
    """Mean reward of ``samples`` and, with a ``baseline``, their win rate against it.

    The reward scores prompt + completion (as the on-policy trainers do). Samples are
    paired with the baseline's by (prompt_index, sample_index); a tie counts half.
    """
    from dpo_jax import evaluation

    keys = sorted(samples)
    prompts = [samples[k]["prompt"] for k in keys]
    scores = reward_fn(prompts, [samples[k]["completion"] for k in keys])
    metrics = evaluation.mean_and_stderr(scores).as_metrics("reward")
    if baseline is None:
        return metrics
    missing = [k for k in keys if k not in baseline]
    if missing:
        raise UserError(
            f"{names[1]}: no sample for prompt_index/sample_index {missing[0]} of {names[0]}"
        )
    base_scores = reward_fn(prompts, [baseline[k]["completion"] for k in keys])
    metrics |= evaluation.mean_and_stderr(base_scores).as_metrics("baseline_reward")
    won = evaluation.win_rate_from_scores(scores, base_scores)
    return metrics | won.as_metrics()


def run(args: argparse.Namespace) -> int:
    """Entry point of `dpo-jax evaluate`."""
    # lazy: jax, flax and transformers; `dpo-jax evaluate --help` stays light
    from dpo_jax import data, evaluation, paths, reward_sources, sampling, saved_models

    if args.data is None and args.samples is None:
        raise UserError("nothing to evaluate: pass --data (held-out pairs) and/or --samples")
    if (args.samples is None) != (args.reward is None):
        raise UserError("--samples and --reward go together (the reward scores the samples)")
    if args.baseline is not None and args.samples is None:
        raise UserError("--baseline needs --samples")
    config = _config(args)
    metrics: dict[str, float] = {}
    if args.data is not None:
        ref_path = args.reference or config.reference.path or config.model.path
        if not ref_path:
            raise UserError("--data needs a reference policy: pass --reference HF_DIR")
        cfg, params, tokenizer = saved_models.load_model(args.model, None, args.dtype, args.step)
        # the reference in the policy's parameter layout (a run's are scanned over layers)
        layout = {"scan_layers": cfg.scan_layers} if saved_models.is_hf_dir(str(ref_path)) else {}
        _, ref_params, _ = saved_models.load_model(str(ref_path), None, args.dtype, **layout)
        if _shapes(ref_params) != _shapes(params):
            raise UserError(
                f"--reference {ref_path}: another architecture than --model {args.model}"
            )
        spec = data.spec_from_config(config, args.data, paired=True)
        tokenized = data.load_preference_data(spec, tokenizer)
        batches = data.eval_batches(tokenized, args.batch_size, pad_id=sampling.pad_id(tokenizer))
        metrics |= evaluation.evaluate_preferences(
            cfg, params, batches, _beta(config), ref_params=ref_params
        )
    if args.samples is not None:
        reward_fn = reward_sources.text_reward(args.reward, key="--reward")
        baseline = None if args.baseline is None else _read_samples(args.baseline)
        metrics |= sample_metrics(
            _read_samples(args.samples), baseline, reward_fn, (args.samples, str(args.baseline))
        )
    text = json.dumps({k: round(float(v), 6) for k, v in metrics.items()})
    if args.output:
        with paths.Path(args.output).open("w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0
