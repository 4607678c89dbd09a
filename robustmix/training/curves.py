"""Training curves of runs: loss, training adversarial accuracy, validation clean and PGD accuracy against steps.

    plot_training_curves({"pgd_at seed 0": load_metrics_log(run_dir)}, run_dir / "curves.png")

The rows are those of a run's ``metrics.jsonl`` (``robustmix.runs.folder.load_metrics_log``); each panel draws,
per run, the rows that hold its value at their optimizer step. Validation of EMA weights (``val_ema_*``),
where a run has it, is drawn dashed beside the raw weights'. matplotlib (``pip install 'robustmix[plot]'``)
is imported inside ``plot_training_curves`` only, on the Agg canvas: no pyplot state, no display.
"""

from __future__ import annotations

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


def curve(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(optimizer steps, values) of the rows that hold ``key``, in the order written."""
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    return [step for step, _ in points], [value for _, value in points]


def plot_training_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str | None = None
) -> None:
    """Write a PNG of the training curves of ``runs`` (``{label: metrics.jsonl rows}``), one colour per run.

    Args:
        runs: The runs' rows, each labelled as the legend shows it.
        path: Where the PNG goes.
        title: Above the panels (e.g. the evaluation attack of the validation rows).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 7.5), layout="constrained")
    colors = colormaps["tab20"].colors
    for axes, (panel, keys, accuracy) in zip(figure.subplots(2, 2).flat, PANELS):
        for i, (label, rows) in enumerate(runs.items()):
            color = colors[(2 * i) % 20 + (2 * i) // 20 % 2]  # the dark shades first, then the light ones
            for key, style in zip(keys, ("-", "--")):
                steps, values = curve(rows, key)
                if steps:
                    scaled = [100 * v for v in values] if accuracy else values
                    shown = label if key == keys[0] else f"{label} (EMA)"
                    axes.plot(steps, scaled, style, marker=".", color=color, label=shown, linewidth=1.2)
        axes.set_title(panel, fontsize=10)
        axes.set_xlabel("optimizer step")
        if axes.has_data():
            axes.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=110)
