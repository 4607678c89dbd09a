"""--grad-accum N: N micro-batches per optimizer step through Accelerate's gradient accumulation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from robustmix import AdversarialCE, AdversarialStep, Callback, PGDAttack
from robustmix.data import load_dataset
from robustmix.models import unwrap_model
from robustmix.runs.folder import load_metrics_log
from robustmix.training.metrics import WALL_CLOCK_KEYS
from robustmix.training.sampling import EpochBatches, batches_per_epoch
from robustmix.training.trainer import Trainer
from tests.conftest import crash_then_resume, load_recipe, quick_flags
from tests.trainers import EPS, subset


@pytest.fixture(scope="module")
def digits():
    return subset(load_dataset("digits", "train"), 40), subset(load_dataset("digits", "validation"), 12)


class _Positions(Callback):
    """Records what callbacks see: (ctx.step, micro-batch size) per call, and the optimizer hooks' steps."""

    stage = None

    def __init__(self) -> None:
        self.calls, self.batch_starts, self.optimizer_steps = [], [], []

    def on_batch_start(self, trainer, batch) -> None:
        self.batch_starts.append((trainer.global_step, len(batch["label"])))

    def on_before_backward(self, ctx) -> None:
        self.calls.append((ctx.step, ctx.batch_size))

    def on_after_optimizer_step(self, trainer, optimizer) -> None:
        self.optimizer_steps.append(trainer.global_step)


def _trainer(digits, grad_accum: int, batch_size: int, callbacks=None, **kwargs) -> Trainer:
    torch.manual_seed(0)
    # A model without BatchNorm: the gradient of a split batch is then the gradient of the whole batch.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = AdversarialStep([PGDAttack(EPS, EPS / 2, 1), AdversarialCE(), *(callbacks or [])], num_classes=10)
    options = {"epochs": 2, "eval_every": None, "progress": False, "log_every": 1, "checkpoint_every": None}
    train, val = digits
    return Trainer(
        model, step, optimizer, train, val, batch_size=batch_size, grad_accum=grad_accum, **(options | kwargs)
    )


def test_accumulating_micro_batches_is_training_on_their_union(digits, tmp_path):
    whole = _trainer(digits, 1, 16, output_dir=tmp_path / "whole")
    accumulated = _trainer(digits, 4, 4, output_dir=tmp_path / "accumulated")
    assert whole.steps_per_epoch == accumulated.steps_per_epoch == 3  # 16, 16 and the last 8 examples
    whole.fit(), accumulated.fit()
    for name, value in unwrap_model(whole.model).state_dict().items():
        torch.testing.assert_close(unwrap_model(accumulated.model).state_dict()[name], value, rtol=1e-4, atol=1e-5)
    # The training rows: one per optimizer step, its loss the mean over the step's whole batch.
    rows = [[r for r in load_metrics_log(tmp_path / run) if "loss" in r] for run in ("whole", "accumulated")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows[1]] == pytest.approx([r["loss"] for r in rows[0]], rel=1e-4)


def test_callbacks_see_optimizer_step_positions(digits):
    positions = _Positions()
    trainer = _trainer(digits, 4, 4, callbacks=[positions], epochs=1)
    trainer.fit()
    # Three steps of 16, 16 and 8 examples: four micro-batches each, all with the step's ctx.step.
    assert positions.batch_starts == [(0, 16), (1, 16), (2, 8)]
    assert positions.calls == [(s, b) for s, b in ((0, 4), (1, 4), (2, 2)) for _ in range(4)]
    assert positions.optimizer_steps == [0, 1, 2] and trainer.global_step == 3


def test_epoch_batches_are_those_of_the_larger_batch():
    plain = list(EpochBatches(56, 8, num_processes=1, process_index=0, seed=3))
    accumulated = list(EpochBatches(56, 2, num_processes=1, process_index=0, seed=3, micro_batches=4))
    assert accumulated == plain and batches_per_epoch(56, 2, 1, 4) == batches_per_epoch(56, 8) == 7
    # The last batch is kept when each micro-batch gets two examples (BatchNorm), on every process.
    assert [batches_per_epoch(n, 4, 1, 3) for n in (53, 54)] == [4, 5]
    assert [batches_per_epoch(n, 4, 2, 3) for n in (107, 108)] == [4, 5]


def test_awp_cannot_accumulate(digits, tiny, tmp_path, capsys):
    from robustmix import AWP

    with pytest.raises(ValueError, match="grad_accum must be 1 with AWP"):
        _trainer(digits, 2, 8, callbacks=[AWP()])
    with pytest.raises(SystemExit):
        load_recipe("awp").main(quick_flags(tiny, tmp_path / "run", "--grad-accum", "2"))
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("awp.py: error: --grad-accum: grad_accum must be 1 with AWP")


def test_a_recipe_resumes_an_accumulating_run_bit_for_bit(tiny, tmp_path, monkeypatch):
    recipe = load_recipe("pgd_at")
    flags = ["--attack-steps", "1", "--batch-size", "4", "--grad-accum", "4", "--checkpoint-every-steps", "2"]
    recipe.main(quick_flags(tiny, tmp_path / "straight", *flags))
    crash_then_resume(recipe, quick_flags(tiny, tmp_path / "crashed", *flags), 3, monkeypatch)
    straight, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "crashed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    drop_time = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in rows]  # noqa: E731
    assert drop_time(load_metrics_log(tmp_path / "crashed")) == drop_time(load_metrics_log(tmp_path / "straight"))
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    # 90 examples in steps of 16: 5 full steps and the last 10 (four micro-batches of 3, 3, 2, 2).
    assert (config["global_batch_size"], config["steps_per_epoch"]) == (16, 6)
