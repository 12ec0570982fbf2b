"""ONNX benchmark: export time and onnxruntime CPU latency of CBN / RBN models vs the plain one.

    python benchmarks/onnx.py [--model resnet50] [--reps 30] [--batch 1] [--profile]

One run, side by side: export time of normsurgeon.export_onnx vs plain torch.onnx.export of
the original model; onnxruntime CPU latency (graph optimisations on, interleaved rounds,
median) of the plain export, the CBN and RBN exports with custom ops, and with the functions
inlined (custom_ops=False). The plain model's BN is folded by the exporter / onnxruntime, so
the ratios show what the per-sample affine of CBN and the calibration of RBN cost on top.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
import warnings

import torch

import zoo  # first: it takes benchmarks/ off sys.path (onnx.py there shadows onnx)

# isort: split
import normsurgeon as ns


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    p.add_argument("--no-spin", action="store_true",
                   help="session.intra_op.allow_spinning=0 (threads sleep between ops)")
    p.add_argument("--export-rounds", type=int, default=3,
                   help="interleaved export timing rounds (after one warm-up export)")
    p.add_argument("--profile", action="store_true",
                   help="also print onnxruntime's kernel time per op type (where the time goes)")
    args = p.parse_args()
    import onnxruntime as ort

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base = zoo.randomize(zoo.build(args.model))
    x = zoo.example_input(base, batch=args.batch)
    cond = torch.randn(args.batch, 128)
    d = tempfile.mkdtemp()

    def torch_export() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(base, (x,), os.path.join(d, "torch.onnx"), dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))

    # the first export of a process pays one-time costs (imports, registries): a warm-up, so
    # the plain torch.onnx.export every ratio divides by is a warm one
    torch_export()
    files: dict = {}
    cbn_model, rbn_model = ns.convert(base, "cbn", cond_dim=128), ns.convert(base, "rbn")
    rows = [("plain", base, (x,), True), ("CBN", cbn_model, (x, cond), True),
            ("CBN inlined", cbn_model, (x, cond), False), ("RBN", rbn_model, (x,), True),
            ("RBN inlined", rbn_model, (x,), False)]
    t_exp: dict[str, list[float]] = {"torch": [], **{name: [] for name, *_ in rows}}
    for _ in range(args.export_rounds):  # interleaved rounds, like the latency rounds
        t = time.perf_counter()
        torch_export()
        t_exp["torch"].append(time.perf_counter() - t)
        for name, model, inputs, custom in rows:
            t = time.perf_counter()
            res = ns.export_onnx(model, inputs, os.path.join(d, f"{name}.onnx"),
                                 custom_ops=custom)
            t_exp[name].append(time.perf_counter() - t)
            files[name] = (res.path, inputs)
    t_torch = statistics.median(t_exp["torch"])
    t_ns = {name: statistics.median(t_exp[name]) for name, *_ in rows}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if args.no_spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if args.threads:
        so.intra_op_num_threads = args.threads
    sessions = {k: ort.InferenceSession(pth, so, providers=["CPUExecutionProvider"])
                for k, (pth, _) in files.items()}
    feeds = {k: {i.name: a.numpy() for i, a in zip(sessions[k].get_inputs(), inp)}
             for k, (_, inp) in files.items()}
    lat: dict[str, list[float]] = {k: [] for k in sessions}
    # interleaved rounds of back-to-back runs: a session timed right after another one shares
    # the cores with that session's still-spinning intra-op threads (onnxruntime's default),
    # which once tripled ResNet-18's latency here; the first run of each block is not timed
    rounds = 5
    for _ in range(rounds):
        for k, s in sessions.items():
            s.run(None, feeds[k])
            for _ in range(max(1, args.reps // rounds)):
                t = time.perf_counter()
                s.run(None, feeds[k])
                lat[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in lat.items()}
    print(f"{args.model}, batch {args.batch}, onnxruntime {ort.__version__} CPU, "
          f"optimizations on, median of {args.reps} runs in {rounds} interleaved rounds\n")
    print(f"export, median of {args.export_rounds} interleaved rounds after a warm-up: "
          f"torch.onnx.export (plain model) {t_torch:.2f}s; normsurgeon.export_onnx: "
          + ", ".join(f"{k} {v:.2f}s ({v / t_torch:.2f}x)" for k, v in t_ns.items()) + "\n")
    import onnx

    size = {k: os.path.getsize(pth) / 2**20 for k, (pth, _) in files.items()}
    nodes = {k: len(onnx.load(pth, load_external_data=False).graph.node)
             for k, (pth, _) in files.items()}
    print(f"{'graph':<12} {'latency':>10} {'x plain':>8} {'file MiB':>9} {'x plain':>8} "
          f"{'nodes':>6}")
    for k, v in med.items():
        print(f"{k:<12} {v:>8.2f}ms {v / med['plain']:>8.3f} {size[k]:>9.1f} "
              f"{size[k] / size['plain']:>8.2f} {nodes[k]:>6}")
    if args.profile:
        profile(files, args.threads, args.reps)


def profile(files: dict, threads: int, reps: int) -> None:
    """Kernel time per op type (onnxruntime's profiler) for the plain, CBN and RBN graphs, and
    what each adds over the plain one: where the extra latency goes."""
    import collections
    import json

    import onnxruntime as ort

    per: dict[str, collections.Counter] = {}
    for name in ("plain", "CBN", "RBN"):
        path, inputs = files[name]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(os.path.dirname(path), f"prof_{name}")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), inputs)}
        for _ in range(reps):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
        c: collections.Counter = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                c[e["args"]["op_name"]] += e["dur"] / reps / 1e3  # ms per run
        per[name] = c
    base = sum(per["plain"].values())
    print(f"\nkernel time per run by op type (ms), plain total {base:.2f}:")
    for name in ("CBN", "RBN"):
        extra = per[name] - per["plain"]
        total = sum(per[name].values())
        print(f"  {name}: total {total:.2f} ({total / base:.3f}x); added: "
              + ", ".join(f"{op} {t:.2f}" for op, t in extra.most_common(10)))


if __name__ == "__main__":
    main()
