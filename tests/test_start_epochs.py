"""Start epochs that follow the lr schedule: GAIRAT's and MAIL's burn-in at the lr's first drop, as released."""

from __future__ import annotations

import argparse

import pytest

from robustmix.cli.args import FIRST_DECAY, epoch_or_first_decay
from robustmix.cli.optim import first_decay_epoch, start_epoch
from tests.conftest import load_recipe


def _args(schedule: str = "multistep", milestones=(100, 105), epochs: int = 110) -> argparse.Namespace:
    return argparse.Namespace(schedule=schedule, milestones=list(milestones), epochs=epochs)


def test_first_decay_is_the_first_milestone_of_a_multistep_schedule_only():
    assert first_decay_epoch(_args(milestones=(105, 100))) == 100
    assert first_decay_epoch(_args("warmup-cosine", ())) is None
    assert first_decay_epoch(_args("multistep", ())) is None


@pytest.mark.parametrize(
    ("args", "value", "after_decay", "expected"),
    [
        (_args(), None, 0, 100),  # GAIRAT: at the drop (release: begin_epoch 60, lr drop at 60 of 120)
        (_args(), None, 1, 101),  # MAIL: one epoch after it (release: drop at 75, MAIL from 76)
        (_args(), FIRST_DECAY, 1, 100),  # asked for by name: the drop itself
        (_args(), 7, 0, 7),  # an explicit epoch wins
        (_args("warmup-cosine", (), epochs=10), None, 0, 5),  # no drop: the fallback
        (_args("warmup-cosine", (), epochs=10), 0, 0, 0),
    ],
)
def test_start_epoch(args, value, after_decay, expected):
    assert start_epoch(args, value, 5, after_decay=after_decay) == expected


@pytest.mark.parametrize(
    ("args", "value", "message"),
    [
        (_args("warmup-cosine", (), epochs=10), FIRST_DECAY, "needs --schedule multistep with --milestones"),
        (_args(epochs=10, milestones=(12,)), None, "epoch 12 leaves no epoch of the method out of --epochs 10"),
        (_args(epochs=10), 10, "epoch 10 leaves no epoch"),
    ],
)
def test_start_epoch_refuses(args, value, message):
    with pytest.raises(ValueError, match=message):
        start_epoch(args, value, 5)


def test_flag_type_takes_an_epoch_or_first_decay():
    assert epoch_or_first_decay("3") == 3 and epoch_or_first_decay(FIRST_DECAY) == FIRST_DECAY
    with pytest.raises(argparse.ArgumentTypeError):
        epoch_or_first_decay("-1")


def _callbacks(name: str, argv: list[str], monkeypatch, tmp_path):
    recipe = load_recipe(name)
    monkeypatch.setattr(recipe, "run_recipe", lambda args, build, **_: build(args, None))
    return recipe.main([*argv, "--output-dir", str(tmp_path / "run")])


@pytest.mark.parametrize(
    ("name", "argv", "burn_in"),
    [
        ("gairat", ["--preset", "cifar10-resnet18"], 100),  # the preset's first drop (milestones 100, 105)
        ("gairat", [], 5),  # digits: warm-up + cosine has no drop, half of 10 epochs
        ("gairat", ["--schedule", "multistep", "--milestones", "6", "8"], 6),
        ("gairat", ["--preset", "cifar10-resnet18", "--burn-in", "55"], 55),
        ("mail", ["--preset", "cifar10-resnet18"], 101),
        ("mail", [], 6),  # 76/120 of 10 epochs
        ("mail", ["--schedule", "multistep", "--milestones", "6", "--burn-in", "first-decay"], 6),
    ],
)
def test_recipes_switch_on_where_the_release_does(name, argv, burn_in, monkeypatch, tmp_path):
    weights = next(c for c in _callbacks(name, argv, monkeypatch, tmp_path) if hasattr(c, "burn_in_epochs"))
    assert weights.burn_in_epochs == burn_in


@pytest.mark.parametrize("name", ["gairat", "mail"])
def test_first_decay_without_a_drop_is_a_one_line_error(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_recipe(name).main(["--burn-in", "first-decay"])
    assert exit_info.value.code == 2
    assert "--burn-in: first-decay needs --schedule multistep with --milestones" in capsys.readouterr().err


# ---------------------------------------------------------------------- --preset cifar10-paper


def _parsed(name: str, argv: list[str], monkeypatch, tmp_path):
    recipe = load_recipe(name)
    monkeypatch.setattr(recipe, "run_recipe", lambda args, build, **_: args)
    return recipe.main([*argv, "--output-dir", str(tmp_path / "run")])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pgd_at", {"epochs": 200, "milestones": [100, 150], "lr": 0.1, "weight_decay": 5e-4, "eps": 8 / 255}),
        ("trades", {"epochs": 76, "milestones": [74], "weight_decay": 2e-4, "eps": 0.031, "step_size": 0.007}),
        ("mart", {"epochs": 120, "milestones": [74, 89, 99], "lr": 0.01, "weight_decay": 3.5e-3, "eps": 0.031}),
        ("mail", {"epochs": 120, "milestones": [75, 90, 100], "lr": 0.01, "weight_decay": 3.5e-3}),
        ("gairat", {"epochs": 120, "milestones": [59, 89], "weight_decay": 2e-4, "step_size": 0.007}),
        ("fgsm_rs", {"epochs": 15, "lr": 0.2, "schedule": "cyclic", "step_size": pytest.approx(10 / 255)}),
    ],
)
def test_paper_preset_is_each_release(name, expected, monkeypatch, tmp_path):
    args = _parsed(name, ["--preset", "cifar10-paper"], monkeypatch, tmp_path)
    assert {key: getattr(args, key) for key in expected} == expected
    assert args.dataset == "cifar10" and args.model == "resnet18" and args.batch_size == 128
    assert _parsed(name, ["--preset", "cifar10-paper", "--lr", "0.05"], monkeypatch, tmp_path).lr == 0.05


def test_paper_preset_switches_methods_on_where_the_releases_do(monkeypatch, tmp_path):
    gairat = _callbacks("gairat", ["--preset", "cifar10-paper"], monkeypatch, tmp_path)
    mail = _callbacks("mail", ["--preset", "cifar10-paper"], monkeypatch, tmp_path)
    assert next(c for c in gairat if hasattr(c, "burn_in_epochs")).burn_in_epochs == 59  # the 60th epoch
    assert next(c for c in mail if hasattr(c, "burn_in_epochs")).burn_in_epochs == 76  # `epoch <= 75`: base


@pytest.mark.parametrize("name", ["caat", "bilaw", "adalab"])
def test_recipes_without_release_settings_refuse_the_paper_preset(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_recipe(name).main(["--preset", "cifar10-paper"])
    assert exit_info.value.code == 2
    assert "has no release settings of its own to reproduce; use --preset cifar10-resnet18" in capsys.readouterr().err
