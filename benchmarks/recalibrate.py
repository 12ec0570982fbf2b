"""Recalibration: ``ns.recalibrate`` vs torch's ``update_bn``, side by side in one run.

    python benchmarks/recalibrate.py [--reps 3] [--batches 4] [--batch-size 4] [--busy]

* pytorchcv ResNet-50 (random weights, randomized BN statistics), ``--batches`` batches of
  ``--batch-size`` random 224x224 images:
  time of the default mode, of ``exact=True``, and of ``update_bn`` (median of ``--reps``
  interleaved rounds); and each result's distance to the exact float64 reference (the
  fixed point computed in float64): max over layers of ``max|Δvar| / max|var_ref|``.
* the digits CNN of examples/recalibrate_pruned.py, 30% of its channels pruned: test accuracy
  trained, pruned, after ``ns.recalibrate`` and after ``update_bn``; and the same distance on
  class-sorted data in batches of 32 and 8 (where per-batch averaging is off).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import zoo  # first: it takes benchmarks/ off sys.path (onnx.py there shadows onnx)

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # export_fold, last: after onnx

# isort: split
import normsurgeon as ns
from normsurgeon.tracing import is_batchnorm


def distance(model: nn.Module, ref: nn.Module) -> float:
    """max over BN layers of max|var − var_ref| / max|var_ref|."""
    out = 0.0
    refs = dict(ref.named_modules())
    for name, m in model.named_modules():
        if is_batchnorm(m) and getattr(m, "running_var", None) is not None:
            r = refs[name].running_var.double()
            out = max(out, float((m.running_var.double() - r).abs().max() / r.abs().max()))
    return out


def timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def resnet(args: argparse.Namespace) -> None:
    model = zoo.randomize(zoo.build("resnet50"))
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(args.batch_size, 3, 224, 224, generator=g) for _ in range(args.batches)]
    ref = ns.recalibrate(model.double(), [d.double() for d in data], exact=True).float()
    model = model.float()
    tools = {"ns.recalibrate": lambda: ns.recalibrate(model, data),
             "update_bn": lambda: update_bn(data, copy.deepcopy(model))}
    times: dict[str, list[float]] = {k: [] for k in tools}
    for _ in range(args.reps):
        for k, f in tools.items():
            times[k].append(timed(f))
    med = {k: statistics.median(v) for k, v in times.items()}
    med["ns exact"] = timed(lambda: ns.recalibrate(model, data, exact=True))  # one run
    if args.busy:  # every core kept busy by background processes
        from export_fold import _bench_fold

        busy: dict[str, list[float]] = {k: [] for k in tools}
        with _bench_fold().busy_cores(60 + 20 * args.reps):
            for _ in range(args.reps):
                for k, f in tools.items():
                    busy[k].append(timed(f))
        b = {k: statistics.median(v) for k, v in busy.items()}
        print(f"\nbusy cores: ns.recalibrate {b['ns.recalibrate']:.2f} s, update_bn "
              f"{b['update_bn']:.2f} s, ratio {b['ns.recalibrate'] / b['update_bn']:.2f}")
    theirs = copy.deepcopy(model)
    update_bn(data, theirs)
    print(f"\nResNet-50, {args.batches} batches of {args.batch_size} at 224x224, median of "
          f"{args.reps}:")
    print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
    print(f"  ns.recalibrate / update_bn {med['ns.recalibrate'] / med['update_bn']:.2f}; "
          f"exact / update_bn {med['ns exact'] / med['update_bn']:.2f}")
    print(f"  distance to the exact float64 statistics: ns.recalibrate "
          f"{distance(ns.recalibrate(model, data), ref):.1e}, ns exact "
          f"{distance(ns.recalibrate(model, data, exact=True), ref):.1e}, update_bn "
          f"{distance(theirs, ref):.1e}")


def digits() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "examples"))
    import digits_common as dc
    import recalibrate_pruned as rp

    res = rp.main([])
    print(f"\ndigits CNN, 30% of channels pruned: trained {res['trained']:.3f}, pruned "
          f"{res['pruned']:.3f}, ns.recalibrate {res['recalibrated']:.3f}, update_bn "
          f"{res['update_bn']:.3f}")
    torch.manual_seed(0)
    xtr, ytr, _, _ = dc.load()
    model = dc.cnn()
    dc.train(model, xtr, ytr, epochs=4)
    pruned = rp.prune_channels(model, 0.3)
    order = ytr.argsort()  # class-sorted data
    x = xtr[order][:1024]
    ref = ns.recalibrate(pruned.double(), [x.double()], exact=True).float()
    pruned = pruned.float()
    for bs in (32, 8):
        data = list(x.split(bs))
        theirs = copy.deepcopy(pruned)
        update_bn(data, theirs)
        print(f"  class-sorted, batch {bs}: distance to the exact float64 statistics "
              f"ns.recalibrate {distance(ns.recalibrate(pruned, data), ref):.1e}, ns exact "
              f"{distance(ns.recalibrate(pruned, data, exact=True), ref):.1e}, update_bn "
              f"{distance(theirs, ref):.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--busy", action="store_true")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} "
          "threads")
    resnet(args)
    digits()


if __name__ == "__main__":
    main()
