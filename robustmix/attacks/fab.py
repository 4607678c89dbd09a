"""Targeted FAB (FAB-T) of Croce & Hein (ICML 2020), L-inf: a minimum-norm attack on the decision boundary.

FAB (Fast Adaptive Boundary) looks for the adversarial point closest to ``x``. Each iteration
linearizes the boundary between the true class ``y`` and a target class ``t`` at the current
iterate, ``z_t - z_y + <grad, x' - x_k> = 0``, and projects both the iterate and ``x`` onto that
hyperplane within the box [0, 1] (smallest L-inf step). It moves to a convex combination of the
two projections, biased towards the projection of ``x`` (weight ``alpha``, at most ``alpha_max``),
overshooting by ``eta``. A misclassified iterate is recorded when it is the closest so far, and the
search backs off towards ``x`` by ``beta``. FAB does not use ``eps`` while it searches; the closest
point found counts when it lies in ``B(x, eps)``. Its steps do not depend on a step size or on the
scale of the logits, which makes it a useful complement to the loss-based APGD.

Settings as in AutoAttack's standard version (fra31/auto-attack): L-inf, 100 iterations, one run
per target without a random start, targets the classes ranked 2nd to 10th by the clean logits,
``alpha_max = 0.1``, ``eta = 1.05``, ``beta = 0.9``. As there, a target only runs on the examples no
earlier target broke.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustmix.attacks.apgd import ranked_targets
from robustmix.attacks.pgd import DEFAULT_LOSS_SCALE, autograd_input, check_attack_inputs, check_eps
from robustmix.checks import check_int
from robustmix.core.modes import BNMode, check_bn_mode, model_mode


def fab_targeted(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 100,
    n_target_classes: int = 9,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    seed: int = 0,
    bn_mode: BNMode = "eval",
    loss_scale: float = DEFAULT_LOSS_SCALE,
) -> Tensor:
    """FAB-T in L-inf towards each of the ``n_target_classes`` most likely wrong classes.

    Clean-misclassified examples are returned as they are. For the others the targets are the
    non-true classes ranked 1st to ``min(n_target_classes, C - 1)``-th by the clean logits; the
    target runs go one after another, each on the examples without an adversarial point in the
    ball yet (one host sync per target). A run costs ``steps`` forwards and backwards plus
    ``steps`` forwards on its examples, and the attack one clean forward in all.

    Args:
        model: Classifier taking pixels in [0, 1] ``[B, ...]`` and returning logits ``[B, C]``,
            ``C >= 2``. Under DDP pass the unwrapped module.
        x: Clean images ``[B, ...]``, pixels in [0, 1].
        y: Labels ``[B]`` (int64).
        eps: L-inf radius in pixels within which a point found counts.
        steps: Iterations per target.
        n_target_classes: How many target classes to try (9 in AutoAttack).
        alpha_max: Largest weight of the projection of ``x`` in each step, in [0, 1].
        eta: Overshoot of the projections onto the linearized boundary, >= 1.
        beta: Factor, in (0, 1], by which a misclassified iterate's distance to ``x`` shrinks.
        seed: Unused: with one run per target from ``x`` itself, FAB-T draws no random numbers. It
            is accepted because every attack of the suite takes one.
        bn_mode: BatchNorm/dropout mode during the attack: ``"eval"``, ``"train"`` or
            ``"train_frozen_bn"``.
        loss_scale: Multiplier of the logit difference before differentiation (fp16 safety); the
            gradient is divided by it again.

    Returns:
        ``x_adv [B, ...]`` in ``B(x, eps)`` and [0, 1], detached: per sample, the closest
            misclassified point of the first target run whose closest one lies in the ball, else ``x``.
    """
    check_attack_inputs(x, y, steps, "linf", "none")
    if isinstance(eps, Tensor):
        raise ValueError(f"eps must be a number of pixels, got a tensor {eps!r}")
    check_eps(float(eps))
    check_int("n_target_classes", n_target_classes, 1)
    if not 0 <= alpha_max <= 1:
        raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
    if not 1 <= eta < float("inf"):
        raise ValueError(f"eta must be a finite number >= 1, got {eta}")
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    check_bn_mode(bn_mode)
    with torch.inference_mode(False), torch.enable_grad(), model_mode(model, bn_mode):
        x, y = autograd_input(x), autograd_input(y)
        logits, targets = ranked_targets(model, x, y, n_target_classes, 2, "FAB-T")
        n_targets = targets.shape[1]
        x_adv = x.clone()
        todo = (logits.argmax(dim=1) == y).nonzero().squeeze(1)
        for t in range(n_targets):
            if todo.numel() == 0:
                break
            x_run, found = _fab_run(
                model, x[todo], y[todo], targets[todo, t], float(eps), steps, alpha_max, eta, beta, loss_scale
            )
            x_adv[todo[found]] = x_run[found]
            todo = todo[~found]
    return x_adv.detach()


def _fab_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor,
    eps: float,
    steps: int,
    alpha_max: float,
    eta: float,
    beta: float,
    loss_scale: float,
) -> tuple[Tensor, Tensor]:
    """One FAB run from ``x`` towards ``target``.

    Returns:
        The closest misclassified iterate ``[B, ...]`` (``x`` where none was), and whether it lies in the ball ``[B]``.
    """
    batch = x.shape[0]
    x_0 = x.flatten(1)
    x_k, x_best = x_0, x_0
    distance_best = torch.full((batch,), float("inf"), dtype=x.dtype, device=x.device)
    for _ in range(steps):
        x_in = x_k.view_as(x).detach().requires_grad_(True)
        logits = model(x_in)
        # Negative while y beats the target; the boundary is where it crosses zero.
        difference = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(difference.float().sum() * loss_scale, x_in)
        w = torch.nan_to_num(grad.flatten(1) / loss_scale, nan=0.0, posinf=0.0, neginf=0.0)
        # The linearized boundary at x_k: {x' : <w, x'> = <w, x_k> - difference}.
        offset = (w * x_k).sum(dim=1) - difference.detach().to(x.dtype)
        steps_to_plane = hyperplane_step_linf(torch.cat([x_k, x_0]), torch.cat([w, w]), torch.cat([offset, offset]))
        d_k, d_0 = steps_to_plane[:batch], steps_to_plane[batch:]
        norm_k = d_k.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
        norm_0 = d_0.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
        # Lean towards x's projection by how much farther the iterate's own projection would go.
        alpha = (norm_k / (norm_k + norm_0)).clamp(max=alpha_max)
        x_k = ((1 - alpha) * (x_k + eta * d_k) + alpha * (x_0 + eta * d_0)).clamp(0.0, 1.0)
        with torch.no_grad():
            fooled = model(x_k.view_as(x)).argmax(dim=1) != y
        distance = (x_k - x_0).abs().amax(dim=1)
        closer = fooled & (distance < distance_best)
        x_best = torch.where(closer[:, None], x_k, x_best)
        distance_best = torch.where(closer, distance, distance_best)
        # Past the boundary: step back towards x to look for a closer crossing.
        x_k = torch.where(fooled[:, None], x_0 + beta * (x_k - x_0), x_k)
    return x_best.view_as(x).detach(), distance_best <= eps


def hyperplane_step_linf(point: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Smallest L-inf step ``d`` per row with ``<w, point + d> = b`` and ``point + d`` in [0, 1].

    With ``||d||_inf <= lam`` the most ``<w, point + d>`` can move towards ``b`` is
    ``sum_i |w_i| min(lam, room_i)``, ``room_i`` being the distance from ``point_i`` to the face of
    [0, 1] it moves towards; the step takes the smallest ``lam`` at which that reaches the gap. Where
    the box keeps the hyperplane out of reach, every coordinate that helps goes to its face.

    Args:
        point: Points ``[N, D]`` in [0, 1].
        w: Normals ``[N, D]``.
        b: Offsets ``[N]``.

    Returns:
        ``d [N, D]``, with ``point + d`` in [0, 1].
    """
    gap = b - (w * point).sum(dim=1)
    direction = torch.sign(w) * torch.sign(gap)[:, None]
    room = torch.where(direction > 0, 1 - point, point)
    rate = w.abs() * direction.abs()
    room_sorted, order = room.sort(dim=1)
    rate_sorted = rate.gather(1, order)
    # For lam between the (k-1)-th and k-th smallest room, the k coordinates of least room sit at their
    # face and the others move by lam: the gap closes by saturated[:, k] + lam * free[:, k].
    saturated = F.pad((rate_sorted * room_sorted).cumsum(dim=1), (1, 0))
    free = F.pad(rate_sorted.flip(1).cumsum(dim=1).flip(1), (0, 1))
    closed_at_rooms = saturated[:, 1:] + room_sorted * free[:, 1:]
    need = gap.abs()[:, None]
    k = (closed_at_rooms < need).sum(dim=1, keepdim=True)
    lam = (need - saturated.gather(1, k)).clamp_min(0) / free.gather(1, k).clamp_min(torch.finfo(w.dtype).tiny)
    lam = torch.where(k == point.shape[1], float("inf"), lam)
    return direction * torch.minimum(lam, room)
