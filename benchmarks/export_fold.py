"""Folding a torch.export program: ``ns.convert(ep)`` vs ``ns.convert(model)`` vs torchao.

    python benchmarks/export_fold.py [--models resnet50 densenet121] [--reps 7] [--busy]

Side by side from one run, per model (pytorchcv, random weights, randomized BN statistics):

* ``ns(ep)``: ``ns.convert(ep, check=False)`` on the ExportedProgram (no trace: the graph exists);
* ``ns(ep)+check``: the same with the default self-check (both programs run once on the
  program's example inputs);
* ``ns(module)``: ``ns.convert(model)`` on the nn.Module (fx trace, no example inputs);
* ``torchao``: ``torchao.quantization.pt2e.utils._fuse_conv_bn_`` on ``ep.module()`` (it needs the
  unlifted module first, so ``ep.module()`` is inside its time), an optional dependency
  (``pip install --no-deps torchao``).

Times are medians of ``--reps`` interleaved rounds (each after a garbage collection, see
``fold.timed``). Also printed: BatchNorm ops left in each result and each result's max rel
error against the original program on a random input. ``--busy`` repeats the timing with every
core kept busy.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import warnings

import torch

import zoo  # first: it takes benchmarks/ off sys.path (onnx.py there shadows onnx)

# isort: split
import normsurgeon as ns
from normsurgeon.frontends.exported import is_exported_graph_module
from normsurgeon.functional import rel_error


def _bench_fold():  # noqa: ANN202 - benchmarks/fold.py, loaded by path (not on sys.path)
    spec = importlib.util.spec_from_file_location(
        "_ns_bench_fold", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fold.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _torchao():  # noqa: ANN202
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.pt2e.utils import _fuse_conv_bn_
        return _fuse_conv_bn_
    except Exception:  # noqa: BLE001 - optional
        return None


def run(name: str, reps: int, busy: bool) -> dict:
    bench = _bench_fold()
    model = zoo.randomize(zoo.build(name))
    x = zoo.example_input(model)
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
    fuse_ao = _torchao()

    def ao():  # noqa: ANN202
        gm = ep.module()
        fuse_ao(gm)
        return gm

    tools = {"ns(ep)": lambda: ns.convert(ep, check=False),
             "ns(ep)+check": lambda: ns.convert(ep),
             "ns(module)": lambda: ns.convert(model)}
    if fuse_ao is not None:
        tools["torchao"] = ao
    results = {k: f() for k, f in tools.items()}  # warm-up, and the results to check
    other = torch.randn_like(x)
    with torch.no_grad():
        ref = ep.module()(other)
        left = {"ns(ep)": is_exported_graph_module(results["ns(ep)"].graph_module),
                "ns(module)": sum(1 for m in results["ns(module)"].modules()
                                  if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))}
        rel = {"ns(ep)": rel_error(results["ns(ep)"].module()(other), ref),
               "ns(module)": rel_error(results["ns(module)"](other), ref)}
        if fuse_ao is not None:
            left["torchao"] = is_exported_graph_module(results["torchao"])
            rel["torchao"] = rel_error(results["torchao"](other), ref)
    del results
    rounds = {"quiet": {k: [] for k in tools}}
    for _ in range(reps):
        for k, f in tools.items():
            rounds["quiet"][k].append(bench.timed(f))
    if busy:
        rounds["busy"] = {k: [] for k in tools}
        with bench.busy_cores(120 + 30 * reps):
            for _ in range(reps):
                for k, f in tools.items():
                    rounds["busy"][k].append(bench.timed(f))
    sites = ns.inspect(ep).counts
    return {"model": name, "sites": sum(sites.values()), "folded": sites.get("folded", 0),
            "left": left, "rel": rel,
            "ms": {mode: {k: 1e3 * statistics.median(v) for k, v in r.items()}
                   for mode, r in rounds.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "densenet121"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--busy", action="store_true")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} "
          f"threads; median of {args.reps} interleaved rounds")
    for name in args.models:
        r = run(name, args.reps, args.busy)
        print(f"\n{name}: {r['sites']} BatchNorm ops in the program, {r['folded']} folded")
        print(f"  {'tool':<14} {'BN left':>7} {'max rel':>9}")
        for k in r["left"]:
            print(f"  {k:<14} {r['left'][k]:>7} {r['rel'][k]:>9.1e}")
        for mode, ms in r["ms"].items():
            line = ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items())
            ratio = ms["ns(ep)"] / ms["ns(module)"]
            extra = f"; ns(ep)/torchao {ms['ns(ep)'] / ms['torchao']:.2f}" if "torchao" in ms \
                else ""
            print(f"  {mode}: {line}")
            print(f"  {mode}: ns(ep)/ns(module) {ratio:.2f}; ns(ep)+check/ns(module) "
                  f"{ms['ns(ep)+check'] / ms['ns(module)']:.2f}{extra}")


if __name__ == "__main__":
    main()
