"""The validation (or test) numbers training runs end with, as one Markdown table: the screening step of readings.

    runs=benchmarks/runs/fashion-mnist
    python benchmarks/validation_table.py $runs/{adalab*,pgd_at}-seed0

Reads each run folder's metrics.json (the last validation: clean and PGD accuracy of the final weights on the
validation split, never the test split) and metrics.jsonl (passes per step after any burn-in: the last logged
row), and prints one row per run: its row name in results.py's table (the recipe and its own non-default
flags), seed, validation clean and PGD accuracy with 95% binomial half-widths, the difference to the
``--reference`` row of the same seed, and the passes per step. Then, for every reading paired with the reference
on one seed or more, the mean difference over those seeds with its 95% Student-t interval over seeds (none from
one seed). Works on archived runs (no weights needed).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

from robustmix.evaluation.stats import mean_interval
from robustmix.runs.folder import load_metrics_log, read_json

RESULTS = Path(__file__).resolve().parents[1] / "recipes" / "results.py"


def _results_module():
    spec = importlib.util.spec_from_file_location("results", RESULTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def half_width(accuracy: float, n: int) -> float:
    """95% normal-approximation half-width of a binomial accuracy, in points."""
    return 100 * 1.96 * math.sqrt(accuracy * (1 - accuracy) / n)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--reference", default="pgd_at", help="row the differences are taken to (default: pgd_at)")
    parser.add_argument(
        "--split", choices=("validation", "test"), default="validation",
        help="the last validation (for choosing), or the test evaluation every run ends with: clean and PGD-20 of "
        "the final weights on the whole test split (for reporting what was chosen)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    row_name = _results_module().row_name
    rows = []
    for run_dir in args.run_dirs:
        config, metrics = (read_json(Path(run_dir) / name) for name in ("config.json", "metrics.json"))
        if args.split == "validation":
            clean, pgd, n = (metrics["last_val"][key] for key in ("val_clean_acc", "val_pgd_acc", "val_n"))
        else:
            clean, pgd, n = (metrics["test"][key] for key in ("clean_acc", "pgd_acc", "n"))
        steps = [r for r in load_metrics_log(run_dir) if "forwards_per_step" in r]
        passes = f"{steps[-1]['forwards_per_step']:g} / {steps[-1]['backwards_per_step']:g}" if steps else "-"
        rows.append((row_name(config), config["seed"], clean, pgd, n, passes))
    reference = {}
    for name, seed, clean, pgd, _, _ in rows:
        if name == args.reference:
            if seed in reference:
                parser.error(f"two {args.reference} runs of seed {seed}: the differences would be ambiguous")
            reference[seed] = (clean, pgd)
    split = "val" if args.split == "validation" else "test"
    lines = [
        f"| reading | seed | {split} clean | {split} PGD-20 | clean vs reference | PGD-20 vs reference "
        "| passes (fwd / bwd) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, seed, clean, pgd, n, passes in sorted(rows, key=lambda row: -row[3]):
        ref = reference.get(seed)
        diff = [f"{100 * (a - b):+.2f}" if ref else "-" for a, b in zip((clean, pgd), ref or (0, 0))]
        lines.append(
            f"| `{name}` | {seed} | {100 * clean:.2f} ± {half_width(clean, n):.2f} | {100 * pgd:.2f} ± "
            f"{half_width(pgd, n):.2f} | {diff[0]} | {diff[1]} | {passes} |"
        )
    lines += ["", *_over_seeds(rows, reference, args.reference)]
    table = "\n".join(lines)
    print(table)
    return table


def _over_seeds(rows: list[tuple], reference: dict[int, tuple[float, float]], name: str) -> list[str]:
    """Per reading, the mean paired difference to the reference over its seeds, with a t interval over seeds."""
    paired: dict[str, list[tuple[int, float, float]]] = {}
    for reading, seed, clean, pgd, _, _ in rows:
        if reading != name and seed in reference:
            paired.setdefault(reading, []).append((seed, clean - reference[seed][0], pgd - reference[seed][1]))
    lines = [
        f"| reading | seeds | clean vs {name} (mean, 95% interval over seeds) | PGD-20 vs {name} |",
        "| --- | --- | ---: | ---: |",
    ]
    for reading, diffs in sorted(paired.items(), key=lambda item: -sum(d[2] for d in item[1]) / len(item[1])):
        cells = []
        for column in (1, 2):
            mean, low, high = mean_interval([100 * d[column] for d in diffs])
            cells.append(f"{mean:+.2f}" + ("" if low is None else f" [{low:+.2f}, {high:+.2f}]"))
        seeds = ", ".join(str(d[0]) for d in sorted(diffs))
        lines.append(f"| `{reading}` | {seeds} | {cells[0]} | {cells[1]} |")
    return lines if paired else []


if __name__ == "__main__":
    main()
