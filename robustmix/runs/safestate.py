"""State dicts as safetensors plus JSON, so that loading a checkpoint never unpickles anything.

``torch.save`` pickles, and unpickling a file runs whatever code the file names: a checkpoint received from
someone else would run as the user who resumes it. The state dicts robustmix checkpoints besides the model
weights (optimizer, lr scheduler, GradScaler) hold only tensors, numbers, strings, ``None`` and containers of
those, so they are written as two files: ``<name>.safetensors`` with the tensors and ``<name>.json`` with
everything else, each tensor replaced by a reference. Only the types below are written or read back; anything
else is refused when saving, and a file that holds anything else is refused when loading.

JSON forms (every non-list JSON object has exactly one key, its tag):

    None, bool, int, float (also inf and NaN), str     as themselves
    list                                               [...]
    tuple                                              {"tuple": [...]}
    dict with str keys (also OrderedDict)              {"dict": {key: value}}
    dict with int keys (an optimizer's "state")        {"int_dict": {"<key>": value}}
    collections.Counter (MultiStepLR's milestones)     {"counter": [[key, count], ...]}
    torch.Tensor                                       {"tensor": "<name in the .safetensors file>"}
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

_SCALARS = (type(None), bool, int, float, str)


def encode_state(value: Any, tensors: dict[str, Tensor], path: str = "") -> Any:
    """The JSON form of ``value``; its tensors are copied to the CPU into ``tensors``, named by their path.

    Args:
        value: A state dict (or any value made of the types in the module docstring).
        tensors: Collects the tensors, ``{name: tensor}``.
        path: Where ``value`` sits in the state, ``"state/0/exp_avg"``: the name of a tensor, and what an
            error names.

    Raises:
        ValueError: ``value`` holds a type that cannot be written without pickle (names its path).
    """
    if isinstance(value, Tensor):
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": path}
    if type(value) in _SCALARS:
        return value
    if type(value) is list:
        return [encode_state(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if type(value) is tuple:
        return {"tuple": [encode_state(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]}
    if type(value) is Counter:
        return {"counter": [[encode_state(k, tensors, path), n] for k, n in value.items()]}
    if type(value) in (dict, OrderedDict):
        if all(type(k) is str for k in value):
            return {"dict": {k: encode_state(v, tensors, f"{path}/{k}") for k, v in value.items()}}
        if all(type(k) is int for k in value):
            return {"int_dict": {str(k): encode_state(v, tensors, f"{path}/{k}") for k, v in value.items()}}
    raise ValueError(
        f"state entry {path or '(top)'!r} is a {type(value).__name__}: only tensors, numbers, strings, None, "
        "lists, tuples, Counters and dicts with str or int keys can be saved without pickle"
    )


def decode_state(tree: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of ``encode_state``.

    Raises:
        ValueError: ``tree`` holds something ``encode_state`` does not write, or a tensor reference that
            ``tensors`` lacks.
    """
    if type(tree) in _SCALARS:
        return tree
    if type(tree) is list:
        return [decode_state(v, tensors) for v in tree]
    if type(tree) is not dict or len(tree) != 1:
        raise ValueError(f"unexpected entry {str(tree)[:80]}")
    tag, body = next(iter(tree.items()))
    if tag == "tensor" and type(body) is str:
        if body not in tensors:
            raise ValueError(f"tensor {body!r} is missing from the tensors file")
        return tensors[body]
    if tag == "tuple" and type(body) is list:
        return tuple(decode_state(v, tensors) for v in body)
    pairs = type(body) is list and all(type(p) is list and len(p) == 2 and type(p[1]) is int for p in body)
    if tag == "counter" and pairs:
        return Counter({decode_state(k, tensors): n for k, n in body})
    if tag == "dict" and type(body) is dict:
        return {k: decode_state(v, tensors) for k, v in body.items()}
    if tag == "int_dict" and type(body) is dict and all(k.lstrip("-").isdigit() for k in body):
        return {int(k): decode_state(v, tensors) for k, v in body.items()}
    raise ValueError(f"unexpected entry {str(tree)[:80]}")


def state_files(name: str) -> tuple[str, str]:
    """The two file names of state ``name``: ``(<name>.safetensors, <name>.json)``."""
    return f"{name}.safetensors", f"{name}.json"


def save_state(state: Any, folder: str | Path, name: str) -> None:
    """Write ``state`` as ``folder/<name>.safetensors`` and ``folder/<name>.json`` (not atomically: the caller
    writes into a temporary folder)."""
    tensors: dict[str, Tensor] = {}
    tree = encode_state(state, tensors)
    tensor_file, json_file = state_files(name)
    save_file(tensors, Path(folder) / tensor_file)
    (Path(folder) / json_file).write_text(json.dumps(tree, indent=1))


def load_state(folder: str | Path, name: str) -> Any:
    """Read back what ``save_state`` wrote; tensors are on the CPU.

    Raises:
        ValueError: a file is missing, unreadable or holds something ``save_state`` does not write (names it).
    """
    tensor_file, json_file = (Path(folder) / f for f in state_files(name))
    try:
        tensors = load_file(tensor_file)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{tensor_file} does not load: {err}") from err
    try:
        tree = json.loads(json_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{json_file} does not load: {err}") from err
    try:
        return decode_state(tree, tensors)
    except (ValueError, TypeError, RecursionError) as err:  # TypeError: an unhashable Counter key
        raise ValueError(f"{json_file} is not a robustmix state file: {err}") from err
