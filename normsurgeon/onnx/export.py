"""``export_onnx``: any model ``convert`` produced (folded, CBN, RBN) or a plain one → ONNX.

Recipe (docs/onnx.md): CBN/RBN layers call ``normsurgeon::`` torch custom ops while exporting; the
dynamo exporter translates them to nodes of the registered ``normsurgeon`` schemas; *after*
export (its passes would inline or drop them otherwise) the FunctionProtos are attached with
their ``""`` opset aligned to the model's. ``custom_ops=False`` inlines those functions,
leaving standard ops only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._args import as_inputs
from ..errors import ExportError, VerificationError
from ..tracing import eval_mode
from . import ops

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
    exporter: str = "dynamo"
    verification: Any = None

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


def export_onnx(
    model: nn.Module,
    args: Any,
    path: str | os.PathLike[str],
    *,
    custom_ops: bool = True,
    dynamic_batch: bool = True,
    opset: int | None = None,
    verify: bool = False,
    **verify_options: Any,
) -> ExportResult:
    """Export ``model(*args)`` to ``path``.

    Args:
        model: a converted (folded / CBN / RBN) or plain model; exported in eval mode.
        args: the example inputs, the condition included (``(x, cond)`` for CBN models).
        custom_ops: CBN/RBN as single ``normsurgeon`` nodes with function bodies (default),
            or standard ONNX ops only.
        dynamic_batch: axis 0 of every tensor input (condition included) is dynamic.
        opset: the default-domain opset (≥ 18; default 18).
        verify: run :func:`normsurgeon.verify_onnx` and raise :class:`VerificationError` on
            a mismatch. ``verify_options`` go to it (``providers``, ``rtol``, ``atol``).
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
    t0 = time.perf_counter()
    export_args = _widen_batch(args) if dynamic_batch else args
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0
                               else None for a in export_args)
    exporter = "dynamo"
    torch_log = logging.getLogger("torch.onnx")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping ..."
    try:
        with ops.export_mode("custom") as cbn_ranks:  # the layers call the custom ops
            try:
                proto = _export_dynamo(model, export_args, dynamic_shapes, opset)
            except Exception as e:  # torch.export cannot capture it: trace it instead
                reason = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:160]
                log.info("torch.export failed (%s); falling back to the TorchScript exporter",
                         reason)
                exporter = f"torchscript (torch.export failed: {reason})"
                cbn_ranks.clear()
                try:
                    proto = _export_torchscript(model, export_args, dynamic_batch, opset)
                except Exception as e2:
                    raise ExportError(
                        f"both exporters failed. torch.export: {reason}; TorchScript: "
                        f"{type(e2).__name__}: {str(e2).strip()[:300]}") from e2
    finally:
        torch_log.setLevel(level)
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
    onnx.save(proto, path)
    result = ExportResult(path, proto, used, model_opset, time.perf_counter() - t0, exporter)
    log.info("exported %s (%s) in %.2fs", path, ", ".join(used) or "standard ops only",
             result.seconds)
    if verify:
        from .verify import verify_onnx

        res = verify_onnx(path, model, args, **verify_options)
        result.verification = res
        if not res:
            raise VerificationError(f"{path} disagrees with PyTorch:\n{res.table()}", res)
    return result


def _export_dynamo(model: nn.Module, args: tuple[Any, ...], dynamic_shapes: Any,
                   opset: int) -> Any:
    import warnings

    table = ops.translation_table()
    with eval_mode(model), torch.no_grad(), \
            contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, dynamo=True, custom_translation_table=table,
                                    dynamic_shapes=dynamic_shapes, opset_version=opset,
                                    optimize=True, verbose=False)
    return program.model_proto


_SYMBOLICS_DONE: list[int] = []


def _register_symbolics(opset: int) -> None:
    """TorchScript-exporter symbolics emitting the same ``normsurgeon`` nodes."""
    if opset in _SYMBOLICS_DONE:
        return
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    @parse_args("v", "v", "v", "v", "v", "f")
    def cbn(g, x, scale, bias, mean, var, eps):  # noqa: ANN001, ANN202
        return g.op(f"{ops.DOMAIN}::{ops.CBN_OP}", x, scale, bias, mean, var, epsilon_f=eps)

    @parse_args("v", "v", "v", "v", "v", "v", "v", "v", "f")
    def rbn(g, x, w_c, w_v, b_v, gamma, beta, mean, var, eps):  # noqa: ANN001, ANN202
        return g.op(f"{ops.DOMAIN}::{ops.RBN_OP}", x, w_c, w_v, b_v, gamma, beta, mean, var,
                    epsilon_f=eps)

    register_custom_op_symbolic("normsurgeon::cbn", cbn, opset)
    register_custom_op_symbolic("normsurgeon::rbn", rbn, opset)
    _SYMBOLICS_DONE.append(opset)


def _export_torchscript(model: nn.Module, args: tuple[Any, ...], dynamic_batch: bool,
                        opset: int) -> Any:
    """Tracing exporter: data-dependent Python branches follow the example's path."""
    import warnings

    import onnx

    _register_symbolics(opset)
    names = [f"input_{i}" for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    axes = {n: {0: "batch"} for n, a in zip(names, [a for a in args
                                                    if isinstance(a, torch.Tensor)])
            if a.dim() > 0} if dynamic_batch else None
    buf = io.BytesIO()
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset,
                          input_names=names, dynamic_axes=axes,
                          custom_opsets={ops.DOMAIN: ops.VERSION})
    return onnx.load_from_string(buf.getvalue())


def _check(proto: Any) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True,
                                          data_prop=True)
    except Exception as e:
        raise ExportError(f"the exported graph is invalid: {e}") from e
