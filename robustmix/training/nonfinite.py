"""The trainer's guard against NaN and inf: the per-step check of the loss and gradients, what a rejected step
does (``NONFINITE_POLICIES``), its report, and the check that no weights or callback state holding NaN are written.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from robustmix.models import unwrap_model

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


class NonFiniteGuard:
    """One training run's check of every step's loss and gradients, and its policy for a step that fails it.

    Args:
        policy: One of ``NONFINITE_POLICIES``: ``"raise"`` stops with ``NonFiniteLossError``, ``"skip"`` drops
            the step's update (buffers included) and counts it.
        accelerator: The run's accelerator (device, processes).
        check_gradients: Check the gradients too; under fp16 the GradScaler owns inf/NaN gradients (they are
            expected while it calibrates its scale), so only the loss is checked there.
    """

    def __init__(self, policy: str, accelerator: Accelerator, *, check_gradients: bool) -> None:
        self.policy, self.accelerator, self.check_gradients = policy, accelerator, check_gradients
        #: Steps skipped so far in this run (``"skip"``; checkpointed).
        self.skipped = 0
        self._buffer_copy: list[Tensor] | None = None  # the model's buffers before the step ("skip")

    def before_step(self, model: nn.Module) -> None:
        """Keep a copy of the model's buffers (BatchNorm statistics) to restore if the step is skipped."""
        if self.policy != "skip":
            return
        buffers = list(unwrap_model(model).buffers())
        if self._buffer_copy is None:
            self._buffer_copy = [b.detach().clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._buffer_copy, buffers)

    def flags(self, loss: Tensor, model: nn.Module) -> Tensor:
        """``[loss is NaN/inf, gradients are NaN/inf]`` of this process's step, as floats on the device.

        The loss and the L2 norm of every gradient (one fused ``_foreach_norm``, as gradient clipping
        computes it; NaN and inf propagate into it) go through one ``isfinite``; no host read. A norm that
        overflows float32 (a tensor's gradient norm past ~1e19) counts as non-finite too. (The max-abs norm
        cannot overflow but is ~6x slower on CPUs.)
        """
        grads = [p.grad for p in model.parameters() if p.grad is not None] if self.check_gradients else []
        norms = torch._foreach_norm(grads) if grads else []
        bad = ~torch.isfinite(torch.stack([loss.detach().float().reshape(()), *norms]))
        return torch.stack([bad[0], bad[1:].any()]).float()

    def restore_buffers(self, model: nn.Module) -> None:
        """Put back the buffers ``before_step`` copied (``"skip"``); a no-op under ``"raise"``."""
        if self.policy == "skip" and self._buffer_copy:
            with torch.no_grad():
                torch._foreach_copy_(list(unwrap_model(model).buffers()), self._buffer_copy)

    def report(
        self,
        batch: dict[str, Tensor],
        loss: Tensor,
        local_flags: Tensor,
        flags: Tensor,
        *,
        step: int,
        epoch: int,
        batch_in_epoch: int,
        steps_per_epoch: int,
        last_checkpoint: int | None,
    ) -> None:
        """Report a rejected step: raise ``NonFiniteLossError`` (``"raise"``), or count it and warn (``"skip"``).

        Call it on every process alike: it gathers the flags, losses and dataset indices of all of them.

        Args:
            batch: The step's batch on this process (its ``"index"`` names the examples).
            loss: The step's loss on this process.
            local_flags: This process's ``flags``.
            flags: ``flags`` summed over the processes.
            step: The step's global step.
            epoch: Its epoch.
            batch_in_epoch: Its position in the epoch.
            steps_per_epoch: Steps of the epoch.
            last_checkpoint: Step of the last checkpoint saved, or ``None``.
        """
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
            f"non-finite {what} at step {step} (0-based; epoch {epoch}, batch "
            f"{batch_in_epoch} of {steps_per_epoch} in the epoch)"
            + (f"; loss {losses}" if bad_loss else "")
            + f"; dataset indices of the batch: {listed}"
        )
        if self.policy == "skip":
            self.skipped += 1
            if self.accelerator.is_main_process:
                # stacklevel 3: the warning points at the trainer's training step, which rejected the step.
                warnings.warn(
                    f"{where}. The step was skipped (skipped so far: {self.skipped})", RuntimeWarning, stacklevel=3
                )
            return
        last = f" (last checkpoint: step_{last_checkpoint})" if last_checkpoint is not None else ""
        raise NonFiniteLossError(
            f"{where}. The optimizer step was not taken and nothing was saved after it{last}. "
            "To skip such steps and count them instead, pass nonfinite='skip' (recipes: --on-nonfinite skip)",
            step=step, epoch=epoch, batch_in_epoch=batch_in_epoch,
            indices=indices_lists, nonfinite_loss=bad_loss, nonfinite_gradients=bad_gradients,
        )  # fmt: skip


def refuse_nonfinite_weights(
    model: nn.Module, accelerator: Accelerator, what: str, step: int, callback_state: dict[str, Any] | None = None
) -> None:
    """Raise ``NonFiniteError`` before ``what`` is written from NaN/inf weights or NaN callback state.

    One reduction over the model's floating-point tensors (they are the same on every process); the
    callback state (``None``: not checked) is checked for NaN only (inf may be a legitimate value), and
    that decision is reduced across processes.

    Args:
        model: The model whose weights are to be written.
        accelerator: The run's accelerator.
        what: What is to be written, for the message (``"checkpoint step_40"``).
        step: The global step, for the message.
        callback_state: The step's ``state_dict()`` to be written with the weights.
    """
    tensors = {k: t for k, t in unwrap_model(model).state_dict().items() if t.is_floating_point()}
    bad_weights: list[str] = []
    if tensors:
        norms = torch.stack([n.float() for n in torch._foreach_norm(list(tensors.values()), math.inf)])
        if not bool(torch.isfinite(norms).all()):
            bad_weights = [k for k, n in zip(tensors, norms.tolist()) if not math.isfinite(n)]
    bad_state: list[str] = []
    if callback_state is not None:
        bad_state = [k for k, t in _tensors(callback_state) if t.is_floating_point() and bool(t.isnan().any())]
        if accelerator.num_processes > 1:
            flag = torch.tensor([float(bool(bad_state))], device=accelerator.device)
            if accelerator.reduce(flag, "sum").item() and not bad_state:
                bad_state = ["(on another process)"]
    if bad_weights or bad_state:
        parts = [f"the model's {', '.join(bad_weights[:8])} hold NaN or inf"] if bad_weights else []
        parts += [f"callback state {', '.join(bad_state[:8])} holds NaN"] if bad_state else []
        raise NonFiniteError(f"refusing to write {what} at step {step}: {'; '.join(parts)}")


def _abbreviate(values: list[int]) -> str:
    if len(values) <= _SHOWN_INDICES:
        return str(values)
    return f"{str(values[:_SHOWN_INDICES])[:-1]}, ... ({len(values)} in all)]"


def _tensors(state: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """``(key path, tensor)`` of every tensor in a nested callback state."""
    for key, value in state.items():
        if isinstance(value, Tensor):
            yield f"{prefix}{key}", value
        elif isinstance(value, dict):
            yield from _tensors(value, f"{prefix}{key}/")
