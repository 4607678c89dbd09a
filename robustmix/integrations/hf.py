"""Adversarial training with Hugging Face ``transformers.Trainer``.

``AdversarialTrainer`` is a ``Trainer`` whose loss is an ``AdversarialStep``; ``AdversarialTrainerMixin`` does
the same for a ``Trainer`` subclass of your own (put it first among the bases):

    trainer = AdversarialTrainer(
        model=create_model("resnet18", num_classes=10),
        args=TrainingArguments("runs/hf", remove_unused_columns=False, eval_strategy="epoch"),
        train_dataset=load_dataset("digits", "train"),
        eval_dataset=load_dataset("digits", "validation"),
        adversarial_step=AdversarialStep([PGDAttack(eps=8 / 255, step_size=2 / 255, steps=10), AdversarialCE()]),
    )
    trainer.train()                                   # trainer.train(resume_from_checkpoint=True) resumes
    trainer.evaluate()                                # eval_clean_acc, eval_pgd_acc, eval_loss (at PGD)

What it adds to ``Trainer``:

- the step gets the epoch (``global_step // steps per epoch``), the global step and the planned totals
  (``state.num_train_epochs``, ``state.max_steps``), so burn-ins and schedules follow the run;
- a ``TrainerCallback`` (``RobustmixCallback``, installed for you) fires robustmix's events: ``on_fit_start``
  when ``train()`` starts, ``on_epoch_start`` before an epoch's first step (not again when resuming in the
  middle of an epoch), ``on_batch_start``, ``on_before_optimizer_step`` (after clipping),
  ``on_after_optimizer_step``, ``on_epoch_end`` right after an epoch's last optimizer step (before that
  step's evaluation and checkpoint), ``on_evaluate`` and ``on_save_checkpoint``;
- callback state is written into every checkpoint folder (``callbacks.safetensors``, ``callbacks.json``) and
  read back by ``train(resume_from_checkpoint=...)``;
- evaluation reports clean and PGD accuracy (``eval_clean_acc``, ``eval_pgd_acc``: robustmix's PGD-20
  monitor); ``eval_loss`` is the cross-entropy at the PGD examples.

Batches are mappings: images (pixels in [0, 1]) under ``image_key``, labels under ``label_key`` and, for
callbacks with per-example state, dataset indices under ``index_key``. The defaults (``"image"``,
``"labels"``, ``"index"``) are what Transformers' default collator makes of ``robustmix.data``'s examples
(it renames ``"label"`` to ``"labels"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from robustmix.core.step import AdversarialStep
from robustmix.integrations import attack_eps, check_mixed_precision, monitor_logits, robustmix_batch
from robustmix.models import unwrap_model
from robustmix.runs.checkpoint import CALLBACK_TENSORS, CALLBACK_VALUES, join_state, split_state
from robustmix.training.accelerator import training_forwards
from robustmix.training.distributed import sync_buffers
from robustmix.training.sampling import mix_seed


def robust_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """``compute_metrics`` of the evaluation: clean and PGD accuracy.

    Args:
        prediction: ``predictions`` ``[N, 2, C]`` (clean and PGD logits, as ``prediction_step`` returns them)
            and ``label_ids`` ``[N]``.

    Returns:
        ``{"clean_acc", "pgd_acc"}`` as fractions; an example counts as robust when it is classified
            correctly both clean and after the attack.
    """
    logits, labels = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
    clean_ok = logits[:, 0].argmax(-1) == labels
    robust_ok = clean_ok & (logits[:, 1].argmax(-1) == labels)
    return {"clean_acc": float(clean_ok.mean()), "pgd_acc": float(robust_ok.mean())}


class AdversarialTrainerMixin:
    """Turns a ``transformers.Trainer`` (sub)class into adversarial training with an ``AdversarialStep``.

    Put it first among the bases: ``class RobustTrainer(AdversarialTrainerMixin, MyTrainer)``. It takes the
    keyword arguments below and passes every other argument on to the ``Trainer``.

    Args:
        adversarial_step: The step (callbacks) that turns a batch into the training loss.
        eval_eps: L-inf budget in pixels of the evaluation PGD; defaults to the eps of the step's attack.
        eval_steps: Steps of the evaluation PGD (20: PGD-20).
        image_key: Batch key of the images ``[B, C, H, W]``, pixels in [0, 1].
        label_key: Batch key of the labels ``[B]``.
        index_key: Batch key of the dataset indices ``[B]``, needed by callbacks with per-example state.

    Raises:
        ValueError: ``remove_unused_columns=True`` (it would drop the images: the model takes only pixels),
            ``gradient_accumulation_steps > 1`` (events and callbacks count optimizer steps, one batch each),
            a mixed precision other than the step's, or, under DDP, a step with several training forwards
            before one backward (TRADES-style) without ``ddp_broadcast_buffers=False``.
    """

    args: TrainingArguments
    state: TrainerState

    def __init__(
        self,
        *args: Any,
        adversarial_step: AdversarialStep,
        eval_eps: float | None = None,
        eval_steps: int = 20,
        image_key: str = "image",
        label_key: str = "labels",
        index_key: str = "index",
        **kwargs: Any,
    ) -> None:
        if not isinstance(adversarial_step, AdversarialStep):
            raise TypeError(f"adversarial_step must be an AdversarialStep, got {type(adversarial_step).__name__}")
        super().__init__(*args, **kwargs)
        self.adversarial_step = adversarial_step
        self.eval_eps = attack_eps(adversarial_step) if eval_eps is None else eval_eps
        self.eval_steps = eval_steps
        self.image_key, self.label_key, self.index_key = image_key, label_key, index_key
        self._check_arguments()
        if self.compute_metrics is None:
            self.compute_metrics = robust_accuracy
        self.robustmix_callback = RobustmixCallback(self)
        self.add_callback(self.robustmix_callback)
        self._eval_generator: torch.Generator | None = None

    def _check_arguments(self) -> None:
        args, step = self.args, self.adversarial_step
        if args.remove_unused_columns:
            raise ValueError(
                f"pass TrainingArguments(remove_unused_columns=False): the trainer reads {self.image_key!r}, "
                f"{self.label_key!r} and {self.index_key!r} from the batch itself, and the model's forward takes "
                "only pixels, so Transformers would drop every column"
            )
        if args.gradient_accumulation_steps != 1:
            raise ValueError(
                "gradient_accumulation_steps must be 1: robustmix's callbacks and events count optimizer steps "
                "of one batch (AWP, the meta steps); raise per_device_train_batch_size instead"
            )
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        check_mixed_precision(step, precision, f"TrainingArguments(bf16={args.bf16}, fp16={args.fp16})")
        forwards = training_forwards(step)
        if args.world_size > 1 and len(forwards) > 1 and args.ddp_broadcast_buffers is not False:
            raise ValueError(
                f"the step runs training forwards of {sorted(forwards)} before one backward; under DDP pass "
                "TrainingArguments(ddp_broadcast_buffers=False) (DDP would overwrite BatchNorm buffers between them)"
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``; a resumed run also restores the callbacks' state from the checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no valid checkpoint found in output directory ({self.args.output_dir})")
        self.robustmix_callback.resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Mapping[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The adversarial loss of one training batch; with ``return_outputs`` also ``{"logits": logits of x_adv}``.

        ``on_batch_start`` fires first with ``{"image", "label", "index"}`` (robustmix's names); the step runs on
        that dict, so a callback may change the batch there.
        """
        batch = robustmix_batch(inputs, self.image_key, self.label_key, self.index_key)
        self.adversarial_step.fire("on_batch_start", self, batch)
        step = self.state.global_step
        epoch = step // self.robustmix_callback.steps_per_epoch
        loss, ctx = self.adversarial_step(
            model, batch["image"], batch["label"], batch.get("index"), epoch=epoch, step=step,
            total_epochs=self.state.num_train_epochs, total_steps=self.state.max_steps,
        )  # fmt: skip
        if return_outputs:
            return loss, {"logits": ctx.logits.get("adv", next(iter(ctx.logits.values()), None))}
        return loss

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``, with the random starts of the attack drawn from a stream seeded by ``args.seed``."""
        device = self.args.device
        self._eval_generator = torch.Generator(device).manual_seed(mix_seed(self.args.seed, self.args.process_index))
        return super().evaluate(*args, **kwargs)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: Mapping[str, Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Clean and PGD logits of one evaluation batch; the loss is the cross-entropy at the PGD examples.

        Returns:
            ``(loss, logits [B, 2, C]: clean and PGD, labels [B])``; ``(loss, None, None)`` with
                ``prediction_loss_only``.
        """
        inputs = self._prepare_inputs(inputs)
        x, y = inputs[self.image_key], inputs[self.label_key]
        clean, adv = monitor_logits(
            unwrap_model(model), x, y, eps=self.eval_eps, steps=self.eval_steps, generator=self._eval_generator
        )
        loss = F.cross_entropy(adv.float(), y)
        if prediction_loss_only:
            return loss, None, None
        return loss, torch.stack([clean, adv], dim=1), y


class AdversarialTrainer(AdversarialTrainerMixin, Trainer):
    """A ``transformers.Trainer`` whose loss is an ``AdversarialStep``; the arguments are the mixin's."""


class RobustmixCallback(TrainerCallback):
    """Fires robustmix's events from Transformers' callback events and keeps the callbacks' state in checkpoints.

    ``AdversarialTrainerMixin`` installs it; the ``trainer`` the events receive is that Trainer (its
    ``model``, ``optimizer`` and ``log(values)`` are what robustmix's callbacks use).

    Args:
        trainer: The Trainer that runs the step.
    """

    def __init__(self, trainer: AdversarialTrainerMixin) -> None:
        self.trainer = trainer
        self.steps_per_epoch = 1
        #: The checkpoint ``train()`` resumes from; its callback state is loaded at ``on_train_begin``.
        self.resume_from: str | None = None

    def _fire(self, event: str, *args: Any) -> None:
        self.trainer.adversarial_step.fire(event, self.trainer, *args)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        batches = len(kwargs["train_dataloader"])
        self.steps_per_epoch = max(batches // args.gradient_accumulation_steps, 1)
        # As in robustmix's Trainer: callbacks allocate their state first, then a checkpoint overwrites it.
        self._fire("on_fit_start")
        if self.resume_from is not None:
            self.trainer.adversarial_step.load_state_dict(read_callback_state(self.resume_from))

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        epoch, done = divmod(state.global_step, self.steps_per_epoch)
        if done == 0:  # not a resume in the middle of the epoch
            self._fire("on_epoch_start", epoch)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        self._fire("on_before_optimizer_step", self.trainer.optimizer)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._fire("on_after_optimizer_step", self.trainer.optimizer)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        # Here rather than at Transformers' on_epoch_end: a checkpoint saved at the epoch's last step comes
        # after this, and a run resumed from it starts the next epoch.
        epoch, done = divmod(state.global_step, self.steps_per_epoch)
        if done == 0:
            self._fire("on_epoch_end", epoch - 1)
        if control.should_save or control.should_evaluate:
            sync_buffers(self.trainer.model)  # BatchNorm statistics agree on every rank (a no-op on one)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if control.should_save or control.should_evaluate:
            sync_buffers(self.trainer.model)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._fire("on_evaluate", dict(kwargs.get("metrics") or {}))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self._fire("on_save_checkpoint", str(directory))  # callbacks gather their state across processes here
        callback_state = self.trainer.adversarial_step.state_dict()
        if state.is_world_process_zero:
            write_callback_state(directory, callback_state)


def write_callback_state(directory: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``AdversarialStep.state_dict()`` into a checkpoint folder: tensors as safetensors, the rest as JSON."""
    tensors, values = split_state(state)
    save_file(tensors, Path(directory) / CALLBACK_TENSORS)
    (Path(directory) / CALLBACK_VALUES).write_text(json.dumps(values, indent=2))


def read_callback_state(directory: str | os.PathLike) -> dict[str, Any]:
    """Read back what ``write_callback_state`` wrote; tensors are on the CPU.

    Raises:
        FileNotFoundError: the folder holds no callback state (a checkpoint of a plain ``Trainer``).
    """
    directory = Path(directory)
    if not (directory / CALLBACK_TENSORS).is_file():
        raise FileNotFoundError(
            f"{directory} holds no robustmix callback state ({CALLBACK_TENSORS}): it was not saved by an "
            "AdversarialTrainer"
        )
    return join_state(load_file(directory / CALLBACK_TENSORS), json.loads((directory / CALLBACK_VALUES).read_text()))
