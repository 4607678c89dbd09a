"""One adversarial training step: a batch through a list of callbacks, to a loss.

``AdversarialStep`` knows nothing about optimizers, schedulers or Accelerate: it returns
the loss and the host loop calls ``backward`` on it. The same object serves robustmix's
``Trainer`` and a user's own loop:

    step = AdversarialStep([PGDAttack(eps=8 / 255, step_size=2 / 255, steps=10), AdversarialCE()])
    for x, y in loader:
        loss, ctx = step(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from robustmix.checks import check_int
from robustmix.core.callbacks import Callback, CompositionError, check_composition
from robustmix.core.context import StepContext
from robustmix.core.validation import check_batch, check_model_input, check_step_position
from robustmix.models import unwrap_model

MIXED_PRECISION = ("no", "bf16", "fp16")


class AdversarialStep:
    """Runs one batch through callbacks in stage order and returns ``(loss, ctx)``.

    The composition of the callbacks is checked once, here: every field a callback reads must be
    written by an earlier stage, and only ``weights`` may have several writers (they multiply,
    and the product is renormalized to batch mean 1).

    Args:
        callbacks: Attack, anti-adversary, margin, label, weight and loss callbacks, in any order.
        num_classes: Number of classes; defaults to the model's ``num_classes`` attribute.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"``, recorded in the context.
        check_inputs: Validate every batch (range, NaN/inf, labels, dtype and channels against the
            model) before any work; costs one host synchronization per step.
        fast: The fast path. Attack iterations (``PGDAttack``, ``FGSMAttack``, ``AdversarysAdversary``,
            ``AntiAdversary``) run as one compiled unit each (``perturb``'s ``compile_backend``), replayed as
            a CUDA graph on CUDA, for batches of the largest size seen so far; a smaller batch (an epoch's
            short last batch) runs them eagerly, so no graph is compiled for it. The value check of
            ``check_inputs`` (pixels in [0, 1], no NaN/inf, labels in range, the index range) runs on the
            first batch of each epoch only: later batches of the epoch cost no host synchronization, and a
            bad one among them is not refused (NaN shows as a non-finite loss; a label out of range fails
            inside the loss, on CUDA as a device-side assert). Every attack must run with
            ``bn_mode="eval"``.
        compile_backend: The ``torch.compile`` backend of the fast path.

    Attributes:
        requires_index: Whether batches must come with dataset indices; inferred from the
            callbacks (those that read ``index``).

    Raises:
        CompositionError: the callbacks cannot run together (names the missing or doubly written field).
    """

    def __init__(
        self,
        callbacks: Sequence[Callback],
        *,
        num_classes: int | None = None,
        mixed_precision: str = "no",
        check_inputs: bool = True,
        fast: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
        check_int("num_classes", num_classes, 2, optional=True)
        self.callbacks = list(callbacks)
        self.staged = check_composition(self.callbacks)
        if fast and (train_mode := [c for c in self.staged if getattr(c, "bn_mode", "eval") != "eval"]):
            raise ValueError(
                f"fast=True compiles attacks with bn_mode='eval' only; {type(train_mode[0]).__name__} runs with "
                f"bn_mode={train_mode[0].bn_mode!r}"
            )
        self.requires_index = any("index" in c.reads for c in self.staged)
        #: Inputs whose training logits some callback needs with gradient; the others' forwards run under no_grad.
        self.grad_inputs = frozenset(
            f.removeprefix("logits_")
            for c in self.staged
            for f in (*c.reads, *c.optional_reads)
            if f.startswith("logits_") and f not in c.detached_reads
        )
        weight_writers = [c for c in self.staged if "weights" in c.writes]
        # The product of several reweighters is renormalized once, after the last of them.
        self._renormalize_after = weight_writers[-1] if len(weight_writers) > 1 else None
        self.num_classes = num_classes
        self.mixed_precision = mixed_precision
        self.check_inputs = check_inputs
        self.fast, self.compile_backend = fast, compile_backend
        self._checked_epoch: int | None = None  # the fast path's last epoch whose values were checked
        self._largest_batch = 0  # the fast path compiles attacks for this batch size

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        index: Tensor | None = None,
        *,
        epoch: int = 0,
        step: int = 0,
        total_epochs: int | None = None,
        total_steps: int | None = None,
    ) -> tuple[Tensor, StepContext]:
        """Run the callbacks on one batch.

        Args:
            model: The model being trained (may be DDP-wrapped); it takes pixels in [0, 1].
            inputs: Images ``[B, ...]``, pixels in [0, 1].
            targets: Labels ``[B]`` in ``[0, num_classes)``.
            index: Dataset indices ``[B]``; required when a callback keeps per-example state.
            epoch: Current epoch (0-based), read by schedules such as burn-in.
            step: Global optimizer step (0-based).
            total_epochs: Planned epochs, if known.
            total_steps: Planned steps, if known.

        Returns:
            The scalar loss (backpropagate it) and the step's ``StepContext``.

        Raises:
            TypeError: a tensor of the wrong dtype (see ``robustmix.core.validation``).
            ValueError: a bad batch, index, position (``epoch``...), a model with other classes than
                ``num_classes``, or one example for a model with BatchNorm in train mode; raised before any
                forward.
        """
        attack_model = unwrap_model(model)
        num_classes = self.num_classes or getattr(attack_model, "num_classes", None)
        if num_classes is None:
            raise ValueError("cannot tell the number of classes: pass num_classes= to AdversarialStep")
        if self.requires_index and index is None:
            users = ", ".join(type(c).__name__ for c in self.staged if "index" in c.reads)
            raise CompositionError(f"{users} keep per-example state and need `index=` (dataset indices) in every step")
        check_step_position(epoch=epoch, step=step, total_epochs=total_epochs, total_steps=total_steps)
        index_range = None
        if self.check_inputs:
            if not (self.fast and epoch == self._checked_epoch):
                index_range = check_batch(inputs, targets, num_classes, index)
                self._checked_epoch = epoch
            check_model_input(attack_model, inputs, self.num_classes)
        if len(inputs) == 1 and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in attack_model.modules()
        ):
            # Checked before any forward: a train-mode forward would already have moved the running statistics.
            raise ValueError(
                "a batch of one example cannot train a model with BatchNorm in train mode (it normalizes over the "
                "batch); use batches of two or more (Trainer leaves such a last batch out)"
            )

        ctx = StepContext(
            model=model,
            attack_model=attack_model,
            inputs=inputs,
            targets=targets,
            num_classes=num_classes,
            index=index,
            index_range=index_range,
            epoch=epoch,
            step=step,
            total_epochs=total_epochs,
            total_steps=total_steps,
            mixed_precision=self.mixed_precision,
            grad_inputs=self.grad_inputs,
            attack_backend=self._attack_backend(len(inputs)),
        )
        with ctx.counter.watch(attack_model):
            for callback in self.staged:
                callback(ctx)
                if callback is self._renormalize_after:
                    ctx.weights = ctx.weights / ctx.weights.mean().clamp_min(1e-12)
        for callback in self.callbacks:
            callback.on_before_backward(ctx)
        return ctx.loss, ctx

    def _attack_backend(self, batch_size: int) -> str | None:
        """The fast path's compile backend for a batch of this size; ``None`` (eager) for a smaller one."""
        if not self.fast or batch_size < self._largest_batch:
            return None
        self._largest_batch = batch_size
        return self.compile_backend

    def fire(self, event: str, *args: Any) -> None:
        """Call ``event`` (e.g. ``"on_epoch_start"``) on every callback, in the order given.

        In a user's own loop, fire ``on_after_optimizer_step`` after ``optimizer.step()`` when a
        callback needs it (AWP) and ``on_epoch_start`` / ``on_epoch_end`` around epochs.
        """
        if not event.startswith("on_") or not hasattr(Callback, event):
            raise ValueError(f"unknown callback event {event!r}")
        for callback in self.callbacks:
            getattr(callback, event)(*args)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Every stateful callback's state, keyed ``"<position>.<ClassName>"``."""
        out = {}
        for i, callback in enumerate(self.callbacks):
            state = callback.state_dict()
            if state:
                out[f"{i}.{type(callback).__name__}"] = state
        return out

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Restore ``state_dict``; raises if the saved callbacks do not match these."""
        expected = {f"{i}.{type(c).__name__}" for i, c in enumerate(self.callbacks) if c.state_dict()}
        if set(state) != expected:
            raise ValueError(f"callback state keys {sorted(state)} do not match this step's {sorted(expected)}")
        for i, callback in enumerate(self.callbacks):
            key = f"{i}.{type(callback).__name__}"
            if key in state:
                callback.load_state_dict(state[key])

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(c) for c in self.staged)
        return f"AdversarialStep([\n    {inner},\n])"
