r"""The fold math, once, for every front end: pure functions on torch tensors or numpy arrays
(:mod:`normsurgeon.arrays`); importing it does not import torch.

Eval-mode BatchNorm is a per-channel affine map (docs/math.md):

.. math::  y = s \odot x + t, \quad s = \gamma / \sqrt{\sigma^2_{run} + \epsilon},
           \quad t = \beta - \mu_{run} \odot s

Every fold is computed in float64 and rounded once to the dtype (and, for torch tensors, the
strides) of the parameter it replaces. :mod:`normsurgeon.functional` re-exports these
functions next to the torch-only helpers.
"""

from __future__ import annotations

from typing import Any

from .arrays import numel, ops

__all__ = [
    "bn_scale_shift",
    "bn_scale_shift_many",
    "fold_conv_bn",
    "fold_conv_transpose_bn",
    "fold_linear_bn",
    "fold_bn_conv",
    "fold_bn_linear",
    "fold_weights",
    "cast_like",
]

Array = Any  # a torch.Tensor or a numpy.ndarray


def bn_scale_shift(running_mean: Array, running_var: Array, eps: float,
                   weight: Array | None = None, bias: Array | None = None
                   ) -> tuple[Array, Array]:
    r"""Return ``(s, t)`` in float64 with ``s = γ / sqrt(var + eps)`` and ``t = β − μ·s``.

    ``γ = 1`` and ``β = 0`` when ``weight`` / ``bias`` are ``None`` (``affine=False``).
    """
    return bn_scale_shift_many([(running_mean, running_var, eps, weight, bias)])[0]


def bn_scale_shift_many(
    stats: list[tuple[Array, Array, float, Array | None, Array | None]],
) -> list[tuple[Array, Array]]:
    """:func:`bn_scale_shift` for many BatchNorms at once (``(running_mean, running_var, eps,
    weight, bias)`` each, one device, one library): a dozen array ops in all instead of a dozen
    per BN. ``s = rsqrt(var + ε)·γ`` and ``t = −μ·s + β`` in float64; a missing γ/β enters as
    exactly 1/0."""
    if not stats:
        return []
    xp = ops(stats[0][0])
    sizes = [numel(m) for m, *_ in stats]
    mean = xp.cat([m for m, *_ in stats])
    var = xp.cat([v for _, v, *_ in stats])
    eps = xp.repeat([float(e) for _, _, e, *_ in stats], sizes, mean)
    weight = xp.cat([w if w is not None else xp.ones_like(m) for m, _, _, w, _ in stats])
    bias = xp.cat([b if b is not None else xp.zeros(numel(m), m) for m, _, _, _, b in stats])
    s = xp.rsqrt(var + eps) * weight
    t = -mean * s + bias
    out, start = [], 0
    for n in sizes:
        out.append((s[start:start + n], t[start:start + n]))
        start += n
    return out


def cast_like(value: Array, ref: Array) -> Array:
    """``value`` rounded once to ``ref``'s dtype (torch: also its device and exact strides)."""
    return ops(ref).cast_like(value, ref)


def _bias64(bias: Array | None, n: int, like: Array) -> Array:
    xp = ops(like)
    return xp.zeros(n, like) if bias is None else xp.f64(bias)


def fold_conv_bn(weight: Array, bias: Array | None, s: Array, t: Array, *,
                 like: Array | None = None) -> tuple[Array, Array]:
    r"""Conv → BN: ``W'[o] = W[o]·s[o]``, ``b' = s·b + t`` (exact for any stride/padding/groups).

    ``weight`` is (Cout, Cin/g, k...). Computed in float64; returned in float64, or in ``like``'s
    dtype (and strides, for W') when given, rounded once from the float64 product.
    """
    xp = ops(weight)
    w = xp.scaled(weight, s.reshape((-1,) + (1,) * (len(weight.shape) - 1)), like)
    b = s * _bias64(bias, numel(s), s) + t
    return w, b if like is None else xp.astype_like(b, like)


def fold_conv_transpose_bn(weight: Array, bias: Array | None, s: Array, t: Array, groups: int
                           ) -> tuple[Array, Array]:
    r"""ConvTranspose → BN.

    ``W`` is (Cin, Cout/g, k...). Output channel ``o = g_idx·(Cout/g) + j`` lives at
    ``W[g_idx·(Cin/g) + i, j]``; so view W as (g, Cin/g, Cout/g, k...) and multiply by ``s``
    viewed (g, 1, Cout/g, 1...). ``b' = s·b + t``.
    """
    cin, cout_g = weight.shape[0], weight.shape[1]
    k = tuple(weight.shape[2:])
    w = ops(weight).f64(weight).reshape((groups, cin // groups, cout_g) + k)
    w = w * s.reshape((groups, 1, cout_g) + (1,) * len(k))
    b = s * _bias64(bias, numel(s), s) + t
    return w.reshape(tuple(weight.shape)), b


def fold_linear_bn(weight: Array, bias: Array | None, s: Array, t: Array, *,
                   like: Array | None = None) -> tuple[Array, Array]:
    r"""Linear → BatchNorm1d on a 2-D (N, F) tensor: ``W'[o,:] = W[o,:]·s[o]``, ``b' = s·b + t``."""
    return fold_conv_bn(weight, bias, s, t, like=like)


def fold_bn_conv(weight: Array, bias: Array | None, s: Array, t: Array, groups: int
                 ) -> tuple[Array, Array]:
    r"""BN → Conv (BN *before* the conv): ``W'[o,i] = W[o,i]·s[c(o,i)]``,
    ``b'[o] = b[o] + Σ_{i,k} W[o,i,k]·t[c(o,i)]`` with the group-aware input channel
    ``c(o,i) = (o // (Cout/g))·(Cin/g) + i``.

    Exact only when the conv never reads padded zeros that the BN would have shifted
    (padding 0, a non-zero padding mode, or ``t == 0``); the caller checks that.
    """
    xp = ops(weight)
    cout, cin_g = weight.shape[0], weight.shape[1]
    cout_g = cout // groups
    k = tuple(weight.shape[2:])
    ones = (1,) * len(k)
    # W viewed (g, Cout/g, Cin/g, k...): s and t broadcast over (g, ·, Cin/g) as s[c(o, i)]
    w64 = xp.f64(weight).reshape((groups, cout_g, cin_g) + k)
    w = (w64 * s.reshape((groups, 1, cin_g) + ones)).reshape(tuple(weight.shape))
    shifted = (w64 * t.reshape((groups, 1, cin_g) + ones)).reshape((cout, -1))
    b = _bias64(bias, cout, s) + xp.sum(shifted, 1)
    return w, b


def fold_bn_linear(weight: Array, bias: Array | None, s: Array, t: Array
                   ) -> tuple[Array, Array]:
    r"""BN → Linear on a 2-D input: ``W'[:, i] = W[:, i]·s[i]``, ``b' = b + W·t``."""
    w64 = ops(weight).f64(weight)
    return w64 * s.reshape((1, -1)), _bias64(bias, weight.shape[0], s) + w64 @ t


def fold_weights(kind: str, direction: str, weight: Array, bias: Array | None, s: Array,
                 t: Array, groups: int = 1) -> tuple[Array, Array]:
    r"""``(W', b')`` of one fold, in the weight's dtype (and, for torch Conv/Linear → BN, its
    strides), rounded once from float64: the one entry point every front end (nn.Module graphs,
    ExportedPrograms, ONNX files) uses.

    ``kind``: ``"conv"``, ``"convtranspose"`` or ``"linear"``; ``direction``: ``"producer"``
    (the layer, then BN) or ``"consumer"`` (BN, then the layer). BN → ConvTranspose has no
    exact fold and raises ``ValueError``.
    """
    xp = ops(weight)
    if direction == "producer":
        if kind == "convtranspose":
            w, b = fold_conv_transpose_bn(weight, bias, s, t, groups)
            return xp.cast_like(w, weight), xp.astype_like(b, weight)
        return fold_conv_bn(weight, bias, s, t, like=weight)
    if kind == "conv":
        w, b = fold_bn_conv(weight, bias, s, t, groups)
    elif kind == "linear":
        w, b = fold_bn_linear(weight, bias, s, t)
    else:
        raise ValueError(f"no exact fold of BatchNorm before a {kind}")
    return xp.cast_like(w, weight), xp.astype_like(b, weight)
