"""CAAT, Combining Adversaries with Anti-adversaries in Training (Zhou et al., AAAI 2023).

Per sample, a meta-learned pair ``(alpha_i, beta_i)`` (summing to 1) splits the loss between a
TRADES term on the adversary and a CE term on the anti-adversary; class-wise weights ``w0``, ``w1``
weight the TRADES term's two parts:

    loss = sum_i alpha_i w0_i CE(f(x_i), y_i) / sum_i w0_i
           + beta_TR sum_i alpha_i w1_i KL(p(x_i) || p(x_adv_i)) / sum_i w1_i
           + mean_i beta_i CE(f(x_anti_i), y_i)

with ``x_adv`` from TRADES-KL ascent and ``x_anti`` from CE descent, both inside the per-sample ball
``B(x, eps * c_{y_i})``. ``(alpha, beta) = softmax(MLP(BN(z)) / 0.001)`` of six detached features
``z`` of the clean logits; the MLP is trained every ``meta_every`` steps by a one-step lookahead
(``robustmix.methods.meta``) whose outer loss is the same loss at ``alpha = beta = 1`` on a held-out meta
batch, with the meta batch's own adversary and anti-adversary (``meta_objective="caat"``), or its
clean CE (``"clean"``). ``ReMarginBudget`` updates ``c``, ``w0`` and ``w1`` before every epoch from
class-wise errors on held-out data (Fair Robust Learning's rule).

Compose a CAAT step as:

    budget = ReMarginBudget(eps, num_classes, x_meta, y_meta)     # eps_i = eps * c_{y_i}; w0, w1
    attack = PGDAttack(None, eps / 5, 10, loss="kl", start="normal")
    anti = AntiAdversary(None, eps / 5, 10)
    [budget, attack, anti, CAATLoss(num_classes, MetaBatches(x_meta, y_meta, 128),
                                    meta_perturbations=(budget, attack, anti), class_weights=budget)]
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
from robustmix.attacks.pgd import check_eps, pgd
from robustmix.checks import check_int
from robustmix.core.callbacks import Callback
from robustmix.core.context import Stage, StepContext
from robustmix.core.modes import model_mode
from robustmix.methods.meta import LookaheadReweighter, VirtualModel, functional_forward, virtual_sgd_step
from robustmix.models import unwrap_model
from robustmix.stages.labels import one_hot
from robustmix.stages.margins import probability_margin

#: Number of CAAT's per-sample features (see ``caat_features``).
NUM_FEATURES = 6
#: ``CAATMetaNet`` initializations.
META_INITS = ("default", "even")
#: Bounds of ReMargin's class-wise eps multipliers.
REMARGIN_BOUNDS = (0.98, 2.5)
#: Outer losses of the lookahead: CAAT's loss at unit combination weights on the meta batch's clean,
#: adversarial and anti-adversarial examples (the released code's), or its clean CE.
META_OBJECTIVES = ("caat", "clean")


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
    *,
    clean_weights: Tensor | None = None,
    kl_weights: Tensor | None = None,
) -> Tensor:
    """CAAT's loss, a float32 scalar, with class weights ``w0``, ``w1`` of the samples:

        sum_i alpha_i w0_i CE_i / sum_i w0_i + beta_TR sum_i alpha_i w1_i KL_i / sum_i w1_i
        + mean_i beta_i CE(f(x_anti_i), y_i)

    ``KL_i = KL(p(x_i) || p(x_adv_i))`` is TRADES' term: the clean distribution is not detached.
    With every ``w = 1`` this is ``mean_i [alpha_i (CE_i + beta_TR KL_i) + beta_i CE(f(x_anti_i), y_i)]``.

    Args:
        logits_clean: Training logits of the clean inputs ``[B, C]``.
        logits_adv: Training logits of the adversarial inputs ``[B, C]``.
        logits_anti: Training logits of the anti-adversarial inputs ``[B, C]``.
        y: Labels ``[B]``.
        alpha: Weight of the adversarial (TRADES) term per sample ``[B]``.
        beta: Weight of the anti-adversarial term per sample ``[B]``.
        beta_tr: TRADES' ``beta`` inside the adversarial term, 1.5 by default.
        clean_weights: Class weight ``w0`` of each sample ``[B]`` (> 0) on the clean CE; 1 by default.
        kl_weights: Class weight ``w1`` of each sample ``[B]`` (> 0) on the KL term; 1 by default.
    """
    ce_clean = F.cross_entropy(logits_clean.float(), y, reduction="none")
    kl = kl_divergence(logits_adv, y, logits_clean)
    ce_anti = F.cross_entropy(logits_anti.float(), y, reduction="none")
    w0 = torch.ones_like(ce_clean) if clean_weights is None else clean_weights.float()
    w1 = torch.ones_like(kl) if kl_weights is None else kl_weights.float()
    adversarial = (alpha * w0 * ce_clean).sum() / w0.sum() + beta_tr * (alpha * w1 * kl).sum() / w1.sum()
    return adversarial + (beta * ce_anti).mean()


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
        check_eps(eps)
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


def frl_class_weights(lam: Tensor) -> Tensor:
    """Class weights ``w_k = 1/C + lam_k - sum_j lam_j / C`` ``[C]`` from one row of FRL's multipliers ``lam [C]``.

    The weights sum to 1 and are all ``1/C`` at ``lam = 0``; they stay positive for ``lam >= 0`` with
    ``sum lam < 1`` (``frl_update`` keeps ``sum lam <= 0.5``).
    """
    lam = lam.double()
    return (1 / len(lam) + lam - lam.sum() / len(lam)).float()


def _clip_lambda(lam: Tensor, limit: float) -> Tensor:
    """``lam`` clamped at 0, then scaled down to sum ``limit`` when its sum exceeds it."""
    lam = lam.clamp_min(0)
    total = lam.sum()
    return lam * limit / total if total > limit else lam


def frl_update(
    lam: Tensor,
    counts: Tensor,
    *,
    rate: float = 0.05,
    eps_rate: float = 0.2,
    tolerance: float = 0.07,
    limit: float = 0.5,
) -> Tensor:
    """One epoch's update of FRL's class-wise multipliers ``lam [3, C]`` from held-out counts ``[3, C]``.

    ``counts`` rows: examples ``n_k``, clean-correct ``a_k``, correct after the attack ``r_k``
    (``class_accuracy_counts``). With the clean error ``e_k = 1 - a_k / n_k``, the boundary error
    ``b_k = (a_k - r_k) / n_k`` and ``e``, ``b`` the same over all examples:

        lam_0 <- clip(lam_0 + rate (e_k - e - tolerance))
        lam_1 <- clip(lam_1 + 2 rate (b_k - b - tolerance))
        lam_2 <- lam_2 + eps_rate (b_k - b - tolerance)

    where ``clip`` clamps at 0 and scales the row down to sum ``limit`` when it sums to more. A class
    without examples has the overall errors. ``lam_0`` and ``lam_1`` feed ``frl_class_weights``,
    ``lam_2`` ``remargin_multipliers``.

    Args:
        lam: Multipliers ``[3, C]``; zero at the start.
        counts: ``[3, C]`` as above, at least one example in all.
        rate: Step of ``lam_0`` (``lam_1`` steps twice as far), 0.05.
        eps_rate: Step of ``lam_2``, 0.2.
        tolerance: Excess error over the overall one a class is allowed, 0.07.
        limit: Largest sum of ``lam_0`` and of ``lam_1``, 0.5.
    """
    n, clean, robust = counts.double()
    total_clean = 1 - clean.sum() / n.sum()
    total_boundary = (clean.sum() - robust.sum()) / n.sum()
    present = n > 0
    clean_error = torch.where(present, 1 - clean / n.clamp_min(1), total_clean)
    boundary_error = torch.where(present, (clean - robust) / n.clamp_min(1), total_boundary)
    gap_clean = clean_error - total_clean - tolerance
    gap_boundary = boundary_error - total_boundary - tolerance
    lam = lam.double()
    return torch.stack(
        [
            _clip_lambda(lam[0] + rate * gap_clean, limit),
            _clip_lambda(lam[1] + 2 * rate * gap_boundary, limit),
            lam[2] + eps_rate * gap_boundary,
        ]
    ).float()


@torch.no_grad()
def class_accuracy_counts(
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
    """Per class, held-out examples, those classified correctly, and those still correct after PGD: ``[3, C]``.

    Eval mode, CE-PGD from a uniform start. Under DDP each process evaluates every
    ``world_size``-th batch and the counts are summed, so every process gets the same result.

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
    counts = torch.zeros(3, num_classes, device=device)
    with model_mode(model, "eval"):
        for first in range(rank * batch_size, len(labels), batch_size * world):
            x = images[first : first + batch_size].to(device)
            y = labels[first : first + batch_size].to(device)
            clean_ok = model(x).argmax(dim=1) == y
            x_adv = pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, start="uniform", check_values=False)
            robust_ok = model(x_adv).argmax(dim=1) == y
            for row, hits in enumerate((torch.ones_like(clean_ok), clean_ok, robust_ok)):
                counts[row].index_add_(0, y, hits.float())
    if world > 1:
        dist.all_reduce(counts)
    return counts


class ReMarginBudget(ClassWiseBudget):
    """CAAT's released class-wise policy, Fair Robust Learning's reweighting and remargin, updated before every epoch.

    Writes ``eps [B] = eps * c_{y_i}`` like ``ClassWiseBudget``, and holds the class weights
    ``clean_weights`` (``w0 [C]``) and ``kl_weights`` (``w1 [C]``) that ``CAATLoss(class_weights=...)``
    applies. At ``on_epoch_start``, the first epoch's included (``update(model)`` in your own loop), it
    counts per class the held-out examples classified correctly, clean and after PGD at the base ``eps``
    (``class_accuracy_counts``), steps ``lam [3, C]`` (``frl_update``) and sets ``w0``, ``w1``
    (``frl_class_weights``) and ``c`` (``remargin_multipliers``). At ``lam = 0`` every class weighs
    ``1/C`` and ``c = 1``. Costs ``steps + 2`` forwards and ``steps`` backwards per held-out example per epoch.

    Args:
        eps: Base budget in pixels.
        num_classes: ``C``.
        images: Held-out images ``[M, ...]`` in [0, 1] (CAAT's meta split; never the test split).
        labels: Their labels ``[M]``.
        step_size: PGD step of the measurement in pixels; ``eps / 4`` by default.
        steps: PGD steps of the measurement, 20 by default.
        rate: Step of the clean-error multipliers (the boundary-error ones step twice as far), 0.05.
        eps_rate: Step of the eps multipliers' ``lam_2``, 0.2.
        tolerance: Excess error over the overall one a class is allowed, 0.07.
        limit: Largest sum of each row of class-weight multipliers, 0.5.
    """

    def __init__(
        self,
        eps: float,
        num_classes: int,
        images: Tensor,
        labels: Tensor,
        *,
        step_size: float | None = None,
        steps: int = 20,
        rate: float = 0.05,
        eps_rate: float = 0.2,
        tolerance: float = 0.07,
        limit: float = 0.5,
    ) -> None:
        super().__init__(eps, torch.ones(num_classes))
        if not (0 < rate < math.inf) or not (0 < eps_rate < math.inf):
            raise ValueError(f"rate and eps_rate must be positive numbers, got rate={rate}, eps_rate={eps_rate}")
        if not math.isfinite(tolerance) or not (0 <= limit < 1):
            raise ValueError(f"tolerance must be finite and limit in [0, 1), got tolerance={tolerance}, limit={limit}")
        if len(labels) == 0:
            raise ValueError("ReMarginBudget needs held-out examples to measure class-wise errors on")
        self.images, self.labels = images, labels
        self.step_size = eps / 4 if step_size is None else step_size
        self.steps, self.rate, self.eps_rate, self.tolerance, self.limit = steps, rate, eps_rate, tolerance, limit
        self.lam = torch.zeros(3, num_classes)
        self._set_from_lam()

    def _set_from_lam(self) -> None:
        self.clean_weights, self.kl_weights = frl_class_weights(self.lam[0]), frl_class_weights(self.lam[1])
        self.multipliers = remargin_multipliers(self.lam[2])

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if trainer is None:
            return
        counts = self.update(unwrap_model(trainer.model))
        n, clean, robust = counts.sum(dim=1).tolist()
        trainer.log({
            "remargin_clean_error": 1 - clean / n, "remargin_boundary_error": (clean - robust) / n,
            "remargin_eps_multiplier_min": self.multipliers.min().item(),
            "remargin_eps_multiplier_max": self.multipliers.max().item(),
        })  # fmt: skip

    def update(self, model: nn.Module) -> Tensor:
        """Measure ``model`` (unwrapped) on the held-out data, update ``lam`` and the weights; returns the counts."""
        counts = class_accuracy_counts(
            model, self.images, self.labels, len(self.multipliers), eps=self.eps, step_size=self.step_size,
            steps=self.steps,
        )  # fmt: skip
        self.lam = frl_update(
            self.lam.to(counts.device), counts, rate=self.rate, eps_rate=self.eps_rate, tolerance=self.tolerance,
            limit=self.limit,
        )  # fmt: skip
        self._set_from_lam()
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = state["lam"].to(self.multipliers.device, torch.float32, copy=True)
        self._set_from_lam()

    def __repr__(self) -> str:
        return (
            f"ReMarginBudget(eps={self.eps}, steps={self.steps}, step_size={self.step_size}, rate={self.rate}, "
            f"eps_rate={self.eps_rate}, tolerance={self.tolerance}, limit={self.limit}, held_out={len(self.labels)})"
        )


class CAATLoss(LookaheadReweighter):
    """Writes CAAT's ``loss`` (``caat_loss``) with meta-learned combination weights; runs the lookahead.

    Every step: six detached features of the clean training logits (``caat_features``, no
    extra pass) go through ``CAATMetaNet`` (train mode, no gradient) to ``(alpha, beta)``,
    and the loss of the three training forwards (clean, adversarial, anti-adversarial) is written,
    with the class weights of ``class_weights`` when given. The clean CE is also summed per class;
    at ``on_epoch_end`` the class averages become the second feature of the next epoch (averaged over
    processes; ``log C``, a uniform predictor's loss, before the first epoch ends).

    When ``ctx.step % meta_every == 0``, before the weights are computed, the lookahead runs on
    the unwrapped model: the CAAT loss with the net's (differentiable) weights is recomputed from
    three training-mode forwards with frozen BatchNorm statistics at the step's ``x``, ``x_adv``
    and ``x_anti``; a virtual SGD step of the real optimizer gives ``theta'``; the outer loss of
    ``theta'`` on a meta batch follows ``meta_objective``; the net takes one Adam step.

    - ``"caat"`` (the released code's): ``meta_perturbations`` (the step's budget, attack and
      anti-adversary callbacks) run on the meta batch against ``theta'`` (``VirtualModel``: their own
      modes, no gradient) to give its ``x_adv`` and ``x_anti``; the outer loss is ``caat_loss`` of
      ``theta'``'s three training-mode forwards at ``alpha = beta = 1``, with the meta labels' class weights.
    - ``"clean"``: the clean CE of ``theta'`` on the meta batch.

    Args:
        num_classes: ``C``.
        meta_batches: Clean held-out ``(x, y)`` batches (e.g. ``MetaBatches``).
        beta_tr: TRADES' ``beta`` in the adversarial term, 1.5 by default.
        meta_every: Lookahead period in steps, 50 by default.
        meta_lr: Adam learning rate of the net, 1e-4 by default.
        meta_weight_decay: Adam's weight decay of the net, 5e-4 by default.
        meta_objective: ``"caat"`` (the default) or ``"clean"``, see above.
        meta_perturbations: Callbacks that write ``x_adv`` and ``x_anti`` (and the ``eps`` they read) on
            a context of the meta batch, in stage order; needed by ``meta_objective="caat"``.
        class_weights: A ``ReMarginBudget`` whose ``clean_weights`` and ``kl_weights`` weight the
            clean and KL terms of the training and outer losses; every class alike by default.
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
        meta_weight_decay: float = 5e-4,
        meta_objective: str = "caat",
        meta_perturbations: Sequence[Callback] = (),
        class_weights: ReMarginBudget | None = None,
        class_proportions: Sequence[float] | Tensor | None = None,
        net: nn.Module | None = None,
        optimizer: Optimizer | None = None,
    ) -> None:
        check_int("num_classes", num_classes, 2)
        if not (0 <= beta_tr < math.inf):
            raise ValueError(f"beta_tr must be a finite number >= 0, got {beta_tr}")
        if meta_objective not in META_OBJECTIVES:
            raise ValueError(f"meta_objective must be one of {META_OBJECTIVES}, got {meta_objective!r}")
        written = {name for callback in meta_perturbations for name in callback.writes}
        if meta_objective == "caat" and not {"x_adv", "x_anti"} <= written:
            raise ValueError(
                "meta_objective='caat' needs meta_perturbations that write x_adv and x_anti on the meta batch (the "
                f"step's budget, attack and anti-adversary callbacks); they write {sorted(written)}"
            )
        if class_weights is not None and not isinstance(class_weights, ReMarginBudget):
            raise TypeError(f"class_weights must be a ReMarginBudget, got {type(class_weights).__name__}")
        if class_proportions is None:
            class_proportions = torch.full((num_classes,), 1 / num_classes)
        class_proportions = torch.as_tensor(class_proportions, dtype=torch.float32).clone()
        if class_proportions.shape != (num_classes,):
            raise ValueError(f"class_proportions must have {num_classes} entries, got {list(class_proportions.shape)}")
        super().__init__(
            CAATMetaNet() if net is None else net, meta_batches, meta_every=meta_every, meta_lr=meta_lr,
            meta_weight_decay=meta_weight_decay, optimizer=optimizer,
        )  # fmt: skip
        self.num_classes, self.beta_tr, self.class_proportions = num_classes, beta_tr, class_proportions
        self.meta_objective, self.class_weights = meta_objective, class_weights
        self.meta_perturbations = sorted(meta_perturbations, key=lambda callback: callback.stage)
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
        w0, w1 = self._class_weights(ctx.targets)
        ctx.loss = caat_loss(
            logits_clean, ctx.get_logits("adv"), ctx.get_logits("anti"), ctx.targets, alpha, beta, self.beta_tr,
            clean_weights=w0, kl_weights=w1,
        )  # fmt: skip
        self.local[0].index_add_(0, ctx.targets, features[:, 0].double())
        self.local[1].index_add_(0, ctx.targets, torch.ones_like(features[:, 0], dtype=torch.float64))
        ctx.extras["caat_alpha_mean"] = alpha.mean()

    def _class_weights(self, y: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(w0 [B], w1 [B])`` of labels ``y``, or ``(None, None)`` without class weights."""
        if self.class_weights is None:
            return None, None
        weights = self.class_weights
        return weights.clean_weights.to(y.device)[y], weights.kl_weights.to(y.device)[y]

    def meta_loss(self, ctx: StepContext, x_meta: Tensor, y_meta: Tensor) -> Tensor:
        model = ctx.attack_model
        features = caat_features(ctx.get_logits("clean"), ctx.targets, self.class_loss, self.class_proportions)
        self.net.train()
        alpha, beta = self.net(features).unbind(dim=1)
        params = dict(model.named_parameters())
        logits = [functional_forward(model, params, x) for x in (ctx.inputs, ctx.x_adv, ctx.x_anti)]
        w0, w1 = self._class_weights(ctx.targets)
        inner = caat_loss(*logits, ctx.targets, alpha, beta, self.beta_tr, clean_weights=w0, kl_weights=w1)
        virtual = virtual_sgd_step(model, inner, self.optimizer)
        if self.meta_objective == "clean":
            return F.cross_entropy(functional_forward(model, virtual, x_meta).float(), y_meta)
        target = VirtualModel(model, virtual)
        meta_ctx = StepContext(
            model=target, attack_model=target, inputs=x_meta, targets=y_meta, num_classes=self.num_classes,
            epoch=ctx.epoch, step=ctx.step, mixed_precision=ctx.mixed_precision,
        )  # fmt: skip
        for callback in self.meta_perturbations:
            callback(meta_ctx)
        logits = [functional_forward(model, virtual, x) for x in (x_meta, meta_ctx.x_adv, meta_ctx.x_anti)]
        ones = torch.ones(len(y_meta), device=y_meta.device)
        w0, w1 = self._class_weights(y_meta)
        return caat_loss(*logits, y_meta, ones, ones, self.beta_tr, clean_weights=w0, kl_weights=w1)

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
            f"meta_lr={self.meta_lr}, meta_weight_decay={self.meta_weight_decay}, "
            f"meta_objective={self.meta_objective!r}, class_weights={self.class_weights is not None}, "
            f"meta_batches={self.meta_batches!r})"
        )
