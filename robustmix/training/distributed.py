"""Keeping model state identical across DDP ranks, and leaving the process group cleanly."""

from __future__ import annotations

import atexit
import functools

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


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, while it is still fully alive (once per process).

    A process that ends with its process group alive leaves its teardown to interpreter finalization. Gloo's worker
    threads then may still hold work objects whose tensors reach back into Python, and the process dies of SIGABRT
    ("terminate called without an active exception") after a run that finished and saved everything: its launcher
    reports a failure. NCCL warns that the group was never destroyed. Destroying it from an ``atexit`` handler,
    after the last collective and before finalization, avoids both; a group the user destroyed already is left alone.
    """
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
