"""CAAT: combining adversaries with anti-adversaries (Zhou et al., AAAI 2023), as its code was released.

Before every epoch, the first included: per class, the clean and the PGD-20 boundary errors on the meta split set the
class weights w0, w1 and the eps multipliers c (Fair Robust Learning's update; --class-weights none: all 1).
For every batch (x, y):
    1. eps_i = eps * c_{y_i};
    2. x_adv  = PGD_K(KL(p(x) || p(.))) from x + 0.001 N(0, I) in B(x, eps_i), steps of eps/5  (TRADES' attack);
    3. x_anti = K descent steps on CE(f(.), y) from x + 0.001 N(0, I) in B(x, eps_i), steps of eps/5  (anti-adversary);
    4. [alpha_i, beta_i] = softmax(MLP(BN(z_i)) / 0.001) from six detached features z_i of the clean logits;
    5. loss = sum_i alpha_i w0_i CE(f(x_i)) / sum_i w0_i + 1.5 sum_i alpha_i w1_i KL(p(x_i) || p(x_adv_i)) / sum_i w1_i
              + mean_i beta_i CE(f(x_anti_i), y_i);
    6. every --meta-every steps: a virtual SGD step of the model on this loss, then an Adam step (lr 1e-4, weight
       decay 5e-4) of the MLP on the loss of step 5 at alpha = beta = 1 of the virtual model on a meta batch held out
       of the training split, with the meta batch's own x_adv and x_anti (--meta-objective clean: its clean CE).

The released code fine-tunes an adversarially trained model (hot start) at lr 1e-3 for 40 epochs, the last at 1e-4:

    python recipes/pgd_at.py --output-dir runs/hot-start
    python recipes/caat.py --init-from runs/hot-start --lr 1e-3 --epochs 40 --schedule multistep --milestones 39

On CIFAR-10, with the released meta split:

    accelerate launch recipes/pgd_at.py --preset cifar10-resnet18 --output-dir runs/hot-start-cifar10
    accelerate launch recipes/caat.py --preset cifar10-resnet18 --meta-size 3000 --init-from runs/hot-start-cifar10 \
        --lr 1e-3 --epochs 40 --schedule multistep --milestones 39

Cost per step: K + K + 4 forwards and K + K + 3 backwards (more on meta steps; docs/methods/caat.md).
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix import AntiAdversary, PGDAttack
from robustmix.cli.args import nonnegative_number, number, positive_int
from robustmix.cli.recipe import RecipeInfo, base_parser, parse_args, run_recipe, split_from_flags
from robustmix.core.callbacks import Callback
from robustmix.methods.caat import META_INITS, META_OBJECTIVES, CAATLoss, CAATMetaNet, ClassWiseBudget, ReMarginBudget
from robustmix.methods.meta import MetaBatches

NAME = "caat"
#: The released code holds out 3,000 of CIFAR-10's 50,000 training images as its meta split.
META_FRACTION = 3000 / 50000
#: ... and runs a meta step every 50 of the 367 batches of an epoch (47,000 images, batches of 128, the last
#: partial batch dropped).
META_EVERY_EPOCHS = 50 / 367
#: The released attack and anti-adversary: 10 steps of 2/255 at eps 10/255, whatever a sample's multiplier.
DEFAULTS = {"step_size": lambda args: args.eps / 5, "attack_steps": 10}


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    meta_images, meta_labels = info.meta_data.tensors()
    proportions = info.train_data.labels.bincount(minlength=info.num_classes).float()
    if args.class_weights == "frl":  # measured with the trainer's validation attack, PGD-20 at steps of eps/4
        budget = ReMarginBudget(args.eps, info.num_classes, meta_images, meta_labels)
    else:
        budget = ClassWiseBudget(args.eps, [1.0] * info.num_classes)
    attack = PGDAttack(None, args.step_size, args.attack_steps, loss="kl", start="normal", bn_mode=args.attack_bn_mode)
    anti = AntiAdversary(None, args.step_size, args.attack_steps)
    meta_every = args.meta_every or max(1, round(META_EVERY_EPOCHS * info.steps_per_epoch))
    return [
        budget,  # 1. eps_i (and w0, w1)
        attack,  # 2. x_adv
        anti,  # 3. x_anti
        CAATLoss(  # 4.-6.
            info.num_classes,
            MetaBatches(meta_images, meta_labels, min(args.batch_size, len(meta_labels)), seed=args.seed),
            beta_tr=args.beta_tr,
            meta_every=meta_every,
            meta_lr=args.meta_lr,
            meta_weight_decay=args.meta_weight_decay,
            meta_objective=args.meta_objective,
            meta_perturbations=(budget, attack, anti),
            class_weights=budget if args.class_weights == "frl" else None,
            class_proportions=proportions / proportions.sum(),
            net=CAATMetaNet(init=args.meta_init),
        ),
    ]


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    p = base_parser(NAME, __doc__)
    add = p.add_argument
    add("--beta-tr", type=number, default=1.5, help="weight of the KL term (default 1.5)")
    add("--meta-every", type=positive_int,
        help="steps between meta updates (default: the released code's 50 of 367 steps per epoch, as the same "
        "fraction of this run's epoch, at least 1: every step on digits)")  # fmt: skip
    add("--meta-lr", type=number, default=1e-4, help="Adam lr of the meta net (default 1e-4)")
    add("--meta-weight-decay", type=nonnegative_number, default=5e-4,
        help="Adam weight decay of the meta net (default 5e-4)")  # fmt: skip
    add("--meta-size", type=positive_int,
        help="clean examples held out of training for the meta step and the class-wise errors (default: 6%% of the "
        "training split, as the released code's 3,000 of CIFAR-10's 50,000)")  # fmt: skip
    add("--meta-objective", choices=META_OBJECTIVES, default="caat",
        help="outer loss of the meta step: caat (the loss at unit combination weights on the meta batch and its "
        "adversarial and anti-adversarial examples, as released) or clean (its clean CE)")  # fmt: skip
    add("--class-weights", choices=("frl", "none"), default="frl",
        help="frl (as released: class weights on the clean and KL terms and eps multipliers, updated before every "
        "epoch from class-wise errors on the meta split) or none (every class alike)")  # fmt: skip
    add("--meta-init", choices=META_INITS, default="default",
        help="weight net's output layer: default (PyTorch's init, as released) or even (zero: alpha = 1/2 for "
        "every example at the start; robustmix's option)")  # fmt: skip
    return p


def default_meta_size(args: argparse.Namespace) -> int:
    """``META_FRACTION`` of the training split (``--train-size``, else the whole split, loaded to count it)."""
    train_size = args.train_size or len(split_from_flags(args, "train"))
    return max(1, round(META_FRACTION * train_size))


#: Flags whose default the recipe derives from the others when not given: a run that recorded the derived value ran
#: with the default (results.py names its row without the flag).
DERIVED_FLAGS = {"meta_size": default_meta_size}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv, recipe_defaults=DEFAULTS)
    if args.eps <= 0:
        p.error("CAAT needs --eps > 0 (its budgets are multiples of it)")
    if args.meta_size is None:
        try:
            args.meta_size = default_meta_size(args)
        except ValueError as err:
            p.error(f"--dataset: {err}")
    return run_recipe(args, build_callbacks, meta_size=args.meta_size)


if __name__ == "__main__":
    main()
