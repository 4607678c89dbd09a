"""SGLR, Self-Guided Label Refinement (CVPR 2024): soft targets from a per-example table of past predictions.

Every training example ``i`` has a row ``S[i]`` of a table ``[N, C]``, one-hot at first. After the
start epoch, each time the example is in a batch its row moves towards the model's current
predictions (detached, from the training forwards):

    S[i] <- m * S[i] + (1 - m) * (w_clean * p(x_i) + (1 - w_clean) * p(x_adv_i))

and the loss is the soft-target CE of ``f(x_adv_i)`` against ``r * S[i] + (1 - r) * onehot(y_i)``
(``r = 1``, the released code's behaviour, uses the row alone). The table is keyed by the dataset
index column; under DDP every process updates the rows of its batch and the new rows are
all-gathered, so every process holds the same table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from robustmix.checks import check_int, check_unit
from robustmix.core.callbacks import Callback
from robustmix.core.context import Stage, StepContext
from robustmix.stages.labels import one_hot


def sglr_update(
    rows: Tensor, p_clean: Tensor, p_adv: Tensor, momentum: float = 0.9, clean_weight: float = 0.2
) -> Tensor:
    """SGLR's table update ``m * rows + (1 - m) * (w * p_clean + (1 - w) * p_adv)`` ``[B, C]`` in float32.

    Args:
        rows: Current table rows ``S[idx]`` ``[B, C]``, distributions.
        p_clean: Predicted distributions of the clean inputs ``[B, C]`` (detached).
        p_adv: Predicted distributions of the adversarial inputs ``[B, C]`` (detached).
        momentum: ``m`` in [0, 1], 0.9 by default: the weight of the past.
        clean_weight: ``w`` in [0, 1], 0.2 by default: the clean prediction's share of the new evidence.

    Returns:
        The new rows; distributions when the inputs are.
    """
    check_unit("momentum", momentum)
    check_unit("clean_weight", clean_weight)
    evidence = clean_weight * p_clean.float() + (1 - clean_weight) * p_adv.float()
    return momentum * rows.float() + (1 - momentum) * evidence


def sglr_targets(rows: Tensor, onehot: Tensor, r: float = 1.0) -> Tensor:
    """SGLR's soft targets ``r * rows + (1 - r) * onehot`` ``[B, C]`` in float32 (``r`` in [0, 1]).

    ``r = 1`` (the default) is the released code: the table row alone. ``r < 1`` is the reading of
    the CVPR text as an interpolation with the label, ``y~ = r * p~ + (1 - r) * onehot(y)``.
    """
    check_unit("r", r)
    # lerp is exact at both ends (r = 0: onehot, r = 1: rows) and when the row is one-hot, whatever r.
    return torch.lerp(onehot.float(), rows.float(), r)


def _all_gather_rows(index: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Every process's ``(index [B_r], rows [B_r, C])``, concatenated in rank order; batch sizes may differ."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return index, rows
    world = dist.get_world_size()
    size = torch.tensor([len(index)], device=index.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    # all_gather needs equal shapes: pad every batch to the largest one, then cut the padding off.
    largest = max(sizes)
    padded_index = index.new_zeros(largest)
    padded_index[: len(index)] = index
    padded_rows = rows.new_zeros(largest, rows.shape[1])
    padded_rows[: len(rows)] = rows
    indices = [torch.empty_like(padded_index) for _ in range(world)]
    all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    dist.all_gather(indices, padded_index)
    dist.all_gather(all_rows, padded_rows)
    return (
        torch.cat([t[:n] for t, n in zip(indices, sizes)]),
        torch.cat([t[:n] for t, n in zip(all_rows, sizes)]),
    )


class SGLRLabels(Callback):
    """Writes ``soft_targets`` from SGLR's per-example soft-label table ``S [N, C]``, keyed by ``ctx.index``.

    Before ``start_epoch`` the targets are one-hot and the table is not touched; the clean
    training forward is not asked for either, so those epochs cost what PGD-AT costs
    (``K + 1`` forwards and backwards). From ``start_epoch`` on, each step reads the detached
    training-mode logits of the clean and adversarial inputs (one extra forward of the clean batch,
    no extra backward; it runs under ``no_grad`` and keeps no graph unless another callback needs its
    gradient, e.g. a TRADES loss, which then shares it), updates the batch's rows with
    ``sglr_update``, all-gathers them across processes, and writes ``sglr_targets`` of the updated rows.

    Rows start one-hot: a row never written (all zeros) is taken as ``onehot(y)`` when first used.
    The table lives on the batch's device; ``state_dict`` returns it for the checkpoint.

    Args:
        num_examples: Rows ``N``: larger than every dataset index (``int(index.max()) + 1``;
            CIFAR/SVHN train indices have gaps where validation was held out).
        num_classes: ``C``.
        start_epoch: First epoch (0-based) of refined targets; the released code starts at 90 of 200.
        momentum: ``m``, 0.9 by default.
        clean_weight: Share of the clean prediction in the update, 0.2 by default.
        r: Weight of the table row in the target (1 by default, the released behaviour).
    """

    stage = Stage.LABELS
    reads = ("index", "logits_adv")
    optional_reads = ("logits_clean",)
    detached_reads = ("logits_adv", "logits_clean")
    writes = ("soft_targets",)

    def __init__(
        self,
        num_examples: int,
        num_classes: int,
        *,
        start_epoch: int,
        momentum: float = 0.9,
        clean_weight: float = 0.2,
        r: float = 1.0,
    ) -> None:
        for name, value, low in (
            ("num_examples", num_examples, 1), ("num_classes", num_classes, 2), ("start_epoch", start_epoch, 0),
        ):  # fmt: skip
            check_int(name, value, low)
        for name, value in (("momentum", momentum), ("clean_weight", clean_weight), ("r", r)):
            check_unit(name, value)
        self.num_examples, self.num_classes, self.start_epoch = num_examples, num_classes, start_epoch
        self.momentum, self.clean_weight, self.r = momentum, clean_weight, r
        self.table = torch.zeros(num_examples, num_classes)

    def __call__(self, ctx: StepContext) -> None:
        onehot = one_hot(ctx.targets, ctx.num_classes)
        if ctx.epoch < self.start_epoch:
            ctx.soft_targets = onehot
            return
        if ctx.num_classes != self.num_classes:
            raise ValueError(f"SGLRLabels was built for {self.num_classes} classes, the step has {ctx.num_classes}")
        index = ctx.index.long()
        # The step's input check already read the range; otherwise read it here (a host synchronization).
        low, high = ctx.index_range or torch.stack(torch.aminmax(index)).tolist()
        if low < 0 or high >= self.num_examples:
            raise IndexError(
                f"dataset index out of range [0, {self.num_examples}): build SGLRLabels with "
                "num_examples = int(train_data.index.max()) + 1"
            )
        self.table = self.table.to(onehot.device)
        rows = self.table[index]
        rows = torch.where(rows.sum(dim=1, keepdim=True) > 0, rows, onehot)
        p_clean = ctx.get_logits("clean").detach().float().softmax(dim=1)
        p_adv = ctx.get_logits("adv").detach().float().softmax(dim=1)
        rows = sglr_update(rows, p_clean, p_adv, self.momentum, self.clean_weight)
        all_index, all_rows = _all_gather_rows(index, rows)
        self.table[all_index] = all_rows
        ctx.soft_targets = sglr_targets(rows, onehot, self.r)

    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        table = state["table"]
        if tuple(table.shape) != (self.num_examples, self.num_classes):
            raise ValueError(
                f"saved SGLR table has shape {list(table.shape)}, expected {[self.num_examples, self.num_classes]}"
            )
        self.table = table.to(device=self.table.device, dtype=torch.float32, copy=True)

    def __repr__(self) -> str:
        return (
            f"SGLRLabels(num_examples={self.num_examples}, num_classes={self.num_classes}, "
            f"start_epoch={self.start_epoch}, momentum={self.momentum}, clean_weight={self.clean_weight}, r={self.r})"
        )
