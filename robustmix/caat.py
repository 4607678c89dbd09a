"""CAAT, Combining Adversaries with Anti-adversaries in Training (Zhou et al., AAAI 2023).

Per sample, a meta-learned pair ``(alpha_i, beta_i)`` (summing to 1) splits the loss between a
TRADES term on the adversary and a CE term on the anti-adversary:

    loss = mean_i [ alpha_i * (CE(f(x_i), y_i) + beta_TR * KL(p(x_i) || p(x_adv_i))) + beta_i * CE(f(x_anti_i), y_i) ]

with ``x_adv`` from TRADES-KL ascent and ``x_anti`` from CE descent, both inside the per-sample ball
``B(x, eps * c_{y_i})``. ``(alpha, beta) = softmax(MLP(BN(z)) / 0.001)`` of six detached features
``z`` of the clean logits; the MLP is trained every ``meta_every`` steps by a one-step lookahead
(``robustmix.meta``) on the clean CE of a held-out meta batch.

Compose a CAAT step as:

    [ClassWiseBudget(eps, multipliers),                  # eps_i = eps * c_{y_i}
     PGDAttack(eps=None, step_size=0.2, steps=10, loss="kl", start="normal", relative_step_size=True),
     AntiAdversary(eps=None, step_size=0.2, steps=10, relative_step_size=True),
     CAATLoss(num_classes, MetaBatches(x_meta, y_meta, 128))]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from robustmix.attacks.objectives import kl_divergence
from robustmix.attacks.pgd import pgd
from robustmix.callbacks import Callback
from robustmix.context import Stage, StepContext
from robustmix.labels import one_hot
from robustmix.margins import probability_margin
from robustmix.meta import LookaheadReweighter, functional_forward, virtual_sgd_step
from robustmix.models import unwrap_model
from robustmix.modes import model_mode

#: Number of CAAT's per-sample features (see ``caat_features``).
NUM_FEATURES = 6
#: ``CAATMetaNet`` initializations.
META_INITS = ("default", "even")
#: Bounds of ReMargin's class-wise eps multipliers.
REMARGIN_BOUNDS = (0.98, 2.5)


def caat_features(logits: Tensor, y: Tensor, class_loss: Tensor, class_proportion: Tensor) -> Tensor:
    """CAAT's six per-sample features ``[B, 6]`` (float32, detached) from clean logits ``[B, C]``.

    Columns: the CE loss; the class-average CE of the previous epoch (``class_loss [C]``); the
    distance ``||onehot(y) - p||_2``; the probability margin ``p_y - max_{k != y} p_k``; the
    negative entropy ``sum_k p_k log p_k``; the class's share of the training set
    (``class_proportion [C]``).
    """
    logits = logits.detach().float()
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    return torch.stack(
        [
            -log_p.gather(1, y[:, None]).squeeze(1),
            class_loss.to(logits.device, torch.float32)[y],
            (one_hot(y, logits.shape[1]) - p).norm(dim=1),
            probability_margin(logits, y),
            (p * log_p).sum(dim=1),
            class_proportion.to(logits.device, torch.float32)[y],
        ],
        dim=1,
    )


def caat_loss(
    logits_clean: Tensor,
    logits_adv: Tensor,
    logits_anti: Tensor,
    y: Tensor,
    alpha: Tensor,
    beta: Tensor,
    beta_tr: float = 1.5,
) -> Tensor:
    """CAAT's loss ``mean_i [alpha_i (CE_i + beta_TR KL_i) + beta_i CE(f(x_anti_i), y_i)]`` (float32 scalar).

    ``KL_i = KL(p(x_i) || p(x_adv_i))`` is TRADES' term: the clean distribution is not detached.

    Args:
        logits_clean: Training logits of the clean inputs ``[B, C]``.
        logits_adv: Training logits of the adversarial inputs ``[B, C]``.
        logits_anti: Training logits of the anti-adversarial inputs ``[B, C]``.
        y: Labels ``[B]``.
        alpha: Weight of the adversarial (TRADES) term per sample ``[B]``.
        beta: Weight of the anti-adversarial term per sample ``[B]``.
        beta_tr: TRADES' ``beta`` inside the adversarial term, 1.5 by default.
    """
    ce_clean = F.cross_entropy(logits_clean.float(), y, reduction="none")
    kl = kl_divergence(logits_adv, y, logits_clean)
    ce_anti = F.cross_entropy(logits_anti.float(), y, reduction="none")
    return (alpha * (ce_clean + beta_tr * kl) + beta * ce_anti).mean()


class CAATMetaNet(nn.Module):
    """CAAT's weight net: ``BN(6) -> Linear(6, hidden) -> ReLU -> Linear(hidden, 2)``.

    The BatchNorm always normalizes with the batch's statistics (it keeps no running ones): the
    net is only ever run on whole training batches, and running statistics would differ between
    DDP processes for nothing.

    At temperature 0.001 a randomly initialized net already gives nearly every example an almost
    hard weight (about 99% of rows have ``alpha`` below 0.01 or above 0.99), where the softmax's
    gradient, and with it the meta gradient, vanishes: the random output layer then decides the
    split for the whole run. ``init="even"`` (robustmix's option, not the paper's) zeroes the output
    layer, so every example starts at ``alpha = beta = 1/2`` with an unsaturated gradient.

    Args:
        hidden: Width of the hidden layer, 100 by default.
        temperature: Softmax temperature of the combination weights, 0.001 by default (nearly a
            hard choice between adversary and anti-adversary).
        init: ``"default"`` (PyTorch's initialization, as in the released code) or ``"even"``
            (zero output layer). The random draws are the same for both.
    """

    def __init__(self, hidden: int = 100, temperature: float = 1e-3, init: str = "default") -> None:
        super().__init__()
        if not (0 < temperature < math.inf):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        if init not in META_INITS:
            raise ValueError(f"init must be one of {META_INITS}, got {init!r}")
        self.temperature = temperature
        self.norm = nn.BatchNorm1d(NUM_FEATURES, track_running_stats=False)
        self.mlp = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        if init == "even":
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, features: Tensor) -> Tensor:
        """Combination weights ``[B, 2]`` = ``(alpha, beta)`` per row, each in [0, 1], summing to 1."""
        return (self.mlp(self.norm(features.float())) / self.temperature).softmax(dim=1)


class ClassWiseBudget(Callback):
    """Writes ``eps [B]`` = ``eps * multipliers[y_i]``: a per-class perturbation budget, in pixels.

    The attack and the anti-adversary read it (``PGDAttack(eps=None)``, ``AntiAdversary(eps=None)``).

    Args:
        eps: Base budget in pixels (>= 0).
        multipliers: Per-class factors ``c [C]`` (>= 0).
    """

    stage = Stage.BUDGET
    writes = ("eps",)

    def __init__(self, eps: float, multipliers: Sequence[float] | Tensor) -> None:
        if not (0 <= eps < math.inf):
            raise ValueError(f"eps must be a finite number >= 0 (pixels in [0, 1]), got {eps}")
        multipliers = torch.as_tensor(multipliers, dtype=torch.float32).clone()
        if multipliers.dim() != 1 or len(multipliers) < 2 or not bool(torch.isfinite(multipliers).all()):
            raise ValueError(f"multipliers must be finite numbers, one per class, got {multipliers.tolist()}")
        if bool((multipliers < 0).any()):
            raise ValueError(f"multipliers must be >= 0, got {multipliers.tolist()}")
        self.eps, self.multipliers = eps, multipliers

    def __call__(self, ctx: StepContext) -> None:
        if ctx.num_classes != len(self.multipliers):
            raise ValueError(f"{len(self.multipliers)} multipliers for a step with {ctx.num_classes} classes")
        self.multipliers = self.multipliers.to(ctx.inputs.device)
        ctx.eps = (self.eps * self.multipliers[ctx.targets]).to(ctx.inputs.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"multipliers": self.multipliers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.multipliers = state["multipliers"].to(self.multipliers.device, torch.float32, copy=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps}, multipliers={[round(c, 4) for c in self.multipliers.tolist()]})"


def remargin_multipliers(lam2: Tensor) -> Tensor:
    """ReMargin's class-wise eps multipliers ``clamp(exp(2 * lam2), 0.98, 2.5)`` ``[C]``."""
    return torch.exp(2 * lam2.float()).clamp(*REMARGIN_BOUNDS)


def remargin_update(lam2: Tensor, boundary_error: Tensor, rate: float = 0.05, tau: float = 0.0) -> Tensor:
    """One ReMargin step of the per-class multipliers ``lam2 [C]`` from class-wise boundary errors ``[C]``.

    ``lam2_k <- lam2_k + rate * (e_k - mean_j e_j - tau)``: a class whose examples are easier to push
    across the boundary than average gets a larger training budget (FRL's Lagrangian update, which
    CAAT's ReMargin variant borrows; robustmix's reading, see the CAAT docs page).
    """
    return lam2.float() + rate * (boundary_error.float() - boundary_error.float().mean() - tau)


@torch.no_grad()
def class_boundary_errors(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    eps: float,
    step_size: float,
    steps: int,
    batch_size: int = 256,
) -> Tensor:
    """Per class, the fraction of examples classified correctly but not after PGD: ``[C]`` in [0, 1].

    Eval mode, CE-PGD from a uniform start. Under DDP each process evaluates every
    ``world_size``-th example and the counts are summed, so every process gets the same result.
    Classes without examples get 0.

    Args:
        model: The unwrapped model, pixels in [0, 1].
        images: Held-out images ``[M, ...]`` in [0, 1].
        labels: Their labels ``[M]``.
        num_classes: ``C``.
        eps: Budget of the attack in pixels.
        step_size: PGD step in pixels.
        steps: PGD steps.
        batch_size: Examples per forward.
    """
    param = next(model.parameters(), None)
    device = images.device if param is None else param.device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    errors = torch.zeros(num_classes, device=device)
    counts = torch.zeros(num_classes, device=device)
    with model_mode(model, "eval"):
        for first in range(rank * batch_size, len(labels), batch_size * world):
            x = images[first : first + batch_size].to(device)
            y = labels[first : first + batch_size].to(device)
            clean_ok = model(x).argmax(dim=1) == y
            x_adv = pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, start="uniform", check_values=False)
            boundary = clean_ok & (model(x_adv).argmax(dim=1) != y)
            errors.index_add_(0, y, boundary.float())
            counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float32))
    if world > 1:
        dist.all_reduce(errors)
        dist.all_reduce(counts)
    return errors / counts.clamp_min(1)


class ReMarginBudget(ClassWiseBudget):
    """A ``ClassWiseBudget`` whose multipliers follow CAAT's ReMargin rule, updated after every epoch.

    At ``on_epoch_end`` (or ``update`` in your own loop) it measures ``class_boundary_errors``
    on held-out data at the base ``eps``, steps ``lam2`` with ``remargin_update``, and sets
    ``multipliers = remargin_multipliers(lam2)``. Multipliers start at 1 (``lam2 = 0``). Costs one
    clean forward plus ``steps + 1`` forwards and ``steps`` backwards per held-out example per epoch.

    Args:
        eps: Base budget in pixels.
        num_classes: ``C``.
        images: Held-out images ``[M, ...]`` in [0, 1] (e.g. CAAT's meta split; never the test split).
        labels: Their labels ``[M]``.
        step_size: PGD step of the measurement in pixels; ``eps / 4`` by default.
        steps: PGD steps of the measurement, 10 by default.
        rate: Step of ``lam2``, 0.05 by default.
        tau: Tolerated excess boundary error, 0 by default.
    """

    def __init__(
        self,
        eps: float,
        num_classes: int,
        images: Tensor,
        labels: Tensor,
        *,
        step_size: float | None = None,
        steps: int = 10,
        rate: float = 0.05,
        tau: float = 0.0,
    ) -> None:
        super().__init__(eps, torch.ones(num_classes))
        if not (0 < rate < math.inf) or not math.isfinite(tau):
            raise ValueError(f"rate must be a positive number and tau finite, got rate={rate}, tau={tau}")
        self.images, self.labels = images, labels
        self.step_size = eps / 4 if step_size is None else step_size
        self.steps, self.rate, self.tau = steps, rate, tau
        self.lam2 = torch.zeros(num_classes)

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        if trainer is not None:
            self.update(unwrap_model(trainer.model))

    def update(self, model: nn.Module) -> None:
        """Measure the class-wise boundary errors of ``model`` (unwrapped) and update the multipliers."""
        errors = class_boundary_errors(
            model, self.images, self.labels, len(self.multipliers), eps=self.eps, step_size=self.step_size,
            steps=self.steps,
        )  # fmt: skip
        self.lam2 = remargin_update(self.lam2.to(errors.device), errors, self.rate, self.tau)
        self.multipliers = remargin_multipliers(self.lam2)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lam2": self.lam2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.lam2 = state["lam2"].to(self.multipliers.device, torch.float32, copy=True)


class CAATLoss(LookaheadReweighter):
    """Writes CAAT's ``loss`` (``caat_loss``) with meta-learned combination weights; runs the lookahead.

    Every step: six detached features of the clean training logits (``caat_features``, no
    extra pass) go through ``CAATMetaNet`` (train mode, no gradient) to ``(alpha, beta)``,
    and the loss of the three training forwards (clean, adversarial, anti-adversarial) is written.
    The clean CE is also summed per class; at ``on_epoch_end`` the class averages become the
    second feature of the next epoch (averaged over processes; ``log C``, a uniform predictor's
    loss, before the first epoch ends).

    When ``ctx.step % meta_every == 0``, before the weights are computed, the lookahead runs on
    the unwrapped model: the CAAT loss with the net's (differentiable) weights is recomputed from
    three training-mode forwards with frozen BatchNorm statistics at the step's ``x``, ``x_adv``
    and ``x_anti``; a virtual SGD step of the real optimizer gives ``theta'``; the clean CE of
    ``theta'`` on a meta batch is the outer loss; the net takes one Adam step.

    Args:
        num_classes: ``C``.
        meta_batches: Clean held-out ``(x, y)`` batches (e.g. ``MetaBatches``).
        beta_tr: TRADES' ``beta`` in the adversarial term, 1.5 by default.
        meta_every: Lookahead period in steps, 50 by default.
        meta_lr: Adam learning rate of the net, 1e-4 by default.
        class_proportions: Each class's share of the training set ``[C]``; uniform by default.
        net: The weight net; a fresh ``CAATMetaNet`` by default.
        optimizer: The model's SGD optimizer; by default the trainer's.
    """

    stage = Stage.LOSS
    reads = ("logits_clean", "logits_adv", "logits_anti")
    writes = ("loss",)

    def __init__(
        self,
        num_classes: int,
        meta_batches: Iterable[tuple[Tensor, Tensor]],
        *,
        beta_tr: float = 1.5,
        meta_every: int = 50,
        meta_lr: float = 1e-4,
        class_proportions: Sequence[float] | Tensor | None = None,
        net: nn.Module | None = None,
        optimizer: Optimizer | None = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not (0 <= beta_tr < math.inf):
            raise ValueError(f"beta_tr must be a finite number >= 0, got {beta_tr}")
        if class_proportions is None:
            class_proportions = torch.full((num_classes,), 1 / num_classes)
        class_proportions = torch.as_tensor(class_proportions, dtype=torch.float32).clone()
        if class_proportions.shape != (num_classes,):
            raise ValueError(f"class_proportions must have {num_classes} entries, got {list(class_proportions.shape)}")
        super().__init__(
            CAATMetaNet() if net is None else net, meta_batches, meta_every=meta_every, meta_lr=meta_lr,
            optimizer=optimizer,
        )  # fmt: skip
        self.num_classes, self.beta_tr, self.class_proportions = num_classes, beta_tr, class_proportions
        self.class_loss = torch.full((num_classes,), math.log(num_classes))
        # Per-class [sum, count] of the clean CE this epoch: `synced` agrees across processes (it is what
        # a checkpoint saves), `local` holds this process's part since the last synchronization.
        self.synced = torch.zeros(2, num_classes, dtype=torch.float64)
        self.local = torch.zeros(2, num_classes, dtype=torch.float64)

    def __call__(self, ctx: StepContext) -> None:
        device = ctx.inputs.device
        self.place(device)
        self.class_loss, self.synced, self.local = (t.to(device) for t in (self.class_loss, self.synced, self.local))
        logits_clean = ctx.get_logits("clean")
        features = caat_features(logits_clean, ctx.targets, self.class_loss, self.class_proportions)
        self.maybe_meta_step(ctx)
        self.net.train()
        with torch.no_grad():
            alpha, beta = self.net(features).unbind(dim=1)
        ctx.loss = caat_loss(
            logits_clean, ctx.get_logits("adv"), ctx.get_logits("anti"), ctx.targets, alpha, beta, self.beta_tr
        )
        self.local[0].index_add_(0, ctx.targets, features[:, 0].double())
        self.local[1].index_add_(0, ctx.targets, torch.ones_like(features[:, 0], dtype=torch.float64))
        ctx.extras["caat_alpha_mean"] = alpha.mean()

    def meta_loss(self, ctx: StepContext, x_meta: Tensor, y_meta: Tensor) -> Tensor:
        model = ctx.attack_model
        features = caat_features(ctx.get_logits("clean"), ctx.targets, self.class_loss, self.class_proportions)
        self.net.train()
        alpha, beta = self.net(features).unbind(dim=1)
        params = dict(model.named_parameters())
        logits = [functional_forward(model, params, x) for x in (ctx.inputs, ctx.x_adv, ctx.x_anti)]
        inner = caat_loss(*logits, ctx.targets, alpha, beta, self.beta_tr)
        virtual = virtual_sgd_step(model, inner, self.optimizer)
        return F.cross_entropy(functional_forward(model, virtual, x_meta).float(), y_meta)

    def _sync(self) -> None:
        """Fold every process's accumulated class losses into ``synced`` (same on every process)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.local)
        self.synced += self.local.to(self.synced.device)
        self.local.zero_()

    def on_save_checkpoint(self, trainer: Any, directory: str) -> None:
        self._sync()

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        self._sync()
        total, count = self.synced
        self.class_loss = torch.where(count > 0, total / count.clamp_min(1), self.class_loss.double()).float()
        self.synced.zero_()

    def state_dict(self) -> dict[str, Any]:
        # The sum covers a user loop that saves without on_save_checkpoint (single process).
        return {**super().state_dict(), "class_loss": self.class_loss, "class_loss_sums": self.synced + self.local}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.class_loss = state["class_loss"].to(self.class_loss.device, torch.float32, copy=True)
        self.synced = state["class_loss_sums"].to(self.synced.device, torch.float64, copy=True)
        self.local = torch.zeros_like(self.synced)

    def __repr__(self) -> str:
        return (
            f"CAATLoss(num_classes={self.num_classes}, beta_tr={self.beta_tr}, meta_every={self.meta_every}, "
            f"meta_lr={self.meta_lr}, meta_batches={self.meta_batches!r})"
        )
