"""benchmarks/validation_table.py on archived run records: the numbers, the differences, the refusal."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark

table = load_benchmark("validation_table")


def _run(folder, recipe, seed, clean, pgd, flags=()):
    parser = table._results_module()._recipe_parser(recipe)
    folder.mkdir(parents=True)
    config = {"recipe": recipe, "seed": seed, "flags": vars(parser.parse_args(list(flags)))}
    (folder / "config.json").write_text(json.dumps(config))
    metrics = {
        "last_val": {"val_clean_acc": clean, "val_pgd_acc": pgd, "val_n": 5000},
        "test": {"clean_acc": clean - 0.01, "pgd_acc": pgd - 0.02, "n": 10000},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "forwards_per_step": 8, "backwards_per_step": 7}))
    return str(folder)


def test_rows_sorted_by_pgd_with_differences_to_the_reference(tmp_path, capsys):
    runs = [
        _run(tmp_path / "a", "pgd_at", 0, 0.86, 0.78),
        _run(tmp_path / "b", "adalab", 0, 0.87, 0.775, ["--target", "floor"]),
        _run(tmp_path / "c", "adalab", 1, 0.80, 0.79),
    ]
    lines = table.main(runs).splitlines()[2:]
    assert lines[0].startswith("| `adalab` | 1 | 80.00 ± 1.11 | 79.00 ± 1.13 | - | - | 8 / 7 |")
    assert lines[1] == "| `pgd_at` | 0 | 86.00 ± 0.96 | 78.00 ± 1.15 | +0.00 | +0.00 | 8 / 7 |"
    assert lines[2].startswith("| `adalab --target floor` | 0 | 87.00 ± 0.93 | 77.50 ± 1.16 | +1.00 | -0.50 |")
    assert table.half_width(0.5, 100) == pytest.approx(9.8)


def test_two_reference_runs_of_one_seed_are_refused(tmp_path, capsys):
    runs = [_run(tmp_path / name, "pgd_at", 0, 0.8, 0.7) for name in ("a", "b")]
    with pytest.raises(SystemExit):
        table.main(runs)
    assert "two pgd_at runs of seed 0" in capsys.readouterr().err


def test_test_split_reads_the_runs_final_test_evaluation(tmp_path):
    runs = [_run(tmp_path / "a", "pgd_at", 0, 0.86, 0.78), _run(tmp_path / "b", "mart", 0, 0.85, 0.80)]
    lines = table.main([*runs, "--split", "test"]).splitlines()
    assert lines[0].startswith("| reading | seed | test clean | test PGD-20 |")
    assert lines[2] == "| `mart` | 0 | 84.00 ± 0.72 | 78.00 ± 0.81 | -1.00 | +2.00 | 8 / 7 |"


def test_readings_are_summarised_over_seeds_with_a_t_interval(tmp_path):
    runs = [
        _run(tmp_path / "p0", "pgd_at", 0, 0.86, 0.78),
        _run(tmp_path / "p1", "pgd_at", 1, 0.85, 0.77),
        _run(tmp_path / "a0", "adalab", 0, 0.87, 0.77),
        _run(tmp_path / "a1", "adalab", 1, 0.85, 0.78),
        _run(tmp_path / "m0", "adalab", 2, 0.80, 0.70, ["--weighting", "mail"]),  # no pgd_at of seed 2: unpaired
    ]
    summary = table.main(runs).split("\n\n")[1].splitlines()
    assert summary[0].startswith("| reading | seeds | clean vs pgd_at (mean, 95% interval over seeds)")
    # differences +1.0 and 0.0 (clean), -1.0 and +1.0 (PGD-20): t(0.975, 1) = 12.706, s / sqrt(2) = 0.5 and 1.0
    assert summary[2:] == ["| `adalab` | 0, 1 | +0.50 [-5.85, +6.85] | +0.00 [-12.71, +12.71] |"]
