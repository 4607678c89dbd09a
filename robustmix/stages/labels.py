"""Label refiners: target distributions ``[B, C]`` for the loss, written to ``soft_targets``.

Every refiner returns float32 rows that are distributions (non-negative, summing to 1), detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from robustmix.checks import check_int, check_unit
from robustmix.core.callbacks import Callback
from robustmix.core.context import INPUT_FIELDS, Stage, StepContext
from robustmix.stages.weights import boundary_importance

#: Shapes ``s(m)`` of ADA-Lab's interpolation ``lam = lam_max * s(m)``, both non-increasing from 1 to 0.
SCHEDULES = ("linear", "tanh")
#: ADA-Lab's target forms (``AdaLabLabels(target=...)``): ``adalab_targets``, ``floor_targets``,
#: ``keep_true_targets`` and ``direction_targets``.
TARGETS = ("interpolate", "floor", "keep-true", "direction")


def one_hot(y: Tensor, num_classes: int) -> Tensor:
    """One-hot rows ``[B, C]`` (float32) of labels ``y [B]``."""
    return F.one_hot(y, num_classes).float()


def smooth_labels(y: Tensor, num_classes: int, alpha: float) -> Tensor:
    """Label smoothing ``(1 - alpha) * onehot(y) + alpha / C`` ``[B, C]`` (float32), ``alpha`` in [0, 1]."""
    check_unit("alpha", alpha)
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
    check_unit("lam_max", lam_max)
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
    # Written as onehot + lam * (p_aa - onehot): exactly onehot when lam = 0 or p_aa = onehot.
    return onehot + _column(lam) * (p_aa - onehot)


def floor_targets(onehot: Tensor, p: Tensor, lam: Tensor | float) -> Tensor:
    """Targets whose true-class mass is exactly ``max(1 - lam, p_y)``, the rest spread like ``p`` over ``k != y``.

    ``y~_y = max(1 - lam, p_y)`` and ``y~_k = (1 - y~_y) * p_k / sum_{j != y} p_j``: ``lam`` is the
    largest drop of the true class, the source decides where the dropped mass goes and lifts the
    true class above the floor where it is surer (there ``y~ = p``). The softest targets with
    ``y~_y >= max(1 - lam, p_y)``; ``adalab_targets`` keeps ``1 - lam * (1 - p_y)``, never less.

    Args:
        onehot: One-hot labels ``[B, C]``.
        p: Source distributions ``[B, C]`` (e.g. ``p(x_aa)``; rows sum to 1).
        lam: Interpolation in [0, 1], per sample ``[B]`` or one number.

    Returns:
        Distributions ``[B, C]`` in float32, elementwise between ``onehot`` and ``p``; with
            ``lam < 0.5`` their argmax is the label.
    """
    onehot, p, lam = onehot.float(), p.float(), _column(lam)
    p_true = (p * onehot).sum(dim=1, keepdim=True)
    rest = p * (1 - onehot)
    rest_mass = rest.sum(dim=1, keepdim=True)
    true = torch.maximum(p_true, 1 - lam) if isinstance(lam, Tensor) else p_true.clamp(min=1 - lam)
    # rest_mass is 0 only where p is the one-hot row; then the true class keeps everything.
    share = torch.where(rest_mass > 0, (1 - true) / rest_mass.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return true * onehot + share * rest


def keep_true_targets(onehot: Tensor, p: Tensor, lam: Tensor | float) -> Tensor:
    """``adalab_targets`` with ``lam`` scaled by the source's true-class probability: ``lam * p_y``.

    The target moves towards ``p`` only as far as ``p`` itself shows the true class: a source that
    is still misclassified (``p_y`` near 0) leaves the one-hot label. ``y~_y = 1 - lam p_y (1 - p_y)``,
    at least ``1 - lam / 4``, ``1 - lam`` and ``p_y``.

    Args:
        onehot: One-hot labels ``[B, C]``.
        p: Source distributions ``[B, C]`` (e.g. ``p(x_aa)``; rows sum to 1).
        lam: Interpolation in [0, 1], per sample ``[B]`` or one number.

    Returns:
        Distributions ``[B, C]`` in float32, elementwise between ``onehot`` and ``p``; their argmax is
            the label for every ``lam`` in [0, 1].
    """
    onehot, p = onehot.float(), p.float()
    return adalab_targets(onehot, p, lam * (p * onehot).sum(dim=1))


def direction_targets(onehot: Tensor, p: Tensor, p_adv: Tensor, lam: Tensor | float) -> Tensor:
    """The descent direction as the target: ``y~ = Proj_simplex(onehot + lam * (p - p_adv))``.

    ``p - p_adv`` is how the prediction changes from ``x_adv`` to the source (``x_aa``: along the
    gradient-descent direction); the rows of ``onehot + lam * (p - p_adv)`` already sum to 1, and
    the projection (``simplex_projection``) clips them to a distribution. ``y~ = onehot`` when
    ``lam = 0`` or ``p = p_adv``.

    Args:
        onehot: One-hot labels ``[B, C]``.
        p: Source distributions ``[B, C]`` (``p(x_aa)``, or ``p(x)``).
        p_adv: Distributions at ``x_adv`` ``[B, C]``.
        lam: Interpolation in [0, 1], per sample ``[B]`` or one number.

    Returns:
        Distributions ``[B, C]`` in float32; with ``lam < 0.5`` their argmax is the label.
    """
    onehot = onehot.float()
    return simplex_projection(onehot + _column(lam) * (p.float() - p_adv.float()))


def simplex_projection(v: Tensor) -> Tensor:
    """Euclidean projection of every row of ``v [B, C]`` onto the probability simplex, in float32.

    ``argmin_{q >= 0, sum q = 1} ||q - v||_2 = max(v - theta, 0)`` with ``theta`` found by sorting
    (Held, Wolfe & Crowder 1974; Duchi et al. 2008): ``O(C log C)`` per row, no iteration. Order
    preserving: ``v_i >= v_j`` gives ``q_i >= q_j``.
    """
    v = v.float()
    u = v.sort(dim=1, descending=True).values
    excess = u.cumsum(dim=1) - 1
    j = torch.arange(1, v.shape[1] + 1, device=v.device)
    # rho = the largest j with u_j > excess_j / j (j = 1 always qualifies); theta = excess_rho / rho.
    rho = torch.where(u - excess / j > 0, j, 0).amax(dim=1, keepdim=True)
    theta = excess.gather(1, rho - 1) / rho
    return (v - theta).clamp_min(0)


def _column(lam: Tensor | float) -> Tensor | float:
    """``lam [B]`` as a float32 column ``[B, 1]``; a number stays a number."""
    return lam.float()[:, None] if isinstance(lam, Tensor) else lam


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
        check_unit("alpha", alpha)
        self.alpha = alpha

    def __call__(self, ctx: StepContext) -> None:
        ctx.soft_targets = smooth_labels(ctx.targets, ctx.num_classes, self.alpha)

    def __repr__(self) -> str:
        return f"LabelSmoothing(alpha={self.alpha})"


class AdaLabLabels(Callback):
    """Writes ``soft_targets``: ADA-Lab's ``y~ = (1 - lam) * onehot(y) + lam * softmax(f(x_aa) / T)``, or another form.

    ``lam = lam_max * s(margin)`` per sample (``adalab_lambda``); ``f(x_aa)`` is the eval-mode,
    no-grad forward of ``x_anti`` (one forward per step, memoized). Before ``burn_in_epochs`` it
    writes one-hot labels and skips that forward. Logs the batch mean of ``lam`` as
    ``ctx.extras["lam_mean"]``.

    Args:
        lam_max: Largest interpolation, in [0, 1]; 0.5 by default.
        temperature: Softmax temperature ``T`` > 0 of ``p(x_aa)``; 1 by default.
        burn_in_epochs: Epochs of one-hot labels at the start, 0 by default (a recipe chooses).
        schedule: ``"linear"`` (the default) or ``"tanh"``; see ``adalab_lambda``.
        target: The form of ``y~`` (``TARGETS``): ``"interpolate"`` (the default, ``adalab_targets``),
            ``"floor"`` (``floor_targets``), ``"keep-true"`` (``keep_true_targets``) or ``"direction"``
            (``direction_targets``, which also reads the eval-mode forward of ``x_adv``: one more forward).
        source: The input whose eval-mode prediction the target is built from: ``"anti"`` (``x_aa``, the
            default), ``"adv"`` or ``"clean"``; one forward each, memoized with any other reader.
    """

    stage = Stage.LABELS
    writes = ("soft_targets",)

    def __init__(
        self,
        lam_max: float = 0.5,
        temperature: float = 1.0,
        burn_in_epochs: int = 0,
        schedule: str = "linear",
        *,
        target: str = "interpolate",
        source: str = "anti",
    ) -> None:
        check_unit("lam_max", lam_max)
        if not (0 < temperature < math.inf):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        check_int("burn_in_epochs", burn_in_epochs, 0)
        _check_schedule(schedule)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if source not in INPUT_FIELDS:
            raise ValueError(f"source must be one of {sorted(INPUT_FIELDS)}, got {source!r}")
        if target == "direction" and source == "adv":
            raise ValueError("target='direction' with source='adv' is the one-hot label: p(x_adv) - p(x_adv) = 0")
        self.lam_max, self.temperature = lam_max, temperature
        self.burn_in_epochs, self.schedule = burn_in_epochs, schedule
        self.target, self.source = target, source
        self.reads = ("margin", f"eval_logits_{source}") + (("eval_logits_adv",) if target == "direction" else ())

    def __call__(self, ctx: StepContext) -> None:
        onehot = one_hot(ctx.targets, ctx.num_classes)
        if ctx.epoch < self.burn_in_epochs:
            lam = onehot.new_zeros(ctx.batch_size)
            ctx.soft_targets = onehot
        else:
            # The eval logits are detached already (no-grad forwards); detaching the margin detaches the targets.
            lam = adalab_lambda(ctx.margin.detach(), self.lam_max, self.schedule)
            p = self._softmax(ctx, self.source)
            if self.target == "direction":
                ctx.soft_targets = direction_targets(onehot, p, self._softmax(ctx, "adv"), lam)
            else:
                ctx.soft_targets = _INTERPOLATIONS[self.target](onehot, p, lam)
        ctx.extras["lam_mean"] = lam.mean()

    def _softmax(self, ctx: StepContext, name: str) -> Tensor:
        return (ctx.get_eval_logits(name).float() / self.temperature).softmax(dim=1)

    def __repr__(self) -> str:
        return (
            f"AdaLabLabels(lam_max={self.lam_max}, temperature={self.temperature}, "
            f"burn_in_epochs={self.burn_in_epochs}, schedule={self.schedule!r}"
            + (f", target={self.target!r}" if self.target != "interpolate" else "")
            + (f", source={self.source!r}" if self.source != "anti" else "")
            + ")"
        )


_INTERPOLATIONS = {"interpolate": adalab_targets, "floor": floor_targets, "keep-true": keep_true_targets}
