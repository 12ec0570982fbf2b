"""``verify_onnx``: run an exported file on onnxruntime and compare with PyTorch (docs/bars.md).

Every requested provider × graph optimisations off and on × the example batch size and
another one, on fresh random inputs. The result is an object: truthy when every comparison
passed, holding the numbers and the providers that really ran. A provider that could not run
(CUDA without onnxruntime-gpu or without a GPU) is reported as not run, never as passed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._args import as_inputs
from ..tracing import eval_mode

__all__ = ["verify_onnx", "VerificationResult", "Comparison", "DEFAULT_RTOL"]

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DEFAULT_RTOL = {"cpu": 1e-5, "cuda": 1e-4}  # docs/bars.md, fp32 (CUDA with TF32 off)


@dataclass
class Comparison:
    """One output compared at one provider, optimisation level and batch size."""

    provider: str
    optimization: str  # "off" | "all"
    batch: int
    output: str
    max_abs: float
    max_rel: float
    rtol: float
    atol: float

    @property
    def passed(self) -> bool:
        return bool(self.max_rel <= self.rtol or self.max_abs <= self.atol)


@dataclass
class VerificationResult:
    """All comparisons, the providers that really ran, and why others did not."""

    path: str
    comparisons: list[Comparison] = field(default_factory=list)
    providers_run: list[str] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    def max_rel(self, provider: str | None = None) -> float:
        vals = [c.max_rel for c in self.comparisons if provider in (None, c.provider)]
        return max(vals, default=float("nan"))

    def table(self) -> str:
        head = f"{'provider':<9} {'opt':<4} {'batch':>5} {'output':<12} {'max abs':>10} " \
               f"{'max rel':>10} {'bar':>8}  ok"
        lines = [head, "-" * len(head)]
        for c in self.comparisons:
            lines.append(f"{c.provider:<9} {c.optimization:<4} {c.batch:>5} {c.output[:12]:<12} "
                         f"{c.max_abs:>10.2e} {c.max_rel:>10.2e} {c.rtol:>8.0e}  "
                         f"{'yes' if c.passed else 'NO'}")
        for p, why in self.not_run.items():
            lines.append(f"{p:<9} not run: {why}")
        verdict = "PASS" if self else "FAIL"
        lines.append(f"{verdict}: {len(self.comparisons) - len(self.failures)}/"
                     f"{len(self.comparisons)} comparisons within the bar; providers that ran: "
                     f"{', '.join(self.providers_run) or 'none'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "passed": bool(self), "providers_run": self.providers_run,
                "not_run": self.not_run,
                "comparisons": [dict(c.__dict__, passed=c.passed) for c in self.comparisons]}


def _fresh(args: tuple[Any, ...], batch: int, seed: int) -> tuple[Any, ...]:
    """New random inputs like ``args`` with batch ``batch``: floats ~ N(0, 1) scaled like the
    example; integers drawn from the example's own values (labels stay in range)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for a in args:
        if not isinstance(a, torch.Tensor) or a.dim() == 0:
            out.append(a)
            continue
        shape = (batch,) + tuple(a.shape[1:])
        if a.is_floating_point():
            scale = float(a.float().std()) if a.numel() > 1 else 1.0
            out.append((torch.randn(shape, generator=g) * (scale or 1.0)).to(a.dtype))
        else:
            pool = a.flatten()
            idx = torch.randint(0, pool.numel(), shape, generator=g)
            out.append(pool[idx])
    return tuple(out)


def _leaves(y: Any) -> list[np.ndarray]:
    from torch.utils._pytree import tree_leaves

    return [t.detach().cpu().numpy() for t in tree_leaves(y) if isinstance(t, torch.Tensor)]


def _cuda_unavailable_reason(ort: Any) -> str | None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu in an "
                "environment without onnxruntime)")
    return None


def verify_onnx(
    path: str | os.PathLike[str],
    model: nn.Module,
    args: Any,
    *,
    providers: list[str] | None = None,
    rtol: float | None = None,
    atol: float = 1e-6,
    batch_sizes: list[int] | None = None,
    seed: int = 0,
) -> VerificationResult:
    """Compare ``path`` on onnxruntime with ``model`` in PyTorch.

    Args:
        providers: ``["cpu"]``, ``["cpu", "cuda"]``... Default: CPU, plus CUDA when
            onnxruntime offers it.
        rtol: the docs/bars.md relative bar ``max|y − ref| / max|ref|`` (default 1e-5 on CPU, 1e-4
            on CUDA); ``atol`` accepts outputs that are all near zero.
        batch_sizes: default: the example's batch and one more size.
    """
    import onnxruntime as ort

    path = os.fspath(path)
    args = as_inputs(args, "args (the example inputs, condition included)")
    result = VerificationResult(path)
    requested = providers or (["cpu"] + ([] if _cuda_unavailable_reason(ort) else ["cuda"]))
    if providers is None and _cuda_unavailable_reason(ort):
        result.not_run["cuda"] = _cuda_unavailable_reason(ort) or ""
    unknown = [p for p in requested if p not in _PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(_PROVIDERS)}")
    b0 = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), 1)
    sizes = batch_sizes or [b0, b0 + 3]
    cases = [_fresh(args, b, seed + i) for i, b in enumerate(sizes)]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad(), eval_mode(model):
            refs = [_leaves(model(*c)) for c in cases]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    for prov in requested:
        if prov == "cuda" and _cuda_unavailable_reason(ort):
            result.not_run["cuda"] = _cuda_unavailable_reason(ort) or ""
            continue
        bar = rtol if rtol is not None else DEFAULT_RTOL[prov]
        ran = False
        for opt_name, level in (("off", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            so.log_severity_level = 3
            prov_list: list[Any] = [_PROVIDERS[prov]]
            if prov == "cuda":
                prov_list = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
            sess = ort.InferenceSession(path, so, providers=prov_list)
            if _PROVIDERS[prov] not in sess.get_providers():
                result.not_run[prov] = (f"session fell back to {sess.get_providers()} "
                                        "(no usable device)")
                break
            ran = True
            inputs = sess.get_inputs()
            for case, ref in zip(cases, refs):
                tensors = [a for a in case if isinstance(a, torch.Tensor)]
                feeds = {i.name: t.numpy() for i, t in zip(inputs, tensors)}
                outs = sess.run(None, feeds)
                for o, y, r in zip(sess.get_outputs(), outs, ref):
                    diff = np.abs(y.astype(np.float64) - r.astype(np.float64))
                    max_abs = float(diff.max()) if diff.size else 0.0
                    denom = max(float(np.abs(r).max()) if r.size else 0.0, 1e-12)
                    result.comparisons.append(Comparison(
                        prov, opt_name, int(tensors[0].shape[0]), o.name, max_abs,
                        max_abs / denom, bar, atol))
        if ran:
            result.providers_run.append(_PROVIDERS[prov])
    return result
