"""Folding through the public API: patterns, every refusal, options, dtypes, fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse

import normsurgeon as ns
from normsurgeon.functional import rel_error

from .conftest import HALF_BAR, assert_fold_exact, count_bn, randomize_bn


def prep(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_bn(model, seed).eval()


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, **kw) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False, **kw),
                         nn.BatchNorm2d(cout), nn.ReLU())


def small_cnn() -> nn.Module:
    return nn.Sequential(ConvBNReLU(3, 8), ConvBNReLU(8, 16, groups=4), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10), nn.BatchNorm1d(10))


X = torch.randn(4, 3, 16, 16)


# --- the main path ----------------------------------------------------------------------
def test_fold_small_cnn_removes_all_bn_exactly():
    model = prep(small_cnn())
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert count_bn(model) == 3 and count_bn(out) == 0
    assert report.counts == {"folded": 3}
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-5
    assert_fold_exact(model, out, X)
    assert report["0.1"].target == "0.0" and report["5"].target == "4"


def test_user_model_is_not_modified():
    model = prep(small_cnn())
    before = copy.deepcopy(model.state_dict())
    ns.convert(model, example_inputs=X)
    assert count_bn(model) == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_inplace_modifies_the_model():
    model = prep(small_cnn())
    ref = copy.deepcopy(model)
    out = ns.convert(model, example_inputs=X, inplace=True)
    assert out is model and count_bn(model) == 0
    assert_fold_exact(ref, model, X)


def test_training_mode_is_an_error_with_hint():
    with pytest.raises(ns.ModelInTrainingModeError, match=r"model\.eval\(\)"):
        ns.convert(small_cnn().train())


def test_unknown_transform_lists_choices():
    with pytest.raises(ns.UnknownTransformError, match="fold"):
        ns.convert(small_cnn().eval(), to="nonsense")


def test_misuse_raises_type_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        ns.convert("not a model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="example_inputs"):
        ns.convert(small_cnn().eval(), example_inputs=3)
    with pytest.raises(TypeError, match="include"):
        ns.convert(small_cnn().eval(), include=3)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_nd_and_convtranspose_grouped(dim):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    convt = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    model = prep(nn.Sequential(conv(4, 6, 3, padding=1, padding_mode="reflect"), bn(6),
                               convt(6, 4, 3, stride=2, groups=2, bias=False), bn(4)))
    x = torch.randn(2, 4, *(6,) * dim)
    out, report = ns.convert_with_report(model, example_inputs=x)
    assert report.counts == {"folded": 2} and count_bn(out) == 0
    assert_fold_exact(model, out, x)


# --- known bugs of torch.fx's fuse -------------------------------------------------------
class ConvCalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


def test_conv_called_twice_is_refused_and_fuse_is_wrong():
    model = prep(ConvCalledTwice())
    fused_rel = rel_error(fuse(copy.deepcopy(model))(X), model(X))
    assert fused_rel > 1e-2, "fx fuse silently reuses the folded weights at the second call"
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert report["bn"].action == "skipped"
    assert "called at 2 sites" in report["bn"].reason
    assert_fold_exact(model, out, X)


class LinearOnNCL(nn.Module):
    """Linear acts on L, BatchNorm1d on C: not a Linear → BN fold (docs/math.md)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_bn1d_on_3d_input_is_refused_and_fuse_is_wrong():
    model = prep(LinearOnNCL())
    x = torch.randn(4, 8, 8)
    assert rel_error(fuse(copy.deepcopy(model))(x), model(x)) > 1e-2
    out, report = ns.convert_with_report(model, example_inputs=x)
    assert report["bn"].action == "skipped" and "(4, 8, 8)" in report["bn"].reason
    assert_fold_exact(model, out, x)
    # without example inputs nothing proves the layout: refused, and the reason says why
    assert "cannot prove" in ns.inspect(model)["bn"].reason


def test_linear_bn1d_on_2d_input_folds():
    model = prep(LinearOnNCL())
    x = torch.randn(4, 8)
    out, report = ns.convert_with_report(model, example_inputs=x)
    assert report["bn"].action == "folded" and count_bn(out) == 0
    assert_fold_exact(model, out, x)


# --- every refusal ---------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


class StdConv(nn.Conv2d):
    def forward(self, x):
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("build, name, reason", [
    (Residual, "bn", "other users"),
    (SharedWeights, "bn", "shared"),
    (lambda: nn.Sequential(StdConv(3, 3, 1), nn.BatchNorm2d(3)), "1", "overrides forward"),
    (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, padding=1)), "0", "zero padding"),
    (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 3, 3)), "0", "ConvTranspose"),
    (lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3), nn.ReLU()), "2",
     "producer is ReLU"),
])
def test_refusals_are_reported_and_exact(build, name, reason):
    model = prep(build())
    out, report = ns.convert_with_report(model, example_inputs=X, leaf_modules=(StdConv,))
    assert report[name].action == "skipped"
    assert reason in report[name].reason
    assert_fold_exact(model, out, X)


def test_bn_in_train_mode_inside_eval_model_is_skipped():
    model = prep(small_cnn())
    model[0][1].train()
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert "training mode" in report["0.1"].reason
    assert report.counts == {"folded": 2, "skipped": 1}


def test_bn_without_running_stats_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    report = ns.inspect(model)
    assert "track_running_stats=False" in report["1"].reason


def test_non_finite_stats_are_skipped():
    model = prep(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    model[1].running_var[0] = float("nan")
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert "not finite" in report["1"].reason
    torch.testing.assert_close(out(X), model(X), equal_nan=True)


def test_bn_before_conv_folds_without_zero_padding():
    model = prep(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1,
                                                           padding_mode="replicate"),
                               nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1, groups=2)))
    # second BN folds into its producer (preferred) even though the consumer could take it
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert report["0"].detail.startswith("consumer") and report["0"].target == "1"
    assert report["2"].detail.startswith("producer")
    assert count_bn(out) == 0
    assert_fold_exact(model, out, X)


def test_fp16_overflow_is_refused():
    model = prep(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-12))).half()
    model[0].weight.data.fill_(100.0)  # 100 / sqrt(1.2e-7) ≈ 2.9e5 > 65504
    model[1].running_var.fill_(1e-7)
    report = ns.inspect(model)
    assert "overflow torch.float16" in report["1"].reason


# --- strict / include / exclude ------------------------------------------------------------
def test_strict_raises_with_every_reason_before_changing_anything():
    model = prep(nn.Sequential(Residual(), ConvBNReLU(3, 3), ConvCalledTwice()))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ns.StrictModeError) as e:
        ns.convert(model, strict=True, inplace=True)
    assert set(e.value.reasons) == {"0.bn", "2.bn"}
    assert "other users" in str(e.value) and "2 sites" in str(e.value)
    assert count_bn(model) == 3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_include_exclude_globs():
    model = prep(small_cnn())
    rep = ns.inspect(model, example_inputs=X, include="0.*")
    assert rep.counts == {"folded": 1, "excluded": 2}
    rep = ns.inspect(model, example_inputs=X, exclude=["0.*", "5"])
    assert rep["1.1"].action == "folded" and rep["0.1"].action == "excluded"
    out = ns.convert(model, example_inputs=X, exclude="5")
    assert count_bn(out) == 1 and isinstance(out[5], nn.BatchNorm1d)


# --- dtypes and memory formats -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_folding(dtype):
    model = prep(small_cnn()).to(dtype)
    x = X.to(dtype)
    out = ns.convert(model, example_inputs=x)
    assert out[0][0].weight.dtype == dtype and out[0][0].bias.dtype == dtype
    ref32 = prep(small_cnn()).float()
    ref32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert rel_error(out(x).float(), ref32(X.to(dtype).float())) <= HALF_BAR


def test_channels_last_is_preserved():
    model = prep(small_cnn()).to(memory_format=torch.channels_last)
    x = X.to(memory_format=torch.channels_last)
    out = ns.convert(model, example_inputs=x)
    w = out[0][0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert_fold_exact(model, out, x)


# --- BN flavours -------------------------------------------------------------------------------
class FrozenBatchNorm2d(nn.Module):
    """Look-alike of torchvision's FrozenBatchNorm2d (buffers only, always eval)."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros),
                           ("running_mean", torch.zeros), ("running_var", torch.ones)):
            self.register_buffer(name, init(n))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def test_frozen_bn_lookalike_and_syncbn_fold():
    model = prep(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU(),
                               nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4)))
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert report.counts == {"folded": 2} and count_bn(out) == 0
    assert report["1"].kind == "FrozenBatchNorm2d" and report["4"].kind == "SyncBatchNorm"
    assert_fold_exact(model, out, X)


def test_lookalike_with_inconsistent_sizes_is_refused_with_reason():
    """A BN look-alike whose γ is a scalar is not a per-channel affine map: refused, not a crash."""
    bn = FrozenBatchNorm2d(4)
    bn.weight = torch.full((1,), 1.5)
    model = prep(nn.Sequential(nn.Conv2d(3, 4, 3), bn))
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert report.counts == {"skipped": 1}
    assert "disagree in size" in report["1"].reason
    assert_fold_exact(model, out, X)


class FunctionalBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        for name, init in (("g", torch.ones), ("b", torch.zeros), ("m", torch.zeros),
                           ("v", torch.ones)):
            self.register_buffer(name, init(4))

    def forward(self, x):
        return F.relu(F.batch_norm(self.conv(x), self.m, self.v, self.g, self.b, False, 0.1,
                                   1e-5))


def test_functional_batch_norm_on_constants_folds():
    model = FunctionalBN().eval()
    g = torch.Generator().manual_seed(1)
    for t, lo, hi in ((model.m, -1, 1), (model.v, 0.5, 2), (model.g, 0.5, 1.5), (model.b, -.5, .5)):
        t.copy_(torch.rand(4, generator=g) * (hi - lo) + lo)
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert report.counts == {"folded": 1}
    assert report.sites[0].kind == "F.batch_norm"
    assert "batch_norm" not in out.code
    assert_fold_exact(model, out, X)


# --- models torch.fx cannot trace ----------------------------------------------------------------
class DataDependent(nn.Module):
    """Python control flow on a shape and on values: symbolic tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNReLU(3, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.tail = ConvBNReLU(8, 8)

    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] % 2 == 0:
            x = F.pad(x, [0, int(x.size(-1)) % 3, 0, 0])
        y = self.bn(self.conv(x))
        if float(y.mean()) > -1e9:
            y = y + 1
        return self.tail(y)


def test_untraceable_model_without_inputs_folds_traceable_children():
    model = prep(DataDependent())
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    out, report = ns.convert_with_report(model)
    assert report.regions[""].startswith("untraceable")
    assert report["stem.1"].action == "folded" and report["tail.1"].action == "folded"
    assert "untraceable module <model>" in report["bn"].reason
    assert "example_inputs" in report["bn"].reason
    assert type(out) is DataDependent
    assert_fold_exact(model, out, X)


def test_untraceable_model_with_inputs_is_traced_concretely_and_keeps_control_flow():
    model = prep(DataDependent())
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert report.regions[""] == "concrete"
    assert report.counts == {"folded": 3} and count_bn(out) == 0
    assert type(out) is DataDependent
    # the original forward runs, so other shapes follow their own branch and stay exact
    for shape in [(2, 3, 16, 16), (2, 3, 15, 15)]:
        assert_fold_exact(model, out, torch.randn(shape))


def test_model_without_batchnorm_and_result_unpacking():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    result = ns.convert_with_report(model, example_inputs=[X])
    out, report = result
    assert result[1] is report and len(report) == 0 and report.max_rel_error == 0.0
    assert out is not model and "0 BatchNorm site(s)" in report.table()


def test_report_lists_every_bn_once_and_serializes():
    model = prep(nn.Sequential(Residual(), ConvBNReLU(3, 3), DataDependent()))
    out, report = ns.convert_with_report(model)
    names = [s.name for s in report.sites]
    assert sorted(names) == sorted(n for n, m in model.named_modules()
                                   if isinstance(m, nn.BatchNorm2d))
    assert len(set(names)) == len(names)
    d = report.to_dict()
    assert d["counts"] == report.counts and len(d["sites"]) == len(report)
    table = report.table()
    assert "0.bn" in table and "other users" in table and report.summary() in table
    assert report.to_json()


class MixConv(nn.Module):
    """Channel groups through different kernels, concatenated (pytorchcv's MixNet)."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.b = nn.Conv2d(2, 5, 5, padding=2)
        self.bn = nn.BatchNorm2d(8)
        self.leak = leak

    def forward(self, x):
        xa, xb = torch.split(x, [2, 2], dim=1)
        ya, yb = self.a(xa), self.b(xb)
        out = self.bn(torch.cat((ya, yb), dim=1))
        return out + yb.mean() if self.leak else out


def test_cat_of_convs_then_bn_folds_each_slice():
    model = prep(MixConv())
    x = torch.randn(2, 4, 9, 9)
    out, report = ns.convert_with_report(model, example_inputs=x)
    assert report["bn"].action == "folded" and report["bn"].target == "a, b"
    assert "cat-conv-bn" in report["bn"].detail and count_bn(out) == 0
    assert_fold_exact(model, out, x)
    leaky = prep(MixConv(leak=True))
    out, report = ns.convert_with_report(leaky, example_inputs=x)
    assert report["bn"].action == "skipped" and "other users" in report["bn"].reason
    assert_fold_exact(leaky, out, x)


def test_randomize_bn_stats_follows_the_spec_ranges():
    from normsurgeon.testing import randomize_bn_stats

    model = nn.Sequential(nn.BatchNorm2d(64), FrozenBatchNorm2d(64), nn.InstanceNorm2d(64)).train()
    randomize_bn_stats(model, seed=3)
    assert model.training
    for bn in model[:2]:
        assert -1 <= float(bn.running_mean.min()) and float(bn.running_mean.max()) <= 1
        assert 0.5 <= float(bn.running_var.min()) and float(bn.running_var.max()) <= 2
        assert 0.5 <= float(bn.weight.min()) and float(bn.weight.max()) <= 1.5
        assert -0.5 <= float(bn.bias.min()) and float(bn.bias.max()) <= 0.5
        assert float(bn.running_var.std()) > 0.1  # not identity statistics
