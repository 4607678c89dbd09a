"""CAAT: combination weights, features, loss, class-wise budgets, ReMargin, the lookahead's cost and state."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from robustmix import AdversarialStep, CompositionError, PGDAttack
from robustmix.anti import AntiAdversary
from robustmix.caat import (
    REMARGIN_BOUNDS,
    CAATLoss,
    CAATMetaNet,
    ClassWiseBudget,
    ReMarginBudget,
    caat_features,
    caat_loss,
    class_boundary_errors,
    remargin_multipliers,
    remargin_update,
)
from robustmix.checkpoint import join_state, split_state
from robustmix.meta import MetaBatches

seeds = st.integers(0, 2**16)


@st.composite
def feature_batches(draw):
    """Features ``[B, 6]`` with B >= 2 (BatchNorm in train mode needs two rows)."""
    size = draw(st.integers(2, 8))
    value = st.floats(-1e3, 1e3, width=32)
    return torch.tensor(draw(st.lists(st.lists(value, min_size=6, max_size=6), min_size=size, max_size=size)))


@settings(max_examples=60, deadline=None)
@given(features=feature_batches(), seed=seeds)
@example(features=torch.zeros(2, 6), seed=0)
def test_combination_weights_are_in_unit_interval_sum_to_one_and_are_equivariant(features, seed):
    torch.manual_seed(seed)
    net = CAATMetaNet()
    weights = net(features)
    assert weights.shape == (len(features), 2) and torch.isfinite(weights).all()
    assert torch.all(weights >= 0) and torch.all(weights <= 1)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(len(features)))
    perm = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    # The batch's statistics sum in another order; at temperature 0.001 a float32 rounding difference of the
    # logits grows by up to 1 / (4 * 0.001) = 250x in the weights (seen: 2e-5). A wrong row would be off by O(1).
    torch.testing.assert_close(net(features[perm]), weights[perm], atol=1e-3, rtol=0)


@st.composite
def logit_batches(draw):
    size, classes = draw(st.integers(1, 6)), draw(st.integers(2, 5))
    value = st.floats(-50, 50, width=32)
    logits = torch.tensor(
        draw(st.lists(st.lists(value, min_size=classes, max_size=classes), min_size=size, max_size=size))
    )
    labels = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=size, max_size=size)))
    return logits, labels


@settings(max_examples=60, deadline=None)
@given(batch=logit_batches(), seed=seeds)
def test_features_follow_their_definitions_and_are_equivariant(batch, seed):
    logits, y = batch
    classes = logits.shape[1]
    class_loss, share = torch.rand(classes), torch.rand(classes)
    z = caat_features(logits, y, class_loss, share)
    assert z.shape == (len(y), 6) and torch.isfinite(z).all() and not z.requires_grad
    p = logits.double().softmax(dim=1)
    onehot = F.one_hot(y, classes).double()
    other = p.masked_fill(onehot.bool(), -1).amax(dim=1)
    expected = torch.stack(
        [
            F.cross_entropy(logits.double(), y, reduction="none"),
            class_loss.double()[y],
            (onehot - p).norm(dim=1),
            p.gather(1, y[:, None]).squeeze(1) - other,
            (p * p.clamp_min(1e-300).log()).sum(dim=1),
            share.double()[y],
        ],
        dim=1,
    )
    torch.testing.assert_close(z.double(), expected, atol=1e-4, rtol=1e-4)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(caat_features(logits[perm], y[perm], class_loss, share), z[perm])


def test_loss_is_trades_on_the_adversary_and_ce_on_the_anti_adversary():
    torch.manual_seed(0)
    clean, adv, anti = (torch.randn(5, 3, requires_grad=True) for _ in range(3))
    y = torch.tensor([0, 1, 2, 0, 1])
    ones, zeros = torch.ones(5), torch.zeros(5)
    ce = F.cross_entropy(clean, y)
    kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")  # TRADES' KL term
    torch.testing.assert_close(caat_loss(clean, adv, anti, y, ones, zeros, beta_tr=1.5), ce + 1.5 * kl)
    torch.testing.assert_close(caat_loss(clean, adv, anti, y, zeros, ones), F.cross_entropy(anti, y))
    alpha = torch.tensor([1.0, 0.0, 0.3, 0.5, 1.0])
    mixed = caat_loss(clean, adv, anti, y, alpha, 1 - alpha)
    per = [caat_loss(clean[i : i + 1], adv[i : i + 1], anti[i : i + 1], y[i : i + 1], alpha[i : i + 1],
                     1 - alpha[i : i + 1]) for i in range(5)]  # fmt: skip
    torch.testing.assert_close(mixed, torch.stack(per).mean())
    mixed.backward()
    assert clean.grad.abs().sum() > 0  # the clean distribution is not detached in the KL term


class SmallNet(nn.Module):
    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _batch(b: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 4, 4, generator=g), torch.arange(b) % 3


def _caat(model: nn.Module, *, steps: int = 2, meta_every: int = 2, multipliers=(1.0, 1.5, 0.5), net=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    meta = MetaBatches(*_batch(12, seed=5), batch_size=8, seed=0)
    loss = CAATLoss(3, meta, meta_every=meta_every, optimizer=optimizer, net=net)
    callbacks = [
        ClassWiseBudget(0.1, multipliers),
        PGDAttack(None, 0.25, steps, loss="kl", start="normal", relative_step_size=True),
        AntiAdversary(None, 0.25, steps, relative_step_size=True),
        loss,
    ]
    return AdversarialStep(callbacks), loss, optimizer


def test_class_wise_budget_bounds_attack_and_anti_adversary():
    step, _, _ = _caat(SmallNet(), meta_every=1000)
    x, y = _batch()
    _, ctx = step(SmallNet(), x, y, step=1)
    torch.testing.assert_close(ctx.eps, 0.1 * torch.tensor([1.0, 1.5, 0.5])[y])
    for perturbed in (ctx.x_adv, ctx.x_anti):
        assert torch.all((perturbed - x).abs().flatten(1).amax(dim=1) <= ctx.eps + 1e-6)
    with pytest.raises(ValueError, match=">= 0"):
        ClassWiseBudget(0.1, [1.0, -1.0])


def test_cost_per_step_with_and_without_the_lookahead():
    model = SmallNet()
    step, callback, _ = _caat(model, steps=2, meta_every=2)
    x, y = _batch()
    net_before = [p.clone() for p in callback.net.parameters()]
    params_before = [p.clone() for p in model.parameters()]
    stats_before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    loss, ctx = step(model, x, y, step=0)  # a lookahead step
    assert any(not torch.equal(a, b) for a, b in zip(net_before, callback.net.parameters()))
    # ... which leaves the model's parameters and gradients alone,
    assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    loss.backward()
    # K = K_anti = 2: one eval forward of x (KL attack), 2K attack and anti-adversary passes, 3 training
    # forwards; the lookahead adds 3 virtual forwards of the batch and 1 of the meta batch (same size here).
    assert ctx.passes() == (1 + 2 * 2 + 3 + 4, 2 * 2 + 3 + 4)
    after_lookahead = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(stats_before)
    torch.manual_seed(3)
    loss, ctx = step(model, x, y, step=1)  # no lookahead
    loss.backward()
    assert ctx.passes() == (1 + 2 * 2 + 3, 2 * 2 + 3)
    # ... and its BatchNorm statistics: only the real step's training forwards moved them.
    assert all(torch.equal(v, after_lookahead[k]) for k, v in model.state_dict().items())


def test_class_average_losses_become_the_next_epochs_feature():
    model = SmallNet()
    step, callback, _ = _caat(model, meta_every=1000)
    ce = []
    for i in range(2):
        x, y = _batch(6, seed=i)
        _, ctx = step(model, x, y, step=1 + i)
        ce.append((F.cross_entropy(ctx.logits["clean"].detach(), y, reduction="none"), y))
    assert torch.equal(callback.class_loss, torch.full((3,), math.log(3)))
    step.fire("on_epoch_end", None, 0)
    losses, labels = torch.cat([c for c, _ in ce]), torch.cat([y for _, y in ce])
    expected = torch.stack([losses[labels == k].mean() for k in range(3)])
    torch.testing.assert_close(callback.class_loss, expected)


def test_state_dict_round_trips_through_a_checkpoint():
    model = SmallNet()
    step, callback, optimizer = _caat(model, meta_every=1)
    x, y = _batch()
    for i in range(2):
        loss, _ = step(model, x, y, step=i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tensors, values = split_state(step.state_dict())
    twin, twin_callback, _ = _caat(SmallNet(), meta_every=1)
    twin_callback.optimizer = optimizer
    twin.load_state_dict(join_state(tensors, values))
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for s, c in ((step, callback), (twin, twin_callback)):
        model.load_state_dict(stats)
        torch.manual_seed(3)
        loss, _ = s(model, x, y, step=2)  # a lookahead: Adam state, meta batch stream and features all matter
        results.append((loss.detach(), [p.detach().clone() for p in c.net.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_composition_needs_the_anti_adversary():
    meta = MetaBatches(*_batch(4), batch_size=2)
    with pytest.raises(CompositionError, match="AntiAdversary"):
        AdversarialStep([PGDAttack(0.1, 0.02, 1), CAATLoss(3, meta)])


@settings(max_examples=60, deadline=None)
@given(lam2=st.lists(st.floats(-5, 5), min_size=2, max_size=10).map(torch.tensor))
def test_remargin_multipliers_are_bounded_and_monotone(lam2):
    c = remargin_multipliers(lam2)
    assert torch.all(c >= REMARGIN_BOUNDS[0]) and torch.all(c <= REMARGIN_BOUNDS[1])
    order = torch.argsort(lam2)
    assert torch.all(c[order][1:] >= c[order][:-1])
    errors = torch.rand(len(lam2))
    # Classes with above-average boundary error get a larger budget, below-average ones a smaller one.
    torch.testing.assert_close(remargin_update(lam2, errors, rate=0.1), lam2.float() + 0.1 * (errors - errors.mean()))


class Constant(nn.Module):
    """Predicts class ``argmax(bias)`` whatever the input: no attack can change its decision."""

    def __init__(self, bias: list[float]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.flatten(1).sum(dim=1, keepdim=True) + self.bias


class Threshold(nn.Module):
    """Class 1 exactly when the pixel exceeds 0.5: examples within eps of 0.5 cross the boundary."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 10 * (x - 0.5)], dim=1)


def test_boundary_errors_and_remargin_update():
    x = torch.tensor([[0.1], [0.45], [0.9], [0.55], [0.7]])
    y = torch.tensor([0, 0, 1, 1, 1])
    # Class 0: 1 of 2 within 0.1 of the boundary; class 1: 1 of 3.
    errors = class_boundary_errors(Threshold(), x, y, 2, eps=0.1, step_size=0.1, steps=2, batch_size=2)
    torch.testing.assert_close(errors, torch.tensor([0.5, 1 / 3]))
    assert torch.equal(class_boundary_errors(Constant([0.0, 1.0]), x, y, 2, eps=0.3, step_size=0.1, steps=2),
                       torch.zeros(2))  # fmt: skip

    budget = ReMarginBudget(0.1, 2, x, y, step_size=0.1, steps=2, rate=0.5)
    budget.update(Threshold())
    lam2 = 0.5 * (torch.tensor([0.5, 1 / 3]) - 5 / 12)
    torch.testing.assert_close(budget.lam2, lam2)
    torch.testing.assert_close(budget.multipliers, torch.exp(2 * lam2).clamp(0.98, 2.5))
    restored = ReMarginBudget(0.1, 2, x, y)
    restored.load_state_dict(join_state(*split_state(budget.state_dict())))
    assert torch.equal(restored.lam2, budget.lam2) and torch.equal(restored.multipliers, budget.multipliers)


def test_a_random_net_saturates_and_the_even_init_starts_every_example_at_one_half():
    features = torch.randn(256, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    default = CAATMetaNet()
    alpha = default(features)[:, 0]
    assert ((alpha < 0.01) | (alpha > 0.99)).float().mean() > 0.9  # the softmax's gradient vanishes there
    torch.manual_seed(0)
    even = CAATMetaNet(init="even")
    assert torch.equal(even(features), torch.full((256, 2), 0.5))
    assert torch.equal(even.mlp[0].weight, default.mlp[0].weight)  # the same random draws
    with pytest.raises(ValueError, match="init must be one of"):
        CAATMetaNet(init="zeros")


def test_the_meta_step_moves_the_even_net():
    model = SmallNet()
    step, callback, _ = _caat(model, meta_every=1, net=CAATMetaNet(init="even"))
    x, y = _batch()
    step(model, x, y, step=0)  # a lookahead step: one Adam step of the net
    assert callback.net.mlp[2].weight.abs().sum() > 0
    alpha = callback.net(torch.randn(8, 6))[:, 0]
    assert not torch.equal(alpha, torch.full((8,), 0.5))
