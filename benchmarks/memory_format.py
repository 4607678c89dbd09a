"""channels_last against the default (contiguous) memory format, side by side in one run: the passes adversarial
training and the evaluation suite are made of, and the suite itself with the agreement of its per-example results.

    python benchmarks/memory_format.py --run-dir runs/fashion-mnist/pgd_at-seed0 --n-examples 128
    python benchmarks/memory_format.py --dataset digits --n-examples 64 --attacks pgd20 square   # no trained run

Measured, alternating the two formats repeat by repeat so that a change in the machine's load hits both:
- ``forward``: logits of a batch under ``torch.no_grad`` (what Square's 5,000 queries are made of);
- ``input grad``: forward and backward to the input (one step of PGD, CW, APGD);
- ``train step``: forward and backward to the weights in train mode (the training pass).
Then the evaluation suite (``worst_case``, standalone, the attacks given) on the first ``--n-examples`` test images
in chunks of ``--suite-chunk``, each chunk once in each format with the same seed, the formats alternating which
goes first: the time of each format, its accuracies and how many examples the two formats judge differently
(clean, worst case and each attack alone). The model's logits differ by float rounding only, but an iterative
attack amplifies rounding, so a few borderline examples can end on the other side; the accuracies must agree
within that.

Timings never gate a test; the figures go to benchmarks/RESULTS.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustmix.data import load_split
from robustmix.evaluation.worstcase import worst_case
from robustmix.models import create_model
from robustmix.runs.folder import load_config, load_model

FORMATS = ("contiguous", "channels_last")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", help="a trained run folder (its model, dataset and eps); default: an untrained model")
    p.add_argument("--dataset", default="fashion-mnist", help="without --run-dir: the data set (fashion-mnist)")
    p.add_argument("--model", default="test_resnet", help="without --run-dir: the timm model (default test_resnet)")
    p.add_argument("--eps", type=float, help="attack radius (default: the run's, else 0.1)")
    p.add_argument("--batch-size", type=int, default=256, help="examples per pass and per attack call (256)")
    p.add_argument("--train-batch-size", type=int, default=128, help="examples per training step (128)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats of each pass per format (7)")
    p.add_argument("--n-examples", type=int, default=128, help="test images the suite runs on; 0 skips it (128)")
    p.add_argument("--suite-chunk", type=int, default=64, help="examples per suite chunk and attack call (64)")
    p.add_argument("--attacks", nargs="+", default=["pgd20", "cw", "apgd-ce", "apgd-t", "square"])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    for name in ("batch_size", "train_batch_size", "repeats", "suite_chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.n_examples < 0:
        p.error(f"--n-examples must be at least 0, got {args.n_examples}")
    return args


def models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The same weights twice: once as loaded, once converted to channels_last."""
    if args.run_dir:
        built = {fmt: load_model(args.run_dir) for fmt in FORMATS}
    else:
        torch.manual_seed(0)
        data = load_split(args.dataset, "test")
        first = create_model(args.model, num_classes=data.num_classes, in_chans=data.image_shape[0])
        second = create_model(args.model, num_classes=data.num_classes, in_chans=data.image_shape[0])
        second.load_state_dict(first.state_dict())
        built = {"contiguous": first, "channels_last": second}
    built["channels_last"] = built["channels_last"].to(memory_format=torch.channels_last)
    return {fmt: model.eval() for fmt, model in built.items()}


def timed(passes: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each pass, the passes alternating within each repeat (one warm-up call each first)."""
    times: dict[str, list[float]] = {name: [] for name in passes}
    for fn in passes.values():
        fn()
    for _ in range(repeats):
        for name, fn in passes.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def suite_side_by_side(
    nets: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, eps: float
) -> dict[str, object]:
    """The evaluation suite in both formats, chunk by chunk: each chunk in one format, then in the other (the
    first format alternating), so that a change of load hits both; the per-example results of both formats."""
    seconds = dict.fromkeys(FORMATS, 0.0)
    masks: dict[str, dict[str, list[torch.Tensor]]] = {fmt: {} for fmt in FORMATS}
    for c, (xc, yc) in enumerate(zip(x.split(args.suite_chunk), y.split(args.suite_chunk))):
        for fmt in FORMATS if c % 2 == 0 else FORMATS[::-1]:
            start = time.perf_counter()
            result = worst_case(nets[fmt], xc, yc, args.attacks, eps=eps, batch_size=args.suite_chunk, seed=c)
            seconds[fmt] += time.perf_counter() - start
            per_example = {
                "clean": result["per_example"]["correct"],
                "worst case": result["robust"],
                **result["per_example"]["standalone"],
            }
            for name, mask in per_example.items():
                masks[fmt].setdefault(name, []).append(mask)
    joined = {fmt: {name: torch.cat(parts) for name, parts in masks[fmt].items()} for fmt in FORMATS}
    first, second = (joined[fmt] for fmt in FORMATS)
    return {
        "attacks": args.attacks, "eps": eps, "n_examples": len(x), "chunk": args.suite_chunk, "seconds": seconds,
        "speedup": seconds["contiguous"] / seconds["channels_last"],
        "accuracies": {
            name: {
                "contiguous": first[name].float().mean().item(),
                "channels_last": second[name].float().mean().item(),
                "examples_judged_differently": int((first[name] != second[name]).sum()),
            }
            for name in first
        },
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    nets = models(args)
    config = load_config(args.run_dir) if args.run_dir else None
    dataset = config["data"]["dataset"] if config else args.dataset
    eps = args.eps if args.eps is not None else (config["attack"]["eps"] if config else 0.1)
    x_all, y_all = load_split(dataset, "test", path=config["data"]["path"] if config else None).tensors()
    x, y = x_all[: args.batch_size], y_all[: args.batch_size]
    xt, yt = x_all[: args.train_batch_size], y_all[: args.train_batch_size]
    inputs = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}

    def forward(fmt: str) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return nets[fmt](inputs[fmt])

        return run

    def input_grad(fmt: str) -> Callable[[], object]:
        def run() -> object:
            point = inputs[fmt].clone().requires_grad_(True)
            return torch.autograd.grad(F.cross_entropy(nets[fmt](point), y), point)[0]

        return run

    # Copies: a train-mode forward moves BatchNorm's running statistics, which the suite below must not see.
    trainees = {fmt: copy.deepcopy(nets[fmt]).train() for fmt in FORMATS}

    def train_step(fmt: str) -> Callable[[], object]:
        def run() -> object:
            trainees[fmt].zero_grad(set_to_none=True)
            return F.cross_entropy(trainees[fmt](xt), yt).backward()

        return run

    figures: dict[str, object] = {
        "command": " ".join(["python", "benchmarks/memory_format.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} thread(s)",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "model": args.run_dir or f"{args.model} (untrained) on {dataset}",
        "passes": {},
    }
    with torch.no_grad():
        drift = (nets["contiguous"](x) - nets["channels_last"](inputs["channels_last"])).abs().max().item()
    figures["max_logit_difference"] = drift
    print(f"{figures['model']}; {figures['machine']}; torch {torch.__version__}; max |logit difference| {drift:.2e}")
    print(f"{'pass':<12} {'contiguous':>12} {'channels_last':>14} {'speed-up':>9}")
    for label, make, size in (
        ("forward", forward, args.batch_size),
        ("input grad", input_grad, args.batch_size),
        ("train step", train_step, args.train_batch_size),
    ):
        seconds = timed({fmt: make(fmt) for fmt in FORMATS}, args.repeats)
        ratio = seconds["contiguous"] / seconds["channels_last"]
        figures["passes"][label] = {"batch": size, "seconds": seconds, "speedup": ratio}
        print(f"{label:<12} {seconds['contiguous'] * 1e3:>9.1f} ms {seconds['channels_last'] * 1e3:>11.1f} ms "
              f"{ratio:>8.2f}x")  # fmt: skip

    if args.n_examples:
        suite = suite_side_by_side(nets, x_all[: args.n_examples], y_all[: args.n_examples], args, eps)
        figures["suite"] = suite
        print(f"suite ({' '.join(args.attacks)}; eps {eps:g}; first {args.n_examples} test images in chunks of "
              f"{args.suite_chunk}, chunk c seeded c): contiguous {suite['seconds']['contiguous']:.1f} s, "
              f"channels_last {suite['seconds']['channels_last']:.1f} s, {suite['speedup']:.2f}x")  # fmt: skip
        for name, row in suite["accuracies"].items():
            print(f"  {name:<11} {100 * row['contiguous']:6.2f}% {100 * row['channels_last']:6.2f}%  "
                  f"{row['examples_judged_differently']} example(s) judged differently")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
