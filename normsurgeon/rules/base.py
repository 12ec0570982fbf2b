"""The shapes every transform shares: BatchNorm sites, the analysis context, rules and passes.

A *rule* has the onnxscript-rewriter shape: ``match`` finds its pattern around one BatchNorm
site (or returns ``None``), ``check`` returns ``None`` when the rewrite is safe or the *reason*
it is not (the reason lands in the report), ``rewrite`` performs it. A *transform* is a named
pass over every site: it plans first (match + check everywhere, no mutation), so that
``strict=True`` can refuse before anything changes, then applies.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..report import Action, ConversionReport, SiteRecord
from ..tracing import Region, is_batchnorm
from .stats import BNStats, prime_scale_shift

__all__ = ["BNSite", "Context", "Decision", "Rule", "Transform", "prime_scale_shift"]

_BN_SIG = inspect.signature(F.batch_norm)


@dataclass(kw_only=True)
class BNSite(BNStats):
    """One BatchNorm application found in a traced region: a module call or ``F.batch_norm``
    (its statistics, and the rules on them, are :class:`~normsurgeon.rules.stats.BNStats`)."""

    name: str
    kind: str
    node: fx.Node | None
    region: Region | None
    module: nn.Module | None
    input_node: fx.Node | None
    # a child of the BN module that must take its place when it is folded (the activation of a
    # norm+act layer); set by the behaviour check
    keep_child: str | None = None

    def _declared_features(self) -> int:
        return int(getattr(self.module, "num_features", -1))

    def batch_stats_problem(self) -> str:
        if self.module is not None and self.module.training:
            return "BatchNorm is in training mode (uses batch statistics)"
        if self.module is not None and not getattr(self.module, "track_running_stats", True):
            return "track_running_stats=False: it always normalizes with batch statistics"
        return "uses batch statistics (training=True)"


def _kind(m: nn.Module) -> str:
    return type(m).__name__


@dataclass
class Context:
    """Model-wide facts the rules consult: regions, call sites, aliases, shared weights."""

    model: nn.Module
    regions: list[Region]
    status: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)
    call_counts: Counter[int] = field(default_factory=Counter)
    names: dict[int, list[str]] = field(default_factory=dict)
    param_owners: dict[int, set[int]] = field(default_factory=dict)
    rebuild: set[str] = field(default_factory=set)  # regions whose graph must replace the module
    scripted: dict[int, str] = field(default_factory=dict)  # id -> enclosing TorchScript module
    # (name, module) as ``model.named_modules()`` yields them: each module once, first name
    walk: list[tuple[str, nn.Module]] = field(default_factory=list)
    target: nn.Module | None = None  # the model rewrites edit (the copy; ``model`` is analysed)
    _table: dict[str, nn.Module] | None = field(default=None, repr=False)
    _reads: dict[int, list[tuple[str, fx.Node]]] | None = field(default=None, repr=False)
    _table_root: nn.Module | None = field(default=None, repr=False)

    def target_module(self, qualname: str) -> nn.Module:
        """The module at ``qualname`` in the model being rewritten."""
        root = self.target if self.target is not None else self.model
        if not qualname:
            return root
        if self._table is None or self._table_root is not root:
            self._table = dict(root.named_modules(remove_duplicate=False))
            self._table_root = root
        m = self._table.get(qualname)
        return m if m is not None else root.get_submodule(qualname)

    def replace_module(self, qualname: str, new: nn.Module) -> None:
        """Put ``new`` at ``qualname`` in the model being rewritten."""
        parent_name, _, attr = qualname.rpartition(".")
        parent = self.target_module(parent_name)
        old = getattr(parent, attr, None)
        setattr(parent, attr, new)
        if self._table is not None:
            if isinstance(old, nn.Module) and old._modules:
                self._table = None  # its descendants' entries are stale
            else:
                self._table[qualname] = new

    def __post_init__(self) -> None:
        # one walk of the module tree (every registration name, shared modules included):
        # names, owners of each tensor, modules inside TorchScript, and the order of first
        # registration (what ``named_modules()`` yields)
        for qual, m in self.model.named_modules(remove_duplicate=False):
            key = id(m)
            seen = key in self.names
            self.names.setdefault(key, []).append(qual)
            if seen:
                continue
            self.walk.append((qual, m))
            if key not in self.scripted and isinstance(m, torch.jit.ScriptModule):
                for sub in m.modules():  # named after the outermost scripted module
                    self.scripted.setdefault(id(sub), qual)
            for store in (m._parameters, m._buffers):
                for p in store.values():
                    if p is not None:
                        self.param_owners.setdefault(id(p), set()).add(key)
        for r in self.regions:
            for n in r.graph.nodes:
                if n.op == "call_module":
                    self.call_counts[id(r.submodule(n.target))] += 1

    def _attr_reads(self) -> dict[int, list[tuple[str, fx.Node]]]:
        """``{id(obj): [(qualified get_attr path, node)]}`` for every object a graph reads with
        ``get_attr``, including each module the dotted path passes through."""
        if self._reads is None:
            self._reads = {}
            for r in self.regions:
                for n in r.graph.nodes:
                    if n.op != "get_attr" or n.target in r.constants:
                        continue
                    obj: Any = r.module
                    for atom in str(n.target).split("."):
                        obj = getattr(obj, atom, None)
                        if obj is None:
                            break
                        self._reads.setdefault(id(obj), []).append((r.qualname(n.target), n))
        return self._reads

    def other_readers_problem(self, site: BNSite, layers: list[nn.Module]) -> str | None:
        """Why something besides the fold reads what it changes: the layers' weight and bias,
        the BN module (it is removed) and its tensors. Reads seen in traced graphs are exact;
        an untraceable ancestor's forward is checked by its source text."""
        changed: list[Any] = []
        for layer in layers:
            changed += [layer, layer.weight, layer.bias]
        if site.module is not None:
            changed += [site.module, *site.module._parameters.values(),
                        *site.module._buffers.values()]
        reads = self._attr_reads()
        for obj in changed:
            if obj is None:
                continue
            for path, node in reads.get(id(obj), ()):
                if site.node is not None and set(node.users) <= {site.node}:
                    continue  # F.batch_norm's own arguments
                return (f"forward also reads {path} directly (get_attr); the fold would change "
                        "what it reads")
        return self.untraced_ancestor_problem(site.region.name if site.region else "",
                                              ["weight", "bias", "running_mean", "running_var"])

    def untraced_ancestor_problem(self, region_name: str, attrs: list[str]) -> str | None:
        """A region below untraceable modules: their forwards were never traced, so refuse when
        their source could read ``attrs`` (or the source is unavailable)."""
        if not region_name:
            return None
        parts = region_name.split(".")
        for i in range(len(parts)):
            anc = ".".join(parts[:i])
            if not self.status.get(anc, "").startswith("untraceable"):
                continue
            mod = self.model.get_submodule(anc) if anc else self.model
            src = _forward_source(type(mod))
            who = anc or "<model>"
            if src is None:
                return (f"the forward of {who} could not be traced and its source is not "
                        "available, so other readers of these weights cannot be ruled out; "
                        "pass example_inputs")
            hit = next((a for a in attrs + _GENERIC_READS if f".{a}" in src
                        or f"'{a}'" in src or f'"{a}"' in src), None)
            if hit is not None:
                return (f"the forward of {who} could not be traced and its source reads "
                        f"'{hit}'; other readers of these weights cannot be ruled out")
        return None

    def module_of(self, region: Region, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        return region.submodule(node.target)

    def single_call_problem(self, module: nn.Module, what: str) -> str | None:
        """Why rewriting ``module``'s own parameters is unsafe (several sites, aliases, sharing)."""
        from .checks import hook_problem

        n = self.call_counts[id(module)]
        if n > 1:
            return f"{what} is called at {n} sites; folding would change the other calls"
        if len(self.names.get(id(module), [])) > 1:
            return f"{what} is registered under several names ({', '.join(self.names[id(module)])})"
        for p in list(module._parameters.values()):
            if p is not None and len(self.param_owners.get(id(p), ())) > 1:
                return f"{what}'s parameters are shared with another module"
        return hook_problem(module, what)

    def opaque_problem(self, module: nn.Module) -> str | None:
        """Why ``module`` cannot be touched because compiled code holds it, or ``None``."""
        holder = self.scripted.get(id(module))
        if holder is None:
            return None
        return (f"inside TorchScript module {holder or '<model>'}: compiled code is opaque to "
                "normsurgeon, so it is left as it is")

    def module_sites(self) -> Iterator[BNSite]:
        """Every BatchNorm *module* of the model (for transforms that swap modules and need no
        graph: they reach BNs inside untraceable code too). Aliases are yielded once."""
        for qual, m in self.walk:
            if is_batchnorm(m):
                yield BNSite(name=qual, kind=_kind(m), node=None, region=None, module=m,
                             running_mean=m.running_mean, running_var=m.running_var,
                             weight=m.weight, bias=m.bias, eps=float(m.eps),
                             uses_batch_stats=bool(getattr(m, "training", False)),
                             input_node=None)

    def sites(self) -> Iterator[BNSite]:
        """Every BatchNorm application in the traced regions, in graph order."""
        for r in self.regions:
            for n in r.graph.nodes:
                site = self._site(r, n)
                if site is not None:
                    yield site

    def _site(self, r: Region, n: fx.Node) -> BNSite | None:
        if n.op == "call_module":
            m = r.submodule(n.target)
            if not is_batchnorm(m):
                return None
            track = getattr(m, "track_running_stats", True)
            batch = m.training or not track if hasattr(m, "track_running_stats") else False
            return BNSite(
                name=r.qualname(n.target), kind=_kind(m), node=n, region=r, module=m,
                running_mean=m.running_mean, running_var=m.running_var,
                weight=m.weight, bias=m.bias, eps=float(m.eps), uses_batch_stats=bool(batch),
                input_node=n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None,
            )
        if n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm):
            return self._functional_site(r, n)
        return None

    def _functional_site(self, r: Region, n: fx.Node) -> BNSite | None:
        if n.target is not F.batch_norm:
            return None
        try:
            bound = _BN_SIG.bind(*n.args, **n.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        a = bound.arguments
        consts: dict[str, Tensor | None] = {}
        non_const = []
        for key in ("running_mean", "running_var", "weight", "bias"):
            v = a[key]
            if v is None:
                consts[key] = None
            elif isinstance(v, fx.Node) and v.op == "get_attr":
                consts[key] = _get_attr(r, v.target)
            else:
                consts[key] = None
                non_const.append(key)
        site = BNSite(
            name=f"{r.name + '.' if r.name else ''}{n.name}", kind="F.batch_norm", node=n,
            region=r, module=None, running_mean=consts["running_mean"],
            running_var=consts["running_var"], weight=consts["weight"], bias=consts["bias"],
            eps=float(a["eps"]) if not isinstance(a["eps"], fx.Node) else float("nan"),
            uses_batch_stats=a["training"] is not False,
            input_node=a["input"] if isinstance(a["input"], fx.Node) else None,
        )
        if non_const or isinstance(a["eps"], fx.Node):
            site.running_mean = None  # makes stats_problem() report it
            site.kind = "F.batch_norm (non-constant arguments)"
        return site


_GENERIC_READS = ["parameters(", "named_parameters", "state_dict", "buffers(", "named_buffers",
                  "__dict__", "getattr("]
_sources: dict[type, str | None] = {}
# classes whose methods are not the model's code (torch's, the standard library's mixins such
# as typing.Generic, which DataParallel subclasses)
_LIBRARY_MODULES = frozenset({"torch", "typing", "builtins", "abc", "collections"})


def _forward_source(cls: type) -> str | None:
    """The source of ``cls.forward`` and of every method of the class (a forward may delegate
    to helpers), or ``None`` when unavailable."""
    if cls not in _sources:
        try:
            _sources[cls] = "\n".join(
                inspect.getsource(k) for k in cls.__mro__
                if k.__module__.split(".")[0] not in _LIBRARY_MODULES)
        except (OSError, TypeError):
            _sources[cls] = None
    return _sources[cls]


def _get_attr(r: Region, target: str) -> Any:
    if target in r.constants:
        return r.constants[target]
    obj: Any = r.module
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


@dataclass
class Decision:
    """The plan for one site: a rule and its match when transformable, else the reason."""

    site: BNSite
    rule: Rule | None = None
    match: Any = None
    reason: str = ""
    action: str = Action.SKIPPED


class Rule:
    """A pattern around a BatchNorm site with a safety check and a rewrite."""

    name: ClassVar[str] = "rule"

    def match(self, ctx: Context, site: BNSite) -> Any | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, ctx: Context, match: Any) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def rewrite(self, ctx: Context, match: Any) -> SiteRecord:  # pragma: no cover - abstract
        raise NotImplementedError


class Transform:
    """A named pass: ``plan`` (no mutation) then ``apply``; ``finalize`` may wrap the model."""

    name: ClassVar[str] = "transform"
    help: ClassVar[str] = ""
    needs_eval: ClassVar[bool] = False
    module_level: ClassVar[bool] = False  # sites come from named_modules, not from graphs
    trace: ClassVar[str] = "all"  # "all": every region; "root": whole model only; "none"
    accepted: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.accepted))
        if unknown:
            takes = ", ".join(self.accepted) or "no options"
            raise TypeError(f"to={self.name!r} does not take {', '.join(unknown)}; "
                            f"it takes: {takes}")
        self.options = options

    def plan(self, ctx: Context, site: BNSite) -> Decision:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate_model(self, model: nn.Module) -> None:
        """Raise when ``model`` cannot take this transform at all (before any analysis)."""

    def apply(self, ctx: Context, decision: Decision) -> SiteRecord:
        assert decision.rule is not None
        return decision.rule.rewrite(ctx, decision.match)

    def copy_memo(self, ctx: Context, decisions: list[Decision]) -> dict[int, Any]:
        """``copy.deepcopy`` memo entries for objects the rewrite replaces anyway (so they are
        not copied only to be thrown away). Default: none."""
        return {}

    def finalize(self, model: nn.Module, ctx: Context, report: ConversionReport) -> nn.Module:
        return model

    def call(self, model: nn.Module, inputs: tuple[Any, ...]) -> Any:
        """Run a converted model on the original's example inputs (CBN adds a condition)."""
        return model(*inputs)
