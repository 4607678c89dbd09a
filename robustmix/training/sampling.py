"""Data order and seeding of a training run: the random streams, the batches of each epoch, the step plan.

Every epoch is a permutation seeded by ``(seed, epoch)``, cut into global batches of ``batch_size *
num_processes`` examples, each process taking its slice; a resumed run starts an epoch at any batch of it.
``plan_steps`` turns a dataset size and batch settings into the optimizer steps of a run, for the trainer and
for whatever must know them before it (an lr schedule, a recipe's callbacks).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

#: Independent random streams derived from the run seed (``mix_seed(seed, stream, ...)``): the data order, the
#: augmentation of each step, the random starts of the evaluation attack.
ORDER_STREAM, AUGMENT_STREAM, EVAL_STREAM = 0, 1, 2


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixed from non-negative integers (run seed, stream, epoch, rank...), stable across runs."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def batches_per_epoch(num_examples: int, batch_size: int, num_processes: int = 1, micro_batches: int = 1) -> int:
    """Optimizer steps in one epoch of ``EpochBatches``.

    Args:
        num_examples: Training examples.
        batch_size: Examples per process per micro-batch (per step when not accumulating gradients).
        num_processes: Data-parallel processes.
        micro_batches: Micro-batches per optimizer step (gradient accumulation).
    """
    full, rest = divmod(num_examples, batch_size * num_processes * micro_batches)
    return full + (rest >= _smallest_batch(batch_size) * num_processes * micro_batches)


def _smallest_batch(batch_size: int) -> int:
    """Examples per process of the smallest last batch an epoch keeps: two, as BatchNorm in train mode cannot
    normalize a single example (one value per channel after global pooling), unless every batch holds one."""
    return min(2, batch_size)


class StepPlan(NamedTuple):
    """The optimizer steps of a run.

    Attributes:
        steps_per_epoch: Optimizer steps in one epoch (0: too few examples for one batch on every process).
        total_steps: Optimizer steps of the whole run: ``epochs`` of them, capped by ``max_steps``.
    """

    steps_per_epoch: int
    total_steps: int


def plan_steps(
    num_examples: int,
    batch_size: int,
    num_processes: int,
    grad_accum: int,
    epochs: int,
    max_steps: int | None = None,
) -> StepPlan:
    """The optimizer steps of a run over ``epochs`` of ``EpochBatches`` (define the lr schedule with them).

    Args:
        num_examples: Training examples.
        batch_size: Examples per process per micro-batch.
        num_processes: Data-parallel processes.
        grad_accum: Micro-batches per optimizer step.
        epochs: Planned epochs.
        max_steps: Cap on the optimizer steps; ``None``: none.
    """
    steps_per_epoch = batches_per_epoch(num_examples, batch_size, num_processes, grad_accum)
    planned = epochs * steps_per_epoch
    return StepPlan(steps_per_epoch, planned if max_steps is None else min(max_steps, planned))


def warn_if_last_batch_dropped(num_examples: int, batch_size: int, slices: int, *, stacklevel: int = 2) -> None:
    """Warn when every epoch leaves out its last batch because it would hold one example per process and
    micro-batch (``slices``: processes times micro-batches), which BatchNorm cannot train on."""
    rest = num_examples % (batch_size * slices)
    if batch_size > 1 and slices <= rest < 2 * slices:
        warnings.warn(
            f"train_data has {num_examples} examples: the last batch of every epoch would hold one example "
            f"per process (and micro-batch), which BatchNorm cannot train on; it is left out ({rest} examples "
            "of each epoch)",
            UserWarning, stacklevel=stacklevel + 1,
        )  # fmt: skip


class EpochBatches(Sampler[list[int]]):
    """Batches of dataset positions for one process, resumable in the middle of an epoch.

    Every epoch draws a permutation seeded by ``(seed, epoch)``, identical on every process, and cuts it
    into global batches of ``batch_size * num_processes`` positions; the process takes its
    ``batch_size`` slice. The last, smaller global batch is split evenly (at most ``num_processes - 1``
    examples of it are left out), so every process runs the same number of steps on equal batch sizes.
    A last batch that would give each process a single example is left out altogether (unless
    ``batch_size`` is 1): BatchNorm in train mode cannot normalize one example; ``Trainer`` warns when
    that happens. With ``micro_batches`` (gradient accumulation) every batch holds ``batch_size *
    micro_batches`` positions per process (the examples of one step without accumulation at that batch
    size), and the smallest last batch kept is ``micro_batches`` times larger.

    Args:
        num_examples: Size of the dataset.
        batch_size: Examples per process per batch.
        num_processes: Data-parallel processes.
        process_index: This process's rank.
        seed: Run seed (non-negative).
        micro_batches: Micro-batches of ``batch_size`` per batch.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        num_processes: int,
        process_index: int,
        seed: int,
        micro_batches: int = 1,
    ):
        self.num_examples, self.batch_size, self.micro_batches = num_examples, batch_size, micro_batches
        self.num_processes, self.process_index, self.seed = num_processes, process_index, seed
        self.epoch = self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Iterate over ``epoch`` from its batch number ``start`` on."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, ORDER_STREAM, self.epoch))
        order = torch.randperm(self.num_examples, generator=generator)
        global_size = self.batch_size * self.num_processes * self.micro_batches
        for first in range(self.start * global_size, self.num_examples, global_size):
            chunk = order[first : first + global_size]
            per_process = len(chunk) // self.num_processes
            if per_process < _smallest_batch(self.batch_size) * self.micro_batches:
                return
            rank = self.process_index
            yield chunk[rank * per_process : (rank + 1) * per_process].tolist()

    def __len__(self) -> int:
        total = batches_per_epoch(self.num_examples, self.batch_size, self.num_processes, self.micro_batches)
        return total - self.start


def training_loader(
    data: Dataset, batches: EpochBatches, *, num_workers: int, device: torch.device, seed: int
) -> DataLoader:
    """The DataLoader of the training batches ``batches`` draws, pinned when it feeds a CUDA device from host
    memory."""
    # The loader's own generator keeps DataLoader iteration from drawing on the global RNG, which
    # the attacks use: the global stream must not depend on where a run was resumed.
    return DataLoader(
        data, batch_sampler=batches, num_workers=num_workers, persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda" and on_host(data), generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def on_host(data: Dataset) -> bool:
    """Whether a dataset's tensors live in host memory (only those can be pinned); other datasets count as host."""
    images = getattr(data, "images", None)
    return not isinstance(images, Tensor) or images.device.type == "cpu"
