"""normsurgeon: surgery on the normalization layers of trained PyTorch models.

Fold inference BatchNorm into neighbouring layers, replace it with Conditional or
Representative BatchNorm, export to ONNX with custom ops, and verify on onnxruntime.
"""

from __future__ import annotations

import logging

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
from .report import Action, ConversionReport, SiteRecord
from .rules import available as available_transforms


def export_onnx(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """See :func:`normsurgeon.onnx.export.export_onnx` (imported lazily: needs ``onnx``)."""
    from .onnx.export import export_onnx as impl

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
