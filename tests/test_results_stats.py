"""The statistics of the results page on synthetic reports with known answers: no model, no evaluation.

A synthetic report has what ``robustmix.evaluation.report`` reads of an ``eval.json``: settings, run, results (with
packed per-example results, or without them as older reports) and environment.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from robustmix.evaluation import stats
from robustmix.evaluation.report import (
    every_seed_direction,
    pack_bools,
    per_example_results,
    results_page,
    results_statistics,
    results_table,
    unpack_bools,
)

#: t quantile of 97.5% at 2 degrees of freedom, from a printed table (4.303) to more digits.
T_975_DF2 = 4.302652729911275
N = 100
LABELS = {"pgd20": "PGD-20", "square": "Square"}


def _pair(b: int, c: int, right: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """A reference right on the first ``right`` of N examples; the other model loses ``b`` of them, gains ``c``."""
    reference = np.arange(N) < right
    other = reference.copy()
    other[:b] = False
    other[right : right + c] = True
    return reference, other


def _report(recipe: str, seed: int, clean, standalone: dict, worst_case, *, n_examples: int | None = None) -> dict:
    """A report as evaluate_run writes it, reduced to what the results page reads."""
    n = len(clean)
    attacks = [
        {"name": name, "label": LABELS[name], "white_box": True, "settings": {"steps": 20}} for name in standalone
    ]
    return {
        "settings": {
            "split": "test",
            "n_examples": n_examples,
            "weights": "final",
            "eps": 0.1,
            "attacks": attacks,
            "protocol": "every attack runs on every clean-correct example",
            "decisions": "fp32 (autocast off), model in eval mode",
            "eps_sweep": {"eps": [], "attacks": []},
            "seed": 0,
            "mixed_precision": "no",
        },
        "run": {"run_dir": f"runs/{recipe}-seed{seed}", "recipe": recipe, "train_seed": seed, "flags": {}},
        "results": {
            "n": n,
            "attack": "worst case over " + ", ".join(LABELS[name] for name in standalone),
            "clean": float(np.mean(clean)),
            "standalone": {name: float(np.mean(v)) for name, v in standalone.items()},
            "worst_case": float(np.mean(worst_case)),
            "per_example": {
                "n": n,
                "indices": {"start": 0, "stop": n},
                "clean": pack_bools(clean),
                "worst_case": pack_bools(worst_case),
                "standalone": {name: pack_bools(v) for name, v in standalone.items()},
            },
        },
        "eps_sweep": {"eps": [], "standalone": {}, "worst_case": []},
        "sanity_flags": [],
        "environment": {
            "robustmix": "0.1.0", "torch": "2.9", "accelerate": "1.0", "python": "3.11", "num_processes": 1,
            "device": "cpu (test)", "date": "2026-01-01T00:00:00+00:00",
        },
    }  # fmt: skip


#: Discordant counts (b, c) per seed 0, 1, 2 of trades against pgd_at: clean clearly worse in every seed
#: (-11, -10, -9 points), PGD-20 within noise (+1, -2, +2 points), Square identical, worst case +2 each seed.
COUNTS = {
    "clean": [(12, 1), (10, 0), (11, 2)],
    "pgd20": [(3, 4), (5, 3), (2, 4)],
    "square": [(0, 0), (0, 0), (0, 0)],
    "worst_case": [(1, 3), (0, 2), (2, 4)],
}


def _runs(*, extra: bool = True) -> dict[str, list[dict]]:
    """pgd_at and trades on seeds 0-2 as COUNTS says; with ``extra``, awp on seed 0 only and mart on seed 7."""
    runs: dict[str, list[dict]] = {"pgd_at": [], "trades": []}
    for seed in range(3):
        pairs = {metric: _pair(*counts[seed]) for metric, counts in COUNTS.items()}
        for recipe, side in (("pgd_at", 0), ("trades", 1)):
            standalone = {name: pairs[name][side] for name in ("pgd20", "square")}
            runs[recipe].append(_report(recipe, seed, pairs["clean"][side], standalone, pairs["worst_case"][side]))
    if extra:
        runs["awp"] = [_report("awp", 0, *_everything(_pair(12, 1)[1]))]
        runs["mart"] = [_report("mart", 7, *_everything(_pair(0, 0)[1]))]
    return runs


def _everything(correct: np.ndarray) -> tuple:
    return correct, {"pgd20": correct, "square": correct}, correct


def _without_per_example(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    for group in runs.values():
        for report in group:
            del report["results"]["per_example"]
    return runs


def _page(runs: dict[str, list[dict]], comparison: dict, **kwargs) -> str:
    return results_page(
        {"digits": runs},
        command="python recipes/results.py ...",
        training_commands={r["run"]["run_dir"]: "python recipes/x.py" for group in runs.values() for r in group},
        date="2026-01-01",
        comparisons={"digits": comparison},
        **{"scatter": None, **kwargs},
    )


# ---------------------------------------------------------------------- the pure statistics


def test_t_interval_of_three_differences_matches_a_hand_computation():
    mean, low, high = stats.mean_interval([1.0, 2.0, 4.0])
    # mean 7/3; sample variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3; half width t * s / sqrt(3).
    half = T_975_DF2 * math.sqrt(7 / 3) / math.sqrt(3)
    assert mean == pytest.approx(7 / 3)
    assert (low, high) == (pytest.approx(7 / 3 - half, abs=1e-9), pytest.approx(7 / 3 + half, abs=1e-9))
    assert stats.mean_interval([2.5]) == (2.5, None, None)
    assert stats.t_quantile(0.95, 1000) == pytest.approx(1.962, abs=1e-3)  # tables: 1.962


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 10, 2 * 0.5**10),
        (10, 0, 2 * 0.5**10),
        (3, 7, 2 * (1 + 10 + 45 + 120) / 2**10),
        (0, 1, 1.0),  # 2 * 1/2
        (5, 5, 1.0),
        (0, 0, 1.0),
        (0, 2000, 0.0),  # 2 * 2^-2000 underflows: no error
    ],
)
def test_mcnemar_exact_p_of_known_counts(b, c, p):
    assert stats.mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12, abs=0)


def test_mcnemar_exact_agrees_with_scipy_at_large_counts():
    from scipy.stats import binomtest

    for b, c in [(50, 80), (400, 470), (5000, 5200)]:
        assert stats.mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_discordant_pairs_count_each_side():
    reference = np.array([True, True, False, False, True])
    other = np.array([True, False, True, True, True])
    assert stats.discordant_pairs(reference, other) == (1, 2)
    with pytest.raises(ValueError, match="one length"):
        stats.discordant_pairs(reference, other[:4])


@pytest.mark.parametrize(
    ("mean", "low", "high", "p", "words"),
    [
        (-2.0, -3.0, -1.0, 0.001, "beyond noise (worse)"),
        (2.0, 1.0, 3.0, 0.001, "beyond noise (better)"),
        (2.0, 1.0, 3.0, 0.2, "within noise"),  # the interval alone is not enough
        (2.0, -1.0, 5.0, 0.001, "within noise"),  # nor the pooled test alone
        (2.0, 1.0, 3.0, None, "beyond noise (better)"),  # no per-example results: the interval decides
        (2.0, None, None, 0.001, "no verdict (one seed)"),
    ],
)
def test_verdict_needs_the_interval_and_the_pooled_test(mean, low, high, p, words):
    assert stats.verdict(mean, low, high, p) == words


@given(st.lists(st.booleans(), max_size=70))
def test_packed_per_example_results_round_trip(values):
    text = pack_bools(values)
    assert text.isascii() and len(text) <= 4 * math.ceil(math.ceil(len(values) / 8) / 3)
    decoded = unpack_bools(text, len(values))
    assert decoded.dtype == bool and decoded.tolist() == values


def test_per_example_results_decode_a_report_and_none_for_an_old_one():
    clean, other = _pair(3, 2)
    report = _report("pgd_at", 0, clean, {"pgd20": other, "square": clean}, other & clean)
    decoded = per_example_results(report)
    assert decoded["indices"].tolist() == list(range(N))
    assert decoded["clean"].tolist() == clean.tolist()
    assert decoded["standalone"]["pgd20"].tolist() == other.tolist()
    assert decoded["worst_case"].tolist() == (other & clean).tolist()
    assert per_example_results(_without_per_example({"r": [report]})["r"][0]) is None


# ---------------------------------------------------------------------- statistics of many reports


def test_results_statistics_means_stds_and_paired_differences():
    comparison = results_statistics(_runs(), reference="pgd_at", devices={"runs/trades-seed1": "NVIDIA H100"})
    assert comparison["reference"] == "pgd_at" and "difference" not in comparison["recipes"]["pgd_at"]
    trades = comparison["recipes"]["trades"]
    assert [run["seed"] for run in trades["runs"]] == [0, 1, 2]
    assert [run["device"] for run in trades["runs"]] == [None, "NVIDIA H100", None]
    # trades' clean accuracy: 50 - b + c of 100 -> 39, 40, 41 %.
    assert [run["accuracy"]["main"]["clean"] for run in trades["runs"]] == pytest.approx([39, 40, 41])
    assert trades["mean"]["main"]["clean"] == pytest.approx(40)
    assert trades["std"]["main"]["clean"] == pytest.approx(1)

    clean = trades["difference"]["main"]["clean"]
    assert clean["seeds"] == [0, 1, 2] and clean["per_seed"] == pytest.approx([-11, -10, -9])
    half = T_975_DF2 * 1 / math.sqrt(3)
    assert (clean["mean"], clean["low"], clean["high"]) == pytest.approx((-10, -10 - half, -10 + half))
    assert [(t["seed"], t["b"], t["c"]) for t in clean["mcnemar"]["per_seed"]] == [(0, 12, 1), (1, 10, 0), (2, 11, 2)]
    assert clean["mcnemar"]["per_seed"][1]["p"] == pytest.approx(2 * 0.5**10)
    pooled = clean["mcnemar"]["pooled"]
    assert (pooled["b"], pooled["c"]) == (33, 3)
    assert pooled["p"] == pytest.approx(2 * sum(math.comb(36, k) for k in range(4)) / 2**36)
    assert clean["verdict"] == "beyond noise (worse)"

    differences = trades["difference"]["main"]
    assert list(differences) == ["clean", "pgd20", "square", "worst_case"]
    assert differences["pgd20"]["per_seed"] == pytest.approx([1, -2, 2])
    assert differences["pgd20"]["mcnemar"]["pooled"] == {"b": 10, "c": 11, "p": 1.0}
    assert differences["pgd20"]["verdict"] == "within noise"
    assert (differences["square"]["low"], differences["square"]["high"]) == (0, 0)
    assert differences["square"]["verdict"] == "within noise"
    # +2 points in every seed: a zero-width interval above 0, but 9 against 3 examples is p 0.15 pooled.
    assert differences["worst_case"]["low"] == differences["worst_case"]["high"] == pytest.approx(2)
    assert differences["worst_case"]["mcnemar"]["pooled"]["p"] == pytest.approx(stats.mcnemar_exact(3, 9))
    assert differences["worst_case"]["verdict"] == "within noise"

    assert comparison["recipes"]["awp"]["difference"]["main"]["clean"]["verdict"] == "no verdict (one seed)"
    assert comparison["recipes"]["awp"]["std"]["main"]["clean"] is None
    assert comparison["recipes"]["mart"]["difference"]["main"] is None


def test_no_reference_runs_no_differences():
    runs = _runs()
    del runs["pgd_at"]
    comparison = results_statistics(runs, reference="pgd_at")
    assert comparison["reference"] is None
    assert all("difference" not in entry for entry in comparison["recipes"].values())
    assert "Differences to" not in _page(runs, comparison)


def test_page_says_in_words_which_differences_are_beyond_noise():
    runs = _runs()
    page = _page(runs, results_statistics(runs, reference="pgd_at"))
    assert "### Differences to pgd_at" in page
    assert "Rule: a difference is beyond noise when its 95% interval over seeds excludes 0 and the pooled" in page
    line = next(line for line in page.splitlines() if line.startswith("- trades"))
    assert line.startswith(
        "- trades (seeds 0, 1, 2): clean -10.00 [-12.48, -7.52] points, p < 0.0001, beyond noise (worse);"
    )
    assert "; PGD-20 +0.33 [-4.84, 5.50] points, p 1, within noise; " in line
    assert "; Square +0.00 [0.00, 0.00] points, p 1, within noise; " in line
    assert line.endswith("; worst case +2.00 [2.00, 2.00] points, p 0.15, within noise.")
    assert "- awp (seeds 0): clean -11.00 points, p 0.0034, no verdict (one seed); " in page
    assert "- mart: no training seed in common with pgd_at, no paired difference." in page
    assert "- pgd_at" not in page
    summary = (
        "In short, on clean and worst case accuracy:\n\n"
        "- **beyond noise above pgd_at**: none;\n"
        "- **beyond noise below pgd_at**: trades (clean);\n"
        "- within noise on every one of them: none;\n"
        "- no verdict (one paired seed): awp.\n"
    )
    assert summary in page


def test_the_summary_names_every_headline_accuracy_and_recipes_within_noise():
    runs, full = _runs(extra=False), _full_split_runs()
    # mail gets right exactly what pgd_at gets right on every accuracy of both evaluations: within noise.
    right = _pair(0, 0)[0]
    runs["mail"] = [_report("mail", seed, *_everything(right)) for seed in range(3)]
    full["mail"] = [_report("mail", seed, right, {"pgd20": right}, right) for seed in range(3)]
    for group in runs.values():
        for report in group:
            report["settings"]["n_examples"] = N
    comparison = results_statistics(runs, reference="pgd_at", full_split=full)
    page = _page(runs, comparison, full_split={"digits": full}, full_split_report_name="eval_full_split.json")
    assert "In short, on clean, worst case, clean (all 100) and PGD-20 (all 100) accuracy:\n" in page
    assert "- **beyond noise below pgd_at**: trades (clean);\n" in page
    assert "- within noise on every one of them: mail.\n" in page


def _difference(per_seed: list[float], p: list[float] | None) -> dict:
    mcnemar = None if p is None else {"per_seed": [{"seed": i, "p": value} for i, value in enumerate(p)]}
    return {"per_seed": per_seed, "mcnemar": mcnemar}


@pytest.mark.parametrize(
    ("per_seed", "p", "expected"),
    [
        ([-10, -40, -12], [0.002, 1e-9, 0.001], "below"),
        ([3, 1, 2], [0.01, 0.04, 0.02], "above"),
        ([-10, -40, -12], [0.002, 0.2, 0.001], None),  # one seed within its test examples' noise
        ([-10, 40, -12], [0.002, 1e-9, 0.001], None),  # the seeds disagree
        ([-10, 0, -12], [0.002, 0.01, 0.001], None),  # a tie is no direction
        ([-10], [0.002], None),  # one seed: nothing to be steady about
        ([-10, -40, -12], None, None),  # no per-example results, no per-seed test
    ],
)
def test_every_seed_direction_needs_every_seed_one_way_and_beyond_its_own_noise(per_seed, p, expected):
    assert every_seed_direction(_difference(per_seed, p)) == expected


def test_the_summary_marks_a_difference_within_noise_only_because_the_seeds_spread():
    """fgsm_rs loses 10, 40 and 12 worst-case examples of 100 to pgd_at (each seed: McNemar p <= 0.002): the
    interval over seeds (mean -20.67, 95% half-width 43) includes 0, so within noise, and one way on every seed."""
    right = _pair(0, 0)[0]
    runs: dict[str, list[dict]] = {"pgd_at": [], "fgsm_rs": []}
    for seed, lost in enumerate((10, 40, 12)):
        reference, other = _pair(lost, 0)
        runs["pgd_at"].append(_report("pgd_at", seed, right, {"pgd20": reference, "square": reference}, reference))
        runs["fgsm_rs"].append(_report("fgsm_rs", seed, right, {"pgd20": other, "square": other}, other))
    comparison = results_statistics(runs, reference="pgd_at")
    worst = comparison["recipes"]["fgsm_rs"]["difference"]["main"]["worst_case"]
    assert worst["verdict"] == "within noise" and worst["low"] < 0 < worst["high"]
    page = _page(runs, comparison)
    assert "- within noise on every one of them: fgsm_rs;\n" in page
    assert (
        "- within noise, yet one way on every paired seed (each seed's McNemar p < 0.05; the seeds spread too far "
        "for the interval to exclude 0, more seeds would decide): fgsm_rs (below on every seed: worst case).\n"
    ) in page


def test_old_reports_without_per_example_results_still_render():
    runs = _without_per_example(_runs(extra=False))
    comparison = results_statistics(runs, reference="pgd_at")
    clean = comparison["recipes"]["trades"]["difference"]["main"]["clean"]
    assert clean["mcnemar"] is None and clean["mean"] == pytest.approx(-10)
    # Judged on the interval alone: the worst case's +2 in every seed is now beyond noise.
    assert comparison["recipes"]["trades"]["difference"]["main"]["worst_case"]["verdict"] == "beyond noise (better)"
    page = _page(runs, comparison)
    assert "| trades | 3 (0, 1, 2) | 40.00 ± 1.00 |" in page
    assert "clean -10.00 [-12.48, -7.52] points, no per-example test, beyond noise (worse)" in page


def test_one_old_report_turns_the_per_example_test_off_for_the_recipe():
    runs = _runs(extra=False)
    del runs["trades"][1]["results"]["per_example"]
    comparison = results_statistics(runs, reference="pgd_at")
    assert comparison["recipes"]["trades"]["difference"]["main"]["clean"]["mcnemar"] is None


def _full_split_runs() -> dict[str, list[dict]]:
    """A second evaluation of the runs of ``_runs(extra=False)``: PGD-20 on 100 examples, trades +1 point."""
    runs: dict[str, list[dict]] = {"pgd_at": [], "trades": []}
    for seed in range(3):
        clean, pgd = _pair(0, 0), _pair(1, 2)
        for recipe, side in (("pgd_at", 0), ("trades", 1)):
            runs[recipe].append(_report(recipe, seed, clean[side], {"pgd20": pgd[side]}, pgd[side]))
    return runs


def test_a_second_evaluation_adds_columns_and_differences():
    runs, full = _runs(extra=False), _full_split_runs()
    for group in runs.values():
        for report in group:
            report["settings"]["n_examples"] = N  # the first N of a larger split
    comparison = results_statistics(runs, reference="pgd_at", full_split=full)
    second = comparison["recipes"]["trades"]["difference"]["full_split"]
    assert list(second) == ["clean", "pgd20"]  # one attack: its worst case is that attack
    assert second["pgd20"]["per_seed"] == pytest.approx([1, 1, 1])
    assert second["pgd20"]["mcnemar"]["pooled"] == {"b": 3, "c": 6, "p": pytest.approx(stats.mcnemar_exact(3, 6))}
    assert comparison["recipes"]["trades"]["mean"]["full_split"]["pgd20"] == pytest.approx(51)

    table = results_table(runs, full)
    assert table[0].endswith("| worst case | clean (all 100) | PGD-20 (all 100) | flags |")
    alone = results_table(full)  # a page of the single-attack evaluation: no worst-case column repeating PGD-20
    assert alone[0] == "| recipe | seeds | clean | PGD-20 | flags |" and alone[3].endswith("| 51.00 ± 0.00 | 0 |")
    single = _page(full, results_statistics(full, reference="pgd_at"), scatter="s.png")
    assert "## Clean against PGD-20 accuracy" in single and "worst-case accuracy" not in single
    assert "One attack: its robust accuracy is an upper bound on the model's." in single
    assert table[3].endswith("| 50.33 ± 2.08 | 50.00 ± 0.00 | 52.00 ± 0.00 | 50.00 ± 0.00 | 51.00 ± 0.00 | 0 |")
    page = _page(runs, comparison, full_split={"digits": full}, full_split_report_name="eval_full_split.json")
    assert "Evaluation: the first 100 examples of the test split" in page
    assert "One attack:" not in page  # the main evaluation is a suite
    heading = 'Second evaluation (`eval_full_split.json`, the columns marked "all 100"): all 100 examples of the'
    assert heading in page
    assert "their eval.json and eval_full_split.json; do not edit" in page
    full["trades"][2]["sanity_flags"] = ["ordering: made up"]
    page = _page(runs, comparison, full_split={"digits": full}, full_split_report_name="eval_full_split.json")
    assert "Sanity checks that failed:\n\n- `runs/trades-seed2` (eval_full_split.json): ordering: made up\n" in page
    row = next(line for line in page.splitlines() if line.startswith("| trades |"))
    assert row.endswith(" | 51.00 ± 0.00 | 1 |")  # the flags column counts it
    assert "; clean (all 100) +0.00 [0.00, 0.00] points, p 1, within noise; PGD-20 (all 100) +1.00 [1.00, " in page


def test_the_evaluations_of_one_run_must_line_up():
    runs, full = _runs(extra=False), _full_split_runs()
    full["trades"].reverse()
    with pytest.raises(ValueError, match="runs/trades-seed2 where runs/trades-seed0 was expected"):
        results_statistics(runs, reference="pgd_at", full_split=full)


def test_std_is_the_sample_standard_deviation():
    runs = _runs(extra=False)
    comparison = results_statistics(runs, reference="pgd_at")
    values = [100 * r["results"]["standalone"]["pgd20"] for r in runs["trades"]]
    assert comparison["recipes"]["trades"]["std"]["main"]["pgd20"] == pytest.approx(statistics.stdev(values))


def test_the_environments_of_a_page_say_how_many_reports_each_made():
    runs = _runs(extra=False)
    page = _page(runs, results_statistics(runs, reference="pgd_at"))
    alike = next(line for line in page.splitlines() if line.startswith("Evaluated with"))
    assert "report" not in alike  # one environment for all: no counts
    runs["trades"][0]["environment"] = {**runs["trades"][0]["environment"], "memory_format": "channels_last"}
    page = _page(runs, results_statistics(runs, reference="pgd_at"))
    line = next(line for line in page.splitlines() if line.startswith("Evaluated with"))
    assert line.endswith(
        "cpu (test) (5 reports); " + alike.removeprefix("Evaluated with ")[:-1] + ", channels_last weights (1 report)."
    )


def test_a_page_names_the_runs_that_trained_somewhere_else_than_most():
    runs = _runs(extra=False)
    comparison = results_statistics(runs, reference="pgd_at")
    dirs = [r["run"]["run_dir"] for group in runs.values() for r in group]
    page = _page(runs, comparison, training_environments=dict.fromkeys(dirs, "torch 2.9 on 1 process(es), cpu (A)"))
    alike = next(line for line in page.splitlines() if line.startswith("Trained with"))
    assert alike == "Trained with torch 2.9 on 1 process(es), cpu (A)."  # one environment: no counts, no names
    moved = {"runs/trades-seed0", "runs/trades-seed2"}
    environments = {d: f"torch 2.9 on 1 process(es), cpu ({'B' if d in moved else 'A'})" for d in dirs}
    page = _page(runs, comparison, training_environments=environments)
    line = next(line for line in page.splitlines() if line.startswith("Trained with"))
    assert line == (
        "Trained with torch 2.9 on 1 process(es), cpu (A) (4 runs); "
        "torch 2.9 on 1 process(es), cpu (B) (2 runs: trades-seed0, trades-seed2)."
    )
