"""``deepcopy_module`` must give what ``copy.deepcopy`` gives, faster."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from normsurgeon._copy import deepcopy_module


class Odd(nn.Module):
    """Shared child, tied weight, hooks, plain attributes, a GraphModule child, an LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.alias = self.conv  # the same module under two names
        self.head = nn.Linear(4, 4)
        self.tail = nn.Linear(4, 4)
        self.tail.weight = self.head.weight  # tied
        self.gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.Identity()))
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.config = {"sizes": [1, 2, 3], "name": "odd", "t": torch.ones(2)}
        self.register_buffer("absent", None)
        self.calls = 0
        self.register_forward_hook(Odd._count)

    @staticmethod
    def _count(module: nn.Module, args: object, out: object) -> None:
        module.calls += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gm(self.bn(self.alias(x))).mean((2, 3))
        y, _ = self.rnn(self.tail(self.head(y)).unsqueeze(1))
        return y.squeeze(1) * self.config["t"].sum()


def _equal_structure(a: nn.Module, b: nn.Module) -> None:
    # (GraphModule makes a class per instance: compare class names)
    assert [(n, type(m).__name__) for n, m in a.named_modules(remove_duplicate=False)] == [
        (n, type(m).__name__) for n, m in b.named_modules(remove_duplicate=False)]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_matches_copy_deepcopy_and_shares_nothing() -> None:
    torch.manual_seed(0)
    m = Odd().eval()
    x = torch.randn(2, 3, 8, 8)
    fast, ref = deepcopy_module(m), copy.deepcopy(m)
    _equal_structure(fast, ref)
    assert fast.alias is fast.conv and fast.alias is not m.conv
    assert fast.tail.weight is fast.head.weight and fast.head.weight is not m.head.weight
    assert fast.config == {"sizes": [1, 2, 3], "name": "odd", "t": fast.config["t"]}
    assert fast.config["t"] is not m.config["t"] and fast.config["sizes"] is not m.config["sizes"]
    assert isinstance(fast.gm, fx.GraphModule) and fast.gm is not m.gm
    assert fast.absent is None
    mine = {id(t) for t in list(m.parameters()) + list(m.buffers())}
    assert not mine & {id(t) for t in list(fast.parameters()) + list(fast.buffers())}
    with torch.no_grad():
        assert torch.equal(fast(x), m(x))
    assert fast.calls == 1 and m.calls == 1  # the hook was copied and counts on its own module


def test_memo_entries_are_respected() -> None:
    m = Odd()
    new_bn, keep = nn.Identity(), m.head.weight
    fast = deepcopy_module(m, {id(m.bn): new_bn, id(keep): keep})
    assert fast.bn is new_bn
    assert fast.head.weight is keep and fast.tail.weight is keep


def test_training_flag_and_requires_grad_survive() -> None:
    m = Odd().train()
    m.conv.weight.requires_grad_(False)
    fast = deepcopy_module(m)
    assert fast.training and all(x.training for x in fast.modules())
    assert not fast.conv.weight.requires_grad and fast.head.weight.requires_grad
    assert isinstance(fast.conv.weight, nn.Parameter)


def test_buffers_that_view_one_storage_keep_sharing_it() -> None:
    m = nn.Module()
    base = torch.arange(12.0)
    m.register_buffer("whole", base)
    m.register_buffer("part", base[2:8].view(2, 3).t())  # offset, strides, non-contiguous
    fast, ref = deepcopy_module(m), copy.deepcopy(m)
    for name in ("whole", "part"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert torch.equal(a, b) and a.stride() == b.stride()
        assert a.storage_offset() == b.storage_offset()
    assert fast.part.untyped_storage().data_ptr() == fast.whole.untyped_storage().data_ptr()
    assert fast.whole.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    fast.whole[2] = -1.0  # part[0, 0] is whole[2]
    assert float(fast.part[0, 0]) == -1.0 and float(base[2]) == 2.0


def test_parametrized_modules_take_their_own_deepcopy() -> None:
    """torch.nn.utils.parametrize classes define __deepcopy__: the copy goes through it."""
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w.triu() + w.triu(1).transpose(-1, -2)

    m = nn.Sequential(nn.Linear(5, 5), nn.ReLU())
    parametrize.register_parametrization(m[0], "weight", Symmetric())
    fast = deepcopy_module(m)
    x = torch.randn(3, 5)
    assert torch.equal(fast(x), m(x))
    assert parametrize.is_parametrized(fast[0], "weight")
    original = fast[0].parametrizations.weight.original
    assert original is not m[0].parametrizations.weight.original
