r"""Conditional BatchNorm (de Vries et al., 2017), docs/cbn-rbn.md.

.. math::
    [Δγ, Δβ] = W_2 \, \mathrm{relu}(W_1 e + b_1) + b_2, \qquad
    y_{n,c} = (γ_c + Δγ_{n,c}) \, \hat x_{n,c} + (β_c + Δβ_{n,c})

with ``x̂`` normalized by the base BN statistics and ``γ, β`` the (frozen) base affine.
``W_2, b_2`` start at zero, so a freshly converted layer equals the BN it came from for every
condition. With ``num_classes`` the condition is an integer label ``y ∈ [0, K)`` embedded by
``nn.Embedding(K, E)`` first.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConditionError
from ..onnx.ops import current_export_mode, record_cbn_rank
from ._common import NormStatsMixin, instance_moments, per_sample_affine

__all__ = ["ConditionalBatchNorm1d", "ConditionalBatchNorm2d", "ConditionalBatchNorm3d",
           "ConditionSpec", "check_condition", "ConditionSlot", "ConditionCheck",
           "unambiguous_batch", "ConditionBank", "shared_condition_bank", "checked_condition"]


class ConditionSpec:
    """What a condition must look like: ``(N, cond_dim)`` floats, or ``(N,)`` integer labels
    in ``[0, num_classes)``."""

    def __init__(self, cond_dim: int, num_classes: int | None = None) -> None:
        self.cond_dim, self.num_classes = cond_dim, num_classes

    def describe(self, n: int | str = "N") -> str:
        if self.num_classes is not None:
            return (f"int64 (or int32) labels of shape ({n},) in [0, {self.num_classes})")
        return f"a float tensor of shape ({n}, {self.cond_dim})"

    def __repr__(self) -> str:
        return f"ConditionSpec(cond_dim={self.cond_dim}, num_classes={self.num_classes})"


def _capturing() -> bool:
    """A graph is being captured (jit trace, torch.export, ONNX export): sizes are symbolic and
    values unknown, so nothing may be read from the condition."""
    return (torch.jit.is_tracing() or torch.compiler.is_exporting()
            or torch.onnx.is_in_onnx_export())


def check_condition(cond: Any, batch: int | None, spec: ConditionSpec) -> None:
    """Raise :class:`ConditionError` (a ValueError) naming the expected shape, or
    ``TypeError`` when the condition is missing or not a tensor.

    The label range test reads values (``min``/``max``: a host synchronisation on a GPU). A
    condition that :func:`checked_condition` already validated in this forward, at the model's
    entry, skips it; shapes and dtypes are checked every time (no values read)."""
    if _capturing():
        return  # shapes are symbolic here; the exported graph is checked by verify_onnx
    compiling = torch.compiler.is_compiling()  # static checks only: no value reads, no sync
    n = batch if batch is not None else "N"
    if cond is None:
        raise TypeError(f"missing condition: expected {spec.describe(n)}")
    if not isinstance(cond, Tensor):
        raise TypeError(f"condition must be a tensor, got {type(cond).__name__}; "
                        f"expected {spec.describe(n)}")
    if spec.num_classes is not None:
        if cond.dtype not in (torch.int64, torch.int32):  # nn.Embedding's index dtypes
            hint = "" if (cond.is_floating_point() or cond.is_complex()
                          or cond.dtype == torch.bool) else "; convert them with labels.long()"
            raise ConditionError(f"condition has dtype {cond.dtype}; expected "
                                 f"{spec.describe(n)}{hint}")
        if cond.dim() != 1:
            raise ConditionError(f"condition has shape {tuple(cond.shape)}; expected "
                                 f"{spec.describe(n)}")
        if not compiling and cond.numel() and not _validated(cond, spec):
            _check_label_range(cond, spec, n)
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


def _check_label_range(cond: Tensor, spec: ConditionSpec, n: int | str) -> None:
    """Labels in ``[0, num_classes)``: reads two values (one host sync on a GPU)."""
    lo, hi = int(cond.min()), int(cond.max())
    if lo < 0 or hi >= spec.num_classes:  # type: ignore[operator]
        raise ConditionError(f"condition labels out of range [{lo}, {hi}]; expected "
                             f"{spec.describe(n)}")


def _validated(cond: Tensor, spec: ConditionSpec) -> bool:
    return getattr(cond, "_ns_validated", None) == (spec.cond_dim, spec.num_classes)


def checked_condition(cond: Any, batch: int | None, spec: ConditionSpec) -> Any:
    """:func:`check_condition`, then the condition to hand to every CBN of this forward: a
    fresh view of it marked as validated for ``spec``, so that the layers skip the value
    test (one ``min``/``max`` per forward instead of one per layer: 53 host synchronisations
    per ResNet-50 forward on a GPU). The mark lives on our own view, made anew each forward,
    never on the caller's tensor. Under tracing, export and compilation ``cond`` itself."""
    check_condition(cond, batch, spec)
    if not isinstance(cond, Tensor) or _capturing() or torch.compiler.is_compiling():
        return cond
    view = cond.view_as(cond)
    view._ns_validated = (spec.cond_dim, spec.num_classes)  # type: ignore[attr-defined]
    return view


def unambiguous_batch(inputs: Any) -> int | None:
    """The batch size of a model's inputs when they agree on it: the leading size shared by
    every tensor input of rank ≥ 1, else ``None`` (then each CBN checks the batch it sees)."""
    if _capturing() or torch.compiler.is_compiling():
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
        return checked_condition(cond, unambiguous_batch(inputs),
                                 ConditionSpec(self.cond_dim, self.num_classes))

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
        self._check_input(x)
        if current_export_mode() == "custom":
            if self.running_mean is None or self.uses_batch_stats():
                raise RuntimeError("ONNX export of a CBN needs running statistics (eval mode, "
                                   "track_running_stats=True)")
            bank = _BANK.current
            shared = bank.affine(self, cond, x.dtype) if bank is not None else None
            if shared is None:  # on its own: a table of one row
                e = self.embedding(cond) if self.embedding is not None else cond
                shared = self._export_affine(e.to(x.dtype)).unsqueeze(0), 0
            record_cbn_rank(x.dim())
            table, row = shared
            return torch.ops.normsurgeon.cbn(x, table, self.running_mean, self.running_var,
                                             self.eps, row)
        e = self.embedding(cond) if self.embedding is not None else cond
        c = self.num_features
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

    def _export_affine(self, e: Tensor) -> Tensor:
        """``[γ + Δγ | β + Δβ]`` (N, 2C) for export, with γ and β folded into the bias of the
        MLP's last Linear: ``W₂h + (b₂ + [γ; β])``. The exported graph then holds one Gemm
        whose bias is a constant expression (folded by onnxruntime) instead of a Gemm and two
        Adds per site. Same math as forward, up to float rounding order. (Eager forward keeps
        ``delta + [γ; β]``: using this form there made a CBN training step ~5% slower,
        measured on a 4×256×56×56 layer.)"""
        mlp = self.cond_mlp
        last = mlp[-1] if isinstance(mlp, nn.Sequential) and len(mlp) else None
        if (type(mlp) is not nn.Sequential or not isinstance(last, nn.Linear)
                or last.bias is None or not _hook_free([mlp, last])):
            delta = mlp(e)  # as forward computes it: its own hooks and overrides run
            return delta + torch.cat(self._base_affine(delta))
        h = e
        for layer in mlp[:-1]:
            h = layer(h)
        return F.linear(h, last.weight, last.bias + torch.cat(self._base_affine(last.bias)))

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


# -- one batched delta computation for many CBN layers (export) ----------------------------
class _BankSlot(threading.local):
    current: ConditionBank | None = None


_BANK = _BankSlot()


def _bankable(layer: nn.Module) -> bool:
    """Whether ``layer``'s ``[γ + Δγ | β + Δβ]`` may be computed by a :class:`ConditionBank`:
    a CBN whose export path is the stock one, whose delta predictor is exactly
    ``Linear → ReLU → Linear`` with biases after a stock ``Embedding`` (no ``max_norm``: that
    renormalises in place) or none, with no hooks on any of them (a bank would bypass them)."""
    if not isinstance(layer, _ConditionalBatchNorm) or (
            type(layer)._export_affine is not _ConditionalBatchNorm._export_affine) or (
            type(layer).forward not in (_ConditionalBatchNorm.forward,
                                        ConditionalBatchNorm1d.forward)):
        return False
    if len({(t.dtype, t.device) for t in layer.parameters()}) != 1:
        return False  # one dtype and device for the whole layer: the bank's constants
    mlp, emb = layer.cond_mlp, layer.embedding
    if type(mlp) is not nn.Sequential or len(mlp) != 3:
        return False
    l1, act, l2 = mlp
    if (type(l1), type(act), type(l2)) != (nn.Linear, nn.ReLU, nn.Linear) or (
            l1.bias is None or l2.bias is None):
        return False
    if emb is not None and (type(emb) is not nn.Embedding or emb.max_norm is not None):
        return False
    return _hook_free([mlp, l1, act, l2] + ([emb] if emb is not None else []))


def _hook_free(mods: list[nn.Module]) -> bool:
    """No forward, pre-forward or backward hook on any of ``mods``, and no global one."""
    from torch.nn.modules import module as _m

    if (_m._global_forward_hooks or _m._global_forward_pre_hooks
            or _m._global_backward_hooks or _m._global_backward_pre_hooks):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   or m._backward_pre_hooks for m in mods)


def _family_key(layer: _ConditionalBatchNorm) -> tuple[Any, ...]:
    l1 = layer.cond_mlp[0]
    emb = layer.embedding
    return (l1.in_features, l1.out_features, emb.num_embeddings if emb is not None else None,
            l1.weight.dtype, l1.weight.device)


class _Family:
    r"""CBN layers with the same condition width E, hidden width H, label count and dtype.

    With the layers ordered by channel count, ``H_all = relu(W₁ e + b₁)`` is one Gemm for all S
    layers (float condition: ``W₁`` is the layers' first weights stacked, (S·H, E)) or one
    Gather and one batched MatMul (labels: ``e`` is the layers' embedding tables side by side,
    (K, S·E), and ``W₁`` is (S, E, H)). Layers with the same channel count C then share one
    batched MatMul ``H_g W₂ᵀ + (b₂ + [γ; β])`` → (S_g, N, 2C), whose row j is layer j's affine:
    the ``normsurgeon`` op takes the table and the row, so a site adds no node of its own."""

    def __init__(self, layers: list[_ConditionalBatchNorm]) -> None:
        layers = sorted(layers, key=lambda m: m.num_features)  # stable: groups contiguous
        first = [m.cond_mlp[0] for m in layers]
        self.count, self.hidden = len(layers), first[0].out_features
        self.width, self.dtype = first[0].in_features, first[0].weight.dtype
        self.labels = layers[0].embedding is not None
        with torch.no_grad():
            if self.labels:
                self.table = torch.cat([m.embedding.weight for m in layers], 1)
                self.w1 = torch.stack([lin.weight.t() for lin in first]).contiguous()
                self.b1 = torch.stack([lin.bias for lin in first]).unsqueeze(1)
            else:
                self.w1 = torch.cat([lin.weight for lin in first])
                self.b1 = torch.cat([lin.bias for lin in first])
            self.groups: list[tuple[int, int, Tensor, Tensor]] = []
            self.index: dict[int, tuple[int, int]] = {}
            start = 0
            while start < len(layers):
                c = layers[start].num_features
                end = start
                while end < len(layers) and layers[end].num_features == c:
                    self.index[id(layers[end])] = (len(self.groups), end - start)
                    end += 1
                part = layers[start:end]
                w2t = torch.stack([m.cond_mlp[2].weight.t() for m in part]).contiguous()
                bias = torch.stack([m.cond_mlp[2].bias + torch.cat(m._base_affine(
                    m.cond_mlp[2].bias)) for m in part]).unsqueeze(1)
                self.groups.append((start, end, w2t, bias))
                start = end

    def compute(self, cond: Tensor) -> list[Tensor]:
        """``[(S_g, N, 2C)]`` per channel group, for the raw condition ``cond``."""
        s, e, h = self.count, self.width, self.hidden
        if self.labels:
            emb = F.embedding(cond, self.table).reshape(-1, s, e).transpose(0, 1)
            hid = torch.relu(torch.matmul(emb, self.w1) + self.b1)          # (S, N, H)
        else:
            hid = torch.relu(F.linear(cond.to(self.dtype), self.w1, self.b1))  # (N, S·H)
            hid = hid.reshape(-1, s, h).transpose(0, 1)                       # (S, N, H)
        return [torch.matmul(hid[a:b], w2t) + bias for a, b, w2t, bias in self.groups]


class ConditionBank:
    """Every bankable CBN layer's ``[γ + Δγ | β + Δβ]`` from one batched computation per
    condition (per family of alike layers), instead of a Gemm, a ReLU and a Gemm per layer.

    Used while exporting: a ResNet-50 CBN graph then holds no node per site besides the op,
    where it held six, and the exporter's capture, decompositions and optimiser pay per node
    (~5 ms each on a 2-core machine). Results are
    cached per condition *object*, so layers called with different conditions each get
    their own; a layer the bank cannot prove it computes exactly as the layer would
    (:func:`_bankable`) is left to its own export path."""

    def __init__(self, layers: list[nn.Module]) -> None:
        families: dict[tuple[Any, ...], list[_ConditionalBatchNorm]] = {}
        for m in layers:
            if _bankable(m):
                families.setdefault(_family_key(m), []).append(m)
        self._where: dict[int, tuple[_Family, int, int]] = {}
        self._keep: list[nn.Module] = []
        for members in families.values():
            if len({id(m) for m in members}) < 2:
                continue  # nothing to share
            fam = _Family(list({id(m): m for m in members}.values()))
            for m in members:
                g, j = fam.index[id(m)]
                self._where[id(m)] = (fam, g, j)
            self._keep.extend(members)
        self._cache: dict[tuple[int, int], tuple[Tensor, list[Tensor]]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def affine(self, layer: nn.Module, cond: Any, dtype: torch.dtype
               ) -> tuple[Tensor, int] | None:
        """``(table, row)``: ``table[row]`` is ``layer``'s (N, 2C) affine for the raw condition
        ``cond`` (``table`` is its channel group's (S_g, N, 2C), shared with the group: no
        per-site op, the ``normsurgeon`` op picks the row). ``None`` when the bank does not
        hold the layer (or the input's dtype differs from the layer's)."""
        where = self._where.get(id(layer))
        if where is None or not isinstance(cond, Tensor):
            return None
        fam, g, j = where
        if dtype != fam.dtype:
            return None
        key = (id(cond), id(fam))
        hit = self._cache.get(key)
        if hit is None or hit[0] is not cond:
            hit = self._cache[key] = (cond, fam.compute(cond))
        return hit[1][g], j


@contextmanager
def shared_condition_bank(model: nn.Module) -> Iterator[nn.Module]:
    """While active (on this thread), CBN layers take their export-time affine from one
    :class:`ConditionBank`. Yields the module to export: where the bank holds layers, a copy
    of ``model`` that shares every tensor with it and whose banked layers have no delta MLP
    (nor embedding), so the exported program does not carry those weights unused (their
    values are in the bank's constants); else ``model`` itself. γ and β stay: they are the
    original BN's, and the model's own code may read them (``sigmoid(bn.weight)``); only the
    MLP is normsurgeon's own. ``model`` is not changed."""
    from .._copy import deepcopy_module

    target = model
    if sum(_bankable(m) for m in model.modules()) >= 2:
        shared: dict[int, Any] = {id(t): t for t in model.parameters()}
        shared.update((id(t), t) for t in model.buffers())
        target = deepcopy_module(model, shared)
    bank = ConditionBank(list(target.modules()))
    if target is not model:
        for m in bank._keep:
            m.cond_mlp = nn.Sequential()
            m.embedding = None
    before = _BANK.current
    _BANK.current = bank
    try:
        yield target
    finally:
        _BANK.current = before
