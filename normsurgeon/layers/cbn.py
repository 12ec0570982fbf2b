r"""Conditional BatchNorm (de Vries et al., 2017), docs/layers.md.

.. math::
    [Δγ, Δβ] = W_2 \, \mathrm{relu}(W_1 e + b_1) + b_2, \qquad
    y_{n,c} = (γ_c + Δγ_{n,c}) \, \hat x_{n,c} + (β_c + Δβ_{n,c})

with ``x̂`` normalized by the base BN statistics and ``γ, β`` the (frozen) base affine.
``W_2, b_2`` start at zero, so a freshly converted layer equals the BN it came from for every
condition. With ``num_classes`` the condition is an integer label ``y ∈ [0, K)`` embedded by
``nn.Embedding(K, E)`` first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConditionError
from ..onnx.ops import current_export_mode, record_cbn_rank
from ._common import NormStatsMixin, instance_moments, per_sample_affine

__all__ = ["ConditionalBatchNorm1d", "ConditionalBatchNorm2d", "ConditionalBatchNorm3d",
           "ConditionSpec", "check_condition", "ConditionSlot", "ConditionCheck",
           "unambiguous_batch"]


class ConditionSpec:
    """What a condition must look like: ``(N, cond_dim)`` floats, or ``(N,)`` integer labels
    in ``[0, num_classes)``."""

    def __init__(self, cond_dim: int, num_classes: int | None = None) -> None:
        self.cond_dim, self.num_classes = cond_dim, num_classes

    def describe(self, n: int | str = "N") -> str:
        if self.num_classes is not None:
            return f"integer labels of shape ({n},) in [0, {self.num_classes})"
        return f"a float tensor of shape ({n}, {self.cond_dim})"

    def __repr__(self) -> str:
        return f"ConditionSpec(cond_dim={self.cond_dim}, num_classes={self.num_classes})"


def check_condition(cond: Any, batch: int | None, spec: ConditionSpec) -> None:
    """Raise :class:`ConditionError` (a ValueError) naming the expected shape, or
    ``TypeError`` when the condition is missing or not a tensor."""
    if (torch.jit.is_tracing() or torch.compiler.is_exporting()
            or torch.onnx.is_in_onnx_export()):
        return  # shapes are symbolic here; the exported graph is checked by verify_onnx
    compiling = torch.compiler.is_compiling()  # static checks only: no value reads, no sync
    n = batch if batch is not None else "N"
    if cond is None:
        raise TypeError(f"missing condition: expected {spec.describe(n)}")
    if not isinstance(cond, Tensor):
        raise TypeError(f"condition must be a tensor, got {type(cond).__name__}; "
                        f"expected {spec.describe(n)}")
    if spec.num_classes is not None:
        if cond.is_floating_point() or cond.is_complex() or cond.dtype == torch.bool:
            raise ConditionError(f"condition has dtype {cond.dtype}; expected "
                                 f"{spec.describe(n)}")
        if cond.dim() != 1:
            raise ConditionError(f"condition has shape {tuple(cond.shape)}; expected "
                                 f"{spec.describe(n)}")
        if not compiling and cond.numel() and (int(cond.min()) < 0
                                               or int(cond.max()) >= spec.num_classes):
            raise ConditionError(f"condition labels out of range [{int(cond.min())}, "
                                 f"{int(cond.max())}]; expected {spec.describe(n)}")
    else:
        if not cond.is_floating_point():
            raise ConditionError(f"condition has dtype {cond.dtype}; expected "
                                 f"{spec.describe(n)}")
        if cond.dim() != 2 or cond.shape[1] != spec.cond_dim:
            raise ConditionError(f"condition has shape {tuple(cond.shape)}; expected "
                                 f"{spec.describe(n)}")
    if batch is not None and cond.shape[0] != batch:
        raise ConditionError(f"condition has batch size {cond.shape[0]} but the input has "
                             f"{batch}; expected {spec.describe(n)}")


def unambiguous_batch(inputs: Any) -> int | None:
    """The batch size of a model's inputs when they agree on it: the leading size shared by
    every tensor input of rank ≥ 1, else ``None`` (then each CBN checks the batch it sees)."""
    if (torch.jit.is_tracing() or torch.compiler.is_exporting()
            or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
        return None  # int() of a symbolic size would specialise the batch axis
    sizes = {int(a.shape[0]) for a in inputs if isinstance(a, Tensor) and a.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


class ConditionCheck(nn.Module):
    """``check(cond, *inputs)``: validate the condition before any computation and return it.
    A module (a leaf for fx) so that a pickled GraphModule re-traces it as a call."""

    def __init__(self, cond_dim: int, num_classes: int | None) -> None:
        super().__init__()
        self.cond_dim, self.num_classes = cond_dim, num_classes

    def forward(self, cond: Any, *inputs: Any) -> Any:
        check_condition(cond, unambiguous_batch(inputs),
                        ConditionSpec(self.cond_dim, self.num_classes))
        return cond

    def extra_repr(self) -> str:
        return f"cond_dim={self.cond_dim}, num_classes={self.num_classes}"


class ConditionSlot:
    """Shared by every CBN of a wrapped model: the wrapper puts the condition here."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Tensor | None = None


class _ConditionalBatchNorm(NormStatsMixin):
    _dims: int = 4

    def __init__(self, num_features: int, cond_dim: int, hidden_dim: int | None = None,
                 num_classes: int | None = None, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, freeze_base: bool = True,
                 freeze_stats: bool = True) -> None:
        super().__init__()
        if cond_dim <= 0:
            raise ValueError(f"cond_dim must be positive, got {cond_dim}")
        if num_classes is not None and num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self._init_stats(num_features, eps, momentum, track_running_stats, freeze_stats)
        self.affine, self.freeze_base = affine, freeze_base
        self.cond_dim, self.num_classes = cond_dim, num_classes
        self.hidden_dim = hidden_dim if hidden_dim is not None else max(cond_dim, 64)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features), requires_grad=not freeze_base)
            self.bias = nn.Parameter(torch.zeros(num_features), requires_grad=not freeze_base)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.embedding = nn.Embedding(num_classes, cond_dim) if num_classes else None
        self.cond_mlp = nn.Sequential(nn.Linear(cond_dim, self.hidden_dim), nn.ReLU(),
                                      nn.Linear(self.hidden_dim, 2 * num_features))
        self.reset_delta()
        self.spec = ConditionSpec(cond_dim, num_classes)
        self._slot: ConditionSlot | None = None

    def reset_delta(self) -> None:
        """Zero the last MLP layer: Δγ = Δβ = 0 for every condition (function preserving)."""
        nn.init.zeros_(self.cond_mlp[2].weight)
        nn.init.zeros_(self.cond_mlp[2].bias)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, cond_dim: int, hidden_dim: int | None = None,
                       num_classes: int | None = None, freeze_base: bool = True,
                       freeze_stats: bool = True) -> _ConditionalBatchNorm:
        """A CBN equal to ``bn`` for every condition (until its MLP is trained)."""
        track = getattr(bn, "running_mean", None) is not None
        affine = getattr(bn, "weight", None) is not None
        ref = bn.running_mean if track else bn.weight
        layer = cls(bn.num_features, cond_dim, hidden_dim, num_classes, eps=bn.eps,
                    momentum=bn.momentum, affine=affine, track_running_stats=track,
                    freeze_base=freeze_base, freeze_stats=freeze_stats and track)
        layer._copy_stats_from(bn)
        if affine:
            with torch.no_grad():
                layer.weight.copy_(bn.weight)
                layer.bias.copy_(bn.bias)
        if ref is not None:
            layer.to(device=ref.device, dtype=ref.dtype)
        layer.train(bn.training)
        return layer

    def new_parameters(self) -> dict[str, list[nn.Parameter]]:
        """``{"decay": [W1, (embedding)], "no_decay": [b1, W2, b2]}``: the delta predictor."""
        decay = [self.cond_mlp[0].weight]
        if self.embedding is not None:
            decay.append(self.embedding.weight)
        return {"decay": decay,
                "no_decay": [self.cond_mlp[0].bias, self.cond_mlp[2].weight,
                             self.cond_mlp[2].bias]}

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None and self._slot is not None:
            cond = self._slot.value
        if x.dim() != self._dims:
            raise ValueError(f"{type(self).__name__} expected a {self._dims}-D input, got "
                             f"shape {tuple(x.shape)}")
        check_condition(cond, x.shape[0], self.spec)
        e = self.embedding(cond) if self.embedding is not None else cond
        c = self.num_features
        self._check_input(x)
        if current_export_mode() == "custom":
            if self.running_mean is None or self.uses_batch_stats():
                raise RuntimeError("ONNX export of a CBN needs running statistics (eval mode, "
                                   "track_running_stats=True)")
            gamma, beta = self._export_affine(e.to(x.dtype))
            record_cbn_rank(x.dim())
            return torch.ops.normsurgeon.cbn(x, gamma, beta, self.running_mean,
                                             self.running_var, self.eps)
        delta = self.cond_mlp(e.to(x.dtype))
        gamma = delta[:, :c] + (self.weight if self.weight is not None else 1.0)
        beta = delta[:, c:] + self.bias if self.bias is not None else delta[:, c:]
        # y = γ̂·(x − μ)·invstd + β̂ as one per-sample affine pass: y = x·α + β',
        # α = γ̂·invstd, β' = β̂ − μ·α (μ, invstd: running, or batch statistics)
        if self.uses_batch_stats():
            m_inst, v_inst = instance_moments(x)
            mean, invstd = self._channel_stats(m_inst, v_inst, x[0, 0].numel())
        else:
            mean, invstd = self._channel_stats(x, x, 1)  # running statistics; args unused
        alpha = gamma * invstd
        shift = beta - mean * alpha
        return per_sample_affine(x, alpha, shift)

    def _export_affine(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """``(γ + Δγ, β + Δβ)`` for export, with γ and β folded into the bias of the MLP's
        last Linear: ``W₂h + (b₂ + [γ; β])``. The exported graph then holds one Gemm whose
        bias is a constant expression (folded by onnxruntime) instead of a Gemm and two Adds
        per site. Same math as forward, up to float rounding order. (Eager forward keeps
        ``delta + [γ; β]``: using this form there made a CBN training step ~5% slower,
        measured on a 4×256×56×56 layer.)"""
        c = self.num_features
        *body, last = self.cond_mlp
        if not isinstance(last, nn.Linear) or last.bias is None:
            delta = self.cond_mlp(e)
            base = torch.cat(self._base_affine(delta))
            both = delta + base
        else:
            h = e
            for layer in body:
                h = layer(h)
            both = F.linear(h, last.weight, last.bias + torch.cat(self._base_affine(last.bias)))
        return both[:, :c], both[:, c:]

    def _base_affine(self, like: Tensor) -> tuple[Tensor, Tensor]:
        c = self.num_features
        ones = like.new_ones(c)
        gamma = self.weight if self.weight is not None else ones
        beta = self.bias if self.bias is not None else like.new_zeros(c)
        return gamma, beta

    def extra_repr(self) -> str:
        return (f"{self.num_features}, cond_dim={self.cond_dim}, hidden_dim={self.hidden_dim}, "
                f"num_classes={self.num_classes}, affine={self.affine}, "
                f"freeze_base={self.freeze_base}, {self._stats_repr()}")


class ConditionalBatchNorm1d(_ConditionalBatchNorm):
    """CBN for (N, C) or (N, C, L) inputs."""

    _dims = 3

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.dim() == 2:
            return super().forward(x.unsqueeze(-1), cond).squeeze(-1)
        return super().forward(x, cond)


class ConditionalBatchNorm2d(_ConditionalBatchNorm):
    """CBN for (N, C, H, W) inputs."""

    _dims = 4


class ConditionalBatchNorm3d(_ConditionalBatchNorm):
    """CBN for (N, C, D, H, W) inputs."""

    _dims = 5
