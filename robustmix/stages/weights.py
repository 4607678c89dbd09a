"""Loss reweighters: per-sample weights ``[B]`` from a margin, multiplied into ``weights``.

Every weight vector is non-negative and normalized to batch mean 1 (``normalize_weights``),
so a reweighter changes which examples the loss looks at, not the learning rate; the one exception
is MAIL's released form (``MAILWeights(normalize=False)``), which keeps the scale of its authors'
code. Several reweighters compose by multiplying; the step renormalizes their product. Weights are
detached when they enter the context: no gradient flows through them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from robustmix.checks import check_int
from robustmix.core.callbacks import Callback
from robustmix.core.context import Stage, StepContext

#: The factor MAIL's released code multiplies its sigmoid weights by (``mail_loss.py``, ``weight_assign``).
MAIL_SCALE = 3.0


def normalize_weights(weights: Tensor) -> Tensor:
    """Scale non-negative ``weights [B]`` to batch mean 1, in float32.

    An all-zero batch expresses no preference and becomes uniform ones (never NaN). Not detached,
    so a learned weight function (BiLAW) can be differentiated through the normalization.
    """
    weights = weights.float()
    peak = weights.amax()
    # Scaling by the largest weight first keeps the mean representable when every weight is tiny
    # (subnormal) or huge; torch.where instead of an `if` keeps this free of host synchronizations.
    scaled = weights / torch.where(peak > 0, peak, 1.0)
    mean = scaled.mean()
    return torch.where(mean > 0, scaled / mean, torch.ones_like(weights))


def boundary_importance(margin: Tensor, c: float = 5.0) -> Tensor:
    """GAIRAT-shaped importance of a margin: ``1 + tanh(c * (0.5 - (1 + m) / 2))`` ``[B]`` in [0, 2].

    Non-increasing in the margin ``m [B]`` (in [-1, 1], e.g. the probability margin): examples
    near or across the decision boundary matter more. ``c`` (>= 0, 5 by default) sets how sharply:
    the weights at ``m = -1`` and ``m = +1`` are in the ratio ``e^c`` (about 148:1 at ``c = 5``).
    """
    _check_finite_non_negative("c", c)
    # 1 + tanh(z) == 2 * sigmoid(2 z), without the cancellation of 1 + tanh(z) when z << 0.
    return 2 * torch.sigmoid(2 * c * (0.5 - (1 + margin.float()) / 2))


def adalab_importance(margin: Tensor, c: float = 5.0) -> Tensor:
    """ADA-Lab's importance weights ``[B]``: ``boundary_importance`` of ``margin [B]``, batch mean 1."""
    return normalize_weights(boundary_importance(margin, c))


def mail_weights(margin_pm: Tensor, bias: float = -1.5, slope: float = 1.0, *, normalize: bool = True) -> Tensor:
    """MAIL's weights ``3 * sigmoid(slope * (PM + bias))`` ``[B]``, by default scaled to batch mean 1.

    Args:
        margin_pm: MAIL's probability margin ``PM = max_{k != y} p_k - p_y`` ``[B]`` in [-1, 1]:
            the *negative* of ``robustmix.stages.margins.probability_margin``, positive when misclassified.
        bias: Shift, -1.5 by default.
        slope: Steepness (>= 0), 1 by default; weights increase with ``PM``.
        normalize: Scale to batch mean 1, where the factor 3 cancels (like every robustmix reweighter).
            ``False`` gives the released code's weights as they are, in (0, 3): with the default bias and
            slope from ``3 * sigmoid(-2.5)``, about 0.23, at ``PM = -1`` to ``3 * sigmoid(-0.5)``, about
            1.13, at ``PM = +1``; they then scale the loss as well.
    """
    _check_mail(bias, slope)
    weights = torch.sigmoid(slope * (margin_pm.float() + bias))
    return normalize_weights(weights) if normalize else MAIL_SCALE * weights


def _check_finite_non_negative(name: str, value: float) -> None:
    if not (0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def _check_mail(bias: float, slope: float) -> None:
    if not math.isfinite(bias):
        raise ValueError(f"bias must be finite, got {bias}")
    _check_finite_non_negative("slope", slope)


class MarginWeights(Callback):
    """Multiplies ``weights`` by ``fn(margin)``, normalized to batch mean 1: any reweighting of the margin.

    Before ``burn_in_epochs`` it writes ones (plain AT). A subclass whose weights keep their own scale
    (MAIL's released form) sets ``normalize`` to ``False``.

    Args:
        fn: Maps ``margin [B]`` to non-negative weights ``[B]``; it should be non-increasing in the
            margin so that examples near the decision boundary weigh more.
        name: Shown in ``repr``; the function's name by default.
        burn_in_epochs: Epochs of uniform weights at the start, 0 by default.
    """

    stage = Stage.WEIGHTS
    reads = ("margin",)
    writes = ("weights",)
    normalize: bool = True

    def __init__(self, fn: Callable[[Tensor], Tensor], *, name: str | None = None, burn_in_epochs: int = 0) -> None:
        check_int("burn_in_epochs", burn_in_epochs, 0)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.burn_in_epochs = burn_in_epochs

    def __call__(self, ctx: StepContext) -> None:
        if ctx.epoch < self.burn_in_epochs:
            weights = torch.ones(ctx.batch_size, device=ctx.inputs.device)
        else:
            weights = self.fn(getattr(ctx, self.reads[0]))
            if self.normalize:
                weights = normalize_weights(weights)
        ctx.multiply_weights(weights)

    def __repr__(self) -> str:
        return f"MarginWeights({self.name}, burn_in_epochs={self.burn_in_epochs})"


class AdaLabWeights(MarginWeights):
    """Multiplies ``weights`` by ADA-Lab's importance ``adalab_importance`` of ``margin``.

    Args:
        c: Sharpness (>= 0), 5 by default.
        burn_in_epochs: Epochs of uniform weights at the start, 0 by default.
    """

    def __init__(self, c: float = 5.0, burn_in_epochs: int = 0) -> None:
        _check_finite_non_negative("c", c)
        super().__init__(self._weights, name="adalab_importance", burn_in_epochs=burn_in_epochs)
        self.c = c

    def _weights(self, margin: Tensor) -> Tensor:
        return adalab_importance(margin, self.c)

    def __repr__(self) -> str:
        return f"AdaLabWeights(c={self.c}, burn_in_epochs={self.burn_in_epochs})"


class MAILWeights(MarginWeights):
    """Multiplies ``weights`` by MAIL's ``mail_weights``; reads the probability ``margin``.

    ``margin`` must be ``ProbabilityMargin``'s ``p_y - max_{k != y} p_k`` (or another margin in
    [-1, 1]); MAIL's ``PM`` is its negative. With the defaults the weights at ``m = -1`` and
    ``m = +1`` are in the ratio ``sigmoid(-0.5) / sigmoid(-2.5)``, about 4.97:1.

    Args:
        bias: Shift, -1.5 by default.
        slope: Steepness (>= 0), 1 by default.
        burn_in_epochs: Epochs of uniform weights (ones) at the start, 0 by default.
        normalize: Batch mean 1 (the default). ``False``: the released code's ``3 * sigmoid(...)`` as it is,
            so the weights also scale the loss (the mean of the weighted term falls to about a quarter where
            most examples are well classified). Keep it the step's only reweighter: the step renormalizes the
            product of several.
    """

    def __init__(
        self, bias: float = -1.5, slope: float = 1.0, burn_in_epochs: int = 0, *, normalize: bool = True
    ) -> None:
        _check_mail(bias, slope)
        super().__init__(self._weights, name="mail_weights", burn_in_epochs=burn_in_epochs)
        self.bias, self.slope, self.normalize = bias, slope, normalize

    def _weights(self, margin: Tensor) -> Tensor:
        return mail_weights(-margin, self.bias, self.slope, normalize=self.normalize)

    def __repr__(self) -> str:
        released = "" if self.normalize else ", normalize=False"
        return f"MAILWeights(bias={self.bias}, slope={self.slope}, burn_in_epochs={self.burn_in_epochs}{released})"
