"""The normsurgeon command line: subcommands, exit codes, messages without tracebacks."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from normsurgeon import cli
from normsurgeon.rules import available

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for bn in (m[1], m[4]):
                bn.running_mean.uniform_(-1, 1, generator=g)
                bn.running_var.uniform_(0.5, 2, generator=g)
        return m

    def not_a_model():
        return 3
""")


@pytest.fixture
def model_file(tmp_path):
    f = tmp_path / "net.py"
    f.write_text(FACTORY)
    return f"{f}:build"


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_table_and_json(model_file, capsys):
    code, out, _ = run(["inspect", model_file, "--input-shape", "2,3,8,8"], capsys)
    assert code == 0 and "folded" in out and "0" in out and "dry run" in out
    code, out, _ = run(["inspect", model_file, "--to", "rbn", "--json"], capsys)
    assert code == 0 and json.loads(out)["counts"] == {"replaced": 2}
    assert json.loads(out)["sites"][0]["target"] == "RepresentativeBatchNorm2d"
    code, out, _ = run(["inspect", model_file, "--to", "cbn", "--cond-dim", "4"], capsys)
    assert code == 0 and "ConditionalBatchNorm2d" in out


@pytest.mark.parametrize("to, extra", [("fold", []), ("cbn", ["--cond-dim", "5"]),
                                       ("cbn", ["--num-classes", "3"]), ("rbn", []),
                                       ("none", [])])
def test_export_verify_roundtrip(model_file, tmp_path, capsys, to, extra):
    out_file = str(tmp_path / "m.onnx")
    code, out, err = run(["export", model_file, "--to", to, "--input-shape", "2,3,8,8",
                          "-o", out_file, "--verify", "--providers", "cpu", *extra], capsys)
    assert code == 0, err
    assert "PASS" in out and "wrote" in out
    code, out, _ = run(["verify", out_file, "--model", model_file, "--to", to,
                        "--input-shape", "3,3,8,8", *extra], capsys)
    assert code == 0 and "PASS" in out


def test_mismatch_exits_1(model_file, tmp_path, capsys):
    out_file = str(tmp_path / "m.onnx")
    assert run(["export", model_file, "--input-shape", "2,3,8,8", "-o", out_file], capsys)[0] == 0
    code, out, _ = run(["verify", out_file, "--model", model_file, "--input-shape", "2,3,8,8",
                        "--seed", "7", "--to", "none"], capsys)
    assert code == 1 and "FAIL" in out


@pytest.mark.parametrize("argv, words", [
    (["inspect", "no_such_module:build"], "cannot import"),
    (["inspect", "noseparator"], "package.module:callable"),
    (["inspect", "{file}.txt:build"], "does not exist"),
    (["inspect", "{model}", "--input-shape", "1,a"], "malformed --input-shape"),
    (["inspect", "{file}:not_a_model"], "not a torch.nn.Module"),
    (["inspect", "{model}", "--weights", "/nonexistent.pt"], "cannot read weights"),
    (["export", "{model}", "--to", "cbn", "--input-shape", "1,3,8,8", "-o", "x.onnx"],
     "--cond-dim"),
    (["verify", "/nonexistent.onnx", "--model", "{model}", "--input-shape", "1,3,8,8"],
     "does not exist"),
    (["export", "{model}", "--input-shape", "1,3,8,8", "-o", "x.onnx", "--providers", "tpu"],
     "unknown provider"),
])
def test_usage_errors_exit_2_with_one_line(model_file, capsys, argv, words):
    file = model_file.rsplit(":", 1)[0]
    argv = [a.replace("{model}", model_file).replace("{file}", file) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2 and words in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_to_choices_come_from_the_registry(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", "a:b", "--to", "nonsense"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(name in err for name in available())


def test_python_dash_m_and_weights(model_file, tmp_path):
    path, _ = model_file.rsplit(":", 1)
    ns = {}
    exec(FACTORY, ns)
    weights = tmp_path / "w.pt"
    torch.save(ns["build"]().state_dict(), weights)
    res = subprocess.run([sys.executable, "-m", "normsurgeon", "inspect", model_file,
                          "--weights", str(weights)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "2 folded" in res.stdout


def test_progress_spinner_on_a_terminal_only(monkeypatch):
    import io
    import time

    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    with cli.progress("exporting"):
        time.sleep(0.5)
    assert "exporting" in tty.getvalue()
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with cli.progress("exporting"):
        time.sleep(0.3)
    assert pipe.getvalue() == ""  # nothing written into logs and pipes


# --- issue 10: every mistake through the real console script -----------------------------------
MISTAKES = textwrap.dedent("""
    import os, time
    import torch
    from torch import nn

    def build():
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        return m.eval()

    def raises():
        raise RuntimeError("cannot build without the dataset")

    def no_bn():
        return nn.Sequential(nn.Conv2d(3, 4, 1)).eval()

    def pre_act():
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4),
                             nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()

    def slow():
        open(os.environ["NS_MARKER"], "w").close()
        time.sleep(60)
""")


def _script() -> str:
    import os

    exe = os.path.join(os.path.dirname(sys.executable), "normsurgeon")
    return exe if os.path.exists(exe) else sys.executable


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    d = tmp_path_factory.mktemp("mistakes")
    (d / "m.py").write_text(MISTAKES)
    (d / "syntax.py").write_text("def build(:\n    pass\n")
    (d / "name.py").write_text("import torch\nmodel = undefined_name\n")
    torch.save(torch.nn.Conv2d(3, 8, 1), d / "whole.pt")  # a pickled module, not a state_dict
    (d / "text.pt").write_text("hello")
    torch.save({"other.weight": torch.zeros(1)}, d / "other.pt")
    (d / "ro").mkdir()
    return d


@pytest.mark.parametrize("argv, words", [
    (["inspect", "{d}/m.py:build", "--input-shape", "1,4,32,32"], "rejects"),
    (["inspect", "{d}/m.py:build", "--input-shape", "1,3"], "rejects"),
    (["inspect", "{d}/m.py:raises"], "raised RuntimeError: cannot build"),
    (["inspect", "{d}/syntax.py:build"], "syntax error"),
    (["inspect", "{d}/name.py:build"], "NameError"),
    (["inspect", "{d}/m.py:build", "--to", "cbn", "--cond-dim", "-3"], "positive"),
    (["inspect", "{d}/m.py:build", "--to", "cbn", "--num-classes", "-2"], "positive"),
    (["inspect", "{d}/m.py:build", "--to", "cbn", "--cond-dim", "0"], "positive"),
    (["inspect", "{d}/m.py:build", "--to", "cbn", "--cond-dim", "4", "--num-classes", "3"],
     "alternatives"),
    (["export", "{d}/m.py:build", "--input-shape", "1,3,8,8", "-o", "{d}"], "is a directory"),
    (["export", "{d}/m.py:build", "--input-shape", "1,3,8,8", "-o", "{d}/no/x.onnx"],
     "does not exist"),
    (["inspect", "{d}/m.py:build", "--weights", "{d}/whole.pt"], "state_dict()"),
    (["inspect", "{d}/m.py:build", "--weights", "{d}/text.pt"], "not a torch.save file"),
    (["inspect", "{d}/m.py:build", "--weights", "{d}/other.pt"], "'0.weight'"),
    (["inspect", "{d}/m.py:build", "--input-shape", "100000,3,10000,10000"], "too large"),
    (["export", "{d}/m.py:build", "--input-shape", "1,3,8,8", "-o", "{d}/x.onnx", "--verify",
      "--providers", "cuda"], "no requested provider could run"),
    (["export", "{d}/m.py:no_bn", "--to", "cbn", "--cond-dim", "3", "--input-shape",
      "1,3,8,8", "-o", "{d}/x.onnx"], "replaced no BatchNorm"),
    (["inspect", "{d}/m.py:build", "--include", "layer9.*"], "matches no BatchNorm"),
    (["inspect", "{d}/m.py:build", "--exclude", "layer9.*"], "matches no BatchNorm"),
    (["inspect", "{d}/m.py:build", "--cond-dim", "abc"], "invalid int value"),
    (["inspect", "{d}/m.py:pre_act", "--strict"], "--strict: 1 BatchNorm site(s)"),
    (["export", "{d}/m.py:pre_act", "--strict", "--input-shape", "1,3,8,8", "-o",
      "{d}/s.onnx"], "--strict"),
])
def test_console_script_mistakes_exit_2_with_one_line(mistakes, argv, words):
    argv = [a.replace("{d}", str(mistakes)) for a in argv]
    cmd = [_script(), *argv] if _script() != sys.executable else [sys.executable, "-m",
                                                                    "normsurgeon", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert words in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_strict_include_exclude_on_the_command_line(mistakes, capsys):
    model = f"{mistakes}/m.py:pre_act"  # BN 2 is pre-activation (BN → ReLU → Conv)
    code = cli.main(["inspect", model, "--strict"])
    err = capsys.readouterr().err
    assert code == 2 and "--strict: 1 BatchNorm site(s)" in err and "2:" in err
    code = cli.main(["inspect", model, "--strict", "--exclude", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "excluded" in out and "folded" in out
    code = cli.main(["inspect", model, "--include", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "1 folded, 1 excluded" in out


def test_training_mode_factory_is_said_with_verbose_only(model_file, capsys):
    """Every ordinary factory returns a training-mode model: putting it in eval mode is said
    with -v, not on every run."""
    code = cli.main(["inspect", model_file])  # FACTORY's model is in training mode
    err = capsys.readouterr().err
    assert code == 0 and "training mode" not in err
    code = cli.main(["-v", "inspect", model_file])
    err = capsys.readouterr().err
    assert code == 0 and "training mode" in err and "eval mode" in err


def test_every_subcommand_has_a_description_and_an_example():
    """--help suffices alone: a description, an example line that starts with `normsurgeon
    <command>`, help on every option, and required options listed as required."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"inspect", "demo", "export", "verify", "recalibrate", "fold"}
    for name, p in sub.choices.items():
        assert p.description and len(p.description) > 40, name
        assert p.epilog and f"normsurgeon {name} " in p.epilog, name
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.dest)
        required = [a for a in p._actions if a.option_strings and a.required]
        groups = {g.title: g._group_actions for g in p._action_groups}
        assert all(a in groups.get("required arguments", []) for a in required), name
    text = sub.choices["export"].format_help()
    assert "none: no conversion" in text and "required arguments" in text


@pytest.mark.parametrize("argv,hint", [
    (["fodl", "x.onnx"], "did you mean fold?"),
    (["inpsect", "m.py:f"], "did you mean inspect?"),
    (["export", "m.py:f", "--to", "cnb"], "did you mean cbn?"),
    (["inspect", "m.py:f", "--to", "rbm"], "did you mean rbn?"),
    (["verify", "x.onnx", "--model", "m.py:f", "--to", "nnoe"], "did you mean none?"),
])
def test_a_mistyped_choice_suggests_the_nearest_one(argv, hint, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and hint in err and len(err.splitlines()) == 1


def test_ctrl_c_exits_130_without_traceback(mistakes, tmp_path):
    import os
    import signal
    import time

    marker = tmp_path / "started"
    env = dict(os.environ, NS_MARKER=str(marker))
    cmd = [sys.executable, "-m", "normsurgeon", "inspect", f"{mistakes}/m.py:slow"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err


def test_inspect_table_wraps_reasons_instead_of_cutting_them(mistakes, capsys):
    code = cli.main(["inspect", f"{mistakes}/m.py:pre_act"])
    out = capsys.readouterr().out
    assert code == 0 and "…" not in out
    words = " ".join(out.split())  # the reason, joined across its continuation rows
    assert "consumer: consumer is ReLU 3, not a Conv/Linear" in words  # the end is kept


def test_verify_help_explains_its_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["verify", "--help"])
    out = capsys.readouterr().out
    for words in ("the --seed given to export", "families of inputs", "Exit 0",
                  "the --to the file was exported with"):
        assert words in " ".join(out.split()), words
