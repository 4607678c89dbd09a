"""What a run shows and keeps of itself: console copy, trackers, throughput, progress bar, training curves."""

from __future__ import annotations

import io
import stat
import sys
from pathlib import Path

import pytest
from accelerate.tracking import GeneralTracker, get_available_trackers

from robustmix.cli.recipe import TRACKERS
from robustmix.data import load_dataset
from robustmix.runs.folder import CURVES_FILE, LOG_FILE, load_metrics_log
from robustmix.training.console import copy_console
from robustmix.training.curves import curve, plot_training_curves
from tests.conftest import crash_then_resume, load_recipe, quick_flags
from tests.trainers import make_trainer, subset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: File name endings of pickles and of torch.save; none may be in a run folder.
PICKLED = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt")


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory) -> Path:
    """A finished two-epoch PGD-AT run (6 steps per epoch), a training row every 4 steps."""
    out = tmp_path_factory.mktemp("run") / "run"
    load_recipe("pgd_at").main(quick_flags(tiny, out, "--attack-steps", "1", "--log-every", "4"))
    return out


def test_the_console_is_copied_into_the_run_folder(run):
    lines = (run / LOG_FILE).read_text().splitlines()
    assert lines[0].startswith("epoch 0 step 6: val clean") and lines[1].startswith("epoch 1 step 12: val clean")
    # The progress bar in its last state (with the epoch), then the result line; no redraws, no escapes.
    assert lines[2].startswith("epoch 1: 100%") and "12/12" in lines[2]
    assert lines[3].startswith("pgd_at on ") and "test clean" in lines[3] and len(lines) == 4
    assert not any("\r" in line or "\x1b" in line for line in lines)


def test_training_rows_every_log_every_steps_and_images_per_second_per_epoch(run):
    rows = load_metrics_log(run)
    assert [r["step"] for r in rows if "loss" in r] == [4, 6, 8, 12]  # every 4 steps and at each epoch's end
    epochs = [r for r in rows if "images_per_s" in r]
    assert [(r["step"], r["epoch"]) for r in epochs] == [(6, 0), (12, 1)]
    for row in epochs:  # 90 training examples per epoch
        assert row["images_per_s"] == pytest.approx(90 / row["epoch_time_s"], rel=0.05)


def test_curves_are_written_and_nothing_in_the_run_folder_is_executable_or_pickled(run):
    assert (run / CURVES_FILE).read_bytes()[:8] == PNG_MAGIC
    for path in run.rglob("*"):
        assert not path.is_file() or not path.stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH), path
        assert not path.name.endswith(PICKLED), path


def test_a_resumed_run_appends_to_its_log(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    flags = quick_flags(tiny, out, "--attack-steps", "1", "--checkpoint-every-steps", "2")
    crash_then_resume(load_recipe("pgd_at"), flags, 8, monkeypatch)
    text = (out / LOG_FILE).read_text()
    # The first process's validation and how it ended, then the resumed process's lines.
    assert text.index("epoch 0 step 6: val") < text.index("KeyboardInterrupt: power cut")
    assert text.index("KeyboardInterrupt: power cut") < text.index("epoch 1 step 12: val")
    assert text.count("epoch 0 step 6: val") == 1 and "pgd_at on " in text


def test_copy_console_keeps_the_last_state_of_redrawn_lines(tmp_path, monkeypatch):
    console = io.StringIO()
    monkeypatch.setattr(sys, "stderr", console)
    with copy_console(tmp_path / "log.txt"):
        sys.stderr.write("\rbar 1/3\rbar 2/3\x1b[A\rbar 3/3")
        sys.stderr.write("\n\n  \nwarning: x\nno newline")
    assert console.getvalue().startswith("\rbar 1/3")  # the console itself gets everything
    assert (tmp_path / "log.txt").read_text() == "bar 3/3\nwarning: x\nno newline\n"
    with copy_console(tmp_path / "log.txt", append=True):
        print("more")
    assert (tmp_path / "log.txt").read_text().endswith("no newline\nmore\n")


def test_a_tracker_that_is_not_installed_is_a_one_line_error(tmp_path, capsys):
    installed = {str(t) for t in get_available_trackers()}
    missing = next((name for name in TRACKERS if name not in installed), None)
    if missing is None:
        pytest.skip("every Accelerate tracker is installed")
    with pytest.raises(SystemExit):
        load_recipe("pgd_at").main(["--output-dir", str(tmp_path / "run"), "--log-with", missing])
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"pgd_at.py: error: --log-with {missing}: not installed (pip install ")
    assert f"trackers installed here: {', '.join(sorted(installed, key=TRACKERS.index)) or 'none'}" in line


class _Recorder(GeneralTracker):
    name, requires_logging_directory, main_process_only = "recorder", False, True

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.rows.append((step, dict(values)))


def test_trackers_receive_every_row_of_metrics_jsonl(tmp_path):
    recorder = _Recorder()
    digits = subset(load_dataset("digits", "train"), 40), subset(load_dataset("digits", "validation"), 12)
    make_trainer(digits, epochs=1, output_dir=tmp_path, log_every=2, log_with=[recorder]).fit()
    expected = [(r["step"], {k: v for k, v in r.items() if k not in ("step", "epoch", "elapsed_s")})
                for r in load_metrics_log(tmp_path)]  # fmt: skip
    assert recorder.rows == expected and any("images_per_s" in values for _, values in recorder.rows)


@pytest.mark.skipif("tensorboard" not in {str(t) for t in get_available_trackers()}, reason="needs tensorboard")
def test_tensorboard_writes_its_events_into_the_run_folder(tiny, tmp_path):
    out = tmp_path / "run"
    load_recipe("pgd_at").main(quick_flags(tiny, out, "--attack-steps", "1", "--max-steps", "2", "--log-with",
                                           "tensorboard"))  # fmt: skip
    assert list(out.rglob("events.out.tfevents.*"))


def test_curve_takes_the_rows_holding_the_value():
    rows = [{"step": 2, "loss": 1.5}, {"step": 2, "val_pgd_acc": 0.25}, {"step": 4, "loss": 1.0, "stop": "x"}]
    assert curve(rows, "loss") == ([2, 4], [1.5, 1.0]) and curve(rows, "val_pgd_acc") == ([2], [0.25])
    assert curve(rows, "stop") == ([], [])


def test_curves_of_several_runs_in_one_figure(tmp_path):
    rows = [{"step": s, "loss": 2 / s, "train_adv_acc": s / 10, "val_clean_acc": 0.5, "val_pgd_acc": 0.3,
             "val_ema_clean_acc": 0.6, "val_ema_pgd_acc": 0.35} for s in range(1, 5)]  # fmt: skip
    plot_training_curves({"a seed 0": rows, "b seed 0": rows[:2]}, tmp_path / "c.png", title="t")
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC


def test_the_seeds_of_a_recipe_share_a_colour_and_one_legend_names_every_run(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, path, **kwargs: drawn.append(figure))
    rows = [{"step": s, "loss": 2 / s, "val_clean_acc": 0.5, "val_ema_clean_acc": 0.6} for s in range(1, 5)]
    labels = ["a seed 0", "a seed 1", "b seed 0"]
    plot_training_curves(dict.fromkeys(labels, rows), tmp_path / "c.png", groups={"a seed 0": "a", "a seed 1": "a"})
    (figure,) = drawn
    assert not any(axes.get_legend() for axes in figure.axes)  # no legend inside a panel
    (legend,) = figure.legends
    lines = dict(zip([text.get_text() for text in legend.get_texts()], legend.legend_handles))
    assert list(lines) == [*labels, *(f"{label} (EMA)" for label in labels)]
    a0, a1, b0 = (lines[label] for label in labels)
    assert a0.get_color() == a1.get_color() != b0.get_color()
    assert a0.get_linestyle() != a1.get_linestyle() and a0.get_linestyle() == b0.get_linestyle()
    assert lines["a seed 0 (EMA)"].get_alpha() < 1 and lines["a seed 0 (EMA)"].get_color() == a0.get_color()


def test_results_page_shows_the_training_curves_of_its_runs(tiny, run, tmp_path):
    other = tmp_path / "seed1"
    load_recipe("pgd_at").main(quick_flags(tiny, other, "--attack-steps", "1", "--seed", "1", "--log-every", "3"))
    output = tmp_path / "docs" / "page.md"
    argv = [str(run), str(other), "--output", str(output), "--attacks", "pgd20", "--n-examples", "6"]
    page = load_recipe("results").main([*argv, "--batch-size", "6", "--no-sweep", "--no-progress"])
    assert "## Training curves\n\n![Training curves of the runs](page_curves.png)" in page
    assert (output.parent / "page_curves.png").read_bytes()[:8] == PNG_MAGIC
