"""Issue 17: the promise at the edges of the process (threads, inference mode, files, Ctrl-C)
and on models built in other ways (lazy, meta, placeholders, wrappers). Each test fails without
its fix."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.fx._symbolic_trace import _orig_module_call, _orig_module_getattr

import normsurgeon as ns
from normsurgeon.functional import rel_error

from .conftest import FOLD_BAR, count_bn, randomize_bn


def conv_bn(c_in: int = 3, c: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))


class Branchy(nn.Module):
    """Not symbolically traceable (Python reads a value): traced concretely with examples."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert float(x.abs().sum()) >= 0
        return self.body(x)


X = torch.randn(2, 3, 8, 8)


# --- 1. threads ---------------------------------------------------------------------------
@pytest.mark.parametrize("make", [conv_bn, Branchy])
def test_a_conversion_never_affects_a_thread_serving_a_model(make):
    served = randomize_bn(conv_bn(), 1).eval()
    with torch.no_grad():
        expected = served(X)
    stop = threading.Event()
    errors: list[str] = []
    calls = [0]

    def serve() -> None:
        while not stop.is_set():
            try:
                with torch.no_grad():
                    y = served(X)
                # bitwise equality is not promised across thread schedules (a conv's OpenMP
                # team may differ while another thread computes), agreement to fp32 is
                if rel_error(y, expected) > 1e-6:
                    errors.append(f"different output (rel {rel_error(y, expected):.1e})")
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(f"{type(e).__name__}: {e}")
            calls[0] += 1

    t = threading.Thread(target=serve)
    t.start()
    try:
        model = randomize_bn(make(), 2).eval()
        for _ in range(20):
            folded, report = ns.convert_with_report(model, example_inputs=X)
            assert report.counts.get("folded") == 2
    finally:
        stop.set()
        t.join()
    assert calls[0] > 0
    assert errors == []
    assert nn.Module.__call__ is _orig_module_call
    assert nn.Module.__getattr__ is _orig_module_getattr


def test_concurrent_conversions_are_exact():
    models = [randomize_bn(Branchy() if i % 2 else conv_bn(), i).eval() for i in range(4)]
    with torch.no_grad():
        refs = [m(X) for m in models]
    problems: list[str] = []

    def work(i: int) -> None:
        for _ in range(8):
            try:
                out, rep = ns.convert_with_report(models[i], example_inputs=X)
                with torch.no_grad():
                    rel = rel_error(out(X), refs[i])
                if rep.counts.get("folded") != 2 or count_bn(out) != 0 or rel > FOLD_BAR:
                    problems.append(f"model {i}: {rep.counts} rel {rel}")
            except Exception as e:  # noqa: BLE001 - counted
                problems.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    assert nn.Module.__call__ is _orig_module_call


def test_other_threads_pass_the_patched_call_untouched_while_tracing():
    """Inside a trace (the patch is in place), a call from another thread runs the original."""
    seen: list[object] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = conv_bn()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            other = nn.Linear(2, 2)

            def call() -> None:
                try:
                    seen.append(type(other(torch.randn(1, 2))).__name__)
                except Exception as e:  # noqa: BLE001 - recorded
                    seen.append(f"{type(e).__name__}: {e}")

            t = threading.Thread(target=call)
            t.start()
            t.join()
            return self.body(x)

    ns.convert(randomize_bn(Probe(), 0).eval())
    assert seen == ["Tensor"]


# --- 2. inference mode --------------------------------------------------------------------
@pytest.mark.parametrize("to,opts", [("cbn", {"cond_dim": 4}), ("rbn", {}), ("fold", {})])
def test_convert_inside_inference_mode_gives_trainable_parameters(to, opts):
    model = randomize_bn(conv_bn(), 0).eval()
    model[0].weight.requires_grad_(False)
    with torch.inference_mode():
        out = ns.convert(model, to, example_inputs=X, **opts)
    for name, p in out.named_parameters():
        assert not p.is_inference(), name
    for name, b in out.named_buffers():
        assert not b.is_inference(), name
    plain = ns.convert(model, to, example_inputs=X, **opts)
    grads = {k: p.requires_grad for k, p in out.named_parameters()}
    assert grads == {k: p.requires_grad for k, p in plain.named_parameters()}
    assert grads["0.weight"] is False
    if to != "fold":
        out.train()
        args = (X, torch.randn(2, 4)) if to == "cbn" else (X,)
        out(*args).sum().backward()  # raised "Inference tensors cannot be saved for backward"


# --- 3. atomic files, interrupts ------------------------------------------------------------
FACTORY = '''
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
'''


@pytest.fixture
def model_spec(tmp_path):
    f = tmp_path / "net.py"
    f.write_text(FACTORY)
    return f"{f}:build"


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_export_failure_mid_write_keeps_the_previous_file(model_spec, tmp_path, capsys,
                                                          monkeypatch, failure):
    import onnx

    from normsurgeon import cli

    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous good file")
    before = _listing(tmp_path)
    real_save = onnx.save

    def full_disk(proto, path, *a, **k):  # writes half a file, then the disk is full
        real_save(proto, path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(10)
        raise failure

    monkeypatch.setattr(onnx, "save", full_disk)
    code = cli.main(["export", model_spec, "--input-shape", "1,3,8,8", "-o", str(target)])
    err = capsys.readouterr().err
    assert target.read_bytes() == b"previous good file"
    assert _listing(tmp_path) == before  # no temporary file left behind
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    if isinstance(failure, OSError):
        assert code == 2 and "No space left on device" in err
    else:
        assert code == 130 and "interrupted" in err


def test_export_writes_a_complete_file_and_replaces_the_old_one(tmp_path):
    import onnx

    model = randomize_bn(conv_bn(), 0).eval()
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    ns.export_onnx(ns.convert(model), X, target)
    onnx.checker.check_model(onnx.load(str(target)))
    assert _listing(tmp_path) == ["m.onnx"]


@pytest.mark.parametrize("how", ["chained", "signal"])
def test_ctrl_c_during_torch_export_stops_the_work_instead_of_falling_back(
        tmp_path, monkeypatch, how):
    import os
    import signal

    from normsurgeon.onnx import export as ex

    fallbacks: list[int] = []

    def interrupted_export(*a, **k):
        # torch.export catches what it meets and raises its own error: the interrupt must win
        try:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGINT)
            raise KeyboardInterrupt
        except BaseException as e:
            raise RuntimeError("torch.export failed while importing torch._inductor") from (
                e if how == "chained" else None)

    monkeypatch.setattr(ex, "_export_dynamo", interrupted_export)
    monkeypatch.setattr(ex, "_export_torchscript", lambda *a, **k: fallbacks.append(1))
    target = tmp_path / "m.onnx"
    target.write_bytes(b"good")
    with pytest.raises(KeyboardInterrupt):
        ns.export_onnx(randomize_bn(conv_bn(), 0).eval(), X, target)
    assert fallbacks == [] and target.read_bytes() == b"good"


def test_ctrl_c_during_cli_start_up_is_one_line(monkeypatch, capsys):
    from normsurgeon import cli

    def interrupted() -> None:
        raise KeyboardInterrupt  # e.g. while `import torch` runs

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["inspect", "x:y"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "normsurgeon: interrupted"


def test_importing_the_package_and_cli_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, normsurgeon, normsurgeon.cli; "
            "print('torch' in sys.modules, normsurgeon.convert.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "normsurgeon.api"]
