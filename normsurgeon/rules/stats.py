"""When a BatchNorm's inference map is a fixed per-channel affine map ``y = s·x + t``
(docs/math.md), and its ``(s, t)``: the part of the planner that looks at the BN's own
tensors. Torch tensors or numpy arrays (:mod:`normsurgeon.arrays`); no torch import, so the
ONNX front end shares it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..arrays import all_finite, numel, ops

__all__ = ["BNStats", "prime_scale_shift"]


@dataclass(kw_only=True)
class BNStats:
    """A BatchNorm's statistics and affine parameters, as found by a front end."""

    running_mean: Any
    running_var: Any
    weight: Any
    bias: Any
    eps: float
    uses_batch_stats: bool = False
    _scale_shift: tuple[Any, Any] | None = field(default=None, repr=False)
    # set by prime_scale_shift when it proved these for the whole batch at once
    _finite: bool = field(default=False, repr=False)
    _max_abs_s: float | None = field(default=None, repr=False)

    @property
    def num_features(self) -> int:
        ref = self.running_mean if self.running_mean is not None else self.weight
        return numel(ref) if ref is not None else self._declared_features()

    def _declared_features(self) -> int:
        return -1

    def batch_stats_problem(self) -> str:
        """Why a BN that normalizes with batch statistics does (front ends say it better)."""
        return "uses batch statistics (training=True)"

    def stats_problem(self) -> str | None:
        """Why this BN's eval map is not a fixed affine map, or ``None`` when it is."""
        if self._finite:
            return None
        if not self.uses_batch_stats and self.running_mean is not None and (
                self.running_var is not None):
            sizes = {numel(t) for t in (self.running_mean, self.running_var, self.weight,
                                        self.bias) if t is not None}
            if len(sizes) > 1:
                return (f"running_mean, running_var, weight and bias disagree in size "
                        f"({sorted(sizes)}): not a per-channel BatchNorm")
            # finite s = γ/sqrt(var+ε) and t = β − μ·s (float64) <=> finite μ, γ, β and
            # var + ε > 0 (rsqrt of a non-positive number is inf or nan): one test for all
            s, t = self.scale_shift()
            if all_finite(s, t):
                return None
        if self.uses_batch_stats:
            return self.batch_stats_problem()
        if self.running_mean is None or self.running_var is None:
            return "has no running statistics"
        if not all_finite(self.running_mean, self.running_var):
            return "running statistics are not finite"
        if not bool(((ops(self.running_var).f64(self.running_var) + self.eps) > 0).all()):
            return "running_var + eps is not positive"
        for t, what in ((self.weight, "weight"), (self.bias, "bias")):
            if t is not None and not all_finite(t):
                return f"{what} is not finite"
        return None

    def scale_shift(self) -> tuple[Any, Any]:
        """``(s, t)`` of docs/math.md in float64 (computed once per site)."""
        from ..foldmath import bn_scale_shift

        if self._scale_shift is None:
            if self.running_mean is None or self.running_var is None:
                raise ValueError("scale_shift of a BatchNorm without running statistics")
            self._scale_shift = bn_scale_shift(self.running_mean, self.running_var, self.eps,
                                               self.weight, self.bias)
        return self._scale_shift


def prime_scale_shift(sites: list[BNStats]) -> None:
    """Compute ``(s, t)`` for every site with running statistics in one batched pass per
    device (see :func:`normsurgeon.foldmath.bn_scale_shift_many`); sites keep them."""
    from ..foldmath import bn_scale_shift_many

    by_device: dict[Any, list[BNStats]] = {}
    for site in sites:
        if (site._scale_shift is None and not site.uses_batch_stats
                and site.running_mean is not None and site.running_var is not None
                and len({numel(t) for t in (site.running_mean, site.running_var,
                                            site.weight, site.bias) if t is not None}) == 1):
            key = (ops(site.running_mean).name, ops(site.running_mean).device(site.running_mean))
            by_device.setdefault(key, []).append(site)
    for group in by_device.values():
        stats = [(x.running_mean, x.running_var, x.eps, x.weight, x.bias) for x in group]
        results = bn_scale_shift_many(stats)
        for site, st in zip(group, results):
            site._scale_shift = st
        # the usual case, proved once for all: every s, t finite and every |s| < 1e30
        xp = ops(results[0][0])
        s_all = xp.cat([s for s, _ in results])
        t_all = xp.cat([t for _, t in results])
        if all_finite(s_all, t_all):
            top = float(abs(s_all).max()) if numel(s_all) else 0.0
            for site in group:
                site._finite = True
                if top < 1e30:
                    site._max_abs_s = top  # an upper bound is all check() needs
