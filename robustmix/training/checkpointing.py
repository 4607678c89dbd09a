"""The trainer's side of checkpoints: when one is due, where it goes, what a resume checks before it continues, and
what it deletes of the run it replaces. The files themselves are ``robustmix.runs.checkpoint``'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from robustmix.core.step import AdversarialStep
from robustmix.runs.checkpoint import CheckpointError, drop_checkpoints_after, list_checkpoints, save_checkpoint
from robustmix.runs.folder import CHECKPOINTS_DIR, MODEL_FILE, drop_results_after

#: Entries of a checkpoint's trainer_state.json that a resume reads.
RESUMED_STATE = frozenset(
    {"epoch", "batch_in_epoch", "global_step", "best", "val_metrics", "last_eval_step", "elapsed_s", "num_processes",
     "batch_size", "num_train_examples", "seed", "total_steps"}
)  # fmt: skip


class Checkpoints:
    """When a trainer checkpoints, into which folder, and the step it last did.

    Args:
        output_dir: The run folder (checkpoints go to its ``checkpoints/``); ``None``: no checkpoints.
        every_epochs: Checkpoint every this many epochs (``None``: never by epoch).
        every_steps: Checkpoint every this many optimizer steps (``None``: never by step).
        keep: Keep only this many most recent checkpoints; ``None`` keeps all.
    """

    def __init__(
        self, output_dir: Path | None, every_epochs: int | None, every_steps: int | None, keep: int | None
    ) -> None:
        self.output_dir, self.every_epochs, self.every_steps, self.keep = output_dir, every_epochs, every_steps, keep
        #: The step of the last checkpoint saved or resumed from; ``None`` before any.
        self.last_saved_step: int | None = None

    @property
    def directory(self) -> Path | None:
        """The run's checkpoint folder; ``None`` without a run folder."""
        return self.output_dir / CHECKPOINTS_DIR if self.output_dir is not None else None

    @property
    def enabled(self) -> bool:
        """Whether this run writes checkpoints at all."""
        return self.output_dir is not None and (self.every_epochs is not None or self.every_steps is not None)

    def due_at_step(self, step: int) -> bool:
        """Whether a checkpoint by step is due after optimizer step ``step`` (counted from 1)."""
        return self.every_steps is not None and step % self.every_steps == 0

    def due_at_epoch_end(self, epochs_done: int, step: int) -> bool:
        """Whether a checkpoint is due at the end of an epoch, by epoch or by step."""
        by_epoch = self.every_epochs is not None and epochs_done % self.every_epochs == 0
        return by_epoch or self.due_at_step(step)

    def check_fresh(self) -> None:
        """Raise ``ValueError`` if the run folder already holds a run: a fresh start must not mix with it."""
        if self.output_dir is None:
            return
        if list_checkpoints(self.directory) or (self.output_dir / MODEL_FILE).exists():
            raise ValueError(
                f"{self.output_dir} already holds a run (checkpoints or {MODEL_FILE}); resume it with "
                "resume='latest', or train into an empty folder"
            )

    def save(
        self,
        accelerator: Accelerator,
        step: int,
        *,
        model: nn.Module,
        optimizer: Optimizer,
        scheduler: LRScheduler | None,
        ema: nn.Module | None,
        trainer_state: dict[str, Any],
        callback_state: dict[str, Any],
    ) -> None:
        """Save the checkpoint of optimizer step ``step`` (``robustmix.runs.checkpoint.save_checkpoint``) and drop
        the oldest beyond ``keep``; call it on every process."""
        save_checkpoint(
            accelerator, self.directory, step, model=model, optimizer=optimizer, scheduler=scheduler,
            trainer_state=trainer_state, callback_state=callback_state, keep=self.keep, ema=ema,
        )  # fmt: skip
        self.last_saved_step = step

    @staticmethod
    def check_resumable(checkpoint: Path, state: dict[str, Any], here: dict[str, Any]) -> None:
        """Raise ``CheckpointError`` unless ``state`` (a checkpoint's trainer_state.json) holds what a resume reads
        and was written by a run with this run's ``here`` (processes, batch size, dataset size, seed, planned
        steps): the lr schedule and the data order span those, so the resume could not continue exactly."""
        missing = sorted(RESUMED_STATE - state.keys())
        if missing:
            raise CheckpointError(f"{checkpoint / 'trainer_state.json'} lacks {', '.join(missing)}")
        differ = {k: (state[k], v) for k, v in here.items() if state[k] != v}
        if differ:
            detail = ", ".join(f"{k} {saved} (checkpoint) vs {now} (now)" for k, (saved, now) in differ.items())
            raise CheckpointError(f"cannot resume {checkpoint} exactly: {detail}")

    @staticmethod
    def load_callback_state(step: AdversarialStep, checkpoint: Path, callback_state: dict[str, Any]) -> None:
        """Load a checkpoint's callback state into ``step``; a state that does not fit is a ``CheckpointError``."""
        try:
            step.load_state_dict(callback_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:  # callbacks raise what their state gives
            raise CheckpointError(
                f"the callbacks' state in {checkpoint} does not load into this run's: {err}"
            ) from err

    def drop_after(self, checkpoint: Path, step: int, *, finished: bool) -> None:
        """Delete what the continuation a resume abandons wrote after ``checkpoint``: later checkpoints and, for a
        checkpoint of this run folder, later results (``drop_results_after``); call it on the main process."""
        drop_checkpoints_after(self.directory, checkpoint)
        if checkpoint.resolve().parent == self.directory.resolve():
            dropped = drop_results_after(self.output_dir, step, finished=finished)
            if dropped:
                print(f"resuming from {checkpoint.name}: deleted the {', '.join(dropped)} of the run it replaces")
