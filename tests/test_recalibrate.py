"""Recalibration (docs/recalibrate.md): the pooling math, the default and exact modes, every
layer kind, batches of every shape, the input model untouched, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normsurgeon as ns
from normsurgeon.functional import channel_moments, merge_moments
from normsurgeon.testing import model_fingerprint

from .conftest import randomize_bn


# --- the pooling math ----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=6), st.integers(1, 4),
       st.floats(-1e4, 1e4), st.floats(1e-3, 1e2), st.integers(0, 1000))
def test_merged_moments_equal_the_whole_datas_in_any_split(sizes, c, offset, scale, seed):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, c, 3, generator=g, dtype=torch.float64) * scale + offset
             for n in sizes]
    merged = None
    for p in parts:
        m = channel_moments(p)
        merged = m if merged is None else merge_moments(merged, m)
    n, mean, m2 = merged
    whole = torch.cat(parts).transpose(0, 1).reshape(c, -1)
    assert n == whole.shape[1]
    torch.testing.assert_close(mean, whole.mean(1), rtol=1e-12, atol=1e-9 * (1 + abs(offset)))
    if n > 1:
        # float64 variance of values near ``offset`` spread by ``scale``: each deviation
        # x − mean carries an error of about ε·|offset|, so the conditioning is |offset|/scale
        # (4e6 at offset 4096, scale 1e-3: a 2.3e-9 relative difference was found there)
        cond = 1 + abs(offset) / scale
        torch.testing.assert_close(m2 / (n - 1), whole.var(1), rtol=1e-9 + 16 * 2.2e-16 * cond,
                                   atol=1e-12 * scale * scale)


def test_moments_are_stable_far_from_zero():
    x = torch.randn(64, 3, 5, dtype=torch.float32) + 3000.0
    n, mean, m2 = channel_moments(x)
    ref = x.double().transpose(0, 1).reshape(3, -1).var(1)
    # float32 precision (E[x²] − m² would be off by ~10% here: 3000² / 1 in float32)
    torch.testing.assert_close(m2 / (n - 1), ref, rtol=1e-6, atol=0)


# --- models ------------------------------------------------------------------------------------
def net() -> nn.Module:
    torch.manual_seed(0)  # the same weights in every process
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5)), 0).eval()


def batches(sizes=(8, 8, 5), seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 9, 9, generator=g) * 2 + 1 for b in sizes]


def first_layer_truth(model: nn.Module, data: list[torch.Tensor]) -> tuple:
    with torch.no_grad():
        h = model[0](torch.cat(data)).double()
    return h.mean((0, 2, 3)), h.var((0, 2, 3))


def test_default_mode_first_layer_is_the_pooled_statistics_regardless_of_batching():
    model = net()
    before = model_fingerprint(model)
    data = batches()
    mean, var = first_layer_truth(model, data)
    results = []
    for split in (data, [torch.cat(data)], list(torch.cat(data).split(3)),
                  list(reversed(data))):
        out, rep = ns.recalibrate_with_report(model, split)
        torch.testing.assert_close(out[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[1].running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert rep.counts == {"recalibrated": 3} and rep.sites[0].samples == 21 * 49
        assert int(out[1].num_batches_tracked) == len(split)
        results.append(out)
    assert model_fingerprint(model) == before  # never touched
    assert all(not m.training for m in results[0].modules())  # flags restored (eval)


def test_default_mode_keeps_dropout_off_unlike_update_bn():
    from torch.optim.swa_utils import update_bn

    model = net()
    data = batches()
    ours = ns.recalibrate(model, data)
    theirs = copy.deepcopy(model)
    update_bn(data, theirs)
    # the BN after Dropout: ours sees the eval-mode (no Dropout) activations
    ref = ns.recalibrate(model, data, exact=True)
    gap_ours = float((ours[5].running_var - ref[5].running_var).abs().max()
                     / ref[5].running_var.abs().max())
    gap_theirs = float((theirs[5].running_var - ref[5].running_var).abs().max()
                       / ref[5].running_var.abs().max())
    assert gap_theirs > 10 * max(gap_ours, 1e-3), (gap_ours, gap_theirs)


def test_exact_mode_is_the_fixed_point_in_float64():
    model = net().double()
    data = [b.double() for b in batches()]
    out = ns.recalibrate(model, data, exact=True)
    with torch.no_grad():  # the fixed point, layer by layer, on the whole data
        x = torch.cat(data)
        h1 = out[0](x)
        h2 = out[4](out[3](out[2](out[1](h1))))
        h3 = out[9](out[8](out[7](out[6](out[5](h2)))))
    for bn, h, dims in ((out[1], h1, (0, 2, 3)), (out[5], h2, (0, 2, 3)), (out[10], h3, (0,))):
        torch.testing.assert_close(bn.running_mean, h.mean(dims), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(bn.running_var, h.var(dims), rtol=1e-6, atol=1e-9)
    again = ns.recalibrate(model, list(reversed([torch.cat(data)[i::3] for i in range(3)])),
                           exact=True)
    for a, b in zip(out.buffers(), again.buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_untraceable_models_get_one_layer_per_pass_in_exact_mode():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(x.mean()) > -1e9:  # untraceable
                return self.body(x)
            return x

    model = Branchy().double()
    data = [b.double() for b in batches()]
    out = ns.recalibrate(model, data, exact=True)
    ref = ns.recalibrate(model.body, data, exact=True)
    for a, b in zip(out.body.buffers(), ref.buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b)


def test_batch_forms_tuple_dict_forward_and_num_batches():
    model = net()
    data = batches()
    plain = ns.recalibrate(model, data)
    tuples = ns.recalibrate(model, [(b, torch.zeros(len(b))) for b in data])
    gen = ns.recalibrate(model, (b for b in data))

    class Kw(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.inner(image)

    dicts = ns.recalibrate(Kw(model), [{"image": b} for b in data]).inner
    custom = ns.recalibrate(model, [{"x": b} for b in data], forward=lambda m, b: m(b["x"]))
    for other in (tuples, gen, dicts, custom):
        torch.testing.assert_close(other[1].running_var, plain[1].running_var)
    capped = ns.recalibrate(model, data, num_batches=1)
    one = ns.recalibrate(model, data[:1])
    torch.testing.assert_close(capped[1].running_var, one[1].running_var)


def test_normsurgeon_layers_are_recalibrated_with_their_own_statistics():
    base = net()
    cbn = ns.convert(base, "cbn", cond_dim=4)
    data = [(b, torch.randn(len(b), 4)) for b in batches()]
    out, rep = ns.recalibrate_with_report(cbn, data, forward=lambda m, b: m(*b))
    assert rep.counts.get("recalibrated") == 3
    mean, var = first_layer_truth(base, [b for b, _ in data])
    layer = dict(out.named_modules())[rep.sites[0].name]
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-6)
    rbn = ns.convert(base, "rbn")
    with torch.no_grad():
        for m in rbn.modules():
            if isinstance(m, ns.RepresentativeBatchNorm2d):
                m.centering_weight.fill_(0.5)
    out = ns.recalibrate(rbn, batches())
    first = next(m for m in out.modules() if isinstance(m, ns.RepresentativeBatchNorm2d))
    with torch.no_grad():
        h = base[0](torch.cat(batches())).double()
        h = h + 0.5 * h.mean((2, 3), keepdim=True)  # the centred input its forward uses
    torch.testing.assert_close(first.running_var.double(), h.var((0, 2, 3)), rtol=1e-5,
                               atol=1e-6)


def test_layers_without_statistics_are_skipped_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    rep = ns.recalibrate_with_report(model, batches())[1]
    assert [r.action for r in rep] == ["skipped", "recalibrated"]
    assert "track_running_stats=False" in rep.sites[0].reason


def test_clear_errors():
    model = net()
    with pytest.raises(ValueError, match="no batch"):
        ns.recalibrate(model, [])
    with pytest.raises(ValueError, match=r"batch 1: the model rejects it"):
        ns.recalibrate(model, [batches()[0], torch.randn(2, 5, 9, 9)])
    with pytest.raises(ValueError, match="matches no BatchNorm"):
        ns.recalibrate(model, batches(), include="nothing*")
    with pytest.raises(ValueError, match="iterated again"):
        ns.recalibrate(model, (b for b in batches()), exact=True)
    with pytest.raises(TypeError, match="iterable of batches"):
        ns.recalibrate(model, torch.randn(4, 3, 9, 9))
    assert not any(m.training for m in model.modules())


def test_inplace_and_no_autograd_graph():
    model = net()
    for p in model.parameters():
        p.requires_grad_(True)
    out = ns.recalibrate(model, batches(), inplace=True)
    assert out is model
    assert all(p.grad is None for p in model.parameters())


# --- the command line ----------------------------------------------------------------------------
FACTORY = '''
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)).eval()
'''


def test_cli_recalibrate(tmp_path, capsys):
    import numpy as np

    from normsurgeon import cli

    f = tmp_path / "net.py"
    f.write_text(FACTORY)
    x = np.random.default_rng(0).standard_normal((40, 3, 9, 9)).astype(np.float32) * 2 + 1
    np.save(tmp_path / "calib.npy", x)
    out = tmp_path / "re.pt"
    assert cli.main(["recalibrate", f"{f}:build", "--data", str(tmp_path / "calib.npy"),
                     "--batch-size", "16", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 layer(s) recalibrated" in text and f"wrote {out}" in text
    state = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = cli.load_model(f"{f}:build")
    with torch.no_grad():
        h = model[0](torch.from_numpy(x)).double()
    torch.testing.assert_close(state["1.running_var"].double(), h.var((0, 2, 3)), rtol=1e-5,
                               atol=1e-6)
    torch.save(torch.from_numpy(x), tmp_path / "calib.pt")
    assert cli.main(["recalibrate", f"{f}:build", "--data", str(tmp_path / "calib.pt"),
                     "--exact", "-o", str(out), "--json"]) == 0
    assert '"recalibrated"' in capsys.readouterr().out
    for argv, words in (
            (["--data", str(tmp_path / "none.npy")], "does not exist"),
            (["--data", str(f)], "cannot read --data"),
            (["--data", str(tmp_path / "calib.npy"), "--batch-size", "0"], "--batch-size"),
            (["--data", str(tmp_path / "calib.npy"), "--num-batches", "-1"], "--num-batches")):
        assert cli.main(["recalibrate", f"{f}:build", *argv, "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1


# --- distributed: 2 gloo processes, unequal batch sizes ----------------------------------------
def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    data = batches((8, 8, 5))
    mine = data[:2] if rank == 0 else data[2:]  # 16 images on rank 0, 5 on rank 1
    for exact in (False, True):
        out = ns.recalibrate(net(), mine, exact=exact)
        torch.save({k: v for k, v in out.state_dict().items() if "running" in k},
                   os.path.join(out_dir, f"rank{rank}_{exact}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_distributed_ranks_end_with_the_global_statistics(tmp_path):
    import os

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)
    for exact in (False, True):
        single = ns.recalibrate(net(), batches((8, 8, 5)), exact=exact).state_dict()
        for rank in range(2):
            got = torch.load(os.path.join(tmp_path, f"rank{rank}_{exact}.pt"))
            for k, v in got.items():
                torch.testing.assert_close(v, single[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (3, 2)), nn.BatchNorm1d(3)),
     (10, 4)),                                                        # BatchNorm1d on (N, C, L)
    (lambda: nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3)), (4, 2, 3, 3, 3)),
    (lambda: nn.Sequential(nn.Conv2d(2, 3, 1), nn.SyncBatchNorm(3)), (4, 2, 5, 5)),
])
def test_every_batchnorm_kind_gets_its_pooled_statistics(make, shape):
    torch.manual_seed(0)
    model = randomize_bn(make(), 0).eval()
    data = [torch.randn(*shape) * 3 + 1 for _ in range(3)]
    out = ns.recalibrate(model, data)
    with torch.no_grad():
        h = model[:-1](torch.cat(data)).double()
    dims = (0, *range(2, h.dim()))
    torch.testing.assert_close(out[-1].running_mean.double(), h.mean(dims), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(out[-1].running_var.double(), h.var(dims), rtol=1e-5,
                               atol=1e-6)


def test_frozen_lookalikes_are_skipped_with_a_reason():
    from .fuzz_models import FrozenBN

    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBN(4), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4)).eval()
    rep = ns.recalibrate_with_report(model, batches())[1]
    assert [r.action for r in rep] == ["skipped", "recalibrated"]
    assert "look-alike" in rep.sites[0].reason
