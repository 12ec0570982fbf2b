"""Regression tests for the soundness families of issue 9: each builds a model the way timm, mmcv
or research code builds it, and asserts that ``convert`` either returns an exact model or reports
the site unchanged with a reason; never a silently wrong model, never a touched input."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normsurgeon as ns
from normsurgeon.functional import rel_error
from normsurgeon.testing import model_fingerprint, shared_storage

from .conftest import CONVERT_BAR, FOLD_BAR, count_bn, randomize_bn


def prep(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_bn(model, seed).eval()


def conv_bn(c_in: int = 3, c: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))


X = torch.randn(2, 3, 8, 8)


def out_of(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


# --- 1. the input model is never changed ----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("to", ["fold", "cbn", "rbn"])
def test_input_model_is_bit_identical_and_shares_no_storage(dtype, to):
    model = prep(conv_bn()).to(dtype)
    model[0].weight.requires_grad_(False)
    model[2].register_forward_hook(lambda m, i, o: None)
    before = model_fingerprint(model)
    opts = {"cond_dim": 4} if to == "cbn" else {}
    out = ns.convert(model, to, **opts)
    assert model_fingerprint(model) == before
    assert shared_storage(model, out) == []


def test_float64_fold_does_not_scale_the_users_weights():
    model = prep(conv_bn()).double()
    w = model[0].weight.detach().clone()
    ns.convert(model, "fold")
    assert torch.equal(model[0].weight, w)


def test_shared_storage_sees_views_not_just_objects():
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4)
    b.weight = nn.Parameter(a.weight.detach()[:, :])  # a view of a's storage, another object
    assert shared_storage(a, b) == ["weight"]


# --- 2. a BatchNorm that is not a plain BatchNorm -----------------------------------------
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: BN then activation in one module."""

    def __init__(self, c: int, act: nn.Module | None = None) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         False, 0.0, self.eps)
        return self.act(self.drop(x))


class ScaledBN(nn.BatchNorm2d):
    """A subclass whose forward is not affine in the way it looks (a research-code trick)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * x.abs().mean()


class FrozenBNPlus(nn.Module):
    """A frozen-BN look-alike whose forward does more than the affine map."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(c))
        self.register_buffer("bias", torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return (x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)).clamp(min=-0.5)


class FrozenBN(FrozenBNPlus):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU(), nn.Hardswish(), nn.Identity()])
def test_norm_act_subclass_keeps_its_activation(act):
    model = prep(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act), nn.Conv2d(8, 4, 1)))
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert rel_error(out_of(out, X), out_of(model, X)) <= FOLD_BAR
    assert report["1"].action == "folded" and count_bn(out) == 0
    assert type(out[1]) is type(act)  # the activation stays, the BN part is gone


def test_subclass_that_is_not_affine_is_refused_with_reason():
    model = prep(nn.Sequential(nn.Conv2d(3, 8, 3), ScaledBN(8), nn.Conv2d(8, 4, 1)))
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert report["1"].action == "skipped"
    assert "does not compute the eval BatchNorm affine map" in report["1"].reason
    assert rel_error(out_of(out, X), out_of(model, X)) <= FOLD_BAR


def test_lookalike_that_does_more_is_refused_and_the_plain_one_folds():
    bad = prep(nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBNPlus(8), nn.Conv2d(8, 4, 1)))
    good = prep(nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBN(8), nn.Conv2d(8, 4, 1)))
    for model, action in ((bad, "skipped"), (good, "folded")):
        for example in (X, None):  # probed without example inputs too
            out, report = ns.convert_with_report(model, example_inputs=example)
            assert report["1"].action == action, report["1"].reason
            assert rel_error(out_of(out, X), out_of(model, X)) <= FOLD_BAR


# --- 3. hooks -------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["bn", "bn-pre", "conv"])
def test_hooks_on_bn_or_receiving_layer_are_refused(where):
    model = prep(conv_bn())
    if where == "bn":
        model[1].register_forward_hook(lambda m, i, o: o * 2)
    elif where == "bn-pre":
        model[1].register_forward_pre_hook(lambda m, i: (i[0] + 1,))
    else:
        model[0].register_forward_hook(lambda m, i, o: o - 1)
    for to, opts in (("fold", {}), ("rbn", {}), ("cbn", {"cond_dim": 3})):
        out, report = ns.convert_with_report(model, to, **opts)
        if where == "conv" and to != "fold":  # replacing the BN leaves the conv as it is
            assert report["1"].action == "replaced"
        else:
            assert report["1"].action == "skipped" and "hook" in report["1"].reason
        args = (X, torch.randn(2, 3)) if to == "cbn" else (X,)
        assert rel_error(out_of(out, *args), out_of(model, X)) <= FOLD_BAR


# --- 4. other readers of what a fold changes ------------------------------------------------
class TiedAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.enc(x)))
        return F.conv_transpose2d(h, self.enc.weight, stride=2, padding=1)


class ReadsBNWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y * torch.sigmoid(self.bn.weight).reshape(1, -1, 1, 1)


class TypeCast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y.type(torch.float64).float()


@pytest.mark.parametrize("cls", [TiedAutoencoder, ReadsBNWeight, TypeCast])
@pytest.mark.parametrize("with_inputs", [True, False])
def test_other_readers_refuse_the_fold(cls, with_inputs):
    model = prep(cls())
    out, report = ns.convert_with_report(model, example_inputs=X if with_inputs else None)
    assert report["bn"].action == "skipped", report.table()
    assert rel_error(out_of(out, X), out_of(model, X)) <= FOLD_BAR


# --- 5. TorchScript submodules ----------------------------------------------------------
class WithScripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = conv_bn()
        self.block = torch.jit.script(nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.head(x))


@pytest.mark.parametrize("with_inputs", [True, False])
def test_torchscript_blocks_are_opaque_leaves(with_inputs):
    model = prep(WithScripted())
    out, report = ns.convert_with_report(model, example_inputs=X if with_inputs else None)
    assert report["head.1"].action == "folded" and report["head.4"].action == "folded"
    scripted = [r for r in report.sites if r.name.startswith("block")]
    assert scripted and all(r.action == "skipped" and "TorchScript" in r.reason
                            for r in scripted)
    assert rel_error(out_of(out, X), out_of(model, X)) <= FOLD_BAR


# --- 6. layouts that the example input disproves ------------------------------------------
def test_unbatched_conv1d_then_bn1d_is_refused():
    model = prep(nn.Sequential(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6)))
    x = torch.randn(4, 8)  # unbatched (C, L): BatchNorm1d normalizes axis 1 = L (length 6)
    model = prep(nn.Sequential(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6)))
    out, report = ns.convert_with_report(model, example_inputs=x)
    assert report["1"].action == "skipped" and "unbatched" in report["1"].reason
    assert rel_error(out_of(out, x), out_of(model, x)) <= FOLD_BAR


class ShapeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Conv2d(3, 8, 3, padding=1)
        self.large = nn.Conv2d(3, 8, 5, padding=2)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.small(x) if x.shape[-1] <= 8 else self.large(x)
        return self.bn(y).flatten(1).sum(1, keepdim=True) * torch.ones(len(x), 1)


def test_fold_specialised_on_a_shape_branch_is_refused():
    model = prep(ShapeBranch())
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert report.regions[""] == "concrete"
    assert report["bn"].action == "skipped" and "branch" in report["bn"].reason
    big = torch.randn(2, 3, 16, 16)
    assert rel_error(out_of(out, big), out_of(model, big)) <= FOLD_BAR


# --- 7. provable layouts -----------------------------------------------------------------
class Head(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.how == "flatten":
            h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        elif self.how == "view":
            h = F.adaptive_avg_pool2d(h, 1).view(h.size(0), -1)
        else:
            h = h.mean((2, 3))
        return self.bn(self.fc(h))


@pytest.mark.parametrize("how", ["flatten", "view", "mean"])
def test_rank_is_proved_from_the_graph(how):
    model = prep(Head(how))
    out, report = ns.convert_with_report(model)  # no example inputs
    assert report["bn"].action == "folded", report["bn"].reason
    assert rel_error(out_of(out, X), out_of(model, X)) <= FOLD_BAR


def test_bam_resnet18_folds_what_fuse_folds():
    pytest.importorskip("pytorchcv")
    from pytorchcv.models.bamresnet import bam_resnet18
    from torch.fx.experimental.optimization import fuse

    model = prep(bam_resnet18())
    out, report = ns.convert_with_report(model)
    assert count_bn(out) <= count_bn(fuse(copy.deepcopy(model)))


# --- 8-10. CBN models: saving, several inputs, converting twice ---------------------------
class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn()

    def forward(self, offset: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.body(x + offset)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y if float(y.mean()) > -100 else -y


@pytest.mark.parametrize("cls", [lambda: conv_bn(), Untraceable])
def test_cbn_models_round_trip_through_torch_save(cls):
    model = prep(cls())
    cbn = ns.convert(model, "cbn", cond_dim=3)
    cond = torch.randn(2, 3)
    buf = io.BytesIO()
    torch.save(cbn, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert torch.equal(out_of(again, X, cond), out_of(cbn, X, cond))
    assert torch.equal(out_of(copy.deepcopy(cbn), X, cond), out_of(cbn, X, cond))
    assert pickle.loads(pickle.dumps(cbn)) is not None
    with pytest.raises(ns.ConditionError):
        again(X, torch.randn(2, 5))


@pytest.mark.parametrize("traceable", [True, False])
def test_cbn_checks_the_batch_each_layer_sees(traceable):
    model = prep(TwoInputs() if traceable else TwoInputsUntraceable())
    cbn = ns.convert(model, "cbn", cond_dim=3)
    offset = torch.randn(1, 3, 1, 1)
    y = out_of(cbn, offset, X, torch.randn(2, 3))
    assert rel_error(y, out_of(model, offset, X)) <= CONVERT_BAR
    with pytest.raises(ns.ConditionError, match="batch"):
        cbn(offset, X, torch.randn(3, 3))


class TwoInputsUntraceable(TwoInputs):
    def forward(self, offset: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x + offset)
        return y if float(y.mean()) > -100 else -y


@pytest.mark.parametrize("traceable", [True, False])
def test_cbn_twice_is_refused_clearly(traceable):
    model = prep(conv_bn() if traceable else Untraceable())
    cbn = ns.convert(model, "cbn", cond_dim=3, types=(nn.BatchNorm2d,))
    with pytest.raises(ns.NormSurgeonError, match="already takes a condition"):
        ns.convert(cbn, "cbn", cond_dim=3)
    # folding and RBN of a CBN model leave the condition alone and fold nothing wrongly
    again = ns.convert(cbn, "rbn")
    cond = torch.randn(2, 3)
    assert torch.equal(out_of(again, X, cond), out_of(cbn, X, cond))


# --- 11. torch.compile --------------------------------------------------------------------
def test_compiled_cbn_raises_condition_error():
    cbn = ns.ConditionalBatchNorm2d(8, cond_dim=3).eval()
    compiled = torch.compile(cbn, backend="eager")
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(compiled(x, torch.zeros(2, 3)), cbn(x, torch.zeros(2, 3)))
    with pytest.raises(ns.ConditionError):
        compiled(x, torch.zeros(2, 5))
    with pytest.raises(ns.ConditionError):
        compiled(x, torch.zeros(2, 3, dtype=torch.long))


# --- 12. RBN checkpoints ------------------------------------------------------------------
def test_original_checkpoint_loads_into_rbn_and_keeps_the_function():
    model = prep(conv_bn())
    rbn = ns.convert(model, "rbn")
    assert torch.equal(rbn[1].weight, model[1].weight)  # weight stays the original γ
    missing, unexpected = rbn.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected
    assert rel_error(out_of(rbn, X), out_of(model, X)) <= CONVERT_BAR


# --- the self-check guard -----------------------------------------------------------------
class BadRule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_self_check_raises_on_a_wrong_result(monkeypatch):
    from normsurgeon import foldmath

    real = foldmath.fold_conv_bn

    def wrong(weight, bias, s, t, *, like=None):
        w, b = real(weight, bias, s, t, like=like)
        return w, b + 1  # a planted bug
    monkeypatch.setattr(foldmath, "fold_conv_bn", wrong)
    model = prep(nn.Sequential(BadRule(), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)))
    monkeypatch.setattr(foldmath, "fold_conv_bn", lambda w, b, s, t, *, like=None: (
        wrong(w, b, s, t, like=like) if w.shape[0] == 8 else real(w, b, s, t, like=like)))
    with pytest.raises(ns.ConversionMismatchError, match="rel") as info:
        ns.convert(model, example_inputs=X)
    assert info.value.sites == ["0.bn"] and "0.bn" in str(info.value)
    ok = ns.convert(model, example_inputs=X, exclude="0.bn")  # the advice works
    assert count_bn(ok) == 1
    out, report = ns.convert_with_report(model, example_inputs=X, check=False)
    assert report.max_rel_error > FOLD_BAR  # measured and reported, not raised


# --- found by the fuzzer (tests/test_fuzz.py) ---------------------------------------------
def test_scripted_blocks_are_copied_with_real_parameters():
    """copy.deepcopy of a ScriptModule gives non-leaf tensors; freeze_base then raised."""
    model = prep(nn.Sequential(torch.jit.script(conv_bn())))
    for to, opts in (("fold", {}), ("rbn", {"freeze_base": True}), ("cbn", {"cond_dim": 3})):
        out = ns.convert(model, to, **opts)
        assert all(p.is_leaf for p in out.parameters()), to
        assert shared_storage(model, out) == []


def test_cbn_of_a_model_without_replaceable_bn_is_still_recognised():
    """A CBN conversion that replaced nothing still added a condition; doing it again added a
    second one."""
    model = prep(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()))
    cbn = ns.convert(model, "cbn", cond_dim=3)
    with pytest.raises(ns.NormSurgeonError, match="already takes a condition"):
        ns.convert(cbn, "cbn", cond_dim=3)


def test_self_check_accepts_nan_where_the_original_has_nan():
    model = prep(conv_bn())
    model[4].running_var[0] = float("nan")  # left unfolded, NaN in both outputs
    out, report = ns.convert_with_report(model, example_inputs=X)
    assert report["4"].action == "skipped" and report.max_rel_error <= FOLD_BAR


# --- numeric claims hold as stated (docs/bars.md) -------------------------------------------
@pytest.mark.parametrize("name", ["resnet.resnet18", "regnet.regnety004",
                                  "mobilenetv2.mobilenetv2_w1"])
@pytest.mark.parametrize("to", ["cbn", "rbn"])
def test_cbn_rbn_conversion_bar_on_pytorchcv(name, to):
    """rel ≤ 1e-6, or ≤ 4x the model's own fp32-vs-float64 error where that is larger; the
    self-check enforces the same bar (it raises otherwise)."""
    pytest.importorskip("pytorchcv")
    import importlib

    module, fn = name.split(".")
    model = prep(getattr(importlib.import_module(f"pytorchcv.models.{module}"), fn)())
    x = torch.randn(2, 3, 224, 224)
    opts = {"cond_dim": 8} if to == "cbn" else {}
    out, report = ns.convert_with_report(model, to, example_inputs=x, **opts)
    args = (x, torch.randn(2, 8)) if to == "cbn" else (x,)
    rel = rel_error(out_of(out, *args), out_of(model, x))
    twin = copy.deepcopy(model).double()
    noise = rel_error(out_of(model, x), out_of(twin, x.double()))
    assert rel <= max(CONVERT_BAR, 4 * noise), (rel, noise)
    assert report.max_rel_error == pytest.approx(rel, rel=0.5, abs=1e-7)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 30), st.integers(1, 8)),
                max_size=8),
       st.lists(st.tuples(st.integers(0, 4), st.integers(0, 30), st.integers(1, 8)),
                max_size=8))
def test_shared_storage_equals_the_pairwise_definition(a_views, b_views):
    """The interval search gives what comparing every pair of storages gives (base 4 is b's
    own memory, never shared)."""
    bases = [torch.zeros(40) for _ in range(5)]
    a, b = nn.Module(), nn.Module()
    for i, (k, lo, n) in enumerate(a_views):
        a.register_buffer(f"t{i}", bases[k][lo:lo + n])
    for i, (k, lo, n) in enumerate(b_views):
        b.register_buffer(f"u{i}", bases[k][lo:lo + n])

    def span(t):
        s = t.untyped_storage()
        return s.data_ptr(), s.data_ptr() + s.nbytes()

    ref = [name for name, t in b._buffers.items()
           if any(span(t)[0] < span(u)[1] and span(u)[0] < span(t)[1]
                  for u in a._buffers.values())]
    assert shared_storage(a, b) == ref


def test_norm_act_never_folds_into_its_consumer():
    """Found by the fuzzer's long mode: with the producer refused (a hook), the norm+act layer
    was folded into the next conv, putting its activation before the affine."""
    model = prep(nn.Sequential(nn.Conv2d(3, 8, 1), BatchNormAct2d(8), nn.Conv2d(8, 4, 1)))
    model[0].register_forward_hook(lambda m, i, o: o * 1.5)
    out, report = ns.convert_with_report(model)
    assert report["1"].action == "skipped" and "activation" in report["1"].reason
    assert rel_error(out_of(out, X), out_of(model, X)) <= FOLD_BAR


def test_conversion_restores_the_callers_thread_setting(monkeypatch):
    """Conversion runs its own work on one intra-op thread (issue 12); the caller's setting is
    back afterwards, after an error too, the model's forwards use the caller's count, and the
    fold math may use up to the caller's count for its large blocks (tested in
    test_functional)."""
    from normsurgeon import api, functional

    before = torch.get_num_threads()
    seen, offered = [], []

    def workspace(threads: int = 1):
        offered.append(threads)
        return functional.float64_workspace(threads)

    monkeypatch.setattr(api, "float64_workspace", workspace)
    # the process's only Python thread (earlier tests may leave daemon threads, e.g. tqdm's
    # monitor; with other threads a conversion leaves the thread setting alone: test_edges)
    monkeypatch.setattr(api.threading, "active_count", lambda: 1)
    model = prep(conv_bn())
    model[2].register_forward_pre_hook(lambda m, i: seen.append(torch.get_num_threads()))
    try:
        torch.set_num_threads(3)
        ns.convert(model, example_inputs=X)
        assert torch.get_num_threads() == 3 and offered == [3]
        # exactly two forwards of the model, both with the caller's threads: the recording
        # pass and the self-check (issue 12: the check costs at most two forwards)
        assert seen == [3, 3]
        with pytest.raises(ns.ModelInTrainingModeError):
            ns.convert(conv_bn().train())
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_cbn_threading_never_shadows_a_users_module_name():
    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = conv_bn()
            self.condition_check = nn.Identity()  # the name the condition check would take

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.condition_check(self.body(x))

    model = prep(Named())
    cbn = ns.convert(model, "cbn", cond_dim=3)
    assert isinstance(cbn.condition_check, nn.Identity)
    assert rel_error(out_of(cbn, X, torch.randn(2, 3)), out_of(model, X)) <= CONVERT_BAR
