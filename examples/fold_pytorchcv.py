"""Fold the BatchNorm of a third-party model (pytorchcv) and measure what changed.

    python examples/fold_pytorchcv.py                      # mobilenetv2_w1 at 224x224
    python examples/fold_pytorchcv.py --model mixnet_s     # a model torch.fx cannot trace
    python examples/fold_pytorchcv.py --quick              # small input, for the tests

No pretrained weights can be downloaded here, so the model gets random weights and randomized
BatchNorm statistics: an identity BN would hide a wrong fold.
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch

import normsurgeon as ns
from normsurgeon.testing import randomize_bn_stats


def build(name: str) -> torch.nn.Module:
    modules = {"mobilenetv2_w1": "mobilenetv2", "mixnet_s": "mixnet", "resnet18": "resnet",
               "efficientnet_b0c": "efficientnet", "densenet121": "densenet"}
    if name not in modules:
        raise SystemExit(f"choose one of {', '.join(modules)}")
    model = getattr(importlib.import_module(f"pytorchcv.models.{modules[name]}"), name)()
    randomize_bn_stats(model, seed=0)  # trained-looking statistics (no downloads here)
    return model.eval()


def latency(model: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        for _ in range(reps):
            model(x)
    return (time.perf_counter() - t) / reps


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_w1")
    p.add_argument("--quick", action="store_true", help="tiny run for the test-suite")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = build(args.model)
    size = 224  # pytorchcv classifiers end in a fixed 7x7 pool
    x = torch.randn(1, 3, size, size)
    folded, report = ns.convert_with_report(model, "fold", example_inputs=x)
    print(report.table())
    reps = 2 if args.quick else 20
    before, after = latency(model, x, reps), latency(folded, x, reps)
    print(f"\nlatency: {before * 1e3:.1f} ms -> {after * 1e3:.1f} ms "
          f"({after / before:.2f}x); max rel error {report.max_rel_error:.2e}")
    return {"rel": report.max_rel_error or 0.0, "folded": report.counts.get("folded", 0)}


if __name__ == "__main__":
    main()
