"""FGSM-RS, "fast adversarial training" (Wong, Rice & Kolter, ICLR 2020).

For every batch (x, y):
    1. delta ~ Uniform(-eps, eps); x_adv = Proj_B(x, eps)(x + delta + alpha * sign(grad_x CE(f(x + delta), y)))
       with alpha = 1.25 * eps (one FGSM step from a random start, BatchNorm in eval mode);
    2. loss = CE(f(x_adv), y), one backward, one optimizer step.

Cost per step: 2 forwards and 2 backwards (PGD-10 AT costs 11 of each). --step-size overrides alpha;
the attack takes one step, so --attack-steps must stay 1.

    python recipes/fgsm_rs.py
    accelerate launch recipes/fgsm_rs.py --preset cifar10-resnet18
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix import AdversarialCE, FGSMAttack
from robustmix.callbacks import Callback
from robustmix.recipe import RecipeInfo, base_parser, parse_args, run_recipe

NAME = "fgsm_rs"
STEP_SIZE_RATIO = 1.25  # alpha = 1.25 * eps (Wong et al., section 4)
#: What this recipe uses instead of the preset for flags not given on the command line.
DEFAULTS = {"step_size": lambda args: STEP_SIZE_RATIO * args.eps, "attack_steps": 1}


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    return [
        FGSMAttack(args.eps, args.step_size),  # 1. x_adv: one step of alpha from a uniform start
        AdversarialCE(),  # 2. loss = CE(f(x_adv), y)
    ]


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    p = base_parser(NAME, __doc__)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv, recipe_defaults=DEFAULTS)
    if args.attack_steps != 1:
        p.error(f"FGSM-RS takes exactly one attack step, got --attack-steps {args.attack_steps}")
    return run_recipe(args, build_callbacks)


if __name__ == "__main__":
    main()
