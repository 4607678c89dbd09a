"""Loss reweighters: non-negative, batch mean 1, monotone in the margin, composable and detached."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from robustmix import AdversarialCE, AdversarialStep, PGDAttack
from robustmix.core.context import StepContext
from robustmix.methods.gairat import GAIRAT_KINDS, GAIRATWeights, gairat_weights
from robustmix.stages.losses import classification_loss, weighted_mean
from robustmix.stages.margins import ProbabilityMargin
from robustmix.stages.weights import (
    MAIL_SCALE,
    AdaLabWeights,
    MAILWeights,
    MarginWeights,
    adalab_importance,
    boundary_importance,
    mail_weights,
    normalize_weights,
)
from tests.toys import SmallMLP

seeds = st.integers(0, 2**16)
#: Probability margins (and MAIL's PM) live in [-1, 1]; the edges are where predictions are one-hot.
margins = st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=16).map(torch.tensor)


def _assert_normalized(w: torch.Tensor) -> None:
    assert w.dtype == torch.float32 and torch.isfinite(w).all() and torch.all(w >= 0)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0), atol=1e-5, rtol=0)


def _assert_non_increasing_in(w: torch.Tensor, key: torch.Tensor) -> None:
    order = torch.argsort(key)
    assert torch.all(w[order][1:] <= w[order][:-1]), (key[order], w[order])


@settings(max_examples=80, deadline=None)
@given(w=st.lists(st.floats(0, 2.0**100, width=32), min_size=1, max_size=16).map(torch.tensor))
@example(w=torch.zeros(5))
@example(w=torch.tensor([0.0]))
@example(w=torch.tensor([1e-45, 0.0, 0.0]))
@example(w=torch.tensor([3.0]))
def test_normalize_weights(w):
    out = normalize_weights(w)
    _assert_normalized(out)
    if w.sum() == 0:
        assert torch.equal(out, torch.ones_like(w))
    else:
        # Proportional to the input: ratios are kept, zeros stay zeros.
        torch.testing.assert_close(out.double(), w.double() / w.double().mean(), rtol=1e-5, atol=1e-6)
        assert torch.all(out[w == 0] == 0)


def test_normalize_weights_is_differentiable():
    """A learned weight function (BiLAW) is trained through the normalization."""
    w = torch.tensor([1.0, 3.0], requires_grad=True)
    normalize_weights(w)[0].backward()
    torch.testing.assert_close(w.grad, torch.tensor([0.375, -0.125]))


@settings(max_examples=80, deadline=None)
@given(margin=margins, c=st.floats(0, 20))
@example(margin=torch.tensor([0.3]), c=5.0)
@example(margin=torch.tensor([-1.0, 1.0]), c=5.0)
@example(margin=torch.tensor([-1.0, -1.0, -1.0]), c=20.0)
def test_adalab_importance(margin, c):
    w = adalab_importance(margin, c)
    _assert_normalized(w)
    _assert_non_increasing_in(w, margin)
    raw = boundary_importance(margin, c)
    reference = 1 + torch.tanh(c * (0.5 - (1 + margin.double()) / 2))
    torch.testing.assert_close(raw.double(), reference, atol=1e-6, rtol=1e-5)
    assert torch.all(raw >= 0) and torch.all(raw <= 2)


def test_adalab_importance_pinned_values():
    w = adalab_importance(torch.tensor([-1.0, 0.0, 1.0]))
    raw = torch.tensor([1 + math.tanh(2.5), 1.0, 1 - math.tanh(2.5)])
    torch.testing.assert_close(w, raw / raw.mean())
    assert torch.equal(adalab_importance(torch.tensor([0.0, 0.5]), c=0.0), torch.ones(2))


kappas = st.integers(1, 20).flatmap(
    lambda k: st.tuples(st.just(k), st.lists(st.integers(0, k), min_size=1, max_size=16).map(torch.tensor))
)


def _gairat_reference(kappa: torch.Tensor, steps: int, lam: float, kind: str) -> torch.Tensor:
    """METHODS.md's formulas, in float64, with tanh written as tanh."""
    kappa, h = kappa.double(), steps / 2
    if kind == "tanh":
        raw = (1 + torch.tanh(lam + 5 * (h - kappa) / h)) / 2
    elif kind == "sigmoid":
        raw = torch.sigmoid(lam + 5 * (h - kappa) / h)
    else:
        raw = (steps + 1 - kappa) / (steps + 1)
    return raw * len(raw) / raw.sum()


@settings(max_examples=80, deadline=None)
@given(case=kappas, lam=st.floats(-3, 3), kind=st.sampled_from(GAIRAT_KINDS))
@example(case=(10, torch.tensor([0, 5, 10])), lam=-1.0, kind="tanh")
@example(case=(1, torch.tensor([1])), lam=-1.0, kind="discrete")
def test_gairat_weights(case, lam, kind):
    steps, kappa = case
    w = gairat_weights(kappa, steps, lam, kind)
    _assert_normalized(w)
    _assert_non_increasing_in(w, kappa)
    torch.testing.assert_close(w.double(), _gairat_reference(kappa, steps, lam, kind), atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(case=kappas, kind=st.sampled_from(["tanh", "sigmoid"]))
@example(case=(10, torch.tensor([0, 10])), kind="tanh")
def test_gairat_at_infinite_lambda_is_pgd_at(case, kind):
    steps, kappa = case
    assert torch.equal(gairat_weights(kappa, steps, math.inf, kind), torch.ones(len(kappa)))


@settings(max_examples=80, deadline=None)
@given(pm=margins, bias=st.floats(-3, 3), slope=st.floats(0, 10))
@example(pm=torch.tensor([0.2]), bias=-1.5, slope=1.0)
@example(pm=torch.tensor([-1.0, 1.0]), bias=-1.5, slope=1.0)
def test_mail_weights_increase_with_pm(pm, bias, slope):
    w = mail_weights(pm, bias, slope)
    _assert_normalized(w)
    _assert_non_increasing_in(w, -pm)
    raw = 3 * torch.sigmoid(slope * (pm.double() + bias))  # MAIL's factor 3 cancels in the normalization
    torch.testing.assert_close(w.double(), raw / raw.mean(), atol=1e-5, rtol=1e-5)


@settings(max_examples=80, deadline=None)
@given(pm=margins, bias=st.floats(-3, 3), slope=st.floats(0, 10))
@example(pm=torch.tensor([-1.0, 1.0]), bias=-1.5, slope=1.0)
def test_released_mail_weights_are_the_normalized_ones_unscaled(pm, bias, slope):
    released = mail_weights(pm, bias, slope, normalize=False)
    assert released.dtype == torch.float32 and torch.all((released >= 0) & (released <= MAIL_SCALE))
    _assert_non_increasing_in(released, -pm)
    torch.testing.assert_close(normalize_weights(released), mail_weights(pm, bias, slope), atol=1e-5, rtol=1e-5)


def test_released_mail_weights_by_hand():
    # 3 * sigmoid(PM - 1.5) = 3 / (1 + e^(1.5 - PM)), with e^2.5 = 12.18249, e^1.5 = 4.48169, e = 2.71828 and
    # e^0.5 = 1.64872 for PM = -1, 0, 0.5, 1.
    pm = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    by_hand = torch.tensor([0.227575, 0.547277, 0.806824, 1.132622])
    torch.testing.assert_close(mail_weights(pm, normalize=False), by_hand, atol=1e-6, rtol=0)
    # The default divides by their mean, 2.714298 / 4.
    torch.testing.assert_close(mail_weights(pm), by_hand / 0.6785745, atol=1e-5, rtol=0)
    # The callback reads ProbabilityMargin's m = -PM and writes them as they are; ones during its burn-in.
    ctx = _ctx(4, margin=-pm, epoch=1)
    MAILWeights(burn_in_epochs=1, normalize=False)(ctx)
    torch.testing.assert_close(ctx.weights, by_hand, atol=1e-6, rtol=0)
    ctx = _ctx(4, margin=-pm, epoch=0)
    MAILWeights(burn_in_epochs=1, normalize=False)(ctx)
    assert torch.equal(ctx.weights, torch.ones(4))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GAIRATWeights(10, kind="cosine"), "kind"),
        (lambda: GAIRATWeights(0), "steps"),
        (lambda: GAIRATWeights(10, lam=math.nan), "lam"),
        (lambda: GAIRATWeights(10, burn_in_epochs=-1), "burn_in_epochs"),
        (lambda: AdaLabWeights(c=-1.0), "c"),
        (lambda: AdaLabWeights(burn_in_epochs=1.5), "burn_in_epochs"),
        (lambda: MAILWeights(slope=-1.0), "slope"),
        (lambda: MAILWeights(bias=math.inf), "bias"),
        (lambda: MarginWeights(torch.exp, burn_in_epochs=-2), "burn_in_epochs"),
        (lambda: gairat_weights(torch.tensor([0]), 10, kind="step"), "kind"),
        (lambda: mail_weights(torch.tensor([0.0]), slope=math.nan), "slope"),
        (lambda: adalab_importance(torch.tensor([0.0]), c=math.inf), "c"),
    ],
)
def test_bad_settings_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def _ctx(size: int, **fields) -> StepContext:
    identity, y = nn.Identity(), torch.zeros(size, dtype=torch.long)
    return StepContext(
        model=identity, attack_model=identity, inputs=torch.zeros(size, 1), targets=y, num_classes=2, **fields
    )


CALLBACKS = [
    (lambda: AdaLabWeights(), "margin"),
    (lambda: MAILWeights(), "margin"),
    (lambda: MarginWeights(lambda m: (1 - m) ** 2, name="square"), "margin"),
    (lambda: GAIRATWeights(10, kind="tanh"), "kappa"),
    (lambda: GAIRATWeights(10, kind="discrete"), "kappa"),
]


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CALLBACKS), values=st.lists(st.integers(0, 10), min_size=1, max_size=16), seed=seeds)
@example(case=CALLBACKS[0], values=[3], seed=0)
@example(case=CALLBACKS[1], values=[0, 10], seed=0)
def test_callbacks_are_normalized_monotone_and_equivariant(case, values, seed):
    build, field = case
    # One draw serves both fields: kappa in {0..10}, or the margin kappa / 5 - 1 in [-1, 1].
    value = torch.tensor(values) if field == "kappa" else torch.tensor(values) / 5.0 - 1
    perm = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))
    written = []
    for order in (torch.arange(len(values)), perm):
        ctx = _ctx(len(values), **{field: value[order]})
        build()(ctx)
        written.append(ctx.weights)
    _assert_normalized(written[0])
    _assert_non_increasing_in(written[0], value)
    torch.testing.assert_close(written[1], written[0][perm], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("build", "field"), CALLBACKS)
def test_burn_in_writes_ones(build, field):
    callback = build()
    callback.burn_in_epochs = 2
    ctx = _ctx(3, epoch=1, **{field: torch.tensor([0, 5, 10]) if field == "kappa" else torch.tensor([-1.0, 0.0, 1.0])})
    callback(ctx)
    assert torch.equal(ctx.weights, torch.ones(3))
    ctx.weights, ctx.epoch = None, 2
    callback(ctx)
    assert not torch.equal(ctx.weights, torch.ones(3))


def test_generic_margin_weights_are_detached_and_multiply_in():
    margin = torch.tensor([-0.5, 0.0, 0.5], requires_grad=True)
    ctx = _ctx(3, margin=margin, weights=torch.tensor([2.0, 1.0, 0.0]))
    MarginWeights(lambda m: 1 - m)(ctx)
    assert not ctx.weights.requires_grad
    torch.testing.assert_close(ctx.weights, torch.tensor([2.0, 1.0, 0.0]) * torch.tensor([1.5, 1.0, 0.5]))


def test_several_reweighters_compose_to_mean_one_at_pgd_at_cost():
    steps = 3
    step = AdversarialStep(
        [
            PGDAttack(eps=0.1, step_size=0.03, steps=steps, track_kappa=True),
            ProbabilityMargin(),
            GAIRATWeights(steps),
            MAILWeights(),
            AdaLabWeights(),
            AdversarialCE(),
        ]
    )
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, ctx = step(SmallMLP(), x, y)
    loss.backward()
    assert ctx.passes() == (steps + 1, steps + 1)
    _assert_normalized(ctx.weights)
    product = gairat_weights(ctx.kappa, steps) * mail_weights(-ctx.margin) * adalab_importance(ctx.margin)
    torch.testing.assert_close(ctx.weights, normalize_weights(product))


@settings(max_examples=40, deadline=None)
@given(losses=st.lists(st.floats(0, 1e4, width=32), min_size=1, max_size=16).map(torch.tensor))
@example(losses=torch.tensor([2.5]))
def test_uniform_weights_give_the_plain_mean(losses):
    uniform = gairat_weights(torch.zeros(len(losses), dtype=torch.long), 10, lam=math.inf)
    assert torch.equal(weighted_mean(losses, uniform), losses.mean())
    # Equal margins weigh equally under every reweighter.
    for weights in (adalab_importance(torch.full_like(losses, 0.3)), mail_weights(torch.full_like(losses, -0.3))):
        torch.testing.assert_close(weighted_mean(losses, weights), losses.mean())


def test_gairat_at_infinite_lambda_gives_the_pgd_at_loss():
    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    weights = gairat_weights(torch.tensor([0, 1, 2, 3, 3]), 3, lam=math.inf)
    assert torch.equal(classification_loss(logits, y, weights=weights), classification_loss(logits, y))
    torch.testing.assert_close(classification_loss(logits, y, weights=weights), F.cross_entropy(logits, y))
