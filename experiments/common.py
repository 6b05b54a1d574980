"""Helpers every experiment module shares: command-line config overrides, the run
directory with its config.json, the results CSV and printed table, and a locally trained
tokenizer. (Metrics JSONL + TensorBoard: `dpo_jax.metrics.MetricsWriter`.)

An experiment module exposes ``get_config(preset)`` and calls :func:`parse_args` in
its ``main``; the command line is

    python -m experiments.NAME [--preset NAME] [--config.key=value ...] [--dry_run]

Overrides are parsed by `dpo_jax.configs` (Python literals, falling back to the raw
string) and type-checked by the ConfigDict, so ``--config.dpo.betas=(0.1,1.0)`` and
``--config.seed=3`` do what they look like.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from dpo_jax import configs, paths
from dpo_jax.errors import UserError

# --------------------------------------------------------------------- command line


@dataclasses.dataclass(frozen=True)
class ExperimentArgs:
    """What the experiment command line asked for."""

    config: ml_collections.ConfigDict
    preset: str
    dry_run: bool


def usage(name: str, presets: Sequence[str], config: ml_collections.ConfigDict) -> str:
    """`--help`: the command line, the presets and the config's keys with their values."""
    lines = [
        f"usage: python -m experiments.{name} [--preset NAME] [--config.KEY=VALUE ...] [--dry_run]",
        "",
        f"presets: {', '.join(presets)} (default {presets[0]})",
        "--dry_run: compile every phase on simulated devices and print its memory, train nothing",
        "--config.KEY=VALUE: set any key below (Python literals; strings as they are)",
        "",
        f"config keys (preset {presets[0]}):",
    ]
    flat = _flatten(config.to_dict())
    width = max(len(k) for k in flat)
    lines += [f"  {k.ljust(width)}  {v!r}" for k, v in flat.items()]
    return "\n".join(lines)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_args(
    get_config: Callable[[str], ml_collections.ConfigDict],
    argv: Sequence[str],
    presets: Sequence[str],
    name: str = "NAME",
) -> ExperimentArgs:
    """Parse ``[--preset NAME | --preset=NAME] [--config.key=value ...] [--dry_run]`` into a
    config; the first of `presets` is the default. Overrides go through `dpo_jax.configs`
    (the same parsing and type checks as ``dpo-jax train``). ``--help`` prints the usage,
    presets and config keys and exits 0; a mistake is a one-line `UserError`."""
    rest, overrides = configs.split_overrides(list(argv))
    for i, (key, value) in enumerate(overrides):
        if key == "workdir":  # the name before run_dir
            warnings.warn(
                "--config.workdir is deprecated: use --config.run_dir", FutureWarning, stacklevel=2
            )
            overrides[i] = ("run_dir", value)
    preset = presets[0]
    dry_run = False
    args = iter(rest)
    for arg in args:
        if arg in ("-h", "--help"):
            print(usage(name, presets, get_config(presets[0])))
            raise SystemExit(0)
        if arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
        elif arg == "--preset":
            preset = next(args, None)
            if preset is None:
                raise UserError("--preset: missing value; write --preset NAME")
        elif arg == "--dry_run":
            dry_run = True
        else:
            raise UserError(
                f"unrecognised argument {arg!r} (expected --preset NAME, --config.KEY=VALUE or "
                "--dry_run; --help lists them)"
            )
    if preset not in presets:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    config = get_config(preset)
    for key, value in overrides:
        configs.apply_override(config, key, value)
    return ExperimentArgs(config=config, preset=preset, dry_run=dry_run)


def console(main: Callable[[], int], name: str) -> int:
    """An experiment module's `__main__`: `main()`, with a user's mistake (a bad key,
    value, file or path) printed as one line, exit 2, as `dpo-jax` does."""
    from dpo_jax import cli  # lazy: the error helpers only, on the way out

    try:
        return main()
    except (UserError, *cli.PATH_ERRORS) as error:
        print(f"python -m experiments.{name}: error: {cli.one_line(error)}", file=sys.stderr)
        return 2


def agg_pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(
    fig: Any, ax: Any, title: str, path: str | os.PathLike, legend_outside: bool = False
) -> None:
    """Title, grid and legend on `ax` (right of it with `legend_outside`), then write
    `fig` as a PNG and close it."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    outside = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)} if legend_outside else {}
    ax.legend(fontsize=8, **outside)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    paths.write_atomic(path, png.getvalue())  # local or gs://
    agg_pyplot().close(fig)


# ---------------------------------------------------------------------- run directory


def make_run_dir(config: ml_collections.ConfigDict, experiment: str) -> paths.Path:
    """``config.run_dir`` or ``runs/EXPERIMENT/TIMESTAMP``, created, with config.json in it."""
    if "workdir" in config:  # set from Python under the old name: it would do nothing
        raise UserError(
            "config key 'workdir' was renamed 'run_dir' (the experiment's run directory)"
        )
    run_dir = config.run_dir
    if not run_dir:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = os.path.join("runs", experiment, stamp)
    run_dir = paths.Path(run_dir)  # local or gs://
    run_dir.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(
        run_dir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True)
    )
    return run_dir


def write_csv(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> None:
    """Rows as CSV with exactly `columns` (missing values are empty), written atomically."""
    f = io.StringIO(newline="")
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    paths.write_atomic(path, f.getvalue())  # local or gs://


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table (floats with 4 significant decimals)."""

    def cell(value: Any) -> str:
        if isinstance(value, float | np.floating):
            return "nan" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV written by :func:`write_csv` (values as strings)."""
    return list(csv.DictReader(io.StringIO(paths.as_path(path).read_text())))


# ---------------------------------------------------------------------- seeds


def confidence_half_width(values_S: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """Half-width of the Student-t confidence interval of the mean over the leading (seed)
    axis; NaN with fewer than two seeds."""
    from scipy import stats

    values_S = np.asarray(values_S, np.float64)
    num_seeds = values_S.shape[0]
    if num_seeds < 2:
        return np.full(values_S.shape[1:], np.nan)
    t = stats.t.ppf(0.5 + confidence / 2.0, df=num_seeds - 1)
    return t * values_S.std(axis=0, ddof=1) / math.sqrt(num_seeds)


def seed_runs(
    config: ml_collections.ConfigDict, run_dir: paths.Path
) -> list[tuple[int, ml_collections.ConfigDict, paths.Path]]:
    """(seed, config, run directory) of each training seed `config.seeds` asks for: the
    config with ``seed`` set and ``seeds`` emptied, in ``run_dir/seed_<s>``. Without
    `seeds`: the one run of ``config.seed`` in `run_dir` itself."""
    seeds = tuple(int(s) for s in config.get("seeds", ()))
    if not seeds:
        return [(int(config.seed), config, run_dir)]
    if len(set(seeds)) != len(seeds):
        from dpo_jax import errors

        raise errors.config_error("seeds", f"{seeds} repeats a seed", "list each seed once")
    out = []
    for seed in seeds:
        one = config.copy_and_resolve_references()
        one.seed, one.seeds = seed, ()
        out.append((seed, one, run_dir / f"seed_{seed}"))
    return out


SUMMARY_STATS = ("mean", "std", "ci95")


def summarize_seeds(
    tables: Mapping[int, Sequence[Mapping[str, Any]]],
    keys: Sequence[str],
    values: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per `keys` tuple (in first-seen order) over the per-seed `tables`:
    ``n_seeds``, and per value column its mean over seeds, sample std (ddof 1) and
    95% Student-t confidence half-width (``<v>_mean``, ``<v>_std``, ``<v>_ci95``).
    A key missing from some seed's table is summarised over the seeds that have it."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for table in tables.values():
        for row in table:
            groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, rows in groups.items():
        summary: dict[str, Any] = dict(zip(keys, key, strict=True), n_seeds=len(rows))
        for v in values:
            x_S = np.array([float(r[v]) for r in rows])
            summary[f"{v}_mean"] = float(x_S.mean())
            summary[f"{v}_std"] = float(x_S.std(ddof=1)) if len(x_S) > 1 else float("nan")
            summary[f"{v}_ci95"] = float(confidence_half_width(x_S))
        out.append(summary)
    return out


def summary_columns(keys: Sequence[str], values: Sequence[str]) -> list[str]:
    """The columns of :func:`summarize_seeds`' rows, in order."""
    return [*keys, "n_seeds", *(f"{v}_{s}" for v in values for s in SUMMARY_STATS)]


def run_seeds(
    config: ml_collections.ConfigDict,
    run_dir: paths.Path,
    run_one: Callable[[ml_collections.ConfigDict, paths.Path], Mapping[str, Any]],
    summarize: Callable[[dict[int, paths.Path]], Any],
) -> dict[str, Any]:
    """`run_one(config, directory)` for each run of :func:`seed_runs`, then, when
    `config.seeds` asks for several, `summarize({seed: directory})` on process 0. Returns
    what the runs returned, keyed ``seed_<s>/<name>`` with seeds (plain names without)."""
    returned: dict[str, Any] = {}
    runs = seed_runs(config, run_dir)
    for seed, one, seed_dir in runs:
        prefix = f"seed_{seed}/" if config.get("seeds") else ""
        returned.update({prefix + name: v for name, v in (run_one(one, seed_dir) or {}).items()})
    import jax

    if config.get("seeds") and jax.process_index() == 0:
        summarize({seed: d for seed, _, d in runs})
    return returned


def write_seed_summary(
    run_dir: paths.Path,
    tables: Mapping[int, Sequence[Mapping[str, Any]]],
    keys: Sequence[str],
    values: Sequence[str],
    plot: Callable[[list[dict[str, Any]], paths.Path], None],
    figure_name: str,
) -> list[dict[str, Any]]:
    """run_dir/summary.csv (:func:`summarize_seeds` of the per-seed `tables`) and the
    figure `plot(rows, run_dir / figure_name)`; prints the table and returns its rows."""
    rows = summarize_seeds(tables, keys, values)
    columns = summary_columns(keys, values)
    write_csv(run_dir / "summary.csv", rows, columns)
    plot(rows, run_dir / figure_name)
    print(format_table(rows, columns))
    print(f"over seeds {sorted(tables)}: {run_dir / 'summary.csv'}  {run_dir / figure_name}")
    return rows


# ------------------------------------------------------------------------ tokenizer


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None
):
    """A byte-level BPE trained on `texts` with `tokenizers`, wrapped as a
    `PreTrainedTokenizerFast` whose single special token ``<|endoftext|>`` is BOS, EOS and
    padding (GPT-2's convention). Saved with ``save_pretrained`` when `out_dir` is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special, eos_token=special, pad_token=special
    )
    if out_dir is not None:
        wrapped.save_pretrained(str(out_dir))
    return wrapped


def experiment_config(
    preset: str, *, hidden_size: int, num_layers: int, num_heads: int, max_positions: int
) -> ml_collections.ConfigDict:
    """An experiment's config base: `dpo-jax train`'s tree (`configs/default.py`, the
    keys of every training phase) plus what every experiment module shares; each module
    adds its own sections. The initial policy is a local HF checkpoint (`model.path`) or,
    with `model.path` empty, a fresh GPT-2 shape of these sizes."""
    from dpo_jax.configs import default

    c = default.get_config()
    c.preset = preset
    c.run_dir = (
        ""  # the experiment's run directory; empty: runs/NAME/TIMESTAMP; phase P runs in run_dir/P
    )
    c.model.update(path="", dtype="float32", param_dtype="float32", remat="none")
    c.model.scan_layers = False
    c.model.hidden_size = hidden_size
    c.model.num_layers = num_layers
    c.model.num_heads = num_heads
    c.model.max_position_embeddings = max_positions
    c.tokenizer = ""  # a local HF tokenizer dir; empty: a BPE trained on the experiment's texts
    # `seed` is the TRAINING seed (initialisation, batch order, the samples that become
    # pairs, PPO rollouts); `data_seed` fixes the task's data (corpus, fixture rows,
    # evaluation prompts), so runs over `seeds` differ only in training randomness.
    c.data_seed = 0
    # Training seeds to run, each in run_dir/seed_<s>/, summarised over seeds in
    # run_dir/summary.csv (mean, std, 95% CI). Empty: one run of `seed` in run_dir.
    c.seeds = ml_collections.FieldReference((), field_type=tuple)
    return c


def policy_model_config(
    config: ml_collections.ConfigDict, vocab_size: int, **special_tokens: int
) -> Any:
    """The policy's ModelConfig: `model.path`'s config.json (or a built-in shape of that
    name, for dry runs), else the from-scratch GPT-2 shape of `config.model` with
    `vocab_size` and the tokenizer's `special_tokens` (`bos_token_id=`, `eos_token_id=`,
    `pad_token_id=`)."""
    from dpo_jax import models
    from experiments import dry_run

    m = config.model
    kw = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers)
    if m.remat:
        kw["remat"] = m.remat
    if m.path:
        return dry_run.model_config_for(m.path, **kw)
    return models.ModelConfig.for_family(
        "gpt2", vocab_size=vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
        num_heads=m.num_heads, max_position_embeddings=m.max_position_embeddings,
        **special_tokens, **kw,
    )  # fmt: skip
