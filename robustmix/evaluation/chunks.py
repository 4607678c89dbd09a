"""Finished chunks of an evaluation kept on disk, so that an interrupted evaluation continues where it stopped.

``evaluate_run`` cuts the examples into chunks; chunk ``c`` seeds its attacks with ``seed + c``, so its results
do not depend on the other chunks or on when it runs. Each finished chunk's per-example results go to
``<report stem>_chunks/chunk_<c>.json`` beside the report (``eval_chunks/`` for ``eval.json``), with what made
them: the evaluation's settings, the weights' SHA-256, the robustmix version, the device and the model's memory
format. A later evaluation with all of these the same takes the chunk from the file instead of attacking it
again; the folder is deleted once the report is written.

A chunk file is JSON only (nothing in it is run): bool tensors as ``pack_bools`` text, float tensors as lists.
A file that does not parse, was made by another evaluation or does not hold every result of its chunk is
ignored and its chunk evaluated again.
"""

from __future__ import annotations

import binascii
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robustmix.evaluation.report import pack_bools, unpack_bools
from robustmix.runs.checkpoint import atomic_write_json

#: Version of the chunk file's layout.
FORMAT = 1


def chunk_folder(output: str | Path) -> Path:
    """Where the finished chunks of the evaluation reported at ``output`` are kept (``eval.json``: ``eval_chunks``)."""
    output = Path(output)
    return output.with_name(f"{output.stem}_chunks")


def save_chunk(folder: Path, chunk: int, made_by: dict[str, Any], record: dict[str, Any]) -> None:
    """Write chunk ``chunk``'s ``record`` (per-example tensors, counts, loss traces, the sweep) atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    encoded = {key: _encode(value) for key, value in record.items()}
    atomic_write_json(_path(folder, chunk), {"format": FORMAT, "chunk": chunk, "made_by": made_by, **encoded})


def load_chunk(
    folder: Path,
    chunk: int,
    made_by: dict[str, Any],
    size: int,
    attacks: Sequence[str],
    sweep: Sequence[float],
    sweep_attacks: Sequence[str],
) -> dict[str, Any] | None:
    """Chunk ``chunk``'s record as ``save_chunk`` wrote it, when its file was made by the same evaluation and holds
    every result of the chunk's ``size`` examples (the ``attacks``, and ``sweep_attacks`` at each eps of
    ``sweep``); else None."""
    try:
        stored = json.loads(_path(folder, chunk).read_text())
        if (
            not isinstance(stored, dict)
            or stored.get("format") != FORMAT
            or stored.get("chunk") != chunk
            or stored.get("made_by") != json.loads(json.dumps(made_by))
        ):
            return None
        record = _decode({key: stored[key] for key in ("per_example", "attacked", "loss_trace", "sweep")})
        _check(record, size, attacks, sweep, sweep_attacks)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        return None
    return record


def remove_chunks(folder: Path) -> None:
    """Delete the kept chunks once the report holds them (nothing else is in the folder)."""
    if folder.is_dir():
        shutil.rmtree(folder)


def _path(folder: Path, chunk: int) -> Path:
    return folder / f"chunk_{chunk:05d}.json"


def _encode(value: Any) -> Any:
    """JSON for a record: tensors tagged with their kind, dicts as key-value pairs (the sweep's keys are floats)."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool:
            return {"bools": pack_bools(value.numpy()), "n": value.numel()}
        return {"floats": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {"pairs": [[key, _encode(item)] for key, item in value.items()]}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"bools", "n"}:
        return torch.from_numpy(unpack_bools(value["bools"], int(value["n"])).copy())
    if isinstance(value, dict) and set(value) == {"floats", "dtype"}:
        dtype = {"float32": torch.float32, "float64": torch.float64}[value["dtype"]]
        return torch.tensor(value["floats"], dtype=dtype)
    if isinstance(value, dict) and set(value) == {"pairs"}:
        return {key: _decode(item) for key, item in value["pairs"]}
    if isinstance(value, dict):
        return {key: _decode(item) for key, item in value.items()}
    return value


def _check(
    record: dict[str, Any], size: int, attacks: Sequence[str], sweep: Sequence[float], sweep_attacks: Sequence[str]
) -> None:
    """ValueError unless ``record`` holds every per-example result of a chunk of ``size`` examples."""

    def examples(per_example: dict[str, Any], names: Sequence[str]) -> None:
        tensors = [per_example["correct"], per_example["margin_clean"], per_example["margin_adv"]]
        for key in ("cumulative", "standalone"):
            if set(per_example[key]) != set(names):
                raise ValueError(f"the chunk's {key} results are for other attacks")
            tensors += [per_example[key][name] for name in names]
        if any(not isinstance(t, Tensor) or t.shape != (size,) for t in tensors):
            raise ValueError(f"the chunk's per-example results are not all of its {size} examples")

    examples(record["per_example"], attacks)
    if set(record["attacked"]) != set(attacks) or not all(isinstance(n, int) for n in record["attacked"].values()):
        raise ValueError("the chunk's attacked counts are for other attacks")
    if not set(record["loss_trace"]) <= set(attacks):
        raise ValueError("the chunk's loss traces are for other attacks")
    if set(record["sweep"]) != set(sweep):
        raise ValueError("the chunk's sweep is at other radii")
    for per_example in record["sweep"].values():
        examples(per_example, sweep_attacks)
