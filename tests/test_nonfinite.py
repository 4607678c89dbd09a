"""Non-finite training: a NaN/inf loss or gradient is caught before the update, reported, and never saved."""

from __future__ import annotations

import json
import math
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.lr_scheduler import OneCycleLR

from robustmix import AdversarialCE, Callback, NonFiniteError, NonFiniteLossError, PGDAttack
from robustmix.data import ImageDataset, load_dataset
from robustmix.runs.checkpoint import list_checkpoints, read_checkpoint, resolve_checkpoint
from robustmix.runs.folder import METRICS_FILE, MODEL_FILE, load_metrics_log
from robustmix.training.metrics import WALL_CLOCK_KEYS
from tests.conftest import launch_two_processes, load_recipe, quick_flags
from tests.trainers import EPS, make_model, make_trainer, subset, weights

# 40 training examples in batches of 16 (make_trainer): 3 steps per epoch. Step 4 is epoch 1, batch 1.
BAD_STEP = 4


@pytest.fixture(scope="module")
def digits() -> tuple[ImageDataset, ImageDataset]:
    return subset(load_dataset("digits", "train"), 40), subset(load_dataset("digits", "validation"), 12)


class Poison(Callback):
    """Makes step ``at`` (0-based) non-finite, and records the dataset indices of every batch.

    kinds: ``"nan_loss"`` (loss * NaN: loss and gradients NaN), ``"loss_only"`` (loss + a NaN constant:
    the gradients stay finite), ``"inf_gradient"`` (finite loss, one gradient entry set to inf).
    """

    def __init__(self, at: int, kind: str = "nan_loss") -> None:
        self.at, self.kind = at, kind
        self.indices: list[list[int]] = []

    def on_batch_start(self, trainer, batch):
        self.indices.append(batch["index"].tolist())

    def on_before_backward(self, ctx):
        if ctx.step == self.at and self.kind == "nan_loss":
            ctx.loss = ctx.loss * float("nan")
        elif ctx.step == self.at and self.kind == "loss_only":
            ctx.loss = ctx.loss + torch.tensor(float("nan"))

    def on_before_optimizer_step(self, trainer, optimizer):
        if trainer.global_step == self.at and self.kind == "inf_gradient":
            grad = next(p.grad for p in trainer.model.parameters() if p.grad is not None)
            grad.view(-1)[0] = math.inf


def poisoned(at: int = BAD_STEP, kind: str = "nan_loss") -> tuple[list[Callback], Poison]:
    poison = Poison(at, kind)
    return [PGDAttack(EPS, EPS / 2, 1), AdversarialCE(), poison], poison


def optimizer_tensors(checkpoint: Path) -> list[torch.Tensor]:
    state = read_checkpoint(checkpoint)["optimizer"]["state"]
    return [t for key in sorted(state) for t in state[key].values() if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------------- raise (the default)


@pytest.mark.parametrize(
    ("kind", "loss_bad", "gradients_bad"),
    [("nan_loss", True, True), ("loss_only", True, False), ("inf_gradient", False, True)],
)
def test_raise_reports_step_epoch_and_indices_before_the_update(digits, tmp_path, kind, loss_bad, gradients_bad):
    callbacks, poison = poisoned(kind=kind)
    trainer = make_trainer(digits, callbacks=callbacks, checkpoint_every_steps=1, output_dir=tmp_path)
    assert trainer.nonfinite == "raise"
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit()
    error = caught.value
    assert (error.step, error.epoch, error.batch_in_epoch) == (BAD_STEP, 1, 1)
    assert error.indices == [poison.indices[BAD_STEP]]  # the dataset indices of the bad batch
    assert error.nonfinite_loss == ([0] if loss_bad else []) and error.nonfinite_gradients is gradients_bad
    message = str(error)
    assert f"at step {BAD_STEP} (0-based; epoch 1, batch 1 of 3 in the epoch)" in message
    assert str(poison.indices[BAD_STEP]) in message and f"last checkpoint: step_{BAD_STEP}" in message
    assert ("loss process 0: nan" in message) is loss_bad and "--on-nonfinite skip" in message

    # No update reached the weights or the optimizer, and nothing was written after the bad step.
    last = resolve_checkpoint("latest", tmp_path / "checkpoints")
    assert last.name == f"step_{BAD_STEP}" and list_checkpoints(tmp_path / "checkpoints")[-1] == last
    saved = read_checkpoint(last)
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[k], saved["model"][k]) for k in params)
    state = trainer.optimizer.state_dict()["state"]
    current = [t for key in sorted(state) for t in state[key].values() if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(current, optimizer_tensors(last), strict=True))
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    assert not (tmp_path / MODEL_FILE).exists()
    assert max(row["step"] for row in load_metrics_log(tmp_path)) == BAD_STEP


def test_a_model_without_output_dir_raises_too(digits):
    callbacks, _ = poisoned(at=1)
    trainer = make_trainer(digits, callbacks=callbacks, val_data=None, max_steps=3)
    with pytest.raises(NonFiniteLossError, match=r"at step 1 .*dataset indices of the batch: process 0: \["):
        trainer.fit()


# ---------------------------------------------------------------------- skip


def test_skip_leaves_model_and_optimizer_untouched_and_counts(digits, tmp_path):
    callbacks, _ = poisoned(at=2)
    trainer = make_trainer(
        digits, callbacks=callbacks, nonfinite="skip", checkpoint_every_steps=1, keep_checkpoints=None,
        scheduler=lambda opt: OneCycleLR(opt, max_lr=0.1, total_steps=6), output_dir=tmp_path,
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match=r"non-finite loss and gradients at step 2 \(0-based; epoch 0, batch 2"):
        summary = trainer.fit()
    assert summary["nonfinite_skipped"] == trainer.nonfinite_skipped == 1 and trainer.global_step == 6

    before, after = (read_checkpoint(tmp_path / "checkpoints" / f"step_{s}") for s in (2, 3))
    # Parameters and buffers (BatchNorm statistics saw the bad batch: restored) are as before the bad step.
    assert before["model"].keys() == after["model"].keys()
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert all(
        torch.equal(a, b)
        for a, b in zip(optimizer_tensors(tmp_path / "checkpoints" / "step_2"),
                        optimizer_tensors(tmp_path / "checkpoints" / "step_3"), strict=True)
    )  # fmt: skip
    # ... but the batch is consumed and the lr schedule moves on with the global step.
    schedules = [read_checkpoint(tmp_path / "checkpoints" / f"step_{s}")["scheduler"] for s in (2, 3)]
    assert [schedule["last_epoch"] for schedule in schedules] == [2, 3]
    assert [after["trainer_state"]["nonfinite_skipped"], before["trainer_state"]["nonfinite_skipped"]] == [1, 0]

    rows = [r for r in load_metrics_log(tmp_path) if "lr" in r]  # training rows (log_every=1)
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert "loss" not in rows[2] and "train_adv_acc" not in rows[2]  # the skipped step has no loss to show
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    final = load_file(tmp_path / MODEL_FILE)
    assert all(torch.isfinite(t).all() for t in final.values())


@pytest.mark.parametrize("resume_from", [1, 4])
def test_resume_after_a_skip_is_bit_for_bit(digits, tmp_path, resume_from):
    """Resuming before the bad step replays the skip; resuming after it carries the count on."""

    def run(output_dir, model_seed, resume=None):
        callbacks, _ = poisoned(at=2)
        trainer = make_trainer(
            digits, model=make_model(model_seed), callbacks=callbacks, nonfinite="skip", augment=True,
            scheduler=lambda opt: OneCycleLR(opt, max_lr=0.1, total_steps=6), checkpoint_every_steps=1,
            keep_checkpoints=None, output_dir=output_dir,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(resume=resume)
        return trainer, [w for w in caught if "non-finite" in str(w.message)]

    straight, warned = run(tmp_path / "straight", model_seed=0)
    checkpoint = tmp_path / "straight" / "checkpoints" / f"step_{resume_from}"
    resumed, warned_again = run(tmp_path / "resumed", model_seed=1, resume=checkpoint)
    assert len(warned) == 1 and len(warned_again) == (resume_from <= 2)
    assert resumed.nonfinite_skipped == straight.nonfinite_skipped == 1
    expected, actual = weights(straight), weights(resumed)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    drop_time = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in rows]  # noqa: E731
    later = [r for r in load_metrics_log(tmp_path / "straight") if r["step"] > resume_from]
    assert drop_time(load_metrics_log(tmp_path / "resumed")) == drop_time(later)


# ---------------------------------------------------------------------- nothing non-finite is saved


class BreakAfterStep(Callback):
    """After the update of step ``at``: an inf weight (an update that overflowed) or NaN callback state."""

    def __init__(self, at: int, what: str) -> None:
        self.at, self.what, self.table = at, what, torch.zeros(3)

    def on_after_optimizer_step(self, trainer, optimizer):
        if trainer.global_step != self.at:
            return
        if self.what == "weights":
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = math.inf
        else:
            self.table[1] = math.nan

    def state_dict(self):
        return {"table": self.table}

    def load_state_dict(self, state):
        self.table = state["table"].clone()


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("weights", "the model's net.conv1.0.weight hold NaN or inf"),
        ("state", "callback state 2.BreakAfterStep/table holds NaN"),
    ],
)
def test_checkpoints_refuse_nonfinite_weights_and_nan_state(digits, tmp_path, what, message):
    callbacks = [PGDAttack(EPS, EPS / 2, 1), AdversarialCE(), BreakAfterStep(1, what)]
    trainer = make_trainer(digits, callbacks=callbacks, val_data=None, checkpoint_every_steps=1, output_dir=tmp_path)
    with pytest.raises(NonFiniteError, match=f"refusing to write checkpoint step_2 at step 2: {message}"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_1"]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_unknown_policy_is_refused(digits):
    with pytest.raises(ValueError, match="nonfinite must be one of \\('raise', 'skip'\\), got 'ignore'"):
        make_trainer(digits, nonfinite="ignore")


# ---------------------------------------------------------------------- recipes


def test_recipe_flag_skips_and_reports_the_count(tiny, tmp_path, monkeypatch):
    recipe = load_recipe("pgd_at")
    real = recipe.build_callbacks
    monkeypatch.setattr(recipe, "build_callbacks", lambda args, info: [*real(args, info), Poison(1)])
    out = tmp_path / "run"
    flags = quick_flags(tiny, out, "--max-steps", "3", "--attack-steps", "1", "--on-nonfinite", "skip")
    with pytest.warns(RuntimeWarning, match="at step 1 "):
        metrics = recipe.main(flags)
    assert metrics["nonfinite_skipped"] == 1 == json.loads((out / METRICS_FILE).read_text())["nonfinite_skipped"]
    assert [r["nonfinite_skipped"] for r in load_metrics_log(out) if "lr" in r] == [1]  # one row, at the end

    with pytest.raises(SystemExit) as exit_info:
        recipe.main([*quick_flags(tiny, tmp_path / "other"), "--on-nonfinite", "ignore"])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------- two processes

DRIVER = """
import json, sys
from pathlib import Path
import torch
from robustmix import AdversarialCE, AdversarialStep, Callback, NonFiniteLossError, PGDAttack
from robustmix.data import DATASETS, load_dataset
from robustmix.models import create_model, unwrap_model
from robustmix.training.trainer import Trainer


class PoisonOneRank(Callback):  # a NaN loss on rank 1 only; the gradients stay finite everywhere
    def on_before_backward(self, ctx):
        if ctx.step == 1 and torch.distributed.get_rank() == 1:
            ctx.loss = ctx.loss + torch.tensor(float("nan"))


def run(policy):
    torch.manual_seed(0)
    spec = DATASETS["digits"]
    model = create_model("test_resnet", 10, in_chans=1, mean=spec.mean, std=spec.std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train = load_dataset("digits", "train")
    step = AdversarialStep([PGDAttack(0.1, 0.05, 1), AdversarialCE(), PoisonOneRank()])
    trainer = Trainer(model, step, optimizer, train, None, max_steps=3, batch_size=8, progress=False, nonfinite=policy)
    rank = trainer.accelerator.process_index
    try:
        trainer.fit()
        result = {"skipped": trainer.nonfinite_skipped}
    except NonFiniteLossError as error:
        result = {"error": str(error), "step": error.step, "loss": error.nonfinite_loss, "indices": error.indices}
    result["weights"] = sum(p.double().sum().item() for p in unwrap_model(trainer.model).parameters())
    Path(sys.argv[1], f"{policy}{rank}.json").write_text(json.dumps(result))


run("raise")
run("skip")
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_take_the_same_decision(tmp_path):
    """A NaN loss on one rank only: both ranks raise (nobody waits in an all-reduce), or both skip."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    launch_two_processes(script, str(tmp_path))
    raised = [json.loads((tmp_path / f"raise{r}.json").read_text()) for r in (0, 1)]
    skipped = [json.loads((tmp_path / f"skip{r}.json").read_text()) for r in (0, 1)]
    for result in raised:
        assert result["step"] == 1 and result["loss"] == [1] and "loss process 1: nan" in result["error"]
        assert len(result["indices"]) == 2 and all(len(i) == 8 for i in result["indices"])
    assert raised[0]["indices"] == raised[1]["indices"] and raised[0]["weights"] == raised[1]["weights"]
    assert skipped[0]["skipped"] == skipped[1]["skipped"] == 1 and skipped[0]["weights"] == skipped[1]["weights"]
