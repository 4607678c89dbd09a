"""Which passes through a model compiled in place fail on CUDA? One variant per process.

Seen on an H100 (torch 2.11, 2026-12-05): the fast path's eager PGD on an epoch's short last batch, through the
model compiled in place (channels_last weights, bf16 autocast, eval mode), failed in the compiled backward's
stride check of ``convolution_backward`` (pytorch#171622). The eager attack loop now runs such a model eagerly
(``robustmix.attacks.pgd.eager_model``). Each variant runs its passes three times on the digits model and prints
``ok`` or the error's first line:

- ``attack-old-*``: the eager PGD-10 loop through the compiled model, as before the change (reproduces the failure?);
- ``attack-*``: the same loop as shipped (the model's eager forward inside the attack);
- ``iteration-*``: the fast path's compiled attack iteration at the short batch size;
- ``train-*``: the training pass (train mode, forward and ``backward``) at the full batch size, then the short one.

    python benchmarks/gpu_short_batch.py                   # every variant, each in its own process
    python benchmarks/gpu_short_batch.py --variant attack-old-short-cl-bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_equivalence import EPS, STEP_SIZE, make_model

import robustmix.attacks.pgd as pgd_module
from robustmix.attacks import perturb

FULL, SHORT = 128, 105
# name: (what, batch, channels_last, bf16)
VARIANTS = {
    "attack-old-short-cl-bf16": ("attack-old", SHORT, True, True),
    "attack-old-full-cl-bf16": ("attack-old", FULL, True, True),
    "attack-old-short-cl-fp32": ("attack-old", SHORT, True, False),
    "attack-old-short-contiguous-bf16": ("attack-old", SHORT, False, True),
    "attack-short-cl-bf16": ("attack", SHORT, True, True),
    "iteration-short-cl-bf16": ("iteration", SHORT, True, True),
    "train-short-cl-bf16": ("train", SHORT, True, True),
}


def run(variant: str) -> str:
    what, batch, channels_last, bf16 = VARIANTS[variant]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    model = make_model(0, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.compile(backend=backend)
    if what == "attack-old":  # the loop as it was: the compiled forward and backward inside the attack
        pgd_module.eager_model = contextlib.nullcontext
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    for size in (FULL, batch) if what == "train" else (batch,) * 3:
        x = torch.rand(size, 1, 32, 32, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (size,), device=device)
        with amp:
            if what == "train":
                model.train()
                F.cross_entropy(model(x), y).backward()
            else:
                model.eval()
                perturb(model, x, y, eps=EPS, step_size=STEP_SIZE, steps=10, bn_mode="eval",
                        compile_backend=backend if what == "iteration" else None)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize()
    return f"{variant}: ok in {time.perf_counter() - start:.1f} s ({device.type})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=VARIANTS, help="run this one (default: each in its own process)")
    parser.add_argument("--timeout", type=float, default=90, help="seconds per variant")
    parser.add_argument("--json", type=Path, help="write {variant: its line} here")
    args = parser.parse_args()
    if args.variant is not None:
        try:
            print(run(args.variant))
        except Exception as err:  # the point is to see which variants fail, and how
            print(f"{args.variant}: FAILED: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
        return
    lines = {}
    for variant in VARIANTS:
        try:
            out = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True,
                                 timeout=args.timeout, check=False)  # fmt: skip
            lines[variant] = (out.stdout.strip().splitlines() or [f"{variant}: no output (exit {out.returncode})"])[-1]
        except subprocess.TimeoutExpired:
            lines[variant] = f"{variant}: timed out after {args.timeout:.0f} s"
        print(lines[variant], flush=True)
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "variants": lines}, indent=1))


if __name__ == "__main__":
    main()
