"""AWP: adversarial weight perturbation on top of PGD-AT or TRADES (Wu, Xia & Wang, NeurIPS 2020).

For every batch (x, y):
    1. x_adv from the base method's attack at the weights w (PGD-AT: PGD_K(CE) from a uniform start;
       TRADES: KL ascent from x + 0.001 * N(0, I));
    2. v_l = d_l * ||w_l|| / ||d_l|| for every weight tensor l with more than one dimension, d = one SGD
       step (lr 0.01) ascending the base loss on x_adv (train mode); w <- w + gamma * v;
    3. the base loss at w + gamma * v, one backward, one optimizer step;
    4. w <- w - gamma * v.
No perturbation during the first --warmup-epochs epochs (TRADES base: 10, at most half of --epochs).

Cost per step: PGD-AT base K + 2 forwards and K + 2 backwards; TRADES base K + 5 and K + 4.

    python recipes/awp.py                                  # AT-AWP, digits preset, a few minutes on a CPU
    accelerate launch recipes/awp.py --preset cifar10-resnet18
    accelerate launch recipes/awp.py --preset cifar10-resnet18 --base trades
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix import AdversarialCE, PGDAttack
from robustmix.cli.args import nonnegative_int, nonnegative_number
from robustmix.cli.presets import PAPER_PRESET
from robustmix.cli.recipe import RecipeInfo, base_parser, parse_args, run_recipe
from robustmix.core.callbacks import Callback
from robustmix.methods.awp import AWP
from robustmix.stages.losses import TRADESLoss

NAME = "awp"
#: --preset cifar10-paper: the AT-AWP release (csdongxian/AWP, on Rice et al.'s loop): 200 epochs, lr 0.1
#: divided by 10 at epochs 100 and 150, weight decay 5e-4, momentum 0.9, batch 128, PGD-10 at 2/255 within
#: 8/255, gamma 0.01 (trades_AWP drops the lr one epoch earlier, from the 100th counted from 1).
PAPER = {"epochs": 200, "milestones": [100, 150]}
#: The released code's settings for each base method: gamma, warm-up epochs (of 200).
RELEASED = {"at": (0.01, 0), "trades": (0.005, 10)}
#: Flag defaults that depend on --base; the warm-up is capped at half the epochs so short runs perturb too.
DEFAULTS = {
    "gamma": lambda args: RELEASED[args.base][0],
    "warmup_epochs": lambda args: min(RELEASED[args.base][1], args.epochs // 2),
    # Under --preset cifar10-paper the release's mode: AT-AWP attacks in train mode (Rice et al.'s loop),
    # trades_AWP/train_trades_cifar.py in eval mode; otherwise eval, as every recipe.
    "attack_bn_mode": lambda args: "train" if args.preset == PAPER_PRESET and args.base == "at" else "eval",
}


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    if args.base == "at":
        return [
            PGDAttack(args.eps, args.step_size, args.attack_steps, bn_mode=args.attack_bn_mode),  # 1. x_adv
            AWP(args.gamma, warmup_epochs=args.warmup_epochs),  # 2. w + gamma * v (4. removal after the step)
            AdversarialCE(),  # 3. loss
        ]
    return [
        PGDAttack(
            args.eps, args.step_size, args.attack_steps, loss="kl", start="normal", bn_mode=args.attack_bn_mode
        ),  # 1. x_adv
        AWP(args.gamma, warmup_epochs=args.warmup_epochs, loss="trades", beta=args.beta),  # 2. (4.)
        TRADESLoss(args.beta),  # 3. loss
    ]


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    p = base_parser(NAME, __doc__)
    add = p.add_argument
    add("--base", choices=sorted(RELEASED), default="at", help="base method (default: at, i.e. PGD-AT)")
    add("--gamma", type=nonnegative_number, help="relative weight perturbation (default: 0.01 at, 0.005 trades)")
    add("--warmup-epochs", type=nonnegative_int, help="unperturbed epochs (default: 0 at, 10 trades, at most half)")
    add("--beta", type=nonnegative_number, default=6.0, help="TRADES' KL weight, --base trades (default: 6)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv, recipe_defaults=DEFAULTS, paper=PAPER)
    if args.warmup_epochs >= args.epochs:
        p.error(f"--warmup-epochs {args.warmup_epochs} leaves no AWP epoch out of --epochs {args.epochs}")
    return run_recipe(args, build_callbacks)


if __name__ == "__main__":
    main()
