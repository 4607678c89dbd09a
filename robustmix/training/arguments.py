"""The ``Trainer``'s checks of the objects it is given: their types, and model, step and data agreeing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustmix.checks import is_integer, is_number
from robustmix.core.step import AdversarialStep
from robustmix.models import unwrap_model


def check_trainer_arguments(
    model: Any,
    step: Any,
    optimizer: Any,
    train_data: Any,
    val_data: Any,
    *,
    output_dir: Any = None,
    eval_eps: Any = None,
    grad_clip: Any = None,
) -> None:
    """The checks of ``Trainer`` that read its objects: types, and model, step and data agreeing on the classes.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: the model's classes or input channels differ from the step's or the data's; the optimizer
            holds none of the model's parameters; ``val_data`` is empty; ``output_dir`` is a file.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(step, AdversarialStep):
        raise TypeError(f"step must be a robustmix.AdversarialStep, got {type(step).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    for name, value in (("eval_eps", eval_eps), ("grad_clip", grad_clip)):
        if value is not None and not is_number(value):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")

    inner = unwrap_model(model)
    ids = {id(p) for p in inner.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if held and not any(id(p) in ids for p in held):
        raise ValueError("the optimizer holds none of the model's parameters: build it over model.parameters()")

    model_classes = getattr(inner, "num_classes", None)
    if step.num_classes is not None and is_integer(model_classes) and step.num_classes != model_classes:
        raise ValueError(f"the step was built with num_classes={step.num_classes} but the model has {model_classes}")
    classes = step.num_classes if step.num_classes is not None else model_classes
    in_chans = getattr(inner, "in_chans", None)
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if data is None:
            continue
        data_classes = getattr(data, "num_classes", None)
        if is_integer(classes) and is_integer(data_classes) and data_classes != classes:
            raise ValueError(
                f"{name} has {data_classes} classes but the model has {classes} outputs; build the model with "
                f"num_classes={data_classes}"
            )
        shape = getattr(data, "image_shape", None)
        if is_integer(in_chans) and isinstance(shape, tuple) and shape and shape[0] != in_chans:
            raise ValueError(f"{name} has {shape[0]}-channel images but the model takes in_chans={in_chans}")
    if val_data is not None and (not hasattr(val_data, "__len__") or len(val_data) == 0):
        raise ValueError("val_data must be a non-empty map-style dataset, or None to skip validation")
    if output_dir is not None:
        if not isinstance(output_dir, (str, Path)):
            raise TypeError(f"output_dir must be a path, got {type(output_dir).__name__}")
        if Path(output_dir).exists() and not Path(output_dir).is_dir():
            raise ValueError(f"output_dir {output_dir} exists and is not a folder")
