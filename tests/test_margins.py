"""Margin estimators: invariants of the pure functions, and callbacks that cost no forward pass."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from robustmix import AdversarialCE, AdversarialStep, CompositionError, PGDAttack
from robustmix.core.context import StepContext
from robustmix.stages.margins import (
    KappaMargin,
    LogitMargin,
    MultiClassMargin,
    ProbabilityMargin,
    kappa_margin,
    logit_margin,
    multiclass_margin,
    probability_margin,
)
from tests.toys import SmallMLP

SCALAR_MARGINS = [logit_margin, probability_margin]
seeds = st.integers(0, 2**16)


@st.composite
def batches(draw, bound: float = 1e4, distinct: bool = False):
    """``(logits [B, C] float32, labels [B])``; with ``distinct`` every row's logits are >= 0.5 apart."""
    size, classes = draw(st.integers(1, 6)), draw(st.integers(2, 6))
    if distinct:
        # Multiples of 0.5 are exact in float32 up to 2**23: no ties, before or after softmax.
        row = st.lists(st.integers(-int(2 * bound), int(2 * bound)), min_size=classes, max_size=classes, unique=True)
        logits = torch.tensor(draw(st.lists(row, min_size=size, max_size=size)), dtype=torch.float32) / 2
    else:
        value = st.floats(-bound, bound, width=32)
        logits = torch.tensor(
            draw(st.lists(st.lists(value, min_size=classes, max_size=classes), min_size=size, max_size=size))
        )
    labels = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=size, max_size=size)))
    return logits, labels


ONE_HOT = (torch.tensor([[1e4, -1e4]]), torch.tensor([0]))
WRONG_ONE_HOT = (torch.tensor([[1e4, -1e4]]), torch.tensor([1]))
UNIFORM = (torch.zeros(3, 4), torch.tensor([0, 1, 3]))


@settings(max_examples=80, deadline=None)
@given(batch=batches())
@example(batch=ONE_HOT)
@example(batch=WRONG_ONE_HOT)
@example(batch=UNIFORM)
def test_probability_margin_is_in_unit_interval_and_matches_float64(batch):
    logits, y = batch
    margin = probability_margin(logits, y)
    assert margin.shape == y.shape and margin.dtype == torch.float32
    assert torch.all(margin >= -1) and torch.all(margin <= 1)
    p = logits.double().softmax(dim=1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    p_other = p.scatter(1, y[:, None], -1.0).amax(dim=1)
    torch.testing.assert_close(margin.double(), p_y - p_other, atol=1e-6, rtol=0)


def test_margins_of_pinned_predictions():
    assert probability_margin(*ONE_HOT).item() == 1.0 and probability_margin(*WRONG_ONE_HOT).item() == -1.0
    assert logit_margin(*ONE_HOT).item() == 2e4 and logit_margin(*WRONG_ONE_HOT).item() == -2e4
    assert torch.equal(probability_margin(*UNIFORM), torch.zeros(3))
    assert torch.equal(logit_margin(*UNIFORM), torch.zeros(3))


@settings(max_examples=80, deadline=None)
@given(batch=batches(bound=100.0), shift=st.lists(st.floats(-100, 100, width=32), min_size=6, max_size=6))
@example(batch=(torch.tensor([[3.0, -3.0]]), torch.tensor([1])), shift=[1e2] * 6)
def test_margins_are_invariant_to_a_constant_per_row(batch, shift):
    logits, y = batch
    shifted = logits + torch.tensor(shift[: len(y)])[:, None]
    # Rounding of z + c is at most half an ulp of |z| + |c| <= 200 per logit.
    for fn, atol in ((logit_margin, 3e-5), (probability_margin, 4e-5), (multiclass_margin, 3e-5)):
        torch.testing.assert_close(fn(shifted, y), fn(logits, y), atol=atol, rtol=0)


@settings(max_examples=80, deadline=None)
@given(batch=batches(distinct=True))
@example(batch=ONE_HOT)
@example(batch=WRONG_ONE_HOT)
@example(batch=(torch.tensor([[0.5, 0.0]]), torch.tensor([1])))
def test_margin_sign_matches_correctness(batch):
    logits, y = batch
    correct = logits.argmax(dim=1) == y
    for fn in SCALAR_MARGINS:
        margin = fn(logits, y)
        assert torch.equal(margin > 0, correct) and torch.equal(margin < 0, ~correct), fn.__name__
    vector = multiclass_margin(logits, y)
    others = vector.scatter(1, y[:, None], float("inf"))
    assert torch.equal(others.amin(dim=1) > 0, correct)


@settings(max_examples=60, deadline=None)
@given(batch=batches())
@example(batch=ONE_HOT)
@example(batch=UNIFORM)
def test_multiclass_margin_layout(batch):
    logits, y = batch
    vector = multiclass_margin(logits, y)
    assert vector.shape == logits.shape and vector.dtype == torch.float32
    assert torch.all(vector.gather(1, y[:, None]) == 0)
    # Its smallest off-label entry is the scalar logit margin.
    torch.testing.assert_close(vector.scatter(1, y[:, None], float("inf")).amin(dim=1), logit_margin(logits, y))


@settings(max_examples=30, deadline=None)
@given(batch=batches(bound=1e3), fn=st.sampled_from([logit_margin, probability_margin, multiclass_margin]))
def test_bf16_logits_give_float32_margins_of_their_values(batch, fn):
    logits, y = batch
    half = logits.bfloat16()
    margin = fn(half, y)
    assert margin.dtype == torch.float32
    torch.testing.assert_close(margin, fn(half.float(), y), atol=0, rtol=0)


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 20), draws=st.lists(st.integers(0, 20), min_size=1, max_size=8))
@example(steps=1, draws=[1])
def test_kappa_margin_spans_unit_interval_monotonically(steps, draws):
    kappa = torch.arange(steps + 1)
    margin = kappa_margin(kappa, steps)
    assert margin.dtype == torch.float32 and margin[0] == -1 and margin[-1] == 1
    assert torch.all(margin[1:] > margin[:-1])
    sample = torch.tensor(draws).clamp(max=steps)
    assert torch.equal(kappa_margin(sample, steps), margin[sample])


@pytest.mark.parametrize("steps", [0, -1, 2.0, True])
def test_bad_kappa_steps_are_rejected(steps):
    with pytest.raises(ValueError, match="steps"):
        KappaMargin(steps)
    with pytest.raises(ValueError, match="steps"):
        kappa_margin(torch.tensor([0]), steps)


@pytest.mark.parametrize("cls", [ProbabilityMargin, LogitMargin, MultiClassMargin])
def test_unknown_source_is_rejected(cls):
    with pytest.raises(ValueError, match="source"):
        cls(source="adversarial")


def _ctx(logits: torch.Tensor, y: torch.Tensor, **fields) -> StepContext:
    """A context whose model is the identity: the logits of an input are the input itself."""
    identity = nn.Identity()
    return StepContext(
        model=identity, attack_model=identity, inputs=logits, targets=y, num_classes=logits.shape[1], **fields
    )


LOGIT_CALLBACKS = [
    (ProbabilityMargin, probability_margin, "margin"),
    (LogitMargin, logit_margin, "margin"),
    (MultiClassMargin, multiclass_margin, "margin_vector"),
]


@settings(max_examples=40, deadline=None)
@given(batch=batches(), case=st.sampled_from(LOGIT_CALLBACKS), source=st.sampled_from(["adv", "clean"]), seed=seeds)
@example(batch=ONE_HOT, case=LOGIT_CALLBACKS[0], source="adv", seed=0)
@example(batch=UNIFORM, case=LOGIT_CALLBACKS[2], source="adv", seed=0)
def test_margin_callbacks_are_detached_equivariant_and_finite(batch, case, source, seed):
    logits, y = batch
    cls, fn, field = case
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    outputs = []
    for order in (torch.arange(len(y)), perm):
        x = logits[order].clone().requires_grad_(True)
        ctx = _ctx(x, y[order], x_adv=x)
        cls(source=source)(ctx)
        out = getattr(ctx, field)
        assert not out.requires_grad and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert ctx.logits[source] is x, "the margin must read the memoized training logits"
        outputs.append(out)
    torch.testing.assert_close(outputs[0], fn(logits, y), atol=0, rtol=0)
    torch.testing.assert_close(outputs[1], outputs[0][perm], atol=0, rtol=0)


@settings(max_examples=20, deadline=None)
@given(kappa=st.lists(st.integers(0, 4), min_size=1, max_size=8), seed=seeds)
@example(kappa=[0, 2, 4], seed=0)
def test_kappa_margin_callback(kappa, seed):
    kappa = torch.tensor(kappa)
    perm = torch.randperm(len(kappa), generator=torch.Generator().manual_seed(seed))
    written = []
    for order in (torch.arange(len(kappa)), perm):
        ctx = _ctx(torch.zeros(len(kappa), 2), torch.zeros(len(kappa), dtype=torch.long), kappa=kappa[order])
        KappaMargin(4)(ctx)
        written.append(ctx.margin)
    assert torch.equal(written[0], kappa / 2 - 1) and torch.equal(written[1], written[0][perm])


@pytest.mark.parametrize("margin", [ProbabilityMargin(), LogitMargin(), KappaMargin(3)])
def test_margins_cost_no_pass_beyond_pgd_at(margin):
    steps = 3
    step = AdversarialStep(
        [
            PGDAttack(eps=0.1, step_size=0.03, steps=steps, track_kappa=True),
            margin,
            MultiClassMargin(),
            AdversarialCE(),
        ]
    )
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    loss, ctx = step(SmallMLP(), x, y)
    loss.backward()
    # PGD-AT: K attack forwards and backwards, plus the training forward and its backward.
    assert ctx.passes() == (steps + 1, steps + 1)
    assert ctx.margin.shape == (5,) and ctx.margin_vector.shape == (5, 3)
    if not isinstance(margin, KappaMargin):
        torch.testing.assert_close(ctx.margin, type(margin).fn(ctx.logits["adv"].detach(), y))


def test_margin_of_an_input_nobody_writes_is_a_composition_error():
    with pytest.raises(CompositionError, match="ProbabilityMargin needs `logits_anti`"):
        AdversarialStep([PGDAttack(), ProbabilityMargin(source="anti"), AdversarialCE()])
    with pytest.raises(CompositionError, match="KappaMargin needs `kappa`"):
        AdversarialStep([PGDAttack(), KappaMargin(10), AdversarialCE()])
