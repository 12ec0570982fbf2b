"""Folding BatchNormalization in ONNX files (docs/folding.md, "ONNX files"): exported and
hand-made graphs, the refusals the ONNX tools get wrong, the file kept as it was otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import normsurgeon as ns  # noqa: E402
from normsurgeon.frontends.onnx_file import load_onnx, save_onnx  # noqa: E402

from .conftest import randomize_bn  # noqa: E402

RNG = np.random.default_rng(0)


def init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def bn_params(prefix: str, c: int, dtype: type = np.float32) -> list[TensorProto]:
    return [init(f"{prefix}.scale", RNG.uniform(0.5, 1.5, c).astype(dtype)),
            init(f"{prefix}.bias", RNG.uniform(-0.5, 0.5, c).astype(dtype)),
            init(f"{prefix}.mean", RNG.uniform(-1, 1, c).astype(dtype)),
            init(f"{prefix}.var", RNG.uniform(0.5, 2, c).astype(dtype))]


def bn(prefix: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in
                            ("scale", "bias", "mean", "var")], [y], name=prefix, **attrs)


def make(nodes, inits, inputs, outputs, opset: int = 18, elem=TensorProto.FLOAT,
         extra_inputs=()) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, elem, s) for n, s in inputs]
        + list(extra_inputs),
        [helper.make_tensor_value_info(n, elem, None) for n in outputs], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def bn_count(m: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in m.graph.node)


def conv_bn_model(**conv_attrs) -> onnx.ModelProto:
    w = RNG.standard_normal((6, 3, 3, 3)).astype(np.float32)
    return make([helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", **conv_attrs),
                 bn("bn", "h", "y")],
                [init("w", w), init("b", RNG.standard_normal(6).astype(np.float32)),
                 *bn_params("bn", 6)], [("x", [2, 3, 8, 8])], ["y"])


# --- exported files ----------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, bias=False, groups=1, dilation=2)
        self.bn = nn.BatchNorm2d(8)
        self.t = nn.ConvTranspose2d(8, 4, 3, groups=2, output_padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.pre = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 5, 1)
        self.v = nn.Conv3d(5, 5, 1)
        self.lin = nn.Linear(5, 6)
        self.bn3 = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.c2(self.pre(self.bn2(self.t(self.bn(self.c(x))))))
        return self.bn3(self.lin(z.mean((2, 3))))


@pytest.mark.parametrize("dynamo", [True, False])
def test_exported_files_fold_exactly_and_check_fully(tmp_path, dynamo):
    model = randomize_bn(Net(), 0).eval()
    x = torch.randn(2, 3, 12, 12)
    path = tmp_path / "m.onnx"
    if dynamo:
        torch.onnx.export(model, (x,), path, dynamo=True, optimize=False)
    else:
        torch.onnx.export(model, (x,), path, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE)
    before = path.read_bytes()
    src = load_onnx(path)
    assert bn_count(src) == 4
    new, rep = ns.convert_with_report(str(path))
    assert rep.counts == {"folded": 4} and bn_count(new) == 0, rep.table()
    assert path.read_bytes() == before
    onnx.checker.check_model(new, full_check=True)
    feeds = {src.graph.input[0].name: x.numpy()}
    assert rel(run(new, feeds)[0], run(src, feeds)[0]) <= 1e-5
    # the file is otherwise as it was
    assert [i.name for i in new.graph.input] == [i.name for i in src.graph.input]
    assert [o.name for o in new.graph.output] == [o.name for o in src.graph.output]
    assert list(new.opset_import) == list(src.opset_import)
    assert new.ir_version == src.ir_version
    used = {i for n in new.graph.node for i in n.input}
    assert all(t.name in used for t in new.graph.initializer)  # no orphans
    assert all(n.domain in ("", "ai.onnx") for n in new.graph.node)


def test_the_input_proto_is_never_modified_and_metadata_stays():
    m = conv_bn_model()
    m.doc_string = "my model"
    helper.set_model_props(m, {"author": "me"})
    m.graph.doc_string = "graph doc"
    snapshot = m.SerializeToString()
    new = ns.convert(m)
    assert m.SerializeToString() == snapshot
    assert new.doc_string == "my model" and new.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in new.metadata_props} == {"author": "me"}


# --- hand-made cases ---------------------------------------------------------------------------
def test_training_mode_is_refused_not_folded():
    m = conv_bn_model()
    m.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    m.opset_import[0].version = 15
    new, rep = ns.convert_with_report(m, check=False)
    assert rep.counts == {"skipped": 1} and "training_mode=1" in rep.sites[0].reason
    assert bn_count(new) == 1


def test_bn15_with_float32_parameters_after_a_fp16_conv():
    w = RNG.standard_normal((6, 3, 3, 3)).astype(np.float16)
    m = make([helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn("bn", "h", "y")],
             [init("w", w), *bn_params("bn", 6, np.float32)], [("x", [2, 3, 8, 8])], ["y"],
             elem=TensorProto.FLOAT16)
    new, rep = ns.convert_with_report(m)
    assert rep.counts == {"folded": 1}
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float16)
    # the float64 result, and how far each file is from it
    ref64 = _reference64(m, x)
    err_folded = rel(run(new, {"x": x})[0], ref64)
    err_plain = rel(run(m, {"x": x})[0], ref64)
    assert err_folded <= 1.5 * err_plain + 1e-4, (err_folded, err_plain)


def _reference64(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Conv → BN of ``m`` computed in float64 with torch."""
    t = {i.name: torch.from_numpy(numpy_helper.to_array(i).astype(np.float64))
         for i in m.graph.initializer}
    h = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64)), t["w"])
    return torch.nn.functional.batch_norm(h, t["bn.mean"], t["bn.var"], t["bn.scale"],
                                          t["bn.bias"], False, 0.0, 1e-5).numpy()


def test_initializers_that_are_graph_inputs_are_not_constants_unless_allowed():
    m = conv_bn_model()
    m.graph.input.append(helper.make_tensor_value_info("bn.mean", TensorProto.FLOAT, [6]))
    rep = ns.inspect(m)
    assert rep.counts == {"skipped": 1} and "also a graph input" in rep.sites[0].reason
    assert ns.inspect(m, allow_overridable_initializers=True).counts == {"folded": 1}


@pytest.mark.parametrize("case,words", [
    ("second reader", "other users"), ("graph output", "graph output")])
def test_producer_output_with_other_readers_is_refused(case, words):
    m = conv_bn_model()
    if case == "second reader":
        m.graph.node.append(helper.make_node("Relu", ["h"], ["r"]))
        m.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    else:
        m.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    new, rep = ns.convert_with_report(m)
    assert rep.counts == {"skipped": 1} and words in rep.sites[0].reason


@pytest.mark.parametrize("trans_b,alpha,beta,c_shape", [
    (0, 1.0, 1.0, (6,)), (1, 0.5, 2.0, (1, 6)), (1, 1.5, 0.0, (6,)), (0, 1.0, 1.0, None)])
def test_gemm_then_bn_any_trans_alpha_beta(trans_b, alpha, beta, c_shape):
    w = RNG.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32)
    inputs = ["a", "w"] + (["c"] if c_shape else [])
    inits = [init("w", w), *bn_params("bn", 6)]
    if c_shape:
        inits.append(init("c", RNG.standard_normal(c_shape).astype(np.float32)))
    m = make([helper.make_node("Gemm", inputs, ["h"], name="gemm", transB=trans_b,
                               alpha=alpha, beta=beta), bn("bn", "h", "y")],
             inits, [("a", [4, 5])], ["y"])
    new, rep = ns.convert_with_report(m)
    assert rep.counts == {"folded": 1} and bn_count(new) == 0
    a = RNG.standard_normal((4, 5)).astype(np.float32)
    assert rel(run(new, {"a": a})[0], run(m, {"a": a})[0]) <= 1e-5


def test_bn_then_gemm_and_transposed_input_refused():
    w = RNG.standard_normal((6, 5)).astype(np.float32)
    base = [init("w", w), init("c", RNG.standard_normal(6).astype(np.float32)),
            *bn_params("bn", 5)]
    m = make([bn("bn", "a", "h"), helper.make_node("Gemm", ["h", "w", "c"], ["y"], transB=1,
                                                   alpha=0.7)], base, [("a", [4, 5])], ["y"])
    new, rep = ns.convert_with_report(m)
    assert rep.counts == {"folded": 1}
    a = RNG.standard_normal((4, 5)).astype(np.float32)
    assert rel(run(new, {"a": a})[0], run(m, {"a": a})[0]) <= 1e-5
    t = make([bn("bn", "a", "h"), helper.make_node("Gemm", ["h", "w", "c"], ["y"], transA=1,
                                                   transB=1)],
             [init("w", RNG.standard_normal((6, 4)).astype(np.float32)), base[1],
              *bn_params("bn", 5)], [("a", [5, 4])], ["y"])
    assert "transA=1" in ns.inspect(t).sites[0].reason


@pytest.mark.parametrize("attrs,folds", [({"pads": [0, 0, 0, 0]}, True),
                                          ({"auto_pad": "VALID"}, True),
                                          ({"pads": [1, 1, 1, 1]}, False),
                                          ({"auto_pad": "SAME_UPPER"}, False)])
def test_bn_then_conv_only_without_zero_padding(attrs, folds):
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    m = make([bn("bn", "x", "h"), helper.make_node("Conv", ["h", "w"], ["y"], **attrs)],
             [init("w", w), *bn_params("bn", 3)], [("x", [2, 3, 8, 8])], ["y"])
    new, rep = ns.convert_with_report(m)
    assert (rep.counts == {"folded": 1}) is folds, rep.table()
    if not folds:
        assert "zero padding" in rep.sites[0].reason


def test_a_shared_weight_gets_a_folded_copy_per_site():
    w = RNG.standard_normal((6, 3, 3, 3)).astype(np.float32)
    m = make([helper.make_node("Conv", ["x", "w"], ["h1"], name="c1"), bn("bn1", "h1", "y1"),
              helper.make_node("Conv", ["x", "w"], ["h2"], name="c2"), bn("bn2", "h2", "y2"),
              helper.make_node("Conv", ["x", "w"], ["y3"], name="plain")],
             [init("w", w), *bn_params("bn1", 6), *bn_params("bn2", 6)],
             [("x", [2, 3, 8, 8])], ["y1", "y2", "y3"])
    new, rep = ns.convert_with_report(m)
    assert rep.counts == {"folded": 2}
    by_node = {n.name: n.input[1] for n in new.graph.node}
    assert by_node["plain"] == "w" and len({by_node["c1"], by_node["c2"], "w"}) == 3
    w_new = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    assert np.array_equal(w_new["w"], w)  # the plain reader sees the original values
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    for a, b in zip(run(new, {"x": x}), run(m, {"x": x})):
        assert rel(a, b) <= 1e-5


def test_convtranspose_grouped_with_output_padding():
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)  # (Cin, Cout/g, k, k), g = 2
    m = make([helper.make_node("ConvTranspose", ["x", "w"], ["h"], group=2, strides=[2, 2],
                               output_padding=[1, 1]), bn("bn", "h", "y")],
             [init("w", w), *bn_params("bn", 6)], [("x", [2, 4, 5, 5])], ["y"])
    new, rep = ns.convert_with_report(m)
    assert rep.counts == {"folded": 1}
    x = RNG.standard_normal((2, 4, 5, 5)).astype(np.float32)
    assert rel(run(new, {"x": x})[0], run(m, {"x": x})[0]) <= 1e-5


@pytest.mark.parametrize("bad", ["nan", "overflow"])
def test_non_finite_statistics_and_fp16_overflow_refused(bad):
    if bad == "nan":
        m = conv_bn_model()
        var = next(t for t in m.graph.initializer if t.name == "bn.var")
        arr = numpy_helper.to_array(var).copy()
        arr[0] = np.nan
        var.CopyFrom(init("bn.var", arr))
        reason = "not finite"
    else:
        w = np.full((6, 3, 1, 1), 1000.0, np.float16)
        params = bn_params("bn", 6, np.float16)
        params[3] = init("bn.var", np.full(6, 1e-4, np.float16))
        m = make([helper.make_node("Conv", ["x", "w"], ["h"]), bn("bn", "h", "y")],
                 [init("w", w), *params], [("x", [2, 3, 4, 4])], ["y"], elem=TensorProto.FLOAT16)
        reason = "overflow"
    rep = ns.inspect(m)
    assert rep.counts == {"skipped": 1} and reason in rep.sites[0].reason


def test_bns_in_subgraphs_are_reported():
    then = helper.make_graph([bn("inner", "x", "t")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
                             initializer=bn_params("inner", 3))
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    m = make([helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other,
                               name="branch")], [init("cond", np.array(True))],
             [("x", [2, 3, 4, 4])], ["y"])
    rep = ns.inspect(m)
    assert [r.name for r in rep] == ["inner"] and "subgraph" in rep.sites[0].reason


def test_external_data_round_trip(tmp_path):
    m = conv_bn_model()
    ref = onnx.ModelProto()
    ref.CopyFrom(m)  # saving with external data empties m's tensors
    src = tmp_path / "ext.onnx"
    onnx.save_model(m, src, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    new = ns.convert(str(src))
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    save_onnx(new, out, external=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    back = onnx.load(str(out))
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert rel(run(back, {"x": x})[0], run(ref, {"x": x})[0]) <= 1e-5


@pytest.mark.usefixtures("wrong_fold")
def test_self_check_catches_a_wrong_fold():
    with pytest.raises(ns.ConversionMismatchError, match="folded model .on onnxruntime. differs"):
        ns.convert(conv_bn_model())


# --- the command line ----------------------------------------------------------------------------
def test_cli_fold_onnx(tmp_path, capsys):
    from normsurgeon import cli

    src = tmp_path / "m.onnx"
    onnx.save_model(conv_bn_model(), src)
    out = tmp_path / "f.onnx"
    assert cli.main(["fold", str(src), "-o", str(out), "--input-shape", "x=2,3,8,8"]) == 0
    text = capsys.readouterr().out
    assert "1 folded" in text and f"wrote {out}" in text
    assert bn_count(onnx.load(str(out))) == 0
    assert cli.main(["fold", str(src), "-o", str(out), "--json", "--no-check"]) == 0
    assert '"folded"' in capsys.readouterr().out
    for argv, words in ((["fold", str(src), "-o", str(tmp_path / "x.pt2")], "written as a .onnx"),
                        (["fold", str(src), "-o", str(out), "--input-shape", "y=1,2"],
                         "does not take"),
                        (["fold", str(tmp_path / "none.onnx"), "-o", str(out)], "does not exist"),
                        (["fold", str(src), "-o", str(out), "--include", "zz*"],
                         "matches no BatchNorm")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("with_add", [True, False])
@pytest.mark.parametrize("direction", ["producer", "consumer"])
def test_matmul_add_folds_where_the_graph_proves_2d(with_add, direction):
    w = RNG.standard_normal((5, 6)).astype(np.float32)  # (in, out)
    c = 6 if direction == "producer" else 5
    nodes, inits = [], [init("w", w), *bn_params("bn", c)]
    if direction == "producer":
        nodes.append(helper.make_node("MatMul", ["a", "w"], ["m"], name="mm"))
        if with_add:
            nodes.append(helper.make_node("Add", ["m", "c"], ["h"], name="add"))
            inits.append(init("c", RNG.standard_normal((1, 6)).astype(np.float32)))
        nodes.append(bn("bn", "h" if with_add else "m", "y"))
    else:
        nodes.append(bn("bn", "a", "h"))
        nodes.append(helper.make_node("MatMul", ["h", "w"], ["m" if with_add else "y"],
                                      name="mm"))
        if with_add:
            nodes.append(helper.make_node("Add", ["m", "c"], ["y"], name="add"))
            inits.append(init("c", RNG.standard_normal(6).astype(np.float32)))
    m = make(nodes, inits, [("a", [4, 5])], ["y"])
    new, rep = ns.convert_with_report(m)
    assert rep.counts == {"folded": 1} and bn_count(new) == 0, rep.table()
    a = RNG.standard_normal((4, 5)).astype(np.float32)
    assert rel(run(new, {"a": a})[0], run(m, {"a": a})[0]) <= 1e-5
    # on a 3-D input the BN's channel axis is not the MatMul's feature axis: refused
    m3 = make(nodes, inits, [("a", [4, 3, 5])], ["y"])
    if direction == "producer":
        assert ns.inspect(m3).counts == {"skipped": 1}


@pytest.mark.parametrize("layer", ["conv", "matmul"])
def test_a_layer_folded_on_both_sides(layer):
    if layer == "conv":
        nodes = [bn("pre", "x", "h"), helper.make_node("Conv", ["h", "w"], ["c"]),
                 bn("post", "c", "y")]
        inits = [init("w", RNG.standard_normal((6, 3, 1, 1)).astype(np.float32)),
                 *bn_params("pre", 3), *bn_params("post", 6)]
        shape, feeds_shape = [2, 3, 5, 5], (2, 3, 5, 5)
    else:
        nodes = [bn("pre", "x", "h"), helper.make_node("MatMul", ["h", "w"], ["m"]),
                 helper.make_node("Add", ["m", "c"], ["a"]), bn("post", "a", "y")]
        inits = [init("w", RNG.standard_normal((3, 6)).astype(np.float32)),
                 init("c", RNG.standard_normal(6).astype(np.float32)),
                 *bn_params("pre", 3), *bn_params("post", 6)]
        shape, feeds_shape = [4, 3], (4, 3)
    m = make(nodes, inits, [("x", shape)], ["y"])
    new, rep = ns.convert_with_report(m)
    assert rep.counts == {"folded": 2} and bn_count(new) == 0, rep.table()
    x = RNG.standard_normal(feeds_shape).astype(np.float32)
    assert rel(run(new, {"x": x})[0], run(m, {"x": x})[0]) <= 1e-5


def test_a_bare_matmul_takes_one_side_only():
    nodes = [bn("pre", "x", "h"), helper.make_node("MatMul", ["h", "w"], ["m"]),
             bn("post", "m", "y")]
    inits = [init("w", RNG.standard_normal((3, 6)).astype(np.float32)),
             *bn_params("pre", 3), *bn_params("post", 6)]
    m = make(nodes, inits, [("x", [4, 3])], ["y"])
    new, rep = ns.convert_with_report(m)
    assert rep.counts == {"folded": 1, "skipped": 1}, rep.table()
    assert "other side" in next(r.reason for r in rep if r.action == "skipped")
    x = RNG.standard_normal((4, 3)).astype(np.float32)
    assert rel(run(new, {"x": x})[0], run(m, {"x": x})[0]) <= 1e-5


def test_cli_fold_of_an_onnx_file_never_imports_torch(tmp_path):
    """The ONNX path (planner, math, check on onnxruntime) runs on numpy: the command starts in
    a fraction of torch's import time, and `--help` needs no torch either."""
    import subprocess
    import sys

    src = tmp_path / "m.onnx"
    onnx.save_model(conv_bn_model(), src)
    probe = ("import sys; from normsurgeon.cli import main; rc = main(sys.argv[1:]); "
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    for extra in ([], ["--no-check"]):
        out = subprocess.run([sys.executable, "-c", probe, "fold", str(src), "-o",
                              str(tmp_path / "f.onnx"), *extra],
                             capture_output=True, text=True, check=True).stdout
        assert "1 folded" in out and out.strip().endswith("NO-TORCH 0"), out
    assert bn_count(onnx.load(str(tmp_path / "f.onnx"))) == 0
    helped = subprocess.run([sys.executable, "-c", "import sys\nfrom normsurgeon.cli import main\n"
                             "try:\n    main(['fold', '--help'])\nexcept SystemExit:\n    pass\n"
                             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"],
                            capture_output=True, text=True, check=True).stdout
    assert helped.strip().endswith("NO-TORCH")
