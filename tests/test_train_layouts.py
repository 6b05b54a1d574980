"""The three batch layouts (stacked, packed, prefix-shared) train identically."""

from __future__ import annotations

import numpy as np

from dpo_jax import data, train, train_step
from dpo_jax import trainer as trainer_lib
from tests.train_helpers import flat_params, one_device_mesh, synthetic_items, tiny_model


def test_layouts_give_the_same_updates():
    cfg, params = tiny_model()
    mesh = one_device_mesh()
    items = synthetic_items(4, seed=3)
    results = {}
    for layout in ("stacked", "packed", "prefix_shared"):
        batch = data.build_batch(items, "paired", layout)
        trainer, state = trainer_lib.build_trainer(
            cfg, params, mesh=mesh,
            optim_config=dict(name="sgd", learning_rate=0.5, schedule="constant"),
            total_steps=2, reference="frozen",
            **train_step.default_settings(loss_name="sigmoid", loss_hyper={"beta": 0.1}),
        )  # fmt: skip
        batch_A = train.stack_micro_batches([batch])
        n_seq = train.batch_num_sequences(batch_A, layout)
        assert n_seq == 8
        losses = []
        for _ in range(2):
            state, m = trainer.step(state, batch_A, n_seq)
            losses.append(float(m["loss"]))
        results[layout] = (batch["input_ids"].shape[0], losses, flat_params(state.params))
    rows = {k: v[0] for k, v in results.items()}
    assert rows == {"stacked": 8, "packed": 4, "prefix_shared": 4}  # really different layouts
    base = results["stacked"]
    assert base[1][1] < base[1][0]
    for layout in ("packed", "prefix_shared"):
        np.testing.assert_allclose(results[layout][1], base[1], rtol=1e-5)
        np.testing.assert_allclose(results[layout][2], base[2], rtol=1e-4, atol=1e-6)
