"""The Accelerate training loop: fit and evaluate an ``AdversarialStep`` on any model.

One loop serves every recipe, on CPU, one GPU or many (``accelerate launch``), in fp32, bf16 or fp16:

    trainer = Trainer(model, AdversarialStep([PGDAttack(eps, step_size, 10), AdversarialCE()]), optimizer,
                      train_data, val_data, scheduler=scheduler, epochs=110, output_dir="runs/pgd_at")
    trainer.fit()                       # or trainer.fit(resume="latest") after an interruption
    test_metrics = trainer.evaluate(test_data)

Data order is the trainer's own: every epoch is a permutation seeded by ``(seed, epoch)``, cut into global
batches of ``batch_size * num_processes`` examples, each process taking its slice. A checkpoint records the
epoch and the number of batches done in it, so a resumed run sees exactly the batches it has not seen.

A NaN or inf loss or gradient stops the run with ``NonFiniteLossError`` (``nonfinite="raise"``, the default)
or skips the step and counts it (``nonfinite="skip"``); see ``Trainer``. It never reaches a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.tracking import GeneralTracker
from accelerate.utils import GradientAccumulationPlugin, set_seed
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from robustmix.attacks import pgd
from robustmix.attacks.pgd import check_eps
from robustmix.core.modes import model_mode
from robustmix.core.step import MIXED_PRECISION, AdversarialStep
from robustmix.core.validation import check_trainer_arguments
from robustmix.data import augment_cifar, make_dataloader
from robustmix.models import unwrap_model
from robustmix.runs.checkpoint import (
    CheckpointError,
    atomic_save_weights,
    atomic_write_json,
    atomic_write_text,
    drop_checkpoints_after,
    list_checkpoints,
    open_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from robustmix.runs.folder import (
    BEST_DIR,
    CHECKPOINTS_DIR,
    EMA_MODEL_FILE,
    METRICS_FILE,
    METRICS_LOG,
    MODEL_FILE,
    drop_results_after,
)

# Independent random streams derived from the run seed.
_ORDER_STREAM, _AUGMENT_STREAM, _EVAL_STREAM = 0, 1, 2

#: What the trainer does with a step whose loss or gradients are NaN or inf (see ``Trainer``).
NONFINITE_POLICIES = ("raise", "skip")
#: Dataset indices shown per process in a non-finite report (the exception keeps them all).
_SHOWN_INDICES = 64


class NonFiniteError(RuntimeError):
    """Training met NaN or inf where it needs finite values (the model's weights, a callback's state)."""


class NonFiniteLossError(NonFiniteError):
    """A training step's loss or gradients are NaN or inf; raised before the optimizer step.

    Attributes:
        step: The step's 0-based global step (``ctx.step``; the checkpoint before it is ``step_<step>``).
        epoch: Its 0-based epoch.
        batch_in_epoch: Its 0-based position in the epoch.
        indices: Dataset indices of the global batch, one list per process (empty lists when the batches
            carry no ``"index"``).
        nonfinite_loss: Processes whose loss was non-finite.
        nonfinite_gradients: Whether the (all-reduced) gradients were non-finite.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int,
        epoch: int,
        batch_in_epoch: int,
        indices: list[list[int]],
        nonfinite_loss: list[int],
        nonfinite_gradients: bool,
    ) -> None:
        super().__init__(message)
        self.step, self.epoch, self.batch_in_epoch = step, epoch, batch_in_epoch
        self.indices, self.nonfinite_loss, self.nonfinite_gradients = indices, nonfinite_loss, nonfinite_gradients


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
        generator = torch.Generator().manual_seed(mix_seed(self.seed, _ORDER_STREAM, self.epoch))
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


def training_forwards(step: AdversarialStep) -> set[str]:
    """Inputs whose training-mode logits the step's callbacks read (``"adv"``, ``"clean"``...)."""
    fields = (f for c in step.staged for f in (*c.reads, *c.optional_reads))
    return {f.removeprefix("logits_") for f in fields if f.startswith("logits_")}


#: Entries of a checkpoint's trainer_state.json that a resume reads.
_RESUMED_STATE = frozenset(
    {"epoch", "batch_in_epoch", "global_step", "best", "val_metrics", "last_eval_step", "elapsed_s", "num_processes",
     "batch_size", "num_train_examples", "seed", "total_steps"}
)  # fmt: skip
#: Keys of metrics.jsonl rows that measure wall-clock time: the only values that differ between a run and the same
#: run interrupted and resumed.
WALL_CLOCK_KEYS = frozenset({"elapsed_s", "epoch_time_s", "images_per_s"})
#: Keys of a training row in metrics.jsonl that callbacks' ``ctx.extras`` may not take.
_TRAIN_ROW_KEYS = frozenset(
    {"step", "epoch", "loss", "lr", "train_adv_acc", "train_clean_acc", "forwards_per_step", "backwards_per_step",
     "nonfinite_skipped", "elapsed_s"}
)  # fmt: skip


class Trainer:
    """Adversarial training with Accelerate: data, steps, evaluation, checkpoints, metrics.

    Every training step: the batch moves to the device (and is augmented), ``on_batch_start`` fires, the
    ``AdversarialStep`` computes the loss (epoch, step, totals and the batch's dataset ``index`` are
    passed on), ``accelerator.backward``, ``on_before_optimizer_step`` (gradients not yet clipped, still
    scaled under fp16), optional gradient clipping, ``optimizer.step()``, ``on_after_optimizer_step`` (also
    when the fp16 GradScaler skipped the step: ``trainer.step_was_skipped`` says so), ``scheduler.step()``.

    Every ``eval_every`` epochs (and after the last step) the model is evaluated on ``val_data``: clean and
    PGD accuracy (CE, ``eval_steps`` steps of ``eval_eps / 4``, uniform start, eval mode). The weights with
    the best validation PGD accuracy are copied to ``output_dir/best/``; the test split is never used here.

    With ``ema_decay``, an exponential moving average of the weights and buffers (timm's ``ModelEmaV3``:
    ``ema = decay * ema + (1 - decay) * weights``) is updated after every optimizer step taken (after
    ``on_after_optimizer_step``, so AWP's perturbation is off), validated beside the raw weights
    (``val_ema_*`` metrics), checkpointed (a resumed run continues it bit for bit) and saved as
    ``model_ema.safetensors``; ``evaluate(data, ema=True)`` evaluates it. The best weights are chosen on the
    raw weights' validation PGD accuracy.

    Gradient accumulation (``grad_accum`` N > 1, Accelerate's ``accumulate``: no DDP gradient sync before the
    last micro-batch). A step's batch holds ``batch_size * N`` examples per process, the examples a step
    of that batch size would see without accumulation; it is split into N micro-batches, each runs the
    step's callbacks and a backward of its loss weighted by its share of the batch, and the optimizer steps
    once on the summed gradient. Positions count optimizer steps: ``ctx.step``, ``global_step``, ``epochs``,
    ``max_steps``, the lr schedule, ``log_every`` and checkpoints (which fall between optimizer steps, so a
    resumed run continues exactly). ``on_batch_start`` fires once per step with the whole batch, the step's
    stage callbacks once per micro-batch (all with the same ``ctx.step``), the optimizer hooks once per
    step. Batch statistics (BatchNorm, a reweighter's normalization over the batch) are those of the
    micro-batch. Callbacks with ``accumulates = False`` (AWP, the lookahead reweighters) are refused.

    The lr scheduler is stepped exactly once per optimizer step, on every process, also when the fp16
    GradScaler skipped the step (the lr is a function of the step count alone). It is deliberately not
    passed through ``accelerator.prepare``: Accelerate's scheduler wrapper steps ``num_processes`` times per
    call (it assumes schedules written in single-process steps), while robustmix schedules count optimizer
    steps of the global batch. Checkpoints save it beside the model and optimizer.

    Under DDP, when the step runs several training forwards before one backward (e.g. TRADES: clean and
    adversarial), the accelerator the trainer creates uses ``broadcast_buffers=False``: DDP would otherwise
    overwrite the BatchNorm buffers from rank 0 at the second forward, in place, under the first forward's
    autograd graph. BatchNorm statistics are then averaged across processes before every evaluation and
    checkpoint, which also makes the saved model the same on every rank.

    Non-finite steps. After ``backward`` and ``on_before_optimizer_step`` (before clipping), one check per
    step reads whether the loss or the gradients hold NaN or inf: the norm of every gradient and the
    loss go through a single ``isfinite`` reduction, and one host read (after a one-element all-reduce
    under DDP, so every process takes the same decision). Under fp16 only the loss is checked: inf or NaN
    gradients with a finite loss are the GradScaler's business (it skips the step and lowers the scale).
    A rejected step never reaches ``optimizer.step()``: its gradients are dropped, ``step_was_skipped`` is
    set and ``on_after_optimizer_step`` fires (AWP takes its perturbation off), then, by ``nonfinite``:

    - ``"raise"`` (default): ``NonFiniteLossError`` naming the global step, epoch, position in the epoch,
      the processes with a non-finite loss and the dataset indices of the batch. Nothing is saved after
      it: the last checkpoint on disk is the state before the bad step. (BatchNorm statistics of the
      model in memory may have seen the bad batch; its parameters and optimizer have not.)
    - ``"skip"``: the step counts as done without an update: the model's parameters, buffers (BatchNorm
      statistics, restored from a copy taken before the step) and the optimizer state stay as they were;
      the batch is consumed and the lr scheduler steps as usual, so the lr stays a function of the global
      step. A warning names the step and the indices; ``nonfinite_skipped`` (the run's count so far) is in
      every training row of ``metrics.jsonl`` and in checkpoints, so a resumed run continues it exactly.
      The step's loss and accuracies are left out of the training metrics. State a callback changed
      during the bad step (a table row, a meta-net update) is kept.

    Independently of the policy, a checkpoint, the best and the final weights are never written from
    weights that hold NaN or inf, nor with callback state that holds NaN (``NonFiniteError``).

    Resuming (``fit(resume=...)``) restores model, optimizer, scheduler, GradScaler, RNG states, callback
    state and the position in the epoch: the run continues bit for bit as if it had not stopped (on the
    same hardware and number of processes). ``on_epoch_start`` does not fire again when resuming in the
    middle of an epoch, so anything an epoch hook sets must be in the callback's ``state_dict`` or derived
    from ``ctx.epoch``.

    Early stopping. A callback ends the fit before ``epochs`` with ``stop`` (e.g. from ``on_epoch_end``),
    optionally handing back the weights to end with; the fit then finishes as at its planned end, and the
    stop is checkpointed, so resuming a stopped run does not train further.

    Args:
        model: Classifier taking pixels in [0, 1] (e.g. from ``robustmix.models.create_model``).
        step: The adversarial step (callbacks) that turns a batch into a loss.
        optimizer: Optimizer over ``model``'s parameters.
        train_data: Map-style dataset of dicts with ``"image"`` ``[C, H, W]`` in [0, 1], ``"label"`` and
            ``"index"`` (e.g. ``robustmix.data.ImageDataset``).
        val_data: Validation split for per-epoch evaluation and best-checkpoint selection; ``None`` skips both.
        scheduler: lr scheduler defined in optimizer steps (``total_steps`` of them).
        accelerator: An Accelerator to use; by default one is created with ``mixed_precision``, DDP kwargs as
            above and the trackers of ``log_with``.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` for the created accelerator; must match
            ``step.mixed_precision``. Defaults to the step's.
        epochs: Number of epochs.
        max_steps: Stop after this many optimizer steps (also in the middle of an epoch); default: no cap.
        batch_size: Examples per process per step. The global batch is ``batch_size * num_processes``; keep
            it fixed across process counts by dividing this value.
        grad_clip: Clip the global gradient norm to this value; default: no clipping.
        eval_every: Evaluate on ``val_data`` every this many epochs; ``None`` evaluates only at the end.
        eval_eps: L-inf budget in pixels of the evaluation PGD; defaults to the eps of the step's attack.
        eval_steps: Steps of the evaluation PGD (20: PGD-20).
        checkpoint_every: Save a checkpoint every this many epochs (``None``: never by epoch).
        checkpoint_every_steps: Save a checkpoint every this many steps (``None``: never by step).
        keep_checkpoints: Keep only this many most recent checkpoints (by step); ``None`` keeps all.
        output_dir: Run folder (see ``robustmix.runs.folder``); ``None`` writes nothing, not even checkpoints.
        seed: Seed (>= 0) of the data order, augmentation, evaluation starts and, at a fresh start, of the
            global RNGs (offset by the process index) that attacks and dropout draw from.
        augment: Random crop (4-pixel padding) and horizontal flip of every training batch, on the device.
        num_workers: DataLoader worker processes.
        log_every: Log training metrics (averaged over the window) every this many steps and at epoch ends.
        log_with: Accelerate trackers (``"tensorboard"``, ``"wandb"``, ``"mlflow"``..., or ``GeneralTracker``
            instances) that receive every row of ``metrics.jsonl``, for the created accelerator; trackers that
            write files write them under ``output_dir``. Default: none.
        progress: Show a progress bar on the main process.
        nonfinite: ``"raise"`` or ``"skip"``: what a step with a NaN or inf loss or gradient does (above).
        ema_decay: Keep a moving average of the weights with this decay per optimizer step, in (0, 1) (e.g.
            0.999; about ``1 / (1 - decay)`` steps are averaged); ``None``: none.
        grad_accum: Micro-batches of ``batch_size`` per optimizer step (gradient accumulation, above).
    """

    def __init__(
        self,
        model: nn.Module,
        step: AdversarialStep,
        optimizer: Optimizer,
        train_data: Dataset,
        val_data: Dataset | None = None,
        *,
        scheduler: LRScheduler | None = None,
        accelerator: Accelerator | None = None,
        mixed_precision: str | None = None,
        epochs: int = 1,
        max_steps: int | None = None,
        batch_size: int = 128,
        grad_clip: float | None = None,
        eval_every: int | None = 1,
        eval_eps: float | None = None,
        eval_steps: int = 20,
        checkpoint_every: int | None = 1,
        checkpoint_every_steps: int | None = None,
        keep_checkpoints: int | None = 2,
        output_dir: str | Path | None = None,
        seed: int = 0,
        augment: bool = False,
        num_workers: int = 0,
        log_every: int = 10,
        log_with: str | GeneralTracker | list[str | GeneralTracker] | None = None,
        progress: bool = True,
        nonfinite: str = "raise",
        ema_decay: float | None = None,
        grad_accum: int = 1,
    ) -> None:
        check_trainer_arguments(
            model, step, optimizer, train_data, val_data, output_dir=output_dir, eval_eps=eval_eps, grad_clip=grad_clip
        )
        for name, value, minimum in (
            ("epochs", epochs, 1), ("batch_size", batch_size, 1), ("eval_steps", eval_steps, 0),
            ("seed", seed, 0), ("num_workers", num_workers, 0), ("log_every", log_every, 1),
            ("grad_accum", grad_accum, 1),
        ):  # fmt: skip
            _check_int(name, value, minimum)
        for name, value in (
            ("max_steps", max_steps), ("eval_every", eval_every), ("checkpoint_every", checkpoint_every),
            ("checkpoint_every_steps", checkpoint_every_steps), ("keep_checkpoints", keep_checkpoints),
        ):  # fmt: skip
            if value is not None:
                _check_int(name, value, 1)
        unfit = [type(c).__name__ for c in step.callbacks if not c.accumulates]
        if grad_accum > 1 and unfit:
            raise ValueError(
                f"grad_accum must be 1 with {', '.join(unfit)}: they act on the weights once per optimizer step, "
                "with its whole batch, and gradient accumulation splits the batch"
            )
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if ema_decay is not None and not (0 < ema_decay < 1):
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if grad_clip is not None and not (0 < grad_clip < math.inf):
            raise ValueError(f"grad_clip must be a positive number, got {grad_clip}")
        if not isinstance(train_data, Sized) or len(train_data) == 0:
            raise ValueError("train_data must be a non-empty map-style dataset")
        if batch_size == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError("batch_size 1 cannot train a model with BatchNorm (it normalizes over the batch)")
        mixed_precision = mixed_precision or (accelerator.mixed_precision if accelerator else step.mixed_precision)
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
        if step.mixed_precision != mixed_precision:
            raise ValueError(
                f"the step was built with mixed_precision={step.mixed_precision!r} but the trainer runs "
                f"{mixed_precision!r}; pass the same value to both"
            )
        self.eval_eps = _attack_eps(step) if eval_eps is None else eval_eps
        check_eps(self.eval_eps, name="eval_eps")

        several_forwards = len(training_forwards(step)) > 1
        self.output_dir = Path(output_dir) if output_dir is not None else None
        if accelerator is None:
            accelerator = Accelerator(
                mixed_precision=mixed_precision,
                kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)] if several_forwards else [],
                log_with=log_with,
                # The trainer's own loader is not Accelerate's: micro-batches alone decide when gradients sync.
                gradient_accumulation_plugin=GradientAccumulationPlugin(
                    num_steps=grad_accum, sync_with_dataloader=False
                ),
                project_dir=self.output_dir,
            )
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
        self.accelerator = accelerator
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        #: The moving average of the weights (``ema.module``: a copy of the model), or ``None``.
        self.ema = None if ema_decay is None else ModelEmaV3(unwrap_model(self.model), decay=ema_decay)

        self.step = step
        self.train_data, self.val_data = train_data, val_data
        self.epochs, self.max_steps, self.batch_size = epochs, max_steps, batch_size
        self.grad_clip, self.eval_every, self.eval_steps = grad_clip, eval_every, eval_steps
        self.checkpoint_every, self.checkpoint_every_steps = checkpoint_every, checkpoint_every_steps
        self.keep_checkpoints, self.seed, self.augment = keep_checkpoints, seed, augment
        self.num_workers, self.log_every, self.progress = num_workers, log_every, progress
        self.nonfinite = nonfinite
        # Under fp16 the GradScaler owns inf/NaN gradients (they are expected while it calibrates its scale).
        self._check_gradients = mixed_precision != "fp16"
        self._buffer_copy: list[Tensor] | None = None  # the model's buffers before the step ("skip")

        self.grad_accum = grad_accum
        slices = accelerator.num_processes * grad_accum  # micro-batches of a step, over all processes
        self.steps_per_epoch = batches_per_epoch(len(train_data), batch_size, accelerator.num_processes, grad_accum)
        if self.steps_per_epoch == 0:
            raise ValueError(f"train_data has {len(train_data)} examples, too few for one batch on every process")
        rest = len(train_data) % (batch_size * slices)
        if batch_size > 1 and slices <= rest < 2 * slices and accelerator.is_main_process:
            warnings.warn(
                f"train_data has {len(train_data)} examples: the last batch of every epoch would hold one example "
                f"per process (and micro-batch), which BatchNorm cannot train on; it is left out ({rest} examples "
                "of each epoch)",
                UserWarning, stacklevel=2,
            )  # fmt: skip
        planned = epochs * self.steps_per_epoch
        #: Optimizer steps this fit will run in all: define the lr schedule with this number.
        self.total_steps = planned if max_steps is None else min(max_steps, planned)
        self._batches = EpochBatches(
            len(train_data), batch_size, num_processes=accelerator.num_processes,
            process_index=accelerator.process_index, seed=seed, micro_batches=grad_accum,
        )  # fmt: skip
        # The loader's own generator keeps DataLoader iteration from drawing on the global RNG, which
        # the attacks use: the global stream must not depend on where a run was resumed.
        self._loader = DataLoader(
            train_data, batch_sampler=self._batches, num_workers=num_workers, persistent_workers=num_workers > 0,
            pin_memory=accelerator.device.type == "cuda" and _on_host(train_data),
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        self._eval_loaders: dict[tuple[int, int], DataLoader] = {}

        #: Position: the epoch being trained and the batches of it done; the optimizer steps done.
        self.epoch = self.batch_in_epoch = self.global_step = 0
        #: Validation metrics of the best evaluation so far (by PGD accuracy), with its step and epoch.
        self.best: dict[str, Any] | None = None
        self.val_metrics: dict[str, float] = {}
        #: Whether the last optimizer step was skipped: by the fp16 GradScaler (inf/NaN gradients) or by
        #: ``nonfinite="skip"``.
        self.step_was_skipped = False
        #: Steps skipped by ``nonfinite="skip"`` so far in this run (checkpointed).
        self.nonfinite_skipped = 0
        self._log_rows = 0  # rows this run wrote to metrics.jsonl (checkpointed: a resume truncates to it)
        #: Why a callback ended the fit early (``stop``); ``None`` while it runs to its planned end.
        self.stop_reason: str | None = None
        self._elapsed_before = 0.0
        self._last_saved_step: int | None = None
        self._last_eval_step: int | None = None

    # ------------------------------------------------------------------ public API

    @property
    def checkpoints_dir(self) -> Path | None:
        return self.output_dir / CHECKPOINTS_DIR if self.output_dir is not None else None

    @property
    def eval_attack(self) -> dict[str, Any]:
        """Settings of the evaluation attack, written beside every robust accuracy."""
        return {
            "attack": "pgd", "loss": "ce", "norm": "linf", "eps": self.eval_eps, "step_size": self.eval_eps / 4,
            "steps": self.eval_steps, "restarts": 1, "start": "uniform", "bn_mode": "eval",
        }  # fmt: skip

    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Train until ``epochs`` or ``max_steps``; write checkpoints, best and final weights, metrics.

        Args:
            resume: ``None`` starts afresh (``output_dir`` must hold no checkpoints); ``"latest"`` or a
                checkpoint folder continues that run exactly. Resuming from an older checkpoint of this
                ``output_dir`` deletes what belongs to the continuation it abandons, once the checkpoint is
                verified and accepted: the later checkpoints, the final files (``runs.FINAL_FILES``) unless the
                checkpoint is the end of training, and ``best/`` when it records a later step
                (``runs.drop_results_after``). The resumed run then writes ``best/`` only with weights that
                beat the checkpoint's best score, so it may end without one.

        Returns:
            ``{"step", "epoch", "val": last validation metrics, "best": best validation metrics,
                "nonfinite_skipped": steps skipped for a NaN/inf loss or gradient, "stop_reason": why a
                callback stopped the fit early, or None}``.

        Raises:
            NonFiniteLossError: a step's loss or gradients are NaN or inf and ``nonfinite="raise"``.
            NonFiniteError: weights or callback state hold NaN/inf when a checkpoint or weights are due.
            FileNotFoundError: ``resume`` names no complete checkpoint.
            CheckpointError: the checkpoint (for ``"latest"``: every retained one) fails its manifest's check or
                does not load (names the file); for ``"latest"``, a warning names each checkpoint skipped.
            ValueError: a fresh start in an ``output_dir`` that holds checkpoints or final weights, or a
                checkpoint written with another batch size, process count, dataset size, seed or planned
                number of steps (the lr schedule spans those: extending a run is a new run).
        """
        checkpoint = contents = None
        if resume is not None:
            if resume == "latest" and self.checkpoints_dir is None:
                raise ValueError("resume='latest' needs an output_dir")
            checkpoint, contents = open_checkpoint(resume, self.checkpoints_dir or ".")
        else:
            self._check_fresh_output_dir()
            set_seed(self.seed, device_specific=True)
        if self.output_dir is not None and self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)

        # Accelerate keeps one gradient-accumulation setting per process, which the last Accelerator created sets:
        # this fit's is this trainer's.
        self.accelerator.gradient_state.plugin_kwargs.update(num_steps=self.grad_accum, sync_with_dataloader=False)
        # Callbacks allocate their state (e.g. per-example tables) at fit start; a checkpoint then overwrites it.
        self.step.fire("on_fit_start", self)
        if checkpoint is not None:
            self._restore(checkpoint, contents)
        elif self.output_dir is not None and self.accelerator.is_main_process:
            atomic_write_text(self.output_dir / METRICS_LOG, "")
        if self.accelerator.log_with and not self.accelerator.trackers:
            self.accelerator.init_trackers("robustmix")

        self._start_time = time.perf_counter()
        self._window = torch.zeros(6, device=self.accelerator.device, dtype=torch.float64)
        self._window_passes: list[tuple[float, float]] = []
        # Callbacks' ctx.extras, per name: [sum over the window's steps (device tensor), number of steps].
        self._window_extras: dict[str, list] = {}
        self._bar = tqdm(
            total=self.total_steps, initial=self.global_step, desc=f"epoch {self.epoch}", dynamic_ncols=True,
            disable=not (self.progress and self.accelerator.is_main_process),
        )  # fmt: skip
        try:
            while self.epoch < self.epochs and self.global_step < self.total_steps and self.stop_reason is None:
                self._run_epoch()
                if self.batch_in_epoch < self.steps_per_epoch:  # stopped by max_steps in the middle
                    break
                self._end_epoch()
            return self._finish()
        finally:
            self._bar.close()

    def evaluate(self, data: Dataset, *, batch_size: int | None = None, ema: bool = False) -> dict[str, float]:
        """Clean and PGD accuracy of the model on ``data``, every example counted once across processes.

        Runs the model in eval mode; the attack is ``eval_attack`` (its random start is seeded by the
        run seed, so the same weights give the same numbers). An example counts as robust when it is
        classified correctly both clean and after the attack. Works under ``torch.no_grad()`` or
        ``inference_mode()``: the attack enables gradients for itself. Call it on every process.

        Args:
            data: Map-style dataset of ``{"image", "label", ...}`` dicts, pixels in [0, 1].
            batch_size: Examples per process per batch; defaults to the training ``batch_size``.
            ema: Evaluate the moving average of the weights (``ema_decay``) instead of the model's weights.

        Returns:
            ``{"clean_acc", "pgd_acc"}`` as fractions in [0, 1], and ``"n"``, the number of examples.
        """
        if not isinstance(data, Sized) or len(data) == 0:
            raise ValueError("evaluate needs a non-empty map-style dataset")
        if ema and self.ema is None:
            raise ValueError("evaluate(ema=True) needs a trainer with ema_decay")
        self._sync_buffers()
        model = self.ema.module if ema else unwrap_model(self.model)
        device, rank = self.accelerator.device, self.accelerator.process_index
        generator = torch.Generator(device).manual_seed(mix_seed(self.seed, _EVAL_STREAM, rank))
        # Attacks need autograd: inference mode is switched off here (tensors made inside are then ordinary
        # tensors), and no_grad covers the clean forwards; the attack enables gradients for itself.
        with torch.inference_mode(False), torch.no_grad(), model_mode(model, "eval"):
            correct = torch.zeros(2, dtype=torch.int64, device=device)
            n = 0
            for batch in self._eval_loader(data, batch_size or self.batch_size):
                x, y = batch["image"], batch["label"]
                clean_ok = model(x).argmax(dim=1) == y
                x_adv = pgd(
                    model, x, y, eps=self.eval_eps, step_size=self.eval_eps / 4, steps=self.eval_steps,
                    start="uniform", bn_mode="eval", generator=generator,
                )  # fmt: skip
                robust_ok = clean_ok & (model(x_adv).argmax(dim=1) == y)
                ok = self.accelerator.gather_for_metrics(torch.stack([clean_ok, robust_ok], dim=1))
                correct += ok.sum(dim=0)
                n += len(ok)
        clean, robust = correct.tolist()
        return {"clean_acc": clean / n, "pgd_acc": robust / n, "n": n}

    def stop(self, reason: str, *, weights: dict[str, Tensor] | None = None) -> None:
        """End the fit early; call it from a callback during ``fit``, on every process alike.

        The fit stops after the current step, or, from an epoch hook, once the epoch's end (hooks and
        checkpoint) is done. It then finishes as at its planned end: validation (again, when ``weights``
        replaced the validated ones), checkpoint, final weights. ``reason`` is printed and written to
        ``metrics.jsonl`` as a ``"stop"`` row, and checkpointed: resuming the run trains no further.

        Args:
            reason: Why, in words.
            weights: A ``state_dict`` of the unwrapped model to load first: the weights the run ends with
                (e.g. those from before a collapse).
        """
        if weights is not None:
            unwrap_model(self.model).load_state_dict(weights)
            self._last_eval_step = None  # the last validation measured other weights
        self.stop_reason = reason
        self.log({"stop": reason})
        if self.accelerator.is_main_process:
            self._bar.write(f"epoch {self.epoch} step {self.global_step}: stopping early: {reason}")

    def log(self, values: dict[str, Any]) -> None:
        """Write ``values`` (numbers or strings) as a row of ``metrics.jsonl`` and to the trackers, with the
        current step, epoch and elapsed time: a callback's own measurements (e.g. at the end of an epoch)."""
        taken = {"step", "epoch", "elapsed_s"} & values.keys()
        if taken:
            raise ValueError(f"the trainer writes {sorted(taken)} itself: rename them")
        self._log(values)

    # ------------------------------------------------------------------ training

    def _run_epoch(self) -> None:
        if self.batch_in_epoch == 0:
            self.step.fire("on_epoch_start", self, self.epoch)
        self._bar.set_description(f"epoch {self.epoch}")
        self._batches.set_position(self.epoch, self.batch_in_epoch)
        # Throughput of this epoch's training steps (from the resumed position on), validation left out.
        self._epoch_start, self._epoch_images = time.perf_counter(), 0
        for batch in self._loader:
            self._epoch_images += len(batch["label"]) * self.accelerator.num_processes
            self._train_step(batch)
            self.batch_in_epoch += 1
            self.global_step += 1
            self._bar.update()
            if self.global_step % self.log_every == 0:
                self._log_train()
            # A step checkpoint due at the epoch's last batch waits for the epoch's end (evaluation, hooks).
            if self._step_checkpoint_due() and self.batch_in_epoch < self.steps_per_epoch:
                self._save_checkpoint()
            if self.global_step >= self.total_steps or self.stop_reason is not None:
                break

    def _train_step(self, batch: dict[str, Tensor]) -> None:
        device = self.accelerator.device
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        if self.augment:
            generator = torch.Generator(device).manual_seed(
                mix_seed(self.seed, _AUGMENT_STREAM, self.global_step, self.accelerator.process_index)
            )
            batch["image"] = augment_cifar(batch["image"], generator)
        if self.nonfinite == "skip":
            self._copy_buffers()
        self.step.fire("on_batch_start", self, batch)
        self.model.train()
        # The step's batch in grad_accum micro-batches (one when not accumulating): each runs the callbacks
        # and a backward; the optimizer steps once, on the sum of their gradients.
        micro_batches = [
            dict(zip(batch, parts)) for parts in zip(*(v.tensor_split(self.grad_accum) for v in batch.values()))
        ]
        window = torch.zeros_like(self._window)
        losses, contexts = [], []
        for i, micro in enumerate(micro_batches):
            with self.accelerator.accumulate(self.model):
                loss, ctx = self.step(
                    self.model, micro["image"], micro["label"], micro.get("index"), epoch=self.epoch,
                    step=self.global_step, total_epochs=self.epochs, total_steps=self.total_steps,
                )  # fmt: skip
                if i == 0:  # the inner optimizer's: Accelerate's wrapper ignores zero_grad between micro-batches
                    self.optimizer.optimizer.zero_grad(set_to_none=True)
                # Accelerate divides by grad_accum: weighted so, the gradient is the step batch's mean.
                share = len(micro["label"]) * self.grad_accum / len(batch["label"])
                self.accelerator.backward(loss if self.grad_accum == 1 else loss * share)
            # Training accuracies come from logits the step computed anyway: no extra forward.
            targets = micro["label"]
            adv, clean = ctx.logits.get("adv"), ctx.logits.get("clean", ctx.eval_logits.get("clean"))
            b = float(len(targets))
            window += torch.stack([
                loss.detach().double() * b, torch.tensor(b, device=targets.device, dtype=torch.float64),
                *_correct(adv, targets), *_correct(clean, targets),
            ])  # fmt: skip
            losses.append(loss.detach())
            contexts.append(ctx)
        # NaN and inf survive the sum: one loss to check and report for the step.
        loss = losses[0] if self.grad_accum == 1 else torch.stack(losses).sum()
        self.step.fire("on_before_optimizer_step", self, self.optimizer)
        self._lr = self.optimizer.param_groups[0]["lr"]
        local_flags = self._nonfinite_flags(loss)
        flags = self.accelerator.reduce(local_flags, "sum") if self.accelerator.num_processes > 1 else local_flags
        if any(flags.tolist()):  # the one host read of the check
            self._reject_step(batch, loss, local_flags, flags)
        else:
            for ctx in contexts:
                self._add_extras(ctx.extras)
            if self.grad_clip is not None:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.step_was_skipped = self.optimizer.step_was_skipped
            self.step.fire("on_after_optimizer_step", self, self.optimizer)
            if self.ema is not None:
                self.ema.update(unwrap_model(self.model))
            self._window += window
        if self.scheduler is not None:
            self.scheduler.step()
        self._window_passes.extend(ctx.passes() for ctx in contexts)

    def _nonfinite_flags(self, loss: Tensor) -> Tensor:
        """``[loss is NaN/inf, gradients are NaN/inf]`` of this process's step, as floats on the device.

        The loss and the L2 norm of every gradient (one fused ``_foreach_norm``, as gradient clipping
        computes it; NaN and inf propagate into it) go through one ``isfinite``; no host read. A norm that
        overflows float32 (a tensor's gradient norm past ~1e19) counts as non-finite too. (The max-abs norm
        cannot overflow but is ~6x slower on CPUs.)
        """
        grads = [p.grad for p in self.model.parameters() if p.grad is not None] if self._check_gradients else []
        norms = torch._foreach_norm(grads) if grads else []
        bad = ~torch.isfinite(torch.stack([loss.detach().float().reshape(()), *norms]))
        return torch.stack([bad[0], bad[1:].any()]).float()

    def _copy_buffers(self) -> None:
        buffers = list(unwrap_model(self.model).buffers())
        if self._buffer_copy is None:
            self._buffer_copy = [b.detach().clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._buffer_copy, buffers)

    def _reject_step(self, batch: dict[str, Tensor], loss: Tensor, local_flags: Tensor, flags: Tensor) -> None:
        """Drop a step whose loss or gradients are NaN/inf: no update; then raise, or count and warn."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.nonfinite == "skip" and self._buffer_copy:
            with torch.no_grad():
                torch._foreach_copy_(list(unwrap_model(self.model).buffers()), self._buffer_copy)
        self.step_was_skipped = True
        self.step.fire("on_after_optimizer_step", self, self.optimizer)  # e.g. AWP takes its perturbation off

        # All processes are here together (the flags were reduced): gather what the report needs.
        index = batch.get("index")
        per_process = [torch.cat([local_flags, loss.detach().float().reshape(1)])]
        indices = [index.long()] if index is not None else []
        if self.accelerator.num_processes > 1:
            per_process = list(self.accelerator.gather(per_process[0]).view(-1, 3))
            if index is not None:  # every process has a batch of the same size (EpochBatches)
                indices = list(self.accelerator.gather(indices[0]).view(self.accelerator.num_processes, -1))
        indices_lists = [i.tolist() for i in indices] or [[] for _ in per_process]
        bad_loss = [rank for rank, row in enumerate(per_process) if row[0] > 0]
        bad_gradients = bool(flags[1] > 0)
        what = " and ".join((["loss"] if bad_loss else []) + (["gradients"] if bad_gradients else []))
        losses = ", ".join(f"process {rank}: {per_process[rank][2].item():g}" for rank in bad_loss)
        shown = bad_loss or range(len(indices_lists))
        listed = (
            "; ".join(f"process {rank}: {_abbreviate(indices_lists[rank])}" for rank in shown)
            if index is not None
            else "the batches carry no 'index' column"
        )
        where = (
            f"non-finite {what} at step {self.global_step} (0-based; epoch {self.epoch}, batch "
            f"{self.batch_in_epoch} of {self.steps_per_epoch} in the epoch)"
            + (f"; loss {losses}" if bad_loss else "")
            + f"; dataset indices of the batch: {listed}"
        )
        if self.nonfinite == "skip":
            self.nonfinite_skipped += 1
            if self.accelerator.is_main_process:
                warnings.warn(
                    f"{where}. The step was skipped (skipped so far: {self.nonfinite_skipped})",
                    RuntimeWarning, stacklevel=2,
                )  # fmt: skip
            return
        last = f" (last checkpoint: step_{self._last_saved_step})" if self._last_saved_step is not None else ""
        raise NonFiniteLossError(
            f"{where}. The optimizer step was not taken and nothing was saved after it{last}. "
            "To skip such steps and count them instead, pass nonfinite='skip' (recipes: --on-nonfinite skip)",
            step=self.global_step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
            indices=indices_lists, nonfinite_loss=bad_loss, nonfinite_gradients=bad_gradients,
        )  # fmt: skip

    def _end_epoch(self) -> None:
        self._log_train()
        # Every step ends with a host read (the non-finite check), so the clock has seen the epoch's work.
        seconds = time.perf_counter() - self._epoch_start
        self._log({"images_per_s": round(self._epoch_images / seconds, 1), "epoch_time_s": round(seconds, 3)})
        last = self.epoch + 1 == self.epochs or self.global_step >= self.total_steps
        if self.val_data is not None and (last or (self.eval_every and (self.epoch + 1) % self.eval_every == 0)):
            self._validate()
        self.step.fire("on_epoch_end", self, self.epoch)
        self.epoch += 1
        self.batch_in_epoch = 0
        by_epoch = self.checkpoint_every is not None and self.epoch % self.checkpoint_every == 0
        if by_epoch or self._step_checkpoint_due():
            self._save_checkpoint()

    def _finish(self) -> dict[str, Any]:
        self._log_train()
        if self.val_data is not None and self._last_eval_step != self.global_step:
            self._validate()
        if self._checkpointing and self._last_saved_step != self.global_step:
            self._save_checkpoint()
        self._sync_buffers()
        if self.output_dir is not None:
            self._refuse_nonfinite_weights(f"the final weights {MODEL_FILE}")
        if self.output_dir is not None and self.accelerator.is_main_process:
            atomic_save_weights(unwrap_model(self.model).state_dict(), self.output_dir / MODEL_FILE)
            if self.ema is not None:
                atomic_save_weights(self.ema.module.state_dict(), self.output_dir / EMA_MODEL_FILE)
        self.accelerator.wait_for_everyone()
        # Not accelerator.end_training(): it also destroys the process group, and evaluate() must still work.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        return {
            "step": self.global_step, "epoch": self.epoch, "val": self.val_metrics, "best": self._best_record(),
            "nonfinite_skipped": self.nonfinite_skipped, "stop_reason": self.stop_reason,
        }  # fmt: skip

    # ------------------------------------------------------------------ evaluation and metrics

    def _eval_loader(self, data: Dataset, batch_size: int) -> DataLoader:
        # Prepared once per dataset and batch size: Accelerate shards it evenly, gather_for_metrics drops the padding.
        key = (id(data), batch_size)
        if key not in self._eval_loaders:
            loader = make_dataloader(data, batch_size, shuffle=False, seed=self.seed, num_workers=self.num_workers)
            self._eval_loaders[key] = self.accelerator.prepare_data_loader(loader)
        return self._eval_loaders[key]

    def _validate(self) -> None:
        metrics = self.evaluate(self.val_data)
        self.val_metrics = {f"val_{name}": value for name, value in metrics.items()}
        line = (
            f"val clean {metrics['clean_acc']:.2%}, PGD-{self.eval_steps} {metrics['pgd_acc']:.2%} (n={metrics['n']})"
        )
        if self.ema is not None:
            averaged = self.evaluate(self.val_data, ema=True)
            self.val_metrics |= {f"val_ema_{name}": averaged[name] for name in ("clean_acc", "pgd_acc")}
            line += f"; EMA clean {averaged['clean_acc']:.2%}, PGD-{self.eval_steps} {averaged['pgd_acc']:.2%}"
        self._last_eval_step = self.global_step
        self._log({**self.val_metrics})
        if self.accelerator.is_main_process:
            self._bar.write(f"epoch {self.epoch} step {self.global_step}: {line}")
        self.step.fire("on_evaluate", self, dict(self.val_metrics))
        if self.best is None or metrics["pgd_acc"] > self.best["val_pgd_acc"]:
            self.best = {"step": self.global_step, "epoch": self.epoch, **self.val_metrics}
            if self.output_dir is not None:
                self._refuse_nonfinite_weights(f"the best weights {BEST_DIR}/{MODEL_FILE}")
            if self.output_dir is not None and self.accelerator.is_main_process:
                best = self.output_dir / BEST_DIR
                best.mkdir(parents=True, exist_ok=True)
                # The record first: a crash between the two leaves a later step in it than in any checkpoint,
                # so a resume deletes the mismatched folder (drop_results_after).
                atomic_write_json(best / METRICS_FILE, self._best_record())
                atomic_save_weights(unwrap_model(self.model).state_dict(), best / MODEL_FILE)

    def _best_record(self) -> dict[str, Any]:
        """The best validation metrics with how they were chosen and measured; empty before any evaluation."""
        if self.best is None:
            return {}
        return {**self.best, "selected_on": "validation", "attack": self.eval_attack}

    def _add_extras(self, extras: dict[str, Tensor | float]) -> None:
        """Add a step's ``ctx.extras`` (scalars) to the window; device tensors stay there, no host read."""
        for name, value in extras.items():
            if name in _TRAIN_ROW_KEYS:
                raise ValueError(f"ctx.extras[{name!r}] would overwrite the trainer's own {name!r}: rename it")
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    shape = list(value.shape)
                    raise ValueError(
                        f"ctx.extras[{name!r}] must be a scalar to be logged, got a tensor of shape {shape}"
                    )
                value = value.detach().reshape(()).to(self.accelerator.device, torch.float64)
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"ctx.extras[{name!r}] must be a number or a one-element tensor, got {value!r}")
            entry = self._window_extras.setdefault(
                name, [torch.zeros((), device=self.accelerator.device, dtype=torch.float64), 0]
            )
            entry[0] = entry[0] + value
            entry[1] += 1

    def _log_train(self) -> None:
        """Log the training window (reduced over processes) and reset it; a no-op when it is empty."""
        if not self._window_passes:
            return
        loss_sum, n, adv_ok, adv_n, clean_ok, clean_n = self.accelerator.reduce(self._window, "sum").tolist()
        forwards, backwards = np.mean(self._window_passes, axis=0).tolist()
        row: dict[str, float] = {"loss": loss_sum / n} if n else {}  # no loss when every step was skipped
        row["lr"] = self._lr
        if adv_n:
            row["train_adv_acc"] = adv_ok / adv_n
        if clean_n:
            row["train_clean_acc"] = clean_ok / clean_n
        row |= {"forwards_per_step": forwards, "backwards_per_step": backwards}
        if self.nonfinite == "skip":
            row["nonfinite_skipped"] = self.nonfinite_skipped
        if self._window_extras:
            # Every process runs the same callbacks, so the names agree; mean over steps and processes.
            names = sorted(self._window_extras)
            sums = self.accelerator.reduce(torch.stack([self._window_extras[k][0] for k in names]), "sum").tolist()
            for name, total in zip(names, sums, strict=True):
                row[name] = total / (self._window_extras[name][1] * self.accelerator.num_processes)
            self._window_extras.clear()
        self._window.zero_()
        self._window_passes.clear()
        self._log(row)
        shown = ("loss", "train_adv_acc", "train_clean_acc")
        self._bar.set_postfix({k.removeprefix("train_"): f"{v:.3g}" for k, v in row.items() if k in shown})

    def _log(self, values: dict[str, float]) -> None:
        elapsed = self._elapsed_before + time.perf_counter() - self._start_time
        row = {"step": self.global_step, "epoch": self.epoch, **values, "elapsed_s": round(elapsed, 3)}
        if self.accelerator.log_with:
            self.accelerator.log(values, step=self.global_step)
        if self.output_dir is not None and self.accelerator.is_main_process:
            with open(self.output_dir / METRICS_LOG, "a") as log:
                log.write(json.dumps(row) + "\n")
        self._log_rows += 1

    # ------------------------------------------------------------------ checkpoints

    @property
    def _checkpointing(self) -> bool:
        return self.output_dir is not None and (
            self.checkpoint_every is not None or self.checkpoint_every_steps is not None
        )

    def _step_checkpoint_due(self) -> bool:
        every = self.checkpoint_every_steps
        return every is not None and self.global_step % every == 0

    def _check_fresh_output_dir(self) -> None:
        if self.output_dir is None:
            return
        if list_checkpoints(self.checkpoints_dir) or (self.output_dir / MODEL_FILE).exists():
            raise ValueError(
                f"{self.output_dir} already holds a run (checkpoints or {MODEL_FILE}); resume it with "
                "resume='latest', or train into an empty folder"
            )

    def _save_checkpoint(self) -> None:
        if not self._checkpointing or self._last_saved_step == self.global_step:
            return
        directory = self.checkpoints_dir / f"step_{self.global_step}"
        # Callbacks gather or sync their state here, before it is read.
        self.step.fire("on_save_checkpoint", self, str(directory))
        self._log_train()  # the window restarts at the checkpoint, so a resumed run logs the same rows
        self._sync_buffers()
        callback_state = self.step.state_dict()
        self._refuse_nonfinite_weights(f"checkpoint {directory.name}", callback_state)
        state = {
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
            "best": self.best, "val_metrics": self.val_metrics, "last_eval_step": self._last_eval_step,
            "elapsed_s": self._elapsed_before + time.perf_counter() - self._start_time,
            "num_processes": self.accelerator.num_processes, "batch_size": self.batch_size,
            "num_train_examples": len(self.train_data), "seed": self.seed, "total_steps": self.total_steps,
            "nonfinite_skipped": self.nonfinite_skipped, "log_rows": self._log_rows, "stop_reason": self.stop_reason,
        }  # fmt: skip
        save_checkpoint(
            self.accelerator, self.checkpoints_dir, self.global_step, model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, trainer_state=state, callback_state=callback_state, keep=self.keep_checkpoints,
            ema=None if self.ema is None else self.ema.module,
        )  # fmt: skip
        self._last_saved_step = self.global_step

    def _restore(self, checkpoint: Path, contents: dict[str, Any]) -> None:
        """Continue from ``open_checkpoint``'s ``contents``: every check first, then the states."""
        state = contents["trainer_state"]
        missing = sorted(_RESUMED_STATE - state.keys())
        if missing:
            raise CheckpointError(f"{checkpoint / 'trainer_state.json'} lacks {', '.join(missing)}")
        here = {
            "num_processes": self.accelerator.num_processes, "batch_size": self.batch_size,
            "num_train_examples": len(self.train_data), "seed": self.seed, "total_steps": self.total_steps,
        }  # fmt: skip
        differ = {k: (state[k], v) for k, v in here.items() if state[k] != v}
        if differ:
            detail = ", ".join(f"{k} {saved} (checkpoint) vs {now} (now)" for k, (saved, now) in differ.items())
            raise CheckpointError(f"cannot resume {checkpoint} exactly: {detail}")
        try:
            self.step.load_state_dict(contents["callback_state"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:  # callbacks raise what their state gives
            raise CheckpointError(
                f"the callbacks' state in {checkpoint} does not load into this run's: {err}"
            ) from err
        restore_checkpoint(
            self.accelerator, contents, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            ema=None if self.ema is None else self.ema.module,
        )  # fmt: skip
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step = self._last_saved_step = state["global_step"]
        self.best, self.val_metrics = state["best"], state["val_metrics"]
        self._last_eval_step = state["last_eval_step"]
        self._elapsed_before = state["elapsed_s"]
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        self.stop_reason = state.get("stop_reason")  # absent in checkpoints written before early stopping
        rows = state.get("log_rows")  # absent in checkpoints written before the trainer counted its rows
        self._log_rows = rows or 0
        self._lr = self.optimizer.param_groups[0]["lr"]
        if self.output_dir is not None and self.accelerator.is_main_process:
            drop_checkpoints_after(self.checkpoints_dir, checkpoint)
            if checkpoint.resolve().parent == self.checkpoints_dir.resolve():
                finished = self.stop_reason is not None or self.global_step >= self.total_steps
                dropped = drop_results_after(self.output_dir, self.global_step, finished=finished)
                if dropped:
                    print(f"resuming from {checkpoint.name}: deleted the {', '.join(dropped)} of the run it replaces")
            self._log_rows = _truncate_log(self.output_dir / METRICS_LOG, self.global_step, rows)
        self.accelerator.wait_for_everyone()

    def _refuse_nonfinite_weights(self, what: str, callback_state: dict[str, Any] | None = None) -> None:
        """Raise ``NonFiniteError`` before ``what`` is written from NaN/inf weights or NaN callback state.

        One reduction over the model's floating-point tensors (they are the same on every process); the
        callback state (``None``: not checked) is checked for NaN only (inf may be a legitimate value), and
        that decision is reduced across processes.
        """
        tensors = {k: t for k, t in unwrap_model(self.model).state_dict().items() if t.is_floating_point()}
        bad_weights: list[str] = []
        if tensors:
            norms = torch.stack([n.float() for n in torch._foreach_norm(list(tensors.values()), math.inf)])
            if not bool(torch.isfinite(norms).all()):
                bad_weights = [k for k, n in zip(tensors, norms.tolist()) if not math.isfinite(n)]
        bad_state: list[str] = []
        if callback_state is not None:
            bad_state = [k for k, t in _tensors(callback_state) if t.is_floating_point() and bool(t.isnan().any())]
            if self.accelerator.num_processes > 1:
                flag = torch.tensor([float(bool(bad_state))], device=self.accelerator.device)
                if self.accelerator.reduce(flag, "sum").item() and not bad_state:
                    bad_state = ["(on another process)"]
        if bad_weights or bad_state:
            parts = [f"the model's {', '.join(bad_weights[:8])} hold NaN or inf"] if bad_weights else []
            parts += [f"callback state {', '.join(bad_state[:8])} holds NaN"] if bad_state else []
            raise NonFiniteError(f"refusing to write {what} at step {self.global_step}: {'; '.join(parts)}")

    def _sync_buffers(self) -> None:
        """Average floating-point buffers (BatchNorm statistics, of the model and of its moving average) across
        processes; a no-op on one process."""
        if self.accelerator.num_processes == 1:
            return
        modules = [unwrap_model(self.model), *([self.ema.module] if self.ema is not None else [])]
        buffers = [b for module in modules for b in module.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = self.accelerator.reduce(torch.cat([b.detach().reshape(-1).float() for b in buffers]), "mean")
        for buffer, values in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.copy_(values.view_as(buffer))


def _abbreviate(values: list[int]) -> str:
    if len(values) <= _SHOWN_INDICES:
        return str(values)
    return f"{str(values[:_SHOWN_INDICES])[:-1]}, ... ({len(values)} in all)]"


def _on_host(data: Dataset) -> bool:
    """Whether a dataset's tensors live in host memory (only those can be pinned); other datasets count as host."""
    images = getattr(data, "images", None)
    return not isinstance(images, Tensor) or images.device.type == "cpu"


def _correct(logits: Tensor | None, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(correct predictions, examples) as float64 scalars; zeros when the step has no such logits."""
    zero = torch.zeros((), dtype=torch.float64, device=targets.device)
    if logits is None:
        return zero, zero
    return (logits.detach().argmax(dim=1) == targets).sum().double(), zero + len(targets)


def _truncate_log(path: Path, step: int, rows: int | None = None) -> int:
    """Keep the rows of ``metrics.jsonl`` written before the checkpoint: later ones belong to the run replaced.

    Args:
        path: The log.
        step: The checkpoint's step: rows of later steps go (when ``rows`` is not known).
        rows: Rows the run had written when it saved the checkpoint: exactly those are kept (rows of the
            checkpoint's own step written after it, such as a final validation, go too).

    Returns:
        The number of rows kept.
    """
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        if rows is not None and len(kept) == rows:
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if rows is not None or row.get("step", math.inf) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
    return len(kept)


def _tensors(state: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """``(key path, tensor)`` of every tensor in a nested callback state."""
    for key, value in state.items():
        if isinstance(value, Tensor):
            yield f"{prefix}{key}", value
        elif isinstance(value, dict):
            yield from _tensors(value, f"{prefix}{key}/")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _attack_eps(step: AdversarialStep) -> float:
    """The scalar eps of the step's attack callback, the default budget of the evaluation attack."""
    for callback in step.staged:
        eps = getattr(callback, "eps", None)
        if "x_adv" in callback.writes and isinstance(eps, (int, float)):
            return float(eps)
    raise ValueError("the step has no attack with a scalar eps; pass eval_eps= to the Trainer")
