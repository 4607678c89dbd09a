"""ADA-Lab: the adversary's adversary for label adjustment (Kim, Jung & Song, Neurocomputing 2026).

Only the paper's abstract was available; steps 2-7 are robustmix's reconstruction of its design
(docs/methods/adalab.md says which part is which). For every batch (x, y):
    1. x_adv = PGD_K(CE) from a uniform start in B(x, eps), BatchNorm in eval mode;
    2. x_aa  = K_aa projected descent steps on CE(f(.), y) from x_adv, inside B(x, eps)
       (the adversary's adversary: the gradient-descent direction at the adversarial input);
    3. m     = margin of each example from the detached training logits f(x_adv) (no extra pass);
    4. lam   = lam_max * (1 - m) / 2, clipped to [0, lam_max]: low margin -> more interpolation;
    5. y~    = (1 - lam) onehot(y) + lam softmax(f(x_aa) / T)      (eval-mode forward, detached);
    6. w     = 1 + tanh(c (0.5 - (1 + m) / 2)), normalized to batch mean 1;
    7. loss  = mean_i w_i CE_soft(f(x_adv_i), y~_i).
Before the burn-in epoch, plain PGD-AT (steps 2-6 off, at no cost).

Cost per step after burn-in: K + K_aa + 2 forwards, K + K_aa + 1 backwards (K=5, K_aa=1: 8 and 7).

    python recipes/adalab.py                               # digits preset, a few minutes on a CPU
    accelerate launch recipes/adalab.py --preset cifar10-resnet18
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix import AdversarialCE, PGDAttack
from robustmix.anti import AdversarysAdversary
from robustmix.callbacks import Callback
from robustmix.labels import AdaLabLabels
from robustmix.margins import KappaMargin, LogitMargin, ProbabilityMargin
from robustmix.recipe import (
    RecipeInfo,
    _bounded,
    base_parser,
    nonnegative_int,
    number,
    parse_args,
    positive_number,
    run_recipe,
)
from robustmix.weights import AdaLabWeights

NAME = "adalab"
MARGINS = ("probability", "logit", "kappa")
WEIGHTINGS = ("adalab", "none")


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    burn_in = args.burn_in if args.burn_in is not None else args.epochs // 3
    kappa = args.margin == "kappa"
    margin = {
        "probability": ProbabilityMargin(),
        "logit": LogitMargin(),
        "kappa": KappaMargin(args.attack_steps),
    }[args.margin]
    callbacks = [
        PGDAttack(args.eps, args.step_size, args.attack_steps, track_kappa=kappa),  # 1. x_adv
        AdversarysAdversary(args.aa_steps, args.aa_step_size, burn_in_epochs=burn_in),  # 2. x_aa
        margin,  # 3. m
        AdaLabLabels(args.lam_max, args.temperature, burn_in_epochs=burn_in),  # 4.-5. lam, y~
        AdversarialCE(),  # 7. loss
    ]
    if args.weighting == "adalab":
        callbacks.append(AdaLabWeights(args.importance_c, burn_in_epochs=burn_in))  # 6. w
    return callbacks


def parser() -> argparse.ArgumentParser:
    p = base_parser(NAME, __doc__)
    add = p.add_argument
    add("--aa-steps", type=nonnegative_int, default=1, help="descent steps K_aa of the adversary's adversary")
    add("--aa-step-size", type=positive_number, help="its step in pixels (default: eps / 2)")
    add("--margin", choices=MARGINS, default="probability", help="margin estimator (default: probability)")
    add("--lam-max", type=_bounded(number, 0), default=0.5, help="largest label interpolation, in [0, 1]")
    add("--temperature", type=positive_number, default=1.0, help="softmax temperature T of p(x_aa)")
    add("--burn-in", type=nonnegative_int, help="epochs of plain PGD-AT first (default: a third of --epochs)")
    add("--weighting", choices=WEIGHTINGS, default="adalab", help="importance weights (default: adalab)")
    add("--importance-c", type=_bounded(number, 0), default=5.0, help="sharpness c of the importance weights")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv)
    if args.lam_max > 1:
        p.error(f"--lam-max must be in [0, 1], got {args.lam_max}")
    if args.burn_in is not None and args.burn_in >= args.epochs:
        p.error(f"--burn-in {args.burn_in} leaves no ADA-Lab epoch out of --epochs {args.epochs}")
    return run_recipe(args, build_callbacks)


if __name__ == "__main__":
    main()
