"""Adding robustmix to trainer classes that compute their loss in one overridable method."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from robustmix.step import AdversarialStep


class AdversarialLossMixin:
    """Mixin that turns a trainer's ``compute_loss(model, inputs)`` into an adversarial loss.

    Put it first in the bases of a trainer class whose loss comes from a
    ``compute_loss(model, inputs, return_outputs=False, ...)`` method (the Hugging Face
    ``Trainer`` convention) and set ``adversarial_step``:

        class RobustTrainer(AdversarialLossMixin, Trainer):
            adversarial_step = AdversarialStep([PGDAttack(eps=8 / 255), AdversarialCE()])

    The batch is a mapping; its images (pixels in [0, 1]), labels and optional dataset indices
    are read under ``image_key``, ``label_key`` and ``index_key``.
    """

    adversarial_step: AdversarialStep
    image_key: str = "pixel_values"
    label_key: str = "labels"
    index_key: str = "index"

    def compute_loss(
        self, model: nn.Module, inputs: Mapping[str, Tensor], return_outputs: bool = False, **kwargs: Any
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Adversarial loss of one batch; with ``return_outputs`` also ``{"logits": logits of x_adv}``."""
        step = getattr(self, "adversarial_step", None)
        if not isinstance(step, AdversarialStep):
            raise TypeError(f"{type(self).__name__}.adversarial_step must be an AdversarialStep, got {type(step)}")
        for key in (self.image_key, self.label_key):
            if key not in inputs:
                raise KeyError(f"batch has no {key!r} (keys: {sorted(inputs)}); set image_key / label_key")
        loss, ctx = step(model, inputs[self.image_key], inputs[self.label_key], inputs.get(self.index_key))
        if return_outputs:
            return loss, {"logits": ctx.logits.get("adv", next(iter(ctx.logits.values()), None))}
        return loss
