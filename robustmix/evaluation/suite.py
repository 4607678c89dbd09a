"""Robust evaluation: named attacks, their per-example worst case, sanity checks, and the evaluation of a run.

Each evaluation attack is data (``AttackSpec`` in ``ATTACKS``): a function and its settings.
``worst_case`` runs a list of them the way AutoAttack does (an example is attacked only while
it is still classified correctly) and decides every example with the fp32 model at the point the
attack found. ``sanity_flags`` reads the numbers and says when they cannot be trusted: a
stronger attack doing worse than a weaker one, a black-box attack beating the white-box ones, no
collapse at a large eps, or a PGD loss that does not rise. ``apgd-ce apgd-t fab-t square`` is AutoAttack's
standard set, in its order (the differences in detail are listed in docs/recipes.md); any other list is not
AutoAttack, and results name the attacks they ran.

``evaluate_run`` applies all of it to a training run folder, on one process or many, and writes a
report (``eval.json`` with every setting, ``eval.md``, plots; see ``robustmix.evaluation.report``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

import robustmix
from robustmix.attacks.apgd import apgd, apgd_targeted
from robustmix.attacks.fab import fab_targeted
from robustmix.attacks.objectives import get_objective
from robustmix.attacks.pgd import perturb
from robustmix.attacks.square import square_attack
from robustmix.cli.args import nonnegative_int, nonnegative_number, positive_int
from robustmix.core.modes import BNMode, model_mode
from robustmix.core.step import MIXED_PRECISION
from robustmix.core.validation import check_batch, check_model_input
from robustmix.data import SPLITS, ImageDataset, load_dataset
from robustmix.evaluation import report as reports
from robustmix.runs.checkpoint import atomic_write_json, atomic_write_text, file_sha256
from robustmix.runs.environment import device_name, versions
from robustmix.runs.folder import CONFIG_FILE, WEIGHTS, load_config, load_model, missing_weights, read_json
from robustmix.stages.margins import probability_margin

#: ``fn(model, x, y, *, eps, seed, **kwargs) -> x_adv``.
AttackFn = Callable[..., Tensor]


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A named evaluation attack with its settings.

    Attributes:
        name: Registry key, e.g. ``"apgd-ce"``.
        label: Name in reports, e.g. ``"APGD-CE"``.
        fn: The attack, called as ``fn(model, x, y, eps=eps, seed=seed, **kwargs)``.
        kwargs: Its settings (steps, loss, queries, ...); eps and seed come per call.
        white_box: Whether it uses gradients; a black-box attack beating every white-box one
            flags gradient masking.
        min_classes: Fewest classes the attack is defined for (APGD-T's targeted DLR needs 4).
        traces_loss: ``fn`` accepts ``loss_trace``, a ``[steps]`` tensor it adds the summed loss
            of each iteration to (PGD-type attacks, see ``pgd_eval``).
    """

    name: str
    label: str
    fn: AttackFn
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    white_box: bool = True
    min_classes: int = 2
    traces_loss: bool = False

    def __post_init__(self) -> None:
        # A read-only view: a spec is shared through the registry and must not change under other users.
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, eps: float, seed: int = 0, **extra: Any) -> Tensor:
        return self.fn(model, x, y, eps=eps, seed=seed, **self.kwargs, **extra)


#: The attacks ``evaluate_run`` runs by default, in this order.
DEFAULT_ATTACKS = ("pgd20", "pgd100", "cw", "apgd-ce", "apgd-t", "fab-t", "square")
#: The default eps sweep in multiples of the evaluation eps (capped at 1). At 4x and 8x a working attack
#: breaks (nearly) every image, which ``sanity_flags`` checks.
SWEEP_MULTIPLES = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Default file name of the report in a run folder; the Markdown table and the plots are written next to it.
EVAL_FILE = "eval.json"
#: Every attack of the suite works in the L-inf ball.
NORM = "linf"
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Arguments an attack receives per call, not settings.
_CALL_ARGUMENTS = ("model", "x", "y", "eps", "seed", "loss_trace")


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
    process has work.

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
    sweep = default_sweep(eps) if sweep_eps is None else sorted({float(e) for e in sweep_eps})
    for value in sweep:
        _check_eps(value, "every eps of the sweep")

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
    accelerator = accelerator or Accelerator()
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
        data = _load_split(config, split)
    n = len(data) if n_examples is None else n_examples
    if n > len(data):
        raise ValueError(f"n_examples is {n_examples} but the {split} split of {run['dataset']} has {len(data)}")
    x, y = (t[:n] for t in data.tensors())
    model = load_model(run_dir, weights=weights).to(device)
    if model.num_classes != data.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes, the {split} split {data.num_classes}")

    chunks = np.array_split(np.arange(math.ceil(n / batch_size)), accelerator.num_processes)
    mine = chunks[accelerator.process_index].tolist()
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

    records = []
    for c in mine:
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
        records.append({key: main[key] for key in ("per_example", "attacked", "loss_trace")} | {"sweep": swept})
    bar.close()
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
        "environment": _environment(accelerator, time.perf_counter() - started),
        "files": reports.report_files(output, plots=plots, sweep=bool(sweep)),
    }
    report = json.loads(json.dumps(report))  # exactly what eval.json holds: lists, not tuples
    if accelerator.is_main_process:
        _write_report(report, output)
        _print(report, output, "written")
    accelerator.wait_for_everyone()
    return report


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: str | AttackSpec,
    *,
    eps: float,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Accuracy (fraction in [0, 1]) of ``model`` on ``(x, y)`` against one attack at L-inf ``eps``.

    See ``worst_case`` for the arguments; clean-misclassified examples count as not robust.
    """
    return worst_case(model, x, y, [attack], eps=eps, standalone=False, batch_size=batch_size, seed=seed)["worst_case"]


def worst_case(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[str | AttackSpec],
    *,
    eps: float,
    standalone: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    record_loss: bool = False,
    after_attack: Callable[[AttackSpec], None] | None = None,
) -> dict[str, Any]:
    """Per-example worst case of several attacks at L-inf ``eps``, AutoAttack-style.

    Attacks run in the given order. An example counts as robust when it is classified correctly
    clean and at the point every attack found; clean-misclassified examples are never attacked.
    Every decision is made by the model in eval mode with autocast off (fp32), so an attack that
    ran under autocast is judged by the fp32 model. Works under ``torch.no_grad()`` and
    ``torch.inference_mode()``.

    With ``standalone=False`` an attack only sees the examples every earlier attack failed on
    (cheapest; AutoAttack's protocol). With ``standalone=True`` every attack sees all
    clean-correct examples, which also gives each attack's own accuracy, at the cost of
    attacking examples an earlier attack already broke. The worst case means the same either way
    (its value can differ by the attacks' randomness, as their batches differ).

    Args:
        model: Classifier taking pixels in [0, 1] ``[B, ...]`` and returning logits ``[B, C]``.
        x: Images ``[N, ...]``, pixels in [0, 1], on the model's device.
        y: Labels ``[N]`` (int64).
        attacks: Names in ``ATTACKS`` or specs (e.g. a registry spec with a smaller budget via
            ``dataclasses.replace``).
        eps: L-inf radius in pixels (8/255 on CIFAR-10).
        standalone: Also run every attack on every clean-correct example (see above).
        batch_size: Examples per attack call.
        seed: Seed of the attacks' randomness; batch ``j`` uses ``seed + j``.
        record_loss: For PGD-type attacks, also return the mean attack loss per iteration, read
            from the logits the attack computes anyway.
        after_attack: Called with each attack's spec once it has run (e.g. to advance a progress bar).

    Returns:
        A dict with ``"attack"`` (the combination's name, e.g. "worst case over APGD-CE, APGD-T,
            Square"), ``"attacks"`` (names), ``"eps"``, ``"n"`` (examples), ``"clean"`` (clean
            accuracy), ``"cumulative"`` (per name: accuracy against that attack and every earlier
            one, as AutoAttack prints it), ``"standalone"`` (per name: accuracy against that attack
            alone; only with ``standalone=True``), ``"worst_case"`` (accuracy against all), ``"robust"``
            (bool ``[N]`` on the CPU: robust against all) and, with ``record_loss``, ``"loss_trace"``
            (per PGD-type name: the mean loss before each step, a list of ``steps`` floats);
            ``"attacked"`` (per name: how many examples the attack ran on) and ``"per_example"``, on the
            CPU: ``"correct"`` (bool ``[N]``, clean), ``"cumulative"`` and, with ``standalone=True``,
            ``"standalone"`` (per name: bool ``[N]`` behind the accuracies), ``"margin_clean"`` and
            ``"margin_adv"`` (float ``[N]``: the fp32 probability margin ``p_y - max_{k != y} p_k`` in
            [-1, 1] at ``x`` and the lowest at ``x`` or at any point an attack found). Accuracies are
            fractions in [0, 1].
    """
    specs = [get_attack(a) if isinstance(a, str) else a for a in attacks]
    _check_eval_args(specs, x, y, eps, batch_size)
    with torch.inference_mode(False), torch.enable_grad():
        # Tensors made under inference_mode cannot enter autograd.
        x, y = (t.detach().clone() if t.is_inference() else t.detach() for t in (x, y))
        check_model_input(model, x)
        num_classes = _num_classes(model, x)
        check_batch(x, y, num_classes)
        for spec in specs:
            if num_classes < spec.min_classes:
                raise ValueError(
                    f"{spec.label} needs at least {spec.min_classes} classes, the model has {num_classes}"
                )

        judged = [_judge(model, xb, yb) for xb, yb in zip(x.split(batch_size), y.split(batch_size))]
        correct = torch.cat([ok for ok, _ in judged])
        margin_clean = torch.cat([margin for _, margin in judged])
        margin_adv = margin_clean.clone()
        robust = correct.clone()
        n = x.shape[0]
        results: dict[str, Any] = {
            "attack": _combination_name(specs),
            "attacks": [spec.name for spec in specs],
            "eps": float(eps),
            "n": n,
            "clean": correct.float().mean().item(),
            "cumulative": {},
            "attacked": {},
        }
        per_example: dict[str, Any] = {"correct": correct.cpu(), "cumulative": {}}
        if standalone:
            results["standalone"] = {}
            per_example["standalone"] = {}
        if record_loss:
            results["loss_trace"] = {}
        for spec in specs:
            # One host sync per attack to pick its examples; none inside the attacks.
            todo = (correct if standalone else robust).nonzero().squeeze(1)
            trace = None
            if record_loss and spec.traces_loss:
                trace = torch.zeros(spec.kwargs["steps"], device=x.device)
            survived, margin = _survives(spec, model, x[todo], y[todo], eps, batch_size, seed, trace)
            attack_robust = torch.zeros_like(correct)
            attack_robust[todo] = survived
            margin_adv[todo] = torch.minimum(margin_adv[todo], margin)
            robust &= attack_robust
            if standalone:
                results["standalone"][spec.name] = attack_robust.float().mean().item()
                per_example["standalone"][spec.name] = attack_robust.cpu()
            results["cumulative"][spec.name] = robust.float().mean().item()
            # A copy: ``robust`` changes in place with the next attack (and .cpu() of a CPU tensor is the tensor).
            per_example["cumulative"][spec.name] = robust.to("cpu", copy=True)
            results["attacked"][spec.name] = todo.numel()
            if trace is not None and todo.numel() > 0:
                results["loss_trace"][spec.name] = (trace / todo.numel()).tolist()
            if after_attack is not None:
                after_attack(spec)
        results["worst_case"] = robust.float().mean().item()
        results["robust"] = robust.cpu()
        results["per_example"] = per_example | {"margin_clean": margin_clean.cpu(), "margin_adv": margin_adv.cpu()}
    return results


def eps_sweep(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_values: Sequence[float],
    *,
    attack: str | AttackSpec = "pgd20",
    batch_size: int = 256,
    seed: int = 0,
) -> dict[float, float]:
    """Robust accuracy against ``attack`` at each eps, ``{eps: accuracy}``; put it in a result's ``"eps_sweep"``.

    Include a large eps (e.g. 0.5 in L-inf, where any image can be turned mid-gray): a working
    attack drives accuracy to ~0 there, which ``sanity_flags`` checks.
    """
    return {
        float(eps): robust_accuracy(model, x, y, attack, eps=eps, batch_size=batch_size, seed=seed)
        for eps in eps_values
    }


def sanity_flags(results: Mapping[str, Any], *, tolerance: float = 0.01, zero_accuracy: float = 0.05) -> list[str]:
    """Warnings about an evaluation that cannot be trusted; empty when every check passes.

    Checks what ``results`` holds (a ``worst_case`` result, optionally with ``"eps_sweep"``
    from ``eps_sweep``):

    - ordering: clean >= PGD-20 >= PGD-100 >= worst case (standalone accuracies);
    - gradient masking: a black-box attack (Square) below every white-box attack;
    - eps sweep: accuracy at the largest eps above ``zero_accuracy``, or rising with eps;
    - loss trace: a PGD-type attack whose mean loss is not higher at the last step than at the first.

    Args:
        results: Accuracies as fractions in [0, 1].
        tolerance: Slack of the comparisons in accuracy units, for the noise of a finite test set
            and of attacks that do not keep their best iterate (PGD).
        zero_accuracy: Highest accuracy that counts as ~0 at the largest eps of a sweep.

    Returns:
        One sentence per failed check, naming the numbers.
    """
    flags: list[str] = []
    alone = results.get("standalone", {})

    chain = [("clean", results.get("clean")), ("PGD-20", alone.get("pgd20")), ("PGD-100", alone.get("pgd100"))]
    chain.append((results.get("attack", "worst case"), results.get("worst_case")))
    chain = [(label, acc) for label, acc in chain if acc is not None]
    for (weak, weak_acc), (strong, strong_acc) in itertools.pairwise(chain):
        if strong_acc > weak_acc + tolerance:
            flags.append(
                f"ordering: {strong} accuracy {strong_acc:.4f} is above {weak} accuracy {weak_acc:.4f}; "
                "the stronger evaluation must not do better (attack failure, randomness, or too few examples)"
            )

    white = {name: acc for name, acc in alone.items() if name in ATTACKS and ATTACKS[name].white_box}
    black = {name: acc for name, acc in alone.items() if name in ATTACKS and not ATTACKS[name].white_box}
    if white:
        best_white = min(white, key=white.get)
        for name, acc in black.items():
            if acc < white[best_white] - tolerance:
                flags.append(
                    f"gradient masking: {ATTACKS[name].label} (black box, no gradients) accuracy {acc:.4f} is below "
                    f"every white-box attack (strongest: {ATTACKS[best_white].label} {white[best_white]:.4f}); "
                    "gradient-based numbers on this model are not trustworthy"
                )

    sweep = sorted(results.get("eps_sweep", {}).items())
    if sweep and sweep[-1][1] > zero_accuracy:
        flags.append(
            f"eps sweep: accuracy {sweep[-1][1]:.4f} at the largest eps {sweep[-1][0]:.4g} does not fall to ~0; "
            "an attack with that much budget should break every image (gradient masking?)"
        )
    for (eps_lo, acc_lo), (eps_hi, acc_hi) in itertools.pairwise(sweep):
        if acc_hi > acc_lo + tolerance:
            flags.append(
                f"eps sweep: accuracy rises from {acc_lo:.4f} to {acc_hi:.4f} as eps grows from {eps_lo:.4g} to "
                f"{eps_hi:.4g}; a larger ball contains the smaller one (gradient masking?)"
            )

    for name, trace in results.get("loss_trace", {}).items():
        if len(trace) >= 2 and not trace[-1] > trace[0]:
            label = ATTACKS[name].label if name in ATTACKS else name
            flags.append(
                f"loss trace: the mean {label} loss does not increase over the attack ({trace[0]:.4g} at the first "
                f"step, {trace[-1]:.4g} at the last); its gradients are zero or useless (gradient masking?)"
            )
    return flags


def attack_cost(attack: str | AttackSpec) -> float:
    """An attack's nominal cost per example in forward-and-backward passes: iterations x target classes x
    restarts for the gradient attacks, a third of a pass per query for the forward-only Square. For progress
    and planning, not a measurement."""
    spec = get_attack(attack) if isinstance(attack, str) else attack
    settings = spec.kwargs
    passes = settings.get("steps", 0) * settings.get("n_target_classes", 1) * settings.get("restarts", 1)
    return float(passes + settings.get("queries", 0) / 3)


def get_attack(name: str) -> AttackSpec:
    """The registered evaluation attack called ``name``."""
    if name not in ATTACKS:
        raise ValueError(f"unknown evaluation attack {name!r}; expected one of {sorted(ATTACKS)}")
    return ATTACKS[name]


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
    elif isinstance(data["split_seed"], bool) or not isinstance(data["split_seed"], int) or data["split_seed"] < 0:
        problem = f"'data.split_seed' must be an integer >= 0, got {data['split_seed']!r}"
    elif not isinstance(attack, dict) or "eps" not in attack:
        problem = "no 'attack' entry with the training 'eps'"
    elif isinstance(attack["eps"], bool) or not isinstance(attack["eps"], (int, float)) or not 0 <= attack["eps"] <= 1:
        problem = f"'attack.eps' must be a number in [0, 1], got {attack['eps']!r}"
    if problem is not None:
        raise ValueError(f"{path} is corrupted: {problem}")


def with_budget(attack: str | AttackSpec, **settings: Any) -> AttackSpec:
    """An evaluation attack with some settings changed, e.g. ``with_budget("square", queries=500)``.

    The name and label stay (reports print the settings next to them), so ``sanity_flags`` still knows
    the attack.

    Raises:
        ValueError: The attack is unknown, or its function takes no setting of one of the given names.
    """
    spec = get_attack(attack) if isinstance(attack, str) else attack
    unknown = sorted(set(settings) - set(attack_settings(spec)["settings"]))
    if unknown:
        raise ValueError(f"{spec.label} has no setting {unknown}; it has {sorted(attack_settings(spec)['settings'])}")
    return dataclasses.replace(spec, kwargs={**spec.kwargs, **settings})


def attack_settings(attack: str | AttackSpec) -> dict[str, Any]:
    """Everything that defines an evaluation attack, for a report.

    Returns:
        ``{"name", "label", "white_box", "settings"}``; ``settings`` holds every keyword of the attack
            function (steps, restarts, queries, target classes, step sizes, loss, BatchNorm mode ...) with the
            value the spec passes or, when it passes none, the function's default. eps and seed come per call and
            are not among them.
    """
    spec = get_attack(attack) if isinstance(attack, str) else attack
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(spec.fn).parameters.items()
        if name not in _CALL_ARGUMENTS and parameter.default is not inspect.Parameter.empty
    }
    return {
        "name": spec.name,
        "label": spec.label,
        "white_box": spec.white_box,
        "settings": defaults | dict(spec.kwargs),
    }


def default_sweep(eps: float) -> list[float]:
    """The default eps sweep around an evaluation ``eps``: ``SWEEP_MULTIPLES`` of it, capped at 1, ascending."""
    return sorted({min(multiple * eps, 1.0) for multiple in SWEEP_MULTIPLES})


def add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags that choose an evaluation (those of ``evaluate_run``) to a command line.

    Values are checked as they are parsed: an unknown attack, a negative eps or a non-positive number of
    examples ends the program with a one-line message before any work. Read them back with
    ``evaluation_kwargs``.
    """
    add = parser.add_argument
    add(
        "--attacks",
        nargs="+",
        choices=sorted(ATTACKS),
        default=list(DEFAULT_ATTACKS),
        metavar="ATTACK",
        help=f"attacks in order (default: {' '.join(DEFAULT_ATTACKS)}; choices: {', '.join(sorted(ATTACKS))})",
    )
    add("--eps", type=_eps_flag, help="L-inf radius in pixels in [0, 1], e.g. 8/255 (default: the run's)")
    add("--n-examples", type=positive_int, help="evaluate the first N examples of the split (default: all)")
    add("--split", choices=SPLITS, default="test", help="data split, made as in training (default: test)")
    add(
        "--weights", choices=tuple(WEIGHTS), default="final",
        help="final weights, the best checkpoint, or the moving average of a run trained with --ema",
    )  # fmt: skip
    add("--batch-size", type=positive_int, default=256, help="examples per chunk and attack call (default: 256)")
    add("--seed", type=nonnegative_int, default=0, help="seed of the attacks (default: 0)")
    add(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        default="no",
        help="autocast of the attacks; decisions stay fp32 (default: no)",
    )
    # Two flags, not a bare `--sweep-eps` meaning "none": reading the command must tell whether a sweep ran.
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument(
        "--sweep-eps",
        type=_eps_flag,
        nargs="+",
        metavar="EPS",
        help="radii of the eps sweep (default: 0, 0.5, 1, 2, 4 and 8 times eps, capped at 1)",
    )
    sweep.add_argument(
        "--no-sweep",
        dest="sweep_eps",
        action="store_const",
        const=[],
        help="skip the eps sweep (and with it the sanity check at a large eps)",
    )
    add("--no-plots", dest="plots", action="store_false", help="write no PNG plots")
    add("--no-progress", dest="progress", action="store_false", help="show no progress bar")


def evaluation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``evaluate_run`` from flags added by ``add_evaluation_flags``."""
    keys = ("attacks", "eps", "n_examples", "split", "weights", "batch_size", "seed", "mixed_precision")
    return {key: getattr(args, key) for key in (*keys, "sweep_eps", "plots", "progress")}


def pgd_eval(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    step_fraction: float = 0.25,
    loss: str = "ce",
    seed: int = 0,
    bn_mode: BNMode = "eval",
    loss_trace: Tensor | None = None,
) -> Tensor:
    """PGD as the evaluation suite runs it: uniform start, step ``step_fraction * eps``, seeded.

    ``model``, ``x``, ``y``, ``eps``, ``steps``, ``loss`` and ``bn_mode`` are as in
    ``robustmix.attacks.pgd.perturb``.

    Args:
        step_fraction: Step size as a fraction of eps (1/4: 2/255 at 8/255).
        seed: Seed of the random start.
        loss_trace: A ``[steps]`` float tensor on ``x``'s device; iteration ``k`` adds the summed
            loss of the batch at ``x_k`` to entry ``k`` (no extra forward, no host sync).

    Returns:
        ``x_adv [B, ...]`` in ``B(x, eps)`` and [0, 1].
    """
    observer = None
    if loss_trace is not None:
        objective = get_objective(loss)

        def observer(k: int, logits: Tensor, x_k: Tensor) -> None:
            loss_trace[k] += objective(logits, y).sum()

    generator = torch.Generator(device=x.device).manual_seed(seed)
    return perturb(
        model, x, y, eps=eps, step_size=step_fraction * eps, steps=steps, loss=loss, start="uniform",
        bn_mode=bn_mode, observer=observer, generator=generator,
    )  # fmt: skip


#: The evaluation attacks by name. Step sizes are fractions of eps; budgets follow the papers:
#: PGD-20 / PGD-100 with step eps/4 (2/255 at 8/255) and one random start; CW-inf as 30 PGD steps
#: on the margin loss (papers use 20-30); APGD-CE (one run), APGD-T and FAB-T (9 targets, one run
#: each) with 100 iterations, and Square with 5000 queries on the unrescaled p schedule, as in
#: AutoAttack's standard version: ``apgd-ce apgd-t fab-t square`` is its attack set, in its order.
ATTACKS: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in (
        AttackSpec("pgd20", "PGD-20", pgd_eval, {"steps": 20, "step_fraction": 0.25, "loss": "ce"}, traces_loss=True),
        AttackSpec(
            "pgd100", "PGD-100", pgd_eval, {"steps": 100, "step_fraction": 0.25, "loss": "ce"}, traces_loss=True
        ),
        AttackSpec("cw", "CW-inf", pgd_eval, {"steps": 30, "step_fraction": 0.25, "loss": "cw"}, traces_loss=True),
        AttackSpec("apgd-ce", "APGD-CE", apgd, {"steps": 100, "loss": "ce"}),
        AttackSpec("apgd-t", "APGD-T", apgd_targeted, {"steps": 100, "n_target_classes": 9}, min_classes=4),
        AttackSpec("fab-t", "FAB-T", fab_targeted, {"steps": 100, "n_target_classes": 9}),
        AttackSpec("square", "Square", square_attack, {"queries": 5000}, white_box=False),
    )
}


#: The eps sweep's attacks, cheaper than the main evaluation because they run at every eps: PGD-20 as it
#: is, APGD-CE with 20 steps and Square with 500 queries over its whole p schedule (rescaled).
SWEEP_ATTACKS: tuple[AttackSpec, ...] = (
    ATTACKS["pgd20"],
    with_budget("apgd-ce", steps=20),
    with_budget("square", queries=500, rescale_schedule=True),
)


def _eps_flag(text: str) -> float:
    eps = nonnegative_number(text)
    if eps > 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (pixels), got {text}; for 8/255 write 8/255")
    return eps


def _combination_name(specs: Sequence[AttackSpec]) -> str:
    return "worst case over " + ", ".join(spec.label for spec in specs)


def _resolve(attacks: Sequence[str | AttackSpec], what: str) -> list[AttackSpec]:
    if isinstance(attacks, (str, AttackSpec)):
        raise ValueError(f"{what} must be a sequence of attack names or specs, got the single {attacks!r}")
    specs = [get_attack(a) if isinstance(a, str) else a for a in attacks]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} must not repeat a name, got {names}")
    return specs


def _check_eps(eps: float, what: str = "eps") -> None:
    if isinstance(eps, (bool, Tensor)) or not isinstance(eps, (int, float)) or not 0 <= eps <= 1:
        raise ValueError(f"{what} must be a number in [0, 1] (L-inf radius in pixels), got {eps!r}")


def _check_run_settings(
    eps: float, n_examples: int | None, split: str, batch_size: int, seed: int, mixed_precision: str
) -> None:
    _check_eps(eps)
    checks = [("batch_size", batch_size, 1), ("seed", seed, 0)]
    if n_examples is not None:
        checks.append(("n_examples", n_examples, 1))
    for name, value, minimum in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")


def split_size(run_dir: str | Path, split: str = "test") -> int:
    """How many examples the ``split`` of a run's data has, made as in its training (``evaluate_run``'s data)."""
    config, _ = check_run(run_dir)
    return len(_load_split(config, split))


def _load_split(config: dict[str, Any], split: str) -> ImageDataset:
    data = config["data"]
    return load_dataset(
        data["dataset"], split, path=data["path"], val_size=data.get("val_size"), test_size=data.get("test_size"),
        seed=data["split_seed"],
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
        and stored.get("environment", {}).get("robustmix") == robustmix.__version__
    )
    return stored if current else None


def _stored_report(path: Path, settings: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The report at ``path`` when it was made with ``settings`` and this robustmix version; else a clear error."""
    stored = read_json(path)  # names the file when it is missing or corrupted
    if not isinstance(stored, dict) or stored.get("settings") != json.loads(json.dumps(settings)):
        raise ValueError(f"{path} was made with other evaluation settings than the ones asked for")
    version = stored.get("environment", {}).get("robustmix")
    if version != robustmix.__version__:
        raise ValueError(f"{path} was made by robustmix {version}, not {robustmix.__version__}")
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
        "attack": _combination_name(specs),
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
        "robustmix": robustmix.__version__,
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


def _survives(
    spec: AttackSpec,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    batch_size: int,
    seed: int,
    trace: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Run ``spec`` in batches; at the point it found, ``_judge`` of each example (bool ``[N]``, float ``[N]``)."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device), torch.zeros(0, device=x.device)
    judged = []
    for j, (xb, yb) in enumerate(zip(x.split(batch_size), y.split(batch_size))):
        extra = {} if trace is None else {"loss_trace": trace}
        x_adv = spec(model, xb, yb, eps=eps, seed=seed + j, **extra)
        _check_in_ball(x_adv, xb, eps, spec.label)
        judged.append(_judge(model, x_adv, yb))
    return torch.cat([ok for ok, _ in judged]), torch.cat([margin for _, margin in judged])


def _judge(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The eval-mode model with autocast off: predicts ``y`` (bool ``[B]``), and its probability margin (``[B]``)."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False), model_mode(model, "eval"):
        logits = model(x)
        return logits.argmax(dim=1) == y, probability_margin(logits, y)


def _check_in_ball(x_adv: Tensor, x: Tensor, eps: float, label: str) -> None:
    """An attack leaving the ball or [0, 1] would report robustness it did not measure: fail loudly."""
    slack = 2 * torch.finfo(x.dtype).eps
    distance, lo, hi = torch.stack([(x_adv - x).abs().amax(), x_adv.amin(), x_adv.amax()]).tolist()
    if not (distance <= eps + slack and lo >= 0 and hi <= 1):
        raise RuntimeError(
            f"{label} returned points outside B(x, {eps:.4g}) and [0, 1]: L-inf distance {distance:.4g}, "
            f"pixels in [{lo:.4g}, {hi:.4g}]"
        )


def _num_classes(model: nn.Module, x: Tensor) -> int:
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        return num_classes
    with torch.no_grad(), model_mode(model, "eval"):
        return model(x[:1]).shape[1]


def _check_eval_args(specs: list[AttackSpec], x: Tensor, y: Tensor, eps: float, batch_size: int) -> None:
    # The rest of the batch checks need the number of classes, which may take a forward of x[:1].
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a floating-point tensor of pixels in [0, 1], got {type(x).__name__}")
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be an integer tensor of class indices [N], got {type(y).__name__}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch [N, ...], got {getattr(x, 'shape', x)!r}")
    if not specs:
        raise ValueError("attacks must name at least one attack")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks must not repeat a name, got {names}")
    if isinstance(eps, Tensor) or not 0 <= float(eps) < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0 (pixels in [0, 1]), got {eps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
