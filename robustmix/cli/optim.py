"""The optimizer and the lr schedule a recipe's flags describe, in optimizer steps, and the epochs a method's start
is tied to (the lr schedule's first drop)."""

from __future__ import annotations

import argparse
import functools
import math

import torch
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, MultiStepLR

from robustmix.cli.args import FIRST_DECAY

#: Choices of ``--optimizer``.
OPTIMIZERS = ("sgd", "adamw")
#: Choices of ``--schedule``.
SCHEDULES = ("warmup-cosine", "multistep", "constant", "cyclic")


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> Optimizer:
    """SGD (with ``--momentum``) or AdamW at ``--lr`` with ``--weight-decay`` on every parameter."""
    if args.optimizer == "sgd":
        return SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def warmup_cosine(step: int, total_steps: int, warmup: float = 0.25, start: float = 1 / 25) -> float:
    """lr multiplier at optimizer step ``step`` (0-based) of ``total_steps``.

    Rises linearly from ``start`` to 1 over the first ``warmup`` fraction of the steps (at least one step),
    then falls along half a cosine towards 0, reached just after the last step: the lr shape of one-cycle
    training (Smith 2018), well defined for any number of steps.
    """
    warm = max(1, round(warmup * total_steps))
    if step < warm:
        return start + (1 - start) * step / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    return 0.5 * (1 + math.cos(math.pi * progress))


def triangular(step: int, total_steps: int) -> float:
    """lr multiplier at optimizer step ``step`` (0-based) of ``total_steps``: ``1 - |2 step / total_steps - 1|``.

    0 at the first step, 1 at the middle of the run, back towards 0 at its end: the cyclic schedule of fast
    adversarial training (Wong et al. 2020), whose code steps torch's ``CyclicLR`` from 0 to the peak and back
    with ``total_steps / 2`` steps each way, once per optimizer step.
    """
    return max(0.0, 1 - abs(2 * step / total_steps - 1))


def build_scheduler(
    args: argparse.Namespace, optimizer: Optimizer, steps_per_epoch: int, total_steps: int
) -> LRScheduler | None:
    """The ``--schedule`` in optimizer steps: warm-up then cosine over ``total_steps``, the ``triangular`` cycle
    over ``total_steps`` (``cyclic``), or x0.1 at milestones."""
    if args.schedule == "warmup-cosine":
        return LambdaLR(optimizer, functools.partial(warmup_cosine, total_steps=total_steps))
    if args.schedule == "cyclic":
        return LambdaLR(optimizer, functools.partial(triangular, total_steps=total_steps))
    if args.schedule == "multistep":
        return MultiStepLR(optimizer, milestones=[m * steps_per_epoch for m in args.milestones], gamma=0.1)
    return None


def first_decay_epoch(args: argparse.Namespace) -> int | None:
    """The epoch of the lr schedule's first drop: the first ``--milestones`` epoch under ``multistep``; ``None``
    for schedules without a drop (warm-up + cosine, constant, cyclic)."""
    return min(args.milestones) if args.schedule == "multistep" and args.milestones else None


def start_epoch(args: argparse.Namespace, value: int | str | None, fallback: int, *, after_decay: int = 0) -> int:
    """The epoch a method switches on at (GAIRAT's and MAIL's burn-in), as its release ties it to the lr schedule.

    ``value`` is the flag: an epoch, or ``first-decay`` (the epoch of the lr's first drop). Not given, it is
    the first drop plus ``after_decay`` under a schedule that has a drop (GAIRAT's release switches on at its
    first drop, MAIL's one epoch after it), else ``fallback`` (the release's share of the epochs).

    Raises:
        ValueError: ``first-decay`` under a schedule without a drop, or an epoch that leaves no epoch of the
            method out of ``--epochs``; recipes check this in ``main`` and turn it into a one-line error.
    """
    decay = first_decay_epoch(args)
    if value == FIRST_DECAY:
        if decay is None:
            raise ValueError(f"{FIRST_DECAY} needs --schedule multistep with --milestones (the lr's first drop)")
        epoch = decay
    elif value is None:
        epoch = fallback if decay is None else decay + after_decay
    else:
        epoch = value
    if epoch >= args.epochs:
        raise ValueError(f"epoch {epoch} leaves no epoch of the method out of --epochs {args.epochs}")
    return epoch
