"""Generation throughput of dpo_jax.sampling, prefill and decode apart (optionally vs torch).

For each model shape: random weights, ``--batch`` random prompts of ``--prompt-len``
tokens, ``--new-tokens`` sampled per row (no EOS, so every row generates every token).

Both implementations are timed as black boxes, the same way:

- **prefill** = a call that generates 1 token (time to first token: the prompt forward,
  its last-position logits, one sampled token, host transfers);
  ``prefill_tokens_per_s`` = batch * prompt_len / that time;
- **decode** = the rest of a call that generates ``--new-tokens``:
  ``decode_tokens_per_s`` = batch * (new_tokens - 1) / (t(new_tokens) - t(1)),
  ``ms_per_decode_step`` its inverse per row-step;
- ``tokens_per_s`` = batch * new_tokens / t(new_tokens), prefill included (end to end).

Times are medians of ``--repeats`` calls after one untimed warm-up call (which compiles);
``first_call_s`` is that first call. ``--vs-torch`` also times Hugging Face ``generate``
(PyTorch CPU, KV cache, sampling) on a GPT-2 of the same shape.

    python -m benchmarks.generation --shapes gpt2-small --vs-torch --repeats 5
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
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
    for name in ("batch", "prompt_len", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"{__file__}: --{name.replace('_', '-')} must be >= 1")
    if args.new_tokens < 2:
        raise SystemExit(f"{__file__}: --new-tokens must be >= 2 (decode = tokens after the first)")
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


def split_figures(call: Callable[[int], Any], args: argparse.Namespace) -> dict[str, float]:
    """Time ``call(new_tokens)`` at 1 and ``args.new_tokens`` tokens; prefill/decode figures.

    The two lengths alternate (1, M, 1, M, ...) so a load change hits both.
    """
    first = {}
    for m in (1, args.new_tokens):  # warm-up: compiles each length's program
        t0 = time.perf_counter()
        call(m)
        first[m] = time.perf_counter() - t0
    times: dict[int, list[float]] = {1: [], args.new_tokens: []}
    for _ in range(args.repeats):
        for m in times:
            t0 = time.perf_counter()
            call(m)
            times[m].append(time.perf_counter() - t0)
    t1 = statistics.median(times[1])
    tm = statistics.median(times[args.new_tokens])
    rows, steps = args.batch, args.new_tokens
    decode_s = tm - t1
    return {
        "first_call_s": first[steps],
        "median_call_s": tm,
        "tokens_per_s": rows * steps / tm,
        "prefill_s": t1,
        "prefill_tokens_per_s": rows * args.prompt_len / t1,
        "decode_s": decode_s,
        "decode_tokens_per_s": rows * (steps - 1) / decode_s if decode_s > 0 else float("nan"),
        "ms_per_decode_step": 1e3 * decode_s / (steps - 1),
        "call_times_s": {str(m): times[m] for m in times},
    }


def bench_jax(shape: common.ModelShape, args: argparse.Namespace) -> dict[str, Any]:
    """Time dpo_jax.sampling.generate on random weights."""
    import jax

    from dpo_jax import models, sampling

    cfg = model_config(shape, args.dtype)
    params = models.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, shape.vocab, size=(args.batch, args.prompt_len)).tolist()
    model = models.Transformer(cfg)
    calls = iter(range(10**6))

    def call(new_tokens: int) -> Any:
        config = sampling.SamplingConfig(
            max_new_tokens=new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            prompt_buckets=(args.prompt_len,),
        )
        out = sampling.generate(model, params, prompts, jax.random.key(next(calls)), config)
        # Every row generates every token, so decode figures count real tokens.
        assert int(out.lengths.sum()) == args.batch * new_tokens, "rows must not stop early"
        return out

    return {
        "impl": "dpo_jax",
        "shape": shape.name,
        "params_M": round(models.param_count(cfg) / 1e6, 1),
        **split_figures(call, args),
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
    attn = torch.ones_like(ids)
    sampling: dict[str, Any] = (
        dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
        if args.temperature > 0
        else dict(do_sample=False)
    )

    def call(new_tokens: int) -> Any:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                eos_token_id=None,
                **sampling,
            )
        assert out.shape == (args.batch, args.prompt_len + new_tokens)
        return out

    return {
        "impl": f"torch {torch.__version__} generate",
        "shape": shape.name,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        **split_figures(call, args),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print a table (or JSON) and return the result."""
    args = parse_args(argv)
    command = "python -m benchmarks.generation " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    rows = []
    for name in args.shapes.split(","):
        shape = common.MODEL_SHAPES[name]
        load_before = common.load_average()
        rows.append(bench_jax(shape, args))
        if args.vs_torch:
            rows.append(bench_torch(shape, args))
            ours, theirs = rows[-2], rows[-1]
            for key in ("tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
                ours[f"{key}_vs_torch"] = ours[key] / theirs[key]
        for row in rows[-2 if args.vs_torch else -1 :]:
            row["load"] = max(load_before, common.load_average())
    result = {
        "benchmark": "generation",
        "command": command,
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
        print(command)
        common.print_table(
            rows,
            [
                "impl",
                "shape",
                "prefill_s",
                "prefill_tokens_per_s",
                "ms_per_decode_step",
                "decode_tokens_per_s",
                "median_call_s",
                "tokens_per_s",
                "first_call_s",
                "load",
            ],
        )
        if args.vs_torch:
            for row in rows[::2]:
                print(
                    f"{row['shape']}: dpo_jax / torch generate = "
                    f"{row['prefill_tokens_per_s_vs_torch']:.2f}x prefill, "
                    f"{row['decode_tokens_per_s_vs_torch']:.2f}x decode, "
                    f"{row['tokens_per_s_vs_torch']:.2f}x end to end"
                )
    common.emit(result, args.json, args.json_out)
    return result


if __name__ == "__main__":
    main()
