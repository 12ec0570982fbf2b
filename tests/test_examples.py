"""Every example runs, in its reduced mode, and reports what it claims."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fold_example_quick(capsys):
    pytest.importorskip("pytorchcv")
    res = load("fold_pytorchcv").main(["--quick", "--model", "mixnet_s"])
    assert res["folded"] > 0 and res["rel"] <= 1e-5
    assert "latency" in capsys.readouterr().out


def test_cbn_example_quick(capsys):
    pytest.importorskip("sklearn")
    res = load("cbn_digits").main(["--quick"])
    # task 0 survives the conversion and the MLP training; task 1 is learned from ~0
    assert res["acc0"] > 0.8 and res["base1"] < 0.2
    assert res["acc1"] > res["base1"] + 0.2
    assert "with CBN" in capsys.readouterr().out


def test_rbn_example_quick(capsys):
    pytest.importorskip("sklearn")
    res = load("rbn_finetune").main(["--quick"])
    assert res["converted"] == res["shifted"]  # function preserving
    assert res["rbn"] > res["shifted"]
    assert "fine-tuned" in capsys.readouterr().out


def test_deploy_example_quick(capsys):
    pytest.importorskip("pytorchcv")
    pytest.importorskip("onnxruntime")
    res = load("deploy_onnxruntime").main(["--quick"])
    assert res["agree"] == 1.0 and res["rel"] <= 1e-5 and res["bn_nodes"] == 0
    assert "PASS" in capsys.readouterr().out


def test_recalibrate_example_quick(capsys):
    pytest.importorskip("sklearn")
    res = load("recalibrate_pruned").main(["--quick"])
    assert res["trained"] > 0.9 and res["pruned"] < res["trained"] - 0.2
    assert res["recalibrated"] > res["pruned"] + 0.2
    assert "after ns.recalibrate" in capsys.readouterr().out
