"""Exceptions raised by normsurgeon.

Misuse of the API raises; a BatchNorm that cannot be transformed is *reported*, not raised,
unless ``strict=True`` asks for an error.
"""

from __future__ import annotations

import re

__all__ = [
    "NormSurgeonError",
    "ModelInTrainingModeError",
    "UnknownTransformError",
    "StrictModeError",
    "ConditionError",
    "ExportError",
    "VerificationError",
    "ConversionMismatchError",
    "one_line",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(e: BaseException, limit: int = 200) -> str:
    """``Type: first meaningful line`` of the innermost cause of an exception, without terminal
    colour codes, cut at ``limit`` characters (wrappers such as torch.export's say only
    "step 1/3 ... Next steps:"; the cause says what went wrong)."""
    seen = set()
    while e.__cause__ is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    text = _ANSI.sub("", str(e)).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    first = first if len(first) <= limit else first[: limit - 1] + "…"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class NormSurgeonError(Exception):
    """Base class of every error normsurgeon raises on purpose."""


class ModelInTrainingModeError(NormSurgeonError, ValueError):
    """Folding needs inference semantics; the model was in training mode."""


class UnknownTransformError(NormSurgeonError, ValueError):
    """``to=`` named a transform that is not registered."""


class StrictModeError(NormSurgeonError):
    """``strict=True`` and at least one BatchNorm could not be transformed.

    ``reasons`` maps each BatchNorm's qualified name to why it was left alone.
    """

    def __init__(self, reasons: dict[str, str]) -> None:
        self.reasons = dict(reasons)
        lines = [f"{len(reasons)} BatchNorm site(s) could not be transformed (strict=True):"]
        lines += [f"  - {name}: {why}" for name, why in reasons.items()]
        super().__init__("\n".join(lines))


class ConditionError(NormSurgeonError, ValueError):
    """A conditional model received a condition of the wrong shape or dtype."""


class ExportError(NormSurgeonError):
    """ONNX export failed or produced an invalid graph."""


class VerificationError(NormSurgeonError):
    """An exported graph disagreed with PyTorch beyond tolerance. ``result`` holds the numbers."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class ConversionMismatchError(NormSurgeonError):
    """The self-check of :func:`normsurgeon.convert` found the converted model further from the
    original than its numeric bar on the example inputs (or the converted model raised).
    ``rel`` is the measured error, ``bar`` the allowed one, ``report`` the conversion report,
    ``sites`` the rewritten sites found responsible by bisection (empty when they interact).
    Pass ``check=False`` to get the model and the measured error instead."""

    def __init__(self, message: str, rel: float | None = None, bar: float | None = None,
                 report: object = None, sites: list[str] | None = None) -> None:
        super().__init__(message)
        self.rel, self.bar, self.report = rel, bar, report
        self.sites = list(sites or [])
