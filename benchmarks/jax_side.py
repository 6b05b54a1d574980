"""dpo_jax doing one benchmark's DPO work: build state and batch, jit the step, time it.

Shared by ``train_step.py``, ``vs_trl.py`` and the layout / memory benchmarks. Uses only
the public pieces named in ``docs/CONTRACTS.md``: ``models``, ``train_step``, ``optim``
and the batch dict layout.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks import common


@dataclasses.dataclass(frozen=True)
class JaxRunConfig:
    """How dpo_jax runs the step (everything that is not the work itself)."""

    dtype: str = "float32"  # compute dtype; params stay float32
    remat: str = "none"  # none | block | dots_saveable
    reference: str = "frozen"  # frozen | precomputed
    logps_chunk_size: int = 0  # > 0: vocabulary-chunked log-probs
    attention_impl: str = "xla"
    learning_rate: float = 1e-6
    beta: float = 0.1
    scan_layers: bool = False


def model_config(shape: common.ModelShape, run: JaxRunConfig) -> Any:
    """A ``models.ModelConfig`` of ``shape`` with the run's dtype, remat and attention."""
    from dpo_jax import models

    sizes = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.d_model,
        num_layers=shape.n_layer,
        num_heads=shape.n_head,
        num_kv_heads=shape.kv_heads,
        intermediate_size=shape.ff,
        max_position_embeddings=shape.max_positions,
    )
    return models.ModelConfig.for_family(
        shape.family,
        **sizes,
        dtype=run.dtype,
        param_dtype="float32",
        remat=run.remat,
        attention_impl=run.attention_impl,
        scan_layers=run.scan_layers,
        eos_token_id=shape.vocab - 1,
    )


def stacked_batch(pairs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``stacked`` layout of CONTRACTS.md for fixed-length pairs (no padding).

    Row ``k < B`` is prompt_k + chosen_k, row ``B + k`` prompt_k + rejected_k; completion
    tokens carry their sequence index, prompt tokens ``-1``.
    """
    prompt, chosen, rejected = pairs["prompt_BxP"], pairs["chosen_BxC"], pairs["rejected_BxC"]
    p = prompt.shape[1]
    ids_NxL = np.concatenate(
        [np.concatenate([prompt, chosen], 1), np.concatenate([prompt, rejected], 1)], 0
    ).astype(np.int32)
    n, length = ids_NxL.shape
    seq_NxL = np.full((n, length), -1, np.int32)
    seq_NxL[:, p:] = np.arange(n, dtype=np.int32)[:, None]
    return {
        "input_ids": ids_NxL,
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy(),
        "segment_ids": np.ones((n, length), np.int32),
        "sequence_index": seq_NxL,
    }


def add_micro_axis(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The train step takes ``A`` micro-batches on a leading axis; here ``A = 1``."""
    return {k: np.asarray(v)[None] for k, v in batch.items()}


def build_step(
    cfg: Any, params: Any, run: JaxRunConfig, n_seq: int, total_steps: int
) -> tuple[Any, Any]:
    """The jitted train step (state donated) and its initial state."""
    import jax

    from dpo_jax import models, optim
    from dpo_jax import train_step as ts

    optimizer, schedule = optim.make_optimizer(
        {"name": "adamw", "learning_rate": run.learning_rate, "schedule": "constant"},
        total_steps,
        params=params,
    )
    step_cfg = ts.StepConfig(
        apply_fn=models.Transformer(cfg).apply,
        optimizer=optimizer,
        schedule=schedule,
        loss_name="sigmoid",
        loss_hyper={"beta": run.beta},
        reference=run.reference,
        logps_chunk_size=run.logps_chunk_size,
    )
    state = ts.init_state(params, optimizer, jax.random.key(0), run.reference == "frozen")
    step = jax.jit(functools.partial(ts.train_step, cfg=step_cfg, n_seq=n_seq), donate_argnums=0)
    return step, state


def run_dpo_jax(
    shape: common.ModelShape,
    batch_shape: common.BatchShape,
    pairs: Mapping[str, np.ndarray],
    steps: int,
    warmup: int = 1,
    run: JaxRunConfig | None = None,
    hf_dir: str | None = None,
    batch: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Time ``warmup + steps`` dpo_jax train steps on one fixed batch.

    ``hf_dir`` loads the same random init TRL uses; otherwise params are initialised
    here. ``batch`` overrides the stacked layout (prefix-shared, padded, ...). The step
    time covers the host-to-device copy of the batch and waits for the new state.
    """
    import jax
    import jax.numpy as jnp

    from dpo_jax import models

    run = run or JaxRunConfig()
    rss_before = common.current_rss_bytes()
    cfg = model_config(shape, run)
    if hf_dir is not None:
        loaded_cfg, params = models.load_hf(hf_dir, dtype=run.dtype, param_dtype="float32")
        cfg = loaded_cfg.replace(
            remat=run.remat, attention_impl=run.attention_impl, scan_layers=run.scan_layers
        )
    else:
        params = models.init_params(cfg, jax.random.key(0))
    n_seq = 2 * batch_shape.pairs
    host_batch = dict(batch if batch is not None else stacked_batch(pairs))
    if run.reference == "precomputed":
        host_batch["ref_logps"] = precompute_ref_logps(cfg, params, host_batch, n_seq, run)
    host_A = add_micro_axis(host_batch)
    step, state = build_step(cfg, params, run, n_seq, warmup + steps)
    metrics_log: list[dict[str, float]] = []
    holder = {"state": state}

    def one() -> None:
        device_batch = {k: jnp.asarray(v) for k, v in host_A.items()}
        new_state, metrics = step(holder["state"], device_batch)
        jax.block_until_ready(new_state)
        holder["state"] = new_state
        if len(metrics_log) < 2:
            metrics_log.append({k: float(v) for k, v in metrics.items()})

    timing = common.time_steps(one, steps, warmup)
    median = timing["median_step_s"]
    m0 = metrics_log[0]
    return {
        "framework": "dpo_jax",
        **timing,
        "compile_s": max(timing["first_step_s"] - median, 0.0),
        "tokens_per_s": batch_shape.tokens / median,
        "peak_rss_bytes": common.rss_peak_bytes(),
        "rss_before_bytes": rss_before,
        "device_peak_bytes": common.device_peak_bytes(),
        "step0_loss": m0.get("loss"),
        "step0_logps_chosen": m0.get("logps/chosen"),
        "step0_logps_rejected": m0.get("logps/rejected"),
        "step1_loss": metrics_log[1].get("loss") if len(metrics_log) > 1 else None,
    }


def precompute_ref_logps(
    cfg: Any, params: Any, batch: Mapping[str, np.ndarray], n_seq: int, run: JaxRunConfig
) -> np.ndarray:
    """Reference log-probs of every sequence (what ``dpo-jax ref-logps`` stores per row)."""
    import jax
    import jax.numpy as jnp

    from dpo_jax import models
    from dpo_jax import train_step as ts

    step_cfg = ts.StepConfig(
        apply_fn=models.Transformer(cfg).apply,
        optimizer=None,
        schedule=None,
        loss_name="sigmoid",
        logps_chunk_size=run.logps_chunk_size,
    )
    fn = jax.jit(lambda p, b: ts.sequence_logps(step_cfg, p, b, n_seq).logps)
    return np.asarray(fn(params, {k: jnp.asarray(v) for k, v in batch.items()}), np.float32)
