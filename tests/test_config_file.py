"""--config FILE: flag values from a JSON or YAML file, or a run's config.json fed back in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustmix.cli.presets import PRESETS
from robustmix.cli.recipe import base_parser, parse_args
from robustmix.runs.folder import load_config
from tests.conftest import load_recipe, quick_flags


def _parse(*argv: str, name: str = "t"):
    return parse_args(base_parser(name), list(argv))


def _error(capsys, *argv: str, name: str = "t") -> str:
    with pytest.raises(SystemExit) as exit_info:
        _parse(*argv, name=name)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    return line


def test_command_line_wins_over_the_file_and_the_file_over_the_preset(tmp_path):
    config = tmp_path / "flags.json"
    config.write_text(json.dumps({"epochs": 3, "lr": 0.05, "step-size": 0.01, "augment": True, "milestones": [1]}))
    args = _parse("--config", str(config), "--lr", "0.2")
    assert (args.epochs, args.lr, args.step_size, args.augment, args.milestones) == (3, 0.2, 0.01, True, [1])
    assert args.weight_decay == PRESETS["digits"]["weight_decay"]  # not in the file: the preset's


def test_yaml_values_parse_as_on_the_command_line(tmp_path):
    config = tmp_path / "flags.yaml"
    config.write_text("preset: cifar10-resnet18\neps: 4/255\nlr: 1e-3\nmodel: resnet10t\nmax_steps: null\n")
    args = _parse("--config", str(config))
    assert args.eps == pytest.approx(4 / 255) and args.lr == 1e-3 and args.model == "resnet10t"
    # eps from the file and no step size anywhere: the step keeps the preset's fraction of eps, as --eps does.
    assert args.step_size == pytest.approx(1 / 255) and args.max_steps is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"eps": 0.1, "lerning_rate": 1, "epoch": 2}, "unknown flags epoch, lerning_rate (not flags of t.py)"),
        ({"epochs": 0}, "--epochs: must be >= 1, got 0"),
        ({"epochs": 2.5}, "--epochs: expected int, got '2.5'"),
        ({"eps": "a lot"}, "--eps: expected a number such as 0.1 or 8/255, got 'a lot'"),
        ({"optimizer": "lion"}, "--optimizer: 'lion' is not one of sgd, adamw"),
        ({"augment": "yes"}, "--augment takes true or false"),
        ({"milestones": 100}, "--milestones takes a list, got 100"),
        ({"resume": "latest"}, "resume can only be given on the command line"),
        ({"overwrite": True, "config": "other.json"}, "overwrite, config can only be given on the command line"),
        ([1, 2], "expected an object of flag values, got list"),
    ],
)
def test_a_bad_file_is_a_one_line_error_naming_it(tmp_path, capsys, content, message):
    config = tmp_path / "flags.json"
    config.write_text(json.dumps(content))
    line = _error(capsys, "--config", str(config))
    assert line.startswith(f"t.py: error: --config {config}") and message in line, line


def test_an_unreadable_file_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "flags.json"
    config.write_text('{"eps": 0.1,')
    assert "cannot be read" in _error(capsys, "--config", str(config))
    assert "cannot be read" in _error(capsys, "--config", str(tmp_path / "missing.json"))


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    """A finished two-step PGD-AT run with non-default flags."""
    out = tmp_path_factory.mktemp("source") / "run"
    flags = quick_flags(tiny, out, "--attack-steps", "1", "--max-steps", "2", "--lr", "0.05", "--seed", "3")
    load_recipe("pgd_at").main(flags)
    return out


def test_a_runs_config_json_runs_it_again(tiny, finished, tmp_path):
    again = tmp_path / "again"
    load_recipe("pgd_at").main(["--config", str(finished / "config.json"), "--output-dir", str(again)])
    first, second = load_file(finished / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    drop = lambda flags: {k: v for k, v in flags.items() if k not in ("output_dir", "config")}  # noqa: E731
    assert drop(load_config(again)["flags"]) == drop(load_config(finished)["flags"])
    assert load_config(again)["flags"]["config"] == str(finished / "config.json")


def test_a_runs_config_json_takes_neither_its_folder_nor_its_bookkeeping(finished, tmp_path):
    config = json.loads((finished / "config.json").read_text())
    config["flags"] |= {"resume": "latest", "overwrite": True, "config": "elsewhere.json"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    args = parse_args(load_recipe("pgd_at").parser(), ["--config", str(path)])
    assert (args.resume, args.overwrite, args.seed, args.lr) == (None, False, 3, 0.05)
    assert args.output_dir == f"runs/pgd_at-{Path(config['flags']['dataset']).name}-seed3"  # the default folder


def test_another_recipes_config_json_is_a_one_line_error(finished, capsys):
    with pytest.raises(SystemExit):
        load_recipe("trades").main(["--config", str(finished / "config.json")])
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line == (
        f"trades.py: error: --config {finished / 'config.json'} is the config.json of a pgd_at run; this is "
        f"trades.py: run recipes/pgd_at.py --config {finished / 'config.json'}"
    )


def test_a_run_resumes_with_its_config_file(tiny, tmp_path, monkeypatch):
    config = tmp_path / "flags.json"
    config.write_text(json.dumps({"dataset": tiny, "batch_size": 16, "attack_steps": 1, "max_steps": 2}))
    out = tmp_path / "run"
    recipe = load_recipe("pgd_at")
    recipe.main(["--config", str(config), "--output-dir", str(out)])
    # --config is bookkeeping: resuming with it (the flags' check passes) continues the same run.
    monkeypatch.setattr(recipe, "run_recipe", lambda args, *_, **__: args)
    args = recipe.main(["--output-dir", str(out), "--resume", "latest", "--config", str(config)])
    assert args.max_steps == 2 and args.resume == "latest"
