"""The model fuzzer: random models from tests/fuzz_models.py, every transform, every invariant
of docs/invariants.md.

CI runs a fixed budget (``NS_FUZZ_EXAMPLES``, default 150 models per test, derandomized); the
long mode, a new random sample each run, is
``NS_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/test_fuzz.py``. Every failure it finds
becomes a regression test in tests/test_soundness.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import normsurgeon as ns
from normsurgeon.functional import rel_error
from normsurgeon.layers import RepresentativeBatchNorm2d
from normsurgeon.testing import model_fingerprint, shared_storage
from normsurgeon.tracing import is_batchnorm

from .fuzz_models import fuzz_models

EXAMPLES = int(os.environ.get("NS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
                suppress_health_check=list(HealthCheck), print_blob=True)


def _outputs(model: nn.Module, *args: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*args)
    return list(out) if isinstance(out, tuple) else [out]


def _noise(model: nn.Module, x: torch.Tensor) -> float:
    """The model's own fp32-vs-float64 error (0 for float64 models)."""
    import copy

    if x.dtype == torch.float64:
        return 0.0
    twin = copy.deepcopy(model).double()
    return max(rel_error(a, b) for a, b in zip(_outputs(model, x), _outputs(twin, x.double())))


def _inputs(recipe: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(recipe["seed"])
    x = torch.randn(2, 3, 8, 8, generator=g).to(recipe["dtype"])
    other = torch.randn(3, 3, 7, 9, generator=g).to(recipe["dtype"]) * 2  # other N, H, W parity
    if recipe["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, other


def _check_invariants(model: nn.Module, recipe: dict, to: str, with_inputs: bool) -> None:
    x, other = _inputs(recipe)
    opts = {"cond_dim": 3} if to == "cbn" else {}
    before = model_fingerprint(model)
    out, report = ns.convert_with_report(model, to, example_inputs=x if with_inputs else None,
                                         **opts)
    # 1. the user's model is untouched and shares nothing with the result
    assert model_fingerprint(model) == before, recipe
    assert shared_storage(model, out) == [], recipe
    # 2. every BatchNorm is in the report once; every refusal says why
    bns = {q for q, m in model.named_modules() if is_batchnorm(m)}
    assert {s.name for s in report.sites} >= bns, (recipe, report.table())
    assert all(s.reason for s in report.sites if s.action == "skipped"), report.table()
    # 3. the result equals the original within the bar, on the example and on another shape
    bar = 1e-5 if to == "fold" else 1e-6
    for inp in (x, other):
        args = (inp, torch.randn(inp.shape[0], 3, dtype=inp.dtype)) if to == "cbn" else (inp,)
        got, ref = _outputs(out, *args), _outputs(model, inp)
        assert len(got) == len(ref)
        rel = max(rel_error(a, b) for a, b in zip(got, ref))
        if rel > bar:
            allowed = max(bar, 4 * _noise(model, inp))
            assert rel <= allowed, (recipe, to, tuple(inp.shape), rel, allowed, report.table())
    # 4. converting twice: a no-op, or a clear refusal
    if to == "cbn":
        with pytest.raises(ns.NormSurgeonError, match="already takes a condition"):
            ns.convert(out, "cbn", cond_dim=3)
        return
    again, report2 = ns.convert_with_report(out, to, example_inputs=x if with_inputs else None,
                                            **opts)
    assert report2.counts.get("folded", 0) == 0 and report2.counts.get("replaced", 0) == 0, (
        recipe, report2.table())
    if to == "rbn":
        assert all(isinstance(m, RepresentativeBatchNorm2d) or not isinstance(m, nn.BatchNorm2d)
                   or any(s.name == q and s.action == "skipped" for s in report.sites)
                   for q, m in out.named_modules())


@pytest.mark.parametrize("with_inputs", [True, False])
@FUZZ
@given(fuzz_models())
def test_fuzz_fold(with_inputs, case):
    model, recipe = case
    _check_invariants(model, recipe, "fold", with_inputs)


@FUZZ
@given(fuzz_models())
def test_fuzz_replace(case):
    model, recipe = case
    for to in ("rbn", "cbn"):
        _check_invariants(model, recipe, to, True)


EXPORT_EXAMPLES = max(4, EXAMPLES // 15)  # an export and its verification take seconds


@settings(max_examples=EXPORT_EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(fuzz_models(), st.sampled_from(["fold", "cbn", "rbn"]))
def test_fuzz_export_verifies(tmp_path_factory, case, to):
    """Every converted model exports to a file that verifies against it on onnxruntime, or
    the export refuses with a clear error (a value branch torch.export cannot capture); the
    model is not touched by the export."""
    onnx = pytest.importorskip("onnxruntime")
    del onnx
    model, recipe = case
    if recipe["dtype"] == torch.float64:
        return  # onnxruntime's CPU provider has no float64 Conv
    x, _ = _inputs(recipe)
    opts = {"cond_dim": 3} if to == "cbn" else {}
    out = ns.convert(model, to, example_inputs=x, **opts)
    if to == "cbn":
        g = torch.Generator().manual_seed(recipe["seed"])
        for m in out.modules():  # trained-like deltas, so the MLPs matter
            if hasattr(m, "cond_mlp"):
                with torch.no_grad():
                    for p in m.cond_mlp[-1].parameters():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    args = (x, torch.randn(x.shape[0], 3)) if to == "cbn" else (x,)
    before = model_fingerprint(out)
    path = tmp_path_factory.mktemp("fuzz") / "m.onnx"
    try:
        res = ns.export_onnx(out, args, path)
    except ns.ExportError as e:
        if "branches on tensor values" in str(e):
            return  # refused, with the reason: the file would hold one branch
        # anything else is ours unless torch cannot export the unconverted model either
        assert "both exporters failed" in str(e), (recipe, to, str(e))
        with pytest.raises(ns.ExportError):
            ns.export_onnx(model, (x,), path.with_name("original.onnx"))
        return
    assert model_fingerprint(out) == before, recipe
    v = ns.verify_onnx(path, out, args)
    assert v, (recipe, to, res.exporter, v.table())


class _StockCallModule:
    """The same tracer with fx's own ``call_module`` (scope bookkeeping included)."""

    def call_module(self, m, forward, args, kwargs):
        return torch.fx.Tracer.call_module(self, m, forward, args, kwargs)


def _trace_or_error(tracer: torch.fx.Tracer, model: nn.Module) -> str:
    try:
        return str(tracer.trace(model))
    except Exception as e:  # noqa: BLE001 - the same failure is the same answer
        return f"{type(e).__name__}: {e}"


@FUZZ
@given(fuzz_models())
def test_fuzz_lean_call_module_traces_the_same_graph(case):
    """NormTracer drops fx's scope bookkeeping from call_module (speed): the graph, or the
    error, must be exactly what fx's own call_module gives, symbolically and concretely."""
    from normsurgeon.tracing import ConcreteTracer, NormTracer

    model, recipe = case
    stock = type("StockNormTracer", (_StockCallModule, NormTracer), {})
    assert _trace_or_error(NormTracer(), model) == _trace_or_error(stock(), model)
    x, _ = _inputs(recipe)
    concrete = type("StockConcreteTracer", (_StockCallModule, ConcreteTracer), {})
    with torch.no_grad():
        ours = _trace_or_error(ConcreteTracer((x,)), model)
        theirs = _trace_or_error(concrete((x,)), model)
    assert ours == theirs


PROGRAM_EXAMPLES = max(10, EXAMPLES // 3)  # a torch.export capture takes ~0.3 s


@settings(max_examples=PROGRAM_EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(fuzz_models())
def test_fuzz_exported_program_agrees_with_the_module_path(case):
    """Every fuzz model torch.export can capture is also folded as an ExportedProgram: the
    program is untouched, the result is exact, and the two front ends agree on what folds."""
    model, recipe = case
    x, other = _inputs(recipe)
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (x,))
    except Exception:  # noqa: BLE001 - torch cannot capture it (TorchScript, value branches)
        return
    graph, state = str(ep.graph), {k: v.clone() for k, v in ep.state_dict.items()}
    new, rep = ns.convert_with_report(ep)
    assert str(ep.graph) == graph and all(torch.equal(ep.state_dict[k], v)
                                          for k, v in state.items()), recipe
    with torch.no_grad():
        got, ref = new.module()(x), ep.module()(x)
    got = list(got) if isinstance(got, tuple) else [got]
    ref = list(ref) if isinstance(ref, tuple) else [ref]
    rel = max(rel_error(a, b) for a, b in zip(got, ref))
    assert rel <= max(1e-5, 4 * _noise(model, x)), (recipe, rel, rep.table())
    _, mrep = ns.convert_with_report(model, example_inputs=x)
    folded = {r.name for r in mrep if r.action == "folded"}
    in_program = {r.name for r in rep}
    program_folded = {r.name for r in rep if r.action == "folded"}
    missed = (folded & in_program) - program_folded
    assert not missed, (recipe, missed, rep.table(), mrep.table())


ONNX_EXAMPLES = max(6, EXAMPLES // 10)  # an export takes ~0.5 s


@settings(max_examples=ONNX_EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(fuzz_models())
def test_fuzz_onnx_file_agrees_with_the_module_path(tmp_path_factory, case):
    """Every fp32 fuzz model exported with its BatchNormalization nodes kept is also folded as
    an ONNX file: the file is untouched, the result exact on onnxruntime, and every site the
    module path folds is folded in the file."""
    onnx = pytest.importorskip("onnx")
    import warnings

    import numpy as np

    model, recipe = case
    if recipe["dtype"] != torch.float32:
        return
    x, _ = _inputs(recipe)
    path = tmp_path_factory.mktemp("fuzz_onnx") / "m.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the exporter refuses DataParallel: export what it wraps
            target = model.module if isinstance(model, nn.DataParallel) else model
            torch.onnx.export(target, (x.contiguous(),), path, dynamo=False,
                              do_constant_folding=False,
                              training=torch.onnx.TrainingMode.PRESERVE)
    except Exception:  # noqa: BLE001 - torch cannot export it
        return
    before = path.read_bytes()
    new, rep = ns.convert_with_report(str(path), example_inputs=x.contiguous())
    assert path.read_bytes() == before
    assert rep.max_rel_error is not None and rep.max_rel_error <= max(
        1e-5, 4 * _noise(model, x)), (recipe, rep.table())
    assert all(n.domain in ("", "ai.onnx") for n in new.graph.node)
    del np, onnx

    def module_name(node_name: str) -> str:  # "/blocks.0/bn/BatchNormalization" → blocks.0.bn
        return ".".join(node_name.strip("/").split("/")[:-1])

    _, mrep = ns.convert_with_report(target, example_inputs=x)
    folded = {r.name for r in mrep if r.action == "folded"}
    in_file = {module_name(r.name) for r in rep}
    file_folded = {module_name(r.name) for r in rep if r.action == "folded"}
    missed = (folded & in_file) - file_folded
    assert not missed, (recipe, missed, rep.table(), mrep.table())
