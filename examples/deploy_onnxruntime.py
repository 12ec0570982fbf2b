"""Fold a third-party model, export it to ONNX, and serve it with onnxruntime.

    python examples/deploy_onnxruntime.py                 # pytorchcv mobilenetv2_w1
    python examples/deploy_onnxruntime.py --quick         # for the tests

Steps: build the model (random weights, randomized BN statistics: no downloads here), fold its
BatchNorm with normsurgeon, export with a dynamic batch axis, verify the file against PyTorch
on onnxruntime (graph optimisations off and on, two batch sizes), then run it like a service
would and check that the predictions agree with the original PyTorch model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fold_pytorchcv import build  # noqa: E402

import normsurgeon as ns  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_w1")
    p.add_argument("--quick", action="store_true")
    p.add_argument("-o", "--output", help="where to write the .onnx (default: a temp dir)")
    args = p.parse_args(argv)
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build(args.model)
    x = torch.randn(2, 3, 224, 224)
    folded, report = ns.convert_with_report(model, "fold", example_inputs=x)
    print(report.summary())
    path = args.output or os.path.join(tempfile.mkdtemp(), f"{args.model}_folded.onnx")
    res = ns.export_onnx(folded, (x,), path, verify=True)
    print(f"wrote {path}: {sum(res.op_counts().values())} nodes, "
          f"BatchNormalization nodes: {res.op_counts().get('BatchNormalization', 0)}")
    print(res.verification.table())
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    batch = torch.randn(3 if args.quick else 8, 3, 224, 224)
    logits = sess.run(None, {sess.get_inputs()[0].name: batch.numpy()})[0]
    with torch.no_grad():
        ref = model(batch).numpy()
    agree = float((logits.argmax(1) == ref.argmax(1)).mean())
    rel = float(np.abs(logits - ref).max() / np.abs(ref).max())
    print(f"onnxruntime vs original PyTorch on a new batch of {len(batch)}: top-1 agreement "
          f"{agree:.0%}, max rel difference {rel:.1e}")
    return {"agree": agree, "rel": rel, "bn_nodes": res.op_counts().get("BatchNormalization", 0)}


if __name__ == "__main__":
    main()
