"""GAIRAT's lambda schedule: plain AT during a burn-in, then the geometry-aware weights.

The weights themselves are ``robustmix.stages.weights.gairat_weights`` of the attack's ``kappa``
(``PGDAttack(track_kappa=True)``, no extra forward). The released code (Zhang et al., ICLR 2021)
keeps ``lam = +inf`` (uniform weights: PGD-AT) before its ``begin_epoch`` and then either fixes
``lam`` (its default, ``"fixed"``) or lowers it linearly with the epoch (``"linear"``).
"""

from __future__ import annotations

import math

from robustmix.checks import check_int
from robustmix.core.context import StepContext
from robustmix.stages.weights import GAIRATWeights

#: ``"fixed"``: ``lam`` from the burn-in on (the released default); ``"linear"``:
#: ``lam_max - (e + 1) / E * (lam_max - lam)`` at 0-based epoch ``e`` of ``E``.
LAMBDA_SCHEDULES = ("fixed", "linear")


def gairat_lambda(
    epoch: int,
    *,
    lam: float = -1.0,
    burn_in_epochs: int = 0,
    schedule: str = "fixed",
    lam_max: float = math.inf,
    total_epochs: int | None = None,
) -> float:
    """GAIRAT's ``lam`` at a 0-based ``epoch``: ``+inf`` (plain AT) during the burn-in, then the schedule.

    The released code counts epochs from 1 and weights from ``epoch >= begin_epoch``; its
    ``begin_epoch`` of 60 is ``burn_in_epochs=59`` here. Its ``"piecewise"`` schedule cannot reach
    its later pieces (the first ``if`` catches every epoch past the burn-in), so it behaves as
    ``"fixed"`` and is not offered.

    Args:
        epoch: Current epoch, 0-based.
        lam: ``lam`` after the burn-in (``"fixed"``) or at the last epoch (``"linear"``); -1 by default.
        burn_in_epochs: Epochs of plain AT (``lam = +inf``) at the start.
        schedule: ``"fixed"`` (the default) or ``"linear"``.
        lam_max: Start of the linear schedule; must be finite for ``"linear"`` (the released
            default ``+inf`` makes that schedule NaN).
        total_epochs: Planned epochs ``E``, needed by ``"linear"``.

    Returns:
        ``lam``, a float; ``math.inf`` gives uniform weights exactly.
    """
    _check_schedule(lam, burn_in_epochs, schedule, lam_max)
    if epoch < burn_in_epochs:
        return math.inf
    if schedule == "fixed":
        return lam
    if total_epochs is None or total_epochs < 1:
        raise ValueError(f"the linear lambda schedule needs total_epochs >= 1, got {total_epochs!r}")
    return lam_max - (epoch + 1) / total_epochs * (lam_max - lam)


def _check_schedule(lam: float, burn_in_epochs: int, schedule: str, lam_max: float) -> None:
    check_int("burn_in_epochs", burn_in_epochs, 0)
    if schedule not in LAMBDA_SCHEDULES:
        raise ValueError(f"schedule must be one of {LAMBDA_SCHEDULES}, got {schedule!r}")
    if math.isnan(lam):
        raise ValueError("lam must be a number, got NaN")
    if schedule == "linear" and not (math.isfinite(lam_max) and math.isfinite(lam) and lam_max >= lam):
        raise ValueError(f"the linear schedule needs finite lam <= lam_max, got lam={lam}, lam_max={lam_max}")


class ScheduledGAIRATWeights(GAIRATWeights):
    """GAIRAT's weights with its lambda schedule: ``lam = gairat_lambda(ctx.epoch, ...)`` at every step.

    Multiplies ``weights`` by ``gairat_weights`` of ``kappa`` (batch mean
    1). During the burn-in ``lam = +inf``: the weights are exactly ones and the loss is PGD-AT's,
    bit for bit. ``lam`` is derived from the epoch, so a run resumed mid-epoch gets the same value.
    Logs ``ctx.extras["gairat_lam"]``.

    Args:
        steps: The attack's number of steps ``K``.
        lam: See ``gairat_lambda``; -1 by default.
        kind: ``"tanh"`` (the default), ``"sigmoid"`` or ``"discrete"``.
        burn_in_epochs: Epochs of plain AT at the start.
        schedule: ``"fixed"`` (the default) or ``"linear"``.
        lam_max: Start of the linear schedule.
    """

    def __init__(
        self,
        steps: int,
        lam: float = -1.0,
        kind: str = "tanh",
        burn_in_epochs: int = 0,
        *,
        schedule: str = "fixed",
        lam_max: float = math.inf,
    ) -> None:
        _check_schedule(lam, burn_in_epochs, schedule, lam_max)
        # During the burn-in the parent writes ones, which is what lam = +inf gives, without reading kappa.
        super().__init__(steps, lam, kind, burn_in_epochs)
        self.final_lam, self.schedule, self.lam_max = lam, schedule, lam_max

    def __call__(self, ctx: StepContext) -> None:
        self.lam = gairat_lambda(
            ctx.epoch, lam=self.final_lam, burn_in_epochs=self.burn_in_epochs, schedule=self.schedule,
            lam_max=self.lam_max, total_epochs=ctx.total_epochs,
        )  # fmt: skip
        ctx.extras["gairat_lam"] = self.lam
        super().__call__(ctx)

    def __repr__(self) -> str:
        return (
            f"ScheduledGAIRATWeights(steps={self.steps}, lam={self.final_lam}, kind={self.kind!r}, "
            f"burn_in_epochs={self.burn_in_epochs}, schedule={self.schedule!r}, lam_max={self.lam_max})"
        )
