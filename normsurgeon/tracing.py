"""Tracing that reaches every BatchNorm of a model, traceable or not.

Strategy, per module, starting from the root:

1. ``symbolic``: plain ``torch.fx`` tracing with :class:`NormTracer` (BatchNorm look-alikes and
   normsurgeon's own layers are leaves). The graph is exact for every input and may be executed.
2. ``concrete``: when (1) fails and example inputs reached this module, trace again with proxies
   that carry real example values (:class:`ConcreteTracer`): ``bool()``, ``int()``, ``len()``,
   iteration and shape arithmetic get real answers, so Python control flow takes the example's
   path. The graph is shape-specialised; normsurgeon uses it only to *analyse* data flow and
   rewrites modules, never runs it.
3. otherwise recurse into the children, so one untraceable block never hides the rest.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import logging
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches, _orig_module_call
from torch.fx.node import map_aggregate
from torch.fx.proxy import Attribute
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = [
    "is_batchnorm",
    "is_normsurgeon_layer",
    "NormTracer",
    "ConcreteTracer",
    "Region",
    "trace_regions",
    "record_inputs",
    "set_submodule",
]

log = logging.getLogger("normsurgeon")

_LOOKALIKE_ATTRS = ("running_mean", "running_var", "weight", "bias", "eps")


def is_normsurgeon_layer(m: nn.Module) -> bool:
    """True for normsurgeon's own layers (CBN, RBN), which must never be treated as plain BN."""
    return bool(getattr(type(m), "_normsurgeon_layer", False))


_class_attrs: dict[tuple[type, str], bool] = {}


def _class_has(cls: type, name: str) -> bool:
    key = (cls, name)
    hit = _class_attrs.get(key)
    if hit is None:
        hit = _class_attrs[key] = hasattr(cls, name)
    return hit


def is_batchnorm(m: nn.Module) -> bool:
    """BatchNorm{1,2,3}d, SyncBatchNorm, or a frozen-BN look-alike (SPEC: a module with
    ``running_mean``, ``running_var``, ``weight``, ``bias`` and ``eps`` that always normalizes with
    its running statistics, such as torchvision's ``FrozenBatchNorm2d``)."""
    if isinstance(m, _BatchNorm):
        return not is_normsurgeon_layer(m)
    # cheap negative first: no running_mean buffer, attribute or class attribute (hasattr on a
    # Module raises inside __getattr__; this runs for every module of every traced model)
    if ("running_mean" not in m._buffers and "running_mean" not in m.__dict__
            and not _class_has(type(m), "running_mean")):
        return False
    if is_normsurgeon_layer(m) or isinstance(m, _InstanceNorm):
        return False
    return all(hasattr(m, a) for a in _LOOKALIKE_ATTRS) and isinstance(
        getattr(m, "running_mean", None), torch.Tensor
    ) and not any(True for _ in m.children())


class NormTracer(fx.Tracer):
    """``torch.fx`` tracer whose leaves also include BN look-alikes, normsurgeon layers and any
    extra module types the caller names."""

    def __init__(self, leaf_types: Sequence[type] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_batchnorm(m) or is_normsurgeon_layer(m) or isinstance(m, torch.jit.ScriptModule):
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


# ----------------------------------------------------------------------------------------
# Concrete tracing
# ----------------------------------------------------------------------------------------
class _ConcreteProxy(fx.Proxy):
    """A proxy that also knows the real value of the example run (``node.meta['concrete']``)."""

    @property
    def value(self) -> Any:
        return self.node.meta["concrete"]

    def __bool__(self) -> bool:
        return bool(self.value)

    def __int__(self) -> int:
        return int(self.value)

    def __index__(self) -> int:
        return operator.index(self.value)

    def __float__(self) -> float:
        return float(self.value)

    def __len__(self) -> int:
        return len(self.value)

    def __iter__(self):  # type: ignore[override]
        return iter([self[i] for i in range(len(self.value))])

    def __getattr__(self, k: str) -> Any:
        # fx.Proxy sets these in __init__; asking before then must not recurse
        if k.startswith("__") or k in ("node", "tracer", "root", "attr", "_node"):
            raise AttributeError(k)
        value = getattr(self.value, k)
        if callable(value) and not isinstance(value, torch.Tensor):
            return _ConcreteAttribute(self, k)  # a method: becomes call_method when called
        return self.tracer.create_proxy("call_function", builtins.getattr, (self, k), {})


class _ConcreteAttribute(Attribute, _ConcreteProxy):
    """``proxy.attr``: lazily a node, concrete once anything asks for its value."""


_STATIC = (int, float, bool, str, torch.dtype, torch.device, torch.memory_format, type(None))


def _is_static(v: Any) -> bool:
    if isinstance(v, _STATIC):
        return True
    return isinstance(v, tuple) and all(isinstance(x, _STATIC) for x in v)


def _unwrap(a: Any) -> Any:
    return a.node.meta["concrete"] if isinstance(a, fx.Proxy) else a


def _fetch_attr(root: nn.Module, target: str) -> Any:
    """Resolve a dotted attribute without going through fx's patched ``Module.__getattr__``."""
    obj: Any = root
    for atom in target.split("."):
        if isinstance(obj, nn.Module):
            for store in (obj._parameters, obj._buffers, obj._modules):
                if atom in store:
                    obj = store[atom]
                    break
            else:
                obj = getattr(obj, atom)
        else:
            obj = getattr(obj, atom)
    return obj


class ConcreteTracer(NormTracer):
    """Traces with real example values riding along; see the module docstring."""

    def __init__(self, inputs: Sequence[Any], leaf_types: Sequence[type] = ()) -> None:
        super().__init__(leaf_types)
        self._inputs = list(inputs)
        self._next_input = 0

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):  # type: ignore[override]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        a = map_aggregate(args, _unwrap)
        k = map_aggregate(kwargs, _unwrap)
        if kind == "placeholder":
            if self._next_input < len(self._inputs):
                value = self._inputs[self._next_input]
            else:
                value = args[0] if args else None
            self._next_input += 1
        elif kind == "output":
            value = a[0] if a else None
        else:
            # run for real with fx's patches lifted, so nothing inside records nodes
            with _maybe_revert_all_patches():
                if kind == "get_attr":
                    value = _fetch_attr(self.root, target)
                elif kind == "call_function":
                    value = target(*a, **k)
                elif kind == "call_method":
                    value = getattr(a[0], target)(*a[1:], **k)
                else:  # call_module
                    value = _orig_module_call(_fetch_attr(self.root, target), *a, **k)
        proxy.node.meta["concrete"] = value
        if kind in ("call_function", "call_method") and _is_static(value):
            # sizes, dtypes, flags: only tensor data flow matters here, so hand Python the
            # real value (torch.zeros(*x.size()), math.ceil(h / s), ... then just work)
            return value
        return proxy


# ----------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------
@dataclass
class Region:
    """One traced piece of the model: the module at ``name`` (``""`` = root) and its graph."""

    name: str
    module: nn.Module
    graph: fx.Graph
    mode: str  # "symbolic" or "concrete"
    inputs: tuple[Any, ...] | None = None
    constants: dict[str, Any] = field(default_factory=dict, repr=False)
    _shapes_done: bool = field(default=False, repr=False)
    _submodules: dict[str, nn.Module] | None = field(default=None, repr=False)

    def qualname(self, target: str) -> str:
        return f"{self.name}.{target}" if self.name else target

    def submodule(self, target: str) -> nn.Module:
        """``self.module.get_submodule(target)``, from a table built on first use (rules look
        modules up while planning, before any rewrite)."""
        if self._submodules is None:
            self._submodules = dict(self.module.named_modules(remove_duplicate=False))
        m = self._submodules.get(target)
        return m if m is not None else self.module.get_submodule(target)

    def output_shape(self, node: fx.Node) -> torch.Size | None:
        """Shape of ``node``'s tensor in the example run, or ``None`` if unknown."""
        if self.mode == "concrete":
            v = node.meta.get("concrete")
            return v.shape if isinstance(v, torch.Tensor) else None
        if not self._shapes_done:
            self._shapes_done = True
            if self.inputs is not None:
                try:
                    from torch.fx.passes.shape_prop import ShapeProp

                    gm = self.graph_module()
                    with torch.no_grad():
                        ShapeProp(gm).propagate(*self.inputs)
                except Exception as e:  # shapes are an optional refinement
                    log.debug("shape propagation failed in %r: %s", self.name, e)
        meta = node.meta.get("tensor_meta")
        return getattr(meta, "shape", None)

    def graph_module(self, root: nn.Module | None = None) -> fx.GraphModule:
        """A runnable GraphModule of this region's (current) graph, taking its submodules from
        ``root`` (default: the traced module). Symbolic regions only."""
        if self.mode != "symbolic":
            raise RuntimeError(f"region {self.name!r} was traced concretely; it cannot be run")
        root = self.module if root is None else root
        for k, v in self.constants.items():
            setattr(root, k, v)
        try:
            return fx.GraphModule(root, self.graph, type(root).__name__)
        finally:
            for k in self.constants:
                delattr(root, k)


def record_inputs(
    model: nn.Module, example_inputs: tuple[Any, ...], wanted: Iterable[nn.Module]
) -> tuple[dict[int, tuple[Any, ...]], Any]:
    """Run ``model(*example_inputs)`` once and return ``({id(module): positional inputs of its
    first call}, output)`` for the ``wanted`` modules."""
    wanted = list(wanted)
    seen: dict[int, tuple[Any, ...]] = {}
    handles = []

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if id(mod) in seen:
            return
        if kwargs:
            try:
                bound = inspect.signature(mod.forward).bind(*args, **kwargs)
                args = tuple(bound.arguments.values())
            except (TypeError, ValueError):
                return
        seen[id(mod)] = args

    for m in wanted:
        if isinstance(m, torch.jit.ScriptModule):  # compiled: no Python hooks, opaque anyway
            continue
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen, out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put every module in eval mode (no running-stat updates), then restore each
    module's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _trace(tracer: fx.Tracer, module: nn.Module) -> tuple[fx.Graph, dict[str, Any]]:
    """Trace ``module``, undoing fx's habit of adding ``_tensor_constant*`` attributes to it.

    Returns the graph and the constants it refers to (needed to rebuild a GraphModule)."""
    before = set(vars(module))
    constants: dict[str, Any] = {}
    try:
        graph = tracer.trace(module)
    finally:
        for key in set(vars(module)) - before:
            if key.startswith("_tensor_constant"):
                constants[key] = vars(module)[key]
                delattr(module, key)
    return graph, constants


def trace_regions(
    model: nn.Module,
    *,
    needs: Callable[[nn.Module], bool],
    inputs: dict[int, tuple[Any, ...]] | None = None,
    leaf_types: Sequence[type] = (),
) -> tuple[list[Region], dict[str, str]]:
    """Cover ``model`` with traced regions.

    ``needs(module)`` says whether a module holds anything worth tracing (a BN below it);
    ``inputs`` maps ``id(module)`` to example inputs (from :func:`record_inputs`) and enables
    concrete tracing. Returns the regions and, per visited module name, how it was traced.
    """
    inputs = inputs or {}
    regions: list[Region] = []
    status: dict[str, str] = {}

    def visit(name: str, module: nn.Module) -> None:
        if not needs(module):
            return
        if isinstance(module, torch.jit.ScriptModule):
            status[name] = "opaque: TorchScript module"
            return
        example = inputs.get(id(module))
        try:
            graph, consts = _trace(NormTracer(leaf_types), module)
            regions.append(Region(name, module, graph, "symbolic", example, consts))
            status[name] = "symbolic"
            return
        except Exception as e:
            err = _one_line(e)
        if example is not None:
            try:
                with torch.no_grad():
                    graph, consts = _trace(
                        ConcreteTracer(_clone_inputs(example), leaf_types), module)
                regions.append(Region(name, module, graph, "concrete", example, consts))
                status[name] = "concrete"
                log.info("%s: symbolic trace failed (%s); traced with concrete shapes",
                         name or "<model>", err)
                return
            except Exception as e2:  # noqa: BLE001 - reported, then we recurse
                err = f"{err}; concrete: {_one_line(e2)}"
        status[name] = f"untraceable: {err}"
        log.info("%s is not traceable (%s); tracing its children", name or "<model>", err)
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return regions, status


def _clone_inputs(example: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in example)


def set_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    """Replace the submodule at ``qualname`` (dotted path; Sequential indices included)."""
    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


# names whose use reads only metadata, never the values: folding cannot change them
METADATA_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement", "type",
                              "get_device", "is_contiguous"})
METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout",
                            "requires_grad"})


def value_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that read its values (shape / dtype queries excluded)."""
    out = []
    for u in node.users:
        if u.op == "call_method" and u.target in METADATA_METHODS:
            continue
        if u.op == "call_function" and u.target is builtins.getattr and len(u.args) > 1 \
                and u.args[1] in METADATA_ATTRS:
            continue
        out.append(u)
    return out
