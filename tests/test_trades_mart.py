"""TRADES and MART: the released formulas, gradients through the clean side, MAIL and label compositions, DDP.

Run as a script, this file is the worker of the two-process test (an Accelerate loop a user would write).
"""

import argparse
import contextlib
import inspect
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from robustmix import AdversarialCE, AdversarialStep, CompositionError, PGDAttack, sync_buffers
from robustmix.methods.sglr import SGLRLabels
from robustmix.runs.folder import load_metrics_log
from robustmix.stages.labels import LabelSmoothing, one_hot, smooth_labels
from robustmix.stages.losses import MARTLoss, TRADESLoss, classification_loss, mart_loss, trades_loss
from robustmix.stages.margins import ProbabilityMargin, probability_margin
from robustmix.stages.weights import MAILWeights, mail_weights
from tests.conftest import launch_two_processes, load_recipe, quick_flags
from tests.toys import batch_8x8, tiny_bn

CLEAN = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-2.0, 4.0, 1.0], [0.0, 0.0, 0.0]])
ADV = torch.tensor([[1.0, 0.5, 0.2], [2.5, -1.0, 1.0], [0.3, 0.1, -0.4], [3.0, -3.0, 0.0]])
Y = torch.tensor([0, 2, 1, 2])
W = torch.tensor([0.5, 1.5, 2.0, 0.0])


def _kl_reference(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """``KL(p(x) || p(x_adv))`` per sample, in float64, clean side not detached."""
    p = clean.double().softmax(dim=1)
    return (p * (p.log() - adv.double().log_softmax(dim=1))).sum(dim=1)


def _mart_reference(clean, adv, y, beta, weights=None):
    """MART's loss as its released code writes it (argsort for the best wrong class, KLDivLoss), in float64."""
    clean, adv = clean.double(), adv.double()
    adv_probs = adv.softmax(dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(adv, y, reduction="none") + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), new_y, reduction="none"
    )
    nat_probs = clean.softmax(dim=1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl = nn.KLDivLoss(reduction="none")(torch.log(adv_probs + 1e-12), nat_probs).sum(dim=1)
    bce = bce if weights is None else bce * weights.double()
    return bce.mean() + beta * (kl * (1.0000001 - true_probs)).mean()


# ---------------------------------------------------------------------- TRADES


def test_trades_loss_is_clean_ce_plus_beta_times_mean_kl():
    expected = F.cross_entropy(CLEAN.double(), Y) + 6.0 * _kl_reference(CLEAN, ADV).mean()
    loss = trades_loss(CLEAN, ADV, Y, beta=6.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(trades_loss(CLEAN, CLEAN, Y, beta=6.0), F.cross_entropy(CLEAN, Y))  # KL(p || p) = 0


def test_trades_gradient_reaches_the_clean_logits_through_the_kl_term():
    clean = CLEAN.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(trades_loss(clean, ADV, Y, beta=1.0) - F.cross_entropy(clean, Y), clean)
    reference = clean.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(_kl_reference(reference, ADV).mean(), reference)
    assert expected.abs().max() > 1e-2  # a detached clean distribution would give zero here
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_trades_weights_apply_to_the_kl_term_and_soft_targets_to_the_ce_term():
    kl = _kl_reference(CLEAN, ADV)
    weighted = F.cross_entropy(CLEAN.double(), Y) + 2.0 * (W.double() * kl).mean()
    torch.testing.assert_close(trades_loss(CLEAN, ADV, Y, 2.0, weights=W).double(), weighted, rtol=1e-6, atol=1e-6)
    q = smooth_labels(Y, 3, 0.2)
    soft = -(q.double() * CLEAN.double().log_softmax(dim=1)).sum(dim=1).mean() + 2.0 * kl.mean()
    torch.testing.assert_close(trades_loss(CLEAN, ADV, Y, 2.0, soft_targets=q).double(), soft, rtol=1e-6, atol=1e-6)


@st.composite
def logit_pairs(draw, bound: float = 1e4):
    """``(clean logits [B, C], adversarial logits [B, C], labels [B])``."""
    size, classes = draw(st.integers(1, 5)), draw(st.integers(2, 5))
    row = st.lists(st.floats(-bound, bound, width=32), min_size=classes, max_size=classes)
    clean, adv = (torch.tensor(draw(st.lists(row, min_size=size, max_size=size))) for _ in range(2))
    y = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=size, max_size=size)))
    return clean, adv, y


EXTREME = (torch.tensor([[1e4, -1e4, 0.0]]), torch.tensor([[-1e4, 1e4, 0.0]]), torch.tensor([0]))
ONE_HOT_AGREEING = (torch.tensor([[1e4, -1e4]]), torch.tensor([[1e4, -1e4]]), torch.tensor([1]))


@settings(max_examples=60, deadline=None)
@given(batch=logit_pairs(), beta=st.floats(0, 10))
@example(batch=EXTREME, beta=6.0)
@example(batch=ONE_HOT_AGREEING, beta=6.0)
def test_trades_loss_is_at_least_the_clean_ce_and_finite(batch, beta):
    clean, adv, y = (t.clone().requires_grad_(t.is_floating_point()) for t in batch)
    loss = trades_loss(clean, adv, y, beta)
    ce = F.cross_entropy(clean.detach(), y)
    assert torch.isfinite(loss) and loss >= ce - 1e-3 * (1 + ce.abs())
    loss.backward()
    assert torch.isfinite(clean.grad).all() and torch.isfinite(adv.grad).all()


# ---------------------------------------------------------------------- MART


def test_mart_loss_matches_the_released_code():
    torch.testing.assert_close(mart_loss(CLEAN, ADV, Y, 5.0).double(), _mart_reference(CLEAN, ADV, Y, 5.0))
    weighted = mart_loss(CLEAN, ADV, Y, 5.0, weights=W).double()
    torch.testing.assert_close(weighted, _mart_reference(CLEAN, ADV, Y, 5.0, W))  # weights on the BCE term


def test_mart_gradient_reaches_the_clean_logits_through_the_kl_and_the_misclassification_factor():
    clean = CLEAN.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mart_loss(clean, ADV, Y, 5.0), clean)
    reference = CLEAN.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(_mart_reference(reference, ADV, Y, 5.0), reference)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)

    # Detaching the factor 1 - p_y(x) (not the reference's choice) gives another gradient.
    def detached_factor(logits):
        p = logits.softmax(dim=1)
        kl = (p * (p.log() - torch.log(ADV.double().softmax(dim=1) + 1e-12))).sum(dim=1)
        return 5.0 * (kl * (1.0000001 - p.gather(1, Y[:, None]).squeeze(1).detach())).mean()

    (other,) = torch.autograd.grad(detached_factor(reference), reference)
    assert (expected - other).abs().max() > 1e-2


@settings(max_examples=60, deadline=None)
@given(batch=logit_pairs(), beta=st.floats(0, 10))
@example(batch=EXTREME, beta=5.0)
@example(batch=ONE_HOT_AGREEING, beta=5.0)
def test_mart_loss_and_gradients_are_finite_for_any_logits(batch, beta):
    clean, adv, y = (t.clone().requires_grad_(t.is_floating_point()) for t in batch)
    loss = mart_loss(clean, adv, y, beta)
    assert torch.isfinite(loss) and loss >= -1e-3  # -log(1.0001 + 1e-12) is the smallest BCE
    loss.backward()
    assert torch.isfinite(clean.grad).all() and torch.isfinite(adv.grad).all()


# ---------------------------------------------------------------------- callbacks and compositions


TRADES_ATTACK = {"eps": 0.1, "step_size": 0.03, "loss": "kl", "start": "normal"}
CE_ATTACK = {"eps": 0.1, "step_size": 0.03}


@pytest.mark.parametrize(
    ("callbacks", "passes"),
    [
        ([PGDAttack(steps=10, **TRADES_ATTACK), TRADESLoss()], (13, 12)),  # attack: 1 eval forward + 10 + 10
        ([PGDAttack(eps=0.1, step_size=0.03, steps=10, start="normal"), MARTLoss()], (12, 12)),
    ],
    ids=["trades", "mart"],
)
def test_cost_per_step(callbacks, passes):
    loss, ctx = AdversarialStep(callbacks)(tiny_bn(), *batch_8x8())
    loss.backward()
    assert ctx.passes() == passes


def test_losses_need_both_forwards_of_an_attack():
    for loss in (TRADESLoss(), MARTLoss()):
        with pytest.raises(CompositionError, match="needs `logits_adv`; add an attack"):
            AdversarialStep([loss])
    for make, beta in ((TRADESLoss, -1.0), (MARTLoss, float("nan"))):
        with pytest.raises(ValueError, match="beta"):
            make(beta)


def _step(callbacks, seed: int = 0):
    torch.manual_seed(seed)
    return AdversarialStep(callbacks)(tiny_bn(), *batch_8x8())


def test_trades_callback_writes_the_trades_loss_of_the_training_logits():
    loss, ctx = _step([PGDAttack(steps=3, **TRADES_ATTACK), TRADESLoss(beta=3.0)])
    assert torch.equal(loss, trades_loss(ctx.logits["clean"], ctx.logits["adv"], ctx.targets, 3.0))


def _mail_weights(ctx) -> torch.Tensor:
    """MAIL's weights from the detached adversarial training logits, as MAIL's code computes them."""
    weights = mail_weights(-probability_margin(ctx.logits["adv"].detach(), ctx.targets))
    assert weights.std() > 1e-3  # not uniform: the compositions below could tell them apart
    return weights


def test_mail_composes_with_adversarial_ce():
    loss, ctx = _step([PGDAttack(steps=3, **CE_ATTACK), ProbabilityMargin(), MAILWeights(), AdversarialCE()])
    expected = (F.cross_entropy(ctx.logits["adv"], ctx.targets, reduction="none") * _mail_weights(ctx)).mean()
    torch.testing.assert_close(loss, expected)


def test_mail_weights_the_kl_term_of_trades():
    loss, ctx = _step([PGDAttack(steps=3, **TRADES_ATTACK), ProbabilityMargin(), MAILWeights(), TRADESLoss()])
    clean, adv = ctx.logits["clean"], ctx.logits["adv"]
    kl = _kl_reference(clean.detach(), adv.detach()).float()
    torch.testing.assert_close(loss, F.cross_entropy(clean, ctx.targets) + 6.0 * (_mail_weights(ctx) * kl).mean())


def test_mail_weights_the_bce_term_of_mart():
    loss, ctx = _step([PGDAttack(steps=3, **CE_ATTACK), ProbabilityMargin(), MAILWeights(), MARTLoss()])
    clean, adv = ctx.logits["clean"].detach(), ctx.logits["adv"].detach()
    expected = _mart_reference(clean, adv, ctx.targets, 5.0, _mail_weights(ctx))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_label_refiners_replace_the_labels_in_the_trades_ce_term():
    loss, ctx = _step([PGDAttack(steps=3, **TRADES_ATTACK), LabelSmoothing(0.2), TRADESLoss()])
    clean, adv = ctx.logits["clean"], ctx.logits["adv"]
    kl = _kl_reference(clean.detach(), adv.detach()).float()
    expected = classification_loss(clean, ctx.targets, smooth_labels(ctx.targets, 3, 0.2)) + 6.0 * kl.mean()
    torch.testing.assert_close(loss, expected)


def test_sglr_soft_labels_replace_the_labels_in_the_trades_ce_term_at_no_extra_pass():
    sglr = SGLRLabels(num_examples=8, num_classes=3, start_epoch=0)
    step = AdversarialStep([PGDAttack(steps=10, **TRADES_ATTACK), sglr, TRADESLoss()])
    loss, ctx = step(tiny_bn(), *batch_8x8(), index=torch.arange(8))
    assert not torch.equal(ctx.soft_targets, one_hot(ctx.targets, 3))
    clean, adv = ctx.logits["clean"], ctx.logits["adv"]
    kl = _kl_reference(clean.detach(), adv.detach()).float()
    torch.testing.assert_close(loss, classification_loss(clean, ctx.targets, ctx.soft_targets) + 6.0 * kl.mean())
    loss.backward()
    assert ctx.passes() == (13, 12)  # SGLR reads the clean forward TRADES runs anyway


# ---------------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    ("name", "flags", "callbacks", "passes"),
    [
        ("trades", [], "TRADESLoss(beta=6.0)", (4, 3)),
        ("trades", ["--beta", "3"], "TRADESLoss(beta=3.0)", (4, 3)),
        ("mart", [], "MARTLoss(beta=5.0)", (3, 3)),
    ],
)
def test_recipe_trains_and_writes_its_run_folder(tiny, tmp_path, name, flags, callbacks, passes):
    out = tmp_path / "run"
    metrics = load_recipe(name).main(quick_flags(tiny, out, "--max-steps", "2", "--attack-steps", "1", *flags))
    assert 0 <= metrics["test"]["pgd_acc"] <= metrics["test"]["clean_acc"] <= 1
    assert callbacks in json.loads((out / "config.json").read_text())["callbacks"]
    rows = [row for row in load_metrics_log(out) if "forwards_per_step" in row]
    assert rows and all((row["forwards_per_step"], row["backwards_per_step"]) == passes for row in rows)


# ---------------------------------------------------------------------- two processes, two forwards, one backward

#: DDP configurations the worker trains with: whether DDP broadcasts buffers before every forward, and
#: whether it runs as torch did before pytorch/pytorch#175851 (no version-counter preservation in the
#: buffer broadcast; torch >= 2.6 up to that fix).
CONFIGS = {"no_broadcast": (False, False), "default": (True, False), "default_before_fix": (True, True)}


def _ddp_preserves_buffer_versions() -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return "_unsafe_preserve_version_counter" in inspect.getsource(DistributedDataParallel._sync_buffers)


@pytest.mark.distributed
def test_trades_under_ddp_with_batchnorm(tmp_path):
    launch_two_processes(__file__, "--out", str(tmp_path))

    def outcome(config: str, rank: int):
        return torch.load(tmp_path / f"{config}.rank{rank}.pt")

    # broadcast_buffers=False and a BatchNorm-statistics average: runs on every torch, both ranks end identical.
    # With the fix, so does the default; before it, the buffer broadcast at the second forward breaks the backward.
    fixed = _ddp_preserves_buffer_versions()
    for config in ("no_broadcast", "default") if fixed else ("no_broadcast",):
        states = [outcome(config, rank) for rank in range(2)]
        assert all(isinstance(s, dict) for s in states), states
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), config
    if fixed:
        for rank in range(2):
            assert "modified by an inplace operation" in outcome("default_before_fix", rank)


def _ddp_worker(out: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from robustmix.models import unwrap_model

    preserve = torch.autograd._unsafe_preserve_version_counter
    for name, (broadcast_buffers, before_fix) in CONFIGS.items():
        # The DDP of torch before the fix differs only in this wrapper of its buffer broadcast.
        torch.autograd._unsafe_preserve_version_counter = (
            (lambda tensors: contextlib.nullcontext()) if before_fix else preserve
        )
        accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=broadcast_buffers)])
        model = tiny_bn()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        model, optimizer = accelerator.prepare(model, optimizer)
        step = AdversarialStep([PGDAttack(steps=2, **TRADES_ATTACK), TRADESLoss()])
        try:
            for i in range(3):
                x, y = batch_8x8(seed=10 * i + accelerator.process_index)  # every rank sees other examples
                loss, _ = step(model, x, y)
                optimizer.zero_grad()
                accelerator.backward(loss)
                optimizer.step()
            sync_buffers(model)
            outcome = unwrap_model(model).state_dict()
        except RuntimeError as err:
            outcome = str(err)
        torch.save(outcome, out / f"{name}.rank{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
    torch.autograd._unsafe_preserve_version_counter = preserve


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    _ddp_worker(parser.parse_args().out)
