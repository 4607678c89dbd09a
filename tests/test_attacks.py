"""Invariants of the attack generators (ground rules 1-6 of the architecture)."""

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from robustmix.attacks import FGSMAttack, PGDAttack, fgsm_rs, perturb, pgd
from robustmix.attacks.pgd import random_start
from robustmix.core.context import StepContext


class SmallNet(nn.Module):
    """Conv + BatchNorm + dropout: everything whose mode an attack must respect."""

    def __init__(self, num_classes: int = 4, channels: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def _net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet()


def _linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().amax(dim=1)


def _l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


budget = st.floats(min_value=0.0, max_value=0.5, allow_nan=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    eps=budget,
    per_sample=st.booleans(),
    norm=st.sampled_from(["linf", "l2"]),
    loss=st.sampled_from(["ce", "kl", "cw"]),
    start=st.sampled_from(["uniform", "normal", "none"]),
    steps=st.integers(0, 3),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
@example(eps=0.0, per_sample=False, norm="linf", loss="ce", start="uniform", steps=2, batch=1, seed=0)
@example(eps=0.5, per_sample=True, norm="l2", loss="cw", start="uniform", steps=3, batch=5, seed=1)
def test_pgd_stays_in_ball_and_box(eps, per_sample, norm, loss, start, steps, batch, seed):
    model = _net()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 6, 6, generator=g)
    x[0, 0, 0, 0] = 0.0  # pixels on the box boundary
    y = torch.randint(0, 4, (batch,), generator=g)
    eps_arg = torch.rand(batch, generator=g) * eps if per_sample else eps
    bound = eps_arg if per_sample else torch.full((batch,), eps)
    reference = model.eval()(x).detach() if loss == "kl" else None
    model.train()
    x_adv = pgd(
        model, x, y, eps=eps_arg, step_size=eps / 3 + 0.01, steps=steps, norm=norm, loss=loss, start=start,
        reference=reference, generator=g,
    )  # fmt: skip
    distance = _linf(x_adv, x) if norm == "linf" else _l2(x_adv, x)
    assert torch.all(distance <= bound + 1e-6)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert x_adv.dtype == x.dtype and x_adv.device == x.device and x_adv.shape == x.shape
    assert not x_adv.requires_grad


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), norm=st.sampled_from(["linf", "l2"]))
def test_pgd_is_deterministic_under_a_seed(seed, norm):
    model = _net()
    x = torch.rand(3, 1, 6, 6)
    y = torch.tensor([0, 1, 2])
    runs = [
        pgd(model, x, y, eps=0.1, step_size=0.03, steps=3, norm=norm, generator=torch.Generator().manual_seed(seed))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("bn_mode", ["eval", "train", "train_frozen_bn"])
def test_no_parameter_grad_and_modes_restored(bn_mode):
    model = _net()
    model.train()
    model.dropout.eval()  # a user's per-module choice must survive the attack
    x, y = torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 3])
    pgd(model, x, y, eps=0.1, step_size=0.03, steps=2, bn_mode=bn_mode)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.features.training and not model.dropout.training


def test_modes_restored_when_the_attack_raises():
    model = _net()
    model.train()
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")

    handle = model.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, torch.rand(2, 1, 6, 6), torch.tensor([0, 1]), eps=0.1, step_size=0.03, steps=3)
    handle.remove()
    assert all(m.training for m in model.modules())


def test_bn_modes_and_running_statistics():
    model = _net()
    model.train()
    bn = model.features[1]
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 4, (8,))
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    for mode in ("eval", "train_frozen_bn"):
        pgd(model, x, y, eps=0.1, step_size=0.03, steps=2, bn_mode=mode)
        assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
        assert torch.equal(bn.num_batches_tracked, before[2])
        assert bn.momentum == 0.1
    pgd(model, x, y, eps=0.1, step_size=0.03, steps=2, bn_mode="train")
    assert not torch.equal(bn.running_mean, before[0])


def test_frozen_bn_uses_batch_statistics():
    model = _net()
    model.eval()
    seen = []
    model.features[1].register_forward_hook(lambda m, a, out: seen.append(m.training))
    pgd(
        model,
        torch.rand(2, 1, 6, 6),
        torch.tensor([0, 1]),
        eps=0.1,
        step_size=0.03,
        steps=1,
        bn_mode="train_frozen_bn",
    )
    assert seen == [True] and not model.training


@functools.cache
def _trained_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small net fit to 4 separable classes of 6x6 patterns, seeded (a second of CPU)."""
    torch.manual_seed(0)
    prototypes = torch.rand(4, 1, 6, 6)
    y = torch.arange(4).repeat(32)
    x = (prototypes[y] + 0.1 * torch.randn(len(y), 1, 6, 6)).clamp(0, 1)
    model = SmallNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x, y


def test_pgd_increases_the_loss_of_a_trained_model():
    model, x, y = _trained_model()
    clean = F.cross_entropy(model(x), y).item()
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        x_adv = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10, norm=norm)
        assert F.cross_entropy(model(x_adv), y).item() > clean + 0.1
    x_fgsm = fgsm_rs(model, x, y, eps=0.1)
    assert F.cross_entropy(model(x_fgsm), y).item() > clean


def test_descent_lowers_the_loss():
    model, x, y = _trained_model()
    x_adv = pgd(model, x, y, eps=0.1, step_size=0.025, steps=10)
    x_back = perturb(model, x, y, eps=0.1, step_size=0.05, steps=1, descend=True, x_init=x_adv)
    assert F.cross_entropy(model(x_back), y).item() < F.cross_entropy(model(x_adv), y).item()
    assert torch.all(_linf(x_back, x) <= 0.1 + 1e-6)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_attacks_work_inside_no_grad_evaluation(context):
    model, x, y = _trained_model()
    with context():
        x_in, y_in = x.clone(), y.clone()  # under inference_mode both are inference tensors
        x_adv = pgd(model, x_in, y_in, eps=0.1, step_size=0.025, steps=3)
    assert _linf(x_adv, x).max() > 0.05


class HalfPrecisionLinear(nn.Module):
    """A confident linear model computed in float16: its input gradient underflows unless scaled."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(36, 2))
        self.weight.data[:, 1] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # z_0 - z_1 = 36 * 0.575 = 20.7: p_1 ~ 1e-9, below fp16's smallest subnormal (6e-8) until scaled.
        return (x.flatten(1).half() @ self.weight.half()).float() * 0.575


def test_fp16_loss_scaling_keeps_input_gradients_alive():
    model = HalfPrecisionLinear()
    x = torch.full((2, 1, 6, 6), 0.5)
    y = torch.zeros(2, dtype=torch.long)
    stalled = pgd(model, x, y, eps=0.1, step_size=0.05, steps=1, start="none", loss_scale=1.0)
    moved = pgd(model, x, y, eps=0.1, step_size=0.05, steps=1, start="none")
    assert torch.equal(stalled, x), "without scaling the fp16 gradient should underflow to zero"
    assert _linf(moved, x).min() > 0.04


def test_l2_random_start_is_in_the_ball():
    x = torch.rand(64, 3, 4, 4)
    start = random_start(x, 0.3, "l2", "uniform", torch.Generator().manual_seed(0))
    assert torch.all(_l2(start, x) <= 0.3 + 1e-6)


def _ctx(model, x, y, **kw):
    return StepContext(model=model, attack_model=model, inputs=x, targets=y, num_classes=4, **kw)


def test_attack_callbacks_write_their_fields():
    model, x, y = _trained_model()
    ctx = _ctx(model, x[:8], y[:8])
    PGDAttack(eps=0.1, step_size=0.025, steps=4, track_kappa=True)(ctx)
    assert ctx.x_adv.shape == x[:8].shape and torch.all(ctx.eps == 0.1)
    assert ctx.kappa.dtype == torch.int64 and ctx.kappa.min() >= 0 and ctx.kappa.max() <= 4
    ctx = _ctx(model, x[:8], y[:8])
    FGSMAttack(eps=0.1)(ctx)
    assert torch.all(_linf(ctx.x_adv, x[:8]) <= 0.1 + 1e-6)


def test_kappa_counts_correct_iterates():
    model, x, y = _trained_model()
    ctx = _ctx(model, x, y)
    PGDAttack(eps=0.0, step_size=0.0, steps=5, track_kappa=True)(ctx)
    correct = (model(x).argmax(1) == y).long()
    assert torch.equal(ctx.kappa, 5 * correct)


def test_per_sample_eps_from_the_context():
    model, x, y = _trained_model()
    eps = torch.linspace(0, 0.2, len(y))
    ctx = _ctx(model, x, y, eps=eps)
    PGDAttack(eps=None, step_size=0.5, steps=3, relative_step_size=True)(ctx)
    assert torch.all(_linf(ctx.x_adv, x) <= eps + 1e-6)
    assert _linf(ctx.x_adv, x)[0] == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -0.1}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"step_size": -1.0}, "step_size"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"norm": "l1"}, "norm"),
        ({"start": "zeros"}, "start"),
        ({"loss": "mse"}, "loss"),
        ({"bn_mode": "frozen"}, "bn_mode"),
    ],
)
def test_bad_attack_settings_are_rejected(kwargs, message):
    settings_ = {"eps": 0.1, "step_size": 0.03, "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        PGDAttack(**settings_)
    model = _net()
    with pytest.raises(ValueError, match=message):
        pgd(model, torch.rand(2, 1, 6, 6), torch.tensor([0, 1]), **settings_)


def test_bad_per_sample_eps_is_rejected():
    model = _net()
    x, y = torch.rand(2, 1, 6, 6), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="shape"):
        pgd(model, x, y, eps=torch.tensor([0.1, 0.1, 0.1]), step_size=0.01, steps=1)
    with pytest.raises(ValueError, match=">= 0"):
        pgd(model, x, y, eps=torch.tensor([0.1, -0.1]), step_size=0.01, steps=1)
