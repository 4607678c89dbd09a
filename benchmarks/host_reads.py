"""What counts as a host read, and a counter of them: ``throughput.py`` and the cost-accounting tests share it.

A host read is a tensor operation called from Python that copies values back to the host, or whose output
size depends on the values: on CUDA each one waits for the device (a synchronization), on a CPU it is free but
can still be counted. Reads inside C++ kernels are not seen; on CUDA ``throughput.py`` also counts
synchronizations with CUDA's sync debug mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: Tensor methods and functions that read values back to the host.
HOST_READS = frozenset(
    {
        "__bool__",
        "__float__",
        "__index__",
        "__int__",
        "cpu",
        "item",
        "masked_select",
        "nonzero",
        "numpy",
        "tolist",
        "unique",
    }
)


class HostReads(TorchFunctionMode):
    """Counts the host reads in the block (`HOST_READS`, and indexing with a boolean mask) in ``count``.

    Example:
        >>> with HostReads() as reads:
        ...     loss.item()
        >>> reads.count
        1
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Callable, types: object, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += is_host_read(func, args)
        return func(*args, **(kwargs or {}))


def is_host_read(func: Callable, args: tuple) -> bool:
    """Whether calling ``func`` on ``args`` reads values back to the host."""
    name = getattr(func, "__name__", "")
    if name in ("__getitem__", "__setitem__"):
        index = args[1] if len(args) > 1 else ()
        parts = index if isinstance(index, tuple | list) else (index,)
        return any(isinstance(part, Tensor) and part.dtype == torch.bool for part in parts)
    return name in HOST_READS
