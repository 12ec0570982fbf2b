"""The transform registry: ``to=`` in :func:`normsurgeon.convert` and ``--to`` in the CLI both
read their choices from here."""

from __future__ import annotations

from ..errors import UnknownTransformError
from .base import BNSite, Context, Decision, Rule, Transform
from .fold import FOLD_RULES, FoldTransform
from .replace import CBNTransform, RBNTransform

__all__ = ["TRANSFORMS", "register", "get_transform", "available", "Rule", "Transform",
           "BNSite", "Context", "Decision", "FOLD_RULES"]

TRANSFORMS: dict[str, type[Transform]] = {}


def register(cls: type[Transform]) -> type[Transform]:
    """Class decorator / function: make ``cls`` available as ``to=cls.name``."""
    TRANSFORMS[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of the registered transforms, in registration order."""
    return list(TRANSFORMS)


def get_transform(name: str) -> type[Transform]:
    """Look up a transform by name; the error lists the valid names."""
    try:
        return TRANSFORMS[name]
    except (KeyError, TypeError):
        raise UnknownTransformError(
            f"unknown transform {name!r}; choose one of: {', '.join(TRANSFORMS)}"
        ) from None


register(FoldTransform)
register(CBNTransform)
register(RBNTransform)
