"""The benchmark script runs end to end on the CPU and reports what it measured (no timing is asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def throughput():
    sys.path.insert(0, str(BENCHMARKS))
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        import throughput

        yield throughput
    finally:
        sys.path.remove(str(BENCHMARKS))
        torch.set_num_threads(threads)  # main() sets its own thread count and seeds
        torch.set_rng_state(rng)


def test_a_tiny_run_counts_passes_and_matches_the_hand_written_loss(throughput, capsys) -> None:
    argv = ["--methods", "pgd_at,adalab", "--repeats", "1", "--warmup", "0", "--batch-size", "4",
            "--attack-steps", "2", "--device", "cpu"]  # fmt: skip
    result = throughput.main(argv)
    printed = capsys.readouterr().out
    for name in ("pgd_at", "adalab"):
        row = result["methods"][name]
        assert tuple(row["passes_rm"]) == tuple(row["passes_theory"])
        assert row["loss_abs_diff"] == 0.0
        assert row["host_reads_rm"] == 1  # the step's input check, nothing in the attack loop
    verdicts = {t["target"]: t["verdict"] for t in result["targets"]}
    assert verdicts["no host read inside the attack loop (equal counts at K and 2K steps; any device)"] == "PASS"
    gpu_only = [t for t in result["targets"] if t["measured"].startswith("not measured: GPU only")]
    assert gpu_only and all(t["verdict"] == "-" for t in gpu_only)  # said, not claimed
    assert "PASS  pgd_at passes counted" in printed


def test_strict_fp32_turns_tf32_off_inside_the_block_and_restores_the_flags(throughput) -> None:
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with throughput.strict_fp32():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with pytest.raises(RuntimeError), throughput.strict_fp32():
        raise RuntimeError("boom")
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_strict_fp32_uses_the_older_flags_where_torch_lacks_fp32_precision(throughput, monkeypatch) -> None:
    from types import SimpleNamespace

    new_api = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = [flags.fp32_precision for flags in new_api]
    monkeypatch.setattr(torch.backends.cudnn, "conv", SimpleNamespace())  # as before torch 2.9
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with throughput.strict_fp32():
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    monkeypatch.undo()
    for flags, value in zip(new_api, saved):  # the legacy setters rewrite the new flags: leave them as found
        flags.fp32_precision = value
    assert [flags.fp32_precision for flags in new_api] == saved


def test_the_fast_path_runs_side_by_side_and_counts_the_same_flops(throughput, capsys) -> None:
    torch._dynamo.reset()
    argv = ["--methods", "pgd_at,trades", "--repeats", "1", "--warmup", "1", "--batch-size", "4", "--attack-steps",
            "2", "--device", "cpu", "--fast", "--fast-backend", "aot_eager"]  # fmt: skip
    result = throughput.main(argv)
    printed = capsys.readouterr().out
    for row in result["methods"].values():
        assert row["loss_abs_diff_fast"] == 0.0 and tuple(row["passes_fast"]) == tuple(row["passes_rm"])
        assert row["flops_rm"] == row["flops_hw"] > 0  # the same passes, the same FLOPs
        assert row["fast_img_s"] > 0 and row["peak_tflops"] is None and row["fast_peak_fraction"] is None
    assert result["compiles_during_timing"] == 0 and result["graph_breaks"] == 0
    assert "fast = robustmix fast path" in printed and "peak: unknown for this device (CPU): FLOP/s only." in printed
    torch._dynamo.reset()


def test_the_peak_table_matches_device_names_in_order(throughput, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert throughput.peak_tflops(torch.device("cuda"), "bf16") == 756.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert throughput.peak_tflops(torch.device("cuda"), "bf16") == 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert throughput.peak_tflops(torch.device("cuda"), "bf16") is None
    assert throughput.peak_tflops(torch.device("cpu"), "fp32") is None


def test_fast_equivalence_trains_both_ways_and_states_its_tolerance(throughput, capsys) -> None:
    import fast_equivalence  # benchmarks/ is on the path through the throughput fixture

    torch._dynamo.reset()
    result = fast_equivalence.main(["--steps", "10", "--batch-size", "32", "--device", "cpu"])
    printed = capsys.readouterr().out
    # On a CPU eager runs are deterministic and the aot_eager graph computes what eager does: bitwise the same numbers.
    assert result["within"] and set(result["fast_vs_eager"].values()) == {0.0}
    assert set(result["eager_vs_eager"].values()) == {0.0}
    assert len(result["runs"]["fast"]["losses"]) == 10
    assert "tolerance: clean_acc <= 2" in printed and "PASS fast path trains like the eager path" in printed
    torch._dynamo.reset()


def test_memory_format_compares_both_formats_on_the_same_examples(throughput, capsys) -> None:
    import memory_format  # benchmarks/ is on the path through the throughput fixture

    result = memory_format.main(["--dataset", "digits", "--batch-size", "8", "--train-batch-size", "8",
                                 "--repeats", "1", "--n-examples", "10", "--suite-chunk", "4",
                                 "--attacks", "pgd20", "square"])  # fmt: skip
    printed = capsys.readouterr().out
    assert set(result["passes"]) == {"forward", "input grad", "train step"}
    assert all(row["speedup"] > 0 for row in result["passes"].values())
    suite = result["suite"]
    assert suite["n_examples"] == 10 and set(suite["accuracies"]) == {"clean", "worst case", "pgd20", "square"}
    # The same weights in either layout: the clean decisions cannot differ.
    assert suite["accuracies"]["clean"]["examples_judged_differently"] == 0
    assert result["max_logit_difference"] < 1e-4
    assert "judged differently" in printed and "speed-up" in printed


def test_fashion_mnist_status_lists_what_each_run_has(tmp_path) -> None:
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(BENCHMARKS / "fashion_mnist.sh", tmp_path / "benchmarks")
    runs, archive = tmp_path / "runs" / "fashion-mnist", tmp_path / "benchmarks" / "runs" / "fashion-mnist"
    for name, files in {
        "pgd_at-seed0": ["metrics.json", "eval.json", "eval_full_split.json"],
        "mart-seed1": ["metrics.json", "eval_chunks/chunk_00000.json", "eval_chunks/chunk_00001.json"],
    }.items():
        for file in files:
            (runs / name / file).parent.mkdir(parents=True, exist_ok=True)
            (runs / name / file).write_text("{}")
    (archive / "pgd_at-seed0").mkdir(parents=True)
    (archive / "pgd_at-seed0" / "config.json").write_text("{}")
    printed = subprocess.run(
        ["bash", str(tmp_path / "benchmarks" / "fashion_mnist.sh"), "status"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines()[1:]}
    assert len(rows) == 33
    assert rows["pgd_at-seed0"] == ["yes", "yes", "yes", "config.json"]
    assert rows["mart-seed1"] == ["yes", "2/8", "chunks", "-", "-"]
    assert rows["adalab-seed2"] == ["-", "-", "-", "-"]


def _summary_table():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import summary_table
    finally:
        sys.path.remove(str(BENCHMARKS))
    return summary_table


def test_summary_table_sorts_by_worst_case_and_bolds_what_is_beyond_noise() -> None:
    module = _summary_table()

    def recipe(worst: float, difference: dict | None) -> dict:
        accuracies = {"clean": 80.0, "pgd20": 70.0, "worst_case": worst}
        return {
            "runs": [{"seed": 1}, {"seed": 0}],
            "mean": {"main": accuracies},
            "std": {"main": dict.fromkeys(accuracies, 0.5)},
            "difference": {"main": dict.fromkeys(("clean", "worst_case"), difference)} if difference else {},
        }

    beyond = {
        "mean": -2.0,
        "low": -3.0,
        "high": -1.0,
        "mcnemar": {"pooled": {"p": 1e-6}},
        "verdict": "beyond noise (worse)",
    }
    within = {"mean": 0.5, "low": -1.25, "high": 2.25, "mcnemar": {"pooled": {"p": 0.3}}, "verdict": "within noise"}
    page = {"datasets": {"d": {"reference": "ref", "recipes": {
        "low": recipe(50.0, beyond), "ref": recipe(60.0, None), "high": recipe(70.0, within)}}}}  # fmt: skip
    lines = module.table(page).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| `ref`", "| `high`", "| `low`"]
    assert lines[2].endswith("| 0, 1 | 80.00 ± 0.50 | 70.00 ± 0.50 | 60.00 ± 0.50 |  |  |")
    assert lines[3].endswith("| +0.50 [-1.25, +2.25], p 0.3 | +0.50 [-1.25, +2.25], p 0.3 |")
    assert lines[4].endswith("| **-2.00 [-3.00, -1.00], p < 0.0001** | **-2.00 [-3.00, -1.00], p < 0.0001** |")


@pytest.mark.parametrize("page", ["results_fashion_mnist.json", "results_fashion_mnist_full_split.json"])
def test_the_readme_quotes_the_fashion_mnist_tables_as_the_pages_have_them(page) -> None:
    root = BENCHMARKS.parent
    readme = (root / "recipes" / "README.md").read_text()
    table = _summary_table().table(json.loads((root / "docs" / page).read_text()))
    missing = [line for line in table.splitlines() if line not in readme]
    assert not missing, (
        f"recipes/README.md lacks these rows of `python benchmarks/summary_table.py docs/{page}`: {missing}"
    )


def test_summary_table_leads_with_pgd20_where_the_evaluation_has_no_worst_case() -> None:
    accuracies = {"clean": 80.0, "pgd20": 70.0}
    recipe = {"runs": [{"seed": 0}], "mean": {"main": accuracies}, "std": {}, "difference": {}}
    lines = _summary_table().table({"reference": "a", "datasets": {"d": {"recipes": {"a": recipe}}}}).splitlines()
    assert lines[0] == "| recipe | seeds | clean | PGD-20 | clean vs `a` | PGD-20 vs `a` |"
    assert lines[2] == "| `a` | 0 | 80.00 | 70.00 |  |  |"
    with pytest.raises(SystemExit, match="no evaluation 'full_split'"):
        _summary_table().table({"datasets": {"d": {"recipes": {"a": recipe}}}}, evaluation="full_split")


@pytest.mark.parametrize(("content", "message"), [(None, "no such file"), ("{", "not a results page"),
                                                  ("[]", "no 'datasets'")])  # fmt: skip
def test_summary_table_names_a_bad_page_in_one_line(tmp_path, capsys, content, message) -> None:
    path = tmp_path / "page.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit):
        _summary_table().main([str(path)])
    assert message in capsys.readouterr().err
