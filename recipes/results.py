"""The results table: robust accuracy of many training runs, grouped by dataset and recipe, as a Markdown page.

    python recipes/results.py runs/pgd_at-digits-seed{0,1,2} runs/adalab-digits-seed{0,1,2} --output docs/results.md

Every run folder is evaluated with recipes/evaluate.py's protocol (by default the full suite on the whole test
split at the run's own eps) unless its eval.json is up to date: made with the same settings, from the same
weights file and the same robustmix version. The page then gives, per dataset, the evaluation settings and a
table with one row per recipe (config.json's recipe name): clean, every attack and the worst case as mean ± std
over the recipe's runs (seeds), with the number of failed sanity checks; then, per recipe and metric, the
difference to the --reference recipe paired by training seed (mean with a 95% Student-t interval, McNemar's
exact test on the per-example results, pooled over seeds) and whether it is beyond noise; then the exact
training commands, a clean-vs-robust scatter plot and the runs' training curves, written next to the page
(results_scatter.png and results_curves.png for results.md). Every number of the page is also in a JSON file
next to it (results.json for results.md).

--full-split-attacks adds a second evaluation of every run (eval_full_split.json for eval.json): those attacks
on the whole split, no eps sweep, the other settings as given; its accuracies are more columns of the table,
with their own paired differences. E.g. the full suite on the first 2,000 test images and PGD-20 on all of them:

    python recipes/results.py RUN_DIR... --n-examples 2000 --full-split-attacks pgd20 --output docs/results.md

Runs of one recipe must differ only in their seed (and folder), and the runs of one dataset must share their
eps (or pass --eps): otherwise a mean over them would mix protocols, and the script stops before any work.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from accelerate import Accelerator

from robustmix.cli.evaluate import add_evaluation_flags, evaluation_kwargs
from robustmix.cli.presets import PAPER_PRESET, PRESETS
from robustmix.cli.recipe import base_parser, recipe_parser, recipe_script
from robustmix.evaluation import stats
from robustmix.evaluation.attacks import ATTACKS
from robustmix.evaluation.report import plot_clean_vs_robust, results_page, results_statistics
from robustmix.evaluation.run import check_run, evaluate_run
from robustmix.runs.checkpoint import atomic_write_json, atomic_write_text
from robustmix.runs.folder import load_config, load_metrics_log, recorded_flags
from robustmix.training.curves import plot_training_curves

#: Training flags that runs of one recipe may differ in: they change where a run is written or how it is
#: checkpointed and logged, not what it computes (a resumed run continues exactly); ``init_from`` names each
#: seed's own starting run (a hot start from the same recipe's run of that seed).
_PER_RUN_FLAGS = {
    "seed", "output_dir", "resume", "overwrite", "num_workers", "eval_every", "checkpoint_every",
    "checkpoint_every_steps", "keep_checkpoints", "init_from", "config", "log_every", "log_with",
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, dict[str, Any]]]:
    """Parse and check the flags and every run folder before any work; also returns ``{run_dir: config}``."""
    parser = argparse.ArgumentParser(
        prog="results.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run folders")
    parser.add_argument("--output", default="docs/results.md", help="the Markdown page (default: docs/results.md)")
    parser.add_argument("--title", default="Results", help="the page's heading (default: Results)")
    parser.add_argument("--reevaluate", action="store_true", help="evaluate every run, also with a current eval.json")
    parser.add_argument(
        "--report-name",
        default="eval.json",
        help="file name of each run's report, e.g. eval_sweep.json for a second evaluation that leaves eval.json "
        "alone (default: eval.json)",
    )
    parser.add_argument(
        "--reference",
        default="pgd_at",
        help="the recipe every other one is compared with, run by run of the same seed (default: pgd_at)",
    )
    parser.add_argument(
        "--full-split-attacks",
        nargs="+",
        choices=sorted(ATTACKS),
        metavar="ATTACK",
        help="also evaluate every run against these attacks on the whole split, without eps sweep, into "
        "<report name>_full_split.json, and add its columns to the table (default: no second evaluation)",
    )
    parser.add_argument(
        "--stored",
        action="store_true",
        help="build the page from the reports stored in each run folder, without weights and without evaluating "
        "(archived runs: config.json and reports); a report made with other settings is an error",
    )
    add_evaluation_flags(parser)
    args = parser.parse_args(argv)
    if args.stored and args.reevaluate:
        parser.error("--stored and --reevaluate contradict each other")

    configs = {}
    for run_dir in args.run_dirs:
        try:
            configs[run_dir] = load_config(run_dir) if args.stored else check_run(run_dir, args.weights)[0]
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
    seen: dict[tuple[str, str, int], str] = {}
    for run_dir, config in configs.items():
        key = (config["data"]["dataset"], row_name(config), config["seed"])
        if key in seen:
            parser.error(f"{seen[key]} and {run_dir} are both {key[1]} on {key[0]} with seed {key[2]}")
        seen[key] = run_dir
    for (dataset, recipe), group in _group(configs).items():
        first, *others = group
        names = {name for run_dir in group for name in configs[run_dir]["flags"]}
        for run_dir in others:
            differ = _training_flags(configs[run_dir], names).items() ^ _training_flags(configs[first], names).items()
            if differ:
                names = sorted({name for name, _ in differ})
                parser.error(f"{first} and {run_dir} ({recipe} on {dataset}) differ in {names}, not only the seed")
    if Path(args.report_name).name != args.report_name or not args.report_name.endswith(".json"):
        parser.error(f"--report-name must be a file name ending in .json, got {args.report_name!r}")
    if Path(args.output).suffix != ".md":
        parser.error(
            f"--output must be a Markdown file (.md; its numbers go to a .json next to it), got {args.output}"
        )
    rows = {row_name(config) for config in configs.values()}
    if args.reference not in rows:
        parser.error(f"no run of the --reference recipe {args.reference!r}; name one of the rows {sorted(rows)}")
    if args.eps is None:
        for dataset in {config["data"]["dataset"] for config in configs.values()}:
            eps = {config["attack"]["eps"] for config in configs.values() if config["data"]["dataset"] == dataset}
            if len(eps) > 1:
                parser.error(f"the {dataset} runs trained with different eps {sorted(eps)}; pass --eps")
    return args, configs


def training_command(config: dict[str, Any], folder: str | Path | None = None) -> str:
    """The command that trained a run, rebuilt from its config.json.

    Flags equal to the preset's value or to the default are left out; the recipe's own flags, and the shared
    flags the recipe fills in itself instead of the preset (its module's ``DEFAULTS``), are always given, but for
    a value the recipe derives itself when the flag is not given (its module's ``DERIVED_FLAGS``: e.g. ADA-Lab's
    c, which runs from before ``--weighting mail`` became the default recorded beside every weighting).
    ``folder``: where the run lives now; a run folder renamed since training (as a reading became the default
    and took the plain name) gets a command that writes to a folder of that name, beside the recorded one.
    """
    flags = config["flags"]
    if folder is not None and flags.get("output_dir") and Path(flags["output_dir"]).name != Path(folder).name:
        flags = {**flags, "output_dir": str(Path(flags["output_dir"]).with_name(Path(folder).name))}
    preset = PRESETS[flags["preset"]]
    if flags["preset"] == PAPER_PRESET:  # what parse_args puts over it: the recipe's release settings
        preset = {**preset, **getattr(_recipe_module(flags["recipe"]), "PAPER", {})}
    defaults = base_parser(flags["recipe"])  # not the recipe's parser: its own flags are always written out
    own = _recipe_defaults(flags["recipe"])
    derived = getattr(_recipe_module(flags["recipe"]), "DERIVED_FLAGS", {})
    words = [f"recipes/{flags['recipe']}.py"]
    for name, value in flags.items():
        if name in derived and value == _filled(derived[name], flags):
            continue
        default = preset[name] if name in preset else defaults.get_default(name)
        if name == "step_size" and preset["eps"] > 0 and flags["eps"] != preset["eps"]:
            default = preset["step_size"] * flags["eps"] / preset["eps"]  # what parse_args derives from --eps
        if name == "attack_bn_mode" and value == _default_attack_bn_mode(flags):
            continue  # the release's mode for these flags: what the recipe picks when the flag is not given
        if name in ("recipe", "resume", "overwrite") or value is None or (value == default and name not in own):
            continue
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(option if value else f"--no-{name.replace('_', '-')}")
        else:
            words += [option, *map(str, value if isinstance(value, list) else [value])]
    launcher = ["python"]
    if config["num_processes"] > 1:
        launcher = ["accelerate", "launch", "--num_processes", str(config["num_processes"])]
    return shlex.join(launcher + words)


def _stored_or_exit(run_dir: str, **kwargs: Any) -> dict[str, Any]:
    try:
        return evaluate_run(run_dir, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        print(f"results.py: error: --stored: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def full_split_report_name(report_name: str) -> str:
    """File name of the second evaluation's report (``--full-split-attacks``): eval.json -> eval_full_split.json."""
    return f"{Path(report_name).stem}_full_split.json"


def main(argv: list[str] | None = None) -> str:
    args, configs = parse_args(argv)
    accelerator = Accelerator()
    kwargs = evaluation_kwargs(args)
    # The whole split and no eps sweep: the numbers a benchmark quotes, on every test image.
    full_kwargs = kwargs | {"attacks": args.full_split_attacks, "n_examples": None, "sweep_eps": []}
    full_name = full_split_report_name(args.report_name)
    tables: dict[str, dict[str, list[dict[str, Any]]]] = {}
    full_tables: dict[str, dict[str, list[dict[str, Any]]]] = {}
    reuse = not args.reevaluate
    # With --stored nothing is evaluated: a missing or different stored report is a bad command line.
    evaluate = _stored_or_exit if args.stored else evaluate_run
    for (dataset, recipe), group in sorted(_group(configs).items()):
        for run_dir in sorted(group, key=lambda run: configs[run]["seed"]):
            report = evaluate(
                run_dir, output=Path(run_dir) / args.report_name, reuse=reuse, accelerator=accelerator,
                stored=args.stored, **kwargs,
            )  # fmt: skip
            tables.setdefault(dataset, {}).setdefault(recipe, []).append(report)
            if args.full_split_attacks:
                full = evaluate(
                    run_dir, output=Path(run_dir) / full_name, reuse=reuse, accelerator=accelerator,
                    stored=args.stored, **full_kwargs,
                )  # fmt: skip
                full_tables.setdefault(dataset, {}).setdefault(recipe, []).append(full)
    full_split = full_tables if args.full_split_attacks else None
    devices = {str(Path(run)): config.get("device") for run, config in configs.items()}
    comparisons = {
        dataset: results_statistics(
            runs, reference=args.reference, full_split=(full_split or {}).get(dataset), devices=devices
        )
        for dataset, runs in tables.items()
    }
    output = Path(args.output)
    scatter = output.with_name(f"{output.stem}_scatter.png") if args.plots else None
    curves = output.with_name(f"{output.stem}_curves.png") if args.plots else None
    command = shlex.join(["python", "recipes/results.py", *(sys.argv[1:] if argv is None else argv)])
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    page = results_page(
        tables,
        command=command,
        training_commands={str(Path(run)): training_command(config, run) for run, config in configs.items()},
        training_environments={str(Path(run)): training_environment(config) for run, config in configs.items()},
        scatter=None if scatter is None else scatter.name,
        date=date,
        title=args.title,
        report_name=args.report_name,
        full_split=full_split,
        full_split_report_name=full_name,
        comparisons=comparisons,
    )
    numbers = {
        "title": args.title,
        "command": command,
        "date": date,
        "units": "accuracies, their standard deviations and differences in percent (points)",
        "reference": args.reference,
        "confidence": stats.CONFIDENCE,
        "alpha": stats.ALPHA,
        "rule": stats.RULE,
        "report_names": {"main": args.report_name, **({"full_split": full_name} if full_split else {})},
        "datasets": {
            dataset: {"evaluations": _evaluations(runs, (full_split or {}).get(dataset)), **comparisons[dataset]}
            for dataset, runs in tables.items()
        },
    }
    if accelerator.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        if scatter is not None:
            plot_clean_vs_robust(tables, scatter)
        if curves is not None and _plot_curves(configs, curves):
            page += f"\n## Training curves\n\n![Training curves of the runs]({curves.name})\n"
        atomic_write_json(output.with_suffix(".json"), numbers)
        atomic_write_text(output, page)
        print(f"results of {len(configs)} run(s) written to {output} and {output.with_suffix('.json')}")
    return page


def _plot_curves(configs: dict[str, dict[str, Any]], path: Path) -> bool:
    """Write the training curves of the runs that kept their metrics.jsonl (one colour per recipe, one line style
    per seed); whether any did."""
    datasets = {config["data"]["dataset"] for config in configs.values()}
    runs, groups = {}, {}
    for run_dir, config in sorted(configs.items(), key=lambda item: (row_name(item[1]), item[1]["seed"])):
        label = f"{row_name(config)} seed {config['seed']}"
        if len(datasets) > 1:
            label += f" ({Path(config['data']['dataset']).name})"
        try:
            runs[label] = load_metrics_log(run_dir)
        except (FileNotFoundError, ValueError):  # an archive without its metrics.jsonl
            continue
        groups[label] = label.replace(f" seed {config['seed']}", "", 1)  # a recipe's seeds share a colour
    if runs:
        plot_training_curves(runs, path, title="validation: the training run's PGD at its eps", groups=groups)
    return bool(runs)


def _evaluations(
    runs: dict[str, list[dict[str, Any]]], full_split: dict[str, list[dict[str, Any]]] | None
) -> dict[str, Any]:
    """A dataset's evaluations: the examples they ran on and their settings, from their first reports."""
    firsts = {"main": next(iter(runs.values()))[0]}
    if full_split:
        firsts["full_split"] = next(iter(full_split.values()))[0]
    return {
        name: {
            "n": r["results"]["n"],
            "examples": f"{'all' if r['settings']['n_examples'] is None else 'the first'} {r['results']['n']} of "
            f"the {r['settings']['split']} split",
            "settings": r["settings"],
        }
        for name, r in firsts.items()
    }


def _recipe_module(recipe: str) -> ModuleType | None:
    """``recipes/<recipe>.py`` next to this script, imported once; None for a recipe that is not there."""
    return recipe_script(Path(__file__).resolve().with_name(f"{recipe}.py"))


def _recipe_parser(recipe: str) -> argparse.ArgumentParser:
    """The recipe's own command line (its ``parser()``), else the shared flags alone."""
    return recipe_parser(Path(__file__).resolve().with_name(f"{recipe}.py"))


def _recipe_defaults(recipe: str) -> frozenset[str]:
    """Names of the shared flags the recipe fills in itself when not given (its module's ``DEFAULTS``)."""
    return frozenset(getattr(_recipe_module(recipe), "DEFAULTS", {}))


def training_environment(config: dict[str, Any]) -> str:
    """The software and process count a run trained with, from its config.json (empty when it has none)."""
    versions = config.get("versions") or {}
    parts = [f"{name} {versions[name]}" for name in ("torch", "timm", "accelerate") if name in versions]
    if "python" in versions:
        parts.append(f"Python {versions['python']}")
    device = f", {config['device']}" if "device" in config else " (the run did not record its device)"
    return ", ".join(parts) + f" on {config.get('num_processes', 1)} process(es){device}" if parts else ""


def row_name(config: dict[str, Any]) -> str:
    """A run's row in the table: its recipe, followed by the recipe's own flags it sets to other values than the
    recipe's defaults (e.g. ``adalab --target floor``), so readings of one method get rows of their own."""
    flags = config["flags"]
    recipe = flags["recipe"]
    parser = _recipe_parser(recipe)
    shared = vars(base_parser(recipe).parse_args([]))
    words = [recipe]
    # What the recipe fills in for a flag left unset (its DEFAULTS, e.g. AWP's gamma for --base at) and what it
    # derives (DERIVED_FLAGS) is its default too: a run that recorded it set nothing.
    module = _recipe_module(recipe)
    filled = {**getattr(module, "DEFAULTS", {}), **getattr(module, "DERIVED_FLAGS", {})}
    for action in parser._actions:
        name = action.dest
        if name in shared or name == "help" or name not in flags or flags[name] == action.default:
            continue
        if action.default is None and name in filled and flags[name] == _filled(filled[name], flags):
            continue
        value = flags[name]
        if isinstance(value, bool):
            words.append(action.option_strings[0] if value else f"--no-{name.replace('_', '-')}")
        else:
            words += [action.option_strings[0], *map(str, value if isinstance(value, list) else [value])]
    mode = attack_bn_mode(config)
    if mode is not None and mode != _default_attack_bn_mode(flags):
        words += ["--attack-bn-mode", mode]
    return " ".join(words)


def _filled(default: Any, flags: dict[str, Any]) -> Any:
    """A recipe's default for a flag left unset: a value, or a function of the other flags."""
    return default(argparse.Namespace(**flags)) if callable(default) else default


def attack_bn_mode(config: dict[str, Any]) -> str | None:
    """The BatchNorm mode a run's training attack ran in: its ``--attack-bn-mode``, or for a run that predates
    the flag the ``bn_mode`` its attack callback recorded; ``None`` when neither says."""
    return recorded_flags(config).get("attack_bn_mode")


def _default_attack_bn_mode(flags: dict[str, Any]) -> str:
    """What the recipe's ``--attack-bn-mode`` is when not given, for these flags: its ``DEFAULTS``' value, else
    under ``--preset cifar10-paper`` its release's (``PAPER``), else eval."""
    module = _recipe_module(flags["recipe"])
    default = getattr(module, "DEFAULTS", {}).get("attack_bn_mode")
    if default is None and flags.get("preset") == PAPER_PRESET:
        default = getattr(module, "PAPER", {}).get("attack_bn_mode")
    default = default or "eval"
    return default(argparse.Namespace(**flags)) if callable(default) else default


def _group(configs: dict[str, dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """Run folders by (dataset, row: recipe and its own non-default flags), in the order given."""
    groups: dict[tuple[str, str], list[str]] = {}
    for run_dir, config in configs.items():
        groups.setdefault((config["data"]["dataset"], row_name(config)), []).append(run_dir)
    return groups


def _training_flags(config: dict[str, Any], names: set[str] = frozenset()) -> dict[str, Any]:
    """The flags that decide what a run computes, hashable for comparison.

    A flag of ``names`` that the run's config lacks (the run predates the flag) takes the flag's default.
    """
    flags = config["flags"]
    parser = _recipe_parser(flags["recipe"])
    missing = {name: parser.get_default(name) for name in names if name not in flags}
    if "attack_bn_mode" in missing:
        missing["attack_bn_mode"] = attack_bn_mode(config)
    return {k: str(v) for k, v in {**missing, **flags}.items() if k not in _PER_RUN_FLAGS}


if __name__ == "__main__":
    main()
