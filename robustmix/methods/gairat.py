"""GAIRAT: geometry-aware weights of the attack's ``kappa``, and their lambda schedule.

The weights are ``gairat_weights`` of ``kappa``, the attack iterations an example stayed correctly classified
(``PGDAttack(track_kappa=True)``, no extra forward). The released code (Zhang et al., ICLR 2021)
keeps ``lam = +inf`` (uniform weights: PGD-AT) before its ``begin_epoch`` and then either fixes
``lam`` (its default, ``"fixed"``) or lowers it linearly with the epoch (``"linear"``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from robustmix.checks import check_int
from robustmix.core.context import StepContext
from robustmix.stages.weights import MarginWeights, normalize_weights

#: GAIRAT's weight functions of kappa.
GAIRAT_KINDS = ("tanh", "sigmoid", "discrete")


def gairat_weights(kappa: Tensor, steps: int, lam: float = -1.0, kind: str = "tanh") -> Tensor:
    """GAIRAT's weights ``[B]`` from ``kappa [B]`` (attack iterations still correct), batch mean 1.

    With ``h = K / 2``: ``"tanh"`` (the default) ``(1 + tanh(lam + 5 (h - kappa) / h)) / 2``;
    ``"sigmoid"`` ``sigmoid(lam + 5 (h - kappa) / h)``; ``"discrete"`` ``(K + 1 - kappa) / (K + 1)``,
    which ignores ``lam``. ``lam = +inf`` gives uniform weights exactly (PGD-AT). The released
    code uses ``h = int(K / 2)``; the two agree for even ``K``.

    Args:
        kappa: Integers in ``[0, steps]``, ``[B]``.
        steps: The attack's number of steps ``K`` (>= 1).
        lam: Shift of the weight curve, -1 by default; larger is flatter. May be infinite.
        kind: ``"tanh"``, ``"sigmoid"`` or ``"discrete"``.
    """
    _check_gairat(steps, lam, kind)
    kappa = kappa.float()
    if kind == "discrete":
        return normalize_weights((steps + 1 - kappa) / (steps + 1))
    half = steps / 2
    z = lam + 5 * (half - kappa) / half
    # (1 + tanh(z)) / 2 == sigmoid(2 z): exact at lam = +inf and free of cancellation at z << 0.
    return normalize_weights(torch.sigmoid(2 * z if kind == "tanh" else z))


class GAIRATWeights(MarginWeights):
    """Multiplies ``weights`` by GAIRAT's ``gairat_weights`` of ``kappa`` (``PGDAttack(track_kappa=True)``).

    ``lam`` is read at every step, so an epoch hook may schedule it.

    Args:
        steps: The attack's number of steps ``K``.
        lam: Shift of the weight curve, -1 by default; ``+inf`` is PGD-AT.
        kind: ``"tanh"`` (the default), ``"sigmoid"`` or ``"discrete"``.
        burn_in_epochs: Epochs of uniform weights at the start, 0 by default.
    """

    reads = ("kappa",)

    def __init__(self, steps: int, lam: float = -1.0, kind: str = "tanh", burn_in_epochs: int = 0) -> None:
        _check_gairat(steps, lam, kind)
        super().__init__(self._weights, name="gairat_weights", burn_in_epochs=burn_in_epochs)
        self.steps, self.lam, self.kind = steps, lam, kind

    def _weights(self, kappa: Tensor) -> Tensor:
        return gairat_weights(kappa, self.steps, self.lam, self.kind)

    def __repr__(self) -> str:
        return (
            f"GAIRATWeights(steps={self.steps}, lam={self.lam}, kind={self.kind!r}, "
            f"burn_in_epochs={self.burn_in_epochs})"
        )


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


def _check_gairat(steps: int, lam: float, kind: str) -> None:
    check_int("steps", steps, 1)
    if kind not in GAIRAT_KINDS:
        raise ValueError(f"kind must be one of {GAIRAT_KINDS}, got {kind!r}")
    if math.isnan(lam):
        raise ValueError("lam must be a number (+inf gives uniform weights), got NaN")
