"""TRL's DPOTrainer on CPU doing one benchmark's DPO work (the reference side of vs_trl).

Imported only by ``benchmarks/vs_trl.py`` and the smoke test; needs ``trl`` (the ``bench``
extra). Everything is offline: a random GPT-2 saved with ``save_pretrained``, a local
word-level tokenizer and an in-memory ``datasets.Dataset``.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np

from benchmarks import common


def save_random_gpt2(shape: common.ModelShape, out_dir: str, seed: int = 0) -> str:
    """Save a randomly initialised GPT-2 of ``shape`` (float32, no dropout) to ``out_dir``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if shape.family != "gpt2":
        raise ValueError(f"vs_trl builds GPT-2 checkpoints only, got family {shape.family!r}")
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=shape.vocab,
        n_positions=shape.max_positions,
        n_embd=shape.d_model,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        n_inner=shape.ff,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=shape.vocab - 1,
        eos_token_id=shape.vocab - 1,
    )
    GPT2LMHeadModel(config).save_pretrained(out_dir)
    return out_dir


def pairs_dataset(pairs: dict[str, np.ndarray], eos_id: int, repeats: int):
    """An in-memory text dataset whose word-level tokenization gives exactly ``pairs``.

    The completions' trailing EOS is left off the text because TRL appends it.
    """
    from datasets import Dataset

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(repeats):
        for p, c, r in zip(
            pairs["prompt_BxP"], pairs["chosen_BxC"], pairs["rejected_BxC"], strict=True
        ):
            rows["prompt"].append(common.ids_to_text(p, eos_id, leading_space=False))
            rows["chosen"].append(common.ids_to_text(c, eos_id, leading_space=True))
            rows["rejected"].append(common.ids_to_text(r, eos_id, leading_space=True))
    return Dataset.from_dict(rows)


def run_trl(
    model_dir: str,
    tokenizer_dir: str,
    batch: common.BatchShape,
    pairs: dict[str, np.ndarray],
    steps: int,
    warmup: int = 1,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    learning_rate: float = 1e-6,
    output_dir: str | None = None,
) -> dict[str, Any]:
    """Train ``warmup + steps`` DPO steps with TRL and return timings, memory and step-0 metrics.

    Step time is measured from ``on_step_begin`` to ``on_step_end`` (forward, backward, clip,
    optimizer), which leaves TRL's data loading and logging out, in TRL's favour.
    """
    import tempfile

    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    eos_id = int(pairs["chosen_BxC"][0, -1])
    total = warmup + steps
    rss_before = common.current_rss_bytes()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dataset = pairs_dataset(pairs, eos_id, repeats=total)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.begin = 0.0
            self.times: list[float] = []
            self.logs: list[dict[str, float]] = []

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.begin)

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(
            output_dir=output_dir or tmp,
            per_device_train_batch_size=batch.pairs,
            max_steps=total,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            loss_type=["sigmoid"],
            beta=0.1,
            max_length=batch.seq_len,
            gradient_checkpointing=gradient_checkpointing,
            bf16=dtype == "bfloat16",
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
            # Sequential so step 0 sees pairs 0..B-1, the batch dpo_jax sees first.
            train_sampling_strategy="sequential",
        )
        trainer = DPOTrainer(
            model=model_dir,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[clock],
        )
        _check_tokenization(trainer, batch)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    if len(clock.times) != total:
        raise RuntimeError(f"TRL ran {len(clock.times)} steps, expected {total}")
    steady = clock.times[warmup:]
    median = statistics.median(steady)
    train_logs = [lg for lg in clock.logs if "loss" in lg]
    first = train_logs[0] if train_logs else {}
    return {
        "framework": "trl",
        "first_step_s": clock.times[0],
        "median_step_s": median,
        "min_step_s": min(steady),
        "steps_timed": len(steady),
        "train_wall_s": wall,
        "tokens_per_s": batch.tokens / median,
        "peak_rss_bytes": common.rss_peak_bytes(),
        "rss_before_bytes": rss_before,
        "torch_threads": torch.get_num_threads(),
        "step0_loss": first.get("loss"),
        "step0_logps_chosen": first.get("logps/chosen"),
        "step0_logps_rejected": first.get("logps/rejected"),
        "step1_loss": train_logs[1].get("loss") if len(train_logs) > 1 else None,
    }


def _check_tokenization(trainer: Any, batch: common.BatchShape) -> None:
    """Fail loudly if TRL's tokenization does not give the intended exact lengths."""
    row = trainer.train_dataset[0]
    got = (len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"]))
    want = (batch.prompt_len, batch.completion_len, batch.completion_len)
    if got != want:
        raise RuntimeError(
            f"{__file__}: TRL tokenized (prompt, chosen, rejected) lengths {got}, expected {want}"
        )


def trl_available() -> bool:
    """True when ``trl`` and ``torch`` import."""
    try:
        import torch  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":  # a quick manual check: python -m benchmarks.trl_side
    import tempfile

    shape = common.MODEL_SHAPES["tiny"]
    b = common.BatchShape(pairs=2, prompt_len=12, completion_len=4)
    with tempfile.TemporaryDirectory() as d:
        md = save_random_gpt2(shape, os.path.join(d, "model"))
        td = common.word_level_tokenizer(shape.vocab, shape.vocab - 1, os.path.join(d, "tok"))
        pr = common.random_pairs(b, shape.vocab, shape.vocab - 1)
        print(run_trl(md, td, b, pr, steps=3))
