"""``copy.deepcopy`` for ``nn.Module`` trees, without its generic per-object overhead.

``copy.deepcopy(model)`` reconstructs every object through ``__reduce_ex__``, including the
dozen (nearly always empty) hook ``OrderedDict``\\ s of each module: on ResNet-101 that is ~6,000
reconstructions and a large share of ``convert``'s time. :func:`deepcopy_module` walks the module
tree itself and produces the same result:

* a TorchScript module is copied by :func:`copy_script_module` (``copy.deepcopy`` of one
  returns non-leaf parameters);
* a module whose class customises copying (``__deepcopy__``, ``__reduce_ex__``/``__reduce__``,
  a ``copyreg`` entry, or a ``__getstate__`` that returns no dict) goes through
  ``copy.deepcopy`` unchanged;
* otherwise the copy is ``cls.__new__(cls)`` + ``__setstate__(state)`` with ``state`` from the
  module's own ``__getstate__`` (exactly what ``copy.deepcopy`` does), where ``state``'s values
  are copied as ``copy.deepcopy`` would: submodules recursively, parameters and buffers with
  ``copy.deepcopy`` (plain buffers through the same storage-cloning steps as
  ``Tensor.__deepcopy__``, minus its generic overhead), empty builtin containers as new ones,
  immutable scalars shared, anything else with ``copy.deepcopy``;
* one ``memo`` dict is shared throughout, so shared submodules and tied weights stay shared, and
  callers can pre-seed it (``memo[id(obj)] = replacement``) as with ``copy.deepcopy``.
"""

from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

__all__ = ["deepcopy_module"]

_ATOMIC = (type(None), bool, int, float, complex, str, bytes, type, range, torch.dtype,
           torch.device, torch.layout, torch.memory_format)
_ATOMIC_TYPES = frozenset(_ATOMIC)
_EMPTY_OK = frozenset((dict, OrderedDict, set, list))
_plain_cache: dict[type, bool] = {}


def _plain(cls: type) -> bool:
    """Whether ``copy.deepcopy`` would copy instances of ``cls`` through the default
    ``__reduce_ex__`` path (the only one :func:`deepcopy_module` reproduces)."""
    ok = _plain_cache.get(cls)
    if ok is None:
        ok = (getattr(cls, "__deepcopy__", None) is None
              and cls.__reduce_ex__ is object.__reduce_ex__
              and cls.__reduce__ is object.__reduce__
              and cls not in copyreg.dispatch_table
              and not any("__slots__" in vars(k) and vars(k)["__slots__"]
                          for k in cls.__mro__))
        _plain_cache[cls] = ok
    return ok


def deepcopy_module(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """Return a deep copy of ``module``, equal to ``copy.deepcopy(module, memo)``."""
    return _copy_module(module, {} if memo is None else memo)


def _copy_module(m: nn.Module, memo: dict[int, Any]) -> nn.Module:
    hit = memo.get(id(m))
    if hit is not None:
        return hit
    if isinstance(m, torch.jit.ScriptModule):
        memo[id(m)] = new = copy_script_module(m)
        return new
    cls = type(m)
    if not _plain(cls):
        return copy.deepcopy(m, memo)
    state = m.__getstate__()
    if type(state) is not dict:
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    out: dict[str, Any] = {}
    for key, value in state.items():
        tv = type(value)
        if tv in _ATOMIC_TYPES:  # the common cases inline: this loop runs ~20x per module
            out[key] = value
        elif tv in _EMPTY_OK and not value and id(value) not in memo:
            out[key] = memo[id(value)] = tv()
        elif key == "_modules":
            out[key] = tv(
                (k, None if v is None else _copy_module(v, memo)) for k, v in value.items())
        elif key in ("_parameters", "_buffers"):
            out[key] = tv((k, _copy_value(v, memo)) for k, v in value.items())
        else:
            out[key] = _copy_value(value, memo)
    new.__setstate__(out)
    return new


def _copy_value(v: Any, memo: dict[int, Any]) -> Any:
    tv = type(v)
    if tv in _EMPTY_OK and not v:
        hit = memo.get(id(v))
        if hit is None:
            hit = memo[id(v)] = tv()
        return hit
    if tv in _ATOMIC_TYPES or isinstance(v, _ATOMIC):
        return v
    if tv is tuple and all(type(x) in _ATOMIC_TYPES for x in v):
        return v  # what copy.deepcopy returns for a tuple of atomics (kernel_size, ...)
    hit = memo.get(id(v))
    if hit is not None:
        return hit
    if tv is torch.Tensor:
        return _copy_tensor(v, memo)
    if isinstance(v, nn.Module):
        return _copy_module(v, memo)
    return copy.deepcopy(v, memo)


def _copy_tensor(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    """``Tensor.__deepcopy__`` for a plain dense tensor (a buffer): clone its storage once
    (memo keyed like torch's own, so views of one storage keep sharing it) and view it the same
    way. Anything unusual takes ``copy.deepcopy``."""
    if (t.layout != torch.strided or t.requires_grad or t.grad is not None or t.is_quantized
            or t.is_meta or t.is_conj() or t.is_neg() or t.__dict__
            or t.device.type not in ("cpu", "cuda")):
        return copy.deepcopy(t, memo)
    storage = t.untyped_storage()
    new_storage = memo.get(storage._cdata)
    if new_storage is None:
        new_storage = memo[storage._cdata] = storage.clone()
    new = t.new_empty([]).set_(new_storage, t.storage_offset(), t.size(), t.stride())
    memo[id(t)] = new
    return new


def copy_script_module(m: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A copy of a scripted or traced module through ``torch.jit.save`` / ``load``.

    ``copy.deepcopy`` of a ``RecursiveScriptModule`` returns one whose parameters are non-leaf
    tensors (``requires_grad_`` then raises and the copy cannot be trained); the serialised
    round trip gives real, independent Parameters, the same code and the same training flags."""
    import io

    buf = io.BytesIO()
    torch.jit.save(m, buf)
    buf.seek(0)
    device = next((t.device for t in list(m.parameters()) + list(m.buffers())), None)
    return torch.jit.load(buf, map_location=device)
