"""Keeping model state identical across DDP ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from robustmix.models import unwrap_model


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Average every floating-point buffer (BatchNorm running statistics) across ranks.

    DDP broadcasts buffers from rank 0 at the start of each forward (or never, with
    ``broadcast_buffers=False``), so after the last forward every rank holds the statistics of
    its own batches. Call this before evaluating or saving to make all ranks agree; integer
    buffers (``num_batches_tracked``) are equal on every rank already. A no-op without an
    initialized process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for buffer in unwrap_model(model).buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world)
