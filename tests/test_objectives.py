"""Objectives through the one Trainer: SFT's token NLL against transformers and a plain
optax loop, the Bradley-Terry reward model against a hand computation, and exact resume
of both after a simulated preemption."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpo_jax import checkpoint, data, models, objectives, optim, scoring, train, train_step
from dpo_jax import trainer as trainer_lib
from dpo_jax.configs import tiny
from dpo_jax.metrics import read_jsonl
from tests.train_helpers import StopAfter, flat_params, synthetic_batches, tiny_model


def sft_batches(num: int, rows: int, seed: int, length: int = 16) -> list[dict]:
    """`num` SFT micro-batches of `rows` sequences: random prompts (some empty: language
    modelling) and targets."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        prompts = [rng.integers(3, 60, size=int(rng.integers(0, 5))).tolist() for _ in range(rows)]
        targets = [rng.integers(3, 60, size=int(rng.integers(2, 8))).tolist() for _ in range(rows)]
        out.append(data.build_sequences(prompts, targets, length))
    return out


def sft_config(num_steps: int, accum: int, rows: int):
    config = tiny.get_config()
    config.objective.name = "sft"
    config.num_steps = num_steps
    config.grad_accum_steps = accum
    config.batch_size = accum * rows
    config.train.tensorboard = False
    config.run_dir = ""
    return config


# ------------------------------------------------------------------ SFT batches


def test_build_sequences_marks_targets_and_the_first_token_of_text():
    batch = data.build_sequences([[5, 6], []], [[7, 8, 9], [3, 4, 2]], length=6, pad_id=0)
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 8, 9, 0], [3, 4, 2, 0, 0, 0]])
    # row 0: the prompt is context; row 1 (no prompt): its first token is the context
    np.testing.assert_array_equal(
        batch["sequence_index"], [[-1, -1, 0, 0, 0, -1], [-1, 1, 1, -1, -1, -1]]
    )
    np.testing.assert_array_equal(batch["segment_ids"], [[1] * 5 + [0], [1] * 3 + [0] * 3])
    with pytest.raises(ValueError, match="no target token"):
        data.build_sequences([[]], [[4]], length=4)


# ------------------------------------------------------------------ SFT loss


def test_sft_loss_equals_transformers_labels_loss(tmp_path):
    import torch

    from dpo_jax.models import hf
    from tests.hf_fixtures import load_torch_model, make_tiny_hf_model

    hf_dir = make_tiny_hf_model("gpt2", tmp_path / "gpt2")
    cfg, params = hf.load_hf(hf_dir, dtype="float32")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 60, size=k).tolist() for k in (3, 0, 5)]
    targets = [rng.integers(3, 60, size=k).tolist() for k in (4, 6, 2)]
    batch = data.build_sequences(prompts, targets, length=12)
    # through the Trainer's eval step (scored unembedding, the objective, the metrics)
    trainer, state = trainer_lib.build_trainer(
        cfg, params, mesh=_mesh(), optim_config=tiny.get_config().optim.to_dict(),
        total_steps=1, reference="none",
        **train_step.default_settings(loss_name="sigmoid", loss_hyper={}, objective="sft"),
    )  # fmt: skip
    metrics = trainer.evaluate(state, train.stack_micro_batches([batch]), 3)

    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.as_tensor(batch["segment_ids"] > 0, dtype=torch.long)
    labels = torch.where(torch.as_tensor(batch["sequence_index"] >= 0), ids, -100)
    with torch.no_grad():
        expected = load_torch_model(hf_dir)(input_ids=ids, attention_mask=mask, labels=labels).loss
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5, atol=1e-6)
    assert float(metrics["num_target_tokens"]) == 4 + 5 + 2
    np.testing.assert_allclose(float(metrics["perplexity"]), np.exp(float(expected)), rtol=1e-5)


def _mesh():
    from tests.train_helpers import one_device_mesh

    return one_device_mesh()


def _plain_nll(cfg: models.ModelConfig, params, batch) -> jax.Array:
    """Mean target-token NLL from full logits and log_softmax (a second code path)."""
    logits = models.Transformer(cfg).apply(
        {"params": params}, batch["input_ids"], positions=batch["positions"],
        segment_ids=batch["segment_ids"],
    )  # fmt: skip
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    mask = (batch["sequence_index"][:, 1:] >= 0).astype(jnp.float32)
    return -jnp.sum(tok * mask) / jnp.sum(mask)


@pytest.mark.heavy
def test_sft_through_train_matches_a_plain_optax_loop():
    cfg, params = tiny_model()
    accum, rows, steps = 2, 3, 3
    micro = sft_batches(steps * accum, rows, seed=1)
    config = sft_config(steps, accum, rows)
    result = train.train(config, train_data=micro, model_config=cfg, params=params)

    optimizer, _ = optim.make_optimizer(config.optim.to_dict(), steps, params)
    p, opt_state = params, optimizer.init(params)
    losses_seen = []
    for s in range(steps):
        # the whole step's batch at once: the loss normalises by all its target tokens
        whole = {
            k: jnp.concatenate([jnp.asarray(micro[s * accum + a][k]) for a in range(accum)])
            for k in ("input_ids", "positions", "segment_ids", "sequence_index")
        }
        loss, grads = jax.value_and_grad(_plain_nll, argnums=1)(cfg, p, whole)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        losses_seen.append(float(loss))
    np.testing.assert_allclose([r["loss"] for r in result.history], losses_seen, rtol=1e-5)
    np.testing.assert_allclose(flat_params(result.state.params), flat_params(p), atol=2e-6)
    assert all(np.isfinite(r["perplexity"]) for r in result.history)


# ------------------------------------------------------------------ reward model


def test_reward_model_rewards_and_bradley_terry_loss_by_hand():
    cfg, params = tiny_model()
    batch = synthetic_batches(num=1, pairs=3, seed=4)[0]
    head = objectives.init_reward_head(cfg, jax.random.key(2))
    apply_fn = models.Transformer(cfg).apply
    seq = jax.jit(lambda p, b: scoring.score(apply_fn, p, b, 6, needs={"last_hidden"}))(
        params, {k: jnp.asarray(v) for k, v in batch.items()}
    )  # fmt: skip
    assert seq.logps_S is None  # no unembedding was asked for
    rewards = np.asarray(objectives.head_rewards(head, seq.last_hidden_SxD))
    # by hand: the hidden state at each sequence's last marked token
    forward = jax.jit(
        lambda p, b: apply_fn(
            {"params": p},
            b["input_ids"],
            positions=b["positions"],
            segment_ids=b["segment_ids"],
            return_hidden=True,
        )  # fmt: skip
    )
    hidden = np.asarray(forward(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    expected = []
    for k in range(6):
        rows, cols = np.nonzero(batch["sequence_index"] == k)
        h = hidden[rows[-1], cols[-1]]
        expected.append(h @ np.asarray(head["kernel"]) + float(head["bias"]))
    np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-6)

    margin = np.asarray([0.5, -0.25, 0.0], np.float32)
    loss, m = objectives.bradley_terry_loss(
        jnp.asarray(rewards), margin_B=jnp.asarray(margin), center_rewards_coefficient=0.1
    )
    c, r = np.asarray(expected[:3], np.float64), np.asarray(expected[3:], np.float64)
    by_hand = np.mean(np.log1p(np.exp(-(c - r - margin)))) + 0.1 * np.mean((c + r) ** 2)
    np.testing.assert_allclose(float(loss), by_hand, rtol=1e-5)
    np.testing.assert_allclose(float(m["accuracy"]), np.mean(c > r))
    np.testing.assert_allclose(float(m["margin"]), np.mean(c - r), rtol=1e-5)


@pytest.mark.heavy
def test_reward_model_step_equals_grad_of_the_hand_loss():
    cfg, params = tiny_model()
    batches = synthetic_batches(num=1, pairs=2, seed=5)
    config = tiny.get_config()
    config.objective.name = "reward_model"
    config.objective.center_rewards_coefficient = 0.01
    config.num_steps, config.grad_accum_steps, config.batch_size = 1, 1, 2
    config.train.tensorboard, config.run_dir = False, ""
    result = train.train(config, train_data=batches, model_config=cfg, params=params)
    trained = result.state.params
    assert set(trained) == {"model", "head"}
    head0 = objectives.init_reward_head(cfg, jax.random.fold_in(jax.random.key(0), 0x4EAD))
    start = {"model": params, "head": head0}

    def hand_loss(p):
        b = {k: jnp.asarray(v) for k, v in batches[0].items()}
        h = models.Transformer(cfg).apply(
            {"params": p["model"]}, b["input_ids"], positions=b["positions"],
            segment_ids=b["segment_ids"], return_hidden=True,
        )  # fmt: skip
        last = scoring.last_token_index(b["sequence_index"], 4)
        r = h.reshape(-1, h.shape[-1])[last] @ p["head"]["kernel"] + p["head"]["bias"]
        d = r[:2] - r[2:]
        return -jnp.mean(jax.nn.log_sigmoid(d)) + 0.01 * jnp.mean((r[:2] + r[2:]) ** 2)

    loss, grads = jax.value_and_grad(hand_loss)(start)
    optimizer, _ = optim.make_optimizer(config.optim.to_dict(), 1, start)
    updates, _ = optimizer.update(grads, optimizer.init(start), start)
    np.testing.assert_allclose(result.history[0]["loss"], float(loss), rtol=1e-5)
    np.testing.assert_allclose(
        flat_params(trained), flat_params(optax.apply_updates(start, updates)), atol=2e-6
    )


# ------------------------------------------------------------------ exact resume


@pytest.mark.parametrize(
    "objective", ["sft", pytest.param("reward_model", marks=pytest.mark.heavy)]
)
def test_objective_resumes_bit_exactly(tmp_path, objective):
    cfg, params = tiny_model()
    if objective == "sft":
        batches = sft_batches(6, 2, seed=3)
    else:
        batches = synthetic_batches(num=6, pairs=2, seed=3)
    config = tiny.get_config()
    config.objective.name = objective
    config.num_steps, config.grad_accum_steps, config.batch_size = 3, 2, 4
    config.train.tensorboard = False
    opts = checkpoint.CheckpointOptions(save_every=100, async_save=False, handle_sigterm=False)

    def run(run_dir, ckpt):
        config.run_dir = str(run_dir)
        return train.train(
            config, train_data=batches, model_config=cfg, params=params, checkpointer=ckpt
        )

    def make_ckpt(run_dir):
        return checkpoint.Checkpointer(
            run_dir, options=opts, config=config.to_dict(), model_config=cfg,
            metrics_path=run_dir / "metrics.jsonl",
        )  # fmt: skip

    full = run(tmp_path / "full", None)
    part = tmp_path / "part"
    first = run(part, StopAfter(make_ckpt(part), step=1))
    assert [r["step"] for r in first.history] == [1]
    resumed = run(part, make_ckpt(part))
    assert [r["step"] for r in resumed.history] == [2, 3]
    np.testing.assert_array_equal(flat_params(resumed.state.params), flat_params(full.state.params))
    np.testing.assert_array_equal(
        flat_params(resumed.state.opt_state), flat_params(full.state.opt_state)
    )
    rows = read_jsonl(part / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in full.history]


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    import json

    from tests.hf_fixtures import make_tiny_hf_model, train_tokenizer

    root = tmp_path_factory.mktemp("sft")
    tok = train_tokenizer(chat_template=True)
    model_dir = make_tiny_hf_model("gpt2", root / "model", tokenizer=tok)
    rows = {
        "text": [{"text": f"The sky is blue {i} and the grass is green."} for i in range(8)],
        "completion": [
            {"prompt": f"Question {i}: how are you?", "completion": " I am fine."} for i in range(8)
        ],
        "messages": [
            {
                "messages": [
                    {"role": "user", "content": f"hi {i}"},
                    {"role": "assistant", "content": "hello there"},
                ]
            }
            for i in range(8)
        ],  # fmt: skip
    }
    for name, rs in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return root, model_dir, tok, rows


def _hf_sft_loss(model_dir, seqs: list[tuple[list[int], list[int]]]) -> float:
    """transformers' labels loss of (context, targets) sequences, right-padded."""
    import torch

    from tests.hf_fixtures import load_torch_model

    length = max(len(p) + len(t) for p, t in seqs)
    ids = torch.zeros((len(seqs), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for k, (p, t) in enumerate(seqs):
        ids[k, : len(p) + len(t)] = torch.as_tensor(p + t)
        mask[k, : len(p) + len(t)] = 1
        labels[k, len(p) : len(p) + len(t)] = torch.as_tensor(t)
    with torch.no_grad():
        model = load_torch_model(model_dir)
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize(
    "fmt", ["text", pytest.param("completion", marks=pytest.mark.heavy),
            pytest.param("messages", marks=pytest.mark.heavy)],
)  # fmt: skip
def test_cli_sft_first_step_loss_is_transformers_loss(sft_files, fmt):
    """`dpo-jax train --config.objective.name=sft`: TRL's SFT rows, tokenized as TRL does
    (EOS appended to plain text, completion-only targets for prompt-completion rows), give
    at step 1 the loss transformers computes on the same first 4 rows."""
    from dpo_jax import cli

    root, model_dir, tok, rows = sft_files
    run = root / f"run_{fmt}"
    args = [
        "train", "--config", "dpo_jax/configs/tiny.py", "--config.objective.name=sft",
        f"--config.model.path={model_dir}", f"--config.data.train={root / f'{fmt}.jsonl'}",
        f"--config.run_dir={run}", "--config.data.shuffle=False", "--config.num_steps=2",
        "--config.train.tensorboard=False",
    ]  # fmt: skip
    assert cli.main(args) == 0
    first = read_jsonl(run / "metrics.jsonl")[0]
    eos = tok.eos_token
    seqs = []
    for r in rows[fmt][:4]:
        if fmt == "text":
            full = tok(r["text"] + eos)["input_ids"]
            seqs.append((full[:1], full[1:]))
        elif fmt == "completion":
            p = tok(r["prompt"])["input_ids"]
            full = tok(r["prompt"] + r["completion"] + eos)["input_ids"]
            seqs.append((p, full[len(p) :]))
        else:
            full = tok(tok.apply_chat_template(r["messages"], tokenize=False),
                       add_special_tokens=False)["input_ids"]  # fmt: skip
            seqs.append((full[:1], full[1:]))
    np.testing.assert_allclose(first["loss"], _hf_sft_loss(model_dir, seqs), rtol=1e-5)
    assert first["num_target_tokens"] == sum(len(t) for _, t in seqs)


def test_cli_sft_bad_row_names_file_and_line(sft_files, tmp_path):
    from dpo_jax.errors import UserError

    root, model_dir, _, _ = sft_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    config = sft_config(1, 1, 1)
    config.model.path, config.data.train = str(model_dir), str(bad)
    with pytest.raises(UserError, match=r"bad\.jsonl:2: .*'text' must be a string"):
        train.train(config)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    config.data.train = str(pairs)
    with pytest.raises(UserError, match=r"pairs\.jsonl:1: objective needs SFT rows"):
        train.train(config)


@pytest.mark.heavy
def test_cli_reward_model_checkpoint_scores_like_its_logged_eval(sft_files, tmp_path):
    """`dpo-jax train --config.objective.name=reward_model` on DPO's preference rows: the
    head is checkpointed with the model, and scoring the checkpoint's params through
    `reward_model.evaluate_reward_model` (the host scorer) gives the logged eval metrics."""
    import json

    from dpo_jax import cli, reward_model

    root, model_dir, tok, _ = sft_files
    rng = np.random.default_rng(0)
    good, bad = ["fine", "good", "great", "happy"], ["no", "bad", "lazy", "dog"]
    rows = [
        {"prompt": f"Question {i}: how are you?", "chosen": f" I am {rng.choice(good)}.",
         "rejected": f" The {rng.choice(bad)}."}
        for i in range(12)
    ]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "rm"
    args = [
        "train", "--config", "dpo_jax/configs/tiny.py", "--config.objective.name=reward_model",
        f"--config.model.path={model_dir}", f"--config.data.train={tmp_path / 'pairs.jsonl'}",
        f"--config.data.eval={tmp_path / 'pairs.jsonl'}", f"--config.run_dir={run}",
        "--config.num_steps=2", "--config.train.tensorboard=False",
        "--config.checkpoint.enabled=True", "--config.checkpoint.async_save=False",
    ]  # fmt: skip
    assert cli.main(args) == 0
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/accuracy" in r][-1]
    _, meta, params = checkpoint.load_params(run)
    assert set(params) == {"model", "head"}
    cfg = models.ModelConfig.from_dict(meta["model_config"])  # the run's layout (scanned)
    config = tiny.get_config()
    config.data.train = str(tmp_path / "pairs.jsonl")
    spec = data.spec_from_config(config, config.data.train, True)
    held_out = data.eval_batches(data.load_preference_data(spec, tok), 2)
    got = reward_model.evaluate_reward_model(cfg, params, held_out)
    np.testing.assert_allclose(got["accuracy"], logged["eval/accuracy"], atol=1e-6)
    np.testing.assert_allclose(got["margin"], logged["eval/margin"], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize(
    ("objective", "key", "value", "match"),
    [
        ("sft", "reference.mode", "cache", "objective 'sft' uses no reference model"),
        ("reward_model", "lora.rank", 4, "trains a head beside the model"),
        ("sft", "data.layout", "prefix_shared", "single sequences"),
        ("reward_model", "objective.center_rewards_coefficient", -1.0, "center_rewards"),
        ("rl", None, None, "objective.name"),
    ],
)
def test_objective_config_mistakes_are_one_line_config_errors(objective, key, value, match):
    from dpo_jax.configs import validate
    from dpo_jax.errors import UserError

    config = tiny.get_config()
    config.objective.name = objective
    if key is not None:
        section, name = key.rsplit(".", 1)
        config[section][name] = value
    with pytest.raises(UserError, match=match) as e:
        validate.validate(config)
    assert "\n" not in str(e.value)


def test_one_default_per_setting():
    """Every optimizer / checkpoint / step setting left out takes configs/default.py's
    value: the library restates none of them."""
    from dpo_jax.configs import default

    d = default.get_config()
    assert d.optim.learning_rate == 1e-6  # TRL DPOConfig's default
    opts = checkpoint.CheckpointOptions()
    assert opts.save_every == d.checkpoint.save_every and opts.keep_last == d.checkpoint.keep_last
    settings = train_step.default_settings(loss_name="ipo")
    assert settings["loss_name"] == "ipo"
    for field, key in train_step.CONFIG_KEYS.items():
        section, name = key.split(".")
        assert settings[field] == d[section][name], field
    with pytest.raises(TypeError):  # every setting is given: none is restated as a default
        train_step.StepConfig(apply_fn=None, optimizer=None, schedule=None, loss_name="sigmoid")
    with pytest.raises(TypeError, match="nan_polcy"):
        train_step.default_settings(nan_polcy="skip")
    # a partial optimizer section is completed from default.py, not from optim.py
    _, schedule = optim.make_optimizer({"schedule": "constant"}, total_steps=10)
    assert float(schedule(0)) == pytest.approx(d.optim.learning_rate)
    with pytest.raises(Exception, match="optim.leraning_rate"):
        optim.make_optimizer({"leraning_rate": 1.0}, total_steps=10)


def test_multi_host_sft_batches_are_numbered_host_after_host():
    si = np.asarray([[[-1, 0, 0], [-1, 1, -1], [-1, -1, -1]]], np.int32)  # [A=1, N=3, L=3]
    batch = {"sequence_index": si}
    out, n = trainer_lib.globalize_host_batch(
        batch, 3, process_index=1, process_count=2, paired=False
    )
    assert n == 6
    np.testing.assert_array_equal(out["sequence_index"], [[[-1, 3, 3], [-1, 4, -1], [-1] * 3]])


def test_sft_formats_are_detected_without_taking_preference_rows():
    from dpo_jax.data import detect_format

    assert detect_format({"text": "a"}) == "sft_text"
    assert detect_format({"messages": []}) == "sft_messages"
    assert detect_format({"prompt": "a", "completion": "b"}) == "sft_completion"
    assert detect_format({"prompt": "a", "completion": "b", "label": True}) == "unpaired"
    # UltraFeedback rows carry `messages` beside chosen/rejected: still preference rows
    assert detect_format({"prompt": "a", "chosen": [], "rejected": [], "messages": []}) == (
        "ultrafeedback"
    )


def test_margin_column_reaches_reward_model_batches(tmp_path):
    """TRL RewardTrainer's optional `margin` column: parsed, tokenized and batched as a
    `[B]` array the Bradley-Terry objective subtracts; on some rows only it is refused."""
    import json

    from dpo_jax.errors import UserError
    from tests.data_helpers import tiny_tokenizer

    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "margin": 1.5},
        {"prompt": "Paris is in", "chosen": " France.", "rejected": " Spain.", "margin": 0.25},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = tiny_tokenizer()
    ds = data.load_preference_data({"path": str(path), "cache_dir": ""}, tok)
    batch = data.build_batch([ds[0], ds[1]], "paired")
    np.testing.assert_array_equal(batch["margin"], [1.5, 0.25])
    del rows[1]["margin"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="'margin' column is present on some rows only"):
        data.load_preference_data({"path": str(path), "cache_dir": ""}, tok)
