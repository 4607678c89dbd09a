"""TRADES: clean cross-entropy plus beta times the clean-to-adversarial KL (Zhang et al., ICML 2019).

For every batch (x, y):
    1. x_adv = K signed steps ascending KL(p(x) || p(x')) from x + 0.001 * N(0, I), projected to B(x, eps),
       BatchNorm in eval mode (p(x) from one eval-mode forward of the clean batch);
    2. loss = CE(f(x), y) + beta * mean_i KL(p(x_i) || p(x_adv_i)), clean and adversarial forwards in
       train mode, p(x) not detached, one backward.

Cost per step: K + 3 forwards and K + 2 backwards.

    python recipes/trades.py                               # digits preset, a few minutes on a CPU
    accelerate launch recipes/trades.py --preset cifar10-resnet18 --beta 6
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix import PGDAttack
from robustmix.cli.args import nonnegative_number
from robustmix.cli.recipe import RecipeInfo, base_parser, parse_args, run_recipe
from robustmix.core.callbacks import Callback
from robustmix.stages.losses import TRADESLoss

NAME = "trades"
#: --preset cifar10-paper: the release (yaodongyu/TRADES, train_trades_cifar10.py): 76 epochs, lr 0.1 divided by
#: 10 from epoch 75 (counted from 1), weight decay 2e-4, momentum 0.9, batch 128, 10 KL steps of 0.007 within
#: 0.031, beta 6.
PAPER = {"epochs": 76, "milestones": [74], "weight_decay": 2e-4, "eps": 0.031, "step_size": 0.007}


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    return [
        PGDAttack(
            args.eps, args.step_size, args.attack_steps, loss="kl", start="normal", bn_mode=args.attack_bn_mode
        ),  # 1. x_adv
        TRADESLoss(args.beta),  # 2. loss
    ]


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    p = base_parser(NAME, __doc__)
    p.add_argument("--beta", type=nonnegative_number, default=6.0, help="weight of the KL term (default: 6)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv, paper=PAPER)
    return run_recipe(args, build_callbacks)


if __name__ == "__main__":
    main()
