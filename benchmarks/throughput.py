"""Throughput of robustmix's training step against a hand-written loop doing the same algorithm.

The claim this script measures: for each method, one training step (attack, loss, backward,
optimizer step) through ``AdversarialStep`` takes ``ratio`` times as long as the same step written
by hand in plain PyTorch (``benchmarks/handwritten.py``), on the same model, batch, precision and
device, in the same process. After a warm-up the steps are interleaved (robustmix, hand-written,
robustmix, ..., in a random order drawn afresh every repeat), so load on a shared machine hits both
sides alike; the table gives the median step time of each side and the median of the per-repeat
ratios with their interquartile range. An A/A row (the hand-written step against itself on a second
model copy) shows what two identical steps differ by on this machine: the resolution of every ratio.
On a CPU the ratios are given twice, from the wall clock and from this process's CPU time (which
does not count the time other processes held the cores).

Per method it also checks that both sides compute the same loss from the same weights and seed
(``|dloss|``), that robustmix's pass counter (``ctx.passes()`` after ``backward``) matches the cost
stated in the method's docs page, and the peak of what autograd saves for backward during a step (a
device-independent proxy of activation memory). On CUDA it adds the peak memory of one step of each
side, host synchronizations per step and inside the attack loop, and PGD-AT's bf16 / fp32 speed-up.

With ``--fast`` a third side is timed with the others: robustmix's fast path as a user turns it on
(``AdversarialStep(fast=True)``: every attack iteration one compiled unit, a CUDA graph on CUDA; the model
compiled in place for the training pass; channels_last weights and inputs on CUDA). The side-by-side table
gives each side's images/s, its speed against the hand-written eager loop, peak memory (CUDA) and the
achieved FLOP/s: the FLOPs of one step, counted by ``torch.utils.flop_counter``'s formulas (``Flops``) on the
hand-written eager step's actual passes (all sides run the same passes: the pass counts show it), divided by
the step time, and as a fraction of the device's dense peak (``PEAK_TFLOPS``; unknown on a CPU).

    python benchmarks/throughput.py                                  # small model, 32x32x1, batch 128, CPU
    python benchmarks/throughput.py --model resnet18 --channels 3 --batch-size 32 --repeats 5
    python benchmarks/throughput.py --device cuda --model resnet18 --channels 3 --batch-size 512 --precision bf16
    python benchmarks/throughput.py --device cuda --model resnet18 --channels 3 --batch-size 512 --precision bf16 \
        --methods pgd_at --fast                                      # hand-written, robustmix eager, fast path
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import handwritten  # benchmarks/ is on sys.path when this file runs as a script
import torch
import torch.nn.functional as F
from host_reads import HostReads
from torch import Tensor, nn
from torch.amp import GradScaler
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from robustmix import (
    AdaLabLabels,
    AdaLabWeights,
    AdversarialCE,
    AdversarialStep,
    AdversarysAdversary,
    FGSMAttack,
    GAIRATWeights,
    MAILWeights,
    PGDAttack,
    ProbabilityMargin,
)
from robustmix.attacks import perturb
from robustmix.core.callbacks import Callback
from robustmix.methods.sglr import SGLRLabels
from robustmix.models import create_model
from robustmix.runs.environment import cpu_name, versions
from robustmix.stages.losses import MARTLoss, TRADESLoss

#: ``--model`` shortcuts; any other value is a timm model name.
MODELS = {
    "small": {"name": "resnet10t", "stem_width": 8, "channels": (16, 32, 64, 128)},
    "resnet18": {"name": "resnet18", "cifar_stem": True},
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
NUM_CLASSES = 10
#: Distinct batches the steps cycle through; SGLR's table has one row per example of them.
NUM_BATCHES = 4
#: Power of two the fp16 attack loss is multiplied by on both sides (robustmix's default).
FP16_ATTACK_SCALE = 2.0**10
#: Targets the script reports on (not tests: timings never pass or fail a test).
PGD_AT_RATIO_TARGET = 1.03
BF16_SPEEDUP_TARGET = 1.8
MEMORY_TARGET = 1.10
#: Issue 22's targets for the fast path: against the hand-written eager loop (ResNet-18, 32x32, batch 512,
#: bf16, PGD-10), as a fraction of the dense bf16 peak, and against robustmix eager on the launch-bound small model.
FAST_SPEEDUP_TARGET = 1.5
PEAK_FRACTION_TARGET = 0.25
LAUNCH_BOUND_SPEEDUP_TARGET = 2.0
#: Dense (no 2:4 sparsity) peak TFLOP/s by device name and autocast dtype; fp32 is PyTorch's default for
#: convolutions, TF32 tensor cores. Source: NVIDIA's H100 and H200 Tensor Core GPU datasheets, whose tensor
#: figures are given with sparsity: halved here. Checked in this order (the first name that matches).
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "fp32": 378.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 417.5},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 417.5},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},  # SXM5 ("NVIDIA H100 80GB HBM3")
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},  # SXM
}
PEAK_SOURCE = "NVIDIA H100/H200 Tensor Core GPU datasheets, dense (half the sparsity figures); fp32 as TF32"


@dataclass(frozen=True)
class Settings:
    """Attack settings of both sides; eps and step size in pixels.

    ``attack_scale`` multiplies the hand-written attack loss (2**10 under fp16, else 1).
    """

    eps: float
    step_size: float
    steps: int
    aa_steps: int
    num_examples: int
    attack_scale: float


@dataclass(frozen=True)
class Method:
    """A method as robustmix callbacks, as a hand-written step, and its documented cost.

    Attributes:
        callbacks: Builds robustmix's composition.
        handwritten: ``(side, x, y, index, sglr_table, settings) -> loss``, a whole hand-written step.
        passes: Forwards and backwards per step in batch units, from ``(K, K_aa)``.
        doc: Where ``passes`` is stated.
    """

    callbacks: Callable[[Settings], list[Callback]]
    handwritten: Callable[..., Tensor]
    passes: Callable[[int, int], tuple[int, int]]
    doc: str


def _attack(s: Settings) -> dict[str, float]:
    return {"eps": s.eps, "step_size": s.step_size, "steps": s.steps, "attack_scale": s.attack_scale}


def _pgd(s: Settings, **kwargs: Any) -> PGDAttack:
    # robustmix keeps its default attack loss scale (2**10, in every precision): what users run.
    return PGDAttack(s.eps, s.step_size, s.steps, **kwargs)


METHODS: dict[str, Method] = {
    "pgd_at": Method(
        lambda s: [_pgd(s), AdversarialCE()],
        lambda hw, x, y, i, t, s: handwritten.pgd_at(*hw, x, y, **_attack(s)),
        lambda k, a: (k + 1, k + 1), "docs/concepts.md",
    ),
    "fgsm_rs": Method(
        lambda s: [FGSMAttack(s.eps), AdversarialCE()],
        lambda hw, x, y, i, t, s: handwritten.fgsm_rs(*hw, x, y, eps=s.eps, attack_scale=s.attack_scale),
        lambda k, a: (2, 2), "docs/concepts.md",
    ),
    "trades": Method(
        lambda s: [_pgd(s, loss="kl", start="normal"), TRADESLoss(6.0)],
        lambda hw, x, y, i, t, s: handwritten.trades(*hw, x, y, beta=6.0, **_attack(s)),
        lambda k, a: (k + 3, k + 2), "docs/methods/trades.md",
    ),
    "mart": Method(
        lambda s: [_pgd(s, start="normal"), MARTLoss(5.0)],
        lambda hw, x, y, i, t, s: handwritten.mart(*hw, x, y, beta=5.0, **_attack(s)),
        lambda k, a: (k + 2, k + 2), "docs/methods/mart.md",
    ),
    "gairat": Method(
        lambda s: [_pgd(s, track_kappa=True), GAIRATWeights(s.steps, lam=-1.0), AdversarialCE()],
        lambda hw, x, y, i, t, s: handwritten.gairat(*hw, x, y, lam=-1.0, **_attack(s)),
        lambda k, a: (k + 1, k + 1), "docs/methods/gairat.md",
    ),
    "mail": Method(
        lambda s: [_pgd(s), ProbabilityMargin(), MAILWeights(), AdversarialCE()],
        lambda hw, x, y, i, t, s: handwritten.mail(*hw, x, y, **_attack(s)),
        lambda k, a: (k + 1, k + 1), "docs/methods/mail.md: no extra pass over PGD-AT",
    ),
    "sglr": Method(
        lambda s: [_pgd(s), SGLRLabels(s.num_examples, NUM_CLASSES, start_epoch=0), AdversarialCE()],
        lambda hw, x, y, i, t, s: handwritten.sglr(*hw, x, y, i, t, **_attack(s)),
        lambda k, a: (k + 2, k + 1), "docs/methods/sglr.md",
    ),
    "adalab": Method(
        lambda s: [
            _pgd(s), AdversarysAdversary(s.aa_steps), ProbabilityMargin(),
            AdaLabLabels(), AdaLabWeights(), AdversarialCE(),
        ],
        lambda hw, x, y, i, t, s: handwritten.adalab(*hw, x, y, aa_steps=s.aa_steps, **_attack(s)),
        lambda k, a: (k + a + 2, k + a + 1), "docs/methods/adalab.md",
    ),
}  # fmt: skip


class Side(NamedTuple):
    """One side of the comparison: its own model copy, optimizer and gradient scaler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: GradScaler


def make_side(model: nn.Module, device: torch.device, precision: str) -> Side:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    # The scaler is a pass-through unless fp16 enables it; both sides step through one.
    return Side(model, optimizer, GradScaler(device.type, enabled=precision == "fp16"))


def fast_model(model: nn.Module, device: torch.device, backend: str) -> nn.Module:
    """The fast path's model: compiled in place for the training pass (attacks compile their iterations
    themselves and call its ``forward``), in channels_last on CUDA (tensor-core convolutions)."""
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.compile(backend=backend)
    return model


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class Runner:
    """One method on every side: ``run_rm``, ``run_hw`` and ``run_fast`` each do a whole training step.

    ``fast``: the fast path's side (see ``fast_side``), with ``backend`` for its compiled attack iterations.
    """

    def __init__(
        self, method: Method, rm: Side, hw: Side, settings: Settings, precision: str, labels: Tensor,
        fast: Side | None = None, backend: str = "inductor",
    ) -> None:  # fmt: skip
        self.method, self.rm, self.hw, self.settings, self.precision = method, rm, hw, settings, precision
        self.device = labels.device
        self.step = AdversarialStep(
            method.callbacks(settings), num_classes=NUM_CLASSES, mixed_precision=MIXED_PRECISION[precision]
        )
        self.fast, self.fast_step = fast, AdversarialStep(
            method.callbacks(settings), num_classes=NUM_CLASSES, mixed_precision=MIXED_PRECISION[precision],
            fast=True, compile_backend=backend,
        )  # fmt: skip
        # The hand-written SGLR table starts as the dataset's one-hot labels (robustmix fills rows lazily).
        self.table = F.one_hot(labels, NUM_CLASSES).float()
        self.last_passes: tuple[float, float] = (math.nan, math.nan)

    def _run(self, step: AdversarialStep, side: Side, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        model, optimizer, scaler = side
        with autocast(self.device, self.precision):
            loss, ctx = step(model, x, y, index if step.requires_index else None)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        self.last_passes = ctx.passes()
        return loss

    def run_rm(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        return self._run(self.step, self.rm, x, y, index)

    def run_fast(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return self._run(self.fast_step, self.fast, x, y, index)

    def run_hw(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        with autocast(self.device, self.precision):
            return self.method.handwritten(self.hw, x, y, index, self.table, self.settings)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn``.

    On a shared CPU the wall clock also counts the time other processes held the cores; the CPU time
    of this process does not, so its ratios are the steadier measure of overhead there. On CUDA the
    CPU time means nothing (kernels run asynchronously): use the wall clock.
    """
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


class SavedForBackward:
    """Peak bytes autograd holds for backward during a block: a device-independent proxy of activation memory.

    Every tensor a graph saves (activations, inputs of nonlinearities...) is counted from when it is saved
    until its graph is freed (after ``autograd.grad`` or ``backward``), once per storage; parameters are
    not counted (they live anyway). On CUDA the script also reports the allocator's real peak.
    """

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.current = 0
        self.peak = 0

    def __enter__(self) -> SavedForBackward:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: Tensor) -> _Saved:
        return _Saved(self, t)


class _Saved:
    def __init__(self, owner: SavedForBackward, t: Tensor) -> None:
        self.owner, self.tensor = owner, t
        self.key = None if isinstance(t, nn.Parameter) else t.untyped_storage().data_ptr()
        if self.key is not None:
            entry = owner.live.setdefault(self.key, [0, t.untyped_storage().nbytes()])
            if entry[0] == 0:
                owner.current += entry[1]
                owner.peak = max(owner.peak, owner.current)
            entry[0] += 1

    def __del__(self) -> None:
        if self.key is not None:
            entry = self.owner.live[self.key]
            entry[0] -= 1
            if entry[0] == 0:
                self.owner.current -= entry[1]
                del self.owner.live[self.key]


def _median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over repeats of ``a / b``, each pair timed back to back."""
    return statistics.median(x / y for x, y in zip(a, b))


def _ratio_iqr(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Interquartile range of the per-repeat ratios ``a / b``: how noisy the median is."""
    ratios = [x / y for x, y in zip(a, b)]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1, q3


def _peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of ``fn`` above what was allocated before it (model, optimizer state)."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def _count_syncs(fn: Callable[[], object]) -> int:
    """Host synchronizations ``fn`` triggers, counted by CUDA's sync debug mode."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


class Flops(TorchDispatchMode):
    """FLOPs of the operators run in the block, by the formulas of ``torch.utils.flop_counter`` (its registry).

    ``FlopCounterMode`` itself tracks modules with autograd hooks that ``torch.autograd.grad`` on an input refuses
    ("A leaf node was passed to _will_engine_execute_node"), so attacks cannot run under it; this mode counts the
    same operators (convolutions and matmuls, forward and backward) with the same formulas, without the hooks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Callable, types: object, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def _compile_count() -> int:
    """Frames dynamo has compiled so far, recompilations included."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _environment(device: torch.device) -> dict[str, object]:
    env: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        **versions(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def build_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    spec = dict(MODELS.get(args.model, {"name": args.model}))
    name = spec.pop("name")
    torch.manual_seed(args.seed)
    model = create_model(name, NUM_CLASSES, in_chans=args.channels, **spec).to(device).train()
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--model", default="small", help=f"{' or '.join(MODELS)} (shortcuts) or a timm model name")
    add("--batch-size", type=int, default=128)
    add("--image-size", type=int, default=32)
    add("--channels", type=int, default=1, help="input channels (1: digits-like, 3: CIFAR)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--precision", choices=PRECISIONS, default="fp32", help="autocast dtype of both sides")
    add("--channels-last", action="store_true", help="model and inputs in channels_last")
    add("--compile", action="store_true", help="torch.compile both models")
    add("--fast", action="store_true", help="also time robustmix's fast path (AdversarialStep(fast=True))")
    add("--fast-backend", default="inductor", help="torch.compile backend of the fast path (default: inductor)")
    add("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    add("--repeats", type=int, default=10, help="timed steps per side and method")
    add("--warmup", type=int, default=2, help="untimed steps per side and method first")
    add("--threads", type=int, default=1, help="torch CPU threads (1 by default: the machine is shared)")
    add("--attack-steps", type=int, default=10, help="K")
    add("--aa-steps", type=int, default=1, help="K_aa, descent steps of ADA-Lab's adversary's adversary")
    add("--eps", type=float, default=8 / 255)
    add("--step-size", type=float, default=2 / 255)
    add("--seed", type=int, default=0)
    add("--json", type=Path, help="also write every figure to this file")
    return p


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = parser()
    args = p.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := sorted(set(names) - set(METHODS)):
        p.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    if args.repeats < 1 or args.warmup < 0 or args.attack_steps < 1 or args.aa_steps < 0:
        p.error("need --repeats >= 1, --warmup >= 0, --attack-steps >= 1, --aa-steps >= 0")
    if args.fast and args.warmup < 1:
        p.error("--fast needs --warmup >= 1: the fast path compiles in its first step")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = _environment(device)
    settings = Settings(
        eps=args.eps, step_size=args.step_size, steps=args.attack_steps, aa_steps=args.aa_steps,
        num_examples=NUM_BATCHES * args.batch_size,
        attack_scale=FP16_ATTACK_SCALE if args.precision == "fp16" else 1.0,
    )  # fmt: skip

    reference = build_model(args, device)
    gen = torch.Generator().manual_seed(args.seed)
    n = NUM_BATCHES * args.batch_size
    images = torch.rand((n, args.channels, args.image_size, args.image_size), generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    index = torch.arange(n, device=device)
    batches = [
        (images[i : i + args.batch_size], labels[i : i + args.batch_size], index[i : i + args.batch_size])
        for i in range(0, n, args.batch_size)
    ]

    # Same algorithm: from the same weights and seed, one step of each side gives the same loss. The
    # counted passes, the peak of what autograd saves for backward and the host reads come from this step too.
    rows: dict[str, dict[str, object]] = {}
    # One fast model for every method and the timing: dynamo compiles per model object (and stops at 8 graphs).
    fast = fast_model(copy.deepcopy(reference), device, args.fast_backend) if args.fast else None
    for name in names:
        method = METHODS[name]
        fresh = [make_side(copy.deepcopy(reference), device, args.precision) for _ in range(2)]
        runner = Runner(method, *fresh, settings, args.precision, labels)
        torch.manual_seed(args.seed)
        with SavedForBackward() as saved_rm, HostReads() as reads_rm, Flops() as flops_rm:
            loss_rm = runner.run_rm(*batches[0])
        torch.manual_seed(args.seed)
        with SavedForBackward() as saved_hw, HostReads() as reads_hw, Flops() as flops_hw:
            loss_hw = runner.run_hw(*batches[0])
        loss_rm, loss_hw = loss_rm.item(), loss_hw.item()
        rows[name] = {
            "loss_rm": loss_rm,
            "loss_hw": loss_hw,
            "loss_abs_diff": abs(loss_rm - loss_hw),
            "flops_rm": flops_rm.total,
            "flops_hw": flops_hw.total,
            "saved_rm_bytes": saved_rm.peak,
            "saved_hw_bytes": saved_hw.peak,
            "host_reads_rm": reads_rm.count,
            "host_reads_hw": reads_hw.count,
            "passes_rm": runner.last_passes,
            "passes_theory": method.passes(args.attack_steps, args.aa_steps),
            "passes_doc": method.doc,
        }
        if args.fast:  # the same step on the fast path, from the same weights and seed (it compiles here)
            fast.load_state_dict(reference.state_dict())
            fast_start = make_side(fast, device, args.precision)
            runner = Runner(method, *fresh, settings, args.precision, labels, fast_start, args.fast_backend)
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            loss_fast = runner.run_fast(*batches[0]).item()  # a host read: the step has finished
            rows[name].update(
                loss_fast=loss_fast, loss_abs_diff_fast=abs(loss_fast - loss_hw), passes_fast=runner.last_passes,
                fast_first_step_s=time.perf_counter() - start,
            )  # fmt: skip

    # A host read inside the attack loop shows as a count that grows with the number of steps.
    attack_reads = {}
    for steps in (args.attack_steps, 2 * args.attack_steps):
        with HostReads() as reads, autocast(device, args.precision):
            perturb(reference, batches[0][0], batches[0][1], eps=args.eps, step_size=args.step_size, steps=steps)
        attack_reads[steps] = reads.count

    rm_model, hw_model = copy.deepcopy(reference), copy.deepcopy(reference)
    if args.compile:
        rm_model, hw_model = torch.compile(rm_model), torch.compile(hw_model)
    rm, hw = make_side(rm_model, device, args.precision), make_side(hw_model, device, args.precision)
    fast_timed = make_side(fast, device, args.precision) if args.fast else None
    runners = {
        name: Runner(METHODS[name], rm, hw, settings, args.precision, labels, fast_timed, args.fast_backend)
        for name in names
    }
    # A/A: the first method's hand-written step on a third model copy, timed like the others. Its ratio
    # to the hand-written side is what two identical steps differ by here: the resolution of every ratio.
    aa_model = copy.deepcopy(reference)
    aa_side = make_side(torch.compile(aa_model) if args.compile else aa_model, device, args.precision)
    aa_runner = Runner(METHODS[names[0]], rm, aa_side, settings, args.precision, labels)

    def eval_forward(x: Tensor) -> None:
        rm_model.eval()
        with torch.no_grad(), autocast(device, args.precision):
            rm_model(x)
        rm_model.train()

    def sides(name: str) -> list[tuple[str, Callable[..., Tensor]]]:
        out = [("rm", runners[name].run_rm), ("hw", runners[name].run_hw)]
        out += [("fast", runners[name].run_fast)] if args.fast else []
        return [*out, ("aa", aa_runner.run_hw)] if name == names[0] else out

    for name in names:
        for i in range(args.warmup):
            for _, run in sides(name):
                run(*batches[i % NUM_BATCHES])
    compiling = args.compile or args.fast
    compiles_after_warmup = _compile_count() if compiling else None

    times: dict[str, dict[str, list[tuple[float, float]]]] = {
        name: {"rm": [], "hw": [], "aa": [], "fast": []} for name in names
    }
    forward_times: list[tuple[float, float]] = []
    order = random.Random(args.seed)
    for r in range(args.repeats):
        batch = batches[r % NUM_BATCHES]
        for name in names:
            # A fresh random order every repeat, so a drift in machine load favours no side.
            for side, run in order.sample(sides(name), k=len(sides(name))):
                times[name][side].append(_timed(partial(run, *batch), device))
        forward_times.append(_timed(partial(eval_forward, batch[0]), device))
    compiles_during_timing = _compile_count() - compiles_after_warmup if compiling else None

    for name in names:
        (rm_wall, rm_cpu), (hw_wall, hw_cpu) = zip(*times[name]["rm"]), zip(*times[name]["hw"])
        rows[name].update(
            rm_step_s=statistics.median(rm_wall),
            hw_step_s=statistics.median(hw_wall),
            rm_img_s=args.batch_size / statistics.median(rm_wall),
            hw_img_s=args.batch_size / statistics.median(hw_wall),
            ratio=_median_ratio(rm_wall, hw_wall),
            speedup_rm=_median_ratio(hw_wall, rm_wall),
            ratio_iqr=_ratio_iqr(rm_wall, hw_wall),
            rm_wall_s=rm_wall,
            hw_wall_s=hw_wall,
        )
        if device.type == "cpu":
            rows[name].update(
                rm_cpu_step_s=statistics.median(rm_cpu), hw_cpu_step_s=statistics.median(hw_cpu),
                ratio_cpu=_median_ratio(rm_cpu, hw_cpu), ratio_cpu_iqr=_ratio_iqr(rm_cpu, hw_cpu),
                rm_cpu_s=rm_cpu, hw_cpu_s=hw_cpu,
            )  # fmt: skip
        if args.fast:
            fast_wall, fast_cpu = zip(*times[name]["fast"])
            rows[name].update(
                fast_step_s=statistics.median(fast_wall), fast_img_s=args.batch_size / statistics.median(fast_wall),
                # Speed-ups: hand-written eager step time / the side's, per repeat (> 1: faster than by hand).
                speedup_fast=_median_ratio(hw_wall, fast_wall), speedup_fast_iqr=_ratio_iqr(hw_wall, fast_wall),
                speedup_fast_over_rm=_median_ratio(rm_wall, fast_wall), fast_wall_s=fast_wall,
            )  # fmt: skip
            if device.type == "cpu":
                rows[name].update(
                    fast_cpu_step_s=statistics.median(fast_cpu), speedup_fast_cpu=_median_ratio(hw_cpu, fast_cpu)
                )
        rows[name].update(_flop_rates(rows[name], device, args))
    (aa_wall, aa_cpu), (hw_wall, hw_cpu) = zip(*times[names[0]]["aa"]), zip(*times[names[0]]["hw"])
    calibration = {
        "method": names[0],
        "ratio": _median_ratio(aa_wall, hw_wall),
        "ratio_iqr": _ratio_iqr(aa_wall, hw_wall),
        **({"ratio_cpu": _median_ratio(aa_cpu, hw_cpu), "ratio_cpu_iqr": _ratio_iqr(aa_cpu, hw_cpu)}
           if device.type == "cpu" else {}),
    }  # fmt: skip
    cuda = _cuda_checks(rows, runners, batches[0], labels, args) if device.type == "cuda" else None
    env["load_average_end"] = os.getloadavg()
    result = {
        "environment": env,
        "settings": {**vars(args), "json": str(args.json) if args.json else None},
        "methods": rows,
        "calibration": calibration,
        "attack_host_reads": attack_reads,
        "eval_forward_s": statistics.median(t[0] for t in forward_times),
        "eval_forward_cpu_s": statistics.median(t[1] for t in forward_times),
        "compiles_in_warmup": compiles_after_warmup,
        "compiles_during_timing": compiles_during_timing,
        "graph_breaks": _graph_breaks() if compiling else None,
        "cuda": cuda,
    }
    result["targets"] = _targets(result, args)
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak TFLOP/s for ``precision`` from ``PEAK_TFLOPS``; ``None`` when unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def _flop_rates(row: dict[str, object], device: torch.device, args: argparse.Namespace) -> dict[str, object]:
    """Achieved FLOP/s of every timed side: the hand-written step's counted FLOPs over the side's step time."""
    peak = peak_tflops(device, args.precision)
    out: dict[str, object] = {"flops_per_image": row["flops_hw"] / args.batch_size, "peak_tflops": peak}
    for side in ("hw", "rm", "fast"):
        if f"{side}_step_s" in row:
            tflops = row["flops_hw"] / row[f"{side}_step_s"] / 1e12
            out[f"{side}_tflops"] = tflops
            out[f"{side}_peak_fraction"] = tflops / peak if peak else None
    return out


def _cuda_checks(
    rows: dict[str, dict[str, object]], runners: dict[str, Runner], batch: tuple[Tensor, Tensor, Tensor],
    labels: Tensor, args: argparse.Namespace,
) -> dict[str, object]:  # fmt: skip
    """Peak memory and host syncs of one step per side; syncs of the attack loop; bf16 against fp32."""
    device = labels.device
    for name, runner in runners.items():
        peak_rm = _peak_memory(partial(runner.run_rm, *batch), device)
        peak_hw = _peak_memory(partial(runner.run_hw, *batch), device)
        rows[name].update(
            peak_rm_bytes=peak_rm, peak_hw_bytes=peak_hw, memory_ratio=peak_rm / peak_hw,
            syncs_rm=_count_syncs(partial(runner.run_rm, *batch)),
            syncs_hw=_count_syncs(partial(runner.run_hw, *batch)),
        )  # fmt: skip
        if args.fast:
            rows[name].update(
                peak_fast_bytes=_peak_memory(partial(runner.run_fast, *batch), device),
                syncs_fast=_count_syncs(partial(runner.run_fast, *batch)),
            )
    any_runner = next(iter(runners.values()))
    model, (x, y, _) = any_runner.rm.model, batch

    def attack(steps: int) -> None:
        with autocast(device, args.precision):
            perturb(model, x, y, eps=args.eps, step_size=args.step_size, steps=steps)

    attack(2)  # warm-up: lazy initialisation is not the loop's
    # A sync inside the loop shows as a count that grows with the number of steps.
    out: dict[str, object] = {
        "attack_syncs_k": _count_syncs(partial(attack, args.attack_steps)),
        "attack_syncs_2k": _count_syncs(partial(attack, 2 * args.attack_steps)),
    }
    # bf16 against fp32, robustmix's PGD-AT step, interleaved on the same model; fp32 twice: with PyTorch's
    # defaults (cuDNN convolutions in TF32) and strict IEEE fp32, so both baselines come from one run.
    fp32, bf16 = (Runner(METHODS["pgd_at"], any_runner.rm, any_runner.hw, any_runner.settings, precision, labels)
                  for precision in ("fp32", "bf16"))  # fmt: skip

    def fp32_strict() -> None:
        with strict_fp32():
            fp32.run_rm(*batch)

    steps = (partial(fp32.run_rm, *batch), fp32_strict, partial(bf16.run_rm, *batch))
    for step in steps:
        step()
    times = [[_timed(step, device)[0] for step in steps] for _ in range(args.repeats)]
    default, strict, low = zip(*times)
    out["bf16_speedup"] = _median_ratio(default, low)
    out["bf16_speedup_strict_fp32"] = _median_ratio(strict, low)
    out["tf32_speedup"] = _median_ratio(strict, default)
    return out


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls in IEEE fp32 (no TF32) inside the block; the flags are restored after."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision"):
        flags = [(conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    else:  # torch before 2.9: the older flags
        flags = [(torch.backends.cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]
    saved = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, value in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


def _fmt_passes(passes: tuple[float, float]) -> str:
    return f"{passes[0]:g}/{passes[1]:g}"


def _fmt_range(bounds: tuple[float, float]) -> str:
    return f"{bounds[0]:.2f}-{bounds[1]:.2f}"


def _targets(result: dict[str, object], args: argparse.Namespace) -> list[dict[str, str]]:
    """The issue's targets, each with its measured value and PASS / FAIL / not measured."""
    rows, cuda, compiles = result["methods"], result["cuda"], result["compiles_during_timing"]
    k, k_aa = args.attack_steps, args.aa_steps
    gpu_only = "not measured: GPU only, no CUDA device in this run"
    out: list[dict[str, str]] = []

    def add(claim: str, measured: str, ok: bool | None) -> None:
        out.append({"target": claim, "measured": measured, "verdict": {None: "-", True: "PASS", False: "FAIL"}[ok]})

    for name, row in rows.items():
        add(f"{name} passes counted == stated in {row['passes_doc']}",
            f"{_fmt_passes(row['passes_rm'])} vs {_fmt_passes(row['passes_theory'])}",
            tuple(row["passes_rm"]) == tuple(row["passes_theory"]))  # fmt: skip
    pgd, ada = rows.get("pgd_at"), rows.get("adalab")
    # On a shared CPU the process's CPU time is the steadier measure; wall-clock figures are shown beside it.
    cpu_clock = not cuda
    clock_name = "CPU time" if cpu_clock else "wall clock"
    if pgd:
        ratio = "ratio_cpu" if cpu_clock else "ratio"
        add(f"PGD-AT step time robustmix / hand-written <= {PGD_AT_RATIO_TARGET} ({clock_name})",
            f"{pgd[ratio]:.3f} (IQR {_fmt_range(pgd[ratio + '_iqr'])}; wall clock {pgd['ratio']:.3f})",
            pgd[ratio] <= PGD_AT_RATIO_TARGET)  # fmt: skip
        for name in ("gairat", "mail"):
            if name in rows:
                add(f"{name} adds no pass over PGD-AT",
                    f"{_fmt_passes(rows[name]['passes_rm'])} vs {_fmt_passes(pgd['passes_rm'])}",
                    tuple(rows[name]["passes_rm"]) == tuple(pgd["passes_rm"]))  # fmt: skip
    if pgd and ada:
        # The adversary's adversary costs K_aa forwards and backwards, p(x_aa) one forward; the rest is free.
        rest = (ada["passes_rm"][0] - k_aa - 1, ada["passes_rm"][1] - k_aa)
        add("ADA-Lab's margin, labels and weights add no pass (ADA-Lab minus its adversary's adversary vs PGD-AT)",
            f"{_fmt_passes(rest)} vs {_fmt_passes(pgd['passes_rm'])}", rest == tuple(pgd["passes_rm"]))  # fmt: skip
        if k_aa == 1:
            bound = (k + 3, k + 2)  # PGD-AT's (K + 1) x (K + 2) / (K + 1) passes, plus one forward
            add("ADA-Lab (K_aa=1) passes <= PGD-AT's x (K+2)/(K+1) + one forward",
                f"{_fmt_passes(ada['passes_rm'])} vs {_fmt_passes(bound)}",
                ada["passes_rm"][0] <= bound[0] and ada["passes_rm"][1] <= bound[1])  # fmt: skip
            step, forward = ("rm_cpu_step_s", "eval_forward_cpu_s") if cpu_clock else ("rm_step_s", "eval_forward_s")
            limit = pgd[step] * (k + 2) / (k + 1) + result[forward]
            add(f"ADA-Lab (K_aa=1) step time <= PGD-AT's x (K+2)/(K+1) + one eval forward, robustmix ({clock_name})",
                f"{ada[step] * 1e3:.1f} ms vs {limit * 1e3:.1f} ms", ada[step] <= limit)  # fmt: skip
        else:
            add("ADA-Lab (K_aa=1) cost bounds", "not measured: run with --aa-steps 1", None)
    if cuda:
        add("no host sync inside the attack loop (equal sync counts at K and 2K steps)",
            f"{cuda['attack_syncs_k']} at K, {cuda['attack_syncs_2k']} at 2K",
            cuda["attack_syncs_k"] == cuda["attack_syncs_2k"])  # fmt: skip
        shape = f"{args.model}, {args.image_size}px, batch {args.batch_size}"
        add(f"bf16 >= {BF16_SPEEDUP_TARGET}x fp32, PGD-AT (target set for resnet18, 32x32, batch 512)",
            f"{cuda['bf16_speedup']:.2f}x ({shape}; fp32 with PyTorch's default TF32 convolutions)",
            cuda["bf16_speedup"] >= BF16_SPEEDUP_TARGET)  # fmt: skip
        add(f"bf16 >= {BF16_SPEEDUP_TARGET}x strict IEEE fp32 (TF32 off), PGD-AT",
            f"{cuda['bf16_speedup_strict_fp32']:.2f}x ({shape}; TF32 alone gives {cuda['tf32_speedup']:.2f}x)",
            cuda["bf16_speedup_strict_fp32"] >= BF16_SPEEDUP_TARGET)  # fmt: skip
        for name, row in rows.items():
            add(f"{name} peak GPU memory of a step, robustmix / hand-written <= {MEMORY_TARGET}",
                f"{row['memory_ratio']:.3f}", row["memory_ratio"] <= MEMORY_TARGET)  # fmt: skip
    for name, row in rows.items():
        saved = row["saved_rm_bytes"] / row["saved_hw_bytes"]
        add(f"{name} peak saved-for-backward bytes robustmix / hand-written <= {MEMORY_TARGET} (memory proxy)",
            f"{saved:.3f}", saved <= MEMORY_TARGET)  # fmt: skip
    k_reads, k2_reads = result["attack_host_reads"].values()
    add("no host read inside the attack loop (equal counts at K and 2K steps; any device)",
        f"{k_reads} at K, {k2_reads} at 2K", k_reads == k2_reads)  # fmt: skip
    if not cuda:
        add("no host sync inside the attack loop (CUDA sync debug mode)", gpu_only, None)
        add(f"bf16 >= {BF16_SPEEDUP_TARGET}x fp32 (resnet18, 32x32, batch 512)", gpu_only, None)
        add(f"peak GPU memory of a step, robustmix / hand-written <= {MEMORY_TARGET}", gpu_only, None)
    if compiles is None:
        add("torch.compile: no recompiles after warm-up", "not measured: run with --compile or --fast", None)
    else:
        add("torch.compile: no recompiles after warm-up",
            f"{compiles} compiles in the timed steps ({result['compiles_in_warmup']} frames compiled in the warm-up, "
            f"{result['graph_breaks']} graph breaks)", compiles == 0)  # fmt: skip
    _fast_targets(add, result, args)
    return out


def _fast_targets(add: Callable[[str, str, bool | None], None], result: dict[str, object],
                  args: argparse.Namespace) -> None:  # fmt: skip
    """Issue 22's targets for the fast path; each holds for its stated setting only, else it says what to run."""
    pgd, cuda = result["methods"].get("pgd_at"), result["cuda"]
    if not args.fast or not pgd:
        add("fast path targets (issue 22)", "not measured: run with --fast and pgd_at among --methods", None)
        return
    add("fast path: one step from the same weights and seed gives the hand-written loss (fp32: < 1e-4)",
        f"|dloss| {pgd['loss_abs_diff_fast']:.1e} ({args.precision}); passes {_fmt_passes(pgd['passes_fast'])}",
        pgd["loss_abs_diff_fast"] < 1e-4 if args.precision == "fp32" else None)  # fmt: skip
    headline = (args.model, args.channels, args.image_size, args.batch_size, args.precision, args.attack_steps)
    speed = f"{pgd['speedup_fast']:.2f}x (IQR {_fmt_range(pgd['speedup_fast_iqr'])})"
    if not cuda:
        add(f"fast path >= {FAST_SPEEDUP_TARGET}x hand-written eager (resnet18, 32x32x3, batch 512, bf16, PGD-10)",
            f"{speed} on this CPU; the target is set for an H100", None)  # fmt: skip
        return
    if headline == ("resnet18", 3, 32, 512, "bf16", 10):
        add(f"fast path >= {FAST_SPEEDUP_TARGET}x hand-written eager, PGD-AT (resnet18, 32x32x3, batch 512, bf16)",
            speed, pgd["speedup_fast"] >= FAST_SPEEDUP_TARGET)  # fmt: skip
        fraction = pgd.get("fast_peak_fraction")
        add(f"fast path >= {PEAK_FRACTION_TARGET:.0%} of the dense bf16 peak, PGD-AT",
            f"{fraction:.1%} of {pgd['peak_tflops']} TFLOP/s" if fraction is not None else "peak unknown for this GPU",
            None if fraction is None else fraction >= PEAK_FRACTION_TARGET)  # fmt: skip
    elif args.model == "small" and args.batch_size == 128:
        over_rm = pgd["speedup_fast_over_rm"]
        add(f"fast path >= {LAUNCH_BOUND_SPEEDUP_TARGET}x robustmix eager, PGD-AT (small model, batch 128)",
            f"{over_rm:.2f}x", over_rm >= LAUNCH_BOUND_SPEEDUP_TARGET)  # fmt: skip
    else:
        add("fast path targets (issue 22)", f"{speed}; the targets are set for other settings", None)


def _print(result: dict[str, object]) -> None:
    env, rows, cuda = result["environment"], result["methods"], result["cuda"]
    print(f"# {env['date']}  torch {env['torch']}  {env.get('gpu', env['cpu'])}  torch threads {env['torch_threads']}")
    print(f"# {env['command']}")
    print(f"# load average (1, 5, 15 min) {env['load_average_start']} -> {env['load_average_end']}")
    cpu = "ratio_cpu" in next(iter(rows.values()))
    head = f"{'method':<8} {'rm img/s':>9} {'hw img/s':>9} {'ratio wall [IQR]':>23}"
    head += f" {'ratio CPU [IQR]':>23}" if cpu else ""
    head += f" {'passes rm':>10} {'theory':>7} {'|dloss|':>8} {'saved MiB rm/hw':>16} {'reads rm/hw':>11}"
    print(head + ("  peak MiB rm/hw  mem ratio  syncs rm/hw" if cuda else ""))
    for name, row in rows.items():
        line = f"{name:<8} {row['rm_img_s']:>9.1f} {row['hw_img_s']:>9.1f}"
        line += f" {row['ratio']:>10.3f} [{_fmt_range(row['ratio_iqr'])}]"
        if cpu:
            line += f" {row['ratio_cpu']:>10.3f} [{_fmt_range(row['ratio_cpu_iqr'])}]"
        line += (
            f" {_fmt_passes(row['passes_rm']):>10} {_fmt_passes(row['passes_theory']):>7} {row['loss_abs_diff']:>8.1e}"
            f" {row['saved_rm_bytes'] / 2**20:>8.1f}/{row['saved_hw_bytes'] / 2**20:<7.1f}"
            f" {row['host_reads_rm']:>6}/{row['host_reads_hw']:<4}"
        )
        if cuda:
            line += (
                f"  {row['peak_rm_bytes'] / 2**20:>7.0f}/{row['peak_hw_bytes'] / 2**20:<7.0f}"
                f"{row['memory_ratio']:>9.3f}  {row['syncs_rm']:>6}/{row['syncs_hw']}"
            )
        print(line)
    cal = result["calibration"]
    line = f"{'A/A':<8} {'':>9} {'':>9} {cal['ratio']:>10.3f} [{_fmt_range(cal['ratio_iqr'])}]"
    if cpu:
        line += f" {cal['ratio_cpu']:>10.3f} [{_fmt_range(cal['ratio_cpu_iqr'])}]"
    print(line + f"  ({cal['method']} hand-written on a second model copy / hand-written: the noise floor)")
    print("img/s: batch size / median wall-clock step time. ratio: median over repeats of robustmix step time /")
    print("hand-written step time, timed back to back; [IQR] of those ratios. CPU: this process's CPU time.")
    print(f"passes: forwards/backwards per step, in batches. Eval forward: {result['eval_forward_s'] * 1e3:.1f} ms.")
    print("|dloss|: loss difference of one step from the same weights and seed. saved: peak bytes autograd holds")
    print("for backward during that step (parameters excluded). reads: tensor values read back to the host in that")
    print("step (.item(), bool(), .tolist()...; each a synchronization on CUDA).")
    print()
    _print_side_by_side(rows, cuda)
    for t in result["targets"]:
        print(f"{t['verdict']:<5} {t['target']}: {t['measured']}")


def _print_side_by_side(rows: dict[str, dict[str, object]], cuda: dict[str, object] | None) -> None:
    """Hand-written eager, robustmix eager and (with --fast) the fast path: speed, memory and FLOP/s."""
    first = next(iter(rows.values()))
    sides = ("hw", "rm", "fast") if "fast_img_s" in first else ("hw", "rm")
    peak = first["peak_tflops"]
    print("side by side: hw = hand-written eager loop, rm = robustmix eager" + (", fast = robustmix fast path"
          if "fast" in sides else " (--fast adds the fast path)"))  # fmt: skip
    head = f"{'method':<8} {'GFLOP/img':>9}" + "".join(f" {s + ' img/s':>11}" for s in sides)
    head += "".join(f" {'x hw (' + s + ')':>10}" for s in sides[1:])
    head += "".join(f" {s + ' TFLOP/s':>13}" for s in sides) + (" % of peak " + "/".join(sides) if peak else "")
    print(head + ("  peak MiB " + "/".join(sides) if cuda else ""))
    for name, row in rows.items():
        line = f"{name:<8} {row['flops_per_image'] / 1e9:>9.2f}"
        line += "".join(f" {row[s + '_img_s']:>11.1f}" for s in sides)
        line += "".join(f" {row['speedup_' + s]:>10.2f}" for s in sides[1:])
        line += "".join(f" {row[s + '_tflops']:>13.3f}" for s in sides)
        if peak:
            line += "  " + "/".join(f"{row[s + '_peak_fraction']:.1%}" for s in sides)
        if cuda:
            line += "  " + "/".join(f"{row['peak_' + s + '_bytes'] / 2**20:.0f}" for s in sides)
        print(line)
    print("x hw: median over repeats of hand-written step time / the side's (> 1: faster than by hand). FLOPs:")
    print("counted by torch.utils.flop_counter's formulas on one hand-written eager step; TFLOP/s: those FLOPs / its")
    print("median step time.")
    print(f"peak: {PEAK_SOURCE}" if peak else "peak: unknown for this device (CPU): FLOP/s only.")
    if "speedup_fast_cpu" in first:
        print("x hw by this process's CPU time: " + ", ".join(
            f"{n} rm {1 / r['ratio_cpu']:.2f}, fast {r['speedup_fast_cpu']:.2f}" for n, r in rows.items()
        ))  # fmt: skip
    if "fast" in sides:
        first = ", ".join(f"{n} {r['fast_first_step_s']:.1f} s" for n, r in rows.items())
        print(f"fast path: first step of each method (compiling what it needs): {first}; |dloss| vs hand-written: "
              + ", ".join(f"{n} {r['loss_abs_diff_fast']:.1e}" for n, r in rows.items()))  # fmt: skip
        if cuda:
            print("fast path peak memory: the step's peak above what was allocated before it; the CUDA graph's")
            print("memory pool, allocated when it was recorded in the warm-up, counts as before.")
    print()


if __name__ == "__main__":
    main()
