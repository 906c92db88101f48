"""flax_resnet.configs: how a recipe name or file resolves, and validate_config's checks
(the CLI's exit codes for both are in tests/test_cli_train.py)."""

from __future__ import annotations

import pytest

from flax_resnet.configs import get_config, list_configs, load_config, validate, validate_config
from flax_resnet.errors import UserError
from flax_resnet.training import schedules
from flax_resnet.training.loop import train_and_evaluate

# (field, bad value, words the message must hold); each alone breaks an otherwise good config.
BAD_FIELDS = [
    ("num_epochs", -1, "must be at least 1 (or set --config.num_train_steps)"),
    ("num_epochs", 0, "at least 1"),
    ("num_train_steps", -5, "at least 1"),
    ("learning_rate", 0.0, "positive"),
    ("learning_rate", float("nan"), "finite"),
    ("batch_size", 0, "positive integer"),
    ("eval_batch_size", -8, "positive integer"),
    ("image_size", 4, "at least 8"),
    ("momentum", 1.0, "[0, 1)"),
    ("weight_decay", -1e-4, "at least 0"),
    ("label_smoothing", 1.0, "[0, 1)"),
    ("warmup_epochs", -1.0, "at least 0"),
    ("warmup_steps", -1, "at least 0"),
    ("schedule", "linear", "step, cosine, constant"),
    ("log_every_steps", 0, "at least 1"),
    ("checkpoint_every_steps", -1, "at least 0"),
    ("max_to_keep", 0, "at least 1"),
    ("backbone_lr_mult", -0.5, "at least 0"),
    ("batch_size", 1.5, "integer"),
]


def test_every_recipe_passes_validation():
    for name in list_configs():
        validate_config(get_config(name))
    assert "validate" not in list_configs() and "default" not in list_configs()


def test_every_schedule_name_the_validator_accepts_builds_a_schedule():
    for name in validate.SCHEDULES:
        config = get_config("digits_resnet20")
        config.schedule = name
        lr = schedules.create_learning_rate_fn(config, 10, 100)
        assert 0 < float(lr(50)) <= config.learning_rate * (1 + 1e-6), name
    config.schedule = "linear"
    with pytest.raises(UserError, match="schedule"):
        schedules.create_learning_rate_fn(config, 10, 100)


@pytest.mark.parametrize("field,value,words", BAD_FIELDS, ids=[f"{f}={v}" for f, v, _ in BAD_FIELDS])
def test_each_bad_field_is_one_line_naming_it(field, value, words):
    config = get_config("digits_resnet20")
    with config.ignore_type():
        config[field] = value
    with pytest.raises(UserError) as e:
        validate_config(config)
    message = str(e.value)
    assert message.startswith(f"--config.{field}=") and words in message and "\n" not in message


def test_steps_set_make_epochs_irrelevant_and_minus_one_means_epochs():
    config = get_config("digits_resnet20")
    config.num_epochs, config.num_train_steps = 0, 5
    validate_config(config)
    config.num_train_steps = -1
    with pytest.raises(UserError, match="num_epochs"):
        validate_config(config)
    config.num_epochs = 2
    validate_config(config)


def test_unknown_model_names_close_matches():
    config = get_config("digits_resnet20")
    config.model = "resnet21"
    with pytest.raises(UserError, match="unknown model 'resnet21'.*resnet20"):
        validate_config(config)


def test_load_config_validates_after_overrides():
    with pytest.raises(UserError, match=r"--config\.num_epochs=-1"):
        load_config("digits_resnet20", ["--config.num_epochs=-1"])
    assert load_config("digits_resnet20", ["--config.num_epochs=0", "--config.num_train_steps=3"]).num_train_steps == 3


@pytest.mark.parametrize("field,value", [("num_epochs", -1), ("learning_rate", -0.1), ("schedule", "linear")])
def test_train_and_evaluate_checks_before_writing(tmp_path, field, value):
    config = get_config("digits_resnet20")
    with config.ignore_type():
        config[field] = value
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=f"--config.{field}="):
        train_and_evaluate(config, workdir, print_fn=lambda *a, **k: None)
    assert not workdir.exists()


def test_a_file_named_like_a_recipe_does_not_shadow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits_resnet20").write_text("this is not python\n")
    assert get_config("digits_resnet20").model == "resnet20"
    (tmp_path / "mine").write_text("def get_config(): raise RuntimeError('never')\n")
    with pytest.raises(UserError, match="unknown config 'mine'"):  # no .py, no separator: a name
        get_config("mine")


def test_profile_steps_forms():
    from flax_resnet.configs.validate import parse_profile_steps

    assert parse_profile_steps("") is None and parse_profile_steps("0") is None
    assert parse_profile_steps("10,15") == (10, 15)
    assert parse_profile_steps("5", start_step=100) == (101, 106)  # after the (compiling) first step
    for bad in ("15,10", "a", "1,2,3", "-2"):
        with pytest.raises(UserError, match="--config.profile_steps"):
            parse_profile_steps(bad)
