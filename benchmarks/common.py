"""Shared pieces of the dpo_jax benchmarks: shapes, FLOP counting, peaks, memory, output.

FLOP convention (used by every benchmark that reports FLOP/s or MFU):

* Blocks: ``2 * N_body`` FLOPs per token forward, ``N_body`` counting the weights of the
  attention projections (``D*(H+2K)*hd + H*hd*D``) and the MLP (``2*D*F``, or ``3*D*F``
  when gated). Embedding lookups, position embeddings, biases and norms count nothing.
* Unembedding: ``2 * D * V`` per *scored* position only, i.e. the ``C`` positions per
  sequence that predict a completion token. DPO needs no logits at prompt positions (TRL's
  fused LM head skips them), so projecting them is waste and earns no MFU credit;
  ``unembed_all=True`` gives the count for an implementation that projects every row
  position, for comparison.
* Attention: ``4 * L * n_layer * H * hd`` per token forward: ``Q K^T`` and ``P V`` over
  the full ``L x L`` score matrix (the PaLM appendix B convention; dense kernels compute
  the masked half too, so we count it).
* Policy forward + backward = 3x forward; the frozen reference adds 1x forward; a
  precomputed reference adds nothing.
* Tokens are the real (unpadded) tokens of the stacked work: ``2 * B * (P + C)`` per step,
  where every pair has a prompt of ``P`` and two completions of ``C`` tokens. Layouts that
  compute fewer tokens (prefix sharing) are credited with the same work, so their tokens/s
  is comparable with the stacked layout's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Decoder-only transformer dimensions, enough to count FLOPs and build HF configs."""

    name: str
    n_layer: int
    d_model: int
    n_head: int
    vocab: int
    max_positions: int
    d_ff: int = 0  # 0 = 4 * d_model
    n_kv_head: int = 0  # 0 = n_head
    gated_mlp: bool = False  # SwiGLU (Llama) has three MLP matrices
    family: str = "gpt2"

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


MODEL_SHAPES: dict[str, ModelShape] = {
    # GPT-2 small: 124M parameters with the tied 50257 x 768 embedding.
    "gpt2-small": ModelShape("gpt2-small", 12, 768, 12, 50257, 1024),
    "tiny": ModelShape("tiny", 2, 64, 4, 512, 128),
    # One block: the smoke tests' shape (compiles fastest).
    "micro": ModelShape("micro", 1, 32, 2, 128, 64),
    # ~1.1B Llama shape (TinyLlama-like) for accelerators.
    "llama-1b": ModelShape(
        "llama-1b",
        22,
        2048,
        32,
        32000,
        2048,
        d_ff=5632,
        n_kv_head=4,
        gated_mlp=True,
        family="llama",
    ),
}


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """Pairs per step and fixed per-pair lengths (every sequence is exactly P + C tokens)."""

    pairs: int
    prompt_len: int
    completion_len: int

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.completion_len

    @property
    def tokens(self) -> int:
        """Real tokens of the stacked work: chosen and rejected rows of P + C tokens."""
        return 2 * self.pairs * self.seq_len


def body_matmul_params(m: ModelShape) -> int:
    """Weights of the transformer blocks that take part in a matmul (attention + MLP)."""
    hd = m.head_dim
    attn = m.d_model * (m.n_head + 2 * m.kv_heads) * hd + m.n_head * hd * m.d_model
    mlp = (3 if m.gated_mlp else 2) * m.d_model * m.ff
    return m.n_layer * (attn + mlp)


def matmul_params(m: ModelShape) -> int:
    """Weights that take part in a matmul (blocks plus the unembedding, counted once)."""
    return body_matmul_params(m) + m.d_model * m.vocab


def forward_flops_per_sequence(
    m: ModelShape, prompt_len: int, completion_len: int, unembed_all: bool = False
) -> float:
    """Forward FLOPs of one prompt + completion sequence.

    Blocks run on every token; the unembedding is needed only at the ``completion_len``
    positions that predict a completion token (``unembed_all`` counts every position, what
    an implementation that projects the whole row does); attention is the full square.
    """
    seq_len = prompt_len + completion_len
    dense = 2.0 * body_matmul_params(m) * seq_len
    unembed = 2.0 * m.d_model * m.vocab * (seq_len if unembed_all else completion_len)
    attention = 4.0 * m.n_layer * m.n_head * m.head_dim * seq_len * seq_len
    return dense + unembed + attention


def train_step_flops(
    m: ModelShape, b: BatchShape, reference: str = "frozen", unembed_all: bool = False
) -> float:
    """Model FLOPs of one DPO step on the stacked work: policy fwd+bwd (+ reference fwd)."""
    if reference not in ("frozen", "precomputed"):
        raise ValueError(f"reference must be 'frozen' or 'precomputed', got {reference!r}")
    passes = 4.0 if reference == "frozen" else 3.0
    per_seq = forward_flops_per_sequence(m, b.prompt_len, b.completion_len, unembed_all)
    return passes * 2 * b.pairs * per_seq


# ---------------------------------------------------------------------------- peaks


def jax_matmul_peak(dtype: str = "float32", n: int = 0, repeats: int = 7) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` jitted matmul on the default JAX device.

    ``n = 0`` picks 2048 on CPU and 8192 on accelerators (a 2048 product leaves a GPU
    idle between launches, understating the peak).
    """
    import jax
    import jax.numpy as jnp

    if n <= 0:
        n = 2048 if jax.default_backend() == "cpu" else 8192

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def torch_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 7) -> float:
    """Best FLOP/s of an ``n x n`` matmul in PyTorch on CPU (the TRL side's own peak)."""
    import torch

    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(tdtype)
    b = torch.randn(n, n, generator=gen).to(tdtype)
    a @ b  # warm the kernels
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


# --------------------------------------------------------------------------- memory


def rss_peak_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Current resident set size from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class RssSampler:
    """Samples current RSS in a thread; ``peak`` is the maximum seen between start and stop.

    ``ru_maxrss`` is a process-lifetime peak and cannot be reset, so a phase's own peak
    (for example one layout among several in one process) needs sampling.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak = current_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first JAX device, or None where the backend has no stats (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))


def compiled_stats(compiled: Any) -> dict[str, Any]:
    """XLA's own view of a compiled step: buffer sizes and its FLOP count.

    ``temp_bytes`` is the scratch XLA allocates for the step (activations, logits,
    gradients before they land in the output); ``arg_bytes`` / ``out_bytes`` are the
    inputs and outputs (state, batch). ``xla_flops`` is the cost analysis' count, a second
    opinion on the formula in this module (it counts whatever the HLO computes, padding
    and unscored positions included, and may be absent on some backends).
    """
    out: dict[str, Any] = {}
    try:
        mem = compiled.memory_analysis()
        out["temp_bytes"] = int(mem.temp_size_in_bytes)
        out["arg_bytes"] = int(mem.argument_size_in_bytes)
        out["out_bytes"] = int(mem.output_size_in_bytes)
        out["alias_bytes"] = int(mem.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - backends without the analysis report nothing
        pass
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list):
            cost = cost[0] if cost else {}
        if cost and "flops" in cost:
            out["xla_flops"] = float(cost["flops"])
    except Exception:  # noqa: BLE001
        pass
    return out


# --------------------------------------------------------------------------- timing


def time_steps(step: Callable[[], Any], steps: int, warmup: int = 1) -> dict[str, float]:
    """Run ``step`` (which must block until its work is done) ``warmup + steps`` times.

    Returns the first call's time (compile + run) and the median / min of the steady calls.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "first_step_s": first,
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "steps_timed": steps,
    }


def load_average() -> float:
    """One-minute load average (the noise context of a measurement)."""
    return os.getloadavg()[0]


def machine_info() -> dict[str, Any]:
    """Date, host CPU and library versions to record next to every figure."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "load_avg_1m": round(load_average(), 2),
    }
    from importlib import metadata

    for dist in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[dist] = metadata.version(dist)
    return info


# --------------------------------------------------------------------------- data


def random_pairs(b: BatchShape, vocab: int, eos_id: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids of ``b.pairs`` pairs; each completion's last token is EOS (as TRL appends it).

    Returns ``prompt_BxP``, ``chosen_BxC``, ``rejected_BxC`` int32 arrays; no id other than
    the final one equals ``eos_id`` so text round-trips are exact.
    """
    rng = np.random.default_rng(seed)
    high = vocab - 1 if eos_id == vocab - 1 else vocab

    def draw(n: int, length: int) -> np.ndarray:
        ids = rng.integers(0, high, size=(n, length), dtype=np.int32)
        return np.where(ids == eos_id, (eos_id + 1) % high, ids).astype(np.int32)

    chosen = draw(b.pairs, b.completion_len)
    rejected = draw(b.pairs, b.completion_len)
    chosen[:, -1] = eos_id
    rejected[:, -1] = eos_id
    return {
        "prompt_BxP": draw(b.pairs, b.prompt_len),
        "chosen_BxC": chosen,
        "rejected_BxC": rejected,
    }


def word_level_tokenizer(vocab: int, eos_id: int, out_dir: str) -> str:
    """A saved fast tokenizer whose word ``w<i>`` is token ``i`` (exact lengths for TRL).

    EOS is ``<|endoftext|>`` with id ``eos_id`` and is also the pad token (TRL pads with it
    and masks by attention). Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    words = {f"w{i}": i for i in range(vocab) if i != eos_id}
    words[eos] = eos_id
    tok = Tokenizer(models.WordLevel(words, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([eos])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    fast.save_pretrained(out_dir)
    return out_dir


def ids_to_text(ids: Sequence[int], eos_id: int, leading_space: bool) -> str:
    """Render ids as words of the word-level tokenizer; a trailing EOS is dropped (TRL adds it)."""
    ids = list(ids)
    if ids and ids[-1] == eos_id:
        ids = ids[:-1]
    text = " ".join(f"w{i}" for i in ids)
    return (" " + text) if leading_space and text else text


# --------------------------------------------------------------------------- output


def fmt_bytes(n: int | None) -> str:
    """Human-readable bytes (MiB / GiB)."""
    if n is None:
        return "n/a"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.0f} MiB"


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print ``rows`` as an aligned text table over ``columns``."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    table = [list(columns)] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for i, row in enumerate(table):
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def spawn_json(module: str, argv: Sequence[str], out_path: str) -> dict[str, Any]:
    """Run ``python -m module *argv --json-out out_path`` in a fresh process; load its JSON.

    A fresh process gives a phase its own RSS peak (``ru_maxrss`` never goes down).
    """
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    cmd = [sys.executable, "-m", module, *argv, "--json-out", out_path]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{module} {' '.join(argv)} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    with open(out_path) as f:
        return json.load(f)


def emit(result: dict[str, Any], as_json: bool, json_path: str | None = None) -> None:
    """Write ``result`` as JSON to stdout (``--json``) and/or to ``json_path``."""
    text = json.dumps(result, indent=2, sort_keys=True, default=float)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
    if as_json:
        print(text)
