"""BiLAW: bilevel learned reweighting from multi-class margins (Holtz et al., 2022).

Only the abstract was available; the mechanics below are robustmix's design (docs/methods/bilaw.md).
For every batch (x, y):
    1. x_adv = PGD_K(CE) from a uniform start in B(x, eps), eval mode;
    2. m_i   = [z_y - z_j]_j of the detached training logits z = f(x_adv_i)   (multi-class margin, no extra pass);
    3. w_i   = g_phi([m_i, onehot(y_i)]), an MLP 2C -> 100 -> 1 with softplus, normalized to mean 1, detached;
    4. loss  = mean_i w_i CE(f(x_adv_i), y_i);
    5. every --meta-every steps: theta' = theta - lr grad_theta mean_i g_phi(m_i) l_i (virtual SGD step), then
       an Adam step of phi on the adversarial CE of theta' over a meta batch held out of the training split.

Cost per step: K + 1 forwards and K + 1 backwards (2K + 3 each on meta steps; docs/methods/bilaw.md).

    python recipes/bilaw.py                                # digits preset
    accelerate launch recipes/bilaw.py --preset cifar10-resnet18 --meta-size 3000 --meta-every 50
"""

from __future__ import annotations

import argparse
from typing import Any

from robustmix import AdversarialCE, MultiClassMargin, PGDAttack
from robustmix.cli.args import number, positive_int
from robustmix.cli.recipe import RecipeInfo, base_parser, parse_args, run_recipe
from robustmix.core.callbacks import Callback
from robustmix.methods.bilaw import BiLAWWeights
from robustmix.methods.meta import MetaBatches

NAME = "bilaw"


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    meta_images, meta_labels = info.meta_data.tensors()
    return [
        PGDAttack(args.eps, args.step_size, args.attack_steps, bn_mode=args.attack_bn_mode),  # 1. x_adv
        MultiClassMargin(),  # 2. m
        BiLAWWeights(  # 3. w and 5. the lookahead update of phi
            info.num_classes,
            MetaBatches(meta_images, meta_labels, min(args.batch_size, len(meta_labels)), seed=args.seed),
            eps=args.eps,
            step_size=args.step_size,
            attack_steps=args.attack_steps,
            meta_every=args.meta_every,
            meta_lr=args.meta_lr,
            clean_meta_loss=args.clean_meta_loss,
        ),
        AdversarialCE(),  # 4. loss
    ]


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    p = base_parser(NAME, __doc__)
    add = p.add_argument
    add("--meta-every", type=positive_int, default=10, help="steps between lookahead updates (default 10)")
    add("--meta-lr", type=number, default=1e-3, help="Adam lr of the weight net (default 1e-3)")
    add("--meta-size", type=positive_int, default=100, help="clean examples held out of training for the meta step")
    add("--clean-meta-loss", action=argparse.BooleanOptionalAction, default=False,
        help="add the clean CE of theta' to the outer loss (default: off)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv)
    return run_recipe(args, build_callbacks, meta_size=args.meta_size)


if __name__ == "__main__":
    main()
