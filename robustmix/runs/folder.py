"""The run folder contract: what a training run leaves in its ``output_dir``, and how to load it back.

A run folder holds:

    config.json          everything needed to rebuild the model and the data (model config, dataset,
                         split sizes, attack settings, seed, library version, recipe name and flags)
    model.safetensors    final weights: the state_dict of the model from ``create_model``
    model_ema.safetensors  with ``--ema``: the final exponential moving average of the weights, same keys
    metrics.json         final test clean / PGD accuracy with the attack settings, and the best
                         checkpoint's validation metrics
    metrics.jsonl        one JSON object per line: training progress, per-epoch throughput and validation metrics
    log.txt              what the run printed (progress bar in its last state), appended to by a resumed run
    curves.png           training curves: loss, training adversarial accuracy, validation clean and PGD accuracy
    best/                model.safetensors and metrics.json of the checkpoint with the best validation
                         PGD accuracy (never chosen on test data); absent when a run resumed from a checkpoint
                         older than them did not reach their score again (``drop_results_after``)
    checkpoints/         step_<N>/ resumable training states and the ``latest`` pointer file
    .lock                locked (``flock``) by the process training into the folder, for the run's life
    .replaced/           the run that ``--overwrite`` replaces, kept until the new run has finished

Every file is written atomically (temporary file, fsync, rename), so a reader never sees half a file. A folder
with checkpoints and without ``model.safetensors`` holds an unfinished run (``--resume latest`` finishes it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from robustmix.checks import is_integer
from robustmix.models import build_from_config, check_model_config
from robustmix.runs.checkpoint import list_checkpoints

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_MODEL_FILE = "model_ema.safetensors"
METRICS_FILE = "metrics.json"
METRICS_LOG = "metrics.jsonl"
LOG_FILE = "log.txt"
CURVES_FILE = "curves.png"
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"
REPLACED_DIR = ".replaced"
#: What a run writes when it ends; a resume from a checkpoint before the end deletes them (``drop_results_after``).
FINAL_FILES = (MODEL_FILE, EMA_MODEL_FILE, METRICS_FILE, CURVES_FILE)
#: ``timm.create_model`` keyword arguments a config.json may hold: architecture settings only. Others can make
#: timm read files (``checkpoint_path``, ``pretrained_cfg_overlay``) or the network (``pretrained``).
TIMM_KWARGS = frozenset(
    {"img_size", "patch_size", "embed_dim", "depth", "depths", "dims", "num_heads", "mlp_ratio", "window_size",
     "drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "global_pool", "class_token", "qkv_bias",
     "init_values", "output_stride", "stem_width", "stem_type"}
)  # fmt: skip

#: Recipe flags that may change between a run and its resumption: where the run lives, how it is resumed,
#: replaced, logged, checkpointed and sped up. Every other flag decides what the run computes.
BOOKKEEPING_FLAGS = frozenset(
    {"output_dir", "resume", "overwrite", "preset", "data_path", "num_workers", "threads", "eval_every",
     "checkpoint_every", "checkpoint_every_steps", "keep_checkpoints", "on_nonfinite", "data_on_device",
     "channels_last", "compile", "config", "log_with", "log_every"}
)  # fmt: skip


def read_json(path: str | Path) -> Any:
    """Parse a JSON file, naming the file when it is missing or corrupted.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupted: not valid JSON ({err})") from err


def load_config(run_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a run folder, with a ``"model"`` entry from ``robustmix.models.model_config``.

    Raises:
        FileNotFoundError: the folder or its config.json does not exist.
        ValueError: config.json is corrupted, has no ``"model"`` entry or a malformed one, or timm_kwargs other
            than ``TIMM_KWARGS``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    config = read_json(run_dir / CONFIG_FILE)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{run_dir / CONFIG_FILE} has no 'model' entry; it was not written by a robustmix run")
    try:
        check_model_config(config["model"])
    except ValueError as err:
        raise ValueError(f"{run_dir / CONFIG_FILE} is corrupted: {err}") from err
    kwargs = config["model"]["timm_kwargs"]
    unknown = sorted(set(kwargs) - TIMM_KWARGS)
    scalar = (bool, int, float, str, type(None))
    if unknown or not all(
        isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(i, scalar) for i in v))
        for v in kwargs.values()
    ):
        raise ValueError(
            f"{run_dir / CONFIG_FILE}: the model's timm_kwargs may hold only architecture settings "
            f"({', '.join(sorted(TIMM_KWARGS))}) with plain values; got {unknown or kwargs}"
        )
    return config


#: The weights a run folder can hold, by name: their file in the folder.
WEIGHTS = {"final": MODEL_FILE, "best": f"{BEST_DIR}/{MODEL_FILE}", "ema": EMA_MODEL_FILE}


def load_model(run_dir: str | Path, *, weights: Literal["final", "best", "ema"] = "final") -> nn.Module:
    """Rebuild a trained model from its run folder, in eval mode, on the CPU.

    Args:
        run_dir: The run's ``output_dir``.
        weights: ``"final"`` (``model.safetensors``, the weights after the last step), ``"best"``
            (``best/model.safetensors``, the checkpoint with the best validation PGD accuracy) or ``"ema"``
            (``model_ema.safetensors``, the moving average of the weights of a run trained with ``--ema``).

    Returns:
        The model, taking images ``[B, C, H, W]`` with pixels in [0, 1] and returning logits ``[B, num_classes]``.

    Raises:
        FileNotFoundError: the folder, its config.json or the weights file does not exist.
        ValueError: ``weights`` is not one of ``WEIGHTS``; a file is corrupted; the weights do not fit the model
            or hold NaN or inf.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHTS))}, got {weights!r}")
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    path = run_dir / WEIGHTS[weights]
    if not path.is_file():
        raise missing_weights(run_dir, weights)
    try:
        state_dict = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is corrupted: not a readable safetensors file ({err})") from err
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path} holds NaN or inf in {name!r}: the run diverged or the file is corrupted")
    try:
        model = build_from_config(config["model"])
    except (ValueError, TypeError) as err:  # timm rejects unknown timm_kwargs with a TypeError
        raise ValueError(f"{run_dir / CONFIG_FILE} describes a model that cannot be built: {err}") from err
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        detail = " ".join(str(err).split())  # torch lists each mismatch on its own line: one line for the CLI
        raise ValueError(f"{path} does not match the model described in {run_dir / CONFIG_FILE}: {detail}") from err
    return model.eval()


def missing_weights(run_dir: str | Path, weights: Literal["final", "best", "ema"]) -> FileNotFoundError:
    """The error for a run folder without its ``weights`` file, saying why: an unfinished run names itself."""
    run_dir = Path(run_dir)
    path = run_dir / WEIGHTS[weights]
    if not (run_dir / MODEL_FILE).is_file() and list_checkpoints(run_dir / CHECKPOINTS_DIR):
        return FileNotFoundError(
            f"{path} does not exist: the run in {run_dir} is unfinished (checkpoints, no final {MODEL_FILE}); "
            "--resume latest finishes it"
        )
    if weights == "best":
        return FileNotFoundError(
            f"{path} does not exist: the run has no best weights (it never validated, or it was resumed from a "
            "checkpoint older than its best weights and did not reach their score again)"
        )
    return FileNotFoundError(f"{path} does not exist: the run has no {weights} weights (did it finish?)")


def drop_results_after(run_dir: str | Path, step: int, *, finished: bool) -> list[str]:
    """Delete what ``run_dir`` holds from after the checkpoint of ``step``, whose continuation a resume abandons.

    The final files (``FINAL_FILES``) are written when a run ends: unless the checkpoint is the end of training
    (``finished``), they come from a continuation past it. ``best/`` goes when its metrics.json records a later step
    or cannot be read (the trainer writes it before the weights, so a ``best/`` cut short is one of those); a
    ``best/`` of ``step`` or before stays, as the resumed run replaces it only with weights that score higher.

    Returns:
        The names deleted.
    """
    run_dir = Path(run_dir)
    dropped = []
    for name in () if finished else FINAL_FILES:  # the weights first: without them the run reads as unfinished
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            dropped.append(name)
    best = run_dir / BEST_DIR
    if best.is_dir() and not best.is_symlink():
        try:
            best_step = read_json(best / METRICS_FILE)["step"]
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            best_step = None
        if not is_integer(best_step) or best_step > step:
            (best / MODEL_FILE).unlink(missing_ok=True)
            shutil.rmtree(best)
            dropped.append(f"{BEST_DIR}/")
    return dropped


def load_metrics_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``, oldest first (training rows and validation rows, each with step and epoch).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not text, or a line is not a JSON object (names the line).
    """
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is corrupted: not UTF-8 text ({err})") from err
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not valid JSON ({err})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} is not a JSON object: {line[:80]!r}")
        rows.append(row)
    return rows


def recorded_flags(config: Mapping[str, Any]) -> dict[str, Any]:
    """The command-line flags a run recorded in its config.json, as parsed (after presets and recipe defaults).

    A run that predates ``--attack-bn-mode`` gets the ``bn_mode`` its attack callback recorded.

    Raises:
        ValueError: the config has no ``"flags"`` object.
    """
    flags = config.get("flags")
    if not isinstance(flags, dict):
        raise ValueError("config.json records no flags (it was not written by a recipe)")
    flags = dict(flags)
    if "attack_bn_mode" not in flags:
        for callback in config.get("callbacks") or []:
            found = re.match(r"(?:PGDAttack|FGSMAttack)\(.*\bbn_mode='(\w+)'", str(callback))
            if found:
                flags["attack_bn_mode"] = found.group(1)
                break
    return flags


def flag_differences(
    config: Mapping[str, Any], flags: Mapping[str, Any], default: Callable[[str], Any]
) -> list[tuple[str, Any, Any]]:
    """The flags that decide what a run computes and differ between a run's config.json and ``flags``.

    Args:
        config: The run's config.json.
        flags: The flags of the command line now (``vars(args)``).
        default: The value of a flag that the run did not record because it predates the flag.

    Returns:
        ``(flag name, recorded value, value now)`` for each difference, values as JSON would hold them.

    Raises:
        ValueError: the config has no ``"flags"`` object.
    """
    recorded = recorded_flags(config)
    differences = []
    for name, now in flags.items():
        if name in BOOKKEEPING_FLAGS:
            continue
        saved = recorded[name] if name in recorded else default(name)
        saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))
        if saved != now:
            differences.append((name, saved, now))
    return differences


class RunFolderInUse(RuntimeError):
    """Another process is training into the run folder (it holds the folder's lock)."""


@contextlib.contextmanager
def locked_run_folder(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder's lock (``.lock``, created with the folder if need be) for the ``with`` block.

    The lock is an ``flock``: the system releases it when the process ends, also when it is killed, so a
    crashed run never leaves the folder locked.

    Raises:
        RunFolderInUse: another process (or another open of the lock file) holds it.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise RunFolderInUse(f"{run_dir} is in use: another run is training into it") from err
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def replacing_run(run_dir: str | Path, names: Iterable[str], *, replace: bool) -> Iterator[None]:
    """Keep the run being replaced until its replacement, trained inside the ``with`` block, has finished.

    With ``replace``, the entries ``names`` of ``run_dir`` (config, weights, metrics, checkpoints) move to
    ``.replaced/`` first. When the block completes, ``.replaced/`` is deleted; when it raises, what the new
    run wrote is deleted and the old run moves back. A process killed inside the block leaves both: the new
    run resumable, the old one in ``.replaced/``, deleted when the new run finishes. When ``.replaced/``
    exists already, the folder holds such an unfinished replacement: with ``replace`` it is discarded for
    the new one (the old run stays set aside); without, the block finishes it.

    Args:
        run_dir: The run folder (locked by the caller: ``locked_run_folder``).
        names: The entries of a run folder that belong to its run.
        replace: Whether the block starts a new run in place of the one in ``run_dir``.
    """
    run_dir = Path(run_dir)
    aside = run_dir / REPLACED_DIR
    names = [name for name in names if name != REPLACED_DIR]
    if replace:
        if aside.exists():
            _remove_entries(run_dir, names)
        else:
            aside.mkdir()
            for name in names:
                if (run_dir / name).exists():
                    os.replace(run_dir / name, aside / name)
    try:
        yield
    except BaseException:
        if replace:
            _remove_entries(run_dir, names)
            for entry in aside.iterdir():
                os.replace(entry, run_dir / entry.name)
            aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _remove_entries(run_dir: Path, names: Iterable[str]) -> None:
    for name in names:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
