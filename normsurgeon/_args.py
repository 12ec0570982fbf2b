"""The one rule for "example inputs" and for include/exclude patterns, across convert,
export_onnx, verify_onnx and recalibrate (no torch import: the ONNX front end uses it too)."""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["as_inputs", "patterns", "check_patterns"]


def as_inputs(value: Any, what: str) -> tuple[Any, ...]:
    """A tensor (or a numpy array, for ONNX files) becomes a 1-tuple, a tuple or list becomes a
    tuple; anything else is misuse."""
    torch = sys.modules.get("torch")
    if (torch is not None and isinstance(value, torch.Tensor)) or isinstance(value,
                                                                             np.ndarray):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(value)
    raise TypeError(f"{what} must be a tensor or a tuple of positional inputs, got "
                    f"{type(value).__name__}")


def patterns(p: str | Sequence[str] | None, what: str) -> list[str] | None:
    """``include=`` / ``exclude=``: one glob pattern or a list of them."""
    if p is None:
        return None
    if isinstance(p, str):
        return [p]
    if isinstance(p, Iterable) and all(isinstance(x, str) for x in p):
        return list(p)
    raise TypeError(f"{what} must be a glob pattern or a list of them, got {p!r}")


def check_patterns(inc: list[str] | None, exc: list[str] | None, names: list[str]) -> None:
    """A pattern that matches no BatchNorm is a typo until proven otherwise: say so."""
    for what, pats in (("include", inc), ("exclude", exc)):
        for p in pats or []:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                some = ", ".join(names[:3]) if names else "the model has none"
                raise ValueError(f"{what} pattern {p!r} matches no BatchNorm (names look like: "
                                 f"{some})")
