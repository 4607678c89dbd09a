"""The command-line flags that choose an evaluation: ``add_evaluation_flags`` adds those of
``robustmix.evaluation.run.evaluate_run`` to a parser, ``evaluation_kwargs`` reads them back.

recipes/evaluate.py and recipes/results.py share them, so one protocol is spelled the same way everywhere.
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix.cli.args import nonnegative_int, nonnegative_number, positive_int
from robustmix.core.step import MIXED_PRECISION
from robustmix.data import SPLITS
from robustmix.evaluation.attacks import ATTACKS, DEFAULT_ATTACKS
from robustmix.evaluation.run import MEMORY_FORMATS
from robustmix.runs.folder import WEIGHTS


def add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags that choose an evaluation (those of ``evaluate_run``) to a command line.

    Values are checked as they are parsed: an unknown attack, a negative eps or a non-positive number of
    examples ends the program with a one-line message before any work. Read them back with
    ``evaluation_kwargs``.
    """
    add = parser.add_argument
    add(
        "--attacks",
        nargs="+",
        choices=sorted(ATTACKS),
        default=list(DEFAULT_ATTACKS),
        metavar="ATTACK",
        help=f"attacks in order (default: {' '.join(DEFAULT_ATTACKS)}; choices: {', '.join(sorted(ATTACKS))})",
    )
    add("--eps", type=_eps_flag, help="L-inf radius in pixels in [0, 1], e.g. 8/255 (default: the run's)")
    add("--n-examples", type=positive_int, help="evaluate the first N examples of the split (default: all)")
    add(
        "--split", choices=SPLITS, default="test",
        help="data split, made as in training: train is the subset a --train-size run trained on (default: test)",
    )  # fmt: skip
    add(
        "--weights", choices=tuple(WEIGHTS), default="final",
        help="final weights, the best checkpoint, or the moving average of a run trained with --ema",
    )  # fmt: skip
    add("--batch-size", type=positive_int, default=256, help="examples per chunk and attack call (default: 256)")
    add("--seed", type=nonnegative_int, default=0, help="seed of the attacks (default: 0)")
    add(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        default="no",
        help="autocast of the attacks; decisions stay fp32 (default: no)",
    )
    add(
        "--memory-format", choices=MEMORY_FORMATS, default="auto",
        help="the model's memory format; auto: channels_last on a CPU (faster there), contiguous elsewhere; the "
        "numbers agree up to float rounding (default: auto)",
    )  # fmt: skip
    # Two flags, not a bare `--sweep-eps` meaning "none": reading the command must tell whether a sweep ran.
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument(
        "--sweep-eps",
        type=_eps_flag,
        nargs="+",
        metavar="EPS",
        help="radii of the eps sweep (default: 0, 0.5, 1, 2, 4 and 8 times eps, capped at 1)",
    )
    sweep.add_argument(
        "--no-sweep",
        dest="sweep_eps",
        action="store_const",
        const=[],
        help="skip the eps sweep (and with it the sanity check at a large eps)",
    )
    add("--no-plots", dest="plots", action="store_false", help="write no PNG plots")
    add("--no-progress", dest="progress", action="store_false", help="show no progress bar")


def evaluation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``evaluate_run`` from flags added by ``add_evaluation_flags``."""
    keys = ("attacks", "eps", "n_examples", "split", "weights", "batch_size", "seed", "mixed_precision")
    return {key: getattr(args, key) for key in (*keys, "memory_format", "sweep_eps", "plots", "progress")}


def _eps_flag(text: str) -> float:
    """argparse type of an L-inf radius in pixels: a number in [0, 1] (``robustmix.cli.args.number``'s forms)."""
    eps = nonnegative_number(text)
    if eps > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (pixels), got {text}; for 8/255 write 8/255")
    return eps
