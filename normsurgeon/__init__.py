"""normsurgeon: surgery on the normalization layers of trained PyTorch models.

Fold inference BatchNorm into neighbouring layers, replace it with Conditional or
Representative BatchNorm, export to ONNX with custom ops, and verify on onnxruntime.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

# Public names resolve on first use (PEP 562), so ``import normsurgeon`` and the command line's
# start-up do not import torch until something needs it: Ctrl-C during that import is then the
# CLI's one-line "interrupted", not a traceback from the console script.
_LAZY: dict[str, str] = {
    **dict.fromkeys(("ConversionResult", "convert", "convert_with_report", "inspect"), "api"),
    **dict.fromkeys(("ConditionError", "ConversionMismatchError", "ExportError",
                     "ModelInTrainingModeError", "NormSurgeonError", "StrictModeError",
                     "UnknownTransformError", "VerificationError"), "errors"),
    **dict.fromkeys(("ConditionalBatchNorm1d", "ConditionalBatchNorm2d",
                     "ConditionalBatchNorm3d", "RepresentativeBatchNorm2d", "convert_sync",
                     "param_groups"), "layers"),
    **dict.fromkeys(("Action", "ConversionReport", "SiteRecord"), "report"),
    **dict.fromkeys(("recalibrate", "recalibrate_with_report"), "recalibration"),
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .api import ConversionResult, convert, convert_with_report, inspect
    from .errors import (
        ConditionError,
        ConversionMismatchError,
        ExportError,
        ModelInTrainingModeError,
        NormSurgeonError,
        StrictModeError,
        UnknownTransformError,
        VerificationError,
    )
    from .layers import (
        ConditionalBatchNorm1d,
        ConditionalBatchNorm2d,
        ConditionalBatchNorm3d,
        RepresentativeBatchNorm2d,
        convert_sync,
        param_groups,
    )
    from .recalibration import recalibrate, recalibrate_with_report
    from .report import Action, ConversionReport, SiteRecord


_SUBMODULES = frozenset({"api", "cli", "errors", "frontends", "functional", "layers", "onnx",
                         "recalibration", "report", "rules", "testing", "tracing"})


def __getattr__(name: str) -> Any:
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'normsurgeon' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{where}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def available_transforms() -> list[str]:
    """The registered transforms (``convert``'s ``to``): ``["fold", "cbn", "rbn"]``."""
    from .rules import available

    return available()


def export_onnx(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """See :func:`normsurgeon.onnx.export.export_onnx` (imported lazily: needs ``onnx``)."""
    from .onnx.export import export_onnx as impl

    return impl(*args, **kwargs)


def save_onnx(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """See :func:`normsurgeon.frontends.onnx_file.save_onnx`: write a (folded) ModelProto
    atomically, with external data next to it when the model is over 2 GB or ``external``."""
    from .frontends.onnx_file import save_onnx as impl

    return impl(*args, **kwargs)


def verify_onnx(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """See :func:`normsurgeon.onnx.verify.verify_onnx` (imported lazily: needs onnxruntime)."""
    from .onnx.verify import verify_onnx as impl

    return impl(*args, **kwargs)


__version__ = "0.1.0"

__all__ = [
    "convert",
    "convert_with_report",
    "inspect",
    "available_transforms",
    "export_onnx",
    "verify_onnx",
    "save_onnx",
    "recalibrate",
    "recalibrate_with_report",
    "ConversionResult",
    "ConditionalBatchNorm1d",
    "ConditionalBatchNorm2d",
    "ConditionalBatchNorm3d",
    "RepresentativeBatchNorm2d",
    "param_groups",
    "convert_sync",
    "ConversionReport",
    "SiteRecord",
    "Action",
    "NormSurgeonError",
    "ModelInTrainingModeError",
    "UnknownTransformError",
    "StrictModeError",
    "ConditionError",
    "ConversionMismatchError",
    "ExportError",
    "VerificationError",
]

logging.getLogger("normsurgeon").addHandler(logging.NullHandler())
