"""Keeping model state identical across DDP ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from robustmix.models import unwrap_model


@torch.no_grad()
def sync_buffers(*models: nn.Module) -> None:
    """Average every floating-point buffer (BatchNorm running statistics) of ``models`` across ranks.

    DDP broadcasts buffers from rank 0 at the start of each forward (or never, with
    ``broadcast_buffers=False``), so after the last forward every rank holds the statistics of
    its own batches. Call this before evaluating or saving to make all ranks agree; integer
    buffers (``num_batches_tracked``) are equal on every rank already. The buffers of all ``models``
    (e.g. a model and its moving average) go through one all-reduce, in float32 (half-precision buffers
    are averaged without rounding the sum). A no-op without an initialized process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buffers = [b for model in models for b in unwrap_model(model).buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for buffer, values in zip(buffers, flat.split([b.numel() for b in buffers])):
        buffer.copy_(values.view_as(buffer))
