"""AdversarialStep: composition check, pass counting, memoized forwards, bad input."""

import pytest
import torch
from torch import nn

from robustmix import AdversarialCE, AdversarialStep, Callback, CompositionError, PGDAttack, Stage
from robustmix.attacks import FGSMAttack
from tests.toys import LinearNet, batch_4x4


class NeedsMargin(Callback):
    stage = Stage.LABELS
    reads = ("margin",)
    writes = ("soft_targets",)


class WritesAdv(Callback):
    stage = Stage.ATTACK
    writes = ("x_adv",)


class ConstantWeights(Callback):
    stage = Stage.WEIGHTS
    writes = ("weights",)

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights

    def __call__(self, ctx) -> None:
        ctx.multiply_weights(self.weights)


class ReadsAdvLogitsTwice(Callback):
    stage = Stage.MARGIN
    reads = ("logits_adv",)

    def __call__(self, ctx) -> None:
        ctx.get_logits("adv")
        ctx.get_logits("adv")


class KeepsPerExampleState(Callback):
    stage = Stage.LABELS
    reads = ("index",)


def test_missing_field_names_what_to_add():
    with pytest.raises(CompositionError, match=r"NeedsMargin needs `margin`; add a margin estimator"):
        AdversarialStep([PGDAttack(), NeedsMargin(), AdversarialCE()])


def test_reading_adversarial_logits_without_an_attack():
    with pytest.raises(CompositionError, match=r"AdversarialCE needs `logits_adv`; add an attack generator"):
        AdversarialStep([AdversarialCE()])


def test_field_written_twice():
    with pytest.raises(CompositionError, match=r"`x_adv` is written by both PGDAttack and WritesAdv"):
        AdversarialStep([PGDAttack(), WritesAdv(), AdversarialCE()])


def test_no_loss():
    with pytest.raises(CompositionError, match="no callback writes `loss`"):
        AdversarialStep([PGDAttack()])


def test_unknown_field_and_non_callback():
    class Typo(Callback):
        stage = Stage.MARGIN
        reads = ("margn",)

    with pytest.raises(CompositionError, match="unknown field `margn`"):
        AdversarialStep([PGDAttack(), Typo(), AdversarialCE()])
    with pytest.raises(CompositionError, match="not a robustmix Callback"):
        AdversarialStep([PGDAttack(), object(), AdversarialCE()])


def test_order_given_does_not_matter():
    step = AdversarialStep([AdversarialCE(), PGDAttack(steps=2)])
    assert [type(c) for c in step.staged] == [PGDAttack, AdversarialCE]


def test_index_required_when_a_callback_keeps_per_example_state():
    step = AdversarialStep([PGDAttack(steps=1), KeepsPerExampleState(), AdversarialCE()])
    x, y = batch_4x4(4)
    with pytest.raises(CompositionError, match="need `index=`"):
        step(LinearNet(), x, y)
    step(LinearNet(), x, y, index=torch.arange(4))


@pytest.mark.parametrize("steps", [0, 1, 10])
def test_pgd_at_costs_k_plus_one_passes(steps):
    step = AdversarialStep([PGDAttack(eps=0.1, step_size=0.03, steps=steps), AdversarialCE()])
    x, y = batch_4x4(4)
    loss, ctx = step(LinearNet(), x, y)
    assert ctx.passes() == (steps + 1, steps)  # the training backward has not run yet
    loss.backward()
    assert ctx.passes() == (steps + 1, steps + 1)


def test_fgsm_costs_two_forwards_and_two_backwards():
    loss, ctx = AdversarialStep([FGSMAttack(eps=0.1), AdversarialCE()])(LinearNet(), *batch_4x4(4))
    loss.backward()
    assert ctx.passes() == (2, 2)


def test_forwards_are_memoized_within_a_step():
    model = LinearNet()
    step = AdversarialStep([PGDAttack(steps=2), ReadsAdvLogitsTwice(), AdversarialCE()])
    _, ctx = step(model, *batch_4x4(4))
    assert model.calls == 3 and ctx.passes()[0] == 3


def test_the_step_sees_through_ddp_style_wrappers():
    model = LinearNet()
    wrapped = nn.DataParallel(model)  # on CPU: a plain wrapper with `.module`
    _loss, ctx = AdversarialStep([PGDAttack(steps=2), AdversarialCE()])(wrapped, *batch_4x4(4))
    assert ctx.attack_model is model and ctx.passes()[0] == 3


def test_several_reweighters_multiply_and_renormalize():
    w1, w2 = torch.tensor([1.0, 2.0, 3.0, 2.0]), torch.tensor([2.0, 1.0, 1.0, 0.0])
    step = AdversarialStep([PGDAttack(steps=1), ConstantWeights(w1), ConstantWeights(w2), AdversarialCE()])
    _, ctx = step(LinearNet(), *batch_4x4(4))
    product = w1 * w2
    torch.testing.assert_close(ctx.weights, product / product.mean())


def test_a_single_reweighter_is_used_as_given():
    w = torch.tensor([0.5, 1.5, 1.0, 1.0])
    step = AdversarialStep([PGDAttack(steps=1), ConstantWeights(w), AdversarialCE()])
    loss, ctx = step(LinearNet(), *batch_4x4(4))
    per_sample = nn.functional.cross_entropy(ctx.logits["adv"], ctx.targets, reduction="none")
    torch.testing.assert_close(loss, (w * per_sample).mean())


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda x, y: (x * 4 - 2, y), ValueError, r"pixels in \[0, 1\].*normalization belongs inside the model"),
        (lambda x, y: (x.masked_fill(x > 0.5, float("nan")), y), ValueError, "NaN or inf"),
        (lambda x, y: (x.masked_fill(x > 0.5, float("inf")), y), ValueError, "NaN or inf"),
        (lambda x, y: (x, y + 3), ValueError, r"targets must be in \[0, 3\)"),
        (lambda x, y: (x, y - 1), ValueError, r"targets must be in \[0, 3\)"),
        (lambda x, y: (x[:0], y[:0]), ValueError, "empty batch"),
        (lambda x, y: (x, y[:2]), ValueError, "targets must have shape"),
        (lambda x, y: ((x * 255).to(torch.uint8), y), TypeError, "floating-point"),
        (lambda x, y: (x, y.float()), TypeError, "integer"),
        (lambda x, y: (x[0, 0, 0], y), ValueError, "shape"),
    ],
)
def test_bad_batches_fail_before_any_forward(mutate, error, message):
    model = LinearNet()
    x, y = mutate(*batch_4x4(4))
    step = AdversarialStep([PGDAttack(steps=2), AdversarialCE()])
    with pytest.raises(error, match=message):
        step(model, x, y)
    assert model.calls == 0


def test_bad_step_arguments():
    with pytest.raises(ValueError, match="mixed_precision"):
        AdversarialStep([PGDAttack(), AdversarialCE()], mixed_precision="fp8")
    step = AdversarialStep([PGDAttack(steps=1), AdversarialCE()])
    plain = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="num_classes"):
        step(plain, *batch_4x4(4))
    with pytest.raises(ValueError, match="index must be"):
        step(LinearNet(), *batch_4x4(4), index=torch.rand(4))


class Stateful(Callback):
    def __init__(self) -> None:
        self.table = torch.zeros(3)

    def state_dict(self):
        return {"table": self.table}

    def load_state_dict(self, state) -> None:
        self.table = state["table"].clone()


def test_state_dict_round_trip_and_mismatch():
    a = AdversarialStep([PGDAttack(steps=1), Stateful(), AdversarialCE()])
    a.callbacks[1].table += 2
    b = AdversarialStep([PGDAttack(steps=1), Stateful(), AdversarialCE()])
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.callbacks[1].table, torch.full((3,), 2.0))
    c = AdversarialStep([PGDAttack(steps=1), AdversarialCE()])
    with pytest.raises(ValueError, match="do not match"):
        c.load_state_dict(a.state_dict())


def test_fire_calls_hooks_in_order_and_rejects_unknown_events():
    seen = []

    class Recorder(Callback):
        def __init__(self, name: str) -> None:
            self.name = name

        def on_epoch_start(self, trainer, epoch: int) -> None:
            seen.append((self.name, epoch))

    step = AdversarialStep([PGDAttack(steps=1), Recorder("a"), Recorder("b"), AdversarialCE()])
    step.fire("on_epoch_start", None, 3)
    assert seen == [("a", 3), ("b", 3)]
    with pytest.raises(ValueError, match="unknown callback event"):
        step.fire("on_lunch", None)
