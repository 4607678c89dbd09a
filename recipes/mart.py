"""MART: misclassification-aware adversarial training (Wang et al., ICLR 2020).

For every batch (x, y):
    1. x_adv = PGD_K(CE) from x + 0.001 * N(0, I), projected to B(x, eps), BatchNorm in eval mode;
    2. loss = mean_i BCE_i + beta * mean_i KL(p(x_i) || p(x_adv_i)) * (1 - p_y(x_i)), with
       BCE_i = CE(f(x_adv_i), y_i) - log(1.0001 - max_{k != y} p_k(x_adv_i) + 1e-12), the constants of the
       released code; clean and adversarial forwards in train mode, nothing detached, one backward.

Cost per step: K + 2 forwards and K + 2 backwards. The released ResNet-18 setting also uses
--lr 0.01 --weight-decay 3.5e-3.

    python recipes/mart.py                                 # digits preset, a few minutes on a CPU
    accelerate launch recipes/mart.py --preset cifar10-resnet18 --beta 5 --lr 0.01 --weight-decay 3.5e-3
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix import PGDAttack
from robustmix.cli.args import nonnegative_number
from robustmix.cli.recipe import RecipeInfo, base_parser, parse_args, run_recipe
from robustmix.core.callbacks import Callback
from robustmix.stages.losses import MARTLoss

NAME = "mart"
#: --preset cifar10-paper: the release (YisenWang/MART, train_resnet.py, ResNet-18): 120 epochs, lr 0.01 divided
#: by 10 from epochs 75, 90 and 100 (counted from 1), weight decay 3.5e-3, momentum 0.9, batch 128, PGD-10 at
#: 0.007 within 0.031, beta 5.
PAPER = {
    "epochs": 120, "milestones": [74, 89, 99], "lr": 0.01, "weight_decay": 3.5e-3, "eps": 0.031, "step_size": 0.007
}  # fmt: skip


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    return [
        PGDAttack(
            args.eps, args.step_size, args.attack_steps, start="normal", bn_mode=args.attack_bn_mode
        ),  # 1. x_adv
        MARTLoss(args.beta),  # 2. loss
    ]


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    p = base_parser(NAME, __doc__)
    p.add_argument("--beta", type=nonnegative_number, default=5.0, help="weight of the KL term (default: 5)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv, paper=PAPER)
    return run_recipe(args, build_callbacks)


if __name__ == "__main__":
    main()
