"""Training losses: soft-target cross-entropy with per-sample weights, and the loss callbacks.

Losses compute in float32 from ``log_softmax`` whatever the autocast dtype of the logits, so
they are stable under bf16/fp16 and for logits of any magnitude.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from robustmix.callbacks import Callback
from robustmix.context import INPUT_FIELDS, Stage, StepContext


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
