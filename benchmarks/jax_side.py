"""dpo_jax doing one benchmark's DPO work: build state and batch, jit the step, time it.

Shared by ``train_step.py``, ``vs_trl.py`` and the layout / memory benchmarks. Uses only
the public pieces named in ``docs/CONTRACTS.md``: ``models``, ``train_step``, ``optim``
and the batch dict layout.
"""

from __future__ import annotations

import dataclasses
import time
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
    scan_layers: bool = True  # nn.scan over the blocks (one compiled block, less overhead)
    unembed_scored_only: bool = True  # unembed only positions that predict a scored token
    lora_rank: int = 0  # > 0: LoRA on every linear layer (use reference="adapters_off")
    lora_base_dtype: str = ""  # LoRA: dtype of the frozen base ("" = float32)


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


def layout_batch(layout: str, pairs: Mapping[str, np.ndarray], pad_id: int) -> dict[str, Any]:
    """The batch of ``pairs`` in ``layout`` at its exact (unbucketed) length."""
    if layout == "stacked":
        return stacked_batch(pairs)
    from dpo_jax.data import batching

    items = [
        {"prompt": p, "chosen": c, "rejected": r}
        for p, c, r in zip(
            pairs["prompt_BxP"], pairs["chosen_BxC"], pairs["rejected_BxC"], strict=True
        )
    ]
    prompts, comps = batching.sequences_of(items, "paired")
    need = batching.required_length(
        layout, [len(p) for p in prompts], np.array([len(c) for c in comps])
    )
    return batching.build_batch(items, "paired", layout, length=need, pad_id=pad_id)


def add_micro_axis(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The train step takes ``A`` micro-batches on a leading axis; here ``A = 1``."""
    return {k: np.asarray(v)[None] for k, v in batch.items()}


def build_trainer(cfg: Any, params: Any, run: JaxRunConfig, total_steps: int) -> tuple[Any, Any]:
    """dpo_jax's own Trainer (mesh over every local device, sharded state) and its state.

    AdamW, constant lr, global-norm clip 1.0, no weight decay: TRL's defaults with
    ``lr_scheduler_type="constant"``.
    """
    from dpo_jax import lora, sharding, train_step
    from dpo_jax import trainer as trainer_lib

    lora_config = None
    if run.lora_rank > 0:
        lora_config = lora.LoraConfig(
            run.lora_rank, float(run.lora_rank), "all-linear", run.lora_base_dtype
        )
    return trainer_lib.build_trainer(
        cfg,
        params,
        mesh=sharding.make_mesh(),
        optim_config={
            "name": "adamw",
            "learning_rate": run.learning_rate,
            "schedule": "constant",
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
        },
        total_steps=total_steps,
        reference=run.reference,
        lora_config=lora_config,
        **train_step.default_settings(
            loss_name="sigmoid",
            loss_hyper={"beta": run.beta},
            logps_chunk_size=run.logps_chunk_size,
            unembed_scored_only=run.unembed_scored_only,
        ),
    )


def step_compiled_stats(trainer: Any, state: Any, batch_A: Mapping[str, Any], n_seq: int) -> dict:
    """XLA buffer sizes and FLOPs of the Trainer's jitted step (lowered, not run)."""
    from dpo_jax.train_step import train_step

    try:
        batch_A, n_seq = trainer.prepare_batch(batch_A, n_seq)
        fn = trainer._compiled(trainer._train_fns, train_step, batch_A, n_seq, True)
        t0 = time.perf_counter()
        with trainer.mesh_context():
            compiled = fn.lower(state, trainer.place_batch(batch_A)).compile()
        compile_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - stats are optional; the timing is the result
        return {"stats_error": f"{type(e).__name__}: {e}"[:300]}
    # jit reuses this executable (JAX caches compilations by module), so the first
    # timed step no longer includes compilation: report the measured compile here.
    return {"compile_s": compile_s, **common.compiled_stats(compiled)}


def load_or_init(
    shape: common.ModelShape, run: JaxRunConfig, hf_dir: str | None
) -> tuple[Any, Any]:
    """``(ModelConfig, params)``: the saved HF checkpoint when given, else a fresh init."""
    import jax

    from dpo_jax import models

    cfg = model_config(shape, run)
    if hf_dir is None:
        return cfg, models.init_params(cfg, jax.random.key(0))
    from dpo_jax.models import hf

    # The loader lays params out for the config (stacked per layer when scanned).
    return hf.load_hf(
        hf_dir,
        dtype=run.dtype,
        param_dtype="float32",
        remat=run.remat,
        attention_impl=run.attention_impl,
        scan_layers=run.scan_layers,
    )


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
    """Time ``warmup + steps`` dpo_jax train steps (``Trainer.step``) on one fixed batch.

    ``hf_dir`` loads the same random init TRL uses; otherwise params are initialised
    here. ``batch`` overrides the stacked layout (prefix-shared, padded, ...). The first
    step includes compilation (``compile_s`` = first step - median step); each timed step
    covers placing the host batch on the mesh and waits for the new state.
    """
    import jax

    run = run or JaxRunConfig()
    rss_before = common.current_rss_bytes()
    cfg, params = load_or_init(shape, run, hf_dir)
    n_seq = 2 * batch_shape.pairs
    host_batch = dict(batch if batch is not None else stacked_batch(pairs))
    if run.reference == "precomputed":
        host_batch["ref_logps"] = precompute_ref_logps(cfg, params, host_batch, n_seq, run)
    host_A = add_micro_axis(host_batch)
    trainer, state = build_trainer(cfg, params, run, warmup + steps)
    del params
    stats = step_compiled_stats(trainer, state, host_A, n_seq)
    metrics_log: list[dict[str, float]] = []
    holder = {"state": state}
    del state

    def one() -> None:
        new_state, metrics = trainer.step(holder["state"], host_A, n_seq)
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
        "compile_s": max(timing["first_step_s"] - median, 0.0),  # replaced by stats if measured
        "tokens_per_s": batch_shape.tokens / median,
        "peak_rss_bytes": common.rss_peak_bytes(),
        "rss_before_bytes": rss_before,
        "device_peak_bytes": common.device_peak_bytes(),
        **stats,
        "rows": int(host_batch["input_ids"].shape[0]),
        "row_length": int(host_batch["input_ids"].shape[1]),
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

    from dpo_jax import models, scoring

    apply_fn = models.Transformer(cfg).apply
    chunk = run.logps_chunk_size
    fn = jax.jit(lambda p, b: scoring.score(apply_fn, p, b, n_seq, chunk_size=chunk).logps_S)
    return np.asarray(fn(params, {k: jnp.asarray(v) for k, v in batch.items()}), np.float32)
