"""What every recipe shares: its command line (the shared flags, their parsing and checks) and the path from flags
to a finished run.

A recipe is a short script: its own flags (if any), the callbacks of its method, and one call:

    def build_callbacks(args, info):
        return [PGDAttack(args.eps, args.step_size, args.attack_steps), AdversarialCE()]

    def main(argv=None):
        args = parse_args(base_parser("pgd_at", __doc__), argv)
        return run_recipe(args, build_callbacks)

``run_recipe`` loads the data, builds the model, optimizer and lr schedule, trains with
``Trainer``, evaluates the final (and best) weights on the test split and writes
the run folder described in ``robustmix.runs.folder``.

A recipe's own flags take the same argparse types as the shared ones (``robustmix.cli.args``), so a bad value is
a one-line error before any work: ``number`` (``0.1`` or ``8/255``, never NaN), ``positive_number``,
``nonnegative_number``, ``positive_int`` and ``nonnegative_int``:

    parser.add_argument("--beta", type=nonnegative_number, default=6.0)

The presets are ``robustmix.cli.presets``'s, the optimizer and lr schedule ``robustmix.cli.optim``'s, and
``--config`` files ``robustmix.cli.config``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import hashlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import timm
import torch
from accelerate import PartialState
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType, parse_flag_from_env, set_seed
from safetensors.torch import load_file

from robustmix.cli.args import MAX_SEED, nonnegative_int, nonnegative_number, positive_int, positive_number, seed_int
from robustmix.cli.config import check_resumed_flags, config_file_values
from robustmix.cli.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler
from robustmix.cli.presets import PAPER_PRESET, PRESETS, fill_unset, preset_help, preset_values
from robustmix.core.callbacks import Callback
from robustmix.core.modes import BN_MODES
from robustmix.core.step import MIXED_PRECISION, AdversarialStep
from robustmix.data import DATASETS, ImageDataset, check_disjoint, load_split, training_subset
from robustmix.models import create_model, model_config, unwrap_model
from robustmix.runs.checkpoint import CheckpointError, atomic_write_json, list_checkpoints, resolve_checkpoint
from robustmix.runs.environment import device_name, versions
from robustmix.runs.folder import (
    BEST_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    CURVES_FILE,
    EMA_MODEL_FILE,
    LOG_FILE,
    METRICS_FILE,
    METRICS_LOG,
    MODEL_FILE,
    RunFolderInUse,
    load_config,
    load_metrics_log,
    load_model,
    locked_run_folder,
    replacing_run,
)
from robustmix.training.console import copy_console
from robustmix.training.nonfinite import NONFINITE_POLICIES
from robustmix.training.sampling import plan_steps
from robustmix.training.trainer import Trainer
from robustmix.version import __version__

#: Seed of the validation hold-out: the same train/validation split for every run seed, so runs differ
#: only in their training randomness.
SPLIT_SEED = 0

#: Accelerate's trackers, for --log-with.
TRACKERS = tuple(t.value for t in LoggerType if t != LoggerType.ALL)
#: Files of a run folder that ``--overwrite`` removes before a fresh start.
_RUN_FILES = (
    CONFIG_FILE, MODEL_FILE, EMA_MODEL_FILE, METRICS_FILE, METRICS_LOG, LOG_FILE, CURVES_FILE, BEST_DIR,
    CHECKPOINTS_DIR,
)  # fmt: skip


@dataclass
class RecipeInfo:
    """What a recipe's ``build_callbacks`` may need to know about the run.

    Attributes:
        num_classes: Number of classes ``C``.
        train_data: The training split; ``train_data.index`` keys per-example state (its values lie in
            ``[0, int(train_data.index.max()) + 1)``).
        val_data: The validation split (held out from training; never the test split).
        epochs: Planned epochs.
        steps_per_epoch: Optimizer steps per epoch (global batch ``batch_size * num_processes * grad_accum``).
        total_steps: Optimizer steps of the whole run (``max_steps`` included).
        num_processes: Data-parallel processes.
        meta_data: Clean examples held out from the training split for meta-learning (CAAT, BiLAW), or
            ``None`` when the recipe asked for none; never the validation or test split.
    """

    num_classes: int
    train_data: ImageDataset
    val_data: ImageDataset
    epochs: int
    steps_per_epoch: int
    total_steps: int
    num_processes: int
    meta_data: ImageDataset | None = None


BuildCallbacks = Callable[[argparse.Namespace, RecipeInfo], Sequence[Callback]]


# ---------------------------------------------------------------------- command line


def base_parser(name: str, description: str | None = None) -> argparse.ArgumentParser:
    """The flags every recipe shares, in ``--help`` groups; add the method's own flags to it, then ``parse_args``.

    Flags a preset sets default to ``None`` here and are filled from the preset by ``parse_args``; their help
    lists each preset's value. Flags the recipe adds itself show under "method".

    Args:
        name: Recipe name, recorded in ``config.json`` and used in the default output folder.
        description: Shown by ``--help`` (pass the recipe module's docstring).
    """
    parser = argparse.ArgumentParser(
        prog=f"{name}.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(recipe=name)
    parser._optionals.title = "method"  # the recipe's own flags; the shared ones go to the groups below
    groups = {
        title: parser.add_argument_group(title)
        for title in ("data", "model", "optimization", "attack", "run", "evaluation", "performance")
    }

    def add(group: str, *flags: str, help: str | None = None, **kwargs: Any) -> None:
        key = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        if key in PRESETS["digits"]:
            help = (f"{help}; " if help else "") + preset_help(key)
        groups[group].add_argument(*flags, help=help, **kwargs)

    add(
        "data", "--preset", choices=sorted(PRESETS), default="digits",
        help="flag values to start from (default: digits); cifar10-paper: cifar10-resnet18 with the method's "
        "release settings (docs/recipes.md)",
    )  # fmt: skip
    add("data", "--dataset", help=f"registry name ({', '.join(DATASETS)}) or a local dataset path")
    add(
        "data", "--data-path",
        help="local copy of a registry dataset (load_from_disk folder, parquet, or for fashion-mnist the IDX files)",
    )  # fmt: skip
    add(
        "data", "--val-size", type=positive_int,
        help="examples held out of the training split for validation (default: "
        "the dataset's: 5000 for fashion-mnist, 1000 for CIFAR and SVHN, 180 for digits, 10%% for local data)",
    )  # fmt: skip
    add(
        "data", "--test-from-train", type=positive_int, metavar="N",
        help="hold out N examples of the training data (stratified, fixed) as the test split: for local data with "
        "no test split of its own (a single parquet file, a saved Dataset, an image folder without test/), which "
        "otherwise is refused",
    )  # fmt: skip
    add(
        "data", "--train-size", type=positive_int,
        help="train on a fixed stratified subset of this many examples of the training split (seeded like the "
        "validation hold-out, the same for every run seed); all of it when not given",
    )  # fmt: skip
    add("data", "--augment", action=argparse.BooleanOptionalAction, help="random crop (pad 4) + horizontal flip")
    add("model", "--model", help="timm model name")
    add("model", "--cifar-stem", action=argparse.BooleanOptionalAction, help="3x3 stride-1 stem, no max-pool")
    add("model", "--init-from", metavar="RUN_DIR",
        help="start from the final weights (model.safetensors) of another run of the same model, with a fresh "
        "optimizer, lr schedule and step count (unlike --resume, which continues a run exactly)",
    )  # fmt: skip
    add("optimization", "--epochs", type=positive_int)
    add("optimization", "--max-steps", type=positive_int, help="stop after this many optimizer steps")
    add(
        "optimization", "--batch-size", type=positive_int,
        help="examples per process per step (per micro-batch with --grad-accum)",
    )  # fmt: skip
    add(
        "optimization", "--grad-accum", type=positive_int, default=1, metavar="N",
        help="accumulate the gradients of N micro-batches of --batch-size per optimizer step (Accelerate's gradient "
        "accumulation): the step's batch is N times larger, BatchNorm statistics stay per micro-batch; steps, "
        "epochs, schedules and --max-steps count optimizer steps (default: 1)",
    )  # fmt: skip
    add("optimization", "--optimizer", choices=OPTIMIZERS)
    add("optimization", "--lr", type=positive_number, help="peak learning rate")
    add("optimization", "--momentum", type=nonnegative_number, help="SGD momentum")
    add("optimization", "--weight-decay", type=nonnegative_number)
    add("optimization", "--schedule", choices=SCHEDULES, help="lr schedule over the optimizer steps")
    add(
        "optimization", "--milestones", type=positive_int, nargs="*",
        help="epochs (from 0) from which multistep divides the lr by 10",
    )  # fmt: skip
    add("optimization", "--grad-clip", type=positive_number, help="clip the gradient norm to this value")
    add(
        "optimization", "--ema", type=positive_number, metavar="DECAY",
        help="also keep an exponential moving average of the weights (timm's ModelEmaV3), updated after every "
        "optimizer step with this decay in (0, 1), e.g. 0.999; validated and tested beside the raw weights and "
        "saved as model_ema.safetensors",
    )  # fmt: skip
    add("attack", "--eps", type=nonnegative_number, help="L-inf budget in pixels in [0, 1], e.g. 8/255")
    add(
        "attack", "--step-size", type=nonnegative_number,
        help="attack step in pixels (not given: the preset's fraction of --eps)",
    )  # fmt: skip
    add("attack", "--attack-steps", type=nonnegative_int, help="attack iterations K")
    add(
        "attack", "--attack-bn-mode", choices=BN_MODES,
        help="BatchNorm and dropout while the training attack runs: eval (running statistics), train (batch "
        "statistics, running statistics updated by every attack step, as in the PGD-AT, AWP and FGSM-RS "
        "releases) or train_frozen_bn (batch statistics, running statistics untouched); default: what the "
        "method's release does (docs/recipes.md lists it per recipe)",
    )  # fmt: skip
    add(
        "run", "--config", metavar="FILE",
        help="flag values from a JSON or YAML object (keys: flag names, e.g. eps or step-size), or a run's "
        "config.json to run it again; flags given here win over the file, the file over the preset. From a "
        "config.json the run's own folder and bookkeeping (output_dir, resume, overwrite, config) are not taken; "
        "resume and overwrite are command-line only",
    )  # fmt: skip
    add("run", "--seed", type=seed_int, default=0, help=f"training seed in [0, {MAX_SEED}] (default: 0)")
    add("run", "--output-dir", help="run folder (default: runs/<recipe>-<dataset>-seed<seed>)")
    add("run", "--resume", help="'latest' or a checkpoint folder to continue exactly")
    add("run", "--overwrite", action="store_true", help="replace the run already in --output-dir")
    add("run", "--checkpoint-every", type=positive_int, default=1, help="checkpoint every this many epochs")
    add("run", "--checkpoint-every-steps", type=positive_int, help="also checkpoint every this many steps")
    add("run", "--keep-checkpoints", type=positive_int, default=2, help="most recent checkpoints to keep")
    add(
        "run", "--on-nonfinite", choices=NONFINITE_POLICIES, default="raise",
        help="a step with a NaN/inf loss or gradient: stop with an error naming the step and the batch's dataset "
        "indices (raise, the default), or skip its update and count it in metrics.jsonl (skip)",
    )  # fmt: skip
    add(
        "run", "--log-every", type=positive_int, default=10,
        help="a training row in metrics.jsonl (and the trackers) every this many optimizer steps, averaged over "
        "them, and at every epoch's end (default: 10)",
    )  # fmt: skip
    add(
        "run", "--log-with", nargs="+", choices=TRACKERS, metavar="TRACKER",
        help=f"also send metrics.jsonl's rows to these Accelerate trackers ({', '.join(TRACKERS)}; installed "
        f"here: {', '.join(map(str, get_available_trackers())) or 'none'}); TensorBoard writes into the run folder",
    )  # fmt: skip
    add(
        "evaluation", "--eval-every", type=positive_int,
        help="validate every this many epochs (and always after the last step)",
    )  # fmt: skip
    add("performance", "--mixed-precision", choices=MIXED_PRECISION, help="default: accelerate launch's, else no")
    add("performance", "--num-workers", type=nonnegative_int, default=0, help="DataLoader worker processes")
    add(
        "performance", "--data-on-device", action="store_true",
        help="keep the whole dataset on the accelerator (small datasets: no per-batch host-to-device copy; "
        "needs --num-workers 0)",
    )  # fmt: skip
    add(
        "performance", "--channels-last", action="store_true",
        help="model weights in channels_last memory format (GPU convs)",
    )  # fmt: skip
    add(
        "performance", "--compile", nargs="?", const="inductor", metavar="BACKEND",
        help="torch.compile the model in place (default backend: inductor); attacks and training share it",
    )  # fmt: skip
    add(
        "performance", "--fast", action="store_true",
        help="the fast path: each attack iteration compiled as one unit (a CUDA graph on CUDA), the model compiled "
        "(--compile's backend, default inductor), channels_last on CUDA, the input values checked on each epoch's "
        "first batch only; attacks in eval mode only (docs/concepts.md, 'The fast path')",
    )  # fmt: skip
    add("performance", "--threads", type=nonnegative_int, help="intra-op CPU threads of torch (0: torch's default)")
    return parser


def recipe_script(path: str | Path) -> ModuleType | None:
    """The recipe script at ``path`` (``recipes/<name>.py``) imported as a module, once per file; None when there
    is no such file. Tools that read recipes (compare.py, results.py) get a recipe's ``parser()``, ``DEFAULTS``,
    ``PAPER`` and ``DERIVED_FLAGS`` from it without running it."""
    return _import_script(str(Path(path).resolve()))


@functools.cache
def _import_script(path: str) -> ModuleType | None:
    if not Path(path).is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"_recipe_script_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_parser(path: str | Path) -> argparse.ArgumentParser:
    """A fresh copy of the command line of the recipe script at ``path``: its ``parser()``, else the shared flags
    alone (``base_parser`` named after the file)."""
    module = recipe_script(path)
    return module.parser() if hasattr(module, "parser") else base_parser(Path(path).stem)


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    recipe_defaults: dict[str, Any | Callable[[argparse.Namespace], Any]] | None = None,
    paper: dict[str, Any] | None = None,
) -> argparse.Namespace:
    """Parse flags, fill the unset ones from the preset, and check everything before any work.

    Args:
        parser: From ``base_parser``, with the recipe's own flags added.
        argv: Command line without the program name; ``None`` reads ``sys.argv``.
        recipe_defaults: Values this recipe uses instead of the preset's, for flags that default to
            ``None`` and were not given on the command line; a callable receives the namespace after the
            preset filled it in (e.g. FGSM-RS's step ``1.25 * eps``).
        paper: The method's release settings (epochs, lr schedule, weight decay, attack budget...) that
            ``--preset cifar10-paper`` puts over the CIFAR-10 preset; ``None``: the recipe has none, and that
            preset is refused.

    Returns:
        The namespace, every preset flag filled in, ``output_dir`` resolved.

    Exits:
        With status 2 and a one-line message (``parser.error``) for an unknown dataset or model, a missing
        data path or checkpoint, an occupied output folder, or a flag value out of range.
    """
    args = parser.parse_args(argv)
    if args.config is not None:
        # The file's values stand in for the parser's defaults: the command line still wins over them.
        args = parser.parse_args(argv, argparse.Namespace(**config_file_values(parser, args.config)))
    if args.preset == PAPER_PRESET and paper is None:
        parser.error(
            f"--preset {PAPER_PRESET}: {parser.prog} has no release settings of its own to reproduce; "
            "use --preset cifar10-resnet18"
        )
    fill_unset(args, preset_values(args.preset, paper), recipe_defaults)
    if args.attack_bn_mode is None:
        args.attack_bn_mode = "eval"

    if args.mixed_precision is None:
        args.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if args.mixed_precision not in MIXED_PRECISION:
            parser.error(
                f"accelerate launch set mixed precision {args.mixed_precision!r}; robustmix runs {MIXED_PRECISION}"
            )
    if args.dataset not in DATASETS and not Path(args.dataset).exists():
        parser.error(
            f"--dataset: unknown dataset {args.dataset!r}: expected one of {sorted(DATASETS)} or an existing path"
        )
    if args.data_path is not None and not Path(args.data_path).exists():
        parser.error(f"--data-path {args.data_path} does not exist")
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=3)
        parser.error(
            f"--model: unknown timm model {args.model!r}" + (f"; close matches: {', '.join(close)}" if close else "")
        )
    if args.eps > 1:
        parser.error(f"--eps is in pixels in [0, 1], got {args.eps}; for 8/255 write 8/255")
    if args.attack_steps > 1 and args.step_size > args.eps:
        print(
            f"{parser.prog}: warning: --step-size {args.step_size:g} is larger than --eps {args.eps:g}: every PGD "
            "step can cross the whole ball (the usual choice is eps/4 to eps/2)",
            file=sys.stderr,
        )
    if args.ema is not None and args.ema >= 1:
        parser.error(f"--ema is a decay in (0, 1), got {args.ema}")
    if args.momentum >= 1:
        parser.error(f"--momentum must be < 1, got {args.momentum}")
    if args.schedule == "multistep" and not args.milestones:
        parser.error("--schedule multistep needs --milestones (epochs)")
    if args.fast and args.attack_bn_mode != "eval":
        parser.error(f"--fast compiles attacks in eval mode only, got --attack-bn-mode {args.attack_bn_mode}")
    if args.compile is not None and args.compile not in torch._dynamo.list_backends(exclude_tags=()):
        parser.error(f"--compile: unknown backend {args.compile!r}; known: {sorted(torch._dynamo.list_backends())}")
    installed = ", ".join(map(str, get_available_trackers())) or "none"
    missing = [name for name in args.log_with or () if name not in installed.split(", ")]
    if missing:
        packages = " ".join(name.replace("_", "-") for name in missing)
        parser.error(
            f"--log-with {' '.join(missing)}: not installed (pip install {packages}); trackers installed here: "
            f"{installed}"
        )
    if args.data_on_device and args.num_workers:
        parser.error("--data-on-device needs --num-workers 0: worker processes cannot share accelerator tensors")

    if args.output_dir is None:
        args.output_dir = f"runs/{args.recipe}-{Path(args.dataset).name}-seed{args.seed}"
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        parser.error(f"--output-dir {output} exists and is not a folder")
    if args.resume is not None:
        if args.overwrite:
            parser.error("--resume and --overwrite contradict each other")
        try:
            checkpoint = resolve_checkpoint(args.resume, output / CHECKPOINTS_DIR)
        except (FileNotFoundError, CheckpointError) as err:
            parser.error(f"--resume {args.resume}: {err}")
        if checkpoint.resolve().parent != (output / CHECKPOINTS_DIR).resolve():
            parser.error(
                f"--resume {args.resume} is not a checkpoint of the run in --output-dir {output}; to start from "
                "another run's final weights use --init-from"
            )
        check_resumed_flags(parser, args, recipe_defaults or {})
    elif not args.overwrite and (list_checkpoints(output / CHECKPOINTS_DIR) or (output / MODEL_FILE).exists()):
        parser.error(f"{output} already holds a run: --resume latest continues it, --overwrite replaces it")
    if args.init_from is not None:
        source = Path(args.init_from)
        try:
            load_config(source)
        except (FileNotFoundError, ValueError) as err:
            parser.error(f"--init-from {source}: {err}")
        if not (source / MODEL_FILE).is_file():
            parser.error(f"--init-from {source}: it holds no {MODEL_FILE} (has the run finished?)")
        if source.resolve() == output.resolve():
            parser.error(f"--init-from {source} is this run's own --output-dir")
    return args


# ---------------------------------------------------------------------- the shared fit path


def run_recipe(args: argparse.Namespace, build_callbacks: BuildCallbacks, *, meta_size: int = 0) -> dict[str, Any]:
    """Train a recipe from its parsed flags and write the run folder; call it on every process.

    Args:
        args: From ``parse_args``.
        build_callbacks: The method: ``(args, info) -> callbacks`` of its ``AdversarialStep``.
        meta_size: Examples to hold out of the training split (stratified, seeded with ``SPLIT_SEED``) as
            ``info.meta_data`` for meta-learning; they are then not trained on.

    Returns:
        The content of ``metrics.json``: test clean and PGD accuracy of the final weights (and of the best
            ones) with the attack settings, and the best checkpoint's validation metrics.
    """
    # The run folder's lock, and the run that --overwrite replaces, are held until the new run has finished.
    with contextlib.ExitStack() as held:
        return _run_recipe(args, build_callbacks, meta_size, held)


def _run_recipe(
    args: argparse.Namespace, build_callbacks: BuildCallbacks, meta_size: int, held: contextlib.ExitStack
) -> dict[str, Any]:
    # Accelerate's AcceleratorState honours ACCELERATE_USE_CPU (needed for several CPU processes) but a bare
    # PartialState does not: created first, it would leave every process alone.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    output = Path(args.output_dir)

    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)  # the same initial weights on every process
    # Flag values that only the data or the callbacks can judge end the program as parse_args does (status 2,
    # naming the flags), before --overwrite removes anything and before the run folder is made.
    with _flag_errors(args, state, "--dataset", "--data-path"), state.main_process_first():
        # One process downloads and caches, the others read the cache. The test split is loaded and checked
        # now too: a test split that cannot be evaluated must stop the run before training, not after it.
        train, val, test = (split_from_flags(args, split) for split in ("train", "validation", "test"))
        _check_same_images(train, test)
        check_disjoint(test, train, val)
    meta = unused = None
    if args.train_size is not None:
        with _flag_errors(args, state, "--train-size"):
            unused, train = training_subset(train, args.train_size, seed=SPLIT_SEED)
    if meta_size:
        # Outside a training subset the meta set comes from the examples no run trains on, so a meta-learning
        # recipe trains on as many examples as the others.
        source = unused if unused is not None and len(unused) > meta_size else train
        with _flag_errors(args, state, "--meta-size"):
            rest, meta = source.hold_out(meta_size, "meta", seed=SPLIT_SEED)
        if source is train:
            train = rest
    start = init_from = None
    if args.init_from is not None:
        with _flag_errors(args, state, "--init-from"):
            start = load_model(args.init_from)
        weights = Path(args.init_from) / MODEL_FILE
        init_from = {
            "run_dir": str(weights.parent.resolve()),
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        }
    spec = DATASETS.get(args.dataset)
    if start is not None:  # the input normalization is part of the starting model (buffers of its weights)
        mean, std = model_config(start)["mean"], model_config(start)["std"]
    else:
        mean, std = (spec.mean, spec.std) if spec is not None else channel_stats(train)
    in_chans = train.image_shape[0]
    model = create_model(
        args.model, train.num_classes, in_chans=in_chans, cifar_stem=args.cifar_stem, mean=mean, std=std
    )
    if start is not None:
        with _flag_errors(args, state, "--init-from"):
            _check_same_model(args.init_from, model_config(start), model_config(model))
        model.load_state_dict(start.state_dict())
    if args.channels_last or (args.fast and state.device.type == "cuda"):
        model = model.to(memory_format=torch.channels_last)
    if args.compile or args.fast:
        # In place: the module, its state_dict keys and the unwrapping for attacks stay as they are. Dynamo keeps
        # one graph per train/eval mode, compiled during the first steps.
        model.compile(backend=args.compile or "inductor")
    if args.data_on_device:
        train, val, meta = (None if data is None else data.to(state.device) for data in (train, val, meta))

    steps_per_epoch, total_steps = plan_steps(
        len(train), args.batch_size, state.num_processes, args.grad_accum, args.epochs, args.max_steps
    )
    info = RecipeInfo(
        train.num_classes, train, val, args.epochs, steps_per_epoch, total_steps, state.num_processes, meta
    )
    with _flag_errors(args, state):
        step = AdversarialStep(
            build_callbacks(args, info), num_classes=train.num_classes, mixed_precision=args.mixed_precision,
            fast=args.fast, compile_backend=args.compile or "inductor",
        )  # fmt: skip
    optimizer = build_optimizer(args, model)
    scheduler = build_scheduler(args, optimizer, steps_per_epoch, total_steps)
    with _flag_errors(args, state):  # e.g. a callback that cannot run on micro-batches (--grad-accum)
        trainer = Trainer(
            model, step, optimizer, train, val, scheduler=scheduler,
            mixed_precision=args.mixed_precision, epochs=args.epochs, max_steps=args.max_steps,
            batch_size=args.batch_size, grad_clip=args.grad_clip, eval_every=args.eval_every,
            eval_eps=args.eps, checkpoint_every=args.checkpoint_every,
            checkpoint_every_steps=args.checkpoint_every_steps, keep_checkpoints=args.keep_checkpoints,
            output_dir=output, seed=args.seed, augment=args.augment, num_workers=args.num_workers,
            nonfinite=args.on_nonfinite, log_every=args.log_every, log_with=args.log_with, ema_decay=args.ema,
            grad_accum=args.grad_accum,
        )  # fmt: skip
    if state.is_main_process:
        with _flag_errors(args, state, "--output-dir", kind=(RunFolderInUse, OSError)):  # OSError: cannot create
            held.enter_context(locked_run_folder(output))
        held.enter_context(replacing_run(output, _RUN_FILES, replace=args.overwrite))
        held.enter_context(copy_console(output / LOG_FILE, append=args.resume is not None))
    state.wait_for_everyone()
    # A resumed run keeps the config.json it started with: parse_args checked that the flags are the same.
    if state.is_main_process and args.resume is None:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output / CONFIG_FILE, _run_config(args, model, train, val, trainer, step, init_from))

    with _flag_errors(args, state, "--resume", kind=CheckpointError):
        summary = trainer.fit(resume=args.resume)

    if args.data_on_device:
        test = test.to(state.device)
    metrics: dict[str, Any] = {"test": {**trainer.evaluate(test), "weights": "final", "step": summary["step"]}}
    if args.ema is not None:
        metrics["test_ema"] = {**trainer.evaluate(test, ema=True), "weights": "ema", "step": summary["step"]}
    best = summary["best"]
    if best and best["step"] != summary["step"] and not (output / BEST_DIR / MODEL_FILE).is_file():
        # Resumed from a checkpoint older than best/, which was deleted: the abandoned continuation had written
        # over these weights, and the resumed run scored no higher after the checkpoint.
        state.print(
            f"no {BEST_DIR}/ and no test_best: the weights of the best validation score (step {best['step']}) were "
            "overwritten by the continuation this resume abandoned, and no later step scored higher"
        )
    elif best and best["step"] != summary["step"]:
        # Report the checkpoint chosen on validation too: load its weights, evaluate, leave them loaded.
        unwrap_model(trainer.model).load_state_dict(load_file(output / BEST_DIR / MODEL_FILE))
        metrics["test_best"] = {**trainer.evaluate(test), "weights": "best", "step": best["step"]}
    metrics |= {"attack": trainer.eval_attack, "best": best, "last_val": summary["val"]}
    if args.on_nonfinite == "skip":
        metrics["nonfinite_skipped"] = summary["nonfinite_skipped"]
    if state.is_main_process:
        atomic_write_json(output / METRICS_FILE, metrics)
        _plot_curves(args, output, trainer.eval_attack)
    final, attack = metrics["test"], trainer.eval_attack
    state.print(
        f"{args.recipe} on {args.dataset}: test clean {final['clean_acc']:.2%}, PGD-{attack['steps']} "
        f"{final['pgd_acc']:.2%} (eps {attack['eps']:.4g}, step {attack['step_size']:.4g}, n={final['n']}); "
        + (
            f"EMA weights: clean {metrics['test_ema']['clean_acc']:.2%}, PGD-{attack['steps']} "
            f"{metrics['test_ema']['pgd_acc']:.2%}; "
            if args.ema is not None
            else ""
        )
        + f"run folder {output}"
    )
    return metrics


def _plot_curves(args: argparse.Namespace, output: Path, attack: dict[str, Any]) -> None:
    """Write the run's training curves (``curves.png``), or say in one line why not (no matplotlib)."""
    try:
        from robustmix.training.curves import plot_training_curves

        plot_training_curves(
            {f"{args.recipe} seed {args.seed}": load_metrics_log(output)}, output / CURVES_FILE,
            title=f"{args.recipe} on {Path(args.dataset).name}; validation PGD-{attack['steps']} at eps "
            f"{attack['eps']:.4g}",
        )  # fmt: skip
    except ImportError:
        print(f"{CURVES_FILE} not written: matplotlib is not installed (pip install 'robustmix[plot]')")


@contextlib.contextmanager
def _flag_errors(
    args: argparse.Namespace,
    state: PartialState,
    *flags: str,
    kind: type[Exception] | tuple[type[Exception], ...] = ValueError,
) -> Iterator[None]:
    """Turn a ``ValueError`` (or only a ``kind`` of them) raised while flags become data, callbacks or a resumed
    checkpoint into the command line's exit status 2.

    The message names ``flags`` or, when none are given, every flag whose name the error uses as a callback
    argument (``meta_lr must ...`` or ``lam=...`` for ``--meta-lr`` and ``--lam``), in argparse's format:
    ``<recipe>.py: error: --meta-lr: meta_lr must be ...``.
    """
    try:
        yield
    except kind as err:
        named = flags or tuple(
            "--" + key.replace("_", "-")
            for key in vars(args)
            if re.search(rf"\b{re.escape(key)}(=|\s+must\b)", str(err))
        )
        if state.is_main_process:
            print(f"{args.recipe}.py: error: {', '.join(named) or 'the flags'}: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def _check_same_model(source: str, theirs: dict[str, Any], ours: dict[str, Any]) -> None:
    """Raise a one-line ``ValueError`` naming every entry where two ``model_config`` dicts differ."""
    differences = [
        f"{key} {theirs.get(key)!r} there, {value!r} here" for key, value in ours.items() if theirs.get(key) != value
    ]
    if differences:
        raise ValueError(f"{source} trained another model than this run's: {'; '.join(differences)}")


def _check_same_images(train: ImageDataset, test: ImageDataset) -> None:
    """Raise a one-line ``ValueError`` unless the test split has the training split's image shape and classes."""
    if test.image_shape != train.image_shape or test.num_classes != train.num_classes:
        raise ValueError(
            f"the test split holds {test.num_classes}-class images of shape {list(test.image_shape)}, the training "
            f"split {train.num_classes}-class images of shape {list(train.image_shape)}: a model trained on one "
            "cannot be tested on the other"
        )


def split_from_flags(args: argparse.Namespace, split: str) -> ImageDataset:
    """One split of the data the flags name (``--dataset``, ``--data-path``, ``--val-size``, ``--test-from-train``),
    made as ``robustmix.data.load_split`` makes a recorded run's split."""
    return load_split(
        args.dataset, split, path=args.data_path, val_size=args.val_size, test_size=args.test_from_train,
        split_seed=SPLIT_SEED,
    )  # fmt: skip


def channel_stats(data: ImageDataset) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of a dataset's pixels in [0, 1] (for a local dataset)."""
    scale = 255.0 if data.images.dtype == torch.uint8 else 1.0
    total = torch.zeros(data.images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in data.images.split(4096):
        pixels = chunk.double() / scale
        total += pixels.sum(dim=(0, 2, 3))
        squares += pixels.square().sum(dim=(0, 2, 3))
    count = data.images[:, 0].numel()
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def _run_config(
    args: argparse.Namespace,
    model: torch.nn.Module,
    train: ImageDataset,
    val: ImageDataset,
    trainer: Trainer,
    step: AdversarialStep,
    init_from: dict[str, str] | None,
) -> dict[str, Any]:
    return {
        "recipe": args.recipe,
        "robustmix_version": __version__,
        "model": model_config(model),
        "data": {
            "dataset": args.dataset,
            "path": args.data_path,
            "split_seed": SPLIT_SEED,
            "val_size": args.val_size,
            "test_size": args.test_from_train,
            "train_size": args.train_size,
            "sizes": {"train": len(train), "validation": len(val)},
            "num_classes": train.num_classes,
            "image_shape": list(train.image_shape),
            "augment": args.augment,
        },
        "attack": {"eps": args.eps, "step_size": args.step_size, "steps": args.attack_steps},
        "callbacks": [repr(c) for c in step.callbacks],
        "eval_attack": trainer.eval_attack,
        "seed": args.seed,
        "init_from": init_from,
        "num_processes": trainer.accelerator.num_processes,
        "global_batch_size": args.batch_size * trainer.accelerator.num_processes * args.grad_accum,
        "steps_per_epoch": trainer.steps_per_epoch,
        "total_steps": trainer.total_steps,
        "flags": vars(args),
        "device": device_name(trainer.accelerator.device),
        "versions": versions(),
    }
