"""robustmix inside timm's training loop (docs/examples/timm_train.py, timm's train_one_epoch made adversarial)."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from tests.integrations import BATCH, EPOCHS, digits, make_step, tiny_model

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "timm_train.py"


def _example():
    spec = importlib.util.spec_from_file_location("timm_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("recipe", ["adalab", "awp"])
def test_train_one_epoch_feeds_the_position_and_fires_the_events(recipe):
    example = _example()
    images, labels = digits("train", 2 * BATCH).tensors()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=BATCH)
    model = tiny_model()
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, momentum=0.9)
    scheduler, epochs = create_scheduler_v2(optimizer, num_epochs=EPOCHS, step_on_epochs=False, updates_per_epoch=2)
    step, probe = make_step(recipe)
    for epoch in range(epochs):
        metrics = example.train_one_epoch(epoch, model, loader, optimizer, step, scheduler, epochs)
        scheduler.step(epoch + 1)
        assert math.isfinite(metrics["loss"])
    assert [(s["epoch"], s["step"]) for s in probe.steps] == [(e, 2 * e + i) for e in range(EPOCHS) for i in (0, 1)]
    assert {(s["total_epochs"], s["total_steps"]) for s in probe.steps} == {(EPOCHS, 2 * EPOCHS)}
    if recipe == "adalab":  # past the burn-in of one epoch the labels are refined
        assert [s["refined"] for s in probe.steps] == [False, False, True, True, True, True]
    assert probe.events == [
        event for e in range(EPOCHS)
        for event in [("epoch_start", e), ("after_optimizer_step",), ("after_optimizer_step",), ("epoch_end", e)]
    ]  # fmt: skip


def test_example_trains_with_timm_utilities():
    history = _example().main(["--epochs", "2", "--train-size", "256"])
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
