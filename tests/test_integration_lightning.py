"""robustmix inside PyTorch Lightning, against the real library."""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from robustmix.integrations.lightning import CHECKPOINT_KEY, AdversarialModule  # noqa: E402
from tests.integrations import BATCH, EPOCHS, digits, make_step, robustmix_reference, sgd, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _fit(tmp_path, recipe, model, train, *, epochs=EPOCHS, ckpt_path=None, every_n_train_steps=None, val=None):
    step, probe = make_step(recipe)
    module = AdversarialModule(model, step, lambda module: sgd(module.model))
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=every_n_train_steps,
        every_n_epochs=None if every_n_train_steps else 1,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[checkpoints], num_sanity_val_steps=0,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=BATCH) if val is not None else None
    trainer.fit(module, loader, val_loader, ckpt_path=ckpt_path)
    return trainer, probe


def _without(events, *names):
    return [e for e in events if e[0] not in names]


def _assert_same_steps(ours, theirs):
    assert [{k: v for k, v in s.items() if k != "loss"} for s in ours] == [
        {k: v for k, v in s.items() if k != "loss"} for s in theirs
    ]
    assert [s["loss"] for s in ours] == pytest.approx([s["loss"] for s in theirs], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("recipe", ["pgd_at", "adalab", "awp", "bilaw"])
def test_trains_as_robustmix_trainer_does_and_resumes(tmp_path, recipe):
    train = digits("train", BATCH)  # one batch per epoch: both trainers see the same batches
    model = tiny_model()
    reference = robustmix_reference(recipe, model, train)

    _trainer, probe = _fit(tmp_path, recipe, copy.deepcopy(model), train)
    # Same weights, same batch: every step's position and loss are robustmix's, also past ADA-Lab's burn-in.
    _assert_same_steps(probe.steps, reference.steps)
    if recipe == "adalab":
        assert [s["refined"] for s in probe.steps] == [False, True, True]
    assert _without(probe.events, "save") == _without(reference.events, "save")
    assert probe.events.count(("save",)) == EPOCHS

    # Resume from the first epoch's checkpoint: the rest of the run repeats, callback state included.
    checkpoint = torch.load(tmp_path / "step=1.ckpt", weights_only=True)
    (probe_state,) = (state for key, state in checkpoint[CHECKPOINT_KEY].items() if key.endswith(".Probe"))
    assert int(probe_state["count"]) == 1
    _resumed, again = _fit(tmp_path / "again", recipe, tiny_model(seed=1), train, ckpt_path=tmp_path / "step=1.ckpt")
    assert int(again.count) == EPOCHS
    assert _without(again.events, "save", "batch_start") == [
        ("fit_start",), ("epoch_start", 1), ("after_optimizer_step",), ("epoch_end", 1),
        ("epoch_start", 2), ("after_optimizer_step",), ("epoch_end", 2),
    ]  # fmt: skip
    _assert_same_steps(again.steps, probe.steps[1:])


def test_validation_logs_clean_and_pgd_accuracy(tmp_path):
    val = digits("validation", 2 * BATCH)
    model = tiny_model()
    trainer, probe = _fit(tmp_path, "pgd_at", model, digits("train", BATCH), epochs=1, val=val)
    metrics = trainer.callback_metrics
    images, labels = val.tensors()
    model.eval()
    with torch.no_grad():
        clean = (model(images).argmax(1) == labels).float().mean().item()
    assert metrics["val_clean_acc"].item() == pytest.approx(clean)
    assert 0 <= metrics["val_pgd_acc"].item() <= clean
    assert len(probe.steps) == 1  # validation runs no training step


def test_example_trains_and_resumes(tmp_path):
    spec = importlib.util.spec_from_file_location("lightning_train", ROOT / "docs" / "examples" / "lightning_train.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # Lightning counts an epoch that max_steps stopped as done: the resumed run starts the next one.
    flags = ["--epochs", "2", "--output-dir", str(tmp_path)]
    assert example.main([*flags, "--max-steps", "2"]).trainer.global_step == 2
    assert example.main([*flags, "--max-steps", "3", "--resume"]).trainer.global_step == 3


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ddp_on_two_processes_ends_with_identical_weights(tmp_path):
    worker = ROOT / "tests" / "_lightning_ddp_worker.py"
    flags = ["--devices", "2", "--epochs", "1", "--max-steps", "3", "--output-dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(worker), str(tmp_path / "weights"), *flags], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"weights.rank{rank}.pt") for rank in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3 and CHECKPOINT_KEY in checkpoint
