"""Model factory: any timm classifier behind a normalize-inside wrapper, with an optional CIFAR stem.

Attacks perturb pixels in [0, 1] and measure eps in pixel units, so the per-channel normalization a network
expects lives inside the model (`NormalizedModel`), where it is part of the differentiable forward.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from robustmix.checks import is_integer

_CONFIG_KEYS = ("name", "num_classes", "in_chans", "cifar_stem", "mean", "std", "timm_kwargs")


class NormalizedModel(nn.Module):
    """A classifier that takes pixels in [0, 1] and normalizes them before its network.

    Args:
        net: Classifier mapping normalized images [B, C, H, W] to logits [B, num_classes].
        num_classes: Number of output logits.
        mean: Per-channel mean in pixel units, length C.
        std: Per-channel standard deviation in pixel units, length C, all > 0.

    Attributes:
        net: The wrapped classifier.
        num_classes: Number of output logits.
        in_chans: Number of input channels C.
        mean: Buffer [1, C, 1, 1].
        std: Buffer [1, C, 1, 1].
        robustmix_config: What `create_model` needs to rebuild this model (see `model_config`); None when the
            model was wrapped by hand. Not named `config`: Hugging Face's `Trainer` reads `model.config` as a
            transformers `PretrainedConfig`.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        _check_stats("mean", mean, len(mean))
        _check_stats("std", std, len(mean))
        self.net = net
        self.num_classes = num_classes
        self.in_chans = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.robustmix_config: dict[str, Any] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images.

        Args:
            x: Images [B, C, H, W], pixels in [0, 1].

        Returns:
            Logits [B, num_classes].
        """
        return self.net((x - self.mean) / self.std)


def create_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    pretrained: bool = False,
    cifar_stem: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **timm_kwargs: Any,
) -> NormalizedModel:
    """Build any timm classifier wrapped in a `NormalizedModel`.

    Args:
        name: timm model name, e.g. "resnet18" or "vit_tiny_patch16_224".
        num_classes: Number of output logits.
        in_chans: Number of input channels C.
        pretrained: Load timm's pretrained weights (downloads them unless cached).
        cifar_stem: Swap a ResNet's stem for the CIFAR one of the adversarial-training literature: the first
            stem conv becomes a freshly initialized 3x3 stride-1 conv and the max-pool is removed, so 32x32
            inputs keep their resolution through the stem.
        mean: Per-channel mean in pixel units, length in_chans. Defaults to the model's pretrained_cfg mean,
            averaged over channels and repeated when in_chans differs from the cfg's channel count.
        std: Per-channel standard deviation in pixel units, length in_chans, all > 0. Default as for mean.
        **timm_kwargs: Passed on to `timm.create_model`, e.g. img_size=32, patch_size=4 for a ViT.

    Returns:
        Model mapping pixels [B, in_chans, H, W] in [0, 1] to logits [B, num_classes].

    Raises:
        ValueError: Unknown model name, mean/std of the wrong length or std <= 0, or cifar_stem on a
            model without a ResNet stem.
    """
    if not timm.is_model(name):
        raise ValueError(_unknown_model_message(name))
    for label, values in (("mean", mean), ("std", std)):
        if values is not None:
            _check_stats(label, values, in_chans)
    net = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    if cifar_stem:
        _replace_with_cifar_stem(net, name)
    mean = tuple(mean) if mean is not None else _default_stats(net.pretrained_cfg["mean"], in_chans)
    std = tuple(std) if std is not None else _default_stats(net.pretrained_cfg["std"], in_chans)
    model = NormalizedModel(net, num_classes, mean, std)
    model.robustmix_config = {
        "name": name,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "cifar_stem": cifar_stem,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "timm_kwargs": dict(timm_kwargs),
    }
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """Return what `build_from_config` needs to rebuild a model made by `create_model`.

    Args:
        model: A model from `create_model`, possibly wrapped by DDP, DataParallel or torch.compile.

    Returns:
        JSON-serializable dict with keys name, num_classes, in_chans, cifar_stem, mean, std, timm_kwargs.

    Raises:
        ValueError: The model was not built by `create_model`, or its timm_kwargs are not JSON-serializable.
    """
    config = getattr(unwrap_model(model), "robustmix_config", None)
    if config is None:
        raise ValueError("model_config needs a model built by robustmix.models.create_model")
    try:
        # The JSON round trip copies the config and turns tuples into lists, as a saved config would be read back.
        return json.loads(json.dumps(config))
    except TypeError as err:
        raise ValueError(f"timm_kwargs must be JSON-serializable to save the model config: {err}") from err


def build_from_config(config: dict[str, Any]) -> NormalizedModel:
    """Rebuild a model from `model_config`, with fresh (never pretrained) weights; load a state_dict next.

    Args:
        config: Dict from `model_config`.

    Returns:
        The rebuilt model.

    Raises:
        ValueError: Keys missing from or unknown to the config, or a value of the wrong type (see
            `check_model_config`).
    """
    check_model_config(config)
    return create_model(
        config["name"],
        config["num_classes"],
        in_chans=config["in_chans"],
        cifar_stem=config["cifar_stem"],
        mean=config["mean"],
        std=config["std"],
        **config["timm_kwargs"],
    )


def check_model_config(config: Any) -> None:
    """Check a config from `model_config` (e.g. read back from a run's config.json) without building the model.

    Raises:
        ValueError: Not a dict with exactly the keys of `model_config`; an unknown timm model name; a value of the
            wrong type or out of range (num_classes >= 2 and in_chans >= 1 integers, cifar_stem a bool, mean and
            std lists of in_chans numbers, timm_kwargs a dict with string keys).
    """
    if not isinstance(config, dict) or set(config) != set(_CONFIG_KEYS):
        keys = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"model config needs exactly the keys {list(_CONFIG_KEYS)}, got {keys}")
    name = config["name"]
    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f"model config: 'name' must be a timm model name, got {name!r}")
    for key, minimum in (("num_classes", 2), ("in_chans", 1)):
        value = config[key]
        if not is_integer(value) or value < minimum:
            raise ValueError(f"model config: {key!r} must be an integer >= {minimum}, got {value!r}")
    if not isinstance(config["cifar_stem"], bool):
        raise ValueError(f"model config: 'cifar_stem' must be true or false, got {config['cifar_stem']!r}")
    for key in ("mean", "std"):
        values = config[key]
        if (
            not isinstance(values, (list, tuple))
            or len(values) != config["in_chans"]
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ):
            raise ValueError(f"model config: {key!r} must be a list of {config['in_chans']} numbers, got {values!r}")
    kwargs = config["timm_kwargs"]
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"model config: 'timm_kwargs' must be a dict of keyword arguments, got {kwargs!r}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel wrappers, keeping a torch.compile wrapper.

    Attack forwards go through the unwrapped model so they trigger no DDP collectives.

    Args:
        model: A model, possibly wrapped.

    Returns:
        The innermost module below any DDP / DataParallel wrappers.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _unknown_model_message(name: str) -> str:
    stem = re.match(r"[a-z]*", name.lower()).group() or name
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return f"Unknown timm model {name!r}; list the available ones with timm.list_models('*{stem}*').{hint}"


def _check_stats(label: str, values: Sequence[float], in_chans: int) -> None:
    if len(values) != in_chans:
        raise ValueError(f"{label} needs in_chans={in_chans} values, got {len(values)}: {tuple(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{label} must be finite, got {tuple(values)}")
    if label == "std" and not all(v > 0 for v in values):
        raise ValueError(f"std must be > 0 in every channel, got {tuple(values)}")


def _default_stats(cfg_values: Sequence[float], in_chans: int) -> tuple[float, ...]:
    if len(cfg_values) == in_chans:
        return tuple(float(v) for v in cfg_values)
    return (sum(cfg_values) / len(cfg_values),) * in_chans


def _replace_with_cifar_stem(net: nn.Module, name: str) -> None:
    conv1 = getattr(net, "conv1", None)
    # timm ResNets have either a single 7x7 stride-2 conv1 or a "deep" stem whose first conv has stride 2.
    deep_stem = isinstance(conv1, nn.Sequential) and len(conv1) > 0 and isinstance(conv1[0], nn.Conv2d)
    if not (isinstance(conv1, nn.Conv2d) or deep_stem) or not hasattr(net, "maxpool"):
        raise ValueError(
            f"cifar_stem supports timm ResNet-family models (a conv1 stem and a maxpool, e.g. resnet18, "
            f"resnet10t, wide_resnet50_2, seresnet18); {name!r} has no such stem"
        )
    old = conv1[0] if deep_stem else conv1
    new = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    # Same init as timm's ResNet gives its convs.
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    if deep_stem:
        conv1[0] = new
    else:
        net.conv1 = new
    net.maxpool = nn.Identity()
