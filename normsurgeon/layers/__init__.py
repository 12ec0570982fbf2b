"""normsurgeon's own normalization layers (never ``_BatchNorm`` subclasses; docs/cbn-rbn.md)."""

from __future__ import annotations

from torch import nn

from ._common import NormStatsMixin, convert_sync
from .cbn import (
    ConditionalBatchNorm1d,
    ConditionalBatchNorm2d,
    ConditionalBatchNorm3d,
    ConditionSpec,
    check_condition,
)
from .rbn import RepresentativeBatchNorm2d

__all__ = [
    "ConditionalBatchNorm1d",
    "ConditionalBatchNorm2d",
    "ConditionalBatchNorm3d",
    "RepresentativeBatchNorm2d",
    "ConditionSpec",
    "check_condition",
    "convert_sync",
    "param_groups",
]


def param_groups(model: nn.Module, weight_decay: float = 0.0, **group_options: float
                 ) -> list[dict]:
    """Optimiser parameter groups holding only the *new* parameters of normsurgeon layers:
    the CBN hidden layer (and label embedding) with ``weight_decay``, the delta / calibration
    parameters with none. Extra keyword arguments (``lr=...``) go into both groups.

    >>> torch.optim.AdamW(param_groups(model, weight_decay=1e-4), lr=1e-3)  # doctest: +SKIP
    """
    decay, no_decay = [], []
    for m in model.modules():
        if isinstance(m, NormStatsMixin) and hasattr(m, "new_parameters"):
            groups = m.new_parameters()
            decay += [p for p in groups["decay"] if p.requires_grad]
            no_decay += [p for p in groups["no_decay"] if p.requires_grad]
    out = []
    if decay:
        out.append({"params": decay, "weight_decay": weight_decay, **group_options})
    if no_decay:
        out.append({"params": no_decay, "weight_decay": 0.0, **group_options})
    if not out:
        raise ValueError("the model has no trainable normsurgeon layer parameters; "
                         "convert it with to='cbn' or to='rbn' first")
    return out
