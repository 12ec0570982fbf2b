"""Fold BatchNormalization in an ONNX file (docs/folding.md, "ONNX files").

Reading facts. A constant is an initializer that is not also a graph input (an input of that
name may be fed at run time: refused unless ``allow_overridable_initializers``), a
``Constant`` node's output, or the output of a node whose inputs are all constants (the
dynamo exporter's zero bias ``Shape → Expand → CastLike``), evaluated once with onnx's
reference evaluator. Readers are node inputs, graph outputs, and names a subgraph (``If``,
``Loop``, ``Scan`` bodies) reads from the outer scope. Gemm is 2-D by definition; a Conv's
input is batched by definition, so its BN channel axis is its output channel axis.

Deciding. :func:`normsurgeon.rules.plan.decide`, the planner of the other front ends; the math
is :func:`normsurgeon.foldmath.fold_weights` in float64, rounded once to each initializer's
own dtype (a BatchNormalization-15 may hold float32 statistics next to an fp16 Conv).

Writing back. A new ModelProto: folded weights as initializers (a weight another node also
reads gets its own folded copy: no other reader ever sees changed values), the BN node gone,
its output name taken by the producer (graph output names stay), orphan initializers
removed; opsets, IR version, inputs, outputs, metadata and doc strings as they were.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import foldmath as Fn
from ..errors import ConversionMismatchError, StrictModeError
from ..report import Action, ConversionReport, ConversionResult, SiteRecord
from ..rules.plan import FoldFacts, FoldPlan, decide, decide_cat, first_exact
from ..rules.stats import BNStats, prime_scale_shift

__all__ = ["convert_onnx", "load_onnx", "save_onnx", "is_onnx"]

log = logging.getLogger("normsurgeon")
_SUBGRAPH_OPS = ("If", "Loop", "Scan")


def is_onnx(model: Any) -> bool:
    """An ``onnx.ModelProto`` or a path ending in ``.onnx``."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model).endswith(".onnx")
    return type(model).__name__ == "ModelProto" and hasattr(model, "graph")


def load_onnx(path: str | os.PathLike[str]) -> Any:
    """The model at ``path`` with its external data, or a ValueError saying what is wrong."""
    import onnx

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        return onnx.load(path, load_external_data=True)
    except Exception as e:  # noqa: BLE001 - protobuf and external-data errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable ONNX model ({first[:160]})") from e


def _uses_external_data(model: Any) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def save_onnx(model: Any, path: str | os.PathLike[str], external: bool | None = None) -> None:
    """Write ``model`` atomically (temporary file, then ``os.replace``); with external data
    (``external``, or a model over 2 GB) into ``<name>.data`` next to it."""
    import onnx

    from .._io import atomic_path

    path = os.fspath(path)
    data = None
    if not external:  # serialised once (measuring the size first cost a second pass)
        try:
            data = model.SerializeToString()
        except Exception:  # noqa: BLE001 - protobuf refuses messages over 2 GB
            if external is False:
                raise
    if data is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
        return
    location = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(os.path.abspath(path)), location)
    with atomic_path(data_path) as tmp_data:
        # onnx writes the tensors to <folder>/<location>: write beside, then move into place
        m = copy.deepcopy(model)
        onnx.external_data_helper.convert_model_to_external_data(
            m, all_tensors_to_one_file=True, location=os.path.basename(tmp_data),
            size_threshold=1024)
        with atomic_path(path) as tmp:
            onnx.save_model(m, tmp)
            for t in m.graph.initializer:  # point the model at the final data file name
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = location
            onnx.save_model(m, tmp, save_as_external_data=False)


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------
def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _subgraph_reads(node: Any) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    out: set[str] = set()
    for a in node.attribute:
        graphs = list(a.g.node and [a.g] or []) + list(a.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {i.name for i in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                out.update(x for x in n.input if x and x not in local)
                out.update(x for x in _subgraph_reads(n) if x not in local)
            out.update(o.name for o in g.output if o.name not in local)
    return out


class _Graph:
    def __init__(self, model: Any, allow_overridable: bool) -> None:

        self.model = model
        g = model.graph
        self.allow_overridable = allow_overridable
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = {i.name for i in g.input}
        self.outputs = {o.name for o in g.output}
        self.producer: dict[str, int] = {}
        self.users: dict[str, list[int]] = defaultdict(list)
        for k, n in enumerate(g.node):
            for o in n.output:
                if o:
                    self.producer[o] = k
            for i in n.input:
                if i:
                    self.users[i].append(k)
            for i in _subgraph_reads(n):
                self.users[i].append(k)
        self._const: dict[str, np.ndarray | None] = {}
        self._ranks: dict[str, int] | None = None
        self.elem_types: dict[str, int] = {t.name: t.data_type for t in g.initializer}
        for vi in [*g.value_info, *g.input, *g.output]:
            if vi.type.tensor_type.elem_type:
                self.elem_types.setdefault(vi.name, vi.type.tensor_type.elem_type)

    @property
    def ranks(self) -> dict[str, int]:
        """Tensor ranks from onnx's shape inference, run on first use on a weight-free view
        (inference serialises the model it is given: 0.35 s for ResNet-50's 100 MB)."""
        if self._ranks is None:
            import onnx

            from ..onnx.proto import weight_free as _weight_free

            self._ranks = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(_weight_free(self.model),
                                                             data_prop=True)
            except Exception:  # noqa: BLE001 - ranks stay unknown
                inferred = self.model
            for vi in [*inferred.graph.value_info, *inferred.graph.input,
                       *inferred.graph.output]:
                t = vi.type.tensor_type
                if t.HasField("shape"):
                    self._ranks[vi.name] = len(t.shape.dim)
                if t.elem_type:
                    self.elem_types.setdefault(vi.name, t.elem_type)
        return self._ranks

    def node(self, k: int) -> Any:
        return self.model.graph.node[k]

    def readers(self, name: str) -> list[str]:
        """Who reads ``name``: node names, and "graph output"."""
        out = [self.node(k).name or self.node(k).op_type for k in self.users.get(name, [])]
        return out + (["graph output"] if name in self.outputs else [])

    def const(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The constant value of ``name``, or None (see the module docstring)."""
        from onnx import numpy_helper

        if name in self._const:
            return self._const[name]
        value = None
        if name in self.inits and (name not in self.inputs or self.allow_overridable):
            value = numpy_helper.to_array(self.inits[name])
        elif name in self.producer and depth < 32:
            n = self.node(self.producer[name])
            if n.op_type == "CastLike" and n.domain in ("", "ai.onnx") and name == n.output[0]:
                # only the second input's dtype is read: a graph input there is fine
                src, like = self.const(n.input[0], depth + 1), self.elem_types.get(n.input[1])
                if src is not None and like:
                    import onnx

                    value = src.astype(onnx.helper.tensor_dtype_to_np_dtype(like))
            elif n.domain in ("", "ai.onnx") and n.op_type not in _SUBGRAPH_OPS and all(
                    self.const(i, depth + 1) is not None for i in n.input if i):
                value = self._evaluate(n, name)  # Constant nodes included (no inputs)
        self._const[name] = value
        return value

    def overridable(self, name: str) -> bool:
        return name in self.inits and name in self.inputs and not self.allow_overridable

    def _evaluate(self, n: Any, name: str) -> np.ndarray | None:
        """One node on constant inputs, with onnx's reference evaluator."""
        import onnx
        from onnx.reference import ReferenceEvaluator

        try:
            feeds = {i: self.const(i) for i in n.input if i}
            opset = [o for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
            inputs = [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(
                v.dtype), v.shape) for i, v in feeds.items()]
            outputs = [onnx.helper.make_empty_tensor_value_info(o) for o in n.output if o]
            g = onnx.helper.make_graph([n], "const", inputs, outputs)
            m = onnx.helper.make_model(g, opset_imports=opset,
                                       ir_version=self.model.ir_version)
            res = ReferenceEvaluator(m).run(None, feeds)
            return dict(zip([o for o in n.output if o], res)).get(name)
        except Exception as e:  # noqa: BLE001 - not a constant we can evaluate
            log.debug("constant evaluation of %s failed: %s", name, e)
            return None


@dataclass
class _Layer:
    index: int
    kind: str  # conv / convtranspose / linear
    op: str
    input: str
    weight: str
    bias: str | None
    groups: int = 1
    attrs: dict[str, Any] = field(default_factory=dict)
    # MatMul (+ Add of a constant bias): a Linear in two nodes; ``index`` is the Add when the
    # BN reads its output, else the MatMul
    matmul: int | None = None
    add: int | None = None


def _matmul_linear(g: _Graph, k: int) -> _Layer | None:
    """``MatMul(x, W)`` with a constant 2-D ``W`` (in, out), and its ``Add`` of a constant
    bias when that Add is the MatMul's only reader: one Linear, W' = Wᵀ in Gemm terms."""
    n = g.node(k)
    if n.op_type == "Add":
        for pos in (0, 1):
            kp = g.producer.get(n.input[pos])
            if kp is not None and g.node(kp).op_type == "MatMul" and g.users.get(
                    n.input[pos]) == [k] and n.input[pos] not in g.outputs:
                inner = _matmul_linear(g, kp)
                if inner is None or inner.add != k:
                    return None
                inner.index = k
                return inner
        return None
    if n.op_type != "MatMul" or len(n.input) != 2:
        return None
    w = g.const(n.input[1])
    if w is None or w.ndim != 2:
        return None
    out = n.output[0]
    users = g.users.get(out, [])
    add, bias = None, None
    if len(users) == 1 and out not in g.outputs:
        a = g.node(users[0])
        if a.op_type == "Add" and a.domain in ("", "ai.onnx") and len(a.input) == 2:
            other = a.input[1] if a.input[0] == out else a.input[0]
            c = g.const(other)
            if c is not None and c.size == w.shape[1] and c.ndim <= 2:
                add, bias = users[0], other
    return _Layer(k, "linear", "MatMul", n.input[0], n.input[1], bias, 1,
                  {"transB": 0}, matmul=k, add=add)


def _layer(g: _Graph, k: int | None) -> _Layer | None:
    if k is None:
        return None
    n = g.node(k)
    if n.domain not in ("", "ai.onnx") or len(n.input) < 2:
        return None
    a = _attrs(n)
    bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
    if n.op_type in ("Conv", "ConvTranspose"):
        kind = "conv" if n.op_type == "Conv" else "convtranspose"
        return _Layer(k, kind, n.op_type, n.input[0], n.input[1], bias, int(a.get("group", 1)),
                      a)
    if n.op_type == "Gemm":
        return _Layer(k, "linear", "Gemm", n.input[0], n.input[1], bias, 1, a)
    if n.op_type in ("MatMul", "Add"):
        return _matmul_linear(g, k)
    return None


@dataclass
class _Site:
    index: int
    name: str
    stats: BNStats | None = None
    problem: str | None = None


def _passes_through(g: _Graph, k: int | None) -> bool:
    """Identity, inference Dropout, and Pad copying each channel's own values (reflect, edge,
    wrap): a per-channel affine map commutes with them."""
    if k is None:
        return False
    n = g.node(k)
    if n.domain not in ("", "ai.onnx") or not n.input or not n.output[0]:
        return False
    if n.op_type == "Identity":
        return True
    if n.op_type == "Dropout":
        training = n.input[2] if len(n.input) > 2 and n.input[2] else None
        flag = g.const(training) if training else np.array(False)
        return flag is not None and not bool(flag) and not (len(n.output) > 1 and n.output[1])
    if n.op_type == "Pad":
        mode = _attrs(n).get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        axes = n.input[3] if len(n.input) > 3 and n.input[3] else None
        return mode in ("reflect", "edge", "wrap") and axes is None
    return False


class _Planner:
    def __init__(self, model: Any, allow_overridable: bool) -> None:
        self.g = _Graph(model, allow_overridable)
        self.sites: list[_Site] = []
        self.nested: list[tuple[str, str]] = []  # BNs inside subgraphs and functions
        for k, n in enumerate(model.graph.node):
            if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx"):
                self.sites.append(_Site(k, n.name or n.output[0]))
            elif n.op_type in _SUBGRAPH_OPS:
                for name in _nested_bns(n):
                    self.nested.append((name, f"inside the {n.op_type} node "
                                        f"{n.name or n.output[0]}'s subgraph: subgraphs are "
                                        "not folded"))
        for f in model.functions:
            for n in f.node:
                if n.op_type == "BatchNormalization":
                    self.nested.append((n.name or n.output[0], f"inside the model-local "
                                        f"function {f.domain}.{f.name}: functions are not "
                                        "folded"))
        for s in self.sites:
            s.problem = self._site_problem(s)
        prime_scale_shift([s.stats for s in self.sites if s.stats is not None])
        for s in self.sites:
            if s.problem is None and s.stats is not None:
                s.problem = s.stats.stats_problem()

    def _site_problem(self, s: _Site) -> str | None:
        n = self.g.node(s.index)
        a = _attrs(n)
        if int(a.get("training_mode", 0)):
            return "BatchNormalization has training_mode=1 (uses batch statistics)"
        if len(n.output) > 1 and any(n.output[1:]):
            return "its running-statistics outputs are used (training graph)"
        vals = []
        for key, name in zip(("scale", "B", "mean", "var"), n.input[1:5]):
            v = self.g.const(name)
            if v is None:
                why = ("an initializer that is also a graph input (it may be fed at run time; "
                       "allow_overridable_initializers=True folds it)") if self.g.overridable(
                    name) else "a graph input or computed from one"
                return f"BatchNormalization {key} is not a constant: {why}"
            vals.append(np.asarray(v))
        scale, bias, mean, var = vals
        s.stats = BNStats(running_mean=mean, running_var=var, weight=scale, bias=bias,
                          eps=float(a.get("epsilon", 1e-5)))
        return None

    def candidate(self, s: _Site, direction: str) -> FoldPlan | None:
        g, n = self.g, self.g.node(s.index)
        via: list[int] = []
        if direction == "producer":
            name = n.input[0]
            k = g.producer.get(name)
            while _passes_through(g, k):
                via.insert(0, k)
                name = g.node(k).input[0]
                k = g.producer.get(name)
            layer = _layer(g, k)
            if layer is not None and g.node(layer.index).output[0] == name:
                return FoldPlan(s, layer, direction, via)
            return self._concat_candidate(s, k, name, via)
        name = n.output[0]
        users = g.users.get(name, [])
        k = users[0] if len(users) == 1 else None
        while _passes_through(g, k) and g.node(k).input[0] == name:
            via.append(k)
            name = g.node(k).output[0]
            users = g.users.get(name, [])
            k = users[0] if len(users) == 1 else None
        layer = _layer(g, k)
        if layer is None or layer.input != name:
            return None
        return FoldPlan(s, layer, direction, via)

    def _concat_candidate(self, s: _Site, k: int | None, name: str, via: list[int]
                          ) -> FoldPlan | None:
        """``Concat(axis=1)`` of Conv outputs → BN (MixConv, Inception)."""
        g = self.g
        if k is None:
            return None
        n = g.node(k)
        if n.op_type != "Concat" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            return None
        axis = int(_attrs(n).get("axis", 0))
        rank = g.ranks.get(name)
        if not (axis == 1 or (rank is not None and axis == 1 - rank)):
            return None
        parts = [_layer(g, g.producer.get(i)) for i in n.input]
        if any(x is None or x.kind != "conv" or g.node(x.index).output[0] != i
               for x, i in zip(parts, n.input)):
            return None
        return FoldPlan(s, parts[0], "producer", via, parts=parts, cat=k)  # type: ignore

    def facts(self, p: FoldPlan) -> FoldFacts:
        g, s, layer = self.g, p.site, p.layer
        assert s.stats is not None
        ln = g.node(layer.index)
        producer = p.direction == "producer"
        what = f"{layer.op} {ln.name or ln.output[0]}"
        w = g.const(layer.weight)
        # each tensor of the chain and the one node that may read it
        if producer:
            nodes = [layer.index, *p.via, s.index]
        else:
            nodes = [s.index, *p.via, layer.index]
        links = [(g.node(a).output[0], b) for a, b in zip(nodes, nodes[1:])]

        def chain() -> str | None:
            for i, (tensor, nxt) in enumerate(links):
                others = [g.node(k).name or g.node(k).op_type for k in g.users.get(tensor, [])
                          if k != nxt] + (["graph output"] if tensor in g.outputs else [])
                if others:
                    label = (what if producer else "BatchNorm") if i == 0 else tensor
                    return f"{label}'s output has other users ({', '.join(others)})"
            return None

        def layer_problem() -> str | None:
            if w is None:
                why = ("an initializer that is also a graph input" if g.overridable(
                    layer.weight) else "a graph input or computed from one")
                return f"{what}'s weight is not a constant ({why})"
            if not np.issubdtype(w.dtype, np.floating):
                return f"{what} weight dtype {w.dtype} is not floating point"
            if layer.bias is not None and g.const(layer.bias) is None:
                return f"{what}'s bias is not a constant"
            if layer.kind == "linear":
                a = layer.attrs
                if w.ndim != 2:
                    return f"{what}'s B is not a matrix"
                if not producer and int(a.get("transA", 0)):
                    return (f"{what} transposes its input (transA=1): the BatchNorm channel "
                            "axis is not its feature axis")
                c = g.const(layer.bias) if layer.bias is not None else None
                out = int(w.shape[0 if int(a.get("transB", 0)) else 1])
                if c is not None and c.size not in (1, out):
                    return f"{what}'s C is not one value per output feature"
            return None

        channels = -1
        if w is not None and w.ndim >= 2:
            if layer.kind == "conv":
                channels = int(w.shape[0]) if producer else int(w.shape[1]) * layer.groups
            elif layer.kind == "convtranspose":
                channels = int(w.shape[1]) * layer.groups if producer else int(w.shape[0])
            else:
                out_axis = 0 if int(layer.attrs.get("transB", 0)) else 1
                channels = int(w.shape[out_axis]) if producer else int(w.shape[1 - out_axis])
        pad = False
        if not producer and layer.kind == "conv":
            auto = layer.attrs.get("auto_pad", b"NOTSET")
            auto = auto.decode() if isinstance(auto, bytes) else str(auto)
            k = tuple(w.shape[2:]) if w is not None else ()
            pad = (auto in ("SAME_UPPER", "SAME_LOWER") and any(x > 1 for x in k)) or (
                auto == "NOTSET" and any(int(x) != 0 for x in layer.attrs.get("pads", [])))
        _, t_ = s.stats.scale_shift()
        return FoldFacts(
            direction=p.direction, kind=layer.kind, what=what, layer_type=layer.op,
            bn_kind="BatchNormalization", chain=chain, layer=layer_problem,
            bn_features=s.stats.num_features, channels=channels,
            weight_rank=2 if layer.kind == "linear" else (w.ndim if w is not None else 0),
            ranks=(frozenset({2}) if layer.op == "Gemm" else (
                lambda: frozenset({g.ranks[layer.input]}) if layer.input in g.ranks else None)
            ) if layer.kind == "linear" else None,
            rank_checked_by_bn=layer.kind != "linear",  # ONNX Conv inputs are batched
            reads_zero_padding=pad, shift=t_ if pad else None,
            risky=w is not None and str(w.dtype) in ("float16", "bfloat16"),
            folded=lambda: self.folded(p), weight_dtype=w.dtype if w is not None else None)

    def folded(self, p: FoldPlan, current: tuple[np.ndarray, np.ndarray | None] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(W', b') in the layer's own layout and dtypes (the bias takes the weight's dtype
        when the layer had none). ``current``: the layer's (W, b) after an earlier fold on
        its other side."""
        g, layer = self.g, p.layer
        assert p.site.stats is not None
        sc, sh = p.site.stats.scale_shift()
        if current is not None:
            w, b = current
        else:
            w = np.asarray(g.const(layer.weight))
            b = g.const(layer.bias) if layer.bias is not None else None
        b_dtype = b.dtype if b is not None else w.dtype
        if layer.kind != "linear":
            w2, b2 = Fn.fold_weights(layer.kind, p.direction, w, b, sc, sh, layer.groups)
            return w2, b2.astype(b_dtype)
        # Gemm: Y = alpha·A'·B' + beta·C, so W (out, in) = B'ᵀ; the bias becomes beta·C with
        # beta = 1 afterwards. Both in float64, rounded once.
        a = layer.attrs
        trans_b = int(a.get("transB", 0))
        wm = w if trans_b else w.T
        bias = None
        if b is not None:
            c = np.asarray(b, dtype=np.float64).reshape(-1)
            bias = (np.broadcast_to(c, (wm.shape[0],)) if c.size == 1 else c) * float(
                a.get("beta", 1.0))
        if p.direction == "consumer":  # alpha·(s·x + t)·Wᵀ: the shift's term is alpha·W·t
            w64, b64 = Fn.fold_bn_linear(wm, None, sc, sh * float(a.get("alpha", 1.0)))
            if bias is not None:
                b64 = b64 + bias
        else:
            w64, b64 = Fn.fold_conv_bn(wm, bias, sc, sh)
        w2 = Fn.cast_like(w64 if trans_b else w64.T, w)
        return w2, b64.astype(b_dtype)

    def _decide_concat(self, p: FoldPlan) -> str | None:
        g, s = self.g, p.site
        assert s.stats is not None and p.cat is not None
        facts, start = [], 0
        for i, layer in enumerate(p.parts):
            f = self.facts(FoldPlan(s, layer, "producer"))
            w = g.const(layer.weight)
            end = start + (int(w.shape[0]) if w is not None else 0)
            out = g.node(layer.index).output[0]
            what = f.what
            f.chain = (lambda out=out, what=what: f"{what}'s output has other users"
                       if g.users.get(out) != [p.cat] or out in g.outputs else None)
            f.bn_features = end - start
            f.folded = lambda i=i: self.folded_parts(p)[i]
            facts.append(f)
            start = end
        chain_nodes = [p.cat, *p.via, s.index]

        def cat_chain() -> str | None:
            for a, b in zip(chain_nodes, chain_nodes[1:]):
                t = g.node(a).output[0]
                if g.users.get(t) != [b] or t in g.outputs:
                    return "cat output has other users"
            return None

        return decide_cat(cat_chain, facts, s.stats.num_features)

    def folded_parts(self, p: FoldPlan, current: dict[int, Any] | None = None
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(W', b') of each conv of a Concat → BN: conv i takes its slice of the BN."""
        g = self.g
        assert p.site.stats is not None
        sc, sh = p.site.stats.scale_shift()
        out, start = [], 0
        for layer in p.parts:
            if current and _key(layer) in current:
                w, b = current[_key(layer)]
            else:
                w = np.asarray(g.const(layer.weight))
                b = g.const(layer.bias) if layer.bias is not None else None
            end = start + int(w.shape[0])
            w2, b2 = Fn.fold_weights("conv", "producer", w, b, sc[start:end], sh[start:end])
            out.append((w2, b2.astype(b.dtype if b is not None else w.dtype)))
            start = end
        return out

    def plan(self, s: _Site) -> tuple[FoldPlan | None, str]:
        n = self.g.node(s.index)

        def candidates() -> Iterator[tuple[str, FoldPlan, Callable[[], str | None]]]:
            for direction in ("producer", "consumer"):
                p = self.candidate(s, direction)
                if p is not None:
                    yield direction, p, lambda p=p: (self._decide_concat(p) if p.parts
                                                     else decide(self.facts(p)))

        def no_producer() -> str:
            k = self.g.producer.get(n.input[0])
            what = f"{self.g.node(k).op_type} {self.g.node(k).name}".strip() if k is not None \
                else f"graph input {n.input[0]!r}"
            return f"producer is {what}, not a Conv/ConvTranspose/Gemm"

        def no_consumer() -> str:
            readers = self.g.readers(n.output[0])
            return (f"consumer is {readers[0]}, not a Conv/Gemm" if len(readers) == 1
                    else f"output has {len(readers)} readers")

        return first_exact(candidates(), no_producer, no_consumer)


def _key(layer: _Layer) -> int:
    """One key per layer whichever side it was reached from (a MatMul + Add is reached at the
    Add from a BN after it, at the MatMul from a BN before it)."""
    return layer.matmul if layer.matmul is not None else layer.index


def _nested_bns(node: Any) -> list[str]:
    out = []
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for n in g.node:
                if n.op_type == "BatchNormalization":
                    out.append(n.name or n.output[0])
                if n.op_type in _SUBGRAPH_OPS:
                    out.extend(_nested_bns(n))
    return out


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------
def _write(model: Any, planner: _Planner, plans: list[FoldPlan]) -> Any:
    import onnx
    from onnx import numpy_helper

    g = planner.g
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    inits = {t.name: t for t in graph.initializer}
    taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    drop: set[int] = set()

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    def put(name: str | None, value: np.ndarray, layer_index: int, like_name: str) -> str:
        """Write ``value`` as an initializer for node ``layer_index``: in place when only that
        node reads ``name`` (and no fold wrote it for another), else as a new copy."""
        arr = np.ascontiguousarray(value)
        sole = name is not None and name in inits and g.users.get(name) == [layer_index] and (
            name not in g.inputs) and name not in g.outputs
        if sole:
            inits[name].CopyFrom(numpy_helper.from_array(arr, name))
            return name
        out = fresh(f"{like_name}_folded")
        t = numpy_helper.from_array(arr, out)
        graph.initializer.append(t)
        inits[out] = graph.initializer[-1]
        return out

    current: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # layers folded once already
    added: list[tuple[int, Any]] = []  # (after node index, new node)

    for p in plans:
        if p.parts:
            results = list(zip(p.parts, planner.folded_parts(p, current)))
        else:
            results = [(p.layer, planner.folded(p, current.get(_key(p.layer))))]
        bias_node: Any = None  # MatMul without an Add: the Add that will carry the bias
        for layer, (w2, b2) in results:
            node = graph.node[layer.index]
            current[_key(layer)] = (w2, b2)
            if layer.op == "MatMul":
                mm = graph.node[layer.matmul]
                mm.input[1] = put(layer.weight, w2, layer.matmul, layer.weight)
                b_name = put(layer.bias, b2, layer.add if layer.add is not None else -1,
                             layer.bias or f"{layer.weight}_bias")
                if layer.add is not None:
                    add = graph.node[layer.add]
                    pos = list(add.input).index(layer.bias)
                    add.input[pos] = b_name
                else:
                    bias_node = (layer.matmul, b_name)
                continue
            node.input[1] = put(layer.weight, w2, layer.index, layer.weight)
            bias_base = layer.bias or f"{layer.weight}_bias"
            b_name = put(layer.bias, b2, layer.index, bias_base)
            if len(node.input) > 2:
                node.input[2] = b_name
            else:
                node.input.append(b_name)
            if layer.kind == "linear":  # the bias now holds beta·C: beta = 1
                for a in node.attribute:
                    if a.name == "beta":
                        a.f = 1.0
        bn = graph.node[p.site.index]
        if bias_node is not None and p.direction == "producer":
            # MatMul → BN: the BN node becomes Add(its input, b'), keeping its output name
            b_name = bias_node[1]
            y = bn.output[0]
            bn.CopyFrom(onnx.helper.make_node("Add", [bn.input[0], b_name], [y],
                                              name=bn.name))
            continue
        if bias_node is not None:
            # BN → MatMul: an Add after the MatMul carries b' under the MatMul's output name,
            # so every reader of that output sees the original values
            k_mm, b_name = bias_node
            mm = graph.node[k_mm]
            y = mm.output[0]
            mm.output[0] = fresh(f"{y}_unbiased")
            added.append((k_mm, onnx.helper.make_node(
                "Add", [mm.output[0], b_name], [y], name=fresh(f"{mm.name or y}_bias"))))
        if p.direction == "producer":
            # the node feeding the BN (the layer, a transparent node, the Concat) takes the
            # BN's output name: graph output names stay
            feeder = p.via[-1] if p.via else (p.cat if p.parts else p.layer.index)
            graph.node[feeder].output[0] = bn.output[0]
        else:
            reader = p.via[0] if p.via else p.layer.index
            graph.node[reader].input[0] = bn.input[0]
        drop.add(p.site.index)
    after: dict[int, list[Any]] = {}
    for k, n in added:
        after.setdefault(k, []).append(n)
    keep = []
    for k, n in enumerate(graph.node):
        if k not in drop:
            keep.append(n)
        keep.extend(after.get(k, []))
    # nodes that only computed the weights and biases the folds replaced (the dynamo
    # exporter's zero bias Shape → Expand → CastLike) are dead now: remove them, and only them
    layers = [x for p in plans for x in (p.parts or [p.layer])]
    replaced = {x.weight for x in layers} | {x.bias for x in layers if x.bias}
    while replaced:
        read = {i for n in keep for i in n.input} | {o.name for o in graph.output}
        for n in keep:
            read |= _subgraph_reads(n)
        dead = [n for n in keep if n.domain in ("", "ai.onnx") and any(
            o in replaced for o in n.output) and not any(o in read for o in n.output if o)]
        if not dead:
            break
        keep = [n for n in keep if not any(n is d for d in dead)]
        replaced = {i for d in dead for i in d.input if i}
    del graph.node[:]
    graph.node.extend(keep)
    # orphan initializers (the BNs' parameters, replaced weights nobody reads any more)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in graph.node:
        used |= _subgraph_reads(n)
    used |= {i.name for i in graph.input}
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name not in used]):
        del graph.initializer[i]  # in place: re-adding the kept ones would copy them again
    live = used | {o for n in graph.node for o in n.output}
    vis = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(vis)
    return new


# ------------------------------------------------------------------------------------------
def convert_onnx(model: Any, *, example_inputs: Any = None, include: list[str] | None = None,
                 exclude: list[str] | None = None, strict: bool = False, check: bool = True,
                 dry_run: bool = False, input_shapes: dict[str, tuple[int, ...]] | None = None,
                 allow_overridable_initializers: bool = False) -> tuple[Any, ConversionReport]:
    """Fold the BatchNormalization nodes of an ONNX model; return a new ModelProto and the
    report. ``model`` (a ModelProto or a path) is never modified."""
    import onnx

    from .._args import check_patterns as _check_patterns

    t0 = time.perf_counter()
    if isinstance(model, (str, os.PathLike)):
        model = load_onnx(model)
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"expected an onnx.ModelProto or a .onnx path, got "
                        f"{type(model).__name__}")
    planner = _Planner(model, allow_overridable_initializers)
    records: dict[str, SiteRecord] = {}
    plans: list[FoldPlan] = []
    order: list[str] = []
    for s in planner.sites:
        order.append(s.name)
        if (include is not None and not any(fnmatch.fnmatchcase(s.name, p) for p in include)) \
                or (exclude is not None and any(fnmatch.fnmatchcase(s.name, p) for p in exclude)):
            records[s.name] = SiteRecord(s.name, "BatchNormalization", Action.EXCLUDED,
                                         reason="excluded by include/exclude patterns",
                                         trace="onnx")
            continue
        if s.problem:
            records[s.name] = SiteRecord(s.name, "BatchNormalization", Action.SKIPPED,
                                         reason=s.problem, trace="onnx")
            continue
        p, why = planner.plan(s)
        if p is not None and p.layer.op == "MatMul" and p.layer.add is None and any(
                q.layer.op == "MatMul" and _key(q.layer) == _key(p.layer) for q in plans):
            # a bare MatMul's bias lives in an Add the fold creates on one side only
            p, why = None, ("its MatMul (without a bias Add) already takes the fold of the "
                            "BatchNorm on its other side")
        if p is None:
            records[s.name] = SiteRecord(s.name, "BatchNormalization", Action.SKIPPED,
                                         reason=why, trace="onnx")
            continue
        plans.append(p)
        targets = [planner.g.node(x.index) for x in (p.parts or [p.layer])]
        kind = {"conv": "conv", "convtranspose": "convtranspose", "linear": "gemm"}[p.layer.kind]
        records[s.name] = SiteRecord(
            s.name, "BatchNormalization", Action.FOLDED,
            target=", ".join(n.name or n.output[0] for n in targets),
            detail="producer, cat-conv-bn" if p.parts else f"producer, {kind}-bn"
            if p.direction == "producer" else f"consumer, bn-{kind}", trace="onnx")
    for name, why in planner.nested:
        order.append(name)
        records[name] = SiteRecord(name, "BatchNormalization", Action.SKIPPED, reason=why,
                                   trace="onnx")
    _check_patterns(include, exclude, order)
    if strict:
        bad = {r.name: r.reason for r in records.values() if r.action == Action.SKIPPED}
        if bad:
            raise StrictModeError(bad)
    report = ConversionReport(transform="fold", regions={"": "onnx graph"}, dry_run=dry_run)
    report.sites = [records[n] for n in order]
    if dry_run:
        report.seconds = time.perf_counter() - t0
        return model, report
    new = _write(model, planner, plans)
    report.seconds = time.perf_counter() - t0
    from ..onnx.proto import weight_free as _weight_free

    try:  # on weight-free views: the checker serialises what it is given
        onnx.checker.check_model(_weight_free(new), full_check=True)
    except Exception as e:  # noqa: BLE001 - ours to fix, never the user's file to ship
        try:
            onnx.checker.check_model(_weight_free(model), full_check=True)
        except Exception as e0:  # noqa: BLE001 - the input has the same complaint
            log.warning("the input model itself fails onnx's full check (%s); the folded "
                        "model is checked on onnxruntime only", str(e0).splitlines()[0])
        else:
            raise ConversionMismatchError(f"the folded model fails onnx's checker ({e}); "
                                          "please report this", report=report) from e
    if check:
        _self_check(model, new, report, example_inputs, input_shapes)
    log.info("%s", report.summary())
    return new, report


def _feeds(model: Any, example_inputs: Any, input_shapes: dict[str, tuple[int, ...]] | None,
           seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input that is not an initializer: sizes from
    ``input_shapes`` (by name) or ``example_inputs`` (in order), symbolic dims else 1."""
    import onnx

    inits = {t.name for t in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in inits]
    given: dict[str, np.ndarray] = {}
    if example_inputs is not None:
        from .._args import as_inputs

        for i, x in zip(real, as_inputs(example_inputs, "example_inputs")):
            given[i.name] = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach")
                                        else x)
    rng = np.random.default_rng(seed)
    out = {}
    for i in real:
        if i.name in given:
            out[i.name] = given[i.name]
            continue
        t = i.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if input_shapes and i.name in input_shapes:
            shape = tuple(input_shapes[i.name])
        else:
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                          for d in t.shape.dim)
        if np.issubdtype(dtype, np.floating):
            out[i.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            out[i.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            out[i.name] = rng.integers(0, 2, shape).astype(dtype)
    return out


def _session(model: Any) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _self_check(model: Any, new: Any, report: ConversionReport, example_inputs: Any,
                input_shapes: dict[str, tuple[int, ...]] | None) -> None:
    """Both files on onnxruntime CPU, graph optimisations off (so its own fusions hide
    nothing), on random inputs; the bar of docs/bars.md."""
    if model.ByteSize() > 2_000_000_000:
        log.warning("the model is over 2 GB: the onnxruntime check is skipped")
        return
    feeds = _feeds(model, example_inputs, input_shapes)
    try:
        ref = _session(model).run(None, feeds)
    except Exception as e:  # noqa: BLE001 - the input file itself does not run here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"onnxruntime cannot run the input model on inputs "
                         f"{ {k: v.shape for k, v in feeds.items()} } ({first[:160]}); pass "
                         "input shapes (CLI: --input-shape NAME=1,3,224,224) or check=False")\
            from e
    try:
        out = _session(new).run(None, feeds)
    except Exception as e:  # noqa: BLE001
        raise ConversionMismatchError(f"onnxruntime cannot run the folded model ({e}); please "
                                      "report this", report=report) from e
    from ..verdict import compare_outputs, judge

    rel = compare_outputs([np.asarray(o) for o in out], [np.asarray(o) for o in ref])
    floats = {np.asarray(o).dtype for o in ref}
    judge(rel, [np.asarray(o) for o in ref], report, check=True,
          half=np.dtype(np.float16) in floats, bar=1e-5,
          what="the folded model (on onnxruntime)")


def convert_onnx_model(model: Any, to: str = "fold", example_inputs: Any = None,
                       include: Any = None, exclude: Any = None, *, inplace: bool = False,
                       strict: bool = False, leaf_modules: Any = (),
                       options: dict[str, Any] | None = None, dry_run: bool = False,
                       check: bool = True) -> ConversionResult:
    """:func:`normsurgeon.convert_with_report` of an ONNX model, with its argument checks.
    Imports onnx (and onnxruntime for the check), never torch: the CLI's ``fold X.onnx`` starts
    in a fraction of torch's import time."""
    from .._args import patterns

    options = dict(options or {})
    if to != "fold":
        from ..rules import get_transform

        get_transform(to)  # an unknown name: the error lists the valid ones
        raise TypeError(f"to={to!r} needs an nn.Module: an ONNX model is folded (to='fold')")
    accepted = {"input_shapes", "allow_overridable_initializers"}
    unknown = sorted(set(options) - accepted)
    if inplace and not dry_run:
        raise TypeError("inplace=True: an ONNX model is never modified; a new one is returned")
    if leaf_modules:
        raise TypeError("leaf_modules applies to nn.Module tracing, not to an ONNX model")
    if unknown:
        raise TypeError(f"an ONNX fold does not take {', '.join(unknown)}; it takes: "
                        f"{', '.join(sorted(accepted))}")
    new, report = convert_onnx(model, example_inputs=example_inputs,
                               include=patterns(include, "include"),
                               exclude=patterns(exclude, "exclude"), strict=strict,
                               check=check, dry_run=dry_run, **options)
    return ConversionResult(new, report)
