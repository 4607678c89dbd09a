"""Input checks shared by every public entry point: fail before any work, naming the problem."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustmix.checks import check_int, is_integer


def check_batch(
    inputs: Tensor, targets: Tensor, num_classes: int, index: Tensor | None = None
) -> tuple[int, int] | None:
    """Check a batch of images and labels; one host synchronization for all value checks.

    Args:
        inputs: Images ``[B, ...]``, floating point, pixels in [0, 1].
        targets: Labels ``[B]``, int64, in ``[0, num_classes)``.
        num_classes: Number of classes of the model.
        index: Optional dataset indices ``[B]``, integer, >= 0.

    Returns:
        ``(min, max)`` of ``index`` as Python ints, read in the same synchronization (callbacks with
            per-example state check their table size against it), or ``None`` without ``index``.

    Raises:
        TypeError: wrong dtype.
        ValueError: wrong shape, empty batch, non-finite pixels, pixels outside [0, 1] (a normalized
            batch passed by mistake), labels out of range, negative dataset indices.
    """
    _check_pixel_dtype(inputs)
    # int64 only: cross-entropy and one_hot reject the other integer types deep inside torch.
    if not isinstance(targets, Tensor) or targets.dtype != torch.int64:
        raise TypeError(
            f"targets must be an integer tensor of class indices [B] with dtype torch.int64 (convert with "
            f".long()), got {_kind(targets)}"
        )
    if inputs.dim() < 2:
        raise ValueError(f"inputs must be a batch [B, ...] (e.g. [B, C, H, W]), got shape {list(inputs.shape)}")
    if inputs.shape[0] == 0:
        raise ValueError("empty batch: inputs has batch size 0")
    if targets.shape != (inputs.shape[0],):
        raise ValueError(f"targets must have shape [B] = [{inputs.shape[0]}], got {list(targets.shape)}")
    if targets.device != inputs.device:
        raise ValueError(f"inputs are on {inputs.device} but targets on {targets.device}")
    if index is not None and (
        not isinstance(index, Tensor)
        or index.is_floating_point()
        or index.is_complex()
        or index.dtype == torch.bool
        or index.shape != targets.shape
    ):
        raise ValueError(f"index must be an integer tensor [B] = [{inputs.shape[0]}], got {_kind(index)}")
    if index is not None and index.device != inputs.device:
        raise ValueError(f"inputs are on {inputs.device} but index on {index.device}")
    check_int("num_classes", num_classes, 2)

    lo, hi = torch.aminmax(inputs.detach().float())
    stats = [lo, hi, targets.min().float(), targets.max().float()]
    if index is not None:
        # float64 is exact for any dataset index below 2**53 (MPS has no float64: exact below 2**24).
        wide = torch.float32 if index.device.type == "mps" else torch.float64
        stats = [s.to(wide) for s in (*stats, index.min(), index.max())]
    # One read for every value check: on CUDA each read is a synchronization.
    lo, hi, y_min, y_max, *index_range = torch.stack(stats).tolist()
    if lo != lo or hi != hi or abs(lo) == float("inf") or abs(hi) == float("inf"):
        raise ValueError("inputs contain NaN or inf")
    if lo < 0 or hi > 1:
        raise ValueError(
            f"inputs must be pixels in [0, 1], found values in [{lo:.4g}, {hi:.4g}]; normalization belongs "
            "inside the model (robustmix.create_model does it), attacks work in pixel space"
        )
    if y_min < 0 or y_max >= num_classes:
        raise ValueError(f"targets must be in [0, {num_classes}), found values in [{int(y_min)}, {int(y_max)}]")
    if index_range and index_range[0] < 0:
        raise ValueError(f"index must hold dataset indices >= 0, found {int(index_range[0])}")
    return (int(index_range[0]), int(index_range[1])) if index_range else None


def check_model_input(model: nn.Module, inputs: Tensor, num_classes: int | None = None) -> None:
    """Check a batch against what the model declares; attribute reads only, no host synchronization.

    Args:
        model: The (unwrapped) model the batch goes through.
        inputs: Images ``[B, ...]``.
        num_classes: Number of classes the caller was configured with, if any.

    Raises:
        TypeError: ``inputs`` have another floating-point dtype than the model's parameters (torch would
            fail deep in the first layer, or silently compute in another precision).
        ValueError: ``num_classes`` differs from ``model.num_classes``; the batch is not ``[B, C, H, W]``
            with ``C = model.in_chans`` (models from ``robustmix.create_model`` declare both); the batch is on
            another device than the model.
    """
    _check_pixel_dtype(inputs)
    declared = getattr(model, "num_classes", None)
    if num_classes is not None and is_integer(declared) and declared != num_classes:
        raise ValueError(
            f"num_classes is {num_classes} but the model has {declared} outputs (model.num_classes); "
            "build the model and the step for the same classes"
        )
    in_chans = getattr(model, "in_chans", None)
    if is_integer(in_chans) and (inputs.dim() != 4 or inputs.shape[1] != in_chans):
        raise ValueError(
            f"inputs must be images [B, {in_chans}, H, W] for this model (model.in_chans = {in_chans}), "
            f"got shape {list(inputs.shape)}"
        )
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    if parameter is not None and inputs.device != parameter.device:
        raise ValueError(f"inputs are on {inputs.device} but the model on {parameter.device}: move the batch")
    if parameter is not None and inputs.dtype != parameter.dtype:
        raise TypeError(
            f"inputs are {inputs.dtype} but the model's parameters are {parameter.dtype}: convert the batch "
            f"with .to({parameter.dtype}) (mixed precision autocasts float32 inputs by itself)"
        )


def check_step_position(**values: Any) -> None:
    """``epoch`` and ``step`` (integers >= 0) and ``total_epochs`` / ``total_steps`` (None or integers >= 1)."""
    for name, value in values.items():
        total = name.startswith("total_")
        check_int(name, value, 1 if total else 0, optional=total)


def _check_pixel_dtype(inputs: object) -> None:
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor of pixels in [0, 1], got {_kind(inputs)}")


def _kind(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
