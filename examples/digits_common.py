"""Shared by the CBN and RBN examples: scikit-learn's bundled digits (no download) and a small
CNN trained on them."""

from __future__ import annotations

import argparse

import torch
from torch import nn


def load(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """8x8 digits scaled to [0, 1], split 75/25 with a fixed seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    cut = int(0.75 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def cnn() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(1, 16), block(16, 32), nn.MaxPool2d(2), block(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, params=None,
          extra=None, lr: float = 3e-3, seed: int = 0) -> None:
    """Plain Adam training; ``extra(i)`` gives extra forward arguments for batch indices i."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in perm.split(64):
            args = (x[i],) + (extra(i) if extra else ())
            loss = nn.functional.cross_entropy(model(*args), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *extra: torch.Tensor) -> float:
    model.eval()
    return float((model(x, *extra).argmax(1) == y).float().mean())


def pretrained(argv: list[str] | None, description: str
               ) -> tuple[argparse.Namespace, tuple[torch.Tensor, ...], nn.Module]:
    """What both examples start from: parse ``--quick``, load the data, train the CNN."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few seconds (the tests use it)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = load()
    model = cnn()
    train(model, data[0], data[1], epochs=4 if args.quick else 15)
    return args, data, model
