"""Adversarial training with PyTorch Lightning.

``AdversarialModule`` is a ``LightningModule`` that trains a model on an ``AdversarialStep``:

    module = AdversarialModule(
        create_model("resnet18", num_classes=10),
        AdversarialStep([PGDAttack(eps=8 / 255, step_size=2 / 255, steps=10), AdversarialCE()]),
        make_optimizer=lambda module: torch.optim.SGD(module.model.parameters(), lr=0.1, momentum=0.9),
    )
    trainer = lightning.Trainer(max_epochs=10)        # any accelerator, devices, strategy="ddp"
    trainer.fit(module, train_loader, val_loader)      # trainer.fit(..., ckpt_path="last") resumes

What it does in Lightning's hooks:

- ``training_step`` runs the step with the epoch (``current_epoch``), the global step and the planned totals
  (``max_epochs``, ``estimated_stepping_batches``), so burn-ins and schedules follow the run;
- robustmix's events fire from Lightning's: ``on_fit_start``, ``on_epoch_start`` (not again when Lightning
  resumes in the middle of an epoch), ``on_batch_start``, ``on_before_optimizer_step``,
  ``on_after_optimizer_step`` (after every optimizer step, from ``on_train_batch_end``), ``on_epoch_end``
  (when the epoch ran all its batches, after its validation, before its checkpoint), ``on_evaluate`` and
  ``on_save_checkpoint``;
- callback state goes into Lightning's checkpoint (under ``"robustmix_callbacks"``) and comes back on resume;
- ``validation_step`` logs clean and PGD accuracy (``val_clean_acc``, ``val_pgd_acc``: robustmix's PGD-20
  monitor) averaged over processes;
- under DDP, BatchNorm statistics are averaged across processes before validation and checkpoints. Attack
  forwards go through the model itself, not the DDP wrapper, and all forwards of a step run inside one
  forward of the wrapper, so steps with several training forwards (TRADES) need no DDP setting.

Batches are mappings: images (pixels in [0, 1]) under ``image_key``, labels under ``label_key`` and, for
callbacks with per-example state, dataset indices under ``index_key``; the defaults are ``robustmix.data``'s
``"image"``, ``"label"`` and ``"index"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from robustmix.core.step import AdversarialStep
from robustmix.integrations import attack_eps, check_mixed_precision, monitor_logits, robustmix_batch
from robustmix.training.distributed import sync_buffers
from robustmix.training.sampling import mix_seed

#: Key of the callbacks' state in Lightning's checkpoint dict.
CHECKPOINT_KEY = "robustmix_callbacks"
#: Lightning's precision names and the ``AdversarialStep(mixed_precision=...)`` each needs.
_STEP_PRECISION = {"bf16-mixed": "bf16", "16-mixed": "fp16"}


class AdversarialModule(pl.LightningModule):
    """A ``LightningModule`` that trains ``model`` with an ``AdversarialStep``.

    Subclass it to change ``configure_optimizers`` or to add logging; keep calling ``super()`` in the hooks
    it defines.

    Args:
        model: Classifier taking pixels in [0, 1] (e.g. from ``robustmix.models.create_model``).
        adversarial_step: The step (callbacks) that turns a batch into the training loss.
        make_optimizer: Called with this module by ``configure_optimizers``; returns what that hook returns (an
            optimizer, or a dict with an optimizer and an ``lr_scheduler``). The module's ``model`` holds the
            parameters, and ``trainer.estimated_stepping_batches`` the planned steps of a schedule.
        eval_eps: L-inf budget in pixels of the validation PGD; defaults to the eps of the step's attack.
        eval_steps: Steps of the validation PGD (20: PGD-20).
        seed: Seeds the random starts of the validation attack (once per validation, per process).
        image_key: Batch key of the images ``[B, C, H, W]``, pixels in [0, 1].
        label_key: Batch key of the labels ``[B]``.
        index_key: Batch key of the dataset indices ``[B]``, needed by callbacks with per-example state.
    """

    def __init__(
        self,
        model: nn.Module,
        adversarial_step: AdversarialStep,
        make_optimizer: Callable[[AdversarialModule], Any],
        *,
        eval_eps: float | None = None,
        eval_steps: int = 20,
        seed: int = 0,
        image_key: str = "image",
        label_key: str = "label",
        index_key: str = "index",
    ) -> None:
        if not isinstance(adversarial_step, AdversarialStep):
            raise TypeError(f"adversarial_step must be an AdversarialStep, got {type(adversarial_step).__name__}")
        super().__init__()
        self.model = model
        self.adversarial_step = adversarial_step
        self.make_optimizer = make_optimizer
        self.eval_eps = attack_eps(adversarial_step) if eval_eps is None else eval_eps
        self.eval_steps, self.seed = eval_steps, seed
        self.image_key, self.label_key, self.index_key = image_key, label_key, index_key
        self.host = LightningHost(self)
        self._loaded_state: dict[str, Any] | None = None
        self._fit_started = False
        self._eval_generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, C]`` of images ``[B, C, H, W]``, pixels in [0, 1]."""
        return self.model(x)

    def configure_optimizers(self) -> Any:
        return self.make_optimizer(self)

    def _fire(self, event: str, *args: Any) -> None:
        self.adversarial_step.fire(event, self.host, *args)

    # ------------------------------------------------------------------ fit and checkpoints

    def on_fit_start(self) -> None:
        trainer = self.trainer
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "accumulate_grad_batches must be 1: robustmix's callbacks and events count optimizer steps of one "
                "batch (AWP, the meta steps); raise the batch size instead"
            )
        precision = str(trainer.precision)
        check_mixed_precision(self.adversarial_step, _STEP_PRECISION.get(precision, "no"), f"precision={precision!r}")
        # As in robustmix's Trainer: callbacks allocate their state first, then a checkpoint overwrites it.
        self._fire("on_fit_start")
        self._fit_started = True
        if self._loaded_state is not None:
            self.adversarial_step.load_state_dict(self._loaded_state)
            self._loaded_state = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sync_buffers(self.model)  # every process saves the same BatchNorm statistics (a no-op on one)
        # Lightning's hook does not say where the checkpoint goes; callbacks get the run's root folder.
        self._fire("on_save_checkpoint", self.trainer.default_root_dir)
        checkpoint[CHECKPOINT_KEY] = self.adversarial_step.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY not in checkpoint:
            raise KeyError(f"the checkpoint holds no {CHECKPOINT_KEY!r}: it was not saved by an AdversarialModule")
        if self._fit_started:  # strategies that restore after setup
            self.adversarial_step.load_state_dict(checkpoint[CHECKPOINT_KEY])
        else:
            self._loaded_state = checkpoint[CHECKPOINT_KEY]

    def on_train_end(self) -> None:
        sync_buffers(self.model)
        self._fit_started = False

    # ------------------------------------------------------------------ training

    def on_train_epoch_start(self) -> None:
        self._fire("on_epoch_start", self.current_epoch)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """The adversarial loss of one batch (logged as ``train_loss``).

        ``on_batch_start`` fires first with ``{"image", "label", "index"}`` (robustmix's names); the step runs on
        that dict, so a callback may change the batch there.
        """
        inputs = robustmix_batch(batch, self.image_key, self.label_key, self.index_key)
        self._fire("on_batch_start", inputs)
        trainer = self.trainer
        total_steps = trainer.estimated_stepping_batches
        loss, _ctx = self.adversarial_step(
            self.model, inputs["image"], inputs["label"], inputs.get("index"), epoch=self.current_epoch,
            step=self.global_step, total_epochs=trainer.max_epochs if (trainer.max_epochs or 0) > 0 else None,
            total_steps=int(total_steps) if math.isfinite(total_steps) else None,
        )  # fmt: skip
        self.log("train_loss", loss.detach(), batch_size=len(inputs["label"]))
        return loss

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        self._fire("on_before_optimizer_step", optimizer)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Under automatic optimization this hook follows every optimizer step (one batch each).
        self._fire("on_after_optimizer_step", self.host.optimizer)

    def on_train_epoch_end(self) -> None:
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if done >= self.trainer.num_training_batches:  # not an epoch that max_steps cut short
            self._fire("on_epoch_end", self.current_epoch)

    # ------------------------------------------------------------------ validation

    def on_validation_epoch_start(self) -> None:
        sync_buffers(self.model)
        self._eval_generator = torch.Generator(self.device).manual_seed(mix_seed(self.seed, self.global_rank))

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        """Log clean and PGD accuracy of one batch (``val_clean_acc``, ``val_pgd_acc``, averaged over processes)."""
        x, y = batch[self.image_key], batch[self.label_key]
        clean, adv = monitor_logits(
            self.model, x, y, eps=self.eval_eps, steps=self.eval_steps, generator=self._eval_generator
        )
        clean_ok = clean.argmax(dim=1) == y
        robust_ok = clean_ok & (adv.argmax(dim=1) == y)
        metrics = {"val_clean_acc": clean_ok.float().mean(), "val_pgd_acc": robust_ok.float().mean()}
        self.log_dict(metrics, batch_size=len(y), sync_dist=True)

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val_")}
            self._fire("on_evaluate", metrics)


class LightningHost:
    """The ``trainer`` robustmix's callback events receive under Lightning: ``model``, ``optimizer``, ``log``.

    Args:
        module: The ``AdversarialModule`` being trained.
    """

    def __init__(self, module: AdversarialModule) -> None:
        self.module = module

    @property
    def model(self) -> nn.Module:
        """The model being trained (not DDP-wrapped)."""
        return self.module.model

    @property
    def optimizer(self) -> Optimizer:
        """The model's optimizer (the first one ``configure_optimizers`` returned)."""
        return self.module.trainer.optimizers[0]

    def log(self, values: dict[str, float]) -> None:
        """Log numbers through ``LightningModule.log_dict`` (from a hook where Lightning allows logging)."""
        self.module.log_dict(values)
