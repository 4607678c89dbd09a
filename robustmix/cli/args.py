"""The argparse types of robustmix's command lines: a bad value is a one-line error before any work.

A recipe's own flags take the same types as the shared ones: ``number`` (``0.1`` or ``8/255``, never NaN),
``positive_number``, ``nonnegative_number``, ``positive_int``, ``nonnegative_int``, ``seed_int`` and
``epoch_or_first_decay``, or ``bounded`` for another lower bound:

```python
parser.add_argument("--beta", type=nonnegative_number, default=6.0)
```
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any


def number(text: str) -> float:
    """A float or a fraction such as ``8/255``; not NaN (it fails every comparison, so no range check sees it)."""
    try:
        value = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError) as err:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.1 or 8/255, got {text!r}") from err
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.1 or 8/255, got {text!r}")
    return value


def bounded(kind: Callable[[str], float | int], low: float, *, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: ``kind`` (``int`` or ``number``), finite and ``>= low`` (``> low`` where ``strict``)."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__.strip('_')}, got {text!r}") from err
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


#: argparse type: an integer >= 1.
positive_int = bounded(int, 1)
#: argparse type: an integer >= 0.
nonnegative_int = bounded(int, 0)
#: argparse type: a finite number > 0 (``number``'s forms).
positive_number = bounded(number, 0, strict=True)
#: argparse type: a finite number >= 0 (``number``'s forms).
nonnegative_number = bounded(number, 0)

#: The largest ``--seed``: NumPy takes seeds below 2**32, and Accelerate seeds each process with seed + its index.
MAX_SEED = 2**31 - 1


def seed_int(text: str) -> int:
    """argparse type of ``--seed``: an integer in [0, ``MAX_SEED``]."""
    value = nonnegative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_SEED} (2**31 - 1), got {text}")
    return value


#: The value of a method's start-epoch flag that means the epoch of the lr schedule's first drop.
FIRST_DECAY = "first-decay"


def epoch_or_first_decay(text: str) -> int | str:
    """argparse type of a start-epoch flag: an epoch (integer >= 0) or ``first-decay``."""
    return FIRST_DECAY if text == FIRST_DECAY else nonnegative_int(text)
