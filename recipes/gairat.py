"""GAIRAT: geometry-aware instance-reweighted adversarial training (Zhang et al., ICLR 2021).

For every batch (x, y):
    1. x_adv = PGD_K(CE) from a uniform start in B(x, eps), BatchNorm in eval mode; while attacking,
       kappa_i counts the iterates still classified correctly (read from the attack's own logits);
    2. w_i = (1 + tanh(lam + 5 (1 - 2 kappa_i / K))) / 2   (Tanh; or Sigmoid / Discrete), batch mean 1;
    3. loss = mean_i w_i CE(f(x_adv_i), y_i).
Before the burn-in epoch lam = +inf: plain PGD-AT (the released code: 60 of 120 epochs, its lr's first
drop; here the first drop under --schedule multistep, e.g. the CIFAR-10 preset, else half of --epochs).

Cost per step: K + 1 forwards and K + 1 backwards, the same as PGD-AT.

    python recipes/gairat.py                               # digits preset
    accelerate launch recipes/gairat.py --preset cifar10-resnet18
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from robustmix import AdversarialCE, PGDAttack
from robustmix.cli.args import epoch_or_first_decay, number
from robustmix.cli.optim import start_epoch
from robustmix.cli.recipe import RecipeInfo, base_parser, parse_args, run_recipe
from robustmix.core.callbacks import Callback
from robustmix.methods.gairat import GAIRAT_KINDS, LAMBDA_SCHEDULES, ScheduledGAIRATWeights

NAME = "gairat"
#: --preset cifar10-paper: the release (zjfheart/Geometry-aware-Instance-reweighted-Adversarial-Training,
#: GAIRAT.py, its 120-epoch "piecewise" schedule): lr 0.1 divided by 10 from the 60th epoch and by 100 from the
#: 90th (its last piece, lr / 200 from the 110th, is not a x0.1 step and is left out), weight decay 2e-4,
#: momentum 0.9, batch 128, PGD-10 at 0.007 within 0.031; weights from the 60th epoch, the first drop (the
#: default burn-in under it).
PAPER = {"epochs": 120, "milestones": [59, 89], "weight_decay": 2e-4, "eps": 0.031, "step_size": 0.007}


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    burn_in = start_epoch(args, args.burn_in, args.epochs // 2)
    return [
        PGDAttack(
            args.eps, args.step_size, args.attack_steps, track_kappa=True, bn_mode=args.attack_bn_mode
        ),  # 1. x_adv, kappa
        ScheduledGAIRATWeights(  # 2. w
            args.attack_steps, args.lam, args.weight_kind, burn_in, schedule=args.lam_schedule, lam_max=args.lam_max
        ),
        AdversarialCE(),  # 3. loss
    ]


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    p = base_parser(NAME, __doc__)
    add = p.add_argument
    add("--lam", type=number, default=-1.0, help="lambda after the burn-in (default -1)")
    add("--weight-kind", choices=GAIRAT_KINDS, default="tanh", help="weight curve (default tanh)")
    add("--lam-schedule", choices=LAMBDA_SCHEDULES, default="fixed", help="lambda after the burn-in")
    add("--lam-max", type=number, default=math.inf, help="start of the linear lambda schedule")
    add(
        "--burn-in", type=epoch_or_first_decay,
        help="epochs of plain PGD-AT first, or first-decay: until the lr's first drop (default: first-decay under "
        "--schedule multistep, as released: begin_epoch 60 is the first drop of its 120 epochs; otherwise half of "
        "--epochs)",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv, paper=PAPER)
    if args.attack_steps < 1:
        p.error("GAIRAT needs --attack-steps >= 1 (kappa counts attack iterations)")
    try:
        start_epoch(args, args.burn_in, args.epochs // 2)
    except ValueError as err:
        p.error(f"--burn-in: {err}")
    return run_recipe(args, build_callbacks)


if __name__ == "__main__":
    main()
