"""PGD-AT: adversarial training with projected gradient descent (Madry et al., ICLR 2018).

For every batch (x, y):
    1. x_adv = PGD_K(CE) from a uniform random start in the L-inf ball B(x, eps), steps of step_size,
       BatchNorm in eval mode during the attack (--attack-bn-mode train: batch statistics, as in Rice et
       al.'s release and under --preset cifar10-paper);
    2. loss = CE(f(x_adv), y), one backward, one optimizer step.

Cost per step: K + 1 forwards and K + 1 backwards.

    python recipes/pgd_at.py                               # digits preset, a few minutes on a CPU
    accelerate launch recipes/pgd_at.py --preset cifar10-resnet18
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix import AdversarialCE, PGDAttack
from robustmix.cli.recipe import RecipeInfo, base_parser, parse_args, run_recipe
from robustmix.core.callbacks import Callback

NAME = "pgd_at"
#: --preset cifar10-paper: Rice, Wong & Kolter's release (locuslab/robust_overfitting, train_cifar.py): 200
#: epochs, lr 0.1 divided by 10 at epochs 100 and 150, SGD momentum 0.9, weight decay 5e-4, batch 128, PGD-10
#: at 2/255 within 8/255, attacking the model in train mode (model.train() for the whole epoch).
PAPER = {"epochs": 200, "milestones": [100, 150], "attack_bn_mode": "train"}


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    return [
        PGDAttack(args.eps, args.step_size, args.attack_steps, bn_mode=args.attack_bn_mode),  # 1. x_adv = PGD_K(CE)
        AdversarialCE(),  # 2. loss = CE(f(x_adv), y)
    ]


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    return base_parser(NAME, __doc__)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(parser(), argv, paper=PAPER)
    return run_recipe(args, build_callbacks)


if __name__ == "__main__":
    main()
