"""evaluate_run, its report, recipes/evaluate.py and recipes/results.py on tiny run folders made here.

A run folder is written directly (config.json with the real recipe flags, model.safetensors): a test_resnet
trained for a few seconds on the embedded digits, with clean steps on noisy images. Attack budgets are cut
(:data:`CHEAP`): these tests check what the suite records and computes, not how strong the attacks are
(tests/test_eval_attacks.py does).
"""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustmix
import robustmix.evaluation.run as evaluate
from robustmix.cli.recipe import base_parser, parse_args
from robustmix.data import load_dataset
from robustmix.evaluation.attacks import ATTACKS, with_budget
from robustmix.evaluation.report import per_example_results
from robustmix.evaluation.run import evaluate_run
from robustmix.evaluation.stats import discordant_pairs, mcnemar_exact
from robustmix.evaluation.worstcase import sanity_flags
from robustmix.models import create_model, model_config
from robustmix.runs.checkpoint import atomic_save_weights, atomic_write_json
from robustmix.runs.folder import load_model
from tests.conftest import launch_two_processes, load_recipe

EPS = 0.02
CHEAP = [
    with_budget("pgd20", steps=5),
    with_budget("pgd100", steps=8),
    with_budget("cw", steps=5),
    with_budget("apgd-ce", steps=5),
    with_budget("apgd-t", steps=3, n_target_classes=2),
    with_budget("square", queries=50),
]
SWEEP = [with_budget("pgd20", steps=3), with_budget("square", queries=20)]
SMALL = {"attacks": CHEAP, "n_examples": 12, "batch_size": 6, "sweep_attacks": SWEEP, "sweep_eps": [0.0, EPS, 0.8]}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _make_run(folder: Path, seed: int = 0, steps: int = 60) -> Path:
    """A run folder as recipes/pgd_at.py writes it (the files evaluation reads), trained in seconds."""
    args = parse_args(base_parser("pgd_at"), ["--eps", str(EPS), "--seed", str(seed), "--output-dir", str(folder)])
    x, y = load_dataset("digits", "train").tensors()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_model("test_resnet", 10, in_chans=1, mean=(0.305,), std=(0.3236,))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(steps):
            idx = torch.randint(0, len(y), (64,))
            noisy = (x[idx] + EPS * (2 * torch.rand_like(x[idx]) - 1)).clamp(0, 1)
            loss = F.cross_entropy(model(noisy), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    folder.mkdir(parents=True)
    atomic_save_weights(model.state_dict(), folder / "model.safetensors")
    config = {
        "recipe": "pgd_at",
        "robustmix_version": robustmix.__version__,
        "model": model_config(model),
        "data": {"dataset": "digits", "path": None, "split_seed": 0, "num_classes": 10, "image_shape": [1, 32, 32]},
        "attack": {"eps": EPS, "step_size": args.step_size, "steps": args.attack_steps},
        "seed": seed,
        "num_processes": 1,
        "steps_per_epoch": 10,
        "total_steps": 150,
        "flags": vars(args),
    }
    atomic_write_json(folder / "config.json", config)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("runs") / "pgd_at-digits-seed0")


@pytest.fixture(scope="module")
def report(run_dir) -> dict:
    """The default report: eval.json and friends in the run folder."""
    return evaluate_run(run_dir, progress=False, **SMALL)


def _must_not_run(*args, **kwargs) -> None:
    pytest.fail("bad input must be rejected before this runs")


def _numbers(report: dict) -> dict:
    return {key: report[key] for key in ("results", "eps_sweep", "margins", "sanity_flags")}


def test_report_records_every_setting_and_number(report, run_dir):
    assert json.loads((run_dir / "eval.json").read_text()) == report
    settings = report["settings"]
    assert (settings["eps"], settings["norm"], settings["n_examples"]) == (EPS, "linf", 12)
    assert (settings["split"], settings["weights"], settings["seed"], settings["mixed_precision"]) == (
        "test", "final", 0, "no",
    )  # fmt: skip
    attacks = {attack["name"]: attack for attack in settings["attacks"]}
    assert list(attacks) == ["pgd20", "pgd100", "cw", "apgd-ce", "apgd-t", "square"]
    apgd_ce = attacks["apgd-ce"]["settings"]
    assert (apgd_ce["steps"], apgd_ce["restarts"], apgd_ce["loss"], apgd_ce["rho"]) == (5, 1, "ce", 0.75)
    assert (attacks["apgd-t"]["settings"]["n_target_classes"], attacks["square"]["settings"]["queries"]) == (2, 50)
    assert not attacks["square"]["white_box"]
    assert [a["settings"]["steps"] for a in settings["eps_sweep"]["attacks"] if a["name"] == "pgd20"] == [3]
    assert report["run"]["recipe"] == "pgd_at" and len(report["run"]["weights_sha256"]) == 64
    env = report["environment"]
    assert (env["robustmix"], env["torch"], env["num_processes"]) == (robustmix.__version__, torch.__version__, 1)
    datetime.fromisoformat(env["date"])

    results = report["results"]
    assert results["n"] == 12 and sum(report["margins"]["clean"]) == sum(report["margins"]["adversarial"]) == 12
    assert 0.5 < results["clean"] <= 1
    assert all(count == round(12 * results["clean"]) for count in results["attacked"].values())
    cumulative = list(results["cumulative"].values())
    assert cumulative == sorted(cumulative, reverse=True) and results["worst_case"] == cumulative[-1]
    assert results["cumulative"]["pgd20"] == results["standalone"]["pgd20"] > results["worst_case"]
    assert results["worst_case"] <= min(results["standalone"].values()) <= results["clean"]
    assert set(results["loss_trace"]) == {"pgd20", "pgd100", "cw"} and len(results["loss_trace"]["pgd100"]) == 8
    sweep = report["eps_sweep"]
    assert sweep["eps"] == [0.0, EPS, 0.8] and sweep["worst_case"][0] == results["clean"]
    expected_flags = sanity_flags({**results, "eps_sweep": dict(zip(sweep["eps"], sweep["worst_case"]))})
    assert report["sanity_flags"] == expected_flags

    table = (run_dir / "eval.md").read_text()
    assert "| PGD-20 | step_fraction 0.25, loss ce, steps 5 |" in table
    assert f"**{100 * results['worst_case']:.2f}%**" in table
    assert "![robust accuracy against eps](eval_eps_sweep.png)" in table
    for name in ("eval_eps_sweep.png", "eval_margins.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC


def test_report_keeps_the_per_example_results_behind_its_accuracies(report):
    examples, results = per_example_results(report), report["results"]
    assert examples["indices"].tolist() == list(range(12))
    assert examples["clean"].sum() == round(12 * results["clean"])
    assert examples["worst_case"].sum() == round(12 * results["worst_case"]) < examples["clean"].sum()
    for name, robust in examples["standalone"].items():
        assert robust.sum() == round(12 * results["standalone"][name])
        assert not (robust & ~examples["clean"]).any()  # never robust when misclassified clean
    assert (examples["worst_case"] == np.logical_and.reduce(list(examples["standalone"].values()))).all()


def test_a_report_from_before_per_example_results_is_still_current(report, run_dir, tmp_path, monkeypatch):
    old = json.loads(json.dumps(report))
    del old["results"]["per_example"]
    atomic_write_json(tmp_path / "eval.json", old)
    monkeypatch.setattr(evaluate, "worst_case", _must_not_run)
    stored = evaluate_run(run_dir, output=tmp_path / "eval.json", reuse=True, progress=False, **SMALL)
    assert stored["results"] == old["results"] and per_example_results(stored) is None


def test_evaluation_is_seeded_and_works_under_no_grad(report, run_dir, tmp_path):
    with torch.no_grad():
        again = evaluate_run(run_dir, output=tmp_path / "eval.json", plots=False, progress=False, **SMALL)
    assert _numbers(again) == _numbers(report)
    assert again["files"] == {"table": "eval.md"} and not list(tmp_path.glob("*.png"))


class _Spy(nn.Module):
    """Records, for every forward, whether autocast was on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes
        self.autocast: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.autocast.append(torch.is_autocast_enabled(x.device.type))
        return self.model(x)


def test_attacks_run_under_autocast_and_decisions_in_fp32(report, run_dir, tmp_path, monkeypatch):
    spies = []

    def load_spied(*args, **kwargs) -> _Spy:
        spies.append(_Spy(load_model(*args, **kwargs)))
        return spies[-1]

    monkeypatch.setattr(evaluate, "load_model", load_spied)
    small = SMALL | {"attacks": CHEAP[:1], "sweep_eps": []}
    bf16 = evaluate_run(run_dir, output=tmp_path / "eval.json", mixed_precision="bf16", progress=False, **small)
    assert bf16["settings"]["mixed_precision"] == "bf16"
    assert True in spies[0].autocast and False in spies[0].autocast
    # The margins come from the logits that decide robustness: in bf16 they would differ from fp32's.
    assert bf16["margins"]["mean_clean"] == report["margins"]["mean_clean"]
    assert bf16["results"]["clean"] == report["results"]["clean"]


def test_the_memory_format_changes_the_speed_not_the_numbers(report, run_dir, tmp_path, monkeypatch):
    models = []

    def load_kept(*args, **kwargs) -> nn.Module:
        models.append(load_model(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(evaluate, "load_model", load_kept)
    small = SMALL | {"attacks": CHEAP[:1], "sweep_eps": []}
    contiguous = evaluate_run(run_dir, output=tmp_path / "a.json", memory_format="contiguous", progress=False, **small)
    fast = evaluate_run(run_dir, output=tmp_path / "b.json", memory_format="channels_last", progress=False, **small)
    # A 3x3 convolution of several input channels: its two layouts differ (those of a 1-channel one coincide).
    conv = [next(p for p in model.parameters() if p.dim() == 4 and min(p.shape[1:]) > 1) for model in models]
    assert conv[0].is_contiguous() and not conv[1].is_contiguous()
    assert conv[1].is_contiguous(memory_format=torch.channels_last)
    # On the CPU "auto" is channels_last; the format is where the report keeps the machine, not a setting.
    assert report["environment"]["memory_format"] == "channels_last" == fast["environment"]["memory_format"]
    assert contiguous["environment"]["memory_format"] == "contiguous"
    assert contiguous["settings"] == fast["settings"]
    assert contiguous["results"]["clean"] == fast["results"]["clean"] == report["results"]["clean"]
    assert contiguous["margins"]["mean_clean"] == pytest.approx(fast["margins"]["mean_clean"], abs=1e-5)
    assert "channels_last weights" in (tmp_path / "b.md").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--run-dir", "{missing}"], "does not exist"),
        (["--attacks", "pgd20", "fgsm"], "invalid choice: 'fgsm'"),
        (["--eps", "-0.1"], "must be >= 0"),
        (["--eps", "2"], "must be in [0, 1]"),
        (["--n-examples", "0"], "must be >= 1"),
        (["--weights", "best"], "the run has no best weights"),
        (["--sweep-eps"], "expected at least one argument"),  # a bare flag would hide that no sweep runs
        (["--sweep-eps", "0.1", "--no-sweep"], "not allowed with argument"),
        (["--memory-format", "nhwc"], "invalid choice: 'nhwc'"),
    ],
)
def test_cli_rejects_bad_input_before_work(flags, message, run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_model", _must_not_run)
    argv = ["--run-dir", str(run_dir), "--output", str(tmp_path / "eval.json")]
    argv += [flag.format(missing=tmp_path / "missing") for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("evaluate").main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -0.1}, "eps must be a finite number >= 0"),
        ({"n_examples": 0}, "n_examples must be an integer >= 1"),
        ({"n_examples": 361}, "the test split of digits has 360"),
        ({"attacks": ["pgd20", "fgsm"]}, "unknown evaluation attack 'fgsm'"),
        ({"split": "dev"}, "unknown split"),
        ({"sweep_eps": [0.1, 1.5]}, r"every eps of the sweep is an L-inf radius in pixels in \[0, 1\]"),
        ({"memory_format": "nhwc"}, r"memory_format must be one of \('auto', 'contiguous', 'channels_last'\)"),
    ],
)
def test_evaluate_run_rejects_bad_input_before_any_attack(kwargs, message, run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "worst_case", _must_not_run)
    with pytest.raises(ValueError, match=message):
        evaluate_run(run_dir, output=tmp_path / "eval.json", **kwargs)
    with pytest.raises(FileNotFoundError, match=r"run folder .* does not exist"):
        evaluate_run(tmp_path / "missing")


#: 13 examples in chunks of 3: the first process takes 3 chunks, the second 2; the last chunk holds 1 example.
TWO_PROCESS_SCRIPT = """
import sys
from robustmix.evaluation.attacks import with_budget
from robustmix.evaluation.run import evaluate_run

evaluate_run(
    sys.argv[1], output=sys.argv[2], plots=False, progress=False, eps=0.03, n_examples=13, batch_size=3,
    attacks=[with_budget("pgd20", steps=4), with_budget("square", queries=30)],
    sweep_attacks=[with_budget("pgd20", steps=3)], sweep_eps=[0.03, 0.8],
)
"""


@pytest.mark.distributed
def test_two_processes_give_the_numbers_of_one(run_dir, tmp_path, monkeypatch):
    script = tmp_path / "evaluate_13.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    launch_two_processes(script, str(run_dir), str(tmp_path / "two.json"))
    monkeypatch.setattr(sys, "argv", [str(script), str(run_dir), str(tmp_path / "one.json")])
    runpy.run_path(str(script), run_name="__main__")

    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert (one["environment"]["num_processes"], two["environment"]["num_processes"]) == (1, 2)
    assert two["results"]["n"] == 13
    assert _numbers(two) == _numbers(one)
    # Attacks that break some examples and not others: the comparison is not between all-or-nothing numbers.
    assert 0 < one["results"]["standalone"]["pgd20"] < one["results"]["clean"]


class _Quantized(nn.Module):
    """The model behind ``round(4x) / 4``: zero input gradients, a textbook case of gradient masking."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.model(torch.round(x * 4) / 4)


def test_a_masked_model_is_flagged_in_the_report_and_on_the_console(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_model", lambda *args, **kwargs: _Quantized(load_model(*args, **kwargs)))
    small = SMALL | {"attacks": [CHEAP[0], CHEAP[3], CHEAP[5]], "sweep_eps": []}
    masked = evaluate_run(run_dir, output=tmp_path / "eval.json", plots=False, progress=False, **small)
    flags = json.loads((tmp_path / "eval.json").read_text())["sanity_flags"]
    assert flags == masked["sanity_flags"]
    assert any(flag.startswith("loss trace: the mean PGD-20 loss does not increase") for flag in flags)
    err = capsys.readouterr().err
    assert "WARNING" in err and flags[0] in err
    assert "**WARNING" in (tmp_path / "eval.md").read_text()


def _copy_run(run_dir: Path, folder: Path, seed: int) -> Path:
    """The run folder again (weights and config, no report) under another training seed."""
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("eval*"))
    config = json.loads((folder / "config.json").read_text())
    config["seed"] = config["flags"]["seed"] = seed
    config["flags"]["output_dir"] = str(folder)
    atomic_write_json(folder / "config.json", config)
    return folder


def test_results_page_groups_runs_and_reuses_current_reports(run_dir, tmp_path, monkeypatch):
    first, second = (_copy_run(run_dir, tmp_path / f"pgd_at-digits-seed{seed}", seed) for seed in (0, 1))
    output = tmp_path / "docs" / "results.md"
    argv = [str(first), str(second), "--output", str(output), "--attacks", "pgd20", "cw", "--n-examples", "6"]
    argv += ["--batch-size", "6", "--no-sweep", "--no-progress"]
    results = load_recipe("results")
    attacked = []
    worst_case = evaluate.worst_case
    monkeypatch.setattr(
        evaluate, "worst_case", lambda model, x, *a, **k: attacked.append(x) or worst_case(model, x, *a, **k)
    )

    page = results.main(argv)
    assert len(attacked) == 2  # two runs of one chunk each
    assert output.read_text() == page
    assert "## digits" in page and "| pgd_at | 2 (0, 1) |" in page
    assert "- PGD-20: step_fraction 0.25, loss ce, steps 20" in page and "the first 6 examples" in page
    assert "No eps sweep (`--no-sweep`)" in page and "attacks in fp32 (no autocast)" in page
    assert "| recipe | eps" not in page  # no sweep table without a sweep
    eval_md = (first / "eval.md").read_text()
    assert "the large-eps check did not run" in eval_md and "falls to ~0" not in eval_md
    assert f"python recipes/results.py {argv[0]}" in page
    assert f"python recipes/pgd_at.py --eps {EPS} --seed 1 --output-dir {second}" in page
    assert "![clean against worst-case accuracy](results_scatter.png)" in page
    assert (output.parent / "results_scatter.png").read_bytes()[:8] == PNG_MAGIC

    # New weights in the second run: only it is evaluated again; the first run's eval.json is current.
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in load_model(second).state_dict().items()}
    atomic_save_weights(weights, second / "model.safetensors")
    attacked.clear()
    results.main(argv)
    assert len(attacked) == 1
    sha = [json.loads((run / "eval.json").read_text())["run"]["weights_sha256"] for run in (first, second)]
    assert sha[0] != sha[1]

    # Folders moved elsewhere keep their current reports, and the page names where they are now.
    moved = [shutil.copytree(run, tmp_path / "moved" / run.name) for run in (first, second)]
    attacked.clear()
    page = results.main([str(moved[0]), str(moved[1]), *argv[2:]])
    assert not attacked and str(moved[1]) in page


def test_results_report_name_keeps_eval_json(run_dir, tmp_path, monkeypatch):
    run = _copy_run(run_dir, tmp_path / "pgd_at-digits-seed0", 0)
    before = (run / "eval.json").read_bytes() if (run / "eval.json").exists() else None
    argv = [str(run), "--output", str(tmp_path / "sweep.md"), "--attacks", "pgd20", "--n-examples", "4"]
    argv += ["--batch-size", "4", "--sweep-eps", "0", str(EPS), "--no-progress", "--no-plots"]
    page = load_recipe("results").main([*argv, "--report-name", "eval_sweep.json", "--title", "Results: eps sweep"])
    assert page.startswith("# Results: eps sweep\n") and "their eval_sweep.json; do not edit" in page
    assert json.loads((run / "eval_sweep.json").read_text())["eps_sweep"]["eps"] == [0.0, EPS]
    assert ((run / "eval.json").read_bytes() if (run / "eval.json").exists() else None) == before
    assert "Eps sweep (table below; per run in its Markdown report next to the JSON one): 0, " in page
    sweep = json.loads((run / "eval_sweep.json").read_text())["eps_sweep"]["worst_case"]
    row = "| pgd_at | " + " | ".join(f"{100 * acc:.2f}" for acc in sweep) + " |"
    assert f"| recipe | eps 0 | eps {EPS:.4g} |" in page and row in page
    with pytest.raises(SystemExit):
        load_recipe("results").main([*argv, "--report-name", "../eval.json"])


def test_results_refuses_runs_that_cannot_share_a_row(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_model", _must_not_run)
    other = _copy_run(run_dir, tmp_path / "other", seed=0)
    with pytest.raises(SystemExit):
        load_recipe("results").main([str(run_dir), str(other), "--output", str(tmp_path / "r.md")])
    assert "are both pgd_at on digits with seed 0" in capsys.readouterr().err
    config = json.loads((_copy_run(run_dir, tmp_path / "seed1", seed=1) / "config.json").read_text())
    config["flags"]["lr"] = 0.5
    atomic_write_json(tmp_path / "seed1" / "config.json", config)
    with pytest.raises(SystemExit):
        load_recipe("results").main([str(run_dir), str(tmp_path / "seed1"), "--output", str(tmp_path / "r.md")])
    assert "differ in ['lr'], not only the seed" in capsys.readouterr().err


def _as_recipe(folder: Path, recipe: str, seed: int, device: str | None = None) -> Path:
    """The run folder relabelled as a run of another recipe and seed (the flags stay pgd_at's, but for the
    attack's BatchNorm mode: the other recipe's default)."""
    config = json.loads((folder / "config.json").read_text())
    config["recipe"] = config["flags"]["recipe"] = recipe
    config["flags"]["attack_bn_mode"] = load_recipe("results")._default_attack_bn_mode(config["flags"])
    config["seed"] = config["flags"]["seed"] = seed
    if device is not None:
        config["device"] = device
    atomic_write_json(folder / "config.json", config)
    return folder


def test_results_full_split_evaluation_and_paired_statistics(run_dir, tmp_path, monkeypatch):
    reference = [_copy_run(run_dir, tmp_path / f"pgd_at-seed{seed}", seed) for seed in (0, 1)]
    other = [
        _as_recipe(_make_run(tmp_path / f"trades-seed{seed}", seed=10 + seed, steps=40), "trades", seed, "cpu (test)")
        for seed in (0, 1)
    ]
    for attack in CHEAP[:3]:  # PGD-20 with 5 steps: the whole split in a few seconds
        monkeypatch.setitem(ATTACKS, attack.name, attack)
    output = tmp_path / "docs" / "results.md"
    argv = [*map(str, reference + other), "--output", str(output), "--attacks", "pgd20", "cw", "--n-examples", "12"]
    argv += ["--batch-size", "120", "--no-sweep", "--no-progress", "--no-plots", "--full-split-attacks", "pgd20"]
    page = load_recipe("results").main(argv)

    main = {run.name: json.loads((run / "eval.json").read_text()) for run in reference + other}
    full = {run.name: json.loads((run / "eval_full_split.json").read_text()) for run in reference + other}
    settings = full["trades-seed1"]["settings"]
    assert [attack["name"] for attack in settings["attacks"]] == ["pgd20"]
    assert (settings["n_examples"], settings["eps_sweep"]["eps"], settings["batch_size"]) == (None, [], 120)
    assert full["trades-seed1"]["results"]["n"] == 360 and main["trades-seed1"]["results"]["n"] == 12
    assert "Evaluation: the first 12 examples of the test split" in page
    assert (
        'Second evaluation (`eval_full_split.json`, the columns marked "all 360"): all 360 examples of the test'
        in page
    )
    assert "| worst case | clean (all 360) | PGD-20 (all 360) | flags |" in page

    numbers = json.loads(output.with_suffix(".json").read_text())
    assert numbers["reference"] == "pgd_at"
    assert numbers["report_names"] == {"main": "eval.json", "full_split": "eval_full_split.json"}
    digits = numbers["datasets"]["digits"]
    assert (digits["evaluations"]["main"]["n"], digits["evaluations"]["full_split"]["n"]) == (12, 360)
    trades = digits["recipes"]["trades"]
    assert [(run["seed"], run["device"]) for run in trades["runs"]] == [(0, "cpu (test)"), (1, "cpu (test)")]
    assert trades["runs"][1]["run_dir"] == str(other[1])
    assert trades["runs"][1]["accuracy"]["full_split"]["pgd20"] == 100 * full["trades-seed1"]["results"]["worst_case"]
    difference = trades["difference"]["full_split"]["pgd20"]
    expected = [
        100 * (full[f"trades-seed{s}"]["results"]["worst_case"] - full[f"pgd_at-seed{s}"]["results"]["worst_case"])
        for s in (0, 1)
    ]
    assert difference["per_seed"] == pytest.approx(expected)
    counts = [
        discordant_pairs(
            *(per_example_results(full[f"{r}-seed{s}"])["standalone"]["pgd20"] for r in ("pgd_at", "trades"))
        )
        for s in (0, 1)
    ]
    b, c = counts[0][0] + counts[1][0], counts[0][1] + counts[1][1]
    assert difference["mcnemar"]["pooled"] == {"b": b, "c": c, "p": mcnemar_exact(b, c)}
    assert b + c > 0  # two differently trained models disagree somewhere on 360 images
    words = f"PGD-20 (all 360) {difference['mean']:+.2f} [{difference['low']:.2f}, {difference['high']:.2f}] points"
    line = next(line for line in page.splitlines() if line.startswith("- trades (seeds 0, 1): clean "))
    assert words in line and difference["verdict"] in line

    # Both reports of every run are current: nothing is evaluated again.
    monkeypatch.setattr(evaluate, "worst_case", _must_not_run)
    again = load_recipe("results").main(argv)
    assert [line for line in again.splitlines() if not line.startswith("Generated")] == [
        line for line in page.splitlines() if not line.startswith("Generated")
    ]


def test_results_from_archived_runs_without_weights(run_dir, tmp_path, monkeypatch):
    runs = [_copy_run(run_dir, tmp_path / "runs" / f"pgd_at-seed{seed}", seed) for seed in (0, 1)]
    monkeypatch.setitem(ATTACKS, CHEAP[0].name, CHEAP[0])
    flags = ["--attacks", "pgd20", "--n-examples", "12", "--batch-size", "120", "--no-sweep", "--no-progress"]
    flags += ["--no-plots", "--full-split-attacks", "pgd20"]
    page = load_recipe("results").main([*map(str, runs), "--output", str(tmp_path / "a.md"), *flags])
    archived = []
    for run in runs:  # what compare.py --archive keeps: no weights, no checkpoints
        target = tmp_path / "archive" / run.name
        target.mkdir(parents=True)
        for name in ("config.json", "metrics.json", "eval.json", "eval_full_split.json"):
            if (run / name).exists():
                shutil.copy2(run / name, target / name)
        archived.append(target)
    monkeypatch.setattr(evaluate, "worst_case", _must_not_run)
    rebuilt = load_recipe("results").main(
        [*map(str, archived), "--output", str(tmp_path / "b.md"), "--stored", *flags]
    )

    def same(text):
        return [line for line in text.splitlines() if not line.startswith(("Generated", "python recipes/results"))]

    assert same(rebuilt) == same(page)
    with pytest.raises(SystemExit):  # other settings than the stored report's: an error, never a silent mix
        load_recipe("results").main(
            [*map(str, archived), "--output", str(tmp_path / "c.md"), "--stored", *flags[:3], "24", *flags[4:]]
        )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--reference", "trades"], "no run of the --reference recipe 'trades'"),
        (["--output", "results.json"], "--output must be a Markdown file"),
        (["--full-split-attacks", "fgsm"], "invalid choice: 'fgsm'"),
    ],
)
def test_results_rejects_bad_statistics_flags(flags, message, run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_model", _must_not_run)
    with pytest.raises(SystemExit):
        load_recipe("results").main([str(run_dir), "--output", str(tmp_path / "r.md"), *flags])
    assert message in capsys.readouterr().err


def test_results_page_says_what_the_runs_trained_with():
    environment = load_recipe("results").training_environment
    config = {"versions": {"torch": "2.9", "python": "3.12"}, "num_processes": 2, "device": "NVIDIA H100"}
    assert environment(config) == "torch 2.9, Python 3.12 on 2 process(es), NVIDIA H100"
    older = environment({"versions": {"torch": "2.9"}})
    assert older == "torch 2.9 on 1 process(es) (the run did not record its device)"
    assert environment({}) == ""


def test_results_takes_a_flag_an_older_run_lacks_as_its_default(run_dir, tmp_path, monkeypatch):
    older, newer = (_copy_run(run_dir, tmp_path / f"seed{seed}", seed) for seed in (0, 1))
    config = json.loads((older / "config.json").read_text())
    assert config["flags"].pop("on_nonfinite") == "raise"  # a run made before the flag existed
    atomic_write_json(older / "config.json", config)
    argv = [str(older), str(newer), "--output", str(tmp_path / "r.md"), "--attacks", "pgd20", "--n-examples", "2"]
    page = load_recipe("results").main([*argv, "--no-sweep", "--no-progress", "--no-plots"])
    assert "| pgd_at | 2 (0, 1) |" in page
    config["flags"]["on_nonfinite"] = "skip"  # a real difference still stops it
    atomic_write_json(older / "config.json", config)
    with pytest.raises(SystemExit):
        load_recipe("results").main(argv)


@pytest.mark.slow
def test_a_real_recipe_run_evaluates_with_the_full_suite(tmp_path):
    folder = tmp_path / "run"
    load_recipe("pgd_at").main(["--max-steps", "2", "--epochs", "1", "--output-dir", str(folder)])
    report = load_recipe("evaluate").main(["--run-dir", str(folder), "--n-examples", "32", "--no-progress"])
    assert report["settings"]["attacks"][4]["settings"]["n_target_classes"] == 9
    assert report["results"]["n"] == 32 and (folder / "eval.md").is_file()


def test_readings_of_one_recipe_get_rows_of_their_own():
    results = load_recipe("results")
    parser = results._recipe_parser("adalab")
    default = {"flags": vars(parser.parse_args([]))}
    floor = {"flags": vars(parser.parse_args(["--target", "floor", "--no-aa-project", "--aa-steps", "5"]))}
    assert results.row_name(default) == "adalab"
    assert results.row_name(floor) == "adalab --aa-steps 5 --no-aa-project --target floor"
    older = {"flags": {k: v for k, v in default["flags"].items() if k != "target"}}  # predates --target
    assert results.row_name(older) == "adalab"
    shared = {"flags": vars(parser.parse_args(["--lr", "0.5"]))}  # shared flags never name a row: they must agree
    assert results.row_name(shared) == "adalab"


def test_values_a_recipe_fills_in_itself_name_no_row():
    # AWP records the gamma and warm-up its --base implies (DEFAULTS): the release's values are its default.
    results = load_recipe("results")
    parser = results._recipe_parser("awp")

    def config(*argv):
        return {"flags": vars(parse_args(results._recipe_parser("awp"), list(argv), load_recipe("awp").DEFAULTS))}

    assert config()["flags"]["gamma"] == 0.01 and results.row_name(config()) == "awp"
    assert results.row_name(config("--base", "trades", "--epochs", "40")) == "awp --base trades"
    assert results.row_name(config("--gamma", "0.02")) == "awp --gamma 0.02"
    assert results.row_name(config("--warmup-epochs", "2")) == "awp --warmup-epochs 2"
    assert parser.get_default("gamma") is None  # so without DEFAULTS the recorded 0.01 would name the row


def test_runs_from_before_a_default_changed_keep_their_reading():
    # Until --weighting mail became ADA-Lab's default, every run recorded its weighting and c = 5 (used or not).
    results = load_recipe("results")
    parser = results._recipe_parser("adalab")
    first = {"flags": {**vars(parser.parse_args(["--weighting", "adalab"])), "importance_c": 5.0}}
    mail = {"flags": {**vars(parser.parse_args(["--weighting", "mail"])), "importance_c": 5.0}}
    sharper = {"flags": {**vars(parser.parse_args(["--weighting", "adalab"])), "importance_c": 8.0}}
    assert results.row_name(first) == "adalab --weighting adalab"
    assert results.row_name(mail) == "adalab"
    assert results.row_name(sharper) == "adalab --weighting adalab --importance-c 8.0"


def test_an_attack_bn_mode_other_than_the_releases_names_the_row():
    results = load_recipe("results")

    def config(recipe, *argv, callbacks=()):
        return {"flags": vars(results._recipe_parser(recipe).parse_args(list(argv))), "callbacks": list(callbacks)}

    # The recipe's default (eval; FGSM-RS: train under wong, eval under shared; under cifar10-paper the
    # release's: PGD-AT train) names nothing.
    assert results.row_name(config("pgd_at", "--attack-bn-mode", "eval")) == "pgd_at"
    assert results.row_name(config("pgd_at", "--attack-bn-mode", "train")) == "pgd_at --attack-bn-mode train"
    paper = config("pgd_at", "--preset", "cifar10-paper", "--attack-bn-mode", "train")
    assert results.row_name(paper) == "pgd_at"
    assert results.row_name(config("trades", "--attack-bn-mode", "eval")) == "trades"
    assert results.row_name(config("trades", "--attack-bn-mode", "train")) == "trades --attack-bn-mode train"
    shared = config("fgsm_rs", "--protocol", "shared", "--attack-bn-mode", "eval")
    assert results.row_name(shared) == "fgsm_rs --protocol shared"
    # A run that predates the flag: its attack callback's recorded bn_mode decides.
    older = config("pgd_at", callbacks=["PGDAttack(eps=0.1, steps=5, bn_mode='train')", "AdversarialCE()"])
    del older["flags"]["attack_bn_mode"]
    assert results.attack_bn_mode(older) == "train"
    assert results.row_name(older) == "pgd_at --attack-bn-mode train"


def test_attack_cost_counts_nominal_passes_per_example():
    assert evaluate.attack_cost("pgd20") == 20 and evaluate.attack_cost("apgd-ce") == 100
    assert evaluate.attack_cost("apgd-t") == evaluate.attack_cost("fab-t") == 900  # 100 steps x 9 targets
    assert evaluate.attack_cost("square") == pytest.approx(5000 / 3)  # forward-only queries
    assert evaluate.attack_cost(with_budget("apgd-ce", steps=5)) == 5


def test_worst_case_calls_after_attack_once_per_attack_in_order(run_dir):
    x, y = load_dataset("digits", "test").tensors()
    seen = []
    evaluate.worst_case(load_model(run_dir), x[:8], y[:8], CHEAP[:3], eps=EPS, after_attack=seen.append)
    assert seen == CHEAP[:3]


class _Bar:
    """tqdm's part that evaluate_run uses, recording what it is told."""

    made: ClassVar[list[_Bar]] = []

    def __init__(self, total, **kwargs):
        self.total, self.done, self.postfix = total, 0, []
        _Bar.made.append(self)

    def update(self, n=1):
        self.done += n

    def set_postfix_str(self, text):
        self.postfix.append(text)

    def close(self):
        pass


def test_progress_advances_by_attack_cost_to_its_total(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "tqdm", _Bar)
    _Bar.made.clear()
    evaluate_run(run_dir, **{**SMALL, "n_examples": 10}, output=tmp_path / "e.json", plots=False)
    (bar,) = _Bar.made
    # 10 examples in chunks of 6 and 4; the main attacks once, the sweep's at its one eps > 0 below 0.8 and at 0.8.
    passes = [*CHEAP, *SWEEP, *SWEEP]
    assert bar.total == bar.done == sum(round(evaluate.attack_cost(a) * size) for size in (6, 4) for a in passes)
    assert bar.postfix[0] == "PGD-20 at eps 0.02, examples 0-5" and bar.postfix[-1].endswith("examples 6-9")


def test_quick_evaluation_is_a_first_look_beside_the_full_report(run_dir, tmp_path, monkeypatch):
    run = _copy_run(run_dir, tmp_path / "run", seed=0)
    full = run / "eval.json"
    full.write_text('{"kept": true}')
    monkeypatch.setitem(ATTACKS, "apgd-ce", with_budget("apgd-ce", steps=3))
    monkeypatch.setitem(ATTACKS, "pgd20", with_budget("pgd20", steps=3))
    report = load_recipe("evaluate").main(["--run-dir", str(run), "--quick", "--no-progress", "--no-plots"])
    assert [a["name"] for a in report["settings"]["attacks"]] == ["pgd20", "apgd-ce"]
    assert report["settings"]["eps_sweep"]["eps"] == [] and report["results"]["n"] == 360  # digits: all 360 < 500
    assert json.loads((run / "eval_quick.json").read_text()) == report
    assert full.read_text() == '{"kept": true}'  # the full report is never overwritten
    report = load_recipe("evaluate").main(
        ["--run-dir", str(run), "--quick", "--n-examples", "6", "--attacks", "pgd20", "--no-progress", "--no-plots"]
    )
    assert report["results"]["n"] == 6 and report["results"]["attacks"] == ["pgd20"]


def test_a_derived_default_recorded_by_the_run_names_nothing():
    """CAAT records the meta-set size it derived (6% of the training split): that run ran with the default."""
    results = load_recipe("results")
    parser = results._recipe_parser("caat")
    derived = {"flags": vars(parser.parse_args(["--train-size", "1000", "--meta-size", "60"]))}
    chosen = {"flags": vars(parser.parse_args(["--train-size", "1000", "--meta-size", "59"]))}
    assert results.row_name(derived) == "caat"
    assert results.row_name(chosen) == "caat --meta-size 59"


class _Crash(Exception):
    pass


def test_an_interrupted_evaluation_continues_from_the_chunks_it_finished(report, run_dir, tmp_path, monkeypatch):
    # SMALL: 12 examples in 2 chunks of 6; each chunk calls worst_case 3 times (the suite, then 2 sweep radii).
    calls = []
    real = evaluate.worst_case

    def crashing(*args, **kwargs):
        calls.append(kwargs["seed"])
        if crash_at is not None and len(calls) == crash_at:
            raise _Crash("the machine went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "worst_case", crashing)
    output = tmp_path / "eval.json"
    crash_at = 4  # chunk 1's suite: chunk 0 is finished
    with pytest.raises(_Crash):
        evaluate_run(run_dir, output=output, progress=False, **SMALL)
    kept = tmp_path / "eval_chunks"
    assert [p.name for p in kept.iterdir()] == ["chunk_00000.json"] and not output.exists()
    assert json.loads((kept / "chunk_00000.json").read_text())["made_by"]["weights_sha256"]  # plain JSON
    calls.clear()
    crash_at = None
    resumed = evaluate_run(run_dir, output=output, progress=False, **SMALL)
    assert calls == [1, 1, 1]  # only chunk 1 (seed 0 + 1) was attacked again
    assert resumed["results"] == report["results"] and resumed["margins"] == report["margins"]
    assert resumed["eps_sweep"] == report["eps_sweep"]
    assert not kept.exists()  # the report holds the chunks now


@pytest.mark.parametrize("spoil", ["garbage", "other weights", "missing attack", "short"])
def test_a_spoilt_or_foreign_kept_chunk_is_evaluated_again(spoil, report, run_dir, tmp_path, monkeypatch):
    from robustmix.evaluation import chunks

    saved = []
    monkeypatch.setattr(chunks, "remove_chunks", lambda folder: saved.extend(sorted(folder.iterdir())))
    output = tmp_path / "eval.json"
    evaluate_run(run_dir, output=output, progress=False, **SMALL)  # keeps its chunks (removal patched out)
    path = saved[0]
    stored = json.loads(path.read_text())
    if spoil == "garbage":
        path.write_text('{"format": 1, "chunk": 0, "made_by": ')
    elif spoil == "other weights":
        stored["made_by"]["weights_sha256"] = "0" * 64
    elif spoil == "missing attack":
        stored["attacked"]["pairs"].pop()
    else:
        stored["per_example"]["pairs"][0][1]["n"] = 5  # correct: 5 of the chunk's 6 examples
    if spoil != "garbage":
        path.write_text(json.dumps(stored))
    calls = []
    real = evaluate.worst_case
    monkeypatch.setattr(evaluate, "worst_case", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k))
    again = evaluate_run(run_dir, output=output, progress=False, **SMALL)
    assert calls == [0, 0, 0]  # chunk 0 attacked again, chunk 1 taken from its file
    assert again["results"] == report["results"]
