"""The trainer's metrics: the training window (loss, accuracies, passes and callbacks' ``ctx.extras`` summed on the
device between two rows) and ``metrics.jsonl``, the run's log of rows with step, epoch and wall-clock time."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor

from robustmix.checks import is_number
from robustmix.core.context import StepContext
from robustmix.runs.checkpoint import atomic_write_text

#: Keys of metrics.jsonl rows that measure wall-clock time: the only values that differ between a run and the same
#: run interrupted and resumed.
WALL_CLOCK_KEYS = frozenset({"elapsed_s", "epoch_time_s", "images_per_s"})
#: Keys of a training row in metrics.jsonl that callbacks' ``ctx.extras`` may not take.
_TRAIN_ROW_KEYS = frozenset(
    {"step", "epoch", "loss", "lr", "train_adv_acc", "train_clean_acc", "forwards_per_step", "backwards_per_step",
     "nonfinite_skipped", "elapsed_s"}
)  # fmt: skip


def batch_totals(loss: Tensor, ctx: StepContext, targets: Tensor) -> Tensor:
    """A (micro-)batch's share of the window: ``[loss * B, B, adversarial correct, adversarial examples, clean
    correct, clean examples]`` as float64 on the device. The accuracies come from logits the step computed
    anyway (zeros where it has none): no extra forward."""
    adv, clean = ctx.logits.get("adv"), ctx.logits.get("clean", ctx.eval_logits.get("clean"))
    b = float(len(targets))
    return torch.stack([
        loss.detach().double() * b, torch.tensor(b, device=targets.device, dtype=torch.float64),
        *_correct(adv, targets), *_correct(clean, targets),
    ])  # fmt: skip


def _correct(logits: Tensor | None, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(correct predictions, examples) as float64 scalars; zeros when the step has no such logits."""
    zero = torch.zeros((), dtype=torch.float64, device=targets.device)
    if logits is None:
        return zero, zero
    return (logits.detach().argmax(dim=1) == targets).sum().double(), zero + len(targets)


class TrainWindow:
    """The training metrics of the steps since the last training row, kept on the device: no host read per step.

    Args:
        device: The accelerator's device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        #: ``batch_totals`` summed over the steps taken (skipped steps are left out).
        self.totals = torch.zeros(6, device=device, dtype=torch.float64)
        #: ``(forwards, backwards)`` of every (micro-)batch, skipped steps included.
        self.passes: list[tuple[float, float]] = []
        # Callbacks' ctx.extras, per name: [sum over the window's steps (device tensor), number of steps].
        self._extras: dict[str, list] = {}

    @property
    def empty(self) -> bool:
        """Whether no step ran since the last row."""
        return not self.passes

    def add_passes(self, contexts: Iterable[StepContext]) -> None:
        """Count the forward and backward passes of a step's (micro-)batches."""
        self.passes.extend(ctx.passes() for ctx in contexts)

    def add_extras(self, extras: dict[str, Tensor | float]) -> None:
        """Add a step's ``ctx.extras`` (scalars) to the window; device tensors stay there, no host read."""
        for name, value in extras.items():
            if name in _TRAIN_ROW_KEYS:
                raise ValueError(f"ctx.extras[{name!r}] would overwrite the trainer's own {name!r}: rename it")
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    shape = list(value.shape)
                    raise ValueError(
                        f"ctx.extras[{name!r}] must be a scalar to be logged, got a tensor of shape {shape}"
                    )
                value = value.detach().reshape(()).to(self.device, torch.float64)
            elif not is_number(value):
                raise TypeError(f"ctx.extras[{name!r}] must be a number or a one-element tensor, got {value!r}")
            entry = self._extras.setdefault(name, [torch.zeros((), device=self.device, dtype=torch.float64), 0])
            entry[0] = entry[0] + value
            entry[1] += 1

    def pop_row(self, accelerator: Accelerator, lr: float, nonfinite_skipped: int | None) -> dict[str, float]:
        """The window's training row, reduced over the processes, and a fresh window; call it on every process.

        Args:
            accelerator: The run's accelerator.
            lr: The lr of the last step.
            nonfinite_skipped: Steps skipped so far for a NaN/inf loss or gradient; ``None``: not counted.
        """
        loss_sum, n, adv_ok, adv_n, clean_ok, clean_n = accelerator.reduce(self.totals, "sum").tolist()
        forwards, backwards = np.mean(self.passes, axis=0).tolist()
        row: dict[str, float] = {"loss": loss_sum / n} if n else {}  # no loss when every step was skipped
        row["lr"] = lr
        if adv_n:
            row["train_adv_acc"] = adv_ok / adv_n
        if clean_n:
            row["train_clean_acc"] = clean_ok / clean_n
        row |= {"forwards_per_step": forwards, "backwards_per_step": backwards}
        if nonfinite_skipped is not None:
            row["nonfinite_skipped"] = nonfinite_skipped
        if self._extras:
            # Every process runs the same callbacks, so the names agree; mean over steps and processes.
            names = sorted(self._extras)
            sums = accelerator.reduce(torch.stack([self._extras[k][0] for k in names]), "sum").tolist()
            for name, total in zip(names, sums, strict=True):
                row[name] = total / (self._extras[name][1] * accelerator.num_processes)
            self._extras.clear()
        self.totals.zero_()
        self.passes.clear()
        return row


class MetricsLog:
    """A run's ``metrics.jsonl`` (written by the main process) and the accelerator's trackers, with the run's clock.

    Every row holds ``step``, ``epoch``, the values logged and ``elapsed_s``: seconds of training, a resumed
    run's included.

    Args:
        accelerator: The run's accelerator (its trackers receive every row).
        path: The log file; ``None`` writes none.
    """

    def __init__(self, accelerator: Accelerator, path: Path | None) -> None:
        self.accelerator, self.path = accelerator, path
        #: Rows this run wrote (checkpointed: a resume truncates the log to it).
        self.rows = 0
        #: Seconds the run had trained before this fit (a resumed run's).
        self.elapsed_before = 0.0
        self._start = time.perf_counter()

    def start_clock(self) -> None:
        """Start counting this fit's seconds."""
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of training so far, a resumed run's earlier ones included."""
        return self.elapsed_before + time.perf_counter() - self._start

    def clear(self) -> None:
        """Start an empty log (a fresh run); call it on the main process."""
        if self.path is not None:
            atomic_write_text(self.path, "")

    def write(self, step: int, epoch: int, values: dict[str, Any]) -> None:
        """Write ``values`` as a row at ``step`` and ``epoch``; call it on every process."""
        row = {"step": step, "epoch": epoch, **values, "elapsed_s": round(self.elapsed(), 3)}
        if self.accelerator.log_with:
            self.accelerator.log(values, step=step)
        if self.path is not None and self.accelerator.is_main_process:
            with open(self.path, "a") as log:
                log.write(json.dumps(row) + "\n")
        self.rows += 1

    def truncate(self, step: int, rows: int | None) -> None:
        """Keep the rows written before a checkpoint: later ones belong to the run it replaces; call it on the main
        process of a run with a log.

        Args:
            step: The checkpoint's step: rows of later steps go (when ``rows`` is not known).
            rows: Rows the run had written when it saved the checkpoint: exactly those are kept (rows of the
                checkpoint's own step written after it, such as a final validation, go too).
        """
        self.rows = _truncate_log(self.path, step, rows)


def _truncate_log(path: Path, step: int, rows: int | None = None) -> int:
    """Keep the first ``rows`` rows of ``metrics.jsonl`` (``None``: those up to ``step``); returns how many."""
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        if rows is not None and len(kept) == rows:
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if rows is not None or row.get("step", math.inf) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
    return len(kept)
