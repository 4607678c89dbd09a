"""Soft-target cross-entropy with per-sample weights: exact, stable and mixed-precision safe."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from robustmix.stages.labels import one_hot
from robustmix.stages.losses import classification_loss, soft_cross_entropy, weighted_mean


@st.composite
def batches(draw, bound: float = 1e4):
    """``(logits [B, C], labels [B], target distributions [B, C])``."""
    size, classes = draw(st.integers(1, 6)), draw(st.integers(2, 6))
    value = st.floats(-bound, bound, width=32)
    logits = torch.tensor(
        draw(st.lists(st.lists(value, min_size=classes, max_size=classes), min_size=size, max_size=size))
    )
    y = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=size, max_size=size)))
    mass = st.lists(st.floats(0, 1, width=32), min_size=classes, max_size=classes).filter(lambda row: sum(row) > 0)
    q = torch.tensor(draw(st.lists(mass, min_size=size, max_size=size)))
    return logits, y, q / q.sum(dim=1, keepdim=True)


EXTREME = (torch.tensor([[1e4, -1e4]]), torch.tensor([1]), torch.tensor([[0.5, 0.5]]))
UNIFORM = (torch.zeros(2, 3), torch.tensor([0, 2]), torch.full((2, 3), 1 / 3))


@settings(max_examples=80, deadline=None)
@given(batch=batches())
@example(batch=EXTREME)
@example(batch=UNIFORM)
def test_one_hot_targets_give_torch_cross_entropy(batch):
    logits, y, _ = batch
    per_sample = soft_cross_entropy(logits, one_hot(y, logits.shape[1]))
    assert torch.isfinite(per_sample).all() and torch.all(per_sample >= 0)
    torch.testing.assert_close(per_sample, F.cross_entropy(logits, y, reduction="none"), atol=1e-5, rtol=1e-6)


@settings(max_examples=80, deadline=None)
@given(batch=batches())
@example(batch=EXTREME)
@example(batch=UNIFORM)
def test_soft_targets_match_float64_and_stay_finite(batch):
    logits, _, q = batch
    per_sample = soft_cross_entropy(logits, q)
    assert per_sample.dtype == torch.float32 and torch.isfinite(per_sample).all()
    reference = -(q.double() * logits.double().log_softmax(dim=1)).sum(dim=1)
    torch.testing.assert_close(per_sample.double(), reference, atol=1e-4, rtol=1e-5)


def test_extreme_logits_pinned():
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    per_sample = soft_cross_entropy(logits, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(per_sample.detach(), torch.tensor([0.0, 2e4]))
    per_sample.sum().backward()
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad, torch.tensor([[0.0, 0.0], [-1.0, 1.0]]))


def test_bf16_autocast_on_cpu_is_close_to_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    x, y = torch.randn(64, 16), torch.randint(0, 5, (64,))
    q = (one_hot(y, 5) * 0.7 + torch.rand(64, 5).softmax(dim=1) * 0.3).detach()
    weights = torch.rand(64) + 0.5
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(x)
            loss = classification_loss(logits, y, q, weights)
        assert logits.dtype == dtype and loss.dtype == torch.float32
        loss.backward()
        losses[dtype] = (loss.detach(), model[0].weight.grad.clone())
    (loss32, grad32), (loss16, grad16) = losses[torch.float32], losses[torch.bfloat16]
    # bf16 keeps 8 bits of mantissa: the logits are off by ~1e-2, the loss by a little less.
    torch.testing.assert_close(loss16, loss32, atol=2e-2, rtol=1e-2)
    assert F.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0) > 0.99


@settings(max_examples=40, deadline=None)
@given(batch=batches(bound=100.0))
@example(batch=UNIFORM)
def test_uniform_weights_give_the_plain_mean(batch):
    logits, y, q = batch
    ones = torch.ones(len(y))
    per_sample = soft_cross_entropy(logits, q)
    assert torch.equal(weighted_mean(per_sample, ones), per_sample.mean())
    assert torch.equal(classification_loss(logits, y, q, ones), classification_loss(logits, y, q))
    assert torch.equal(classification_loss(logits, y, q), soft_cross_entropy(logits, q).mean())
    torch.testing.assert_close(classification_loss(logits, y, weights=ones), F.cross_entropy(logits, y))


def test_weights_scale_samples_and_get_no_gradient():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]], requires_grad=True)
    y = torch.tensor([1, 1])
    weights = torch.tensor([2.0, 0.0], requires_grad=True)
    loss = classification_loss(logits, y, weights=weights)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:1], y[:1]))  # (2 * l_0 + 0 * l_1) / 2
    loss.backward()
    assert weights.grad is None and torch.all(logits.grad[1] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_targets_are_upcast(dtype):
    logits, q = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.2, 0.3, 0.5]])
    torch.testing.assert_close(
        soft_cross_entropy(logits, q.to(dtype)), soft_cross_entropy(logits, q), atol=3e-3, rtol=0
    )
    assert soft_cross_entropy(logits.to(dtype), q).dtype == torch.float32
