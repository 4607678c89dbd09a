"""Adversarial weight perturbation (AWP, Wu et al. 2020): train at the worst weights near the current ones.

After the attack has crafted ``x_adv`` at weights ``w``, one step of gradient *ascent* of the training
loss gives the direction ``d_l`` of every weight tensor ``l``; the perturbation rescales it to the size of
the layer, ``gamma * d_l * ||w_l|| / ||d_l||``. The step adds it to the weights before the training
forward, and the optimizer step that follows uses the gradient taken at the perturbed weights; then the
perturbation comes off again.

The released code copies the model to a proxy, takes one SGD step (lr 0.01) on the proxy and reads
``d = w' - w``. robustmix takes the same gradient of the real (unwrapped) model with
``torch.autograd.grad``, in train mode with the BatchNorm running statistics frozen: ``d = lr * grad`` is
what the proxy's step would give, without a second copy of the model, without copying its weights into
the proxy at every step, and without touching any ``.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from robustmix.attacks.pgd import DEFAULT_LOSS_SCALE
from robustmix.checks import check_int, check_number
from robustmix.core.callbacks import Callback
from robustmix.core.context import Stage, StepContext
from robustmix.core.modes import model_mode
from robustmix.stages.losses import classification_loss, trades_loss

#: Training losses whose ascent sets the perturbation: PGD-AT's CE on ``x_adv``, or TRADES' loss.
AWP_LOSSES = ("ce", "trades")
#: Guard of the released code against a zero ascent direction.
_NORM_EPS = 1e-20


def awp_perturbation(
    model: nn.Module, loss_fn: Callable[[nn.Module], Tensor], gamma: float, proxy_lr: float = 0.01
) -> dict[str, Tensor]:
    """AWP's weight perturbation ``gamma * v`` for every parameter with more than one dimension.

    ``d_l = proxy_lr * grad_l`` is one SGD step that ascends ``loss_fn(model)`` and
    ``v_l = d_l * ||w_l|| / (||d_l|| + 1e-20)``, so ``||gamma * v_l|| = gamma * ||w_l||``: each layer moves by
    ``gamma`` relative to its own norm. Biases and normalization parameters (1-d) are not perturbed.

    The forward runs ``model`` in train mode (batch statistics, dropout on, as the released code's proxy)
    with BatchNorm running statistics left untouched; the gradient comes from ``torch.autograd.grad``, so
    no ``.grad`` changes. Under ``torch.distributed`` the gradient is averaged over the processes first:
    every rank gets the same perturbation, the one of the global batch. A layer whose gradient is not
    finite (fp16 overflow) gets no perturbation.

    Args:
        model: The model, unwrapped (no DDP: the all-reduce here is the only collective).
        loss_fn: Computes the scalar training loss of ``model`` (e.g. CE of ``model(x_adv)``).
        gamma: Relative size of the perturbation per layer (>= 0); 0.01 for AT, 0.005 for TRADES.
        proxy_lr: Learning rate of the ascent step, 0.01 by default. The direction does not depend on it;
            it only matters against the ``1e-20`` guard.

    Returns:
        ``{parameter name: perturbation}``, each shaped and typed like its parameter, detached.
    """
    _check_awp(gamma, proxy_lr)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    if not named:
        return {}
    with torch.enable_grad(), model_mode(model, "train_frozen_bn"):
        # A power-of-two scale keeps fp16 gradients from underflowing; the direction is scale-invariant.
        loss = loss_fn(model).float() * DEFAULT_LOSS_SCALE
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads, strict=True)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # One coalesced all-reduce: each rank's x_adv differs, the perturbation must not.
        flat = torch.cat([_at_least_float32(g).flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]

    perturbation = {}
    for (name, param), grad in zip(named, grads, strict=True):
        ascent = _at_least_float32(grad) * (proxy_lr / DEFAULT_LOSS_SCALE)
        ascent_norm = ascent.norm()
        v = ascent * (_at_least_float32(param.detach()).norm() / (ascent_norm + _NORM_EPS))
        v = torch.where(torch.isfinite(ascent_norm), v, torch.zeros_like(v))
        perturbation[name] = (gamma * v).to(param.dtype)
    return perturbation


def _at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32, or as it is when it is wider (float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_awp(gamma: float, proxy_lr: float) -> None:
    if not (0 <= gamma < math.inf):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    if not (0 < proxy_lr < math.inf):
        raise ValueError(f"proxy_lr must be a finite number > 0, got {proxy_lr}")


class AWP(Callback):
    """Adds AWP's weight perturbation before the training forward and removes it after the optimizer step.

    Runs at ``Stage.PERTURB``: after the attack (which sees the unperturbed weights, as in the
    released code) and before every training forward. ``on_after_optimizer_step`` takes the perturbation
    off again, exactly once per step, also when the fp16 GradScaler skipped the optimizer step: a user's
    own loop must fire it (``step.fire("on_after_optimizer_step", None, optimizer)``) after every
    ``optimizer.step()``. The optimizer's update is carried over to the unperturbed weights, so an update
    of zero leaves them bit for bit as they were. Callbacks that read the weights in
    ``on_after_optimizer_step`` (e.g. a weight average) should come after AWP in the list.

    Costs one forward and one backward per step for ``loss="ce"``, two of each for ``loss="trades"``,
    and, between the perturbation and the removal, memory for the unperturbed weights and the
    perturbation of every perturbed tensor.

    Args:
        gamma: Relative size of the perturbation per layer (>= 0): 0.01 for AT, 0.005 for TRADES.
        proxy_lr: Learning rate of the ascent step, 0.01 by default (see ``awp_perturbation``).
        warmup_epochs: Epochs without perturbation at the start, 0 by default (TRADES-AWP uses 10).
        loss: The loss the perturbation ascends: ``"ce"`` (PGD-AT, the default) or ``"trades"``.
        beta: TRADES' KL weight for ``loss="trades"``, 6 by default.
    """

    stage = Stage.PERTURB
    reads = ("x_adv",)
    accumulates = False  # one perturbation per optimizer step, taken off after it

    def __init__(
        self, gamma: float = 0.01, proxy_lr: float = 0.01, warmup_epochs: int = 0, loss: str = "ce", beta: float = 6.0
    ) -> None:
        _check_awp(gamma, proxy_lr)
        check_int("warmup_epochs", warmup_epochs, 0)
        if loss not in AWP_LOSSES:
            raise ValueError(f"loss must be one of {AWP_LOSSES}, got {loss!r}")
        check_number("beta", beta)
        self.gamma, self.proxy_lr, self.warmup_epochs = gamma, proxy_lr, warmup_epochs
        self.loss, self.beta = loss, beta
        #: ``(parameter, unperturbed weights, perturbation)`` of the step in flight.
        self._applied: list[tuple[nn.Parameter, Tensor, Tensor]] = []

    def __call__(self, ctx: StepContext) -> None:
        if self._applied:
            raise RuntimeError(
                "AWP's perturbation of the previous step is still on the weights: call "
                "step.fire('on_after_optimizer_step', None, optimizer) after every optimizer.step()"
            )
        if ctx.logits:
            raise RuntimeError(
                f"AWP must run before any training forward, but the logits of {sorted(ctx.logits)} were computed "
                "at the unperturbed weights; no callback may read training logits before Stage.PERTURB"
            )
        if ctx.epoch < self.warmup_epochs or self.gamma == 0:
            return
        perturbation = awp_perturbation(ctx.attack_model, self._loss_fn(ctx), self.gamma, self.proxy_lr)
        parameters = dict(ctx.attack_model.named_parameters())
        with torch.no_grad():
            for name, delta in perturbation.items():
                param = parameters[name]
                self._applied.append((param, param.detach().clone(), delta))
                param.add_(delta)

    def _loss_fn(self, ctx: StepContext) -> Callable[[nn.Module], Tensor]:
        if self.loss == "ce":
            return lambda model: classification_loss(model(ctx.x_adv), ctx.targets)
        return lambda model: trades_loss(model(ctx.inputs), model(ctx.x_adv), ctx.targets, self.beta)

    def on_after_optimizer_step(self, trainer: Any, optimizer: Optimizer) -> None:
        with torch.no_grad():
            for param, unperturbed, delta in self._applied:
                # The weights are (w + delta) + u, u the optimizer's update (0 when the step was skipped).
                # Subtracting the perturbed weights recovers u (exactly when u is small against them, by
                # Sterbenz's lemma) and w + u is one rounding away: w itself, bit for bit, when u == 0,
                # which (w + delta + u) - delta does not guarantee.
                param.sub_(unperturbed + delta).add_(unperturbed)
        self._applied.clear()

    def __repr__(self) -> str:
        return (
            f"AWP(gamma={self.gamma}, proxy_lr={self.proxy_lr}, warmup_epochs={self.warmup_epochs}, "
            f"loss={self.loss!r}, beta={self.beta})"
        )
