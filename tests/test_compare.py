"""compare.py: which command each (recipe, seed) gets, and what the archive keeps; one real two-run comparison."""

from __future__ import annotations

import json

from robustmix.runs.checkpoint import TRAINER_STATE
from tests.conftest import REPO, load_recipe

compare = load_recipe("compare")


def test_command_starts_resumes_or_skips(tmp_path):
    args = compare.parse_args(["--preset", "digits", "--runs-dir", str(tmp_path), "--", "--epochs", "2"])
    run = tmp_path / "trades-seed1"
    fresh = compare.command(args, "trades", 1)
    assert fresh[1].endswith("recipes/trades.py") and fresh[2:] == [
        "--preset", "digits", "--seed", "1", "--output-dir", str(run), "--epochs", "2",
    ]  # fmt: skip
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert compare.command(args, "trades", 1)[-1] == "--overwrite"  # started, never checkpointed
    (run / "checkpoints" / "step_4").mkdir(parents=True)
    (run / "checkpoints" / "step_4" / TRAINER_STATE).write_text("{}")
    assert compare.command(args, "trades", 1)[-2:] == ["--resume", "latest"]
    (run / "metrics.json").write_text("{}")
    assert compare.command(args, "trades", 1) is None


def _finished(run, **flags):
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"flags": flags}))
    (run / "metrics.json").write_text("{}")


def test_a_finished_run_with_other_flags_is_named(tmp_path):
    args = compare.parse_args(["--preset", "digits", "--runs-dir", str(tmp_path), "--", "--epochs", "2"])
    _finished(tmp_path / "trades-seed1", preset="digits", seed=1, epochs=2, beta=6.0, lr=0.1)
    assert compare.recorded_differences(args, "trades", 1) == []  # --lr: the preset's, not compared
    other = compare.parse_args(["--preset", "digits", "--runs-dir", str(tmp_path), "--", "--epochs", "3"])
    assert compare.recorded_differences(other, "trades", 1) == ["--epochs 2 (this command: 3)"]
    # A default of the recipe's own flags that changed since the run trained (ADA-Lab's weighting).
    plain = compare.parse_args(["--preset", "digits", "--runs-dir", str(tmp_path)])
    _finished(tmp_path / "adalab-seed0", preset="digits", seed=0, weighting="adalab", importance_c=5.0)
    assert compare.recorded_differences(plain, "adalab", 0) == ["--weighting 'adalab' (this command: 'mail')"]
    first = compare.parse_args(["--preset", "digits", "--runs-dir", str(tmp_path), "--", "--weighting", "adalab"])
    assert compare.recorded_differences(first, "adalab", 0) == []
    assert compare.recorded_differences(plain, "trades", 1) == []  # older runs: unrecorded flags are not compared


def test_main_refuses_a_finished_run_with_other_flags(tmp_path, capsys):
    _finished(tmp_path / "pgd_at-seed0", preset="digits", seed=0, epochs=4)
    before = (tmp_path / "pgd_at-seed0" / "config.json").read_text()
    argv = ["--preset", "digits", "--recipes", "pgd_at", "--seeds", "0", "--runs-dir", str(tmp_path), "--"]
    assert compare.main([*argv, "--epochs", "5"]) == 1
    err = capsys.readouterr().err
    assert "pgd_at-seed0: error: finished with other flags than this command gives it: --epochs 4" in err
    assert (tmp_path / "pgd_at-seed0" / "config.json").read_text() == before
    assert compare.main([*argv, "--epochs", "4"]) == 0


def test_recipes_lists_every_training_recipe():
    """compare.py's list is the one list of recipe names (the tests parametrize over it): no script left out."""
    scripts = sorted(p.stem for p in (REPO / "recipes").glob("*.py") if "run_recipe(" in p.read_text())
    assert sorted(compare.RECIPES) == scripts


def test_variant_names_the_folder():
    assert compare.run_name("adalab", 2, "floor") == "adalab-floor-seed2"
    assert compare.run_name("adalab", 2) == "adalab-seed2"


def test_archive_keeps_the_small_files_only(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "best").mkdir()
    for name in ("config.json", "metrics.json", "metrics.jsonl", "eval.json", "eval.md", "model.safetensors"):
        (run / name).write_text(name)
    compare.archive(run, tmp_path / "archive" / "run")
    kept = sorted(p.name for p in (tmp_path / "archive" / "run").iterdir())
    assert kept == ["config.json", "eval.json", "eval.md", "metrics.json", "metrics.jsonl"]


def test_two_runs_one_job_at_a_time(tiny, tmp_path):
    flags = ["--dataset", tiny, "--batch-size", "16", "--max-steps", "1", "--attack-steps", "1"]
    argv = ["--preset", "digits", "--recipes", "pgd_at", "fgsm_rs", "--seeds", "0", "--jobs", "2"]
    argv += ["--runs-dir", str(tmp_path / "runs"), "--archive", str(tmp_path / "archive"), "--", *flags]
    assert compare.main(argv) == 0
    for name in ("pgd_at-seed0", "fgsm_rs-seed0"):
        config = json.loads((tmp_path / "archive" / name / "config.json").read_text())
        assert config["seed"] == 0 and config["total_steps"] == 1
        assert (tmp_path / "runs" / name / "model.safetensors").exists()
        assert not (tmp_path / "archive" / name / "model.safetensors").exists()
    assert compare.main(argv) == 0  # finished: skipped, nothing trains again
    (tmp_path / "runs" / "pgd_at-seed0" / "eval.json").write_text("{}")  # evaluated later
    assert compare.main([*argv[: -len(flags) - 1], "--archive-only"]) == 0
    assert (tmp_path / "archive" / "pgd_at-seed0" / "eval.json").exists()


def test_recipe_scripts_are_read_once_and_give_fresh_parsers(tmp_path):
    from robustmix.cli.recipe import recipe_parser, recipe_script

    awp = REPO / "recipes" / "awp.py"
    assert recipe_script(awp) is recipe_script(str(awp))  # imported once per path
    assert recipe_script(awp).DEFAULTS and recipe_script(tmp_path / "absent.py") is None
    first = recipe_parser(awp)
    first.set_defaults(epochs=99)  # what recorded_differences does to a parser must not reach the next one
    assert recipe_parser(awp) is not first and recipe_parser(awp).get_default("epochs") is None
    assert "--gamma" in recipe_parser(awp)._option_string_actions
    plain = tmp_path / "plain.py"  # a recipe without a parser() of its own gets the shared flags
    plain.write_text("X = 1\n")
    assert "--eps" in recipe_parser(plain)._option_string_actions
