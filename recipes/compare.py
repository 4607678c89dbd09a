"""Train many recipes x seeds, a few at a time, each resumable, and keep each finished run's small files.

    python recipes/compare.py --preset fashion-mnist --seeds 0 1 2 --jobs 2
    python recipes/compare.py --preset fashion-mnist --recipes adalab --seeds 0 --variant floor -- --target floor

Every (recipe, seed) trains as its own process, ``python recipes/<recipe>.py --preset P --seed S --output-dir
<runs-dir>/<recipe>-seed<S> [flags after --]``; with ``--variant V`` the folder is ``<recipe>-V-seed<S>``. Its
console output goes to ``<run>.log`` beside the folder. A run whose ``metrics.json`` exists is finished and
skipped, unless its config.json recorded other values than this command gives it (the preset, the seed, the
flags after ``--``, or a default of the recipe's own flags that changed since): then it is an error naming the
flags, and nothing in the folder changes (give another ``--variant``, or move the folder). A run with
checkpoints continues with ``--resume latest``, so the same command picks up where an interrupted session
stopped. With ``--archive DIR`` each finished run's small files (``config.json``,
``metrics.json``, ``metrics.jsonl`` and any evaluation reports) are copied to ``DIR/<run name>/``, the record
that goes into the repository; the weights stay in the run folder.

Each process runs with one intra-op thread unless the flags say otherwise: on an N-core machine ``--jobs N``
keeps every core busy without two runs spin-waiting on the same core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from robustmix.cli.args import nonnegative_int, positive_int
from robustmix.cli.presets import PRESETS
from robustmix.cli.recipe import base_parser, recipe_parser
from robustmix.runs.checkpoint import list_checkpoints
from robustmix.runs.folder import CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, METRICS_LOG, read_json

RECIPES = ("pgd_at", "fgsm_rs", "trades", "mart", "mail", "awp", "gairat", "sglr", "caat", "bilaw", "adalab")
HERE = Path(__file__).resolve().parent
#: The files of a finished run kept in the archive: everything but weights and checkpoints.
ARCHIVED = (CONFIG_FILE, METRICS_FILE, METRICS_LOG)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES), metavar="RECIPE")
    parser.add_argument("--seeds", nargs="+", type=nonnegative_int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=positive_int, default=2, help="runs at once (default: 2)")
    parser.add_argument("--runs-dir", help="parent of the run folders (default: runs/<preset>)")
    parser.add_argument(
        "--variant",
        default="",
        help="name of the flag set after --, in every run folder's name: <recipe>-<variant>-seed<S>",
    )
    parser.add_argument("--archive", help="copy each finished run's small files to ARCHIVE/<run name>/")
    parser.add_argument(
        "--archive-only",
        action="store_true",
        help="train nothing: archive every finished run of these recipes and seeds (e.g. after evaluating them)",
    )
    parser.add_argument("extra", nargs="*", help="flags passed to every recipe (after --)")
    args = parser.parse_args(argv)
    if args.archive_only and not args.archive:
        parser.error("--archive-only needs --archive DIR")
    args.runs_dir = Path(args.runs_dir or f"runs/{args.preset}")
    return args


def run_name(recipe: str, seed: int, variant: str = "") -> str:
    return f"{recipe}-{variant}-seed{seed}" if variant else f"{recipe}-seed{seed}"


def command(args: argparse.Namespace, recipe: str, seed: int) -> list[str] | None:
    """The training command of one run, or None when the run is finished."""
    out = args.runs_dir / run_name(recipe, seed, args.variant)
    if (out / METRICS_FILE).exists():
        return None
    words = [sys.executable, str(HERE / f"{recipe}.py"), "--preset", args.preset, "--seed", str(seed)]
    words += ["--output-dir", str(out), *args.extra]
    if list_checkpoints(out / CHECKPOINTS_DIR):
        words += ["--resume", "latest"]
    elif (out / CONFIG_FILE).exists():
        words.append("--overwrite")  # started but never checkpointed: nothing to keep
    return words


def recorded_differences(args: argparse.Namespace, recipe: str, seed: int) -> list[str]:
    """What the finished run in this (recipe, seed)'s folder recorded with other values than this command would
    give it: the preset, the seed, the flags after ``--`` and the defaults of the recipe's own flags (a default
    may have changed since the run trained). One ``"--flag recorded (this command: value)"`` per difference;
    flags the run did not record (older runs) are not compared."""
    config = read_json(args.runs_dir / run_name(recipe, seed, args.variant) / CONFIG_FILE)
    recorded = config.get("flags", {}) if isinstance(config, dict) else {}
    parser = recipe_parser(HERE / f"{recipe}.py")
    shared = {action.dest for action in base_parser(recipe)._actions}
    wanted = {"preset": args.preset, "seed": seed}
    wanted |= {  # the recipe's own flags at their defaults (the shared ones default to the preset's values)
        action.dest: action.default
        for action in parser._actions
        if action.dest not in shared and action.default not in (None, argparse.SUPPRESS)
    }
    given = recipe_parser(HERE / f"{recipe}.py")
    for action in given._actions:
        action.default, action.required = argparse.SUPPRESS, False
    wanted |= vars(given.parse_known_args(args.extra)[0])  # only the flags the command gives
    return [
        f"--{name.replace('_', '-')} {recorded[name]!r} (this command: {value!r})"
        for name, value in wanted.items()
        if name in recorded and json.loads(json.dumps(recorded[name])) != json.loads(json.dumps(value))
    ]


def archive(run_dir: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(run_dir.iterdir()):
        if path.is_file() and (
            path.name in ARCHIVED or (path.name.startswith("eval") and path.suffix in (".json", ".md"))
        ):
            shutil.copy2(path, target / path.name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    todo = [(recipe, seed) for seed in args.seeds for recipe in args.recipes]
    if args.archive_only:
        for recipe, seed in todo:
            name = run_name(recipe, seed, args.variant)
            if (args.runs_dir / name / METRICS_FILE).exists():
                archive(args.runs_dir / name, Path(args.archive) / name)
                print(f"{name}: archived", flush=True)
        return 0
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            recipe, seed = todo.pop(0)
            words = command(args, recipe, seed)
            if words is None:
                name = run_name(recipe, seed, args.variant)
                differences = recorded_differences(args, recipe, seed)
                if differences:
                    print(f"{name}: error: finished with other flags than this command gives it: "
                          f"{'; '.join(differences)}; give another --variant, or move the folder", file=sys.stderr,
                          flush=True)  # fmt: skip
                    failed.append(name)
                else:
                    print(f"{name}: finished before, skipped", flush=True)
                continue
            log = open(args.runs_dir / f"{run_name(recipe, seed, args.variant)}.log", "a")  # noqa: SIM115
            print(f"start {' '.join(words[1:])}", flush=True)
            running[recipe, seed] = (
                subprocess.Popen(words, stdout=log, stderr=subprocess.STDOUT, env=env),
                time.time(),
            )
        time.sleep(2)
        for key, (process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[key]
            name = run_name(*key, args.variant)
            print(f"{name}: exit {process.returncode} after {time.time() - started:.0f} s", flush=True)
            if process.returncode:
                failed.append(name)
            elif args.archive:
                archive(args.runs_dir / name, Path(args.archive) / name)
    if failed:
        print(f"failed: {' '.join(failed)} (logs in {args.runs_dir})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
