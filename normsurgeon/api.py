"""``convert``: choose the transform, trace, plan, (refuse or) apply, report."""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ._args import as_inputs
from ._args import check_patterns as _check_patterns
from ._args import patterns as _patterns
from ._copy import deepcopy_module
from .errors import (
    ConversionMismatchError,
    ModelInTrainingModeError,
    NormSurgeonError,
    StrictModeError,
)
from .functional import float64_workspace
from .report import Action, ConversionReport, ConversionResult, SiteRecord
from .rules import get_transform
from .rules.base import Context, Decision, prime_scale_shift
from .tracing import (
    CONVERSION_LOCK,
    eval_mode,
    is_batchnorm,
    record_inputs,
    set_submodule,
    trace_regions,
)
from .verdict import compare_outputs, judge

__all__ = ["convert", "convert_with_report", "inspect", "ConversionResult"]

log = logging.getLogger("normsurgeon")


def convert(
    model: nn.Module,
    to: str = "fold",
    *,
    example_inputs: Any = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    inplace: bool = False,
    strict: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    check: bool = True,
    **options: Any,
) -> nn.Module:
    """Convert the BatchNorm layers of ``model`` and return the converted module.

    Args:
        model: the trained model. Left untouched unless ``inplace=True``.
        to: a registered transform (:func:`normsurgeon.available_transforms`): ``"fold"``
            removes eval BatchNorm by folding it into neighbouring layers.
        example_inputs: a tensor or tuple of positional inputs. Optional, but it lets
            normsurgeon trace models that ``torch.fx`` cannot (concrete tracing), prove 2-D
            layouts for Linear ↔ BatchNorm1d folds, and measure the output difference.
        include: glob pattern(s) on BatchNorm qualified names (``"layer1.*"``): convert only
            the sites that match.
        exclude: glob pattern(s): leave the sites that match (reported as ``excluded``).
        inplace: modify ``model`` itself instead of a deep copy.
        strict: raise :class:`StrictModeError` listing every site that would be left alone,
            before anything is changed.
        leaf_modules: extra module types never traced into.
        check: with ``example_inputs``, compare the converted model with the original and
            raise :class:`ConversionMismatchError` beyond the bar (docs/bars.md); ``False``
            only records the measured error in the report.
        **options: transform-specific options (e.g. ``cond_dim`` for ``to="cbn"``).

    The report is available through :func:`convert_with_report` or :func:`inspect`.
    """
    return convert_with_report(
        model, to, example_inputs=example_inputs, include=include, exclude=exclude,
        inplace=inplace, strict=strict, leaf_modules=leaf_modules, check=check, **options,
    ).model


def inspect(
    model: nn.Module,
    to: str = "fold",
    *,
    example_inputs: Any = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    **options: Any,
) -> ConversionReport:
    """Dry run: the report of what :func:`convert` would do. ``model`` is not modified."""
    return _run(model, to, example_inputs, include, exclude, inplace=True, strict=False,
                leaf_modules=leaf_modules, options=options, dry_run=True).report


def convert_with_report(
    model: nn.Module,
    to: str = "fold",
    *,
    example_inputs: Any = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    inplace: bool = False,
    strict: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    check: bool = True,
    **options: Any,
) -> ConversionResult:
    """Like :func:`convert`, and also return the :class:`ConversionReport`
    (``model, report = convert_with_report(...)``)."""
    return _run(model, to, example_inputs, include, exclude, inplace=inplace, strict=strict,
                leaf_modules=leaf_modules, options=options, dry_run=False, check=check)


def _with_bn_below(model: nn.Module) -> set[int]:
    """ids of modules that have a BatchNorm strictly below them."""
    out: set[int] = set()

    def walk(m: nn.Module) -> bool:
        found = False
        for c in m.children():
            below = walk(c)
            found = found or below or is_batchnorm(c)
        if found:
            out.add(id(m))
        return found

    walk(model)
    return out


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the duration of one conversion.

    Tracing and copying allocate tens of thousands of short-lived objects while the model keeps
    hundreds of thousands alive, so the collector runs full generation-2 passes mid-conversion:
    measured 31 ms of a 240 ms ResNet-101 conversion. Nothing here depends on collection; the
    collector resumes (if it was on) when the conversion ends, and the garbage goes then.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(model: nn.Module, to: str, example_inputs: Any, include: Any, exclude: Any, *,
         inplace: bool, strict: bool, leaf_modules: Sequence[type[nn.Module]],
         options: dict[str, Any], dry_run: bool, check: bool = False) -> ConversionResult:
    """One conversion with the cyclic GC paused, torch's intra-op pool at one thread and one
    reused float64 work buffer (``functional.float64_workspace``: no page faults per block).

    A conversion's own tensor work is thousands of small float64 operations; each pays the
    intra-op pool's hand-off, which is cheap on idle cores and ruinous on busy ones (ResNet-50
    on 2 busy cores: 2.6 s with 2 threads, 0.11 s with 1). Only the large blocks of the fold
    products may use the caller's thread count, while measurement shows that it pays
    (``functional._Threads``: ~25% faster math on idle cores; back to one thread after a
    stalled block or two that gained nothing). The model's own forwards (example-input
    recording, the self-check) run with the caller's thread count; the caller's setting is
    restored afterwards."""
    caller = torch.get_num_threads()
    # torch's thread setting is process-wide for threads started later: a process with other
    # threads keeps its setting untouched (a thread one of them starts mid-conversion must not
    # inherit one intra-op thread for life)
    alone = threading.active_count() == 1
    with CONVERSION_LOCK, torch.inference_mode(False), _gc_paused(), \
            _num_threads(1 if alone else caller), float64_workspace(
                threads=caller if alone else 1):
        return _convert(model, to, example_inputs, include, exclude, inplace=inplace,
                        strict=strict, leaf_modules=leaf_modules, options=options,
                        dry_run=dry_run, check=check, threads=caller)


def _convert(model: nn.Module, to: str, example_inputs: Any, include: Any, exclude: Any, *,
             inplace: bool, strict: bool, leaf_modules: Sequence[type[nn.Module]],
             options: dict[str, Any], dry_run: bool, check: bool,
             threads: int = 1) -> ConversionResult:
    if isinstance(model, torch.export.ExportedProgram):
        return _convert_program(model, to, example_inputs, include, exclude, inplace=inplace,
                                strict=strict, leaf_modules=leaf_modules, options=options,
                                dry_run=dry_run, check=check)
    from .frontends.onnx_file import is_onnx

    if is_onnx(model):
        return _convert_onnx_model(model, to, example_inputs, include, exclude, inplace=inplace,
                                   strict=strict, leaf_modules=leaf_modules, options=options,
                                   dry_run=dry_run, check=check)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, a torch.export.ExportedProgram, an "
                        f"onnx.ModelProto or a .onnx path, got {type(model).__name__}")
    from .frontends.exported import is_exported_graph_module

    n_aten = is_exported_graph_module(model)
    if n_aten:
        raise TypeError(
            f"this GraphModule holds {n_aten} ATen batch-norm op(s): it comes from "
            "torch.export (ExportedProgram.module()), whose BatchNorms are folded in the "
            "program itself: pass the ExportedProgram (ns.convert(ep)) instead")
    transform = get_transform(to)(**options)
    _validate_model(model, transform)
    transform.validate_model(model)
    leaf_modules = _leaf_types(leaf_modules)
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    inputs = None if example_inputs is None else as_inputs(example_inputs, "example_inputs")
    if transform.needs_eval and model.training:
        raise ModelInTrainingModeError(
            f"to={to!r} needs inference semantics but the model is in training mode; "
            "call model.eval() first")
    t0 = time.perf_counter()
    # analysis reads the user's model and never changes it (tracing undoes fx's constant
    # attributes, the example run happens in eval mode with every flag restored)
    work = model

    # 1. analyse ---------------------------------------------------------------------------
    holders = _with_bn_below(work) | {id(work)}  # the root may hold functional batch_norm
    recorded: dict[int, tuple[Any, ...]] = {}
    ref_out = None
    if inputs is not None:
        wanted = [m for m in work.modules() if id(m) in holders]
        before = _state_signature(work)
        with _num_threads(threads):  # the model's own forward: the caller's threads
            try:
                recorded, ref_out = record_inputs(work, inputs, wanted)
            except Exception as e:
                raise _rejected_inputs(e, inputs) from e
        changed = _state_changes(before, _state_signature(work))
        if changed:
            raise NormSurgeonError(
                f"the model's forward changed its own parameters or buffers ({changed}) on the "
                "example inputs (in eval mode, without gradients); normsurgeon cannot analyse a "
                "model whose forward edits itself")
    if transform.trace == "none":
        regions, status = [], {}
    else:
        needs = (lambda m: id(m) in holders) if transform.trace == "all" else (
            lambda m: m is work)
        regions, status = trace_regions(work, needs=needs, inputs=recorded,
                                        leaf_types=leaf_modules)
    ctx = Context(work, regions, status, options=dict(options))

    # 2. plan -------------------------------------------------------------------------------
    decisions: list[Decision] = []
    records: dict[str, SiteRecord] = {}
    reached: set[int] = set()
    all_sites = list(ctx.module_sites() if transform.module_level else ctx.sites())
    if transform.needs_eval:
        prime_scale_shift(all_sites)  # (s, t) of every BN in one batched float64 pass
    for site in all_sites:
        trace_mode = site.region.mode if site.region is not None else "module"
        if site.module is not None:
            reached.add(id(site.module))
        if (inc is not None and not any(fnmatch.fnmatchcase(site.name, p) for p in inc)) or (
                exc is not None and any(fnmatch.fnmatchcase(site.name, p) for p in exc)):
            records[site.name] = SiteRecord(site.name, site.kind, Action.EXCLUDED,
                                            reason="excluded by include/exclude patterns",
                                            trace=trace_mode)
            continue
        d = transform.plan(ctx, site)
        decisions.append(d)
        if d.rule is None:
            records[site.name] = SiteRecord(site.name, site.kind, Action.SKIPPED,
                                            reason=d.reason, trace=trace_mode)
    unreached = [(q, m) for q, m in ctx.walk if id(m) not in reached and is_batchnorm(m)]
    _check_patterns(inc, exc, [s.name for s in all_sites] + [q for q, _ in unreached])
    for qual, m in unreached:
        records[qual] = SiteRecord(qual, type(m).__name__, Action.SKIPPED,
                                   reason=ctx.opaque_problem(m)
                                   or _unreached_reason(qual, status), trace="none")
    if strict:
        bad = {r.name: r.reason for r in records.values() if r.action == Action.SKIPPED}
        if bad:
            raise StrictModeError(bad)

    # 3. apply (to a copy unless inplace) -------------------------------------------------
    report = ConversionReport(transform=to, regions=dict(status), dry_run=dry_run)
    if not dry_run and not inplace:
        memo = transform.copy_memo(ctx, decisions)
        work = deepcopy_module(model, memo)
    ctx.target = work
    for d in decisions:
        if d.rule is None:
            continue
        if dry_run:
            if hasattr(d.rule, "preview"):
                target, detail = d.rule.preview(d.match)
            else:
                target = getattr(d.match, "layer_name", "")
                detail = f"{getattr(d.rule, 'direction', '')}, {d.rule.name}".strip(", ")
            records[d.site.name] = SiteRecord(
                d.site.name, d.site.kind, d.action, target=target, detail=detail,
                trace=d.site.region.mode if d.site.region is not None else "module")
            continue
        try:
            records[d.site.name] = transform.apply(ctx, d)
        except NormSurgeonError:
            raise
        except Exception as e:
            raise NormSurgeonError(f"rule {d.rule.name!r} failed on {d.site.name}: {e}") from e
    order = {name: i for i, (name, _) in enumerate(work.named_modules())}
    report.sites = sorted(records.values(), key=lambda r: (order.get(r.name, len(order)), r.name))
    if dry_run:
        report.seconds = time.perf_counter() - t0
        return ConversionResult(model, report)

    work = _rebuild(work, ctx)
    work = transform.finalize(work, ctx, report)
    if not inplace:
        _check_no_sharing(model, work)
    report.seconds = time.perf_counter() - t0
    if inputs is not None and ref_out is not None:
        culprits = None
        if check and not inplace:
            def culprits() -> list[str]:  # noqa: E306 - only on the failure path
                return _bisect_sites(model, to, inputs, ref_out, report, inc, exc,
                                     leaf_modules, options)
        with _num_threads(threads):
            _self_check(model if not inplace else None, work, transform, inputs, ref_out,
                        report, check, culprits)
    log.info("%s", report.summary())
    return ConversionResult(work, report)


def _convert_program(ep: Any, to: str, example_inputs: Any, include: Any, exclude: Any, *,
                     inplace: bool, strict: bool, leaf_modules: Any, options: dict[str, Any],
                     dry_run: bool, check: bool) -> ConversionResult:
    """``convert`` of a ``torch.export.ExportedProgram`` (:mod:`normsurgeon.frontends.exported`)."""
    from .frontends.exported import convert_program, unsupported_options

    get_transform(to)  # an unknown name is the same error as for a module
    problem = unsupported_options(to, inplace and not dry_run, tuple(leaf_modules), options)
    if problem:
        raise TypeError(problem)
    new, report = convert_program(ep, example_inputs=example_inputs,
                                  include=_patterns(include, "include"),
                                  exclude=_patterns(exclude, "exclude"), strict=strict,
                                  check=check, dry_run=dry_run)
    return ConversionResult(new, report)


def _convert_onnx_model(model: Any, to: str, example_inputs: Any, include: Any, exclude: Any,
                        *, inplace: bool, strict: bool, leaf_modules: Any,
                        options: dict[str, Any], dry_run: bool, check: bool
                        ) -> ConversionResult:
    """``convert`` of an ONNX model (:func:`normsurgeon.frontends.onnx_file.convert_onnx_model`,
    which needs no torch)."""
    from .frontends.onnx_file import convert_onnx_model

    return convert_onnx_model(model, to, example_inputs, include, exclude, inplace=inplace,
                              strict=strict, leaf_modules=leaf_modules, options=options,
                              dry_run=dry_run, check=check)


def _validate_model(model: nn.Module, transform: Any) -> None:
    """Models normsurgeon must refuse before looking at them, each with what to do."""
    from torch.nn.modules.lazy import LazyModuleMixin

    for name, m in model.named_modules():
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(
                f"{name or '<model>'} ({type(m).__name__}) is an uninitialised lazy module: its "
                "weights do not exist yet, and a forward would create them at random. Run the "
                "model once on a real batch (model(x)) before converting it")
        if (isinstance(m, nn.parallel.DistributedDataParallel) and transform.name != "fold"):
            raise ValueError(
                f"{name or '<model>'} is DistributedDataParallel, which registers its parameters "
                f"when it is built and would not synchronise the ones to={transform.name!r} "
                "adds: convert model.module, then wrap the result in DistributedDataParallel")
    for name, t in _named_tensors(model):
        if t.is_meta:
            raise ValueError(
                f"{name} is on the meta device: it has a shape but no values, so nothing can be "
                "folded or copied. Materialise the model first (model.to_empty(device='cpu') "
                "and load_state_dict(...))")


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for mod_name, m in model.named_modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is not None:
                    yield (f"{mod_name}.{k}" if mod_name else k), t


def _leaf_types(leaf_modules: Any) -> tuple[type[nn.Module], ...]:
    """``leaf_modules``, validated up front: a sequence of nn.Module subclasses."""
    if isinstance(leaf_modules, type):
        leaf_modules = (leaf_modules,)
    if isinstance(leaf_modules, (str, bytes)) or not isinstance(leaf_modules, Iterable):
        raise TypeError(f"leaf_modules must be a sequence of nn.Module classes (e.g. "
                        f"[MyBlock]), got {leaf_modules!r}")
    out = tuple(leaf_modules)
    bad = [x for x in out if not (isinstance(x, type) and issubclass(x, nn.Module))]
    if bad:
        raise TypeError(f"leaf_modules must hold nn.Module classes (e.g. [MyBlock]), got "
                        f"{bad[0]!r}")
    return out


def _state_signature(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (id, version counter)}`` of every parameter and buffer: an in-place edit bumps
    the version, a replaced or new tensor changes the id or the names."""
    return {k: (id(t), t._version) for k, t in _named_tensors(model)}


def _state_changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str:
    names = sorted(set(before) ^ set(after)) + [k for k in before if k in after
                                                and before[k] != after[k]]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _rejected_inputs(e: Exception, inputs: tuple[Any, ...]) -> Exception:
    """The model's complaint about the example inputs, as a ValueError that says so (the
    model's own ConditionError / TypeError pass through)."""
    from .errors import ConditionError, one_line

    if isinstance(e, (ConditionError, NormSurgeonError)):
        return e
    shapes = ", ".join(f"{tuple(a.shape)} {str(a.dtype).replace('torch.', '')}"
                       if isinstance(a, torch.Tensor) else type(a).__name__ for a in inputs)
    return ValueError(f"the model rejects the example inputs ({shapes}): {one_line(e)}; pass "
                      "inputs shaped as the model expects")


def _bisect_sites(model: nn.Module, to: str, inputs: tuple[Any, ...], ref_out: Any,
                  report: ConversionReport, inc: Any, exc: Any,
                  leaf_modules: Sequence[type[nn.Module]], options: dict[str, Any]
                  ) -> list[str]:
    """The rewritten sites that alone take the result beyond the bar, found by converting
    halves of them (``include=``) and re-checking: at most 2·log2(n) conversions, run only
    after a mismatch. Empty when no half alone fails (the sites interact)."""
    done = [r.name for r in report.sites if r.action in (Action.FOLDED, Action.REPLACED)]
    bar = report.bar if report.bar is not None else 1e-5

    def bad(names: list[str]) -> bool:
        try:
            res = _run(model, to, inputs, names, exc, inplace=False, strict=False,
                       leaf_modules=leaf_modules, options=dict(options), dry_run=False,
                       check=False)
        except Exception:  # noqa: BLE001 - a subset that cannot even convert is suspect
            return True
        rel = res.report.max_rel_error
        return rel is None or not rel <= bar

    cand = done
    while len(cand) > 1:
        half = len(cand) // 2
        if bad(cand[:half]):
            cand = cand[:half]
        elif bad(cand[half:]):
            cand = cand[half:]
        else:
            return []
    return cand if cand and bad(cand) else []


def _self_check(original: nn.Module | None, work: nn.Module, transform: Any,
                inputs: tuple[Any, ...], ref_out: Any, report: ConversionReport,
                check: bool, culprits: Any = None) -> None:
    """Compare the converted model with the original's outputs on the example inputs and
    record ``report.max_rel_error`` and ``report.bar``; beyond the bar (or if the converted
    model raises) raise :class:`ConversionMismatchError` unless ``check`` is False.

    The bar (docs/bars.md): 1e-5 for folds, 1e-6 for CBN/RBN, 1e-2 when the model computes in
    fp16/bf16; or 4x the original's own fp32-vs-float64 error where that is larger (measured
    only when the fixed bar is exceeded: one float64 forward)."""
    try:
        with torch.no_grad(), eval_mode(work):
            rel = compare_outputs(transform.call(work, inputs), ref_out)
    except Exception as e:  # noqa: BLE001 - a converted model that raises is a mismatch
        first = str(e).splitlines()[0] if str(e) else ""
        msg = (f"the converted model raised {type(e).__name__}: {first} on the example inputs, "
               "where the original ran")
        if check:
            sites = culprits() if culprits is not None else []
            where = f" (site{'s' if len(sites) > 1 else ''}: {', '.join(sites)})" if sites else ""
            raise ConversionMismatchError(msg + where + "; please report this", report=report,
                                          sites=sites) from e
        log.warning("%s", msg)
        return
    dtypes = {p.dtype for p in work.parameters() if p.is_floating_point()}
    judge(rel, ref_out, report, check=check, half=bool(dtypes & {torch.float16, torch.bfloat16}),
          bar=1e-5 if transform.name == "fold" else 1e-6,
          noise=(lambda: _fp64_noise(original, inputs, ref_out)) if original is not None
          else None, what="the converted model", culprits=culprits)


def _fp64_noise(model: nn.Module, inputs: tuple[Any, ...], ref_out: Any) -> float:
    """rel of the original fp32 model against its float64 twin on ``inputs`` (0 if the model
    cannot run in float64)."""
    try:
        twin = deepcopy_module(model).double()
        args = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                     for x in inputs)
        with torch.no_grad(), eval_mode(twin):
            return compare_outputs(ref_out, twin(*args))
    except Exception as e:  # noqa: BLE001 - the fixed bar then applies
        log.debug("float64 twin failed: %s", e)
        return 0.0


def _check_no_sharing(model: nn.Module, work: nn.Module) -> None:
    """The returned model must not share memory with the user's model: no parameter or buffer
    of ``work`` may overlap the storage of any tensor of ``model`` (views included)."""
    from .testing import shared_storage

    shared = shared_storage(model, work)
    if shared:
        raise NormSurgeonError(f"internal error: the converted model shares memory "
                               f"({', '.join(shared[:3])}) with the original; please report this")


def _unreached_reason(qual: str, status: dict[str, str]) -> str:
    parts = qual.split(".")
    for i in range(len(parts) - 1, -1, -1):
        parent = ".".join(parts[:i])
        st = status.get(parent)
        if st is None:
            continue
        if st.startswith("untraceable"):
            hint = "" if "concrete" in st else "; pass example_inputs to trace it concretely"
            return f"inside untraceable module {parent or '<model>'} ({st[13:]}){hint}"
        return "not called in the traced forward"
    return "not reached by tracing"


def _rebuild(work: nn.Module, ctx: Context) -> nn.Module:
    """Regions whose graph was edited (functional BN removed) replace their module."""
    removed = ctx.options.get("_removed_nodes", [])
    for region in ctx.regions:
        if region.name not in ctx.rebuild:
            continue
        for site in removed:
            if site.region is region:
                site.node.replace_all_uses_with(site.input_node)
                region.graph.erase_node(site.node)
        region.graph.lint()
        gm = region.graph_module(root=work.get_submodule(region.name) if region.name else work)
        gm.recompile()
        if region.name:
            set_submodule(work, region.name, gm)
        else:
            work = gm
    return work
