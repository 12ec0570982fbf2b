"""Fold benchmark: normsurgeon vs torch.fx's ``fuse``, and vs the network with its BN deleted.

    python benchmarks/fold.py [--models resnet101 densenet121] [--reps 20] [--busy]

Prints, side by side from one run: conversion time (median of --convert-reps interleaved
rounds), BN removed,
and eager CPU latency (interleaved rounds, median) of the original, normsurgeon's fold,
fuse's result, and the no-BN network (every BN replaced by Identity: the physical limit of
folding, since a folded model does exactly that work).

``--busy`` also times the conversions with every core kept busy by background processes (a
training job or a data loader next to the conversion), at torch's default thread count, and
prints the quiet and busy ratios side by side. The load is bounded (it ends by itself after a
deadline) and is killed by process id when the measurement ends.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import zoo  # first: it takes benchmarks/ off sys.path (onnx.py there shadows onnx)

# isort: split
import normsurgeon as ns
from normsurgeon.tracing import is_batchnorm, set_submodule


def no_bn(model: nn.Module, only: set[str] | None = None) -> nn.Module:
    """The model with its BN (or only the BN named in ``only``) replaced by Identity."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if is_batchnorm(m) and (only is None or name in only):
            set_submodule(out, name, nn.Identity())
    return out


@contextmanager
def busy_cores(seconds: float) -> Iterator[None]:
    """Keep every core busy with spinning processes for the block (each ends by itself after
    ``seconds``; all are killed by pid when the block ends)."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 2)]
    try:
        time.sleep(0.5)  # let them start spinning
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def time_conversions(model: nn.Module, reps: int) -> dict[str, list[float]]:
    """Interleaved rounds of ``ns.convert`` and ``fuse`` (after one warm-up of each)."""
    times: dict[str, list[float]] = {"ns": [], "fuse": []}
    ns.convert(model), fuse(model)
    for _ in range(reps):
        for key, fn in (("ns", ns.convert), ("fuse", fuse)):
            t = time.perf_counter()
            fn(model)
            times[key].append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet101", "densenet121"])
    p.add_argument("--reps", type=int, default=20, help="latency rounds")
    p.add_argument("--convert-reps", type=int, default=15)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--busy", action="store_true",
                   help="also time conversions with every core busy (bounded background load)")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          "eager CPU, fp32\n")
    rows, conv_rows = [], []
    for name in args.models:
        model = zoo.randomize(zoo.build(name))
        x = zoo.example_input(model, batch=args.batch)
        conv_t = time_conversions(model, args.convert_reps)
        t_ns, t_fuse = statistics.median(conv_t["ns"]), statistics.median(conv_t["fuse"])
        # robust to drift on a shared machine: the ratio within each interleaved round
        paired = statistics.median(a / b for a, b in zip(conv_t["ns"], conv_t["fuse"]))
        fastest = min(conv_t["ns"]) / min(conv_t["fuse"])
        busy = None
        if args.busy:
            with busy_cores(seconds=600):
                b = time_conversions(model, args.convert_reps)
            busy = (statistics.median(b["ns"]), statistics.median(b["fuse"]))
        conv_rows.append((name, paired, fastest, t_ns / t_fuse, busy))
        ours, report = ns.convert_with_report(model)
        fused, limit = fuse(model), no_bn(model)
        # the limit for an exact fold: delete just the BN that can be folded (DenseNet's
        # pre-activation BN -> ReLU -> Conv cannot be, by any tool)
        foldable = no_bn(model, {r.name for r in report.sites if r.action == "folded"})
        bn = sum(map(is_batchnorm, model.modules()))
        left_ours = sum(map(is_batchnorm, ours.modules()))
        left_fuse = sum(map(is_batchnorm, fused.modules()))
        nets = {"original": model, "normsurgeon": ours, "fuse": fused, "no-BN": limit,
                "no-foldable-BN": foldable}
        lat: dict[str, list[float]] = {k: [] for k in nets}
        with torch.no_grad():
            for net in nets.values():
                net(x)
            for _ in range(args.reps):  # interleaved so drift hits every variant alike
                for k, net in nets.items():
                    t = time.perf_counter()
                    net(x)
                    lat[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in lat.items()}
        rows.append((name, t_ns, t_fuse, bn, bn - left_ours, bn - left_fuse, med))
    print(f"{'model':<12} {'convert ns':>10} {'fuse':>7} {'ns/fuse':>8} {'BN':>4} "
          f"{'ns rm':>6} {'fuse rm':>7} | {'orig ms':>8} {'ns ms':>7} {'fuse ms':>8} "
          f"{'noBN ms':>8} {'ns/orig':>8} {'ns/fuse':>8} {'ns/noBN':>8} {'ns/noFoldable':>14}")
    for name, t_ns, t_fuse, bn, rm_ns, rm_fuse, med in rows:
        o, n, f, lim, fl = (med[k] * 1e3 for k in ("original", "normsurgeon", "fuse", "no-BN",
                                                   "no-foldable-BN"))
        print(f"{name:<12} {t_ns:>9.3f}s {t_fuse:>6.3f}s {t_ns / t_fuse:>8.2f} {bn:>4} "
              f"{rm_ns:>6} {rm_fuse:>7} | {o:>8.2f} {n:>7.2f} {f:>8.2f} {lim:>8.2f} "
              f"{n / o:>8.3f} {n / f:>8.3f} {n / lim:>8.3f} {n / fl:>14.3f}")
    print(f"\nconversion time ns/fuse over {args.convert_reps} interleaved rounds: ratio of "
          "medians (table), median of per-round ratios, ratio of fastest runs")
    for name, paired, fastest, _, _ in conv_rows:
        print(f"  {name:<12} per-round median {paired:.2f}   fastest/fastest {fastest:.2f}")
    if args.busy:
        print(f"\nconversion with every core busy ({os.cpu_count()} spinning processes), "
              f"{torch.get_num_threads()} threads, median of {args.convert_reps} rounds:")
        print(f"  {'model':<12} {'quiet ns/fuse':>13} {'busy ns':>9} {'busy fuse':>10} "
              f"{'busy ns/fuse':>13}")
        for name, _, _, quiet, (b_ns, b_fuse) in conv_rows:
            print(f"  {name:<12} {quiet:>13.2f} {b_ns:>8.3f}s {b_fuse:>9.3f}s "
                  f"{b_ns / b_fuse:>13.2f}")


if __name__ == "__main__":
    main()
