"""ADA-Lab: the adversary's adversary for label adjustment (Kim, Jung & Song, Neurocomputing 2026).

Only the paper's abstract was available; steps 2-7 are robustmix's reconstruction of its design
(docs/methods/adalab.md says which part is which). For every batch (x, y):
    1. x_adv = PGD_K(CE) from a uniform start in B(x, eps), BatchNorm in eval mode;
    2. x_aa  = K_aa projected descent steps on CE(f(.), y) from x_adv, inside B(x, eps)
       (the adversary's adversary: the gradient-descent direction at the adversarial input);
    3. m     = margin of each example from the detached training logits f(x_adv) (no extra pass);
    4. lam   = lam_max * (1 - m) / 2, clipped to [0, lam_max]: low margin -> more interpolation;
    5. y~    = (1 - lam) onehot(y) + lam softmax(f(x_aa) / T)      (eval-mode forward, detached);
    6. w     = sigmoid(-m - 1.5) (MAIL's curve, about 5:1 from m = -1 to +1), normalized to batch mean 1;
    7. loss  = mean_i w_i CE_soft(f(x_adv_i), y~_i).
Before the burn-in epoch, plain PGD-AT (steps 2-6 off, at no cost). The defaults are the reading chosen on
Fashion-MNIST's validation split (3 seeds); the first reading differs only in step 6 (--weighting adalab).

Other readings of the abstract, each a flag:
    --aa-until-recovered   step 2 stops each example once argmax f(x_aa) = y (at most K_aa steps, every
                           example still forwarded at every step); --no-aa-project drops the ball:
                           x_aa stays in [0, 1], within eps + K_aa * a_aa of x
    --target floor         y~_y = max(1 - lam, p_y(x_aa)), the rest spread like p(x_aa) over k != y
    --target keep-true     step 5 with lam * p_y(x_aa) in place of lam: y~_y >= 1 - lam / 4
    --target direction     y~ = Proj_simplex(onehot(y) + lam (p(x_aa) - p(x_adv)))   (eval-mode p(x_adv))
    --weighting adalab     the first reading: w = 1 + tanh(c (0.5 - (1 + m) / 2)) (c = 5: about 148:1,
                           GAIRAT-sharp); --weighting none: no weights (the soft label alone sets the
                           gradient, dCE/dz = p - y~)
    --margin-at clean      m from the eval-mode logits of x; --margin aa-steps: from the descent steps
                           x_aa needed (1 - 2 n / (K_aa + 1)); --logit-scale S: --margin logit as tanh(m / S)
    --target-source adv|clean   the ablation: p(x_adv) or p(x) in place of p(x_aa), no descent
    --base trades          TRADES' attack and loss, its clean CE term against y~, w on its KL term

Cost per step after burn-in, forwards / backwards (K = 5, K_aa = 1: the digits preset):
    default, --target floor or keep-true, any --weighting   K + K_aa + 2 / K + K_aa + 1   (8 / 7)
    --aa-until-recovered (K_aa the most), --margin aa-steps  K + K_aa + 2 / K + K_aa + 1   (8 / 7)
    --target direction, or --margin-at clean: each           one more forward              (9 / 7)
    --target-source adv or clean                             K + 2 / K + 1                 (7 / 6)
    --base trades                                            K + K_aa + 4 / K + K_aa + 2   (10 / 8)
During the burn-in: PGD-AT's K + 1 / K + 1 (TRADES' K + 3 / K + 2), one more forward with --margin-at
clean on the PGD-AT base. docs/methods/adalab.md has the full table.

    python recipes/adalab.py                               # digits preset, a few minutes on a CPU
    accelerate launch recipes/adalab.py --preset cifar10-resnet18
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix import AdversarialCE, PGDAttack
from robustmix.cli.args import bounded, nonnegative_int, nonnegative_number, number, positive_number
from robustmix.cli.recipe import RecipeInfo, base_parser, parse_args, run_recipe
from robustmix.core.callbacks import Callback
from robustmix.stages.anti import AdversarysAdversary
from robustmix.stages.labels import TARGETS, AdaLabLabels
from robustmix.stages.losses import TRADESLoss
from robustmix.stages.margins import KappaMargin, LogitMargin, ProbabilityMargin, RecoveryMargin
from robustmix.stages.weights import AdaLabWeights, MAILWeights

NAME = "adalab"
MARGINS = ("probability", "logit", "kappa", "aa-steps")
MARGIN_INPUTS = ("adv", "clean")
WEIGHTINGS = ("adalab", "mail", "none")
#: --target-source: the input whose prediction the label is built from (the context's input names).
TARGET_SOURCES = {"aa": "anti", "adv": "adv", "clean": "clean"}
BASES = ("at", "trades")
#: TRADES' beta when --base trades is given without --beta (recipes/trades.py's default).
DEFAULT_BETA = 6.0
#: c of --weighting adalab when --importance-c is not given.
DEFAULT_C = 5.0
#: What results.py reads a recorded flag as when it was not given: runs from before --weighting mail became
#: the default recorded c = 5 beside every weighting (unused but by adalab's).
DERIVED_FLAGS = {"importance_c": lambda args: DEFAULT_C}


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    burn_in = args.burn_in if args.burn_in is not None else args.epochs // 3
    kappa = args.margin == "kappa"
    if args.base == "at":
        attack = PGDAttack(args.eps, args.step_size, args.attack_steps, track_kappa=kappa, bn_mode=args.attack_bn_mode)
        loss: Callback = AdversarialCE()
    else:
        attack = PGDAttack(
            args.eps, args.step_size, args.attack_steps, loss="kl", start="normal", track_kappa=kappa,
            bn_mode=args.attack_bn_mode,
        )  # fmt: skip
        loss = TRADESLoss(args.beta)
    at_clean = args.margin_at == "clean"  # the eval-mode logits of x; at x_adv the training logits
    margin = {
        "probability": lambda: ProbabilityMargin(args.margin_at, eval_mode=at_clean),
        "logit": lambda: LogitMargin(args.margin_at, scale=args.logit_scale, eval_mode=at_clean),
        "kappa": lambda: KappaMargin(args.attack_steps),
        "aa-steps": lambda: RecoveryMargin(args.aa_steps),
    }[args.margin]()
    source = TARGET_SOURCES[args.target_source]
    labels = AdaLabLabels(args.lam_max, args.temperature, burn_in_epochs=burn_in, target=args.target, source=source)
    callbacks = [attack]  # 1. x_adv
    if source == "anti":
        callbacks.append(  # 2. x_aa
            AdversarysAdversary(
                args.aa_steps, args.aa_step_size, burn_in_epochs=burn_in, until_recovered=args.aa_until_recovered,
                project=args.aa_project,
            )
        )  # fmt: skip
    callbacks += [
        margin,  # 3. m
        labels,  # 4.-5. lam, y~
        loss,  # 7. loss
    ]
    if args.weighting == "adalab":
        callbacks.append(AdaLabWeights(args.importance_c, burn_in_epochs=burn_in))  # 6. w
    elif args.weighting == "mail":
        callbacks.append(MAILWeights(burn_in_epochs=burn_in))  # 6. w
    return callbacks


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    p = base_parser(NAME, __doc__)
    add = p.add_argument
    add("--aa-steps", type=nonnegative_int, default=1, help="descent steps K_aa of x_aa (default: 1)")
    add("--aa-step-size", type=positive_number, help="its step in pixels (default: eps / 2)")
    add(
        "--aa-until-recovered", action=argparse.BooleanOptionalAction, default=False,
        help="stop each example once argmax f(x_aa) = y, at most --aa-steps steps (default: off)",
    )  # fmt: skip
    add(
        "--aa-project", action=argparse.BooleanOptionalAction, default=True,
        help="project x_aa onto B(x, eps); without, [0, 1] only (within eps + K_aa * step of x) (default: on)",
    )  # fmt: skip
    add("--margin", choices=MARGINS, default="probability", help="margin estimator (default: probability)")
    add(
        "--margin-at", choices=MARGIN_INPUTS, default="adv",
        help="input of the probability or logit margin: adv (training logits, no pass) or clean (eval-mode "
        "logits, one forward) (default: adv)",
    )  # fmt: skip
    add("--logit-scale", type=positive_number, help="--margin logit as tanh(m / scale) (default: raw logit margin)")
    add("--target", choices=TARGETS, default="interpolate", help="form of the refined label (default: interpolate)")
    add(
        "--target-source", choices=tuple(TARGET_SOURCES), default="aa",
        help="prediction the label is built from: aa (x_aa), adv (x_adv) or clean (x) (default: aa)",
    )  # fmt: skip
    add("--lam-max", type=bounded(number, 0), default=0.5, help="largest interpolation, in [0, 1] (default: 0.5)")
    add("--temperature", type=positive_number, default=1.0, help="softmax temperature T of the label (default: 1)")
    add("--burn-in", type=nonnegative_int, help="epochs of plain PGD-AT first (default: a third of --epochs)")
    add(
        "--weighting", choices=WEIGHTINGS, default="mail",
        help="importance weights: MAIL's curve, adalab (sharpness c) or none (default: mail)",
    )  # fmt: skip
    add("--importance-c", type=bounded(number, 0), help=f"c of --weighting adalab (default: {DEFAULT_C:g})")
    add("--base", choices=BASES, default="at", help="PGD-AT's attack and loss, or TRADES' (default: at)")
    add("--beta", type=nonnegative_number, help=f"TRADES' KL weight, with --base trades (default: {DEFAULT_BETA:g})")
    return p


def _check_readings(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors for flag combinations that cannot run or would silently mean something else."""
    descent_flags = [
        flag
        for flag, given in (
            ("--aa-steps", args.aa_steps != p.get_default("aa_steps")),
            ("--aa-step-size", args.aa_step_size is not None),
            ("--aa-until-recovered", args.aa_until_recovered),
            ("--no-aa-project", not args.aa_project),
        )
        if given
    ]
    if args.target_source != "aa" and descent_flags:
        p.error(f"{', '.join(descent_flags)} set the adversary's adversary; --target-source {args.target_source} "
                "computes none")  # fmt: skip
    if args.aa_until_recovered and args.aa_steps < 1:
        p.error("--aa-until-recovered needs --aa-steps >= 1")
    if args.margin == "aa-steps" and not args.aa_until_recovered:
        p.error("--margin aa-steps counts the steps of --aa-until-recovered; add it")
    if args.margin_at == "clean" and args.margin not in ("probability", "logit"):
        p.error(f"--margin-at applies to the probability and logit margins, not --margin {args.margin}")
    if args.logit_scale is not None and args.margin != "logit":
        p.error("--logit-scale applies to --margin logit")
    if args.target == "direction" and args.target_source == "adv":
        p.error("--target direction with --target-source adv is the one-hot label: p(x_adv) - p(x_adv) = 0")
    if args.base == "at" and args.beta is not None:
        p.error("--beta applies to --base trades")
    if args.importance_c is not None and args.weighting != "adalab":
        p.error(f"--importance-c applies to --weighting adalab, not --weighting {args.weighting}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv)
    if args.lam_max > 1:
        p.error(f"--lam-max must be in [0, 1], got {args.lam_max}")
    if args.burn_in is not None and args.burn_in >= args.epochs:
        p.error(f"--burn-in {args.burn_in} leaves no ADA-Lab epoch out of --epochs {args.epochs}")
    _check_readings(p, args)
    if args.base == "trades" and args.beta is None:
        args.beta = DEFAULT_BETA
    if args.weighting == "adalab" and args.importance_c is None:
        args.importance_c = DEFAULT_C
    return run_recipe(args, build_callbacks)


if __name__ == "__main__":
    main()
