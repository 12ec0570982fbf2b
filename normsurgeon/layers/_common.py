"""What CBN and RBN share with BatchNorm: running statistics, momentum, sync across processes.

Neither layer subclasses ``_BatchNorm`` (SPEC §4b): ``isinstance(m, _BatchNorm)`` checks in
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

__all__ = ["NormStatsMixin", "convert_sync"]


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

    def _normalize(self, x: Tensor) -> Tensor:
        r"""``x̂ = (x − μ) / sqrt(σ² + ε)`` with BN's choice of statistics (SPEC §1)."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__} expected input of shape (N, "
                             f"{self.num_features}, ...), got {tuple(x.shape)}")
        if not self.uses_batch_stats():
            return F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0,
                                self.eps)
        factor = self._momentum_factor()
        if self._sync_active():
            return self._sync_normalize(x, factor)
        return F.batch_norm(x, self.running_mean, self.running_var, None, None, True, factor,
                            self.eps)

    # -- synchronized batch statistics (SyncBatchNorm semantics) ---------------------------------
    def _sync_active(self) -> bool:
        return (self.sync and self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def _sync_normalize(self, x: Tensor, factor: float) -> Tensor:
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        with warnings.catch_warnings():  # deprecated name, still the differentiable one
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(stats, group=group)
        c = self.num_features
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        shape = (1, c) + (1,) * (x.dim() - 2)
        return (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)

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
