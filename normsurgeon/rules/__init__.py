"""Rules: the transform registry (:mod:`.registry`: ``to=`` in :func:`normsurgeon.convert`
and ``--to`` in the CLI), the fold planner (:mod:`.plan`, :mod:`.stats`) and the fx rules.

Names resolve on first use (PEP 562): the registry, ``.plan`` and ``.stats`` import no torch,
so the command line's ``--help`` and the ONNX front end start without importing torch."""

from __future__ import annotations

from typing import Any

from .registry import TRANSFORMS, available, get_transform, register

__all__ = ["TRANSFORMS", "register", "get_transform", "available", "Rule", "Transform",
           "BNSite", "Context", "Decision", "FOLD_RULES"]


def __getattr__(name: str) -> Any:
    if name in ("Rule", "Transform", "BNSite", "Context", "Decision"):
        from . import base

        return getattr(base, name)
    if name == "FOLD_RULES":
        from .fold import FOLD_RULES

        return FOLD_RULES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
