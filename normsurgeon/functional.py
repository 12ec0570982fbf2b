r"""Pure tensor math for BatchNorm surgery. No ``nn.Module``, no FX.

Eval-mode BatchNorm is a per-channel affine map (docs/math.md):

.. math::  y = s \odot x + t, \quad s = \gamma / \sqrt{\sigma^2_{run} + \epsilon},
           \quad t = \beta - \mu_{run} \odot s

The fold math itself lives in :mod:`normsurgeon.foldmath` (written once for torch tensors and
numpy arrays) and the error measure in :mod:`normsurgeon.verdict`; both are re-exported here.
This module adds the torch-only parts: the blocked float64 kernel that scales Conv/Linear
weights (cast back to the dtype *and strides* of the parameter it replaces, so channels_last
weights stay channels_last), and the batch moments of recalibration.
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

from .foldmath import (
    bn_scale_shift,
    bn_scale_shift_many,
    cast_like,
    fold_bn_conv,
    fold_bn_linear,
    fold_conv_bn,
    fold_conv_transpose_bn,
    fold_linear_bn,
    fold_weights,
)
from .verdict import rel_error, same_nonfinite

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
    "fold_weights",
    "channel_moments",
    "merge_moments",
]


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
