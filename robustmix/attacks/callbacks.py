"""Attack generators as step callbacks: thin wrappers that move tensors between the context and
``robustmix.attacks.pgd.perturb``."""

from __future__ import annotations

import torch
from torch import Tensor

from robustmix.attacks.pgd import (
    DEFAULT_LOSS_SCALE,
    NORMS,
    STARTS,
    Norm,
    Start,
    check_eps,
    check_loss_scale,
    perturb,
)
from robustmix.checks import check_int, is_number
from robustmix.core.callbacks import Callback
from robustmix.core.context import Stage, StepContext
from robustmix.core.modes import BNMode, check_bn_mode


def count_compiled_passes(ctx: StepContext, steps: int) -> None:
    """Count the passes of ``steps`` attack iterations that ran compiled (``ctx.attack_backend``): they call
    ``model.forward`` directly, past the pass counter's hook."""
    if ctx.attack_backend is not None:
        ctx.counter.add(steps * ctx.batch_size)


def check_budget(eps: float | None, step_size: float, steps: int, norm: Norm = "linf") -> None:
    """Check an attack generator's budget: ``eps`` in pixels (``None``: per-sample, from a budget callback),
    ``step_size`` a finite number >= 0 and ``steps`` an integer >= 0.

    Raises:
        TypeError: ``eps`` or ``step_size`` is not a number.
        ValueError: a value out of range.
    """
    for name, value in (("eps", eps), ("step_size", step_size)):
        if not (is_number(value) or (name == "eps" and value is None)):
            hint = "; per-sample budgets come from a budget callback writing ctx.eps (eps=None)"
            hint = hint if name == "eps" else ""
            raise TypeError(f"{name} must be a number of pixels, got {type(value).__name__}{hint}")
    if eps is not None:
        check_eps(eps, norm if norm in NORMS else "linf")
    if not (0 <= step_size < float("inf")):
        raise ValueError(f"step_size must be a finite number >= 0, got {step_size}")
    check_int("steps", steps, 0)


class PGDAttack(Callback):
    """Writes ``x_adv`` with PGD on ``loss`` (CE, TRADES' KL or the CW margin).

    Args:
        eps: Budget in pixels. ``None`` reads a per-sample ``eps [B]`` written by a budget
            callback (e.g. class-wise multipliers) instead.
        step_size: Step in pixels; with ``relative_step_size`` a multiple of each sample's eps.
        steps: Number of steps ``K``: K forwards and K backwards (plus one eval forward of the
            clean input for ``loss="kl"``).
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"``, ``"kl"`` (TRADES: ``KL(p(x) || p(x'))`` with ``p(x)`` from the eval-mode
            clean forward) or ``"cw"``.
        start: ``"uniform"``, ``"normal"`` (``0.001 * N(0, I)``) or ``"none"``.
        bn_mode: ``"eval"`` (default), ``"train"`` or ``"train_frozen_bn"``.
        track_kappa: Also write GAIRAT's ``kappa [B]``: how many of the K iterates are still
            classified correctly, counted from the logits the attack computes anyway.
        loss_scale: Multiplier of the attack loss against fp16 gradient underflow.
        generator: Random generator for the start.
    """

    stage = Stage.ATTACK

    def __init__(
        self,
        eps: float | None = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        *,
        norm: Norm = "linf",
        loss: str = "ce",
        start: Start = "uniform",
        bn_mode: BNMode = "eval",
        relative_step_size: bool = False,
        track_kappa: bool = False,
        loss_scale: float = DEFAULT_LOSS_SCALE,
        generator: torch.Generator | None = None,
    ) -> None:
        check_budget(eps, step_size, steps, norm)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        if loss not in ("ce", "kl", "cw"):
            raise ValueError(f"PGDAttack loss must be 'ce', 'kl' or 'cw', got {loss!r}")
        check_bn_mode(bn_mode)
        check_loss_scale(loss_scale)
        self.eps, self.step_size, self.steps = eps, step_size, steps
        self.norm, self.loss, self.start, self.bn_mode = norm, loss, start, bn_mode
        self.relative_step_size, self.track_kappa = relative_step_size, track_kappa
        self.loss_scale, self.generator = loss_scale, generator
        self.reads = ("eps",) if eps is None else ()
        if loss == "kl":
            self.reads += ("eval_logits_clean",)
        self.writes = ("x_adv",) + (("eps",) if eps is not None else ()) + (("kappa",) if track_kappa else ())

    def __call__(self, ctx: StepContext) -> None:
        if self.eps is not None:
            ctx.eps = torch.full((ctx.batch_size,), self.eps, device=ctx.inputs.device, dtype=ctx.inputs.dtype)
            ctx.uniform_eps = self.eps
        budget = ctx.eps if self.eps is None else self.eps  # a float needs no host read to check it
        step_size: float | Tensor = budget * self.step_size if self.relative_step_size else self.step_size
        observer = None
        if self.track_kappa:
            kappa = torch.zeros(ctx.batch_size, dtype=torch.int64, device=ctx.inputs.device)

            def observer(k: int, logits: Tensor, x_k: Tensor) -> None:
                kappa.add_(logits.argmax(dim=1) == ctx.targets)

        ctx.x_adv = perturb(
            ctx.attack_model,
            ctx.inputs,
            ctx.targets,
            eps=budget,
            step_size=step_size,
            steps=self.steps,
            norm=self.norm,
            loss=self.loss,
            start=self.start,
            reference=ctx.get_eval_logits("clean") if self.loss == "kl" else None,
            bn_mode=self.bn_mode,
            observer=observer,
            loss_scale=self.loss_scale,
            generator=self.generator,
            check_values=False,
            compile_backend=ctx.attack_backend,
        )  # fmt: skip  (the step checked the batch's values; the per-sample eps is checked in perturb)
        count_compiled_passes(ctx, self.steps)
        if self.track_kappa:
            ctx.kappa = kappa

    def __repr__(self) -> str:
        return (
            f"PGDAttack(eps={self.eps}, step_size={self.step_size}, steps={self.steps}, norm={self.norm!r}, "
            f"loss={self.loss!r}, start={self.start!r}, bn_mode={self.bn_mode!r})"
        )


class FGSMAttack(PGDAttack):
    """FGSM with a uniform random start (fast AT, Wong et al. 2020): one step of ``1.25 * eps``.

    Costs one forward and one backward. ``step_size`` defaults to ``1.25 * eps``.
    """

    def __init__(
        self,
        eps: float = 8 / 255,
        step_size: float | None = None,
        *,
        bn_mode: BNMode = "eval",
        loss_scale: float = DEFAULT_LOSS_SCALE,
        generator: torch.Generator | None = None,
    ) -> None:
        if not is_number(eps):
            raise TypeError(f"FGSMAttack needs a scalar eps (a number of pixels), got {type(eps).__name__}")
        super().__init__(
            eps, 1.25 * eps if step_size is None else step_size, 1, start="uniform", bn_mode=bn_mode,
            loss_scale=loss_scale, generator=generator,
        )  # fmt: skip
