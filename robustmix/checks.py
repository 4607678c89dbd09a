"""Argument checks: each raises a one-line error that names the argument and the value it got, before any work.

robustmix's callbacks, attacks and trainer check their arguments with these, and a callback of your own can too:

```python
from robustmix.checks import check_choice, check_int, check_number

class MyWeights(Callback):
    def __init__(self, temperature: float = 1.0, burn_in_epochs: int = 0, kind: str = "tanh") -> None:
        check_number("temperature", temperature, 0, strict=True)
        check_int("burn_in_epochs", burn_in_epochs, 0)
        check_choice("kind", kind, ("tanh", "sigmoid"))
```

``bool`` is never a number here: ``True`` passed for ``steps`` is a mistake, not 1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection


def is_integer(value: object) -> bool:
    """Whether ``value`` is a Python ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether ``value`` is a real number (``int``, ``float``, NumPy scalars) and not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int = 0, *, optional: bool = False) -> None:
    """Check that ``value`` is an integer ``>= minimum`` (or ``None`` where ``optional``).

    Raises:
        ValueError: e.g. ``steps must be an integer >= 1, got 0``.
    """
    if optional and value is None:
        return
    if not is_integer(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}")


def check_number(
    name: str, value: object, minimum: float = 0.0, *, strict: bool = False, optional: bool = False
) -> None:
    """Check that ``value`` is a finite number ``>= minimum`` (``> minimum`` where ``strict``), or ``None`` where
    ``optional``. NaN fails every comparison, so it fails here too.

    Raises:
        TypeError: ``value`` is not a number (a string from a config file, a ``bool``).
        ValueError: e.g. ``beta must be a finite number >= 0, got inf``.
    """
    if optional and value is None:
        return
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    low_ok = value > minimum if strict else value >= minimum  # type: ignore[operator]
    if not (low_ok and math.isfinite(value)):  # type: ignore[arg-type]
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}{' or None' if optional else ''}, got {value!r}")


def check_unit(name: str, value: object) -> None:
    """Check that ``value`` is a number in [0, 1] (a probability, a fraction, an interpolation weight).

    Raises:
        TypeError: ``value`` is not a number.
        ValueError: e.g. ``lam_max must be in [0, 1], got 1.5``.
    """
    if not is_number(value):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__} {value!r}")
    if not 0 <= value <= 1:  # type: ignore[operator]
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def check_choice(name: str, value: object, choices: Collection[object]) -> None:
    """Check that ``value`` is one of ``choices``.

    Raises:
        ValueError: e.g. ``norm must be one of ('linf', 'l2'), got 'l1'``.
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
