"""Optimizers and schedules against PyTorch / transformers on the same numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import PartitionSpec as P
from transformers.optimization import (
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from dpo_jax import optim


def _torch_lrs(kind: str, lr: float, warmup: int, total: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    make = get_linear_schedule_with_warmup if kind == "linear" else get_cosine_schedule_with_warmup
    sched = make(opt, warmup, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_matches_transformers(kind):
    sched = optim.make_schedule(1e-3, total_steps=40, warmup_steps=7, schedule=kind)
    ours = [float(sched(i)) for i in range(40)]
    np.testing.assert_allclose(ours, _torch_lrs(kind, 1e-3, 7, 40), rtol=1e-5, atol=1e-10)


def test_dpo_paper_warmup_is_linear_to_peak():
    sched = optim.make_schedule(1e-6, total_steps=1000, warmup_steps=150, schedule="constant")
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(75)), 0.5e-6, rtol=1e-6)
    np.testing.assert_allclose(float(sched(150)), 1e-6, rtol=1e-6)
    np.testing.assert_allclose(float(sched(999)), 1e-6, rtol=1e-6)


def _run_both(cfg: dict, torch_opt_fn, steps: int = 6):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    b0 = rng.normal(size=(3,)).astype(np.float32)
    grads = [
        (rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32))
        for _ in range(steps)
    ]
    params = {"dense": {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}}
    tx, _ = optim.make_optimizer(cfg, total_steps=steps, params=params)
    state = tx.init(params)
    for gw, gb in grads:
        g = {"dense": {"kernel": jnp.asarray(gw), "bias": jnp.asarray(gb)}}
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)

    tw = torch.nn.Parameter(torch.tensor(w0))
    tb = torch.nn.Parameter(torch.tensor(b0))
    topt = torch_opt_fn(tw, tb)
    for gw, gb in grads:
        tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
        topt.step()
    return params, tw.detach().numpy(), tb.detach().numpy()


def test_adamw_matches_torch_with_decay_mask():
    cfg = dict(
        name="adamw", learning_rate=1e-2, warmup_steps=0, schedule="constant",
        weight_decay=0.1, max_grad_norm=0.0,
    )  # fmt: skip
    ours, tw, tb = _run_both(
        cfg,
        lambda w, b: torch.optim.AdamW(
            [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
            lr=1e-2, eps=1e-8,
        ),
    )  # fmt: skip
    np.testing.assert_allclose(ours["dense"]["kernel"], tw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["dense"]["bias"], tb, rtol=1e-5, atol=1e-6)


def test_rmsprop_matches_torch():
    cfg = dict(
        name="rmsprop", learning_rate=1e-2, warmup_steps=0, schedule="constant",
        weight_decay=0.0, max_grad_norm=0.0,
    )  # fmt: skip
    ours, tw, tb = _run_both(
        cfg, lambda w, b: torch.optim.RMSprop([w, b], lr=1e-2, alpha=0.99, eps=1e-8)
    )
    np.testing.assert_allclose(ours["dense"]["kernel"], tw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["dense"]["bias"], tb, rtol=1e-5, atol=1e-6)


def test_global_norm_clipping_scales_update():
    params = {"w": jnp.zeros((2, 2))}
    tx, _ = optim.make_optimizer(
        dict(name="sgd", learning_rate=1.0, schedule="constant", max_grad_norm=1.0),
        total_steps=1, params=params,
    )  # fmt: skip
    g = {"w": jnp.full((2, 2), 3.0)}  # global norm 6 -> scaled by 1/6
    updates, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.5 * np.ones((2, 2)), rtol=1e-6)


def test_weight_decay_mask_skips_norms_biases_and_scanned_norms():
    params = {
        "embed": {"embedding": jnp.zeros((8, 4))},
        "layers": {
            "attn_norm": {"scale": jnp.zeros((2, 4))},  # scanned norm: rank 2 but no decay
            "mlp": {"kernel": jnp.zeros((2, 4, 8)), "bias": jnp.zeros((2, 8))},
            "q_bias_like": jnp.zeros((2, 4)),
        },
        "final_norm": {"scale": jnp.zeros((4,))},
    }
    logical = {
        "embed": {"embedding": P("vocab", "embed")},
        "layers": {
            "attn_norm": {"scale": P("layers", "norm")},
            "mlp": {"kernel": P("layers", "embed", "mlp"), "bias": P("layers", "mlp")},
            "q_bias_like": P("layers", "mlp"),
        },
        "final_norm": {"scale": P("norm")},
    }
    mask = optim.weight_decay_mask(params, logical)
    assert mask["embed"]["embedding"] is True
    assert mask["layers"]["mlp"]["kernel"] is True
    assert mask["layers"]["attn_norm"]["scale"] is False
    assert mask["layers"]["mlp"]["bias"] is False
    assert mask["layers"]["q_bias_like"] is False
    assert mask["final_norm"]["scale"] is False
    # without logical names a rank-2 unnamed leaf would decay; the name rules still hold
    mask_nolog = optim.weight_decay_mask(params)
    assert mask_nolog["layers"]["attn_norm"]["scale"] is False
    assert jax.tree.leaves(mask_nolog).count(True) == 3


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.make_optimizer(dict(name="lion"), total_steps=1)
    with pytest.raises(ValueError, match="unknown schedule"):
        optim.make_schedule(1.0, 10, 0, "step")
