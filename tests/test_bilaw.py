"""BiLAW: learned weights are non-negative with batch mean 1, detached, equivariant; the lookahead's cost and state."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from robustmix import AdversarialCE, AdversarialStep, CompositionError, PGDAttack
from robustmix.methods.bilaw import OUTPUTS, BiLAWWeightNet, BiLAWWeights, bilaw_features, bilaw_weights
from robustmix.methods.meta import MetaBatches
from robustmix.runs.checkpoint import join_state, split_state
from robustmix.stages.margins import MultiClassMargin, multiclass_margin
from tests.toys import SmallConvNet, batch_4x4

seeds = st.integers(0, 2**16)


@st.composite
def margin_batches(draw):
    size, classes = draw(st.integers(1, 8)), draw(st.integers(2, 5))
    value = st.floats(-1e4, 1e4, width=32)
    logits = torch.tensor(
        draw(st.lists(st.lists(value, min_size=classes, max_size=classes), min_size=size, max_size=size))
    )
    labels = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=size, max_size=size)))
    return multiclass_margin(logits, labels), labels


@settings(max_examples=60, deadline=None)
@given(batch=margin_batches(), output=st.sampled_from(OUTPUTS), seed=seeds)
@example(batch=(torch.zeros(1, 2), torch.tensor([1])), output="sigmoid", seed=0)
def test_weights_are_non_negative_mean_one_and_equivariant(batch, output, seed):
    margin_vector, y = batch
    torch.manual_seed(seed)
    net = BiLAWWeightNet(margin_vector.shape[1], hidden=8, output=output)
    features = bilaw_features(margin_vector, y)
    assert features.shape == (len(y), 2 * margin_vector.shape[1])
    assert torch.equal(features[:, margin_vector.shape[1] :].argmax(dim=1), y)  # the class-conditioning half
    w = bilaw_weights(net, features)
    assert w.shape == y.shape and torch.isfinite(w).all() and torch.all(w >= 0)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0), atol=1e-5, rtol=0)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(bilaw_weights(net, bilaw_features(margin_vector[perm], y[perm])), w[perm])


def _bilaw(model: nn.Module, *, steps: int = 2, meta_every: int = 2, clean_meta_loss: bool = False):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    weights = BiLAWWeights(
        3, MetaBatches(*batch_4x4(12, seed=5), batch_size=8), eps=0.1, step_size=0.05, attack_steps=steps,
        meta_every=meta_every, clean_meta_loss=clean_meta_loss, optimizer=optimizer,
    )  # fmt: skip
    step = AdversarialStep([PGDAttack(0.1, 0.05, steps), MultiClassMargin(), weights, AdversarialCE()])
    return step, weights, optimizer


@pytest.mark.parametrize("clean_meta_loss", [False, True])
def test_cost_per_step_with_and_without_the_lookahead(clean_meta_loss):
    model = SmallConvNet()
    step, callback, _ = _bilaw(model, steps=2, clean_meta_loss=clean_meta_loss)
    x, y = batch_4x4()
    net_before = [p.clone() for p in callback.net.parameters()]
    params_before = [p.clone() for p in model.parameters()]
    stats_before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    loss, ctx = step(model, x, y, step=0)  # a lookahead step
    assert any(not torch.equal(a, b) for a, b in zip(net_before, callback.net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert not ctx.weights.requires_grad
    loss.backward()
    # PGD-AT's K + 1, plus the lookahead: 1 virtual forward of x_adv, K + 1 for the meta batch's attack and
    # its forward at theta' (+ 1 clean forward at theta'); the meta batch has the batch's size here.
    extra = 2 + 2 + clean_meta_loss
    assert ctx.passes() == (3 + extra, 3 + extra)
    after_lookahead = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(stats_before)
    torch.manual_seed(3)
    loss, ctx = step(model, x, y, step=1)  # no lookahead: PGD-AT's cost
    loss.backward()
    assert ctx.passes() == (3, 3)
    assert all(torch.equal(v, after_lookahead[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(ctx.weights.mean(), torch.tensor(1.0))


@pytest.mark.parametrize("seed", [0, 1])
def test_lookahead_learns_to_down_weight_mislabeled_examples(seed):
    """Two of eight training examples carry the wrong label; the clean meta data teaches the net to drop them."""
    torch.manual_seed(seed)
    model = nn.Linear(2, 2)
    model.num_classes = 2
    x = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).repeat(4, 1)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])  # the last two are mislabeled
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    callback = BiLAWWeights(
        2, MetaBatches(x, torch.tensor([0, 1]).repeat(4), 8), eps=0.0, step_size=0.0, attack_steps=0, meta_every=1,
        meta_lr=0.05, hidden=16, optimizer=optimizer,
    )  # fmt: skip
    step = AdversarialStep([PGDAttack(0.0, 0.0, 0), MultiClassMargin(), callback, AdversarialCE()])
    for i in range(40):
        loss, ctx = step(model, x, y, step=i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert ctx.weights[6:].max() < 0.05 < 0.5 < ctx.weights[:6].min()


def test_state_dict_round_trips_through_a_checkpoint():
    model = SmallConvNet()
    step, callback, optimizer = _bilaw(model, meta_every=1)
    x, y = batch_4x4()
    for i in range(2):
        loss, _ = step(model, x, y, step=i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    twin, twin_callback, _ = _bilaw(SmallConvNet(), meta_every=1)
    twin_callback.optimizer = optimizer
    twin.load_state_dict(join_state(*split_state(step.state_dict())))
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for s, c in ((step, callback), (twin, twin_callback)):
        model.load_state_dict(stats)
        torch.manual_seed(3)
        _, ctx = s(model, x, y, step=2)
        results.append((ctx.weights, [p.detach().clone() for p in c.net.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_composition_needs_the_multi_class_margin():
    weights = BiLAWWeights(3, MetaBatches(*batch_4x4(4), batch_size=2), eps=0.1, step_size=0.05, attack_steps=2)
    with pytest.raises(CompositionError, match="MultiClassMargin"):
        AdversarialStep([PGDAttack(0.1, 0.05, 2), weights, AdversarialCE()])
    with pytest.raises(ValueError, match="output"):
        BiLAWWeightNet(3, output="relu")
