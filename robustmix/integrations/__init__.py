"""robustmix inside other libraries' trainers.

- ``robustmix.integrations.hf``: Hugging Face ``transformers.Trainer`` (``pip install "robustmix[hf]"``).
- ``robustmix.integrations.lightning``: PyTorch Lightning (``pip install "robustmix[lightning]"``).

Each trainer feeds the step its position (epoch, step, planned totals), fires robustmix's callback events,
saves callback state with its own checkpoints and reports clean and PGD accuracy when it evaluates, so a
recipe's callbacks behave as under robustmix's ``Trainer``. The ``trainer`` argument of the events is an
object with ``model``, ``optimizer`` and ``log(values)``, what robustmix's own callbacks read from it.

This module imports neither library; it holds what both integrations share.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from robustmix.attacks import pgd
from robustmix.core.step import AdversarialStep
from robustmix.training.trainer import attack_eps

__all__ = ["attack_eps", "check_mixed_precision", "monitor_logits", "robustmix_batch"]


def robustmix_batch(batch: Mapping[str, Tensor], image_key: str, label_key: str, index_key: str) -> dict[str, Tensor]:
    """A trainer's batch under robustmix's names: ``{"image": [B, C, H, W] pixels in [0, 1], "label": [B]}``, and
    ``"index"`` (``[B]`` dataset indices) when the batch has one.

    Raises:
        KeyError: The batch lacks ``image_key`` or ``label_key``.
    """
    for key in (image_key, label_key):
        if key not in batch:
            raise KeyError(f"batch has no {key!r} (keys: {sorted(batch)}); set image_key / label_key")
    renamed = {"image": batch[image_key], "label": batch[label_key]}
    if batch.get(index_key) is not None:
        renamed["index"] = batch[index_key]
    return renamed


def check_mixed_precision(step: AdversarialStep, trainer_precision: str, setting: str) -> None:
    """Raise unless the step was built for the precision the trainer runs.

    Args:
        step: The adversarial step.
        trainer_precision: ``"no"``, ``"bf16"`` or ``"fp16"``: the autocast the trainer runs.
        setting: How the user chose it, for the message (e.g. ``"TrainingArguments(bf16=True)"``).
    """
    if step.mixed_precision != trainer_precision:
        raise ValueError(
            f"the trainer runs mixed precision {trainer_precision!r} ({setting}) but the step was built with "
            f"mixed_precision={step.mixed_precision!r}; build it with AdversarialStep(..., "
            f"mixed_precision={trainer_precision!r})"
        )


def monitor_logits(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Logits of ``x`` and of its PGD examples: the evaluation attack of robustmix's ``Trainer``.

    PGD on the cross-entropy, ``steps`` steps of ``eps / 4`` from a uniform start, BatchNorm in eval mode.
    Works under ``no_grad`` and ``inference_mode`` (the inputs are copied out of inference mode).

    Args:
        model: The unwrapped model, pixels in [0, 1] to logits.
        x: Images ``[B, C, H, W]``, pixels in [0, 1].
        y: Labels ``[B]``.
        eps: L-inf budget in pixels.
        steps: PGD steps.
        generator: Draws the random starts (seeded once per evaluation, so the same weights give the same
            numbers); ``None`` draws from the global RNG.

    Returns:
        ``(clean logits [B, C], PGD logits [B, C])``, detached.
    """
    with torch.inference_mode(False), torch.no_grad():
        x, y = x.clone(), y.clone()
        clean = model(x)
        x_adv = pgd(
            model, x, y, eps=eps, step_size=eps / 4, steps=steps, start="uniform", bn_mode="eval", generator=generator
        )
        return clean, model(x_adv)
