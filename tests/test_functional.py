"""Property-based tests of the pure fold math against real modules, in float64."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from normsurgeon import functional as Fn

from .conftest import randomize_bn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: 9, 2: 7, 3: 5}


def _bn(c: int, dim: int, affine: bool, seed: int) -> nn.BatchNorm2d:
    bn = BN[dim](c, affine=affine).double().eval()
    return randomize_bn(bn, seed)


def _ss(bn: nn.Module):
    return Fn.bn_scale_shift(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


@st.composite
def conv_cfg(draw):
    dim = draw(st.sampled_from([1, 2, 3]))
    g = draw(st.sampled_from([1, 2, 4]))
    cin = g * draw(st.integers(1, 3))
    cout = g * draw(st.integers(1, 3))
    return dict(
        dim=dim, cin=cin, cout=cout, groups=g,
        k=draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)),
        dilation=draw(st.integers(1, 2)), padding=draw(st.integers(0, 2)),
        padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
        bias=draw(st.booleans()), affine=draw(st.booleans()), seed=draw(st.integers(0, 999)),
    )


def _conv(cfg, cls=None):
    cls = cls or CONV[cfg["dim"]]
    return cls(cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"], padding=cfg["padding"],
               dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"],
               padding_mode=cfg["padding_mode"]).double().eval()


def _x(cfg, c):
    return torch.randn((2, c) + (SPATIAL[cfg["dim"]],) * cfg["dim"], dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(conv_cfg())
def test_conv_bn_fold_is_exact(cfg):
    torch.manual_seed(cfg["seed"])
    conv, bn = _conv(cfg), _bn(cfg["cout"], cfg["dim"], cfg["affine"], cfg["seed"])
    x = _x(cfg, cfg["cin"])
    with torch.no_grad():
        ref = bn(conv(x))
        w, b = Fn.fold_conv_bn(conv.weight, conv.bias, *_ss(bn))
        conv.weight.data, conv.bias = w, nn.Parameter(b)
        assert Fn.rel_error(conv(x), ref) < 1e-12


@settings(max_examples=60, deadline=None)
@given(conv_cfg(), st.integers(0, 1))
def test_conv_transpose_bn_fold_is_exact(cfg, out_pad):
    cfg = {**cfg, "padding_mode": "zeros"}
    torch.manual_seed(cfg["seed"])
    ref = CONVT[cfg["dim"]](
        cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"], padding=0,
        output_padding=min(out_pad, max(cfg["stride"], cfg["dilation"]) - 1),
        dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"]).double()
    folded = type(ref)(ref.in_channels, ref.out_channels, ref.kernel_size, ref.stride,
                       ref.padding, ref.output_padding, ref.groups, True, ref.dilation).double()
    bn = _bn(cfg["cout"], cfg["dim"], cfg["affine"], cfg["seed"])
    w, b = Fn.fold_conv_transpose_bn(ref.weight, ref.bias, *_ss(bn), groups=ref.groups)
    folded.weight.data, folded.bias.data = w, b
    x = _x(cfg, cfg["cin"])
    with torch.no_grad():
        assert Fn.rel_error(folded(x), bn(ref(x))) < 1e-12


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_conv_transpose_groups_cin_ne_cout(groups):
    """docs/math.md: test g ∈ {1, 2, Cin} with Cin ≠ Cout."""
    cin, cout = 6, 12
    ref = nn.ConvTranspose2d(cin, cout, 3, stride=2, groups=groups).double()
    bn = _bn(cout, 2, True, 1)
    w, b = Fn.fold_conv_transpose_bn(ref.weight, ref.bias, *_ss(bn), groups=groups)
    x = torch.randn(2, cin, 5, 5, dtype=torch.float64)
    y = F.conv_transpose2d(x, w, b, stride=2, groups=groups)
    assert Fn.rel_error(y, bn(ref(x))) < 1e-12


@settings(max_examples=60, deadline=None)
@given(conv_cfg())
def test_bn_conv_fold_exact_when_no_zero_padding(cfg):
    if cfg["padding_mode"] == "zeros":
        cfg = {**cfg, "padding": 0}
    if cfg["padding_mode"] != "zeros" and cfg["padding"] == 0:
        cfg = {**cfg, "padding": 1}
    torch.manual_seed(cfg["seed"])
    conv, bn = _conv(cfg), _bn(cfg["cin"], cfg["dim"], cfg["affine"], cfg["seed"])
    x = _x(cfg, cfg["cin"])
    with torch.no_grad():
        ref = conv(bn(x))
        w, b = Fn.fold_bn_conv(conv.weight, conv.bias, *_ss(bn), groups=cfg["groups"])
        conv.weight.data, conv.bias = w, nn.Parameter(b)
        assert Fn.rel_error(conv(x), ref) < 1e-12


def test_bn_conv_zero_padding_is_not_exact():
    """Why BN → Conv with zero padding is refused: the borders differ (measured ~0.6)."""
    conv = nn.Conv2d(4, 4, 3, padding=1).double()
    bn = _bn(4, 2, True, 3)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    ref = conv(bn(x))
    w, b = Fn.fold_bn_conv(conv.weight, conv.bias, *_ss(bn), groups=1)
    assert Fn.rel_error(F.conv2d(x, w, b, padding=1), ref) > 1e-2


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(1, 16), st.booleans(), st.booleans(), st.integers(0, 99))
def test_linear_folds(fin, fout, bias, affine, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(fin, fout, bias=bias).double()
    x = torch.randn(5, fin, dtype=torch.float64)
    bn_after, bn_before = _bn(fout, 1, affine, seed), _bn(fin, 1, affine, seed + 1)
    w, b = Fn.fold_linear_bn(lin.weight, lin.bias, *_ss(bn_after))
    assert Fn.rel_error(F.linear(x, w, b), bn_after(lin(x))) < 1e-12
    w, b = Fn.fold_bn_linear(lin.weight, lin.bias, *_ss(bn_before))
    assert Fn.rel_error(F.linear(x, w, b), lin(bn_before(x))) < 1e-12


def test_cast_like_keeps_channels_last_and_dtype():
    ref = torch.randn(8, 4, 3, 3).half().to(memory_format=torch.channels_last)
    out = Fn.cast_like(torch.randn(8, 4, 3, 3, dtype=torch.float64), ref)
    assert out.dtype == torch.float16
    assert out.stride() == ref.stride()
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_rel_error_definition():
    ref = torch.tensor([1.0, -4.0])
    assert Fn.rel_error(torch.tensor([1.0, -3.0]), ref) == pytest.approx(0.25)
    assert Fn.rel_error(torch.zeros(2), torch.zeros(2)) == 0.0


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (torch.equal says -0 == +0)."""
    return x.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 37), st.sampled_from([(1,), (3,), (2, 3, 3), (5, 1, 1), (0, 3, 3)]),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       st.booleans(), st.sampled_from([8, 64, 1 << 18]), st.sampled_from([None, 1, 2]),
       st.integers(0, 99))
def test_fused_fold_is_float64_math_rounded_once(cout, tail, dtype, channels_last, block,
                                                 threads, seed):
    """like=: the blocked kernel gives bit for bit round(W·s computed in float64), in ``like``'s
    dtype and strides, for any number of blocks (block sizes down to 8 elements, so rows
    longer than a block, partial last blocks and empty weights all occur), outside a
    workspace or in one whose large blocks may run on two threads; the weight is never
    written."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn((cout,) + tail, generator=g, dtype=torch.float64) * 10).to(dtype)
    if channels_last and len(tail) == 3:
        w = w.to(memory_format=torch.channels_last)
    w0 = w.clone()
    s = torch.rand(cout, generator=g, dtype=torch.float64) * 3 - 1  # negative scales too
    t = torch.randn(cout, generator=g, dtype=torch.float64)
    before = Fn._BLOCK, Fn._TIMED
    Fn._BLOCK, Fn._TIMED = block, 8  # every block of 8+ elements counts as large
    try:
        if threads is None:
            w2, b2 = Fn.fold_conv_bn(w, None, s, t, like=w)
        else:
            with Fn.float64_workspace(threads=threads):
                w2, b2 = Fn.fold_conv_bn(w, None, s, t, like=w)
    finally:
        Fn._BLOCK, Fn._TIMED = before
    ref_w = (w.to(torch.float64) * s.reshape((-1,) + (1,) * len(tail))).to(dtype)
    ref_b = (s * 0 + t).to(dtype)
    assert w2.dtype == dtype and w2.shape == w.shape and w2.stride() == w.stride()
    assert torch.equal(_bits(w2), _bits(ref_w)) and torch.equal(_bits(b2), _bits(ref_b))
    assert torch.equal(_bits(w), _bits(w0))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.booleans(), st.booleans(),
                          st.sampled_from([torch.float32, torch.float16, torch.float64]),
                          st.sampled_from([1e-5, 1e-3, 0.0])), min_size=1, max_size=6),
       st.integers(0, 99))
def test_batched_scale_shift_equals_one_at_a_time(specs, seed):
    """The batched (s, t) equals the docs/math.md formula evaluated per BN in float64, to the bit
    (up to the sign of zero)."""
    g = torch.Generator().manual_seed(seed)
    stats = []
    def r(c: int, dtype: torch.dtype, lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(c, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    for c, has_w, has_b, dtype, eps in specs:
        stats.append((r(c, dtype, -1, 1), r(c, dtype, 0.5, 2), eps,
                      r(c, dtype, 0.5, 1.5) if has_w else None,
                      r(c, dtype, -0.5, 0.5) if has_b else None))
    for (s, t), (mean, var, eps, w, b) in zip(Fn.bn_scale_shift_many(stats), stats):
        # one BN at a time, straight from the formula, in float64
        s1 = torch.rsqrt(var.double() + eps)
        s1 = s1 * w.double() if w is not None else s1
        t1 = -mean.double() * s1
        t1 = t1 + b.double() if b is not None else t1
        assert s.dtype == t.dtype == torch.float64
        assert torch.equal(s, s1) and torch.equal(t, t1)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 4000),
                          st.sampled_from([torch.float32, torch.float16, torch.float64]),
                          st.booleans()), min_size=1, max_size=5),
       st.integers(0, 99))
def test_float64_workspace_changes_no_bit_and_never_leaks(specs, seed):
    """The reused work buffer (one per conversion) gives bitwise the same folds as fresh
    buffers, in any order of sizes (it grows), never shares memory with a result, and never
    scales the caller's weight (float64 weights included, where ``.to(float64)`` aliases)."""
    from normsurgeon.functional import _BLOCK

    g = torch.Generator().manual_seed(seed)
    cases = []
    for cout, row, dtype, channels_last in specs:
        w = torch.randn(cout, row, 1, 1, generator=g, dtype=torch.float64).to(dtype)
        if channels_last:
            w = w.to(memory_format=torch.channels_last)
        s = torch.rand(cout, generator=g, dtype=torch.float64) + 0.5
        cases.append((w, s, torch.randn(cout, generator=g, dtype=torch.float64)))
    # rows above _BLOCK elements take the one-row-per-block path, and grow the buffer
    cases.append((torch.randn(3, _BLOCK + 7, generator=g), torch.rand(3, dtype=torch.float64),
                  torch.zeros(3, dtype=torch.float64)))
    fresh = [Fn.fold_conv_bn(w, None, s, t, like=w) for w, s, t in cases]
    before = [w.clone() for w, _, _ in cases]
    with Fn.float64_workspace():
        reused = [Fn.fold_conv_bn(w, None, s, t, like=w) for w, s, t in cases]
        buf = Fn._local.buffers.get(torch.device("cpu"))
    assert Fn._local.buffers is None  # closed again
    assert buf is not None and buf.numel() >= _BLOCK + 7
    span = (buf.data_ptr(), buf.data_ptr() + buf.numel() * 8)
    for (w, _, _), w0, (wa, ba), (wb, bb) in zip(cases, before, fresh, reused):
        assert torch.equal(w, w0)  # the caller's weight is untouched
        assert torch.equal(wa, wb) and torch.equal(ba, bb)
        assert wb.stride() == w.stride() and wb.dtype == w.dtype
        lo = wb.data_ptr()
        assert lo + wb.numel() * wb.element_size() <= span[0] or lo >= span[1]


def test_float64_workspace_is_per_thread():
    """Another thread's folds inside a workspace never see this thread's buffer."""
    import threading

    seen = []
    with Fn.float64_workspace():
        Fn.fold_conv_bn(torch.randn(4, 3), None, torch.ones(4, dtype=torch.float64),
                        torch.zeros(4, dtype=torch.float64), like=torch.randn(4, 3))
        t = threading.Thread(target=lambda: seen.append(getattr(Fn._local, "buffers", None)))
        t.start()
        t.join()
        assert Fn._local.buffers  # this thread's buffer exists
    assert seen == [None]


class _ScriptedClock:
    """A clock whose every timed block takes the next scripted duration."""

    def __init__(self, durations: list[float]) -> None:
        self.durations, self.now, self.calls = list(durations), 0.0, 0

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:  # the end of a block
            self.now += self.durations.pop(0)
        return self.now


@pytest.mark.parametrize("durations, parallel_blocks", [
    ([1.0, 0.7, 0.7, 0.7, 0.7, 0.7], 5),   # idle cores: every block after the reference
    ([1.0, 0.7, 2.0, 0.7, 0.7, 0.7], 2),   # a stall: one thread from the next block on
    ([1.0, 1.1, 1.1, 0.7, 0.7, 0.7], 2),   # two in a row no faster: one thread from then on
    ([1.0, 1.1, 0.7, 1.1, 0.7, 1.2], 5),   # isolated slow blocks: stays parallel
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_large_blocks_use_threads_only_while_measured_faster(monkeypatch, durations,
                                                             parallel_blocks, dtype):
    """In a workspace opened with threads=2 the first large block runs on one thread (the
    reference), later ones on two until one stalls (1.5x the reference) or two in a row gain
    nothing; the thread setting is restored after each block, and the bits never change."""
    monkeypatch.setattr(Fn, "_BLOCK", 8)
    monkeypatch.setattr(Fn, "_TIMED", 8)
    monkeypatch.setattr(Fn, "_clock", _ScriptedClock(durations))
    monkeypatch.setattr(Fn, "_free_cores", lambda: None)  # as where the load cannot be read
    real_set, settings_seen = torch.set_num_threads, []

    def record(n: int) -> None:
        settings_seen.append(n)
        real_set(n)

    monkeypatch.setattr(torch, "set_num_threads", record)
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(0),  # six blocks of 8
                    dtype=torch.float64).to(dtype)
    s, t = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    before = torch.get_num_threads()
    with Fn.float64_workspace(threads=2):
        w2, b2 = Fn.fold_conv_bn(w, None, s, t, like=w)
    assert torch.get_num_threads() == before
    assert settings_seen == [2, before] * parallel_blocks
    ref = (w.double() * s.reshape(-1, 1)).to(dtype)
    assert torch.equal(_bits(w2), _bits(ref))
    assert torch.equal(_bits(b2), _bits((s * 0 + t).to(dtype)))


def test_one_thread_workspace_never_times_or_switches(monkeypatch):
    """threads=1 (a caller at one thread) and blocks below the size threshold never touch the
    thread setting or the clock."""
    monkeypatch.setattr(Fn, "_clock", lambda: pytest.fail("clock read"))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("threads set"))
    w = torch.randn(64, 300)  # 19,200 elements: below _TIMED
    s, t = torch.rand(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    with Fn.float64_workspace(threads=1):
        Fn.fold_conv_bn(torch.randn(4096, 64), None, torch.rand(4096, dtype=torch.float64),
                        torch.zeros(4096, dtype=torch.float64), like=torch.randn(4096, 64))
    with Fn.float64_workspace(threads=2):
        Fn.fold_conv_bn(w, None, s, t, like=w)
    with pytest.raises(ValueError, match="threads"):
        with Fn.float64_workspace(threads=0):
            pass


@pytest.mark.parametrize("free, parallel_blocks", [(None, 5), (4, 5), (2, 5), (1, 0), (0, 0)])
def test_threads_are_capped_at_the_cores_free_when_the_fold_starts(monkeypatch, free,
                                                                   parallel_blocks):
    """Other runnable tasks take cores: with one core (or none) free at the first large
    block, every block runs on one thread; where the load cannot be read (None), the
    measured rule alone decides."""
    monkeypatch.setattr(Fn, "_BLOCK", 8)
    monkeypatch.setattr(Fn, "_TIMED", 8)
    monkeypatch.setattr(Fn, "_clock", _ScriptedClock([1.0] + [0.7] * 5))
    monkeypatch.setattr(Fn, "_free_cores", lambda: free)
    real_set, settings_seen = torch.set_num_threads, []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (settings_seen.append(n),
                                                             real_set(n)))
    w = torch.randn(6, 8)
    s, t = torch.rand(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    before = torch.get_num_threads()
    with Fn.float64_workspace(threads=2):
        Fn.fold_conv_bn(w, None, s, t, like=w)
    assert settings_seen == [2, before] * parallel_blocks


def test_free_cores_reads_this_machine():
    """On Linux: at most the cores this process may use (this thread is running, so at least
    one of them is not taken by others unless the machine is oversubscribed)."""
    free = Fn._free_cores()
    if free is None:
        pytest.skip("/proc/stat or sched_getaffinity is not available here")
    import os

    assert free <= len(os.sched_getaffinity(0))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([("conv", "producer"), ("conv", "consumer"), ("convtranspose", "producer"),
                        ("linear", "producer"), ("linear", "consumer")]),
       st.sampled_from([1, 2, 3]), st.sampled_from([1, 2]),
       st.sampled_from([torch.float32, torch.float16, torch.float64]), st.booleans(),
       st.booleans(), st.integers(0, 999))
def test_numpy_arrays_fold_like_torch_tensors(kind_dir, k, groups, dtype, bias, affine, seed):
    """The ONNX front end hands the same math numpy arrays (normsurgeon.arrays): (s, t) agree
    to 2 ulp of float64 (torch.rsqrt vs 1/sqrt), and the same (s, t) give the same rounded
    weights bit for bit, with biases (a float64 sum, maybe in another order) within 1 ulp of
    their dtype or a few ε of the summed magnitudes; the inputs are never written."""
    import numpy as np

    from normsurgeon import foldmath

    kind, direction = kind_dir
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        groups, shape, c = 1, (6, 4), 6 if direction == "producer" else 4
    elif kind == "convtranspose":
        shape, c = (2 * groups, 3, k, k), 3 * groups
    else:
        shape = (2 * groups, 3, k, k)
        c = 2 * groups if direction == "producer" else 3 * groups
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(shape[0] if kind != "convtranspose" else c, generator=g,
                    dtype=torch.float64).to(dtype) if bias else None
    mean = torch.randn(c, generator=g)
    var = torch.rand(c, generator=g) + 0.1
    gamma = torch.randn(c, generator=g) if affine else None
    beta = torch.randn(c, generator=g) if affine else None
    n = [None if x is None else x.numpy().copy() for x in (w, b, mean, var, gamma, beta)]
    before = [None if x is None else x.copy() for x in n]
    s, t = foldmath.bn_scale_shift(mean, var, 1e-5, gamma, beta)
    s_np, t_np = foldmath.bn_scale_shift(n[2], n[3], 1e-5, n[4], n[5])
    assert isinstance(s_np, np.ndarray) and s_np.dtype == np.float64
    np.testing.assert_allclose(s_np, s.numpy(), rtol=5e-16, atol=0)
    np.testing.assert_allclose(t_np, t.numpy(), rtol=5e-16, atol=1e-300)
    w2, b2 = foldmath.fold_weights(kind, direction, w, b, s, t, groups)
    w2n, b2n = foldmath.fold_weights(kind, direction, n[0], n[1], s.numpy(), t.numpy(), groups)
    assert isinstance(w2n, np.ndarray) and w2n.dtype == n[0].dtype and w2n.shape == shape
    assert b2n.dtype == n[0].dtype
    assert np.array_equal(w2n.view(f"u{w2n.itemsize}"), w2.numpy().view(f"u{w2n.itemsize}"))
    ref = b2.numpy().astype(np.float64)
    ulp = np.spacing(np.abs(ref).astype(b2n.dtype)).astype(np.float64)
    # float64 sums in another order: a few ε of the summed magnitudes |W|·|t| (plus |b|)
    sums = 64 * 2.2e-16 * (float(np.abs(n[0].astype(np.float64)).sum())
                           * float(np.abs(t.numpy()).max()) + float(np.abs(ref).max()) + 1)
    assert (np.abs(b2n.astype(np.float64) - ref) <= np.maximum(ulp, sums)).all()
    for x, x0 in zip(n, before):
        assert x is None or np.array_equal(x, x0)
