"""The per-batch state that flows through an adversarial training step.

One ``StepContext`` is built for every batch. Callbacks read and write its fields in stage
order (``Stage``); every field has exactly one writer, except ``weights``, which several
reweighters may multiply into. Model outputs are not stored by callbacks: they ask the context
for the logits of a named input (``"clean"``, ``"adv"``, ``"anti"``) and the context runs each
forward once per step and remembers it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum

import torch
from torch import Tensor, nn

from robustmix.core.modes import model_mode


class Stage(IntEnum):
    """Where a callback runs inside one step; lower values run first."""

    BUDGET = 0  # per-sample perturbation budgets (eps), e.g. class-wise multipliers
    ATTACK = 10  # x_adv
    ANTI = 20  # x_anti: anti-adversary or the adversary's adversary
    PERTURB = 30  # weight perturbation before the training forward (AWP)
    MARGIN = 40  # margin / margin_vector from logits the step already has
    LABELS = 50  # soft_targets [B, C]
    WEIGHTS = 60  # per-sample loss weights [B]
    LOSS = 70  # the scalar training loss


#: Names of the model inputs a callback can ask logits for, and the context field holding each.
INPUT_FIELDS = {"clean": "inputs", "adv": "x_adv", "anti": "x_anti"}

#: Fields that callbacks may declare in ``reads`` / ``writes``. ``logits_<input>`` are the
#: training-mode logits with gradient (memoized); ``eval_logits_<input>`` are detached logits of
#: the model in eval mode (memoized too), e.g. ADA-Lab's ``softmax(f(x_aa) / T)``.
FIELDS = (
    "inputs",
    "targets",
    "index",
    "eps",
    "x_adv",
    "x_anti",
    "kappa",
    "aa_steps",
    "margin",
    "margin_vector",
    "soft_targets",
    "weights",
    "loss",
    *(f"logits_{name}" for name in INPUT_FIELDS),
    *(f"eval_logits_{name}" for name in INPUT_FIELDS),
)

#: Fields several callbacks may write: each writer multiplies its weights in.
MULTI_WRITER_FIELDS = frozenset({"weights"})


@dataclass
class PassCounter:
    """Counts model forward and backward passes, in examples.

    ``forwards`` / ``backwards`` count examples pushed through the model, so one forward of a
    batch of ``B`` adds ``B``. Divide by the batch size for passes per step
    (``StepContext.passes``). A backward is counted when a gradient flows back through a
    model output (``loss.backward()`` or ``torch.autograd.grad`` in an attack).
    """

    forwards: int = 0
    backwards: int = 0

    def reset(self) -> None:
        """Set both counts to zero."""
        self.forwards = 0
        self.backwards = 0

    def add(self, examples: int) -> None:
        """Count a forward and a backward of ``examples`` examples that ran without the hook ``watch`` registers
        (a compiled attack iteration calls ``model.forward`` directly)."""
        self.forwards += examples
        self.backwards += examples

    @contextlib.contextmanager
    def watch(self, model: nn.Module) -> Iterator[None]:
        """Count every call of ``model`` (and of wrappers that call it) while the block runs."""

        def on_backward(grad: Tensor) -> None:
            self.backwards += grad.shape[0]

        def on_forward(module: nn.Module, args: tuple, output: Tensor) -> None:
            if isinstance(output, Tensor):
                self.forwards += output.shape[0]
                if output.requires_grad:
                    output.register_hook(on_backward)

        handle = model.register_forward_hook(on_forward)
        try:
            yield
        finally:
            handle.remove()


@dataclass
class StepContext:
    """Everything one adversarial training step knows about its batch.

    Tensors are on the batch's device. ``B`` is the batch size, ``C`` the number of classes.

    Attributes:
        model: The model being trained, possibly wrapped (DDP). Training forwards go through it.
        attack_model: The same model unwrapped (no DDP), used by attacks: no collectives fire and
            the mixed-precision autocast of Accelerate is kept.
        inputs: Clean images ``[B, ...]``, pixels in [0, 1].
        targets: Integer labels ``[B]`` in ``[0, num_classes)``.
        num_classes: ``C``.
        index: Dataset index of every example ``[B]`` (int64), for per-example state; ``None``
            when the loop does not provide one.
        index_range: ``(min, max)`` of ``index`` as Python ints when the step's input check read
            them (no further host synchronization needed); ``None`` otherwise.
        eps: Per-sample perturbation budget ``[B]`` in pixel units, written by the attack (or by a
            budget callback before it).
        uniform_eps: The same budget as a float when every sample has it (the attack wrote ``eps``
            from its scalar ``eps``); ``None`` for per-sample budgets. Callbacks after the attack pass
            it instead of ``eps`` and so skip the host read that checks a per-sample budget.
        x_adv: Adversarial examples ``[B, ...]`` in [0, 1].
        x_anti: Anti-adversarial examples ``[B, ...]`` in [0, 1] (from ``x`` or from ``x_adv``).
        kappa: GAIRAT's geometry value ``[B]`` (int64): attack iterations still classified
            correctly.
        aa_steps: Descent steps the adversary's adversary needed to bring each example back to its
            label ``[B]`` (int64 in ``{0..K_aa + 1}``, ``K_aa + 1``: still misclassified).
        margin: Per-sample margin ``[B]`` (larger is farther from the decision boundary).
        margin_vector: Multi-class margin ``[B, C]``.
        soft_targets: Target distributions ``[B, C]``, rows sum to 1, detached.
        weights: Per-sample loss weights ``[B]``, non-negative, detached.
        loss: The scalar training loss.
        logits: Memoized training-mode logits ``[B, C]`` per input name (``"clean"``, ``"adv"``,
            ``"anti"``), with gradient.
        eval_logits: Memoized eval-mode logits ``[B, C]`` per input name, detached.
        counter: Forward/backward pass counter for this step.
        epoch: Current epoch (0-based). Schedules such as burn-in read it.
        step: Global optimizer step (0-based).
        total_epochs: Planned number of epochs, if known.
        total_steps: Planned number of steps, if known.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"``; attacks scale their loss under fp16.
        extras: Free-form values a callback wants to log (e.g. ``{"lam_mean": ...}``).
        grad_inputs: Inputs whose training logits some callback needs with gradient (set by
            ``AdversarialStep`` from the callbacks' ``detached_reads``); ``None``: all of them.
        attack_backend: The ``torch.compile`` backend attacks run their iterations with (``perturb``'s
            ``compile_backend``), set by ``AdversarialStep(fast=True)`` for its full-size batches; ``None``: eager.
    """

    model: nn.Module
    attack_model: nn.Module
    inputs: Tensor
    targets: Tensor
    num_classes: int
    index: Tensor | None = None
    index_range: tuple[int, int] | None = None
    eps: Tensor | None = None
    uniform_eps: float | None = None
    x_adv: Tensor | None = None
    x_anti: Tensor | None = None
    kappa: Tensor | None = None
    aa_steps: Tensor | None = None
    margin: Tensor | None = None
    margin_vector: Tensor | None = None
    soft_targets: Tensor | None = None
    weights: Tensor | None = None
    loss: Tensor | None = None
    logits: dict[str, Tensor] = field(default_factory=dict)
    eval_logits: dict[str, Tensor] = field(default_factory=dict)
    counter: PassCounter = field(default_factory=PassCounter)
    epoch: int = 0
    step: int = 0
    total_epochs: int | None = None
    total_steps: int | None = None
    mixed_precision: str = "no"
    extras: dict[str, Tensor | float] = field(default_factory=dict)
    grad_inputs: frozenset[str] | None = None
    attack_backend: str | None = None

    @property
    def batch_size(self) -> int:
        """``B``, the number of examples in the batch."""
        return self.inputs.shape[0]

    def input(self, name: str) -> Tensor:
        """The model input called ``name`` (``"clean"``, ``"adv"`` or ``"anti"``)."""
        if name not in INPUT_FIELDS:
            raise KeyError(f"unknown input {name!r}; expected one of {sorted(INPUT_FIELDS)}")
        value = getattr(self, INPUT_FIELDS[name])
        if value is None:
            raise RuntimeError(f"input {name!r} is not available: no callback wrote `{INPUT_FIELDS[name]}` yet")
        return value

    def get_logits(self, name: str) -> Tensor:
        """Training-mode logits ``[B, C]`` of input ``name``; one forward per step.

        They carry gradient unless no callback of the step needs it (``grad_inputs``): then the
        forward runs under ``no_grad`` (BatchNorm still in training mode) and keeps no graph.
        """
        if name not in self.logits:
            needs_grad = self.grad_inputs is None or name in self.grad_inputs
            with contextlib.nullcontext() if needs_grad else torch.no_grad():
                self.logits[name] = self.model(self.input(name))
        return self.logits[name]

    def get_eval_logits(self, name: str) -> Tensor:
        """Detached eval-mode logits ``[B, C]`` of input ``name``; one forward per step.

        Runs the unwrapped model in eval mode (BatchNorm running statistics, no dropout) under
        ``no_grad`` and restores every module's previous mode.
        """
        if name not in self.eval_logits:
            with torch.no_grad(), model_mode(self.attack_model, "eval"):
                self.eval_logits[name] = self.attack_model(self.input(name)).detach()
        return self.eval_logits[name]

    def multiply_weights(self, weights: Tensor) -> None:
        """Multiply per-sample ``weights [B]`` into ``weights`` (several reweighters compose)."""
        weights = weights.detach()
        self.weights = weights if self.weights is None else self.weights * weights

    def passes(self) -> tuple[float, float]:
        """Forward and backward passes of this step so far, in units of the batch size."""
        return self.counter.forwards / self.batch_size, self.counter.backwards / self.batch_size
