"""Model modes for attacks: which BatchNorm / dropout behaviour an attack runs under.

Attacks must not change the model the trainer sees: every mode switch here records the
``training`` flag of each module (and BatchNorm momentum / counters where touched) and restores
them when the block ends, also when it ends with an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: ``"eval"``: BatchNorm uses running statistics, dropout is off (the default for attacks).
#: ``"train"``: the model as it is in training (batch statistics, running stats updated, dropout on).
#: ``"train_frozen_bn"``: train mode (batch statistics, dropout on) but BatchNorm running
#: statistics are left exactly as they were.
BNMode = Literal["eval", "train", "train_frozen_bn"]
BN_MODES = ("eval", "train", "train_frozen_bn")


def check_bn_mode(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of ``BN_MODES``."""
    if mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {mode!r}")


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: BNMode) -> Iterator[nn.Module]:
    """Run the block with ``model`` in ``mode`` and restore every module's previous state after."""
    check_bn_mode(mode)
    saved = [(module, module.training) for module in model.modules()]
    frozen: list[tuple[_BatchNorm, float | None, object]] = []
    try:
        if mode == "eval":
            model.eval()
        else:
            model.train()
            if mode == "train_frozen_bn":
                for module in model.modules():
                    if isinstance(module, _BatchNorm) and module.track_running_stats:
                        tracked = module.num_batches_tracked
                        frozen.append((module, module.momentum, None if tracked is None else tracked.clone()))
                        # momentum 0 keeps running_mean/var bit-for-bit: r * (1 - 0) + 0 * batch == r.
                        module.momentum = 0.0
        yield model
    finally:
        for module, momentum, tracked in frozen:
            module.momentum = momentum
            if tracked is not None:
                module.num_batches_tracked.copy_(tracked)
        for module, training in saved:
            module.training = training
