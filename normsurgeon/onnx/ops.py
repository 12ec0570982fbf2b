r"""The ``normsurgeon`` ONNX domain, in one place: torch custom ops, OpSchemas, onnxscript
translations and the ONNX function bodies (docs/onnx.md).

``ConditionalBatchNormalization(X, affine, mean, var; epsilon, row)``: ``affine`` (S, N, 2C)
holds the per-sample scale and bias side by side, ``[γ + Δγ | β + Δβ]``, of S layers that
share one MLP computation (S = 1 for a layer on its own); the node uses row ``row``:

    scale, bias = Split(Gather(affine, row, axis=0), axis=1)
    Xb = BatchNormalization(X, 1, 0, mean, var)          # foldable into the producing Conv
    Y  = Xb · scale[:, :, None…] + bias[:, :, None…]

(Version 1 took scale and bias as two inputs: two Slices per site in every graph, and the
exporter pays per node.)

``RepresentativeBatchNormalization(X, w_c, w_v, b_v, gamma, beta, mean, var; epsilon)``, eval
mode (``gamma`` is the layer's γ / r₀), in the eager layer's own order of operations: with
``s = 1/sqrt(var+ε)`` and ``m = m(X)``, ``r = sigmoid(w_v·((1 + w_c)·m − mean)·s + b_v)``,
``α = r·γ·s``, ``Y = X·α + (α·(w_c·m − mean) + β)``: one ReduceMean and one per-sample affine
over X. (An earlier body standardised first and took ``m(BN(X)) − t``, which cancels when
``|t| ≫ |s·m|``: on regnety004 with perturbed calibration it was up to 140x the eager layer's
float64 error; this one is within 2x at every perturbation measured.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

DOMAIN = "normsurgeon"
VERSION = 2  # 2: CBN takes the (N, 2C) affine whole
CBN_OP = "ConditionalBatchNormalization"
RBN_OP = "RepresentativeBatchNormalization"
BODY_OPSET = 18

__all__ = ["DOMAIN", "VERSION", "CBN_OP", "RBN_OP", "export_mode", "current_export_mode",
           "record_cbn_rank",
           "register_schemas", "translation_table", "function_protos", "cbn_reference",
           "rbn_reference"]

_MODE: list[str] = []  # stack: "custom" while exporting with custom ops
_RANKS: list[set[int]] = []  # per active export: ranks of the X inputs the CBN op was called on


@contextlib.contextmanager
def export_mode(mode: str) -> Iterator[set[int]]:
    """While active, CBN/RBN layers call the ``normsurgeon::`` torch custom ops. Yields the set
    of input ranks the CBN op was called with (filled as the model is traced)."""
    _MODE.append(mode)
    _RANKS.append(set())
    try:
        yield _RANKS[-1]
    finally:
        _MODE.pop()
        _RANKS.pop()


def record_cbn_rank(rank: int) -> None:
    """Note that the CBN op was called on a rank-``rank`` input in the current export."""
    if _RANKS:
        _RANKS[-1].add(rank)


def current_export_mode() -> str | None:
    return _MODE[-1] if _MODE else None


# -- reference math (eager implementations of the custom ops) ------------------------------
def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape((t.shape[0], t.shape[1]) + (1,) * (x.dim() - 2))


def cbn_reference(x: Tensor, affine: Tensor, mean: Tensor, var: Tensor, eps: float,
                  row: int = 0) -> Tensor:
    """``BN(x; mean, var)·scale + bias`` per sample, ``[scale | bias] = affine[row]``, with
    ``affine`` (S, N, 2C)."""
    scale, bias = affine[row].chunk(2, dim=1)
    xb = F.batch_norm(x, mean, var, None, None, False, 0.0, eps)
    return xb * _per_channel(scale, x) + _per_channel(bias, x)


def rbn_reference(x: Tensor, w_c: Tensor, w_v: Tensor, b_v: Tensor, gamma: Tensor,
                  beta: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """The RBN op in eval mode, in the order of the eager layer and of the ONNX body:
    ``y = x·α + β'`` with ``α = sigmoid(w_v·m(x_n) + b_v)·γ·s`` and
    ``β' = α·(w_c·m(x) − μ) + β`` (``s = 1/sqrt(var + ε)``; γ here is the layer's γ / r₀)."""
    c = x.shape[1]
    v = (1, c, 1, 1)
    s = torch.rsqrt(var + eps).reshape(v)
    mx = x.mean((2, 3), keepdim=True)
    wcm = w_c.reshape(v) * mx
    mn = (mx + wcm - mean.reshape(v)) * s
    r = torch.sigmoid(w_v.reshape(v) * mn + b_v.reshape(v))
    a = r * (gamma.reshape(v) * s)
    return x * a + (a * (wcm - mean.reshape(v)) + beta.reshape(v))


@torch.library.custom_op("normsurgeon::cbn", mutates_args=())
def _cbn_op(x: Tensor, affine: Tensor, mean: Tensor, var: Tensor, eps: float,
            row: int) -> Tensor:
    return cbn_reference(x, affine, mean, var, eps, row)


@_cbn_op.register_fake
def _(x, affine, mean, var, eps, row):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


@torch.library.custom_op("normsurgeon::rbn", mutates_args=())
def _rbn_op(x: Tensor, w_c: Tensor, w_v: Tensor, b_v: Tensor, gamma: Tensor, beta: Tensor,
            mean: Tensor, var: Tensor, eps: float) -> Tensor:
    return rbn_reference(x, w_c, w_v, b_v, gamma, beta, mean, var, eps)


@_rbn_op.register_fake
def _(x, w_c, w_v, b_v, gamma, beta, mean, var, eps):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


# -- ONNX side ----------------------------------------------------------------------------
_TYPES = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]


def register_schemas() -> None:
    """Register the two OpSchemas with onnx, once (the exporter and checker look them up)."""
    import onnx
    from onnx import helper
    from onnx.defs import OpSchema

    def param(name: str, doc: str = "") -> OpSchema.FormalParameter:
        return OpSchema.FormalParameter(name, "T", doc)

    specs = {
        CBN_OP: ["X", "affine", "mean", "var"],
        RBN_OP: ["X", "centering_weight", "scaling_weight", "scaling_bias", "gamma", "beta",
                 "mean", "var"],
    }
    for op, inputs in specs.items():
        if onnx.defs.has(op, DOMAIN):
            continue
        onnx.defs.register_schema(OpSchema(
            op, DOMAIN, VERSION, doc=__doc__ or "",
            inputs=[param(n) for n in inputs], outputs=[param("Y")],
            type_constraints=[("T", _TYPES, "float tensors")],
            attributes=[OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "BN epsilon")]
            + ([OpSchema.Attribute("row", helper.make_attribute("row", 0),
                                   "the row of affine (S, N, 2C) this layer uses")]
               if op == CBN_OP else []),
        ))


def translation_table() -> dict:
    """torch custom op → onnxscript function emitting the ``normsurgeon`` node."""
    import onnxscript

    register_schemas()
    ns = onnxscript.values.Opset(DOMAIN, VERSION)

    def cbn(x: onnxscript.FLOAT, affine: onnxscript.FLOAT, mean: onnxscript.FLOAT,
            var: onnxscript.FLOAT, eps: float, row: int) -> onnxscript.FLOAT:
        return ns.ConditionalBatchNormalization(x, affine, mean, var, epsilon=eps, row=row)

    def rbn(x: onnxscript.FLOAT, w_c: onnxscript.FLOAT, w_v: onnxscript.FLOAT,
            b_v: onnxscript.FLOAT, gamma: onnxscript.FLOAT, beta: onnxscript.FLOAT,
            mean: onnxscript.FLOAT, var: onnxscript.FLOAT, eps: float) -> onnxscript.FLOAT:
        return ns.RepresentativeBatchNormalization(x, w_c, w_v, b_v, gamma, beta, mean, var,
                                                   epsilon=eps)

    # this module uses postponed annotations; the exporter needs real ones (return type too)
    t = onnxscript.FLOAT
    cbn.__annotations__ = {"x": t, "affine": t, "mean": t, "var": t, "eps": float,
                           "row": int, "return": t}
    rbn.__annotations__ = {"x": t, "w_c": t, "w_v": t, "b_v": t, "gamma": t, "beta": t,
                           "mean": t, "var": t, "eps": float, "return": t}
    return {torch.ops.normsurgeon.cbn.default: cbn, torch.ops.normsurgeon.rbn.default: rbn}


def function_protos(opset: int, cbn_rank: int | None = None) -> dict[str, object]:
    """The FunctionProtos of both ops, written with ``""`` opset ``opset`` (≥ 18).

    ``cbn_rank``: when every CBN node of the model has an input of this rank, the CBN body
    broadcasts (N, C) scale and bias with a constant shape instead of one computed from
    ``Shape(X)`` (four nodes fewer per site at run time; the op's meaning is unchanged).

    Written for onnxruntime's optimiser: constants are derived from the inputs with ops it can
    constant-fold (``0 = mean − mean``, ``1 = exp(0)``: no CastLike), so the standardising
    ``BatchNormalization`` folds into the producing Conv; what runs per sample is one broadcast
    Mul and one Add over the activation (plus, for RBN, one ReduceMean and ~10 ops on (N, C)).
    onnxruntime's NCHWc layout has no broadcast Mul, so at ORT_ENABLE_ALL each site also
    reorders the Conv output to NCHW and back (measured in ``benchmarks/onnx.py --profile``).
    """
    from onnx import AttributeProto, TensorProto, helper

    def node(op: str, ins: list[str], outs: list[str], **attrs: object):
        return helper.make_node(op, ins, outs, **attrs)

    def const_i64(name: str, values: list[int]):
        return node("Constant", [], [name],
                    value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    def unit_bn(x: str, out: str) -> list:
        """out = BatchNormalization(x, 1, 0, mean, var; ε = the function's epsilon)."""
        bn = node("BatchNormalization", [x, "one_c", "zero_c", "mean", "var"], [out])
        bn.attribute.append(helper.make_attribute_ref("epsilon", AttributeProto.FLOAT))
        return [bn]

    def per_sample_affine(x: str, a: str, b: str, out: str, reshape: bool = True,
                          rank: int | None = None) -> list:
        """out = x·a + b for (N, C, …) x and (N, C) a, b: a and b are reshaped to
        (N, C, 1, …) with target ``[0, 0, 1, …]`` (0 copies N and C), built from
        ``Shape(x, start=2)`` alone, so onnxruntime folds it to a constant when the spatial
        dims are static (the batch may stay dynamic): two Reshapes, a Mul and an Add."""
        affine = [node("Mul", [x, "ps_a" if reshape else a], ["ps_xa"]),
                  node("Add", ["ps_xa", "ps_b" if reshape else b], [out])]
        if not reshape:  # a and b are (N, C, 1, …) already
            return affine
        if rank is not None:  # the model's rank is known: a constant target
            return [const_i64("ps_target", [0, 0] + [1] * (rank - 2)),
                    node("Reshape", [a, "ps_target"], ["ps_a"]),
                    node("Reshape", [b, "ps_target"], ["ps_b"])] + affine
        return [
            node("Shape", [x], ["ps_hw"], start=2),
            node("Equal", ["ps_hw", "ps_hw"], ["ps_true"]),
            node("Cast", ["ps_true"], ["ps_ones"], to=TensorProto.INT64),
            node("Concat", ["ps_head", "ps_ones"], ["ps_target"], axis=0),
            node("Reshape", [a, "ps_target"], ["ps_a"]),
            node("Reshape", [b, "ps_target"], ["ps_b"]),
        ] + affine

    common = [
        node("Sub", ["mean", "mean"], ["zero_c"]),
        node("Exp", ["zero_c"], ["one_c"]),
    ]

    # CBN: [scale | bias] = affine[row]; Y = BN(X)·scale + bias, per sample ------------------
    row_const = node("Constant", [], ["row_i"])
    row_const.attribute.append(helper.make_attribute_ref("value_int", AttributeProto.INT,
                                                         ref_attr_name="row"))
    cbn_nodes = (common + ([const_i64("ps_head", [0, 0])] if cbn_rank is None else [])
                 + [row_const, node("Gather", ["affine", "row_i"], ["affine_n"], axis=0),
                    node("Split", ["affine_n"], ["scale", "bias"], axis=1, num_outputs=2)]
                 + unit_bn("X", "Xb") + per_sample_affine("Xb", "scale", "bias", "Y",
                                                          rank=cbn_rank))
    opsets = [helper.make_opsetid("", opset)]
    eps_default = [helper.make_attribute("epsilon", 1e-5)]
    cbn = helper.make_function(DOMAIN, CBN_OP, ["X", "affine", "mean", "var"], ["Y"],
                               cbn_nodes, opsets, attributes=[],
                               attribute_protos=eps_default + [
                                   helper.make_attribute("row", 0)])

    # RBN: the eager layer's own order of operations, one affine on X (no cancellation) ----
    # s = BN(1; mean 0, var) = 1/sqrt(var + ε) with the function's ε; m = m(X) read from X
    # itself (m(BN(X)) − t would cancel when |t| ≫ |s·m|: 2x the eager error, measured)
    s_bn = node("BatchNormalization", ["one4", "one_c", "zero_c", "zero_c", "var"], ["s4"])
    s_bn.attribute.append(helper.make_attribute_ref("epsilon", AttributeProto.FLOAT))
    rbn_nodes = common + [
        const_i64("v_shape", [1, -1, 1, 1]),
        const_i64("hw", [2, 3]),
        node("Reshape", ["zero_c", "v_shape"], ["zero4"]),
        node("Exp", ["zero4"], ["one4"]),
        s_bn,
        node("Reshape", ["mean", "v_shape"], ["mu4"]),
        node("Reshape", ["centering_weight", "v_shape"], ["wc"]),
        node("Reshape", ["scaling_weight", "v_shape"], ["wv"]),
        node("Reshape", ["scaling_bias", "v_shape"], ["bv"]),
        node("Reshape", ["gamma", "v_shape"], ["g4"]),
        node("Reshape", ["beta", "v_shape"], ["b4"]),
        node("ReduceMean", ["X", "hw"], ["mx"], keepdims=1),   # m(x), (N, C, 1, 1)
        node("Mul", ["wc", "mx"], ["wcm"]),
        node("Add", ["mx", "wcm"], ["mc"]),                     # m(x_c) = (1 + w_c)·m(x)
        node("Sub", ["mc", "mu4"], ["dc"]),
        node("Mul", ["dc", "s4"], ["mn"]),                      # m(x_n)
        node("Mul", ["wv", "mn"], ["z0"]),
        node("Add", ["z0", "bv"], ["z"]),
        node("Sigmoid", ["z"], ["r"]),
        node("Mul", ["g4", "s4"], ["gs"]),
        node("Mul", ["r", "gs"], ["A"]),                        # α = r·γ·s
        node("Sub", ["wcm", "mu4"], ["sh0"]),
        node("Mul", ["A", "sh0"], ["sh1"]),
        node("Add", ["sh1", "b4"], ["Bsh"]),                    # β' = α·(w_c·m(x) − μ) + β
    ] + per_sample_affine("X", "A", "Bsh", "Y", reshape=False)
    rbn = helper.make_function(DOMAIN, RBN_OP, ["X", "centering_weight", "scaling_weight",
                                                "scaling_bias", "gamma", "beta", "mean", "var"],
                               ["Y"], rbn_nodes, opsets, attributes=[],
                               attribute_protos=eps_default)
    return {CBN_OP: cbn, RBN_OP: rbn}
