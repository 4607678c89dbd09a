"""CAAT: combining adversaries with anti-adversaries (Zhou et al., AAAI 2023).

For every batch (x, y):
    1. eps_i = eps * c_{y_i}                      (class-wise multipliers; 1 unless ReMargin changes them);
    2. x_adv  = PGD_K(KL(p(x) || p(.))) from x + 0.001 N(0, I) in B(x, eps_i)   (TRADES' attack, eval mode);
    3. x_anti = K descent steps on CE(f(.), y) from x + 0.001 N(0, I) in B(x, eps_i)   (the anti-adversary);
    4. [alpha_i, beta_i] = softmax(MLP(BN(z_i)) / 0.001) from six detached features z_i of the clean logits;
    5. loss = sum_i alpha_i CE(f(x_i)) / B + 1.5 sum_i alpha_i KL(p(x_i) || p(x_adv_i)) / B
              + mean_i beta_i CE(f(x_anti_i), y_i);
    6. every --meta-every steps: a virtual SGD step of the model on this loss, then an Adam step of the MLP on
       the clean CE of the virtual model over a meta batch held out of the training split (--meta-size).

Cost per step: K + K + 4 forwards and K + K + 3 backwards (more on meta steps; docs/methods/caat.md).

    python recipes/caat.py                                 # digits preset
    accelerate launch recipes/caat.py --preset cifar10-resnet18 --meta-size 3000 --meta-every 50
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix import AntiAdversary, PGDAttack
from robustmix.caat import META_INITS, CAATLoss, CAATMetaNet, ClassWiseBudget
from robustmix.callbacks import Callback
from robustmix.meta import MetaBatches
from robustmix.recipe import RecipeInfo, base_parser, number, parse_args, positive_int, run_recipe

NAME = "caat"


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    meta_images, meta_labels = info.meta_data.tensors()
    proportions = info.train_data.labels.bincount(minlength=info.num_classes).float()
    return [
        ClassWiseBudget(args.eps, [1.0] * info.num_classes),  # 1. eps_i
        PGDAttack(  # 2. x_adv
            None, args.step_size / args.eps, args.attack_steps, loss="kl", start="normal", relative_step_size=True
        ),
        AntiAdversary(None, args.step_size / args.eps, args.attack_steps, relative_step_size=True),  # 3. x_anti
        CAATLoss(  # 4.-6.
            info.num_classes,
            MetaBatches(meta_images, meta_labels, min(args.batch_size, len(meta_labels)), seed=args.seed),
            beta_tr=args.beta_tr,
            meta_every=args.meta_every,
            meta_lr=args.meta_lr,
            class_proportions=proportions / proportions.sum(),
            net=CAATMetaNet(init=args.meta_init),
        ),
    ]


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    p = base_parser(NAME, __doc__)
    add = p.add_argument
    add("--beta-tr", type=number, default=1.5, help="weight of the KL term (default 1.5)")
    add("--meta-every", type=positive_int, default=10, help="steps between meta updates (released code: 50)")
    add("--meta-lr", type=number, default=1e-4, help="Adam lr of the meta net (default 1e-4)")
    add("--meta-size", type=positive_int, default=100, help="clean examples held out of training for the meta step")
    add("--meta-init", choices=META_INITS, default="default",
        help="weight net's output layer: default (PyTorch's init, as released) or even (zero: alpha = 1/2 for "
        "every example at the start; robustmix's option)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv)
    if args.eps <= 0:
        p.error("CAAT needs --eps > 0 (its step sizes are fractions of each sample's eps)")
    return run_recipe(args, build_callbacks, meta_size=args.meta_size)


if __name__ == "__main__":
    main()
