"""Margin estimators: how far each example is from the decision boundary, written to ``margin``.

Larger is safer: a positive margin means correctly classified. The callbacks read the logits
the step already computed (the memoized training forward, detached), so a margin costs no
forward or backward pass. Every estimator computes in float32 whatever the autocast dtype.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from robustmix.attacks.objectives import cw_margin
from robustmix.callbacks import Callback
from robustmix.context import INPUT_FIELDS, Stage, StepContext


def logit_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Logit margin ``z_y - max_{k != y} z_k`` ``[B]`` of ``logits [B, C]``; unbounded, in logit units."""
    return -cw_margin(logits, y)


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


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be the attack's number of steps, an integer >= 1, got {steps!r}")


class _LogitsMargin(Callback):
    """Writes ``fn(logits, y)`` of one input's detached training logits: no extra pass."""

    stage = Stage.MARGIN
    writes = ("margin",)
    fn: Callable[[Tensor, Tensor], Tensor]

    def __init__(self, source: str = "adv") -> None:
        if source not in INPUT_FIELDS:
            raise ValueError(f"source must be one of {sorted(INPUT_FIELDS)}, got {source!r}")
        self.source = source
        self.reads = (f"logits_{source}",)

    def __call__(self, ctx: StepContext) -> None:
        # The training forward is memoized: the loss reuses these logits, the margin only reads them.
        setattr(ctx, self.writes[0], self.fn(ctx.get_logits(self.source).detach(), ctx.targets))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r})"


class ProbabilityMargin(_LogitsMargin):
    """Writes ``margin [B]``: ``probability_margin`` of the logits of ``source`` (``"adv"`` by default)."""

    fn = staticmethod(probability_margin)


class LogitMargin(_LogitsMargin):
    """Writes ``margin [B]``: ``logit_margin`` of the logits of ``source`` (``"adv"`` by default)."""

    fn = staticmethod(logit_margin)


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
