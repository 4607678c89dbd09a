"""Margin estimators: how far each example is from the decision boundary, written to ``margin``.

Larger is safer: a positive margin means correctly classified. The callbacks read the logits
the step already computed (the memoized training forward, detached), so a margin costs no
forward or backward pass; read from the eval-mode logits of an input (``eval_mode=True``, e.g.
the clean batch) it costs that input's eval forward unless another callback runs it too. Every
estimator computes in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from robustmix.attacks.objectives import cw_margin
from robustmix.checks import is_integer
from robustmix.core.callbacks import Callback
from robustmix.core.context import INPUT_FIELDS, Stage, StepContext


def logit_margin(logits: Tensor, y: Tensor, scale: float | None = None) -> Tensor:
    """Logit margin ``z_y - max_{k != y} z_k`` ``[B]`` of ``logits [B, C]``; unbounded, in logit units.

    With ``scale`` it is squashed to ``tanh(m / scale)`` in [-1, 1]: schedules and weight curves made
    for [-1, 1] (``(1 - m) / 2``) then vary over a few ``scale`` units of logit margin instead of
    saturating after one.
    """
    margin = -cw_margin(logits, y)
    if scale is None:
        return margin
    _check_scale(scale)
    return torch.tanh(margin / scale)


def probability_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Probability margin ``p_y - max_{k != y} p_k`` ``[B]`` in [-1, 1], with ``p = softmax(logits [B, C])``.

    MAIL's ``PM`` is its negative.
    """
    # The CW margin of the probabilities is max_{k != y} p_k - p_y.
    return -cw_margin(logits.float().softmax(dim=1), y)


def multiclass_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Multi-class margin ``[B, C]``: ``m_j = z_y - z_j`` for every class ``j`` in class order (``m_y = 0``).

    BiLAW's input: unlike the scalar margins it says which classes are confusable.
    """
    logits = logits.float()
    return logits.gather(1, y[:, None]) - logits


def kappa_margin(kappa: Tensor, steps: int) -> Tensor:
    """GAIRAT's ``kappa [B]`` (in {0..K}) rescaled to a margin ``2 * kappa / K - 1`` ``[B]`` in [-1, 1].

    Args:
        kappa: Attack iterations still classified correctly, ``[B]`` integers in ``[0, steps]``.
        steps: The attack's number of steps ``K`` (>= 1).
    """
    _check_steps(steps)
    return 2 * kappa.float() / steps - 1


def recovery_margin(aa_steps: Tensor, steps: int) -> Tensor:
    """The descent steps the adversary's adversary needed, as a margin ``1 - 2 n / (K_aa + 1)`` ``[B]`` in [-1, 1].

    ``n = 0`` (``x_adv`` is still classified correctly) is the safest, +1; ``n = K_aa + 1`` (not
    recovered within ``K_aa`` steps) the hardest, -1. Non-increasing in ``n``, so ADA-Lab's
    ``lam = lam_max * (1 - m) / 2`` is ``lam_max * n / (K_aa + 1)``.

    Args:
        aa_steps: Steps needed, integers in ``{0..steps + 1}`` ``[B]`` (``AdversarysAdversary(until_recovered=True)``).
        steps: The most descent steps ``K_aa`` (>= 1).
    """
    _check_steps(steps)
    return 1 - 2 * aa_steps.float() / (steps + 1)


def _check_scale(scale: float) -> None:
    if not (0 < scale < math.inf):
        raise ValueError(f"scale must be a finite number > 0 (logit units) or None, got {scale}")


def _check_steps(steps: int) -> None:
    if not is_integer(steps) or steps < 1:
        raise ValueError(f"steps must be the attack's number of steps, an integer >= 1, got {steps!r}")


class _LogitsMargin(Callback):
    """Writes ``fn(logits, y)`` of one input's detached training logits (no extra pass), or of its eval-mode logits."""

    stage = Stage.MARGIN
    writes = ("margin",)
    fn: Callable[[Tensor, Tensor], Tensor]

    def __init__(self, source: str = "adv", *, eval_mode: bool = False) -> None:
        if source not in INPUT_FIELDS:
            raise ValueError(f"source must be one of {sorted(INPUT_FIELDS)}, got {source!r}")
        self.source, self.eval_mode = source, eval_mode
        self.reads = (f"{'eval_' if eval_mode else ''}logits_{source}",)

    def __call__(self, ctx: StepContext) -> None:
        # The forwards are memoized: the loss (or the labels) reuse these logits, the margin only reads them.
        logits = ctx.get_eval_logits(self.source) if self.eval_mode else ctx.get_logits(self.source).detach()
        setattr(ctx, self.writes[0], self._margin(logits, ctx.targets))

    def _margin(self, logits: Tensor, y: Tensor) -> Tensor:
        return self.fn(logits, y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}{', eval_mode=True' if self.eval_mode else ''})"


class ProbabilityMargin(_LogitsMargin):
    """Writes ``margin [B]``: ``probability_margin`` of the logits of ``source`` (``"adv"`` by default).

    Args:
        source: ``"adv"`` (the default), ``"clean"`` or ``"anti"``.
        eval_mode: Read the eval-mode logits of ``source`` (one forward, memoized) instead of the training ones.
    """

    fn = staticmethod(probability_margin)


class LogitMargin(_LogitsMargin):
    """Writes ``margin [B]``: ``logit_margin`` of the logits of ``source`` (``"adv"`` by default).

    Args:
        source: ``"adv"`` (the default), ``"clean"`` or ``"anti"``.
        scale: Squash the margin to ``tanh(m / scale)`` in [-1, 1]; raw logit units when ``None`` (the default).
        eval_mode: Read the eval-mode logits of ``source`` (one forward, memoized) instead of the training ones.
    """

    fn = staticmethod(logit_margin)

    def __init__(self, source: str = "adv", *, scale: float | None = None, eval_mode: bool = False) -> None:
        if scale is not None:
            _check_scale(scale)
        super().__init__(source, eval_mode=eval_mode)
        self.scale = scale

    def _margin(self, logits: Tensor, y: Tensor) -> Tensor:
        return logit_margin(logits, y, self.scale)

    def __repr__(self) -> str:
        return (
            f"LogitMargin(source={self.source!r}"
            + (", eval_mode=True" if self.eval_mode else "")
            + (f", scale={self.scale}" if self.scale is not None else "")
            + ")"
        )


class MultiClassMargin(_LogitsMargin):
    """Writes ``margin_vector [B, C]``: ``multiclass_margin`` of the logits of ``source`` (default ``"adv"``)."""

    writes = ("margin_vector",)
    fn = staticmethod(multiclass_margin)


class KappaMargin(Callback):
    """Writes ``margin [B]``: ``kappa_margin`` of the attack's ``kappa`` (``PGDAttack(track_kappa=True)``).

    Args:
        steps: The attack's number of steps ``K``.
    """

    stage = Stage.MARGIN
    reads = ("kappa",)
    writes = ("margin",)

    def __init__(self, steps: int) -> None:
        _check_steps(steps)
        self.steps = steps

    def __call__(self, ctx: StepContext) -> None:
        ctx.margin = kappa_margin(ctx.kappa, self.steps)

    def __repr__(self) -> str:
        return f"KappaMargin(steps={self.steps})"


class RecoveryMargin(Callback):
    """Writes ``margin [B]``: ``recovery_margin`` of ``aa_steps`` (``AdversarysAdversary(until_recovered=True)``).

    No pass of its own: the steps are counted by the descent and its last check.

    Args:
        steps: The most descent steps ``K_aa`` of the adversary's adversary.
    """

    stage = Stage.MARGIN
    reads = ("aa_steps",)
    writes = ("margin",)

    def __init__(self, steps: int) -> None:
        _check_steps(steps)
        self.steps = steps

    def __call__(self, ctx: StepContext) -> None:
        ctx.margin = recovery_margin(ctx.aa_steps, self.steps)

    def __repr__(self) -> str:
        return f"RecoveryMargin(steps={self.steps})"
