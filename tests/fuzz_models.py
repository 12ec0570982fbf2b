"""A grammar of model idioms for the fuzzer (tests/test_fuzz.py).

Every block maps (N, C, H, W) to (N, C', H, W). The idioms are the ones real code bases use and
that broke normsurgeon before (docs/invariants.md): norm+act subclasses (timm), frozen-BN
look-alikes (torchvision, detectron-style), look-alikes and subclasses that do more than the
affine map, hooks, parameters read directly in forward, shared modules, concatenations,
residuals, branches on the input's shape and values, TorchScript blocks, identity-in-eval
placeholders (Identity, Dropout) between a layer and its BN, initialised lazy layers and torch's
DataParallel wrapper. Grow it whenever a new idiom is met.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

# --- BatchNorm variants ----------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm+act layer: BN then an activation child, in one module."""

    def __init__(self, c: int, act: str = "relu") -> None:
        super().__init__(c)
        self.act = {"relu": nn.ReLU(), "silu": nn.SiLU(), "hardswish": nn.Hardswish()}[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         False, 0.0, self.eps)
        return self.act(x)


class FrozenBN(nn.Module):
    """torchvision's FrozenBatchNorm2d: buffers only, the affine map always."""

    def __init__(self, c: int, extra: bool = False) -> None:
        super().__init__()
        for name, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                        ("running_var", 1.0)):
            self.register_buffer(name, torch.full((c,), v))
        self.eps = 1e-5
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        y = x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
        return y.clamp(min=-0.25) if self.extra else y  # extra: not the affine map


class ScaledBN(nn.BatchNorm2d):
    """A subclass whose forward does more than BN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * x.abs().mean()


BN_KINDS = ["bn", "bn", "bn", "act-relu", "act-silu", "frozen", "frozen-extra", "scaled",
            "no-affine", "hooked"]


def make_bn(kind: str, c: int) -> nn.Module:
    if kind.startswith("act-"):
        return BatchNormAct2d(c, kind[4:])
    if kind == "frozen":
        return FrozenBN(c)
    if kind == "frozen-extra":
        return FrozenBN(c, extra=True)
    if kind == "scaled":
        return ScaledBN(c)
    if kind == "no-affine":
        return nn.BatchNorm2d(c, affine=False)
    bn = nn.BatchNorm2d(c)
    if kind == "hooked":
        bn.register_forward_hook(lambda m, i, o: o + 0.5)
    return bn


# --- blocks ------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self, c: int, c2: int, bn: str, k: int, groups: int, transposed: bool,
                 conv_hook: bool) -> None:
        super().__init__()
        g = groups if c % groups == 0 and c2 % groups == 0 else 1
        cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = cls(c, c2, k, padding=k // 2, groups=g, bias=bool(k % 2))
        if conv_hook:
            self.conv.register_forward_hook(lambda m, i, o: o * 1.5)
        self.bn = make_bn(bn, c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BNConv(nn.Module):
    """BN before a conv (pre-activation style without the activation)."""

    def __init__(self, c: int, c2: int, padding_mode: str, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c2, 2 * pad + 1, padding=pad, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class Residual(nn.Module):
    def __init__(self, c: int, bn: str) -> None:
        super().__init__()
        self.body = ConvBN(c, c, bn, 3, 1, False, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.body(x))


class SharedConv(nn.Module):
    """One conv called twice, each call with its own BN (PolyNet / ShaResNet)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 0.5))


class TiedReader(nn.Module):
    """Reads its conv's weight directly in forward (a tied decoder)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight, padding=1) * 0.1


class BNReader(nn.Module):
    """Reads its BN's weight directly (attention-style gating)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) * torch.sigmoid(self.bn.weight).reshape(1, -1, 1, 1)


class Concat(nn.Module):
    """MixConv / Inception: cat of convs, then one BN."""

    def __init__(self, c: int, c2: int) -> None:
        super().__init__()
        a = max(1, c2 // 2)
        self.a = nn.Conv2d(c, a, 3, padding=1)
        self.b = nn.Conv2d(c, c2 - a, 1)
        self.bn = nn.BatchNorm2d(c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.a(x), self.b(x)], 1))


class ShapeBranch(nn.Module):
    """Which conv feeds the BN depends on the input's width: fx cannot trace it."""

    def __init__(self, c: int, c2: int) -> None:
        super().__init__()
        self.even = nn.Conv2d(c, c2, 3, padding=1)
        self.odd = nn.Conv2d(c, c2, 1)
        self.bn = nn.BatchNorm2d(c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.even(x) if x.shape[-1] % 2 == 0 else self.odd(x)
        return self.bn(y)


class ValueBranch(nn.Module):
    """A branch on tensor values after the BN: untraceable, but the fold holds on both paths."""

    def __init__(self, c: int, c2: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c2, 3, padding=1)
        self.bn = nn.BatchNorm2d(c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if float(y.mean()) > 0:
            y = y - 0.1
        return y


class Placeholder(nn.Module):
    """Conv → identity-in-eval module(s) → BN: the ``nn.Identity()`` a configurable builder
    leaves where an optional layer was switched off, or a Dropout between conv and BN."""

    MIDS = {"identity": lambda: nn.Identity(), "dropout": lambda: nn.Dropout(0.3),
            "dropout2d": lambda: nn.Dropout2d(0.2),
            "both": lambda: nn.Sequential(nn.Identity(), nn.Dropout(0.1))}

    def __init__(self, c: int, c2: int, mid: str, bn_first: bool) -> None:
        super().__init__()
        self.bn_first = bn_first  # BN → placeholder → conv (the consumer direction)
        self.conv = nn.Conv2d(c2 if bn_first else c, c2, 1 if bn_first else 3,
                              padding=0 if bn_first else 1)
        self.pre = nn.Conv2d(c, c2, 1) if bn_first else nn.Identity()
        self.mid = self.MIDS[mid]()
        self.bn = nn.BatchNorm2d(c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn_first:
            return self.conv(self.mid(self.bn(torch.relu(self.pre(x)))))
        return self.bn(self.mid(self.conv(x)))


class LazyConvBN(nn.Module):
    """A LazyConv2d, initialised by a first forward as its users do (it becomes a Conv2d)."""

    def __init__(self, c: int, c2: int) -> None:
        super().__init__()
        self.conv = nn.LazyConv2d(c2, 3, padding=1)
        self.bn = nn.BatchNorm2d(c2)
        with torch.no_grad():
            self.conv(torch.zeros(1, c, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


BLOCKS = ["convbn", "convbn", "convT", "bnconv", "residual", "shared", "tied", "bnreader",
          "concat", "shapebranch", "valuebranch", "scripted", "placeholder", "lazy"]


def make_block(kind: str, c: int, c2: int, draw: Any) -> tuple[nn.Module, int]:
    if kind in ("convbn", "convT"):
        return ConvBN(c, c2, draw(st.sampled_from(BN_KINDS)), draw(st.sampled_from([1, 3])),
                      draw(st.sampled_from([1, 2])), kind == "convT",
                      draw(st.booleans()) and draw(st.booleans())), c2
    if kind == "bnconv":
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate"]))
        return BNConv(c, c2, mode, draw(st.sampled_from([0, 1]))), c2
    if kind == "residual":
        return Residual(c, draw(st.sampled_from(BN_KINDS))), c
    if kind == "shared":
        return SharedConv(c), c
    if kind == "tied":
        return TiedReader(c), c
    if kind == "bnreader":
        return BNReader(c), c
    if kind == "concat":
        return Concat(c, c2), c2
    if kind == "shapebranch":
        return ShapeBranch(c, c2), c2
    if kind == "valuebranch":
        return ValueBranch(c, c2), c2
    if kind == "placeholder":
        return Placeholder(c, c2, draw(st.sampled_from(sorted(Placeholder.MIDS))),
                           draw(st.booleans())), c2
    if kind == "lazy":
        return LazyConvBN(c, c2), c2
    if kind == "scripted":
        return torch.jit.script(ConvBN(c, c2, "bn", 3, 1, False, False)), c2
    raise ValueError(kind)


class FuzzNet(nn.Module):
    """Blocks in sequence, then (optionally) pool → flatten → Linear → BatchNorm1d, and
    optionally a second output."""

    def __init__(self, blocks: list[nn.Module], c: int, head: bool, two_outputs: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5),
                                  nn.BatchNorm1d(5)) if head else None
        self.two_outputs = two_outputs

    def forward(self, x: torch.Tensor) -> Any:
        for block in self.blocks:
            x = block(x)
        if self.head is None:
            return x
        y = self.head(x)
        return (y, x) if self.two_outputs else y


@st.composite
def fuzz_models(draw: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A random FuzzNet (random weights, randomized BN statistics, eval mode) and its recipe."""
    from normsurgeon.testing import randomize_bn_stats

    c = 3
    blocks, kinds = [], []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(BLOCKS))
        c2 = draw(st.sampled_from([4, 6, 8]))
        block, c = make_block(kind, c, c2, draw)
        blocks.append(block)
        kinds.append(kind)
    head = draw(st.booleans())
    model = FuzzNet(blocks, c, head, head and draw(st.booleans()))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    for m in model.modules():  # random affine/statistics everywhere, look-alikes included
        if isinstance(m, FrozenBN):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    randomize_bn_stats(model, seed)
    model.eval()
    recipe = {"blocks": kinds, "head": head, "seed": seed,
              "dtype": draw(st.sampled_from([torch.float32, torch.float32, torch.float64])),
              "channels_last": draw(st.booleans())}
    model = model.to(recipe["dtype"])
    if recipe["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    recipe["wrapper"] = draw(st.sampled_from([None, None, None, "dataparallel"]))
    if recipe["wrapper"] == "dataparallel":  # torch's wrapper, forwarding to .module
        model = nn.DataParallel(model).eval()
    return model, recipe
