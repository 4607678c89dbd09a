"""Toy models and batches that several test files share.

Every model is small enough for a step on one CPU core in milliseconds. Tests compare their numbers, pass counts
and BatchNorm statistics, so each toy's layers and seeding are part of what it is: a test that needs another
architecture gets another toy rather than an option on one of these.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def batch_4x4(size: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded images ``[size, 1, 4, 4]`` in [0, 1] and labels ``arange(size) % 3``: inputs of the 4x4 toys."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(size, 1, 4, 4, generator=g), torch.arange(size) % 3


def batch_8x8(size: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Seeded images ``[size, 1, 8, 8]`` in [0, 1] and random labels in {0, 1, 2}: inputs of the 8x8 toys."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(size, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g)


class SmallConvNet(nn.Module):
    """Conv + BatchNorm on 1x4x4 images, 3 classes; seeded, so every instance starts from the same weights.

    The meta-learning tests (BiLAW, CAAT) and GAIRAT's bit-for-bit comparisons use it: BatchNorm makes the
    attack's and the meta step's model modes matter.
    """

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LinearNet(nn.Module):
    """One linear layer on 1x4x4 images, 3 classes, seeded; counts its forwards in ``calls``.

    No BatchNorm and no dropout: train and eval forwards agree, so only the number of passes differs.
    """

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x)


class SmallMLP(nn.Module):
    """A 16-8-3 MLP on 1x4x4 images, seeded: the margin and weight tests' model for PGD-AT's pass count."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TinyBN(nn.Module):
    """Conv + BatchNorm classifier of 1x8x8 images into 3 classes (AWP, TRADES, MART); build it with `tiny_bn`."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16, 3),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def tiny_bn(dtype: torch.dtype = torch.float32) -> TinyBN:
    """A `TinyBN` from seed 0, in train mode."""
    torch.manual_seed(0)
    return TinyBN().to(dtype).train()


class _Tally(torch.autograd.Function):
    """Identity on the logits that counts the passes through them, independently of the step's hook."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, net: TallyNet) -> Tensor:
        net.forwards += 1
        ctx.net = net
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        ctx.net.backwards += 1
        return grad, None


class TallyNet(nn.Module):
    """A tiny conv net on 1x8x8 images, 3 classes, with BatchNorm (train and eval modes differ), seeded; counts
    its own forwards and backwards through its logits."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
        )
        self.forwards = 0
        self.backwards = 0

    def forward(self, x: Tensor) -> Tensor:
        return _Tally.apply(self.net(x), self)


class PatternNet(nn.Module):
    """Two-layer MLP with BatchNorm (whose mode the generators must respect) for 8x8 images."""

    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@functools.cache
def trained_pattern_net() -> tuple[PatternNet, Tensor, Tensor]:
    """PatternNet fit to 4 classes of noisy random 8x8 patterns, seeded (well under a second of CPU).

    Returns ``(model in train mode, x [64, 1, 8, 8], y [64])``; one instance for the whole session.
    """
    torch.manual_seed(0)
    prototypes = torch.rand(4, 1, 8, 8)
    y = torch.arange(4).repeat(16)
    x = (prototypes[y] + 0.15 * torch.randn(len(y), 1, 8, 8)).clamp(0, 1)
    model = PatternNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(80):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.train(), x, y


class MLP(nn.Module):
    """A 16x16 grey-image MLP (10 classes by default) for the evaluation attacks; ``quantize`` rounds its input,
    which zeroes every input gradient (gradient masking that a gradient-free attack must see through)."""

    def __init__(self, in_features: int = 256, num_classes: int = 10, quantize: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.quantize = quantize
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if self.quantize:
            # torch.round has a zero gradient: gradient attacks see a flat loss.
            x = torch.round(x * 4) / 4
        return self.body(x)


def prototype_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` noisy 1x16x16 images of 10 smooth class prototypes (fixed), labels drawn with ``seed``."""
    prototypes = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(123))
    prototypes = F.interpolate(prototypes, size=16, mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (0.25 + 0.5 * prototypes[y] + 0.3 * torch.randn(n, 1, 16, 16, generator=g)).clamp(0, 1)
    return x, y


def trained_mlp(quantize: bool = False) -> MLP:
    """``MLP`` trained (seeded, 300 Adam steps) on ``prototype_images``: accurate and attackable, in eval mode."""
    x, y = prototype_images(2000, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MLP(quantize=quantize)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def noisy_batch_3x8x8(seed: int) -> tuple[Tensor, Tensor]:
    """Six 3x8x8 images and labels in [0, 5) from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    # Some pixels sit on the box's faces, where projection and clamping interact.
    x = torch.rand(6, 3, 8, 8, generator=g).mul(1.4).sub(0.2).clamp(0, 1)
    return x, torch.randint(0, 5, (6,), generator=g)


def assert_in_ball(x_adv: Tensor, x: Tensor, eps: float, norm: str = "linf") -> None:
    """``x_adv`` has ``x``'s shape and dtype, pixels in [0, 1], and lies in ``B(x, eps)`` (L-inf or L2)."""
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    distance = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert (distance <= eps * (1 + 1e-5) + 1e-6).all()
