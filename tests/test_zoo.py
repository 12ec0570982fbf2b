"""pytorchcv zoo: a representative CI slice, and the full sweep marked slow."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("pytorchcv", reason="pip install --no-deps pytorchcv")
# loaded by path: putting benchmarks/ on sys.path would let benchmarks/onnx.py shadow onnx
_spec = importlib.util.spec_from_file_location(
    "ns_bench_zoo", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "zoo.py"))
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

# traceable, depthwise, pre-activation, dense concat, SE, and three models that torch.fx
# cannot trace as a whole (shape arithmetic, iteration over proxies, torch.zeros(*size))
SLICE = {
    "resnet18": None,
    "preresnet18": None,
    "mobilenetv2_w1": None,
    "densenet121": None,
    "seresnet18": None,
    "efficientnet_b0c": None,
    "mixnet_s": None,
    "enet_cityscapes": (256, 512),
}


def _assert_ok(rec: dict) -> None:
    assert rec["status"] == "ok", rec
    assert zoo.within_bar(rec), rec
    # fewer BN left than fuse leaves, wherever fuse's own result is correct (it is not on
    # e.g. polynet, where it folds one conv called at 3 sites with 3 different BNs)
    if rec["fuse_bn_left"] is not None and zoo.within_bar({**rec, "rel": rec["fuse_rel"]}):
        assert rec["bn_left"] <= rec["fuse_bn_left"], rec


@pytest.mark.parametrize("name", list(SLICE))
def test_zoo_slice(name):
    rec = zoo.check(name, size=SLICE[name])
    _assert_ok(rec)
    assert rec["rel"] <= 1e-5, rec  # the slice is well-conditioned: the strict bar applies
    assert rec["folded"] > 0
    if name in ("efficientnet_b0c", "mixnet_s", "enet_cityscapes"):
        assert rec["trace"] == "concrete" and rec["fuse_bn_left"] is None
    if name in ("resnet18", "mobilenetv2_w1", "efficientnet_b0c", "mixnet_s"):
        assert rec["bn_left"] == 0, rec


# measured (README, "The pytorchcv zoo"): outputs no fold can match more closely
ILL_CONDITIONED = {
    "diaresnet1001_cifar10": "chaotic: unmodified fp32 is 48% off its fp64 twin; fp64 "
                             "rounding alone moves it 3e-4",
    "diaresnet1001_svhn": "chaotic: unmodified fp32 is 48% off its fp64 twin; fp64 rounding "
                          "alone moves it 3e-4",
    "enet_cityscapes": "discontinuous at 1024x2048: a 1e-7 input change moves it 1.7e-3 "
                       "(MaxUnpool argmax flips); at 256x512 it is in the CI slice",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.zoo_models()) if os.environ.get("NS_FULL_ZOO")
                         else [])
def test_zoo_full_sweep(name):
    if name in ILL_CONDITIONED:
        pytest.skip(ILL_CONDITIONED[name])
    rec = zoo.check(name)
    if rec["status"] in ("does not build/run", "original output not finite"):
        pytest.skip(rec.get("error", rec["status"]))
    if not zoo.within_bar(rec):  # fp32 noise of an ill-conditioned net: demand fp64 exactness
        assert zoo.exact_in_fp64(rec), rec
        rec = {**rec, "rel": 0.0}
    _assert_ok(rec)


@pytest.mark.parametrize("name", list(SLICE))
def test_lean_call_module_traces_the_same_graph(name):
    """NormTracer's call_module without fx's scope bookkeeping gives fx's graph node for node
    (or fx's error, for the models it cannot trace) on real third-party models."""
    import torch

    from normsurgeon.tracing import NormTracer

    class Stock(NormTracer):
        def call_module(self, m, forward, args, kwargs):
            return torch.fx.Tracer.call_module(self, m, forward, args, kwargs)

    def trace(tracer):
        try:
            return str(tracer.trace(model))
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"

    model = zoo.build(name)
    assert trace(NormTracer()) == trace(Stock())
