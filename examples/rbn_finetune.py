"""Fine-tune with Representative BatchNorm on a shifted domain.

A small CNN is trained on clean digits, then evaluated on a shifted domain where every image
gets its own contrast and brightness (instance-level statistics that batch statistics
average away, which is what RBN's centering and scaling calibration is for). normsurgeon
converts the BatchNorm2d layers to RBN (function preserving: same accuracy before fine-tuning),
and both the RBN model and a plain-BN copy are fine-tuned the same way on the shifted data.

    python examples/rbn_finetune.py          # ~20 s on 2 CPU cores
    python examples/rbn_finetune.py --quick  # a few seconds, for the tests
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_common as dc  # noqa: E402

import normsurgeon as ns  # noqa: E402


def shift(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    contrast = torch.rand(n, 1, 1, 1, generator=g) * 1.7 + 0.3
    brightness = torch.rand(n, 1, 1, 1, generator=g) * 1.0 - 0.3
    return x * contrast + brightness + 0.05 * torch.randn(x.shape, generator=g)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args, (xtr, ytr, xte, yte), model = dc.pretrained(argv, __doc__.splitlines()[0])
    xtr_s, xte_s = shift(xtr, 1), shift(xte, 2)
    clean, shifted = dc.accuracy(model, xte, yte), dc.accuracy(model, xte_s, yte)
    rbn = ns.convert(model, "rbn")
    converted = dc.accuracy(rbn, xte_s, yte)
    epochs = 1 if args.quick else 5
    bn_ft = copy.deepcopy(model)
    dc.train(bn_ft, xtr_s, ytr, epochs=epochs, lr=1e-3)
    dc.train(rbn, xtr_s, ytr, epochs=epochs, lr=1e-3)
    after_bn, after_rbn = dc.accuracy(bn_ft, xte_s, yte), dc.accuracy(rbn, xte_s, yte)
    print(f"trained on clean digits: clean test {clean:.3f}, shifted test {shifted:.3f}")
    print(f"converted to RBN (before fine-tuning): shifted test {converted:.3f}")
    print(f"fine-tuned {epochs} epoch(s) on shifted data: BN {after_bn:.3f}   RBN {after_rbn:.3f}")
    return {"shifted": shifted, "converted": converted, "bn": after_bn, "rbn": after_rbn}


if __name__ == "__main__":
    main()
