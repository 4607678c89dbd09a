"""BiLAW: sample weights learned from class-conditioned multi-class margins (Holtz et al. 2022), robustmix's design.

Only the abstract was available: a bilevel problem whose upper level trains a robust classifier
and whose lower level learns a parametric map from a sample's *multi-class margin* to an
importance weight. robustmix's design:

- input of the weight net: the multi-class margin ``m_j = z_y - z_j`` of the adversarial logits
  (``MultiClassMargin``, class order, ``m_y = 0``) concatenated with ``onehot(y)``: ``[B, 2C]``;
- weight net ``g_phi``: ``Linear(2C, 100) -> ReLU -> Linear(100, 1) -> softplus`` (or sigmoid),
  weights normalized to batch mean 1 and detached in the real step;
- every ``meta_every`` steps a lookahead: ``theta' = SGD_step(theta, grad mean_i w_i(phi) l_adv_i)``
  with the real optimizer, outer loss the unweighted adversarial CE of ``theta'`` on a held-out
  meta batch (its adversarial examples crafted by PGD at ``theta``), plus optionally its clean CE;
  one Adam step of ``phi``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from robustmix.attacks.pgd import check_eps, pgd
from robustmix.checks import check_int
from robustmix.core.context import Stage, StepContext
from robustmix.methods.meta import LookaheadReweighter, functional_forward, virtual_sgd_step
from robustmix.stages.labels import one_hot
from robustmix.stages.weights import normalize_weights

#: Output activations of the weight net: both keep weights positive.
OUTPUTS = ("softplus", "sigmoid")


def bilaw_features(margin_vector: Tensor, y: Tensor) -> Tensor:
    """The weight net's input ``[B, 2C]`` (float32, detached): ``margin_vector [B, C]`` then ``onehot(y)``."""
    margin_vector = margin_vector.detach().float()
    return torch.cat([margin_vector, one_hot(y, margin_vector.shape[1])], dim=1)


class BiLAWWeightNet(nn.Module):
    """``g_phi``: ``Linear(2C, hidden) -> ReLU -> Linear(hidden, 1) -> softplus | sigmoid``, per sample.

    Args:
        num_classes: ``C``; the input has ``2C`` features (``bilaw_features``).
        hidden: Width of the hidden layer, 100 by default.
        output: ``"softplus"`` (the default) or ``"sigmoid"``.
    """

    def __init__(self, num_classes: int, hidden: int = 100, output: str = "softplus") -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.output = output
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        """Raw non-negative weights ``[B]`` of ``features [B, 2C]``."""
        out = self.mlp(features.float()).squeeze(1)
        return F.softplus(out) if self.output == "softplus" else torch.sigmoid(out)


def bilaw_weights(net: nn.Module, features: Tensor) -> Tensor:
    """``net(features)`` normalized to batch mean 1 ``[B]``; differentiable in the net's parameters."""
    return normalize_weights(net(features))


class BiLAWWeights(LookaheadReweighter):
    """Multiplies ``weights`` by BiLAW's learned weights of the multi-class margin; runs the lookahead.

    Every step: ``bilaw_weights`` of ``bilaw_features`` (from ``margin_vector``, e.g.
    ``MultiClassMargin`` of the adversarial training logits: no extra pass),
    detached. When ``ctx.step % meta_every == 0``, first the lookahead, on the unwrapped model:

    1. inner loss ``mean_i w_i(phi) * CE(f(x_adv_i), y_i)`` from one training-mode forward of the
       step's ``x_adv`` with frozen BatchNorm statistics; a virtual step of the real SGD optimizer
       gives ``theta'``;
    2. a meta batch ``(x_m, y_m)``; ``x_m_adv`` = PGD at ``theta`` (eval mode, CE, uniform start);
    3. outer loss ``CE(f_theta'(x_m_adv), y_m)`` (+ ``CE(f_theta'(x_m), y_m)`` with ``clean_meta_loss``);
       one Adam step of ``phi``.

    Args:
        num_classes: ``C``.
        meta_batches: Held-out ``(x, y)`` batches (e.g. ``MetaBatches``).
        eps: Budget of the meta batch's attack in pixels (use the training attack's).
        step_size: Its step in pixels.
        attack_steps: Its number of steps.
        meta_every: Lookahead period in steps, 50 by default.
        meta_lr: Adam learning rate of ``phi``, 1e-3 by default.
        clean_meta_loss: Add the clean CE of ``theta'`` to the outer loss (the "accuracy" half);
            off by default.
        hidden: Width of the weight net, 100 by default.
        output: ``"softplus"`` (the default) or ``"sigmoid"``.
        optimizer: The model's SGD optimizer; by default the trainer's.
    """

    stage = Stage.WEIGHTS
    reads = ("margin_vector", "x_adv")
    writes = ("weights",)

    def __init__(
        self,
        num_classes: int,
        meta_batches: Iterable[tuple[Tensor, Tensor]],
        *,
        eps: float,
        step_size: float,
        attack_steps: int,
        meta_every: int = 50,
        meta_lr: float = 1e-3,
        clean_meta_loss: bool = False,
        hidden: int = 100,
        output: str = "softplus",
        optimizer: Optimizer | None = None,
    ) -> None:
        check_int("num_classes", num_classes, 2)
        check_eps(eps)
        if not (0 <= step_size < math.inf):
            raise ValueError(f"step_size must be a finite number >= 0, got {step_size}")
        check_int("attack_steps", attack_steps, 0)
        super().__init__(
            BiLAWWeightNet(num_classes, hidden, output), meta_batches, meta_every=meta_every, meta_lr=meta_lr,
            optimizer=optimizer,
        )  # fmt: skip
        self.num_classes, self.eps, self.step_size, self.attack_steps = num_classes, eps, step_size, attack_steps
        self.clean_meta_loss = clean_meta_loss

    def __call__(self, ctx: StepContext) -> None:
        self.place(ctx.inputs.device)
        self.maybe_meta_step(ctx)
        with torch.no_grad():
            weights = bilaw_weights(self.net, bilaw_features(ctx.margin_vector, ctx.targets))
        ctx.multiply_weights(weights)

    def meta_loss(self, ctx: StepContext, x_meta: Tensor, y_meta: Tensor) -> Tensor:
        model = ctx.attack_model
        weights = bilaw_weights(self.net, bilaw_features(ctx.margin_vector, ctx.targets))
        logits = functional_forward(model, dict(model.named_parameters()), ctx.x_adv)
        inner = (weights * F.cross_entropy(logits.float(), ctx.targets, reduction="none")).mean()
        virtual = virtual_sgd_step(model, inner, self.optimizer)
        # The meta batch is attacked at theta, as the training batch was.
        x_meta_adv = pgd(
            model, x_meta, y_meta, eps=self.eps, step_size=self.step_size, steps=self.attack_steps, check_values=False
        )
        outer = F.cross_entropy(functional_forward(model, virtual, x_meta_adv).float(), y_meta)
        if self.clean_meta_loss:
            outer = outer + F.cross_entropy(functional_forward(model, virtual, x_meta).float(), y_meta)
        return outer

    def __repr__(self) -> str:
        return (
            f"BiLAWWeights(num_classes={self.num_classes}, eps={self.eps}, step_size={self.step_size}, "
            f"attack_steps={self.attack_steps}, meta_every={self.meta_every}, meta_lr={self.meta_lr}, "
            f"clean_meta_loss={self.clean_meta_loss}, output={self.net.output!r}, meta_batches={self.meta_batches!r})"
        )
