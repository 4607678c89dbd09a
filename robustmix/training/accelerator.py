"""The Accelerator a trainer runs on: created to fit the step (precision, DDP buffers, gradient accumulation), or one
passed in, checked against it."""

from __future__ import annotations

import os
from pathlib import Path

from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.tracking import GeneralTracker
from accelerate.utils import GradientAccumulationPlugin

from robustmix.core.step import AdversarialStep
from robustmix.training.distributed import destroy_process_group_at_exit


def training_forwards(step: AdversarialStep) -> set[str]:
    """Inputs whose training-mode logits the step's callbacks read (``"adv"``, ``"clean"``...)."""
    fields = (f for c in step.staged for f in (*c.reads, *c.optional_reads))
    return {f.removeprefix("logits_") for f in fields if f.startswith("logits_")}


def trainer_accelerator(
    accelerator: Accelerator | None,
    step: AdversarialStep,
    *,
    mixed_precision: str,
    grad_accum: int,
    log_with: str | GeneralTracker | list[str | GeneralTracker] | None,
    project_dir: Path | None,
) -> Accelerator:
    """The accelerator to train ``step`` on: ``accelerator`` once checked, or a new one.

    A new one runs ``mixed_precision``, accumulates ``grad_accum`` micro-batches, sends metrics to ``log_with``
    and, when the step runs several training forwards before one backward (TRADES: clean and adversarial),
    keeps DDP from broadcasting BatchNorm buffers between them (it would overwrite them in place, under the first
    forward's autograd graph).

    Raises:
        ValueError: ``accelerator`` accumulates another number of micro-batches, runs another precision, or
            broadcasts buffers under DDP where the step needs it not to.
        RuntimeError: The processes launched (``WORLD_SIZE``) are not the processes Accelerate runs.
    """
    several_forwards = len(training_forwards(step)) > 1
    if accelerator is None:
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)] if several_forwards else [],
            log_with=log_with,
            # The trainer's own loader is not Accelerate's: micro-batches alone decide when gradients sync.
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum, sync_with_dataloader=False),
            project_dir=project_dir,
        )
        if accelerator.num_processes > 1:  # the process group is this trainer's: it is left cleanly at exit
            destroy_process_group_at_exit()
    elif accelerator.gradient_accumulation_steps != grad_accum:
        raise ValueError(
            f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, not grad_accum "
            f"{grad_accum}"
        )
    elif accelerator.mixed_precision != mixed_precision:
        raise ValueError(f"the accelerator runs {accelerator.mixed_precision!r}, not {mixed_precision!r}")
    elif several_forwards and accelerator.num_processes > 1:
        handler = accelerator.ddp_handler
        if handler is None or handler.broadcast_buffers:
            raise ValueError(
                f"the step runs training forwards of {sorted(training_forwards(step))} before one backward; "
                "under DDP create the Accelerator with DistributedDataParallelKwargs(broadcast_buffers=False)"
            )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE) but Accelerate runs {accelerator.num_processes}: "
            "they would train independently into one folder. On CPUs launch with ACCELERATE_USE_CPU=1"
        )
    return accelerator
