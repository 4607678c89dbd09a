"""FGSM-RS, "fast adversarial training" (Wong, Rice & Kolter, ICLR 2020), by default as its authors ran it.

For every batch (x, y):
    1. delta ~ Uniform(-eps, eps); x_adv = Proj_B(x, eps)(x + delta + alpha * sign(grad_x CE(f(x + delta), y)))
       with alpha = 1.25 * eps (one FGSM step from a random start);
    2. loss = CE(f(x_adv), y), one backward, one optimizer step.

--protocol wong (the default) trains as the released CIFAR-10 code does: the lr rises linearly from 0 to --lr at
the middle of the run and falls back to 0 (--schedule cyclic, unless --schedule is given); step 1 runs with the
model in train mode (BatchNorm on batch statistics, as in the training forward); after every epoch a PGD-5 check
on one batch of training examples stops the run when its accuracy falls by more than 0.2 from the previous
check (catastrophic overfitting), and the run ends with the weights of that previous check. --protocol shared
trains like the other recipes: the preset's schedule, the attack in eval mode, no check.
docs/methods/fgsm_rs.md: what follows the released code, and where.

Cost per step: 2 forwards and 2 backwards (PGD-10 AT costs 11 of each); the check costs 6 forwards and 5
backwards of one batch per epoch. --step-size overrides alpha; the attack takes one step, so --attack-steps
must stay 1.

    python recipes/fgsm_rs.py
    python recipes/fgsm_rs.py --protocol shared
    accelerate launch recipes/fgsm_rs.py --preset cifar10-resnet18 --epochs 15 --lr 0.2   # the released run's budget
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor

from robustmix import AdversarialCE, FGSMAttack, pgd
from robustmix.cli.recipe import RecipeInfo, base_parser, parse_args, run_recipe
from robustmix.core.callbacks import Callback
from robustmix.core.modes import model_mode
from robustmix.models import unwrap_model
from robustmix.training.sampling import mix_seed
from robustmix.training.trainer import Trainer

NAME = "fgsm_rs"
#: --preset cifar10-paper: Wong et al.'s release (locuslab/fast_adversarial, CIFAR10/train_fgsm.py): 15 epochs of
#: the cyclic lr peaking at 0.2, weight decay 5e-4, momentum 0.9, batch 128, one step of 10/255 within 8/255.
PAPER = {"epochs": 15, "lr": 0.2}
STEP_SIZE_RATIO = 1.25  # alpha = 1.25 * eps (Wong et al., section 4)
PROTOCOLS = ("wong", "shared")
#: What this recipe uses instead of the preset for flags not given on the command line.
DEFAULTS = {
    "step_size": lambda args: STEP_SIZE_RATIO * args.eps,
    "attack_steps": 1,
    "schedule": lambda args: "cyclic" if args.protocol == "wong" else args.schedule,
    "attack_bn_mode": lambda args: "train" if args.protocol == "wong" else "eval",
}
#: The released early stop: PGD-5 at step eps / 4, and the largest fall of its accuracy between two checks.
CHECK_STEPS, MAX_DROP = 5, 0.2
#: Random stream (of the run seed) that picks the check's batch and starts its attack.
CHECK_STREAM = 3


class CatastrophicOverfittingGuard(Callback):
    """Stops training when PGD accuracy on training examples collapses, and keeps the weights from before.

    After every epoch, PGD (``steps`` steps of ``eps / 4`` from a uniform start) attacks one fixed batch of
    training examples, drawn once with the run seed, the model in train mode with its BatchNorm statistics
    left as they are. Each check's accuracy is a ``metrics.jsonl`` row (``overfit_check_pgd_acc``). When it is
    more than ``max_drop`` below the previous check's (the first check compares with 0), the model goes back to
    the weights of the previous check and the trainer stops (``Trainer.stop``).

    Args:
        eps: Budget of the check's attack in pixels: the training eps.
        steps: PGD steps, 5 by default.
        max_drop: Largest fall of the accuracy (a fraction) from one check to the next, 0.2 by default.
    """

    def __init__(self, eps: float, steps: int = CHECK_STEPS, max_drop: float = MAX_DROP) -> None:
        self.eps, self.steps, self.max_drop = eps, steps, max_drop
        self.previous_acc, self.previous_step = 0.0, None
        self.weights: dict[str, Tensor] | None = None  # the model at the previous check
        self.batch: tuple[Tensor, Tensor] | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        data = trainer.train_data
        generator = torch.Generator().manual_seed(mix_seed(trainer.seed, CHECK_STREAM))
        examples = [data[i] for i in torch.randperm(len(data), generator=generator)[: trainer.batch_size].tolist()]
        images = torch.stack([example["image"] for example in examples])
        labels = torch.stack([torch.as_tensor(example["label"]) for example in examples]).long()
        self.batch = images.to(trainer.accelerator.device), labels.to(trainer.accelerator.device)

    def check(self, trainer: Trainer) -> float:
        """PGD accuracy of the model on the check's batch, in [0, 1], the same on every process."""
        model, (x, y) = unwrap_model(trainer.model), self.batch
        generator = torch.Generator(x.device).manual_seed(mix_seed(trainer.seed, CHECK_STREAM, trainer.global_step))
        x_adv = pgd(
            model, x, y, eps=self.eps, step_size=self.eps / 4, steps=self.steps, bn_mode="train_frozen_bn",
            generator=generator,
        )  # fmt: skip
        with torch.no_grad(), model_mode(model, "train_frozen_bn"):
            accuracy = (model(x_adv).argmax(dim=1) == y).float().mean()
        return trainer.accelerator.reduce(accuracy, "mean").item()

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        accuracy = self.check(trainer)
        trainer.log({"overfit_check_pgd_acc": accuracy})
        if accuracy - self.previous_acc < -self.max_drop:
            trainer.stop(
                f"catastrophic overfitting: PGD-{self.steps} accuracy on a training batch fell from "
                f"{self.previous_acc:.2%} (step {self.previous_step}) to {accuracy:.2%}; the run keeps the weights "
                f"of step {self.previous_step}",
                weights=self.weights,
            )
            return
        self.previous_acc, self.previous_step = accuracy, trainer.global_step
        self.weights = {name: t.detach().clone() for name, t in unwrap_model(trainer.model).state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        state = {"previous_acc": self.previous_acc, "previous_step": self.previous_step}
        return state if self.weights is None else {**state, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous_acc, self.previous_step = state["previous_acc"], state["previous_step"]
        self.weights = state.get("weights")

    def __repr__(self) -> str:
        return f"CatastrophicOverfittingGuard(eps={self.eps}, steps={self.steps}, max_drop={self.max_drop})"


def build_callbacks(args: argparse.Namespace, info: RecipeInfo) -> list[Callback]:
    wong = args.protocol == "wong"
    callbacks = [
        FGSMAttack(args.eps, args.step_size, bn_mode=args.attack_bn_mode),  # 1. x_adv: one step of alpha
        AdversarialCE(),  # 2. loss = CE(f(x_adv), y)
    ]
    if wong:
        callbacks.append(CatastrophicOverfittingGuard(args.eps))  # after every epoch: the early stop
    return callbacks


def parser() -> argparse.ArgumentParser:
    """The recipe's command line: the shared flags and its own."""
    p = base_parser(NAME, __doc__)
    p.add_argument(
        "--protocol", choices=PROTOCOLS, default="wong",
        help="wong: the released code's cyclic lr, train-mode attack and early stop; shared: the preset's schedule, "
        "eval-mode attack, no early stop, like the other recipes (default: wong); --schedule and "
        "--attack-bn-mode override either",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv, recipe_defaults=DEFAULTS, paper=PAPER)
    if args.attack_steps != 1:
        p.error(f"FGSM-RS takes exactly one attack step, got --attack-steps {args.attack_steps}")
    return run_recipe(args, build_callbacks)


if __name__ == "__main__":
    main()
