"""Folding rules: eval BatchNorm into the neighbouring Conv / ConvTranspose / Linear (docs/math.md).

Producer direction (BN after the layer) is tried first, then consumer (BN before the layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import foldmath as Fn
from ..report import Action, SiteRecord
from ..tracing import path_problem, value_users
from .base import BNSite, Context, Decision, Rule, Transform
from .checks import bn_behaviour, hook_problem
from .plan import FoldFacts, decide, decide_cat, first_exact

__all__ = ["FoldTransform", "FOLD_RULES"]

_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVTS: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d,
                                        nn.ConvTranspose3d)
_LINEARS: tuple[type[nn.Module], ...] = (nn.Linear,)


# modules that are the identity in eval mode (exact classes: a subclass may override forward).
# Between a layer and its BatchNorm they are transparent: the fold passes through them
# (``Conv → nn.Identity → BN``, ``Conv → Dropout → BN``, placeholders left by configurable
# model builders).
_PLACEHOLDERS: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout)


def _is_placeholder(region: Any, node: fx.Node | None) -> bool:
    """``node`` passes its one tensor argument through unchanged in eval mode: a call of an
    identity-in-eval module (not training, no hooks)."""
    if node is None or node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    if not isinstance(node.args[0], fx.Node):
        return False
    m = region.submodule(node.target)
    return type(m) in _PLACEHOLDERS and not m.training and hook_problem(m, "") is None


def _chain_problem(nodes: list[fx.Node], what: str) -> str | None:
    """Each node of the chain (layer → placeholders → BN, or BN → placeholders → layer) has
    exactly one value user: the next one."""
    for a, b in zip(nodes, nodes[1:]):
        users = value_users(a)
        if users != [b]:
            others = [u.name for u in users if u is not b]
            return f"{what if a is nodes[0] else a.name}'s output has other users " \
                   f"({', '.join(others) or 'graph output'})"
    return None


@dataclass
class FoldMatch:
    site: BNSite
    layer_name: str
    layer: nn.Module
    layer_node: fx.Node
    # identity-in-eval modules between the layer and the BN, in data-flow order
    via: list[fx.Node] = field(default_factory=list)
    # (W', b') when check had to compute it (the fp16/bf16 overflow test), valid while the
    # layer still holds the weight it was computed from (else rewrite computes it)
    result: tuple[Tensor, Tensor] | None = None
    result_of: Tensor | None = None


def _standard_layer_problem(m: nn.Module, bases: tuple[type[nn.Module], ...]) -> str | None:
    """Folding edits ``weight``/``bias``; that is only sound when forward uses them plainly."""
    cls = type(m)
    base = next(b for b in bases if isinstance(m, b))
    if cls.forward is not base.forward or getattr(cls, "_conv_forward", None) is not getattr(
        base, "_conv_forward", None
    ):
        return f"{cls.__name__} overrides forward; its weights may not be used as-is"
    if parametrize.is_parametrized(m):
        return f"{cls.__name__} has parametrized weights"
    problem = hook_problem(m, cls.__name__)
    if problem:
        return problem
    w = getattr(m, "weight", None)
    if not isinstance(w, Tensor) or isinstance(w, nn.parameter.UninitializedParameter):
        return f"{cls.__name__} has no initialized weight"
    if not w.is_floating_point():
        return f"{cls.__name__} weight dtype {w.dtype} is not floating point"
    return None


class _FoldRule(Rule):
    layers: ClassVar[tuple[type[nn.Module], ...]] = ()
    direction: ClassVar[str] = "producer"

    def match(self, ctx: Context, site: BNSite) -> FoldMatch | None:
        region, via = site.region, []
        if self.direction == "producer":
            node = site.input_node
            while _is_placeholder(region, node):
                via.insert(0, node)
                node = node.args[0]
        else:
            users = value_users(site.node)
            node = users[0] if len(users) == 1 else None
            while _is_placeholder(region, node):
                via.append(node)
                users = value_users(node)
                node = users[0] if len(users) == 1 else None
            if node is not None and (not node.args or node.args[0] is not (
                    via[-1] if via else site.node)):
                node = None
        if node is None or node.op != "call_module":
            return None
        layer = region.submodule(node.target)
        if not isinstance(layer, self.layers):
            return None
        return FoldMatch(site, region.qualname(node.target), layer, node, via)

    kind: ClassVar[str] = "conv"

    def check(self, ctx: Context, m: FoldMatch) -> str | None:
        """Fill the planner's facts from the fx graph and the module tree; the planner
        (:func:`normsurgeon.rules.plan.decide`) decides."""
        f = self.facts(ctx, m)
        problem = decide(f)
        m.result_of = m.layer.weight
        m.result = f.result
        return problem

    def facts(self, ctx: Context, m: FoldMatch) -> FoldFacts:
        site, layer = m.site, m.layer
        region = site.region
        what = f"{type(layer).__name__} {m.layer_name}"
        producer = self.direction == "producer"
        chain = [m.layer_node, *m.via, site.node] if producer else [site.node, *m.via,
                                                                     m.layer_node]
        # the tensor whose layout matters: the layer's output, or the BN's
        node = m.layer_node if producer else site.node

        top = site._max_abs_s
        if top is None:
            s, _ = site.scale_shift()
            top = float(s.abs().max()) if s.numel() else 0.0
        pad = False
        if not producer and self.kind == "conv" and layer.padding_mode == "zeros":
            p = layer.padding
            pad = (p == "same" and any(k > 1 for k in layer.kernel_size)) if isinstance(
                p, str) else any(x != 0 for x in p)
        return FoldFacts(
            direction=self.direction, kind=self.kind, what=what,
            layer_type=type(layer).__name__, bn_kind=site.kind,
            chain=lambda: _chain_problem(chain, what if producer else "BatchNorm"),
            keep_child=site.keep_child,
            layer=lambda: _standard_layer_problem(layer, self.layers),
            sharing=lambda: ctx.single_call_problem(layer, what),
            readers=lambda: ctx.other_readers_problem(site, [layer]),
            bn_sharing=lambda: _bn_sharing(ctx, site), bn_features=site.num_features,
            channels=self.channels(layer), weight_rank=layer.weight.dim(),
            ranks=lambda: region.ranks(node),
            rank_checked_by_bn=type(site.module) in (nn.BatchNorm2d, nn.BatchNorm3d),
            bn_1d=isinstance(site.module, nn.BatchNorm1d),
            shape=lambda: region.output_shape(node),
            reads_zero_padding=pad,
            shift=site.scale_shift()[1] if pad else None,
            path=lambda: path_problem(region, [m.layer_node] if producer else [site.node],
                                      site.node if producer else m.layer_node),
            risky=layer.weight.dtype in (torch.float16, torch.bfloat16) or top >= 1e30,
            folded=lambda: self.folded(m), weight_dtype=layer.weight.dtype)

    # -- hooks for subclasses --------------------------------------------------------------
    def channels(self, layer: nn.Module) -> int:
        raise NotImplementedError

    def folded(self, m: FoldMatch) -> tuple[Tensor, Tensor]:
        s, t = m.site.scale_shift()
        return Fn.fold_weights(self.kind, self.direction, m.layer.weight, m.layer.bias, s, t,
                               getattr(m.layer, "groups", 1))

    def rewrite(self, ctx: Context, m: FoldMatch) -> SiteRecord:
        layer = ctx.target_module(m.layer_name)
        fresh = m.result is not None and m.result_of is layer.weight
        if not fresh:  # the layer was already folded on its other side: start from that
            m.layer = layer
        w, b = m.result if fresh else self.folded(m)
        m.result = m.result_of = None
        return _commit_fold(ctx, m.site, [(layer, w, b)], m.layer_name,
                            f"{self.direction}, {self.name}")


class ConvBN(_FoldRule):
    """Conv{1,2,3}d → BN: ``W'[o] = W[o]·s[o]``, ``b' = s·b + t``."""

    name = "conv-bn"
    layers = _CONVS

    def channels(self, layer: nn.Module) -> int:
        return layer.out_channels


class ConvTransposeBN(_FoldRule):
    """ConvTranspose{1,2,3}d → BN, groups included."""

    name = "convtranspose-bn"
    layers = _CONVTS
    kind = "convtranspose"

    def channels(self, layer: nn.Module) -> int:
        return layer.out_channels


class LinearBN(_FoldRule):
    """Linear → BatchNorm1d, only on a proven 2-D (N, F) tensor."""

    name = "linear-bn"
    layers = _LINEARS
    kind = "linear"

    def channels(self, layer: nn.Module) -> int:
        return layer.out_features


class BNConv(_FoldRule):
    """BN → Conv, exact only when the conv never reads zero padding (or ``t == 0``)."""

    name = "bn-conv"
    layers = _CONVS
    direction = "consumer"

    def channels(self, layer: nn.Module) -> int:
        return layer.in_channels


class BNLinear(_FoldRule):
    """BN → Linear on a proven 2-D input."""

    name = "bn-linear"
    layers = _LINEARS
    direction = "consumer"
    kind = "linear"

    def channels(self, layer: nn.Module) -> int:
        return layer.in_features


class BNConvTranspose(_FoldRule):
    """BN → ConvTranspose is never exact: the shift's contribution varies in space. Refused
    (by the planner)."""

    name = "bn-convtranspose"
    layers = _CONVTS
    direction = "consumer"
    kind = "convtranspose"

    def channels(self, layer: nn.Module) -> int:
        return layer.in_channels


def _bn_sharing(ctx: Context, site: BNSite) -> str | None:
    """The BN module is applied at another site (shared parameters alone are fine: the BN is
    removed, its parameters are not changed)."""
    if site.module is None:
        return None
    problem = ctx.single_call_problem(site.module, "BatchNorm")
    return None if problem and "parameters are shared" in problem else problem


@dataclass
class CatFoldMatch:
    """BN after ``torch.cat([conv_1(x_1), …, conv_k(x_k)], dim=1)`` (MixConv, Inception)."""

    site: BNSite
    layer_names: list[str]
    layers: list[nn.Module]
    layer_nodes: list[fx.Node]
    cat_node: fx.Node

    @property
    def layer_name(self) -> str:
        return ", ".join(self.layer_names)


class CatConvBN(Rule):
    """cat(Conv_1, …, Conv_k; dim=1) → BN: conv i takes BN channels
    ``[c_i, c_i + Cout_i)`` of ``s`` and ``t``; then it is Conv → BN for each part."""

    name = "cat-conv-bn"
    direction = "producer"

    def match(self, ctx: Context, site: BNSite) -> CatFoldMatch | None:
        cat = site.input_node
        if cat is None or cat.op != "call_function" or cat.target is not torch.cat:
            return None
        parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if dim != 1 or not isinstance(parts, (list, tuple)) or len(parts) < 2:
            return None
        if not all(isinstance(n, fx.Node) and n.op == "call_module" for n in parts):
            return None
        layers = [site.region.submodule(n.target) for n in parts]
        if not all(type(m) in _CONVS for m in layers):
            return None
        return CatFoldMatch(site, [site.region.qualname(n.target) for n in parts], layers,
                            list(parts), cat)

    def check(self, ctx: Context, m: CatFoldMatch) -> str | None:
        """The planner's facts for each part (:func:`normsurgeon.rules.plan.decide_cat`)."""
        site, region = m.site, m.site.region
        s, t = site.scale_shift()
        parts, start = [], 0
        for i, (layer, node, name) in enumerate(zip(m.layers, m.layer_nodes, m.layer_names)):
            what = f"{type(layer).__name__} {name}"
            end = start + layer.out_channels
            first = i == 0
            parts.append(FoldFacts(
                direction="producer", kind="conv", what=what, layer_type=type(layer).__name__,
                chain=(lambda node=node, what=what: f"{what}'s output has other users"
                       if value_users(node) != [m.cat_node] else None),
                layer=lambda layer=layer: _standard_layer_problem(layer, _CONVS),
                sharing=lambda layer=layer, what=what: ctx.single_call_problem(layer, what),
                readers=(lambda: ctx.other_readers_problem(site, m.layers)) if first else None,
                bn_sharing=(lambda: _bn_sharing(ctx, site)) if first else None,
                path=(lambda: path_problem(region, m.layer_nodes, site.node)) if first
                else None,
                bn_features=end - start, channels=layer.out_channels,
                weight_rank=layer.weight.dim(), ranks=lambda node=node: region.ranks(node),
                rank_checked_by_bn=type(site.module) in (nn.BatchNorm2d, nn.BatchNorm3d),
                bn_1d=isinstance(site.module, nn.BatchNorm1d),
                risky=layer.weight.dtype in (torch.float16, torch.bfloat16),
                folded=lambda layer=layer, a=start, b=end: Fn.fold_weights(
                    "conv", "producer", layer.weight, layer.bias, s[a:b], t[a:b]),
                weight_dtype=layer.weight.dtype))
            start = end
        return decide_cat(lambda: "cat output has other users"
                          if value_users(m.cat_node) != [site.node] else None,
                          parts, site.num_features)

    def _folded(self, m: CatFoldMatch, layers: list[nn.Module] | None = None
                ) -> list[tuple[Tensor, Tensor]]:
        s, t = m.site.scale_shift()
        out, start = [], 0
        for layer in layers or m.layers:
            end = start + layer.out_channels
            out.append(Fn.fold_weights("conv", "producer", layer.weight, layer.bias,
                                       s[start:end], t[start:end]))
            start = end
        return out

    def rewrite(self, ctx: Context, m: CatFoldMatch) -> SiteRecord:
        layers = [ctx.target_module(n) for n in m.layer_names]
        parts = [(layer, w, b) for layer, (w, b) in zip(layers, self._folded(m, layers))]
        return _commit_fold(ctx, m.site, parts, m.layer_name, f"producer, {self.name}")


FOLD_RULES: tuple[Rule, ...] = (ConvBN(), ConvTransposeBN(), LinearBN(), CatConvBN(), BNConv(),
                                BNLinear(), BNConvTranspose())


def _commit_fold(ctx: Context, site: BNSite, parts: list[tuple[nn.Module, Tensor, Tensor]],
                 target: str, detail: str) -> SiteRecord:
    """Give each layer its folded (W', b') as new Parameters, take the BN out, record it."""
    for layer, w, b in parts:
        grad = layer.weight.requires_grad
        layer.weight = nn.Parameter(w, requires_grad=grad)
        layer.bias = nn.Parameter(b, requires_grad=grad)
    _remove_bn(ctx, site)
    return SiteRecord(site.name, site.kind, Action.FOLDED, target=target, detail=detail,
                      trace=site.region.mode)


def _remove_bn(ctx: Context, site: BNSite) -> None:
    """Take the BatchNorm out: erase its node in a region that will be rebuilt, else swap the
    module for ``nn.Identity`` so the user's own forward keeps running unchanged."""
    if site.module is None:
        ctx.rebuild.add(site.region.name)
    elif site.keep_child is not None:  # norm+act: the activation stays where the BN was
        ctx.replace_module(site.name, ctx.target_module(f"{site.name}.{site.keep_child}"))
    elif not isinstance(ctx.target_module(site.name), nn.Identity):  # the copy may hold one
        ctx.replace_module(site.name, nn.Identity())
    ctx.options.setdefault("_removed_nodes", []).append(site)


def _describe(node: fx.Node | None, region_module: nn.Module) -> str:
    if node is None:
        return "input"
    if node.op == "call_module":
        return f"{type(region_module.get_submodule(node.target)).__name__} {node.target}"
    if node.op == "placeholder":
        return f"model input {node.name!r}"
    if node.op == "output":
        return "the graph output"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target}()"


class FoldTransform(Transform):
    """Fold inference BatchNorm into neighbouring Conv / ConvTranspose / Linear layers."""

    def copy_memo(self, ctx: Context, decisions: list[Decision]) -> dict[int, object]:
        """Folded layers get new weight and bias Parameters and folded BNs become Identity:
        let the copy share the old ones for a moment instead of copying them."""
        memo: dict[int, object] = {}
        for d in decisions:
            if d.rule is None:
                continue
            for layer in getattr(d.match, "layers", None) or [d.match.layer]:
                for p in (layer.weight, layer.bias):
                    if p is not None:
                        memo[id(p)] = p
            if d.site.module is not None and d.site.keep_child is None:
                memo[id(d.site.module)] = nn.Identity()
        return memo

    name = "fold"
    help = "fold eval BatchNorm into the neighbouring Conv/ConvTranspose/Linear (no BN left)"
    needs_eval = True
    rules = FOLD_RULES

    def plan(self, ctx: Context, site: BNSite) -> Decision:
        if site.module is None and site.region.mode != "symbolic":
            return Decision(site, reason="functional batch_norm in a region that could only be "
                            "traced with concrete shapes; its graph cannot be rewritten")
        problem = site.stats_problem()
        if problem:
            return Decision(site, reason=problem)
        if site.module is not None:
            problem = ctx.opaque_problem(site.module) or hook_problem(site.module, "BatchNorm")
            if problem:
                return Decision(site, reason=problem)
            s, t = site.scale_shift()

            def shape() -> tuple[int, ...] | None:  # only untrusted BNs ask (shape prop)
                if site.input_node is None or site.region.inputs is None:
                    return None
                found = site.region.output_shape(site.input_node)
                return tuple(found) if found else None

            verdict = bn_behaviour(site.module, s, t, shape)
            if verdict.problem:
                return Decision(site, reason=verdict.problem)
            site.keep_child = verdict.keep_child
        def candidates() -> Iterator[tuple[str, tuple[Rule, Any], Callable[[], str | None]]]:
            for rule in self.rules:  # producer rules first
                m = rule.match(ctx, site)
                if m is not None:
                    yield rule.direction, (rule, m), lambda rule=rule, m=m: rule.check(ctx, m)

        def no_consumer() -> str:
            users = value_users(site.node)
            if len(users) == 1:
                return f"consumer is {_describe(users[0], site.region.module)}, not a Conv/Linear"
            return f"output has {len(users)} users"

        chosen, reason = first_exact(
            candidates(), lambda: (f"producer is {_describe(site.input_node, site.region.module)}"
                                   ", not a Conv/ConvTranspose/Linear"), no_consumer)
        if chosen is not None:
            return Decision(site, chosen[0], chosen[1], action=Action.FOLDED)
        return Decision(site, reason=reason)
