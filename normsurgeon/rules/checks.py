"""What a module really computes, checked before any rule relies on it (docs/folding.md,
preconditions 7 and 8).

* Hooks: a forward hook or pre-hook runs code normsurgeon does not see; a module that has one
  (or any module, while global module hooks are registered) is never rewritten.
* BatchNorm behaviour: torch's own BN classes (their ``forward`` not overridden) compute the
  eval affine map ``y = s·x + t`` by construction. Anything else that looks like a BN (a subclass
  that overrides ``forward``, a frozen-BN look-alike) is *probed*: run on random inputs, its
  output must equal ``s·x + t``, or ``act(s·x + t)`` for one of its children that is a known
  elementwise activation (timm's ``BatchNormAct2d`` pattern). Otherwise the site is refused.
* TorchScript: compiled modules are opaque; BNs inside them are reported, never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["hook_problem", "BNBehaviour", "bn_behaviour", "ELEMENTWISE"]

# modules whose eval forward is an elementwise function of the input (Dropout: identity in eval)
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.CELU, nn.SELU, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Softplus, nn.Hardtanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

_TRUSTED_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def hook_problem(m: nn.Module, what: str) -> str | None:
    """Why ``m`` cannot be rewritten because of hooks, or ``None``."""
    if m._forward_pre_hooks or m._forward_hooks:
        return (f"{what} has forward hooks or pre-hooks; rewriting it would drop or change "
                "what they see")
    if getattr(m, "_backward_hooks", None) or getattr(m, "_backward_pre_hooks", None):
        return f"{what} has backward hooks; rewriting it would drop them"
    if (_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks):
        return ("global module forward hooks are registered "
                "(torch.nn.modules.module.register_module_forward_hook); they would see "
                "different modules after the rewrite")
    return None


@dataclass
class BNBehaviour:
    """The verdict on one BN module: ``problem`` (a reason) or, when it is foldable, the name of
    the child that must stay in its place (``None``: the BN becomes ``nn.Identity``)."""

    problem: str | None = None
    keep_child: str | None = None


def _candidate_shapes(c: int, shape: tuple[int, ...] | None) -> list[tuple[int, ...]]:
    if shape is not None and len(shape) >= 2 and shape[1] == c:
        n = max(2, int(shape[0]))
        return [(n, c) + tuple(min(int(d), 7) for d in shape[2:])]
    return [(3, c, 5, 6), (3, c, 7), (3, c), (3, c, 3, 4, 5)]


def bn_behaviour(m: nn.Module, s: Tensor, t: Tensor,
                 shape: Callable[[], tuple[int, ...] | None] | None = None) -> BNBehaviour:
    """Check that the eval forward of BN-like ``m`` is ``x ↦ s·x + t`` (per channel, axis 1),
    possibly followed by one elementwise activation child. ``s, t`` are float64 (C,).
    ``shape``: returns the input shape seen in the example run, if any (asked only when a
    probe is needed: it may cost a forward)."""
    if type(m).forward in _TRUSTED_FORWARDS and type(m).__call__ is nn.Module.__call__:
        return BNBehaviour()  # torch's own forward: the affine map by construction
    name = type(m).__name__
    children = [(n, c) for n, c in m.named_children()]
    candidates: list[tuple[str | None, nn.Module | None]] = [(None, None)]
    candidates += [(n, c) for n, c in children if isinstance(c, ELEMENTWISE)
                   and not any(True for _ in c.children())]
    others = [n for n, c in children if not isinstance(c, ELEMENTWISE)]
    if others:
        return BNBehaviour(f"{name} overrides forward and holds submodules "
                           f"({', '.join(others)}) that are not elementwise activations; it does "
                           "not compute the eval BatchNorm affine map")
    probe = copy.deepcopy(m)
    c = int(s.numel())
    dtype = next((p.dtype for p in list(probe.parameters()) + list(probe.buffers())
                  if p.is_floating_point()), torch.float32)
    device = s.device
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else (
        1e-10 if dtype == torch.float64 else 1e-5)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    for shp in _candidate_shapes(c, shape() if shape is not None else None):
        xs = [torch.randn(shp, generator=gen, dtype=torch.float64) * 3,
              torch.randn((1,) + shp[1:], generator=gen, dtype=torch.float64) * 0.3 - 1,
              torch.randn((shp[0] + 2,) + shp[1:], generator=gen, dtype=torch.float64) * 10]
        try:
            with torch.no_grad():
                outs = [probe(x.to(device=device, dtype=dtype)) for x in xs]
        except Exception:  # noqa: BLE001 - this rank is not the module's; try another
            continue
        bshape = (1, c) + (1,) * (len(shp) - 2)
        for child_name, child in candidates:
            ok = True
            for x, y in zip(xs, outs):
                if not isinstance(y, Tensor) or y.shape != x.shape:
                    ok = False
                    break
                ref = x * s.reshape(bshape).cpu() + t.reshape(bshape).cpu()
                ref = ref.to(dtype)
                if child is not None:
                    with torch.no_grad():
                        ref = copy.deepcopy(child).eval()(ref)
                err = (y.detach().cpu().double() - ref.double()).abs().max()
                scale = max(float(ref.double().abs().max()), 1e-12)
                if not bool(torch.isfinite(err)) or float(err) / scale > tol:
                    ok = False
                    break
            if ok:
                return BNBehaviour(keep_child=child_name)
        return BNBehaviour(f"{name} overrides forward and does not compute the eval BatchNorm "
                           "affine map (probed on random inputs"
                           + (", also followed by each of its activation children" if
                              len(candidates) > 1 else "") + ")")
    return BNBehaviour(f"{name} could not be probed: its forward rejected inputs of shape "
                       f"(N, {c}, ...) of rank 2 to 5")
