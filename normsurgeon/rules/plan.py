"""The fold planner: whether one BatchNorm fold is exact, decided from *facts*.

A graph front end (``nn.Module`` graphs traced by fx in :mod:`normsurgeon.rules.fold`,
``torch.export`` programs in :mod:`normsurgeon.frontends.exported`) finds a candidate (a BN and
its neighbouring Conv / ConvTranspose / Linear), answers questions about its own graph (who else
reads this tensor? is this weight read elsewhere? which ranks can this tensor have?) and
records the answers in :class:`FoldFacts`. :func:`decide` holds every rule of *when a fold is
exact* (docs/folding.md) and knows no graph library, so a soundness fix lands here once and
holds for every front end; the math is :func:`normsurgeon.foldmath.fold_weights`.

A fact is a value, or a zero-argument callable computing it (costly answers are only asked
for when the earlier rules have passed). Tensors here are torch tensors or numpy arrays
(:mod:`normsurgeon.arrays`): the module imports no graph library and not torch, so the ONNX
front end uses it without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..arrays import all_finite

Tensor = Any  # a torch.Tensor or a numpy array (:mod:`normsurgeon.arrays`): no torch import

__all__ = ["FoldFacts", "FoldPlan", "decide", "decide_cat", "first_exact", "batched_problem",
           "two_dim_problem", "chain_problem"]

Lazy = Any  # str | None, or a callable returning one


def _get(x: Lazy) -> Any:
    return x() if callable(x) else x


T = TypeVar("T")


@dataclass
class FoldPlan:
    """One candidate fold found by a graph front end (its nodes are the front end's own: fx
    nodes, ONNX node indices)."""

    site: Any  # the BatchNorm
    layer: Any  # the Conv / ConvTranspose / Linear (the first conv of a cat)
    direction: str  # "producer" or "consumer"
    via: list[Any] = field(default_factory=list)  # transparent nodes between, in data order
    parts: list[Any] = field(default_factory=list)  # cat(conv, ...) → BN: every conv
    cat: Any = None  # the concatenation


def first_exact(candidates: Iterable[tuple[str, T, Callable[[], str | None]]],
                no_producer: Callable[[], str], no_consumer: Callable[[], str]
                ) -> tuple[T | None, str]:
    """The first candidate ``(direction, candidate, check)`` whose check finds no problem; the
    front ends list producers first, so when a BN could fold either way, folding into the
    producer wins. Else ``(None, reason)``: each direction's first problem, or, for a direction
    with no candidate, what its neighbour is (``no_producer()`` / ``no_consumer()``)."""
    reasons: dict[str, str] = {}
    for direction, candidate, check in candidates:
        why = check()
        if why is None:
            return candidate, ""
        reasons.setdefault(direction, why)
    if "producer" not in reasons:
        reasons["producer"] = no_producer()
    if "consumer" not in reasons:
        reasons["consumer"] = no_consumer()
    return None, "; ".join(f"{k}: {v}" for k, v in reasons.items())


@dataclass
class FoldFacts:
    """What a front end proved about one candidate fold."""

    direction: str  # "producer" (layer → BN) or "consumer" (BN → layer)
    kind: str  # "conv", "convtranspose" or "linear"
    what: str  # the layer, for messages: "Conv2d layer1.0.conv1"
    layer_type: str  # "Conv2d", ...
    chain: Lazy = None  # a tensor between them has another reader or is a graph output
    keep_child: str | None = None  # the BN applies an activation after normalizing
    bn_kind: str = "BatchNorm"  # for messages
    layer: Lazy = None  # the layer does not plainly compute its op (overrides, hooks...)
    sharing: Lazy = None  # the layer or its weight is used at another site
    readers: Lazy = None  # something else reads what the fold changes
    bn_sharing: Lazy = None  # the BN is applied at another site
    bn_features: int = -1
    channels: int = -1  # the layer's output (producer) or input (consumer) channels
    weight_rank: int = 0  # conv: 2 + spatial dims; linear: 2
    ranks: Lazy = None  # frozenset of the ranks the normalized tensor can have, None: unknown
    rank_checked_by_bn: bool = False  # BatchNorm2d/3d reject any other rank themselves
    bn_1d: bool = False
    shape: Lazy = None  # the tensor's shape in the example, for messages
    reads_zero_padding: bool = False  # consumer conv: zero padding the BN's shift would miss
    shift: Tensor | None = None  # t of the BN (float64)
    path: Lazy = None  # a traced edge that may not hold for every input
    risky: bool = False  # fp16/bf16, or a scale ≥ 1e30: the folded weights may overflow
    folded: Callable[[], tuple[Tensor, Tensor]] | None = None
    weight_dtype: Any = None  # for messages
    result: tuple[Tensor, Tensor] | None = None  # (W', b') when the overflow test computed it


def chain_problem(links: list[tuple[str, list[str]]]) -> str | None:
    """``links``: for each tensor of the chain from the first node to the last but one, its
    name and the names of the readers other than the next node (``"graph output"`` included).
    """
    for name, others in links:
        if others:
            return f"{name}'s output has other users ({', '.join(others)})"
    return None


def batched_problem(ranks: frozenset[int] | None, want: int, rank_checked_by_bn: bool,
                    bn_1d: bool, layer_type: str) -> str | None:
    """Conv ↔ BN folds need the batched layout (N, C, ...): on an unbatched (C, ...) tensor
    the BN's channel axis is the conv's first spatial axis. BatchNorm2d/3d reject such inputs
    themselves; BatchNorm1d accepts (C, L) when L happens to equal C, and look-alikes check
    nothing, so the rank must be proven."""
    if rank_checked_by_bn:
        return None
    if ranks is not None and ranks == {want}:
        return None
    if ranks is not None and want not in ranks:
        return (f"the tensor between {layer_type} and BatchNorm is unbatched "
                f"(rank {min(ranks)}, not {want}): BatchNorm's channel axis would be the "
                "conv's spatial axis")
    if ranks is not None and len(ranks) > 1 and bn_1d:
        return ("cannot prove the tensor between Conv1d and BatchNorm1d is batched (N, C, L); "
                "on an unbatched (C, L) tensor BatchNorm1d normalizes L; pass example_inputs")
    return None


def two_dim_problem(ranks: frozenset[int] | None, shape: Any, what: str) -> str | None:
    """Linear ↔ BatchNorm1d: only on a proven 2-D (N, F) tensor is BN's channel axis the
    Linear's feature axis."""
    if ranks is None or len(ranks) != 1:
        return (f"cannot prove the {what} tensor is 2-D (N, F), the only layout where the "
                "BatchNorm channel axis is the Linear feature axis; pass example_inputs")
    if ranks != {2}:
        return (f"{what} tensor has {f'shape {tuple(shape)}' if shape else f'rank {min(ranks)}'}"
                ": BatchNorm normalizes axis 1, the Linear acts on the last axis; folding "
                "would be wrong")
    return None


def decide(f: FoldFacts) -> str | None:
    """``None`` when the fold is exact, else the reason it is not (docs/folding.md)."""
    if f.direction == "consumer" and f.kind == "convtranspose":
        return ("BatchNorm before a ConvTranspose cannot fold: the shift's contribution to "
                "the output varies in space")
    problem = _get(f.chain)
    if problem:
        return problem if f.direction == "producer" else "BatchNorm output has several users"
    if f.direction == "consumer" and f.keep_child is not None:
        return (f"{f.bn_kind} applies its activation ({f.keep_child}) after the "
                "normalization; only its producer can take the affine part")
    problem = _get(f.layer) or _get(f.sharing) or _get(f.readers) or _get(f.bn_sharing)
    if problem:
        return problem
    if f.bn_features != f.channels:
        return (f"BatchNorm has {f.bn_features} features but {f.what} has {f.channels} "
                f"{'output' if f.direction == 'producer' else 'input'} channels")
    if f.kind == "linear":
        ranks = _get(f.ranks)
        problem = two_dim_problem(ranks, _get(f.shape) if ranks and ranks != {2} else None,
                                  "Linear output" if f.direction == "producer"
                                  else "BatchNorm output")
    else:  # the rank is only asked for when the BN does not check it itself (it may cost a
        # shape-propagation forward)
        problem = None if f.rank_checked_by_bn else batched_problem(
            _get(f.ranks), f.weight_rank, False, f.bn_1d, f.layer_type)
        if (problem is None and f.direction == "consumer" and f.reads_zero_padding
                and f.shift is not None and bool((f.shift != 0).any())):
            problem = ("conv uses zero padding: the padded zeros would not be shifted by the "
                       "BatchNorm, so folding would change the borders")
    if problem:
        return problem
    problem = _get(f.path)
    if problem:
        return problem
    # overflow is a real risk in fp16/bf16 (max 65504 / 3.4e38 with 8 mantissa bits); in
    # fp32/fp64 a finite weight times a scale below 1e30 cannot reach inf
    if f.risky and f.folded is not None:
        f.result = w, b = f.folded()
        if not all_finite(w, b):
            return f"folded weights would overflow {f.weight_dtype}"
    return None


def decide_cat(cat_chain: Lazy, parts: list[FoldFacts], bn_features: int) -> str | None:
    """``cat(Conv_1, …, Conv_k; dim=1) → BN`` (MixConv, Inception): conv i takes BN channels
    ``[c_i, c_i + Cout_i)``, then each part is a Conv → BN fold. ``parts`` hold one producer
    fact set per conv (``readers``, ``bn_sharing`` and ``path`` on the first, for all);
    ``cat_chain``: the concatenation has another reader."""
    problem = _get(cat_chain)
    if problem:
        return problem
    for f in parts:
        problem = _get(f.chain) or _get(f.layer) or _get(f.sharing)
        if problem:
            return problem
    first = parts[0]
    problem = _get(first.readers) or _get(first.bn_sharing) or _get(first.path)
    if problem:
        return problem
    for f in parts:
        if not f.rank_checked_by_bn:
            problem = batched_problem(_get(f.ranks), f.weight_rank, False, f.bn_1d,
                                      f.layer_type)
            if problem:
                return problem
    total = sum(f.channels for f in parts)
    if total != bn_features:
        return f"BatchNorm has {bn_features} features, the concatenation {total}"
    for f in parts:
        if f.risky and f.folded is not None:
            f.result = w, b = f.folded()
            if not all_finite(w, b):
                return f"folded weights would overflow {f.weight_dtype}"
    return None
