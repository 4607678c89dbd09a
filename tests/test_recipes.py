"""Recipes: flags and presets, the run folder they leave, resume after a crash, accelerate launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import robustmix
from robustmix.cli.presets import PRESETS
from robustmix.cli.recipe import base_parser, parse_args
from robustmix.data import load_dataset
from robustmix.runs.folder import load_metrics_log, load_model
from robustmix.training.metrics import WALL_CLOCK_KEYS
from tests.conftest import crash_then_resume, launch_two_processes, load_recipe, quick_flags

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- flags


def test_explicit_flags_override_the_preset():
    args = parse_args(base_parser("t"), ["--preset", "cifar10-resnet18", "--eps", "4/255", "--epochs", "3"])
    assert args.eps == pytest.approx(4 / 255) and args.epochs == 3
    expected = {k: v for k, v in PRESETS["cifar10-resnet18"].items() if k not in ("eps", "epochs", "step_size")}
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.output_dir == "runs/t-cifar10-seed0"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_step_size_follows_eps_unless_given(preset, capsys):
    # paper={}: a recipe whose release settings are the CIFAR-10 preset's, so cifar10-paper is accepted too.
    fraction = PRESETS[preset]["step_size"] / PRESETS[preset]["eps"]
    args = parse_args(base_parser("t"), paper={}, argv=["--preset", preset, "--eps", "2/255"])
    assert args.step_size == pytest.approx(fraction * 2 / 255)
    assert parse_args(base_parser("t"), paper={}, argv=["--preset", preset]).step_size == PRESETS[preset]["step_size"]
    assert (
        parse_args(
            base_parser("t"), paper={}, argv=["--preset", preset, "--eps", "0.2", "--step-size", "0.01"]
        ).step_size
        == 0.01
    )
    assert "warning" not in capsys.readouterr().err
    parse_args(base_parser("t"), paper={}, argv=["--preset", preset, "--eps", "0.01", "--step-size", "0.05"])
    assert "--step-size 0.05 is larger than --eps 0.01" in capsys.readouterr().err
    parse_args(
        base_parser("t"),
        paper={},
        argv=["--preset", preset, "--eps", "0.01", "--step-size", "0.05", "--attack-steps", "1"],
    )
    assert "warning" not in capsys.readouterr().err  # one step larger than eps is FGSM-RS's design


def test_default_preset_is_the_same_for_every_recipe(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the default output folder is relative
    captured = {}
    for name in ("pgd_at", "fgsm_rs"):
        recipe = load_recipe(name)
        monkeypatch.setattr(recipe, "run_recipe", lambda args, build, name=name: captured.setdefault(name, args))
        recipe.main([])
    assert captured["pgd_at"].eps == captured["fgsm_rs"].eps == PRESETS["digits"]["eps"]
    assert captured["pgd_at"].model == captured["fgsm_rs"].model == PRESETS["digits"]["model"]
    assert captured["fgsm_rs"].step_size == pytest.approx(1.25 * PRESETS["digits"]["eps"])  # Wong et al.'s alpha
    assert captured["fgsm_rs"].attack_steps == 1
    assert captured["pgd_at"].step_size == PRESETS["digits"]["step_size"]


def test_fgsm_step_size_flag_wins(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("fgsm_rs")
    monkeypatch.setattr(recipe, "run_recipe", lambda args, build: args)
    assert recipe.main(["--eps", "8/255", "--step-size", "10/255"]).step_size == pytest.approx(10 / 255)
    assert recipe.main(["--eps", "8/255"]).step_size == pytest.approx(1.25 * 8 / 255)


@pytest.mark.parametrize(
    ("recipe_name", "argv", "message"),
    [
        ("pgd_at", ["--eps", "-1"], "argument --eps: must be >= 0, got -1"),
        ("pgd_at", ["--eps", "8"], "--eps is in pixels in [0, 1]"),
        ("pgd_at", ["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        ("pgd_at", ["--lr", "abc"], "argument --lr: expected a number"),
        ("pgd_at", ["--dataset", "imagenet-xyz"], "unknown dataset 'imagenet-xyz'"),
        ("pgd_at", ["--model", "resnet18x"], "unknown timm model 'resnet18x'; close matches: resnet18"),
        ("pgd_at", ["--resume", "no/such/checkpoint"], "not a complete robustmix checkpoint"),
        ("pgd_at", ["--resume", "latest"], "no checkpoint was completed"),
        ("fgsm_rs", ["--attack-steps", "3"], "FGSM-RS takes exactly one attack step"),
        ("pgd_at", ["--data-on-device", "--num-workers", "2"], "--data-on-device needs --num-workers 0"),
        ("pgd_at", ["--compile", "fastest"], "--compile: unknown backend 'fastest'"),
    ],
)
def test_bad_flags_exit_before_training(tmp_path, monkeypatch, capsys, recipe_name, argv, message):
    recipe = load_recipe(recipe_name)

    def train(*args):
        raise AssertionError("training started")

    monkeypatch.setattr(recipe, "run_recipe", train)
    with pytest.raises(SystemExit) as exit_info:
        recipe.main([*argv, "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"{recipe_name}.py: error: ") and message in error
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- runs


@pytest.mark.parametrize(
    ("name", "attack_flags", "passes"), [("pgd_at", ["--attack-steps", "2"], 3), ("fgsm_rs", [], 2)]
)
def test_recipe_writes_the_run_folder(tiny, tmp_path, name, attack_flags, passes):
    out = tmp_path / "run"
    metrics = load_recipe(name).main(quick_flags(tiny, out, "--max-steps", "3", *attack_flags))

    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == name and config["robustmix_version"] == robustmix.__version__
    assert config["device"].startswith("cpu (") and config["versions"]["torch"] == torch.__version__
    assert config["model"]["name"] == PRESETS["digits"]["model"] and config["model"]["in_chans"] == 1
    assert config["data"]["sizes"] == {"train": 90, "validation": 10} and config["data"]["dataset"] == tiny
    assert config["attack"]["eps"] == PRESETS["digits"]["eps"] and config["flags"]["max_steps"] == 3
    assert config["eval_attack"]["steps"] == 20 and config["eval_attack"]["step_size"] == config["attack"]["eps"] / 4

    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["test"]["n"] == 20 and metrics["attack"]["eps"] == PRESETS["digits"]["eps"]
    assert metrics["best"]["selected_on"] == "validation"
    rows = load_metrics_log(out)
    assert {r["forwards_per_step"] for r in rows if "loss" in r} == {passes}
    assert max(r["val_pgd_acc"] for r in rows if "val_pgd_acc" in r) == metrics["best"]["val_pgd_acc"]

    # The saved final weights give back the reported test accuracy.
    images, labels = load_dataset(tiny, "test").tensors()
    with torch.no_grad():
        clean = (load_model(out)(images).argmax(dim=1) == labels).float().mean().item()
    assert clean == pytest.approx(metrics["test"]["clean_acc"])


def test_data_on_device_and_channels_last(tiny, tmp_path):
    """Both are for GPUs; on the CPU they must run and change nothing that matters."""
    recipe = load_recipe("pgd_at")
    flags = ("--max-steps", "2", "--attack-steps", "1")
    plain = recipe.main(quick_flags(tiny, tmp_path / "plain", *flags))
    resident = recipe.main(quick_flags(tiny, tmp_path / "resident", *flags, "--data-on-device"))
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (
        tmp_path / "resident" / "model.safetensors"
    ).read_bytes()
    assert resident["test"] == plain["test"]
    last = recipe.main(quick_flags(tiny, tmp_path / "last", *flags, "--channels-last"))
    assert last["test"]["n"] == 20
    assert json.loads((tmp_path / "last" / "config.json").read_text())["flags"]["channels_last"] is True


def test_compile_in_place_keeps_the_run_the_same(tiny, tmp_path):
    """``--compile`` compiles the model in place: checkpoints, unwrapping and pass counting are unchanged. The eager
    backend runs the captured graphs op for op, so the weights are bitwise those of an uncompiled run."""
    recipe = load_recipe("pgd_at")
    flags = ("--max-steps", "3", "--attack-steps", "1")
    plain = recipe.main(quick_flags(tiny, tmp_path / "plain", *flags))
    compiled = recipe.main(quick_flags(tiny, tmp_path / "compiled", *flags, "--compile", "eager"))
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (
        tmp_path / "compiled" / "model.safetensors"
    ).read_bytes()
    assert compiled["test"] == plain["test"]
    assert load_model(tmp_path / "compiled") is not None
    passes = [
        [(r["forwards_per_step"], r["backwards_per_step"]) for r in load_metrics_log(tmp_path / run) if "loss" in r]
        for run in ("plain", "compiled")
    ]
    assert passes[0] == passes[1] == [(2.0, 2.0)]  # the counter hooks still see every forward and backward


def test_an_occupied_run_folder_needs_resume_or_overwrite(tiny, tmp_path, capsys):
    recipe = load_recipe("pgd_at")
    flags = quick_flags(tiny, tmp_path / "run", "--max-steps", "1", "--attack-steps", "1")
    recipe.main(flags)
    with pytest.raises(SystemExit):
        recipe.main(flags)
    assert "already holds a run: --resume latest continues it, --overwrite replaces it" in capsys.readouterr().err
    recipe.main([*flags, "--overwrite"])
    assert [r["step"] for r in load_metrics_log(tmp_path / "run") if "loss" in r] == [1]


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    recipe = load_recipe("pgd_at")
    flags = ["--max-steps", "4", "--attack-steps", "1", "--checkpoint-every-steps", "2", "--augment"]
    recipe.main(quick_flags(tiny, tmp_path / "straight", *flags))

    crash_then_resume(recipe, quick_flags(tiny, tmp_path / "crashed", *flags), 2, monkeypatch)

    straight, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "crashed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    drop_time = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in rows]  # noqa: E731
    assert drop_time(load_metrics_log(tmp_path / "crashed")) == drop_time(load_metrics_log(tmp_path / "straight"))


def test_accelerate_launch_runs_a_recipe(tiny, tmp_path):
    out = tmp_path / "launched"
    flags = quick_flags(tiny, out, "--max-steps", "2", "--attack-steps", "1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "recipes" / "pgd_at.py"), *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pgd_at on " in result.stdout and "test clean" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["test"]["step"] == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_recipe_under_two_cpu_processes(tiny, tmp_path):
    out = tmp_path / "ddp"
    flags = quick_flags(tiny, out, "--max-steps", "3", "--attack-steps", "1", "--batch-size", "8")
    result = launch_two_processes(REPO / "recipes" / "pgd_at.py", *flags, timeout=600)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_processes"], config["global_batch_size"], config["steps_per_epoch"]) == (2, 16, 6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 20 and metrics["best"]["val_n"] == 10  # each example once across ranks
    # Only the main process prints, and only its console goes to log.txt.
    for text in (result.stdout + result.stderr, (out / "log.txt").read_text()):
        assert text.count("epoch 0 step 3: val clean") == 1 and text.count("pgd_at on ") == 1, text


@pytest.mark.slow
def test_default_run_reaches_the_documented_accuracy(tmp_path):
    """``python recipes/pgd_at.py`` with no flags: the run recipes/README.md reports (minutes on 2 CPU cores)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "pgd_at.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    test = json.loads((tmp_path / "runs" / "pgd_at-digits-seed0" / "metrics.json").read_text())["test"]
    assert test["clean_acc"] >= 0.95 and test["pgd_acc"] >= 0.60


def test_help_groups_the_shared_flags_and_shows_every_presets_value(capsys):
    with pytest.raises(SystemExit):
        load_recipe("mail").main(["--help"])
    text = capsys.readouterr().out
    titles = ["method:", "data:", "model:", "optimization:", "attack:", "run:", "evaluation:", "performance:"]
    positions = [text.index(f"\n{title}\n") for title in titles]
    assert positions == sorted(positions)
    method = text[positions[0] : positions[1]]
    assert "--burn-in" in method and "--lr" not in method  # the recipe's own flags, alone
    flat = " ".join(text.split())
    assert "--epochs EPOCHS presets: digits 10, fashion-mnist 6, cifar10-resnet18 110" in flat
    assert "presets: digits 0.1, fashion-mnist 0.1, cifar10-resnet18 0.03137" in flat  # --eps, 8/255 as a number
