"""The pytorchcv model zoo as a test bed: enumerate models, fold each, compare with fx ``fuse``.

    python benchmarks/zoo.py                 # full sweep (~850 models), JSON lines to stdout
    python benchmarks/zoo.py resnet18 mixnet_s

Each model gets random weights and randomized BN statistics (docs/bars.md); "builds and runs" means
the original model produced an output on a random input of its declared size.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import pkgutil
import sys
import time
from typing import Any

# A script run as `python benchmarks/<name>.py` has benchmarks/ as sys.path[0], where onnx.py
# would shadow the onnx package. Every benchmark imports this module first: it takes that
# entry off, for all of them.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import torch  # noqa: E402
from torch import nn  # noqa: E402

ZOO_SKIP_MODULES = {"model_store", "propainter_rfc", "common"}  # torchvision imports / helpers


def zoo_models() -> dict[str, tuple[str, str]]:
    """``{model_name: (module, function)}`` for every model constructor pytorchcv exports."""
    import pytorchcv.models as pkg

    out: dict[str, tuple[str, str]] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in ZOO_SKIP_MODULES or info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"pytorchcv.models.{info.name}")
        except Exception:  # noqa: BLE001 - modules needing missing extras
            continue
        for fn in getattr(mod, "__all__", []):
            obj = getattr(mod, fn, None)
            if callable(obj) and not isinstance(obj, type) and fn[0].islower():
                out.setdefault(fn, (info.name, fn))
    return out


def build(name: str) -> nn.Module:
    module, fn = zoo_models()[name] if name not in _CACHE else _CACHE[name]
    return getattr(importlib.import_module(f"pytorchcv.models.{module}"), fn)()


_CACHE: dict[str, tuple[str, str]] = {}


def example_input(model: nn.Module, batch: int = 1,
                  size: tuple[int, int] | None = None) -> torch.Tensor:
    size = size or getattr(model, "in_size", (224, 224))
    if isinstance(size, int):
        size = (size, size)
    channels = getattr(model, "in_channels", 3)
    return torch.randn(batch, channels, *size)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics as in docs/bars.md so that folding is really exercised; eval mode."""
    from normsurgeon.testing import randomize_bn_stats

    return randomize_bn_stats(model, seed).eval()


def check(name: str, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Fold one zoo model; compare outputs and BN counts with fx ``fuse``."""
    import normsurgeon as ns
    from normsurgeon.functional import rel_error
    from normsurgeon.tracing import is_batchnorm

    torch.manual_seed(0)
    rec: dict[str, Any] = {"model": name}
    try:
        model = randomize(build(name))
        x = example_input(model, size=size)
        with torch.no_grad():
            ref = model(x)
    except Exception as e:  # noqa: BLE001
        rec["status"] = "does not build/run"
        rec["error"] = f"{type(e).__name__}: {e}"[:200]
        return rec
    if not torch.isfinite(_first(ref)).all():  # e.g. 1000-layer CIFAR ResNets, random weights
        rec["status"] = "original output not finite"
        return rec
    rec["bn"] = sum(is_batchnorm(m) for m in model.modules())
    t = time.perf_counter()
    out, report = ns.convert_with_report(model, example_inputs=(x,))
    rec["seconds"] = round(time.perf_counter() - t, 3)
    rec["trace"] = report.regions.get("", "?").split(":")[0]
    rec["bn_left"] = sum(is_batchnorm(m) for m in out.modules())
    rec["folded"] = report.counts.get("folded", 0)
    with torch.no_grad():
        rec["rel"] = rel_error(_first(out(x)), _first(ref))
        if rec["rel"] > 1e-5:
            # docs/bars.md second bar: how far is the *unconverted* fp32 model from its fp64 twin?
            twin = copy.deepcopy(model).double()
            ref64 = twin(x.double())
            rec["fp64_rel"] = rel_error(_first(ref), _first(ref64))
            if not within_bar(rec):  # is it the fold, or fp32 noise? fold in float64 to see
                folded64 = ns.convert(twin, example_inputs=(x.double(),))
                rec["fold_rel_fp64"] = rel_error(_first(folded64(x.double())), _first(ref64))
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(copy.deepcopy(model))
        rec["fuse_bn_left"] = sum(is_batchnorm(m) for m in fused.modules())
        with torch.no_grad():
            rec["fuse_rel"] = rel_error(_first(fused(x)), _first(ref))
    except Exception as e:  # noqa: BLE001
        rec["fuse_bn_left"] = None
        rec["fuse_error"] = type(e).__name__
    rec["status"] = "ok"
    return rec


def _first(y: Any) -> torch.Tensor:
    while isinstance(y, (tuple, list)):
        y = y[0]
    return y


def within_bar(rec: dict[str, Any]) -> bool:
    """docs/bars.md fold bar: rel ≤ 1e-5; for a model whose own fp32 output is further than that
    from its fp64 twin (ill-conditioned random weights), rel ≤ 4× that baseline."""
    if rec["rel"] <= 1e-5:
        return True
    return rec.get("fp64_rel") is not None and rec["rel"] <= 4 * rec["fp64_rel"]


def exact_in_fp64(rec: dict[str, Any]) -> bool:
    """The fold itself is exact: the same fold done in float64 is within 1e-9."""
    return rec.get("fold_rel_fp64") is not None and rec["fold_rel_fp64"] <= 1e-9


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = sys.argv[1:] or sorted(zoo_models())
    for n in names:
        try:
            r = check(n)
        except Exception as e:  # noqa: BLE001 - a sweep must report, not stop
            r = {"model": n, "status": "convert failed", "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(r), flush=True)
