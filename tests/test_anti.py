"""Anti-adversary generators: they stay in the attack's ball and lower the true-class loss."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from robustmix import AdversarialCE, AdversarialStep, CompositionError, PGDAttack
from robustmix.attacks import perturb, pgd, random_start
from robustmix.core.context import StepContext
from robustmix.core.modes import model_mode
from robustmix.stages.anti import AdversarysAdversary, AntiAdversary, adversarys_adversary, anti_adversary
from tests.toys import trained_pattern_net

EPS = 8 / 255


def _linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().amax(dim=1)


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), model_mode(model, "eval"):
        return F.cross_entropy(model(x), y, reduction="none")


@settings(max_examples=30, deadline=None)
@given(
    eps=st.floats(0, 0.3),
    per_sample=st.booleans(),
    steps=st.integers(0, 3),
    step_size=st.one_of(st.none(), st.floats(0, 0.5)),
    norm=st.sampled_from(["linf", "l2"]),
    batch=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
@example(eps=0.0, per_sample=False, steps=1, step_size=None, norm="linf", batch=1, seed=0)
@example(eps=0.3, per_sample=True, steps=3, step_size=0.5, norm="linf", batch=6, seed=1)
def test_adversarys_adversary_stays_in_the_ball_and_box(eps, per_sample, steps, step_size, norm, batch, seed):
    model, x_all, y_all = trained_pattern_net()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(y_all), (batch,), generator=g)
    x, y = x_all[pick], y_all[pick]
    radius = torch.rand(batch, generator=g) * eps if per_sample else torch.full((batch,), eps)
    eps_arg = radius if per_sample else eps
    x_adv = random_start(x, radius.view(-1, 1, 1, 1), norm, "uniform", g)
    x_aa = adversarys_adversary(model, x, x_adv, y, eps=eps_arg, step_size=step_size, steps=steps, norm=norm)
    distance = _linf(x_aa, x) if norm == "linf" else (x_aa - x).flatten(1).norm(dim=1)
    assert torch.all(distance <= radius + 1e-6)
    assert x_aa.min() >= 0 and x_aa.max() <= 1
    assert x_aa.shape == x.shape and x_aa.dtype == x.dtype and not x_aa.requires_grad
    assert model.training, "the generator must restore the training mode"
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("per_sample", [False, True])
def test_adversarys_adversary_lowers_the_true_class_loss(per_sample):
    model, x, y = trained_pattern_net()
    eps = torch.linspace(EPS / 2, 2 * EPS, len(y)) if per_sample else EPS
    x_adv = pgd(model, x, y, eps=eps, step_size=EPS / 4, steps=10)
    x_aa = adversarys_adversary(model, x, x_adv, y, eps=eps)
    before, after = _ce(model, x_adv, y), _ce(model, x_aa, y)
    assert before.mean() > _ce(model, x, y).mean(), "the attack should have raised the loss"
    assert after.mean() < before.mean()
    assert (after < before).float().mean() >= 0.9
    assert torch.all(_linf(x_aa, x) <= (eps if per_sample else torch.full_like(before, EPS)) + 1e-6)


def test_default_step_is_half_the_budget_and_steps_descend_further():
    model, x, y = trained_pattern_net()
    eps = torch.linspace(EPS / 2, 2 * EPS, len(y))
    x_adv = pgd(model, x, y, eps=eps, step_size=EPS / 4, steps=5)
    explicit = perturb(model, x, y, eps=eps, step_size=eps / 2, steps=1, descend=True, x_init=x_adv)
    assert torch.equal(adversarys_adversary(model, x, x_adv, y, eps=eps), explicit)
    one = _ce(model, adversarys_adversary(model, x, x_adv, y, eps=eps, step_size=EPS / 8), y)
    four = _ce(model, adversarys_adversary(model, x, x_adv, y, eps=eps, step_size=EPS / 8, steps=4), y)
    assert four.mean() < one.mean()


@pytest.mark.parametrize("per_sample", [False, True])
def test_anti_adversary_lowers_the_loss_of_clean_inputs(per_sample):
    model, x, y = trained_pattern_net()
    eps = torch.linspace(EPS / 2, 2 * EPS, len(y)) if per_sample else EPS
    g = torch.Generator().manual_seed(0)
    x_anti = anti_adversary(model, x, y, eps=eps, step_size=EPS / 4, steps=5, generator=g)
    before, after = _ce(model, x, y), _ce(model, x_anti, y)
    assert after.mean() < before.mean() and (after < before).float().mean() >= 0.9
    assert torch.all(_linf(x_anti, x) <= (eps if per_sample else torch.full_like(before, EPS)) + 1e-6)
    assert x_anti.min() >= 0 and x_anti.max() <= 1 and model.training


def test_anti_adversary_starts_near_x():
    model, x, y = trained_pattern_net()
    start = anti_adversary(model, x, y, eps=EPS, step_size=0.0, steps=1, generator=torch.Generator().manual_seed(0))
    assert 0 < _linf(start, x).max() <= 0.01, "CAAT's start is x + 0.001 * N(0, I)"


def _ctx(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **fields) -> StepContext:
    return StepContext(model=model, attack_model=model, inputs=x, targets=y, num_classes=4, **fields)


def test_adversarys_adversary_callback_uses_the_context_budget():
    model, x, y = trained_pattern_net()
    eps = torch.linspace(0, 2 * EPS, len(y))
    x_adv = pgd(model, x, y, eps=eps, step_size=EPS / 4, steps=3)
    ctx = _ctx(model, x, y, eps=eps, x_adv=x_adv)
    AdversarysAdversary()(ctx)
    assert torch.equal(ctx.x_anti, adversarys_adversary(model, x, x_adv, y, eps=eps))
    assert torch.equal(ctx.x_anti[0], x[0]), "a zero budget pins the sample to x"
    ctx = _ctx(model, x, y, eps=eps, x_adv=x_adv)
    AdversarysAdversary(steps=2, step_size=EPS / 8)(ctx)
    assert torch.equal(ctx.x_anti, adversarys_adversary(model, x, x_adv, y, eps=eps, step_size=EPS / 8, steps=2))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_uniform_budget_gives_the_same_points_as_the_per_sample_one(norm):
    """``uniform_eps`` only skips a host read: the float and the ``[B]`` budget give identical points."""
    model, x, y = trained_pattern_net()
    x_adv = pgd(model, x, y, eps=EPS, step_size=EPS / 4, steps=3, norm=norm)
    eps = torch.full((len(y),), EPS)
    outputs = []
    for uniform in (None, EPS):
        ctx = _ctx(model, x, y, eps=eps, uniform_eps=uniform, x_adv=x_adv)
        AdversarysAdversary(steps=2, norm=norm)(ctx)
        outputs.append(ctx.x_anti)
    assert torch.equal(*outputs)


def test_anti_adversary_callback_budgets():
    model, x, y = trained_pattern_net()
    eps = torch.linspace(0, 2 * EPS, len(y))
    ctx = _ctx(model, x, y, eps=eps)
    AntiAdversary(step_size=0.5, steps=2, relative_step_size=True)(ctx)
    assert torch.all(_linf(ctx.x_anti, x) <= eps + 1e-6)
    ctx = _ctx(model, x, y)
    AntiAdversary(eps=EPS, steps=2)(ctx)
    assert torch.all(_linf(ctx.x_anti, x) <= EPS + 1e-6) and ctx.eps is None


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 8))
@example(seed=0, batch=1)
def test_generators_are_permutation_equivariant(seed, batch):
    model, x_all, y_all = trained_pattern_net()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(y_all), generator=g)[:batch]
    x, y, eps = x_all[pick], y_all[pick], torch.rand(batch, generator=g) * 2 * EPS
    x_adv = random_start(x, eps.view(-1, 1, 1, 1), "linf", "uniform", g)
    perm = torch.randperm(batch, generator=g)
    # Without a random start the generators are deterministic, so a permuted batch gives permuted outputs.
    for callback in (AdversarysAdversary(steps=2), AntiAdversary(steps=2, start="none")):
        outputs = []
        for order in (torch.arange(batch), perm):
            ctx = _ctx(model, x[order], y[order], eps=eps[order], x_adv=x_adv[order])
            callback(ctx)
            assert torch.isfinite(ctx.x_anti).all()
            outputs.append(ctx.x_anti)
        torch.testing.assert_close(outputs[1], outputs[0][perm], atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [1, 2])
def test_adversarys_adversary_costs_its_steps(steps):
    model, x, y = trained_pattern_net()
    model = copy.deepcopy(model)  # the training forward updates BatchNorm statistics of the shared model
    attack_steps = 3
    step = AdversarialStep(
        [PGDAttack(eps=EPS, step_size=EPS / 4, steps=attack_steps), AdversarysAdversary(steps), AdversarialCE()]
    )
    loss, ctx = step(model, x[:8], y[:8])
    loss.backward()
    assert ctx.passes() == (attack_steps + steps + 1, attack_steps + steps + 1)
    assert torch.all(_linf(ctx.x_anti, ctx.inputs) <= EPS + 1e-6)


def test_compositions():
    # CAAT trains on the anti-adversary of x with its own scalar budget: no attack needed.
    AdversarialStep([AntiAdversary(eps=EPS), AdversarialCE(source="anti")])
    with pytest.raises(CompositionError, match="AntiAdversary needs `eps`"):
        AdversarialStep([AntiAdversary(), AdversarialCE(source="anti")])
    with pytest.raises(CompositionError, match="AdversarysAdversary needs `x_adv`"):
        AdversarialStep([AdversarysAdversary(), AdversarialCE()])
    with pytest.raises(CompositionError, match="`x_anti` is written by both"):
        AdversarialStep([PGDAttack(), AdversarysAdversary(), AntiAdversary(), AdversarialCE()])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AdversarysAdversary(steps=-1), "steps"),
        (lambda: AdversarysAdversary(step_size=-0.1), "step_size"),
        (lambda: AdversarysAdversary(bn_mode="frozen"), "bn_mode"),
        (lambda: AdversarysAdversary(norm="l1"), "norm"),
        (lambda: AntiAdversary(eps=-0.1), "eps"),
        (lambda: AntiAdversary(steps=1.5), "steps"),
        (lambda: AntiAdversary(start="zeros"), "start"),
        (lambda: AntiAdversary(eps=EPS, relative_step_size=True), "relative_step_size"),
    ],
)
def test_bad_settings_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()
