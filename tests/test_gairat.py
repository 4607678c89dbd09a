"""GAIRAT: kappa on a model whose flip step is known, lam = +inf is PGD-AT bit for bit, the lambda schedule."""

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustmix import AdversarialCE, AdversarialStep, PGDAttack
from robustmix.methods.gairat import (
    LAMBDA_SCHEDULES,
    GAIRATWeights,
    ScheduledGAIRATWeights,
    gairat_lambda,
    gairat_weights,
)
from tests.toys import SmallConvNet


class Threshold(nn.Module):
    """Two classes on one pixel ``x``: logits ``(0, x - 0.45)``, so class 1 exactly when ``x > 0.45``."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[0.0], [1.0]]))
            self.linear.bias.copy_(torch.tensor([0.0, -0.45]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.mark.parametrize("steps", [1, 3, 4, 10])
def test_kappa_counts_iterates_before_the_known_flip(steps):
    # From x0 with no random start, PGD's sign steps of 0.1 move x by exactly 0.1 towards the other
    # class every iteration: x_k = x0 + 0.1 k (label 0) or x0 - 0.1 k (label 1), clipped to [0, 1].
    x0 = torch.tensor([[0.2], [0.4], [0.0], [0.9], [0.5], [1.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    # Iterates still correct before the flip: label 0 while x_k < 0.45, label 1 while x_k > 0.45.
    flips_after = torch.tensor([3, 1, 5, 5, 1, 6])
    step = AdversarialStep(
        [PGDAttack(eps=1.0, step_size=0.1, steps=steps, start="none", track_kappa=True), AdversarialCE()]
    )
    _, ctx = step(Threshold(), x0, y)
    assert torch.equal(ctx.kappa, flips_after.clamp(max=steps))


def _loss_and_grads(callbacks, model, x, y, epoch=0):
    torch.manual_seed(123)  # the attack's random start
    loss, ctx = AdversarialStep(callbacks)(model, x, y, epoch=epoch, total_epochs=4)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], ctx


@pytest.mark.parametrize(
    "weights",
    [
        lambda: GAIRATWeights(5, lam=math.inf),
        lambda: ScheduledGAIRATWeights(5, lam=-1.0, burn_in_epochs=2),  # during its burn-in
        lambda: ScheduledGAIRATWeights(5, lam=-1.0, burn_in_epochs=2, schedule="linear", lam_max=3.0),
    ],
    ids=["lam-inf", "fixed-burn-in", "linear-burn-in"],
)
def test_lam_inf_is_pgd_at_bitwise(weights):
    torch.manual_seed(0)
    model = SmallConvNet()
    x, y = torch.rand(16, 1, 4, 4), torch.arange(16) % 3
    twin = copy.deepcopy(model)  # before the reference step updates BatchNorm's running statistics
    reference, reference_grads, _ = _loss_and_grads([PGDAttack(0.1, 0.025, 5), AdversarialCE()], model, x, y)
    callbacks = [PGDAttack(0.1, 0.025, 5, track_kappa=True), weights(), AdversarialCE()]
    loss, grads, ctx = _loss_and_grads(callbacks, twin, x, y, epoch=1)
    assert torch.equal(loss, reference)
    assert all(torch.equal(a, b) for a, b in zip(grads, reference_grads))
    assert torch.equal(ctx.weights, torch.ones(16))
    assert ctx.passes() == (6, 6)  # PGD-AT's K + 1 forwards and backwards: kappa is free


def test_after_the_burn_in_the_weights_are_gairats():
    torch.manual_seed(0)
    model = SmallConvNet()
    x, y = torch.rand(16, 1, 4, 4), torch.arange(16) % 3
    callbacks = [
        PGDAttack(0.1, 0.025, 5, track_kappa=True),
        ScheduledGAIRATWeights(5, burn_in_epochs=2),
        AdversarialCE(),
    ]
    _, _, ctx = _loss_and_grads(callbacks, model, x, y, epoch=2)
    assert ctx.extras["gairat_lam"] == -1.0
    assert torch.equal(ctx.weights, gairat_weights(ctx.kappa, 5, -1.0))
    assert ctx.passes() == (6, 6)


def test_fixed_schedule_is_the_released_default():
    lams = [gairat_lambda(e, lam=-1.0, burn_in_epochs=59) for e in (0, 58, 59, 119)]
    assert lams == [math.inf, math.inf, -1.0, -1.0]


def test_linear_schedule_follows_the_released_formula():
    # Released: Lambda = Lambda_max - (epoch / epochs) * (Lambda_max - Lambda), epoch counted from 1.
    for epoch in range(30, 100):
        expected = 2.0 - (epoch + 1) / 100 * (2.0 - (-1.0))
        assert (
            gairat_lambda(epoch, lam=-1.0, burn_in_epochs=30, schedule="linear", lam_max=2.0, total_epochs=100)
            == expected
        )
    assert gairat_lambda(99, lam=-1.0, schedule="linear", lam_max=2.0, total_epochs=100) == -1.0


@settings(max_examples=60, deadline=None)
@given(
    lam=st.floats(-5, 5),
    spread=st.floats(0, 10),
    burn_in=st.integers(0, 20),
    total=st.integers(1, 40),
    schedule=st.sampled_from(LAMBDA_SCHEDULES),
)
def test_lambda_is_inf_during_burn_in_then_finite_and_non_increasing(lam, spread, burn_in, total, schedule):
    values = [
        gairat_lambda(e, lam=lam, burn_in_epochs=burn_in, schedule=schedule, lam_max=lam + spread, total_epochs=total)
        for e in range(total)
    ]
    assert all(v == math.inf for v in values[:burn_in])
    after = values[burn_in:]
    assert all(math.isfinite(v) and lam - 1e-9 <= v <= lam + spread + 1e-9 for v in after)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(after))


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        ScheduledGAIRATWeights(5, schedule="linear")  # lam_max = +inf would give NaN, as in the released code
    with pytest.raises(ValueError, match="schedule"):
        ScheduledGAIRATWeights(5, schedule="piecewise")
    with pytest.raises(ValueError, match="total_epochs"):
        gairat_lambda(3, schedule="linear", lam_max=1.0)
    with pytest.raises(ValueError, match="burn_in_epochs"):
        ScheduledGAIRATWeights(5, burn_in_epochs=-1)
