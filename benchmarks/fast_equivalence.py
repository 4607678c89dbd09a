"""Does the fast path train like the eager path? N PGD-AT steps on the digits, from the same seed, both ways.

The claim this script checks: ``AdversarialStep(fast=True)`` (compiled attack iterations, the model compiled in
place, channels_last on CUDA) ends ``--steps`` training steps with the same numbers as the eager step: the loss
and the validation accuracies (clean and PGD-10). Two eager runs are compared as well (A/A): on a CPU they are
bitwise equal; on CUDA, cuDNN's non-deterministic kernels make them differ, and that difference is the noise
floor any other difference is read against.

Tolerance (``within``): the fast run matches when its final validation accuracies are within
``max(ACC_TOLERANCE, 2 x A/A)`` of the eager run's, and the mean loss of its last ``WINDOW`` steps within
``max(LOSS_TOLERANCE x that loss, 2 x A/A)``. A compiled kernel sums in another order than the eager one:
a few float32 (or bf16) rounding differences per step, which flip the sign of an input gradient component near 0
now and then; over many steps the two trajectories drift apart like two runs with different seeds would, by
far less. The data are the embedded digits (1,257 training images, 180 for validation: one image is 0.56
percentage points), batches of ``--batch-size`` in a fixed order, the epoch's last short batch included (the fast
path runs it eagerly).

    python benchmarks/fast_equivalence.py                              # CPU, fp32, aot_eager: seconds
    python benchmarks/fast_equivalence.py --device cuda --precision bf16 --steps 100 --backend inductor
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from robustmix import AdversarialCE, AdversarialStep, PGDAttack
from robustmix.attacks import pgd
from robustmix.data import DATASETS, load_dataset
from robustmix.models import create_model

#: The digits model of ``throughput.py --model small``.
MODEL = {"name": "resnet10t", "stem_width": 8, "channels": (16, 32, 64, 128)}
EPS, STEP_SIZE, STEPS = 8 / 255, 2 / 255, 10
#: Percentage points of validation accuracy, relative loss over the last WINDOW steps.
ACC_TOLERANCE = 2.0
LOSS_TOLERANCE = 0.05
WINDOW = 10


def make_model(seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    spec = DATASETS["digits"]
    return create_model(MODEL["name"], 10, in_chans=1, mean=spec.mean, std=spec.std, **{
        k: v for k, v in MODEL.items() if k != "name"
    }).to(device)  # fmt: skip


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train(fast: bool, args: argparse.Namespace, data: tuple[Tensor, Tensor], device: torch.device) -> dict:
    """``args.steps`` PGD-AT steps from seed ``args.seed``; the per-step losses and the final validation accuracies."""
    model = make_model(args.seed, device)
    if fast:
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        model.compile(backend=args.backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    step = AdversarialStep(
        [PGDAttack(EPS, STEP_SIZE, STEPS), AdversarialCE()], fast=fast, compile_backend=args.backend
    )
    images, labels = data
    order = torch.Generator().manual_seed(args.seed)
    losses, adv_correct, batches = [], [], []
    epoch = 0
    while len(losses) < args.steps:
        perm = torch.randperm(len(labels), generator=order)
        for start in range(0, len(perm), args.batch_size):
            index = perm[start : start + args.batch_size]
            if len(index) < 2 or len(losses) == args.steps:
                break
            x, y = images[index].to(device), labels[index].to(device)
            if fast and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            torch.manual_seed(args.seed * 100_003 + len(losses))  # the attack's random start, the same both ways
            model.train()
            with autocast(device, args.precision):
                loss, ctx = step(model, x, y, epoch=epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            adv_correct.append((ctx.logits["adv"].argmax(dim=1) == y).sum().item())
            batches.append(len(y))
        epoch += 1
    weights = model.state_dict()
    return {
        "losses": losses,
        "train_adv_acc": 100 * sum(adv_correct) / sum(batches),
        **evaluate(weights, args, device),
    }


def evaluate(weights: dict[str, Tensor], args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Clean and PGD-10 accuracy (%) on the validation split of an eager model with ``weights``, the same attack
    start for every run: the evaluation itself is the same both ways."""
    images, labels = load_dataset("digits", "validation").tensors()
    x, y = images.to(device), labels.to(device)
    model = make_model(args.seed, device)
    model.load_state_dict(weights)
    model.eval()
    generator = torch.Generator(device).manual_seed(args.seed)
    with autocast(device, args.precision):
        with torch.no_grad():
            clean = model(x).argmax(dim=1) == y
        x_adv = pgd(model, x, y, eps=EPS, step_size=STEP_SIZE, steps=STEPS, generator=generator)
        with torch.no_grad():
            robust = model(x_adv).argmax(dim=1) == y
    return {"clean_acc": 100 * clean.float().mean().item(), "pgd_acc": 100 * robust.float().mean().item()}


def compare(a: dict, b: dict) -> dict[str, float]:
    """Differences of run ``a`` against run ``b``."""
    return {
        "first_loss": abs(a["losses"][0] - b["losses"][0]),
        "max_loss_first_10": max(abs(p - q) for p, q in zip(a["losses"][:10], b["losses"][:10])),
        "last_loss": abs(statistics.fmean(a["losses"][-WINDOW:]) - statistics.fmean(b["losses"][-WINDOW:])),
        "clean_acc": abs(a["clean_acc"] - b["clean_acc"]),
        "pgd_acc": abs(a["pgd_acc"] - b["pgd_acc"]),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--precision", choices=("fp32", "bf16"), default="fp32")
    add("--steps", type=int, default=20, help="training steps of each run (N)")
    add("--batch-size", type=int, default=128)
    add("--backend", default="aot_eager", help="torch.compile backend of the fast path (inductor: the real one)")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1)
    add("--json", type=Path, help="also write every figure to this file")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.steps < WINDOW:
        parser().error(f"--steps must be at least {WINDOW}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_dataset("digits", "train").tensors()
    runs = {name: train(fast, args, data, device) for name, fast in (("eager", False), ("eager_again", False),
                                                                       ("fast", True))}  # fmt: skip
    fast, floor = compare(runs["fast"], runs["eager"]), compare(runs["eager_again"], runs["eager"])
    eager_last = statistics.fmean(runs["eager"]["losses"][-WINDOW:])
    limits = {
        "clean_acc": max(ACC_TOLERANCE, 2 * floor["clean_acc"]),
        "pgd_acc": max(ACC_TOLERANCE, 2 * floor["pgd_acc"]),
        "last_loss": max(LOSS_TOLERANCE * eager_last, 2 * floor["last_loss"]),
    }
    within = all(fast[key] <= limit for key, limit in limits.items())
    result = {"settings": {**vars(args), "json": str(args.json) if args.json else None},
              "torch": torch.__version__, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "runs": runs, "fast_vs_eager": fast, "eager_vs_eager": floor, "limits": limits,
              "within": within}  # fmt: skip
    print(f"# torch {result['torch']}  {result['device_name']}  {args.precision}  {args.steps} steps of "
          f"{args.batch_size}  backend {args.backend}  python {' '.join(sys.argv)}")  # fmt: skip
    print(
        f"{'run':<12} {'loss first':>10} {f'loss last {WINDOW}':>12} {'train adv %':>11} {'clean %':>8} {'PGD %':>7}"
    )
    for name, run in runs.items():
        print(f"{name:<12} {run['losses'][0]:>10.5f} {statistics.fmean(run['losses'][-WINDOW:]):>12.5f}"
              f" {run['train_adv_acc']:>11.2f} {run['clean_acc']:>8.2f} {run['pgd_acc']:>7.2f}")  # fmt: skip
    for label, diff in (("fast - eager", fast), ("A/A eager", floor)):
        print(f"|{label}|: " + ", ".join(f"{key} {value:.3g}" for key, value in diff.items()))
    print("tolerance: " + ", ".join(f"{key} <= {value:.3g}" for key, value in limits.items()))
    print(("PASS" if within else "FAIL") + " fast path trains like the eager path within the tolerance")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
