r"""Representative BatchNorm (Gao et al., CVPR 2021), docs/cbn-rbn.md: from the formulas.

With ``m(z)`` the per-instance, per-channel spatial mean:

.. math::
    x_c = x + w_c \odot m(x) \qquad
    x_n = (x_c - μ) / \sqrt{σ^2 + ε} \qquad
    r = \mathrm{sigmoid}(w_v \odot m(x_n) + b_v) \qquad
    y = γ \odot r \odot x_n + β

(``μ, σ²``: batch statistics of ``x_c`` in training, running statistics of ``x_c`` in eval.)
The paper's init (``w_c = w_v = 0``, ``b_v = 1``) scales every output by sigmoid(1) ≈ 0.731.
A converted layer compensates with a buffer ``scaling_reference`` ``r₀ = sigmoid(b_v)`` taken at
conversion: ``y = γ ⊙ (r / r₀) ⊙ x_n + β`` (``r₀ = 1`` for a layer built from scratch: the
paper's formula). ``weight`` stays the original γ, so the original BatchNorm's checkpoint loads
into a converted model and it is still the original function (docs/cbn-rbn.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..onnx.ops import current_export_mode
from ._common import NormStatsMixin, instance_moments, per_sample_affine

__all__ = ["RepresentativeBatchNorm2d"]


class RepresentativeBatchNorm2d(NormStatsMixin):
    """BatchNorm2d with instance-level centering and scaling calibration.

    Parameters keep BN's names and (C) shapes (``weight``, ``bias``, ``running_mean``,
    ``running_var``), so a BatchNorm2d ``state_dict`` loads unchanged; the calibration adds
    ``centering_weight`` (w_c), ``scaling_weight`` (w_v) and ``scaling_bias`` (b_v).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 freeze_stats: bool = False, scaling_bias_init: float = 1.0) -> None:
        super().__init__()
        self._init_stats(num_features, eps, momentum, track_running_stats, freeze_stats)
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.centering_weight = nn.Parameter(torch.zeros(num_features))
        self.scaling_weight = nn.Parameter(torch.zeros(num_features))
        self.scaling_bias = nn.Parameter(torch.full((num_features,), float(scaling_bias_init)))
        # r₀: the output is scaled by r / r₀; 1 = the paper's formula, sigmoid(b_v) after
        # from_batchnorm (function preserving without touching γ)
        self.register_buffer("scaling_reference", torch.ones(num_features))

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, freeze_stats: bool = False) -> RepresentativeBatchNorm2d:
        """An RBN equal to ``bn``: ``w_c = w_v = 0``, ``b_v = 1``, ``r₀ = sigmoid(b_v)``, and
        γ, β, the running statistics copied unchanged.

        A BN with ``affine=False`` becomes an affine RBN with ``γ = 1``, ``β = 0``.
        """
        track = getattr(bn, "running_mean", None) is not None
        layer = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=True,
                    track_running_stats=track, freeze_stats=freeze_stats and track)
        layer._copy_stats_from(bn)
        with torch.no_grad():
            if getattr(bn, "weight", None) is not None:
                layer.weight.copy_(bn.weight)
            if getattr(bn, "bias", None) is not None:
                layer.bias.copy_(bn.bias)
        ref = bn.running_mean if track else getattr(bn, "weight", None)
        if ref is not None:
            layer.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():  # r₀ in the layer's own dtype (a float64 model: exact to 1e-16)
            layer.scaling_reference.copy_(torch.sigmoid(layer.scaling_bias))
        layer.train(bn.training)
        return layer

    def new_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The calibration parameters; none takes weight decay (docs/cbn-rbn.md)."""
        return {"decay": [],
                "no_decay": [self.centering_weight, self.scaling_weight, self.scaling_bias]}

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"RepresentativeBatchNorm2d expected a 4-D input, got shape "
                             f"{tuple(x.shape)}")
        c = self.num_features
        if x.shape[1] != c:
            raise ValueError(f"RepresentativeBatchNorm2d expected input of shape (N, {c}, H, W),"
                             f" got {tuple(x.shape)}")
        if current_export_mode() == "custom":
            if self.running_mean is None or self.uses_batch_stats():
                raise RuntimeError("ONNX export of an RBN needs running statistics (eval mode, "
                                   "track_running_stats=True)")
            ones = torch.ones_like(self.running_mean)
            gamma = (self.weight if self.weight is not None else ones) / self.scaling_reference
            beta = self.bias if self.bias is not None else ones - 1
            return torch.ops.normsurgeon.rbn(x, self.centering_weight, self.scaling_weight,
                                             self.scaling_bias, gamma, beta, self.running_mean,
                                             self.running_var, self.eps)
        # Per-instance moments of x in one pass. Centering shifts each instance by w_c·m(x), so
        # m(x_c) = (1 + w_c)·m(x) and var(x_c) = var(x); then m(x_n) = (m(x_c) − μ)·invstd and
        # y = γ·r·x_n + β = x·α + β' with α = γ·r·invstd, β' = β + α·(w_c·m(x) − μ):
        # one reduction and one elementwise pass, in training and in eval.
        if self.uses_batch_stats():
            m_x, v_x = instance_moments(x)                              # (N, C) each
        else:  # running statistics: the per-instance variance is not needed
            m_x = x.mean((2, 3))
            v_x = m_x
        m_c = m_x * (1 + self.centering_weight)
        mean, invstd = self._channel_stats(m_c, v_x, x.shape[2] * x.shape[3])
        r = torch.sigmoid(self.scaling_weight * ((m_c - mean) * invstd) + self.scaling_bias)
        gamma = 1 / self.scaling_reference if self.weight is None else (
            self.weight / self.scaling_reference)
        alpha = r * (gamma * invstd)
        shift = alpha * (self.centering_weight * m_x - mean)
        if self.bias is not None:
            shift = shift + self.bias
        return per_sample_affine(x, alpha, shift)

    def extra_repr(self) -> str:
        return f"{self.num_features}, affine={self.affine}, {self._stats_repr()}"
