"""The Accelerate training loop: fit and evaluate an ``AdversarialStep`` on any model.

One loop serves every recipe, on CPU, one GPU or many (``accelerate launch``), in fp32, bf16 or fp16:

    trainer = Trainer(model, AdversarialStep([PGDAttack(eps, step_size, 10), AdversarialCE()]), optimizer,
                      train_data, val_data, scheduler=scheduler, epochs=110, output_dir="runs/pgd_at")
    trainer.fit()                       # or trainer.fit(resume="latest") after an interruption
    test_metrics = trainer.evaluate(test_data)

Data order is the trainer's own (``robustmix.training.sampling``): every epoch is a permutation seeded by
``(seed, epoch)``, cut into global batches of ``batch_size * num_processes`` examples, each process taking its
slice. A checkpoint records the epoch and the number of batches done in it, so a resumed run sees exactly the
batches it has not seen (``robustmix.training.checkpointing``).

A NaN or inf loss or gradient stops the run with ``NonFiniteLossError`` (``nonfinite="raise"``, the default)
or skips the step and counts it (``nonfinite="skip"``); see ``Trainer`` and ``robustmix.training.nonfinite``. It
never reaches a checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sized
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import set_seed
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from robustmix.attacks import pgd
from robustmix.attacks.pgd import check_eps
from robustmix.checks import check_choice, check_int
from robustmix.core.modes import model_mode
from robustmix.core.step import MIXED_PRECISION, AdversarialStep
from robustmix.data import augment_cifar, make_dataloader
from robustmix.models import unwrap_model
from robustmix.runs.checkpoint import atomic_save_weights, atomic_write_json, open_checkpoint, restore_checkpoint
from robustmix.runs.folder import BEST_DIR, EMA_MODEL_FILE, METRICS_FILE, METRICS_LOG, MODEL_FILE
from robustmix.training.accelerator import trainer_accelerator
from robustmix.training.arguments import check_trainer_arguments
from robustmix.training.checkpointing import Checkpoints
from robustmix.training.distributed import sync_buffers
from robustmix.training.metrics import MetricsLog, TrainWindow, batch_totals
from robustmix.training.nonfinite import NONFINITE_POLICIES, NonFiniteGuard, refuse_nonfinite_weights
from robustmix.training.sampling import (
    AUGMENT_STREAM,
    EVAL_STREAM,
    EpochBatches,
    mix_seed,
    plan_steps,
    training_loader,
    warn_if_last_batch_dropped,
)


def attack_eps(step: AdversarialStep) -> float:
    """The scalar eps of the step's attack callback (the first callback that writes ``x_adv`` and has a number
    ``eps``): the default budget of the evaluation attack, here and in the integrations.

    Raises:
        ValueError: The step has no such attack; pass the evaluation budget explicitly.
    """
    for callback in step.staged:
        eps = getattr(callback, "eps", None)
        if "x_adv" in callback.writes and isinstance(eps, (int, float)):
            return float(eps)
    raise ValueError("the step has no attack with a scalar eps; pass eval_eps= to the Trainer")


def _check_settings(
    model: nn.Module,
    step: AdversarialStep,
    train_data: Dataset,
    *,
    epochs: int,
    max_steps: int | None,
    batch_size: int,
    grad_clip: float | None,
    eval_every: int | None,
    eval_steps: int,
    checkpoint_every: int | None,
    checkpoint_every_steps: int | None,
    keep_checkpoints: int | None,
    seed: int,
    num_workers: int,
    log_every: int,
    nonfinite: str,
    ema_decay: float | None,
    grad_accum: int,
) -> None:
    """The checks of ``Trainer``'s settings (see its arguments), before any work."""
    for name, value, minimum in (
        ("epochs", epochs, 1), ("batch_size", batch_size, 1), ("eval_steps", eval_steps, 0),
        ("seed", seed, 0), ("num_workers", num_workers, 0), ("log_every", log_every, 1),
        ("grad_accum", grad_accum, 1),
    ):  # fmt: skip
        check_int(name, value, minimum)
    for name, value in (
        ("max_steps", max_steps), ("eval_every", eval_every), ("checkpoint_every", checkpoint_every),
        ("checkpoint_every_steps", checkpoint_every_steps), ("keep_checkpoints", keep_checkpoints),
    ):  # fmt: skip
        check_int(name, value, 1, optional=True)
    unfit = [type(c).__name__ for c in step.callbacks if not c.accumulates]
    if grad_accum > 1 and unfit:
        raise ValueError(
            f"grad_accum must be 1 with {', '.join(unfit)}: they act on the weights once per optimizer step, "
            "with its whole batch, and gradient accumulation splits the batch"
        )
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    if ema_decay is not None and not (0 < ema_decay < 1):
        raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
    if grad_clip is not None and not (0 < grad_clip < math.inf):
        raise ValueError(f"grad_clip must be a positive number, got {grad_clip}")
    if not isinstance(train_data, Sized) or len(train_data) == 0:
        raise ValueError("train_data must be a non-empty map-style dataset")
    if batch_size == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("batch_size 1 cannot train a model with BatchNorm (it normalizes over the batch)")


def _mixed_precision(mixed_precision: str | None, accelerator: Accelerator | None, step: AdversarialStep) -> str:
    """The precision the trainer runs: given, else the accelerator's, else the step's; it must be the step's."""
    mixed_precision = mixed_precision or (accelerator.mixed_precision if accelerator else step.mixed_precision)
    check_choice("mixed_precision", mixed_precision, MIXED_PRECISION)
    if step.mixed_precision != mixed_precision:
        raise ValueError(
            f"the step was built with mixed_precision={step.mixed_precision!r} but the trainer runs "
            f"{mixed_precision!r}; pass the same value to both"
        )
    return mixed_precision


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
        _check_settings(
            model, step, train_data, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_clip=grad_clip,
            eval_every=eval_every, eval_steps=eval_steps, checkpoint_every=checkpoint_every,
            checkpoint_every_steps=checkpoint_every_steps, keep_checkpoints=keep_checkpoints, seed=seed,
            num_workers=num_workers, log_every=log_every, nonfinite=nonfinite, ema_decay=ema_decay,
            grad_accum=grad_accum,
        )  # fmt: skip
        mixed_precision = _mixed_precision(mixed_precision, accelerator, step)
        self.eval_eps = attack_eps(step) if eval_eps is None else eval_eps
        check_eps(self.eval_eps, name="eval_eps")

        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.accelerator = accelerator = trainer_accelerator(
            accelerator, step, mixed_precision=mixed_precision, grad_accum=grad_accum, log_with=log_with,
            project_dir=self.output_dir,
        )  # fmt: skip
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
        self.nonfinite, self.grad_accum = nonfinite, grad_accum

        # Data order: the step plan, the batches of every epoch, the loader.
        self.steps_per_epoch, total_steps = plan_steps(
            len(train_data), batch_size, accelerator.num_processes, grad_accum, epochs, max_steps
        )
        if self.steps_per_epoch == 0:
            raise ValueError(f"train_data has {len(train_data)} examples, too few for one batch on every process")
        if accelerator.is_main_process:
            warn_if_last_batch_dropped(len(train_data), batch_size, accelerator.num_processes * grad_accum)
        #: Optimizer steps this fit will run in all: define the lr schedule with this number.
        self.total_steps = total_steps
        self._batches = EpochBatches(
            len(train_data), batch_size, num_processes=accelerator.num_processes,
            process_index=accelerator.process_index, seed=seed, micro_batches=grad_accum,
        )  # fmt: skip
        self._loader = training_loader(
            train_data, self._batches, num_workers=num_workers, device=accelerator.device, seed=seed
        )
        self._eval_loaders: dict[tuple[int, int], DataLoader] = {}

        # The objects that own the other concerns of a fit.
        # Under fp16 the GradScaler owns inf/NaN gradients (they are expected while it calibrates its scale).
        self._guard = NonFiniteGuard(nonfinite, accelerator, check_gradients=mixed_precision != "fp16")
        self._checkpoints = Checkpoints(self.output_dir, checkpoint_every, checkpoint_every_steps, keep_checkpoints)
        self._metrics = MetricsLog(accelerator, self.output_dir / METRICS_LOG if self.output_dir is not None else None)
        self._window = TrainWindow(accelerator.device)

        #: Position: the epoch being trained and the batches of it done; the optimizer steps done.
        self.epoch = self.batch_in_epoch = self.global_step = 0
        #: Validation metrics of the best evaluation so far (by PGD accuracy), with its step and epoch.
        self.best: dict[str, Any] | None = None
        self.val_metrics: dict[str, float] = {}
        #: Whether the last optimizer step was skipped: by the fp16 GradScaler (inf/NaN gradients) or by
        #: ``nonfinite="skip"``.
        self.step_was_skipped = False
        #: Why a callback ended the fit early (``stop``); ``None`` while it runs to its planned end.
        self.stop_reason: str | None = None
        self._last_eval_step: int | None = None

    # ------------------------------------------------------------------ public API

    @property
    def checkpoints_dir(self) -> Path | None:
        """The run's ``checkpoints/`` folder; ``None`` without ``output_dir``."""
        return self._checkpoints.directory

    @property
    def nonfinite_skipped(self) -> int:
        """Steps skipped by ``nonfinite="skip"`` so far in this run (checkpointed)."""
        return self._guard.skipped

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
            self._checkpoints.check_fresh()
            # The global RNGs that attacks and dropout draw from, offset by the process index. Whoever built the model
            # has drawn from them since seeding it (a recipe seeds them before building it): the fit starts from
            # the seed, whatever ran before.
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
        elif self.accelerator.is_main_process:
            self._metrics.clear()
        if self.accelerator.log_with and not self.accelerator.trackers:
            self.accelerator.init_trackers("robustmix")

        self._metrics.start_clock()
        self._window = TrainWindow(self.accelerator.device)  # a fit that raised may have left steps in the last one
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
        generator = torch.Generator(device).manual_seed(mix_seed(self.seed, EVAL_STREAM, rank))
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

    def _log(self, values: dict[str, Any]) -> None:
        self._metrics.write(self.global_step, self.epoch, values)

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
            if self._checkpoints.due_at_step(self.global_step) and self.batch_in_epoch < self.steps_per_epoch:
                self._save_checkpoint()
            if self.global_step >= self.total_steps or self.stop_reason is not None:
                break

    def _train_step(self, batch: dict[str, Tensor]) -> None:
        device = self.accelerator.device
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        if self.augment:
            generator = torch.Generator(device).manual_seed(
                mix_seed(self.seed, AUGMENT_STREAM, self.global_step, self.accelerator.process_index)
            )
            batch["image"] = augment_cifar(batch["image"], generator)
        self._guard.before_step(self.model)
        self.step.fire("on_batch_start", self, batch)
        self.model.train()
        # The step's batch in grad_accum micro-batches (one when not accumulating): each runs the callbacks
        # and a backward; the optimizer steps once, on the sum of their gradients.
        micro_batches = [
            dict(zip(batch, parts)) for parts in zip(*(v.tensor_split(self.grad_accum) for v in batch.values()))
        ]
        totals = torch.zeros_like(self._window.totals)
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
            totals += batch_totals(loss, ctx, micro["label"])
            losses.append(loss.detach())
            contexts.append(ctx)
        # NaN and inf survive the sum: one loss to check and report for the step.
        loss = losses[0] if self.grad_accum == 1 else torch.stack(losses).sum()
        self.step.fire("on_before_optimizer_step", self, self.optimizer)
        self._lr = self.optimizer.param_groups[0]["lr"]
        local_flags = self._guard.flags(loss, self.model)
        flags = self.accelerator.reduce(local_flags, "sum") if self.accelerator.num_processes > 1 else local_flags
        if any(flags.tolist()):  # the one host read of the check
            self._reject_step(batch, loss, local_flags, flags)
        else:
            for ctx in contexts:
                self._window.add_extras(ctx.extras)
            if self.grad_clip is not None:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.step_was_skipped = self.optimizer.step_was_skipped
            self.step.fire("on_after_optimizer_step", self, self.optimizer)
            if self.ema is not None:
                self.ema.update(unwrap_model(self.model))
            self._window.totals += totals
        if self.scheduler is not None:
            self.scheduler.step()
        self._window.add_passes(contexts)

    def _reject_step(self, batch: dict[str, Tensor], loss: Tensor, local_flags: Tensor, flags: Tensor) -> None:
        """Drop a step whose loss or gradients are NaN/inf: no update; then raise, or count and warn."""
        self.optimizer.zero_grad(set_to_none=True)
        self._guard.restore_buffers(self.model)
        self.step_was_skipped = True
        self.step.fire("on_after_optimizer_step", self, self.optimizer)  # e.g. AWP takes its perturbation off
        # All processes are here together (the flags were reduced): the report gathers what it needs.
        self._guard.report(
            batch, loss, local_flags, flags, step=self.global_step, epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch, steps_per_epoch=self.steps_per_epoch,
            last_checkpoint=self._checkpoints.last_saved_step,
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
        if self._checkpoints.due_at_epoch_end(self.epoch, self.global_step):
            self._save_checkpoint()

    def _finish(self) -> dict[str, Any]:
        self._log_train()
        if self.val_data is not None and self._last_eval_step != self.global_step:
            self._validate()
        if self._checkpoints.enabled and self._checkpoints.last_saved_step != self.global_step:
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

    def _sync_buffers(self) -> None:
        """Average the BatchNorm statistics of the model and of its moving average across processes."""
        sync_buffers(self.model, *([self.ema.module] if self.ema is not None else []))

    def _refuse_nonfinite_weights(self, what: str, callback_state: dict[str, Any] | None = None) -> None:
        refuse_nonfinite_weights(self.model, self.accelerator, what, self.global_step, callback_state)

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

    def _log_train(self) -> None:
        """Log the training window (reduced over processes) and reset it; a no-op when it is empty."""
        if self._window.empty:
            return
        skipped = self.nonfinite_skipped if self.nonfinite == "skip" else None
        row = self._window.pop_row(self.accelerator, self._lr, skipped)
        self._log(row)
        shown = ("loss", "train_adv_acc", "train_clean_acc")
        self._bar.set_postfix({k.removeprefix("train_"): f"{v:.3g}" for k, v in row.items() if k in shown})

    # ------------------------------------------------------------------ checkpoints

    def _run_identity(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it: the data order and lr schedule span it."""
        return {
            "num_processes": self.accelerator.num_processes, "batch_size": self.batch_size,
            "num_train_examples": len(self.train_data), "seed": self.seed, "total_steps": self.total_steps,
        }  # fmt: skip

    def _save_checkpoint(self) -> None:
        if not self._checkpoints.enabled or self._checkpoints.last_saved_step == self.global_step:
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
            "elapsed_s": self._metrics.elapsed(), **self._run_identity(),
            "nonfinite_skipped": self.nonfinite_skipped, "log_rows": self._metrics.rows,
            "stop_reason": self.stop_reason,
        }  # fmt: skip
        self._checkpoints.save(
            self.accelerator, self.global_step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            ema=None if self.ema is None else self.ema.module, trainer_state=state, callback_state=callback_state,
        )  # fmt: skip

    def _restore(self, checkpoint: Path, contents: dict[str, Any]) -> None:
        """Continue from ``open_checkpoint``'s ``contents``: every check first, then the states."""
        state = contents["trainer_state"]
        self._checkpoints.check_resumable(checkpoint, state, self._run_identity())
        self._checkpoints.load_callback_state(self.step, checkpoint, contents["callback_state"])
        restore_checkpoint(
            self.accelerator, contents, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            ema=None if self.ema is None else self.ema.module,
        )  # fmt: skip
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step = self._checkpoints.last_saved_step = state["global_step"]
        self.best, self.val_metrics = state["best"], state["val_metrics"]
        self._last_eval_step = state["last_eval_step"]
        self._metrics.elapsed_before = state["elapsed_s"]
        self._guard.skipped = state.get("nonfinite_skipped", 0)
        self.stop_reason = state.get("stop_reason")  # absent in checkpoints written before early stopping
        rows = state.get("log_rows")  # absent in checkpoints written before the trainer counted its rows
        self._metrics.rows = rows or 0
        self._lr = self.optimizer.param_groups[0]["lr"]
        if self.output_dir is not None and self.accelerator.is_main_process:
            finished = self.stop_reason is not None or self.global_step >= self.total_steps
            self._checkpoints.drop_after(checkpoint, self.global_step, finished=finished)
            self._metrics.truncate(self.global_step, rows)
        self.accelerator.wait_for_everyone()
