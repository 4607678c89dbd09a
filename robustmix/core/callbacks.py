"""The callback base class and the composition check.

A callback does one job in a step (its ``Callback.stage``): it reads some context fields and
writes others, and says which in ``Callback.reads`` / ``Callback.writes``. It may also
react to trainer events (``on_epoch_start``...) and carry state across steps
(``state_dict`` / ``load_state_dict``, saved with checkpoints as safetensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from robustmix.core.context import FIELDS, INPUT_FIELDS, MULTI_WRITER_FIELDS, Stage, StepContext

if TYPE_CHECKING:
    from torch.optim import Optimizer

#: What to add when a field is missing, for the composition error message.
_PROVIDERS = {
    "x_adv": "an attack generator (e.g. PGDAttack)",
    "x_anti": "an anti-adversary generator (e.g. AdversarysAdversary or AntiAdversary)",
    "eps": "an attack generator with a scalar eps, or a budget callback",
    "kappa": "PGDAttack(track_kappa=True)",
    "aa_steps": "AdversarysAdversary(until_recovered=True)",
    "margin": "a margin estimator (e.g. ProbabilityMargin)",
    "margin_vector": "MultiClassMargin",
    "soft_targets": "a label refiner (e.g. OneHotLabels)",
    "weights": "a loss reweighter",
    "index": "dataset indices: pass `index=` to the step",
}

#: Fields every step has before any callback runs.
_ALWAYS_AVAILABLE = frozenset({"inputs", "targets", "logits_clean", "eval_logits_clean"})


class CompositionError(ValueError):
    """The callbacks given to a step cannot run together (a missing or doubly written field)."""


class Callback:
    """Base class: every hook is a no-op, there is no state.

    Subclasses set ``stage`` when they do per-step work in ``__call__``, and declare
    the fields they read and write. ``optional_reads`` are used when present (e.g. a loss uses
    ``weights`` if a reweighter wrote them) and fix the order check without being required.
    ``detached_reads`` names the ``logits_<input>`` fields among the reads that the callback only
    reads detached: when no other callback of the step needs their gradient, the step runs that
    training forward under ``no_grad`` and keeps no autograd graph for it.
    ``accumulates`` says whether the callback can run on the micro-batches of one optimizer step
    (gradient accumulation); it cannot when it acts on the weights once per optimizer step, with the
    step's whole batch (AWP's perturbation, a meta-learned lookahead).
    """

    stage: Stage | None = None
    accumulates: bool = True
    reads: tuple[str, ...] = ()
    optional_reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    detached_reads: tuple[str, ...] = ()

    def __call__(self, ctx: StepContext) -> None:
        """Do this callback's work on the step's context."""

    # Trainer events. ``trainer`` is robustmix's Trainer, or ``None`` in a user's own loop.
    def on_fit_start(self, trainer: Any) -> None:
        """Once, before the first step (also after a resume): allocate state that needs the data or model."""

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        """Before the first step of ``epoch`` (0-based): epoch-level schedules change here."""

    def on_batch_start(self, trainer: Any, batch: dict[str, Tensor]) -> None:
        """Before the step runs on ``batch`` (``{"image", "label", "index"}``)."""

    def on_before_backward(self, ctx: StepContext) -> None:
        """After the loss is computed, before ``backward``; fired by the step itself."""

    def on_before_optimizer_step(self, trainer: Any, optimizer: Optimizer) -> None:
        """After ``backward`` (and gradient clipping), before ``optimizer.step()``."""

    def on_after_optimizer_step(self, trainer: Any, optimizer: Optimizer) -> None:
        """After ``optimizer.step()``, also when the fp16 scaler skipped it (AWP removes its perturbation here)."""

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        """After the last step of ``epoch`` and its validation (when one is due), before its checkpoint."""

    def on_evaluate(self, trainer: Any, metrics: dict[str, float]) -> None:
        """After a validation pass, with its metrics (clean and PGD accuracy)."""

    def on_save_checkpoint(self, trainer: Any, directory: str) -> None:
        """Before ``state_dict`` is saved into the checkpoint ``directory``: sync state across ranks here."""

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values to save with a checkpoint (tensors go to safetensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _name(callback: Callback) -> str:
    return type(callback).__name__


def check_composition(callbacks: Sequence[Callback], *, has_index: bool | None = None) -> list[Callback]:
    """Order callbacks by stage and check that every read field is written earlier, exactly once.

    Args:
        callbacks: The callbacks of one step.
        has_index: Whether the step will receive dataset indices; ``None`` when unknown (the
            check of ``index`` is then left to the step call).

    Returns:
        The callbacks with a stage, sorted by stage (stable: equal stages keep their order).

    Raises:
        CompositionError: naming the callback and the missing, unknown or doubly written field.
    """
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise CompositionError(f"{callback!r} is not a robustmix Callback")
        for field in (*callback.reads, *callback.optional_reads, *callback.writes):
            if field not in FIELDS:
                raise CompositionError(
                    f"{_name(callback)} declares unknown field `{field}`; known: {', '.join(FIELDS)}"
                )
        for field in callback.detached_reads:
            if not field.startswith("logits_") or field not in (*callback.reads, *callback.optional_reads):
                raise CompositionError(
                    f"{_name(callback)} declares `{field}` in detached_reads; it must be a `logits_<input>` field"
                    " it reads"
                )
        if callback.stage is None and (callback.reads or callback.writes):
            raise CompositionError(f"{_name(callback)} reads or writes fields but has no stage")

    staged = sorted((c for c in callbacks if c.stage is not None), key=lambda c: c.stage)
    available = set(_ALWAYS_AVAILABLE)
    if has_index:
        available.add("index")
    writer: dict[str, Callback] = {}
    for callback in staged:
        for field in callback.reads:
            if field == "index" and has_index is None:
                continue
            if field not in available:
                provider = _PROVIDERS.get(_base_field(field), f"a callback that writes `{_base_field(field)}`")
                raise CompositionError(f"{_name(callback)} needs `{field}`; add {provider} before it")
        for field in callback.writes:
            if field in writer and field not in MULTI_WRITER_FIELDS:
                raise CompositionError(f"`{field}` is written by both {_name(writer[field])} and {_name(callback)}")
            writer.setdefault(field, callback)
        for field in callback.writes:
            available.add(field)
            if field in INPUT_FIELDS.values():
                name = next(k for k, v in INPUT_FIELDS.items() if v == field)
                available.update({f"logits_{name}", f"eval_logits_{name}"})
    if "loss" not in writer:
        raise CompositionError("no callback writes `loss`; add a loss such as AdversarialCE")
    return staged


def _base_field(field: str) -> str:
    """``logits_adv`` -> ``x_adv``: the field an input's logits depend on."""
    for prefix in ("eval_logits_", "logits_"):
        if field.startswith(prefix):
            return INPUT_FIELDS.get(field[len(prefix) :], field)
    return field
