"""The short table of a results page: each recipe's clean, PGD-20 and worst-case accuracy and its paired
differences to the reference recipe, as the Markdown table the READMEs quote.

    python benchmarks/summary_table.py docs/results_fashion_mnist.json
    python benchmarks/summary_table.py docs/results_fashion_mnist_full_split.json   # no worst case: PGD-20 leads

Reads the JSON that ``recipes/results.py`` writes beside its page (so it needs no run folder and no weights) and
prints one row per recipe: the seeds, mean ± std over them of clean, PGD-20 and worst-case accuracy (those the
evaluation has) on one of the page's evaluations (``--evaluation``, default the main one), then the mean paired
difference to the reference recipe on clean accuracy and on the headline (worst case, or PGD-20 when the
evaluation has no worst case) with its 95% interval over seeds and McNemar's p pooled over seeds, **bold** where
the page calls the difference beyond noise. The reference comes first, the others by the headline, highest
first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from robustmix.evaluation.report import p_words

COLUMNS = (("clean", "clean"), ("pgd20", "PGD-20"), ("worst_case", "worst case"))


def difference_cell(difference: dict[str, Any] | None) -> str:
    """``-1.10 [-1.55, -0.65], p < 0.0001``, bold when beyond noise; empty for the reference itself."""
    if not difference:
        return ""
    words = f"{difference['mean']:+.2f}"
    if difference.get("low") is not None:
        words += f" [{difference['low']:+.2f}, {difference['high']:+.2f}]"
    mcnemar = difference.get("mcnemar")
    if mcnemar:
        words += f", {p_words(mcnemar['pooled']['p'])}"
    return f"**{words}**" if difference.get("verdict", "").startswith("beyond noise") else words


def table(page: dict[str, Any], dataset: str | None = None, evaluation: str = "main") -> str:
    """The Markdown table of one dataset of a results page's JSON."""
    datasets = page["datasets"]
    if dataset is None:
        if len(datasets) != 1:
            raise SystemExit(f"error: the page has {len(datasets)} datasets ({', '.join(datasets)}); pick one")
        dataset = next(iter(datasets))
    if dataset not in datasets:
        raise SystemExit(f"error: the page has no dataset {dataset!r} (it has {', '.join(datasets)})")
    recipes = datasets[dataset]["recipes"]
    reference = datasets[dataset].get("reference") or page.get("reference")
    reference_label = f"`{reference}`" if reference else "the reference"

    evaluations = {e for recipe in recipes.values() for e in recipe["mean"]}
    if evaluation not in evaluations:
        raise SystemExit(f"error: the page has no evaluation {evaluation!r} (it has {', '.join(sorted(evaluations))})")
    first = next(iter(recipes.values()))["mean"][evaluation]
    columns = [(key, label) for key, label in COLUMNS if key in first]
    headline = columns[-1][0]
    differences = ("clean", headline)

    def score(name: str) -> float:
        return recipes[name]["mean"][evaluation][headline]

    order = sorted(recipes, key=lambda name: (name != reference, -score(name), name))
    header = ["recipe", "seeds", *(label for _, label in columns)]
    header += [f"{label} vs {reference_label}" for key, label in columns if key in differences]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * len(columns) + " --- |" * 2]
    for name in order:
        recipe = recipes[name]
        seeds = ", ".join(str(run["seed"]) for run in sorted(recipe["runs"], key=lambda run: run["seed"]))
        cells = [f"`{name}`", seeds]
        for key, _ in columns:
            std = (recipe.get("std") or {}).get(evaluation, {}).get(key)
            mean = recipe["mean"][evaluation][key]
            cells.append(f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}")
        paired = (recipe.get("difference") or {}).get(evaluation, {})
        cells += [difference_cell(paired.get(key)) for key in differences]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="a results page's JSON (recipes/results.py writes it beside the page)")
    parser.add_argument("--dataset", help="the dataset's table, when the page has several")
    parser.add_argument("--evaluation", default="main", help="which evaluation of the page (default: main)")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        parser.error(f"{args.page}: no such file")
    try:
        page = json.loads(args.page.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        parser.error(f"{args.page}: not a results page's JSON ({error})")
    if not isinstance(page, dict) or not isinstance(page.get("datasets"), dict):
        parser.error(f"{args.page}: not a results page's JSON (no 'datasets')")
    text = table(page, args.dataset, args.evaluation)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
