"""The command line is derived from TrainConfig: every setting (its fields and those of its nested
model, levers and tolerance configurations) has exactly one flag, every choice list is the library's
own, stored configurations of either layout (nested, or the flat one of earlier runs) are read, and
--dataset digits alone is sized for a CPU."""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import pytest

from tolgate.solver import ADAPTIVE_METHODS, PER_SAMPLE_METHODS
from tolgate_flows.checkpoints import flag_of, resume_conflicts
from tolgate_flows.cli import config_from_args, parser
from tolgate_flows.levers import LeverConfig
from tolgate_flows.models import ModelConfig
from tolgate_flows.tolerance import ToleranceConfig
from tolgate_flows.train import (
    CHOICES,
    DATASET_PRESETS,
    PRESETS,
    SETTINGS,
    UNFLAGGED,
    TrainConfig,
    build,
    stored_settings,
    upgrade_config,
    with_settings,
)

ROOT = Path(__file__).resolve().parents[1]
# The flags whose form is not ``--`` + the flat name with dashes (checkpoints._FLAG_OF).
_OTHER_FORMS = {"progress_bar": "--no-progress", "gate_mean_log10": "--gate-mean-from"}


def _actions() -> dict[str, object]:
    return {flag: action for action in parser()._actions for flag in action.option_strings}


def _leaf_paths(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf field below ``cls``, nested dataclasses walked."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in fields(cls):
        path = (*prefix, f.name)
        paths += _leaf_paths(hints[f.name], path) if is_dataclass(hints[f.name]) else [path]
    return paths


def test_every_nested_field_has_exactly_one_flag():
    """Each leaf of TrainConfig (nested parts walked) is a setting, with a flag of its own, or is
    listed as set by the run or not offered; no two settings share a flag and every flag of the
    parser but the command's own (--preset, --resume, ...) is a setting's."""
    leaves = _leaf_paths(TrainConfig)
    flagged = [setting.path for setting in SETTINGS.values()]
    assert sorted(flagged + sorted(UNFLAGGED)) == sorted(leaves)  # each leaf once, flagged or not
    assert UNFLAGGED <= set(leaves)  # no stale entry
    actions = _actions()
    dests = [action.dest for action in parser()._actions]
    for name in SETTINGS:
        flag = _OTHER_FORMS.get(name, "--" + name.replace("_", "-"))
        assert flag_of(name) == flag and flag in actions, name
        if name not in _OTHER_FORMS:
            assert dests.count(name) == 1 and actions[flag].dest == name, name
    own = {"help", "preset", "gate_mean_from", "no_progress", "resume", "compare"}
    assert set(dests) - own == set(SETTINGS) - set(_OTHER_FORMS)


def test_nested_parts_are_the_model_tolerance_and_lever_configurations():
    config = TrainConfig()
    assert isinstance(config.model, ModelConfig) and isinstance(config.tolerance, ToleranceConfig)
    assert config.levers is config.model.levers and isinstance(config.levers, LeverConfig)
    assert SETTINGS["model"].path == ("model", "kind") and SETTINGS["tolerance"].path == ("tolerance", "mode")
    assert SETTINGS["kinetic"].path == ("model", "levers", "kinetic")
    assert SETTINGS["probe_size"].path == ("tolerance", "probe_size") and SETTINGS["lr"].path == ("lr",)
    # TrainConfig declares none of its parts' fields again; the one name it shares is the run's
    # epochs, which tolerance.epochs (the span of a schedule) follows
    nested = {f.name for cls in (ModelConfig, ToleranceConfig, LeverConfig) for f in fields(cls)}
    assert {f.name for f in fields(TrainConfig)} & nested == {"epochs"}


def test_every_choice_list_is_the_librarys_constant():
    actions = _actions()
    for name, choices in CHOICES.items():
        assert tuple(actions[flag_of(name)].choices) == choices, name
    # every backend's methods are offered, tsit5 (per-sample only) included
    assert set(CHOICES["method"]) == set(ADAPTIVE_METHODS) | set(PER_SAMPLE_METHODS)


def test_a_flag_reaches_its_field():
    args = parser().parse_args(
        ["--lr-decay", "0.5", "--time-embedding", "concatsquash", "--val-fraction", "0.2", "--model", "ccnf"]
        + ["--tolerance", "learned", "--probe-size", "8", "--kinetic", "0.01"]
    )
    config = config_from_args(args)
    assert (config.lr_decay, config.model.time_embedding, config.val_fraction) == (0.5, "concatsquash", 0.2)
    assert (config.model.kind, config.tolerance.mode, config.tolerance.probe_size) == ("ccnf", "learned", 8)
    assert config.levers.kinetic == 0.01


def test_run_defaults_are_the_parts_defaults_but_where_deliberate():
    defaults, model, tolerance = TrainConfig(), ModelConfig(), ToleranceConfig()
    assert defaults.model == ModelConfig(max_num_steps=1000)  # the run's step budget
    assert model.max_num_steps is None
    assert defaults.tolerance.probe_size == 16 != tolerance.probe_size
    assert defaults.levers == LeverConfig()


def test_the_run_sets_the_tolerance_fields_that_are_its_own():
    config = TrainConfig.from_settings(epochs=7, eval_tol=1e-6, backend="tolgate", method="tsit5")
    assert (config.tolerance.epochs, config.tolerance.reference_tol, config.tolerance.per_sample) == (7, 1e-6, True)
    given = TrainConfig(epochs=3, tolerance=ToleranceConfig(mode="scheduled", epochs=99))
    assert given.tolerance.epochs == 3 and given.tolerance.mode == "scheduled"


def test_the_model_takes_the_datas_shape_and_classes():
    config = TrainConfig.from_settings(model="ccnf", hidden=7, n_flows=3, zy_fraction=0.25)
    sized = config.for_data((3, 16, 16), 4)
    assert sized.model == ModelConfig(
        kind="ccnf", hidden=7, n_flows=3, zy_fraction=0.25, image_shape=(3, 16, 16), n_classes=4, max_num_steps=1000
    )
    assert sized.settings() == config.settings()  # the data's sizes are no settings
    model = build(config, (1, 8, 8), 10)
    assert model.config.kind == "ccnf" and model.config.hidden == 7 and model.config.image_shape == (1, 8, 8)


def test_flat_settings_are_refused_by_the_constructor_and_unknown_names_by_from_settings():
    with pytest.raises(TypeError, match="from_settings"):
        TrainConfig(model="ccnf")
    with pytest.raises(ValueError, match="unknown settings \\['hiden'\\]"):
        TrainConfig.from_settings(hiden=8)


def test_digits_without_a_preset_takes_the_cpu_preset():
    assert DATASET_PRESETS["digits"] == "cpu"
    config = config_from_args(parser().parse_args(["--dataset", "digits"]))
    for name, value in PRESETS["cpu"].items():
        assert config.settings()[name] == value, name
    plain = config_from_args(parser().parse_args([]))  # digits is the default dataset
    assert plain == config
    explicit = config_from_args(parser().parse_args(["--dataset", "digits", "--batch-size", "64"]))
    assert explicit.batch_size == 64 and explicit.model.hidden == PRESETS["cpu"]["hidden"]


@pytest.mark.parametrize("flags", [["--dataset", "digits", "--preset", "none"], ["--dataset", "cifar10"]])
def test_no_preset_means_the_field_defaults(flags):
    config = config_from_args(parser().parse_args(flags))
    defaults = TrainConfig()
    assert (config.batch_size, config.model.hidden, config.model.n_flows) == (defaults.batch_size, 64, 2)


def test_resume_keeps_the_stored_sizes_instead_of_the_digits_preset(tmp_path):
    stored = asdict(TrainConfig(out=str(tmp_path)))  # written without any preset
    (tmp_path / "config.json").write_text(json.dumps(stored))
    config = config_from_args(parser().parse_args(["--resume", "--out", str(tmp_path)]))
    assert (config.batch_size, config.model.hidden) == (stored["batch_size"], stored["model"]["hidden"])
    assert config == TrainConfig.from_dict(stored)


# A config.json of the flat layout every run wrote before the configuration was nested
# (runs/digits_study/s-fixed-1e-5-seed0, issue 9's study): no lever settings yet, no multiplier_lr.
OLD_FLAT = {
    "dataset": "digits", "data_dir": None, "model": "infocnf", "tolerance": "fixed", "train_tol": 1e-05,
    "eval_tol": 1e-05, "schedule_end_tol": 0.0001, "gate_mean_log10": None, "batch_size": 128, "epochs": 30,
    "lr": 0.003, "gate_lr": 0.1, "lr_decay_epoch": None, "lr_decay": 0.1, "warmup_iters": 0, "grad_clip": None,
    "beta": 0.5, "alpha": 0.01, "baseline_momentum": 0.9, "reward_backward_nfe": False, "reward_loss_weight": 1.0,
    "estimator": "probe", "probe_every": 10, "probe_size": 16, "probe_draws": 4, "budget_fraction": 0.1,
    "penalty": 1.0, "adaptive_step": 0.5, "seed": 0, "device": "cpu",
    "out": "/work/main/runs/digits_study/s-fixed-1e-5-seed0", "hidden": 16, "n_flows": 1, "n_scales": None,
    "method": "dopri5", "adjoint": False, "seminorm": False, "backend": "torchdiffeq", "noise": "rademacher",
    "time_embedding": "concat", "zy_fraction": 0.5, "zy_location": "first-scale", "eval_divergence": "hutchinson",
    "eval_draws": 1, "eval_noise_seed": None, "eval_batch_size": 512, "max_train_batches": None,
    "max_eval_batches": None, "val_fraction": 0.1, "recheck_tols": [1e-06, 1e-07], "sample_every": 4,
    "progress_bar": False, "max_num_steps": 1000,
}  # fmt: skip


def test_upgrade_moves_every_flat_setting_to_its_place():
    nested = upgrade_config({**OLD_FLAT, "kinetic": 0.01, "removed_long_ago": 3})
    assert nested["model"]["kind"] == "infocnf" and nested["model"]["hidden"] == 16
    assert nested["model"]["levers"] == {"kinetic": 0.01}
    assert nested["tolerance"]["mode"] == "fixed" and nested["tolerance"]["probe_size"] == 16
    assert nested["lr"] == 0.003 and nested["removed_long_ago"] == 3  # kept, for the reader to ignore
    assert not {"hidden", "train_tol", "kinetic", "max_num_steps"} & set(nested)
    assert upgrade_config(nested) == nested  # the nested layout comes back as it was
    current = asdict(TrainConfig())
    assert upgrade_config(current) == current
    assert OLD_FLAT["model"] == "infocnf"  # the input is not changed


def test_an_old_flat_configuration_reads_as_the_same_run():
    config = TrainConfig.from_dict(OLD_FLAT)
    settings = config.settings()
    assert {name: settings[name] for name in OLD_FLAT} == OLD_FLAT
    assert config.levers == LeverConfig() and config.tolerance.multiplier_lr == 0.0  # settings it lacks: defaults
    assert config == TrainConfig.from_settings(**OLD_FLAT)
    assert TrainConfig.from_dict(asdict(config)) == config  # and the nested layout round-trips
    assert stored_settings(OLD_FLAT) == OLD_FLAT
    assert stored_settings(asdict(config)) == settings


def test_settings_go_into_either_layout():
    nested = with_settings(OLD_FLAT, {"model": "ccnf", "kinetic": 0.5, "epochs": 2})
    config = TrainConfig.from_dict(nested)
    assert (config.model.kind, config.model.hidden, config.levers.kinetic, config.epochs) == ("ccnf", 16, 0.5, 2)
    assert with_settings(asdict(TrainConfig()), {"hidden": 9})["model"]["hidden"] == 9
    with pytest.raises(ValueError, match="unknown settings"):
        with_settings(OLD_FLAT, {"levers": {}})


def test_resume_reads_an_old_flat_config_json_and_still_refuses_a_changed_flag(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**OLD_FLAT, "out": str(tmp_path)}))
    config = config_from_args(parser().parse_args(["--resume", "--out", str(tmp_path), "--epochs", "40"]))
    assert config == TrainConfig.from_settings(**{**OLD_FLAT, "out": str(tmp_path), "epochs": 40})
    changed = config_from_args(parser().parse_args(["--resume", "--out", str(tmp_path), "--hidden", "32"]))
    conflicts = resume_conflicts(stored_settings(OLD_FLAT), changed.settings(), 1)
    assert conflicts == ["--hidden (stored 16, now 32)"]
    assert resume_conflicts(stored_settings(OLD_FLAT), config.settings(), 1) == []  # epochs may change


STORED = sorted(ROOT.glob("docs/results/*/*/summary.json")) + sorted(ROOT.glob("docs/results/*/*/config.json"))


@pytest.mark.skipif(not STORED, reason="no committed run results")
def test_every_committed_summary_and_config_json_reads():
    """The results the reports read (docs/results/table1, digits_tolerance: flat; digits_levers: flat
    and nested) load, and every stored setting survives the round trip."""
    for path in STORED:
        stored = json.loads(path.read_text())
        stored = stored["config"] if path.name == "summary.json" else stored
        config = TrainConfig.from_dict(stored)
        settings = config.settings()
        flat = stored_settings(stored)
        assert {name: settings[name] for name in flat if name in SETTINGS} == {
            name: value for name, value in flat.items() if name in SETTINGS
        }, path
        assert config.model.kind == flat["model"], path


def test_training_entry_point_is_an_installed_command():
    """``tolgate-train`` (pyproject's [project.scripts]) is the same command line as benchmarks/cifar_infocnf.py."""
    import subprocess
    import sys

    command = Path(sys.executable).parent / "tolgate-train"
    assert command.exists(), "pip install -e . installs the tolgate-train command beside the interpreter"
    done = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--tolerance" in done.stdout and "auto" in done.stdout
