"""robustmix inside Hugging Face's transformers.Trainer, against the real library."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from robustmix.integrations.hf import AdversarialTrainer  # noqa: E402
from tests.integrations import BATCH, EPOCHS, digits, make_step, robustmix_reference, sgd, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _trainer(tmp_path, recipe, model, train, **overrides):
    step, probe = make_step(recipe)
    optimizer = sgd(model)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        num_train_epochs=EPOCHS, remove_unused_columns=False, max_grad_norm=0.0, use_cpu=True, report_to=[],
        save_strategy="epoch", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = AdversarialTrainer(
        model=model, args=transformers.TrainingArguments(**{**settings, **overrides}), train_dataset=train,
        adversarial_step=step, optimizers=(optimizer, constant),
    )  # fmt: skip
    return trainer, probe


def _without(events, *names):
    return [e for e in events if e[0] not in names]


@pytest.mark.parametrize("recipe", ["pgd_at", "adalab", "awp", "bilaw"])
def test_trains_as_robustmix_trainer_does_and_resumes(tmp_path, recipe):
    train = digits("train", BATCH)  # one batch per epoch: both trainers see the same batches
    model = tiny_model()
    reference = robustmix_reference(recipe, model, train)

    trainer, probe = _trainer(tmp_path, recipe, copy.deepcopy(model), train)
    trainer.train()
    # Same weights, same batch: every step's position and loss are robustmix's, also past ADA-Lab's burn-in.
    assert len(probe.steps) == EPOCHS
    for ours, theirs in zip(probe.steps, reference.steps, strict=True):
        assert {k: v for k, v in ours.items() if k != "loss"} == {k: v for k, v in theirs.items() if k != "loss"}
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6)
    if recipe == "adalab":
        assert [s["refined"] for s in probe.steps] == [False, True, True]
    assert _without(probe.events, "save") == _without(reference.events, "save")
    assert probe.events.count(("save",)) == EPOCHS

    # Resume from the first epoch's checkpoint: the rest of the run repeats, callback state included.
    resumed, again = _trainer(tmp_path, recipe, tiny_model(seed=1), train)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert int(again.count) == EPOCHS
    assert _without(again.events, "save", "batch_start") == [
        ("fit_start",), ("epoch_start", 1), ("after_optimizer_step",), ("epoch_end", 1),
        ("epoch_start", 2), ("after_optimizer_step",), ("epoch_end", 2),
    ]  # fmt: skip
    _assert_same_steps(again.steps, probe.steps[1:])


def _assert_same_steps(ours, theirs):
    assert [{k: v for k, v in s.items() if k != "loss"} for s in ours] == [
        {k: v for k, v in s.items() if k != "loss"} for s in theirs
    ]
    assert [s["loss"] for s in ours] == pytest.approx([s["loss"] for s in theirs], rel=1e-5, abs=1e-6)


def test_resumes_in_the_middle_of_an_epoch(tmp_path):
    train = digits("train", 2 * BATCH)
    trainer, probe = _trainer(tmp_path, "adalab", tiny_model(), train, num_train_epochs=2, save_strategy="steps",
                              save_steps=1)  # fmt: skip
    trainer.train()
    assert [s["epoch"] for s in probe.steps] == [0, 0, 1, 1]
    resumed, again = _trainer(tmp_path, "adalab", tiny_model(seed=1), train, num_train_epochs=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    # No second on_epoch_start for the epoch it resumed in; its end still fires.
    assert _without(again.events, "save", "batch_start") == [
        ("fit_start",), ("after_optimizer_step",), ("epoch_end", 1)
    ]  # fmt: skip
    _assert_same_steps(again.steps, probe.steps[3:])
    assert int(again.count) == 4


def test_evaluate_reports_clean_and_pgd_accuracy_without_training_callbacks(tmp_path):
    val = digits("validation", 2 * BATCH)
    model = tiny_model()
    trainer, probe = _trainer(tmp_path, "adalab", model, digits("train", BATCH), eval_strategy="no")
    trainer.eval_dataset = val
    first, second = trainer.evaluate(), trainer.evaluate()
    keys = ("eval_loss", "eval_clean_acc", "eval_pgd_acc")
    assert [first[k] for k in keys] == [second[k] for k in keys]  # the attack's random starts are seeded
    images, labels = val.tensors()
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert first["eval_clean_acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert 0 <= first["eval_pgd_acc"] <= first["eval_clean_acc"]
    assert first["eval_loss"] > torch.nn.functional.cross_entropy(logits, labels).item()  # CE at the PGD examples
    assert probe.steps == [] and ("batch_start",) not in probe.events  # evaluation runs no training step
    trainer.eval_eps = 0.0  # no budget: every clean-correct example stays correct
    assert trainer.evaluate()["eval_pgd_acc"] == first["eval_clean_acc"]


def test_refuses_settings_that_would_break_the_step(tmp_path):
    with pytest.raises(ValueError, match=r"remove_unused_columns=False"):
        _trainer(tmp_path, "pgd_at", tiny_model(), digits("train", BATCH), remove_unused_columns=True)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps must be 1"):
        _trainer(tmp_path, "pgd_at", tiny_model(), digits("train", BATCH), gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=r"mixed_precision='bf16'"):
        _trainer(tmp_path, "pgd_at", tiny_model(), digits("train", BATCH), bf16=True)


def test_example_trains_evaluates_and_resumes(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_trainer", ROOT / "docs" / "examples" / "hf_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    flags = ["--epochs", "1", "--output-dir", str(tmp_path)]
    metrics = example.main([*flags, "--max-steps", "2"])
    assert 0 <= metrics["eval_pgd_acc"] <= metrics["eval_clean_acc"] <= 1
    resumed = example.main([*flags, "--max-steps", "3", "--resume"])
    assert resumed["epoch"] > metrics["epoch"]
