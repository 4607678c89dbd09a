"""AWP: the released code's perturbation, its size per layer, exact removal, warm-up, cost, and DDP agreement.

Run as a script, this file is the worker of the two-process test.
"""

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustmix import AdversarialCE, AdversarialStep, Callback, PGDAttack, Stage
from robustmix.methods.awp import AWP, awp_perturbation
from robustmix.runs.folder import load_metrics_log
from robustmix.stages.losses import TRADESLoss, trades_loss
from tests.conftest import launch_two_processes, load_recipe, quick_flags
from tests.toys import batch_8x8, tiny_bn


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _ce_of(x, y):
    return lambda model: F.cross_entropy(model(x), y)


def _released_code_perturbation(model: nn.Module, x, y, gamma: float) -> dict[str, torch.Tensor]:
    """AWP as the released code computes it: a proxy copy in train mode, one SGD step ascending CE."""
    proxy = copy.deepcopy(model).train()
    loss = -F.cross_entropy(proxy(x), y)
    optimizer = torch.optim.SGD(proxy.parameters(), lr=0.01)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    old, new = model.state_dict(), proxy.state_dict()
    diff = {}
    for key in old:
        if old[key].dim() > 1 and "weight" in key:
            d = new[key] - old[key]
            diff[key] = gamma * old[key].norm() / (d.norm() + 1e-20) * d
    return diff


def test_perturbation_is_the_released_codes():
    model = tiny_bn(torch.float64)  # float64: w' - w of the proxy loses no digits to rounding
    x, y = batch_8x8(dtype=torch.float64)
    expected = _released_code_perturbation(model, x, y, gamma=0.01)
    perturbation = awp_perturbation(model, _ce_of(x, y), gamma=0.01)
    assert perturbation.keys() == expected.keys() == {"net.0.weight", "net.5.weight"}  # no biases, no BatchNorm
    for name, delta in perturbation.items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.005, 0.01, 0.5])
def test_each_layer_moves_by_gamma_relative_to_its_norm(gamma):
    model = tiny_bn()
    perturbation = awp_perturbation(model, _ce_of(*batch_8x8()), gamma=gamma)
    for name, param in model.named_parameters():
        if param.dim() > 1:
            ratio = perturbation[name].norm() / param.norm()
            torch.testing.assert_close(ratio, torch.tensor(gamma), rtol=1e-5, atol=1e-7)


def test_perturbation_ascends_the_loss_and_leaves_grads_statistics_and_modes_alone():
    model = tiny_bn()
    x, y = batch_8x8()
    model.net[1].eval()  # a mode of the user's, to be restored
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    perturbation = awp_perturbation(model, _ce_of(x, y), gamma=0.01)

    assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert model.training and not model.net[1].training
    model.train()  # the loss the perturbation ascends: batch statistics
    with torch.no_grad():
        before = F.cross_entropy(model(x), y)
        for name, p in model.named_parameters():
            p.add_(perturbation.get(name, 0.0))
        assert F.cross_entropy(model(x), y) > before


def test_a_zero_or_non_finite_gradient_gives_no_perturbation():
    model = tiny_bn()
    zero = awp_perturbation(model, lambda m: 0.0 * m(batch_8x8()[0]).sum(), gamma=0.01)
    overflow = awp_perturbation(model, lambda m: m(batch_8x8()[0]).sum() * float("inf"), gamma=0.01)
    assert all(torch.equal(delta, torch.zeros_like(delta)) for delta in (*zero.values(), *overflow.values()))


def _awp_step(awp: AWP) -> AdversarialStep:
    return AdversarialStep([PGDAttack(eps=0.1, step_size=0.03, steps=2), awp, AdversarialCE()])


class RecordsWeights(Callback):
    """Copies the weights the training forward sees."""

    stage = Stage.MARGIN

    def __call__(self, ctx) -> None:
        self.seen = _weights(ctx.attack_model)


def test_removal_is_exact_when_the_optimizer_does_not_move_the_weights():
    model, recorder = tiny_bn(), RecordsWeights()
    step = AdversarialStep([PGDAttack(eps=0.1, step_size=0.03, steps=2), AWP(gamma=0.01), recorder, AdversarialCE()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    before = _weights(model)
    for i in range(3):
        loss, _ = step(model, *batch_8x8(seed=i))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step.fire("on_after_optimizer_step", None, optimizer)
    assert not torch.equal(recorder.seen["net.0.weight"], before["net.0.weight"])  # trained at perturbed weights
    assert torch.equal(recorder.seen["net.0.bias"], before["net.0.bias"])
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_removal_also_happens_when_the_grad_scaler_skips_the_step():
    model = tiny_bn()
    step = _awp_step(AWP(gamma=0.01))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    before = _weights(model)
    loss, _ = step(model, *batch_8x8())
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    model.net[0].weight.grad[0, 0, 0, 0] = float("inf")  # an fp16 overflow
    scaler.step(optimizer)
    scaler.update()
    step.fire("on_after_optimizer_step", None, optimizer)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_the_update_uses_the_gradient_at_the_perturbed_weights_and_lands_on_the_unperturbed_ones():
    model = tiny_bn()
    step = _awp_step(AWP(gamma=0.01))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _weights(model)
    loss, _ = step(model, *batch_8x8())
    optimizer.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    step.fire("on_after_optimizer_step", None, optimizer)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name] - 0.1 * grads[name], rtol=0, atol=1e-7)

    plain = tiny_bn()
    loss, _ = _awp_step(AWP(gamma=0.0))(plain, *batch_8x8())
    loss.backward()
    assert not torch.allclose(plain.net[0].weight.grad, grads["net.0.weight"])  # the perturbation mattered


def test_no_perturbation_during_warm_up():
    model, recorder = tiny_bn(), RecordsWeights()
    before = _weights(model)
    awp = AWP(gamma=0.01, warmup_epochs=2)
    step = AdversarialStep([PGDAttack(eps=0.1, step_size=0.03, steps=2), awp, recorder, AdversarialCE()])
    loss, ctx = step(model, *batch_8x8(), epoch=1)
    loss.backward()
    assert ctx.passes() == (3, 3)  # plain PGD-AT with K = 2
    assert all(torch.equal(recorder.seen[name], before[name]) for name in before)
    _, ctx = step(model, *batch_8x8(), epoch=2)
    assert not torch.equal(recorder.seen["net.0.weight"], before["net.0.weight"])


@pytest.mark.parametrize(
    ("callbacks", "passes"),
    [
        # PGD-AT, K = 10: 11 forwards + 11 backwards; AWP adds one of each.
        ([PGDAttack(eps=0.1, step_size=0.03, steps=10), AWP(gamma=0.01), AdversarialCE()], (12, 12)),
        # TRADES, K = 10: 13 forwards + 12 backwards; AWP ascends TRADES' loss, two of each.
        (
            [
                PGDAttack(eps=0.1, step_size=0.03, steps=10, loss="kl", start="normal"),
                AWP(gamma=0.005, loss="trades"),
                TRADESLoss(),
            ],
            (15, 14),
        ),
    ],
    ids=["at", "trades"],
)
def test_cost_per_step(callbacks, passes):
    loss, ctx = AdversarialStep(callbacks)(tiny_bn(), *batch_8x8())
    loss.backward()
    assert ctx.passes() == passes


def test_trades_awp_ascends_the_trades_loss():
    model = tiny_bn()
    x, y = batch_8x8()
    x_adv = (x + 0.05).clamp(0, 1)
    expected = awp_perturbation(model, lambda m: trades_loss(m(x), m(x_adv), y, 6.0), gamma=0.005)
    awp = AWP(gamma=0.005, loss="trades", beta=6.0)

    class FixedAdv(Callback):
        stage = Stage.ATTACK
        writes = ("x_adv",)

        def __call__(self, ctx) -> None:
            ctx.x_adv = x_adv

    recorder = RecordsWeights()
    weights = _weights(model)
    AdversarialStep([FixedAdv(), awp, recorder, TRADESLoss()])(model, x, y)
    for name, delta in expected.items():
        torch.testing.assert_close(recorder.seen[name], weights[name] + delta)


class ReadsLogitsEarly(Callback):
    stage = Stage.ANTI
    reads = ("logits_adv",)

    def __call__(self, ctx) -> None:
        ctx.get_logits("adv")


def test_misuse_fails_loudly():
    model = tiny_bn()
    step = _awp_step(AWP())
    step(model, *batch_8x8())
    with pytest.raises(RuntimeError, match="on_after_optimizer_step"):
        step(model, *batch_8x8())  # the previous perturbation was never removed
    early = AdversarialStep([PGDAttack(steps=1), ReadsLogitsEarly(), AWP(), AdversarialCE()])
    with pytest.raises(RuntimeError, match="before any training forward"):
        early(tiny_bn(), *batch_8x8())
    for kwargs, message in (
        ({"gamma": -0.1}, "gamma"), ({"proxy_lr": 0.0}, "proxy_lr"), ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"loss": "mart"}, "loss"), ({"beta": float("inf")}, "beta"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            AWP(**kwargs)


# ---------------------------------------------------------------------- the recipe


@pytest.mark.parametrize(
    ("flags", "callbacks", "passes"),
    [
        ([], ["PGDAttack(", "AWP(gamma=0.01, proxy_lr=0.01, warmup_epochs=0, loss='ce'", "AdversarialCE("], (3, 3)),
        (
            ["--base", "trades", "--warmup-epochs", "0", "--gamma", "0.02"],
            ["AWP(gamma=0.02, proxy_lr=0.01, warmup_epochs=0, loss='trades', beta=6.0)", "TRADESLoss(beta=6.0)"],
            (6, 5),
        ),
    ],
    ids=["at", "trades"],
)
def test_recipe_trains_and_writes_its_run_folder(tiny, tmp_path, flags, callbacks, passes):
    out = tmp_path / "run"
    metrics = load_recipe("awp").main(quick_flags(tiny, out, "--max-steps", "2", "--attack-steps", "1", *flags))
    assert 0 <= metrics["test"]["pgd_acc"] <= metrics["test"]["clean_acc"] <= 1
    written = " ".join(json.loads((out / "config.json").read_text())["callbacks"])
    assert all(callback in written for callback in callbacks), written
    rows = [row for row in load_metrics_log(out) if "forwards_per_step" in row]
    assert rows and all((row["forwards_per_step"], row["backwards_per_step"]) == passes for row in rows)


def test_recipe_defaults_follow_the_base_method_and_bad_warm_up_exits_before_work(monkeypatch, tmp_path):
    recipe = load_recipe("awp")
    monkeypatch.setattr(recipe, "run_recipe", lambda args, build: args)
    out = str(tmp_path / "run")
    at, trades = (recipe.main([*flags, "--output-dir", out, "--epochs", "30"]) for flags in ([], ["--base", "trades"]))
    assert (at.gamma, at.warmup_epochs, trades.gamma, trades.warmup_epochs) == (0.01, 0, 0.005, 10)
    assert recipe.main(["--base", "trades", "--epochs", "5", "--output-dir", out]).warmup_epochs == 2
    with pytest.raises(SystemExit):
        recipe.main(["--warmup-epochs", "5", "--epochs", "5", "--output-dir", out])


# ---------------------------------------------------------------------- two processes


@pytest.mark.distributed
def test_every_rank_adds_the_same_perturbation(tmp_path):
    launch_two_processes(__file__, "--out", str(tmp_path))
    seen, final = zip(*(torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)), strict=True)
    # The weights the training forward saw (perturbed from rank-local x_adv) and the weights after the
    # steps (weight decay acts on the perturbed weights) agree bit for bit.
    for a, b in (seen, final):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ddp_worker(out: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from robustmix.models import unwrap_model

    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    model = tiny_bn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    recorder = RecordsWeights()
    step = AdversarialStep([PGDAttack(eps=0.1, step_size=0.03, steps=2), AWP(gamma=0.01), recorder, AdversarialCE()])
    for i in range(3):
        loss, _ = step(model, *batch_8x8(seed=10 * i + accelerator.process_index))
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        step.fire("on_after_optimizer_step", None, optimizer)
    torch.save((recorder.seen, _weights(unwrap_model(model))), out / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    _ddp_worker(parser.parse_args().out)
