"""The self-check's measure and verdict, one rule for every front end (docs/bars.md): the
relative error ``rel`` between two outputs, and :func:`judge`, which compares it with the bar.
Written against :mod:`normsurgeon.arrays`, so torch tensors and numpy arrays (an ONNX file's
outputs on onnxruntime) are judged by the same code without importing torch."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .arrays import numel, ops
from .errors import ConversionMismatchError, NormSurgeonError
from .report import ConversionReport

__all__ = ["rel_error", "same_nonfinite", "compare_outputs", "judge"]

log = logging.getLogger("normsurgeon")


def rel_error(y: Any, ref: Any) -> float:
    r"""``max|y − ref| / max(max|ref|, 1e-12)`` (docs/bars.md), computed in float64."""
    xp = ops(ref)
    y64, r64 = ops(y).f64(y), xp.f64(ref)
    if numel(r64) == 0:
        return 0.0
    return float(abs(y64 - r64).max() / max(float(abs(r64).max()), 1e-12))


def same_nonfinite(y: Any, ref: Any) -> bool:
    """``y`` is non-finite exactly where ``ref`` is: NaN in the same places and the same ±inf
    (same shapes assumed). Where a model's own output overflows, a conversion or a file that
    agrees with it is compared on the finite entries only."""
    xp = ops(ref)
    bad = ~xp.isfinite(ref)
    nan = xp.isnan(ref)
    return xp.equal(xp.isnan(y), nan) and xp.equal(xp.where(nan, 0, y)[bad],
                                                   xp.where(nan, 0, ref)[bad])


def _is_array(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return isinstance(x, np.ndarray) or (torch is not None and isinstance(x, torch.Tensor))


def _leaves(out: Any) -> list[Any]:
    """The arrays of a (nested) output, in order (torch's pytree when torch is loaded)."""
    if "torch" in sys.modules:
        from torch.utils._pytree import tree_leaves

        return [t for t in tree_leaves(out) if _is_array(t)]
    if isinstance(out, (list, tuple)):
        return [t for x in out for t in _leaves(x)]
    if isinstance(out, dict):
        return [t for x in out.values() for t in _leaves(x)]
    return [out] if _is_array(out) else []


def compare_outputs(out: Any, ref: Any) -> float:
    """Max rel over every array in two (nested) outputs; NaN when nothing finite was compared
    (every entry non-finite, empty outputs, no array at all): agreement on nothing is no
    agreement."""
    a, b = _leaves(out), _leaves(ref)
    if len(a) != len(b):
        raise NormSurgeonError(f"converted model returned {len(a)} tensors, original {len(b)}")
    rels = [r for r in (_rel_finite(x, y) for x, y in zip(a, b)) if r is not None]
    return max(rels) if rels else float("nan")


def _rel_finite(y: Any, ref: Any) -> float | None:
    """rel error over the finite entries, when both have the same non-finite entries (a model
    whose original output holds NaN/inf, e.g. from non-finite statistics left unfolded);
    inf when the non-finite entries differ; ``None`` when no finite entry was compared."""
    xp = ops(ref)
    if tuple(y.shape) != tuple(ref.shape):
        return float("inf")
    if not xp.is_float(ref):
        return 0.0 if xp.equal(y, ref) else float("inf")
    bad = ~xp.isfinite(ref)
    if not bool(bad.any()):
        return rel_error(y, ref) if numel(ref) else None
    if not same_nonfinite(y, ref):
        return float("inf")
    keep = ~bad
    return rel_error(y[keep], ref[keep]) if bool(keep.any()) else None


def _has_finite(ref_out: Any) -> bool:
    """Whether the original's output has a finite entry: then a NaN comparison is the converted
    model going non-finite there (a mismatch), else there was nothing finite to compare."""
    return any(bool(ops(t).isfinite(t).any()) for t in _leaves(ref_out) if ops(t).is_float(t))


def judge(rel: float, ref: Any, report: ConversionReport, *, check: bool, half: bool,
          bar: float, noise: Callable[[], float] | None = None,
          what: str = "the converted model", culprits: Callable[[], list[str]] | None = None
          ) -> None:
    """The verdict of every self-check (nn.Module, ExportedProgram and ONNX front ends, one
    rule): record ``report.max_rel_error`` and ``report.bar``, and raise
    :class:`ConversionMismatchError` (unless ``check`` is False: then a warning) when

    * nothing finite was compared (``rel`` is NaN and the original's output ``ref`` has no
      finite entry): agreement on nothing is no agreement;
    * ``rel`` is above the bar of docs/bars.md: ``bar`` (1e-5 folds, 1e-6 CBN/RBN), 1e-2 when
      the model computes in fp16/bf16 (``half``), or 4x the original's own fp32-vs-float64
      error (``noise()``, asked only when the fixed bar is exceeded) where that is larger;
    * ``rel`` is NaN while the original's output is finite somewhere.

    ``culprits()`` (optional) names the sites responsible, for the message."""
    if rel != rel and not _has_finite(ref):
        msg = ("the self-check compared nothing: the original's output on the example inputs "
               "is empty or not finite anywhere (all NaN/inf, or a batch of 0), so agreement "
               "cannot be measured; pass example inputs on which it gives finite outputs "
               "(check=False returns the result unchecked)")
        if check:
            raise ConversionMismatchError(msg, rel=rel, report=report)
        log.warning("%s", msg)
        return
    report.max_rel_error = rel
    bar = 1e-2 if half else bar
    if rel > bar and noise is not None:
        bar = max(bar, 4 * noise())
    report.bar = bar
    if rel > bar or rel != rel:
        msg = (f"{what} differs from the original by rel {rel:.3e} on the example inputs, "
               f"above the bar {bar:.1e} (README, 'Exactness')")
        if check:
            sites = culprits() if culprits is not None else []
            where = (f"; responsible: {', '.join(sites)} (exclude= them to convert the rest)"
                     if sites else "; pass exclude= to find the site")
            raise ConversionMismatchError(
                msg + where + ". This is a normsurgeon bug: please report it; check=False "
                "returns the result anyway", rel=rel, bar=bar, report=report, sites=sites)
        log.warning("%s", msg)
