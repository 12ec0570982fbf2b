"""Helpers for testing conversions on models without trained weights."""

from __future__ import annotations

import torch
from torch import nn

from .tracing import is_batchnorm, is_normsurgeon_layer

__all__ = ["randomize_bn_stats", "model_fingerprint", "shared_storage"]


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm (look-alikes and normsurgeon layers included) trained-looking
    statistics, in place (docs/bars.md): running_mean ~ U(−1, 1), running_var ~ U(0.5, 2),
    γ ~ U(0.5, 1.5), β ~ U(−0.5, 0.5). Identity statistics would hide a wrong fold.
    Returns ``model``; its training/eval mode is unchanged."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not (is_batchnorm(m) or is_normsurgeon_layer(m)):
                continue
            if getattr(m, "running_mean", None) is not None:
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.Tensor) and w.dim() == 1 and isinstance(b, torch.Tensor):
                n = w.numel()
                w.copy_(torch.rand(n, generator=g) + 0.5)
                b.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def model_fingerprint(model: nn.Module) -> dict[str, object]:
    """Everything a conversion must leave unchanged on the user's model, in comparable form:
    each parameter's and buffer's bytes, dtype, shape, strides and ``requires_grad``; each
    module's class, training flag and hooks (forward, pre-forward, backward); the module tree.

    ``model_fingerprint(m) == model_fingerprint(m)`` before and after ``convert(m, ...)`` is the
    "never touches your model" promise (see ``docs/invariants.md``)."""
    out: dict[str, object] = {}
    for qual, m in model.named_modules(remove_duplicate=False):
        hooks = tuple(tuple(getattr(m, k, {}).values()) for k in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
        out[f"module {qual}"] = (type(m), m.training, hooks,
                                 tuple(name for name, _ in m.named_children()))
        for kind, store in (("param", m._parameters), ("buffer", m._buffers)):
            for name, t in store.items():
                if t is None:
                    out[f"{kind} {qual}.{name}"] = None
                    continue
                data = t.detach()
                raw = data.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
                out[f"{kind} {qual}.{name}"] = (
                    type(t), t.dtype, tuple(t.shape), t.stride(), t.requires_grad, raw)
    return out


def shared_storage(a: nn.Module, b: nn.Module) -> list[str]:
    """Names of ``b``'s parameters and buffers whose memory overlaps any tensor of ``a``
    (views and aliases included, not just the same tensor object). Sorted intervals and a
    binary search: O(n log n) in the number of tensors."""
    import bisect

    spans: dict[torch.device, list[tuple[int, int]]] = {}
    tensors = [t for m in a.modules() for store in (m._parameters, m._buffers)
               for t in store.values() if t is not None]
    for t in tensors:
        st = t.untyped_storage()
        if st.nbytes():
            spans.setdefault(t.device, []).append((st.data_ptr(), st.data_ptr() + st.nbytes()))
    merged: dict[torch.device, tuple[list[int], list[int]]] = {}
    for dev, ivs in spans.items():
        ivs.sort()
        starts: list[int] = []
        ends: list[int] = []
        for lo, hi in ivs:  # merge overlapping intervals: ends stay sorted
            if starts and lo < ends[-1]:
                ends[-1] = max(ends[-1], hi)
            else:
                starts.append(lo)
                ends.append(hi)
        merged[dev] = (starts, ends)
    hits = []
    for qual, m in b.named_modules(remove_duplicate=False):
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is None or t.device not in merged:
                    continue
                st = t.untyped_storage()
                lo, hi = st.data_ptr(), st.data_ptr() + st.nbytes()
                if not st.nbytes():
                    continue
                starts, ends = merged[t.device]
                i = bisect.bisect_right(starts, hi - 1) - 1  # last interval starting below hi
                if i >= 0 and ends[i] > lo:
                    hits.append(f"{qual}.{name}" if qual else name)
    return hits
