"""MAIL and FGSM-RS as their authors' code runs them: MAIL's unnormalized weights and normal start, FGSM-RS's
cyclic lr, train-mode attack and early stop against catastrophic overfitting (with the Trainer's stop)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import CyclicLR

from robustmix import AdversarialCE, AdversarialStep, Callback, PGDAttack
from robustmix.cli.optim import build_scheduler, triangular
from robustmix.cli.presets import PRESETS
from robustmix.core.context import StepContext
from robustmix.data import load_dataset
from robustmix.runs.folder import MODEL_FILE, load_metrics_log
from robustmix.stages.weights import MAILWeights
from robustmix.training.metrics import WALL_CLOCK_KEYS
from robustmix.training.trainer import Trainer
from tests.conftest import crash_then_resume, load_recipe, quick_flags
from tests.trainers import make_model


def _parsed(name: str, argv: list[str], monkeypatch, tmp_path) -> tuple[argparse.Namespace, list[Callback]]:
    """A recipe's parsed flags and its callbacks, without training."""
    recipe = load_recipe(name)
    monkeypatch.setattr(recipe, "run_recipe", lambda args, build: (args, build(args, None)))
    return recipe.main([*argv, "--output-dir", str(tmp_path / "run")])


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
    loss, ctx = step(make_model(), *_batch(), epoch=9)
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


# ---------------------------------------------------------------------- FGSM-RS: the protocols


def test_fgsm_rs_defaults_to_wongs_protocol(monkeypatch, tmp_path):
    args, callbacks = _parsed("fgsm_rs", [], monkeypatch, tmp_path)
    assert args.protocol == "wong" and args.schedule == "cyclic"
    attack, _, guard = callbacks
    assert attack.bn_mode == "train" and attack.step_size == pytest.approx(1.25 * args.eps)
    assert (guard.eps, guard.steps, guard.max_drop) == (args.eps, 5, 0.2)


def test_fgsm_rs_schedule_flag_wins_over_the_protocol(monkeypatch, tmp_path):
    args, _ = _parsed("fgsm_rs", ["--schedule", "warmup-cosine"], monkeypatch, tmp_path)
    assert args.schedule == "warmup-cosine"


@pytest.mark.parametrize("preset", ["digits", "cifar10-resnet18"])
def test_fgsm_rs_shared_protocol_trains_like_the_other_recipes(monkeypatch, tmp_path, preset):
    args, callbacks = _parsed("fgsm_rs", ["--protocol", "shared", "--preset", preset], monkeypatch, tmp_path)
    assert args.schedule == PRESETS[preset]["schedule"]
    assert [type(c).__name__ for c in callbacks] == ["FGSMAttack", "AdversarialCE"] and callbacks[0].bn_mode == "eval"


@pytest.mark.parametrize(("protocol", "attack_in_train_mode"), [("wong", True), ("shared", False)])
def test_fgsm_rs_attack_batchnorm_mode(monkeypatch, tmp_path, protocol, attack_in_train_mode):
    _, callbacks = _parsed("fgsm_rs", ["--protocol", protocol], monkeypatch, tmp_path)
    model = make_model()
    bn = next(m for m in model.modules() if isinstance(m, _BatchNorm))
    modes = []
    bn.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.train()
    AdversarialStep(callbacks[:2])(model, *_batch())
    assert modes == [attack_in_train_mode, True]  # the attack's forward, then the training forward
    assert model.training and bn.training  # the attack leaves the model as it found it
    # In train mode the attack's forward also moves the running statistics, as the released code's does.
    assert int(bn.num_batches_tracked) == (2 if attack_in_train_mode else 1)


# ---------------------------------------------------------------------- FGSM-RS: the early stop


class _FakeTrainer:
    """What the guard uses of a Trainer: the model, the step, logging and stopping."""

    def __init__(self) -> None:
        self.model, self.global_step = torch.nn.Linear(2, 2), 0
        self.rows: list[dict] = []
        self.stopped: tuple[str, dict] | None = None

    def log(self, values):
        self.rows.append(values)

    def stop(self, reason, *, weights=None):
        self.stopped = (reason, weights)


def _run_checks(guard, monkeypatch, accuracies: list[float]) -> tuple[_FakeTrainer, list[dict[str, torch.Tensor]]]:
    """Run the guard's epoch ends with checks returning ``accuracies`` (until it stops the trainer)."""
    sequence = iter(accuracies)
    monkeypatch.setattr(guard, "check", lambda trainer: next(sequence))
    trainer, seen = _FakeTrainer(), []
    for epoch, _ in enumerate(accuracies):
        with torch.no_grad():
            trainer.model.weight.fill_(epoch)  # weights that tell the epochs apart
        seen.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        trainer.global_step = 10 * (epoch + 1)
        guard.on_epoch_end(trainer, epoch)
        if trainer.stopped:
            break
    return trainer, seen


@pytest.mark.parametrize(
    ("accuracies", "stop_at"),
    [
        ([0.5, 0.6, 0.35], 2),  # 0.25 below the previous check
        ([0.5, 0.7, 0.49, 0.6], 2),
        ([0.02, 0.01, 0.0], None),  # never robust, never a fall
        ([0.5, 0.31, 0.12], None),  # 0.19 at a time
        # The released criterion compares with the previous check, not the best: a slow slide never stops.
        ([0.6, 0.45, 0.3, 0.15, 0.0], None),
        ([0.1, 0.4, 0.5, 0.5, 0.45], None),
    ],
)
def test_guard_stops_on_a_fall_from_the_previous_check(monkeypatch, accuracies, stop_at):
    trainer, seen = _run_checks(load_recipe("fgsm_rs").CatastrophicOverfittingGuard(0.1), monkeypatch, accuracies)
    checks = len(accuracies) if stop_at is None else stop_at + 1
    assert trainer.rows == [{"overfit_check_pgd_acc": a} for a in accuracies[:checks]]
    if stop_at is None:
        assert trainer.stopped is None
        return
    reason, weights = trainer.stopped
    assert "catastrophic overfitting" in reason and f"step {10 * stop_at}" in reason
    # The weights handed back are those of the previous check, not the collapsed ones.
    assert all(torch.equal(weights[k], seen[stop_at - 1][k]) for k in weights)
    assert not torch.equal(weights["weight"], seen[stop_at]["weight"])


def test_guard_state_round_trip(monkeypatch):
    guard_class = load_recipe("fgsm_rs").CatastrophicOverfittingGuard
    # Never empty: a resumed step expects the key of every callback that saved state.
    assert guard_class(0.1).state_dict() == {"previous_acc": 0.0, "previous_step": None}
    guard = guard_class(0.1)
    _, seen = _run_checks(guard, monkeypatch, [0.5, 0.6])
    state = guard.state_dict()
    assert (state["previous_acc"], state["previous_step"]) == (0.6, 20)
    assert all(torch.equal(state["weights"][k], seen[1][k]) for k in seen[1])
    other = guard_class(0.1)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_fgsm_rs_run_stops_keeps_the_weights_of_the_previous_check_and_resumes_stopped(tiny, tmp_path, monkeypatch):
    recipe = load_recipe("fgsm_rs")
    sequence = iter([0.5, 0.6, 0.1])
    monkeypatch.setattr(recipe.CatastrophicOverfittingGuard, "check", lambda self, trainer: next(sequence))
    out = tmp_path / "run"
    argv = quick_flags(tiny, out, "--epochs", "4")  # 6 steps per epoch
    metrics = recipe.main(argv)

    rows = load_metrics_log(out)
    assert [r["overfit_check_pgd_acc"] for r in rows if "overfit_check_pgd_acc" in r] == [0.5, 0.6, 0.1]
    (stop,) = [r for r in rows if "stop" in r]
    assert stop["step"] == 18 and "fell from 60.00% (step 12) to 10.00%" in stop["stop"]
    assert metrics["test"]["step"] == 18 and max(r["step"] for r in rows) == 18  # epoch 3 never ran
    # The final weights are those of the check at step 12 (the epoch-1 checkpoint holds the same), and the
    # validation after the stop measures them: it repeats the step-12 numbers.
    final, kept = load_file(out / MODEL_FILE), load_file(out / "checkpoints" / "step_12" / "model.safetensors")
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    vals = [r for r in rows if "val_pgd_acc" in r]
    assert [r["step"] for r in vals] == [6, 12, 18, 18]
    assert {k: v for k, v in vals[-1].items() if k.startswith("val_")} == {
        k: v for k, v in vals[1].items() if k.startswith("val_")
    }

    # Resuming the stopped run trains no further and ends with the same weights.
    recipe.main([*argv, "--resume", "latest"])
    assert max(r["step"] for r in load_metrics_log(out)) == 18
    again = load_file(out / MODEL_FILE)
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_fgsm_rs_checks_after_every_epoch_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    recipe = load_recipe("fgsm_rs")
    flags = ["--checkpoint-every-steps", "1"]
    recipe.main(quick_flags(tiny, tmp_path / "straight", *flags))
    # Killed in epoch 1, after the first check: the resumed run checks the same batch against the same record.
    crash_then_resume(recipe, quick_flags(tiny, tmp_path / "crashed", *flags), 8, monkeypatch)

    rows = {run: load_metrics_log(tmp_path / run) for run in ("straight", "crashed")}
    checks = [r for r in rows["straight"] if "overfit_check_pgd_acc" in r]
    assert [r["step"] for r in checks] == [6, 12] and all(0 <= r["overfit_check_pgd_acc"] <= 1 for r in checks)
    drop_time = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in rows]  # noqa: E731
    assert drop_time(rows["crashed"]) == drop_time(rows["straight"])
    straight, resumed = (load_file(tmp_path / run / MODEL_FILE) for run in ("straight", "crashed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# ---------------------------------------------------------------------- the Trainer's stop


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_optimizer_step(self, trainer, optimizer):
        if trainer.global_step == self.step:
            trainer.stop(f"asked at step {self.step}")


def _trainer(digits_data, callbacks, **kwargs) -> Trainer:
    model = make_model()
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
