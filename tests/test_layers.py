"""CBN and RBN layers: docs/cbn-rbn.md math, BN-like behaviour, conditions, optimiser groups."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normsurgeon import ConditionError
from normsurgeon.functional import rel_error
from normsurgeon.layers import (
    ConditionalBatchNorm1d,
    ConditionalBatchNorm2d,
    ConditionalBatchNorm3d,
    RepresentativeBatchNorm2d,
    convert_sync,
    param_groups,
)

from .conftest import CONVERT_BAR, randomize_bn


def trained_bn(c: int = 6, affine: bool = True, momentum: float | None = 0.1) -> nn.BatchNorm2d:
    return randomize_bn(nn.BatchNorm2d(c, affine=affine, momentum=momentum)).eval()


def rbn_reference(layer: RepresentativeBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """docs/cbn-rbn.md written out literally, in float64, eval mode."""
    d = {k: v.detach().double() for k, v in layer.state_dict().items() if v.is_floating_point()}
    c = x.shape[1]
    v = (1, c, 1, 1)
    x = x.double()
    x_c = x + d["centering_weight"].view(v) * x.mean((2, 3), keepdim=True)
    x_n = (x_c - d["running_mean"].view(v)) / torch.sqrt(d["running_var"].view(v) + layer.eps)
    r = torch.sigmoid(d["scaling_weight"].view(v) * x_n.mean((2, 3), keepdim=True)
                      + d["scaling_bias"].view(v))
    return d["weight"].view(v) * (r / d["scaling_reference"].view(v)) * x_n + d["bias"].view(v)


# --- function preservation ------------------------------------------------------------------
@pytest.mark.parametrize("affine", [True, False])
def test_rbn_from_batchnorm_is_exact_and_keeps_names(affine):
    bn = trained_bn(affine=affine)
    rbn = RepresentativeBatchNorm2d.from_batchnorm(bn).eval()
    x = torch.randn(4, 6, 5, 5)
    assert rel_error(rbn(x), bn(x)) <= CONVERT_BAR
    assert rbn.weight.shape == (6,) and rbn.running_mean.shape == (6,)
    if affine:
        missing, unexpected = rbn.load_state_dict(bn.state_dict(), strict=False)
        assert unexpected == [] and sorted(missing) == ["centering_weight", "scaling_bias",
                                                       "scaling_reference", "scaling_weight"]
        assert rel_error(rbn(x), bn(x)) <= CONVERT_BAR  # still the BN after loading its weights


def test_paper_init_is_not_function_preserving():
    """docs/cbn-rbn.md: r = sigmoid(1) ≈ 0.731 scales every output of a paper-initialised RBN."""
    rbn = RepresentativeBatchNorm2d(6).eval()
    x = torch.randn(4, 6, 5, 5)
    ref = F.batch_norm(x, rbn.running_mean, rbn.running_var, None, None, False, 0.0, rbn.eps)
    torch.testing.assert_close(rbn(x), ref * torch.sigmoid(torch.tensor(1.0)))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.booleans())
def test_rbn_matches_spec_formula_with_trained_calibration(seed, train_then_eval):
    torch.manual_seed(seed)
    rbn = RepresentativeBatchNorm2d.from_batchnorm(trained_bn())
    with torch.no_grad():
        for p in (rbn.centering_weight, rbn.scaling_weight, rbn.scaling_bias):
            p.uniform_(-1, 1)
    x = torch.randn(3, 6, 4, 4)
    if train_then_eval:
        rbn.train()(torch.randn(8, 6, 4, 4))  # running stats now track x_c
    rbn.eval()
    assert rel_error(rbn(x), rbn_reference(rbn, x)) < 1e-5


def test_rbn_training_uses_batch_stats_of_centered_input_and_does_not_touch_x():
    rbn = RepresentativeBatchNorm2d(3, momentum=1.0)
    with torch.no_grad():
        rbn.centering_weight.fill_(0.5)
    x = torch.randn(8, 3, 4, 4)
    x0 = x.clone()
    rbn.train()(x)
    assert torch.equal(x, x0)
    x_c = x + 0.5 * x.mean((2, 3), keepdim=True)
    torch.testing.assert_close(rbn.running_mean, x_c.mean((0, 2, 3)))
    torch.testing.assert_close(rbn.running_var, x_c.var((0, 2, 3), unbiased=True))


@pytest.mark.parametrize("cls, shape", [(ConditionalBatchNorm1d, (4, 6)),
                                        (ConditionalBatchNorm1d, (4, 6, 7)),
                                        (ConditionalBatchNorm2d, (4, 6, 5, 5)),
                                        (ConditionalBatchNorm3d, (4, 6, 3, 3, 3))])
def test_cbn_from_batchnorm_equals_bn_for_any_condition(cls, shape):
    bn = randomize_bn({2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d,
                       5: nn.BatchNorm3d}[len(shape)](6)).eval()
    cbn = cls.from_batchnorm(bn, cond_dim=5).eval()
    x = torch.randn(shape)
    for _ in range(3):
        assert rel_error(cbn(x, torch.randn(4, 5) * 10), bn(x)) <= CONVERT_BAR


def test_cbn_matches_spec_formula_after_training_the_mlp():
    bn = trained_bn()
    cbn = ConditionalBatchNorm2d.from_batchnorm(bn, cond_dim=5, hidden_dim=7).eval()
    nn.init.normal_(cbn.cond_mlp[2].weight)
    nn.init.normal_(cbn.cond_mlp[2].bias)
    x, e = torch.randn(4, 6, 5, 5), torch.randn(4, 5)
    delta = cbn.cond_mlp[2](F.relu(cbn.cond_mlp[0](e)))
    g = (bn.weight + delta[:, :6]).view(4, 6, 1, 1)
    b = (bn.bias + delta[:, 6:]).view(4, 6, 1, 1)
    x_hat = F.batch_norm(x, bn.running_mean, bn.running_var, None, None, False, 0.0, bn.eps)
    assert rel_error(cbn(x, e), g * x_hat + b) < 1e-5
    # different conditions now give different outputs
    assert rel_error(cbn(x, torch.randn(4, 5)), cbn(x, e)) > 1e-3


def test_cbn_frozen_by_default_and_state_dict_compatible():
    bn = trained_bn()
    cbn = ConditionalBatchNorm2d.from_batchnorm(bn, cond_dim=4)
    assert not cbn.weight.requires_grad and not cbn.bias.requires_grad
    assert cbn.cond_mlp[0].weight.requires_grad
    missing, unexpected = cbn.load_state_dict(bn.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("cond_mlp") for k in missing)
    # frozen statistics: training mode neither uses batch stats nor updates running ones
    before = cbn.running_mean.clone()
    x = torch.randn(8, 6, 4, 4) * 3 + 2
    y_train = cbn.train()(x, torch.randn(8, 4))
    assert torch.equal(cbn.running_mean, before)
    assert rel_error(y_train, bn(x)) <= CONVERT_BAR


def test_cbn_unfrozen_stats_behave_like_bn_in_training():
    bn = trained_bn(momentum=None)
    cbn = ConditionalBatchNorm2d.from_batchnorm(bn, cond_dim=4, freeze_stats=False)
    ref = copy.deepcopy(bn).train()
    x = torch.randn(8, 6, 4, 4) * 3 + 2
    for _ in range(3):
        y, y_ref = cbn.train()(x, torch.randn(8, 4)), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cbn.running_var, ref.running_var)
    assert int(cbn.num_batches_tracked) == int(ref.num_batches_tracked)


# --- conditions --------------------------------------------------------------------------------
@pytest.mark.parametrize("cond, exc, words", [
    (torch.randn(4, 3), ConditionError, "(4, 5)"),           # wrong width
    (torch.randn(3, 5), ConditionError, "batch size 3"),     # wrong batch
    (torch.randn(4, 5, 1), ConditionError, "(4, 5)"),        # wrong rank
    (torch.ones(4, 5, dtype=torch.long), ConditionError, "dtype"),
    (None, TypeError, "missing condition"),
    ([1, 2], TypeError, "tensor"),
])
def test_cbn_bad_conditions(cond, exc, words):
    cbn = ConditionalBatchNorm2d(6, cond_dim=5).eval()
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        cbn(torch.randn(4, 6, 3, 3), cond)


@pytest.mark.parametrize("labels, words", [
    (torch.tensor([0.0, 1.0]), "dtype"),
    (torch.tensor([0, 3]), "out of range"),
    (torch.tensor([[0], [1]]), r"shape \(2, 1\)"),
])
def test_class_conditional_bad_labels(labels, words):
    cbn = ConditionalBatchNorm2d(6, cond_dim=5, num_classes=3).eval()
    with pytest.raises(ConditionError, match=words):
        cbn(torch.randn(2, 6, 3, 3), labels)
    assert cbn(torch.randn(2, 6, 3, 3), torch.tensor([0, 2])).shape == (2, 6, 3, 3)


# --- BatchNorm-like behaviour --------------------------------------------------------------------
def test_not_batchnorm_subclasses_and_sync_conversion_leaves_them():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), RepresentativeBatchNorm2d(6), nn.BatchNorm2d(6))
    assert not isinstance(model[1], _BatchNorm)
    synced = convert_sync(model)
    assert isinstance(synced[1], RepresentativeBatchNorm2d) and synced[1].sync
    assert isinstance(synced[2], nn.SyncBatchNorm)


def test_repr_and_momentum_none_and_affine_false():
    cbn = ConditionalBatchNorm2d(6, cond_dim=4, momentum=None, affine=False)
    text = repr(cbn)
    assert "cond_dim=4" in text and "momentum=None" in text and "affine=False" in text
    rbn = RepresentativeBatchNorm2d(6, momentum=None)
    x = torch.randn(4, 6, 3, 3)
    rbn.train()(x)
    rbn(x + 1)
    assert int(rbn.num_batches_tracked) == 2
    assert "RepresentativeBatchNorm2d(6" in repr(rbn)
    assert cbn.train()(x, torch.randn(4, 4)).shape == x.shape


def test_layers_work_under_torch_compile():
    rbn = RepresentativeBatchNorm2d.from_batchnorm(trained_bn()).eval()
    cbn = ConditionalBatchNorm2d.from_batchnorm(trained_bn(), cond_dim=4).eval()
    x, e = torch.randn(2, 6, 5, 5), torch.randn(2, 4)
    torch.testing.assert_close(torch.compile(rbn, backend="aot_eager")(x), rbn(x))
    torch.testing.assert_close(torch.compile(cbn, backend="aot_eager")(x, e), cbn(x, e))


def test_param_groups_only_new_parameters_without_decay_on_deltas():
    model = nn.Sequential(ConditionalBatchNorm2d.from_batchnorm(trained_bn(), cond_dim=4),
                          RepresentativeBatchNorm2d.from_batchnorm(trained_bn()))
    groups = param_groups(model, weight_decay=0.1, lr=1e-3)
    ids = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    cbn, rbn = model
    assert ids[id(cbn.cond_mlp[0].weight)] == 0.1
    assert ids[id(cbn.cond_mlp[2].weight)] == 0.0 and ids[id(rbn.centering_weight)] == 0.0
    assert id(cbn.weight) not in ids and id(rbn.weight) not in ids
    assert all(g["lr"] == 1e-3 for g in groups)
    torch.optim.AdamW(groups)
    with pytest.raises(ValueError, match="cbn"):
        param_groups(nn.Linear(2, 2))


def _rbn_train_reference(layer, x):
    """docs/cbn-rbn.md in training mode, literally, with F.batch_norm's batch statistics."""
    c = x.shape[1]
    v = (1, c, 1, 1)
    x_c = x + layer.centering_weight.view(v) * x.mean((2, 3), keepdim=True)
    x_n = F.batch_norm(x_c, None, None, None, None, True, 0.0, layer.eps)
    r = torch.sigmoid(layer.scaling_weight.view(v) * x_n.mean((2, 3), keepdim=True)
                      + layer.scaling_bias.view(v))
    return layer.weight.view(v) * r * x_n + layer.bias.view(v)


def test_training_gradients_match_literal_formulas():
    """The one-pass algebra (batch moments from per-instance moments) has BN's gradients."""
    torch.manual_seed(0)
    x = (torch.randn(6, 5, 4, 4, dtype=torch.float64) * 2 + 1).requires_grad_()
    rbn = RepresentativeBatchNorm2d(5).double().train()
    with torch.no_grad():
        for p in (rbn.centering_weight, rbn.scaling_weight, rbn.scaling_bias, rbn.weight,
                  rbn.bias):
            p.uniform_(-1, 1)
    params = [x, rbn.centering_weight, rbn.scaling_weight, rbn.weight]
    g1 = torch.autograd.grad(rbn(x).sin().sum(), params)
    g2 = torch.autograd.grad(_rbn_train_reference(rbn, x).sin().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

    cbn = ConditionalBatchNorm2d(5, cond_dim=3, freeze_stats=False, freeze_base=False)
    cbn = cbn.double().train()
    nn.init.normal_(cbn.cond_mlp[2].weight)
    e = torch.randn(6, 3, dtype=torch.float64)
    delta = cbn.cond_mlp(e)
    ref = F.batch_norm(x, None, None, None, None, True, 0.0, cbn.eps) * (
        cbn.weight + delta[:, :5]).view(6, 5, 1, 1) + (cbn.bias + delta[:, 5:]).view(6, 5, 1, 1)
    params = [x, cbn.weight, cbn.cond_mlp[2].weight]
    g1 = torch.autograd.grad(cbn(x, e).sin().sum(), params)
    g2 = torch.autograd.grad(ref.sin().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_public_api_surface():
    import normsurgeon as ns

    for name in ns.__all__:
        assert hasattr(ns, name), name
    assert ns.ConditionalBatchNorm2d is ConditionalBatchNorm2d
    assert ns.RepresentativeBatchNorm2d is RepresentativeBatchNorm2d


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 2, 3, 5]), st.sampled_from([4, 8]),
                          st.sampled_from([3, 5])), min_size=1, max_size=7),
       st.booleans(), st.integers(0, 99))
def test_condition_bank_equals_each_layers_own_affine(specs, labels, seed):
    """For any mix of CBN layers (channels, hidden widths, condition widths), the bank's
    ``table[row]`` is the layer's own export affine; layers alone in their family are left
    to their own path."""
    from normsurgeon.layers.cbn import ConditionalBatchNorm2d, ConditionBank

    g = torch.Generator().manual_seed(seed)
    layers = []
    for c, hidden, width in specs:
        layer = ConditionalBatchNorm2d(c, width, hidden_dim=hidden,
                                       num_classes=4 if labels else None).eval()
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        layers.append(layer)
    bank = ConditionBank(layers)
    family = {}
    for layer, (_, hidden, width) in zip(layers, specs):
        family.setdefault((hidden, width), []).append(layer)
    conds = {w: (torch.randint(0, 4, (3,), generator=g) if labels
                 else torch.randn(3, w, generator=g)) for w in {w for _, _, w in specs}}
    for layer, (_, hidden, width) in zip(layers, specs):
        cond = conds[width]
        got = bank.affine(layer, cond, torch.float32)
        if len(family[(hidden, width)]) < 2:
            assert got is None
            continue
        table, row = got
        e = layer.embedding(cond) if labels else cond
        ref = layer._export_affine(e)
        assert table[row].shape == ref.shape
        assert torch.allclose(table[row], ref, rtol=1e-5, atol=1e-5)
