"""Helpers for testing conversions on models without trained weights."""

from __future__ import annotations

import torch
from torch import nn

from .tracing import is_batchnorm, is_normsurgeon_layer

__all__ = ["randomize_bn_stats"]


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm (look-alikes and normsurgeon layers included) trained-looking
    statistics, in place (SPEC §6): running_mean ~ U(−1, 1), running_var ~ U(0.5, 2),
    γ ~ U(0.5, 1.5), β ~ U(−0.5, 0.5). Identity statistics would hide a wrong fold.
    Returns ``model``; its training/eval mode is unchanged."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not (is_batchnorm(m) or is_normsurgeon_layer(m)):
                continue
            if getattr(m, "running_mean", None) is not None:
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.Tensor) and w.dim() == 1 and isinstance(b, torch.Tensor):
                n = w.numel()
                w.copy_(torch.rand(n, generator=g) + 0.5)
                b.copy_(torch.rand(n, generator=g) - 0.5)
    return model
