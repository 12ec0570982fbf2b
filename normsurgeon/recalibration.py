"""Re-estimate the running statistics of every normalization layer on data (docs/recalibrate.md).

Not a graph rewrite: a data pass over layers the module tree names. Per layer and channel, each
batch contributes ``(n, mean, M2)`` computed in float64 by two passes; batches (and, under a
process group, ranks) merge by Chan et al.'s parallel formula
(:func:`normsurgeon.functional.merge_moments`). At the end ``running_mean`` is the pooled mean
and ``running_var`` the pooled unbiased variance ``M2 / (n − 1)``, as BatchNorm stores it.

* Default mode, one pass: while collecting, each normalization layer normalizes with the
  current batch's statistics, as in training (the regime of ``update_bn``); everything else
  stays in eval mode, Dropout off. The first layer's statistics then depend on neither batch
  size nor order.
* ``exact=True``: the fixed point where every layer's statistics are those of its input over
  the whole data when every upstream layer already uses its new statistics in eval mode. One
  pass per level of normalization depth (levels from the traced graph; one layer per pass
  when the model cannot be traced).
"""

from __future__ import annotations

import fnmatch
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._copy import deepcopy_module
from .functional import channel_moments, merge_moments
from .report import Action, ConversionReport, SiteRecord
from .tracing import is_batchnorm

__all__ = ["recalibrate", "recalibrate_with_report"]

log = logging.getLogger("normsurgeon")
Moments = tuple[int, Tensor, Tensor]


@dataclass
class _Layer:
    name: str
    module: nn.Module
    moments: Moments | None = None
    batches: int = 0


def _norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .layers._common import NormStatsMixin

    return [(q, m) for q, m in model.named_modules()
            if isinstance(m, NormStatsMixin) or is_batchnorm(m)]


def _skip_reason(m: nn.Module) -> str | None:
    from .layers._common import NormStatsMixin

    if not isinstance(m, (_BatchNorm, NormStatsMixin)):
        return (f"{type(m).__name__} is a frozen BatchNorm look-alike, not a torch BatchNorm: "
                "it never tracks statistics, so there are none to re-estimate")
    if getattr(m, "running_mean", None) is None or not getattr(m, "track_running_stats", True):
        return "track_running_stats=False: it always normalizes with batch statistics"
    return None


def _feed(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] | None
          ) -> Any:
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("an empty tuple/list batch")
        return model(batch[0])  # (x, y): the model gets x
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(f"a batch must be a tensor, a tuple/list (x, y, ...) or a dict, got "
                    f"{type(batch).__name__}; pass forward=lambda model, batch: ... otherwise")


def _progress(data: Any, num_batches: int | None, progress: bool | None, desc: str
              ) -> Iterable[Any]:
    total = num_batches
    if total is None:
        try:
            total = len(data)
        except TypeError:
            total = None
    show = progress if progress is not None else (sys.stderr.isatty() and total is not None)
    if not show:
        return data
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return data
    return tqdm(data, total=total, desc=desc, leave=False, file=sys.stderr)


def _level_order(model: nn.Module, layers: list[_Layer]) -> list[list[_Layer]] | None:
    """Layers grouped by normalization depth from the traced graph: level 0 has no norm layer
    upstream, level k only levels < k. ``None`` when the model cannot be traced."""
    from .tracing import NormTracer, thread_local_tracing

    by_module = {id(x.module): x for x in layers}
    try:
        with thread_local_tracing():
            graph = NormTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - one layer per pass instead
        log.info("recalibrate(exact=True): the model cannot be traced (%s); one layer per "
                 "pass", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    modules = dict(model.named_modules(remove_duplicate=False))
    depth: dict[Any, int] = {}  # node -> depth of the deepest norm layer it depends on (-1: none)
    level: dict[int, int] = {}
    for node in graph.nodes:
        ins = [depth[a] for a in node.all_input_nodes if a in depth]
        d = max(ins, default=-1)
        if node.op == "call_module":
            m = modules.get(node.target)
            if m is not None and id(m) in by_module:
                level[id(m)] = max(level.get(id(m), 0), d + 1)
                d += 1
        depth[node] = d
    if len(level) != len(layers):
        return None  # a layer not called in the traced graph: no proof of its level
    out: dict[int, list[_Layer]] = {}
    for x in layers:
        out.setdefault(level[id(x.module)], []).append(x)
    return [out[k] for k in sorted(out)]


def recalibrate(model: nn.Module, data: Iterable[Any], *, num_batches: int | None = None,
                forward: Callable[[nn.Module, Any], Any] | None = None, exact: bool = False,
                include: str | Sequence[str] | None = None,
                exclude: str | Sequence[str] | None = None, inplace: bool = False,
                progress: bool | None = None) -> nn.Module:
    """Re-estimate the running statistics of every normalization layer on ``data``.

    Args:
        model: the model; untouched unless ``inplace=True``.
        data: an iterable of batches (a DataLoader, a list, a generator). A batch is a tensor,
            a tuple/list ``(x, y, ...)`` (the model gets ``x``) or a dict (``model(**batch)``).
        num_batches: use at most this many batches.
        forward: ``forward(model, batch)`` feeds one batch (overrides the rules above).
        exact: the fixed point of docs/recalibrate.md (one pass per normalization depth;
            ``data`` must be iterable more than once).
        include: glob pattern(s) on layer names: recalibrate only those.
        exclude: glob pattern(s) on layer names: leave those.
        inplace: update ``model`` itself.
        progress: a tqdm bar (default: on a terminal, when the number of batches is known).

    Returns the recalibrated model; :func:`recalibrate_with_report` also returns the report.
    """
    return recalibrate_with_report(model, data, num_batches=num_batches, forward=forward,
                                   exact=exact, include=include, exclude=exclude,
                                   inplace=inplace, progress=progress)[0]


def recalibrate_with_report(model: nn.Module, data: Iterable[Any], *,
                            num_batches: int | None = None,
                            forward: Callable[[nn.Module, Any], Any] | None = None,
                            exact: bool = False, include: str | Sequence[str] | None = None,
                            exclude: str | Sequence[str] | None = None, inplace: bool = False,
                            progress: bool | None = None
                            ) -> tuple[nn.Module, ConversionReport]:
    """:func:`recalibrate`, and the report: one record per normalization layer (action
    ``recalibrated`` / ``skipped`` / ``excluded``, the reason, values seen per channel, and how
    far the statistics moved)."""
    from .api import _check_patterns, _patterns

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches <= 0):
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    if isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError("data must be an iterable of batches (a DataLoader, a list of tensors, "
                        f"a generator), got {type(data).__name__}")
    if exact and iter(data) is data:
        raise ValueError("exact=True makes one pass over the data per normalization depth: "
                         "pass data that can be iterated again (a list or a DataLoader), not "
                         "a generator or iterator")
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    t0 = time.perf_counter()
    work = model if inplace else deepcopy_module(model)
    names = _norm_layers(work)
    _check_patterns(inc, exc, [q for q, _ in names])
    report = ConversionReport(transform="recalibrate", regions={})
    records: dict[str, SiteRecord] = {}
    layers: list[_Layer] = []
    for q, m in names:
        kind = type(m).__name__
        if (inc is not None and not any(fnmatch.fnmatchcase(q, p) for p in inc)) or (
                exc is not None and any(fnmatch.fnmatchcase(q, p) for p in exc)):
            records[q] = SiteRecord(q, kind, Action.EXCLUDED,
                                    reason="excluded by include/exclude patterns")
            continue
        why = _skip_reason(m)
        if why:
            records[q] = SiteRecord(q, kind, Action.SKIPPED, reason=why)
            continue
        layers.append(_Layer(q, m))
    flags = [(m, m.training) for m in work.modules()]
    frozen = [(m, m.freeze_stats) for _, m in names if hasattr(m, "freeze_stats")]
    old = {x.name: (x.module.running_mean.detach().double().clone(),
                    x.module.running_var.detach().double().clone()) for x in layers}
    try:
        with torch.no_grad():
            if not exact:
                _collect(work, layers, data, num_batches, forward, progress, train=True,
                         desc="recalibrating")
                for x in layers:
                    _store(x)
            else:
                levels = _level_order(work, layers)
                groups = levels if levels is not None else [[x] for x in layers]
                for k, group in enumerate(groups):
                    _collect(work, group, data, num_batches, forward, progress, train=False,
                             desc=f"recalibrating level {k + 1}/{len(groups)}")
                    for x in group:
                        _store(x)
    finally:
        for m, flag in flags:
            m.training = flag
        for m, flag in frozen:
            m.freeze_stats = flag
    for x in layers:
        m = x.module
        if x.moments is None or x.moments[0] <= 1:
            seen = 0 if x.moments is None else x.moments[0]
            records[x.name] = SiteRecord(
                x.name, type(m).__name__, Action.SKIPPED,
                reason=f"saw {seen} value(s) per channel in the data: nothing to estimate "
                       "an unbiased variance from (statistics left as they were)"
                       if seen else "not called on the data")
            continue
        mean0, var0 = old[x.name]
        moved = float(((m.running_mean.double() - mean0).abs()
                       / (var0 + float(m.eps)).sqrt()).max())
        ratio = float(torch.maximum(m.running_var.double() / var0.clamp_min(1e-30),
                                    var0 / m.running_var.double().clamp_min(1e-30)).max())
        records[x.name] = SiteRecord(
            x.name, type(m).__name__, Action.RECALIBRATED,
            detail=f"{x.moments[0]} values per channel; mean moved {moved:.3g} std; "
                   f"variance changed up to {ratio:.3g}x",
            samples=x.moments[0], moved=moved)
    report.sites = [records[q] for q, _ in names]
    report.seconds = time.perf_counter() - t0
    log.info("%s", report.summary())
    return work, report


def _collect(model: nn.Module, layers: list[_Layer], data: Iterable[Any],
             num_batches: int | None, forward: Callable[[nn.Module, Any], Any] | None,
             progress: bool | None, *, train: bool, desc: str) -> None:
    """One pass over ``data`` collecting each layer's input moments (everything else in eval
    mode; ``train``: the layers themselves normalize with batch statistics)."""
    from .layers.rbn import RepresentativeBatchNorm2d

    for m in model.modules():
        m.training = False
    handles = []
    momenta: list[tuple[nn.Module, Any]] = []
    for x in layers:
        x.moments, x.batches = None, 0
        if train:
            x.module.training = True
            if hasattr(x.module, "freeze_stats"):
                x.module.freeze_stats = False
        if train and _reads_own_stats(x.module):
            # the layer computes this batch's statistics anyway: with momentum 1 its running
            # buffers hold exactly them (mean, unbiased variance) after its forward, so no
            # second pass over the activation is needed (update_bn's cost, not 1.3x of it)
            momenta.append((x.module, x.module.momentum))
            x.module.momentum = 1.0

            def after(mod: nn.Module, args: tuple[Any, ...], out: Any, x: _Layer = x) -> None:
                inp = args[0]
                c = mod.running_mean.numel()
                n = inp.numel() // c if c else 0
                if n <= 1:
                    return
                moments = (n, mod.running_mean.detach().double().clone(),
                           mod.running_var.detach().double() * (n - 1))
                x.moments = moments if x.moments is None else merge_moments(x.moments, moments)
                x.batches += 1

            handles.append(x.module.register_forward_hook(after))
            continue

        def hook(mod: nn.Module, args: tuple[Any, ...], x: _Layer = x) -> None:
            inp = args[0]
            if isinstance(mod, RepresentativeBatchNorm2d):  # its statistics track x_c
                m_inst = inp.mean((2, 3), keepdim=True)
                inp = inp + mod.centering_weight.reshape(1, -1, 1, 1) * m_inst
            moments = channel_moments(inp)
            x.moments = moments if x.moments is None else merge_moments(x.moments, moments)
            x.batches += 1

        handles.append(x.module.register_forward_pre_hook(hook))
    seen = 0
    try:
        for i, batch in enumerate(_progress(data, num_batches, progress, desc)):
            if num_batches is not None and i >= num_batches:
                break
            try:
                _feed(model, batch, forward)
            except (TypeError, ValueError) as e:
                if "a batch must be" in str(e):
                    raise
                raise ValueError(f"batch {i}: the model rejects it: {_first(e)}") from e
            except Exception as e:
                raise ValueError(f"batch {i}: the model rejects it: {_first(e)}") from e
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for m, momentum in momenta:
            m.momentum = momentum
    if seen == 0:
        raise ValueError("the data yielded no batch: pass a non-empty iterable of batches")
    _all_reduce(layers)


def _reads_own_stats(m: nn.Module) -> bool:
    """A layer whose training forward leaves this batch's own (local) statistics in its
    running buffers when its momentum is 1: torch's BatchNorm classes (not SyncBatchNorm,
    whose statistics may already be global), and normsurgeon's layers when not synced."""
    from .layers._common import NormStatsMixin

    if isinstance(m, NormStatsMixin):
        return not m.sync
    return type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _first(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}"


def _all_reduce(layers: list[_Layer]) -> None:
    """Under an initialised process group, merge each layer's (n, mean, M2) over the ranks
    (all-gather, then Chan's formula in rank order): every rank ends with the global moments."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    for x in layers:
        c = int(x.module.num_features)
        if x.moments is None:
            z = torch.zeros(c, dtype=torch.float64)
            x.moments = (0, z, z.clone())
        n, mean, m2 = x.moments
        device = mean.device if dist.get_backend() != "gloo" else torch.device("cpu")
        mine = torch.cat([torch.tensor([float(n)], dtype=torch.float64), mean.cpu(),
                          m2.cpu()]).to(device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        merged: Moments = (0, mean.new_zeros(c), mean.new_zeros(c))
        for p in parts:
            p = p.to(mean.device)
            merged = merge_moments(merged, (int(p[0].item()), p[1:1 + c], p[1 + c:]))
        x.moments = merged


def _store(x: _Layer) -> None:
    """running_mean = pooled mean, running_var = pooled unbiased variance (buffer dtypes)."""
    if x.moments is None or x.moments[0] <= 1:
        return
    n, mean, m2 = x.moments
    m = x.module
    m.running_mean.copy_(mean.to(m.running_mean.dtype))
    m.running_var.copy_((m2 / (n - 1)).to(m.running_var.dtype))
    if getattr(m, "num_batches_tracked", None) is not None:
        m.num_batches_tracked.fill_(x.batches)
