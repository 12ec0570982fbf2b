"""The few array operations the fold math and the planner need, for torch tensors and numpy
arrays alike.

The fold math (:mod:`normsurgeon.foldmath`), the planner (:mod:`normsurgeon.rules.plan`) and
the self-check's verdict (:mod:`normsurgeon.verdict`) are written once against this interface:
the ``nn.Module`` and ExportedProgram front ends hand them torch tensors, the ONNX front end
numpy arrays, so an ONNX file is folded by the same code without importing torch (which takes
longer to import than the whole fold of a ResNet-50 file). Importing this module imports
numpy, never torch: the torch side is set up on the first torch tensor it sees.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["Ops", "ops", "numel", "all_finite"]


class Ops:
    """Operations on arrays of one library. Every float64 result is a new array."""

    name = "numpy"

    def f64(self, x: Any) -> Any:
        """A float64 copy."""
        return np.array(x, dtype=np.float64)

    def cat(self, xs: list[Any]) -> Any:
        return np.concatenate([np.ravel(x) for x in xs]).astype(np.float64, copy=False)

    def repeat(self, values: list[float], sizes: list[int], like: Any) -> Any:
        """``values[i]`` repeated ``sizes[i]`` times, float64."""
        return np.repeat(np.asarray(values, dtype=np.float64), sizes)

    def rsqrt(self, x: Any) -> Any:
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 / np.sqrt(x)

    def ones_like(self, x: Any) -> Any:
        return np.ones(np.shape(x), dtype=np.float64)

    def zeros(self, n: int, like: Any) -> Any:
        return np.zeros(n, dtype=np.float64)

    def sum(self, x: Any, axis: int) -> Any:
        return np.sum(x, axis=axis)

    def scaled(self, weight: Any, scale: Any, like: Any | None) -> Any:
        """``weight · scale`` in float64; rounded once to ``like``'s dtype when given. One ufunc
        call computing in float64 and writing ``like``'s dtype: numpy converts through small
        internal buffers, so no float64 copy of the whole weight is made (that copy was 3/4
        of a ResNet-50 file's fold time)."""
        w = np.asarray(weight)
        with np.errstate(over="ignore", invalid="ignore"):
            if like is None:
                return np.multiply(w, scale, dtype=np.float64)
            out = np.empty(w.shape, dtype=np.asarray(like).dtype)
            np.multiply(w, scale, out=out, dtype=np.float64, casting="unsafe")
            return out

    def cast_like(self, value: Any, ref: Any) -> Any:
        """``value`` rounded once to ``ref``'s dtype (C order: ONNX stores no strides)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return np.ascontiguousarray(np.asarray(value).astype(np.asarray(ref).dtype))

    def astype_like(self, value: Any, ref: Any) -> Any:
        return self.cast_like(value, ref)

    def isfinite(self, x: Any) -> Any:
        return np.isfinite(x)

    def isnan(self, x: Any) -> Any:
        return np.isnan(x)

    def equal(self, a: Any, b: Any) -> bool:
        return bool(np.array_equal(a, b))

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return np.where(cond, a, b)

    def is_float(self, x: Any) -> bool:
        return np.issubdtype(np.asarray(x).dtype, np.floating) or np.issubdtype(
            np.asarray(x).dtype, np.complexfloating)

    def device(self, x: Any) -> Any:
        return "cpu"


class _TorchOps(Ops):
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def f64(self, x: Any) -> Any:
        return x.detach().to(self.torch.float64, copy=True)

    def cat(self, xs: list[Any]) -> Any:
        with self.torch.no_grad():  # one cat; only the rare non-1-D tensor pays a reshape
            return self.torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in xs]).to(
                self.torch.float64)

    def repeat(self, values: list[float], sizes: list[int], like: Any) -> Any:
        t = self.torch
        return t.tensor(values, dtype=t.float64, device=like.device).repeat_interleave(
            t.tensor(sizes, device=like.device))

    def rsqrt(self, x: Any) -> Any:
        return self.torch.rsqrt(x)

    def ones_like(self, x: Any) -> Any:
        return self.torch.ones_like(x, dtype=self.torch.float64)

    def zeros(self, n: int, like: Any) -> Any:
        return self.torch.zeros(n, dtype=self.torch.float64, device=like.device)

    def sum(self, x: Any, axis: int) -> Any:
        return x.sum(dim=axis)

    def scaled(self, weight: Any, scale: Any, like: Any | None) -> Any:
        from .functional import _scaled  # the blocked, cache-sized kernel

        return _scaled(weight, scale, like)

    def cast_like(self, value: Any, ref: Any) -> Any:
        """Into ``ref``'s dtype, device and exact strides (channels_last stays so)."""
        out = self.torch.empty_strided(ref.size(), ref.stride(), dtype=ref.dtype,
                                       device=ref.device)
        out.copy_(value.detach())
        return out

    def astype_like(self, value: Any, ref: Any) -> Any:
        return value.to(ref.dtype)

    def isfinite(self, x: Any) -> Any:
        return self.torch.isfinite(x)

    def isnan(self, x: Any) -> Any:
        return self.torch.isnan(x)

    def equal(self, a: Any, b: Any) -> bool:
        return bool(self.torch.equal(a, b))

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self.torch.where(cond, a, b)

    def is_float(self, x: Any) -> bool:
        return bool(x.is_floating_point() or x.is_complex())

    def device(self, x: Any) -> Any:
        return x.device


_NUMPY = Ops()
_torch_ops: _TorchOps | None = None


def ops(x: Any) -> Ops:
    """The operations for ``x``'s library: torch's for a ``torch.Tensor``, else numpy's."""
    global _torch_ops
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if _torch_ops is None:
            _torch_ops = _TorchOps()
        return _torch_ops
    return _NUMPY


def numel(x: Any) -> int:
    """Number of elements (``Tensor.size`` is a method, ``ndarray.size`` a number)."""
    n = getattr(x, "numel", None)
    return int(n()) if callable(n) else int(np.size(x))


def all_finite(*xs: Any) -> bool:
    """Every entry of every array is finite."""
    return all(bool(ops(x).isfinite(x).all()) for x in xs)
