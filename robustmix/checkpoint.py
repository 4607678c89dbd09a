"""Resumable checkpoints and atomic file writes.

A checkpoint is a folder ``checkpoints/step_<N>/`` holding

- what ``accelerator.save_state`` writes: model weights (``model.safetensors``), optimizer, registered
  objects such as the lr scheduler, the GradScaler under fp16, and every process's RNG states;
- ``callbacks.safetensors`` and ``callbacks.json``: the callbacks' ``state_dict()`` (tensors, then the
  plain values);
- ``trainer_state.json``: the trainer's counters (epoch, position in the epoch, step, best metric).

It is written into ``checkpoints/.tmp-step_<N>/``, every file is fsynced, and only the complete folder is
renamed to ``step_<N>``; after that the ``latest`` pointer file is replaced (temporary file + ``os.replace``).
A writer that dies at any moment leaves ``latest`` naming the previous complete checkpoint, and a leftover
``.tmp-*`` folder is never taken for a checkpoint (the next save removes it). Old checkpoints are deleted
the same way round: renamed to ``.tmp-*`` first, so a deletion cut short never leaves a partial
``step_<N>``. ``read_checkpoint`` reads every file of a checkpoint without a model, to verify it.

For tests only: ``ROBUSTMIX_TEST_CHECKPOINT_PAUSE=<seconds>`` (or ``<seconds>@<step>``: only the write of
``step_<step>``) makes the main process sleep while the temporary folder is half written (after
``save_state``, before the callback and trainer state), so a test can kill the writer inside that window;
unset or empty, it does nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor

TRAINER_STATE = "trainer_state.json"
CALLBACK_TENSORS = "callbacks.safetensors"
CALLBACK_VALUES = "callbacks.json"
LATEST = "latest"
_TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"step_(\d+)")
#: Test-only: seconds the main process sleeps inside a checkpoint write (see the module docstring).
TEST_PAUSE_ENV = "ROBUSTMIX_TEST_CHECKPOINT_PAUSE"


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
    trainer_state: dict[str, Any],
    callback_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write ``checkpoints_dir/step_<step>/`` atomically and point ``latest`` at it; call it on every process.

    Args:
        accelerator: The accelerator that prepared the model and optimizer (and registered the scheduler).
        checkpoints_dir: Folder of the run's checkpoints.
        step: Global optimizer step, the folder's name.
        trainer_state: JSON counters of the trainer.
        callback_state: ``AdversarialStep.state_dict()`` of the main process.
        keep: Keep only this many most recent checkpoints (by step); ``None`` keeps all.

    Returns:
        The checkpoint folder.

    Raises:
        FileExistsError: ``step_<step>`` exists already (checked on every process, before any write).
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
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _test_pause(step)
        tensors, values = split_state(callback_state)
        save_file(tensors, tmp / CALLBACK_TENSORS)
        (tmp / CALLBACK_VALUES).write_text(json.dumps(values, indent=2))
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
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

    Raises:
        FileNotFoundError: no ``latest`` pointer, or the folder is not a complete checkpoint.
    """
    if str(resume) == "latest":
        pointer = Path(checkpoints_dir) / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"cannot resume 'latest': {pointer} does not exist (no checkpoint was completed)")
        path = pointer.parent / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{path} is not a complete robustmix checkpoint (no {TRAINER_STATE} in it)")
    return path


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer, registered objects and RNG states from ``path``; call it on every process.

    Returns:
        ``(trainer_state, callback_state)``; callback tensors are on the CPU.
    """
    path = Path(path)
    accelerator.load_state(str(path))
    tensors = load_file(path / CALLBACK_TENSORS)
    values = json.loads((path / CALLBACK_VALUES).read_text())
    return json.loads((path / TRAINER_STATE).read_text()), join_state(tensors, values)


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


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read every file of a checkpoint folder, without a model or an accelerator: a full integrity check.

    ``.safetensors`` files load with safetensors, ``.json`` files parse, and the files Accelerate pickles
    (optimizer, scheduler, RNG states, GradScaler) load with ``torch.load(weights_only=False)``: read only
    checkpoints you trust, as for resuming.

    Returns:
        ``{"trainer_state", "callback_state", "model": model tensors, "files": {file name: content}}``.

    Raises:
        FileNotFoundError: not a complete checkpoint (no ``trainer_state.json`` or no model weights).
        ValueError: a file does not load (names the file).
    """
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{path} is not a complete robustmix checkpoint (no {TRAINER_STATE} in it)")
    files: dict[str, Any] = {}
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                files[file.name] = load_file(file)
            elif file.suffix == ".json":
                files[file.name] = json.loads(file.read_text())
            elif file.is_file():
                files[file.name] = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as err:  # safetensors, JSON and unpickling errors come in many types
            raise ValueError(f"checkpoint file {file} does not load ({type(err).__name__}: {err})") from err
    model = files.get("model.safetensors")
    if model is None:
        raise FileNotFoundError(f"{path} holds no model.safetensors")
    callback_state = join_state(files.get(CALLBACK_TENSORS, {}), files.get(CALLBACK_VALUES, {}))
    return {"trainer_state": files[TRAINER_STATE], "callback_state": callback_state, "model": model, "files": files}
