import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from robustmix.models import NormalizedModel, build_from_config, create_model, model_config, unwrap_model

NUM_CLASSES = 7

# One entry per family: (name, create_model kwargs). Every model takes 32x32 inputs.
FAMILIES = {
    "resnet18": ("resnet18", {}),
    "resnet18-cifar": ("resnet18", {"cifar_stem": True}),
    "deep-stem-resnet-cifar": ("test_resnet", {"cifar_stem": True}),
    "vit": ("test_vit", {"img_size": 32, "patch_size": 4}),
    "convnext": ("test_convnext", {}),
    "efficientnet": ("test_efficientnet", {}),
}


def _build(family: str, in_chans: int = 3, **kwargs) -> NormalizedModel:
    name, family_kwargs = FAMILIES[family]
    torch.manual_seed(0)
    return create_model(name, NUM_CLASSES, in_chans=in_chans, **family_kwargs, **kwargs).eval()


def _stem_conv(model: NormalizedModel) -> nn.Conv2d:
    conv1 = model.net.conv1
    return conv1[0] if isinstance(conv1, nn.Sequential) else conv1


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_shape_and_normalization_inside(family: str, in_chans: int) -> None:
    model = _build(family, in_chans)
    x = torch.rand(2, in_chans, 32, 32)
    mean = torch.tensor(model.robustmix_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(model.robustmix_config["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model(x)
        expected = model.net((x - mean) / std)
        unnormalized = model.net(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert (model.num_classes, model.in_chans) == (NUM_CLASSES, in_chans)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, unnormalized)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_reach_the_input(family: str) -> None:
    model = _build(family, in_chans=1)
    x = torch.rand(2, 1, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).logsumexp(dim=1).sum(), x)
    assert grad.shape == x.shape
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_default_mean_std_come_from_pretrained_cfg() -> None:
    rgb = create_model("test_efficientnet", NUM_CLASSES)
    cfg_mean, cfg_std = rgb.net.pretrained_cfg["mean"], rgb.net.pretrained_cfg["std"]
    assert rgb.robustmix_config["mean"] == pytest.approx(cfg_mean)
    assert rgb.robustmix_config["std"] == pytest.approx(cfg_std)
    torch.testing.assert_close(rgb.mean, torch.tensor(cfg_mean).view(1, 3, 1, 1))

    # Other channel counts get the channel average, repeated.
    gray = create_model("test_efficientnet", NUM_CLASSES, in_chans=2)
    assert gray.robustmix_config["mean"] == pytest.approx([sum(cfg_mean) / 3] * 2)
    assert gray.robustmix_config["std"] == pytest.approx([sum(cfg_std) / 3] * 2)
    assert gray.mean.shape == gray.std.shape == (1, 2, 1, 1)


def test_explicit_mean_std_are_used() -> None:
    model = create_model("test_resnet", NUM_CLASSES, in_chans=1, mean=[0.1], std=[0.3]).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - 0.1) / 0.3))


# resnet18 has a single 7x7 stem conv, test_resnet a "deep" stem of three 3x3 convs.
@pytest.mark.parametrize("name", ["resnet18", "test_resnet"])
def test_cifar_stem_keeps_resolution_through_the_stem(name: str) -> None:
    plain = create_model(name, NUM_CLASSES)
    cifar = create_model(name, NUM_CLASSES, cifar_stem=True)
    conv, plain_conv = _stem_conv(cifar), _stem_conv(plain)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert (conv.in_channels, conv.out_channels) == (plain_conv.in_channels, plain_conv.out_channels)
    assert isinstance(cifar.net.maxpool, nn.Identity)

    def stem_output_size(model: NormalizedModel) -> tuple[int, int]:
        sizes = []
        handle = model.net.maxpool.register_forward_hook(lambda mod, inp, out: sizes.append(out.shape[-2:]))
        with torch.no_grad():
            model.eval()(torch.rand(1, 3, 32, 32))
        handle.remove()
        return tuple(sizes[0])

    assert stem_output_size(cifar) == (32, 32)
    assert stem_output_size(plain) == (8, 8)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {"in_chans": 1, "cifar_stem": True, "mean": [0.2], "std": [0.4]}),
        ("vit_tiny_patch16_224", {"img_size": (32, 32), "patch_size": 4, "depth": 2}),
    ],
)
def test_config_round_trip_gives_identical_logits(name: str, kwargs: dict) -> None:
    original = create_model(name, NUM_CLASSES, **kwargs).eval()
    config = json.loads(json.dumps(model_config(original)))
    assert config["name"] == name
    assert config["num_classes"] == NUM_CLASSES
    rebuilt = build_from_config(config).eval()
    rebuilt.load_state_dict(original.state_dict())
    assert model_config(rebuilt) == config
    x = torch.rand(2, original.in_chans, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original(x))


def test_model_config_sees_through_wrappers() -> None:
    model = create_model("test_resnet", NUM_CLASSES, in_chans=1)
    config = model_config(model)
    assert model_config(nn.DataParallel(model)) == config
    assert model_config(torch.compile(model)) == config


def test_hand_wrapped_model_checks_mean_std() -> None:
    with pytest.raises(ValueError, match="std needs in_chans=1 values, got 2"):
        NormalizedModel(nn.Flatten(), NUM_CLASSES, mean=[0.5], std=[0.5, 0.5])


def test_model_config_needs_a_create_model_model() -> None:
    hand_wrapped = NormalizedModel(nn.Flatten(), NUM_CLASSES, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="create_model"):
        model_config(hand_wrapped)


def test_model_config_rejects_unserializable_timm_kwargs() -> None:
    model = create_model("test_resnet", NUM_CLASSES, act_layer=nn.SiLU)
    with pytest.raises(ValueError, match="JSON-serializable"):
        model_config(model)


def test_build_from_config_rejects_missing_keys() -> None:
    config = model_config(create_model("test_resnet", NUM_CLASSES))
    del config["std"]
    with pytest.raises(ValueError, match="std"):
        build_from_config(config)


def test_unwrap_model_strips_data_parallel_but_keeps_compile() -> None:
    model = create_model("test_resnet", NUM_CLASSES)
    assert unwrap_model(nn.DataParallel(nn.DataParallel(model))) is model
    assert unwrap_model(model) is model
    compiled = torch.compile(model)
    assert unwrap_model(nn.DataParallel(compiled)) is compiled


def test_unwrap_model_strips_distributed_data_parallel(tmp_path: Path) -> None:
    model = create_model("test_resnet", NUM_CLASSES)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert unwrap_model(nn.parallel.DistributedDataParallel(model)) is model
    finally:
        dist.destroy_process_group()


def test_autocast_and_channels_last() -> None:
    model = create_model("test_resnet", NUM_CLASSES, cifar_stem=True).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_precision = model(x)
        model.to(memory_format=torch.channels_last)
        channels_last = model(x.contiguous(memory_format=torch.channels_last))
    assert low_precision.dtype == torch.bfloat16
    torch.testing.assert_close(low_precision.float(), reference, atol=0.1, rtol=0.1)
    torch.testing.assert_close(channels_last, reference, atol=1e-4, rtol=1e-4)


def test_torch_compile_traces_without_graph_breaks() -> None:
    model = create_model("test_resnet", NUM_CLASSES, cifar_stem=True).eval()
    # aot_eager checks that dynamo traces forward and backward as one graph, without paying for inductor codegen.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    logits = compiled(x)
    (grad,) = torch.autograd.grad(logits.sum(), x)
    torch.testing.assert_close(logits, model(x))
    assert grad.abs().sum() > 0


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=r"'resnet_nope'.*timm\.list_models\('\*resnet\*'\)"):
        create_model("resnet_nope", NUM_CLASSES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean": [0.5, 0.5], "std": [0.5, 0.5, 0.5]}, "mean needs in_chans=3 values, got 2"),
        ({"std": [0.5]}, "std needs in_chans=3 values, got 1"),
        ({"std": [0.5, 0.0, 0.5]}, "std must be > 0 in every channel"),
        ({"std": [0.5, -0.2, 0.5]}, "std must be > 0 in every channel"),
        ({"mean": [0.5, float("nan"), 0.5]}, "mean must be finite"),
    ],
)
def test_bad_mean_std(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("test_resnet", NUM_CLASSES, **kwargs)


def test_cifar_stem_on_a_vit_names_the_supported_models() -> None:
    with pytest.raises(ValueError, match=r"cifar_stem supports timm ResNet-family models.*'test_vit'"):
        create_model("test_vit", NUM_CLASSES, cifar_stem=True)
