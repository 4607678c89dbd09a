"""FAB-T: its projection onto a hyperplane in the box, its minimum-norm search, and its place in the suite.

The trained model is the MLP of ``test_eval_attacks`` (a synthetic 10-class task of 1x16x16 images).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog
from torch import Tensor, nn

from robustmix.attacks.fab import fab_targeted, hyperplane_step_linf
from robustmix.evaluation.attacks import ATTACKS, DEFAULT_ATTACKS, with_budget
from robustmix.evaluation.worstcase import robust_accuracy, worst_case
from tests.test_eval_attacks import EPS
from tests.toys import MLP, assert_in_ball, noisy_batch_3x8x8, prototype_images, trained_mlp


@pytest.fixture(scope="module")
def model() -> MLP:
    return trained_mlp()


@pytest.fixture(scope="module")
def test_set() -> tuple[Tensor, Tensor]:
    return prototype_images(200, seed=1)


def _predicts(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


# --- the projection onto the linearized boundary ---


def _smallest_linf_step(point: np.ndarray, w: np.ndarray, b: float) -> float | None:
    """min ||d||_inf s.t. <w, point + d> = b, 0 <= point + d <= 1, as a linear program (None: infeasible)."""
    dim = len(point)
    cost = np.r_[np.zeros(dim), 1.0]
    # d_i - t <= 0 and -d_i - t <= 0
    bound_rows = np.block([[np.eye(dim), -np.ones((dim, 1))], [-np.eye(dim), -np.ones((dim, 1))]])
    bounds = [(-p, 1 - p) for p in point] + [(0, None)]
    result = linprog(
        cost, A_ub=bound_rows, b_ub=np.zeros(2 * dim), A_eq=np.r_[w, 0.0][None], b_eq=[b - w @ point], bounds=bounds
    )
    return result.x[-1] if result.status == 0 else None


@settings(max_examples=60, deadline=None)
@given(
    dim=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    gap_scale=st.floats(0.0, 1.2),
    sparsity=st.sampled_from([0.0, 0.3]),
)
def test_hyperplane_step_is_the_smallest_in_the_box(dim, seed, gap_scale, sparsity):
    g = torch.Generator().manual_seed(seed)
    # Some coordinates on the faces of the box, some weights zero.
    point = torch.rand(1, dim, generator=g, dtype=torch.float64).mul(1.4).sub(0.2).clamp(0, 1)
    w = torch.randn(1, dim, generator=g, dtype=torch.float64) * (torch.rand(1, dim, generator=g) >= sparsity)
    sign = 1.0 if torch.rand(1, generator=g).item() < 0.5 else -1.0
    # Up to 1.2x the largest reachable change: some planes are out of the box's reach.
    reach = torch.where(sign * w > 0, 1 - point, point).mul(w.abs()).sum()
    b = (w * point).sum(dim=1) + sign * gap_scale * reach
    d = hyperplane_step_linf(point, w, b)
    moved = point + d
    assert moved.min() >= 0 and moved.max() <= 1
    optimum = _smallest_linf_step(point[0].numpy(), w[0].numpy(), b.item())
    if optimum is not None:
        assert (moved * w).sum().item() == pytest.approx(b.item(), abs=1e-9)
        assert d.abs().max().item() == pytest.approx(optimum, abs=1e-6)
    else:
        # Out of reach: every coordinate that helps sits at its face, the others stay.
        corner = torch.where(sign * w > 0, 1.0, torch.where(sign * w < 0, 0.0, point))
        assert torch.allclose(moved, corner)


# --- the search ---


@pytest.mark.parametrize(
    ("steps", "ratio"),
    [
        # From x both projections are the step d to the boundary: x + eta * d, past it.
        (1, 1.05),
        # Backed off to x + beta * eta * d = x + 0.945 d, the iterate's projection is 0.055 d away and x's
        # is d: alpha = 0.055 / 1.055, and x + ((1 - alpha) * (0.945 + eta * 0.055) + alpha * eta) d.
        (2, 1.0052133),
        # ... which is a fixed point: the search stays there.
        (100, 1.0052133),
    ],
)
def test_fab_closes_in_on_the_boundary_of_a_linear_model(steps, ratio):
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = 0.4 + 0.2 * torch.rand(50, 1, 8, 8, generator=g)
    with torch.no_grad():
        logits = linear(x)
        weight = linear[1].weight
    y = logits.argmax(dim=1)
    # L-inf distance from x to the boundary with class k: (z_y - z_k) / ||w_y - w_k||_1 (the box is far).
    distances = (logits.gather(1, y[:, None]) - logits) / (weight[y][:, None] - weight[None]).abs().sum(dim=2)
    runner_up = logits.scatter(1, y[:, None], float("-inf")).argmax(dim=1, keepdim=True)
    x_adv = fab_targeted(linear, x, y, eps=1.0, steps=steps, n_target_classes=1)
    found = (x_adv - x).flatten(1).abs().amax(dim=1)
    assert (_predicts(linear, x_adv) != y).all()
    assert torch.allclose(found / distances.gather(1, runner_up).squeeze(1), torch.tensor(ratio), rtol=1e-4)


class _Saturating(nn.Module):
    """Two classes; the logit of class 1 is concave along the way, so a step to its linearized boundary falls short."""

    num_classes = 2

    def forward(self, x: Tensor) -> Tensor:
        z_1 = torch.tanh(4 * (x.flatten(1).mean(dim=1) - 0.5))
        return torch.stack([torch.full_like(z_1, 0.5), z_1], dim=1)


def test_fab_t_returns_only_misclassified_points_where_steps_fall_short():
    x = 0.5 + 0.05 * torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(16, dtype=torch.long)
    x_adv = fab_targeted(_Saturating(), x, y, eps=0.5, steps=30)
    # Class 1 wins once the mean pixel passes 0.5 + atanh(0.5) / 4 = 0.637; the iterates short of it are
    # closer to x than any misclassified point.
    assert (_predicts(_Saturating(), x_adv) == 1).all()
    assert ((x_adv - x).abs().amax(dim=(1, 2, 3)) < 0.3).all()


def test_fab_t_is_as_strong_as_apgd_t_on_an_undefended_model(model, test_set):
    x, y = test_set
    clean = (_predicts(model, x) == y).float().mean().item()
    fab_t = robust_accuracy(model, x, y, "fab-t", eps=EPS)
    apgd_t = robust_accuracy(model, x, y, "apgd-t", eps=EPS)
    assert fab_t < clean - 0.3
    assert abs(fab_t - apgd_t) <= 0.03


def test_fab_t_returns_x_or_a_misclassified_point(model, test_set):
    x, y = test_set
    x_adv = fab_targeted(model, x, y, eps=EPS, steps=20)
    assert_in_ball(x_adv, x, EPS)
    moved = (x_adv != x).flatten(1).any(dim=1)
    wrong_clean = _predicts(model, x) != y
    assert moved.sum() > 50
    assert (_predicts(model, x_adv)[moved] != y[moved]).all()
    # Clean-misclassified examples are already adversarial: left as they are.
    assert wrong_clean.any() and not moved[wrong_clean].any()


def test_fab_t_is_deterministic_and_draws_nothing_random(model, test_set):
    x, y = test_set[0][:64], test_set[1][:64]
    first = fab_targeted(model, x, y, eps=EPS, steps=10, n_target_classes=3)
    assert torch.equal(first, fab_targeted(model, x, y, eps=EPS, steps=10, n_target_classes=3))
    assert torch.equal(first, fab_targeted(model, x, y, eps=EPS, steps=10, n_target_classes=3, seed=1))


def test_more_targets_break_more_examples(model, test_set):
    x, y = test_set
    one, three = (fab_targeted(model, x, y, eps=0.03, steps=20, n_target_classes=n) for n in (1, 3))
    assert (_predicts(model, three) != y).sum() >= (_predicts(model, one) != y).sum()
    # A later target only runs where the earlier ones found nothing: their points are kept.
    broken_by_one = _predicts(model, one) != y
    assert torch.equal(three[broken_by_one], one[broken_by_one])


@settings(max_examples=20, deadline=None)
@given(eps=st.floats(0, 0.5), seed=st.integers(0, 2**16), targets=st.integers(1, 6))
def test_fab_t_stays_in_the_ball(eps, seed, targets):
    x, y = noisy_batch_3x8x8(seed)
    tiny = MLP(3 * 8 * 8, num_classes=5).eval()
    assert_in_ball(fab_targeted(tiny, x, y, eps=eps, steps=5, n_target_classes=targets), x, eps)


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 10
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(256, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def test_fab_t_restores_the_model_and_leaves_no_parameter_grads(test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = _BatchNormNet()
    net.train()
    batch_norm = net.body[2]
    running = (batch_norm.running_mean.clone(), batch_norm.running_var.clone(), batch_norm.num_batches_tracked.clone())
    with torch.no_grad():
        fab_targeted(net, x, y, eps=EPS, steps=5, n_target_classes=2)
    assert all(module.training for module in net.modules())
    after = (batch_norm.running_mean, batch_norm.running_var, batch_norm.num_batches_tracked)
    assert all(torch.equal(a, b) for a, b in zip(running, after))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_fab_t_works_inside_no_grad_and_inference_mode(context, model, test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    expected = fab_targeted(model, x, y, eps=EPS, steps=5, n_target_classes=2)
    with context():
        x_ctx, y_ctx = x.clone(), y.clone()
        x_adv = fab_targeted(model, x_ctx, y_ctx, eps=EPS, steps=5, n_target_classes=2)
    assert torch.equal(x_adv, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -0.1}, "eps must be"),
        ({"n_target_classes": 0}, "n_target_classes"),
        ({"alpha_max": 1.5}, "alpha_max"),
        ({"eta": 0.9}, "eta"),
        ({"beta": 0.0}, "beta"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message, model, test_set):
    x, y = test_set[0][:4], test_set[1][:4]
    with pytest.raises(ValueError, match=message):
        fab_targeted(model, x, y, **{"eps": EPS, **kwargs})


# --- in the suite ---


def test_autoattack_standard_set_runs_in_the_suite(model, test_set):
    assert ("fab-t" in DEFAULT_ATTACKS) and ATTACKS["fab-t"].label == "FAB-T" and ATTACKS["fab-t"].white_box
    x, y = test_set[0][:64], test_set[1][:64]
    attacks = [
        with_budget("apgd-ce", steps=20),
        with_budget("apgd-t", steps=10, n_target_classes=3),
        with_budget("fab-t", steps=10, n_target_classes=3),
        with_budget("square", queries=100),
    ]
    result = worst_case(model, x, y, attacks, eps=EPS)
    assert result["attack"] == "worst case over APGD-CE, APGD-T, FAB-T, Square"
    assert result["worst_case"] <= result["standalone"]["fab-t"] < result["clean"]
