"""Hand-written adversarial training steps: the baseline robustmix's step is timed against.

One function per method, each a whole training step (attack, loss, backward, optimizer step) written
the way a careful engineer writes it in a plain PyTorch loop, with no robustmix code: the input
gradient comes from ``torch.autograd.grad`` on the input, the attack runs the model in eval mode and
restores train mode after, the attack loss is summed over the batch (each example's step is then
independent of the batch size), and detached quantities are computed under ``torch.no_grad()``.

Each function runs the same algorithm as its robustmix composition in ``throughput.py`` (same
attack, start, number of forwards and backwards, same loss), so a difference in time is overhead.
The model takes pixels in [0, 1] (normalization inside it), as robustmix's models do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.amp import GradScaler
from torch.optim import Optimizer


def _optimize(loss: Tensor, optimizer: Optimizer, scaler: GradScaler) -> None:
    """Backward and optimizer step; ``scaler`` is a pass-through unless fp16 enabled it."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def _project(x_new: Tensor, x: Tensor, eps: float) -> Tensor:
    return torch.min(torch.max(x_new, x - eps), x + eps).clamp(0.0, 1.0)


def pgd_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    start: str = "uniform",
    p_clean: Tensor | None = None,
    x_init: Tensor | None = None,
    descend: bool = False,
    kappa: Tensor | None = None,
    attack_scale: float = 1.0,
) -> Tensor:
    """L-inf PGD in pixel space, model in eval mode; returns ``x_adv [B, ...]`` detached.

    ``p_clean [B, C]`` switches the objective from the summed CE to TRADES' summed
    ``KL(p_clean || p(x'))``. ``x_init`` replaces the random start; ``descend`` minimizes the
    objective (the adversary's adversary). ``kappa [B]``, when given, is incremented in place by
    the iterates still classified correctly, read from the logits each step computes anyway
    (GAIRAT). ``attack_scale`` multiplies the objective so fp16 input gradients do not underflow.
    """
    was_training = model.training
    model.eval()
    if x_init is not None:
        x_k = x_init
    elif start == "uniform":
        x_k = (x + (2 * torch.rand_like(x) - 1) * eps).clamp(0.0, 1.0)
    else:  # TRADES / MART: a tiny Gaussian start
        x_k = _project(x + 0.001 * torch.randn_like(x), x, eps)
    sign = -step_size if descend else step_size
    for _ in range(steps):
        x_k.requires_grad_(True)
        logits = model(x_k)
        if kappa is not None:
            kappa += logits.detach().argmax(dim=1) == y
        if p_clean is None:
            objective = F.cross_entropy(logits.float(), y, reduction="sum")
        else:
            objective = F.kl_div(F.log_softmax(logits.float(), dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(objective * attack_scale, x_k)
        x_k = _project(x_k.detach() + sign * grad.sign(), x, eps)
    model.train(was_training)
    return x_k.detach()


def pgd_at(
    model: nn.Module, optimizer: Optimizer, scaler: GradScaler, x: Tensor, y: Tensor, *,
    eps: float, step_size: float, steps: int, attack_scale: float = 1.0,
) -> Tensor:  # fmt: skip
    """PGD-AT (Madry et al.): ``CE(f(x_adv), y)`` with PGD-K from a uniform start. K + 1 forwards and backwards."""
    x_adv = pgd_linf(model, x, y, eps=eps, step_size=step_size, steps=steps, attack_scale=attack_scale)
    loss = F.cross_entropy(model(x_adv).float(), y)
    _optimize(loss, optimizer, scaler)
    return loss


def fgsm_rs(
    model: nn.Module, optimizer: Optimizer, scaler: GradScaler, x: Tensor, y: Tensor, *,
    eps: float, attack_scale: float = 1.0,
) -> Tensor:  # fmt: skip
    """FGSM-RS (Wong et al.): one signed step of ``1.25 eps`` from a uniform start. 2 forwards, 2 backwards."""
    x_adv = pgd_linf(model, x, y, eps=eps, step_size=1.25 * eps, steps=1, attack_scale=attack_scale)
    loss = F.cross_entropy(model(x_adv).float(), y)
    _optimize(loss, optimizer, scaler)
    return loss


def trades(
    model: nn.Module, optimizer: Optimizer, scaler: GradScaler, x: Tensor, y: Tensor, *,
    eps: float, step_size: float, steps: int, beta: float = 6.0, attack_scale: float = 1.0,
) -> Tensor:  # fmt: skip
    """TRADES (Zhang et al.): ``CE(f(x), y) + beta * KL(p(x) || p(x_adv))``, clean side not detached.

    The attack's ``p(x)`` comes from one eval-mode no-grad forward (the released code recomputes it
    every step; once is the same value). K + 3 forwards, K + 2 backwards.
    """
    model.eval()
    with torch.no_grad():
        p_clean = model(x).float().softmax(dim=1)
    model.train()
    x_adv = pgd_linf(
        model, x, y, eps=eps, step_size=step_size, steps=steps, start="normal", p_clean=p_clean,
        attack_scale=attack_scale,
    )  # fmt: skip
    logits_clean, logits_adv = model(x).float(), model(x_adv).float()
    kl = F.kl_div(
        F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_clean, dim=1), reduction="batchmean", log_target=True
    )
    loss = F.cross_entropy(logits_clean, y) + beta * kl
    _optimize(loss, optimizer, scaler)
    return loss


def mart(
    model: nn.Module, optimizer: Optimizer, scaler: GradScaler, x: Tensor, y: Tensor, *,
    eps: float, step_size: float, steps: int, beta: float = 5.0, attack_scale: float = 1.0,
) -> Tensor:  # fmt: skip
    """MART (Wang et al. 2020), the released loss; CE-PGD from ``x + 0.001 N(0, I)``. K + 2 forwards and backwards."""
    x_adv = pgd_linf(model, x, y, eps=eps, step_size=step_size, steps=steps, start="normal", attack_scale=attack_scale)
    logits_clean, logits_adv = model(x).float(), model(x_adv).float()
    p_adv = logits_adv.softmax(dim=1)
    # The most likely wrong class: the top class, or the runner-up where the top one is y.
    top2 = p_adv.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    p_clean = logits_clean.softmax(dim=1)
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_clean, reduction="none").sum(dim=1)
    p_true = p_clean.gather(1, y[:, None]).squeeze(1)
    loss = bce + beta * (kl * (1.0000001 - p_true)).mean()
    _optimize(loss, optimizer, scaler)
    return loss


def gairat(
    model: nn.Module, optimizer: Optimizer, scaler: GradScaler, x: Tensor, y: Tensor, *,
    eps: float, step_size: float, steps: int, lam: float = -1.0, attack_scale: float = 1.0,
) -> Tensor:  # fmt: skip
    """GAIRAT (Zhang et al. 2021), Tanh weights of kappa counted during PGD-K. K + 1 forwards and backwards."""
    kappa = torch.zeros_like(y)
    x_adv = pgd_linf(model, x, y, eps=eps, step_size=step_size, steps=steps, kappa=kappa, attack_scale=attack_scale)
    half = steps / 2
    weights = ((lam + (half - kappa) * 5 / half).tanh() + 1) / 2
    weights = weights / weights.mean()
    loss = (weights * F.cross_entropy(model(x_adv).float(), y, reduction="none")).mean()
    _optimize(loss, optimizer, scaler)
    return loss


def mail(
    model: nn.Module, optimizer: Optimizer, scaler: GradScaler, x: Tensor, y: Tensor, *,
    eps: float, step_size: float, steps: int, bias: float = -1.5, slope: float = 1.0, attack_scale: float = 1.0,
) -> Tensor:  # fmt: skip
    """MAIL-AT (Wang et al. 2021): ``sigmoid(slope (PM + bias))`` weights, batch mean 1. K + 1 forwards, backwards."""
    x_adv = pgd_linf(model, x, y, eps=eps, step_size=step_size, steps=steps, attack_scale=attack_scale)
    logits = model(x_adv).float()
    with torch.no_grad():
        p = logits.softmax(dim=1)
        p_true = p.gather(1, y[:, None]).squeeze(1)
        p_wrong = p.scatter(1, y[:, None], 0.0).amax(dim=1)
        weights = torch.sigmoid(slope * (p_wrong - p_true + bias))
        weights = weights / weights.mean()
    loss = (weights * F.cross_entropy(logits, y, reduction="none")).mean()
    _optimize(loss, optimizer, scaler)
    return loss


def sglr(
    model: nn.Module, optimizer: Optimizer, scaler: GradScaler, x: Tensor, y: Tensor, index: Tensor,
    table: Tensor, *, eps: float, step_size: float, steps: int, momentum: float = 0.9, clean_weight: float = 0.2,
    attack_scale: float = 1.0,
) -> Tensor:  # fmt: skip
    """PGD-AT + SGLR after its start epoch: soft targets from the per-example ``table [N, C]`` (updated in place).

    The table starts as the one-hot labels of the dataset. The clean forward runs in train mode
    under ``no_grad``: its prediction only updates the table. K + 2 forwards, K + 1 backwards.
    """
    x_adv = pgd_linf(model, x, y, eps=eps, step_size=step_size, steps=steps, attack_scale=attack_scale)
    with torch.no_grad():
        p_clean = model(x).float().softmax(dim=1)
    logits_adv = model(x_adv).float()
    with torch.no_grad():
        evidence = clean_weight * p_clean + (1 - clean_weight) * logits_adv.softmax(dim=1)
        rows = momentum * table[index] + (1 - momentum) * evidence
        table[index] = rows
    loss = -(rows * F.log_softmax(logits_adv, dim=1)).sum(dim=1).mean()
    _optimize(loss, optimizer, scaler)
    return loss


def adalab(
    model: nn.Module, optimizer: Optimizer, scaler: GradScaler, x: Tensor, y: Tensor, *,
    eps: float, step_size: float, steps: int, aa_steps: int = 1, lam_max: float = 0.5, c: float = 5.0,
    attack_scale: float = 1.0,
) -> Tensor:  # fmt: skip
    """ADA-Lab after burn-in (robustmix's design, docs/methods/adalab.md).

    PGD-K, then ``aa_steps`` descent steps of ``eps / 2`` from ``x_adv`` (the adversary's adversary),
    one eval forward of it; labels interpolated towards ``p(x_aa)`` and loss weighted by the probability
    margin of the training logits. K + K_aa + 2 forwards, K + K_aa + 1 backwards.
    """
    x_adv = pgd_linf(model, x, y, eps=eps, step_size=step_size, steps=steps, attack_scale=attack_scale)
    x_aa = pgd_linf(
        model, x, y, eps=eps, step_size=eps / 2, steps=aa_steps, x_init=x_adv, descend=True,
        attack_scale=attack_scale,
    )  # fmt: skip
    logits = model(x_adv).float()
    # p(x_aa) after the training forward, as robustmix orders them: it sees the BatchNorm statistics just updated.
    model.eval()
    with torch.no_grad():
        p_aa = model(x_aa).float().softmax(dim=1)
    model.train()
    with torch.no_grad():
        p = logits.softmax(dim=1)
        onehot = F.one_hot(y, p.shape[1]).float()
        margin = (p * onehot).sum(dim=1) - p.masked_fill(onehot.bool(), 0.0).amax(dim=1)
        lam = lam_max * ((1 - margin) / 2).clamp(0, 1)
        soft_targets = onehot + lam[:, None] * (p_aa - onehot)
        weights = 1 + torch.tanh(c * (0.5 - (1 + margin) / 2))
        weights = weights / weights.mean()
    loss = -(weights * (soft_targets * F.log_softmax(logits, dim=1)).sum(dim=1)).mean()
    _optimize(loss, optimizer, scaler)
    return loss
