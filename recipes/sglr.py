"""SGLR: self-guided label refinement for adversarial training (CVPR 2024; code released as "SGLS").

For every batch (x, y, idx) after the start epoch:
    1. x_adv = PGD_K(CE) from a uniform start in B(x, eps), BatchNorm in eval mode;
    2. S[idx] <- m S[idx] + (1 - m) (0.2 p(x) + 0.8 p(x_adv))   (training-mode predictions, detached;
       S is a per-example soft-label table [N, C], one-hot at first, identical on every process);
    3. y~ = r S[idx] + (1 - r) onehot(y)                          (r = 1: the released code);
    4. loss = mean_i CE_soft(f(x_adv_i), y~_i).
Before the start epoch: plain PGD-AT (the released code starts at 90 of 200 epochs; here at 45% of
--epochs by default).

Cost per step: K + 1 forwards and K + 1 backwards before the start, K + 2 forwards after.

    python recipes/sglr.py                                 # digits preset
    accelerate launch recipes/sglr.py --preset cifar10-resnet18
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix import AdversarialCE, PGDAttack
from robustmix.cli.args import nonnegative_int, number
from robustmix.cli.recipe import RecipeInfo, base_parser, parse_args, run_recipe
from robustmix.core.callbacks import Callback
from robustmix.methods.sglr import SGLRLabels

NAME = "sglr"
#: --preset cifar10-paper: the release's train.py: 200 epochs, lr 0.1 divided by 10 at its --lr-milestones 100 and
#: 150, weight decay 5e-4, momentum 0.9, batch 128, PGD-10 at 2/255 within 8/255; refined labels from epoch 90.
PAPER = {"epochs": 200, "milestones": [100, 150], "start_epoch": 90}


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    start = args.start_epoch if args.start_epoch is not None else round(0.45 * args.epochs)
    rows = int(info.train_data.index.max()) + 1
    return [
        PGDAttack(args.eps, args.step_size, args.attack_steps, bn_mode=args.attack_bn_mode),  # 1. x_adv
        SGLRLabels(  # 2.-3. table update, y~
            rows,
            info.num_classes,
            start_epoch=start,
            momentum=args.momentum_sglr,
            clean_weight=args.clean_weight,
            r=args.r,
        ),
        AdversarialCE(),  # 4. loss
    ]


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    p = base_parser(NAME, __doc__)
    add = p.add_argument
    add("--start-epoch", type=nonnegative_int, help="first epoch of refined labels (default: 45%% of --epochs)")
    add("--momentum-sglr", type=number, default=0.9, help="EMA momentum m of the soft-label table")
    add("--clean-weight", type=number, default=0.2, help="share of p(x) in the table update")
    add("--r", type=number, default=1.0, help="weight of the table row in the target (1: released code)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv, paper=PAPER)
    for flag, value in (
        ("--momentum-sglr", args.momentum_sglr),
        ("--clean-weight", args.clean_weight),
        ("--r", args.r),
    ):
        if not 0 <= value <= 1:
            p.error(f"{flag} must be in [0, 1], got {value}")
    return run_recipe(args, build_callbacks)


if __name__ == "__main__":
    main()
