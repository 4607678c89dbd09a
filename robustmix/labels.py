"""Label refiners: target distributions ``[B, C]`` for the loss, written to ``soft_targets``.

Every refiner returns float32 rows that are distributions (non-negative, summing to 1), detached.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from robustmix.callbacks import Callback
from robustmix.context import Stage, StepContext
from robustmix.weights import _check_burn_in, boundary_importance

#: Shapes ``s(m)`` of ADA-Lab's interpolation ``lam = lam_max * s(m)``, both non-increasing from 1 to 0.
SCHEDULES = ("linear", "tanh")


def one_hot(y: Tensor, num_classes: int) -> Tensor:
    """One-hot rows ``[B, C]`` (float32) of labels ``y [B]``."""
    return F.one_hot(y, num_classes).float()


def smooth_labels(y: Tensor, num_classes: int, alpha: float) -> Tensor:
    """Label smoothing ``(1 - alpha) * onehot(y) + alpha / C`` ``[B, C]`` (float32), ``alpha`` in [0, 1]."""
    _check_unit("alpha", alpha)
    return one_hot(y, num_classes) * (1 - alpha) + alpha / num_classes


def adalab_lambda(margin: Tensor, lam_max: float, schedule: str = "linear") -> Tensor:
    """ADA-Lab's interpolation ``lam = lam_max * s(m)`` ``[B]`` in ``[0, lam_max]``, non-increasing in the margin.

    Low-margin examples get more of the adversary's adversary.

    Args:
        margin: Per-sample margin ``[B]``, meant in [-1, 1] (probability or kappa margin); values
            outside are clamped by the schedule.
        lam_max: Largest interpolation, in [0, 1] (ADA-Lab's default is 0.5).
        schedule: ``s(m)``: ``"linear"`` (the default) ``clamp((1 - m) / 2, 0, 1)``, or ``"tanh"``
            ``(1 + tanh(5 * (0.5 - (1 + m) / 2))) / 2``, the shape of ADA-Lab's importance weights.
    """
    _check_unit("lam_max", lam_max)
    _check_schedule(schedule)
    margin = margin.float()
    if schedule == "linear":
        return lam_max * ((1 - margin) / 2).clamp(0, 1)
    return lam_max * boundary_importance(margin) / 2


def adalab_targets(onehot: Tensor, p_aa: Tensor, lam: Tensor | float) -> Tensor:
    """ADA-Lab's refined labels ``(1 - lam) * onehot + lam * p_aa`` ``[B, C]`` in float32.

    Args:
        onehot: One-hot labels ``[B, C]``.
        p_aa: Predicted distributions at the adversary's adversary ``[B, C]`` (rows sum to 1).
        lam: Interpolation in [0, 1], per sample ``[B]`` or one number.

    Returns:
        Distributions ``[B, C]``, elementwise between ``onehot`` and ``p_aa``; with ``lam < 0.5``
        their argmax is the label.
    """
    onehot, p_aa = onehot.float(), p_aa.float()
    if isinstance(lam, Tensor):
        lam = lam.float()[:, None]
    # Written as onehot + lam * (p_aa - onehot): exactly onehot when lam = 0 or p_aa = onehot.
    return onehot + lam * (p_aa - onehot)


def _check_unit(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


class OneHotLabels(Callback):
    """Writes ``soft_targets``: the one-hot labels ``[B, C]``."""

    stage = Stage.LABELS
    writes = ("soft_targets",)

    def __call__(self, ctx: StepContext) -> None:
        ctx.soft_targets = one_hot(ctx.targets, ctx.num_classes)


class LabelSmoothing(Callback):
    """Writes ``soft_targets``: ``smooth_labels`` of the labels.

    Args:
        alpha: Mass spread uniformly over all classes, in [0, 1]; 0.1 by default.
    """

    stage = Stage.LABELS
    writes = ("soft_targets",)

    def __init__(self, alpha: float = 0.1) -> None:
        _check_unit("alpha", alpha)
        self.alpha = alpha

    def __call__(self, ctx: StepContext) -> None:
        ctx.soft_targets = smooth_labels(ctx.targets, ctx.num_classes, self.alpha)

    def __repr__(self) -> str:
        return f"LabelSmoothing(alpha={self.alpha})"


class AdaLabLabels(Callback):
    """Writes ``soft_targets``: ADA-Lab's ``y~ = (1 - lam) * onehot(y) + lam * softmax(f(x_aa) / T)``.

    ``lam = lam_max * s(margin)`` per sample (``adalab_lambda``); ``f(x_aa)`` is the eval-mode,
    no-grad forward of ``x_anti`` (one forward per step, memoized). Before ``burn_in_epochs`` it
    writes one-hot labels and skips that forward. Logs the batch mean of ``lam`` as
    ``ctx.extras["lam_mean"]``.

    Args:
        lam_max: Largest interpolation, in [0, 1]; 0.5 by default.
        temperature: Softmax temperature ``T`` > 0 of ``p(x_aa)``; 1 by default.
        burn_in_epochs: Epochs of one-hot labels at the start, 0 by default (a recipe chooses).
        schedule: ``"linear"`` (the default) or ``"tanh"``; see ``adalab_lambda``.
    """

    stage = Stage.LABELS
    reads = ("margin", "eval_logits_anti")
    writes = ("soft_targets",)

    def __init__(
        self, lam_max: float = 0.5, temperature: float = 1.0, burn_in_epochs: int = 0, schedule: str = "linear"
    ) -> None:
        _check_unit("lam_max", lam_max)
        if not (0 < temperature < math.inf):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        _check_burn_in(burn_in_epochs)
        _check_schedule(schedule)
        self.lam_max, self.temperature = lam_max, temperature
        self.burn_in_epochs, self.schedule = burn_in_epochs, schedule

    def __call__(self, ctx: StepContext) -> None:
        onehot = one_hot(ctx.targets, ctx.num_classes)
        if ctx.epoch < self.burn_in_epochs:
            lam = onehot.new_zeros(ctx.batch_size)
            ctx.soft_targets = onehot
        else:
            # p_aa is detached already (no-grad eval forward); detaching the margin detaches the targets.
            lam = adalab_lambda(ctx.margin.detach(), self.lam_max, self.schedule)
            p_aa = (ctx.get_eval_logits("anti").float() / self.temperature).softmax(dim=1)
            ctx.soft_targets = adalab_targets(onehot, p_aa, lam)
        ctx.extras["lam_mean"] = lam.mean()

    def __repr__(self) -> str:
        return (
            f"AdaLabLabels(lam_max={self.lam_max}, temperature={self.temperature}, "
            f"burn_in_epochs={self.burn_in_epochs}, schedule={self.schedule!r})"
        )
