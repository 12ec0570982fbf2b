"""What CBN and RBN share with BatchNorm: running statistics, momentum, sync across processes.

Neither layer subclasses ``_BatchNorm`` (docs/cbn-rbn.md): ``isinstance(m, _BatchNorm)`` checks in
``SyncBatchNorm.convert_sync_batchnorm`` or folding passes would treat them as plain BN and
silently drop the condition or the calibration. Instead they carry the same parameter and buffer
names (so BN checkpoints load) and this module gives them BN's statistics semantics.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NormStatsMixin", "convert_sync", "per_sample_affine", "instance_moments"]


class _InstanceMoments(torch.autograd.Function):
    r"""``(mean, biased variance)`` over the spatial axes, with a one-pass backward.

    The variance is computed by ``torch.var_mean`` (a shifted, Welford-style kernel), never as
    ``E[x²] − m²``, which cancels catastrophically when ``|mean| ≫ std`` (inputs with mean/std
    = 3,000 came out 25% off). Backward: ``∂m/∂x = 1/L`` and ``∂v/∂x = 2(x − m)/L`` (the
    dependence through ``m`` cancels because ``Σ(x − m) = 0``), so
    ``∂/∂x = x·(2g_v/L) + (g_m − 2g_v·m)/L`` is a per-sample affine map of x."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        n, c = x.shape[0], x.shape[1]
        v, m = torch.var_mean(x.reshape(n, c, -1), dim=-1, correction=0)
        ctx.save_for_backward(x, m)
        return m, v

    @staticmethod
    def backward(ctx, g_m: Tensor, g_v: Tensor) -> Tensor:  # type: ignore[override]
        x, m = ctx.saved_tensors
        length = x[0, 0].numel()
        alpha = g_v * (2.0 / length)
        return per_sample_affine(x, alpha, g_m / length - alpha * m)


def instance_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-instance, per-channel ``(mean, biased variance)`` over the spatial axes, (N, C).
    An empty batch gives (0, C) tensors."""
    if x.shape[0] == 0:
        empty = x.sum(tuple(range(2, x.dim())))
        return empty, empty
    if x.is_contiguous() and x.dim() > 2 and not torch.jit.is_tracing():
        return _InstanceMoments.apply(x)
    v, m = torch.var_mean(x, dim=tuple(range(2, x.dim())), correction=0)
    return m, v


def per_sample_affine(x: Tensor, alpha: Tensor, shift: Tensor) -> Tensor:
    r"""``y[n, c] = x[n, c] · α[n, c] + β'[n, c]`` for (N, C, ...) ``x`` and (N, C) ``α, β'``.

    A per-sample affine map *is* an eval-mode BatchNorm over N·C channels with mean 0, var 1,
    eps 0 (so ``invstd = 1`` exactly): viewing x as (1, N·C, ...) runs it through PyTorch's
    fused BN kernels, forward and backward (one pass each), instead of a broadcast multiply-add.
    """
    n, c = x.shape[0], x.shape[1]
    if x.dim() > 2 and x.is_contiguous() and n * c > 0 and not torch.jit.is_tracing():
        flat = x.reshape((1, n * c) + tuple(x.shape[2:]))
        stats = torch.zeros(2, n * c, dtype=x.dtype, device=x.device)
        stats[1] = 1.0
        y = F.batch_norm(flat, stats[0], stats[1], alpha.reshape(-1), shift.reshape(-1), False,
                         0.0, 0.0)
        return y.reshape(x.shape)
    shape = (n, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.reshape(shape), x, alpha.reshape(shape))


class NormStatsMixin(nn.Module):
    """Buffers ``running_mean``, ``running_var``, ``num_batches_tracked`` and BN's update rule.

    ``freeze_stats=True`` normalizes with the running statistics in training too and never
    updates them (the pretrained network stays frozen, as in the CBN paper).
    """

    _normsurgeon_layer = True
    num_features: int
    eps: float
    momentum: float | None
    track_running_stats: bool
    freeze_stats: bool
    process_group: Any

    def _init_stats(self, num_features: int, eps: float, momentum: float | None,
                     track_running_stats: bool, freeze_stats: bool) -> None:
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if freeze_stats and not track_running_stats:
            raise ValueError("freeze_stats=True needs running statistics "
                             "(track_running_stats=True)")
        self.num_features, self.eps, self.momentum = num_features, float(eps), momentum
        self.track_running_stats, self.freeze_stats = track_running_stats, freeze_stats
        self.sync = False  # set by convert_sync(): all-reduce batch statistics in training
        self.process_group = None  # None with sync=True means the default (world) group
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def uses_batch_stats(self) -> bool:
        return (self.training and not self.freeze_stats) or not self.track_running_stats

    def _momentum_factor(self) -> float:
        """BN's exponential_average_factor, ``momentum=None`` meaning a cumulative average."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return float(self.momentum)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__} expected input of shape (N, "
                             f"{self.num_features}, ...), got {tuple(x.shape)}")

    def _channel_stats(self, m_inst: Tensor, v_inst: Tensor, per_instance: int
                       ) -> tuple[Tensor, Tensor]:
        r"""``(μ, 1/sqrt(σ² + ε))`` per channel for the current mode.

        Running statistics in eval (or when frozen). Otherwise the batch statistics, built from
        the per-instance moments ``m_inst, v_inst`` (N, C) of ``per_instance`` values each, by
        the law of total variance: ``μ_B = mean_n m``, ``σ²_B = mean_n v + mean_n (m − μ_B)²``
        (biased, for normalizing; the running variance gets the unbiased one, as in BN).
        With ``sync``, the sums are all-reduced (differentiably) across processes.
        """
        if not self.uses_batch_stats():
            return self.running_mean, torch.rsqrt(self.running_var + self.eps)
        n = m_inst.shape[0]
        factor = self._momentum_factor()
        if self._sync_active():
            mean, var, total = self._synced_stats(m_inst, v_inst, per_instance)
        else:
            if n * per_instance <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got "
                                 f"{n} sample(s) of {per_instance} value(s)")
            mean = m_inst.mean(0)
            var = v_inst.mean(0) + (m_inst - mean).pow(2).mean(0)
            total = m_inst.new_tensor(float(n * per_instance))
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var.detach() * (total / (total - 1.0).clamp_min(1.0))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return mean, torch.rsqrt(var + self.eps)

    def _synced_stats(self, m_inst: Tensor, v_inst: Tensor, per_instance: int
                      ) -> tuple[Tensor, Tensor, Tensor]:
        r"""Global ``(μ, biased σ², count)`` over every process of the group.

        Each rank contributes its count ``N_r = n·L``, mean ``μ_r`` and biased variance
        ``σ²_r`` (deviations from its own mean: stable); one differentiable all-gather brings
        them together, merged as ``μ = Σ N_r μ_r / N``, ``σ² = Σ N_r (σ²_r + (μ_r − μ)²) / N``
        (Chan et al.'s parallel formula, never ``E[x²] − μ²``). An empty rank contributes
        ``N_r = 0``; like SyncBatchNorm, only a global count of at most 1 is an error (raised
        on every rank, none left waiting in a collective). The count stays a tensor: no host
        synchronisation per layer on an accelerator."""
        from torch.distributed.nn.functional import all_gather

        n, c = m_inst.shape[0], self.num_features
        count = m_inst.new_full((1,), float(n * per_instance))
        if n > 0:
            mu = m_inst.mean(0)
            var = v_inst.mean(0) + (m_inst - mu).pow(2).mean(0)
        else:
            mu = var = m_inst.sum(0)  # zeros of shape (C,), still in the autograd graph
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        with warnings.catch_warnings():  # deprecated name, still the differentiable one
            warnings.simplefilter("ignore", FutureWarning)
            parts = all_gather(torch.cat([mu, var, count]), group=group)
        table = torch.stack(parts)                      # (world, 2C + 1)
        counts = table[:, -1:]                          # (world, 1)
        total = counts.sum()
        # the same verdict on every rank (none is left waiting in a later collective); on an
        # accelerator an asynchronous assertion, so no host synchronisation per layer
        if total.device.type == "cpu":
            if bool(total <= 1):
                raise ValueError(f"Expected more than 1 value per channel when training, got "
                                 f"{int(total)} over the process group")
        else:
            torch._assert_async(total > 1, "Expected more than 1 value per channel when "
                                "training, over the process group")
        w = counts / total
        mean = (w * table[:, :c]).sum(0)
        var = (w * (table[:, c:2 * c] + (table[:, :c] - mean).pow(2))).sum(0)
        return mean, var, total

    def _sync_active(self) -> bool:
        return (self.sync and self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def _copy_stats_from(self, bn: nn.Module) -> None:
        if self.track_running_stats and getattr(bn, "running_mean", None) is not None:
            with torch.no_grad():
                self.running_mean.copy_(bn.running_mean)
                self.running_var.copy_(bn.running_var)
                if getattr(bn, "num_batches_tracked", None) is not None:
                    self.num_batches_tracked.copy_(bn.num_batches_tracked)

    def _stats_repr(self) -> str:
        return (f"eps={self.eps}, momentum={self.momentum}, "
                f"track_running_stats={self.track_running_stats}, "
                f"freeze_stats={self.freeze_stats}")


def convert_sync(module: nn.Module, process_group: Any = None) -> nn.Module:
    """The counterpart of ``SyncBatchNorm.convert_sync_batchnorm`` for normsurgeon layers:
    in training, their batch statistics are all-reduced over ``process_group`` (default: the
    world). Plain BatchNorm is converted by torch's own function."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for m in module.modules():
        if isinstance(m, NormStatsMixin):
            m.sync, m.process_group = True, process_group
    return module
