"""Folding BatchNorm in torch.export programs (docs/folding.md, "ExportedProgram"): both IRs,
the module path's families and refusals, the signature kept, the input program untouched."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normsurgeon as ns
from normsurgeon.frontends.exported import is_exported_graph_module
from normsurgeon.functional import rel_error

from .conftest import FOLD_BAR, HALF_BAR, randomize_bn

IRS = ["training", "core"]


def export(model: nn.Module, *args: torch.Tensor, ir: str = "training", dynamic: bool = False
           ) -> torch.export.ExportedProgram:
    shapes = tuple({0: torch.export.Dim("batch", min=1, max=64)} for _ in args) if dynamic \
        else None
    ep = torch.export.export(model, args, dynamic_shapes=shapes)
    return ep.run_decompositions() if ir == "core" else ep


def bn_ops(ep: torch.export.ExportedProgram) -> int:
    return is_exported_graph_module(ep.graph_module)


def outputs(ep: torch.export.ExportedProgram, *args: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = ep.module()(*args)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_same(ep: torch.export.ExportedProgram, new: torch.export.ExportedProgram,
                *args: torch.Tensor, bar: float = FOLD_BAR) -> None:
    for a, b in zip(outputs(new, *args), outputs(ep, *args)):
        assert rel_error(a, b) <= bar


def fingerprint(ep: torch.export.ExportedProgram) -> tuple:
    return (str(ep.graph), str(ep.graph_signature),
            {k: v.detach().clone() for k, v in ep.state_dict.items()})


def same_fingerprint(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[2].keys() == b[2].keys() and all(
        torch.equal(a[2][k], b[2][k]) for k in a[2])


class Families(nn.Module):
    """Every family the module path folds, in one program."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, bias=False)
        self.b1 = nn.BatchNorm1d(6)
        self.c2 = nn.Conv2d(3, 6, 3, padding=2, dilation=2, groups=3)
        self.b2 = nn.BatchNorm2d(6)
        self.t = nn.ConvTranspose2d(6, 4, 3, groups=2, output_padding=1, stride=2)
        self.bt = nn.BatchNorm2d(4)
        self.dw = nn.ConvTranspose2d(4, 8, 2, groups=4, bias=False)  # g = Cin, Cin != Cout
        self.bdw = nn.BatchNorm2d(8)
        self.pre = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 5, 1, groups=1)
        self.v = nn.Conv3d(2, 4, 3, padding=1)
        self.b3 = nn.BatchNorm3d(4)
        self.lin = nn.Linear(5, 7, bias=False)
        self.bl = nn.BatchNorm1d(7)
        self.pre_l = nn.BatchNorm1d(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> tuple:
        a = self.b1(self.c1(s))
        y = self.bdw(self.dw(self.bt(self.t(self.b2(self.c2(x))))))
        y = self.c3(self.pre(y))
        z = self.bl(self.lin(y.mean((2, 3))))
        return self.head(self.pre_l(z)), a, self.b3(self.v(v))


def families_inputs(n: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(n)
    return (torch.randn(n, 3, 9, 9, generator=g), torch.randn(n, 3, 10, generator=g),
            torch.randn(n, 2, 4, 5, 6, generator=g))


@pytest.mark.parametrize("ir", IRS)
def test_every_family_folds_exactly_in_both_irs(ir):
    model = randomize_bn(Families(), 1).eval()
    args = families_inputs()
    ep = export(model, *args, ir=ir, dynamic=True)
    before = fingerprint(ep)
    new, rep = ns.convert_with_report(ep)
    assert rep.counts == {"folded": 8} and bn_ops(ep) == 8 and bn_ops(new) == 0
    assert {r.name: r.target for r in rep} == {
        "b1": "c1", "b2": "c2", "bt": "t", "bdw": "dw", "pre": "c3", "b3": "v", "bl": "lin",
        "pre_l": "head"}
    assert_same(ep, new, *args)
    assert_same(ep, new, *families_inputs(5))  # another batch: the dynamic dim survived
    assert same_fingerprint(before, fingerprint(ep))  # the input program is untouched
    # no memory shared with the input program
    ptrs = {t.untyped_storage().data_ptr() for t in ep.state_dict.values()}
    assert not ptrs & {t.untyped_storage().data_ptr() for t in new.state_dict.values()}


@pytest.mark.parametrize("ir", IRS)
def test_signature_names_state_dict_and_round_trip(ir):
    model = randomize_bn(Families(), 2).eval()
    args = families_inputs()
    ep = export(model, *args, ir=ir, dynamic=True)
    new = ns.convert(ep)
    user_in = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert [s.arg.name for s in new.graph_signature.input_specs
            if s.kind.name == "USER_INPUT"] == user_in
    assert [s.arg.name for s in new.graph_signature.output_specs] == [
        s.arg.name for s in ep.graph_signature.output_specs]
    assert new.range_constraints.keys() == ep.range_constraints.keys()
    # folded BN state left; keys are those of the module path's result
    module_keys = set(ns.convert(model, example_inputs=args).state_dict())
    assert set(new.state_dict) == module_keys
    buf = io.BytesIO()
    torch.export.save(new, buf)
    buf.seek(0)
    back = torch.export.load(buf)
    for a, b in zip(outputs(back, *families_inputs(3)), outputs(ep, *families_inputs(3))):
        assert rel_error(a, b) <= FOLD_BAR
    new.validate()


def test_the_programs_module_compiles_on_first_use_and_only_in_the_converting_thread():
    """The result's GraphModule generates its code lazily: every use still works (its code,
    printing, a direct call of the lifted graph, a deep copy), and torch's own constructor is back
    afterwards and was never swapped for another thread."""
    import copy
    import threading

    import torch.export.exported_program as epm
    from torch.fx._lazy_graph_module import _LazyGraphModule

    orig = epm._create_graph_module_for_export
    model = randomize_bn(Families(), 2).eval()
    args = families_inputs()
    ep = export(model, *args)
    seen: list[type] = []
    gate, done = threading.Event(), threading.Event()

    def other() -> None:  # builds a GraphModule while the conversion runs
        gate.wait(5)
        seen.append(type(epm._create_graph_module_for_export(ep.graph_module, ep.graph)))
        done.set()

    real_validate = torch.export.ExportedProgram.validate

    def validate(self):  # runs inside the constructor, while the patch is installed
        gate.set()
        done.wait(5)
        return real_validate(self)

    t = threading.Thread(target=other)
    t.start()
    try:
        torch.export.ExportedProgram.validate = validate
        new = ns.convert(ep)
    finally:
        torch.export.ExportedProgram.validate = real_validate
        t.join()
    assert epm._create_graph_module_for_export is orig
    assert seen and not issubclass(seen[0], _LazyGraphModule)
    gm = new.graph_module
    assert isinstance(gm, _LazyGraphModule)
    assert "aten.conv2d" in gm.code and "aten.batch_norm" not in gm.code
    assert "conv2d" in str(gm)
    flat = [new.state_dict[s.target] if s.kind.name == "PARAMETER" else
            (new.state_dict.get(s.target, new.constants.get(s.target)) if s.target else None)
            for s in new.graph_signature.input_specs]
    user = iter(args)
    flat = [next(user) if s.kind.name == "USER_INPUT" else v
            for s, v in zip(new.graph_signature.input_specs, flat)]
    with torch.no_grad():
        direct = gm(*flat)
    for a, b in zip(direct, outputs(ep, *args)):
        assert rel_error(a, b) <= FOLD_BAR
    again = copy.deepcopy(gm)  # (pickling fails for torch's own export modules as well)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(again(*flat), direct))


class Shared(nn.Module):
    """torchao's silent failures: a second reader, one conv with two BNs, one BN and a plain use."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.case == "second reader":
            h = self.conv(x)
            return self.bn(h) + h
        if self.case == "two bns":
            return self.bn(self.conv(x)) + self.bn2(self.conv(x * 0.5))
        if self.case == "bn and plain":
            return self.bn(self.conv(x)) + self.conv(x * 2)
        if self.case == "graph output":
            h = self.conv(x)
            return self.bn(h), h
        raise ValueError(self.case)


@pytest.mark.parametrize("ir", IRS)
@pytest.mark.parametrize("case,words", [
    ("second reader", "output has other users"),
    ("two bns", "is also read by"),
    ("bn and plain", "is also read by"),
    ("graph output", "graph output"),
])
def test_unsound_folds_are_refused_where_torchao_is_silently_wrong(ir, case, words):
    model = randomize_bn(Shared(case), 3).eval()
    x = torch.randn(2, 3, 6, 6)
    ep = export(model, x, ir=ir)
    new, rep = ns.convert_with_report(ep)
    assert rep.counts.get("folded", 0) == 0
    assert all(words in r.reason for r in rep), rep.table()
    assert_same(ep, new, x)


class Odd(nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.after = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.case == "user-input weight":  # BN parameters that are program inputs
            return F.batch_norm(self.conv(x), self.bn.running_mean, self.bn.running_var, w,
                                None, False, 0.0, 1e-5)
        if self.case == "zero padding":  # BN → conv with zero padding, no producer
            return self.after(self.bn(x.repeat(1, 2, 1, 1)[:, :4] * w.mean()))
        raise ValueError(self.case)


@pytest.mark.parametrize("ir", IRS)
@pytest.mark.parametrize("case,words", [
    ("user-input weight", "not a constant of the program"),
    ("zero padding", "zero padding"),
])
def test_refusals_with_the_module_paths_reasons(ir, case, words):
    model = randomize_bn(Odd(case), 4).eval()
    args = (torch.randn(2, 3, 6, 6), torch.rand(4) + 0.5)
    ep = export(model, *args, ir=ir)
    new, rep = ns.convert_with_report(ep)
    assert rep.counts == {"skipped": 1} and words in rep.sites[0].reason, rep.table()
    assert_same(ep, new, *args)


def test_training_mode_batchnorm_is_refused():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 0).train()
    ep = torch.export.export(model, (torch.randn(2, 3, 6, 6),))
    rep = ns.inspect(ep)
    assert rep.counts == {"skipped": 1} and "training mode" in rep.sites[0].reason


@pytest.mark.parametrize("bad", ["nan", "overflow"])
def test_non_finite_statistics_and_fp16_overflow_are_refused(bad):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 0).eval()
    x = torch.randn(2, 3, 6, 6)
    if bad == "nan":
        model[1].running_var[1] = float("nan")
    else:
        model = model.half()
        x = x.half()
        with torch.no_grad():
            model[0].weight.fill_(1000.0)
            model[1].running_var.fill_(1e-4)
    ep = torch.export.export(model, (x,))
    new, rep = ns.convert_with_report(ep, check=bad != "nan")
    assert rep.counts == {"skipped": 1}, rep.table()
    assert ("not finite" if bad == "nan" else "overflow torch.float16") in rep.sites[0].reason


def test_fp16_folds_within_the_half_bar():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 0).eval().half()
    x = torch.randn(2, 3, 6, 6).half()
    ep = torch.export.export(model, (x,))
    new, rep = ns.convert_with_report(ep)
    assert rep.counts == {"folded": 1} and rep.bar == HALF_BAR
    assert_same(ep, new, x, bar=HALF_BAR)


@pytest.mark.usefixtures("wrong_fold")
def test_self_check_catches_a_wrong_fold():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 0).eval()
    ep = torch.export.export(model, (torch.randn(2, 3, 6, 6),))
    with pytest.raises(ns.ConversionMismatchError, match="folded program differs"):
        ns.convert(ep)  # the program's own example inputs
    x = torch.randn(2, 3, 6, 6)
    assert ns.convert_with_report(ep, check=False)[1].max_rel_error is None  # nothing run
    assert ns.convert_with_report(ep, example_inputs=x, check=False)[1].max_rel_error > 1e-3


def test_include_exclude_strict_and_misuse():
    model = randomize_bn(Families(), 1).eval()
    ep = export(model, *families_inputs())
    rep = ns.inspect(ep, include="b*")
    assert rep.counts == {"folded": 6, "excluded": 2} and rep.dry_run
    with pytest.raises(ValueError, match="matches no BatchNorm"):
        ns.inspect(ep, exclude="nothing*")
    shared = export(randomize_bn(Shared("two bns"), 0).eval(), torch.randn(1, 3, 4, 4))
    with pytest.raises(ns.StrictModeError):
        ns.convert(shared, strict=True)
    for kwargs, words in (({"to": "cbn", "cond_dim": 3}, "needs an nn.Module"),
                          ({"inplace": True}, "never modified")):
        with pytest.raises(TypeError, match=words):
            ns.convert(ep, **kwargs)


def test_the_unlifted_module_points_to_the_program():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                       nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), 0).eval()
    ep = torch.export.export(model, (torch.randn(2, 3, 6, 6),))
    gm = ep.module()
    for call in (lambda: ns.convert(gm), lambda: ns.inspect(gm),
                 lambda: ns.convert(gm, example_inputs=torch.randn(2, 3, 6, 6))):
        with pytest.raises(TypeError, match=r"holds 2 ATen batch-norm op\(s\).*ns.convert\(ep\)"):
            call()


# --- the command line -------------------------------------------------------------------------
@pytest.fixture
def program_file(tmp_path):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                       nn.ReLU(), nn.BatchNorm2d(8),
                                       nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4)), 0).eval()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), path)
    return path


def test_cli_inspect_fold_export_verify_a_program(program_file, tmp_path, capsys):
    from normsurgeon import cli

    assert cli.main(["inspect", str(program_file)]) == 0
    assert "2 folded, 1 skipped" in capsys.readouterr().out
    out = tmp_path / "f.pt2"
    before = program_file.read_bytes()
    assert cli.main(["fold", str(program_file), "-o", str(out)]) == 0
    text = capsys.readouterr()
    assert "2 folded, 1 skipped" in text.out and "warning: 1 BatchNorm site(s)" in text.err
    assert program_file.read_bytes() == before  # the input file is never modified
    folded = torch.export.load(str(out))
    assert bn_ops(folded) == 1
    onnx_path = tmp_path / "m.onnx"
    assert cli.main(["export", str(program_file), "--to", "fold", "-o", str(onnx_path),
                     "--verify", "--providers", "cpu"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert cli.main(["verify", str(onnx_path), "--model", str(program_file), "--to", "fold",
                     "--providers", "cpu"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pt2", "m.onnx", "m.pt2"]


@pytest.mark.parametrize("argv,words", [
    (["fold", "{p}", "-o", "{p}"], "must differ from the input"),
    (["fold", "{d}/x.txt", "-o", "{d}/y.onnx"], "or an ONNX file (.onnx)"),
    (["fold", "{p}", "-o", "{d}/out.onnx"], "written as a .pt2 file"),
    (["fold", "{d}/missing.pt2", "-o", "{d}/o.pt2"], "does not exist"),
    (["fold", "{d}/bad.pt2", "-o", "{d}/o.pt2"], "cannot load"),
    (["export", "{p}", "--to", "rbn", "-o", "{d}/r.onnx"], "can only be folded"),
    (["inspect", "{p}", "--weights", "{d}/w.pt"], "holds its own weights"),
])
def test_cli_program_mistakes_exit_2_with_one_line(program_file, tmp_path, capsys, argv,
                                                   words):
    from normsurgeon import cli

    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    argv = [a.format(p=program_file, d=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("ir", IRS)
def test_a_bias_free_conv_folded_on_both_sides(ir):
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 5, 1, bias=False),
                                       nn.BatchNorm2d(5)), 0).eval()
    x = torch.randn(2, 3, 6, 6)
    ep = export(model, x, ir=ir)
    new, rep = ns.convert_with_report(ep)
    assert rep.counts == {"folded": 2} and bn_ops(new) == 0
    assert [s.target for s in new.graph_signature.input_specs if s.kind.name == "PARAMETER"] \
        == ["1.weight", "1.bias"]
    assert_same(ep, new, x)
