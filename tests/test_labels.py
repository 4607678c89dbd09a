"""Label refiners: every row a distribution, ADA-Lab's interpolation invariants, the callbacks' glue."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from robustmix import AdversarialCE, AdversarialStep, CompositionError, PGDAttack
from robustmix.core.context import StepContext
from robustmix.stages.anti import AdversarysAdversary
from robustmix.stages.labels import (
    SCHEDULES,
    AdaLabLabels,
    LabelSmoothing,
    OneHotLabels,
    adalab_lambda,
    adalab_targets,
    one_hot,
    smooth_labels,
)
from robustmix.stages.losses import soft_cross_entropy
from robustmix.stages.margins import ProbabilityMargin, probability_margin
from robustmix.stages.weights import AdaLabWeights

seeds = st.integers(0, 2**16)
dtypes = st.sampled_from([torch.float32, torch.bfloat16])


@st.composite
def refinements(draw, bound: float = 1e4):
    """``(labels [B], logits of x_aa [B, C], lam [B] in [0, 1])``."""
    size, classes = draw(st.integers(1, 6)), draw(st.integers(2, 6))
    value = st.floats(-bound, bound, width=32)
    logits = torch.tensor(
        draw(st.lists(st.lists(value, min_size=classes, max_size=classes), min_size=size, max_size=size))
    )
    y = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=size, max_size=size)))
    lam = torch.tensor(draw(st.lists(st.floats(0, 1, width=32), min_size=size, max_size=size)))
    return y, logits, lam


def _assert_distributions(rows: torch.Tensor, atol: float = 1e-6) -> None:
    assert rows.dtype == torch.float32 and torch.all(rows >= 0)
    torch.testing.assert_close(rows.sum(dim=1), torch.ones(len(rows)), atol=atol, rtol=0)


ONE_HOT_PREDICTION = (torch.tensor([0]), torch.tensor([[1e4, -1e4]]), torch.tensor([0.5]))
WRONG_PREDICTION = (torch.tensor([1]), torch.tensor([[1e4, -1e4]]), torch.tensor([1.0]))
UNIFORM_PREDICTION = (torch.tensor([0, 2, 1]), torch.zeros(3, 3), torch.tensor([0.0, 0.3, 1.0]))


@settings(max_examples=100, deadline=None)
@given(case=refinements(), dtype=dtypes)
@example(case=ONE_HOT_PREDICTION, dtype=torch.float32)
@example(case=WRONG_PREDICTION, dtype=torch.bfloat16)
@example(case=UNIFORM_PREDICTION, dtype=torch.float32)
def test_adalab_targets_are_distributions_between_onehot_and_prediction(case, dtype):
    y, logits, lam = case
    # Under bf16 autocast the eval logits, the one-hot rows and lam arrive in bf16: all are upcast.
    onehot = one_hot(y, logits.shape[1]).to(dtype)
    lam = lam.to(dtype)
    p = logits.to(dtype).float().softmax(dim=1)
    targets = adalab_targets(onehot, p, lam)
    _assert_distributions(targets)
    low, high = torch.minimum(onehot.float(), p), torch.maximum(onehot.float(), p)
    assert torch.all(targets >= low - 1e-6) and torch.all(targets <= high + 1e-6)
    assert torch.all(targets.gather(1, y[:, None]).squeeze(1) >= 1 - lam.float() - 1e-6)
    below_half = lam.float() < 0.5
    assert torch.equal(targets.argmax(dim=1)[below_half], y[below_half])


@settings(max_examples=40, deadline=None)
@given(case=refinements())
@example(case=WRONG_PREDICTION)
def test_bf16_predictions_are_upcast(case):
    y, logits, lam = case
    p = logits.softmax(dim=1).bfloat16()
    targets = adalab_targets(one_hot(y, logits.shape[1]), p, lam)
    # The rows are exactly as far from summing to 1 as the bf16 probabilities were.
    _assert_distributions(targets, atol=1e-2)
    torch.testing.assert_close(targets.sum(1) - 1, lam * (p.float().sum(1) - 1), atol=1e-6, rtol=0)


@settings(max_examples=60, deadline=None)
@given(case=refinements())
@example(case=ONE_HOT_PREDICTION)
@example(case=UNIFORM_PREDICTION)
def test_adalab_targets_are_onehot_without_interpolation_or_when_the_prediction_is_the_label(case):
    y, logits, lam = case
    onehot = one_hot(y, logits.shape[1])
    p = logits.softmax(dim=1)
    assert torch.equal(adalab_targets(onehot, p, torch.zeros_like(lam)), onehot)
    assert torch.equal(adalab_targets(onehot, p, 0.0), onehot)
    assert torch.equal(adalab_targets(onehot, onehot, lam), onehot)


@settings(max_examples=80, deadline=None)
@given(
    margin=st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=16).map(torch.tensor),
    lam_max=st.floats(0, 1),
    schedule=st.sampled_from(SCHEDULES),
)
@example(margin=torch.tensor([-1.0, 0.0, 1.0]), lam_max=0.5, schedule="linear")
@example(margin=torch.tensor([0.2]), lam_max=1.0, schedule="tanh")
def test_adalab_lambda_is_bounded_and_non_increasing_in_the_margin(margin, lam_max, schedule):
    lam = adalab_lambda(margin, lam_max, schedule)
    assert lam.dtype == torch.float32 and torch.all(lam >= 0) and torch.all(lam <= lam_max)
    order = torch.argsort(margin)
    assert torch.all(lam[order][1:] <= lam[order][:-1])


def test_adalab_lambda_pinned_values():
    margin = torch.tensor([-1.0, 0.0, 1.0, 3.0, -3.0])
    assert torch.equal(adalab_lambda(margin, 0.5), torch.tensor([0.5, 0.25, 0.0, 0.0, 0.5]))
    tanh = adalab_lambda(torch.tensor([0.0]), 0.5, "tanh")
    torch.testing.assert_close(tanh, torch.tensor([0.25]))


@settings(max_examples=40, deadline=None)
@given(case=refinements(bound=50.0), alpha=st.floats(0, 1))
@example(case=UNIFORM_PREDICTION, alpha=0.1)
def test_smoothed_labels_match_torch_label_smoothing(case, alpha):
    y, logits, _ = case
    classes = logits.shape[1]
    targets = smooth_labels(y, classes, alpha)
    _assert_distributions(targets)
    assert torch.equal(smooth_labels(y, classes, 0.0), one_hot(y, classes))
    expected = F.cross_entropy(logits, y, label_smoothing=alpha, reduction="none")
    torch.testing.assert_close(soft_cross_entropy(logits, targets), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AdaLabLabels(lam_max=1.5), "lam_max"),
        (lambda: AdaLabLabels(lam_max=-0.1), "lam_max"),
        (lambda: AdaLabLabels(lam_max=math.nan), "lam_max"),
        (lambda: AdaLabLabels(temperature=0.0), "temperature"),
        (lambda: AdaLabLabels(temperature=-1.0), "temperature"),
        (lambda: AdaLabLabels(temperature=math.inf), "temperature"),
        (lambda: AdaLabLabels(burn_in_epochs=-1), "burn_in_epochs"),
        (lambda: AdaLabLabels(schedule="cosine"), "schedule"),
        (lambda: LabelSmoothing(alpha=1.1), "alpha"),
        (lambda: adalab_lambda(torch.zeros(1), lam_max=2.0), "lam_max"),
        (lambda: smooth_labels(torch.zeros(1, dtype=torch.long), 2, alpha=-0.5), "alpha"),
    ],
)
def test_bad_settings_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def _ctx(y: torch.Tensor, anti_logits: torch.Tensor, margin: torch.Tensor, **fields) -> StepContext:
    """A context whose model is the identity: the eval logits of ``x_anti`` are ``x_anti`` itself."""
    identity = nn.Identity()
    return StepContext(
        model=identity, attack_model=identity, inputs=anti_logits, targets=y, num_classes=anti_logits.shape[1],
        x_anti=anti_logits, margin=margin, **fields,
    )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    case=refinements(),
    lam_max=st.floats(0, 1),
    temperature=st.floats(0.1, 10),
    schedule=st.sampled_from(SCHEDULES),
    seed=seeds,
)
@example(case=ONE_HOT_PREDICTION, lam_max=0.5, temperature=1.0, schedule="linear", seed=0)
@example(case=UNIFORM_PREDICTION, lam_max=1.0, temperature=0.1, schedule="tanh", seed=1)
def test_adalab_labels_callback(case, lam_max, temperature, schedule, seed):
    y, logits, _ = case
    margin = probability_margin(logits, y)  # any margin in [-1, 1]
    callback = AdaLabLabels(lam_max=lam_max, temperature=temperature, schedule=schedule)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    written = []
    for order in (torch.arange(len(y)), perm):
        # Inputs with gradient: the callback must still write detached targets.
        ctx = _ctx(y[order], logits[order].clone().requires_grad_(True), margin[order].clone().requires_grad_(True))
        callback(ctx)
        assert not ctx.soft_targets.requires_grad and torch.isfinite(ctx.soft_targets).all()
        _assert_distributions(ctx.soft_targets)
        written.append((ctx.soft_targets, ctx.extras["lam_mean"]))
    lam = adalab_lambda(margin, lam_max, schedule)
    expected = adalab_targets(one_hot(y, logits.shape[1]), (logits / temperature).softmax(dim=1), lam)
    torch.testing.assert_close(written[0][0], expected, atol=0, rtol=0)
    torch.testing.assert_close(written[1][0], written[0][0][perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(written[0][1], lam.mean())
    torch.testing.assert_close(written[1][1], written[0][1])


def test_burn_in_writes_onehot_without_the_anti_forward():
    y, logits = torch.tensor([0, 1]), torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    ctx = _ctx(y, logits, torch.tensor([-0.9, -0.5]), epoch=2)
    AdaLabLabels(burn_in_epochs=3)(ctx)
    assert torch.equal(ctx.soft_targets, one_hot(y, 2)) and float(ctx.extras["lam_mean"]) == 0.0
    assert "anti" not in ctx.eval_logits
    ctx = _ctx(y, logits, torch.tensor([-0.9, -0.5]), epoch=3)
    AdaLabLabels(burn_in_epochs=3)(ctx)
    assert not torch.equal(ctx.soft_targets, one_hot(y, 2)) and "anti" in ctx.eval_logits


@settings(max_examples=20, deadline=None)
@given(labels=st.lists(st.integers(0, 4), min_size=1, max_size=8), seed=seeds)
def test_fixed_refiners_are_permutation_equivariant(labels, seed):
    y = torch.tensor(labels)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for callback in (OneHotLabels(), LabelSmoothing(0.2)):
        written = []
        for order in (torch.arange(len(y)), perm):
            ctx = _ctx(y[order], torch.zeros(len(y), 5), torch.zeros(len(y)))
            callback(ctx)
            _assert_distributions(ctx.soft_targets)
            written.append(ctx.soft_targets)
        assert torch.equal(written[1], written[0][perm])


def test_onehot_and_smoothing_callbacks():
    y = torch.tensor([2, 0])
    ctx = _ctx(y, torch.zeros(2, 3), torch.zeros(2))
    OneHotLabels()(ctx)
    assert torch.equal(ctx.soft_targets, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    LabelSmoothing(0.3)(ctx)
    torch.testing.assert_close(ctx.soft_targets, torch.tensor([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]))


class DropoutNet(nn.Module):
    """Dropout makes train and eval forwards differ, so the test can tell which one ran."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _adalab_step(steps: int, burn_in_epochs: int = 0) -> AdversarialStep:
    return AdversarialStep(
        [
            PGDAttack(eps=0.1, step_size=0.03, steps=steps),
            AdversarysAdversary(),
            ProbabilityMargin(),
            AdaLabLabels(burn_in_epochs=burn_in_epochs),
            AdaLabWeights(burn_in_epochs=burn_in_epochs),
            AdversarialCE(),
        ]
    )


def test_adalab_step_uses_the_eval_forward_of_the_adversarys_adversary():
    steps, model = 3, DropoutNet().train()
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, ctx = _adalab_step(steps)(model, x, y)
    loss.backward()
    # PGD-AT's K + 1 forwards and backwards, one more of each for x_aa, one eval forward for p(x_aa).
    assert ctx.passes() == (steps + 3, steps + 2)
    assert model.training
    with torch.no_grad():
        p_aa = model.eval()(ctx.x_anti).softmax(dim=1)
    lam = adalab_lambda(ctx.margin, 0.5)
    torch.testing.assert_close(ctx.soft_targets, adalab_targets(one_hot(y, 3), p_aa, lam))
    assert torch.isfinite(loss) and ctx.weights.shape == (6,)


def test_burn_in_step_skips_the_eval_forward():
    steps = 3
    loss, ctx = _adalab_step(steps, burn_in_epochs=1)(DropoutNet(), torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert ctx.passes() == (steps + 2, steps + 2)
    assert torch.equal(ctx.soft_targets, one_hot(ctx.targets, 3)) and torch.equal(ctx.weights, torch.ones(4))


def test_adalab_labels_without_their_inputs_is_a_composition_error():
    with pytest.raises(CompositionError, match="AdaLabLabels needs `margin`"):
        AdversarialStep([PGDAttack(), AdversarysAdversary(), AdaLabLabels(), AdversarialCE()])
    with pytest.raises(CompositionError, match="AdaLabLabels needs `eval_logits_anti`"):
        AdversarialStep([PGDAttack(), ProbabilityMargin(), AdaLabLabels(), AdversarialCE()])
