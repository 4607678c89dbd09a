"""Training losses: soft-target cross-entropy with per-sample weights, TRADES, MART, and their callbacks.

Losses compute in float32 from ``log_softmax`` whatever the autocast dtype of the logits, so
they are stable under bf16/fp16 and for logits of any magnitude.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robustmix.attacks.objectives import kl_divergence
from robustmix.checks import check_number
from robustmix.core.callbacks import Callback
from robustmix.core.context import INPUT_FIELDS, Stage, StepContext

#: MART's constants, as in its released code: ``-log(1.0001 - max_{k != y} p_k + 1e-12)`` stays at most
#: ``-log(1e-4)`` when the wrong class takes all the mass, ``log(p + 1e-12)`` is finite where ``p = 0``,
#: and the KL factor ``1.0000001 - p_y`` never vanishes.
MART_LOG_EPS = 1e-12
MART_MARGIN_ONE = 1.0001
MART_FACTOR_ONE = 1.0000001


def soft_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Per-sample cross-entropy ``-sum_c q_c log p_c`` ``[B]`` against target distributions ``q [B, C]``."""
    return -(soft_targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def weighted_mean(per_sample: Tensor, weights: Tensor | None = None) -> Tensor:
    """``mean_i w_i * l_i`` (the plain mean when ``weights`` is ``None``); weights are not differentiated."""
    if weights is None:
        return per_sample.mean()
    return (weights.detach().float() * per_sample).mean()


def classification_loss(
    logits: Tensor, targets: Tensor, soft_targets: Tensor | None = None, weights: Tensor | None = None
) -> Tensor:
    """Weighted mean cross-entropy of ``logits [B, C]`` against ``soft_targets [B, C]`` or labels ``[B]``."""
    if soft_targets is None:
        per_sample = F.cross_entropy(logits.float(), targets, reduction="none")
    else:
        per_sample = soft_cross_entropy(logits, soft_targets)
    return weighted_mean(per_sample, weights)


class AdversarialCE(Callback):
    """Writes ``loss = mean_i w_i * CE(f(x_i'), y~_i)``: PGD-AT's loss, and ADA-Lab's with soft targets.

    Uses ``soft_targets`` and ``weights`` when earlier callbacks wrote them, otherwise the hard
    labels and uniform weights.

    Args:
        source: Which input's training logits to use: ``"adv"`` (default), ``"clean"`` or ``"anti"``.
    """

    stage = Stage.LOSS
    optional_reads = ("soft_targets", "weights")
    writes = ("loss",)

    def __init__(self, source: str = "adv") -> None:
        if source not in INPUT_FIELDS:
            raise ValueError(f"source must be one of {sorted(INPUT_FIELDS)}, got {source!r}")
        self.source = source
        self.reads = (f"logits_{source}",)

    def __call__(self, ctx: StepContext) -> None:
        ctx.loss = classification_loss(ctx.get_logits(self.source), ctx.targets, ctx.soft_targets, ctx.weights)

    def __repr__(self) -> str:
        return f"AdversarialCE(source={self.source!r})"


def trades_loss(
    logits_clean: Tensor,
    logits_adv: Tensor,
    targets: Tensor,
    beta: float,
    weights: Tensor | None = None,
    soft_targets: Tensor | None = None,
) -> Tensor:
    """TRADES' loss ``CE(f(x), y) + beta * mean_i w_i * KL(p(x_i) || p(x_adv_i))`` (Zhang et al. 2019).

    The clean distribution is *not* detached in the KL term, as in the released code: the gradient
    reaches ``f(x)`` through both terms.

    Args:
        logits_clean: Training-mode logits of the clean batch ``[B, C]``.
        logits_adv: Training-mode logits of the adversarial batch ``[B, C]``.
        targets: Labels ``[B]``.
        beta: Weight of the KL term (>= 0); TRADES uses 6.
        weights: Per-sample weights ``[B]`` of the KL term (MAIL-TRADES); uniform when ``None``.
        soft_targets: Target distributions ``[B, C]`` that replace ``y`` in the CE term (label refiners,
            SGLR's table); the labels when ``None``.

    Returns:
        The scalar loss, float32.
    """
    check_number("beta", beta)
    natural = classification_loss(logits_clean, targets, soft_targets)
    # kl_divergence(logits, _, reference) is KL(softmax(reference) || softmax(logits)), per sample.
    robust = weighted_mean(kl_divergence(logits_adv, targets, logits_clean), weights)
    return natural + beta * robust


def mart_loss(
    logits_clean: Tensor, logits_adv: Tensor, targets: Tensor, beta: float, weights: Tensor | None = None
) -> Tensor:
    """MART's loss ``mean_i w_i * BCE_i + beta * mean_i KL(p(x_i) || p(x_adv_i)) * (1 - p_y(x_i))`` (Wang et al. 2020).

    ``BCE_i = CE(f(x_adv_i), y_i) - log(1.0001 - max_{k != y_i} p_k(x_adv_i) + 1e-12)`` and the KL uses
    ``log(p(x_adv) + 1e-12)``, with the constants of the released code (``MART_LOG_EPS``...). As
    there, nothing is detached: the gradient reaches ``f(x)`` through the KL term *and* through the
    misclassification factor ``1 - p_y(x)``. The clean side of the KL uses ``p * log_softmax`` where the
    reference has ``xlogy(p, p)``: the same value, but a finite gradient where a probability underflows to 0.

    Args:
        logits_clean: Training-mode logits of the clean batch ``[B, C]``.
        logits_adv: Training-mode logits of the adversarial batch ``[B, C]``.
        targets: Labels ``[B]``.
        beta: Weight of the KL term (>= 0); MART uses 5 for ResNet-18 and 6 for WideResNets.
        weights: Per-sample weights ``[B]`` of the BCE term (MAIL-MART, as in MAIL's code); uniform
            when ``None``.

    Returns:
        The scalar loss, float32.
    """
    check_number("beta", beta)
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    p_adv = log_p_adv.exp()
    # Probabilities are >= 0, so zeroing the true class leaves max_{k != y} p_k.
    p_wrong = p_adv.scatter(1, targets[:, None], 0.0).amax(dim=1)
    bce = F.nll_loss(log_p_adv, targets, reduction="none") - torch.log(MART_MARGIN_ONE - p_wrong + MART_LOG_EPS)
    log_p_clean = F.log_softmax(logits_clean.float(), dim=1)
    p_clean = log_p_clean.exp()
    kl = (p_clean * (log_p_clean - torch.log(p_adv + MART_LOG_EPS))).sum(dim=1)
    p_true = p_clean.gather(1, targets[:, None]).squeeze(1)
    return weighted_mean(bce, weights) + beta * (kl * (MART_FACTOR_ONE - p_true)).mean()


class TRADESLoss(Callback):
    """Writes TRADES' ``trades_loss`` of the clean and adversarial training logits.

    Pair it with TRADES' attack, ``PGDAttack(eps, step_size, steps, loss="kl", start="normal")``. Uses
    ``soft_targets`` (in the CE term) and ``weights`` (on the KL term) when earlier callbacks wrote them,
    so TRADES composes with label refiners (SGLR) and reweighters (MAIL).

    Args:
        beta: Weight of the KL term (>= 0), 6 by default.
    """

    stage = Stage.LOSS
    reads = ("logits_clean", "logits_adv")
    optional_reads = ("soft_targets", "weights")
    writes = ("loss",)

    def __init__(self, beta: float = 6.0) -> None:
        check_number("beta", beta)
        self.beta = beta

    def __call__(self, ctx: StepContext) -> None:
        logits_clean, logits_adv = ctx.get_logits("clean"), ctx.get_logits("adv")
        ctx.loss = trades_loss(logits_clean, logits_adv, ctx.targets, self.beta, ctx.weights, ctx.soft_targets)

    def __repr__(self) -> str:
        return f"TRADESLoss(beta={self.beta})"


class MARTLoss(Callback):
    """Writes MART's ``mart_loss`` of the clean and adversarial training logits.

    MART's attack is CE-PGD from ``x + 0.001 * N(0, I)``: ``PGDAttack(eps, step_size, steps, start="normal")``.
    Uses ``weights`` on the BCE term when a reweighter wrote them (MAIL-MART).

    Args:
        beta: Weight of the KL term (>= 0), 5 by default (MART's ResNet-18 setting).
    """

    stage = Stage.LOSS
    reads = ("logits_clean", "logits_adv")
    optional_reads = ("weights",)
    writes = ("loss",)

    def __init__(self, beta: float = 5.0) -> None:
        check_number("beta", beta)
        self.beta = beta

    def __call__(self, ctx: StepContext) -> None:
        ctx.loss = mart_loss(ctx.get_logits("clean"), ctx.get_logits("adv"), ctx.targets, self.beta, ctx.weights)

    def __repr__(self) -> str:
        return f"MARTLoss(beta={self.beta})"
