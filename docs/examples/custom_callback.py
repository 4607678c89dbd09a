"""A loss reweighter written from scratch: down-weight examples whose adversarial prediction is confidently wrong.

Under a strong attack, an example the model gets wrong with high confidence is often mislabeled or
ambiguous; giving it a small weight keeps it from dominating the loss. The callback reads the
adversarial logits the loss needs anyway, so it adds no forward or backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from robustmix import Callback, Stage, StepContext
from robustmix.checks import check_unit
from robustmix.stages.weights import normalize_weights


def confident_mistake_weights(logits: Tensor, targets: Tensor, threshold: float, floor: float) -> Tensor:
    """Weights ``[B]``, batch mean 1: ``floor`` where ``argmax p != y`` and ``max p > threshold``, else 1.

    Args:
        logits: Logits ``[B, C]``; only their softmax is used, without gradient.
        targets: Labels ``[B]``.
        threshold: Confidence in (0, 1) above which a wrong prediction counts as confident.
        floor: Relative weight of a confident mistake, in [0, 1].
    """
    confidence, prediction = logits.detach().float().softmax(dim=1).max(dim=1)
    confident_mistake = (prediction != targets) & (confidence > threshold)
    return normalize_weights(torch.where(confident_mistake, floor, 1.0))


class ConfidentMistakeWeights(Callback):
    """Multiplies ``weights`` by :func:`confident_mistake_weights` of the adversarial logits.

    Logs an exponential moving average of the fraction of confident mistakes as
    ``ctx.extras["mistake_rate"]``; the average is callback state, saved with checkpoints.

    Args:
        threshold: Confidence above which a wrong prediction counts as confident; 0.9 by default.
        floor: Relative weight of a confident mistake; 0.1 by default.
        momentum: Of the moving average, in [0, 1); 0.99 by default.
    """

    stage = Stage.WEIGHTS
    reads = ("logits_adv",)  # an attack must write x_adv first; the composition check enforces it
    writes = ("weights",)  # several reweighters may write weights: their product is used

    def __init__(self, threshold: float = 0.9, floor: float = 0.1, momentum: float = 0.99) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        check_unit("floor", floor)  # the same one-line error as robustmix's own callbacks
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.threshold, self.floor, self.momentum = threshold, floor, momentum
        self.mistake_rate = torch.zeros(())

    def __call__(self, ctx: StepContext) -> None:
        logits = ctx.get_logits("adv")  # memoized: the loss reuses this forward, no extra pass
        weights = confident_mistake_weights(logits, ctx.targets, self.threshold, self.floor)
        ctx.multiply_weights(weights)
        rate = (weights < weights.max()).float().mean()  # stays on the device: no host sync per step
        self.mistake_rate = self.momentum * self.mistake_rate.to(rate.device) + (1 - self.momentum) * rate
        ctx.extras["mistake_rate"] = self.mistake_rate

    def state_dict(self) -> dict[str, Any]:
        return {"mistake_rate": self.mistake_rate.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mistake_rate = state["mistake_rate"].clone()

    def __repr__(self) -> str:
        return f"ConfidentMistakeWeights(threshold={self.threshold}, floor={self.floor}, momentum={self.momentum})"


if __name__ == "__main__":
    from robustmix import AdversarialCE, AdversarialStep, PGDAttack
    from robustmix.data import load_dataset
    from robustmix.models import create_model

    torch.manual_seed(0)
    images, labels = load_dataset("digits", "train").tensors()
    model = create_model("test_resnet", num_classes=10, in_chans=1, mean=(0.5,), std=(0.5,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = AdversarialStep([PGDAttack(eps=0.1, step_size=0.025, steps=5), ConfidentMistakeWeights(), AdversarialCE()])
    model.train()
    for start in range(0, 192, 32):
        loss, ctx = step(model, images[start : start + 32], labels[start : start + 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        forwards, backwards = ctx.passes()
        print(
            f"loss {loss.item():.3f}  mistake rate {ctx.extras['mistake_rate'].item():.4f}  "
            f"passes per step: {forwards:.0f} forwards, {backwards:.0f} backwards"
        )
