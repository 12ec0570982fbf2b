"""``export_onnx``: any model ``convert`` produced (folded, CBN, RBN) or a plain one → ONNX.

Recipe (docs/onnx.md): CBN/RBN layers call ``normsurgeon::`` torch custom ops while exporting; the
dynamo exporter translates them to nodes of the registered ``normsurgeon`` schemas; *after*
export (its passes would inline or drop them otherwise) the FunctionProtos are attached with
their ``""`` opset aligned to the model's. ``custom_ops=False`` inlines those functions,
leaving standard ops only.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._args import as_inputs
from .._io import atomic_path, raise_if_interrupted, watch_interrupts
from .._io import check_writable as _check_writable
from ..errors import ExportError, VerificationError
from ..errors import one_line as _one_line
from ..layers.cbn import shared_condition_bank
from ..tracing import eval_mode
from . import ops
from .proto import weight_free as _weight_free

__all__ = ["export_onnx", "ExportResult"]

log = logging.getLogger("normsurgeon")


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote: the file, its ModelProto, the custom ops it holds, and
    the verification result when ``verify=True``."""

    path: str
    model: Any  # onnx.ModelProto
    custom_ops: list[str]
    opset: int
    seconds: float
    exporter: str = "dynamo"  # "dynamo" or "torchscript"
    verification: Any = None
    fallback_reason: str = ""  # why torch.export could not capture the model (one line)
    specialized: list[str] = field(default_factory=list)  # value decisions baked into the graph
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    def op_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.model.graph.node:
            key = f"{n.domain}::{n.op_type}" if n.domain else n.op_type
            out[key] = out.get(key, 0) + 1
        return out


def _widen_batch(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """torch.export specialises size-1 dimensions; export with batch ≥ 2."""
    return tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0
                 and a.shape[0] == 1 else a for a in args)


def _forward_params(model: nn.Module) -> list[inspect.Parameter]:
    """The positional parameters of the forward a call ``model(*args)`` reaches: for a CBN
    wrapper (``forward(*inputs, cond)``), the wrapped class's parameters and then ``cond``."""
    cls = type(model)
    if getattr(cls, "_ns_conditioned", False):
        base = cls.__mro__[1]
        params = _forward_params_of(base.forward)
        return params + [inspect.Parameter("cond", inspect.Parameter.POSITIONAL_ONLY)]
    return _forward_params_of(model.forward)


def _forward_params_of(fn: Any) -> list[inspect.Parameter]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.VAR_POSITIONAL)
    return [p for n, p in sig.parameters.items() if n != "self" and p.kind in kinds]


def input_names(model: nn.Module, args: tuple[Any, ...]) -> list[str]:
    """Graph input names: the forward's own parameter names (``x``, ``cond``...), ``input_i``
    where the signature does not say."""
    params = _forward_params(model)
    names = []
    for i, _ in enumerate(args):
        p = params[i] if i < len(params) else None
        if p is None or p.kind == inspect.Parameter.VAR_POSITIONAL:
            names.append(f"input_{i}")
        else:
            names.append(p.name)
    return names


def _dynamic_shapes(model: nn.Module, export_args: tuple[Any, ...]) -> Any:
    """Batch-dynamic specs shaped like the forward signature: torch.export wants a
    ``forward(*args)`` parameter's specs nested as one tuple."""
    batch = torch.export.Dim("batch", min=1)
    specs = [{0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None
             for a in export_args]
    params = _forward_params_of(model.forward)
    for i, p in enumerate(params):
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            return tuple(specs[:i]) + (tuple(specs[i:]),)
    return tuple(specs)


def default_output_names(n: int, given: list[str] | None = None) -> list[str]:
    """``output``, ``output_1``, ... or the caller's names (their number must match)."""
    if given is not None:
        if len(given) != n or len(set(given)) != n:
            raise ValueError(f"output_names must be {n} distinct names (the model returns {n} "
                             f"tensors), got {list(given)}")
        return list(given)
    return ["output"] + [f"output_{i}" for i in range(1, n)]


def check_example_inputs(model: nn.Module, args: tuple[Any, ...], what: str) -> Any:
    """Run ``model(*args)`` once (eval, no grad) and return its output. A condition the model
    rejects raises the model's own :class:`ConditionError` (or ``TypeError``); any other
    failure is a ``ValueError`` saying that ``args`` do not fit the model."""
    from ..errors import ConditionError

    try:
        with eval_mode(model), torch.no_grad():
            return model(*args)
    except (ConditionError, TypeError):
        raise
    except Exception as e:  # noqa: BLE001 - the model's own complaint, in one line
        shapes = ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else
                           type(a).__name__ for a in args)
        raise ValueError(f"the model rejects the {what} ({shapes}): {_one_line(e)}; pass "
                         "inputs shaped as the model expects") from e


def export_onnx(
    model: nn.Module,
    args: Any,
    path: str | os.PathLike[str],
    *,
    custom_ops: bool = True,
    dynamic_batch: bool = True,
    opset: int | None = None,
    verify: bool = False,
    allow_specialized: bool = False,
    output_names: list[str] | None = None,
    **verify_options: Any,
) -> ExportResult:
    """Export ``model(*args)`` to ``path``.

    Args:
        model: a converted (folded / CBN / RBN) or plain model; exported in eval mode.
        args: the example inputs, the condition included (``(x, cond)`` for CBN models).
            They are run through the model first: a bad condition raises the model's own
            :class:`ConditionError`, other misfits a ``ValueError``.
        custom_ops: CBN/RBN as single ``normsurgeon`` nodes with function bodies (default),
            or standard ONNX ops only.
        dynamic_batch: axis 0 of every tensor input (condition included) is dynamic.
        opset: the default-domain opset (≥ 18; default 18).
        verify: run :func:`normsurgeon.verify_onnx` and raise :class:`VerificationError` on
            a mismatch. ``verify_options`` go to it (``providers``, ``rtol``, ``atol``).
        allow_specialized: accept a graph that the fallback TorchScript exporter specialised on
            the example's tensor values (a Python branch on ``y.mean() > 0``): it holds only the
            example's branch. By default such an export raises :class:`ExportError`; when
            allowed, ``result.specialized`` lists the decisions that were baked in.
        output_names: graph output names (default ``output``, ``output_1``, ...).
    """
    import onnx

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = as_inputs(args, "args (the example inputs, condition included)")
    opset = 18 if opset is None else int(opset)
    if opset < ops.BODY_OPSET:
        raise ValueError(f"opset must be ≥ {ops.BODY_OPSET} (the function bodies use "
                         f"ReduceMean with axes as an input), got {opset}")
    path = os.fspath(path)
    _check_writable(path)
    t0 = time.perf_counter()
    from torch.utils._pytree import tree_leaves

    out = check_example_inputs(model, args, "example inputs")
    n_out = sum(isinstance(t, torch.Tensor) for t in tree_leaves(out))
    if n_out == 0:
        raise ValueError(f"the model returns no tensor ({type(out).__name__}) on the example "
                         "inputs: an ONNX file without outputs computes nothing; return the "
                         "tensors to export from forward")
    out_names = default_output_names(n_out, output_names)
    in_names = [n for n, a in zip(input_names(model, args), args)
                if isinstance(a, torch.Tensor)]
    export_args = _widen_batch(args) if dynamic_batch else args
    dynamic_shapes = _dynamic_shapes(model, export_args) if dynamic_batch else None
    exporter, fallback, specialized = "dynamo", "", []
    torch_log = logging.getLogger("torch.onnx")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping ..."
    try:
        # the layers call the custom ops, their MLPs computed together (layers.cbn)
        with ops.export_mode("custom") as cbn_ranks, shared_condition_bank(model) as target:
            try:
                with watch_interrupts():
                    proto = _export_dynamo(target, export_args, dynamic_shapes, opset,
                                           in_names, out_names)
            except Exception as e:  # torch.export cannot capture it: trace it instead
                raise_if_interrupted(e)  # Ctrl-C stops the work; it never picks a fallback
                fallback = _one_line(e)
                log.info("torch.export failed (%s); falling back to the TorchScript exporter",
                         fallback)
                exporter = "torchscript"
                cbn_ranks.clear()
                try:
                    proto, specialized = _export_torchscript(target, export_args,
                                                             dynamic_batch, opset, in_names,
                                                             out_names)
                except Exception as e2:
                    raise ExportError(
                        f"both exporters failed. torch.export: {fallback}; TorchScript: "
                        f"{_one_line(e2, 300)}") from e2
    finally:
        torch_log.setLevel(level)
    if specialized and not allow_specialized:
        raise ExportError(
            f"the model branches on tensor values ({specialized[0]}), which torch.export "
            f"cannot capture ({fallback}); the TorchScript exporter would write only the "
            "example's branch. Rewrite the branch with torch.cond / torch.where, or pass "
            "allow_specialized=True (CLI: --allow-specialized) to accept that graph")
    model_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    used = sorted({n.op_type for n in proto.graph.node if n.domain == ops.DOMAIN})
    # one rank for every CBN node (the usual case): a body with constant broadcast shapes
    bodies = ops.function_protos(model_opset,
                                 cbn_rank=next(iter(cbn_ranks)) if len(cbn_ranks) == 1 else None)
    del proto.functions[:]
    proto.functions.extend(bodies[op] for op in used)
    if used and not any(o.domain == ops.DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(ops.DOMAIN, ops.VERSION))
    if not custom_ops and used:
        from onnx import inliner

        proto = inliner.inline_local_functions(proto)
        keep = [o for o in proto.opset_import if o.domain != ops.DOMAIN]
        del proto.opset_import[:]
        proto.opset_import.extend(keep)
        used = []
    _check(proto)
    with atomic_path(path) as tmp:  # a full disk or Ctrl-C never leaves a broken file
        onnx.save(proto, tmp)
    result = ExportResult(path, proto, used, model_opset, time.perf_counter() - t0, exporter,
                          fallback_reason=fallback, specialized=specialized,
                          input_names=[i.name for i in proto.graph.input],
                          output_names=[o.name for o in proto.graph.output])
    if specialized:
        log.warning("%s holds only the example's branch of %d value-dependent decision(s): %s",
                    path, len(specialized), "; ".join(specialized[:3]))
    log.info("exported %s (%s) in %.2fs", path, ", ".join(used) or "standard ops only",
             result.seconds)
    if verify:
        from .verify import verify_onnx

        verify_options.setdefault("output_names", out_names)
        res = verify_onnx(path, model, args, **verify_options)
        result.verification = res
        if not res:
            raise VerificationError(f"{path} disagrees with PyTorch:\n{res.table()}", res)
    return result


def _export_dynamo(model: nn.Module, args: tuple[Any, ...], dynamic_shapes: Any,
                   opset: int, in_names: list[str], out_names: list[str]) -> Any:
    table = ops.translation_table()
    with eval_mode(model), torch.no_grad(), \
            contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, dynamo=True, custom_translation_table=table,
                                    dynamic_shapes=dynamic_shapes, opset_version=opset,
                                    optimize=True, verbose=False, input_names=in_names,
                                    output_names=out_names)
    return program.model_proto


_SYMBOLICS_DONE: list[int] = []


def _register_symbolics(opset: int) -> None:
    """TorchScript-exporter symbolics emitting the same ``normsurgeon`` nodes."""
    if opset in _SYMBOLICS_DONE:
        return
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    @parse_args("v", "v", "v", "v", "f", "i")
    def cbn(g, x, affine, mean, var, eps, row):  # noqa: ANN001, ANN202
        return g.op(f"{ops.DOMAIN}::{ops.CBN_OP}", x, affine, mean, var, epsilon_f=eps,
                    row_i=row)

    @parse_args("v", "v", "v", "v", "v", "v", "v", "v", "f")
    def rbn(g, x, w_c, w_v, b_v, gamma, beta, mean, var, eps):  # noqa: ANN001, ANN202
        return g.op(f"{ops.DOMAIN}::{ops.RBN_OP}", x, w_c, w_v, b_v, gamma, beta, mean, var,
                    epsilon_f=eps)

    register_custom_op_symbolic("normsurgeon::cbn", cbn, opset)
    register_custom_op_symbolic("normsurgeon::rbn", rbn, opset)
    _SYMBOLICS_DONE.append(opset)


_SPECIALISING = ("might cause the trace to be incorrect", "Converting a tensor to a Python")


def _export_torchscript(model: nn.Module, args: tuple[Any, ...], dynamic_batch: bool,
                        opset: int, in_names: list[str], out_names: list[str]
                        ) -> tuple[Any, list[str]]:
    """Tracing exporter. Returns the model and the value-dependent decisions the tracer
    reported (a Python ``bool()``/``float()``/``int()`` of a traced tensor: the graph then
    holds only the example's branch)."""
    import onnx

    _register_symbolics(opset)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    axes = {n: {0: "batch"} for n, a in zip(in_names, tensors)
            if a.dim() > 0} if dynamic_batch else None
    buf = io.BytesIO()
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset,
                          input_names=in_names, output_names=out_names, dynamic_axes=axes,
                          custom_opsets={ops.DOMAIN: ops.VERSION})
    decisions: list[str] = []
    for w in caught:
        text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
        if issubclass(w.category, torch.jit.TracerWarning) and any(
                k in text for k in _SPECIALISING):
            where = f"{os.path.basename(w.filename)}:{w.lineno}"
            entry = f"{where}: {text[:120]}"
            if entry not in decisions:
                decisions.append(entry)
    return onnx.load_from_string(buf.getvalue()), decisions


def _check(proto: Any) -> None:
    """Full ONNX check and strict shape inference (with data propagation) of the graph, on a
    weight-free view of it (:func:`normsurgeon.onnx.proto.weight_free`): both serialise the
    model they are given, which for a 100 MB file was most of their time. The weights left out
    are checked for size there."""
    import onnx

    try:
        light = _weight_free(proto)
        onnx.checker.check_model(light, full_check=True)
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True,
                                          data_prop=True)
    except Exception as e:
        raise ExportError(f"the exported graph is invalid: {e}") from e
