"""Evaluation attacks (APGD, APGD-T, Square; FAB-T in test_fab.py) and the worst-case suite with its sanity flags.

The models are trained here in about a second: an MLP on a synthetic 10-class task of 1x16x16
images (a smooth prototype per class plus noise), and the same network behind a quantizing input
layer ``round(4x) / 4`` whose gradient is zero (a textbook case of gradient masking).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from robustmix.attacks.apgd import apgd, apgd_checkpoints, apgd_targeted
from robustmix.attacks.square import nonempty_flips, square_attack, square_p, square_proposal
from robustmix.evaluation.attacks import ATTACKS, AttackSpec, pgd_eval
from robustmix.evaluation.worstcase import eps_sweep, robust_accuracy, sanity_flags, worst_case
from tests.toys import MLP, assert_in_ball, noisy_batch_3x8x8, prototype_images, trained_mlp

EPS = 0.05
#: Smaller budgets for tests that check constraints rather than strength.
CHEAP = {
    "pgd100": {"steps": 30},
    "apgd-ce": {"steps": 30},
    "apgd-t": {"steps": 20},
    "fab-t": {"steps": 20, "n_target_classes": 3},
    "square": {"queries": 300},
}


@pytest.fixture(scope="module")
def test_set() -> tuple[Tensor, Tensor]:
    return prototype_images(200, seed=1)


@pytest.fixture(scope="module")
def model() -> MLP:
    return trained_mlp()


@pytest.fixture(scope="module")
def masked_model() -> MLP:
    return trained_mlp(quantize=True)


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def _cheap(name: str) -> AttackSpec:
    spec = ATTACKS[name]
    return dataclasses.replace(spec, kwargs={**spec.kwargs, **CHEAP.get(name, {})})


# --- APGD step-size schedule ---


def test_apgd_checkpoints_match_the_paper():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1000) == [220, 410, 570, 700, 800, 870, 930, 990]
    assert apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]


@given(steps=st.integers(1, 3000))
def test_apgd_checkpoints_follow_the_recurrence(steps):
    fractions, previous, current = [], 0.0, 0.22
    while current <= 1 + 1e-9:
        fractions.append(current)
        previous, current = current, current + max(current - previous - 0.03, 0.06)
    # Rounding before ceil: the recurrence's float error must not push 41.0 to 42.
    expected = sorted({math.ceil(round(p * steps, 6)) for p in fractions} - {0})
    assert apgd_checkpoints(steps) == expected


#: AutoAttack's standard Square (5000 queries, p_init 0.8): p after iteration i, halving after 10, 50, 200,
#: 500, 1000, 2000 and 4000; the thresholds 6000 and 8000 lie past the budget.
SQUARE_P_5000 = {
    0: 0.8, 10: 0.8, 11: 0.4, 50: 0.4, 51: 0.2, 200: 0.2, 201: 0.1, 500: 0.1, 501: 0.05,
    1000: 0.05, 1001: 0.025, 2000: 0.025, 2001: 0.0125, 4000: 0.0125, 4001: 0.00625, 4999: 0.00625,
}  # fmt: skip


def test_square_p_schedule_is_autoattack_standard():
    assert {i: square_p(i, 5000, 0.8) for i in SQUARE_P_5000} == pytest.approx(SQUARE_P_5000, rel=1e-12)
    # The thresholds do not depend on the budget.
    assert square_p(11, 100, 0.8) == square_p(11, 20000, 0.8) == 0.4
    assert square_p(9000, 10000, 0.8) == 0.8 / 512


def test_square_p_rescaled_schedule_runs_whole_over_any_budget():
    # Iteration i of 5000 reads the schedule at 2i: each halving comes twice as early.
    assert [square_p(i, 5000, 0.8, rescale=True) for i in (5, 6, 25, 26, 2000, 2001, 4001)] == [
        0.8, 0.4, 0.4, 0.2, 0.8 / 64, 0.8 / 128, 0.8 / 512,
    ]  # fmt: skip
    assert square_p(1, 1000, 0.8, rescale=True) == 0.8 and square_p(2, 1000, 0.8, rescale=True) == 0.4
    assert [square_p(i, 500, 0.8, rescale=True) for i in range(500)] == sorted(
        (square_p(i, 500, 0.8, rescale=True) for i in range(500)), reverse=True
    )


def test_square_schedule_choice_changes_the_windows(model, test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    standard = square_attack(model, x, y, eps=EPS, queries=40)
    assert torch.equal(standard, square_attack(model, x, y, eps=EPS, queries=40, rescale_schedule=False))
    assert not torch.equal(standard, square_attack(model, x, y, eps=EPS, queries=40, rescale_schedule=True))


class _Bowl(nn.Module):
    """Two classes; the CE of class 0 peaks at ``center``, inside the ball: fixed sign steps oscillate around it."""

    def __init__(self, center: Tensor) -> None:
        super().__init__()
        self.register_buffer("center", center)

    def forward(self, x: Tensor) -> Tensor:
        peak = -((x - self.center) ** 2).flatten(1).sum(dim=1)
        return torch.stack([torch.zeros_like(peak), peak], dim=1)


def test_apgd_halves_its_step_to_settle_on_an_interior_maximum():
    x = torch.full((8, 1, 4, 4), 0.5)
    center = 0.5 + 0.08 * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 1)
    y = torch.zeros(8, dtype=torch.long)
    # 100 steps pass 8 checkpoints: the step can shrink from 2 * eps = 0.2 to 0.2 / 256.
    x_adv = apgd(_Bowl(center), x, y, eps=0.1, steps=100)
    assert (x_adv - center).abs().max() < 0.002
    # A fixed step (PGD) keeps bouncing around the peak.
    assert (pgd_eval(_Bowl(center), x, y, eps=0.1, steps=100) - center).abs().max() > 0.01


# --- strength on a trained model ---


def test_apgd_ce_at_least_as_strong_as_pgd20(model, test_set):
    x, y = test_set
    pgd20 = robust_accuracy(model, x, y, "pgd20", eps=EPS)
    apgd_ce = robust_accuracy(model, x, y, "apgd-ce", eps=EPS)
    assert apgd_ce <= pgd20 < _accuracy(model, x, y)


def test_apgd_targeted_attacks_within_the_ball(model, test_set):
    x, y = test_set
    x_adv = apgd_targeted(model, x, y, eps=EPS, steps=30)
    assert_in_ball(x_adv, x, EPS)
    assert _accuracy(model, x_adv, y) < _accuracy(model, x, y) - 0.2


def test_apgd_l2_attacks_within_the_ball(model, test_set):
    x, y = test_set
    x_adv = apgd(model, x, y, eps=1.0, steps=30, norm="l2", loss="dlr")
    assert_in_ball(x_adv, x, 1.0, norm="l2")
    assert _accuracy(model, x_adv, y) < _accuracy(model, x, y) - 0.2


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_registered_attack_stays_in_the_ball(name, model, test_set):
    x, y = test_set[0][:64], test_set[1][:64]
    x_adv = _cheap(name)(model, x, y, eps=EPS)
    assert_in_ball(x_adv, x, EPS)
    assert _accuracy(model, x_adv, y) < _accuracy(model, x, y)


# --- the worst case ---


def test_worst_case_is_not_above_any_single_attack(model, test_set):
    x, y = test_set
    attacks = ["pgd20", _cheap("apgd-ce"), _cheap("square")]
    result = worst_case(model, x, y, attacks, eps=EPS, batch_size=128)
    assert result["attack"] == "worst case over PGD-20, APGD-CE, Square"
    assert result["attacks"] == ["pgd20", "apgd-ce", "square"]
    assert result["clean"] == pytest.approx(_accuracy(model, x, y))
    assert result["robust"].shape == (200,) and result["robust"].dtype == torch.bool
    assert result["worst_case"] == pytest.approx(result["robust"].float().mean().item())
    for name in result["attacks"]:
        assert result["worst_case"] <= result["standalone"][name] <= result["clean"]
    cumulative = list(result["cumulative"].values())
    assert cumulative == sorted(cumulative, reverse=True) and cumulative[-1] == result["worst_case"]
    # Standalone numbers are single attacks: the first one's equals the first cumulative one.
    assert result["standalone"]["pgd20"] == result["cumulative"]["pgd20"]
    assert result["standalone"]["pgd20"] == robust_accuracy(model, x, y, "pgd20", eps=EPS, batch_size=128)


@pytest.mark.parametrize("standalone", [True, False])
def test_only_examples_still_correct_are_attacked(standalone, model, test_set):
    x, y = test_set
    seen = []

    def spy(model, x, y, *, eps, seed):
        seen.append(x.shape[0])
        return x

    result = worst_case(model, x, y, ["pgd20", AttackSpec("spy", "Spy", spy)], eps=EPS, standalone=standalone)
    n_clean, n_after_pgd = round(result["clean"] * 200), round(result["cumulative"]["pgd20"] * 200)
    assert sum(seen) == (n_clean if standalone else n_after_pgd)
    assert result["worst_case"] == result["cumulative"]["pgd20"]


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_evaluation_works_inside_no_grad_and_inference_mode(context, model, test_set):
    x, y = test_set[0][:64], test_set[1][:64]
    expected = worst_case(model, x, y, ["pgd20", _cheap("apgd-ce")], eps=EPS)
    with context():
        x_ctx, y_ctx = x.clone(), y.clone()
        result = worst_case(model, x_ctx, y_ctx, ["pgd20", _cheap("apgd-ce")], eps=EPS)
    assert result["worst_case"] == expected["worst_case"] < expected["clean"]
    assert torch.equal(result["robust"], expected["robust"])


def test_evaluation_restores_the_model_and_leaves_no_parameter_grads(model, test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    model.train()
    try:
        worst_case(model, x, y, [_cheap("apgd-ce"), _cheap("apgd-t")], eps=EPS)
        assert all(module.training for module in model.modules())
    finally:
        model.eval()
    assert all(p.grad is None for p in model.parameters())


class _AutocastDependent(nn.Module):
    """Under autocast every point looks like its nearest clean image; in fp32 only the clean image itself does."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__()
        self.num_classes = 10
        self.register_buffer("clean", x)
        self.register_buffer("labels", y)

    def forward(self, x: Tensor) -> Tensor:
        distance = (x[:, None] - self.clean[None]).flatten(2).abs().amax(dim=2)
        nearest = distance.argmin(dim=1)
        label = self.labels[nearest]
        if not torch.is_autocast_enabled("cpu"):
            label = torch.where(distance.amin(dim=1) == 0, label, (label + 1) % 10)
        # The x term keeps a gradient path for the attack.
        return 10.0 * F.one_hot(label, 10).float() + 0 * x.flatten(1)[:, :1]


def test_examples_are_decided_by_the_fp32_model(test_set):
    x, y = test_set[0][:16], test_set[1][:16]
    model = _AutocastDependent(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (model(x + 0.01).argmax(dim=1) == y).all()
        result = worst_case(model, x, y, ["pgd20"], eps=EPS)
    assert result["clean"] == 1.0
    assert result["worst_case"] == 0.0


# --- Square: no gradients ---


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        return logits.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        raise RuntimeError("this model has no gradients")


class _BlackBox(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes

    def forward(self, x: Tensor) -> Tensor:
        return _NoBackward.apply(self.model(x))


def test_square_needs_no_gradients(model, test_set):
    x, y = test_set
    black_box = _BlackBox(model)
    with pytest.raises(RuntimeError, match="no gradients"):
        pgd_eval(black_box, x, y, eps=EPS, steps=1)
    x_adv = square_attack(black_box, x, y, eps=EPS, queries=500)
    assert_in_ball(x_adv, x, EPS)
    assert _accuracy(model, x_adv, y) < _accuracy(model, x, y) - 0.2


def test_square_leaves_misclassified_examples_alone(model, test_set):
    x, y = test_set
    start = square_attack(model, x, y, eps=EPS, queries=0)
    x_adv = square_attack(model, x, y, eps=EPS, queries=200)
    fooled_at_start = model(start).argmax(dim=1) != y
    assert 0 < fooled_at_start.sum() < 200
    assert torch.equal(x_adv[fooled_at_start], start[fooled_at_start])
    # The start is vertical stripes: one sign per column of each channel.
    column_signs = (start - x).sum(dim=2, keepdim=True).sign()
    assert torch.allclose(start, (x + EPS * column_signs).clamp(0, 1))


@pytest.mark.parametrize("channels", [1, 3])
def test_square_proposals_always_change_the_image(channels):
    # With 1-pixel windows, a redrawn sign equals the current one half of the time (grayscale): the
    # reference redraws those, which must not waste queries here either.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, channels, 6, 6, generator=g)
    column_signs = torch.randint(0, 2, (64, channels, 1, 6), generator=g) * 2 - 1
    x_best = (x + 0.1 * column_signs).clamp(0, 1)
    for _ in range(50):
        x_new = square_proposal(x, x_best, 1, 0.1, g)
        assert (x_new != x_best).flatten(1).any(dim=1).all()
        assert ((x_new != x_best).flatten(1).sum(dim=1) <= channels).all()
        x_best = x_new


def test_square_flips_a_uniform_non_empty_channel_subset():
    flips = nonempty_flips(7000, 3, torch.Generator().manual_seed(0), torch.zeros(()))
    patterns = torch.unique((flips.view(-1, 3) < 0).long() @ torch.tensor([1, 2, 4]), return_counts=True)
    assert patterns[0].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert (abs(patterns[1] - 1000) < 150).all()


# --- sanity flags ---


def test_flags_fire_on_a_gradient_masking_model(masked_model, model, test_set):
    x, y = test_set
    attacks = ["pgd20", _cheap("apgd-ce"), _cheap("square")]
    masked = worst_case(masked_model, x, y, attacks, eps=EPS, record_loss=True)
    assert masked["standalone"]["pgd20"] >= masked["clean"] - 0.05
    assert masked["standalone"]["square"] < masked["standalone"]["apgd-ce"] - 0.2
    flags = sanity_flags(masked)
    assert any(flag.startswith("gradient masking: Square") for flag in flags)
    assert any(flag.startswith("loss trace: the mean PGD-20 loss") for flag in flags)

    honest = worst_case(model, x, y, attacks, eps=EPS, record_loss=True)
    assert honest["loss_trace"]["pgd20"][-1] > honest["loss_trace"]["pgd20"][0]
    assert sanity_flags(honest) == []


def test_eps_sweep_falls_to_zero_and_flags_a_model_that_never_breaks(model, test_set):
    x, y = test_set[0][:64], test_set[1][:64]
    sweep = eps_sweep(model, x, y, [0.0, EPS, 0.5])
    assert sweep[0.0] == _accuracy(model, x, y) and sweep[0.5] == 0.0
    assert sanity_flags({"eps_sweep": sweep}) == []
    stuck = {0.0: 0.9, 0.02: 0.9, 0.5: 0.6}
    assert [flag.split(":")[0] for flag in sanity_flags({"eps_sweep": stuck})] == ["eps sweep"]


def test_sanity_flags_rules():
    ok = {
        "attack": "worst case over APGD-CE, Square",
        "clean": 0.8,
        "standalone": {"pgd20": 0.5, "pgd100": 0.49, "apgd-ce": 0.47, "square": 0.52},
        "worst_case": 0.46,
        "eps_sweep": {0.0: 0.8, 0.03: 0.46, 0.5: 0.0},
        "loss_trace": {"pgd20": [1.0, 1.5, 1.7]},
    }
    assert sanity_flags(ok) == []
    ordering = {**ok, "standalone": {**ok["standalone"], "pgd100": 0.55}}
    assert [f for f in sanity_flags(ordering) if "PGD-100 accuracy 0.5500 is above PGD-20" in f]
    assert sanity_flags({**ok, "worst_case": 0.6})[0].startswith("ordering: worst case over APGD-CE, Square")
    black_box = {**ok, "standalone": {**ok["standalone"], "square": 0.3}}
    assert [f.split(":")[0] for f in sanity_flags(black_box)] == ["gradient masking"]
    rising = {**ok, "eps_sweep": {0.0: 0.8, 0.03: 0.2, 0.1: 0.4, 0.5: 0.0}}
    assert [f.split(":")[0] for f in sanity_flags(rising)] == ["eps sweep"]
    flat = {**ok, "loss_trace": {"cw": [2.0, 2.0, 2.0]}}
    assert [f.split(":")[0] for f in sanity_flags(flat)] == ["loss trace"]
    # Within the tolerance nothing fires: a finite test set is noisy.
    assert sanity_flags({**ok, "worst_case": 0.495}) == []


# --- determinism and errors ---


def test_attacks_are_deterministic_under_a_seed(model, test_set):
    x, y = test_set[0][:64], test_set[1][:64]
    for attack in (
        lambda seed: apgd(model, x, y, eps=EPS, steps=10, restarts=2, seed=seed),
        lambda seed: apgd_targeted(model, x, y, eps=EPS, steps=5, n_target_classes=2, seed=seed),
        lambda seed: square_attack(model, x, y, eps=EPS, queries=50, seed=seed),
    ):
        assert torch.equal(attack(0), attack(0))
        assert not torch.equal(attack(0), attack(1))


def test_apgd_targeted_needs_four_classes():
    x = torch.rand(4, 1, 4, 4)
    with pytest.raises(ValueError, match="at least 4 classes"):
        apgd_targeted(MLP(16, num_classes=3), x, torch.zeros(4, dtype=torch.long), eps=0.1, steps=2)
    # With 4 classes there are 3 wrong classes to target.
    x_adv = apgd_targeted(MLP(16, num_classes=4), x, torch.zeros(4, dtype=torch.long), eps=0.1, steps=2)
    assert_in_ball(x_adv, x, 0.1)
    with pytest.raises(ValueError, match="APGD-T needs at least 4 classes"):
        worst_case(MLP(16, num_classes=3), x, torch.zeros(4, dtype=torch.long), ["pgd20", "apgd-t"], eps=0.1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, x, y: worst_case(m, x, y, ["pgd7"], eps=EPS), "unknown evaluation attack 'pgd7'"),
        (lambda m, x, y: worst_case(m, x, y, [], eps=EPS), "at least one attack"),
        (lambda m, x, y: worst_case(m, x, y, ["pgd20", "pgd20"], eps=EPS), "must not repeat"),
        (lambda m, x, y: worst_case(m, x * 4 - 2, y, ["pgd20"], eps=EPS), r"pixels in \[0, 1\]"),
        (lambda m, x, y: worst_case(m, x, y, ["pgd20"], eps=-1.0), "eps must be"),
        (lambda m, x, y: apgd(m, x, y, eps=EPS, loss="kl"), "unknown APGD loss"),
        (lambda m, x, y: apgd(m, x, y, eps=EPS, loss="targeted_dlr"), "target_class"),
        (lambda m, x, y: square_attack(m, x.flatten(1), y, eps=EPS), r"\[B, C, H, W\]"),
    ],
)
def test_bad_input_is_rejected(call, message, model, test_set):
    with pytest.raises(ValueError, match=message):
        call(model, test_set[0][:8], test_set[1][:8])


# --- constraints under random budgets (an untrained 3-channel model with 5 classes) ---

_TINY = MLP(3 * 8 * 8, num_classes=5).eval()


@settings(max_examples=20, deadline=None)
@given(
    eps=st.floats(0, 0.5), seed=st.integers(0, 2**16), loss=st.sampled_from(["ce", "dlr"]), restarts=st.integers(1, 2)
)
def test_apgd_linf_stays_in_the_ball(eps, seed, loss, restarts):
    x, y = noisy_batch_3x8x8(seed)
    assert_in_ball(apgd(_TINY, x, y, eps=eps, steps=6, loss=loss, restarts=restarts, seed=seed), x, eps)


@settings(max_examples=20, deadline=None)
@given(eps=st.floats(0, 3.0), seed=st.integers(0, 2**16))
def test_apgd_l2_and_targeted_stay_in_the_ball(eps, seed):
    x, y = noisy_batch_3x8x8(seed)
    assert_in_ball(apgd(_TINY, x, y, eps=eps, steps=6, norm="l2", seed=seed), x, eps, norm="l2")
    assert_in_ball(apgd_targeted(_TINY, x, y, eps=eps, steps=4, norm="l2", seed=seed), x, eps, norm="l2")


@settings(max_examples=20, deadline=None)
@given(eps=st.floats(0, 0.5), seed=st.integers(0, 2**16), p_init=st.floats(0.05, 1.0))
def test_square_stays_in_the_ball(eps, seed, p_init):
    x, y = noisy_batch_3x8x8(seed)
    assert_in_ball(square_attack(_TINY, x, y, eps=eps, queries=30, p_init=p_init, seed=seed), x, eps)
