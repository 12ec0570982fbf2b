"""Folding BatchNormalization in ONNX files: normsurgeon vs the ONNX tools, in one run.

    python benchmarks/onnx_fold.py [--models resnet50 mobilenetv2_w1 densenet121] [--reps 5]
                                   [--busy]

Optional dependencies (benchmark only, never needed by normsurgeon):
``pip install onnxslim onnxsim onnxoptimizer`` (onnxscript comes with normsurgeon's onnx
extra: its rewriter's BatchNorm fusion rules); a tool that is not installed is left out.

Prints, per tool and case: BatchNormalization nodes left, the max rel error of the tool's file
against the input file on onnxruntime CPU (graph optimisations off, random inputs), and a
verdict: ``ok``, ``WRONG`` (rel above 1e-4 for fp32, 1e-2 for fp16) or ``UNLOADABLE``
(onnxruntime refuses the file). Cases: pytorchcv ResNet-50, MobileNetV2 and DenseNet-121
exported by torch's TorchScript exporter with their BN kept (random weights, randomized BN
statistics), and small hand-made graphs for the cases the tools are known to get wrong.

Then times, side by side: the Python call of each tool on each large file (median of
``--reps``, after one warm-up), and command against command (``normsurgeon fold --no-check``
vs ``onnxslim IN OUT``, fresh processes, start-up included; with ``--busy`` also with every
core kept busy).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

import zoo  # first: it takes benchmarks/ off sys.path (onnx.py there shadows onnx)

# isort: split
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import normsurgeon as ns

RNG = np.random.default_rng(0)


def _busy_cores(seconds: float):  # noqa: ANN202 - benchmarks/fold.py's, loaded by path
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_ns_bench_fold", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fold.py"))
    if spec is None or spec.loader is None:
        return contextlib.nullcontext()
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.busy_cores(seconds)


# --- tools -------------------------------------------------------------------------------------
def _tools() -> dict[str, Callable[[onnx.ModelProto, str], onnx.ModelProto]]:
    tools: dict[str, Callable[[onnx.ModelProto, str], onnx.ModelProto]] = {
        "normsurgeon": lambda m, d: ns.convert(m, check=False)}
    try:
        import onnxslim

        tools["onnxslim"] = lambda m, d: onnxslim.slim(_copy(m))
    except ImportError:
        pass
    try:
        import onnxsim

        tools["onnxsim"] = lambda m, d: onnxsim.simplify(_copy(m))[0]
    except ImportError:
        pass
    try:
        import onnxoptimizer

        tools["onnxoptimizer"] = lambda m, d: onnxoptimizer.optimize(_copy(m),
                                                                      ["fuse_bn_into_conv"])
    except ImportError:
        pass

    try:
        import onnxscript
        from onnxscript.rewriter.rules.common import (
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        )

        rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule,
                 fuse_batchnorm_into_gemm_rule]
        tools["onnxscript"] = lambda m, d: onnxscript.rewriter.rewrite(
            _copy(m), pattern_rewrite_rules=rules)
    except ImportError:
        pass

    def ort_offline(m: onnx.ModelProto, d: str) -> onnx.ModelProto:
        out = os.path.join(d, "ort_offline.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = out
        so.log_severity_level = 3
        ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(out)

    tools["ort offline"] = ort_offline
    return tools


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


# --- cases -------------------------------------------------------------------------------------
def exported(name: str) -> onnx.ModelProto:
    model = zoo.randomize(zoo.build(name))
    x = zoo.example_input(model)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(d, "m.onnx")
        torch.onnx.export(model, (x,), path, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, opset_version=17)
        return onnx.load(path)


def _init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _bn(prefix: str, x: str, y: str, c: int, dtype: Any = np.float32, **attrs: Any
        ) -> tuple[onnx.NodeProto, list[TensorProto]]:
    params = [_init(f"{prefix}.s", RNG.uniform(0.5, 1.5, c).astype(dtype)),
              _init(f"{prefix}.b", RNG.uniform(-0.5, 0.5, c).astype(dtype)),
              _init(f"{prefix}.m", RNG.uniform(-1, 1, c).astype(dtype)),
              _init(f"{prefix}.v", RNG.uniform(0.5, 2, c).astype(dtype))]
    node = helper.make_node("BatchNormalization", [x] + [p.name for p in params], [y],
                            name=prefix, **attrs)
    return node, params


def _model(nodes: list, inits: list, inputs: list, outputs: list, opset: int = 15,
           elem: int = TensorProto.FLOAT, graph_inputs: list | None = None) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "case", [helper.make_tensor_value_info(n, elem, s) for n, s in inputs]
        + (graph_inputs or []),
        [helper.make_tensor_value_info(n, elem, s) for n, s in outputs], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def hand_made() -> dict[str, onnx.ModelProto]:
    cases = {}
    w = RNG.standard_normal((6, 3, 3, 3)).astype(np.float32)
    node, p = _bn("bn", "h", "y", 6, training_mode=1)
    cases["BN training_mode=1"] = _model(
        [helper.make_node("Conv", ["x", "w"], ["h"]), node], [_init("w", w), *p],
        [("x", [2, 3, 8, 8])], [("y", [2, 6, 6, 6])])
    node, p = _bn("bn", "h", "y", 6, np.float32)
    cases["BN-15 fp32 params, fp16 conv"] = _model(
        [helper.make_node("Conv", ["x", "w"], ["h"]), node],
        [_init("w", w.astype(np.float16)), *p], [("x", [2, 3, 8, 8])], [("y", [2, 6, 6, 6])],
        elem=TensorProto.FLOAT16)
    node, p = _bn("bn", "h", "y", 6)
    cases["ConvTranspose grouped"] = _model(
        [helper.make_node("ConvTranspose", ["x", "wt"], ["h"], group=3, strides=[2, 2]), node],
        [_init("wt", RNG.standard_normal((3, 2, 3, 3)).astype(np.float32)), *p],
        [("x", [2, 3, 5, 5])], [("y", [2, 6, 11, 11])])
    node, p = _bn("bn", "h", "y", 6)
    cases["Gemm transB alpha beta"] = _model(
        [helper.make_node("Gemm", ["a", "g", "c"], ["h"], transB=1, alpha=0.5, beta=2.0),
         node], [_init("g", RNG.standard_normal((6, 5)).astype(np.float32)),
                 _init("c", RNG.standard_normal(6).astype(np.float32)), *p],
        [("a", [4, 5])], [("y", [4, 6])])
    node, p = _bn("bn", "h", "y", 6)
    cases["BN mean is a graph input"] = _model(
        [helper.make_node("Conv", ["x", "w"], ["h"]), node], [_init("w", w), *p],
        [("x", [2, 3, 8, 8])], [("y", [2, 6, 6, 6])],
        graph_inputs=[helper.make_tensor_value_info("bn.m", TensorProto.FLOAT, [6])])
    node, p = _bn("bn", "h", "y", 6)
    cases["shared weight, BN + plain"] = _model(
        [helper.make_node("Conv", ["x", "w"], ["h"]), node,
         helper.make_node("Conv", ["x", "w"], ["z"])], [_init("w", w), *p],
        [("x", [2, 3, 8, 8])], [("y", [2, 6, 6, 6]), ("z", [2, 6, 6, 6])])
    node, p = _bn("bn", "h", "y", 6)
    cases["conv output read twice"] = _model(
        [helper.make_node("Conv", ["x", "w"], ["h"]), node,
         helper.make_node("Relu", ["h"], ["r"])], [_init("w", w), *p],
        [("x", [2, 3, 8, 8])], [("y", [2, 6, 6, 6]), ("r", [2, 6, 6, 6])])
    return cases


# --- measuring ---------------------------------------------------------------------------------
def _feeds(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name for t in m.graph.initializer}
    out = {}
    for i in m.graph.input:
        t = i.type.tensor_type
        shape = [d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if i.name in inits:  # an overridable initializer: the runtime feeds another value
            arr = numpy_helper.to_array(next(x for x in m.graph.initializer if x.name == i.name))
            out[i.name] = (arr + 0.5).astype(arr.dtype)
        else:
            out[i.name] = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    return out


def _run(m: onnx.ModelProto, feeds: dict[str, np.ndarray], reference: bool = False
         ) -> list[np.ndarray]:
    if reference:  # onnx's own evaluator (onnxruntime does not run training-mode BN)
        from onnx.reference import ReferenceEvaluator

        names = {i.name for i in m.graph.input}
        return ReferenceEvaluator(m).run(None, {k: v for k, v in feeds.items() if k in names})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def verdict(src: onnx.ModelProto, out: onnx.ModelProto) -> tuple[int | str, str, str]:
    left = sum(n.op_type == "BatchNormalization" for n in out.graph.node)
    feeds = _feeds(src)
    try:
        ref, reference = _run(src, feeds), False
    except Exception:  # noqa: BLE001 - onnxruntime refuses the input itself
        ref, reference = _run(src, feeds, reference=True), True
    try:
        got = _run(out, feeds, reference)
    except Exception as e:  # noqa: BLE001 - what the tool wrote does not load
        return left, "-", f"UNLOADABLE ({str(e).splitlines()[0][:50]})"
    rel = max(float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()
                    / max(np.abs(b.astype(np.float64)).max(), 1e-12)) for a, b in zip(got, ref))
    bar = 1e-2 if any(r.dtype == np.float16 for r in ref) else 1e-4
    return left, f"{rel:.1e}", "ok" if rel <= bar else "WRONG"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenetv2_w1", "densenet121"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--busy", action="store_true",
                   help="also time the commands with every core busy (bounded background load)")
    args = p.parse_args()
    tools = _tools()
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, {os.cpu_count()} cores; "
          f"tools: {', '.join(tools)}")
    cases = {name: exported(name) for name in args.models}
    cases.update(hand_made())
    d = tempfile.mkdtemp()
    try:
        head = f"{'case':<30} {'BN':>3} | " + " | ".join(f"{t:^28}" for t in tools)
        print("\nBN left / max rel / verdict\n" + head + "\n" + "-" * len(head))
        for name, m in cases.items():
            bns = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
            cells = []
            for fn in tools.values():
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        out = fn(m, d)
                    left, rel, v = verdict(m, out)
                    cells.append(f"{left} / {rel} / {v}"[:28])
                except Exception as e:  # noqa: BLE001 - the tool itself failed
                    cells.append(f"failed: {str(e).splitlines()[0][:20]}"[:28])
            print(f"{name:<30} {bns:>3} | " + " | ".join(f"{c:<28}" for c in cells))
        print(f"\nPython call, median of {args.reps} after a warm-up (ms)")
        for name in args.models:
            m = cases[name]
            times: dict[str, list[float]] = {t: [] for t in tools}
            for fn in tools.values():
                fn(m, d)
            for _ in range(args.reps):
                for tool, fn in tools.items():
                    t0 = time.perf_counter()
                    fn(m, d)
                    times[tool].append(time.perf_counter() - t0)
            med = {t: 1e3 * statistics.median(v) for t, v in times.items()}
            ratio = (f"; normsurgeon/onnxslim {med['normsurgeon'] / med['onnxslim']:.2f}"
                     if "onnxslim" in med else "")
            print(f"  {name:<16} " + ", ".join(f"{t} {v:.0f}" for t, v in med.items()) + ratio)
        slim = shutil.which("onnxslim") or os.path.join(os.path.dirname(sys.executable),
                                                         "onnxslim")
        nsc = os.path.join(os.path.dirname(sys.executable), "normsurgeon")
        if os.path.exists(slim) and os.path.exists(nsc):
            loads = [("quiet", None)] + ([("busy", 600.0)] if args.busy else [])
            for load, seconds in loads:
                print(f"\nCommand against command (fresh processes, start-up included), {load} "
                      f"cores, median of {args.reps} (s)")
                with _busy_cores(seconds) if seconds else contextlib.nullcontext():
                    _time_commands(args, cases, d, slim, nsc)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _time_commands(args: Any, cases: dict, d: str, slim: str, nsc: str) -> None:
    for name in args.models:
        src = os.path.join(d, f"{name}.onnx")
        onnx.save_model(cases[name], src)
        cmds = {"normsurgeon fold --no-check": [nsc, "fold", src, "-o",
                                                os.path.join(d, "ns.onnx"), "--no-check"],
                "onnxslim": [slim, src, os.path.join(d, "slim.onnx")]}
        t: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(args.reps):
            for k, c in cmds.items():
                t0 = time.perf_counter()
                subprocess.run(c, check=True, capture_output=True)
                t[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in t.items()}
        print(f"  {name:<16} " + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
              + f"; ratio {med['normsurgeon fold --no-check'] / med['onnxslim']:.2f}")


if __name__ == "__main__":
    main()
