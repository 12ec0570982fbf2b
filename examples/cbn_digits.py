"""One frozen backbone, two tasks, selected by a Conditional BatchNorm condition.

A small CNN is trained on scikit-learn's digits (task 0: "which digit?"). normsurgeon converts
every BatchNorm2d into a class-conditional CBN (the condition is the task id) and then trains
*only* the CBN delta MLPs on both tasks. Task 1 relabels every digit d as (d + 5) % 10, which
the frozen network cannot do on its own. The backbone, the head and the BN statistics stay
frozen, so task 0 must keep working while task 1 is learned.

    python examples/cbn_digits.py          # ~30 s on 2 CPU cores
    python examples/cbn_digits.py --quick  # a few seconds, for the tests
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_common as dc  # noqa: E402

import normsurgeon as ns  # noqa: E402
from normsurgeon.layers import param_groups  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    args, (xtr, ytr, xte, yte), model = dc.pretrained(argv, __doc__.splitlines()[0])

    def relabel(y: torch.Tensor) -> torch.Tensor:
        return (y + 5) % 10

    base0 = dc.accuracy(model, xte, yte)
    base1 = dc.accuracy(model, xte, relabel(yte))
    cbn = ns.convert(model, "cbn", num_classes=2, cond_dim=16, hidden_dim=64)
    task0 = torch.zeros(len(yte), dtype=torch.long)
    assert abs(dc.accuracy(cbn, xte, yte, task0) - base0) < 1e-6  # function preserving
    # both tasks, task id as the condition; only the CBN MLPs train
    x2 = torch.cat([xtr, xtr])
    y2 = torch.cat([ytr, relabel(ytr)])
    t2 = torch.cat([torch.zeros(len(ytr)), torch.ones(len(ytr))]).long()
    dc.train(cbn, x2, y2, epochs=3 if args.quick else 25, params=param_groups(cbn),
             extra=lambda i: (t2[i],), lr=1e-2)
    acc0 = dc.accuracy(cbn, xte, yte, torch.zeros(len(yte), dtype=torch.long))
    acc1 = dc.accuracy(cbn, xte, relabel(yte), torch.ones(len(yte), dtype=torch.long))
    trainable = sum(p.numel() for p in cbn.parameters() if p.requires_grad)
    total = sum(p.numel() for p in cbn.parameters())
    print(f"backbone alone : task 0 {base0:.3f}   task 1 {base1:.3f}")
    print(f"with CBN       : task 0 {acc0:.3f}   task 1 {acc1:.3f}   "
          f"(trained {trainable} of {total} parameters; backbone frozen)")
    return {"base0": base0, "base1": base1, "acc0": acc0, "acc1": acc1}


if __name__ == "__main__":
    main()
