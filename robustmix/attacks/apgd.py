"""Auto-PGD (APGD) of Croce & Hein (ICML 2020): PGD with momentum and a step size it halves by itself.

APGD replaces PGD's hand-tuned step size with a budget-aware schedule: it starts at ``2 * eps``,
checks progress at fixed checkpoints and halves the step per sample when the loss stopped
increasing often enough, restarting that sample from its best point. The untargeted version
ascends CE or DLR; APGD-T ascends the targeted DLR loss towards each of the top non-true classes.

Differences from the reference implementation (fra31/auto-attack), all for synchronization-free,
rank-uniform work: every restart and every target attacks the whole batch (the reference drops
examples already misclassified, which needs a host sync and gives ranks different work); the
random start is uniform in the ball (``robustmix.attacks.pgd.random_start``); the
step-halving test uses the paper's ``< rho`` on the window's own increases.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from robustmix.attacks.objectives import Objective, cross_entropy, dlr, targeted_dlr
from robustmix.attacks.pgd import (
    DEFAULT_LOSS_SCALE,
    Norm,
    autograd_input,
    check_attack_inputs,
    check_eps,
    flat_norm,
    project,
    random_start,
)
from robustmix.checks import check_int
from robustmix.core.modes import BNMode, check_bn_mode, model_mode

APGDLoss = Literal["ce", "dlr", "targeted_dlr"]
#: One run's result: ``(x_out [B, ...], fooled [B] bool, best loss [B])``.
_Run = tuple[Tensor, Tensor, Tensor]
_OBJECTIVES: dict[str, tuple[Objective, int]] = {
    # name -> (objective, minimum number of classes it is defined for)
    "ce": (cross_entropy, 2),
    "dlr": (dlr, 3),
    "targeted_dlr": (targeted_dlr, 4),
}


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations after which APGD may halve its step: ``w_j = ceil(p_j * steps)``.

    ``p_0 = 0``, ``p_1 = 0.22`` and ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, kept while
    ``p_j <= 1``; e.g. ``[22, 41, 57, 70, 80, 87, 93, 99]`` for 100 steps. Duplicates (few steps)
    are dropped.
    """
    # Integer hundredths keep the recurrence exact: 0.41 * 100 must give 41, not 42 after ceil.
    previous, current = 0, 22
    checkpoints: list[int] = []
    while current <= 100:
        iteration = -(-current * steps // 100)
        if iteration > 0 and (not checkpoints or iteration > checkpoints[-1]):
            checkpoints.append(iteration)
        previous, current = current, current + max(current - previous - 3, 6)
    return checkpoints


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 100,
    norm: Norm = "linf",
    loss: APGDLoss = "ce",
    restarts: int = 1,
    target_class: Tensor | None = None,
    rho: float = 0.75,
    momentum: float = 0.75,
    seed: int = 0,
    bn_mode: BNMode = "eval",
    loss_scale: float = DEFAULT_LOSS_SCALE,
) -> Tensor:
    """Untargeted (CE, DLR) or targeted (targeted DLR) APGD.

    Each restart runs ``steps + 1`` forwards and backwards on the whole batch (no early exit),
    from a uniform random start in the ball.

    Args:
        model: Classifier taking pixels in [0, 1] ``[B, ...]`` and returning logits ``[B, C]``.
            Under DDP pass the unwrapped module.
        x: Clean images ``[B, ...]``, pixels in [0, 1].
        y: Labels ``[B]`` (int64).
        eps: Radius of the L-inf or L2 ball around ``x``, in pixels.
        steps: Iterations per restart; the step-size checkpoints scale with it.
        norm: ``"linf"`` (sign steps) or ``"l2"`` (normalized gradient steps).
        loss: ``"ce"``, ``"dlr"`` (needs 3 classes) or ``"targeted_dlr"`` (needs 4 classes and
            ``target_class``).
        restarts: Independent runs from fresh random starts; per sample, the result of a later
            run replaces the earlier one only if it misclassifies where the earlier did not, or
            neither does and its loss is higher.
        target_class: Target classes ``[B]`` for ``"targeted_dlr"``; must be None otherwise.
        rho: Halve the step when fewer than this fraction of the steps since the last checkpoint
            increased the loss.
        momentum: Weight of the new projected step against the previous move (1 is plain PGD).
        seed: Seed of the random starts (a generator on ``x``'s device).
        bn_mode: BatchNorm/dropout mode during the attack: ``"eval"``, ``"train"`` or
            ``"train_frozen_bn"``.
        loss_scale: Multiplier of the summed loss before differentiation (fp16 safety).

    Returns:
        ``x_adv [B, ...]`` in ``B(x, eps)`` and [0, 1], detached: per sample, a misclassified
            iterate if any was found, else the iterate with the highest loss.
    """
    objective = _check_apgd(x, y, eps, steps, norm, loss, restarts, rho, momentum)
    if (loss == "targeted_dlr") != (target_class is not None):
        raise ValueError("target_class [B] is required with loss='targeted_dlr' and only with it")
    if target_class is not None and target_class.shape != y.shape:
        raise ValueError(f"target_class must have shape [B] = [{y.shape[0]}], got {list(target_class.shape)}")
    check_bn_mode(bn_mode)
    with torch.inference_mode(False), torch.enable_grad(), model_mode(model, bn_mode):
        x, y = autograd_input(x), autograd_input(y)
        target_class = None if target_class is None else autograd_input(target_class)
        _check_num_classes(model, x[:1], loss)
        generator = torch.Generator(device=x.device).manual_seed(seed)
        best = None
        for _ in range(restarts):
            run = _apgd_run(
                model, x, y, objective, target_class, eps, steps, norm, rho, momentum, loss_scale, generator
            )
            best = run if best is None else _merge(best, run)
    return best[0]


def apgd_targeted(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 100,
    norm: Norm = "linf",
    n_target_classes: int = 9,
    restarts: int = 1,
    rho: float = 0.75,
    momentum: float = 0.75,
    seed: int = 0,
    bn_mode: BNMode = "eval",
    loss_scale: float = DEFAULT_LOSS_SCALE,
) -> Tensor:
    """APGD-T: targeted-DLR APGD towards each of the ``n_target_classes`` most likely wrong classes.

    The targets are the non-true classes ranked 1st to ``min(n_target_classes, C - 1)``-th by the
    clean logits (for a correctly classified image, the classes ranked 2nd..10th). Every target
    costs ``restarts * (steps + 1)`` forwards and backwards on the whole batch, plus one clean
    forward in all.

    ``x``, ``y``, ``eps``, ``steps``, ``norm``, ``restarts``, ``rho``, ``momentum``, ``seed``, ``bn_mode`` and
    ``loss_scale`` are as in ``apgd``.

    Args:
        model: Classifier with at least 4 classes (the targeted DLR loss needs them).
        n_target_classes: How many target classes to try (9 in AutoAttack).

    Returns:
        ``x_adv [B, ...]`` in ``B(x, eps)`` and [0, 1]: per sample, a misclassified point if any
            target run found one, else the point with the highest targeted DLR loss over all targets.
    """
    _check_apgd(x, y, eps, steps, norm, "targeted_dlr", restarts, rho, momentum)
    check_int("n_target_classes", n_target_classes, 1)
    check_bn_mode(bn_mode)
    with torch.inference_mode(False), torch.enable_grad(), model_mode(model, bn_mode):
        x, y = autograd_input(x), autograd_input(y)
        _, targets = ranked_targets(model, x, y, n_target_classes, 4, "APGD-T (targeted DLR)")
        n_targets = targets.shape[1]
        generator = torch.Generator(device=x.device).manual_seed(seed)
        best = None
        for t in range(n_targets):
            for _ in range(restarts):
                run = _apgd_run(
                    model, x, y, targeted_dlr, targets[:, t], eps, steps, norm, rho, momentum, loss_scale, generator
                )
                best = run if best is None else _merge(best, run)
    return best[0]


def _apgd_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    objective: Objective,
    reference: Tensor | None,
    eps: float,
    steps: int,
    norm: Norm,
    rho: float,
    momentum: float,
    loss_scale: float,
    generator: torch.Generator,
) -> _Run:
    """One APGD run from a fresh random start."""

    def loss_and_grad(x_k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_k = x_k.detach().requires_grad_(True)
        logits = model(x_k)
        loss = objective(logits, y, reference)
        (grad,) = torch.autograd.grad(loss.sum() * loss_scale, x_k)
        # fp16 overflow would turn into NaN and poison the iterate; such coordinates do not move.
        return loss.detach(), torch.nan_to_num(grad, nan=0.0), logits.detach().argmax(dim=1) != y

    def ascent_direction(grad: Tensor) -> Tensor:
        return grad.sign() if norm == "linf" else grad / (flat_norm(grad) + 1e-12)

    def per_sample(mask: Tensor) -> Tensor:
        return mask.view(-1, *([1] * (x.dim() - 1)))

    checkpoints = set(apgd_checkpoints(steps))
    x_k = random_start(x, eps, norm, "uniform", generator)
    loss_k, grad, fooled = loss_and_grad(x_k)
    x_best, loss_best, grad_best = x_k, loss_k, grad
    # Only rows where `fooled` is True are meaningful in x_fooled.
    x_fooled = x_k
    step = torch.full_like(loss_k, 2.0 * eps).to(x.dtype)
    x_prev = x_k
    increases = torch.zeros_like(loss_k)
    last_checkpoint = 0
    loss_best_at_checkpoint = loss_best
    # True at the start so that the "no progress at an unchanged step" rule first applies at the second checkpoint.
    halved_at_checkpoint = torch.ones_like(fooled)

    for i in range(steps):
        alpha = 1.0 if i == 0 else momentum
        z = project(x_k + per_sample(step) * ascent_direction(grad), x, eps, norm)
        x_next = project(x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_prev), x, eps, norm)
        x_prev, x_k = x_k, x_next

        loss_next, grad, fooled_now = loss_and_grad(x_k)
        increases += loss_next > loss_k
        loss_k = loss_next
        x_fooled = torch.where(per_sample(fooled_now), x_k, x_fooled)
        fooled = fooled | fooled_now
        improved = loss_next > loss_best
        x_best = torch.where(per_sample(improved), x_k, x_best)
        grad_best = torch.where(per_sample(improved), grad, grad_best)
        loss_best = torch.where(improved, loss_next, loss_best)

        if i + 1 in checkpoints:
            oscillating = increases < rho * (i + 1 - last_checkpoint)
            stalled = ~halved_at_checkpoint & (loss_best <= loss_best_at_checkpoint)
            halve = oscillating | stalled
            step = torch.where(halve, step / 2, step)
            # Restart the halved samples from their best point (x_prev is kept: the reference does the same).
            x_k = torch.where(per_sample(halve), x_best, x_k)
            grad = torch.where(per_sample(halve), grad_best, grad)
            loss_k = torch.where(halve, loss_best, loss_k)
            halved_at_checkpoint, loss_best_at_checkpoint = halve, loss_best
            increases = torch.zeros_like(increases)
            last_checkpoint = i + 1

    return torch.where(per_sample(fooled), x_fooled, x_best).detach(), fooled, loss_best


def _merge(best: _Run, run: _Run) -> _Run:
    """Per sample, keep ``best`` unless ``run`` fools where it did not, or neither does and its loss is higher."""
    x_best, fooled_best, loss_best = best
    x_run, fooled_run, loss_run = run
    take = ~fooled_best & (fooled_run | (loss_run > loss_best))
    shaped = take.view(-1, *([1] * (x_best.dim() - 1)))
    return (
        torch.where(shaped, x_run, x_best),
        fooled_best | fooled_run,
        torch.where(take, loss_run, loss_best),
    )


def _check_apgd(
    x: Tensor, y: Tensor, eps: float, steps: int, norm: str, loss: str, restarts: int, rho: float, momentum: float
) -> Objective:
    check_attack_inputs(x, y, steps, norm, "uniform")
    if isinstance(eps, Tensor):
        raise ValueError(f"eps must be a number of pixels, got a tensor {eps!r}")
    check_eps(float(eps), norm)
    if loss not in _OBJECTIVES:
        raise ValueError(f"unknown APGD loss {loss!r}; expected one of {sorted(_OBJECTIVES)}")
    check_int("restarts", restarts, 1)
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if not 0 < momentum <= 1:
        raise ValueError(f"momentum must be in (0, 1], got {momentum}")
    return _OBJECTIVES[loss][0]


def _check_num_classes(model: nn.Module, x_one: Tensor, loss: str) -> None:
    """Check that the model has enough classes for ``loss``, from one clean forward if it does not say."""
    minimum = _OBJECTIVES[loss][1]
    if minimum <= 2:
        return
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int):
        with torch.no_grad():
            num_classes = model(x_one).shape[1]
    _require_classes(num_classes, minimum, f"the {loss!r} loss")


def ranked_targets(
    model: nn.Module, x: Tensor, y: Tensor, n_target_classes: int, minimum: int, what: str
) -> tuple[Tensor, Tensor]:
    """The clean logits ``[B, C]`` (float32) and the target classes of a targeted attack as AutoAttack ranks
    them: per example the ``n_target_classes`` highest clean logits other than the label's (at most ``C - 1``),
    ``[B, n]``, best first. One forward, no grad; ``what`` names the attack when the model has too few classes.
    """
    with torch.no_grad():
        logits = model(x).float()
    _require_classes(logits.shape[1], minimum, what)
    n_targets = min(n_target_classes, logits.shape[1] - 1)
    return logits, logits.scatter(1, y[:, None], float("-inf")).topk(n_targets, dim=1).indices


def _require_classes(num_classes: int, minimum: int, what: str) -> None:
    if num_classes < minimum:
        raise ValueError(f"{what} needs a model with at least {minimum} classes, this one has {num_classes}")
