"""Resumable checkpoints and atomic file writes.

A checkpoint is a folder ``checkpoints/step_<N>/`` holding

- ``model.safetensors``: the model's weights (``state_dict`` of the unwrapped model);
- ``model_ema.safetensors``: the moving average of the weights, for a run that keeps one;
- ``optimizer``, ``scheduler`` (when there is an lr scheduler) and ``scaler`` (the fp16 GradScaler): each a
  ``.safetensors`` file with its tensors and a ``.json`` file with the rest (``robustmix.runs.safestate``);
- ``rng_<rank>``: every process's RNG states (Python, NumPy, torch, and the accelerator's), the same way;
- ``callbacks.safetensors`` and ``callbacks.json``: the callbacks' ``state_dict()`` (tensors, then the
  plain values);
- ``trainer_state.json``: the trainer's counters (epoch, position in the epoch, step, best metric);
- ``manifest.json``: the format's name and version and the SHA-256 of every other file.

Nothing in a checkpoint is a pickle, so loading one runs no code from it. Before anything is restored,
every file the manifest lists is hashed and compared (``verify_checkpoint``); a missing, extra-required,
altered or unreadable file is a ``CheckpointError`` naming it, and resuming ``"latest"`` then falls back to
the newest intact checkpoint that was retained, with a warning naming the one skipped (``open_checkpoint``).

It is written into ``checkpoints/.tmp-step_<N>/``, every file is fsynced, and only the complete folder is
renamed to ``step_<N>``; after that the ``latest`` pointer file is replaced (temporary file + ``os.replace``).
A writer that dies at any moment leaves ``latest`` naming the previous complete checkpoint, and a leftover
``.tmp-*`` folder is never taken for a checkpoint (the next save removes it). Old checkpoints are deleted
the same way round: renamed to ``.tmp-*`` first, so a deletion cut short never leaves a partial
``step_<N>``. ``read_checkpoint`` verifies and reads every file of a checkpoint without a model.

For tests only: ``ROBUSTMIX_TEST_CHECKPOINT_PAUSE=<seconds>`` (or ``<seconds>@<step>``: only the write of
``step_<step>``) makes the main process sleep while the temporary folder is half written (after the model,
optimizer and RNG states, before the callback and trainer state), so a test can kill the writer inside that
window; unset or empty, it does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from robustmix.models import unwrap_model
from robustmix.runs.safestate import load_state, save_state, state_files
from robustmix.version import __version__

MODEL = "model.safetensors"
EMA_MODEL = "model_ema.safetensors"
TRAINER_STATE = "trainer_state.json"
CALLBACK_TENSORS = "callbacks.safetensors"
CALLBACK_VALUES = "callbacks.json"
MANIFEST = "manifest.json"
#: ``format`` and ``version`` of ``manifest.json``; version 1 was Accelerate's ``save_state`` (pickles).
FORMAT, VERSION = "robustmix checkpoint", 2
LATEST = "latest"
_TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"step_(\d+)")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_RNG = re.compile(r"rng_(\d+)\.json")
#: Files of the version 1 format, written by ``accelerator.save_state``.
_PICKLED_FILES = ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "scheduler.bin", "scaler.pt")
#: Test-only: seconds the main process sleeps inside a checkpoint write (see the module docstring).
TEST_PAUSE_ENV = "ROBUSTMIX_TEST_CHECKPOINT_PAUSE"


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete, altered, unreadable or not in this version's format (the message names
    the file), or it does not fit the run that resumes it."""


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(folder)


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder so that no partial ``step_<N>`` can be left: rename it aside, then delete."""
    doomed = path.with_name(f"{_TMP_PREFIX}deleted-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    _fsync(path.parent)
    shutil.rmtree(doomed)


def _test_pause(step: int) -> None:
    """Sleep as ``ROBUSTMIX_TEST_CHECKPOINT_PAUSE`` asks (tests only; see the module docstring)."""
    seconds, _, only = os.environ.get(TEST_PAUSE_ENV, "").partition("@")
    if seconds and (not only or int(only) == step):
        time.sleep(float(seconds))


def _replace_atomically(tmp: Path, path: Path) -> None:
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old content or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    tmp.write_text(text)
    _replace_atomically(tmp, path)


def atomic_write_json(path: str | Path, value: Any) -> None:
    """``atomic_write_text`` of ``value`` as indented JSON."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def atomic_save_weights(state_dict: dict[str, Tensor], path: str | Path) -> None:
    """Save a model ``state_dict`` as safetensors at ``path``, atomically (tensors are copied to the CPU)."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    # Cloning gives every tensor its own storage: safetensors refuses tensors that share memory.
    save_file({name: t.detach().to("cpu", copy=True).contiguous() for name, t in state_dict.items()}, tmp)
    _replace_atomically(tmp, path)


def split_state(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a callback state into tensors (flat ``"a/b"`` keys, for safetensors) and plain JSON values.

    Args:
        state: Nested dicts with string keys whose leaves are tensors or JSON values (numbers,
            strings, lists of those).
        prefix: Key prefix of this level (used by the recursion).

    Returns:
        ``(tensors, values)``: tensors copied to the CPU, and the nested dict of everything else.

    Raises:
        ValueError: a key is not a string or contains "/", or a leaf is neither a tensor nor JSON.
    """
    tensors: dict[str, Tensor] = {}
    values: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str) or "/" in key:
            raise ValueError(f"callback state keys must be strings without '/', got {prefix}{key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Tensor):
            tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        elif isinstance(value, dict):
            sub_tensors, sub_values = split_state(value, f"{name}/")
            tensors.update(sub_tensors)
            if sub_values or not sub_tensors:
                values[key] = sub_values
        else:
            try:
                json.dumps(value)
            except TypeError as err:
                raise ValueError(
                    f"callback state {name!r} is a {type(value).__name__}: state must be tensors or JSON values"
                ) from err
            values[key] = value
    return tensors, values


def join_state(tensors: dict[str, Tensor], values: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``split_state``: put the tensors back into the nested dict of values."""
    state = json.loads(json.dumps(values))
    for name, tensor in tensors.items():
        *parents, leaf = name.split("/")
        node = state
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = tensor
    return state


def checkpoint_step(path: Path) -> int | None:
    """The step ``N`` of a folder named ``step_<N>``, else ``None``."""
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``checkpoints_dir``, oldest step first (temporary folders are skipped)."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if checkpoint_step(p) is not None and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=checkpoint_step)


def save_checkpoint(
    accelerator: Accelerator,
    checkpoints_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler | None = None,
    trainer_state: dict[str, Any],
    callback_state: dict[str, Any],
    keep: int | None = None,
    ema: nn.Module | None = None,
) -> Path:
    """Write ``checkpoints_dir/step_<step>/`` atomically and point ``latest`` at it; call it on every process.

    Args:
        accelerator: The accelerator that prepared the model and optimizer (its GradScaler is saved too).
        checkpoints_dir: Folder of the run's checkpoints.
        step: Global optimizer step, the folder's name.
        model: The model (possibly wrapped); the main process saves its unwrapped ``state_dict``.
        optimizer: Its optimizer.
        scheduler: The lr scheduler, if any.
        trainer_state: JSON counters of the trainer.
        callback_state: ``AdversarialStep.state_dict()`` of the main process.
        keep: Keep only this many most recent checkpoints (by step); ``None`` keeps all.
        ema: The moving average of the model's weights (a module of the same architecture), if the run keeps one.

    Returns:
        The checkpoint folder.

    Raises:
        FileExistsError: ``step_<step>`` exists already (checked on every process, before any write).
        ValueError: a state holds something that cannot be saved without pickle.
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / f"step_{step}"
    tmp = checkpoints_dir / f"{_TMP_PREFIX}{final.name}"
    if final.exists():
        raise FileExistsError(f"checkpoint {final} exists already; refusing to overwrite it")
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints_dir.glob(f"{_TMP_PREFIX}*"):  # left by a writer or a deletion that died
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        tmp.mkdir()
    accelerator.wait_for_everyone()
    save_state(_rng_state(accelerator.device), tmp, f"rng_{accelerator.process_index}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = unwrap_model(model).state_dict()
        save_file({name: t.detach().to("cpu", copy=True).contiguous() for name, t in weights.items()}, tmp / MODEL)
        if ema is not None:
            save_file(
                {k: t.detach().to("cpu", copy=True).contiguous() for k, t in ema.state_dict().items()}, tmp / EMA_MODEL
            )
        save_state(optimizer.state_dict(), tmp, "optimizer")
        if scheduler is not None:
            save_state(scheduler.state_dict(), tmp, "scheduler")
        if accelerator.scaler is not None:
            save_state(accelerator.scaler.state_dict(), tmp, "scaler")
        _test_pause(step)
        tensors, values = split_state(callback_state)
        save_file(tensors, tmp / CALLBACK_TENSORS)
        (tmp / CALLBACK_VALUES).write_text(json.dumps(values, indent=2))
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        files = {file.name: file_sha256(file) for file in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "version": VERSION, "robustmix_version": __version__, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync(checkpoints_dir)
        atomic_write_text(checkpoints_dir / LATEST, final.name)
        if keep is not None:
            for old in list_checkpoints(checkpoints_dir)[:-keep]:
                if old != final:
                    _remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(resume: str | Path, checkpoints_dir: str | Path) -> Path:
    """The checkpoint folder that ``resume`` names: a path, or ``"latest"`` in ``checkpoints_dir``.

    The ``latest`` pointer must name a ``step_<N>`` folder beside it (not a path, not a link): a pointer
    received with a run folder cannot lead out of it.

    Raises:
        FileNotFoundError: no ``latest`` pointer, or the folder is not a complete checkpoint.
        CheckpointError: the pointer names something other than a checkpoint of ``checkpoints_dir``.
    """
    if str(resume) == "latest":
        pointer = Path(checkpoints_dir) / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"cannot resume 'latest': {pointer} does not exist (no checkpoint was completed)")
        name = pointer.read_text(errors="replace").strip()
        path = pointer.parent / name
        if checkpoint_step(Path(name)) is None or path.is_symlink():
            raise CheckpointError(f"{pointer} names {name[:80]!r}, not a step_<N> checkpoint folder beside it")
    else:
        path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{path} is not a complete robustmix checkpoint (no {TRAINER_STATE} in it)")
    return path


def verify_checkpoint(path: str | Path) -> dict[str, str]:
    """Check a checkpoint's files against its manifest, before anything is read from them.

    Returns:
        The manifest's files, ``{file name: SHA-256}``.

    Raises:
        CheckpointError: no manifest (a checkpoint of the pickled version 1 format says so), a manifest of
            another format, or a listed file that is missing, a link or altered (names the file).
    """
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        pickled = [name for name in _PICKLED_FILES if (path / name).exists()]
        if pickled:
            raise CheckpointError(
                f"{path} was written by an older robustmix whose checkpoints pickle the optimizer, lr schedule and "
                f"RNG states ({', '.join(pickled)}); robustmix no longer unpickles (a pickle can run any code): "
                "finish or restart the run with the version that wrote it, or start a new run (another "
                "--output-dir; --init-from a finished run to start from its weights)"
            )
        raise CheckpointError(f"{path} is not a complete robustmix checkpoint: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{manifest_file} is corrupted: {err}") from err
    if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("version")) != (FORMAT, VERSION):
        raise CheckpointError(f"{manifest_file} is not a manifest of a version {VERSION} robustmix checkpoint")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        raise CheckpointError(f"{manifest_file} is corrupted: 'files' is not a map of file names to SHA-256")
    required = {MODEL, TRAINER_STATE, CALLBACK_TENSORS, CALLBACK_VALUES, *state_files("optimizer")}
    if required - files.keys():
        raise CheckpointError(f"{manifest_file} lists no {', '.join(sorted(required - files.keys()))}")
    for name, digest in files.items():
        file = path / name
        if not _FILE_NAME.fullmatch(name) or name == MANIFEST:
            raise CheckpointError(f"{manifest_file} lists {name[:80]!r}, which is not a file of the checkpoint")
        if file.is_symlink() or not file.is_file():
            raise CheckpointError(f"{file} is missing (or not a plain file); {MANIFEST} lists it")
        if file_sha256(file) != digest:
            raise CheckpointError(f"{file} is corrupted: its SHA-256 differs from the one in {MANIFEST}")
    return files


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Verify a checkpoint (``verify_checkpoint``) and read every file of it, without a model or an accelerator.

    Returns:
        ``{"trainer_state", "callback_state", "model": model tensors, "ema": moving-average tensors, "optimizer",
            "scheduler", "scaler": the state dicts (``None`` when absent), "rng": one RNG state per process}``;
            tensors are on the CPU.

    Raises:
        CheckpointError: a file is missing, altered or does not load (names the file).
    """
    path = Path(path)
    files = verify_checkpoint(path)
    try:
        model = _load_tensors(path / MODEL)
        ema = _load_tensors(path / EMA_MODEL) if EMA_MODEL in files else None
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        if not isinstance(trainer_state, dict):
            raise ValueError(f"{path / TRAINER_STATE} is not a JSON object")
        values = json.loads((path / CALLBACK_VALUES).read_text())
        if not isinstance(values, dict):
            raise ValueError(f"{path / CALLBACK_VALUES} is not a JSON object")
        callback_state = join_state(_load_tensors(path / CALLBACK_TENSORS), values)
        states = {
            name: load_state(path, name) if state_files(name)[1] in files else None
            for name in ("optimizer", "scheduler", "scaler")
        }
        ranks = sorted(int(m.group(1)) for m in map(_RNG.fullmatch, files) if m)
        if ranks != list(range(len(ranks))) or not ranks:
            raise ValueError(f"{path} holds RNG states of processes {ranks}, not of processes 0 to N-1")
        rng = [_check_rng_state(load_state(path, f"rng_{rank}"), path / f"rng_{rank}.json") for rank in ranks]
    except (ValueError, TypeError, AttributeError, OSError, UnicodeDecodeError, RecursionError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path}: {err}") from err
    return {
        "trainer_state": trainer_state, "callback_state": callback_state, "model": model, "ema": ema, **states,
        "rng": rng,
    }  # fmt: skip


def open_checkpoint(resume: str | Path, checkpoints_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Resolve ``resume`` (``resolve_checkpoint``) and read it (``read_checkpoint``).

    For ``"latest"``, a checkpoint that fails verification is skipped for the newest older one that passes,
    with a ``RuntimeWarning`` naming the one skipped and why; a checkpoint named by its path is never replaced.

    Returns:
        The checkpoint folder and its contents.

    Raises:
        FileNotFoundError: as ``resolve_checkpoint``.
        CheckpointError: no intact checkpoint (lists what is wrong with each).
    """
    path = resolve_checkpoint(resume, checkpoints_dir)
    if str(resume) != "latest":
        return path, read_checkpoint(path)
    older = [p for p in reversed(list_checkpoints(checkpoints_dir)) if checkpoint_step(p) < checkpoint_step(path)]
    problems = []
    for candidate in [path, *older]:
        try:
            contents = read_checkpoint(candidate)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            warnings.warn(
                f"skipping the checkpoints after {candidate.name} ({'; '.join(problems)}); resuming from "
                f"{candidate} instead, the newest intact one",
                RuntimeWarning,
                stacklevel=2,
            )
        return candidate, contents
    raise CheckpointError(f"no intact checkpoint to resume in {checkpoints_dir}: {'; '.join(problems)}")


def restore_checkpoint(
    accelerator: Accelerator,
    contents: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler | None = None,
    ema: nn.Module | None = None,
) -> None:
    """Restore model, optimizer, lr scheduler, GradScaler, moving average of the weights (``ema``) and this
    process's RNG states from ``read_checkpoint``'s ``contents``; call it on every process.

    Raises:
        CheckpointError: the checkpoint lacks a state this run has (scheduler, GradScaler, this process's RNG
            states) or has one it lacks, checked before anything is restored; or a state does not fit the model
            or optimizer.
    """
    scaler = accelerator.scaler
    for name, here in (("scheduler", scheduler), ("scaler", scaler), ("ema", ema)):
        if (here is None) != (contents[name] is None):
            saved = "no" if contents[name] is None else "a"
            raise CheckpointError(
                f"the checkpoint holds {saved} {name} state but this run has {'none' if here is None else 'one'}"
            )
    if len(contents["rng"]) != accelerator.num_processes:
        raise CheckpointError(
            f"the checkpoint holds RNG states of {len(contents['rng'])} processes, this run has "
            f"{accelerator.num_processes}"
        )
    device = accelerator.device.type
    if device != "cpu" and device not in contents["rng"][accelerator.process_index]:
        raise CheckpointError(f"the checkpoint holds no {device} RNG states (it was written on another device)")
    try:
        unwrap_model(model).load_state_dict(contents["model"])
        optimizer.load_state_dict(contents["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(contents["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(contents["scaler"])
        if ema is not None:
            ema.load_state_dict(contents["ema"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:  # torch's messages for a state of another shape
        raise CheckpointError(f"the checkpoint's state does not fit this run's model or optimizer: {err}") from err
    _set_rng_state(contents["rng"][accelerator.process_index], accelerator.device)


def drop_checkpoints_after(checkpoints_dir: str | Path, checkpoint: Path) -> None:
    """Make ``checkpoint`` the latest: point ``latest`` at it, then delete the later checkpoints beside it.

    Resuming from an older checkpoint of the same run starts a new timeline; the later checkpoints belong
    to the abandoned one and would collide with the new ones.
    """
    checkpoints_dir = Path(checkpoints_dir)
    if checkpoint.resolve().parent != checkpoints_dir.resolve():
        return
    step = checkpoint_step(checkpoint)
    later = [p for p in list_checkpoints(checkpoints_dir) if checkpoint_step(p) > step]
    if later:
        atomic_write_text(checkpoints_dir / LATEST, checkpoint.name)
        for path in later:
            _remove_checkpoint(path)


def file_sha256(file: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(file, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_tensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} does not load: {err}") from err


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states: Python's, NumPy's global, torch's CPU and the accelerator's generators."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, key.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if device.type != "cpu":
        module = torch.get_device_module(device.type)
        all_states = getattr(module, "get_rng_state_all", None)
        state[device.type] = all_states() if all_states else [module.get_rng_state()]
    return state


def _check_rng_state(state: Any, file: Path) -> dict[str, Any]:
    """Raise ``CheckpointError`` unless ``state`` is what ``_rng_state`` writes (tried on throwaway generators)."""
    try:
        if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= state.keys():
            raise ValueError("it lacks the python, numpy or torch generator")
        random.Random().setstate(state["python"])
        np.random.RandomState().set_state(_numpy_state(state["numpy"]))
        torch.Generator().set_state(state["torch"])
        for name, value in state.items():
            if name not in ("python", "numpy", "torch") and not (
                isinstance(value, list) and all(isinstance(t, Tensor) and t.dtype == torch.uint8 for t in value)
            ):
                raise ValueError(f"its {name!r} entry is not a list of byte tensors")
    except (ValueError, TypeError, RuntimeError, IndexError) as err:
        raise CheckpointError(f"{file} does not hold valid RNG states: {err}") from err
    return state


def _numpy_state(saved: list[Any]) -> tuple[Any, ...]:
    kind, key, pos, has_gauss, gauss = saved
    return kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if device.type != "cpu":
        module = torch.get_device_module(device.type)
        set_all = getattr(module, "set_rng_state_all", None)
        set_all(state[device.type]) if set_all else module.set_rng_state(state[device.type][0])
