"""Reports of robust evaluations: Markdown tables, console text and PNG plots, made from report dicts alone.

A report is what ``robustmix.evaluation.run.evaluate_run`` returns and writes to ``eval.json``; everything here
reads only that dict, so the table and plots of any ``eval.json`` can be made again without a model.
matplotlib is imported inside the plot functions (Agg canvas, no pyplot state): the rest of robustmix never
needs it.
"""

from __future__ import annotations

import base64
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustmix.evaluation import stats

#: Settings every attack of the suite shares with the others; left out of tables to keep them readable
#: (they are in eval.json).
_COMMON_SETTINGS = ("norm", "bn_mode", "loss_scale")
#: Settings that set an attack's budget, as plot titles name them.
_BUDGET_WORDS = {"steps": "steps", "restarts": "restarts", "n_target_classes": "targets", "queries": "queries"}


def report_files(output: str | Path, *, plots: bool, sweep: bool) -> dict[str, str]:
    """File names of the table and plots written next to the JSON report ``output`` (``eval.json`` -> ``eval.md``...).

    Args:
        output: Path of the JSON report.
        plots: Whether plots are written.
        sweep: Whether the evaluation has an eps sweep to plot.
    """
    stem = Path(output).stem
    files = {"table": f"{stem}.md"}
    if plots and sweep:
        files["eps_sweep_plot"] = f"{stem}_eps_sweep.png"
    if plots:
        files["margins_plot"] = f"{stem}_margins.png"
    return files


def pack_bools(values: Any) -> str:
    """Bool ``[N]`` (array, tensor or list) as text for JSON: base64 of ``numpy.packbits`` (8 examples a byte)."""
    return base64.b64encode(np.packbits(np.asarray(values, dtype=bool)).tobytes()).decode("ascii")


def unpack_bools(text: str, n: int) -> np.ndarray:
    """The bool ``[n]`` array ``pack_bools`` made ``text`` from."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text, validate=True), dtype=np.uint8), count=n)
    return bits.astype(bool)


def per_example_results(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """The per-example results of an evaluation report, decoded; None for a report that has none.

    A report keeps them in ``report["results"]["per_example"]``: ``"n"``, ``"indices"`` (``{"start", "stop"}``:
    the examples ``range(start, stop)`` of the split, in order) and, each as ``pack_bools`` text, ``"clean"``
    (classified correctly), ``"worst_case"`` (robust against every attack) and ``"standalone"`` (per attack
    name: robust against that attack alone). Reports written before robustmix recorded them lack the entry.

    Returns:
        ``{"indices": int [n], "clean": bool [n], "worst_case": bool [n], "standalone": {name: bool [n]}}``.
    """
    stored = report["results"].get("per_example")
    if stored is None:
        return None
    n = stored["n"]
    return {
        "indices": np.arange(stored["indices"]["start"], stored["indices"]["stop"]),
        "clean": unpack_bools(stored["clean"], n),
        "worst_case": unpack_bools(stored["worst_case"], n),
        "standalone": {name: unpack_bools(text, n) for name, text in stored["standalone"].items()},
    }


def percent(accuracy: float) -> str:
    """An accuracy in [0, 1] as a percentage with two decimals, e.g. ``"84.31%"``."""
    return f"{100 * accuracy:.2f}%"


def attack_description(attack: Mapping[str, Any]) -> str:
    """The settings of an attack (an entry of a report's ``settings["attacks"]``), e.g. ``"steps 20, loss ce"``."""
    settings = attack["settings"]
    return ", ".join(
        f"{key} {value}" for key, value in settings.items() if key not in _COMMON_SETTINGS and value is not None
    )


def budget(attack: Mapping[str, Any]) -> str:
    """An attack's label and budget, e.g. ``"APGD-CE 20 steps"`` or ``"Square 500 queries"``."""
    settings = attack["settings"]
    # One restart is every attack's default: naming it only adds words.
    words = [
        f"{settings[key]} {word}"
        for key, word in _BUDGET_WORDS.items()
        if key in settings and not (key == "restarts" and settings[key] == 1)
    ]
    return " ".join([attack["label"], *words])


def warning_block(flags: Sequence[str]) -> str:
    """The console WARNING block listing failed sanity checks (one line each)."""
    rule = "=" * 100
    title = f"WARNING: {len(flags)} sanity check(s) failed; these robust accuracies may not be trustworthy"
    return "\n".join([rule, title, *(f"  - {flag}" for flag in flags), rule])


def summary(report: Mapping[str, Any], output: str | Path) -> str:
    """A few console lines: what was evaluated, every accuracy, where the report is."""
    settings, run, results = report["settings"], report["run"], report["results"]
    labels = {attack["name"]: attack["label"] for attack in settings["attacks"]}
    accuracies = " | ".join(
        [f"clean {percent(results['clean'])}"]
        + [f"{labels[name]} {percent(acc)}" for name, acc in results["standalone"].items()]
        + [f"worst case {percent(results['worst_case'])}"]
    )
    return (
        f"{run['recipe']} on {run['dataset']} ({settings['split']} split, n={results['n']}, {settings['weights']} "
        f"weights), L-inf eps {settings['eps']:.4g}:\n  {accuracies}\nreport: {output}"
    )


def evaluation_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown page of one evaluation (``eval.md``): settings, the accuracy table, sanity checks, plots."""
    settings, run, results, env = report["settings"], report["run"], report["results"], report["environment"]
    files = report.get("files", {})
    n_text = "all" if settings["n_examples"] is None else "the first"
    lines = [
        f"# Robust evaluation of `{run['run_dir']}`",
        "",
        f"{run['recipe']} ({run['model']}, training seed {run['train_seed']}) on {run['dataset']}: "
        f"{n_text} {results['n']} examples of the {settings['split']} split, {settings['weights']} weights "
        f"(`{run['weights_file']}`, SHA-256 `{run['weights_sha256'][:16]}`...). L-inf eps {settings['eps']:.6g} "
        f"(pixels in [0, 1]); attacks {_precision(settings['mixed_precision'])}, decisions "
        f"{settings['decisions']}; seeds: {settings['seeds']}.",
        "",
        f"Protocol: {settings['protocol']}. Accuracy alone: against that attack only; cumulative: against it "
        "and every attack above it.",
        "",
        "| attack | settings | accuracy alone | cumulative | examples attacked |",
        "| --- | --- | ---: | ---: | ---: |",
        f"| clean | | {percent(results['clean'])} | | |",
    ]
    for attack in settings["attacks"]:
        name = attack["name"]
        lines.append(
            f"| {attack['label']} | {attack_description(attack)} | {percent(results['standalone'][name])} "
            f"| {percent(results['cumulative'][name])} | {results['attacked'][name]} |"
        )
    lines += [f"| **worst case** | {results['attack']} | | **{percent(results['worst_case'])}** | |", ""]
    lines += [*_sanity_markdown(report["sanity_flags"], swept=bool(report["eps_sweep"]["eps"])), ""]

    sweep = report["eps_sweep"]
    if sweep["eps"]:
        sweep_attacks = settings["eps_sweep"]["attacks"]
        lines += [
            "## Robust accuracy against eps",
            "",
            "With cheaper attack budgets than the table above, since they run at every eps: "
            + ", ".join(budget(attack) for attack in sweep_attacks)
            + ". Worst case: per example, over these attacks.",
            "",
            "| eps | " + " | ".join(attack["label"] for attack in sweep_attacks) + " | worst case |",
            "| ---: | " + " | ".join("---:" for _ in sweep_attacks) + " | ---: |",
        ]
        for i, eps in enumerate(sweep["eps"]):
            cells = [percent(sweep["standalone"][attack["name"]][i]) for attack in sweep_attacks]
            lines.append(f"| {eps:.4g} | " + " | ".join(cells) + f" | {percent(sweep['worst_case'][i])} |")
        lines.append("")
        if "eps_sweep_plot" in files:
            lines += [f"![robust accuracy against eps]({files['eps_sweep_plot']})", ""]

    margins = report["margins"]
    lines += [
        "## Probability margins",
        "",
        "Margin `p_y - max_{k != y} p_k` of the fp32 model, in [-1, 1]: at the clean image (mean "
        f"{margins['mean_clean']:.3f}) and at the worst-case point, the lowest margin of the image and of every "
        f"attack's point (mean {margins['mean_adversarial']:.3f}). Negative: misclassified.",
        "",
    ]
    if "margins_plot" in files:
        lines += [f"![probability margins]({files['margins_plot']})", ""]
    lines += [
        "## Environment",
        "",
        f"robustmix {env['robustmix']}, torch {env['torch']}, accelerate {env['accelerate']}, Python "
        f"{env['python']}; {env['num_processes']} process(es) on {env['device']}"
        f"{_memory_format(env)}; {env['elapsed_s']} s; {env['date']}.",
        "",
    ]
    return "\n".join(lines)


def plot_eps_sweep(report: Mapping[str, Any], path: str | Path) -> None:
    """PNG of robust accuracy against eps for each attack of the sweep and their worst case.

    The title names the sweep's budgets, which are cheaper than the main evaluation's.
    """
    settings, run, sweep = report["settings"], report["run"], report["eps_sweep"]
    figure, axes = _figure()
    for attack in settings["eps_sweep"]["attacks"]:
        accuracies = [100 * acc for acc in sweep["standalone"][attack["name"]]]
        axes.plot(sweep["eps"], accuracies, marker="o", label=attack["label"])
    axes.plot(sweep["eps"], [100 * acc for acc in sweep["worst_case"]], "k--", marker="s", label="worst case")
    axes.axvline(settings["eps"], color="gray", linestyle=":", label=f"evaluation eps {settings['eps']:.4g}")
    axes.set_xlabel("L-inf eps (pixels in [0, 1])")
    axes.set_ylabel("robust accuracy (%)")
    axes.set_ylim(-2, 102)
    budgets = ", ".join(budget(attack) for attack in settings["eps_sweep"]["attacks"])
    axes.set_title(
        f"{run['recipe']} on {run['dataset']} ({settings['split']}, n={report['results']['n']}, "
        f"{settings['weights']} weights)\ncheaper sweep budgets: {budgets}",
        fontsize=9,
    )
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def plot_margins(report: Mapping[str, Any], path: str | Path) -> None:
    """PNG histogram of the probability margins at the clean and at the worst-case points."""
    settings, run, margins = report["settings"], report["run"], report["margins"]
    figure, axes = _figure()
    axes.stairs(margins["clean"], margins["edges"], fill=True, alpha=0.5, label="clean")
    axes.stairs(margins["adversarial"], margins["edges"], fill=True, alpha=0.5, label="worst-case point")
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_xlabel("probability margin p_y - max_{k != y} p_k (fp32; < 0: misclassified)")
    axes.set_ylabel("examples")
    axes.set_title(
        f"{run['recipe']} on {run['dataset']} ({settings['split']}, n={report['results']['n']}), "
        f"eps {settings['eps']:.4g}\nworst case over {', '.join(a['label'] for a in settings['attacks'])}",
        fontsize=9,
    )
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------------- results over many runs


def mean_std(values: Sequence[float]) -> str:
    """Accuracies in [0, 1] as ``"mean ± std"`` in percent (sample standard deviation); one value: the mean only."""
    mean = 100 * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def results_table(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    full_split: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> list[str]:
    """Markdown lines of one dataset's table: a row per recipe, accuracies as mean ± std over its runs (seeds).

    Args:
        runs: ``{recipe: reports}``, all evaluated with the same settings.
        full_split: ``{recipe: reports}`` of a second evaluation of the same runs (in the same order) on the
            whole split; its accuracies follow as columns marked with its number of examples.
    """
    first = next(iter(runs.values()))[0]
    main = metrics(first)  # with a single attack, no worst-case column: it would repeat the attack's
    header = ["recipe", "seeds", *(metric_label(first, metric) for metric in main)]
    extra: list[str] = []
    if full_split:
        extra = metrics(next(iter(full_split.values()))[0])
        header += [metric_label(next(iter(full_split.values()))[0], metric, whole_split=True) for metric in extra]
    header.append("flags")
    lines = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(header) - 2)]
    for recipe, group in runs.items():
        second = list(full_split[recipe]) if full_split else []
        cells = [
            recipe,
            f"{len(group)} ({', '.join(str(r['run']['train_seed']) for r in group)})",
            *(mean_std([accuracy(r, metric) for r in group]) for metric in main),
            *(mean_std([accuracy(r, metric) for r in second]) for metric in extra),
            str(sum(len(r["sanity_flags"]) for r in [*group, *second])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def sweep_table(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """Markdown lines of one dataset's eps sweep: a row per recipe, the sweep's worst case at each eps.

    Empty when the reports have no sweep. Accuracies are mean ± std over each recipe's runs (seeds).

    Args:
        runs: ``{recipe: reports}``, all evaluated with the same settings.
    """
    sweep = next(iter(runs.values()))[0]["settings"]["eps_sweep"]
    if not sweep["eps"]:
        return []
    labels = " and ".join(attack["label"] for attack in sweep["attacks"])
    header = ["recipe", *(f"eps {eps:.4g}" for eps in sweep["eps"])]
    lines = [
        f"Eps sweep: robust accuracy in % at each eps, worst case over {labels} at the sweep's budgets "
        "(mean ± std over the runs). It should fall to ~0 at the largest eps; where it does not, suspect "
        "gradient masking.",
        "",
        "| " + " | ".join(header) + " |",
        "| --- |" + " ---: |" * (len(header) - 1),
    ]
    for recipe, group in runs.items():
        cells = [mean_std([r["eps_sweep"]["worst_case"][i] for r in group]) for i in range(len(sweep["eps"]))]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def metrics(report: Mapping[str, Any]) -> list[str]:
    """The accuracies an evaluation compares recipes on: ``"clean"``, each attack's name, ``"worst_case"``.

    The worst case is left out when there is a single attack (it is that attack's accuracy).
    """
    names = [attack["name"] for attack in report["settings"]["attacks"]]
    return ["clean", *names, *(["worst_case"] if len(names) > 1 else [])]


def metric_label(report: Mapping[str, Any], metric: str, *, whole_split: bool = False) -> str:
    """A metric of ``metrics`` as a page names it, e.g. ``"PGD-20"``; ``"PGD-20 (all 10,000)"`` for ``whole_split``."""
    labels = {attack["name"]: attack["label"] for attack in report["settings"]["attacks"]}
    label = {"clean": "clean", "worst_case": "worst case", **labels}[metric]
    return f"{label} (all {report['results']['n']:,})" if whole_split else label


def accuracy(report: Mapping[str, Any], metric: str) -> float:
    """A report's accuracy in [0, 1] for a metric of ``metrics``."""
    results = report["results"]
    return results["standalone"][metric] if metric in results["standalone"] else results[metric]


def results_statistics(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    reference: str,
    full_split: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    devices: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """One dataset's statistics over seeds, and every recipe's paired differences to the ``reference`` recipe.

    A recipe's run is paired with the reference's run of the same training seed. For every metric of
    ``metrics`` (accuracies in percent): per run the accuracy; per recipe the mean and the sample standard
    deviation over its runs; against the reference the per-seed differences (points), their mean with its
    ``stats.CONFIDENCE`` Student-t interval, McNemar's exact test per seed and pooled over the seeds (their
    discordant counts summed) when every paired report holds per-example results on the same examples, and the
    verdict of ``stats.verdict``.

    Args:
        runs: ``{recipe: reports}`` of one dataset, evaluated with the same settings.
        reference: The recipe the others are compared with; when it has no runs here, there are no differences.
        full_split: ``{recipe: reports}`` of a second evaluation of the same runs, as ``"full_split"``.
        devices: ``{run_dir: device it trained on}`` (from its config.json; None when it did not record it).

    Returns:
        ``{"reference": name or None, "recipes": {recipe: {"runs": [...], "mean": ..., "std": ...,
            "difference": ...}}}``; ``"mean"``, ``"std"`` and ``"difference"`` hold one entry per evaluation
            (``"main"``, ``"full_split"``), each ``{metric: ...}``. ``"difference"`` is absent for the reference and
            None for a recipe without a seed in common with it. A difference is ``{"seeds", "per_seed", "mean",
            "low", "high", "mcnemar", "verdict"}``; ``"mcnemar"`` is ``{"per_seed": [{"seed", "b", "c", "p"}],
            "pooled": {"b", "c", "p"}}`` (``b``: examples only the reference gets right) or None.
    """
    evaluations = {"main": runs, **({"full_split": full_split} if full_split else {})}
    devices = devices or {}
    recipes: dict[str, Any] = {}
    for recipe, group in runs.items():
        entry: dict[str, Any] = {"runs": [], "mean": {}, "std": {}}
        for i, report in enumerate(group):
            matched = {name: _same_run(reports[recipe][i], report) for name, reports in evaluations.items()}
            entry["runs"].append(
                {
                    "run_dir": report["run"]["run_dir"],
                    "seed": report["run"]["train_seed"],
                    "device": devices.get(report["run"]["run_dir"]),
                    "evaluated_on": {name: r["environment"]["device"] for name, r in matched.items()},
                    "accuracy": {name: {m: 100 * accuracy(r, m) for m in metrics(r)} for name, r in matched.items()},
                }
            )
        for name in evaluations:
            values = [run["accuracy"][name] for run in entry["runs"]]
            entry["mean"][name] = {m: statistics.fmean(v[m] for v in values) for m in values[0]}
            entry["std"][name] = {
                m: statistics.stdev(v[m] for v in values) if len(values) > 1 else None for m in values[0]
            }
        recipes[recipe] = entry
    if reference in runs:
        for recipe in runs:
            if recipe != reference:
                recipes[recipe]["difference"] = {
                    name: _differences(reports[reference], reports[recipe]) for name, reports in evaluations.items()
                }
    return {"reference": reference if reference in runs else None, "recipes": recipes}


def differences_lines(
    comparison: Mapping[str, Any],
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    full_split: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> list[str]:
    """Markdown lines saying, per recipe and metric, the paired difference to the reference and its verdict.

    Args:
        comparison: What ``results_statistics`` returned for these runs.
        runs: ``{recipe: reports}`` as given to ``results_statistics``.
        full_split: The second evaluation as given to ``results_statistics``.
    """
    reference = comparison["reference"]
    if reference is None or len(runs) < 2:
        return []
    first = {"main": next(iter(runs.values()))[0]}
    if full_split:
        first["full_split"] = next(iter(full_split.values()))[0]
    lines = [
        f"### Differences to {reference}",
        "",
        f"Paired by training seed: a recipe's accuracy minus {reference}'s of the same seed, in percentage points; "
        f"the mean over the paired seeds with its {stats.CONFIDENCE:.0%} Student-t interval (n - 1 degrees of "
        "freedom), then the p of McNemar's exact test (two-sided binomial test on the examples exactly one of "
        "the two models gets right), pooled over the seeds: their discordant counts are summed before the test, "
        "so it measures the noise of the test examples, not that between seeds (the interval does). The tests "
        f"per seed are in the JSON file next to this page. Rule: {stats.RULE}.",
        "",
    ]
    lines += _summary_lines(comparison, first)
    for recipe, entry in comparison["recipes"].items():
        if recipe == reference:
            continue
        if entry["difference"]["main"] is None:
            lines.append(f"- {recipe}: no training seed in common with {reference}, no paired difference.")
            continue
        seeds = ", ".join(map(str, next(iter(entry["difference"]["main"].values()))["seeds"]))
        parts = [
            f"{metric_label(first[name], metric, whole_split=name == 'full_split')} {_difference_words(d)}"
            for name, differences in entry["difference"].items()
            for metric, d in differences.items()
        ]
        lines.append(f"- {recipe} (seeds {seeds}): " + "; ".join(parts) + ".")
    return [*lines, ""]


def headline_metrics(report: Mapping[str, Any]) -> list[str]:
    """The accuracies a comparison is summed up on: clean, and the robust accuracy of ``report``'s evaluation
    (its worst case, or its single attack)."""
    return ["clean", metrics(report)[-1]]


def _summary_lines(comparison: Mapping[str, Any], first: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The verdicts on the headline accuracies of every evaluation, grouped: better, worse, within noise, none.

    Args:
        comparison: What ``results_statistics`` returned.
        first: ``{evaluation name: one of its reports}`` (``"main"``, and ``"full_split"`` when there is one).
    """
    reference = comparison["reference"]
    headlines = [
        (name, metric, metric_label(report, metric, whole_split=name == "full_split"))
        for name, report in first.items()
        for metric in headline_metrics(report)
    ]
    groups: dict[str, list[str]] = {"better": [], "worse": [], "within": [], "none": [], "steady": []}
    for recipe, entry in comparison["recipes"].items():
        differences = entry.get("difference")
        if recipe == reference or differences is None or differences["main"] is None:
            continue
        verdicts = {
            label: differences[name][metric]["verdict"]
            for name, metric, label in headlines
            if differences.get(name) and metric in differences[name]
        }
        for side in ("better", "worse"):
            labels = [label for label, verdict in verdicts.items() if verdict == f"beyond noise ({side})"]
            if labels:
                groups[side].append(f"{recipe} ({', '.join(labels)})")
        steady: dict[str, list[str]] = {}  # "above" / "below" -> the labels of the metrics
        for name, metric, label in headlines:
            if verdicts.get(label) == "within noise" and (side := every_seed_direction(differences[name][metric])):
                steady.setdefault(side, []).append(label)
        if steady:
            sides = "; ".join(f"{side} on every seed: {', '.join(labels)}" for side, labels in steady.items())
            groups["steady"].append(f"{recipe} ({sides})")
        if all(verdict == "within noise" for verdict in verdicts.values()):
            groups["within"].append(recipe)
        elif all(verdict.startswith("no verdict") for verdict in verdicts.values()):
            groups["none"].append(recipe)
    labels = [label for _, _, label in headlines]
    names = f"{', '.join(labels[:-1])} and {labels[-1]} accuracy"

    def listed(recipes: list[str]) -> str:
        return ", ".join(recipes) if recipes else "none"

    lines = [
        f"In short, on {names}:",
        "",
        f"- **beyond noise above {reference}**: {listed(groups['better'])};",
        f"- **beyond noise below {reference}**: {listed(groups['worse'])};",
        f"- within noise on every one of them: {listed(groups['within'])}",
    ]
    if groups["steady"]:
        lines[-1] += ";"
        lines.append(
            f"- within noise, yet one way on every paired seed (each seed's McNemar p < {stats.ALPHA}; the seeds "
            f"spread too far for the interval to exclude 0, more seeds would decide): {listed(groups['steady'])}"
        )
    if groups["none"]:
        lines[-1] += ";"
        lines.append(f"- no verdict (one paired seed): {listed(groups['none'])}")
    lines[-1] += "."
    return [*lines, "", "Every difference:", ""]


def every_seed_direction(difference: Mapping[str, Any]) -> str | None:
    """``"above"`` or ``"below"`` when at least two paired seeds all differ one way, each beyond its own test
    examples' noise (McNemar p < ``stats.ALPHA`` per seed), else None (also without per-example results).

    Not a verdict: it marks a difference within noise only because the seeds spread, e.g. a recipe whose
    robustness collapses by a different amount on each seed.
    """
    per_seed, tests = difference.get("per_seed") or [], (difference.get("mcnemar") or {}).get("per_seed") or []
    if len(per_seed) < 2 or len(tests) != len(per_seed) or any(test["p"] >= stats.ALPHA for test in tests):
        return None
    if all(value > 0 for value in per_seed):
        return "above"
    if all(value < 0 for value in per_seed):
        return "below"
    return None


def _same_run(report: Mapping[str, Any], like: Mapping[str, Any]) -> Mapping[str, Any]:
    if report["run"]["run_dir"] != like["run"]["run_dir"]:
        raise ValueError(
            f"the evaluations list {report['run']['run_dir']} where {like['run']['run_dir']} was expected"
        )
    return report


def _differences(reference: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Paired differences of ``other``'s runs to ``reference``'s of the same seed (see ``results_statistics``)."""
    by_seed = {r["run"]["train_seed"]: r for r in reference}
    pairs = [(by_seed[o["run"]["train_seed"]], o) for o in other if o["run"]["train_seed"] in by_seed]
    if not pairs:
        return None
    examples = [(per_example_results(r), per_example_results(o)) for r, o in pairs]
    same_examples = all(
        r is not None and o is not None and np.array_equal(r["indices"], o["indices"]) for r, o in examples
    )
    differences = {}
    for metric in metrics(pairs[0][1]):
        per_seed = [100 * (accuracy(o, metric) - accuracy(r, metric)) for r, o in pairs]
        mean, low, high = stats.mean_interval(per_seed)
        mcnemar = None
        if same_examples:
            counts = [stats.discordant_pairs(_examples(r, metric), _examples(o, metric)) for r, o in examples]
            b, c = (sum(column) for column in zip(*counts))
            mcnemar = {
                "per_seed": [
                    {"seed": o["run"]["train_seed"], "b": bs, "c": cs, "p": stats.mcnemar_exact(bs, cs)}
                    for (_, o), (bs, cs) in zip(pairs, counts)
                ],
                "pooled": {"b": b, "c": c, "p": stats.mcnemar_exact(b, c)},
            }
        differences[metric] = {
            "seeds": [o["run"]["train_seed"] for _, o in pairs],
            "per_seed": per_seed,
            "mean": mean,
            "low": low,
            "high": high,
            "mcnemar": mcnemar,
            "verdict": stats.verdict(mean, low, high, None if mcnemar is None else mcnemar["pooled"]["p"]),
        }
    return differences


def _examples(per_example: Mapping[str, Any], metric: str) -> np.ndarray:
    return per_example["standalone"][metric] if metric in per_example["standalone"] else per_example[metric]


def _difference_words(difference: Mapping[str, Any]) -> str:
    """E.g. ``"-2.31 [-3.10, -1.52] points, p 0.0004, beyond noise (worse)"``."""
    words = f"{difference['mean']:+.2f}"
    if difference["low"] is not None:
        words += f" [{difference['low']:.2f}, {difference['high']:.2f}]"
    words += " points, "
    mcnemar = difference["mcnemar"]
    if mcnemar is None:
        words += "no per-example test, "
    else:
        words += f"{p_words(mcnemar['pooled']['p'])}, "
    return words + difference["verdict"]


def p_words(p: float) -> str:
    """A p-value as the pages write it: ``"p < 0.0001"`` below 1e-4, else two significant digits (``"p 0.052"``)."""
    return "p < 0.0001" if p < 1e-4 else f"p {p:.2g}"


def _trained_with(runs: Mapping[str, Sequence[Mapping[str, Any]]], environments: Mapping[str, str]) -> list[str]:
    """What the runs trained with; when that differs between them, each environment with its number of runs, and
    the runs by name for every environment but the most common one, so a reader knows which rows it touches."""
    by_environment: dict[str, list[str]] = {}
    for group in runs.values():
        for r in group:
            run_dir = r["run"]["run_dir"]
            if environments.get(run_dir):
                by_environment.setdefault(environments[run_dir], []).append(Path(run_dir).name)
    if len(by_environment) <= 1:
        return [f"Trained with {next(iter(by_environment))}.", ""] if by_environment else []
    common = max(sorted(by_environment), key=lambda words: len(by_environment[words]))
    parts = []
    for words, names in sorted(by_environment.items()):
        count = f"{len(names)} run{'s' if len(names) > 1 else ''}"
        parts.append(f"{words} ({count})" if words == common else f"{words} ({count}: {', '.join(sorted(names))})")
    return [f"Trained with {'; '.join(parts)}.", ""]


def results_page(
    tables: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    *,
    command: str,
    training_commands: Mapping[str, str],
    scatter: str | None,
    date: str,
    training_environments: Mapping[str, str] | None = None,
    title: str = "Results",
    report_name: str = "eval.json",
    full_split: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]] | None = None,
    full_split_report_name: str | None = None,
    comparisons: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The Markdown results page: how it was made, then per dataset the evaluation settings and the table.

    Args:
        tables: ``{dataset: {recipe: reports}}``; the reports of one dataset share their settings.
        command: The command that made the page.
        training_commands: ``{run_dir: the command that trained it}``.
        scatter: File name of the clean-vs-robust scatter plot next to the page, or None.
        date: When the page was made.
        training_environments: ``{run_dir: software and processes it trained with}`` (from its config.json).
        title: The page's heading.
        report_name: File name of the runs' reports the page was made from.
        full_split: A second evaluation of the same runs on the whole split, shaped as ``tables``; its
            accuracies are more columns of the table.
        full_split_report_name: File name of the second evaluation's reports.
        comparisons: ``{dataset: results_statistics(...)}``: the paired differences to a reference recipe,
            said in words under each table.
    """
    reports = [r for runs in tables.values() for group in runs.values() for r in group]
    names = report_name if full_split is None else f"{report_name} and {full_split_report_name}"
    lines = [
        f"# {title}",
        "",
        f"<!-- Generated by recipes/results.py from run folders and their {names}; do not edit by hand. -->",
        "",
        f"Generated {date} from {len(reports)} run folder(s) by",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    short = [r["run"] for r in reports if _cut_short(r["run"])]
    if short:
        steps = sorted({f"{run['total_steps']} of {_planned_steps(run)}" for run in short})
        lines += [
            '!!! warning "Smoke runs, not results"',
            f"    {len(short)} of these runs stopped after `--max-steps` ({', '.join(steps)} planned optimizer "
            "steps): the numbers show that training, evaluation and this page work end to end, not how well the "
            "methods do. The real table is pending the full runs.",
            "",
        ]
    for dataset, runs in tables.items():
        second = full_split[dataset] if full_split is not None else None
        evaluated = [(r, report_name) for group in runs.values() for r in group]
        lines += [f"## {dataset}", "", *_evaluation_lines(evaluated[0][0], "Evaluation"), ""]
        if len(evaluated[0][0]["settings"]["attacks"]) == 1:
            lines += [_ONE_ATTACK, ""]
        if second is not None:
            first = next(iter(second.values()))[0]
            heading = (
                f'Second evaluation (`{full_split_report_name}`, the columns marked "all {first["results"]["n"]:,}")'
            )
            lines += [*_evaluation_lines(first, heading, sweep=False), ""]
            evaluated += [(r, full_split_report_name) for group in second.values() for r in group]
        lines += [
            "Accuracies in %, mean ± standard deviation over the runs (training seeds) of each recipe; "
            "flags: failed sanity checks, summed over the runs.",
            "",
            f"Evaluated with {_environments(r['environment'] for r, _ in evaluated)}.",
            "",
            *_trained_with(runs, training_environments or {}),
            *results_table(runs, second),
            "",
        ]
        if comparisons is not None:
            lines += differences_lines(comparisons[dataset], runs, second)
        lines += sweep_table(runs)
        flagged = [(r, name, flag) for r, name in evaluated for flag in r["sanity_flags"]]
        if flagged:
            lines += ["Sanity checks that failed:", ""]
            lines += [f"- `{r['run']['run_dir']}` ({name}): {flag}" for r, name, flag in flagged]
            lines.append("")
        lines += ["Runs (training command reconstructed from config.json; evaluation date):", "", "```bash"]
        for group in runs.values():
            for r in group:
                lines.append(f"{training_commands[r['run']['run_dir']]}  # evaluated {r['environment']['date']}")
        lines += ["```", ""]
    if scatter is not None:
        robust = _robust_name(next(iter(next(iter(tables.values())).values()))[0])
        lines += [f"## Clean against {robust} accuracy", "", f"![clean against {robust} accuracy]({scatter})", ""]
    return "\n".join(lines)


#: Under a page whose evaluation runs one attack: what its robust accuracy is, and is not.
_ONE_ATTACK = (
    "One attack: its robust accuracy is an upper bound on the model's. A model that hides its gradients can look "
    "robust to it and not to other attacks, so a ranking on it can mislead; the worst case over a suite of attacks "
    "(`recipes/evaluate.py`'s default) is the number to compare methods on."
)


def _evaluation_lines(report: Mapping[str, Any], heading: str, *, sweep: bool = True) -> list[str]:
    """The settings of an evaluation, from one of its reports: examples, eps, seeds, precision, attacks."""
    settings, n = report["settings"], report["results"]["n"]
    n_text = f"all {n:,}" if settings["n_examples"] is None else f"the first {n:,}"
    return [
        f"{heading}: {n_text} examples of the {settings['split']} split, {settings['weights']} weights, "
        f"L-inf eps {settings['eps']:.6g} (pixels in [0, 1]), attack seed {settings['seed']}, attacks "
        f"{_precision(settings['mixed_precision'])}; decisions: {settings['decisions']}. "
        f"{settings['protocol'].capitalize()}. Attacks:",
        "",
        *(f"- {attack['label']}: {attack_description(attack)}" for attack in settings["attacks"]),
        "",
        _sweep_sentence(settings["eps_sweep"]) if sweep else "No eps sweep in this evaluation.",
    ]


def plot_clean_vs_robust(tables: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]], path: str | Path) -> None:
    """PNG scatter of clean against worst-case accuracy, one panel per dataset.

    Every run is a point; each recipe's mean is a diamond with the standard deviation over its runs as error bars.

    Args:
        tables: ``{dataset: {recipe: reports}}``.
        path: Where the PNG goes.
    """
    from matplotlib.figure import Figure

    from robustmix.training.curves import distinct_colour

    figure = Figure(figsize=(5.5 * len(tables), 4.5), layout="constrained")
    shapes = "Dsv^<>ph*"  # after 20 colours the mean markers change shape: no two recipes look alike
    for axes, (dataset, runs) in zip(figure.subplots(1, len(tables), squeeze=False)[0], tables.items()):
        for i, (recipe, group) in enumerate(runs.items()):
            clean = [100 * r["results"]["clean"] for r in group]
            robust = [100 * r["results"]["worst_case"] for r in group]
            color = distinct_colour(i)
            (points,) = axes.plot(clean, robust, "o", alpha=0.4, color=color)
            axes.errorbar(
                statistics.fmean(clean),
                statistics.fmean(robust),
                xerr=statistics.stdev(clean) if len(group) > 1 else None,
                yerr=statistics.stdev(robust) if len(group) > 1 else None,
                fmt=shapes[i // 10 % len(shapes)],
                markersize=8,
                capsize=3,
                color=points.get_color(),
                label=f"{recipe} ({len(group)} run{'s' if len(group) > 1 else ''})",
            )
        first = next(iter(runs.values()))[0]
        settings, results = first["settings"], first["results"]
        axes.set_title(
            f"{dataset}: L-inf eps {settings['eps']:.4g}, {settings['split']} split, n={results['n']}\n"
            f"{results['attack']}",
            fontsize=9,
        )
        axes.set_xlabel("clean accuracy (%)")
        axes.set_ylabel(f"{_robust_name(first)} robust accuracy (%)")
        axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def _robust_name(report: Mapping[str, Any]) -> str:
    """What the robust accuracy of a report is against: "worst-case", or its single attack's label."""
    attacks = report["settings"]["attacks"]
    return attacks[0]["label"] if len(attacks) == 1 else "worst-case"


def _precision(mixed_precision: str) -> str:
    return "in fp32 (no autocast)" if mixed_precision == "no" else f"under {mixed_precision} autocast"


def _sweep_sentence(sweep: Mapping[str, Any]) -> str:
    if not sweep["eps"]:
        return "No eps sweep (`--no-sweep`): the check that accuracy falls to ~0 at a large eps did not run."
    return (
        "Eps sweep (table below; per run in its Markdown report next to the JSON one): "
        f"{', '.join(f'{eps:.4g}' for eps in sweep['eps'])} "
        f"with cheaper budgets: {', '.join(budget(attack) for attack in sweep['attacks'])}."
    )


def _sanity_markdown(flags: Sequence[str], *, swept: bool = True) -> list[str]:
    if not flags:
        large_eps = (
            "accuracy falls to ~0 at the largest eps of the sweep"
            if swept
            else "(no eps sweep: the large-eps check did not run)"
        )
        return [
            "Sanity checks passed: clean >= PGD-20 >= PGD-100 >= worst case, no black-box attack beats the "
            f"white-box ones, PGD losses rise, {large_eps}."
        ]
    return [
        f"> **WARNING: {len(flags)} sanity check(s) failed; these robust accuracies may not be trustworthy.**",
        ">",
        *(f"> - {flag}" for flag in flags),
    ]


def _environments(environments: Any) -> str:
    """The distinct software versions and hardware of some reports, in words, each with how many reports it made
    when they are not all alike."""
    seen = Counter(
        f"robustmix {e['robustmix']}, torch {e['torch']}, accelerate {e['accelerate']}, Python {e['python']} "
        f"on {e['num_processes']} process(es), {e['device']}{_memory_format(e)}"
        for e in environments
    )
    if len(seen) == 1:
        return next(iter(seen))
    return "; ".join(f"{words} ({count} report{'s' if count > 1 else ''})" for words, count in sorted(seen.items()))


def _memory_format(environment: Mapping[str, Any]) -> str:
    """The model's memory format in an environment line (reports made before it was recorded have none)."""
    return f", {environment['memory_format']} weights" if "memory_format" in environment else ""


def _planned_steps(run: Mapping[str, Any]) -> int:
    """Optimizer steps of all the run's epochs."""
    return (run.get("flags") or {}).get("epochs", 0) * (run.get("steps_per_epoch") or 0)


def _cut_short(run: Mapping[str, Any]) -> bool:
    """Whether ``--max-steps`` stopped the run before its epochs were done."""
    return (run.get("flags") or {}).get("max_steps") is not None and run["total_steps"] < _planned_steps(run)


def _figure() -> tuple[Any, Any]:
    """A figure on the Agg canvas with one axes: no pyplot, no global backend change."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    return figure, figure.add_subplot()
