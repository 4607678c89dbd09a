"""Input checks shared by every public entry point: fail before any work, naming the problem."""

from __future__ import annotations

import torch
from torch import Tensor


def check_batch(inputs: Tensor, targets: Tensor, num_classes: int, index: Tensor | None = None) -> None:
    """Check a batch of images and labels; one host synchronization for all value checks.

    Args:
        inputs: Images ``[B, ...]``, floating point, pixels in [0, 1].
        targets: Labels ``[B]``, integer, in ``[0, num_classes)``.
        num_classes: Number of classes of the model.
        index: Optional dataset indices ``[B]``, integer.

    Raises:
        TypeError: wrong dtype.
        ValueError: wrong shape, empty batch, non-finite pixels, pixels outside [0, 1] (a normalized
            batch passed by mistake), labels out of range.
    """
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor of pixels in [0, 1], got {_kind(inputs)}")
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of class indices [B], got {_kind(targets)}")
    if inputs.dim() < 2:
        raise ValueError(f"inputs must be a batch [B, ...] (e.g. [B, C, H, W]), got shape {list(inputs.shape)}")
    if inputs.shape[0] == 0:
        raise ValueError("empty batch: inputs has batch size 0")
    if targets.shape != (inputs.shape[0],):
        raise ValueError(f"targets must have shape [B] = [{inputs.shape[0]}], got {list(targets.shape)}")
    if targets.device != inputs.device:
        raise ValueError(f"inputs are on {inputs.device} but targets on {targets.device}")
    if index is not None and (
        not isinstance(index, Tensor) or index.is_floating_point() or index.shape != targets.shape
    ):
        raise ValueError(f"index must be an integer tensor [B] = [{inputs.shape[0]}], got {_kind(index)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")

    lo, hi = torch.aminmax(inputs.detach().float())
    values = torch.stack([lo, hi, targets.min().float(), targets.max().float()]).tolist()
    lo, hi, y_min, y_max = values
    if lo != lo or hi != hi or abs(lo) == float("inf") or abs(hi) == float("inf"):
        raise ValueError("inputs contain NaN or inf")
    if lo < 0 or hi > 1:
        raise ValueError(
            f"inputs must be pixels in [0, 1], found values in [{lo:.4g}, {hi:.4g}]; normalization belongs "
            "inside the model (robustmix.create_model does it), attacks work in pixel space"
        )
    if y_min < 0 or y_max >= num_classes:
        raise ValueError(f"targets must be in [0, {num_classes}), found values in [{int(y_min)}, {int(y_max)}]")


def _kind(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
