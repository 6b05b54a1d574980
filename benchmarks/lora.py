"""LoRA vs full fine-tuning: step time and memory.

Full fine-tuning with a frozen reference copy against LoRA (r = 16 on every linear
layer, alpha 16) with the adapters-off reference, same loss (sigmoid, beta 0.1), AdamW.

    python -m benchmarks.lora --part cpu   # GPT-2 small on this CPU: step time, peak RSS
    python -m benchmarks.lora --part aot   # Llama-3-8B shape, 8 simulated devices, FSDP:
                                           # per-device memory_analysis() of the AOT step

Each variant runs in its own subprocess (its own RSS peak; its own simulated devices).
Nothing is downloaded: GPT-2 small is a random init, the 8B shape is abstract.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from benchmarks import common

# name -> (reference mode, LoRA rank, dtype of the frozen base)
VARIANTS: dict[str, tuple[str, int, str]] = {
    "full+frozen_ref": ("frozen", 0, ""),
    "lora16+adapters_off": ("adapters_off", 16, ""),
    "lora16_bf16base+adapters_off": ("adapters_off", 16, "bfloat16"),
    "lora16_int8base+adapters_off": ("adapters_off", 16, "int8"),
}

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
    intermediate_size=14336, max_position_embeddings=8192, rope_theta=500000.0,
    tie_word_embeddings=False,
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("cpu", "aot"), default="cpu")
    p.add_argument("--variant", choices=sorted(VARIANTS), default=None, help="(child process)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list to run")
    p.add_argument("--model", default="gpt2-small", help="cpu part: a benchmarks.common shape")
    p.add_argument("--pairs", type=int, default=2, help="cpu: pairs per step")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--devices", type=int, default=8, help="aot: simulated CPU devices (fsdp)")
    p.add_argument("--aot-pairs", type=int, default=8, help="aot: pairs per step")
    p.add_argument("--aot-seq-len", type=int, default=1024)
    p.add_argument("--aot-layers", type=int, default=32, help="aot: layers of the 8B shape")
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def _child_cpu(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import jax_side

    reference, rank, base_dtype = VARIANTS[args.variant]
    shape = common.MODEL_SHAPES[args.model]
    b = common.BatchShape(args.pairs, args.prompt_len, args.completion_len)
    run = jax_side.JaxRunConfig(reference=reference, lora_rank=rank, lora_base_dtype=base_dtype)
    pairs = common.random_pairs(b, shape.vocab, shape.vocab - 1)
    res = jax_side.run_dpo_jax(shape, b, pairs, args.steps, args.warmup, run=run)
    res.update(variant=args.variant, model=shape.name, pairs=b.pairs, seq_len=b.seq_len)
    res["load_avg_1m"] = round(common.load_average(), 2)
    return res


def _child_aot(args: argparse.Namespace) -> dict[str, Any]:
    from experiments import dry_run

    dry_run.ensure_cpu_devices(args.devices)  # before JAX starts its backend
    import flax.linen as nn
    import jax
    import numpy as np

    from dpo_jax import lora, models, sharding, train_step
    from dpo_jax import trainer as trainer_lib
    from dpo_jax.data import batching
    from experiments import phases

    reference, rank, base_dtype = VARIANTS[args.variant]
    cfg = models.ModelConfig.for_family(
        "llama", **{**LLAMA3_8B, "num_layers": args.aot_layers},
        dtype="bfloat16", param_dtype="float32", remat="block", scan_layers=True,
    )  # fmt: skip
    lcfg = lora.LoraConfig(rank, float(rank), "all-linear", base_dtype) if rank else None
    abstract = nn.meta.unbox(models.abstract_params(cfg))
    # The run's own construction on abstract params: the Trainer lowers its step program.
    trainer, state = trainer_lib.build_trainer(
        cfg, abstract, mesh=sharding.make_mesh(1, args.devices, 1),
        optim_config={"name": "adamw", "learning_rate": 1e-5, "schedule": "constant"},
        total_steps=10, reference=reference, lora_config=lcfg,
        **train_step.default_settings(loss_name="sigmoid", loss_hyper={"beta": 0.1}),
    )  # fmt: skip
    pairs, half = args.aot_pairs, args.aot_seq_len // 2
    batch = batching.build_stacked([[1] * half] * pairs, [[2] * half] * (2 * pairs), 2 * half)
    if reference == "precomputed":
        batch["ref_logps"] = np.zeros((2 * pairs,), np.float32)
    batch_A = {k: v[None] for k, v in batch.items()}
    memory = phases.memory_report(trainer.lower(state, batch_A, 2 * pairs).compile())
    leaves = jax.tree.leaves(abstract)
    return dict(
        param_count=int(sum(np.prod(x.shape) for x in leaves)),
        memory=memory, variant=args.variant, devices=args.devices, seq_len=args.aot_seq_len,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.variant:  # child: one variant, JSON out
        res = _child_cpu(args) if args.part == "cpu" else _child_aot(args)
        common.emit(res, args.json, args.json_out)
        return [res]
    rows = []
    passthrough = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("variant", "variants", "json", "json_out")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            out = os.path.join(tmp, f"{name}.json")
            rows.append(
                common.spawn_json("benchmarks.lora", [*passthrough, "--variant", name], out)
            )
    print_report(args.part, rows)
    common.emit({"part": args.part, "rows": rows}, args.json, args.json_out)
    return rows


def print_report(part: str, rows: list[dict[str, Any]]) -> None:
    if part == "cpu":
        table = [
            {
                "variant": r["variant"],
                "median step s": f"{r['median_step_s']:.2f}",
                "peak RSS": common.fmt_bytes(r["peak_rss_bytes"]),
                "tokens/s": f"{r['tokens_per_s']:.0f}",
                "step-0 loss": f"{r['step0_loss']:.4f}",
                "load": r["load_avg_1m"],
            }
            for r in rows
        ]
        common.print_table(table, list(table[0]))
        return
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    table = [
        {
            "variant": r["variant"],
            "arguments": gib(r["memory"]["argument_size"]),
            "temporaries": gib(r["memory"]["temp_size"]),
            "peak estimate": gib(r["memory"]["peak_estimate"]),
        }
        for r in rows
    ]
    common.print_table(table, list(table[0]))
    print(json.dumps({r["variant"]: r["memory"] for r in rows}))


if __name__ == "__main__":
    main(sys.argv[1:])
