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

import ast
import builtins
import contextlib
import inspect
import logging
import operator
import os
import sys
import textwrap
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx import _symbolic_trace as _fx_trace
from torch.fx._symbolic_trace import _maybe_revert_all_patches, _orig_module_call
from torch.fx.node import map_aggregate
from torch.fx.proxy import Attribute
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .errors import one_line

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
    """BatchNorm{1,2,3}d, SyncBatchNorm, or a frozen-BN look-alike (docs/folding.md: a module with
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

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        """fx's ``call_module`` (a leaf becomes a ``call_module`` node, anything else is traced
        through) without its scope bookkeeping: the ``nn_module_stack`` metadata copied onto
        every node, which normsurgeon never reads. The graph is the same node for node
        (tests/test_fuzz.py and tests/test_zoo.py compare them); a ResNet-50 trace is ~25%
        faster."""
        name = self.path_of_module(m)
        if not self.is_leaf_module(m, name):
            return forward(*args, **kwargs)
        return self.create_proxy("call_module", name, args, kwargs)


# ----------------------------------------------------------------------------------------
# Concrete tracing
# ----------------------------------------------------------------------------------------
class _ConcreteProxy(fx.Proxy):
    """A proxy that also knows the real value of the example run (``node.meta['concrete']``)."""

    @property
    def value(self) -> Any:
        self.tracer.specialised = True  # type: ignore[attr-defined]  # Python sees a value
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


_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
_TRACE_CODE = fx.Tracer.trace.__code__

UserStack = tuple[tuple[CodeType, int], ...]


def user_stack() -> UserStack:
    """``(code, line)`` of the user-code frames between ``Tracer.trace`` and here, outermost
    first (torch's and normsurgeon's own frames left out)."""
    f = sys._getframe(1)
    out = []
    while f is not None and f.f_code is not _TRACE_CODE:
        name = f.f_code.co_filename
        if not (name.startswith(_TORCH_DIR) or name.startswith(_OWN_DIR)):
            out.append((f.f_code, f.f_lineno))
        f = f.f_back
    return tuple(reversed(out))


class ConcreteTracer(NormTracer):
    """Traces with real example values riding along; see the module docstring.

    Every module call records the user-code call stack that issued it (``node.meta
    ["ns_stack"]``), and ``specialised`` turns true when Python received a concrete value from
    the trace (a shape, ``bool()``, ``int()``, ``len()``...): from then on the graph may hold
    only the example's path (see :func:`path_problem`)."""

    def __init__(self, inputs: Sequence[Any], leaf_types: Sequence[type] = ()) -> None:
        super().__init__(leaf_types)
        self._inputs = list(inputs)
        self._next_input = 0
        self.specialised = False

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
        if kind == "call_module":
            proxy.node.meta["ns_stack"] = user_stack()
        if kind in ("call_function", "call_method") and _is_static(value):
            self.specialised = True
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
    specialised: bool = False  # concrete: Python took decisions on the example's values
    _shapes_done: bool = field(default=False, repr=False)
    _submodules: dict[str, nn.Module] | None = field(default=None, repr=False)
    _ranks: dict[fx.Node, frozenset[int] | None] | None = field(default=None, repr=False)

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

    def ranks(self, node: fx.Node) -> frozenset[int] | None:
        """The ranks ``node``'s tensor can have: from the example run when known, else proved
        from the graph (``flatten(x, 1)`` is 2-D, a Conv2d output is 3-D or 4-D, ``mean((2, 3))``
        needs 4-D...). ``None``: not provable."""
        shape = self.output_shape(node) if (self.inputs is not None
                                            or self.mode == "concrete") else None
        if shape is not None:
            return frozenset({len(shape)})
        if self._ranks is None:
            self._ranks = {}
        if node not in self._ranks:
            self._ranks[node] = None  # cycles cannot happen in a DAG; this guards recursion
            self._ranks[node] = _infer_ranks(self, node)
        return self._ranks[node]

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

    owner = threading.get_ident()

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if id(mod) in seen or threading.get_ident() != owner:
            return  # another thread serving the same model is not the example run
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
    try:
        model.eval()
    except NotImplementedError:  # ExportedProgram.module() refuses eval(): set the flags
        for m, _ in flags:
            m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# ----------------------------------------------------------------------------------------
# Tracing without touching other threads
# ----------------------------------------------------------------------------------------
# torch.fx traces by patching process-wide objects (``nn.Module.__call__`` and
# ``__getattr__``, wrapped functions in module globals) for the duration of a trace. Another
# thread calling a model meanwhile would be traced into this graph (or fail with "module is not
# installed as a submodule"), and two traces at once can restore each other's patches. So
# normsurgeon converts under one lock (``CONVERSION_LOCK``: conversions run one at a time, and
# the temporary recording hooks of one are never seen by another's analysis), and every patch
# it makes dispatches on the thread: the tracing thread gets fx's replacement, every other
# thread the object that was there before.
CONVERSION_LOCK = threading.RLock()


def _thread_guard(new_fn: Callable[..., Any], orig_fn: Any, owner: int) -> Callable[..., Any]:
    if not callable(orig_fn):
        return new_fn

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == owner:
            return new_fn(*args, **kwargs)
        return orig_fn(*args, **kwargs)

    for attr in ("__name__", "__qualname__", "__doc__", "__module__", "__wrapped__"):
        if hasattr(new_fn, attr):
            try:
                setattr(guarded, attr, getattr(new_fn, attr))
            except (AttributeError, TypeError):
                pass
    return guarded


class _ThreadLocalPatcher(_fx_trace._Patcher):
    """fx's patcher whose patches act only in the thread that made them."""

    def patch(self, frame_dict: dict[str, Any], name: str, new_fn: Callable[..., Any],
              deduplicate: bool = True) -> None:
        orig = frame_dict[name] if name in frame_dict else getattr(builtins, name, None)
        if getattr(orig, "__fx_already_patched", False):
            return super().patch(frame_dict, name, new_fn, deduplicate)
        super().patch(frame_dict, name, _thread_guard(new_fn, orig, threading.get_ident()),
                      deduplicate)

    def patch_method(self, cls: type, name: str, new_fn: Callable[..., Any],
                     deduplicate: bool = True) -> None:
        orig = getattr(cls, name)
        if getattr(orig, "__fx_already_patched", False):
            return super().patch_method(cls, name, new_fn, deduplicate)
        super().patch_method(cls, name, _thread_guard(new_fn, orig, threading.get_ident()),
                             deduplicate)


@contextlib.contextmanager
def thread_local_tracing() -> Iterator[None]:
    """Hold the tracing lock and make fx's patches (made by this thread) thread-local."""
    with CONVERSION_LOCK:
        saved = _fx_trace._Patcher
        _fx_trace._Patcher = _ThreadLocalPatcher  # type: ignore[misc]
        try:
            yield
        finally:
            _fx_trace._Patcher = saved  # type: ignore[misc]


def _trace(tracer: fx.Tracer, module: nn.Module) -> tuple[fx.Graph, dict[str, Any]]:
    """Trace ``module``, undoing fx's habit of adding ``_tensor_constant*`` attributes to it.

    Returns the graph and the constants it refers to (needed to rebuild a GraphModule)."""
    before = set(vars(module))
    constants: dict[str, Any] = {}
    try:
        with thread_local_tracing():
            graph = tracer.trace(module)
    finally:
        for key in set(vars(module)) - before:
            if key.startswith("_tensor_constant"):
                constants[key] = vars(module)[key]
                delattr(module, key)
    return graph, constants


# torch's wrappers whose forward is known to call ``self.module`` with the same arguments and
# to return its result: transparent to the analysis (DataParallel on GPUs replicates the
# wrapped module's current parameters on every call, so folded weights reach every replica)
KNOWN_WRAPPERS: tuple[type[nn.Module], ...] = (nn.DataParallel,
                                               nn.parallel.DistributedDataParallel)


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
        if type(module) in KNOWN_WRAPPERS:  # their forward calls self.module: trace through
            status[name] = "wrapper: forwards to .module"
            visit(f"{name}.module" if name else "module", module.module)
            return
        example = inputs.get(id(module))
        try:
            graph, consts = _trace(NormTracer(leaf_types), module)
            regions.append(Region(name, module, graph, "symbolic", example, consts))
            status[name] = "symbolic"
            return
        except Exception as e:
            err = one_line(e, 160)
        if example is not None:
            try:
                tracer = ConcreteTracer(_clone_inputs(example), leaf_types)
                with torch.no_grad():
                    graph, consts = _trace(tracer, module)
                regions.append(Region(name, module, graph, "concrete", example, consts,
                                      specialised=tracer.specialised))
                status[name] = "concrete"
                log.info("%s: symbolic trace failed (%s); traced with concrete shapes",
                         name or "<model>", err)
                return
            except Exception as e2:  # noqa: BLE001 - reported, then we recurse
                err = f"{err}; concrete: {one_line(e2, 160)}"
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
METADATA_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement",
                              "get_device", "is_contiguous"})
METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout",
                            "requires_grad"})


def value_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that read its values (shape / dtype queries excluded)."""
    out = []
    for u in node.users:
        if u.op == "call_method" and u.target in METADATA_METHODS:
            continue
        if u.op == "call_method" and u.target == "type" and len(u.args) == 1 and not u.kwargs:
            continue  # x.type() names the type; x.type(dtype) converts the values
        if u.op == "call_function" and u.target is builtins.getattr and len(u.args) > 1 \
                and u.args[1] in METADATA_ATTRS:
            continue
        out.append(u)
    return out


# ----------------------------------------------------------------------------------------
# Which paths a concrete graph proves
# ----------------------------------------------------------------------------------------
# control flow that can route a value differently (an assert cannot: it raises or not, in the
# original model as in the folded one)
_BRANCHES = (ast.If, ast.IfExp, ast.While, ast.For, ast.AsyncFor, ast.Try, ast.BoolOp,
             ast.comprehension, ast.Match)
_functions: dict[CodeType, tuple[int, int, list[tuple[int, int, bool, str]]] | None] = {}


def _static_test(node: ast.AST | None) -> bool:
    """A test whose value is fixed by the module, not by the input: constants, ``self.a.b``,
    ``range(self.n)``, comparisons with ``None`` and boolean combinations of those."""
    if node is None:
        return False
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Attribute):
        inner: ast.AST = node
        while isinstance(inner, ast.Attribute):
            inner = inner.value
        return isinstance(inner, ast.Name) and inner.id == "self"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _static_test(node.operand)
    if isinstance(node, ast.BoolOp):
        return all(_static_test(v) for v in node.values)
    if isinstance(node, ast.Compare):
        return all(_static_test(v) or (isinstance(v, ast.Constant) and v.value is None)
                   for v in [node.left, *node.comparators])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
            node.func.attr in ("values", "items", "keys", "children", "named_children")):
        return _static_test(node.func.value)  # self._modules.values(), self.blocks.children()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "zip":
        # a zip is as long as its shortest argument: one fixed by the module bounds the loop
        # (docs/folding.md: the one assumption of the path analysis)
        return any(_static_test(a) for a in node.args)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
            "range", "len", "enumerate", "isinstance", "hasattr", "getattr"):
        return all(_static_test(a) or isinstance(a, ast.Name) and a.id in (
            "int", "float", "str", "tuple", "list", "dict") for a in node.args)
    return False


def _test_of(node: ast.AST) -> ast.AST | None:
    if isinstance(node, (ast.If, ast.IfExp, ast.While)):
        return node.test
    if isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
        return node.iter
    if isinstance(node, ast.Match):
        return node.subject
    return None  # Try, BoolOp: control flow that no static test decides


def _function_branches(code: CodeType) -> tuple[int, int, list[tuple[int, int, bool, str]]] | None:
    """``(first line, last line, [(lo, hi, static, what)])`` of the branch constructs in the
    function of ``code``; ``None`` when its source is unavailable."""
    if code in _functions:
        return _functions[code]
    result = None
    try:
        lines, start = inspect.getsourcelines(code)
        tree = ast.parse(textwrap.dedent("".join(lines)))
        first = start if start > 0 else 1
        found = []
        for node in ast.walk(tree):
            if isinstance(node, _BRANCHES):
                lo = getattr(node, "lineno", None)
                if lo is None:  # comprehension: take its iterable's lines
                    lo, hi = node.iter.lineno, node.iter.end_lineno or node.iter.lineno
                else:
                    hi = node.end_lineno or lo
                found.append((lo + first - 1, hi + first - 1, _static_test(_test_of(node)),
                              type(node).__name__))
        result = (first, first + len(lines) - 1, found)
    except (OSError, TypeError, SyntaxError, IndentationError):
        result = None
    _functions[code] = result
    return result


def _value_spans(p: UserStack, c: UserStack) -> dict[CodeType, tuple[int, int]]:
    """Per user function, the lines that carry the producer's value to the consumer.

    Frames the two calls share (same function, same line) run both calls or neither, and are
    skipped; in the frame where they part, the lines between the two calls; deeper on the
    producer's side, from its call to the function's end; on the consumer's side, from the
    function's start to its call."""
    k = 0
    while k < min(len(p), len(c)) and p[k][0] is c[k][0] and p[k][1] == c[k][1]:
        k += 1
    spans: dict[CodeType, tuple[int, int]] = {}
    if k < len(p) and k < len(c) and p[k][0] is c[k][0]:
        spans[p[k][0]] = (min(p[k][1], c[k][1]), max(p[k][1], c[k][1]))
        k_p = k_c = k + 1
    else:
        if k > 0:
            spans[p[k - 1][0]] = (p[k - 1][1], p[k - 1][1])
        k_p = k_c = k
    for code, line in p[k_p:]:
        info = _function_branches(code)
        lo, hi = spans.get(code, (line, line))
        spans[code] = (min(lo, line), max(hi, info[1] if info else line))
    for code, line in c[k_c:]:
        info = _function_branches(code)
        lo, hi = spans.get(code, (line, line))
        spans[code] = (min(lo, info[0] if info else line), max(hi, line))
    return spans


def path_problem(region: Region, producers: Sequence[fx.Node], consumer: fx.Node) -> str | None:
    """Whether the edge ``producer → consumer`` of a concrete graph holds on every path.

    Symbolic graphs are exact. A concrete graph records one path; when Python took decisions on
    the example's values, another input may take a branch that feeds ``consumer`` from elsewhere.
    The edge is proven when no branch whose test depends on the input can change it: in each
    user function on the two call stacks, no such branch overlaps the code that carries the
    value (from the producer's call to the function's end, from the function's start to the
    consumer's call, between the two calls in a shared frame)."""
    if region.mode != "concrete" or not region.specialised:
        return None
    stacks = [n.meta.get("ns_stack") for n in (*producers, consumer)]
    if any(s is None for s in stacks):
        return "the concrete trace did not record where these modules are called"
    *p_stacks, c_stack = stacks
    for p_stack in p_stacks:
        spans = _value_spans(p_stack, c_stack)
        for code, (lo, hi) in spans.items():
            info = _function_branches(code)
            where = f"{os.path.basename(code.co_filename)}:{code.co_name}"
            if info is None:
                return (f"traced with concrete shapes, and the source of {where} is not "
                        "available to prove the fold holds on other inputs")
            for b_lo, b_hi, static, what in info[2]:
                if not static and b_lo <= hi and b_hi >= lo:
                    return (f"traced with concrete shapes, and {where} line {b_lo} branches "
                            f"({what}) on values that depend on the input: the example took "
                            "one path, another input may feed this BatchNorm differently")
    return None


# ----------------------------------------------------------------------------------------
# Ranks proved from the graph
# ----------------------------------------------------------------------------------------
_RANK_KEEPING_FUNCS = {torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu,
                       torch.nn.functional.relu6, torch.nn.functional.silu,
                       torch.nn.functional.gelu, torch.nn.functional.hardswish,
                       torch.nn.functional.leaky_relu, torch.nn.functional.dropout,
                       torch.nn.functional.elu, torch.sigmoid}
_RANK_KEEPING_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "float", "clone", "detach"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _infer_ranks(region: Region, node: fx.Node) -> frozenset[int] | None:
    def of(x: Any) -> frozenset[int] | None:
        return region.ranks(x) if isinstance(x, fx.Node) else None

    from .rules.checks import ELEMENTWISE

    if node.op == "call_module":
        m = region.submodule(node.target)
        src = of(node.args[0]) if node.args else None
        if isinstance(m, nn.Flatten):
            return frozenset({m.start_dim + 1}) if m.start_dim >= 0 and m.end_dim == -1 else None
        conv_dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.AdaptiveAvgPool2d: 2,
                     nn.AdaptiveMaxPool2d: 2, nn.AvgPool2d: 2, nn.MaxPool2d: 2,
                     nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool3d: 3}
        d = conv_dims.get(type(m))
        if d is not None:  # batched (N, C, *d) or unbatched (C, *d)
            ok = frozenset({d + 1, d + 2})
            return ok if src is None else (src & ok) or None
        if isinstance(m, (nn.Linear, *ELEMENTWISE)) or is_batchnorm(m):
            return src
        return None
    if node.op == "call_function":
        if node.target is torch.flatten:
            start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
            return frozenset({start + 1}) if isinstance(start, int) and start >= 0 and (
                end == -1) else None
        if node.target in _RANK_KEEPING_FUNCS or node.target in (
                torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.avg_pool2d,
                torch.nn.functional.max_pool2d):
            src = of(node.args[0]) if node.args else None
            if node.target in _RANK_KEEPING_FUNCS:
                return src
            ok = frozenset({3, 4})
            return ok if src is None else (src & ok) or None
        if node.target in (torch.mean, torch.sum, torch.amax, torch.amin):
            return _reduced(of(node.args[0]) if node.args else None, _arg(node, 1, "dim"),
                            _arg(node, 2, "keepdim", False))
        return None
    if node.op == "call_method":
        src = of(node.args[0]) if node.args else None
        if node.target in ("view", "reshape"):
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            return frozenset({len(sizes)}) if sizes else None
        if node.target == "flatten":
            start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
            return frozenset({start + 1}) if isinstance(start, int) and start >= 0 and (
                end == -1) else None
        if node.target in _REDUCTIONS:
            return _reduced(src, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        if node.target in _RANK_KEEPING_METHODS:
            return src
    return None


def _reduced(src: frozenset[int] | None, dim: Any, keepdim: Any) -> frozenset[int] | None:
    """Rank after reducing ``dim`` (an int or tuple of non-negative ints)."""
    dims = (dim,) if isinstance(dim, int) else dim
    if not isinstance(dims, (tuple, list)) or not dims or not all(
            isinstance(d, int) for d in dims) or keepdim is not False:
        return src if keepdim is True else None
    if any(d < 0 for d in dims):
        return None if src is None else frozenset(r - len(dims) for r in src)
    need = max(dims) + 1
    if src is None:
        return None
    return frozenset(r - len(dims) for r in src if r >= need) or None
