"""The transform registry: ``to=`` in :func:`normsurgeon.convert` and ``--to`` in the CLI both
read their choices from here (re-exported by :mod:`normsurgeon.rules`).

The built-in transforms are imported on first use: listing the names (``--help``, a
mistyped ``--to``) imports neither them nor torch."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import UnknownTransformError

__all__ = ["TRANSFORMS", "register", "get_transform", "available"]

# name -> (module under normsurgeon.rules, class), imported by get_transform
_BUILTIN = {"fold": ("fold", "FoldTransform"), "cbn": ("replace", "CBNTransform"),
            "rbn": ("replace", "RBNTransform")}

TRANSFORMS: dict[str, Any] = {}  # the transforms loaded or registered so far, by name


def register(cls: Any) -> Any:
    """Class decorator / function: make ``cls`` (a :class:`~normsurgeon.rules.base.Transform`)
    available as ``to=cls.name``."""
    TRANSFORMS[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of the transforms: the built-ins, then those registered, in registration order."""
    return list(_BUILTIN) + [n for n in TRANSFORMS if n not in _BUILTIN]


def get_transform(name: str) -> Any:
    """Look up a transform by name; the error lists the valid names."""
    if isinstance(name, str) and name in TRANSFORMS:
        return TRANSFORMS[name]
    if isinstance(name, str) and name in _BUILTIN:
        module, cls = _BUILTIN[name]
        return register(getattr(importlib.import_module(f"{__package__}.{module}"), cls))
    raise UnknownTransformError(
        f"unknown transform {name!r}; choose one of: {', '.join(available())}")
