"""Config validation (`dpo_jax.configs.validate`) and the console script's error rule, in-process."""

from __future__ import annotations

import os

import pytest

from dpo_jax import cli, configs, losses, train
from dpo_jax.configs import default, validate
from dpo_jax.errors import UserError


def _config(**overrides):
    """The default config with dotted overrides applied as the command line would."""
    config = default.get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        if isinstance(value, float) and value != value:  # NaN: only a Python config sets it
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = value
        else:
            configs.apply_override(config, ".".join(parents + [leaf]), str(value))
    return config


def _refused(config, key: str) -> str:
    with pytest.raises(UserError) as info:
        validate.validate(config)
    message = str(info.value)
    assert message.startswith(f"config key '{key}': "), message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", losses.names())
def test_every_registered_loss_validates_with_its_defaults(name):
    config = default.get_config(name)
    if "beta" not in validate.loss_params(name):
        config.loss.hyper.beta = None  # "not set": sft and unlikelihood take no beta
    validate.validate(config)


BAD = [
    # (overrides, key the message names, words it must hold)
    ({"batch_size": 0}, "batch_size", ">= 1, got 0"),
    ({"batch_size": -4}, "batch_size", ">= 1"),
    ({"grad_accum_steps": 0}, "grad_accum_steps", ">= 1, got 0"),
    ({"batch_size": 64, "grad_accum_steps": 5}, "grad_accum_steps", "does not divide"),
    ({"num_steps": 0}, "num_steps", "-1 to train num_epochs"),
    ({"num_steps": -2}, "num_steps", "got -2"),
    ({"num_epochs": 0.0}, "num_epochs", "> 0"),
    ({"optim.learning_rate": 0.0}, "optim.learning_rate", "> 0"),
    ({"optim.learning_rate": -1e-5}, "optim.learning_rate", "> 0"),
    ({"optim.learning_rate": float("nan")}, "optim.learning_rate", "finite"),
    ({"optim.name": "adam"}, "optim.name", "did you mean 'adamw'"),
    ({"optim.schedule": "cosine_decay"}, "optim.schedule", "'cosine'"),
    ({"optim.warmup_steps": -1}, "optim.warmup_steps", ">= 0"),
    ({"optim.b2": 1.0}, "optim.b2", "[0, 1)"),
    ({"loss.hyper.beta": 0.0}, "loss.hyper.beta", "> 0"),
    ({"loss.hyper.beta": -0.1}, "loss.hyper.beta", "> 0"),
    ({"loss.hyper.f_alpha_divergence_coef": "big"}, "loss.hyper.f_alpha_divergence_coef",
     "must be a number"),
    ({"loss.hyper.label_smoothing": 0.5}, "loss.hyper.label_smoothing", "[0, 0.5)"),
    ({"loss.hyper.label_smoothing": -0.1}, "loss.hyper.label_smoothing", "[0, 0.5)"),
    ({"loss.name": "robust", "loss.hyper.label_smoothing": 0.7}, "loss.hyper.label_smoothing", ""),
    ({"loss.name": "kto", "loss.hyper.desirable_weight": 0.0}, "loss.hyper.desirable_weight", "> 0"),
    ({"loss.name": "kto", "loss.hyper.undesirable_weight": -1.0},
     "loss.hyper.undesirable_weight", "> 0"),
    ({"loss.name": "discopop", "loss.hyper.discopop_tau": 0.0}, "loss.hyper.discopop_tau", "> 0"),
    ({"loss.hyper.f_divergence_type": "kl"}, "loss.hyper.f_divergence_type", "'reverse_kl'"),
    ({"loss.name": "ipo", "loss.hyper.ipo_normalize": 1}, "loss.hyper.ipo_normalize", "true or false"),
    ({"loss.hyper.ld_alpha": 1.5}, "loss.hyper.ld_alpha", "[0, 1]"),
    ({"loss.hyper.rpo_alpha": -1.0}, "loss.hyper.rpo_alpha", ">= 0"),
    ({"loss.hyper.bta": 0.1}, "loss.hyper.bta", "did you mean 'beta'"),
    ({"loss.name": "kto", "loss.hyper.label_smoothing": 0.1}, "loss.hyper.label_smoothing",
     "loss 'kto' takes no hyper-parameter"),
    ({"loss.name": "sft"}, "loss.hyper.beta", "--config.loss.hyper.beta=None"),
    ({"loss.name": "sigmoidd"}, "loss.name", "did you mean 'sigmoid'"),
    ({"loss.name": "sigmoid,kto"}, "loss.name", "paired and unpaired"),
    ({"loss.name": "sigmoid,"}, "loss.name", "no loss name in"),
    ({"train.nan_policy": "ignore"}, "train.nan_policy", "'stop'"),
    ({"data.layout": "pack"}, "data.layout", "did you mean 'packed'"),
    ({"data.truncation_mode": "keep_left"}, "data.truncation_mode", "'keep_end'"),
    ({"data.max_length": 0}, "data.max_length", ">= 1"),
    ({"data.format": "csv"}, "data.format", "'explicit'"),
    ({"reference.mode": "frozen_ref"}, "reference.mode", "did you mean 'frozen'"),
    ({"reference.ref_model_mixup_alpha": 1.5}, "reference.ref_model_mixup_alpha", "[0, 1]"),
    ({"mesh.fsdp": 0}, "mesh.fsdp", "-1 for the devices left"),
    ({"loss.name": "kto", "batch_size": 4, "grad_accum_steps": 4}, "batch_size", "(KL rows)"),
    ({"mesh.data": -1, "mesh.tensor": -1}, "mesh.tensor", "mesh.data is -1 already"),
    ({"model.dtype": "float8"}, "model.dtype", "'bfloat16'"),
    ({"model.remat": "full"}, "model.remat", "'block'"),
    ({"checkpoint.save_every": 0}, "checkpoint.save_every", ">= 1"),
    ({"checkpoint.export_hf": True, "checkpoint.enabled": False}, "checkpoint.export_hf",
     "checkpoint.enabled=False"),
    ({"train.report_to": "wandb,comet"}, "train.report_to", "unknown logger 'comet'"),
    ({"train.report_to": "tensorboard"}, "train.report_to", "train.tensorboard"),
]  # fmt: skip


@pytest.mark.parametrize("overrides,key,words", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_value_is_refused_naming_its_key(overrides, key, words):
    config = _config(**{k.replace(".", "__"): v for k, v in overrides.items()})
    assert words in _refused(config, key)


GOOD = [
    {"num_steps": -1},  # -1: num_epochs over the data
    {"num_steps": 1},
    {"batch_size": 64, "grad_accum_steps": 64},
    {"loss.hyper.label_smoothing": 0.0},
    {"loss.hyper.label_smoothing": 0.49},
    {"loss.hyper.ld_alpha": 1.0},
    {"loss.hyper.rpo_alpha": 0.0},
    {"loss.hyper.beta": "None"},  # None: the loss's default
    {"loss.name": "sigmoid,sft"},  # sft takes no beta, sigmoid does: the mix takes it
    {"loss.name": "['sigmoid', 'sft']"},
    {"loss.name": "kto", "loss.hyper.desirable_weight": 1.33},
    {"optim.max_grad_norm": 0.0},  # <= 0: no clipping
    {"data.max_length": "None"},
    {"mesh.data": -1},
]


@pytest.mark.parametrize("overrides", GOOD, ids=[str(g) for g in GOOD])
def test_boundary_values_are_accepted(overrides):
    validate.validate(_config(**{k.replace(".", "__"): v for k, v in overrides.items()}))


def test_loss_names_reads_one_name_a_list_or_commas():
    def names(value):
        return losses.loss_names(losses.parse_loss_spec(value))

    assert names("ipo") == ["ipo"]
    assert names("sigmoid, sft") == ["sigmoid", "sft"]
    assert names("['sigmoid', 'sft']") == ["sigmoid", "sft"]
    assert names(("sigmoid", "sft")) == ["sigmoid", "sft"]
    with pytest.raises(UserError, match="loss.name"):
        names("[sigmoid")
    with pytest.raises(UserError, match="loss.name"):
        validate.validate(_config(loss__name="sigmoid,bogus"))


def test_validate_loss_per_loss_and_per_mix():
    validate.validate_loss("sigmoid", {"beta": 0.1, "label_smoothing": 0.1})
    validate.validate_loss(["sigmoid", "sft"], {"beta": 0.1, "rpo_alpha": 1.0})
    with pytest.raises(UserError, match=r"'loss.hyper.simpo_gamma': no loss of \['sigmoid', "):
        validate.validate_loss(["sigmoid", "sft"], {"simpo_gamma": 0.5})
    # The names come from the loss function's signature: a loss registered here is known.
    losses.register("test_validate_mine")(lambda stats, gain=1.0: (stats, {}))
    try:
        validate.validate_loss("test_validate_mine", {"gain": 2.0})
        with pytest.raises(UserError, match="must be a number"):
            validate.validate_loss("test_validate_mine", {"gain": "big"})
        with pytest.raises(UserError, match="'loss.hyper.beta'"):
            validate.validate_loss("test_validate_mine", {"beta": 0.1})
    finally:
        for table in (
            losses._REGISTRY,
            losses._PAIRED,
            losses._NEEDS_REFERENCE,
            losses._NEEDS_LOG1M,
        ):
            table.pop("test_validate_mine", None)


def test_loss_weights_must_match_the_names():
    config = _config(loss__name="sigmoid,sft", loss__hyper__beta=0.1)
    config.loss.weights = [1.0]
    assert "for 2 losses" in _refused(config, "loss.weights")
    config.loss.weights = [1.0, 0.5]
    validate.validate(config)


def test_check_run_dir(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(UserError, match=r"^config key 'run_dir': .* is under .*a_file.*, a file"):
        validate.check_run_dir(a_file / "run" / "deeper")
    with pytest.raises(UserError, match=r"^config key 'run_dir': .*a_file' is a file"):
        validate.check_run_dir(a_file)
    before = sorted(os.listdir(tmp_path))
    validate.check_run_dir(tmp_path / "new" / "run")  # creatable: fine, and nothing written
    validate.check_run_dir(tmp_path)
    assert sorted(os.listdir(tmp_path)) == before


def test_check_paths_names_the_key(tmp_path):
    config = _config(model__path=tmp_path / "nope", run_dir=tmp_path / "run")
    with pytest.raises(UserError, match=r"^config key 'model.path': .*nope' does not exist"):
        validate.check_paths(config)
    config.model.path = str(tmp_path)
    with pytest.raises(UserError, match=r"^config key 'data.train': is empty"):
        validate.check_paths(config)
    config.data.train = str(tmp_path / "*.jsonl")
    with pytest.raises(UserError, match=r"^config key 'data.train': .*matches no file"):
        validate.check_paths(config)
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(UserError, match=r"^config key 'data.train': .*d.jsonl: is a directory"):
        validate.check_paths(config)
    validate.check_paths(config, data=False)  # a notebook passing its own batches


def test_train_validates_before_anything(tmp_path):
    """batch_size=0 fails in train() before the (missing) model is read or run_dir made."""
    config = _config(batch_size=0, run_dir=tmp_path / "run", model__path=tmp_path / "none")
    with pytest.raises(UserError, match="^config key 'batch_size'"):
        train.train(config)
    assert not (tmp_path / "run").exists()


def test_override_mistakes_are_user_errors():
    config = default.get_config()
    with pytest.raises(
        UserError, match=r"^config key 'optim.learning_rate': 'fast' is not a number"
    ):
        configs.apply_override(config, "optim.learning_rate", "fast")
    with pytest.raises(UserError, match=r"^config key 'optim.learning_rat': no such config key; "):
        configs.apply_override(config, "optim.learning_rat", "1e-5")
    with pytest.raises(UserError, match="missing value"):
        configs.split_overrides(["--config.seed"])


def test_nan_stop_is_a_user_error():
    assert issubclass(train.NonFiniteLossError, UserError)
    assert issubclass(train.NonFiniteLossError, FloatingPointError)  # callers catching it


def test_console_main_maps_user_errors_only(monkeypatch, capsys):
    def raise_(error):
        def main(argv=None):
            raise error

        return main

    monkeypatch.setattr(cli, "main", raise_(UserError("first line\n  second line\n")))
    assert cli.console_main([]) == 2
    assert capsys.readouterr().err == "dpo-jax: error: first line; second line\n"
    monkeypatch.setattr(cli, "main", raise_(IsADirectoryError(21, "Is a directory", "/data")))
    assert cli.console_main([]) == 2
    assert capsys.readouterr().err == "dpo-jax: error: /data: Is a directory\n"
    # A bug is not a user mistake: it keeps its traceback.
    monkeypatch.setattr(cli, "main", raise_(ZeroDivisionError("division by zero")))
    with pytest.raises(ZeroDivisionError):
        cli.console_main([])


def test_moved_keys_work_under_their_old_names_everywhere(tmp_path):
    """`ppo.reward` & co. moved to `online.*`: set under the old name in Python or on the
    command line they take effect (with a warning), both names set differently is an
    error, and a checkpoint or phase marker written before the move compares equal."""
    from dpo_jax import configs, resume
    from dpo_jax.configs import default
    from dpo_jax.errors import UserError

    c = default.get_config()
    c.ppo.num_mini_batches = 3  # a notebook's old habit
    configs.migrate_deprecated(c)
    assert c.online.num_mini_batches == 3 and "num_mini_batches" not in c.ppo
    c = default.get_config()
    configs.apply_override(c, "ppo.reward", "vader")
    assert c.online.reward == "vader"
    c = default.get_config()
    c.online.kl_coef, c.ppo.kl_coef = 0.2, 0.3
    with pytest.raises(UserError, match="ppo.kl_coef"):
        configs.migrate_deprecated(c)
    now = default.get_config()
    now.online.num_rollouts = 3
    old = now.to_dict()
    old["ppo"]["num_rollouts"] = old["online"].pop("num_rollouts")  # the pre-move layout
    old["ppo"]["reward"] = old["online"].pop("reward")
    del old["online"]
    assert resume.config_diff(configs.migrate_saved(old), now, defaults=default.get_config()) == []
    assert resume.config_diff(old, now, defaults=default.get_config()) != []
