"""--ema DECAY: a moving average of the weights, validated, tested, saved beside them and resumed exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from robustmix.data import load_dataset
from robustmix.models import unwrap_model
from robustmix.runs.folder import EMA_MODEL_FILE, MODEL_FILE, load_metrics_log, load_model
from robustmix.training.metrics import WALL_CLOCK_KEYS
from tests.conftest import crash_then_resume, load_recipe, quick_flags
from tests.trainers import make_trainer, subset


@pytest.fixture(scope="module")
def digits():
    return subset(load_dataset("digits", "train"), 40), subset(load_dataset("digits", "validation"), 12)


def test_the_average_moves_by_one_minus_decay_per_optimizer_step(digits):
    trainer = make_trainer(digits, ema_decay=0.75, max_steps=1, eval_every=None)
    before = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
    trainer.fit()
    after = unwrap_model(trainer.model).state_dict()
    for name, value in trainer.ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * before[name] + 0.25 * after[name])
        else:  # counters (BatchNorm's num_batches_tracked) are copied
            assert torch.equal(value, after[name])


@pytest.mark.parametrize("decay", [0, 1, -0.5, 1.5])
def test_a_decay_outside_zero_one_is_refused(digits, decay):
    with pytest.raises(ValueError, match="ema_decay must be in"):
        make_trainer(digits, ema_decay=decay)


def test_evaluate_ema_needs_an_average(digits):
    with pytest.raises(ValueError, match="needs a trainer with ema_decay"):
        make_trainer(digits).evaluate(digits[1], ema=True)


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "run"
    load_recipe("pgd_at").main(quick_flags(tiny, out, "--attack-steps", "1", "--ema", "0.9"))
    return out


def test_a_recipe_validates_tests_and_saves_the_average(run):
    rows = [r for r in load_metrics_log(run) if "val_pgd_acc" in r]
    assert len(rows) == 2 and all({"val_ema_clean_acc", "val_ema_pgd_acc"} <= r.keys() for r in rows)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_ema"]["weights"] == "ema" and metrics["test_ema"]["n"] == 20
    ema, final = load_model(run, weights="ema").state_dict(), load_model(run).state_dict()
    assert ema.keys() == final.keys() and not all(torch.equal(ema[k], final[k]) for k in ema)
    assert "EMA clean" in (run / "log.txt").read_text()


def test_evaluate_takes_the_ema_weights(run, tmp_path):
    report = load_recipe("evaluate").main(
        ["--run-dir", str(run), "--weights", "ema", "--quick", "--output", str(tmp_path / "e.json"), "--no-progress"]
    )
    assert report["settings"]["weights"] == "ema" and report["run"]["weights_file"] == EMA_MODEL_FILE


def test_a_run_without_ema_has_no_ema_weights(tiny, tmp_path):
    out = tmp_path / "run"
    load_recipe("pgd_at").main(quick_flags(tiny, out, "--attack-steps", "1", "--max-steps", "1"))
    with pytest.raises(FileNotFoundError, match="no ema weights"):
        load_model(out, weights="ema")


def test_resume_continues_the_average_bit_for_bit(tiny, tmp_path, monkeypatch):
    recipe = load_recipe("pgd_at")
    flags = ["--attack-steps", "1", "--ema", "0.8", "--checkpoint-every-steps", "2", "--augment"]
    recipe.main(quick_flags(tiny, tmp_path / "straight", *flags))
    crash_then_resume(recipe, quick_flags(tiny, tmp_path / "crashed", *flags), 8, monkeypatch)
    for name in (MODEL_FILE, EMA_MODEL_FILE):
        straight, resumed = (load_file(tmp_path / run / name) for run in ("straight", "crashed"))
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    drop_time = lambda rows: [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in rows]  # noqa: E731
    assert drop_time(load_metrics_log(tmp_path / "crashed")) == drop_time(load_metrics_log(tmp_path / "straight"))
    straight, resumed = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("straight", "crashed"))
    assert straight["test_ema"] == resumed["test_ema"]
