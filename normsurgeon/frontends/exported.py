"""Fold BatchNorm in a ``torch.export.ExportedProgram`` (docs/folding.md, "ExportedProgram").

Reading facts. Parameters, buffers and lifted constants are placeholders named in the graph
signature; a BN whose tensors are such placeholders has constant statistics, one whose tensors
are user inputs (or computed) has not. ``node.meta["val"]`` gives every tensor's exact rank
(sizes may be symbolic), so Linear ↔ BatchNorm1d folds need no example. Both IRs are read:

* training IR (``torch.export.export``): ``aten.conv{1,2,3}d``, ``aten.conv_transpose{1,2,3}d``,
  ``aten.linear``, ``aten.batch_norm`` (``training`` as an argument);
* core ATen (``run_decompositions()``): ``aten.convolution``, ``addmm``/``mm`` with a
  ``permute``/``t`` of the weight, ``_native_batch_norm_legit_no_training`` and its ``getitem``.

Deciding. :func:`normsurgeon.rules.plan.decide`, the planner the ``nn.Module`` path uses, on
the facts read here; the math is :func:`normsurgeon.foldmath.fold_weights`.

Writing back. A new program: a copy of the graph in which each folded BN is gone, each folded
layer reads its new weight (under the layer's own fully qualified name, so the state_dict keys
are those of ``ns.convert(model).state_dict()``), a bias-free layer gets a new ``<layer>.bias``
parameter, and the BN's parameters and buffers leave the signature and the state_dict. The
call signature, input and output names, ``range_constraints`` and the module call graph are
kept; torch's verifier checks the result. The input program is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
import operator
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.export.exported_program as _ep_module
import torch.fx as fx
from torch import Tensor, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputSpec,
    TensorArgument,
)
from torch.fx._lazy_graph_module import _LazyGraphModule

from .. import foldmath as Fn
from ..errors import ConversionMismatchError, StrictModeError
from ..report import Action, ConversionReport, SiteRecord
from ..rules.base import BNSite
from ..rules.plan import FoldFacts, FoldPlan, chain_problem, decide, decide_cat, first_exact

__all__ = ["convert_program", "is_exported_graph_module"]

log = logging.getLogger("normsurgeon")
aten = torch.ops.aten


def _overloads(*packets: str) -> set[Any]:
    out = set()
    for name in packets:
        packet = getattr(aten, name, None)
        if packet is None:
            continue
        for o in packet.overloads():
            out.add(getattr(packet, o))
    return out


# batch-norm ops: whether they return a tuple (read through getitem 0)
_BN_OPS: dict[Any, bool] = {
    **dict.fromkeys(_overloads("batch_norm"), False),
    **dict.fromkeys(_overloads("_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                               "_native_batch_norm_legit_functional", "native_batch_norm",
                               "cudnn_batch_norm", "miopen_batch_norm"), True),
}
_CONV_OPS = _overloads("conv1d", "conv2d", "conv3d")
_CONVT_OPS = _overloads("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_CONVOLUTION = _overloads("convolution")
_LINEAR = _overloads("linear")
_ADDMM, _MM = aten.addmm.default, aten.mm.default
_TRANSPOSES = {aten.t.default, aten.permute.default}
_CAT = _overloads("cat")
# identity in value (eval dropout, copies): transparent between a layer and its BN
_PASS_THROUGH = _overloads("dropout", "feature_dropout", "alpha_dropout", "clone", "alias",
                           "detach")
# copies of each channel's own values (reflect / replicate / circular padding): a per-channel
# affine map commutes with them, so they are transparent too (zero padding is not)
_COPY_PADS = _overloads("reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
                        "replication_pad1d", "replication_pad2d", "replication_pad3d")
_PAD = _overloads("pad")
# ops reading only a tensor's metadata: not readers of its values
_METADATA = _overloads("sym_size", "sym_stride", "sym_numel", "sym_storage_offset")
_CONSTANT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def is_exported_graph_module(model: nn.Module) -> int:
    """The number of ATen batch-norm ops in ``model`` when it is a GraphModule of ATen calls
    (what ``ExportedProgram.module()`` returns), else 0."""
    if not isinstance(model, fx.GraphModule):
        return 0
    return sum(1 for n in model.graph.nodes if n.op == "call_function" and n.target in _BN_OPS)


def _bind(node: fx.Node) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _value_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in _METADATA)]


def _module_path(node: fx.Node) -> tuple[str, str] | None:
    """``(qualified name, class name)`` of the innermost module that issued ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1][:2]
    cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", "")
    return str(path), cls_name


def _passes_through(node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return False
    if not isinstance(node.args[0], fx.Node):
        return False
    if node.target in _COPY_PADS:
        return True
    if node.target in _PAD:
        return _bind(node).get("mode") in ("reflect", "replicate", "circular")
    if node.target not in _PASS_THROUGH:
        return False
    return _bind(node).get("train", False) is False  # dropout: only when not training


class _Reader:
    """What the program's signature says about its placeholders."""

    def __init__(self, ep: ExportedProgram) -> None:
        self.ep = ep
        self.specs = {s.arg.name: s for s in ep.graph_signature.input_specs
                      if isinstance(s.arg, TensorArgument)}

    def spec(self, node: Any) -> InputSpec | None:
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        return self.specs.get(node.name)

    def tensor(self, node: Any) -> Tensor | None:
        """The value of a constant placeholder (parameter, buffer, lifted constant)."""
        spec = self.spec(node)
        if spec is None or spec.kind not in _CONSTANT_KINDS:
            return None
        if spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER
                                                and spec.persistent):
            return self.ep.state_dict.get(spec.target)
        return self.ep.constants.get(spec.target)

    def fqn(self, node: fx.Node) -> str:
        spec = self.spec(node)
        return spec.target if spec is not None and spec.target else node.name


@dataclass
class _Layer:
    node: fx.Node
    kind: str  # conv / convtranspose / linear
    op: str  # for messages
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    groups: int = 1
    padding: Any = 0
    transpose: fx.Node | None = None  # core ATen linear: permute(W) / t(W)
    bias_arg: str = "bias"


def _layer(node: Any) -> _Layer | None:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    t = node.target
    if t in _CONV_OPS or t in _CONVT_OPS or t in _CONVOLUTION:
        a = _bind(node)
        transposed = t in _CONVT_OPS or (t in _CONVOLUTION and bool(a["transposed"]))
        if not (isinstance(a["input"], fx.Node) and isinstance(a["weight"], fx.Node)):
            return None
        return _Layer(node, "convtranspose" if transposed else "conv", t.__name__.split(".")[0],
                      a["input"], a["weight"], a["bias"], int(a["groups"]), a["padding"])
    if t in _LINEAR:
        a = _bind(node)
        if not (isinstance(a["input"], fx.Node) and isinstance(a["weight"], fx.Node)):
            return None
        return _Layer(node, "linear", "linear", a["input"], a["weight"], a["bias"])
    if t is _ADDMM or t is _MM:
        a = _bind(node)
        mat2 = a["mat2"]
        if not (isinstance(mat2, fx.Node) and mat2.op == "call_function"
                and mat2.target in _TRANSPOSES and isinstance(mat2.args[0], fx.Node)):
            return None
        if mat2.target is aten.permute.default and list(mat2.args[1]) not in ([1, 0], [-1, -2]):
            return None
        if t is _ADDMM:
            if a["beta"] != 1 or a["alpha"] != 1:
                return None  # not a plain Linear: scaled terms
            inp, bias, arg = a["mat1"], a["self"], "self"
        else:
            inp, bias, arg = a["self"], None, "self"
        if not isinstance(inp, fx.Node):
            return None
        return _Layer(node, "linear", t.__name__.split(".")[0], inp, mat2.args[0], bias,
                      transpose=mat2, bias_arg=arg)
    return None


@dataclass
class _Site:
    node: fx.Node  # the batch-norm op
    value: fx.Node | None  # what carries the normalized tensor (the op, or its getitem 0)
    extras: list[fx.Node]  # other getitems
    args: dict[str, Any]
    name: str
    kind: str
    stats: BNSite | None = None
    problem: str | None = None


class _Planner:
    """Sites, facts and decisions for one program (reads only)."""

    def __init__(self, ep: ExportedProgram) -> None:
        self.ep, self.r = ep, _Reader(ep)
        self.graph = ep.graph
        self.sites = self._sites()
        self.bn_nodes = {s.node for s in self.sites}

    # -- sites ------------------------------------------------------------------------------
    def _sites(self) -> list[_Site]:
        out: list[_Site] = []
        seen: dict[str, int] = {}
        for n in self.graph.nodes:
            if n.op != "call_function" or n.target not in _BN_OPS:
                continue
            a = _bind(n)
            if _BN_OPS[n.target]:
                getitems = [u for u in n.users if u.op == "call_function"
                            and u.target is operator.getitem]
                value = next((u for u in getitems if u.args[1] == 0), None)
                extras = [u for u in getitems if u.args[1] != 0]
            else:
                value, extras = n, []
            where = _module_path(n)
            base, cls = where if where else (n.name, "")
            k = seen.get(base, 0)
            seen[base] = k + 1
            name = base if k == 0 else f"{base}#{k + 1}"
            out.append(_Site(n, value, extras, a, name, cls or f"aten.{n.target.__name__}"))
        for s in out:
            s.problem = self._site_problem(s)
        from ..rules.base import prime_scale_shift

        prime_scale_shift([s.stats for s in out if s.stats is not None])  # one batched pass
        for s in out:
            if s.problem is None and s.stats is not None:
                s.problem = s.stats.stats_problem()
        return out

    def _site_problem(self, s: _Site) -> str | None:
        a = s.args
        training = a.get("training", False)
        if s.node.target in _overloads("_native_batch_norm_legit_functional"):
            training = True
        if not isinstance(training, bool):
            return "training flag is not a constant of the program"
        if training:
            return "BatchNorm is in training mode (uses batch statistics)"
        if s.value is None:
            return "its output is not used"
        if any(_value_users(e) for e in s.extras):
            return "its saved-statistics outputs are read by the program"
        tensors: dict[str, Tensor | None] = {}
        for key in ("weight", "bias", "running_mean", "running_var"):
            v = a.get(key)
            if v is None:
                tensors[key] = None
                continue
            t = self.r.tensor(v)
            if t is None:
                kind = self.r.spec(v)
                what = "inputs of the program" if kind is not None else "computed in the graph"
                return (f"BatchNorm {key} is not a constant of the program ({what}), so its "
                        "value cannot be folded into weights")
            tensors[key] = t
        eps = a.get("eps")
        if not isinstance(eps, (int, float)):
            return "eps is not a constant of the program"
        s.stats = BNSite(name=s.name, kind=s.kind, node=None, region=None, module=None,
                         running_mean=tensors["running_mean"],
                         running_var=tensors["running_var"], weight=tensors["weight"],
                         bias=tensors["bias"], eps=float(eps), uses_batch_stats=False,
                         input_node=None)
        return None  # the statistics themselves: after the batched (s, t) pass

    # -- candidates -------------------------------------------------------------------------
    def candidate(self, s: _Site, direction: str) -> FoldPlan | None:
        via: list[fx.Node] = []
        if direction == "producer":
            node = s.args["input"]
            while _passes_through(node):
                via.insert(0, node)
                node = node.args[0]
            layer = _layer(node)
            if layer is not None:
                return FoldPlan(s, layer, direction, via)
            return self._cat_candidate(s, node, via)
        users = _value_users(s.value)
        node = users[0] if len(users) == 1 else None
        while _passes_through(node):
            via.append(node)
            users = _value_users(node)
            node = users[0] if len(users) == 1 else None
        layer = _layer(node)
        if layer is None or layer.input is not (via[-1] if via else s.value):
            return None
        return FoldPlan(s, layer, direction, via)

    def _cat_candidate(self, s: _Site, node: Any, via: list[fx.Node]) -> FoldPlan | None:
        """``cat([conv_1(x_1), …, conv_k(x_k)], 1) → BN``."""
        if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _CAT:
            return None
        a = _bind(node)
        parts, dim = a["tensors"], a["dim"]
        val = node.meta.get("val")
        rank = val.dim() if isinstance(val, Tensor) else None
        if not isinstance(parts, (list, tuple)) or len(parts) < 2 or rank is None or (
                dim % rank != 1):
            return None
        layers = [_layer(p) for p in parts]
        if any(x is None or x.kind != "conv" for x in layers):
            return None
        return FoldPlan(s, layers[0], "producer", via, parts=layers, cat=node)  # type: ignore

    def layer_name(self, layer: _Layer) -> str:
        fqn = self.r.fqn(layer.weight)
        return fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn

    def facts(self, p: FoldPlan) -> FoldFacts:
        s, layer = p.site, p.layer
        assert s.stats is not None
        producer = p.direction == "producer"
        where = _module_path(layer.node)
        layer_type = where[1] if where and where[1] else layer.op
        what = f"{layer_type} {self.layer_name(layer)}"
        w = self.r.tensor(layer.weight)
        # the BN op reads the producer's output; the consumer reads the BN's value
        chain = [layer.node, *p.via, s.node] if producer else [s.value, *p.via, layer.node]
        s_, t_ = s.stats.scale_shift()
        tensor_node = layer.node if producer else s.value

        def links() -> str | None:
            out = []
            for i, (a, b) in enumerate(zip(chain, chain[1:])):
                label = a.name if i else (what if producer else "BatchNorm")
                out.append((label, [("graph output" if u.op == "output" else u.name)
                                    for u in _value_users(a) if u is not b]))
            return chain_problem(out)

        def layer_problem() -> str | None:
            if w is None:
                return (f"{what}'s weight is not a constant of the program (a user input or "
                        "computed), so folded values cannot replace it")
            if not w.is_floating_point():
                return f"{what} weight dtype {w.dtype} is not floating point"
            if layer.bias is not None and self.r.tensor(layer.bias) is None:
                return f"{what}'s bias is not a constant of the program"
            if layer.bias is not None and tuple(self.r.tensor(layer.bias).shape) != (
                    self._out_channels(layer, w),):
                return f"{what}'s bias is not one value per output channel"
            return None

        def sharing() -> str | None:
            reads = [(layer.weight, {layer.transpose or layer.node}, "weight")]
            if layer.transpose is not None:
                reads.append((layer.transpose, {layer.node}, "weight"))
            if layer.bias is not None:
                reads.append((layer.bias, {layer.node}, "bias"))
            for node, ok, role in reads:
                others = [u.name for u in node.users if u not in ok]
                if others:
                    src = layer.weight if role == "weight" else node
                    return (f"{what}'s {role} {self.r.fqn(src)} is also read by "
                            f"{', '.join(others)}; folding would change what they compute")
            return None

        def readers(bn_side: bool) -> str | None:
            for key in ("weight", "bias", "running_mean", "running_var"):
                node = s.args.get(key)
                if not isinstance(node, fx.Node):
                    continue
                others = [u for u in node.users if u is not s.node]
                if not others:
                    continue
                bns = [u for u in others if u in self.bn_nodes]
                if bn_side and bns:
                    return (f"BatchNorm is applied at {len(bns) + 1} sites; folding would "
                            "change the other calls")
                if not bn_side and len(bns) < len(others):
                    return (f"forward also reads {self.r.fqn(node)} directly; the fold would "
                            "change what it reads")
            return None

        pad = False
        if not producer and layer.kind == "conv":
            padding = layer.padding
            k = tuple(w.shape[2:]) if w is not None else ()
            pad = (padding == "same" and any(x > 1 for x in k)) if isinstance(padding, str) \
                else any(int(x) != 0 for x in (padding if isinstance(padding, (list, tuple))
                                               else [padding]))
        val = tensor_node.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, Tensor) else None
        top = float(s_.abs().max()) if s_.numel() else 0.0
        bias_t = self.r.tensor(layer.bias) if layer.bias is not None else None
        return FoldFacts(
            direction=p.direction, kind=layer.kind, what=what, layer_type=layer_type,
            bn_kind=s.kind, chain=links, layer=layer_problem, sharing=sharing,
            readers=lambda: readers(False), bn_sharing=lambda: readers(True),
            bn_features=s.stats.num_features,
            channels=(self._out_channels(layer, w) if producer
                      else self._in_channels(layer, w)) if w is not None else -1,
            weight_rank=2 if layer.kind == "linear" else (w.dim() if w is not None else 0),
            ranks=frozenset({len(shape)}) if shape is not None else None, shape=shape,
            reads_zero_padding=pad, shift=t_ if pad else None, path=None,
            risky=w is not None and (w.dtype in (torch.float16, torch.bfloat16) or top >= 1e30),
            folded=lambda: Fn.fold_weights(layer.kind, p.direction, w, bias_t, s_, t_,
                                           layer.groups),
            weight_dtype=w.dtype if w is not None else None)

    def _decide_cat(self, p: FoldPlan) -> str | None:
        """Facts for each conv of a concatenation, for :func:`decide_cat`."""
        s = p.site
        assert s.stats is not None and p.cat is not None
        facts, start = [], 0
        sc, sh = s.stats.scale_shift()
        for i, layer in enumerate(p.parts):
            f = self.facts(FoldPlan(s, layer, "producer", []))
            w = self.r.tensor(layer.weight)
            end = start + (self._out_channels(layer, w) if w is not None else 0)
            what = f.what
            f.chain = (lambda layer=layer, what=what: f"{what}'s output has other users"
                       if _value_users(layer.node) != [p.cat] else None)
            f.bn_features, f.path = end - start, None
            if i:
                f.readers = f.bn_sharing = None
            bias = self.r.tensor(layer.bias) if layer.bias is not None else None
            f.folded = (lambda w=w, bias=bias, a=start, b=end: Fn.fold_weights(
                "conv", "producer", w, bias, sc[a:b], sh[a:b]))
            facts.append(f)
            start = end
        chain = [p.cat, *p.via, s.node]

        def cat_chain() -> str | None:
            for a, b in zip(chain, chain[1:]):
                if [u for u in _value_users(a) if u is not b]:
                    return "cat output has other users"
            return None

        return decide_cat(cat_chain, facts, s.stats.num_features)

    @staticmethod
    def _out_channels(layer: _Layer, w: Tensor) -> int:
        if layer.kind == "convtranspose":
            return int(w.shape[1]) * layer.groups
        return int(w.shape[0])

    @staticmethod
    def _in_channels(layer: _Layer, w: Tensor) -> int:
        if layer.kind == "convtranspose":
            return int(w.shape[0])
        return int(w.shape[1]) * (layer.groups if layer.kind == "conv" else 1)

    def describe(self, node: Any) -> str:
        if not isinstance(node, fx.Node):
            return "input"
        if node.op == "placeholder":
            return f"program input {node.name!r}"
        if node.op == "output":
            return "the graph output"
        return f"{getattr(node.target, '__name__', str(node.target))}()"

    def plan(self, s: _Site) -> tuple[FoldPlan | None, str]:
        def candidates() -> Iterator[tuple[str, FoldPlan, Callable[[], str | None]]]:
            for direction in ("producer", "consumer"):
                p = self.candidate(s, direction)
                if p is not None:
                    yield direction, p, lambda p=p: (self._decide_cat(p) if p.parts
                                                     else decide(self.facts(p)))

        def no_consumer() -> str:
            users = _value_users(s.value) if s.value is not None else []
            return (f"consumer is {self.describe(users[0])}, not a Conv/Linear"
                    if len(users) == 1 else f"output has {len(users)} users")

        return first_exact(candidates(), lambda: (f"producer is {self.describe(s.args['input'])}"
                                                  ", not a Conv/ConvTranspose/Linear"),
                           no_consumer)


# ------------------------------------------------------------------------------------------
# Writing the new program
# ------------------------------------------------------------------------------------------
def _copy_graph(graph: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``graph`` and the map from its nodes to the copy's (fx's own deepcopy,
    keeping the map)."""
    vm: dict[fx.Node, fx.Node] = {}
    g = fx.Graph(tracer_cls=graph._tracer_cls)
    out = g.graph_copy(graph, val_map=vm, return_output_node=True)
    for old, new in vm.items():  # fx renames nodes that shadow builtins (a placeholder named
        if new.name != old.name:  # `input`); the signature names them as they were
            new.name = old.name
            g._graph_namespace._rename_object(new, old.name)
    g._codegen = copy.deepcopy(graph._codegen)
    if out is not None:
        value, old_out = out
        new_out = g.output(value, type_expr=getattr(old_out, "type", None))
        new_out.meta = copy.copy(old_out.meta)
    return g, vm


def _fresh(t: Tensor) -> Tensor:
    """A copy that shares no memory with ``t`` (a Parameter stays a Parameter)."""
    c = t.detach().clone()
    if isinstance(t, nn.Parameter):
        return nn.Parameter(c, requires_grad=t.requires_grad)
    return c


class _Writer:
    def __init__(self, ep: ExportedProgram, reader: _Reader) -> None:
        self.ep, self.r = ep, reader
        self.graph, self.vm = _copy_graph(ep.graph)
        self.specs = list(ep.graph_signature.input_specs)
        self.values: dict[str, Tensor] = {}  # placeholder name -> new value
        self.renamed: dict[str, str] = {}
        # bias-free layers: (weight, latest folded bias), and which plan adds the placeholder
        self.pending_bias: dict[fx.Node, tuple[Tensor, Tensor]] = {}
        self.biases: dict[int, list[_Layer]] = {}

    def value(self, old: fx.Node) -> Tensor:
        name = old.name
        if name not in self.values:
            t = self.r.tensor(old)
            assert t is not None  # a constant placeholder, checked by the planner
            self.values[name] = t
        return self.values[name]

    def compute(self, p: FoldPlan) -> None:
        """The fold math of one plan (all plans' math runs first, in one loop, before any
        graph edit: ~2x faster than interleaving the two on ResNet-50)."""
        s = p.site
        assert s.stats is not None
        sc, sh = s.stats.scale_shift()
        start = 0
        new_biases = []
        for layer in p.parts or [p.layer]:
            w = self.value(layer.weight)
            if layer.bias is not None:
                b = self.value(layer.bias)
            else:  # a bias-free layer folded on its other side already has one now
                b = self.pending_bias[layer.node][1] if layer.node in self.pending_bias \
                    else None
            if p.parts:  # its slice of the BN's channels
                end = start + _Planner._out_channels(layer, w)
                w2, b2 = Fn.fold_weights("conv", "producer", w, b, sc[start:end],
                                         sh[start:end])
                start = end
            else:
                w2, b2 = Fn.fold_weights(layer.kind, p.direction, w, b, sc, sh, layer.groups)
            self.values[layer.weight.name] = _like(w2, w)
            if layer.bias is not None:
                self.values[layer.bias.name] = _like(b2, b)
            elif layer.node in self.pending_bias:  # folded on its other side already
                self.pending_bias[layer.node] = (self.pending_bias[layer.node][0], b2)
            else:
                self.pending_bias[layer.node] = (w, b2)
                new_biases.append(layer)
        self.biases[id(p)] = new_biases

    def apply(self, p: FoldPlan) -> None:
        """The graph edits of one plan (after :meth:`compute` ran for every plan)."""
        s = p.site
        for layer in self.biases.get(id(p), []):
            w, b2 = self.pending_bias[layer.node]
            self._add_bias(layer, self.vm[layer.node], b2, w, s)
        # the BN goes: its readers read its input
        value = self.vm[s.value]
        source = self.vm[s.args["input"]]
        self.renamed[value.name] = source.name
        value.replace_all_uses_with(source)
        for e in [*s.extras, s.value] if s.value is not s.node else []:
            self.graph.erase_node(self.vm[e])
        self.graph.erase_node(self.vm[s.node])
        # later folds that name the BN's value (a BN → Conv after this Conv → BN) find its
        # replacement
        self.vm[s.value] = self.vm[s.node] = source
        if any(u.op == "output" for u in source.users) and source.op == "call_function":
            # the program's output keeps its name (the graph signature names outputs by node)
            old_name = value.name
            # the erased BN node's name is free again (fx keeps erased names reserved)
            self.graph._graph_namespace._used_names.discard(old_name)
            source._rename(old_name)
            if source.name == old_name:
                self.renamed.pop(old_name, None)

    def _add_bias(self, layer: _Layer, node: fx.Node, b: Tensor, w: Tensor, site: _Site
                  ) -> None:
        wspec = self.r.spec(layer.weight)
        assert wspec is not None
        prefix = wspec.target[: -len(".weight")] if wspec.target.endswith(".weight") else \
            wspec.target
        target = f"{prefix}.bias"
        w_new = self.vm[layer.weight]
        stem = w_new.name[: -len("_weight")] if w_new.name.endswith("_weight") else w_new.name
        with self.graph.inserting_after(w_new):
            ph = self.graph.placeholder(f"{stem}_bias")
        fake = w_new.meta.get("val")
        # the folded BN's own (C,) bias or weight placeholder already carries a fake tensor of
        # this shape and dtype: share it (making one costs ~0.5 ms a site)
        same = next((v for v in (site.args.get("bias"), site.args.get("weight"))
                     if isinstance(v, fx.Node) and _same_meta(v.meta.get("val"), b)), None)
        if same is not None:
            ph.meta["val"] = same.meta["val"]
        elif fake is not None and hasattr(fake, "fake_mode"):
            ph.meta["val"] = fake.fake_mode.from_tensor(b, static_shapes=True)
        if "tensor_meta" in w_new.meta:
            from torch.fx.passes.shape_prop import _extract_tensor_metadata

            ph.meta["tensor_meta"] = _extract_tensor_metadata(b)
        i = next(k for k, sp in enumerate(self.specs) if sp.arg.name == layer.weight.name)
        self.specs.insert(i + 1, InputSpec(kind=wspec.kind, arg=TensorArgument(name=ph.name),
                                           target=target, persistent=wspec.persistent))
        self.values[ph.name] = nn.Parameter(b, requires_grad=w.requires_grad) if isinstance(
            w, nn.Parameter) else b
        if node.target is _MM:  # x @ Wᵀ becomes addmm(b', x, Wᵀ)
            with self.graph.inserting_before(node):
                addmm = self.graph.call_function(_ADDMM, (ph, node.args[0], node.args[1]))
            addmm.meta = copy.copy(node.meta)
            node.replace_all_uses_with(addmm)
            self.graph.erase_node(node)
            self.renamed[node.name] = addmm.name
            self.vm[layer.node] = addmm
        elif layer.bias_arg in [a.name for a in node.target._schema.arguments[:len(node.args)]]:
            idx = [a.name for a in node.target._schema.arguments].index(layer.bias_arg)
            node.update_arg(idx, ph)
        else:
            node.update_kwarg(layer.bias_arg, ph)

    def finish(self, dead_owners: list[str]) -> ExportedProgram:
        """Drop placeholders no longer read (the folded BNs' tensors, their
        ``num_batches_tracked``), then build the program."""
        ep = self.ep
        by_name = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
        keep_specs = []
        for sp in self.specs:
            node = by_name.get(sp.arg.name) if isinstance(sp.arg, TensorArgument) else None
            owner = (sp.target or "").rsplit(".", 1)[0]
            if (node is not None and not node.users and sp.kind in _CONSTANT_KINDS
                    and owner in dead_owners):
                self.graph.erase_node(node)
                continue
            keep_specs.append(sp)
        self.graph.lint()
        out_node = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        flat = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else [
            out_node.args[0]]
        out_specs = []
        for sp, v in zip(ep.graph_signature.output_specs, flat):
            arg = TensorArgument(name=v.name) if isinstance(v, fx.Node) and isinstance(
                sp.arg, TensorArgument) else sp.arg
            out_specs.append(OutputSpec(kind=sp.kind, arg=arg, target=sp.target))
        sig = ExportGraphSignature(input_specs=keep_specs, output_specs=out_specs)
        state: dict[str, Any] = {}
        constants: dict[str, Any] = {k: v for k, v in ep.constants.items()
                                     if not isinstance(v, Tensor)}
        old_placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        for sp in keep_specs:
            if sp.kind not in _CONSTANT_KINDS:
                continue
            name = sp.arg.name
            if name in self.values:
                t = self.values[name]
            else:
                t = _fresh(self.r.tensor(old_placeholders[name]))
            if sp.kind == InputKind.PARAMETER or (sp.kind == InputKind.BUFFER and sp.persistent):
                state[sp.target] = t
            else:
                constants[sp.target] = t
        calls = copy.deepcopy(ep.module_call_graph)
        for entry in calls:
            if entry.signature is None:
                continue
            for arg in [*entry.signature.inputs, *entry.signature.outputs]:
                if isinstance(arg, TensorArgument) and arg.name in self.renamed:
                    name = arg.name
                    while name in self.renamed:
                        name = self.renamed[name]
                    arg.name = name
        # the program builds its GraphModule from the graph once (lazily compiled, see
        # _lazy_graph_module); submodules (control-flow branches) come from the old one
        with _lazy_graph_module():
            new = ExportedProgram(
                root=ep.graph_module, graph=self.graph, graph_signature=sig, state_dict=state,
                range_constraints=copy.copy(ep.range_constraints), module_call_graph=calls,
                example_inputs=ep.example_inputs, constants=constants, verifiers=ep.verifiers)
        for k, v in ep.graph_module.meta.items():
            new.graph_module.meta.setdefault(k, copy.copy(v))
        return new  # the constructor ran torch's own verifier (ExportedProgram.validate)


@contextlib.contextmanager
def _lazy_graph_module() -> Iterator[None]:
    """Within the block, the ExportedProgram this thread builds gets torch's
    ``_LazyGraphModule``: its Python code is generated on first use (a call, ``.code``,
    printing, pickling) instead of in the constructor. Most uses of a folded program never need
    it (``torch.export.save`` writes the graph, ``.module()`` and ``run_decompositions()``
    build their own module), and generating it was ~15% of a ResNet-50 fold. Other threads
    building programs meanwhile get torch's own function (held under the conversion lock, so
    one patch at a time)."""
    orig = _ep_module._create_graph_module_for_export
    owner = threading.get_ident()

    def create(root: Any, graph: fx.Graph) -> fx.GraphModule:
        if threading.get_ident() != owner:
            return orig(root, graph)
        return _LazyGraphModule(root, graph)

    _ep_module._create_graph_module_for_export = create
    try:
        yield
    finally:
        _ep_module._create_graph_module_for_export = orig


def _same_meta(fake: Any, t: Tensor) -> bool:
    return isinstance(fake, Tensor) and fake.dtype == t.dtype and tuple(fake.shape) == tuple(
        t.shape)


def _like(new: Tensor, old: Tensor) -> Tensor:
    return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(
        old, nn.Parameter) else new


# ------------------------------------------------------------------------------------------
def convert_program(ep: ExportedProgram, *, example_inputs: Any = None,
                    include: list[str] | None = None, exclude: list[str] | None = None,
                    strict: bool = False, check: bool = True, dry_run: bool = False
                    ) -> tuple[ExportedProgram, ConversionReport]:
    """Fold the BatchNorms of ``ep``; return a new program and the report (see the module
    docstring). ``ep`` is never modified."""
    from ..api import _check_patterns

    t0 = time.perf_counter()
    planner = _Planner(ep)
    records: dict[str, SiteRecord] = {}
    plans: list[FoldPlan] = []
    for s in planner.sites:
        if (include is not None and not any(fnmatch.fnmatchcase(s.name, p) for p in include)) \
                or (exclude is not None and any(fnmatch.fnmatchcase(s.name, p) for p in exclude)):
            records[s.name] = SiteRecord(s.name, s.kind, Action.EXCLUDED,
                                         reason="excluded by include/exclude patterns",
                                         trace="export")
            continue
        if s.problem:
            records[s.name] = SiteRecord(s.name, s.kind, Action.SKIPPED, reason=s.problem,
                                         trace="export")
            continue
        p, why = planner.plan(s)
        if p is None:
            records[s.name] = SiteRecord(s.name, s.kind, Action.SKIPPED, reason=why,
                                         trace="export")
            continue
        plans.append(p)
        if p.parts:
            target = ", ".join(planner.layer_name(x) for x in p.parts)
            detail = "producer, cat-conv-bn"
        else:
            target = planner.layer_name(p.layer)
            detail = (f"producer, {p.layer.kind}-bn" if p.direction == "producer"
                      else f"consumer, bn-{p.layer.kind}")
        records[s.name] = SiteRecord(s.name, s.kind, Action.FOLDED, target=target,
                                     detail=detail, trace="export")
    _check_patterns(include, exclude, [s.name for s in planner.sites])
    if strict:
        bad = {r.name: r.reason for r in records.values() if r.action == Action.SKIPPED}
        if bad:
            raise StrictModeError(bad)
    report = ConversionReport(transform="fold", regions={"": "exported program"},
                              dry_run=dry_run)
    report.sites = [records[s.name] for s in planner.sites]
    if dry_run:
        report.seconds = time.perf_counter() - t0
        return ep, report
    writer = _Writer(ep, planner.r)
    for p in plans:
        writer.compute(p)
    for p in plans:
        writer.apply(p)
    owners = []
    for p in plans:
        rm = p.site.args.get("running_mean")
        if isinstance(rm, fx.Node):
            owners.append(planner.r.fqn(rm).rsplit(".", 1)[0])
    new = writer.finish(owners)
    report.seconds = time.perf_counter() - t0
    _self_check(ep, new, example_inputs, report, check)
    log.info("%s", report.summary())
    return new, report


def _self_check(ep: ExportedProgram, new: ExportedProgram, example_inputs: Any,
                report: ConversionReport, check: bool) -> None:
    """Run both programs on the example inputs (the caller's, else the program's own) with
    the bar of the module path (docs/bars.md)."""
    from .._args import as_inputs
    from ..api import _fp64_noise, compare_outputs, judge

    if example_inputs is not None:
        args, kwargs = as_inputs(example_inputs, "example_inputs"), {}
    elif not check:  # the program's own example inputs are only run to check
        return
    elif ep.example_inputs is not None:
        args, kwargs = ep.example_inputs
    else:
        return
    with torch.no_grad():
        try:
            ref = _run(ep, args, kwargs)
        except Exception as e:
            raise ValueError(f"the program rejects the example inputs: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        try:
            out = _run(new, args, kwargs)
        except Exception as e:  # noqa: BLE001 - a folded program that raises is a mismatch
            msg = (f"the folded program raised {type(e).__name__} on the example inputs, where "
                   "the original ran; please report this")
            if check:
                raise ConversionMismatchError(msg, report=report) from e
            log.warning("%s", msg)
            return
    dtypes = {t.dtype for t in new.state_dict.values() if t.is_floating_point()}
    judge(compare_outputs(out, ref), ref, report, check=check,
          half=bool(dtypes & {torch.float16, torch.bfloat16}), bar=1e-5,
          noise=(lambda: _fp64_noise(ep.module(), tuple(args), ref)) if not kwargs else None,
          what="the folded program")


def _run(ep: ExportedProgram, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The program's user outputs on ``args``: its graph called with the parameters, buffers
    and constants the signature names, without unlifting it into a module (``ep.module()``
    costs more than the forward: ~0.3 s on ResNet-50). Programs with keyword inputs or
    non-tensor state go through ``ep.module()``."""
    specs = ep.graph_signature.input_specs
    simple = not kwargs and all(
        s.kind in (InputKind.USER_INPUT, *_CONSTANT_KINDS) for s in specs) and sum(
        s.kind == InputKind.USER_INPUT for s in specs) == len(args) and all(
        isinstance(a, Tensor) for a in args)
    if not simple:
        return ep.module()(*args, **kwargs)
    user = iter(args)
    values = []
    for s in specs:
        if s.kind == InputKind.USER_INPUT:
            values.append(next(user))
        elif s.kind == InputKind.PARAMETER or (s.kind == InputKind.BUFFER and s.persistent):
            values.append(ep.state_dict[s.target])
        else:
            values.append(ep.constants[s.target])
    outs = ep.graph_module(*values)
    return [o for o, s in zip(outs, ep.graph_signature.output_specs)
            if s.kind.name == "USER_OUTPUT"]


def unsupported_options(to: str, inplace: bool, leaf_modules: Sequence[type], options: dict
                        ) -> str | None:
    """Why a ``convert`` call cannot apply to an ExportedProgram, or ``None``."""
    if to != "fold":
        return (f"to={to!r} needs an nn.Module: an ExportedProgram is folded (to='fold'); "
                "convert the module, then export it")
    if inplace:
        return "inplace=True: an ExportedProgram is never modified; a new one is returned"
    if leaf_modules:
        return "leaf_modules applies to nn.Module tracing, not to an ExportedProgram"
    if options:
        return f"to='fold' takes no options ({', '.join(sorted(options))})"
    return None
