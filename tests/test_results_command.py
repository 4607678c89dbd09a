"""The training command results.py rebuilds from a run's config.json parses back to exactly that run's flags."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from robustmix.cli.presets import PRESETS
from robustmix.cli.recipe import parse_args
from tests.conftest import load_recipe, training_recipes

#: A shared flag given explicitly at the digits preset's value (FGSM-RS fills it in itself when not given).
PRESET_STEP = ["--step-size", str(PRESETS["digits"]["step_size"])]


@pytest.fixture(scope="module")
def training_command():
    return load_recipe("results").training_command


def _flags(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The namespace the recipe would train with, from its own parser (no training)."""
    module = load_recipe(name)
    seen = []
    monkeypatch.setattr(module, "run_recipe", lambda args, *a, **k: seen.append(vars(args)))
    module.main(argv)
    (flags,) = seen
    return flags


@pytest.mark.parametrize("name", training_recipes())
def test_the_rebuilt_command_gives_back_the_same_flags(name, training_command, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    out = ["--output-dir", str(tmp_path / "run")]
    defaults = _flags(name, out, monkeypatch)
    # Every on/off flag the other way round (but --fast, refused with fgsm_rs's default train-mode attack).
    flipped = [
        f"--{key.replace('_', '-')}" if not value else f"--no-{key.replace('_', '-')}"
        for key, value in defaults.items()
        if isinstance(value, bool) and key not in ("overwrite", "data_on_device", "channels_last", "fast")
    ]
    variants = [out, [*out, *PRESET_STEP], [*out, *flipped], [*out, "--data-on-device", "--channels-last"]]
    for argv in variants:
        flags = _flags(name, argv, monkeypatch)
        words = shlex.split(training_command({"flags": flags, "num_processes": 1}))
        assert words[:2] == ["python", f"recipes/{name}.py"]
        assert _flags(name, words[2:], monkeypatch) == flags, (argv, words)


def test_fgsm_rs_keeps_an_explicit_step_size_equal_to_the_preset(training_command, tmp_path, monkeypatch) -> None:
    # FGSM-RS's own default step is 1.25 * eps: leaving out a step equal to the preset's would change the run.
    flags = _flags("fgsm_rs", ["--output-dir", str(tmp_path / "run"), *PRESET_STEP], monkeypatch)
    assert flags["step_size"] == PRESETS["digits"]["step_size"]
    assert shlex.join(PRESET_STEP) in training_command({"flags": flags, "num_processes": 1})


def test_training_command_of_a_paper_run_reproduces_it():
    results = load_recipe("results")
    recipe = load_recipe("pgd_at")
    args = parse_args(recipe.parser(), ["--preset", "cifar10-paper", "--epochs", "110"], paper=recipe.PAPER)
    command = results.training_command({"flags": vars(args), "num_processes": 1})
    assert "--preset cifar10-paper" in command and "--epochs 110" in command  # 110 is the base preset's, not 200
    args = parse_args(recipe.parser(), ["--preset", "cifar10-paper"], paper=recipe.PAPER)
    assert "--epochs" not in results.training_command({"flags": vars(args), "num_processes": 1})


def test_a_run_that_predates_a_recipe_flag_compares_at_its_default(tmp_path, monkeypatch) -> None:
    results = load_recipe("results")
    newer = _flags("caat", ["--output-dir", str(tmp_path / "run")], monkeypatch)
    older = {k: v for k, v in newer.items() if k != "meta_init"}  # trained before --meta-init existed
    names = set(newer)
    assert results._training_flags({"flags": older}, names) == results._training_flags({"flags": newer}, names)
    other = {**newer, "meta_init": "even"}
    assert results._training_flags({"flags": older}, names) != results._training_flags({"flags": other}, names)


def test_a_value_the_recipe_derives_is_left_to_it(training_command, tmp_path, monkeypatch) -> None:
    # Runs from before --weighting mail became ADA-Lab's default recorded c = 5 beside it; given back, the
    # command would be refused (--importance-c belongs to --weighting adalab).
    out = ["--output-dir", str(tmp_path / "run")]
    for argv in (out, [*out, "--weighting", "adalab"], [*out, "--weighting", "adalab", "--importance-c", "8"]):
        flags = _flags("adalab", argv, monkeypatch)
        older = {**flags, "importance_c": flags["importance_c"] or 5.0}
        words = shlex.split(training_command({"flags": older, "num_processes": 1}))
        assert _flags("adalab", words[2:], monkeypatch) == flags, words
    assert "--importance-c 8" in shlex.join(words)


def test_a_renamed_run_folder_gets_a_command_that_writes_to_its_name(training_command) -> None:
    args = parse_args(load_recipe("pgd_at").parser(), ["--output-dir", "runs/fashion-mnist/pgd_at-weights-seed0"])
    config = {"flags": vars(args), "num_processes": 1}
    renamed = shlex.split(training_command(config, "benchmarks/runs/fashion-mnist/pgd_at-seed0"))
    assert renamed[renamed.index("--output-dir") + 1] == "runs/fashion-mnist/pgd_at-seed0"
    same = shlex.split(training_command(config, "archive/pgd_at-weights-seed0"))
    assert same == shlex.split(training_command(config))
    assert same[same.index("--output-dir") + 1] == "runs/fashion-mnist/pgd_at-weights-seed0"
