"""Per-sample objectives that attacks ascend (or anti-adversaries descend).

Each takes logits ``[B, C]`` and returns a per-sample value ``[B]`` in float32. Attacks sum it
over the batch so every example's gradient is independent of the batch size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

Objective = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def cross_entropy(logits: Tensor, targets: Tensor, reference: Tensor | None = None) -> Tensor:
    """``CE(f(x'), y)`` per sample."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def kl_divergence(logits: Tensor, targets: Tensor, reference: Tensor | None) -> Tensor:
    """TRADES' ``KL(p(x) || p(x'))`` per sample; ``reference`` holds the clean logits ``[B, C]``."""
    if reference is None:
        raise ValueError("the KL objective needs the clean logits as `reference`")
    log_p_clean = F.log_softmax(reference.float(), dim=1)
    return (log_p_clean.exp() * (log_p_clean - F.log_softmax(logits.float(), dim=1))).sum(dim=1)


def cw_margin(logits: Tensor, targets: Tensor, reference: Tensor | None = None) -> Tensor:
    """Carlini-Wagner margin ``max_{k != y} z_k - z_y`` per sample (positive when misclassified)."""
    logits = logits.float()
    true = logits.gather(1, targets[:, None]).squeeze(1)
    other = logits.scatter(1, targets[:, None], float("-inf")).amax(dim=1)
    return other - true


def dlr(logits: Tensor, targets: Tensor, reference: Tensor | None = None) -> Tensor:
    """Difference-of-logits-ratio loss of Croce & Hein (2020), untargeted, per sample.

    ``-(z_y - max_{k != y} z_k) / (z_pi1 - z_pi3 + 1e-12)`` with ``pi`` the logits sorted in
    decreasing order; needs at least 3 classes.
    """
    logits = logits.float()
    ordered = logits.sort(dim=1, descending=True).values
    return cw_margin(logits, targets) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


def targeted_dlr(logits: Tensor, targets: Tensor, reference: Tensor) -> Tensor:
    """Targeted DLR of Croce & Hein (2020): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``.

    ``reference`` holds the target classes ``[B]`` (int64); needs at least 4 classes.
    """
    logits = logits.float()
    ordered = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, targets[:, None]).squeeze(1)
    target = logits.gather(1, reference[:, None]).squeeze(1)
    return -(true - target) / (ordered[:, 0] - (ordered[:, 2] + ordered[:, 3]) / 2 + 1e-12)


OBJECTIVES: dict[str, Objective] = {"ce": cross_entropy, "kl": kl_divergence, "cw": cw_margin, "dlr": dlr}


def get_objective(name: str) -> Objective:
    """The objective registered as ``name`` in ``OBJECTIVES``; ``ValueError`` naming the known ones otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown attack loss {name!r}; expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
