"""A Trainer on a few digits, shared by the tests of the training loop, its guards and its logs."""

from __future__ import annotations

import dataclasses

import torch

from robustmix import AdversarialCE, AdversarialStep, PGDAttack
from robustmix.data import DATASETS, ImageDataset
from robustmix.models import create_model, unwrap_model
from robustmix.training.trainer import Trainer

#: The training attack's budget (pixels) of ``make_trainer``'s default step.
EPS = 0.1


def subset(data: ImageDataset, n: int) -> ImageDataset:
    """The first ``n`` examples of ``data``."""
    return dataclasses.replace(data, images=data.images[:n], labels=data.labels[:n], index=data.index[:n])


def make_model(seed: int = 0) -> torch.nn.Module:
    """timm's ``test_resnet`` for 1x32x32 digits, 10 classes, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    spec = DATASETS["digits"]
    return create_model("test_resnet", 10, in_chans=1, mean=spec.mean, std=spec.std)


def make_trainer(digits, *, callbacks=None, model=None, scheduler=None, lr=0.05, **kwargs) -> Trainer:
    """A ``Trainer`` on the ``digits`` fixture's (train, validation): PGD-AT with one step by default, SGD, two
    epochs of batches of 16; ``kwargs`` override the Trainer's options."""
    model = model if model is not None else make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    if scheduler is not None:
        scheduler = scheduler(optimizer)
    step = AdversarialStep(callbacks or [PGDAttack(EPS, EPS / 2, 1), AdversarialCE()])
    train, val = digits
    options = {"val_data": val, "epochs": 2, "batch_size": 16, "eval_steps": 2, "progress": False, "log_every": 1}
    return Trainer(model, step, optimizer, train, scheduler=scheduler, **(options | kwargs))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """A copy of the trained model's state dict."""
    return {k: v.detach().clone() for k, v in unwrap_model(trainer.model).state_dict().items()}
