"""MAIL: margin-aware instance reweighting (Wang et al., NeurIPS 2021) on AT, TRADES or MART, as released.

For every batch (x, y):
    1. x_adv = PGD_K from x + 0.001 * N(0, I) (AT and MART: CE; TRADES: KL), projected to B(x, eps),
       BatchNorm in eval mode;
    2. PM_i = max_{k != y} p_k(x_adv_i) - p_y(x_adv_i) from the detached training logits (no extra pass);
    3. w_i  = 3 * sigmoid(slope (PM_i + bias)), not normalized (about 0.23 to 1.13 at the defaults), so the
       weights also scale the loss; --normalize-weights scales them to batch mean 1 instead;
    4. loss = the base method's loss with w on its adversarial term: AT's CE, TRADES' KL, MART's BCE.
Before the burn-in epoch the weights are ones: the plain base method (the released code: 76 of 120 epochs,
one epoch after its lr's first drop; here the same under --schedule multistep, else that share of --epochs).
docs/methods/mail.md: what follows the released code, and where.

Cost per step: the base method's (AT: K + 1 / K + 1; TRADES: K + 3 / K + 2; MART: K + 2 / K + 2).

    python recipes/mail.py                                 # MAIL-AT, digits preset
    python recipes/mail.py --base trades --beta 6
    accelerate launch recipes/mail.py --preset cifar10-resnet18 --base trades
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix import AdversarialCE, MAILWeights, PGDAttack, ProbabilityMargin
from robustmix.cli.args import epoch_or_first_decay, nonnegative_number, number
from robustmix.cli.optim import start_epoch
from robustmix.cli.recipe import RecipeInfo, base_parser, parse_args, run_recipe
from robustmix.core.callbacks import Callback
from robustmix.stages.losses import MARTLoss, TRADESLoss

NAME = "mail"
#: --preset cifar10-paper: the release (QizhouWang/MAIL, train.py lines 24-45, 121-131, 199): 120 epochs, lr 0.01
#: divided by 10 from epochs 75, 90 and 100 (counted from 0), weight decay 3.5e-3, momentum 0.9, batch 128, 10
#: steps of 0.007 within 0.031; MAIL from epoch 76, one after the first drop (the default burn-in under it).
PAPER = {
    "epochs": 120, "milestones": [75, 90, 100], "lr": 0.01, "weight_decay": 3.5e-3, "eps": 0.031, "step_size": 0.007
}  # fmt: skip
BASES = ("at", "trades", "mart")
#: The base method's KL/boost weight beta when --beta is not given (TRADES 6, MART 5; AT has none).
DEFAULT_BETA = {"trades": 6.0, "mart": 5.0}
#: The released schedule: the base method for epochs 0-75 of 120 (``epoch <= 75``), MAIL from epoch 76.
BURN_IN, RELEASED_EPOCHS = 76, 120


def burn_in_epochs(args: argparse.Namespace) -> int:
    """``--burn-in``; unset, one epoch after the lr's first drop under a multistep schedule (as released: the
    drop at epoch 75, MAIL from 76), else the released schedule's share (76 of 120 epochs) of ``--epochs``."""
    return start_epoch(args, args.burn_in, (args.epochs * BURN_IN) // RELEASED_EPOCHS, after_decay=1)


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    pgd = dict(
        eps=args.eps, step_size=args.step_size, steps=args.attack_steps, start="normal", bn_mode=args.attack_bn_mode
    )
    if args.base == "at":
        attack, loss = PGDAttack(**pgd), AdversarialCE()
    elif args.base == "trades":
        attack, loss = PGDAttack(**pgd, loss="kl"), TRADESLoss(args.beta)
    else:
        attack, loss = PGDAttack(**pgd), MARTLoss(args.beta)
    return [
        attack,  # 1. x_adv
        ProbabilityMargin(),  # 2. margin = -PM
        MAILWeights(args.bias, args.slope, burn_in_epochs(args), normalize=args.normalize_weights),  # 3. w
        loss,  # 4. loss
    ]


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    p = base_parser(NAME, __doc__)
    add = p.add_argument
    add("--base", choices=BASES, default="at", help="the method MAIL reweights (default: at)")
    add("--beta", type=nonnegative_number, help="TRADES/MART term weight (default: 6 for trades, 5 for mart)")
    add("--bias", type=number, default=-1.5, help="sigmoid bias b (default -1.5)")
    add("--slope", type=nonnegative_number, default=1.0, help="sigmoid slope s (default 1)")
    add(
        "--burn-in", type=epoch_or_first_decay,
        help="epochs of the plain base method first, or first-decay: until the lr's first drop (default: under "
        "--schedule multistep one epoch after the first drop, as released; otherwise 76/120 of --epochs)",
    )  # fmt: skip
    add(
        "--normalize-weights", action=argparse.BooleanOptionalAction, default=False,
        help="scale the weights to batch mean 1 (robustmix's reweighters) instead of the released 3 * sigmoid, "
        "which also scales the loss",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv, paper=PAPER)
    if args.base == "at":
        if args.beta is not None:
            p.error("--beta applies to --base trades or mart, not at")
    elif args.beta is None:
        args.beta = DEFAULT_BETA[args.base]
    try:
        burn_in_epochs(args)
    except ValueError as err:
        p.error(f"--burn-in: {err}")
    return run_recipe(args, build_callbacks)


if __name__ == "__main__":
    main()
