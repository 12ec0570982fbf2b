"""Recover a pruned CNN's accuracy by re-estimating its BatchNorm statistics.

A small CNN is trained on scikit-learn's digits, then a fraction of the channels of every
convolution is pruned (zeroed, smallest L1 norm first). The BatchNorm running statistics no
longer match what the layers see and accuracy collapses; ``ns.recalibrate`` re-estimates them
on training images (no labels, no gradient step) and the accuracy comes back. torch's
``update_bn`` is shown next to it.

    python examples/recalibrate_pruned.py            # ~15 s on 2 CPU cores
    python examples/recalibrate_pruned.py --quick    # a few seconds, for the tests
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_common as dc  # noqa: E402

import normsurgeon as ns  # noqa: E402


@torch.no_grad()
def prune_channels(model: nn.Module, fraction: float) -> nn.Module:
    """Zero the ``fraction`` of each conv's output channels with the smallest L1 norm."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, nn.Conv2d) and m.out_channels > 1:
            norms = m.weight.abs().sum((1, 2, 3))
            k = int(fraction * m.out_channels)
            m.weight[norms.argsort()[:k]] = 0
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    args, (xtr, ytr, xte, yte), model = dc.pretrained(
        argv, "recover a pruned CNN by recalibrating its BatchNorm statistics")
    base = dc.accuracy(model, xte, yte)
    pruned = prune_channels(model, 0.3)
    acc_pruned = dc.accuracy(pruned, xte, yte)
    calib = list(xtr[:512].split(64))  # unlabelled images
    ours = ns.recalibrate(pruned, calib)
    theirs = copy.deepcopy(pruned)
    torch.optim.swa_utils.update_bn(calib, theirs)
    res = {"trained": base, "pruned": acc_pruned, "recalibrated": dc.accuracy(ours, xte, yte),
           "update_bn": dc.accuracy(theirs, xte, yte)}
    print(f"test accuracy: trained {res['trained']:.3f}, 30% of channels pruned "
          f"{res['pruned']:.3f}, after ns.recalibrate {res['recalibrated']:.3f} "
          f"(torch update_bn: {res['update_bn']:.3f})")
    return res


if __name__ == "__main__":
    main()
