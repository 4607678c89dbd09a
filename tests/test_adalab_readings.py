"""ADA-Lab's other readings of the abstract: the target forms, the simplex projection, the recovering
descent, the margins and weights they use, what each costs, and the recipe's flags for them."""

import argparse
import functools
import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

from robustmix import AdversarialCE, AdversarialStep, CompositionError, PGDAttack
from robustmix.core.context import StepContext
from robustmix.core.modes import model_mode
from robustmix.runs.folder import load_metrics_log
from robustmix.stages.anti import AdversarysAdversary, adversarys_adversary, recovering_descent
from robustmix.stages.labels import (
    TARGETS,
    AdaLabLabels,
    adalab_lambda,
    adalab_targets,
    direction_targets,
    floor_targets,
    keep_true_targets,
    one_hot,
    simplex_projection,
)
from robustmix.stages.margins import LogitMargin, RecoveryMargin, logit_margin, recovery_margin
from robustmix.stages.weights import adalab_importance, boundary_importance, mail_weights
from tests.conftest import load_benchmark, load_recipe, quick_flags
from tests.test_pass_accounting import documented_cost
from tests.toys import TallyNet, trained_pattern_net

HostReads = load_benchmark("host_reads").HostReads

seeds = st.integers(0, 2**16)
#: The target forms that interpolate between the one-hot label and one source distribution.
INTERPOLATING = {"interpolate": adalab_targets, "floor": floor_targets, "keep-true": keep_true_targets}


@st.composite
def predictions(draw, bound: float = 1e4):
    """``(labels [B], logits of the source [B, C], logits of x_adv [B, C], lam [B] in [0, 1])``."""
    size, classes = draw(st.integers(1, 6)), draw(st.integers(2, 6))
    value = st.floats(-bound, bound, width=32)
    rows = st.lists(st.lists(value, min_size=classes, max_size=classes), min_size=size, max_size=size)
    y = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=size, max_size=size)))
    lam = torch.tensor(draw(st.lists(st.floats(0, 1, width=32), min_size=size, max_size=size)))
    return y, torch.tensor(draw(rows)), torch.tensor(draw(rows)), lam


def _targets(form: str, onehot: torch.Tensor, p: torch.Tensor, p_adv: torch.Tensor, lam) -> torch.Tensor:
    if form == "direction":
        return direction_targets(onehot, p, p_adv, lam)
    return INTERPOLATING[form](onehot, p, lam)


def _assert_distributions(rows: torch.Tensor, atol: float = 1e-6) -> None:
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all() and torch.all(rows >= 0)
    torch.testing.assert_close(rows.sum(dim=1), torch.ones(len(rows)), atol=atol, rtol=0)


ONE_HOT_PREDICTION = (torch.tensor([0]), torch.tensor([[1e4, -1e4]]), torch.tensor([[-1e4, 1e4]]), torch.tensor([0.5]))
WRONG_PREDICTION = (torch.tensor([1]), torch.tensor([[1e4, -1e4]]), torch.tensor([[0.0, 0.0]]), torch.tensor([1.0]))
UNIFORM = (torch.tensor([0, 2, 1]), torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([0.0, 0.3, 1.0]))


# ---------------------------------------------------------------------- the simplex projection


@st.composite
def vectors(draw, bound: float = 10.0):
    size, classes = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    value = st.floats(-bound, bound, width=32)
    return torch.tensor(
        draw(st.lists(st.lists(value, min_size=classes, max_size=classes), min_size=size, max_size=size))
    )


def _bisection_projection(v: torch.Tensor) -> torch.Tensor:
    """``max(v - theta, 0)`` with ``theta`` found by bisection in float64: independent of the sort."""
    v = v.double()
    low, high = v.amin(dim=1, keepdim=True) - 1, v.amax(dim=1, keepdim=True)
    for _ in range(200):
        mid = (low + high) / 2
        above = (v - mid).clamp_min(0).sum(dim=1, keepdim=True) > 1
        low, high = torch.where(above, mid, low), torch.where(above, high, mid)
    return (v - (low + high) / 2).clamp_min(0)


@settings(max_examples=100, deadline=None)
@given(v=vectors())
@example(v=torch.tensor([[1.0, 0.0, 0.0]]))
@example(v=torch.tensor([[1.5, -0.3, -0.2]]))
@example(v=torch.tensor([[0.4, 0.4, 0.4]]))
def test_simplex_projection_lands_on_the_simplex_and_matches_bisection(v):
    q = simplex_projection(v)
    _assert_distributions(q, atol=1e-5)
    torch.testing.assert_close(q.double(), _bisection_projection(v), atol=1e-5, rtol=0)
    torch.testing.assert_close(simplex_projection(q), q, atol=1e-6, rtol=0)  # idempotent
    # Order-preserving: a larger coordinate never gets less mass.
    larger = v[:, :, None] >= v[:, None, :]
    assert torch.all((q[:, :, None] >= q[:, None, :] - 1e-6) | ~larger)


@settings(max_examples=60, deadline=None)
@given(logits=vectors(bound=30.0))
def test_simplex_projection_is_the_identity_on_the_simplex(logits):
    p = logits.softmax(dim=1)
    torch.testing.assert_close(simplex_projection(p), p, atol=1e-6, rtol=0)
    onehot = one_hot(logits.argmax(dim=1), logits.shape[1])
    assert torch.equal(simplex_projection(onehot), onehot)


# ---------------------------------------------------------------------- the target forms


@settings(max_examples=100, deadline=None)
@given(case=predictions(), form=st.sampled_from(TARGETS), seed=seeds)
@example(case=ONE_HOT_PREDICTION, form="floor", seed=0)
@example(case=WRONG_PREDICTION, form="floor", seed=0)
@example(case=WRONG_PREDICTION, form="keep-true", seed=0)
@example(case=WRONG_PREDICTION, form="direction", seed=0)
@example(case=UNIFORM, form="direction", seed=0)
def test_every_form_gives_distributions_equivariant_over_the_batch(case, form, seed):
    y, logits, logits_adv, lam = case
    onehot, p, p_adv = one_hot(y, logits.shape[1]), logits.softmax(dim=1), logits_adv.softmax(dim=1)
    targets = _targets(form, onehot, p, p_adv, lam)
    _assert_distributions(targets)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    permuted = _targets(form, onehot[perm], p[perm], p_adv[perm], lam[perm])
    torch.testing.assert_close(permuted, targets[perm], atol=0, rtol=0)
    below_half = lam < 0.5
    assert torch.equal(targets.argmax(dim=1)[below_half], y[below_half])


@settings(max_examples=100, deadline=None)
@given(case=predictions(), form=st.sampled_from(list(INTERPOLATING)))
@example(case=ONE_HOT_PREDICTION, form="floor")
@example(case=WRONG_PREDICTION, form="keep-true")
@example(case=UNIFORM, form="floor")
def test_interpolating_forms_lie_between_onehot_and_source_above_both_floors(case, form):
    y, logits, _, lam = case
    onehot, p = one_hot(y, logits.shape[1]), logits.softmax(dim=1)
    targets = INTERPOLATING[form](onehot, p, lam)
    low, high = torch.minimum(onehot, p), torch.maximum(onehot, p)
    assert torch.all(targets >= low - 1e-6) and torch.all(targets <= high + 1e-6)
    true, p_true = targets.gather(1, y[:, None]).squeeze(1), p.gather(1, y[:, None]).squeeze(1)
    assert torch.all(true >= 1 - lam - 1e-6) and torch.all(true >= p_true - 1e-6)
    if form == "floor":  # exactly on the floor
        torch.testing.assert_close(true, torch.maximum(1 - lam, p_true), atol=1e-6, rtol=0)
    if form == "keep-true":  # trusts the source only as far as it shows y: argmax y for every lam
        assert torch.all(true >= 1 - lam / 4 - 1e-6) and torch.equal(targets.argmax(dim=1), y)


@settings(max_examples=60, deadline=None)
@given(case=predictions(), form=st.sampled_from(TARGETS))
def test_every_form_is_onehot_without_interpolation_or_without_a_change(case, form):
    y, logits, logits_adv, lam = case
    onehot, p, p_adv = one_hot(y, logits.shape[1]), logits.softmax(dim=1), logits_adv.softmax(dim=1)
    assert torch.equal(_targets(form, onehot, p, p_adv, torch.zeros_like(lam)), onehot)
    # The interpolating forms are one-hot when the source is; the direction when the source equals p(x_adv).
    same = p if form == "direction" else onehot
    assert torch.equal(_targets(form, onehot, same, p, lam), onehot)


@settings(max_examples=60, deadline=None)
@given(
    case=predictions(),
    form=st.sampled_from(list(INTERPOLATING)),
    margins=st.lists(st.floats(-1, 1, width=32), min_size=2, max_size=2),
    lam_max=st.floats(0, 1),
)
def test_interpolating_forms_keep_more_of_the_true_class_at_larger_margins(case, form, margins, lam_max):
    y, logits, _, _ = case
    onehot, p = one_hot(y, logits.shape[1]), logits.softmax(dim=1)
    low, high = sorted(margins)
    true = [
        INTERPOLATING[form](onehot, p, adalab_lambda(torch.full(y.shape, m), lam_max)).gather(1, y[:, None])
        for m in (low, high)
    ]
    assert torch.all(true[0] <= true[1] + 1e-6)


def test_forms_of_one_pinned_prediction():
    onehot, p = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.2, 0.6, 0.2]])
    torch.testing.assert_close(adalab_targets(onehot, p, 0.5), torch.tensor([[0.6, 0.3, 0.1]]))
    torch.testing.assert_close(floor_targets(onehot, p, 0.5), torch.tensor([[0.5, 0.375, 0.125]]))
    torch.testing.assert_close(keep_true_targets(onehot, p, 0.5), torch.tensor([[0.92, 0.06, 0.02]]))
    # The true class gains 0.2 from x_adv to x_aa, class 2 only 0.1: one-hot. Where class 2 gains more, it keeps some.
    torch.testing.assert_close(direction_targets(onehot, p, torch.tensor([[0.0, 0.9, 0.1]]), 0.5), onehot)
    p_adv, p_aa = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.5, 0.0, 0.5]])
    torch.testing.assert_close(direction_targets(onehot, p_aa, p_adv, 0.5), torch.tensor([[0.875, 0.0, 0.125]]))


# ---------------------------------------------------------------------- the label callback's options


def _ctx(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **fields) -> StepContext:
    return StepContext(model=model, attack_model=model, inputs=x, targets=y, num_classes=model.num_classes, **fields)


@pytest.mark.parametrize(
    ("target", "source"),
    # direction with source adv is rejected (test_bad_label_options_are_rejected)
    [(t, s) for t in TARGETS for s in ("anti", "adv", "clean") if (t, s) != ("direction", "adv")],
)
def test_labels_read_the_eval_forward_of_their_source(target, source):
    model = TallyNet().train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 8, 8, generator=g), torch.arange(6) % 3
    ctx = _ctx(model, x, y, x_adv=torch.rand(6, 1, 8, 8, generator=g), x_anti=torch.rand(6, 1, 8, 8, generator=g))
    ctx.margin = torch.linspace(-1, 1, 6)
    labels = AdaLabLabels(temperature=2.0, target=target, source=source)
    labels(ctx)
    with torch.no_grad(), model_mode(model, "eval"):
        p = (model(ctx.input(source)) / 2).softmax(dim=1)
        p_adv = (model(ctx.x_adv) / 2).softmax(dim=1)
    expected = _targets(target, one_hot(y, 3), p, p_adv, adalab_lambda(ctx.margin, 0.5))
    torch.testing.assert_close(ctx.soft_targets, expected)
    assert set(ctx.eval_logits) == ({source, "adv"} if target == "direction" else {source})
    assert labels.reads == ("margin", f"eval_logits_{source}") + (
        ("eval_logits_adv",) if target == "direction" else ()
    )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AdaLabLabels(target="sharpen"), "target must be one of"),
        (lambda: AdaLabLabels(source="aa"), "source must be one of"),
        (lambda: AdaLabLabels(target="direction", source="adv"), "one-hot"),
        (lambda: LogitMargin(scale=0.0), "scale"),
        (lambda: LogitMargin(scale=math.inf), "scale"),
        (lambda: RecoveryMargin(0), "steps"),
        (lambda: AdversarysAdversary(0, until_recovered=True), "until_recovered needs steps >= 1"),
    ],
)
def test_bad_label_options_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_default_reprs_are_those_of_the_first_reading():
    """config.json records the callbacks' reprs: the first reading's stay as they were."""
    assert repr(AdaLabLabels()) == "AdaLabLabels(lam_max=0.5, temperature=1.0, burn_in_epochs=0, schedule='linear')"
    assert repr(AdversarysAdversary()) == (
        "AdversarysAdversary(steps=1, step_size=None, norm='linf', bn_mode='eval', burn_in_epochs=0)"
    )
    assert repr(LogitMargin()) == "LogitMargin(source='adv')"
    assert "target='floor', source='clean'" in repr(AdaLabLabels(target="floor", source="clean"))
    assert "until_recovered=True, project=False" in repr(AdversarysAdversary(2, until_recovered=True, project=False))
    assert repr(LogitMargin("clean", scale=4.0, eval_mode=True)) == (
        "LogitMargin(source='clean', eval_mode=True, scale=4.0)"
    )


# ---------------------------------------------------------------------- margins and weights


@settings(max_examples=60, deadline=None)
@given(logits=vectors(bound=1e4), scale=st.floats(0.1, 100), seed=seeds)
def test_squashed_logit_margin_is_bounded_monotone_and_keeps_the_sign(logits, scale, seed):
    assume(logits.shape[1] >= 2)
    y = torch.randint(0, logits.shape[1], (len(logits),), generator=torch.Generator().manual_seed(seed))
    raw, squashed = logit_margin(logits, y), logit_margin(logits, y, scale)
    assert torch.isfinite(squashed).all() and torch.all(squashed.abs() <= 1)
    torch.testing.assert_close(squashed, torch.tanh(raw / scale))
    assert torch.all((squashed > 0) <= (raw > 0)) and torch.all((squashed < 0) <= (raw < 0))
    order = raw.argsort()
    assert torch.all(squashed[order].diff() >= 0)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_recovery_margin_spans_the_unit_interval_downwards(steps):
    n = torch.arange(steps + 2)
    margin = recovery_margin(n, steps)
    assert margin[0] == 1 and margin[-1] == -1 and torch.all(margin.diff() < 0)
    torch.testing.assert_close(adalab_lambda(margin, 0.5), 0.5 * n.float() / (steps + 1))


def test_recovery_margin_callback_needs_the_recovering_descent():
    with pytest.raises(CompositionError, match=r"RecoveryMargin needs `aa_steps`; add AdversarysAdversary\("):
        AdversarialStep([PGDAttack(), AdversarysAdversary(), RecoveryMargin(1), AdaLabLabels(), AdversarialCE()])


def test_weight_curves_span_the_documented_ratios():
    ends = torch.tensor([-1.0, 1.0])
    mail = mail_weights(-ends)  # MAIL's PM is the negative of the probability margin
    assert mail[0] / mail[1] == pytest.approx(torch.sigmoid(torch.tensor(-0.5)) / torch.sigmoid(torch.tensor(-2.5)))
    assert mail[0] / mail[1] == pytest.approx(4.97, abs=0.01)
    adalab = adalab_importance(ends)
    assert adalab[0] / adalab[1] == pytest.approx(math.exp(5), rel=1e-4)
    assert boundary_importance(ends, 2.0)[0] / boundary_importance(ends, 2.0)[1] == pytest.approx(math.exp(2))


# ---------------------------------------------------------------------- the recovering descent


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), model_mode(model, "eval"):
        return model(x).argmax(dim=1)


@functools.cache
def _attacked(eps: float) -> torch.Tensor:
    from robustmix.attacks import pgd

    model, x, y = trained_pattern_net()
    return pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10, generator=torch.Generator().manual_seed(1))


@settings(max_examples=20, deadline=None)
@given(steps=st.integers(1, 5), project=st.booleans(), eps=st.sampled_from([0.1, 0.3]))
def test_recovering_descent_stops_each_example_once_it_is_recovered(steps, project, eps):
    model, x, y = trained_pattern_net()
    x_adv = _attacked(eps)
    step_size = eps / 4
    x_aa, taken = recovering_descent(model, x, x_adv, y, eps=eps, step_size=step_size, steps=steps, project=project)
    assert taken.dtype == torch.int64 and torch.all((taken >= 0) & (taken <= steps))
    radius = eps if project else eps + steps * step_size
    assert torch.all((x_aa - x).abs().flatten(1).amax(dim=1) <= radius + 1e-6)
    assert torch.all((x_aa >= 0) & (x_aa <= 1))
    # Stopped early means recovered there; 0 steps means x_adv is classified y and did not move.
    stopped = taken < steps
    assert torch.equal(_predict(model, x_aa)[stopped], y[stopped])
    assert torch.equal(x_aa[taken == 0], x_adv[taken == 0])
    assert torch.equal(taken == 0, _predict(model, x_adv) == y)
    # An example that took t steps sits where t plain descent steps put it.
    for t in range(1, steps + 1):
        plain = adversarys_adversary(model, x, x_adv, y, eps=eps, step_size=step_size, steps=t, project=project)
        torch.testing.assert_close(x_aa[taken == t], plain[taken == t], atol=1e-6, rtol=0)


def test_recovering_descent_recovers_more_than_one_plain_step():
    model, x, y = trained_pattern_net()
    x_adv = _attacked(0.3)
    assert (_predict(model, x_adv) == y).float().mean() < 0.5
    one_step = adversarys_adversary(model, x, x_adv, y, eps=0.3, step_size=0.3 / 8)
    recovered, taken = recovering_descent(model, x, x_adv, y, eps=0.3, step_size=0.3 / 8, steps=8)
    assert (_predict(model, one_step) == y).float().mean() < 0.5
    assert torch.equal(_predict(model, recovered), y) and len(taken.unique()) > 1


@settings(max_examples=10, deadline=None)
@given(seed=seeds)
def test_recovering_descent_is_permutation_equivariant(seed):
    model, x, y = trained_pattern_net()
    x_adv = _attacked(0.3)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x_aa, taken = recovering_descent(model, x, x_adv, y, eps=0.3, steps=3)
    x_perm, taken_perm = recovering_descent(model, x[perm], x_adv[perm], y[perm], eps=0.3, steps=3)
    torch.testing.assert_close(x_perm, x_aa[perm], atol=1e-6, rtol=0)
    assert torch.equal(taken_perm, taken[perm])


@pytest.mark.parametrize("epoch", [0, 1])
def test_recovering_callback_writes_the_steps_needed(epoch):
    model, x, y = trained_pattern_net()
    steps = 3
    callbacks = [
        PGDAttack(0.3, 0.075, 5), AdversarysAdversary(steps, until_recovered=True, burn_in_epochs=1),
        RecoveryMargin(steps), AdaLabLabels(burn_in_epochs=1), AdversarialCE(),
    ]  # fmt: skip
    _, ctx = AdversarialStep(callbacks)(model, x, y, epoch=epoch)
    if epoch == 0:  # the burn-in: x_aa = x_adv, no descent and no check
        assert torch.equal(ctx.aa_steps, torch.zeros_like(y)) and ctx.x_anti is ctx.x_adv
        assert "anti" not in ctx.eval_logits
        return
    assert torch.all((ctx.aa_steps >= 0) & (ctx.aa_steps <= steps + 1))
    wrong_at_the_end = ctx.eval_logits["anti"].argmax(dim=1) != y
    assert torch.equal(ctx.aa_steps == steps + 1, wrong_at_the_end)
    torch.testing.assert_close(ctx.margin, recovery_margin(ctx.aa_steps, steps))


def _host_reads(callbacks) -> int:
    model = TallyNet().train()
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 3
    with HostReads() as reads:
        loss, _ = AdversarialStep(callbacks)(model, x, y)
        loss.backward()
    return reads.count


def test_recovering_descent_reads_nothing_back_per_step():
    def build(steps: int) -> list:
        return [
            PGDAttack(0.1, 0.03, 2), AdversarysAdversary(steps, until_recovered=True), RecoveryMargin(steps),
            AdaLabLabels(), AdversarialCE(),
        ]  # fmt: skip

    assert _host_reads(build(2)) == _host_reads(build(4)) == 1  # the step's input check


# ---------------------------------------------------------------------- every reading's cost, as documented

K, K_AA = 6, 3
#: (row of the readings table in docs/methods/adalab.md, the recipe's flags for it)
READINGS = [
    ("first reading", ["--weighting", "adalab"]),
    ("recovering descent", ["--aa-until-recovered"]),
    ("unprojected descent", ["--no-aa-project"]),
    ("floor target", ["--target", "floor"]),
    ("keep-true target", ["--target", "keep-true"]),
    ("direction target", ["--target", "direction"]),
    ("MAIL weights (the default)", []),
    ("no weights", ["--weighting", "none"]),
    ("margin at x", ["--margin-at", "clean"]),
    ("kappa margin", ["--margin", "kappa"]),
    ("recovery margin", ["--aa-until-recovered", "--margin", "aa-steps"]),
    ("squashed logit margin", ["--margin", "logit", "--logit-scale", "3"]),
    ("ablation: source x_adv", ["--target-source", "adv"]),
    ("ablation: source x", ["--target-source", "clean"]),
    ("TRADES base", ["--base", "trades"]),
]


def _recipe_args(flags: list[str], tmp_path, monkeypatch) -> argparse.Namespace:
    """The namespace recipes/adalab.py would train with (no training)."""
    module = load_recipe("adalab")
    seen = []
    monkeypatch.setattr(module, "run_recipe", lambda args, build: seen.append((args, build)))
    module.main(["--output-dir", str(tmp_path / "run"), "--attack-steps", str(K), *flags])
    ((args, build),) = seen
    return args, build


def _passes(args: argparse.Namespace, build, epoch: int) -> tuple[tuple[float, float], tuple[int, int]]:
    model = TallyNet().train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8, generator=g), torch.arange(8) % 3
    loss, ctx = AdversarialStep(build(args, None))(model, x, y, epoch=epoch)
    loss.backward()
    return ctx.passes(), (model.forwards, model.backwards)


@pytest.mark.parametrize(("row", "flags"), READINGS, ids=[row for row, _ in READINGS])
def test_every_reading_costs_what_the_docs_table_says(row, flags, tmp_path, monkeypatch):
    descent = [] if "--target-source" in flags else ["--aa-steps", str(K_AA)]
    args, build = _recipe_args([*flags, *descent, "--burn-in", "0"], tmp_path, monkeypatch)
    counted, tallied = _passes(args, build, epoch=0)
    assert counted == tallied == documented_cost("methods/adalab.md", row, K=K, K_aa=K_AA)


@pytest.mark.parametrize(
    ("flags", "passes"),
    [
        ([], (K + 1, K + 1)),
        (["--aa-until-recovered", "--margin", "aa-steps", "--target", "direction"], (K + 1, K + 1)),
        (["--margin-at", "clean"], (K + 2, K + 1)),  # the margin runs in the burn-in too, unused
        (["--base", "trades"], (K + 3, K + 2)),
        (["--base", "trades", "--margin-at", "clean"], (K + 3, K + 2)),
    ],
)
def test_the_burn_in_costs_the_base_method(flags, passes, tmp_path, monkeypatch):
    args, build = _recipe_args([*flags, "--burn-in", "1"], tmp_path, monkeypatch)
    counted, tallied = _passes(args, build, epoch=0)
    assert counted == tallied == passes


def test_inputs_read_by_several_callbacks_cost_one_forward(tmp_path, monkeypatch):
    # The clean eval forward serves the margin and the target; with TRADES also its attack.
    for flags, passes in (
        (["--target-source", "clean", "--margin-at", "clean"], (K + 2, K + 1)),
        (["--base", "trades", "--target-source", "clean", "--margin-at", "clean"], (K + 3, K + 2)),
        (["--target-source", "clean", "--target", "direction"], (K + 3, K + 1)),
    ):
        args, build = _recipe_args([*flags, "--burn-in", "0"], tmp_path, monkeypatch)
        assert _passes(args, build, epoch=0)[0] == passes, flags


# ---------------------------------------------------------------------- the recipe's flags


def test_the_chosen_reading_is_the_default(tmp_path, monkeypatch):
    args, _ = _recipe_args([], tmp_path, monkeypatch)
    assert (args.target, args.target_source, args.weighting, args.margin, args.margin_at) == (
        "interpolate", "aa", "mail", "probability", "adv",
    )  # fmt: skip
    assert (args.aa_steps, args.aa_step_size, args.aa_until_recovered, args.aa_project) == (1, None, False, True)
    assert (args.base, args.beta, args.logit_scale) == ("at", None, None)
    trades, _ = _recipe_args(["--base", "trades"], tmp_path, monkeypatch)
    assert trades.beta == 6.0
    assert args.importance_c is None  # c belongs to --weighting adalab, the first reading's curve
    first, _ = _recipe_args(["--weighting", "adalab"], tmp_path, monkeypatch)
    sharper, _ = _recipe_args(["--weighting", "adalab", "--importance-c", "8"], tmp_path, monkeypatch)
    assert (first.importance_c, sharper.importance_c) == (5.0, 8.0)


def test_help_lists_the_readings_flags_with_their_defaults(capsys):
    recipe = load_recipe("adalab")
    defaults = {
        "--aa-until-recovered": "(default: off)",
        "--aa-project": "(default: on)",
        "--margin": "(default: probability)",
        "--margin-at": "(default: adv)",
        "--logit-scale": "(default: raw logit margin)",
        "--target": "(default: interpolate)",
        "--target-source": "(default: aa)",
        "--weighting": "(default: mail)",
        "--importance-c": "(default: 5)",
        "--base": "(default: at)",
        "--beta": "(default: 6)",
    }
    helps = {action.option_strings[0]: action.help for action in recipe.parser()._actions}
    for flag, default in defaults.items():
        assert default in helps[flag], flag
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in defaults.items():
        assert flag in text and default in text, flag


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--margin", "aa-steps"], "--margin aa-steps counts the steps of --aa-until-recovered"),
        (["--target-source", "adv", "--aa-steps", "3"], "--aa-steps set the adversary's adversary"),
        (["--target-source", "clean", "--aa-until-recovered"], "--target-source clean computes none"),
        (["--target-source", "adv", "--no-aa-project", "--aa-step-size", "0.01"], "--aa-step-size, --no-aa-project"),
        (["--aa-until-recovered", "--aa-steps", "0"], "--aa-until-recovered needs --aa-steps >= 1"),
        (["--margin", "kappa", "--margin-at", "clean"], "--margin-at applies to the probability and logit"),
        (["--logit-scale", "4"], "--logit-scale applies to --margin logit"),
        (["--margin", "logit", "--logit-scale", "0"], "--logit-scale"),
        (["--target", "direction", "--target-source", "adv"], "is the one-hot label"),
        (["--beta", "6"], "--beta applies to --base trades"),
        (["--importance-c", "3"], "--importance-c applies to --weighting adalab, not --weighting mail"),
        (["--target", "nontrue"], "--target"),
        (["--weighting", "label"], "--weighting"),
    ],
)
def test_invalid_combinations_stop_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("adalab").main([*argv, "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()[-1]) > 0
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "passes"),
    [
        # K = 2, K_aa = 2: K + K_aa + 2 / K + K_aa + 1.
        ("--aa-until-recovered --aa-steps 2 --margin aa-steps --target floor --weighting mail", {(6.0, 5.0)}),
        # K = 2, K_aa = 1 on TRADES with the direction target: K + K_aa + 4 + 1 / K + K_aa + 2.
        ("--base trades --target direction --weighting none", {(8.0, 5.0)}),
    ],
)
def test_readings_train_and_log_their_cost(tiny, tmp_path, flags, passes):
    out = tmp_path / "run"
    argv = quick_flags(tiny, out, "--attack-steps", "2", "--max-steps", "2", "--burn-in", "0", *flags.split())
    metrics = load_recipe("adalab").main(argv)
    assert 0 <= metrics["test"]["pgd_acc"] <= metrics["test"]["clean_acc"] + 1e-9
    assert {(r["forwards_per_step"], r["backwards_per_step"]) for r in load_metrics_log(out) if "loss" in r} == passes
