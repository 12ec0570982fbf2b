"""normsurgeon: surgery on the normalization layers of trained PyTorch models.

Fold inference BatchNorm into neighbouring layers, replace it with Conditional or
Representative BatchNorm, export to ONNX with custom ops, and verify on onnxruntime.
"""

from __future__ import annotations

import logging

from .api import ConversionResult, convert, convert_with_report, inspect
from .errors import (
    ConditionError,
    ExportError,
    ModelInTrainingModeError,
    NormSurgeonError,
    StrictModeError,
    UnknownTransformError,
    VerificationError,
)
from .report import Action, ConversionReport, SiteRecord
from .rules import available as available_transforms

__version__ = "0.1.0"

__all__ = [
    "convert",
    "convert_with_report",
    "inspect",
    "available_transforms",
    "ConversionResult",
    "ConversionReport",
    "SiteRecord",
    "Action",
    "NormSurgeonError",
    "ModelInTrainingModeError",
    "UnknownTransformError",
    "StrictModeError",
    "ConditionError",
    "ExportError",
    "VerificationError",
]

logging.getLogger("normsurgeon").addHandler(logging.NullHandler())
