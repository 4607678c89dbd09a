"""Anti-adversary generators: projected *descent* on ``CE(f(.), y)``, written to ``x_anti``.

Two starting points, one loop (``robustmix.attacks.pgd.perturb`` with ``descend=True``):

- the adversary's adversary (ADA-Lab) starts at ``x_adv`` and walks back towards the true class,
  inside the attack's ball ``B(x, eps)`` (or, unprojected, inside ``[0, 1]`` only); it can stop each
  example once it is classified correctly again (``recovering_descent``);
- the anti-adversary (CAAT) starts at ``x + 0.001 * N(0, I)`` and makes the clean input more
  confidently correct.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustmix.attacks.callbacks import check_budget, count_compiled_passes
from robustmix.attacks.pgd import DEFAULT_LOSS_SCALE, NORMS, STARTS, Norm, Start, perturb
from robustmix.checks import check_int
from robustmix.core.callbacks import Callback
from robustmix.core.context import Stage, StepContext
from robustmix.core.modes import BNMode, check_bn_mode


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
    project: bool = True,
    check_values: bool = True,
    compile_backend: str | None = None,
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
        project: Project every step onto ``B(x, eps)`` (the default). ``False`` keeps only the
            ``[0, 1]`` box: ``x_aa`` is then within ``eps + steps * step_size`` of ``x`` (``descent_radius``).
        check_values: Check the values of ``x`` and ``y`` first (see ``perturb``); callbacks pass ``False``.
        compile_backend: Run the descent steps compiled (``perturb``'s ``compile_backend``); ``None``: eager.

    Returns:
        ``x_aa [B, ...]``, detached, in ``B(x, descent_radius(...))`` and [0, 1].
    """
    if step_size is None:
        step_size = eps * 0.5
    return perturb(
        model, x, y, eps=descent_radius(eps, step_size, steps, project), step_size=step_size, steps=steps, norm=norm,
        loss="ce", descend=True, x_init=x_adv, bn_mode=bn_mode, loss_scale=loss_scale, check_values=check_values,
        compile_backend=compile_backend,
    )  # fmt: skip


def descent_radius(eps: float | Tensor, step_size: float | Tensor, steps: int, project: bool) -> float | Tensor:
    """The ball the adversary's adversary stays in: ``eps`` projected, else ``eps + steps * step_size``.

    ``steps`` steps of length ``step_size`` from ``x_adv`` in ``B(x, eps)`` never leave the larger ball,
    so projecting onto it is the same as not projecting (only the ``[0, 1]`` box binds).
    """
    return eps if project else eps + steps * step_size


def recovering_descent(
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
    project: bool = True,
    check_values: bool = True,
    compile_backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The adversary's adversary that recovers the class: each example descends until ``argmax f = y``.

    At most ``steps`` descent steps on ``CE(f(.), y)`` from ``x_adv``; an example whose iterate is
    classified ``y`` stops there for good. Every example is still forwarded and differentiated at
    every step, so the cost is ``steps`` forwards and backwards whatever the batch (the same work on
    every DDP rank, no host read in the loop).

    Args:
        model: Classifier taking pixels in [0, 1]; pass the unwrapped module under DDP.
        x: Clean images ``[B, ...]``, pixels in [0, 1]: the centre of the ball.
        x_adv: Adversarial examples ``[B, ...]`` in ``B(x, eps)``: the start.
        y: Labels ``[B]``.
        eps: Radius of the ball in pixels, a float or per-sample ``[B]``; the attack's budget.
        step_size: Step in pixels, a float or per-sample ``[B]``; by default half of ``eps``.
        steps: The most descent steps (``K_aa``), one by default.
        norm: ``"linf"`` (sign steps, the default) or ``"l2"``; use the attack's norm.
        bn_mode: BatchNorm/dropout mode during the descent, eval by default.
        loss_scale: Multiplier of the loss before differentiation (fp16 safety).
        project: Project onto ``B(x, eps)`` (the default); ``False`` keeps ``[0, 1]`` only (``descent_radius``).
        check_values: Check the values of ``x`` and ``y`` at the first step (``perturb``); callbacks pass ``False``.
        compile_backend: Run the descent steps compiled (``perturb``'s ``compile_backend``); ``None``: eager.

    Returns:
        ``x_aa [B, ...]`` (detached, in ``B(x, descent_radius(...))`` and [0, 1]) and the descent steps
            each example took ``[B]`` (int64 in ``{0..steps}``): 0 when ``x_adv`` is classified ``y`` already.
            Whether the last step recovered the class is not known without one more forward.
    """
    if step_size is None:
        step_size = eps * 0.5
    radius = descent_radius(eps, step_size, steps, project)
    recovered = torch.zeros(y.shape, dtype=torch.bool, device=y.device)
    taken = torch.zeros(y.shape, dtype=torch.int64, device=y.device)

    def observe(k: int, logits: Tensor, x_k: Tensor) -> None:
        recovered.logical_or_(logits.argmax(dim=1) == y)

    x_aa = x_adv.detach()
    for k in range(steps):
        # One step from x_aa; the observer sees the logits of x_aa from that step's own forward.
        x_next = perturb(
            model, x, y, eps=radius, step_size=step_size, steps=1, norm=norm, loss="ce", descend=True, x_init=x_aa,
            bn_mode=bn_mode, observer=observe, loss_scale=loss_scale, check_values=check_values and k == 0,
            compile_backend=compile_backend,
        )  # fmt: skip
        x_aa = torch.where(recovered.view(-1, *([1] * (x.dim() - 1))), x_aa, x_next)
        taken += ~recovered
    return x_aa, taken


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
    compile_backend: str | None = None,
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
        compile_backend: Run the descent steps compiled (``perturb``'s ``compile_backend``); ``None``: eager.

    Returns:
        ``x_anti [B, ...]``, detached, in ``B(x, eps)`` and [0, 1].
    """
    return perturb(
        model, x, y, eps=eps, step_size=step_size, steps=steps, norm=norm, loss="ce", start=start, descend=True,
        bn_mode=bn_mode, loss_scale=loss_scale, generator=generator, check_values=check_values,
        compile_backend=compile_backend,
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

    With ``until_recovered`` each example stops once it is classified correctly again
    (``recovering_descent``), and the callback also writes ``aa_steps [B]`` (int64 in
    ``{0..steps + 1}``): the descent steps the example needed, ``steps + 1`` when ``x_aa`` is still
    misclassified. That last check reads the eval-mode logits of ``x_anti``, memoized for the
    step: free when the labels read them too (``AdaLabLabels``), one forward otherwise. During the
    burn-in ``aa_steps`` is zero.

    Args:
        steps: Number of descent steps ``K_aa`` (the most with ``until_recovered``); one by default.
        step_size: Step in pixels; by default half of each sample's eps.
        norm: ``"linf"`` (the default) or ``"l2"``; use the attack's norm.
        bn_mode: BatchNorm/dropout mode during the descent, eval by default.
        loss_scale: Multiplier of the loss before differentiation (fp16 safety).
        burn_in_epochs: Epochs (``ctx.epoch`` below it) during which the descent is skipped.
        until_recovered: Stop each example once ``argmax f(x_aa) = y``, and write ``aa_steps``.
        project: Project onto the attack's ball (the default); ``False`` keeps ``[0, 1]`` only, within
            ``eps + steps * step_size`` of ``x``.
    """

    stage = Stage.ANTI
    reads = ("x_adv", "eps")

    def __init__(
        self,
        steps: int = 1,
        step_size: float | None = None,
        *,
        norm: Norm = "linf",
        bn_mode: BNMode = "eval",
        loss_scale: float = DEFAULT_LOSS_SCALE,
        burn_in_epochs: int = 0,
        until_recovered: bool = False,
        project: bool = True,
    ) -> None:
        check_budget(None, 0.0 if step_size is None else step_size, steps)
        _check_options(norm, bn_mode)
        check_int("burn_in_epochs", burn_in_epochs, 0)
        if until_recovered and steps < 1:
            raise ValueError("until_recovered needs steps >= 1 (the most descent steps an example may take)")
        self.steps, self.step_size, self.norm = steps, step_size, norm
        self.bn_mode, self.loss_scale, self.burn_in_epochs = bn_mode, loss_scale, burn_in_epochs
        self.until_recovered, self.project = until_recovered, project
        self.writes = ("x_anti", "aa_steps") if until_recovered else ("x_anti",)

    def __call__(self, ctx: StepContext) -> None:
        if ctx.epoch < self.burn_in_epochs:
            ctx.x_anti = ctx.x_adv
            if self.until_recovered:
                ctx.aa_steps = torch.zeros_like(ctx.targets)
            return
        kwargs = dict(
            eps=_budget(ctx), step_size=self.step_size, steps=self.steps, norm=self.norm, bn_mode=self.bn_mode,
            loss_scale=self.loss_scale, project=self.project, check_values=False, compile_backend=ctx.attack_backend,
        )  # fmt: skip
        count_compiled_passes(ctx, self.steps)
        if not self.until_recovered:
            ctx.x_anti = adversarys_adversary(ctx.attack_model, ctx.inputs, ctx.x_adv, ctx.targets, **kwargs)
            return
        ctx.x_anti, taken = recovering_descent(ctx.attack_model, ctx.inputs, ctx.x_adv, ctx.targets, **kwargs)
        ctx.aa_steps = taken + (ctx.get_eval_logits("anti").argmax(dim=1) != ctx.targets)

    def __repr__(self) -> str:
        return (
            f"AdversarysAdversary(steps={self.steps}, step_size={self.step_size}, norm={self.norm!r}, "
            f"bn_mode={self.bn_mode!r}, burn_in_epochs={self.burn_in_epochs}"
            + (", until_recovered=True" if self.until_recovered else "")
            + (", project=False" if not self.project else "")
            + ")"
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
        check_budget(eps, step_size, steps, norm)
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
            generator=self.generator, check_values=False, compile_backend=ctx.attack_backend,
        )  # fmt: skip
        count_compiled_passes(ctx, self.steps)

    def __repr__(self) -> str:
        return (
            f"AntiAdversary(eps={self.eps}, step_size={self.step_size}, steps={self.steps}, start={self.start!r}, "
            f"norm={self.norm!r}, bn_mode={self.bn_mode!r})"
        )
