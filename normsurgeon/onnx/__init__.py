"""ONNX export with the ``normsurgeon`` custom-op domain, and verification on onnxruntime.

Imported lazily: ``onnx``, ``onnxscript`` and ``onnxruntime`` are needed only here
(``pip install normsurgeon[onnx]``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_onnx", "verify_onnx", "ExportResult", "VerificationResult", "Comparison"]


def __getattr__(name: str) -> Any:
    if name in ("export_onnx", "ExportResult"):
        from . import export

        return getattr(export, name)
    if name in ("verify_onnx", "VerificationResult", "Comparison"):
        from . import verify

        return getattr(verify, name)
    raise AttributeError(name)
