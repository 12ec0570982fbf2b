"""Replacement transforms: BatchNorm2d → Conditional BatchNorm (``cbn``) or Representative
BatchNorm (``rbn``), function-preserving (docs/cbn-rbn.md).

Replacement swaps modules where they are registered, so it needs no graph and reaches BNs in
code that cannot be traced. Only CBN needs a graph: to thread the condition. When the whole
model traces symbolically, a ``cond`` placeholder is added to the fx graph and wired to every
CBN; otherwise the model's class is subclassed so that ``forward(*inputs, cond)`` puts the
condition where every CBN reads it. Either way the result is called ``model(x, cond)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from ..errors import NormSurgeonError
from ..layers.cbn import (
    ConditionalBatchNorm1d,
    ConditionalBatchNorm2d,
    ConditionalBatchNorm3d,
    ConditionCheck,
    ConditionSlot,
    ConditionSpec,
    checked_condition,
    unambiguous_batch,
)
from ..layers.rbn import RepresentativeBatchNorm2d
from ..report import Action, ConversionReport, SiteRecord
from .base import BNSite, Context, Decision, Rule, Transform
from .checks import hook_problem

__all__ = ["CBNTransform", "RBNTransform", "ConditionedForward", "takes_condition"]


class ReplaceBN(Rule):
    """Swap one BN module (every name it is registered under) for ``factory(bn)``."""

    name = "replace"

    def __init__(self, factory: Any, accepts: tuple[type[nn.Module], ...], what: str,
                 target_for: Any = None) -> None:
        self.factory, self.accepts, self.what = factory, accepts, what
        self.target_for = target_for or (lambda bn: "")

    def preview(self, site: BNSite) -> tuple[str, str]:
        """(target, detail) for a dry run, without building the new layer."""
        return self.target_for(site.module), self.name

    def match(self, ctx: Context, site: BNSite) -> BNSite | None:
        return site if type(site.module) in self.accepts else None

    def check(self, ctx: Context, site: BNSite) -> str | None:
        return None

    def rewrite(self, ctx: Context, site: BNSite) -> SiteRecord:
        assert site.module is not None
        new = self.factory(site.module)
        for qual in ctx.names.get(id(site.module), [site.name]):
            ctx.replace_module(qual, new)
        return SiteRecord(site.name, site.kind, Action.REPLACED, target=type(new).__name__,
                          trace="module")


class _ReplaceTransform(Transform):
    module_level = True
    trace = "none"
    rule: ReplaceBN

    def plan(self, ctx: Context, site: BNSite) -> Decision:
        assert site.module is not None  # module-level sites
        why = ctx.opaque_problem(site.module)
        if why:
            return Decision(site, reason=why)
        if self.rule.match(ctx, site) is None:
            return Decision(site, reason=f"{site.kind} is not converted: {self.rule.what}")
        why = hook_problem(site.module, "BatchNorm") or self.check_site(site)
        if why:
            return Decision(site, reason=why)
        return Decision(site, self.rule, site, action=Action.REPLACED)

    def check_site(self, site: BNSite) -> str | None:
        return None


class RBNTransform(_ReplaceTransform):
    """Every BatchNorm2d → :class:`RepresentativeBatchNorm2d`, equal until trained."""

    name = "rbn"
    help = "replace BatchNorm2d with Representative BatchNorm (function-preserving)"
    accepted = ("freeze_base", "freeze_stats")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        freeze_base = bool(options.get("freeze_base", False))
        freeze_stats = bool(options.get("freeze_stats", False))

        def make(bn: nn.Module) -> RepresentativeBatchNorm2d:
            layer = RepresentativeBatchNorm2d.from_batchnorm(bn, freeze_stats=freeze_stats)
            if freeze_base:
                for p in (layer.weight, layer.bias):
                    p.requires_grad_(False)
            return layer

        self.rule = ReplaceBN(make, (nn.BatchNorm2d,),
                              "RBN calibrates 2-D feature maps; only BatchNorm2d is replaced",
                              lambda bn: "RepresentativeBatchNorm2d")
        self.freeze_base = freeze_base

    def finalize(self, model: nn.Module, ctx: Context, report: ConversionReport) -> nn.Module:
        if self.freeze_base:
            _freeze_all_but_new(model)
        return model


_CBN_FOR: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: ConditionalBatchNorm1d,
    nn.BatchNorm2d: ConditionalBatchNorm2d,
    nn.BatchNorm3d: ConditionalBatchNorm3d,
}


class CBNTransform(_ReplaceTransform):
    """Every BatchNorm2d → :class:`ConditionalBatchNorm2d`; the model takes ``cond`` last."""

    name = "cbn"
    help = "replace BatchNorm2d with Conditional BatchNorm; the model then takes (x, cond)"
    trace = "root"
    accepted = ("cond_dim", "hidden_dim", "num_classes", "freeze_base", "freeze_stats",
                "types")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        num_classes = options.get("num_classes")
        cond_dim = options.get("cond_dim")
        if cond_dim is None and num_classes is None:
            raise TypeError("to='cbn' needs cond_dim=E (the width of the condition "
                            "embedding) or num_classes=K (integer labels)")
        for key in ("cond_dim", "hidden_dim", "num_classes"):
            v = options.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{key} must be a positive int, got {v!r}")
        self.spec = ConditionSpec(cond_dim or 64, num_classes)
        self.freeze_base = bool(options.get("freeze_base", True))
        freeze_stats = bool(options.get("freeze_stats", True))
        types = tuple(options.get("types", (nn.BatchNorm2d,)))
        bad = [t for t in types if t not in _CBN_FOR]
        if bad:
            raise ValueError(f"types may hold BatchNorm1d/2d/3d, got {bad}")

        def make(bn: nn.Module) -> nn.Module:
            return _CBN_FOR[type(bn)].from_batchnorm(
                bn, self.spec.cond_dim, options.get("hidden_dim"), num_classes,
                freeze_base=self.freeze_base, freeze_stats=freeze_stats)

        names = "/".join(t.__name__ for t in types)
        self.rule = ReplaceBN(make, types, f"only {names} is replaced (see types=)",
                              lambda bn: _CBN_FOR[type(bn)].__name__)
        self.freeze_stats = freeze_stats

    def check_site(self, site: BNSite) -> str | None:
        if self.freeze_stats and site.running_mean is None:
            return ("has no running statistics to freeze; pass freeze_stats=False to "
                    "normalize with batch statistics")
        return None

    def example_condition(self, batch: int) -> torch.Tensor:
        if self.spec.num_classes is not None:
            return torch.arange(batch) % self.spec.num_classes
        return torch.randn(batch, self.spec.cond_dim)

    def validate_model(self, model: nn.Module) -> None:
        if takes_condition(model):
            raise NormSurgeonError(
                f"{type(model).__name__} already takes a condition (it holds Conditional "
                "BatchNorm layers); converting it to CBN again would add a second condition "
                "argument. Convert the original model instead")

    def call(self, model: nn.Module, inputs: tuple[Any, ...]) -> Any:
        batch = unambiguous_batch(inputs)
        if batch is None:
            batch = next((x.shape[0] for x in inputs
                          if isinstance(x, torch.Tensor) and x.dim() > 0), 1)
        return model(*inputs, self.example_condition(batch))

    def finalize(self, model: nn.Module, ctx: Context, report: ConversionReport) -> nn.Module:
        if self.freeze_base:
            _freeze_all_but_new(model)
        cbns = [m for m in model.modules() if isinstance(m, tuple(_CBN_FOR.values()))]
        root = next((r for r in ctx.regions if r.name == "" and r.mode == "symbolic"), None)
        if root is not None and _can_thread(root.graph):
            report.regions["condition"] = "threaded through the fx graph"
            return _thread_condition(root, model, self.spec)  # model: the rewritten copy
        report.regions["condition"] = ("model class subclassed: forward(*inputs, cond) sets the "
                                       "condition every CBN reads")
        return ConditionedForward.wrap(model, cbns, self.spec)


def _freeze_all_but_new(model: nn.Module) -> None:
    """``freeze_base``: only the new (CBN MLP / RBN calibration) parameters train."""
    new: set[int] = set()
    for m in model.modules():
        if hasattr(m, "new_parameters") and getattr(m, "_normsurgeon_layer", False):
            for group in m.new_parameters().values():
                new.update(id(p) for p in group)
    for p in model.parameters():
        p.requires_grad_(id(p) in new)


def _can_thread(graph: fx.Graph) -> bool:
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    return bool(phs) and not any(n.args for n in phs) and not any(
        str(n.target).startswith("*") for n in phs)


def _thread_condition(region: Any, model: nn.Module, spec: ConditionSpec) -> nn.Module:
    graph = region.graph
    name, i = "condition_check", 0
    while hasattr(model, name):  # never shadow (and then delete) a module of the user's
        i += 1
        name = f"condition_check_{i}"
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(phs[-1]):
        cond = graph.placeholder("cond")
    with graph.inserting_after(cond):
        checked = graph.call_module(name, (cond, *phs))
    for n in graph.nodes:
        if n.op == "call_module" and n.target != name and isinstance(
                model.get_submodule(n.target), tuple(_CBN_FOR.values())):
            n.args = (n.args[0], checked)
    graph.lint()
    model.add_module(name, ConditionCheck(spec.cond_dim, spec.num_classes))
    try:  # GraphModule copies the modules its graph calls from the root
        gm = region.graph_module(root=model)
    finally:
        delattr(model, name)
    gm.recompile()
    return gm


def _conditioned_class(base: type) -> type:
    """``Conditioned<Base>``: ``base`` whose forward takes a trailing condition (one class per
    base, made on first use; instances pickle as ``(base, state)``, so the class need not be
    importable)."""
    sub = ConditionedForward._classes.get(base)
    if sub is not None:
        return sub

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not args:
            raise TypeError(f"missing condition: expected model(*inputs, cond) with cond "
                            f"{self._ns_spec.describe()}")
        *inputs, cond = args
        if not inputs:
            raise TypeError("expected model(*inputs, cond): got only one argument")
        self._ns_slot.value = checked_condition(cond, unambiguous_batch(inputs), self._ns_spec)
        try:
            return base.forward(self, *inputs, **kwargs)
        finally:
            self._ns_slot.value = None

    def __reduce_ex__(self: nn.Module, protocol: int) -> Any:
        return (_new_conditioned, (base,), self.__getstate__())

    sub = type(f"Conditioned{base.__name__}", (base,),
               {"forward": forward, "__reduce_ex__": __reduce_ex__,
                "__module__": base.__module__, "_ns_conditioned": True,
                "__doc__": f"{base.__name__} whose forward takes a trailing condition."})
    ConditionedForward._classes[base] = sub
    return sub


def _new_conditioned(base: type) -> nn.Module:
    """Unpickling / deepcopy: an empty ``Conditioned<base>``; its state is set after."""
    cls = _conditioned_class(base)
    return cls.__new__(cls)


class ConditionedForward:
    """Subclass a model's own class so that ``forward(*inputs, cond)`` validates ``cond``,
    puts it where every CBN reads it, and runs the original forward. State-dict keys, methods
    and ``isinstance`` checks are those of the original model."""

    _classes: ClassVar[dict[type, type]] = {}

    @classmethod
    def wrap(cls, model: nn.Module, cbns: list[nn.Module], spec: ConditionSpec) -> nn.Module:
        slot = ConditionSlot()
        model.__class__ = _conditioned_class(type(model))
        model._ns_slot = slot  # type: ignore[assignment]
        model._ns_spec = spec  # type: ignore[assignment]
        for m in cbns:
            m._slot = slot
        return model


def takes_condition(model: nn.Module) -> bool:
    """Whether ``model`` already takes a condition: it holds Conditional BatchNorm layers, or
    its forward was given a condition argument by an earlier conversion (threaded through a
    graph with a ``condition_check``, or a subclassed forward), even one that replaced none."""
    return (getattr(type(model), "_ns_conditioned", False)
            or any(isinstance(m, (ConditionCheck, *_CBN_FOR.values())) for m in model.modules()))
