"""The command line is derived from TrainConfig: every field has a flag, every choice list is the
library's own, the model's fields reach ModelConfig, and --dataset digits alone is sized for a CPU."""

from __future__ import annotations

import json
from dataclasses import asdict, fields

import pytest

from tolgate.solver import ADAPTIVE_METHODS, PER_SAMPLE_METHODS
from tolgate_flows.checkpoints import flag_of
from tolgate_flows.cli import config_from_args, parser
from tolgate_flows.models import ModelConfig
from tolgate_flows.train import CHOICES, DATASET_PRESETS, MODEL_FIELDS, PRESETS, TrainConfig, model_config


def _actions() -> dict[str, object]:
    return {flag: action for action in parser()._actions for flag in action.option_strings}


def test_every_config_field_has_a_flag():
    actions = _actions()
    missing = [f.name for f in fields(TrainConfig) if flag_of(f.name) not in actions]
    assert missing == []


def test_every_choice_list_is_the_librarys_constant():
    actions = _actions()
    for name, choices in CHOICES.items():
        assert tuple(actions[flag_of(name)].choices) == choices, name
    # every backend's methods are offered, tsit5 (per-sample only) included
    assert set(CHOICES["method"]) == set(ADAPTIVE_METHODS) | set(PER_SAMPLE_METHODS)


def test_a_flag_reaches_its_field():
    args = parser().parse_args(["--lr-decay", "0.5", "--time-embedding", "concatsquash", "--val-fraction", "0.2"])
    config = config_from_args(args)
    assert (config.lr_decay, config.time_embedding, config.val_fraction) == (0.5, "concatsquash", 0.2)


def test_model_fields_are_modelconfigs_with_its_defaults():
    train_names = {f.name for f in fields(TrainConfig)}
    assert set(MODEL_FIELDS) == {f.name for f in fields(ModelConfig)} & train_names - {"kind"}
    defaults, model_defaults = TrainConfig(), ModelConfig()
    for name in set(MODEL_FIELDS) - {"max_num_steps"}:  # the run's step budget is deliberate
        assert getattr(defaults, name) == getattr(model_defaults, name), name
    config = TrainConfig(model="ccnf", hidden=7, n_flows=3, zy_fraction=0.25, backend="tolgate", method="tsit5")
    built = model_config(config, (1, 8, 8), 10)
    assert built.kind == "ccnf" and built.image_shape == (1, 8, 8)
    assert all(getattr(built, name) == getattr(config, name) for name in MODEL_FIELDS)


def test_digits_without_a_preset_takes_the_cpu_preset():
    assert DATASET_PRESETS["digits"] == "cpu"
    config = config_from_args(parser().parse_args(["--dataset", "digits"]))
    for name, value in PRESETS["cpu"].items():
        assert getattr(config, name) == value, name
    plain = config_from_args(parser().parse_args([]))  # digits is the default dataset
    assert plain == config
    explicit = config_from_args(parser().parse_args(["--dataset", "digits", "--batch-size", "64"]))
    assert explicit.batch_size == 64 and explicit.hidden == PRESETS["cpu"]["hidden"]


@pytest.mark.parametrize("flags", [["--dataset", "digits", "--preset", "none"], ["--dataset", "cifar10"]])
def test_no_preset_means_the_field_defaults(flags):
    config = config_from_args(parser().parse_args(flags))
    defaults = TrainConfig()
    assert (config.batch_size, config.hidden, config.n_flows) == (defaults.batch_size, defaults.hidden, 2)


def test_resume_keeps_the_stored_sizes_instead_of_the_digits_preset(tmp_path):
    stored = asdict(TrainConfig(out=str(tmp_path)))  # written without any preset
    (tmp_path / "config.json").write_text(json.dumps(stored))
    config = config_from_args(parser().parse_args(["--resume", "--out", str(tmp_path)]))
    assert (config.batch_size, config.hidden) == (stored["batch_size"], stored["hidden"])
