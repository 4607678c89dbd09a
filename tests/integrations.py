"""What the trainer-integration tests (``test_integration_*.py``) share: the steps they train, the data, a probe.

The probe makes two trainers comparable step for step: it sorts every batch by dataset index and reseeds the
global RNG from the batch, so the same examples get the same attack starts whichever loop draws them, and it
records what the loop fed the step (position, loss, whether the labels were refined) and which events fired.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.nn import functional as F

from robustmix import (
    AWP,
    AdaLabLabels,
    AdaLabWeights,
    AdversarialCE,
    AdversarialStep,
    BiLAWWeights,
    MetaBatches,
    MultiClassMargin,
    PGDAttack,
    ProbabilityMargin,
)
from robustmix.core.callbacks import Callback
from robustmix.data import ImageDataset, load_dataset
from robustmix.models import create_model
from robustmix.stages.anti import AdversarysAdversary
from robustmix.training.trainer import Trainer

EPS, STEP_SIZE, ATTACK_STEPS = 0.1, 0.05, 2
#: Examples per batch.
BATCH = 16
EPOCHS = 3
LR = 0.05


class Probe(Callback):
    """Sorts and reseeds every batch; records positions, losses and events; counts steps in its state."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.events: list[tuple] = []
        self.count = torch.zeros((), dtype=torch.int64)

    def on_fit_start(self, trainer: Any) -> None:
        self.events.append(("fit_start",))

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.events.append(("epoch_start", epoch))

    def on_batch_start(self, trainer: Any, batch: dict[str, torch.Tensor]) -> None:
        order = batch["index"].argsort()
        for key in list(batch):
            batch[key] = batch[key][order]
        torch.manual_seed(int(batch["index"].sum()))
        self.events.append(("batch_start",))

    def on_before_backward(self, ctx: Any) -> None:
        soft = ctx.soft_targets
        refined = soft is not None and not torch.equal(soft, F.one_hot(ctx.targets, ctx.num_classes).to(soft.dtype))
        self.steps.append({
            "epoch": ctx.epoch, "step": ctx.step, "total_epochs": ctx.total_epochs, "total_steps": ctx.total_steps,
            "loss": ctx.loss.item(), "refined": refined,
            "index": ctx.index.tolist() if ctx.index is not None else None,
        })  # fmt: skip
        self.count += 1

    def on_after_optimizer_step(self, trainer: Any, optimizer: Any) -> None:
        self.events.append(("after_optimizer_step",))

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        self.events.append(("epoch_end", epoch))

    def on_save_checkpoint(self, trainer: Any, directory: str) -> None:
        self.events.append(("save",))

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"].clone()


def make_step(recipe: str) -> tuple[AdversarialStep, Probe]:
    """PGD-AT, ADA-Lab (burn-in of one epoch), PGD-AT with AWP or with BiLAW's weights, with a probe."""
    torch.manual_seed(0)  # BiLAW's weight net starts the same in every trainer
    probe = Probe()
    callbacks: list[Callback] = [PGDAttack(EPS, STEP_SIZE, ATTACK_STEPS), AdversarialCE()]
    if recipe == "adalab":
        refine = [AdversarysAdversary(1, EPS / 2, burn_in_epochs=1), ProbabilityMargin("adv")]
        refine += [AdaLabLabels(0.5, 1.0, burn_in_epochs=1), AdaLabWeights(5.0, burn_in_epochs=1)]
        callbacks += refine
    elif recipe == "awp":
        callbacks.append(AWP(gamma=0.01))
    elif recipe == "bilaw":  # a lookahead meta step of the weight net at every step, on held-out digits
        meta_images, meta_labels = digits("validation", BATCH).tensors()
        meta = MetaBatches(meta_images, meta_labels, 8)
        bilaw = BiLAWWeights(10, meta, eps=EPS, step_size=STEP_SIZE, attack_steps=1, meta_every=1)
        callbacks += [MultiClassMargin(), bilaw]
    return AdversarialStep([*callbacks, probe]), probe


def digits(split: str, n: int) -> ImageDataset:
    """The first ``n`` digits of a split (``{"image" [1, 32, 32], "label", "index"}`` examples)."""
    data = load_dataset("digits", split)
    return data.hold_out(len(data) - n, "held")[0] if n < len(data) else data


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("test_resnet", num_classes=10, in_chans=1, mean=(0.5,), std=(0.5,))


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def robustmix_reference(recipe: str, model: torch.nn.Module, train: ImageDataset) -> Probe:
    """Train a copy of ``model`` with robustmix's own Trainer for ``EPOCHS`` epochs; return its probe."""
    step, probe = make_step(recipe)
    model = copy.deepcopy(model)
    trainer = Trainer(
        model, step, sgd(model), train, epochs=EPOCHS, batch_size=BATCH, eval_every=None, checkpoint_every=None,
        progress=False,
    )  # fmt: skip
    trainer.fit()
    return probe
