"""MAIL as its authors' code runs it (unnormalized weights, a normal start); FGSM-RS's cyclic lr; the Trainer's
early stop."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CyclicLR

from robustmix import AdversarialCE, AdversarialStep, Callback, PGDAttack
from robustmix.context import StepContext
from robustmix.data import DATASETS, load_dataset
from robustmix.models import create_model
from robustmix.recipe import build_scheduler, triangular
from robustmix.runs import load_metrics_log
from robustmix.trainer import Trainer
from robustmix.weights import MAILWeights
from tests.conftest import load_recipe, quick_flags


def _parsed(name: str, argv: list[str], monkeypatch, tmp_path) -> tuple[argparse.Namespace, list[Callback]]:
    """A recipe's parsed flags and its callbacks, without training."""
    recipe = load_recipe(name)
    monkeypatch.setattr(recipe, "run_recipe", lambda args, build: (args, build(args, None)))
    return recipe.main([*argv, "--output-dir", str(tmp_path / "run")])


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = DATASETS["digits"]
    return create_model("test_resnet", 10, in_chans=1, mean=spec.mean, std=spec.std)


def _batch(seed: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, 1, 32, 32, generator=generator), torch.randint(0, 10, (size,), generator=generator)


# ---------------------------------------------------------------------- MAIL


def test_mail_recipe_defaults_to_the_released_weights_and_start(monkeypatch, tmp_path):
    args, callbacks = _parsed("mail", [], monkeypatch, tmp_path)
    attack, _, weights, _ = callbacks
    assert attack.start == "normal" and attack.loss == "ce"
    assert weights.normalize is False and not args.normalize_weights
    assert repr(weights) == f"MAILWeights(bias=-1.5, slope=1.0, burn_in_epochs={10 * 76 // 120}, normalize=False)"


@pytest.mark.parametrize("base", ["at", "trades", "mart"])
def test_every_mail_base_starts_its_attack_at_a_normal_draw(monkeypatch, tmp_path, base):
    _, callbacks = _parsed("mail", ["--base", base], monkeypatch, tmp_path)
    assert callbacks[0].start == "normal" and callbacks[0].loss == ("kl" if base == "trades" else "ce")


@pytest.mark.parametrize(("epochs", "burn_in"), [(120, 76), (110, 69), (10, 6), (6, 3)])
def test_mail_burn_in_is_the_released_share(monkeypatch, tmp_path, epochs, burn_in):
    _, callbacks = _parsed("mail", ["--epochs", str(epochs)], monkeypatch, tmp_path)
    assert callbacks[2].burn_in_epochs == burn_in


def _released_mail_at_loss(step: AdversarialStep) -> tuple[torch.Tensor, StepContext, torch.Tensor]:
    torch.manual_seed(0)
    loss, ctx = step(_model(), *_batch(), epoch=9)
    probs = ctx.logits["adv"].detach().softmax(dim=1)
    p_true = probs.gather(1, ctx.targets[:, None]).squeeze(1)
    p_other = probs.scatter(1, ctx.targets[:, None], 0.0).amax(dim=1)
    released = 3 * torch.sigmoid(1.0 * (p_other - p_true - 1.5))  # mail_loss.py: weight_assign
    return loss, ctx, released


def test_mail_recipe_default_step_multiplies_the_loss_by_the_released_weights(monkeypatch, tmp_path):
    _, callbacks = _parsed("mail", [], monkeypatch, tmp_path)
    loss, ctx, released = _released_mail_at_loss(AdversarialStep(callbacks))
    torch.testing.assert_close(ctx.weights, released)
    # Not renormalized: with ten nearly uniform classes PM is about 0, so every weight is about 3 sigmoid(-1.5).
    assert 0.4 < ctx.weights.mean() < 0.7
    expected = (F.cross_entropy(ctx.logits["adv"], ctx.targets, reduction="none") * released).mean()
    torch.testing.assert_close(loss, expected)


def test_mail_recipe_normalize_weights_flag_gives_batch_mean_1(monkeypatch, tmp_path):
    args, callbacks = _parsed("mail", ["--normalize-weights"], monkeypatch, tmp_path)
    assert args.normalize_weights and callbacks[2].normalize
    _, ctx, released = _released_mail_at_loss(AdversarialStep(callbacks))
    torch.testing.assert_close(ctx.weights, released / released.mean())
    torch.testing.assert_close(ctx.weights.mean(), torch.tensor(1.0))


def test_mail_recipe_trains_with_the_released_weights(tiny, tmp_path):
    out = tmp_path / "run"
    load_recipe("mail").main(quick_flags(tiny, out, "--max-steps", "2", "--attack-steps", "1", "--burn-in", "0"))
    callbacks = json.loads((out / "config.json").read_text())["callbacks"]
    assert "MAILWeights(bias=-1.5, slope=1.0, burn_in_epochs=0, normalize=False)" in callbacks
    assert "start='normal'" in callbacks[0]


def test_adalab_mail_weighting_keeps_batch_mean_1(monkeypatch, tmp_path):
    _, callbacks = _parsed("adalab", ["--weighting", "mail", "--burn-in", "0"], monkeypatch, tmp_path)
    (weights,) = [c for c in callbacks if isinstance(c, MAILWeights)]
    assert weights.normalize and repr(weights) == "MAILWeights(bias=-1.5, slope=1.0, burn_in_epochs=0)"
    ctx = StepContext(
        model=torch.nn.Identity(), attack_model=torch.nn.Identity(), inputs=torch.zeros(4, 1),
        targets=torch.zeros(4, dtype=torch.long), num_classes=2, margin=torch.tensor([-1.0, -0.2, 0.5, 1.0]),
    )  # fmt: skip
    weights(ctx)
    torch.testing.assert_close(ctx.weights.mean(), torch.tensor(1.0))


# ---------------------------------------------------------------------- FGSM-RS: the cyclic lr


@pytest.mark.parametrize(
    ("total_steps", "table"),
    [
        (4, [0.0, 0.5, 1.0, 0.5]),
        (5, [0.0, 0.4, 0.8, 0.8, 0.4]),
        (6, [0.0, 1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3]),
    ],
)
def test_triangular_by_hand(total_steps, table):
    assert [triangular(t, total_steps) for t in range(total_steps)] == pytest.approx(table)
    assert triangular(total_steps, total_steps) == 0.0  # the scheduler's step after the last optimizer step


@pytest.mark.parametrize("total_steps", [2, 7, 30, 391 * 15])
def test_cyclic_schedule_is_the_released_cyclic_lr(total_steps):
    """train_fgsm.py: CyclicLR(opt, base_lr=0, max_lr=lr, step_size_up=lr_steps / 2, step_size_down=lr_steps / 2)."""

    def lrs(make) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2, momentum=0.9)
        scheduler = make(optimizer)
        out = []
        for _ in range(total_steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    half = total_steps / 2
    released = lrs(lambda o: CyclicLR(o, 0.0, 0.2, step_size_up=half, step_size_down=half, cycle_momentum=False))
    args = argparse.Namespace(schedule="cyclic")
    ours = lrs(lambda o: build_scheduler(args, o, steps_per_epoch=1, total_steps=total_steps))
    assert ours == pytest.approx(released, abs=1e-12)
    assert ours[0] == 0.0 and max(ours) <= 0.2
    if total_steps % 2 == 0:
        assert ours[total_steps // 2] == pytest.approx(0.2)  # the peak lr at the middle of the run


# ---------------------------------------------------------------------- the Trainer's stop


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_optimizer_step(self, trainer, optimizer):
        if trainer.global_step == self.step:
            trainer.stop(f"asked at step {self.step}")


def _trainer(digits_data, callbacks, **kwargs) -> Trainer:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    step = AdversarialStep([PGDAttack(0.1, 0.05, 1), AdversarialCE(), *callbacks])
    train, val = digits_data
    options = {"epochs": 3, "batch_size": 16, "eval_steps": 1, "progress": False}
    return Trainer(model, step, optimizer, train, val, **(options | kwargs))


@pytest.fixture(scope="module")
def digits_data(tiny):
    return load_dataset(tiny, "train"), load_dataset(tiny, "validation")


def test_trainer_stop_from_a_step_hook_ends_the_fit_after_that_step(digits_data, tmp_path):
    trainer = _trainer(digits_data, [_StopAt(step=2)], output_dir=tmp_path / "run")
    summary = trainer.fit()
    assert summary["step"] == 3 and summary["stop_reason"] == "asked at step 2"
    rows = load_metrics_log(tmp_path / "run")
    assert {"stop": "asked at step 2"}.items() <= next(r for r in rows if "stop" in r).items()
    assert rows[-1]["step"] == 3 and "val_pgd_acc" in rows[-1]  # validated at the end, as at a planned end


def test_trainer_log_refuses_the_keys_it_writes_itself(digits_data):
    trainer = _trainer(digits_data, [])
    with pytest.raises(ValueError, match="step"):
        trainer.log({"step": 1.0})
