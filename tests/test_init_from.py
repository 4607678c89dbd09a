"""--init-from: a recipe starts from another run's final weights, with a fresh optimizer, schedule and step count."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from robustmix.cli import recipe as recipe_module
from robustmix.models import unwrap_model
from robustmix.runs.folder import MODEL_FILE, load_config, load_metrics_log, load_model
from tests.conftest import load_recipe, quick_flags


@pytest.fixture(scope="module")
def source(tiny, tmp_path_factory) -> Path:
    """A finished three-step PGD-AT run on the tiny dataset."""
    out = tmp_path_factory.mktemp("source") / "run"
    load_recipe("pgd_at").main(quick_flags(tiny, out, "--attack-steps", "1", "--max-steps", "3"))
    return out


class _Started(Exception):
    pass


def test_the_run_starts_from_the_other_runs_weights_and_records_them(tiny, source, tmp_path, monkeypatch):
    seen = {}

    def fit(self, resume=None):
        seen["weights"] = {k: v.clone() for k, v in unwrap_model(self.model).state_dict().items()}
        seen["step"], seen["lr"] = self.global_step, self.optimizer.param_groups[0]["lr"]
        seen["momentum"] = [self.optimizer.state.get(p, {}) for p in self.model.parameters()]
        raise _Started

    monkeypatch.setattr(recipe_module.Trainer, "fit", fit)
    out = tmp_path / "caat"
    with pytest.raises(_Started):
        load_recipe("caat").main(quick_flags(tiny, out, "--meta-size", "10", "--init-from", str(source)))
    expected = load_model(source).state_dict()
    assert seen["weights"].keys() == expected.keys()
    assert all(torch.equal(seen["weights"][k], v) for k, v in expected.items())
    # A fresh start: step 0, the schedule's first lr (warm-up from 1/25 of the peak), no optimizer state.
    assert seen["step"] == 0 and seen["lr"] == pytest.approx(0.1 / 25) and not any(seen["momentum"])
    config = load_config(out)
    assert config["flags"]["init_from"] == str(source)
    digest = hashlib.sha256((source / MODEL_FILE).read_bytes()).hexdigest()
    assert config["init_from"] == {"run_dir": str(source.resolve()), "sha256": digest}


def test_a_finished_fine_tune_counts_its_own_steps(tiny, source, tmp_path):
    out = tmp_path / "tuned"
    metrics = load_recipe("pgd_at").main(
        quick_flags(tiny, out, "--attack-steps", "1", "--max-steps", "2", "--lr", "1e-3", "--init-from", str(source))
    )
    assert metrics["test"]["step"] == 2  # the source ran 3 steps: --max-steps counts this run's own
    assert max(row["step"] for row in load_metrics_log(out)) == 2
    assert load_config(out)["init_from"]["run_dir"] == str(source.resolve())


def test_a_run_without_init_from_records_none(tiny, source):
    assert load_config(source)["init_from"] is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cifar-stem"], "trained another model than this run's: cifar_stem False there, True here"),
        (["--model", "resnet10t"], "name 'test_resnet' there, 'resnet10t' here"),
    ],
)
def test_another_model_is_a_one_line_flag_error(tiny, source, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("pgd_at").main(quick_flags(tiny, out, "--init-from", str(source), *flags))
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"pgd_at.py: error: --init-from: {source} ") and message in line, line
    assert not out.exists()


def test_a_folder_that_holds_no_finished_run_is_a_flag_error(tiny, source, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((source / "config.json").read_text())
    for folder, message in (
        (tmp_path / "missing", "does not exist"),
        (unfinished, f"holds no {MODEL_FILE}"),
        (source, "is this run's own --output-dir"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            load_recipe("pgd_at").main(quick_flags(tiny, source, "--overwrite", "--init-from", str(folder)))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--init-from" in err and message in err, err
    assert (source / MODEL_FILE).is_file()  # the flag error came before --overwrite removed anything
