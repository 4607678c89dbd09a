"""Anti-adversary generators: projected *descent* on ``CE(f(.), y)``, written to ``x_anti``.

Two starting points, one loop (``robustmix.attacks.pgd.perturb`` with ``descend=True``):

- the adversary's adversary (ADA-Lab) starts at ``x_adv`` and walks back towards the true class,
  staying inside the attack's ball ``B(x, eps)``;
- the anti-adversary (CAAT) starts at ``x + 0.001 * N(0, I)`` and makes the clean input more
  confidently correct.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustmix.attacks.callbacks import _check_budget
from robustmix.attacks.pgd import DEFAULT_LOSS_SCALE, NORMS, STARTS, Norm, Start, perturb
from robustmix.callbacks import Callback
from robustmix.context import Stage, StepContext
from robustmix.modes import BNMode, check_bn_mode
from robustmix.weights import _check_burn_in


def _budget(ctx: StepContext) -> float | Tensor:
    """The attack's budget: its float when uniform (no host read to check it), else ``eps [B]``."""
    return ctx.uniform_eps if ctx.uniform_eps is not None else ctx.eps


def adversarys_adversary(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    step_size: float | Tensor | None = None,
    steps: int = 1,
    norm: Norm = "linf",
    bn_mode: BNMode = "eval",
    loss_scale: float = DEFAULT_LOSS_SCALE,
    check_values: bool = True,
) -> Tensor:
    """ADA-Lab's adversary's adversary: ``steps`` descent steps on ``CE(f(.), y)`` from ``x_adv``.

    ``x_aa = Proj_{B(x, eps)}(x_adv - step_size * sign(grad CE))``, repeated ``steps`` times. It
    costs ``steps`` forwards and backwards of ``model`` in ``bn_mode``.

    Args:
        model: Classifier taking pixels in [0, 1]; pass the unwrapped module under DDP.
        x: Clean images ``[B, ...]``, pixels in [0, 1]: the centre of the ball.
        x_adv: Adversarial examples ``[B, ...]`` in ``B(x, eps)``: the start.
        y: Labels ``[B]``.
        eps: Radius of the ball in pixels, a float or per-sample ``[B]``; the attack's budget.
        step_size: Step in pixels, a float or per-sample ``[B]``; by default half of ``eps``.
        steps: Number of descent steps (``K_aa``), one by default.
        norm: ``"linf"`` (sign steps, the default) or ``"l2"``; use the attack's norm.
        bn_mode: BatchNorm/dropout mode during the descent, eval by default.
        loss_scale: Multiplier of the loss before differentiation (fp16 safety).
        check_values: Check the values of ``x`` and ``y`` first (see ``perturb``); callbacks pass ``False``.

    Returns:
        ``x_aa [B, ...]``, detached, in ``B(x, eps)`` and [0, 1].
    """
    if step_size is None:
        step_size = eps * 0.5
    return perturb(
        model, x, y, eps=eps, step_size=step_size, steps=steps, norm=norm, loss="ce", descend=True, x_init=x_adv,
        bn_mode=bn_mode, loss_scale=loss_scale, check_values=check_values,
    )  # fmt: skip


def anti_adversary(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    step_size: float | Tensor,
    steps: int,
    start: Start = "normal",
    norm: Norm = "linf",
    bn_mode: BNMode = "eval",
    loss_scale: float = DEFAULT_LOSS_SCALE,
    generator: torch.Generator | None = None,
    check_values: bool = True,
) -> Tensor:
    """CAAT's anti-adversary: ``steps`` descent steps on ``CE(f(.), y)`` from near ``x``.

    Args:
        model: Classifier taking pixels in [0, 1]; pass the unwrapped module under DDP.
        x: Clean images ``[B, ...]``, pixels in [0, 1].
        y: Labels ``[B]``.
        eps: Radius of the ball around ``x`` in pixels, a float or per-sample ``[B]``.
        step_size: Step in pixels, a float or per-sample ``[B]``.
        steps: Number of descent steps.
        start: ``"normal"`` (``x + 0.001 * N(0, I)``, CAAT's start, the default), ``"uniform"`` or ``"none"``.
        norm: ``"linf"`` (the default) or ``"l2"``.
        bn_mode: BatchNorm/dropout mode during the descent, eval by default.
        loss_scale: Multiplier of the loss before differentiation (fp16 safety).
        generator: Random generator for the start.
        check_values: Check the values of ``x`` and ``y`` first (see ``perturb``); callbacks pass ``False``.

    Returns:
        ``x_anti [B, ...]``, detached, in ``B(x, eps)`` and [0, 1].
    """
    return perturb(
        model, x, y, eps=eps, step_size=step_size, steps=steps, norm=norm, loss="ce", start=start, descend=True,
        bn_mode=bn_mode, loss_scale=loss_scale, generator=generator, check_values=check_values,
    )  # fmt: skip


def _check_options(norm: str, bn_mode: str, start: str = "none") -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    check_bn_mode(bn_mode)


class AdversarysAdversary(Callback):
    """Writes ``x_anti``: ADA-Lab's adversary's adversary, descent from ``x_adv`` inside ``B(x, eps)``.

    The ball is the attack's: ``eps [B]`` comes from the context (written by the attack or a
    budget callback), so class-wise budgets carry over. Costs ``steps`` forwards and backwards;
    before ``burn_in_epochs`` it writes ``x_anti = x_adv`` and costs nothing.

    Args:
        steps: Number of descent steps ``K_aa``; one by default.
        step_size: Step in pixels; by default half of each sample's eps.
        norm: ``"linf"`` (the default) or ``"l2"``; use the attack's norm.
        bn_mode: BatchNorm/dropout mode during the descent, eval by default.
        loss_scale: Multiplier of the loss before differentiation (fp16 safety).
        burn_in_epochs: Epochs (``ctx.epoch`` below it) during which the descent is skipped.
    """

    stage = Stage.ANTI
    reads = ("x_adv", "eps")
    writes = ("x_anti",)

    def __init__(
        self,
        steps: int = 1,
        step_size: float | None = None,
        *,
        norm: Norm = "linf",
        bn_mode: BNMode = "eval",
        loss_scale: float = DEFAULT_LOSS_SCALE,
        burn_in_epochs: int = 0,
    ) -> None:
        _check_budget(None, 0.0 if step_size is None else step_size, steps)
        _check_options(norm, bn_mode)
        _check_burn_in(burn_in_epochs)
        self.steps, self.step_size, self.norm = steps, step_size, norm
        self.bn_mode, self.loss_scale, self.burn_in_epochs = bn_mode, loss_scale, burn_in_epochs

    def __call__(self, ctx: StepContext) -> None:
        if ctx.epoch < self.burn_in_epochs:
            ctx.x_anti = ctx.x_adv
            return
        ctx.x_anti = adversarys_adversary(
            ctx.attack_model, ctx.inputs, ctx.x_adv, ctx.targets, eps=_budget(ctx), step_size=self.step_size,
            steps=self.steps, norm=self.norm, bn_mode=self.bn_mode, loss_scale=self.loss_scale, check_values=False,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"AdversarysAdversary(steps={self.steps}, step_size={self.step_size}, norm={self.norm!r}, "
            f"bn_mode={self.bn_mode!r}, burn_in_epochs={self.burn_in_epochs})"
        )


class AntiAdversary(Callback):
    """Writes ``x_anti``: CAAT's anti-adversary, descent on ``CE`` from ``x + 0.001 * N(0, I)``.

    Args:
        eps: Budget in pixels. ``None`` (the default) reads the per-sample ``eps [B]`` of the
            context, i.e. the attack's (possibly class-wise) budget.
        step_size: Step in pixels, 2/255 by default; with ``relative_step_size`` a multiple of
            each sample's eps.
        steps: Number of descent steps, 10 by default: ``steps`` forwards and backwards.
        start: ``"normal"`` (the default), ``"uniform"`` or ``"none"``.
        norm: ``"linf"`` (the default) or ``"l2"``.
        bn_mode: BatchNorm/dropout mode during the descent, eval by default.
        relative_step_size: Read ``step_size`` as a fraction of each sample's eps.
        loss_scale: Multiplier of the loss before differentiation (fp16 safety).
        generator: Random generator for the start.
    """

    stage = Stage.ANTI
    writes = ("x_anti",)

    def __init__(
        self,
        eps: float | None = None,
        step_size: float = 2 / 255,
        steps: int = 10,
        *,
        start: Start = "normal",
        norm: Norm = "linf",
        bn_mode: BNMode = "eval",
        relative_step_size: bool = False,
        loss_scale: float = DEFAULT_LOSS_SCALE,
        generator: torch.Generator | None = None,
    ) -> None:
        _check_budget(eps, step_size, steps)
        _check_options(norm, bn_mode, start)
        if relative_step_size and eps is not None:
            raise ValueError("relative_step_size needs the per-sample eps of the context: leave eps=None")
        self.eps, self.step_size, self.steps = eps, step_size, steps
        self.start, self.norm, self.bn_mode = start, norm, bn_mode
        self.relative_step_size, self.loss_scale, self.generator = relative_step_size, loss_scale, generator
        # A scalar eps is not written back: `eps` belongs to the attack (one writer per field).
        self.reads = ("eps",) if eps is None else ()

    def __call__(self, ctx: StepContext) -> None:
        eps = _budget(ctx) if self.eps is None else self.eps
        ctx.x_anti = anti_adversary(
            ctx.attack_model, ctx.inputs, ctx.targets, eps=eps,
            step_size=eps * self.step_size if self.relative_step_size else self.step_size, steps=self.steps,
            start=self.start, norm=self.norm, bn_mode=self.bn_mode, loss_scale=self.loss_scale,
            generator=self.generator, check_values=False,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"AntiAdversary(eps={self.eps}, step_size={self.step_size}, steps={self.steps}, start={self.start!r}, "
            f"norm={self.norm!r}, bn_mode={self.bn_mode!r})"
        )
