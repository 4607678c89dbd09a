"""robustmix inside loops it does not own: plain PyTorch and a user's Accelerate loop."""

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from robustmix.data import load_dataset
from robustmix.models import create_model
from tests.conftest import launch_two_processes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["plain_pytorch", "accelerate_loop"])
def test_examples_add_at_most_five_lines(name):
    marked = [line for line in (EXAMPLES / f"{name}.py").read_text().splitlines() if "  # robustmix" in line]
    assert 1 <= len(marked) <= 5


def _digits_subset(n: int = 256):
    images, labels = load_dataset("digits", "train").tensors()
    return images[:n], labels[:n]


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def test_plain_pytorch_loop_trains_a_timm_model_on_digits():
    torch.manual_seed(0)
    images, labels = _digits_subset(128)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=32, shuffle=True)
    # timm's smallest ResNet keeps this test to seconds; any timm model name works the same way.
    model = create_model("test_resnet", num_classes=10, in_chans=1, mean=(0.5,), std=(0.5,))
    before = _accuracy(model, images, labels)
    losses = _load("plain_pytorch").train(model, loader, epochs=5, attack_steps=2)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert before < 0.2 and _accuracy(model, images, labels) > 0.35  # chance is 0.1


def test_accelerate_loop_in_process():
    model = _load("accelerate_loop").main(["--steps", "3", "--model", "test_resnet"])
    assert model.training


def _digest(path: Path) -> str:
    weights = torch.load(path)
    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(weights[key].cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.distributed
def test_accelerate_loop_two_processes_end_with_identical_weights(tmp_path):
    launch_two_processes(
        EXAMPLES / "accelerate_loop.py", "--steps", "3", "--model", "test_resnet", "--save", str(tmp_path / "weights")
    )
    digests = {_digest(tmp_path / f"weights.rank{rank}.pt") for rank in range(2)}
    assert len(digests) == 1
