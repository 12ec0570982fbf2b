"""The one rule for "example inputs" across convert, export_onnx and verify_onnx."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["as_inputs"]


def as_inputs(value: Any, what: str) -> tuple[Any, ...]:
    """A tensor becomes a 1-tuple, a tuple or list becomes a tuple; anything else is misuse."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(value)
    raise TypeError(f"{what} must be a tensor or a tuple of positional inputs, got "
                    f"{type(value).__name__}")
