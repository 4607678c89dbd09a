"""The presets of the recipes' command line: the flag values each one sets, and how they fill the flags a user left
unset (command line over ``--config`` file over preset over the recipe's own defaults)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

#: Flag values each preset sets; flags given on the command line override them.
PRESETS: dict[str, dict[str, Any]] = {
    # The default: a run on the embedded digits (1-channel 32x32) on a 2-core CPU in minutes.
    # eps 0.1 is a third of MNIST's customary 0.3: upsampled 8x8 digits are blurrier and much smaller
    # (1,257 training images), and 0.1 keeps PGD-20 accuracy well above chance in a short run.
    "digits": {
        "dataset": "digits",
        "model": "test_resnet",
        "cifar_stem": False,
        "eps": 0.1,
        "step_size": 0.04,
        "attack_steps": 5,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "batch_size": 128,
        "epochs": 10,
        "schedule": "warmup-cosine",
        "milestones": [],
        "augment": False,
        # Intra-op CPU threads. Convolutions this small gain little from a second thread, and where the cores
        # are shared two threads spin-wait: measured 2:52 (1 thread) vs 13:33 (2 threads) for the default run
        # on a busy 2-core machine.
        "threads": 1,
        "train_size": None,
        "eval_every": 1,
    },
    # The benchmark with statistical power: Fashion-MNIST (28x28 grey, 10,000 test images), eps 0.1 L-inf (the
    # budget of Fashion-MNIST AT papers), PGD-5 at eps/4, the digits model and optimizer; the training budget
    # fits one PGD-AT run (training, validation and test evaluation) in 15 minutes on one CPU core.
    "fashion-mnist": {
        "dataset": "fashion-mnist",
        "model": "test_resnet",
        "cifar_stem": False,
        "eps": 0.1,
        "step_size": 0.025,
        "attack_steps": 5,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "batch_size": 128,
        "epochs": 6,
        "schedule": "warmup-cosine",
        "milestones": [],
        "augment": False,
        "threads": 1,
        "train_size": None,
        # Validating 5,000 images with PGD-20 costs about a third of an epoch: only after the last step.
        "eval_every": 6,
    },
    # The standard CIFAR-10 protocol (Bag of Tricks schedule): ResNet-18 with a CIFAR stem, eps 8/255,
    # step 2/255, 10 steps, SGD 0.1 momentum 0.9 wd 5e-4, batch 128, 110 epochs, lr x0.1 at 100 and 105.
    "cifar10-resnet18": {
        "dataset": "cifar10",
        "model": "resnet18",
        "cifar_stem": True,
        "eps": 8 / 255,
        "step_size": 2 / 255,
        "attack_steps": 10,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "batch_size": 128,
        "epochs": 110,
        "schedule": "multistep",
        "milestones": [100, 105],
        "augment": True,
        "threads": 0,
        "train_size": None,
        "eval_every": 1,
    },
}
#: The CIFAR-10 preset that each recipe overrides with its release's own training settings (the recipe
#: module's ``PAPER``, passed to ``parse_args``); ResNet-18 with a CIFAR stem stays the model.
PAPER_PRESET = "cifar10-paper"
PRESETS[PAPER_PRESET] = dict(PRESETS["cifar10-resnet18"])


def preset_values(name: str, paper: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flag values of preset ``name``; for ``PAPER_PRESET`` the recipe's release settings ``paper`` over it.

    Raises:
        ValueError: ``PAPER_PRESET`` for a recipe with no release settings (``paper`` is ``None``).
    """
    if name == PAPER_PRESET:
        if paper is None:
            raise ValueError(f"{PAPER_PRESET} needs the recipe's release settings")
        return {**PRESETS[name], **paper}
    return PRESETS[name]


def fill_unset(
    args: argparse.Namespace,
    preset: dict[str, Any],
    recipe_defaults: dict[str, Any | Callable[[argparse.Namespace], Any]] | None = None,
) -> None:
    """Set the flags of ``args`` left unset (``None``) to the ``preset``'s values, then to ``recipe_defaults``.

    A preset's attack step is a fraction of its eps: when only ``--eps`` was given, the step keeps the fraction.

    Args:
        args: Parsed flags, changed in place.
        preset: From ``preset_values``.
        recipe_defaults: Values the recipe uses instead of the preset's; a callable receives ``args`` after the
            preset filled them in (e.g. FGSM-RS's step ``1.25 * eps``).
    """
    unset = {key for key, value in vars(args).items() if value is None}
    for key, value in preset.items():
        if key in unset:
            setattr(args, key, value)
    if "step_size" in unset and "eps" not in unset and preset["eps"] > 0:
        # A preset's step is a fraction of its eps (digits 0.4, CIFAR-10 0.25): keep the fraction when only eps
        # changes, so --eps 8/255 never leaves a step larger than the new eps.
        args.step_size = preset["step_size"] * args.eps / preset["eps"]
    for key, value in (recipe_defaults or {}).items():
        if key in unset:
            setattr(args, key, value(args) if callable(value) else value)


def preset_help(key: str) -> str:
    """What each preset sets flag ``key`` to, for ``--help``: ``presets: digits 0.1, fashion-mnist 0.1, ...``."""
    return "presets: " + ", ".join(
        f"{preset} {_preset_value(values[key])}" for preset, values in PRESETS.items() if preset != PAPER_PRESET
    )


def _preset_value(value: Any) -> str:
    """A preset's value as --help shows it: 8/255 as 0.03137, lists spaced, unset as 'all' or 'none'."""
    if value is None:
        return "all"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)
