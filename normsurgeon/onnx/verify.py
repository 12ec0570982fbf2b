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
from ..functional import same_nonfinite
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
    family: str = "random"  # which input family (see verify_onnx)
    problem: str = ""  # a structural mismatch (missing output, shape, dtype, name)
    noise: float = 0.0  # the model's own fp32-vs-float64 rel on these inputs (bar: 4x that)
    fp64_rel: float | None = None  # this output's rel against the model's float64 twin
    skipped: str = ""  # why nothing could be compared (the model's own output is not finite)

    @property
    def passed(self) -> bool:
        """Within the bar (a skipped row is no failure; :class:`VerificationResult` still
        needs a compared row per provider)."""
        if self.problem:
            return False
        if self.skipped:
            return True
        if self.max_rel <= self.bar or self.max_abs <= self.atol:
            return True
        # where fp32 itself is chaotic (inputs far from training data), the file passes when it
        # is no further from the float64 result than 2x the eager model is (docs/bars.md)
        return self.fp64_rel is not None and self.fp64_rel <= max(self.rtol, 2 * self.noise)

    @property
    def bar(self) -> float:
        """``rtol``, or 4x the model's own fp32 noise on these inputs where that is larger."""
        return max(self.rtol, 4 * self.noise)


@dataclass
class VerificationResult:
    """All comparisons, the providers that really ran, and why others did not."""

    path: str
    comparisons: list[Comparison] = field(default_factory=list)
    providers_run: list[str] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)
    families: list[str] = field(default_factory=list)  # the input families that ran

    def __bool__(self) -> bool:
        compared = {c.provider for c in self.comparisons if not c.skipped}
        ran = {c.provider for c in self.comparisons}
        return bool(self.comparisons) and compared == ran and all(
            c.passed for c in self.comparisons)

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    def max_rel(self, provider: str | None = None) -> float:
        vals = [c.max_rel for c in self.comparisons
                if provider in (None, c.provider) and not c.skipped]
        return max(vals, default=float("nan"))

    def table(self) -> str:
        head = f"{'provider':<9} {'opt':<4} {'inputs':<10} {'batch':>5} {'output':<12} " \
               f"{'max abs':>10} {'max rel':>10} {'bar':>8}  ok"
        lines = [head, "-" * len(head)]
        for c in self.comparisons:
            lines.append(f"{c.provider:<9} {c.optimization:<4} {c.family[:10]:<10} {c.batch:>5} "
                         f"{c.output[:12]:<12} {c.max_abs:>10.2e} {c.max_rel:>10.2e} "
                         f"{c.bar:>8.0e}  "
                         + ("n/a" if c.skipped else "yes" if c.passed else "NO")
                         + (f"  {c.problem or c.skipped}" if c.problem or c.skipped else ""))
        for p, why in self.not_run.items():
            lines.append(f"{p:<9} not run: {why}")
        verdict = "PASS" if self else "FAIL"
        skipped = sum(bool(c.skipped) for c in self.comparisons)
        compared = len(self.comparisons) - skipped
        lines.append(f"{verdict}: {compared - len(self.failures)}/{compared} comparisons within "
                     "the bar" + (f" ({skipped} not comparable: the model's own output is not "
                                  "finite there)" if skipped else "")
                     + f"; providers that ran: {', '.join(self.providers_run) or 'none'}")
        if not self and not self.failures and skipped:
            lines.append("nothing could be compared on some provider: the model's own output "
                         "is empty or not finite on every input family")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "passed": bool(self), "providers_run": self.providers_run,
                "not_run": self.not_run, "families": self.families,
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


def _cbn_spec(model: nn.Module) -> Any:
    """The condition spec of a CBN model (its first CBN layer's), or ``None``."""
    for m in model.modules():
        spec = getattr(m, "spec", None)
        if getattr(type(m), "_normsurgeon_layer", False) and spec is not None:
            return spec
    return None


def input_families(args: tuple[Any, ...], model: nn.Module, seed: int,
                   batch_sizes: list[int] | None) -> list[tuple[str, tuple[Any, ...]]]:
    """Inputs that move a model across its behaviours: fresh random inputs at the example's
    batch and another, then scaled ×10, negated, all zero, large (×100); for CBN models, an
    extreme condition (×100) and every class label at least once (when there are ≤ 64)."""
    b0 = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), 1)
    sizes = batch_sizes or [b0, b0 + 3]
    fams = [("random" if i == 0 else f"batch {b}", _fresh(args, b, seed + i))
            for i, b in enumerate(sizes)]
    base = fams[0][1]
    spec = _cbn_spec(model)
    cond_at = len(args) - 1 if spec is not None else None

    def transform(f: Any) -> tuple[Any, ...]:
        return tuple(f(a) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and i != cond_at else a for i, a in enumerate(base))

    fams += [("scaled x10", transform(lambda a: a * 10)), ("negated", transform(lambda a: -a)),
             ("zeros", transform(torch.zeros_like)),
             ("large x100", transform(lambda a: a * 100))]
    if spec is not None and cond_at is not None:
        if spec.num_classes is None:
            extreme = tuple(a * 100 if i == cond_at else a for i, a in enumerate(base))
            fams.append(("cond x100", extreme))
        elif spec.num_classes <= 64:
            k = spec.num_classes
            labels = torch.arange(k)
            every = list(_fresh(args, k, seed + 99))
            every[cond_at] = labels.to(args[cond_at].dtype)
            fams.append(("all labels", tuple(every)))
    return fams


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
    output_names: list[str] | None = None,
) -> VerificationResult:
    """Compare ``path`` on onnxruntime with ``model`` in PyTorch.

    Every output is compared, in order: a file with another number of outputs, or outputs
    of other shapes or dtypes (or other names, when ``output_names`` is given), fails with that
    reason. The inputs come in families (:func:`input_families`); ``result.families`` records
    which ran.

    Args:
        providers: ``["cpu"]``, ``["cpu", "cuda"]``... Default: CPU, plus CUDA when
            onnxruntime offers it.
        rtol: the docs/bars.md relative bar ``max|y − ref| / max|ref|`` (default 1e-5 on CPU,
            1e-4 on CUDA, or 4x the model's own fp32-vs-float64 error on those inputs where that
            is larger; with the default, a file no further from the float64 result than 2x the
            eager model also passes). An explicit ``rtol`` is the bar, nothing else; ``atol``
            accepts outputs that are all near zero.
        batch_sizes: default: the example's batch and one more size.
        output_names: the names the file's outputs must have (export passes its own).
    """
    import onnxruntime as ort

    from .export import check_example_inputs

    path = os.fspath(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = as_inputs(args, "args (the example inputs, condition included)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such ONNX file; write it first with "
                                "normsurgeon.export_onnx (CLI: normsurgeon export)")
    try:
        import onnx

        onnx.checker.check_model(path)
    except Exception as e:  # noqa: BLE001 - say what the file is not
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a valid ONNX model ({first[:160]}); export it again "
                         "with normsurgeon.export_onnx") from e
    check_example_inputs(model, args, "example inputs")
    result = VerificationResult(path)
    requested = providers or (["cpu"] + ([] if _cuda_unavailable_reason(ort) else ["cuda"]))
    if providers is None and _cuda_unavailable_reason(ort):
        result.not_run["cuda"] = _cuda_unavailable_reason(ort) or ""
    unknown = [p for p in requested if p not in _PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(_PROVIDERS)}")
    fams = input_families(args, model, seed, batch_sizes)
    result.families = [name for name, _ in fams]
    cases = [c for _, c in fams]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        refs = []
        with torch.no_grad(), eval_mode(model):
            for (family, _), c in zip(fams, cases):
                try:
                    refs.append(_leaves(model(*c)))
                except Exception as e:  # the model's own complaint, in one line
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    raise ValueError(
                        f"the model rejects input family {family!r} "
                        f"({', '.join(str(tuple(a.shape)) for a in c if hasattr(a, 'shape'))})"
                        f": {type(e).__name__}: {first[:160]}; pass batch_sizes= it "
                        "accepts") from e
        noises, refs64 = _own_noise(model, cases, refs)
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
            onames = [o.name for o in sess.get_outputs()]
            problem = _input_problem(inputs, args, model)
            if problem:  # a file for another model: nothing it computes is comparable
                result.comparisons.append(Comparison(
                    prov, opt_name, 0, "inputs", float("nan"), float("nan"), bar, atol,
                    "-", problem=problem))
                continue
            for (family, case), ref, noise, ref64 in zip(fams, refs, noises, refs64):
                tensors = [a for a in case if isinstance(a, torch.Tensor)]
                feeds = {i.name: t.numpy() for i, t in zip(inputs, tensors)}
                try:
                    outs = sess.run(None, feeds)
                except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
                    shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in feeds.items())
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    raise ValueError(f"{path} rejects inputs of shape {shapes} (input family "
                                     f"{family!r}): {first[:200]}; pass batch_sizes= that the "
                                     "file accepts, or export it with a dynamic batch") from e
                batch = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1
                rows = _compare(prov, opt_name, family, batch, onames, outs, ref, bar, atol,
                                output_names)
                for i, row in enumerate(rows):
                    row.noise = noise if rtol is None else 0.0
                    if rtol is None and ref64 is not None and i < len(outs) and i < len(ref64) and (
                            outs[i].shape == ref64[i].shape) and ref64[i].size:
                        # over the entries where the eager output is finite (the row only
                        # compares when the file is non-finite exactly there too)
                        keep = np.isfinite(ref[i]) if i < len(ref) and (
                            ref[i].shape == outs[i].shape) else np.ones(outs[i].shape, bool)
                        with np.errstate(invalid="ignore"):  # inf - inf: NaN, no rescue
                            row.fp64_rel = float(
                                np.abs(outs[i].astype(np.float64)[keep] - ref64[i][keep]).max()
                                / max(float(np.abs(ref64[i][keep]).max()), 1e-12)
                            ) if keep.any() else None
                result.comparisons += rows
        if ran:
            result.providers_run.append(_PROVIDERS[prov])
    return result


def _input_problem(inputs: list[Any], args: tuple[Any, ...], model: nn.Module) -> str:
    """Why the file's graph inputs cannot be the model's: another count, other names (when
    the file uses the forward's parameter names, as export_onnx writes them), another rank or
    another fixed size. Empty when they match."""
    from .export import input_names

    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    names = [n for n, a in zip(input_names(model, args), args) if isinstance(a, torch.Tensor)]
    file_desc = ", ".join(f"{i.name}{list(i.shape)}" for i in inputs) or "none"
    if len(inputs) != len(tensors):
        return (f"the file takes {len(inputs)} input(s) ({file_desc}), the model "
                f"{len(tensors)} ({', '.join(names)}): it was exported from another model")
    for k, (i, t, name) in enumerate(zip(inputs, tensors, names)):
        if i.name != name and not i.name.startswith(("input", "onnx::", "l_")):
            return (f"input {k} of the file is named {i.name!r}, the model's is {name!r}: it "
                    "was exported from another model")
        shape = list(i.shape)
        if len(shape) != t.dim():
            return (f"input {i.name!r} of the file has rank {len(shape)} ({shape}), the "
                    f"model's example {t.dim()} ({list(t.shape)})")
        fixed = [(d, n) for d, n in zip(shape[1:], t.shape[1:]) if isinstance(d, int)]
        if any(d != n for d, n in fixed):
            return (f"input {i.name!r} of the file has shape {shape}, the model's example "
                    f"{list(t.shape)}")
    return ""


def _own_noise(model: nn.Module, cases: list[tuple[Any, ...]], refs: list[list[np.ndarray]]
               ) -> tuple[list[float], list[list[np.ndarray] | None]]:
    """Per input family, rel of the fp32 model against its float64 twin (docs/bars.md: the
    bar is the larger of rtol and 4x this), and the twin's outputs. Zeros and ``None`` when the
    model has no float64 twin."""
    import copy

    none: list[list[np.ndarray] | None] = [None] * len(cases)
    if not any(p.dtype == torch.float32 for p in model.parameters()):
        return [0.0] * len(cases), none
    try:
        twin = copy.deepcopy(model).double()
        out, refs64 = [], []
        with torch.no_grad(), eval_mode(twin):
            for case, ref in zip(cases, refs):
                args = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                             else a for a in case)
                ref64 = _leaves(twin(*args))
                rels = [_finite_rel(r, q) for r, q in zip(ref, ref64)
                        if r.size and r.shape == q.shape]
                out.append(max(rels, default=0.0))
                refs64.append(ref64)
        return out, refs64
    except Exception:  # noqa: BLE001 - no twin: the fixed bar applies
        return [0.0] * len(cases), none


def _finite_rel(r: np.ndarray, q: np.ndarray) -> float:
    """rel of ``r`` against ``q`` over the entries finite in both (0 when there are none): an
    fp32 output that overflows where float64 does not must not make the noise, and with it
    the bar, infinite."""
    r64 = r.astype(np.float64)
    ok = np.isfinite(r64) & np.isfinite(q)
    if not ok.any():
        return 0.0
    return float(np.abs(r64[ok] - q[ok]).max() / max(float(np.abs(q[ok]).max()), 1e-12))


def _compare(prov: str, opt: str, family: str, batch: int, names: list[str],
             outs: list[np.ndarray], ref: list[np.ndarray], bar: float, atol: float,
             expected_names: list[str] | None) -> list[Comparison]:
    """One Comparison per output position; structural mismatches are failures with a reason."""
    rows = []
    for i in range(max(len(outs), len(ref))):
        name = names[i] if i < len(names) else f"#{i}"
        row = Comparison(prov, opt, batch, name, float("nan"), float("nan"), bar, atol, family)
        if i >= len(outs):
            row.problem = f"the file has {len(outs)} outputs, the model returns {len(ref)}"
        elif i >= len(ref):
            row.problem = f"the file has {len(outs)} outputs, the model returns {len(ref)}"
        elif expected_names is not None and i < len(expected_names) and (
                name != expected_names[i]):
            row.problem = f"output {i} is named {name!r}, expected {expected_names[i]!r}"
        elif outs[i].shape != ref[i].shape:
            row.problem = f"shape {tuple(outs[i].shape)}, the model's is {tuple(ref[i].shape)}"
        elif outs[i].dtype != ref[i].dtype:
            row.problem = f"dtype {outs[i].dtype}, the model's is {ref[i].dtype}"
        else:
            y, r = outs[i], ref[i]
            bad = ~np.isfinite(r) if np.issubdtype(r.dtype, np.floating) else None
            if bad is not None and bad.any():
                # the model itself overflows here: compare where it is finite, if the file is
                # non-finite exactly where the model is (same NaN and same inf)
                if not same_nonfinite(torch.from_numpy(y), torch.from_numpy(r)):
                    row.skipped = (f"the model's own output has {int(bad.sum())} of {r.size} "
                                   "entries inf/NaN here, the file others: nothing to compare")
                    rows.append(row)
                    continue
                y, r = y[~bad], r[~bad]
            if not r.size:  # agreement on nothing is no agreement: never a pass
                row.skipped = ("nothing to compare: the output is empty" if not ref[i].size
                               else "nothing to compare: every entry of the model's output is "
                               "inf/NaN here")
                rows.append(row)
                continue
            diff = np.abs(y.astype(np.float64) - r.astype(np.float64))
            row.max_abs = float(diff.max()) if diff.size else 0.0
            denom = max(float(np.abs(r).max()) if r.size else 0.0, 1e-12)
            row.max_rel = row.max_abs / denom
        rows.append(row)
    return rows
