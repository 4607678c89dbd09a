"""Training curves of runs: loss, training adversarial accuracy, validation clean and PGD accuracy against steps.

    plot_training_curves({"pgd_at seed 0": load_metrics_log(run_dir)}, run_dir / "curves.png")

The rows are those of a run's ``metrics.jsonl`` (``robustmix.runs.folder.load_metrics_log``); each panel draws,
per run, the rows that hold its value at their optimizer step. Validation of EMA weights (``val_ema_*``),
where a run has it, is drawn fainter in the raw weights' colour and line style. matplotlib
(``pip install 'robustmix[plot]'``) is imported inside ``plot_training_curves`` only, on the Agg canvas: no pyplot
state, no display. One legend beside the four panels names every run; the seeds of one recipe (``groups``) share a
colour and differ in line style.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The panels: (title, metrics.jsonl keys drawn in it, whether the values are accuracies in [0, 1]).
PANELS = (
    ("training loss", ("loss",), False),
    ("training adversarial accuracy (%)", ("train_adv_acc",), True),
    ("validation clean accuracy (%)", ("val_clean_acc", "val_ema_clean_acc"), True),
    ("validation PGD accuracy (%)", ("val_pgd_acc", "val_ema_pgd_acc"), True),
)


def distinct_colour(i: int) -> tuple[float, float, float]:
    """The ``i``-th of 20 distinct colours (matplotlib's ``tab20``): its ten dark shades first, then the light ones.

    The training curves and the clean-against-robust scatter both colour their ``i``-th recipe with it; both take
    the recipes in name order, so on a one-dataset results page a recipe has one colour in both figures.
    """
    from matplotlib import colormaps

    return colormaps["tab20"].colors[(2 * i) % 20 + (2 * i) // 20 % 2]


def curve(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(optimizer steps, values) of the rows that hold ``key``, in the order written."""
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    return [step for step, _ in points], [value for _, value in points]


def plot_training_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    title: str | None = None,
    groups: Mapping[str, str] | None = None,
) -> None:
    """Write a PNG of the training curves of ``runs`` (``{label: metrics.jsonl rows}``) with one legend beside the
    panels.

    Args:
        runs: The runs' rows, each labelled as the legend shows it.
        path: Where the PNG goes.
        title: Above the panels (e.g. the evaluation attack of the validation rows).
        groups: ``{label: group}``: the runs of one group (a recipe's seeds) share a colour and differ in line
            style. Without it every run has a colour of its own.
    """
    from matplotlib.figure import Figure

    group_of = {label: (groups or {}).get(label, label) for label in runs}
    colour_index = {group: i for i, group in enumerate(dict.fromkeys(group_of.values()))}
    member, seen = {}, Counter()  # a run's place in its group picks its line style
    for label, group in group_of.items():
        member[label], seen[group] = seen[group], seen[group] + 1
    styles = ("-", "--", ":", "-.")
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    legend: dict[str, Any] = {}  # label -> its first line, for the one legend of the figure
    for axes, (panel, keys, accuracy) in zip(figure.subplots(2, 2).flat, PANELS):
        for label, rows in runs.items():
            color = distinct_colour(colour_index[group_of[label]])
            for key, alpha in zip(keys, (1.0, 0.45)):  # validation of the moving average: the same line, fainter
                steps, values = curve(rows, key)
                if not steps:
                    continue
                scaled = [100 * v for v in values] if accuracy else values
                shown = label if key == keys[0] else f"{label} (EMA)"
                (line,) = axes.plot(
                    steps, scaled, styles[member[label] % len(styles)], color=color, alpha=alpha, linewidth=1.2,
                    marker="." if len(steps) <= 30 else None,  # a marker on each of few points, none on a dense curve
                )  # fmt: skip
                legend.setdefault(shown, line)
        axes.set_title(panel, fontsize=10)
        axes.set_xlabel("optimizer step")
    if legend:
        figure.legend(
            list(legend.values()), list(legend), loc="outside right upper", fontsize=7, ncols=1 + len(legend) // 40
        )
    if title:
        figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=110)
