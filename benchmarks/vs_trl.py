"""The same DPO work done by TRL's DPOTrainer (PyTorch) and by dpo_jax, side by side.

    python -m benchmarks.vs_trl --shape gpt2-small --pairs 4 --prompt-len 96 \
        --completion-len 32 --steps 5 --rounds 2 [--json]

Both sides train the SAME random GPT-2 (saved once with ``save_pretrained``; dpo_jax loads
it with ``models.load_hf``) on the SAME pairs (a word-level tokenizer makes TRL's
tokenization give exactly the intended ids and lengths), with the sigmoid loss, beta 0.1,
AdamW (lr 1e-6, constant, clip 1.0) and a frozen reference model. Each run is its own
subprocess so peak RSS is that framework's alone; runs alternate (TRL, dpo_jax, dpo_jax,
TRL, ...) so machine noise lands on both. Compile / first-step time is reported apart
from the steady-state median step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import Any

import numpy as np

from benchmarks import common


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (shared by the orchestrator and its workers)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(common.MODEL_SHAPES))
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step")
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--completion-len", type=int, default=8, help="includes the EOS TRL appends")
    p.add_argument("--steps", type=int, default=5, help="timed steady-state steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile)")
    p.add_argument("--rounds", type=int, default=1, help="alternating (TRL, dpo_jax) rounds")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--trl-dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="TRL's precision if different from --dtype (bfloat16 = TRL's default autocast)",
    )
    p.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="TRL's own default; off by default here since dpo_jax runs without remat",
    )
    p.add_argument("--remat", default="none", choices=["none", "block", "dots_saveable"])
    p.add_argument("--logps-chunk-size", type=int, default=0)
    p.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="dpo_jax: nn.scan over the blocks (default) or unrolled layers",
    )
    p.add_argument(
        "--scored-unembed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="dpo_jax: unembed only positions that predict a scored token (default) or all",
    )
    p.add_argument(
        "--layout",
        default="stacked",
        choices=["stacked", "prefix_shared"],
        help="dpo_jax's batch layout (prefix_shared: same log-probs, prompt computed once)",
    )
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--frameworks", default="trl,dpo_jax", help="comma list: trl,dpo_jax")
    p.add_argument("--inprocess", action="store_true", help="no subprocesses (tests; RSS shared)")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul-peak measurement")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--json-out", default=None, help="also write the JSON result here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("pairs", "prompt_len", "completion_len", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"{__file__}: --{name.replace('_', '-')} must be >= 1")
    shape = common.MODEL_SHAPES[args.shape]
    if args.prompt_len + args.completion_len > shape.max_positions:
        raise SystemExit(
            f"{__file__}: prompt + completion = {args.prompt_len + args.completion_len} exceeds "
            f"{args.shape}'s {shape.max_positions} positions"
        )
    return args


def prepare(args: argparse.Namespace, workdir: str) -> dict[str, str]:
    """Save the shared model, tokenizer and pairs under ``workdir``; return their paths."""
    from benchmarks import trl_side

    shape = common.MODEL_SHAPES[args.shape]
    eos = shape.vocab - 1
    paths = {
        "model": os.path.join(workdir, "model"),
        "tokenizer": os.path.join(workdir, "tokenizer"),
        "pairs": os.path.join(workdir, "pairs.npz"),
    }
    trl_side.save_random_gpt2(shape, paths["model"])
    common.word_level_tokenizer(shape.vocab, eos, paths["tokenizer"])
    b = batch_shape(args)
    np.savez(paths["pairs"], **common.random_pairs(b, shape.vocab, eos))
    return paths


def batch_shape(args: argparse.Namespace) -> common.BatchShape:
    """The per-step work from the command line."""
    return common.BatchShape(args.pairs, args.prompt_len, args.completion_len)


def run_worker(framework: str, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """One timed run of ``framework`` in this process."""
    shape = common.MODEL_SHAPES[args.shape]
    b = batch_shape(args)
    with np.load(os.path.join(workdir, "pairs.npz")) as f:
        pairs = {k: f[k] for k in f.files}
    if framework == "trl":
        from benchmarks import trl_side

        res = trl_side.run_trl(
            os.path.join(workdir, "model"),
            os.path.join(workdir, "tokenizer"),
            b,
            pairs,
            steps=args.steps,
            warmup=args.warmup,
            dtype=args.trl_dtype or args.dtype,
            gradient_checkpointing=args.trl_gradient_checkpointing,
            learning_rate=args.learning_rate,
        )
        peak = None if args.no_peak else common.torch_matmul_peak(args.trl_dtype or args.dtype)
    elif framework == "dpo_jax":
        from benchmarks import jax_side

        run = jax_side.JaxRunConfig(
            dtype=args.dtype,
            remat=args.remat,
            logps_chunk_size=args.logps_chunk_size,
            learning_rate=args.learning_rate,
            scan_layers=args.scan_layers,
            unembed_scored_only=args.scored_unembed,
        )
        batch = jax_side.layout_batch(args.layout, pairs, pad_id=shape.vocab - 1)
        res = jax_side.run_dpo_jax(
            shape,
            b,
            pairs,
            steps=args.steps,
            warmup=args.warmup,
            run=run,
            hf_dir=os.path.join(workdir, "model"),
            batch=batch,
        )
        peak = None if args.no_peak else common.jax_matmul_peak(args.dtype)
    else:
        raise ValueError(f"unknown framework {framework!r}; choose trl or dpo_jax")
    flops = common.train_step_flops(shape, b, "frozen")
    res["flops_per_step"] = flops
    res["flops_per_s"] = flops / res["median_step_s"]
    res["matmul_peak_flops"] = peak
    res["mfu"] = res["flops_per_s"] / peak if peak else None
    res["load_avg_1m"] = round(common.load_average(), 2)
    return res


def _spawn(framework: str, argv: list[str], workdir: str) -> dict[str, Any]:
    out = os.path.join(workdir, f"result-{framework}.json")
    worker_argv = [*argv, "--worker", framework, "--workdir", workdir]
    return common.spawn_json("benchmarks.vs_trl", worker_argv, out)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One framework's figures over its runs: medians of times, max of memory."""
    med = statistics.median(r["median_step_s"] for r in runs)
    first = runs[0]
    out = {
        "median_step_s": med,
        "min_step_s": min(r["min_step_s"] for r in runs),
        "first_step_s": statistics.median(r["first_step_s"] for r in runs),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "flops_per_s": statistics.median(r["flops_per_s"] for r in runs),
        "step0_loss": first.get("step0_loss"),
        "step0_logps_chosen": first.get("step0_logps_chosen"),
        "step0_logps_rejected": first.get("step0_logps_rejected"),
        "step1_loss": first.get("step1_loss"),
        "runs": runs,
    }
    peaks = [r["matmul_peak_flops"] for r in runs if r.get("matmul_peak_flops")]
    if peaks:
        out["matmul_peak_flops"] = max(peaks)
        out["mfu"] = out["flops_per_s"] / out["matmul_peak_flops"]
    if "compile_s" in first:
        out["compile_s"] = statistics.median(r["compile_s"] for r in runs)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison (or one worker) and print the table; returns the result dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        res = run_worker(args.worker, args, args.workdir)
        common.emit(res, as_json=False, json_path=args.json_out)
        return res
    frameworks = [f for f in args.frameworks.split(",") if f]
    for f in frameworks:
        if f not in ("trl", "dpo_jax"):
            raise SystemExit(f"{__file__}: unknown framework {f!r} in --frameworks")
    results: dict[str, list[dict[str, Any]]] = {f: [] for f in frameworks}
    with tempfile.TemporaryDirectory() as workdir:
        prepare(args, workdir)
        for r in range(args.rounds):
            # Alternate who goes first so a slow phase of the machine hits both.
            order = frameworks if r % 2 == 0 else frameworks[::-1]
            for f in order:
                if args.inprocess:
                    results[f].append(run_worker(f, args, workdir))
                else:
                    results[f].append(_spawn(f, argv, workdir))
    b = batch_shape(args)
    shape = common.MODEL_SHAPES[args.shape]
    result: dict[str, Any] = {
        "benchmark": "vs_trl",
        "shape": args.shape,
        "matmul_params": common.matmul_params(shape),
        "pairs": b.pairs,
        "prompt_len": b.prompt_len,
        "completion_len": b.completion_len,
        "tokens_per_step": b.tokens,
        "dtype": args.dtype,
        "trl_dtype": args.trl_dtype or args.dtype,
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
        "dpo_jax_remat": args.remat,
        "dpo_jax_scan_layers": args.scan_layers,
        "dpo_jax_scored_unembed": args.scored_unembed,
        "dpo_jax_layout": args.layout,
        "dpo_jax_logps_chunk_size": args.logps_chunk_size,
        "machine": common.machine_info(),
        "frameworks": {f: summarize(rs) for f, rs in results.items()},
    }
    fw = result["frameworks"]
    if "trl" in fw and "dpo_jax" in fw:
        result["speedup_tokens_per_s"] = fw["dpo_jax"]["tokens_per_s"] / fw["trl"]["tokens_per_s"]
        result["peak_rss_ratio"] = fw["dpo_jax"]["peak_rss_bytes"] / fw["trl"]["peak_rss_bytes"]
    print_report(result)
    common.emit(result, args.json, args.json_out)
    return result


def print_report(result: dict[str, Any]) -> None:
    """The human-readable table."""
    print(
        f"vs_trl  shape={result['shape']}  pairs={result['pairs']}  prompt={result['prompt_len']}  "
        f"completion={result['completion_len']}  dtype={result['dtype']} (TRL {result['trl_dtype']}"
        f"{', grad ckpt' if result['trl_gradient_checkpointing'] else ''})  "
        f"dpo_jax layout={result['dpo_jax_layout']} scan={result['dpo_jax_scan_layers']} "
        f"scored-unembed={result['dpo_jax_scored_unembed']}  "
        f"load={result['machine']['load_avg_1m']}"
    )
    rows = []
    for name, s in result["frameworks"].items():
        rows.append(
            {
                "framework": name,
                "step_s(median)": s["median_step_s"],
                "first_step_s": s["first_step_s"],
                "compile_s": s.get("compile_s", "-"),
                "tokens/s": s["tokens_per_s"],
                "GFLOP/s": s["flops_per_s"] / 1e9,
                "MFU(own peak)": s.get("mfu", float("nan")),
                "peak_RSS": common.fmt_bytes(s["peak_rss_bytes"]),
                "logps/chosen@0": s.get("step0_logps_chosen"),
            }
        )
    common.print_table(rows, list(rows[0]))
    if "speedup_tokens_per_s" in result:
        print(
            f"dpo_jax / TRL tokens/s = {result['speedup_tokens_per_s']:.2f}x   "
            f"peak RSS ratio = {result['peak_rss_ratio']:.2f}"
        )


if __name__ == "__main__":
    main()
