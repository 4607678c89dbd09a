"""Robust evaluation of a training run: clean, PGD-20, PGD-100, CW-inf, APGD-CE, APGD-T, Square and their worst case.

Loads the run's weights and exactly the data split it was trained and validated with (config.json says which),
runs every attack on every clean-correct example, sweeps eps with cheaper attacks, checks the numbers for
signs of gradient masking, and writes eval.json (every setting and number), eval.md and two PNG plots into
the run folder. Failed sanity checks are printed as a WARNING block and recorded in the report.

    python recipes/evaluate.py --run-dir runs/pgd_at-digits-seed0
    python recipes/evaluate.py --run-dir runs/pgd_at-digits-seed0 --attacks pgd20 apgd-ce square --n-examples 200
    python recipes/evaluate.py --run-dir runs/pgd_at-digits-seed0 --quick        # a first look: eval_quick.json
    accelerate launch recipes/evaluate.py --run-dir runs/pgd_at-cifar10-seed0 --mixed-precision bf16

Several processes split the examples between them and give the numbers of one process.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from robustmix.cli.evaluate import add_evaluation_flags, evaluation_kwargs
from robustmix.evaluation.attacks import DEFAULT_ATTACKS
from robustmix.evaluation.run import EVAL_FILE, check_run, evaluate_run, split_size
from robustmix.runs.folder import CONFIG_FILE, load_model

#: --quick: two attacks (120 nominal passes per example, attack_cost; the default suite about 3,700) on the
#: first QUICK_EXAMPLES examples, no eps sweep, written beside the full report, never over it.
QUICK_ATTACKS, QUICK_EXAMPLES, QUICK_FILE = ("pgd20", "apgd-ce"), 500, "eval_quick.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True, help="the training run's folder (its output_dir)")
    parser.add_argument("--output", help=f"path of the JSON report (default: RUN_DIR/{EVAL_FILE})")
    add_evaluation_flags(parser)
    parser.add_argument(
        "--quick", action="store_true",
        help=f"a first look: {' and '.join(a.upper() for a in QUICK_ATTACKS)} on the first {QUICK_EXAMPLES} "
        f"examples, no eps sweep, written to RUN_DIR/{QUICK_FILE}; --attacks, --n-examples, --sweep-eps and "
        "--output still choose",
    )  # fmt: skip
    parser.set_defaults(attacks=None)  # to tell a given --attacks from the default under --quick
    args = parser.parse_args(argv)

    # The run folder is checked here, model built and weights loaded, so that a wrong path or a damaged run ends
    # with a one-line message before any work.
    try:
        config, _ = check_run(args.run_dir, args.weights)
        num_classes = load_model(args.run_dir, weights=args.weights).num_classes
        if config["data"].get("num_classes", num_classes) != num_classes:
            raise ValueError(
                f"{Path(args.run_dir) / CONFIG_FILE} is inconsistent: its model has {num_classes} classes, its data "
                f"{config['data']['num_classes']}"
            )
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if not args.quick:
        args.attacks = args.attacks or list(DEFAULT_ATTACKS)
        return args
    args.attacks = args.attacks or list(QUICK_ATTACKS)
    args.sweep_eps = [] if args.sweep_eps is None else args.sweep_eps
    args.output = args.output or str(Path(args.run_dir) / QUICK_FILE)
    if args.n_examples is None:
        size = split_size(args.run_dir, args.split)
        args.n_examples = None if size <= QUICK_EXAMPLES else QUICK_EXAMPLES
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return evaluate_run(args.run_dir, output=args.output, **evaluation_kwargs(args))


if __name__ == "__main__":
    main()
