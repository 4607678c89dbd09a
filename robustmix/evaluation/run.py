"""Evaluating a training run's folder: its model on exactly its data split, with every setting in the report.

``evaluate_run`` runs ``robustmix.evaluation.worstcase.worst_case`` over the run's split, on one process or many,
then an eps sweep, and writes a report (``eval.json`` with every setting, ``eval.md``, plots; see
``robustmix.evaluation.report``). ``check_run`` checks a run folder without loading its weights.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm

from robustmix.attacks.pgd import check_eps
from robustmix.checks import check_choice, check_int, check_number, is_integer, is_number
from robustmix.core.step import MIXED_PRECISION
from robustmix.data import SPLITS, ImageDataset, load_split
from robustmix.evaluation import chunks
from robustmix.evaluation import report as reports
from robustmix.evaluation.attacks import (
    DEFAULT_ATTACKS,
    NORM,
    SWEEP_ATTACKS,
    AttackSpec,
    attack_cost,
    attack_settings,
    get_attack,
)
from robustmix.evaluation.worstcase import combination_name, sanity_flags, worst_case
from robustmix.runs.checkpoint import atomic_write_json, atomic_write_text, file_sha256
from robustmix.runs.environment import device_name, versions
from robustmix.runs.folder import CONFIG_FILE, WEIGHTS, load_config, load_model, missing_weights, read_json
from robustmix.training.distributed import destroy_process_group_at_exit
from robustmix.version import __version__

#: The default eps sweep in multiples of the evaluation eps (capped at 1). At 4x and 8x a working attack
#: breaks (nearly) every image, which ``sanity_flags`` checks.
SWEEP_MULTIPLES = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Default file name of the report in a run folder; the Markdown table and the plots are written next to it.
EVAL_FILE = "eval.json"
#: The model's memory format during an evaluation: ``auto`` is channels_last on a CPU and contiguous elsewhere.
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def evaluate_run(
    run_dir: str | Path,
    *,
    attacks: Sequence[str | AttackSpec] = DEFAULT_ATTACKS,
    eps: float | None = None,
    n_examples: int | None = None,
    split: str = "test",
    weights: Literal["final", "best", "ema"] = "final",
    batch_size: int = 256,
    seed: int = 0,
    mixed_precision: str = "no",
    memory_format: str = "auto",
    sweep_eps: Sequence[float] | None = None,
    sweep_attacks: Sequence[str | AttackSpec] | None = None,
    output: str | Path | None = None,
    plots: bool = True,
    reuse: bool = False,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    stored: bool = False,
) -> dict[str, Any]:
    """Evaluate a training run's model on exactly its data split and write the report; call it on every process.

    Loads the ``weights`` of ``run_dir`` and the ``split`` its config.json describes (dataset, local path,
    validation hold-out seed), keeps the first ``n_examples``, and runs ``worst_case`` with
    ``standalone=True`` (every attack on every clean-correct example, so each attack's own accuracy is known)
    and PGD loss traces; then the eps sweep: ``sweep_attacks`` at every eps of ``sweep_eps``. Every
    robust/not-robust decision is made by the fp32 model in eval mode, also when the attacks run under
    ``mixed_precision`` autocast.

    The examples are cut into chunks of ``batch_size`` consecutive examples and chunk ``c`` seeds its attacks
    with ``seed + c``. Under ``accelerate launch`` each process takes a contiguous range of chunks and the
    per-example results are gathered with ``accelerator.gather_for_metrics``, every example once; since a
    chunk's numbers do not depend on where it runs, any number of processes gives the numbers of one (bit for
    bit on the same hardware). Keep ``batch_size`` at most ``n_examples / num_processes`` so that every
    process has work. Each finished chunk is kept on disk until the report is written (``<output stem>_chunks/``,
    ``robustmix.evaluation.chunks``): an evaluation interrupted by a crash or a lost machine continues, when run
    again with the same settings on the same weights, device and memory format, from the chunks it finished.

    The main process writes ``output`` atomically (JSON: every setting, the results, ``sanity_flags``),
    the Markdown table ``eval.md`` next to it and, with ``plots``, two PNGs: robust accuracy against eps
    (``eval_eps_sweep.png``) and the probability margins of the clean and the worst-case points
    (``eval_margins.png``). It prints a summary and, when a sanity check fails, a WARNING block (stderr).

    Args:
        run_dir: A training run's folder (see ``robustmix.runs.folder``).
        attacks: Names in ``ATTACKS`` or specs, run in this order.
        eps: L-inf radius in pixels in [0, 1]; defaults to the eps the run trained with.
        n_examples: Evaluate the first this many examples of the split; defaults to all of them.
        split: "test", "validation" or "train", as the run's training made them.
        weights: "final", "best" (the checkpoint chosen on validation PGD accuracy) or "ema" (the moving average
            of the weights of a run trained with ``--ema``).
        batch_size: Examples per chunk and per attack call.
        seed: Seed of the attacks' randomness (see above).
        mixed_precision: "no", "bf16" or "fp16": the autocast of the attacks' forwards and backwards.
        memory_format: The model's weights (and with them its activations) in "contiguous" or "channels_last"
            memory format; "auto" is channels_last on a CPU, where oneDNN's convolutions run faster that way
            (the evaluation suite 1.44x on a trained Fashion-MNIST model, ``benchmarks/memory_format.py``), and
            contiguous elsewhere. Not a setting of the protocol: the two formats give the same logits up to float
            rounding, and the report records the format used under ``"environment"``.
        sweep_eps: Radii of the eps sweep in pixels; defaults to ``SWEEP_MULTIPLES`` of ``eps``, capped at
            1; empty skips the sweep. At eps 0 every accuracy is the clean one and no attack runs.
        sweep_attacks: Attacks of the sweep; defaults to ``SWEEP_ATTACKS`` (cheaper budgets).
        output: Path of the JSON report; defaults to ``eval.json`` in ``run_dir``.
        plots: Write the PNG plots (needs matplotlib).
        reuse: Return the report already at ``output``, without evaluating, when it is up to date: the same
            settings, the same weights file (SHA-256) and the same robustmix version. A report written before
            per-example results were recorded is up to date too (its numbers are the same); it only lacks
            them.
        progress: Show a progress bar on the main process.
        accelerator: Gives the device, the processes and the gather; by default one is created. Its own
            mixed precision setting is not used (``mixed_precision`` is).
        stored: Return the report at ``output`` without the weights and without evaluating: for the archived
            record of a run (config.json and its reports, weights not kept). The report must have been made
            with these settings and this robustmix version; which weights it evaluated is the SHA-256 it
            records.

    Returns:
        The report as written to ``output``: ``"settings"`` (what was run), ``"run"`` (what was evaluated),
            ``"results"`` (as ``worst_case`` returns them; the per-example results packed, clean, worst case and
            each attack alone: see ``robustmix.evaluation.report.per_example_results``), ``"eps_sweep"``
            (``"eps"``, per-attack ``"standalone"`` and ``"worst_case"`` accuracies, one per eps),
            ``"margins"`` (histograms), ``"sanity_flags"``, ``"environment"`` (versions, device, processes,
            date) and ``"files"`` (names of the table and plots next to ``output``).

    Raises:
        FileNotFoundError: ``run_dir``, its config.json or the weights file does not exist.
        TypeError: ``eps`` is not a number.
        ValueError: An unknown attack, split or precision; eps outside [0, 1]; ``n_examples`` below 1 or
            above the size of the split; all checked before any attack runs.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if stored:
        config = load_config(run_dir)
        _check_run_config(config, run_dir / CONFIG_FILE)
    else:
        config, weights_file = check_run(run_dir, weights)
    specs = _resolve(attacks, "attacks")
    sweep_specs = _resolve(SWEEP_ATTACKS if sweep_attacks is None else sweep_attacks, "sweep_attacks")
    eps = float(config["attack"]["eps"]) if eps is None else eps
    _check_run_settings(eps, n_examples, split, batch_size, seed, mixed_precision)
    check_choice("memory_format", memory_format, MEMORY_FORMATS)
    sweep = default_sweep(eps) if sweep_eps is None else sorted({float(e) for e in sweep_eps})
    for value in sweep:
        check_eps(value, name="every eps of the sweep")

    settings = {
        "split": split,
        "n_examples": n_examples,
        "weights": weights,
        "eps": float(eps),
        "norm": NORM,
        "attacks": [attack_settings(spec) for spec in specs],
        "protocol": "every attack runs on every clean-correct example (standalone); an example counts as "
        "robust when it is classified correctly clean and at the point of every attack (worst case)",
        "decisions": "fp32 (autocast off), model in eval mode",
        "eps_sweep": {"eps": sweep, "attacks": [attack_settings(spec) for spec in sweep_specs]},
        "seed": seed,
        "seeds": f"chunk c (examples c * {batch_size} to (c + 1) * {batch_size} - 1) seeds its attacks with "
        f"{seed} + c; batch j inside an attack call adds j",
        "batch_size": batch_size,
        "mixed_precision": mixed_precision,
    }
    output = run_dir / EVAL_FILE if output is None else Path(output)
    if stored:
        return _stored_report(output, settings, run_dir)
    run = {
        "run_dir": str(run_dir),
        "recipe": config.get("recipe"),
        "model": config["model"]["name"],
        "dataset": config["data"]["dataset"],
        "data_path": config["data"]["path"],
        "split_seed": config["data"]["split_seed"],
        "train_seed": config.get("seed"),
        "train_eps": config["attack"]["eps"],
        "total_steps": config.get("total_steps"),
        "steps_per_epoch": config.get("steps_per_epoch"),
        "num_processes": config.get("num_processes"),
        "flags": config.get("flags"),
        "versions": config.get("versions"),
        "weights_file": weights_file.relative_to(run_dir).as_posix(),
        "weights_sha256": file_sha256(weights_file),
    }
    if accelerator is None:
        accelerator = Accelerator()
        if accelerator.num_processes > 1:  # the process group is this evaluation's: it is left cleanly at exit
            destroy_process_group_at_exit()
    if reuse:
        stored = _current_report(output, settings, run["weights_sha256"])
        if stored is not None:
            # The same weights, maybe in a folder that was moved or copied since: name where they are now.
            stored["run"]["run_dir"] = run["run_dir"]
            if accelerator.is_main_process:
                _print(stored, output, "up to date, not evaluated again")
            return stored

    device = accelerator.device
    with accelerator.main_process_first():  # one process fills the dataset cache, the others read it
        data = _run_split(config, split)
    n = len(data) if n_examples is None else n_examples
    if n > len(data):
        raise ValueError(f"n_examples is {n_examples} but the {split} split of {run['dataset']} has {len(data)}")
    x, y = (t[:n] for t in data.tensors())
    model = load_model(run_dir, weights=weights).to(device)
    if memory_format == "auto":
        memory_format = "channels_last" if device.type == "cpu" else "contiguous"
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if model.num_classes != data.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes, the {split} split {data.num_classes}")

    shares = np.array_split(np.arange(math.ceil(n / batch_size)), accelerator.num_processes)
    mine = shares[accelerator.process_index].tolist()
    attacked_sweep = [value for value in sweep if value > 0]
    # The bar advances by each attack's nominal cost (attack_cost x examples), so its rate and ETA stay steady
    # from a cheap PGD-20 to a 5,000-query Square.
    chunk_sizes = {c: len(range(n)[c * batch_size : (c + 1) * batch_size]) for c in mine}
    passes = [*specs, *sweep_specs * len(attacked_sweep)]
    bar = tqdm(
        total=sum(round(attack_cost(spec) * size) for size in chunk_sizes.values() for spec in passes),
        desc=f"evaluating {run_dir.name}",
        unit="pass",
        unit_scale=True,
        disable=not (progress and accelerator.is_main_process),
    )

    def advance(spec: AttackSpec, *, eps: float, c: int) -> None:
        first, size = c * batch_size, chunk_sizes[c]
        bar.set_postfix_str(f"{spec.label} at eps {eps:.4g}, examples {first}-{first + size - 1}")
        bar.update(round(attack_cost(spec) * size))

    # An interrupted evaluation continues: the chunks it finished are on disk (robustmix.evaluation.chunks).
    kept = chunks.chunk_folder(output)
    made_by = {
        "settings": settings, "weights_sha256": run["weights_sha256"], "robustmix": __version__,
        "device": device_name(device), "memory_format": memory_format,
    }  # fmt: skip
    names, sweep_names = [spec.name for spec in specs], [spec.name for spec in sweep_specs]
    resumed = 0
    records = []
    for c in mine:
        record = chunks.load_chunk(kept, c, made_by, chunk_sizes[c], names, attacked_sweep, sweep_names)
        if record is not None:
            resumed += 1
            records.append(record)
            bar.update(sum(round(attack_cost(spec) * chunk_sizes[c]) for spec in passes))
            continue
        xc, yc = (t[c * batch_size : (c + 1) * batch_size].to(device) for t in (x, y))
        with _autocast(device, mixed_precision):
            main = worst_case(
                model, xc, yc, specs, eps=eps, batch_size=batch_size, seed=seed + c, record_loss=True,
                after_attack=functools.partial(advance, eps=eps, c=c),
            )  # fmt: skip
        swept = {}
        for value in attacked_sweep:
            with _autocast(device, mixed_precision):
                result = worst_case(
                    model, xc, yc, sweep_specs, eps=value, batch_size=batch_size, seed=seed + c,
                    after_attack=functools.partial(advance, eps=value, c=c),
                )  # fmt: skip
            swept[value] = result["per_example"]
        record = {key: main[key] for key in ("per_example", "attacked", "loss_trace")} | {"sweep": swept}
        chunks.save_chunk(kept, c, made_by, record)
        records.append(record)
    bar.close()
    if resumed:
        print(f"{run_dir}: {resumed} of {len(mine)} chunk(s) taken from {kept}, finished by an earlier evaluation")
    # Objects, not tensors: shards differ in length, and gather_object keeps the processes' order.
    records = accelerator.gather_for_metrics(records, use_gather_object=True)

    results = _combine(records, specs, eps)
    swept = _combine_sweep(records, sweep, sweep_specs)
    report = {
        "settings": settings,
        "run": run,
        "results": results,
        "eps_sweep": swept,
        "margins": _margin_histograms(records),
        "sanity_flags": sanity_flags({**results, "eps_sweep": dict(zip(sweep, swept["worst_case"]))}),
        "environment": _environment(accelerator, time.perf_counter() - started) | {"memory_format": memory_format},
        "files": reports.report_files(output, plots=plots, sweep=bool(sweep)),
    }
    report = json.loads(json.dumps(report))  # exactly what eval.json holds: lists, not tuples
    if accelerator.is_main_process:
        _write_report(report, output)
        _print(report, output, "written")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        chunks.remove_chunks(kept)  # the report holds them now
    return report


def check_run(run_dir: str | Path, weights: Literal["final", "best", "ema"] = "final") -> tuple[dict[str, Any], Path]:
    """Check that ``run_dir`` is a run folder with ``weights`` to evaluate, without loading them.

    Reads config.json and the header of the weights file (a few kilobytes), so a truncated or overwritten
    file is named here; ``load_model`` reads the tensors.

    Returns:
        The run's config (``robustmix.runs.folder.load_config``) and the path of its weights file.

    Raises:
        FileNotFoundError: The folder, its config.json or the weights file does not exist.
        ValueError: config.json is corrupted or lacks the ``data`` / ``attack`` entries evaluation reads; the
            weights file is not a complete safetensors file; ``weights`` is not "final", "best" or "ema".
    """
    run_dir = Path(run_dir)
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHTS))}, got {weights!r}")
    config = load_config(run_dir)
    _check_run_config(config, run_dir / CONFIG_FILE)
    weights_file = run_dir / WEIGHTS[weights]
    if not weights_file.is_file():
        raise missing_weights(run_dir, weights)
    try:
        with safe_open(weights_file, "pt") as weights_reader:  # validates the header against the file size
            weights_reader.keys()
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_file} is corrupted: not a readable safetensors file ({err})") from err
    return config, weights_file


def _check_run_config(config: dict[str, Any], path: Path) -> None:
    """The entries of a run's config.json that ``evaluate_run`` reads, with their types."""
    data, attack = config.get("data"), config.get("attack")
    problem = None
    if not isinstance(data, dict) or not {"dataset", "path", "split_seed"} <= set(data):
        problem = "no 'data' entry with 'dataset', 'path' and 'split_seed'"
    elif not isinstance(data["dataset"], str) or not isinstance(data["path"], (str, type(None))):
        problem = f"'data' must name the dataset and its path as strings, got {data['dataset']!r}, {data['path']!r}"
    elif not is_integer(data["split_seed"]) or data["split_seed"] < 0:
        problem = f"'data.split_seed' must be an integer >= 0, got {data['split_seed']!r}"
    elif not isinstance(attack, dict) or "eps" not in attack:
        problem = "no 'attack' entry with the training 'eps'"
    elif not is_number(attack["eps"]) or not 0 <= attack["eps"] <= 1:
        problem = f"'attack.eps' must be a number in [0, 1], got {attack['eps']!r}"
    if problem is not None:
        raise ValueError(f"{path} is corrupted: {problem}")


def default_sweep(eps: float) -> list[float]:
    """The default eps sweep around an evaluation ``eps``: ``SWEEP_MULTIPLES`` of it, capped at 1, ascending."""
    return sorted({min(multiple * eps, 1.0) for multiple in SWEEP_MULTIPLES})


def split_size(run_dir: str | Path, split: str = "test") -> int:
    """How many examples the ``split`` of a run's data has, made as in its training (``evaluate_run``'s data)."""
    config, _ = check_run(run_dir)
    return len(_run_split(config, split))


def _resolve(attacks: Sequence[str | AttackSpec], what: str) -> list[AttackSpec]:
    if isinstance(attacks, (str, AttackSpec)):
        raise ValueError(f"{what} must be a sequence of attack names or specs, got the single {attacks!r}")
    specs = [get_attack(a) if isinstance(a, str) else a for a in attacks]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} must not repeat a name, got {names}")
    return specs


def _check_run_settings(
    eps: float, n_examples: int | None, split: str, batch_size: int, seed: int, mixed_precision: str
) -> None:
    check_number("eps", eps)
    check_eps(eps)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0)
    check_int("n_examples", n_examples, 1, optional=True)
    # In load_dataset's words, and here because a stored report is returned without loading any data.
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    check_choice("mixed_precision", mixed_precision, MIXED_PRECISION)


def _run_split(config: dict[str, Any], split: str) -> ImageDataset:
    """The ``split`` of the data a run's config.json records: for ``train``, the subset a ``--train-size`` run
    trained on (``val_size``, ``test_size`` and ``train_size`` are absent in older runs)."""
    data = config["data"]
    return load_split(
        data["dataset"], split, path=data["path"], val_size=data.get("val_size"), test_size=data.get("test_size"),
        split_seed=data["split_seed"], train_size=data.get("train_size"),
    )  # fmt: skip


def _current_report(path: Path, settings: dict[str, Any], weights_sha256: str) -> dict[str, Any] | None:
    """The report at ``path`` when it was made with these settings, weights and robustmix version, else None."""
    try:
        stored = read_json(path)
    except (FileNotFoundError, ValueError):
        return None
    current = (
        isinstance(stored, dict)
        and stored.get("settings") == json.loads(json.dumps(settings))
        and stored.get("run", {}).get("weights_sha256") == weights_sha256
        and stored.get("environment", {}).get("robustmix") == __version__
    )
    return stored if current else None


def _stored_report(path: Path, settings: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The report at ``path`` when it was made with ``settings`` and this robustmix version; else a clear error."""
    stored = read_json(path)  # names the file when it is missing or corrupted
    if not isinstance(stored, dict) or stored.get("settings") != json.loads(json.dumps(settings)):
        raise ValueError(f"{path} was made with other evaluation settings than the ones asked for")
    version = stored.get("environment", {}).get("robustmix")
    if version != __version__:
        raise ValueError(f"{path} was made by robustmix {version}, not {__version__}")
    stored["run"]["run_dir"] = str(run_dir)
    return stored


def _autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[mixed_precision])


def _cat(records: list[dict[str, Any]], *keys: Any) -> Tensor:
    """Concatenate, in chunk order, the per-example tensor found under ``keys`` in every chunk's record."""
    parts = []
    for record in records:
        for key in keys:
            record = record[key]
        parts.append(record)
    return torch.cat(parts)


def _accuracy(robust: Tensor) -> float:
    return robust.float().mean().item()


def _combine(records: list[dict[str, Any]], specs: list[AttackSpec], eps: float) -> dict[str, Any]:
    """The ``worst_case`` numbers of all chunks together, from their per-example results."""
    names = [spec.name for spec in specs]
    correct = _cat(records, "per_example", "correct")
    standalone = {name: _cat(records, "per_example", "standalone", name) for name in names}
    robust = _cat(records, "per_example", "cumulative", names[-1])
    results: dict[str, Any] = {
        "attack": combination_name(specs),
        "attacks": names,
        "eps": float(eps),
        "n": len(correct),
        "clean": _accuracy(correct),
        "standalone": {name: _accuracy(standalone[name]) for name in names},
        "cumulative": {name: _accuracy(_cat(records, "per_example", "cumulative", name)) for name in names},
        "worst_case": _accuracy(robust),
        "attacked": {name: sum(record["attacked"][name] for record in records) for name in names},
        "loss_trace": {},
        # The first n examples of the split, decoded by robustmix.evaluation.report.per_example_results.
        "per_example": {
            "n": len(correct),
            "indices": {"start": 0, "stop": len(correct)},
            "clean": reports.pack_bools(correct),
            "worst_case": reports.pack_bools(robust),
            "standalone": {name: reports.pack_bools(standalone[name]) for name in names},
        },
    }
    for name in names:
        # A chunk's trace is the mean over the examples it attacked: weight it by their number.
        parts = [(r["loss_trace"][name], r["attacked"][name]) for r in records if name in r["loss_trace"]]
        total = sum(count for _, count in parts)
        if total:
            summed = sum(torch.tensor(trace, dtype=torch.float64) * count for trace, count in parts)
            results["loss_trace"][name] = (summed / total).tolist()
    return results


def _combine_sweep(records: list[dict[str, Any]], sweep: list[float], specs: list[AttackSpec]) -> dict[str, Any]:
    names = [spec.name for spec in specs]
    clean = _accuracy(_cat(records, "per_example", "correct"))
    standalone: dict[str, list[float]] = {name: [] for name in names}
    worst = []
    for eps in sweep:
        if eps == 0:
            # The ball is the image itself.
            for name in names:
                standalone[name].append(clean)
            worst.append(clean)
            continue
        for name in names:
            standalone[name].append(_accuracy(_cat(records, "sweep", eps, "standalone", name)))
        worst.append(_accuracy(_cat(records, "sweep", eps, "cumulative", names[-1])))
    return {"eps": sweep, "standalone": standalone, "worst_case": worst}


def _margin_histograms(records: list[dict[str, Any]], bins: int = 40) -> dict[str, Any]:
    """Histograms over [-1, 1] of the probability margins at the clean and at the worst-case points."""
    histograms: dict[str, Any] = {}
    for name, key in (("clean", "margin_clean"), ("adversarial", "margin_adv")):
        margins = _cat(records, "per_example", key).double().numpy()
        counts, edges = np.histogram(margins, bins=bins, range=(-1.0, 1.0))
        histograms[name] = counts.tolist()
        histograms[f"mean_{name}"] = float(margins.mean())
    histograms["edges"] = edges.tolist()
    return histograms


def _environment(accelerator: Accelerator, elapsed_s: float) -> dict[str, Any]:
    device = accelerator.device
    return {
        "robustmix": __version__,
        **versions(),
        "device": device_name(device),
        "num_processes": accelerator.num_processes,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed_s, 1),
    }


def _print(report: dict[str, Any], output: Path, status: str) -> None:
    print(reports.summary(report, f"{output} ({status})"))
    if report["sanity_flags"]:
        print(reports.warning_block(report["sanity_flags"]), file=sys.stderr)


def _write_report(report: dict[str, Any], output: Path) -> None:
    """The table and plots first, eval.json last: a current eval.json implies a complete report."""
    output.parent.mkdir(parents=True, exist_ok=True)
    files = {name: output.parent / file for name, file in report["files"].items()}
    if "eps_sweep_plot" in files:
        reports.plot_eps_sweep(report, files["eps_sweep_plot"])
    if "margins_plot" in files:
        reports.plot_margins(report, files["margins_plot"])
    atomic_write_text(files["table"], reports.evaluation_markdown(report))
    atomic_write_json(output, report)
