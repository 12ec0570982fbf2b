r"""Pure tensor math for BatchNorm surgery. No ``nn.Module``, no FX.

Eval-mode BatchNorm is a per-channel affine map (docs/math.md):

.. math::  y = s \odot x + t, \quad s = \gamma / \sqrt{\sigma^2_{run} + \epsilon},
           \quad t = \beta - \mu_{run} \odot s

Every fold below is computed in float64 and cast back to the dtype *and strides* of the
parameter it replaces, so channels_last weights stay channels_last.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "bn_scale_shift",
    "bn_scale_shift_many",
    "fold_conv_bn",
    "fold_conv_transpose_bn",
    "fold_linear_bn",
    "fold_bn_conv",
    "fold_bn_linear",
    "cast_like",
    "rel_error",
    "same_nonfinite",
    "float64_workspace",
]


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Return ``(s, t)`` in float64 with ``s = γ / sqrt(var + eps)`` and ``t = β − μ·s``.

    ``γ = 1`` and ``β = 0`` when ``weight`` / ``bias`` are ``None`` (``affine=False``).
    """
    return bn_scale_shift_many([(running_mean, running_var, eps, weight, bias)])[0]


def bn_scale_shift_many(
    stats: list[tuple[Tensor, Tensor, float, Tensor | None, Tensor | None]],
) -> list[tuple[Tensor, Tensor]]:
    """:func:`bn_scale_shift` for many BatchNorms at once (``(running_mean, running_var, eps,
    weight, bias)`` each, one device): a dozen tensor ops in all instead of a dozen per BN.
    ``s = rsqrt(var + ε)·γ`` and ``t = −μ·s + β`` in float64; a missing γ/β enters as exactly
    1/0."""
    if not stats:
        return []
    sizes = [int(m.numel()) for m, *_ in stats]

    def flat(ts: list[Tensor]) -> Tensor:
        with torch.no_grad():  # one cat; only the rare non-1-D tensor pays a reshape
            return torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in ts]).to(
                torch.float64)

    mean = flat([m for m, *_ in stats])
    var = flat([v for _, v, *_ in stats])
    eps = torch.tensor([float(e) for _, _, e, *_ in stats], dtype=torch.float64,
                       device=mean.device).repeat_interleave(torch.tensor(sizes,
                                                                          device=mean.device))
    weight = flat([w if w is not None else torch.ones_like(m) for m, _, _, w, _ in stats])
    bias = flat([b if b is not None else torch.zeros_like(m) for m, _, _, _, b in stats])
    s = torch.rsqrt(var + eps) * weight
    t = -mean * s + bias
    return list(zip(s.split(sizes), t.split(sizes)))


def cast_like(value: Tensor, ref: Tensor) -> Tensor:
    """Cast ``value`` to ``ref``'s dtype and device, and copy it into ``ref``'s exact strides."""
    out = torch.empty_strided(ref.size(), ref.stride(), dtype=ref.dtype, device=ref.device)
    out.copy_(value.detach())
    return out


def _bias64(bias: Tensor | None, n: int, like: Tensor) -> Tensor:
    if bias is None:
        return torch.zeros(n, dtype=torch.float64, device=like.device)
    return bias.detach().to(torch.float64)


def _scaled(weight: Tensor, scale: Tensor, like: Tensor | None) -> Tensor:
    """``weight · scale`` computed in float64 (``scale`` is float64, so that is the kernel's
    compute dtype); stored in float64, or straight into ``like``'s dtype and strides, block by
    block (no float64 copy of the whole weight is ever materialised)."""
    if like is None:
        return weight.detach().to(torch.float64, copy=True).mul_(scale)
    out = torch.empty_strided(like.size(), like.stride(), dtype=like.dtype, device=like.device)
    w = weight.detach()
    # blocks of output channels small enough for their float64 copy to stay in cache:
    # ~2.5x faster than one mixed-dtype kernel over the whole tensor, bitwise the same. The
    # block is copied into a work buffer (never the caller's tensor: for a float64 weight
    # ``.to(float64)`` is the weight itself, which mul_ would scale in place) and scaled there.
    # The blocks come from three ``split`` calls: per block, three kernels and no indexing.
    n = w.shape[0]
    if n == 0:
        return out
    row = w[0].numel()
    rows = min(n, max(1, _BLOCK // max(1, row)))
    full = _work_buffer(rows * row, w.device)[:rows * row].view((rows,) + tuple(w.shape[1:]))
    if rows == n:  # one block (most weights): no split at all
        _block(out, full, w, scale)
        return out
    for wb, sb, ob in zip(w.split(rows), scale.split(rows), out.split(rows)):
        _block(ob, full if wb.shape[0] == rows else full[:wb.shape[0]], wb, sb)
    return out


def _block(out: Tensor, tmp: Tensor, w: Tensor, scale: Tensor) -> None:
    """``out ← round(w · scale)`` through the float64 buffer ``tmp``: three elementwise kernels,
    so the bits do not depend on how many threads run them. Large blocks inside a workspace
    opened with ``threads > 1`` may run on that many intra-op threads (:class:`_Threads`)."""
    pool = getattr(_local, "threads", None)
    k = w.numel()
    if pool is None or pool.n <= 1 or k < _TIMED or w.device.type != "cpu":
        out.copy_(tmp.copy_(w).mul_(scale))
        return
    if pool.serial is None:  # the first large block: one thread, the reference time
        free = _free_cores()  # and a look at the machine: other runnable tasks take cores
        if free is not None:
            pool.n = max(1, min(pool.n, free))
        t = _clock()
        out.copy_(tmp.copy_(w).mul_(scale))
        pool.serial = (_clock() - t) / k
        return
    before = torch.get_num_threads()
    torch.set_num_threads(pool.n)
    try:
        t = _clock()
        out.copy_(tmp.copy_(w).mul_(scale))
        took = _clock() - t
    finally:
        torch.set_num_threads(before)
    ratio = took / (pool.serial * k) if pool.serial > 0 else float("inf")
    pool.slow = pool.slow + 1 if ratio > 1.0 else 0
    if ratio > _STALLED or pool.slow >= 2:
        pool.n = 1  # busy cores: one thread from now on


def _free_cores() -> int | None:
    """Cores this process may use minus the other tasks runnable right now (Linux's
    ``procs_running`` counts this thread too), or ``None`` where that cannot be read."""
    try:
        with open("/proc/stat", "rb") as f:
            running = next(int(line.split()[1]) for line in f
                           if line.startswith(b"procs_running "))
        cores = len(os.sched_getaffinity(0))
    except (OSError, StopIteration, ValueError, AttributeError, IndexError):
        return None
    return cores - (running - 1)


@dataclass
class _Threads:
    """The intra-op threads that the large blocked products of one workspace may use, chosen
    by looking at the machine and timing the blocks, never assumed.

    On idle cores two threads make the fold math ~25% faster (the in-cache float64 passes
    scale); on busy cores a parallel kernel waits for a descheduled thread, and a conversion
    of many such kernels took 25-40x longer. So the first large block runs at the ambient
    setting (one thread inside ``convert``): its time per element is the reference, and ``n``
    is capped at the cores free at that moment (the cores this process may use minus the
    other runnable tasks, where Linux tells). Later large blocks run on ``n`` threads until
    one is 1.5x slower than the reference (a stall) or two in a row are slower at all (no
    gain), and on one thread for the rest of the workspace from then on: at most two blocks
    pay for a load that starts mid-conversion. Small kernels (below ``_TIMED`` elements)
    always run on one thread.
    """

    n: int
    serial: float | None = None  # seconds per element of the reference block
    slow: int = 0  # parallel blocks in a row slower than the reference


_TIMED = 1 << 17  # elements from which a block is timed and may run on several threads
_STALLED = 1.5  # a parallel block this much slower than the one-thread rate: a stall
_clock = time.perf_counter  # (tests replace it to play a busy machine)
_local = threading.local()


@contextmanager
def float64_workspace(threads: int = 1) -> Iterator[None]:
    """Within the block, the blocked float64 products of this thread reuse one work buffer,
    and large ones may use up to ``threads`` intra-op threads (:class:`_Threads`; the thread
    setting is restored after each such block).

    Without the buffer each block allocates a fresh 2 MiB buffer; the allocator maps such sizes
    freshly from the OS, so every block pays ~500 page faults: on ResNet-50 that was 22k faults
    and half of the conversion time. The buffer never escapes: results are copied out of it.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    before = getattr(_local, "buffers", None), getattr(_local, "threads", None)
    _local.buffers, _local.threads = {}, _Threads(threads)
    try:
        yield
    finally:
        _local.buffers, _local.threads = before


def _work_buffer(n: int, device: torch.device) -> Tensor:
    """A float64 buffer of at least ``n`` elements: the workspace's when one is open on this
    thread (grown as needed), else a fresh one."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        return torch.empty(n, dtype=torch.float64, device=device)
    buf = buffers.get(device)
    if buf is None or buf.numel() < n:
        buf = buffers[device] = torch.empty(max(n, _BLOCK), dtype=torch.float64, device=device)
    return buf


_BLOCK = 1 << 18  # elements per float64 block (2 MiB: L2-L3 sized; fewer Python-level ops)


def _finish(b: Tensor, like: Tensor | None) -> Tensor:
    return b if like is None else b.to(like.dtype)


def fold_conv_bn(
    weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor, *, like: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Conv → BN: ``W'[o] = W[o]·s[o]``, ``b' = s·b + t`` (exact for any stride/padding/groups).

    ``weight`` is (Cout, Cin/g, k...). Computed in float64; returned in float64, or in ``like``'s
    dtype (and strides, for W') when given, rounded once from the float64 product.
    """
    shape = (-1,) + (1,) * (weight.dim() - 1)
    w = _scaled(weight, s.reshape(shape), like)
    b = s * _bias64(bias, s.numel(), s) + t
    return w, _finish(b, like)


def fold_conv_transpose_bn(
    weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    r"""ConvTranspose → BN.

    ``W`` is (Cin, Cout/g, k...). Output channel ``o = g_idx·(Cout/g) + j`` lives at
    ``W[g_idx·(Cin/g) + i, j]``; so view W as (g, Cin/g, Cout/g, k...) and multiply by ``s``
    viewed (g, 1, Cout/g, 1...). ``b' = s·b + t``.
    """
    cin, cout_g = weight.shape[0], weight.shape[1]
    k = tuple(weight.shape[2:])
    w = weight.detach().to(torch.float64).reshape((groups, cin // groups, cout_g) + k)
    w = w * s.reshape((groups, 1, cout_g) + (1,) * len(k))
    b = s * _bias64(bias, s.numel(), s) + t
    return w.reshape(weight.shape), b


def fold_linear_bn(
    weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor, *, like: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Linear → BatchNorm1d on a 2-D (N, F) tensor: ``W'[o,:] = W[o,:]·s[o]``, ``b' = s·b + t``."""
    return fold_conv_bn(weight, bias, s, t, like=like)


def fold_bn_conv(
    weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    r"""BN → Conv (BN *before* the conv): ``W'[o,i] = W[o,i]·s[c(o,i)]``,
    ``b'[o] = b[o] + Σ_{i,k} W[o,i,k]·t[c(o,i)]`` with the group-aware input channel
    ``c(o,i) = (o // (Cout/g))·(Cin/g) + i``.

    Exact only when the conv never reads padded zeros that the BN would have shifted
    (padding 0, a non-zero padding mode, or ``t == 0``); the caller checks that.
    """
    cout, cin_g = weight.shape[0], weight.shape[1]
    cout_g = cout // groups
    k = tuple(weight.shape[2:])
    w64 = weight.detach().to(torch.float64)
    # s_oi[o, i] = s[c(o, i)]
    s_g = s.reshape(groups, 1, cin_g).expand(groups, cout_g, cin_g).reshape(cout, cin_g)
    t_g = t.reshape(groups, 1, cin_g).expand(groups, cout_g, cin_g).reshape(cout, cin_g)
    ones = (1,) * len(k)
    w = w64 * s_g.reshape((cout, cin_g) + ones)
    b = _bias64(bias, cout, s) + (w64 * t_g.reshape((cout, cin_g) + ones)).sum(
        dim=tuple(range(1, w64.dim()))
    )
    return w, b


def fold_bn_linear(
    weight: Tensor, bias: Tensor | None, s: Tensor, t: Tensor
) -> tuple[Tensor, Tensor]:
    r"""BN → Linear on a 2-D input: ``W'[:, i] = W[:, i]·s[i]``, ``b' = b + W·t``."""
    w64 = weight.detach().to(torch.float64)
    return w64 * s.reshape(1, -1), _bias64(bias, weight.shape[0], s) + w64 @ t


def rel_error(y: Tensor, ref: Tensor) -> float:
    r"""``max|y − ref| / max(max|ref|, 1e-12)`` (docs/bars.md), computed in float64."""
    y64, r64 = y.detach().to(torch.float64), ref.detach().to(torch.float64)
    if r64.numel() == 0:
        return 0.0
    return float((y64 - r64).abs().max() / max(float(r64.abs().max()), 1e-12))


def same_nonfinite(y: Tensor, ref: Tensor) -> bool:
    """``y`` is non-finite exactly where ``ref`` is: NaN in the same places and the same ±inf
    (same shapes assumed). Where a model's own output overflows, a conversion or a file that
    agrees with it is compared on the finite entries only."""
    bad = ~torch.isfinite(ref)
    return torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(
        torch.where(torch.isnan(ref), 0, y)[bad], torch.where(torch.isnan(ref), 0, ref)[bad])


def fold_weights(kind: str, direction: str, weight: Tensor, bias: Tensor | None, s: Tensor,
                 t: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    r"""``(W', b')`` of one fold, in the weight's dtype (and, for Conv/Linear → BN, its strides),
    rounded once from float64: the one entry point every front end (nn.Module graphs,
    ExportedPrograms, ONNX files) uses.

    ``kind``: ``"conv"``, ``"convtranspose"`` or ``"linear"``; ``direction``: ``"producer"``
    (the layer, then BN) or ``"consumer"`` (BN, then the layer). BN → ConvTranspose has no
    exact fold and raises ``ValueError``.
    """
    if direction == "producer":
        if kind == "convtranspose":
            w, b = fold_conv_transpose_bn(weight, bias, s, t, groups)
            return cast_like(w, weight), b.to(weight.dtype)
        return fold_conv_bn(weight, bias, s, t, like=weight)
    if kind == "conv":
        w, b = fold_bn_conv(weight, bias, s, t, groups)
    elif kind == "linear":
        w, b = fold_bn_linear(weight, bias, s, t)
    else:
        raise ValueError(f"no exact fold of BatchNorm before a {kind}")
    return cast_like(w, weight), b.to(weight.dtype)


def channel_moments(x: Tensor) -> tuple[int, Tensor, Tensor]:
    r"""``(n, mean, M2)`` per channel (axis 1) of ``x``, returned in float64: ``n`` values per
    channel (N·spatial), their mean, and ``M2 = Σ(x − mean)² = n·var``. The batch's mean and
    variance come from ``torch.var_mean`` (a shifted, Welford-style kernel: never
    ``E[x²] − m²``) in the input's precision, float32 at least; batches then merge in float64
    (:func:`merge_moments`)."""
    c = x.shape[1] if x.dim() > 1 else x.shape[0]
    if x.dim() < 2:
        x = x.reshape(1, c)
    n = x.numel() // c if c else 0
    if n == 0:
        z = torch.zeros(c, dtype=torch.float64, device=x.device)
        return 0, z, z.clone()
    work = x.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    dims = (0, *range(2, work.dim()))
    var, mean = torch.var_mean(work, dim=dims, correction=0)
    return n, mean.double(), var.double() * n


def merge_moments(a: tuple[int, Tensor, Tensor], b: tuple[int, Tensor, Tensor]
                  ) -> tuple[int, Tensor, Tensor]:
    r"""Chan et al.'s parallel merge of two ``(n, mean, M2)``: ``n = n_a + n_b``,
    ``δ = m_b − m_a``, ``m = m_a + δ·n_b/n``, ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``."""
    na, ma, qa = a
    nb, mb, qb = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), qa + qb + delta.pow(2) * (na * nb / n)
