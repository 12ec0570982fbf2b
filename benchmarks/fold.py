"""Fold benchmark: normsurgeon vs torch.fx's ``fuse``, and vs the network with its BN deleted.

    python benchmarks/fold.py [--models resnet101 densenet121] [--reps 20] [--busy]

Prints, side by side from one run: conversion time (median of --convert-reps interleaved
rounds; each timed call starts after a garbage collection and frees its result after the clock
stops: see ``timed``), BN removed,
and eager CPU latency (interleaved rounds, median) of the original, normsurgeon's fold,
fuse's result, and the no-BN network (every BN replaced by Identity: the physical limit of
folding, since a folded model does exactly that work).

``--busy`` also times the conversions with every core kept busy by background processes (a
training job or a data loader next to the conversion), at torch's default thread count, and
prints the quiet and busy ratios side by side. The load is bounded (it ends by itself after a
deadline) and is killed by process id when the measurement ends.

``--example-inputs`` also times ``convert(m, example_inputs=x)`` (input recording and the
self-check included) next to ``convert(m)`` and ``fuse``, and counts the model forwards one
such conversion runs.

``--scaling`` prints conversion time, time per BN site and peak resident memory against model
size (ResNet-18/50/152, DenseNet-201, the 1001-layer CIFAR ResNet), normsurgeon vs ``fuse``.
Each (model, tool) runs in a fresh process: its peak is the conversion's own (the kernel's
high-water mark is reset just before it), its time the median of 3 warm conversions.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one ``fn()``, every call from the same start: the garbage of earlier rounds
    is collected before the clock starts, and the result is freed after it stops.

    Without this the rounds depend on each other. ``fuse`` returns a GraphModule, a reference
    cycle that only a later collection frees: until then its ~100 MB stay allocated, and the
    next call maps fresh memory instead of reusing it (a ResNet-50 ``convert`` then takes
    120 ms instead of 75: the page faults). ``convert``'s result is freed at once, inside its
    own timed call, and that freed memory then serves ``fuse``. Measured this way,
    ResNet-50's ratio (0.35-0.43 in most runs) is close to ``--scaling``'s, where every
    conversion runs in a fresh process (0.31-0.38)."""
    gc.collect()
    t = time.perf_counter()
    out = fn()
    took = time.perf_counter() - t
    del out
    return took


def time_conversions(model: nn.Module, reps: int) -> dict[str, list[float]]:
    """Interleaved rounds of ``ns.convert`` and ``fuse`` (after one warm-up of each)."""
    times: dict[str, list[float]] = {"ns": [], "fuse": []}
    ns.convert(model), fuse(model)
    for _ in range(reps):
        for key, fn in (("ns", ns.convert), ("fuse", fuse)):
            times[key].append(timed(lambda: fn(model)))  # noqa: B023 - called at once
    return times


def count_forwards(model: nn.Module, x: torch.Tensor) -> int:
    """Model forwards (on real tensors, not fx proxies; the original's and the converted
    copy's) one ``convert(example_inputs=x)`` runs, counted by wrapping the class's forward
    for that one conversion."""
    cls, calls = type(model), [0]
    orig = cls.forward

    def counted(self: nn.Module, *a: object, **k: object) -> object:
        if a and isinstance(a[0], torch.Tensor):
            calls[0] += 1
        return orig(self, *a, **k)

    cls.forward = counted  # type: ignore[method-assign]
    try:
        ns.convert(model, example_inputs=x)
    finally:
        cls.forward = orig  # type: ignore[method-assign]
    return calls[0]


def time_with_inputs(model: nn.Module, x: torch.Tensor, reps: int) -> dict[str, list[float]]:
    """Interleaved rounds of convert(m), convert(m, example_inputs=x), fuse and one eval
    forward (what a forward costs next to them)."""
    fns = {"ns": lambda: ns.convert(model), "ns+inputs": lambda: ns.convert(model,
                                                                            example_inputs=x),
           "fuse": lambda: fuse(model), "forward": lambda: model(x)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for key, fn in fns.items():
                times[key].append(timed(fn))
    return times


SCALING = ["resnet18", "resnet50", "resnet152", "densenet201", "resnet1001_cifar10"]


def _peak_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def measure_one(name: str, tool: str) -> dict[str, float]:
    """In this (fresh) process: peak RSS growth of one conversion, then the median time of 3
    (each through ``timed``, as every timing of this script)."""
    model = zoo.randomize(zoo.build(name))
    fn = (lambda: ns.convert(model)) if tool == "ns" else (lambda: fuse(model))
    gc.collect()
    rss0 = int(next(ln for ln in open("/proc/self/status")
                    if ln.startswith("VmRSS:")).split()[1])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark: the peak below is this conversion's
    except OSError:
        pass
    out = fn()
    peak = _peak_kib() - rss0
    del out
    times = [timed(fn) for _ in range(3)]
    sites = sum(map(is_batchnorm, model.modules()))
    params = sum(p.numel() for p in model.parameters())
    return {"seconds": statistics.median(times), "peak_mib": peak / 1024, "sites": sites,
            "params_m": params / 1e6}


def scaling_table(models: list[str]) -> None:
    print(f"\nscaling: one fresh process per model and tool; time: median of 3 warm conversions; "
          f"peak: resident memory growth during one conversion; {torch.get_num_threads()} "
          "threads")
    print(f"  {'model':<20} {'BN':>5} {'params':>8} | {'ns s':>7} {'ms/BN':>6} {'peak MiB':>9} "
          f"| {'fuse s':>7} {'ms/BN':>6} {'peak MiB':>9} | {'time':>5} {'peak':>5}")
    for name in models:
        res = {}
        for tool in ("ns", "fuse"):
            out = subprocess.run([sys.executable, __file__, "--measure", name, tool],
                                 capture_output=True, text=True, check=True)
            res[tool] = json.loads(out.stdout.strip().splitlines()[-1])
        a, b = res["ns"], res["fuse"]
        print(f"  {name:<20} {a['sites']:>5} {a['params_m']:>7.1f}M | {a['seconds']:>6.3f}s "
              f"{a['seconds'] / a['sites'] * 1e3:>6.2f} {a['peak_mib']:>9.0f} | "
              f"{b['seconds']:>6.3f}s {b['seconds'] / b['sites'] * 1e3:>6.2f} "
              f"{b['peak_mib']:>9.0f} | {a['seconds'] / b['seconds']:>5.2f} "
              f"{a['peak_mib'] / max(b['peak_mib'], 1e-9):>5.2f}")
    print("  (time, peak: normsurgeon / fuse)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet101", "densenet121"])
    p.add_argument("--reps", type=int, default=20, help="latency rounds")
    p.add_argument("--convert-reps", type=int, default=15)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--busy", action="store_true",
                   help="also time conversions with every core busy (bounded background load)")
    p.add_argument("--example-inputs", action="store_true",
                   help="also time conversion with example inputs and count its forwards")
    p.add_argument("--scaling", nargs="*", metavar="MODEL",
                   help=f"only the scaling table (default models: {' '.join(SCALING)})")
    p.add_argument("--measure", nargs=2, metavar=("MODEL", "TOOL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:  # a child of --scaling
        print(json.dumps(measure_one(*args.measure)))
        return
    if args.scaling is not None:
        scaling_table(args.scaling or SCALING)
        return
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          "eager CPU, fp32\n")
    rows, conv_rows, input_rows = [], [], []
    for name in args.models:
        model = zoo.randomize(zoo.build(name))
        x = zoo.example_input(model, batch=args.batch)
        conv_t = time_conversions(model, args.convert_reps)
        t_ns, t_fuse = statistics.median(conv_t["ns"]), statistics.median(conv_t["fuse"])
        # robust to drift on a shared machine: the ratio within each interleaved round
        paired = statistics.median(a / b for a, b in zip(conv_t["ns"], conv_t["fuse"]))
        fastest = min(conv_t["ns"]) / min(conv_t["fuse"])
        if args.example_inputs:
            ex = time_with_inputs(model, x, args.convert_reps)
            med = {k: statistics.median(v) for k, v in ex.items()}
            input_rows.append((name, med, count_forwards(model, x)))
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
    if args.example_inputs:
        print(f"\nconversion with example inputs (batch {args.batch}), median of "
              f"{args.convert_reps} interleaved rounds:")
        print(f"  {'model':<12} {'ns':>8} {'ns+inputs':>10} {'fuse':>8} {'forward':>8} "
              f"{'ns/fuse':>8} {'ns+inputs/fuse':>15} {'forwards':>9}")
        for name, med, fwd in input_rows:
            print(f"  {name:<12} {med['ns']:>7.3f}s {med['ns+inputs']:>9.3f}s "
                  f"{med['fuse']:>7.3f}s {med['forward']:>7.3f}s "
                  f"{med['ns'] / med['fuse']:>8.2f} {med['ns+inputs'] / med['fuse']:>15.2f} "
                  f"{fwd:>9}")
        print("  forwards: model forwards one conversion with example inputs runs (recording "
              "the inputs, and the self-check)")
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
