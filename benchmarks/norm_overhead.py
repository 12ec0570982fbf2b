"""Cost of CBN and RBN against plain BatchNorm on the same network (CPU, eager).

    python benchmarks/norm_overhead.py [--model resnet50] [--batch 4] [--reps 5] [--runs 3]

Variants, measured interleaved in one run (median of --reps):
  BN            the original network, everything trainable, batch statistics
  CBN           convert(to="cbn", cond_dim=128, freeze_base=False, freeze_stats=False):
                same training regime as BN, plus the per-layer delta MLPs
  CBN (frozen)  the paper's regime and normsurgeon's default: frozen backbone and statistics,
                only the MLPs train
  RBN           convert(to="rbn"), everything trainable, batch statistics
A training step is forward + cross-entropy + backward + SGD step; eval is a no-grad forward.
``--runs N`` repeats the whole measurement and prints the spread of each ratio over the runs
(one run's ratio moves by ±5-10% on a shared machine).

``--mlp-sharing`` instead measures what computing every CBN's delta MLP together (as the ONNX
export does, ``layers.cbn.ConditionBank``) would save in an eager training step: forward and
backward of the 53 per-layer MLPs one by one, vs one batched computation (weights stacked in the
step, as a bank over today's per-layer Parameters must; and pre-stacked, the bound for a layout
that stored them stacked), next to a whole frozen-CBN training step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import zoo  # first: it takes benchmarks/ off sys.path (onnx.py there shadows onnx)

# isort: split
import normsurgeon as ns


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--runs", type=int, default=1, help="repeat and report the spread")
    p.add_argument("--mlp-sharing", action="store_true",
                   help="measure batched vs per-layer delta MLPs in a training step")
    args = p.parse_args()
    if args.mlp_sharing:
        mlp_sharing(args)
        return
    torch.manual_seed(0)
    base = zoo.randomize(zoo.build(args.model))
    x = zoo.example_input(base, batch=args.batch)
    y = torch.randint(0, 1000, (args.batch,))
    e = torch.randn(args.batch, 128)
    variants = {
        "BN": (base, ()),
        "CBN": (ns.convert(base, "cbn", cond_dim=128, freeze_base=False, freeze_stats=False),
                (e,)),
        "CBN (frozen)": (ns.convert(base, "cbn", cond_dim=128), (e,)),
        "RBN": (ns.convert(base, "rbn"), ()),
    }
    opts = {k: torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=1e-4)
            for k, (m, _) in variants.items()}

    def step(k: str) -> None:
        m, extra = variants[k]
        m.train()
        loss = nn.functional.cross_entropy(m(x, *extra), y)
        opts[k].zero_grad()
        loss.backward()
        opts[k].step()

    def evaluate(k: str) -> None:
        m, extra = variants[k]
        m.eval()
        with torch.no_grad():
            m(x, *extra)

    for k in variants:  # warm-up
        step(k)
        evaluate(k)
    print(f"{args.model}, batch {args.batch}, {tuple(x.shape[2:])}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.reps}\n")
    ratios: dict[str, dict[str, list[float]]] = {"train": {k: [] for k in variants},
                                                 "eval": {k: [] for k in variants}}
    for run in range(args.runs):
        times: dict[str, dict[str, list[float]]] = {"train": {k: [] for k in variants},
                                                    "eval": {k: [] for k in variants}}
        for _ in range(args.reps):
            for k in variants:
                for phase, fn in (("train", step), ("eval", evaluate)):
                    t = time.perf_counter()
                    fn(k)
                    times[phase][k].append(time.perf_counter() - t)
        med = {ph: {k: statistics.median(v) for k, v in d.items()} for ph, d in times.items()}
        if args.runs > 1:
            print(f"run {run + 1} of {args.runs}")
        print(f"{'variant':<14} {'train step':>11} {'x BN':>6} {'eval':>9} {'x BN':>6}")
        for k in variants:
            tr, ev = med["train"][k], med["eval"][k]
            ratios["train"][k].append(tr / med["train"]["BN"])
            ratios["eval"][k].append(ev / med["eval"]["BN"])
            print(f"{k:<14} {tr * 1e3:>9.1f}ms {tr / med['train']['BN']:>6.3f} "
                  f"{ev * 1e3:>7.1f}ms {ev / med['eval']['BN']:>6.3f}")
        print()
    if args.runs > 1:
        print(f"spread over {args.runs} runs (min-max of each run's ratio to BN):")
        for k in variants:
            if k == "BN":
                continue
            tr, ev = ratios["train"][k], ratios["eval"][k]
            print(f"  {k:<14} train step {min(tr):.3f}-{max(tr):.3f}   "
                  f"eval {min(ev):.3f}-{max(ev):.3f}")


def mlp_sharing(args: argparse.Namespace) -> None:
    """Forward+backward of every CBN's delta MLP: per layer vs batched (see the docstring)."""
    from normsurgeon.layers.cbn import ConditionBank, _ConditionalBatchNorm

    torch.manual_seed(0)
    base = zoo.randomize(zoo.build(args.model))
    cbn = ns.convert(base, "cbn", cond_dim=128)
    layers = [m for m in cbn.modules() if isinstance(m, _ConditionalBatchNorm)]
    e = torch.randn(args.batch, 128)
    x = zoo.example_input(base, batch=args.batch)
    opt = torch.optim.SGD([q for q in cbn.parameters() if q.requires_grad], lr=1e-4)

    def per_layer() -> None:
        sum(m.cond_mlp(e).sum() for m in layers).backward()

    order = sorted(layers, key=lambda m: m.num_features)  # the bank's layout
    groups: list[list[nn.Module]] = []
    for m in order:
        if groups and groups[-1][0].num_features == m.num_features:
            groups[-1].append(m)
        else:
            groups.append([m])
    hidden = order[0].cond_mlp[0].out_features

    def stacked_in_step() -> None:  # the bank's math over today's per-layer Parameters
        w1 = torch.cat([m.cond_mlp[0].weight for m in order])
        b1 = torch.cat([m.cond_mlp[0].bias for m in order])
        h = torch.relu(nn.functional.linear(e, w1, b1)).reshape(-1, len(order), hidden)
        h = h.transpose(0, 1)
        total, start = 0, 0
        for g in groups:
            w2t = torch.stack([m.cond_mlp[2].weight.t() for m in g])
            b2 = torch.stack([m.cond_mlp[2].bias for m in g]).unsqueeze(1)
            total = total + (torch.matmul(h[start:start + len(g)], w2t) + b2).sum()
            start += len(g)
        total.backward()

    fam0 = ConditionBank(layers)._where[id(layers[0])][0]
    for t in (fam0.w1, fam0.b1, *(g[2] for g in fam0.groups), *(g[3] for g in fam0.groups)):
        t.requires_grad_(True)

    def pre_stacked() -> None:  # weights stored stacked: no per-step stacking
        torch.stack([t.sum() for t in fam0.compute(e)]).sum().backward()

    def train_step() -> None:
        cbn.train()
        loss = nn.functional.cross_entropy(cbn(x, e), torch.zeros(args.batch, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()

    fns = {"per layer": per_layer, "batched (stacked each step)": stacked_in_step,
           "batched (pre-stacked)": pre_stacked, "frozen-CBN train step": train_step}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}: {len(layers)} CBN delta MLPs, batch {args.batch}, forward+backward, "
          f"median of {args.reps}, {torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"  {k:<28} {v * 1e3:>8.2f}ms  {v / med['per layer']:>6.2f}x per layer  "
              f"{v / med['frozen-CBN train step'] * 100:>6.2f}% of a step")


if __name__ == "__main__":
    main()
