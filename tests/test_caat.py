"""CAAT: combination weights, features, loss, class-wise budgets and weights, the outer loss, the cost and state."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from robustmix import AdversarialStep, CompositionError, PGDAttack
from robustmix.cli.recipe import RecipeInfo, parse_args
from robustmix.core.context import StepContext
from robustmix.core.modes import model_mode
from robustmix.data import load_dataset
from robustmix.methods.caat import (
    REMARGIN_BOUNDS,
    CAATLoss,
    CAATMetaNet,
    ClassWiseBudget,
    ReMarginBudget,
    caat_features,
    caat_loss,
    class_accuracy_counts,
    frl_class_weights,
    frl_update,
    remargin_multipliers,
)
from robustmix.methods.meta import MetaBatches
from robustmix.runs.checkpoint import join_state, split_state
from robustmix.stages.anti import AntiAdversary
from tests.conftest import load_recipe
from tests.toys import SmallConvNet, batch_4x4

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


def test_class_weights_normalize_the_clean_and_kl_terms_over_the_batch():
    clean = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    adv = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    anti = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    alpha, beta = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5])
    w0, w1 = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.2])
    ce = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1))]
    p, q = [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))], [1 / (1 + math.exp(-1)), 0.5]
    kl = [p[0] * math.log(p[0] / q[0]) + (1 - p[0]) * math.log((1 - p[0]) / (1 - q[0])),
          (1 - p[1]) * math.log((1 - p[1]) / (1 - q[1])) + p[1] * math.log(p[1] / q[1])]  # fmt: skip
    ce_anti = [math.log(1 + math.exp(-3)), math.log(2)]
    expected = (
        (1.0 * 0.1 * ce[0] + 0.5 * 0.3 * ce[1]) / 0.4
        + 1.5 * (1.0 * 0.2 * kl[0] + 0.5 * 0.2 * kl[1]) / 0.4
        + (0.0 * ce_anti[0] + 0.5 * ce_anti[1]) / 2
    )
    got = caat_loss(clean, adv, anti, y, alpha, beta, 1.5, clean_weights=w0, kl_weights=w1)
    torch.testing.assert_close(got, torch.tensor(expected))
    # Weights of one value everywhere are no weights at all.
    same = caat_loss(clean, adv, anti, y, alpha, beta, 1.5, clean_weights=torch.full((2,), 0.7), kl_weights=w1)
    torch.testing.assert_close(same, caat_loss(clean, adv, anti, y, alpha, beta, 1.5))


def _caat(
    model: nn.Module,
    *,
    steps: int = 2,
    meta_every: int = 2,
    multipliers=(1.0, 1.5, 0.5),
    net=None,
    meta_objective: str = "caat",
    budget=None,
):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    meta = MetaBatches(*batch_4x4(12, seed=5), batch_size=8, seed=0)
    budget = ClassWiseBudget(0.1, multipliers) if budget is None else budget
    attack = PGDAttack(None, 0.02, steps, loss="kl", start="normal")
    anti = AntiAdversary(None, 0.02, steps)
    loss = CAATLoss(
        3, meta, meta_every=meta_every, optimizer=optimizer, net=net, meta_objective=meta_objective,
        meta_perturbations=(budget, attack, anti),
        class_weights=budget if isinstance(budget, ReMarginBudget) else None,
    )  # fmt: skip
    return AdversarialStep([budget, attack, anti, loss]), loss, optimizer


def test_class_wise_budget_bounds_attack_and_anti_adversary():
    step, _, _ = _caat(SmallConvNet(), meta_every=1000)
    x, y = batch_4x4()
    _, ctx = step(SmallConvNet(), x, y, step=1)
    torch.testing.assert_close(ctx.eps, 0.1 * torch.tensor([1.0, 1.5, 0.5])[y])
    for perturbed in (ctx.x_adv, ctx.x_anti):
        assert torch.all((perturbed - x).abs().flatten(1).amax(dim=1) <= ctx.eps + 1e-6)
    with pytest.raises(ValueError, match=">= 0"):
        ClassWiseBudget(0.1, [1.0, -1.0])


@pytest.mark.parametrize(
    ("meta_objective", "extra"),
    [
        # The lookahead adds 3 virtual forwards of the batch and, at theta', 1 forward of the meta batch (same
        # size here) ...
        ("clean", (4, 4)),
        # ... or its KL attack (1 eval forward of x_meta, K steps) and anti-adversary (K steps) and 3 forwards.
        ("caat", (3 + 1 + 2 * 2 + 3, 3 + 2 * 2 + 3)),
    ],
)
def test_cost_per_step_with_and_without_the_lookahead(meta_objective, extra):
    model = SmallConvNet()
    step, callback, _ = _caat(model, steps=2, meta_every=2, meta_objective=meta_objective)
    x, y = batch_4x4()
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
    # K = K_anti = 2: one eval forward of x (KL attack), 2K attack and anti-adversary passes, 3 training forwards.
    assert ctx.passes() == (1 + 2 * 2 + 3 + extra[0], 2 * 2 + 3 + extra[1])
    after_lookahead = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(stats_before)
    torch.manual_seed(3)
    loss, ctx = step(model, x, y, step=1)  # no lookahead
    loss.backward()
    assert ctx.passes() == (1 + 2 * 2 + 3, 2 * 2 + 3)
    # ... and its BatchNorm statistics: only the real step's training forwards moved them.
    assert all(torch.equal(v, after_lookahead[k]) for k, v in model.state_dict().items())


def test_class_average_losses_become_the_next_epochs_feature():
    model = SmallConvNet()
    step, callback, _ = _caat(model, meta_every=1000)
    ce = []
    for i in range(2):
        x, y = batch_4x4(6, seed=i)
        _, ctx = step(model, x, y, step=1 + i)
        ce.append((F.cross_entropy(ctx.logits["clean"].detach(), y, reduction="none"), y))
    assert torch.equal(callback.class_loss, torch.full((3,), math.log(3)))
    step.fire("on_epoch_end", None, 0)
    losses, labels = torch.cat([c for c, _ in ce]), torch.cat([y for _, y in ce])
    expected = torch.stack([losses[labels == k].mean() for k in range(3)])
    torch.testing.assert_close(callback.class_loss, expected)


def test_state_dict_round_trips_through_a_checkpoint():
    model = SmallConvNet()
    step, callback, optimizer = _caat(model, meta_every=1)
    x, y = batch_4x4()
    for i in range(2):
        loss, _ = step(model, x, y, step=i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tensors, values = split_state(step.state_dict())
    twin, twin_callback, _ = _caat(SmallConvNet(), meta_every=1)
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
    meta = MetaBatches(*batch_4x4(4), batch_size=2)
    with pytest.raises(CompositionError, match="AntiAdversary"):
        AdversarialStep([PGDAttack(0.1, 0.02, 1), CAATLoss(3, meta, meta_objective="clean")])
    with pytest.raises(ValueError, match="meta_perturbations that write x_adv and x_anti"):
        CAATLoss(3, meta, meta_perturbations=(PGDAttack(0.1, 0.02, 1),))
    with pytest.raises(ValueError, match="meta_objective must be one of"):
        CAATLoss(3, meta, meta_objective="adversarial")


def test_the_released_outer_loss_is_the_caat_loss_at_unit_weights_on_the_meta_batchs_own_perturbations():
    model = SmallConvNet()
    budget = ReMarginBudget(0.1, 3, *batch_4x4(6, seed=7))
    budget.load_state_dict({"lam": torch.tensor([[0.2, 0.0, 0.1], [0.0, 0.3, 0.0], [0.2, -0.1, 0.4]])})
    step, callback, _ = _caat(model, meta_every=1, budget=budget)
    net_before, stepped = copy.deepcopy(callback.net), copy.deepcopy(model)
    x, y = batch_4x4()
    torch.manual_seed(3)
    _, ctx = step(model, x, y, step=0)

    # By hand: the step's perturbations with the same random starts, its clean training forward (which moves the
    # BatchNorm statistics before the lookahead), a real SGD step of a copy of the model on the loss at the weights
    # before the meta update, then the meta batch's perturbations against the stepped copy.
    torch.manual_seed(3)
    seen = StepContext(stepped, stepped, x, y, 3)
    for perturbation in callback.meta_perturbations:
        perturbation(seen)
    features = caat_features(stepped.train()(x), y, callback.class_loss, callback.class_proportions)
    alpha, beta = net_before.train()(features).detach().unbind(dim=1)
    sgd = torch.optim.SGD(stepped.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    w = torch.tensor([[0.2, 0.0, 0.1], [0.0, 0.3, 0.0]])
    w = 1 / 3 + w - w.sum(dim=1, keepdim=True) / 3
    with model_mode(stepped, "train_frozen_bn"):
        logits = [stepped(v) for v in (x, seen.x_adv, seen.x_anti)]
    caat_loss(*logits, y, alpha, beta, 1.5, clean_weights=w[0][y], kl_weights=w[1][y]).backward()
    sgd.step()
    x_meta, y_meta = next(MetaBatches(*batch_4x4(12, seed=5), batch_size=8, seed=0))
    on_meta = StepContext(stepped, stepped, x_meta, y_meta, 3)
    for perturbation in callback.meta_perturbations:
        perturbation(on_meta)
    torch.testing.assert_close(on_meta.eps, 0.1 * torch.exp(2 * torch.tensor([0.2, -0.1, 0.4])).clamp(0.98)[y_meta])
    with model_mode(stepped, "train_frozen_bn"):
        logits = [stepped(v) for v in (x_meta, on_meta.x_adv, on_meta.x_anti)]
    ones = torch.ones(8)
    expected = caat_loss(*logits, y_meta, ones, ones, 1.5, clean_weights=w[0][y_meta], kl_weights=w[1][y_meta])
    torch.testing.assert_close(ctx.extras["CAATLoss_meta_loss"], expected.detach())


@settings(max_examples=60, deadline=None)
@given(lam2=st.lists(st.floats(-5, 5), min_size=2, max_size=10).map(torch.tensor))
def test_remargin_multipliers_are_bounded_and_monotone(lam2):
    c = remargin_multipliers(lam2)
    assert torch.all(c >= REMARGIN_BOUNDS[0]) and torch.all(c <= REMARGIN_BOUNDS[1])
    order = torch.argsort(lam2)
    assert torch.all(c[order][1:] >= c[order][:-1])
    torch.testing.assert_close(remargin_multipliers(torch.tensor([0.0, 0.1, -1.0, 1.0])),
                               torch.tensor([1.0, math.exp(0.2), 0.98, 2.5]))  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(lam=st.lists(st.floats(0, 1), min_size=2, max_size=10).map(torch.tensor))
def test_frl_class_weights_sum_to_one_stay_positive_and_match_the_released_ten_class_sums(lam):
    lam = lam * 0.5 / max(1.0, lam.sum().item() / 0.5)  # >= 0 and summing to at most 0.5, as frl_update keeps it
    w = frl_class_weights(lam)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    assert torch.all(w > 0)
    c = len(lam)
    # The released code's loop: 1/C, plus (C - 1)/C of the class's own multiplier, minus 1/C of every other one.
    looped = [1 / c + (c - 1) / c * lam[i] - sum(lam[j] for j in range(c) if j != i) / c for i in range(c)]
    torch.testing.assert_close(w, torch.stack(looped).float())


def test_frl_update_by_hand():
    counts = torch.tensor([[10.0, 10.0, 20.0], [9.0, 5.0, 16.0], [6.0, 2.0, 12.0]])  # examples, clean, robust
    lam = torch.tensor([[0.3, 0.3, 0.0], [0.0, 0.1, 0.2], [0.1, 0.0, -0.1]])
    # Clean errors 0.1, 0.5, 0.2 (all: 0.25) and boundary errors 0.3, 0.3, 0.2 (all: 0.25), less the tolerance 0.07:
    # gaps -0.22, 0.18, -0.12 (clean) and -0.02, -0.02, -0.12 (boundary).
    lam0 = torch.tensor([0.3 - 0.011, 0.3 + 0.009, 0.0])  # 0.05 * gap; the third clamped at 0; sum 0.598 > 0.5
    lam1 = torch.tensor([0.0, 0.1 - 0.002, 0.2 - 0.012])  # 2 * 0.05 * gap; the first clamped at 0; sum 0.286
    lam2 = torch.tensor([0.1 - 0.004, 0.0 - 0.004, -0.1 - 0.024])  # 0.2 * gap, not clamped
    torch.testing.assert_close(frl_update(lam, counts), torch.stack([lam0 * 0.5 / 0.598, lam1, lam2]))
    # A class without held-out examples has the overall errors: it only drifts by the tolerance.
    empty = frl_update(torch.zeros(3, 2), torch.tensor([[4.0, 0.0], [3.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(empty[2], torch.tensor([-0.2 * 0.07, -0.2 * 0.07]))


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


def test_class_counts_and_the_epoch_update_of_the_remargin_budget():
    x = torch.tensor([[0.1], [0.45], [0.9], [0.55], [0.7]])
    y = torch.tensor([0, 0, 1, 1, 1])
    # All five are classified correctly; within 0.1 of the boundary: 1 of class 0's two, 1 of class 1's three.
    counts = class_accuracy_counts(Threshold(), x, y, 2, eps=0.1, step_size=0.1, steps=2, batch_size=2)
    assert torch.equal(counts, torch.tensor([[2.0, 3.0], [2.0, 3.0], [1.0, 2.0]]))
    constant = class_accuracy_counts(Constant([0.0, 1.0]), x, y, 2, eps=0.3, step_size=0.1, steps=2)
    assert torch.equal(constant, torch.tensor([[2.0, 3.0], [0.0, 3.0], [0.0, 3.0]]))

    budget = ReMarginBudget(0.1, 2, x, y, step_size=0.1, steps=2)
    assert torch.equal(budget.multipliers, torch.ones(2)) and torch.equal(budget.clean_weights, torch.full((2,), 0.5))
    rows = []
    budget.on_epoch_start(SimpleNamespace(model=Threshold(), log=rows.append), 0)
    # Boundary errors 1/2, 1/3 (all: 2/5), clean errors 0: the clean multipliers stay at 0, the others step.
    gap = torch.tensor([0.5 - 0.4 - 0.07, 1 / 3 - 0.4 - 0.07])
    lam1 = torch.tensor([0.1 * gap[0], 0.0])
    torch.testing.assert_close(budget.lam, torch.stack([torch.zeros(2), lam1, 0.2 * gap]))
    torch.testing.assert_close(budget.multipliers, torch.tensor([math.exp(0.4 * gap[0]), 0.98]))
    torch.testing.assert_close(budget.kl_weights, torch.tensor([0.5 + lam1[0] / 2, 0.5 - lam1[0] / 2]))
    assert rows == [pytest.approx({"remargin_clean_error": 0.0, "remargin_boundary_error": 0.4,
                                   "remargin_eps_multiplier_min": 0.98,
                                   "remargin_eps_multiplier_max": math.exp(0.4 * gap[0].item())})]  # fmt: skip
    ctx = StepContext(Threshold(), Threshold(), x, y, 2)
    budget(ctx)
    torch.testing.assert_close(ctx.eps, 0.1 * budget.multipliers[y])

    restored = ReMarginBudget(0.1, 2, x, y)
    restored.load_state_dict(join_state(*split_state(budget.state_dict())))
    for name in ("lam", "multipliers", "clean_weights", "kl_weights"):
        assert torch.equal(getattr(restored, name), getattr(budget, name)), name


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
    model = SmallConvNet()
    step, callback, _ = _caat(model, meta_every=1, net=CAATMetaNet(init="even"))
    x, y = batch_4x4()
    step(model, x, y, step=0)  # a lookahead step: one Adam step of the net
    assert callback.net.mlp[2].weight.abs().sum() > 0
    alpha = callback.net(torch.randn(8, 6))[:, 0]
    assert not torch.equal(alpha, torch.full((8,), 0.5))


@pytest.mark.parametrize(("steps_per_epoch", "meta_every"), [(10, 1), (360, 49), (367, 50), (404, 55)])
def test_the_recipe_scales_the_released_protocol_to_the_run(tmp_path, steps_per_epoch, meta_every):
    recipe = load_recipe("caat")

    def flags(*argv):
        return parse_args(recipe.parser(), ["--output-dir", str(tmp_path / "run"), *argv], recipe.DEFAULTS)

    args = flags()
    # Steps of eps/5 (the released 2/255 at 10/255), 10 of them, whatever a sample's multiplier.
    assert (args.step_size, args.attack_steps) == (pytest.approx(0.1 / 5), 10)
    # 6% of the training split (3,000 of CIFAR-10's 50,000): 75.42 -> 75 of digits' 1,257; 30 of --train-size 500.
    assert recipe.default_meta_size(args) == 75
    assert recipe.default_meta_size(flags("--train-size", "500")) == 30
    train, val = (load_dataset("digits", split) for split in ("train", "validation"))
    train, meta = train.hold_out(75, "meta")
    info = RecipeInfo(10, train, val, 10, steps_per_epoch, 10 * steps_per_epoch, 1, meta)
    budget, attack, anti, loss = recipe.build_callbacks(args, info)
    assert isinstance(budget, ReMarginBudget) and (budget.eps, budget.steps, budget.step_size) == (0.1, 20, 0.025)
    for perturbation in (attack, anti):
        assert perturbation.step_size == args.step_size and perturbation.steps == 10
        assert not perturbation.relative_step_size
    # A meta step every 50 of the released 367 steps per epoch: the same fraction of this run's epoch.
    assert loss.meta_every == meta_every
    assert (loss.meta_objective, loss.class_weights, loss.meta_lr) == ("caat", budget, 1e-4)
    assert loss.meta_optimizer.param_groups[0]["weight_decay"] == 5e-4
    assert loss.meta_perturbations == [budget, attack, anti]

    args = flags("--meta-objective", "clean", "--class-weights", "none", "--meta-every", "7")
    budget, _, _, loss = recipe.build_callbacks(args, info)
    assert type(budget) is ClassWiseBudget and torch.equal(budget.multipliers, torch.ones(10))
    assert (loss.meta_objective, loss.class_weights, loss.meta_every) == ("clean", None, 7)
