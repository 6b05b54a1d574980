"""Generation throughput of dpo_jax.sampling: generated tokens/s (optionally vs torch generate).

For each model shape: random weights, ``--batch`` random prompts of ``--prompt-len``
tokens, ``--new-tokens`` sampled per row (no EOS, so every row generates every token).
Reports the first call (compile + run) and the median of ``--repeats`` steady calls;
tokens/s = batch * new_tokens / median call time, prefill included.

``--vs-torch`` also times Hugging Face ``generate`` (PyTorch CPU, KV cache, sampling)
on a model of the same shape, as a reference point.

    python -m benchmarks.generation --json
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from benchmarks import common


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="tiny,gpt2-small", help="comma list of common.MODEL_SHAPES")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--vs-torch", action="store_true", help="also time transformers generate")
    p.add_argument("--json", action="store_true")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"{__file__}: --{name.replace('_', '-')} must be >= 1")
    unknown = [s for s in args.shapes.split(",") if s not in common.MODEL_SHAPES]
    if unknown:
        raise SystemExit(
            f"{__file__}: unknown shapes {unknown}; choose from {sorted(common.MODEL_SHAPES)}"
        )
    return args


def model_config(shape: common.ModelShape, dtype: str) -> Any:
    """A dpo_jax ModelConfig of a benchmark shape."""
    from dpo_jax import models

    return models.ModelConfig.for_family(
        shape.family,
        vocab_size=shape.vocab,
        hidden_size=shape.d_model,
        num_layers=shape.n_layer,
        num_heads=shape.n_head,
        num_kv_heads=shape.kv_heads,
        intermediate_size=shape.ff,
        max_position_embeddings=shape.max_positions,
        dtype=dtype,
        param_dtype=dtype,
    )


def bench_jax(shape: common.ModelShape, args: argparse.Namespace) -> dict[str, Any]:
    """Time dpo_jax.sampling.generate on random weights."""
    import jax

    from dpo_jax import models, sampling

    cfg = model_config(shape, args.dtype)
    params = models.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, shape.vocab, size=(args.batch, args.prompt_len)).tolist()
    config = sampling.SamplingConfig(
        max_new_tokens=args.new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        prompt_buckets=(args.prompt_len,),
    )
    model = models.Transformer(cfg)
    calls = iter(range(10**6))

    def call() -> Any:
        return sampling.generate(model, params, prompts, jax.random.key(next(calls)), config)

    t = common.time_steps(call, args.repeats)
    out = call()
    generated = int(out.lengths.sum())
    assert generated == args.batch * args.new_tokens, "benchmark rows must not stop early"
    return {
        "impl": "dpo_jax",
        "shape": shape.name,
        "params_M": round(models.param_count(cfg) / 1e6, 1),
        "first_call_s": t["first_step_s"],
        "median_call_s": t["median_step_s"],
        "tokens_per_s": generated / t["median_step_s"],
        "ms_per_step": 1e3 * t["median_step_s"] / args.new_tokens,
    }


def bench_torch(shape: common.ModelShape, args: argparse.Namespace) -> dict[str, Any]:
    """Time transformers' generate (PyTorch CPU) on a random model of the same shape."""
    import torch
    import transformers as tf

    if shape.family != "gpt2":
        raise SystemExit(f"--vs-torch supports gpt2-family shapes only, not {shape.name}")
    config = tf.GPT2Config(
        vocab_size=shape.vocab,
        n_positions=shape.max_positions,
        n_embd=shape.d_model,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        n_inner=shape.ff,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(config).eval()
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(0, shape.vocab, size=(args.batch, args.prompt_len)))
    kwargs: dict[str, Any] = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        pad_token_id=0,
        eos_token_id=None,
    )
    if args.temperature > 0:
        kwargs |= dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
    else:
        kwargs |= dict(do_sample=False)
    attn = torch.ones_like(ids)

    def call() -> Any:
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=attn, **kwargs)

    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "impl": f"torch {torch.__version__} generate",
        "shape": shape.name,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "first_call_s": first,
        "median_call_s": median,
        "tokens_per_s": args.batch * args.new_tokens / median,
        "ms_per_step": 1e3 * median / args.new_tokens,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print a table (or JSON) and return the result."""
    args = parse_args(argv)
    rows = []
    for name in args.shapes.split(","):
        shape = common.MODEL_SHAPES[name]
        rows.append(bench_jax(shape, args))
        if args.vs_torch:
            rows.append(bench_torch(shape, args))
    result = {
        "benchmark": "generation",
        "settings": {
            k: getattr(args, k)
            for k in (
                "batch",
                "prompt_len",
                "new_tokens",
                "repeats",
                "temperature",
                "top_p",
                "dtype",
            )
        },
        "machine": common.machine_info(),
        "rows": rows,
    }
    if not args.json:
        common.print_table(
            rows,
            [
                "impl",
                "shape",
                "params_M",
                "first_call_s",
                "median_call_s",
                "tokens_per_s",
                "ms_per_step",
            ],
        )
    common.emit(result, args.json, args.json_out)
    return result


if __name__ == "__main__":
    main()
