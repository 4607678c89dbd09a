"""SGLR: the table update formula, distributions, the start epoch's cost, checkpoints and DDP consistency."""

import textwrap

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from robustmix import AdversarialCE, AdversarialStep, CompositionError, PGDAttack, TRADESLoss
from robustmix.methods.sglr import SGLRLabels, sglr_targets, sglr_update
from robustmix.runs.checkpoint import join_state, split_state
from robustmix.stages.labels import one_hot
from tests.conftest import launch_two_processes
from tests.toys import LinearNet, batch_4x4

unit = st.floats(0, 1)


@st.composite
def predictions(draw):
    """``(rows, p_clean, p_adv, labels)``: three ``[B, C]`` distributions (rows may be one-hot) and labels."""
    size, classes = draw(st.integers(1, 6)), draw(st.integers(2, 5))
    logit = st.floats(-30, 30, width=32)

    def dist():
        values = draw(st.lists(st.lists(logit, min_size=classes, max_size=classes), min_size=size, max_size=size))
        return torch.tensor(values).softmax(dim=1)

    labels = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=size, max_size=size)))
    rows = one_hot(labels, classes) if draw(st.booleans()) else dist()
    return rows, dist(), dist(), labels


def _assert_distributions(rows: torch.Tensor) -> None:
    assert rows.dtype == torch.float32 and torch.all(rows >= 0)
    torch.testing.assert_close(rows.sum(dim=1), torch.ones(len(rows)), atol=1e-5, rtol=0)


@settings(max_examples=80, deadline=None)
@given(data=predictions(), momentum=unit, clean_weight=unit, r=unit, seed=st.integers(0, 2**16))
@example(data=(torch.eye(2), torch.eye(2), torch.eye(2).flip(0), torch.arange(2)), momentum=0.9, clean_weight=0.2,
         r=1.0, seed=0)  # fmt: skip
def test_update_and_targets_are_distributions_by_the_formula(data, momentum, clean_weight, r, seed):
    rows, p_clean, p_adv, labels = data
    new = sglr_update(rows, p_clean, p_adv, momentum, clean_weight)
    expected = momentum * rows.double() + (1 - momentum) * (
        clean_weight * p_clean.double() + (1 - clean_weight) * p_adv.double()
    )
    torch.testing.assert_close(new.double(), expected, atol=1e-6, rtol=0)
    _assert_distributions(new)
    onehot = one_hot(labels, rows.shape[1])
    targets = sglr_targets(new, onehot, r)
    _assert_distributions(targets)
    assert torch.equal(sglr_targets(new, onehot, 1.0), new)
    assert torch.equal(sglr_targets(new, onehot, 0.0), onehot)
    assert torch.equal(sglr_targets(onehot, onehot, r), onehot)
    # Permutation-equivariant: each row depends on its own example only.
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sglr_update(rows[perm], p_clean[perm], p_adv[perm], momentum, clean_weight), new[perm])
    assert torch.equal(sglr_targets(new[perm], onehot[perm], r), targets[perm])


def _step(labels: SGLRLabels, steps: int = 2) -> AdversarialStep:
    return AdversarialStep([PGDAttack(0.1, 0.05, steps), labels, AdversarialCE()])


def test_before_the_start_epoch_targets_are_one_hot_and_cost_what_pgd_at_costs():
    labels = SGLRLabels(10, 3, start_epoch=2)
    x, y = batch_4x4(4)
    loss, ctx = _step(labels)(LinearNet(), x, y, torch.tensor([1, 3, 5, 7]), epoch=1)
    loss.backward()
    assert torch.equal(ctx.soft_targets, one_hot(y, 3))
    assert "clean" not in ctx.logits and ctx.passes() == (3, 3)  # K + 1 with K = 2: no clean forward
    assert torch.equal(labels.table, torch.zeros(10, 3))


def test_after_the_start_epoch_the_table_follows_the_formula():
    labels = SGLRLabels(10, 3, start_epoch=1, momentum=0.8, clean_weight=0.3, r=0.5)
    model, (x, y), index = LinearNet(), batch_4x4(4), torch.tensor([1, 3, 5, 7])
    rows = one_hot(y, 3)  # rows start one-hot
    for _ in range(2):  # the second step starts from the rows the first one wrote
        loss, ctx = _step(labels)(model, x, y, index, epoch=1)
        p_clean, p_adv = (ctx.logits[name].detach().softmax(dim=1) for name in ("clean", "adv"))
        rows = 0.8 * rows + 0.2 * (0.3 * p_clean + 0.7 * p_adv)
        torch.testing.assert_close(labels.table[index], rows)
        torch.testing.assert_close(ctx.soft_targets, 0.5 * rows + 0.5 * one_hot(y, 3))
        assert not ctx.soft_targets.requires_grad
        loss.backward()
        assert ctx.passes() == (4, 3)  # one clean forward more than PGD-AT, no backward more
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(labels.table[untouched], torch.zeros(6, 3))


def test_the_clean_forward_keeps_no_graph_unless_a_loss_needs_its_gradient():
    model, (x, y), index = LinearNet(), batch_4x4(4), torch.tensor([1, 3, 5, 7])
    _, ctx = _step(SGLRLabels(10, 3, start_epoch=0))(model, x, y, index)
    assert not ctx.logits["clean"].requires_grad and ctx.logits["adv"].requires_grad
    # TRADES differentiates the clean forward: SGLR shares that one forward, with its graph.
    trades = AdversarialStep([PGDAttack(0.1, 0.05, 2, loss="kl"), SGLRLabels(10, 3, start_epoch=0), TRADESLoss(6.0)])
    loss, ctx = trades(model, x, y, index)
    assert ctx.logits["clean"].requires_grad
    loss.backward()
    assert ctx.passes() == (5, 4)  # TRADES' K + 3 / K + 2 with K = 2: SGLR adds no pass


def test_detached_reads_must_be_logits_the_callback_reads():
    class Bad(SGLRLabels):
        detached_reads = ("logits_anti",)

    with pytest.raises(CompositionError, match="detached_reads"):
        AdversarialStep([PGDAttack(0.1, 0.05, 2), Bad(10, 3, start_epoch=0), AdversarialCE()])


def test_state_dict_round_trips_through_a_checkpoint_exactly(tmp_path):
    labels = SGLRLabels(10, 3, start_epoch=0)
    model, (x, y) = LinearNet(), batch_4x4(4)
    torch.manual_seed(1)
    _step(labels)(model, x, y, torch.tensor([0, 2, 4, 9]))
    tensors, values = split_state(_step(labels).state_dict())
    save_file(tensors, tmp_path / "callbacks.safetensors")
    restored = SGLRLabels(10, 3, start_epoch=0)
    step = _step(restored)
    step.load_state_dict(join_state(load_file(tmp_path / "callbacks.safetensors"), values))
    assert torch.equal(restored.table, labels.table)
    outputs = []
    for callback in (labels, restored):
        torch.manual_seed(2)
        outputs.append(_step(callback)(model, x, y, torch.tensor([0, 2, 4, 9]))[1].soft_targets)
    assert torch.equal(*outputs) and torch.equal(restored.table, labels.table)
    with pytest.raises(ValueError, match="shape"):
        SGLRLabels(11, 3, start_epoch=0).load_state_dict(labels.state_dict())


def test_bad_index_and_arguments():
    x, y = batch_4x4(4)
    with pytest.raises(CompositionError, match="index"):
        _step(SGLRLabels(10, 3, start_epoch=0))(LinearNet(), x, y)
    with pytest.raises(IndexError, match="num_examples"):
        _step(SGLRLabels(4, 3, start_epoch=0))(LinearNet(), x, y, torch.tensor([0, 1, 2, 4]))
    # Without the step's input check (which reads the index range for it) SGLR reads the range itself.
    unchecked = AdversarialStep(
        [PGDAttack(eps=0.1, step_size=0.05, steps=1), SGLRLabels(4, 3, start_epoch=0), AdversarialCE()],
        check_inputs=False,
    )
    with pytest.raises(IndexError, match="num_examples"):
        unchecked(LinearNet(), x, y, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="momentum"):
        SGLRLabels(4, 3, start_epoch=0, momentum=1.5)
    with pytest.raises(ValueError, match="start_epoch"):
        SGLRLabels(4, 3, start_epoch=-1)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from torch import nn
    from robustmix import AdversarialCE, AdversarialStep, PGDAttack
    from robustmix.methods.bilaw import BiLAWWeights
    from robustmix.stages.margins import MultiClassMargin
    from robustmix.methods.meta import MetaBatches
    from robustmix.methods.sglr import SGLRLabels

    # Two training forwards (clean, adversarial) before one backward: BatchNorm buffers are not broadcast.
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.num_classes = 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    labels = SGLRLabels(40, 3, start_epoch=0)
    meta = MetaBatches(torch.rand(12, 1, 4, 4), torch.arange(12) % 3, 4)  # each rank draws its own batches
    weights = BiLAWWeights(3, meta, eps=0.1, step_size=0.05, attack_steps=1, meta_every=2, optimizer=optimizer)
    step = AdversarialStep([PGDAttack(0.1, 0.05, 2), MultiClassMargin(), labels, weights, AdversarialCE()])
    torch.manual_seed(1 + rank)
    for i in range(3):
        # Uneven batches (5 on rank 0, 3 on rank 1) on disjoint rows; the last step revisits rows.
        size = 5 if rank == 0 else 3
        index = torch.arange(size) * 2 + rank + (10 * i if i < 2 else 0)
        x, y = torch.rand(size, 1, 4, 4), index % 3
        loss, _ = step(model, x, y, index, step=i)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
    torch.save({"table": labels.table, **weights.net.state_dict()}, sys.argv[1] + f".rank{rank}.pt")
    """
)


@pytest.mark.distributed
def test_every_process_holds_the_same_table_and_weight_net(tmp_path):
    script = tmp_path / "sglr_ddp.py"
    script.write_text(DDP_SCRIPT)
    launch_two_processes(script, str(tmp_path / "state"))
    states = [torch.load(tmp_path / f"state.rank{rank}.pt") for rank in range(2)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:  # the SGLR table, and the BiLAW net after two lookaheads on different meta batches
        assert torch.equal(states[0][key], states[1][key]), key
    table = states[0]["table"]
    written = table.sum(dim=1) > 0
    # Rows seen by either process: rank 0 wrote 0, 2, ..., 8 and 10, ..., 18; rank 1 wrote 1, 3, 5 and 11, 13, 15.
    seen = {*range(0, 10, 2), *range(10, 20, 2), 1, 3, 5, 11, 13, 15}
    assert set(torch.nonzero(written).flatten().tolist()) == seen
    torch.testing.assert_close(table[written].sum(dim=1), torch.ones(len(seen)))
