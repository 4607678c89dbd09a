"""The one-step lookahead: the virtual step is torch.optim.SGD's step, and gradients reach the weights through it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustmix.core.context import StepContext
from robustmix.methods.meta import (
    LookaheadReweighter,
    MetaBatches,
    functional_forward,
    set_meta_gradients,
    virtual_sgd_step,
)
from robustmix.runs.checkpoint import join_state, split_state
from robustmix.stages.weights import normalize_weights


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
        self.unused = nn.Linear(2, 2)  # gets no gradient: SGD leaves it alone
        self.body[0].bias.requires_grad_(False)  # frozen: SGD leaves it alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Net()


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    x, y = _data(seed)
    return F.cross_entropy(model(x), y)


SGD_SETTINGS = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3},
    {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    {"lr": 0.1, "momentum": 0.5, "maximize": True},
]


@pytest.mark.parametrize("settings", SGD_SETTINGS)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "with-momentum-buffer"])
def test_virtual_step_is_the_real_sgd_step_bitwise(settings, foreach, warm):
    model = _model()
    optimizer = torch.optim.SGD(
        [
            {"params": model.body[0].parameters()},
            {"params": [*model.body[1:].parameters(), *model.unused.parameters()]},
        ],
        foreach=foreach,
        **settings,
    )
    optimizer.param_groups[1]["lr"] = 0.03  # per-group hyperparameters are read per parameter
    if warm:  # a real step first, so the momentum buffers exist
        _loss(model, 0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    virtual = virtual_sgd_step(model, _loss(model, 1), optimizer, create_graph=False)
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())  # the model is untouched
    assert all(p.grad is None for p in model.parameters())

    _loss(model, 1).backward()
    optimizer.step()
    assert virtual.keys() == dict(model.named_parameters()).keys()
    for name, param in model.named_parameters():
        assert torch.equal(virtual[name], param), name
    assert torch.equal(virtual["unused.weight"], before["unused.weight"])
    assert torch.equal(virtual["body.0.bias"], before["body.0.bias"])


def test_gradient_reaches_the_weights_through_the_virtual_step():
    """d L_meta(theta') / d w_i = -lr / B * <grad L_meta(theta'), grad l_i(theta)> (no Nesterov)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False)
    lr = 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-2)
    _loss(model, 0).backward()
    optimizer.step()  # a momentum buffer, constant in w: it does not change the derivative
    optimizer.zero_grad(set_to_none=True)

    x, y = _data(2)
    x_meta, y_meta = _data(3)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    z = torch.randn(len(y), 2)
    w = normalize_weights(F.softplus(net(z).squeeze(1)))
    inner = (w * F.cross_entropy(model(x), y, reduction="none")).mean()
    virtual = virtual_sgd_step(model, inner, optimizer)
    meta = F.cross_entropy(functional_forward(model, virtual, x_meta), y_meta)
    d_meta_d_w = torch.autograd.grad(meta, w, retain_graph=True)[0]

    per_sample = torch.stack(
        [
            torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), model.weight)[0]
            for i in range(len(y))
        ]
    )
    at_virtual = nn.Linear(5, 3, bias=False)
    at_virtual.weight.data.copy_(virtual["weight"].detach())
    meta_grad = torch.autograd.grad(F.cross_entropy(at_virtual(x_meta), y_meta), at_virtual.weight)[0]
    expected = -lr / len(y) * (per_sample * meta_grad).sum(dim=(1, 2))
    torch.testing.assert_close(d_meta_d_w, expected, rtol=1e-5, atol=1e-8)

    # ... and on to the weight net's parameters by the chain rule.
    chained = torch.autograd.grad(w, list(net.parameters()), grad_outputs=expected, retain_graph=True)
    set_meta_gradients(meta, net)
    for param, grad in zip(net.parameters(), chained):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-7)
    assert model.weight.grad is None  # the model's own gradient is left alone


def test_functional_forward_leaves_batchnorm_statistics_and_modes_alone():
    model = _model().eval()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x, _ = _data()
    out = functional_forward(model, dict(model.named_parameters()), x)
    model.train()
    torch.testing.assert_close(out, model(x))  # batch statistics, as in training
    model.load_state_dict(stats)
    model.eval()
    functional_forward(model, dict(model.named_parameters()), x)
    assert not model.training and all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())


def test_the_lookahead_needs_sgd():
    model = _model()
    with pytest.raises(TypeError, match="reproduces torch"):
        virtual_sgd_step(model, _loss(model, 0), torch.optim.Adam(model.parameters()))


def test_meta_batches_are_reproducible_and_resumable():
    images, labels = torch.rand(10, 1, 2, 2), torch.arange(10)
    batches = MetaBatches(images, labels, 4, seed=3)
    first = [next(batches) for _ in range(3)]
    for x, y in first:
        assert len(set(y.tolist())) == 4 and torch.equal(x, images[y])
    state = split_state(batches.state_dict())
    again = MetaBatches(images, labels, 4, seed=3)
    assert torch.equal(next(again)[1], first[0][1])
    again.load_state_dict(join_state(*state))
    assert torch.equal(next(again)[1], next(batches)[1])
    assert not torch.equal(next(MetaBatches(images, labels, 4, seed=4))[1], first[0][1])
    with pytest.raises(ValueError, match="batch_size"):
        MetaBatches(images, labels, 11)
    with pytest.raises(ValueError, match="labels"):
        MetaBatches(images, labels[:3], 2)


class _Lookahead(LookaheadReweighter):
    def meta_loss(self, ctx, x_meta, y_meta):
        return self.net(x_meta).square().mean()


def test_lookahead_callback_runs_every_n_steps_and_needs_the_optimizer():
    net = nn.Linear(5, 1)
    callback = _Lookahead(net, [_data(0)], meta_every=3, meta_lr=0.1)  # a finite loader is cycled
    ctx = StepContext(model=net, attack_model=net, inputs=torch.rand(2, 5), targets=torch.zeros(2, dtype=torch.long),
                      num_classes=2)  # fmt: skip
    with pytest.raises(RuntimeError, match="optimizer"):
        callback.maybe_meta_step(ctx)
    callback.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    changes = []
    for step in range(7):
        ctx.step = step
        before = net.weight.clone()
        callback.maybe_meta_step(ctx)
        changes.append(not torch.equal(before, net.weight))
    assert changes == [True, False, False, True, False, False, True]
    with pytest.raises(ValueError, match="meta_every"):
        _Lookahead(net, [], meta_every=0, meta_lr=0.1)
