"""Shared helpers: docs/bars.md tolerances and randomized BatchNorm statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normsurgeon.functional import rel_error
from normsurgeon.testing import randomize_bn_stats

FOLD_BAR = 1e-5          # fold / convert fp32 vs original
CONVERT_BAR = 1e-6       # CBN / RBN right after conversion
ORT_BAR = 1e-5           # onnxruntime CPU vs PyTorch
HALF_BAR = 1e-2          # fp16 / bf16 folding


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """docs/bars.md statistics (see :func:`normsurgeon.testing.randomize_bn_stats`)."""
    return randomize_bn_stats(model, seed)


def fp64_rel(model: nn.Module, *inputs: torch.Tensor) -> float:
    """rel error of the fp32 model against its float64 twin (the 4x reference of docs/bars.md)."""
    import copy

    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = twin(*[x.double() for x in inputs])
        out = model(*inputs)
    return rel_error(out, ref)


def assert_fold_exact(original: nn.Module, converted: nn.Module, *inputs: torch.Tensor) -> float:
    """docs/bars.md fold bar: rel ≤ 1e-5 and ≤ 4× the fp32-vs-fp64 rel of the original."""
    with torch.no_grad():
        ref = original(*inputs)
        out = converted(*inputs)
    rel = rel_error(out, ref)
    base = fp64_rel(original, *inputs)
    assert rel <= FOLD_BAR, f"rel {rel:.3e} > {FOLD_BAR}"
    assert rel <= max(4 * base, 1e-7), f"rel {rel:.3e} > 4x fp64 baseline {base:.3e}"
    return rel


def count_bn(model: nn.Module) -> int:
    from normsurgeon.tracing import is_batchnorm

    return sum(is_batchnorm(m) for m in model.modules())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def wrong_fold(monkeypatch):
    """Make the one fold-math entry point 1% wrong in its weights: every front end's self-check
    must then refuse the result."""
    from normsurgeon import foldmath

    real = foldmath.fold_weights

    def wrong(*a, **k):
        w, b = real(*a, **k)
        return w * 1.01, b

    monkeypatch.setattr(foldmath, "fold_weights", wrong)
