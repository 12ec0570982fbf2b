"""convert(to="cbn" | "rbn"): function preserving, checkpoint compatible, trainable, strict
about conditions, for traceable and untraceable models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

import normsurgeon as ns
from normsurgeon.functional import rel_error
from normsurgeon.layers import ConditionalBatchNorm2d, RepresentativeBatchNorm2d, param_groups

from .conftest import CONVERT_BAR, randomize_bn
from .test_fold import DataDependent, small_cnn

X = torch.randn(4, 3, 16, 16)


def models():
    return {"traceable": randomize_bn(small_cnn()).eval(),
            "untraceable": randomize_bn(DataDependent()).eval()}


@pytest.mark.parametrize("kind", ["traceable", "untraceable"])
@pytest.mark.parametrize("opts", [dict(cond_dim=6), dict(num_classes=3, cond_dim=5)])
def test_cbn_conversion_preserves_outputs_for_any_condition(kind, opts):
    model = models()[kind]
    before = copy.deepcopy(model.state_dict())
    out, report = ns.convert_with_report(model, "cbn", example_inputs=X, **opts)
    n_bn2d = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert report.counts.get("replaced") == n_bn2d
    assert sum(isinstance(m, ConditionalBatchNorm2d) for m in out.modules()) == n_bn2d
    assert report.max_rel_error <= CONVERT_BAR
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        cond = (torch.randint(0, 3, (4,), generator=g) if "num_classes" in opts
                else torch.randn(4, 6, generator=g) * 5)
        with torch.no_grad():
            assert rel_error(out(X, cond), model(X)) <= CONVERT_BAR
    # the user's model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if kind == "traceable":
        assert isinstance(out, fx.GraphModule)
        assert "cond" in [n.name for n in out.graph.nodes if n.op == "placeholder"]
    else:
        assert isinstance(out, DataDependent) and "condition" in report.regions


@pytest.mark.parametrize("kind", ["traceable", "untraceable"])
def test_cbn_checkpoint_loads_and_only_new_params_train(kind):
    model = models()[kind]
    out = ns.convert(model, "cbn", cond_dim=6)
    res = out.load_state_dict(model.state_dict(), strict=False)
    assert res.unexpected_keys == []
    assert res.missing_keys and all(".cond_mlp." in k for k in res.missing_keys)
    trainable = {n for n, p in out.named_parameters() if p.requires_grad}
    assert trainable and all(".cond_mlp." in n for n in trainable)
    # a few steps change the output, and different conditions then differ
    opt = torch.optim.Adam(param_groups(out), lr=1e-2)
    c1, c2 = torch.randn(4, 6), torch.randn(4, 6)
    out.train()
    for _ in range(5):
        loss = out(X, c1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.eval()
    with torch.no_grad():
        assert rel_error(out(X, c1), model(X)) > 1e-3
        assert rel_error(out(X, c1), out(X, c2)) > 1e-3


@pytest.mark.parametrize("kind", ["traceable", "untraceable"])
def test_bad_conditions_fail_before_any_computation(kind):
    out = ns.convert(models()[kind], "cbn", cond_dim=6)
    calls = []
    first_conv = next(m for m in out.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda *a: calls.append(1))
    for cond, exc, words in [(torch.randn(4, 5), ns.ConditionError, r"\(4, 6\)"),
                             (torch.randn(3, 6), ns.ConditionError, "batch size 3"),
                             (torch.randn(4, 6, 1), ns.ConditionError, r"\(4, 6\)"),
                             (torch.ones(4, 6, dtype=torch.long), ns.ConditionError, "dtype")]:
        with pytest.raises(exc, match=words):
            out(X, cond)
    with pytest.raises(TypeError):
        out(X)
    assert calls == []


def test_class_conditional_label_errors():
    out = ns.convert(models()["traceable"], "cbn", num_classes=3)
    with pytest.raises(ns.ConditionError, match="out of range"):
        out(X, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ns.ConditionError, match="dtype"):
        out(X, torch.zeros(4))


@pytest.mark.parametrize("kind", ["traceable", "untraceable"])
def test_rbn_conversion(kind):
    model = models()[kind]
    out, report = ns.convert_with_report(model, "rbn", example_inputs=X)
    n_bn2d = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, RepresentativeBatchNorm2d) for m in out.modules()) == n_bn2d
    assert report.max_rel_error <= CONVERT_BAR
    assert type(out) is type(model)
    res = out.load_state_dict(model.state_dict(), strict=False)
    assert res.unexpected_keys == []
    assert all(k.rsplit(".", 1)[1] in ("centering_weight", "scaling_weight", "scaling_bias",
                                       "scaling_reference") for k in res.missing_keys)
    with torch.no_grad():  # the original checkpoint leaves the original function
        assert rel_error(out(X), model(X)) <= CONVERT_BAR
    if kind == "traceable":  # BatchNorm1d stays, with the reason
        assert report["5"].action == "skipped" and "BatchNorm2d" in report["5"].reason


def test_rbn_freeze_base_and_include():
    model = models()["traceable"]
    out = ns.convert(model, "rbn", freeze_base=True, include="0.*")
    assert isinstance(out[0][1], RepresentativeBatchNorm2d)
    assert isinstance(out[1][1], nn.BatchNorm2d)
    trainable = {n for n, p in out.named_parameters() if p.requires_grad}
    assert trainable == {"0.1.centering_weight", "0.1.scaling_weight", "0.1.scaling_bias"}


def test_option_errors():
    m = models()["traceable"]
    with pytest.raises(TypeError, match="cond_dim"):
        ns.convert(m, "cbn")
    with pytest.raises(TypeError, match="does not take cond_dim"):
        ns.convert(m, "fold", cond_dim=3)
    with pytest.raises(ValueError, match="positive"):
        ns.convert(m, "cbn", cond_dim=0)
    assert set(ns.available_transforms()) >= {"fold", "cbn", "rbn"}


def test_converted_cbn_model_folds_into_nothing_else():
    """fold after cbn: CBN layers are not BatchNorm, so folding leaves them (and says so)."""
    out = ns.convert(models()["traceable"], "cbn", cond_dim=6)
    assert not any(s.kind == "ConditionalBatchNorm2d" for s in ns.inspect(out).sites)


# --- issue 11 (prepared on the CPU): one label-range check per forward, not one per layer -------
@pytest.mark.parametrize("kind", ["traceable", "untraceable"])
def test_label_values_are_read_once_per_forward(kind, monkeypatch):
    """The label range (min/max: a host sync on a GPU) is checked once at the model's entry;
    each CBN then checks shapes and dtypes only. A layer called on its own still checks
    values, a bad label still fails before any computation, and the caller's tensor is never
    marked."""
    from normsurgeon.layers import cbn as cbn_mod

    out = ns.convert(models()[kind], "cbn", num_classes=3)
    layers = [m for m in out.modules() if isinstance(m, ConditionalBatchNorm2d)]
    assert len(layers) >= 2
    calls = []
    real = cbn_mod._check_label_range
    monkeypatch.setattr(cbn_mod, "_check_label_range",
                        lambda *a: (calls.append(1), real(*a))[1])
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        out(X, labels)
        assert calls == [1]
        out(X, labels)
        assert calls == [1, 1]  # per forward: never cached across forwards
    assert not hasattr(labels, "_ns_validated")
    with pytest.raises(ns.ConditionError, match="out of range"):
        out(X, torch.tensor([0, 1, 2, 3]))
    calls.clear()
    layers[0](torch.randn(4, layers[0].num_features, 5, 5), labels)  # alone: checks values
    assert calls == [1]
    with pytest.raises(ns.ConditionError, match="out of range"):
        layers[0](torch.randn(4, layers[0].num_features, 5, 5), torch.tensor([0, 1, 2, 7]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cbn_forward_has_no_per_layer_host_sync():
    """On the GPU, a label-conditioned CBN ResNet forward synchronises with the host once (the
    entry's range check), never per layer: sync debug mode "error" after that check."""
    from pytorchcv.models.resnet import resnet18

    model = ns.convert(randomize_bn(resnet18()).eval(), "cbn", num_classes=10).cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    labels = torch.tensor([1, 7], device="cuda")
    from normsurgeon.layers import cbn as cbn_mod

    real = cbn_mod._check_label_range

    def entry_only(*a):  # the one allowed sync, outside the debug mode
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real(*a)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    cbn_mod._check_label_range = entry_only
    try:
        torch.cuda.set_sync_debug_mode("error")
        with torch.no_grad():
            model(x, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        cbn_mod._check_label_range = real
