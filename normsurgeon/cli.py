"""The ``normsurgeon`` command line. It only calls the public API.

Exit codes: 0 success, 1 verification mismatch, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .errors import one_line as _one_line

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


NOTES: list[str] = []  # said on stderr with -v after a command succeeds


class UsageError(Exception):
    """Bad usage or input: printed as one line, exit code 2."""


# -- helpers ---------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"malformed --input-shape {text!r}: use comma-separated integers, "
                         "e.g. 1,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"malformed --input-shape {text!r}: every size must be positive")
    return shape


def load_program(path: str) -> Any:
    """A ``torch.export.save`` file (``.pt2``), or a UsageError saying what is wrong."""
    import torch

    if not os.path.isfile(path):
        raise UsageError(f"program file {path!r} does not exist")
    try:
        return torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - torch's loader fails in many ways
        raise UsageError(f"cannot load {path!r} as a torch.export program "
                         f"({_one_line(e, 120)}): write it with torch.export.save") from None


def is_program(spec: str) -> bool:
    return spec.endswith(".pt2")


def load_model(spec: str, weights: str | None = None, seed: int = 0) -> Any:
    """Build ``package.module:callable`` or ``path/to/file.py:callable`` with a fixed seed,
    or load a ``.pt2`` program (``torch.export.save``)."""
    import torch

    if is_program(spec):
        if weights:
            raise UsageError("--weights applies to a Python model; a .pt2 program holds its "
                             "own weights")
        return load_program(spec)
    if ":" not in spec:
        raise UsageError(f"MODEL {spec!r} must look like package.module:callable, "
                         "path/to/file.py:callable or a torch.export file model.pt2")
    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py") or os.sep in where:
            if not os.path.isfile(where):
                raise UsageError(f"model file {where!r} does not exist")
            spec_ = importlib.util.spec_from_file_location("_normsurgeon_user_model", where)
            if spec_ is None or spec_.loader is None:
                raise UsageError(f"{where!r} is not a Python file that can be imported")
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UsageError:
        raise
    except ImportError as e:
        raise UsageError(f"cannot import {where!r}: {e}") from None
    except SyntaxError as e:
        raise UsageError(f"{where!r} has a syntax error at line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise UsageError(f"importing {where!r} raised {_one_line(e)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{where!r} has no callable named {attr!r}")
    torch.manual_seed(seed)
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory raised
        raise UsageError(f"{spec}() raised {_one_line(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        model.load_state_dict(_read_state_dict(weights, model, spec))
    if model.training:  # every ordinary factory does this: said with -v, never silent
        NOTES.append(f"{spec} returned a model in training mode; it was put in eval mode "
                     "(inference semantics) for conversion and export")
    return model.eval()


def _read_state_dict(path: str, model: Any, spec: str) -> dict[str, Any]:
    """A state_dict from ``path`` that fits ``model``, or a UsageError naming what is wrong."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"cannot read weights {path!r}: no such file") from None
    except Exception as e:  # noqa: BLE001 - the safe unpickler fails in many ways
        import zipfile

        with open(path, "rb") as f:
            head = f.read(2)
        if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):  # zip or legacy pickle
            raise UsageError(f"cannot read weights {path!r}: it is not a torch.save file "
                             f"({_one_line(e, 100)})") from None
        raise UsageError(f"weights {path!r} hold pickled Python objects (a whole model?), "
                         "not a state_dict of tensors; save model.state_dict() instead") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"],
                                                                        dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise UsageError(f"weights {path!r} hold a {type(state).__name__}, not a state_dict "
                         "(a dict of tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]!r}")
        if shapes:
            k = shapes[0]
            parts.append(f"{k!r} has shape {tuple(state[k].shape)}, the model's is "
                         f"{tuple(own[k].shape)}")
        raise UsageError(f"weights {path!r} do not fit {spec}: {'; '.join(parts)}")
    return state


@contextmanager
def progress(label: str, enabled: bool = True) -> Iterator[None]:
    """A spinner on stderr for work that may take more than a few seconds (TTY only)."""
    if not enabled or not sys.stderr.isatty():
        yield
        return
    stop = threading.Event()
    t0 = time.perf_counter()

    def spin() -> None:
        frames = "|/-\\"
        i = 0
        while not stop.wait(0.2):
            sys.stderr.write(f"\r{frames[i % 4]} {label} {time.perf_counter() - t0:5.1f}s")
            sys.stderr.flush()
            i += 1

    th = threading.Thread(target=spin, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
        sys.stderr.write(f"\r{' ' * (len(label) + 12)}\r")


def _transform_choices() -> list[str]:
    from .rules import available

    return available()


def _convert_options(args: argparse.Namespace) -> dict[str, Any]:
    """CBN options, validated: positive ints, and ``--cond-dim`` / ``--num-classes`` are
    alternatives."""
    cond_dim, classes = getattr(args, "cond_dim", None), getattr(args, "num_classes", None)
    for flag, v in (("--cond-dim", cond_dim), ("--num-classes", classes)):
        if v is not None and v <= 0:
            raise UsageError(f"{flag} must be a positive integer, got {v}")
    if cond_dim is not None and classes is not None:
        raise UsageError("--cond-dim and --num-classes are alternatives: the condition is a "
                         "float vector (--cond-dim E) or an integer label (--num-classes K)")
    if getattr(args, "to", None) != "cbn":
        if cond_dim is not None or classes is not None:
            raise UsageError("--cond-dim / --num-classes apply to --to cbn only")
        return {}
    if cond_dim is None and classes is None:
        raise UsageError("--to cbn needs --cond-dim E (a float condition of width E) or "
                         "--num-classes K (integer labels)")
    return {"cond_dim": cond_dim} if cond_dim is not None else {"num_classes": classes}


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    """``--include`` / ``--exclude`` / ``--strict`` as convert() arguments."""
    return {"include": args.include or None, "exclude": args.exclude or None,
            "strict": bool(getattr(args, "strict", False))}


def _example(model: Any, args: tuple[Any, ...]) -> None:
    """The model must accept the example inputs: a UsageError with its complaint otherwise."""
    import torch

    from .errors import ConditionError
    from .onnx.export import check_example_inputs

    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    try:
        check_example_inputs(model, args, "--input-shape input")
    except (ConditionError, ValueError, TypeError) as e:
        raise UsageError(str(e).splitlines()[0]) from None


def _writable(path: str) -> None:
    """``-o PATH`` must be writable: a UsageError saying why not, before any work."""
    from ._io import check_writable

    try:
        check_writable(path)
    except ValueError as e:
        raise UsageError(f"-o {path}: {e}") from None


def _random_input(shape: tuple[int, ...], g: Any = None) -> Any:
    import torch

    try:
        return torch.randn(shape, generator=g)
    except RuntimeError as e:  # too large to allocate
        raise UsageError(f"--input-shape {','.join(map(str, shape))} is too large to allocate "
                         f"({_one_line(e, 100)})") from None


# -- commands ---------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    import normsurgeon as ns

    opts = _convert_options(args)
    shape = parse_shape(args.input_shape) if args.input_shape else None
    model = load_model(args.model, args.weights, args.seed)
    x = _random_input(shape) if shape else None
    if x is not None:
        _example(model, (x,))
    sel = _selection(args)
    strict = sel.pop("strict")
    with progress("analysing"):
        report = ns.inspect(model, args.to, example_inputs=x, **sel, **opts)
    print(report.to_json(indent=2) if args.json else report.table())
    skipped = {r.name: r.reason for r in report.sites if r.action == "skipped"}
    if strict and skipped:
        raise UsageError(f"--strict: {len(skipped)} BatchNorm site(s) would be left alone, "
                         f"e.g. {next(iter(skipped))}: {next(iter(skipped.values()))}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import normsurgeon as ns

    try:
        from pytorchcv.models.resnet import resnet18
    except ImportError:
        raise UsageError("the demo folds pytorchcv's ResNet-18: pip install --no-deps "
                         "pytorchcv") from None
    torch.manual_seed(args.seed)
    model = resnet18().eval()
    from .testing import randomize_bn_stats

    randomize_bn_stats(model, args.seed)  # trained-looking BN statistics: folds really work
    x = torch.randn(2, 3, 224, 224)
    print("normsurgeon demo: folding BatchNorm in pytorchcv resnet18 (random weights, "
          "randomized BN statistics)\n")
    with progress("folding"):
        folded, report = ns.convert_with_report(model, "fold", example_inputs=x)
    print(report.table())
    left = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    print(f"\nBatchNorm modules left: {left}; output max relative difference: "
          f"{report.max_rel_error:.2e} (bar {report.bar:.0e}: README, 'Exactness'); "
          f"took {report.seconds:.2f}s")
    return EXIT_OK


def _example_args(args: argparse.Namespace) -> tuple[Any, ...]:
    import torch

    if not args.input_shape and is_program(args.model):
        ep = load_program(args.model)
        if ep.example_inputs is not None and not ep.example_inputs[1]:
            return tuple(ep.example_inputs[0])
        raise UsageError(f"{args.model} holds no example inputs: pass --input-shape")
    if not args.input_shape:
        raise UsageError("--input-shape is required, e.g. --input-shape 1,3,224,224")
    shape = parse_shape(args.input_shape)
    opts = _convert_options(args)
    g = torch.Generator().manual_seed(args.seed)
    x = _random_input(shape, g)
    if args.to != "cbn":
        return (x,)
    if "num_classes" in opts:
        return (x, torch.randint(0, opts["num_classes"], (shape[0],), generator=g))
    return (x, torch.randn(shape[0], opts["cond_dim"], generator=g))


def _build_converted(args: argparse.Namespace) -> tuple[Any, tuple[Any, ...], Any]:
    """The model as ``export`` and ``verify`` both rebuild it: seeded, then converted. Returns
    the model, the example inputs and the conversion report (``None`` for ``--to none``)."""
    import torch

    import normsurgeon as ns

    example = _example_args(args)  # validates the options before the model is built
    model = load_model(args.model, args.weights, args.seed)
    _example(model, example[:1])
    if is_program(args.model):
        if args.to not in ("fold", "none"):
            raise UsageError(f"--to {args.to}: a .pt2 program can only be folded (--to fold) or "
                             "exported as it is (--to none); convert the Python model instead")
        args.static_batch = _static_batch(model)
        if args.to == "none":
            return model.module(), example, None
        folded, report = ns.convert_with_report(model, "fold", example_inputs=example,
                                                **_selection(args))
        return folded.module(), example, report
    if args.to == "none":
        return model, example, None
    torch.manual_seed(args.seed)
    converted, report = ns.convert_with_report(model, args.to, example_inputs=example[:1],
                                               **_selection(args), **_convert_options(args))
    if args.to == "cbn" and not report.counts.get("replaced"):
        raise UsageError("--to cbn replaced no BatchNorm (see `normsurgeon inspect --to cbn`): "
                         "the exported model would take a condition it never uses")
    return converted, example, report


def _static_batch(ep: Any) -> bool:
    """Whether a program fixes the batch size of its inputs (exported without a dynamic
    batch dimension): then its ONNX file does too, and verification uses that batch only."""
    import torch

    for spec in ep.graph_signature.input_specs:
        if spec.kind.name != "USER_INPUT":
            continue
        node = next((n for n in ep.graph.nodes if n.name == spec.arg.name), None)
        val = node.meta.get("val") if node is not None else None
        if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], int):
            return True
    return False


def _providers(text: str | None) -> list[str] | None:
    if not text:
        return None
    out = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in ("cpu", "cuda")]
    if bad:
        raise UsageError(f"unknown provider(s) {', '.join(bad)}: use cpu and/or cuda")
    return out


def _print_verification(res: Any, requested: list[str] | None) -> int:
    print(res.table())
    if not res.providers_run:
        why = "; ".join(f"{p}: {w}" for p, w in res.not_run.items()) or "no provider ran"
        raise UsageError(f"no requested provider could run ({why})")
    return EXIT_OK if res else EXIT_MISMATCH


def cmd_export(args: argparse.Namespace) -> int:
    import normsurgeon as ns


    providers = _providers(args.providers)
    _writable(args.output)  # before any work: a bad -o is found in a second, not after
    with progress("converting"):
        model, example, report = _build_converted(args)
    static = getattr(args, "static_batch", False)
    with progress("exporting"):
        res = ns.export_onnx(model, example, args.output, custom_ops=not args.no_custom_ops,
                             allow_specialized=args.allow_specialized, dynamic_batch=not static)
    ops_text = ", ".join(res.custom_ops) or "standard ops only"
    if report is not None:
        print(report.summary())
    print(f"wrote {res.path} ({ops_text}; opset {res.opset}; exporter {res.exporter}; "
          f"{res.seconds:.1f}s)")
    if report is not None:
        _warn_left(report, "folded" if args.to == "fold" else "converted")
    if res.fallback_reason:
        print(f"note: torch.export could not capture the model ({res.fallback_reason})",
              file=sys.stderr)
    if res.specialized:
        print(f"warning: the file holds only the example's branch of {len(res.specialized)} "
              f"value-dependent decision(s), e.g. {res.specialized[0]}", file=sys.stderr)
    if args.verify:
        batches = [int(example[0].shape[0])] if static else None
        with progress("verifying on onnxruntime"):
            v = ns.verify_onnx(res.path, model, example, providers=providers,
                               output_names=res.output_names, batch_sizes=batches)
        return _print_verification(v, providers)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    import normsurgeon as ns

    if not os.path.isfile(args.onnx_file):
        raise UsageError(f"ONNX file {args.onnx_file!r} does not exist")
    providers = _providers(args.providers)
    with progress("rebuilding the reference"):
        model, example, _ = _build_converted(args)
    with progress("verifying on onnxruntime"):
        try:
            v = ns.verify_onnx(args.onnx_file, model, example, providers=providers,
                               batch_sizes=[int(example[0].shape[0])]
                               if getattr(args, "static_batch", False) else None)
        except Exception as e:  # an unreadable or mismatched file is bad input
            if type(e).__name__ in ("InvalidGraph", "InvalidArgument", "Fail", "DecodeError",
                                    "NoSuchFile", "InvalidProtobuf"):
                raise UsageError(f"cannot run {args.onnx_file!r} ({_one_line(e, 160)}): export "
                                 "it again with the same --model, --to and options") from None
            raise
    return _print_verification(v, providers)


def cmd_fold(args: argparse.Namespace) -> int:
    """Fold the BatchNorms of a file (a ``.pt2`` program or an ``.onnx`` file) into a new file
    (an ONNX file without importing torch)."""
    src, out = args.input, args.output
    onnx_file = src.endswith(".onnx")
    if not is_program(src) and not onnx_file:
        raise UsageError(f"fold takes a torch.export program (.pt2) or an ONNX file (.onnx), "
                         f"not {src!r}. For a Python model use `normsurgeon export MODEL --to "
                         "fold`")
    ext = ".onnx" if onnx_file else ".pt2"
    if not out.endswith(ext):
        raise UsageError(f"-o {out}: the folded {'model' if onnx_file else 'program'} is "
                         f"written as a {ext} file")
    if os.path.abspath(src) == os.path.abspath(out):
        raise UsageError("-o must differ from the input: the input file is never modified")
    _writable(out)
    if onnx_file:
        return _fold_onnx(args, src, out)
    import torch

    import normsurgeon as ns

    from ._io import atomic_path

    ep = load_program(src)
    example = None
    if args.input_shape:
        named, ordered = _named_shapes(args.input_shape)
        if named:
            raise UsageError("--input-shape NAME=...: name the inputs of an ONNX file only; "
                             "give a program's shapes in input order")
        example = tuple(_random_input(t) for t in ordered)
        _example(ep, example)
    sel = _selection(args)
    with progress("folding"):
        folded, report = ns.convert_with_report(ep, "fold", example_inputs=example,
                                                check=not args.no_check, **sel)
    with atomic_path(out) as tmp:
        torch.export.save(folded, tmp)
    print(report.to_json(indent=2) if args.json else report.table())
    print(f"wrote {out}")
    _warn_left(report, "folded")
    return EXIT_OK


def _named_shapes(texts: list[str] | None) -> tuple[dict[str, tuple[int, ...]], list[Any]]:
    """``--input-shape NAME=1,3,224,224`` (by name) or ``1,3,224,224`` (in input order)."""
    named: dict[str, tuple[int, ...]] = {}
    ordered: list[tuple[int, ...]] = []
    for text in texts or []:
        name, eq, shape = text.rpartition("=")
        if eq and not name:
            raise UsageError(f"malformed --input-shape {text!r}: use NAME=1,3,224,224")
        if eq:
            named[name] = parse_shape(shape)
        else:
            ordered.append(parse_shape(shape))
    return named, ordered


def _fold_onnx(args: argparse.Namespace, src: str, out: str) -> int:
    from .frontends.onnx_file import (
        _uses_external_data,
        convert_onnx_model,
        load_onnx,
        save_onnx,
    )

    try:
        model = load_onnx(src)
    except FileNotFoundError:
        raise UsageError(f"ONNX file {src!r} does not exist") from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    named, ordered = _named_shapes(args.input_shape)
    if ordered:
        inits = {t.name for t in model.graph.initializer}
        real = [i.name for i in model.graph.input if i.name not in inits]
        if len(ordered) > len(real):
            raise UsageError(f"{len(ordered)} --input-shape values for {len(real)} graph "
                             f"input(s) ({', '.join(real)})")
        named = {**dict(zip(real, ordered)), **named}
    unknown = sorted(set(named) - {i.name for i in model.graph.input})
    if unknown:
        raise UsageError(f"--input-shape names {', '.join(unknown)}, which the model does not "
                         f"take (inputs: {', '.join(i.name for i in model.graph.input)})")
    sel = _selection(args)
    with progress("folding"):
        folded, report = convert_onnx_model(  # what ns.convert_with_report calls
            model, "fold", check=not args.no_check, options={
                "input_shapes": named or None,
                "allow_overridable_initializers": args.allow_overridable_initializers}, **sel)
    save_onnx(folded, out, external=True if _uses_external_data(model) else None)
    print(report.to_json(indent=2) if args.json else report.table())
    print(f"wrote {out}")
    _warn_left(report, "folded")
    return EXIT_OK


def _warn_left(report: Any, verb: str) -> None:
    """A partially converted file must not ship unnoticed: name what was left and why."""
    left = [r for r in report.sites if r.action == "skipped"]
    if left:
        print(f"warning: {len(left)} BatchNorm site(s) were not {verb} and remain in the file: "
              + "; ".join(f"{r.name}: {r.reason}" for r in left[:3])
              + (f"; and {len(left) - 3} more (see `normsurgeon inspect`)" if len(left) > 3
                 else ""), file=sys.stderr)


def _add_fold_command(sub: Any, choices: list[str]) -> None:
    p = sub.add_parser(
        "fold", help="fold the BatchNorms of a .pt2 program or an .onnx file into a new file",
        description="Fold every foldable BatchNorm of a torch.export program (.pt2, written by "
                    "torch.export.save) or of an ONNX file, and write a new file of the same "
                    "kind. Prints the report: what folded into what, and why anything was "
                    "left. The result is checked against the input (the program on its example "
                    "inputs; the ONNX file on onnxruntime CPU with graph optimisations off, "
                    "random inputs, symbolic dimensions 1 unless --input-shape) unless "
                    "--no-check. The input file is never modified; the output is written "
                    "atomically (an ONNX model with external data keeps it, next to OUT).",
        epilog="examples:\n  normsurgeon fold resnet50.pt2 -o resnet50_folded.pt2\n"
               "  normsurgeon fold model.onnx -o folded.onnx --input-shape input=8,3,224,224",
        formatter_class=_Formatter)
    p.add_argument("input", help="the .pt2 file (torch.export.save) or .onnx file")
    p.add_argument_group("required arguments").add_argument(
        "-o", "--output", required=True, help="the file to write (same kind)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-check", action="store_true",
                   help="skip running both models on the check inputs")
    p.add_argument("--input-shape", action="append", metavar="[NAME=]SHAPE",
                   help="input shape for the check, e.g. input=1,3,224,224 or 1,3,224,224 "
                        "(repeatable, one per input; default: a program's own example "
                        "inputs, an ONNX file's declared sizes with symbolic dims 1)")
    p.add_argument("--allow-overridable-initializers", action="store_true",
                   help="ONNX: also fold initializers that are listed as graph inputs (a "
                        "runtime may feed other values for them; refused by default)")
    _add_selection_args(p)
    p.set_defaults(func=cmd_fold)


def _read_calibration(path: str) -> Any:
    """The calibration inputs: a tensor from ``.pt`` (read with ``weights_only=True``; a
    tuple/list ``(x, y)`` gives ``x``), ``.npy``, or ``.npz`` (the array ``x``, else the first)."""
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise UsageError(f"--data {path!r} does not exist")
    try:
        if path.endswith(".npy"):
            data = np.load(path, allow_pickle=False)
        elif path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                if not z.files:
                    raise UsageError(f"--data {path!r} holds no array")
                data = z["x"] if "x" in z.files else z[z.files[0]]
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy and torch fail in many ways
        raise UsageError(f"cannot read --data {path!r} ({_one_line(e, 120)}): give a tensor "
                         "saved with torch.save, a .npy or a .npz file") from None
    if isinstance(data, (tuple, list)) and data:
        data = data[0]
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if not isinstance(data, torch.Tensor) or data.dim() == 0 or not len(data):
        raise UsageError(f"--data {path!r} must hold a non-empty tensor of inputs (N, ...), "
                         f"got {type(data).__name__}")
    if not data.is_floating_point():
        data = data.float()
    return data


def cmd_recalibrate(args: argparse.Namespace) -> int:
    import torch

    import normsurgeon as ns

    from ._io import atomic_path

    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.num_batches is not None and args.num_batches <= 0:
        raise UsageError(f"--num-batches must be a positive integer, got {args.num_batches}")
    _writable(args.output)
    if is_program(args.model):
        raise UsageError("recalibrate needs a Python model (package.module:callable); a .pt2 "
                         "program's statistics are constants of its graph")
    data = _read_calibration(args.data)
    model = load_model(args.model, args.weights, args.seed)
    batches = list(data.split(args.batch_size))
    _example(model, (batches[0],))
    out, report = ns.recalibrate_with_report(model, batches, num_batches=args.num_batches,
                                             exact=args.exact)
    with atomic_path(args.output) as tmp:
        torch.save(out.state_dict(), tmp)
    print(report.to_json(indent=2) if args.json else report.table())
    done = [r for r in report.sites if r.action == "recalibrated"]
    if done:
        top = max(done, key=lambda r: r.moved or 0.0)
        print(f"{len(done)} layer(s) recalibrated on {min(r.samples or 0 for r in done)}+ "
              f"values per channel; the running mean moved up to {top.moved:.3g} standard "
              f"deviations ({top.name}); wrote {args.output}")
    else:
        print(f"no layer recalibrated; wrote {args.output}")
    return EXIT_OK


def _add_recalibrate_command(sub: Any, choices: list[str]) -> None:
    p = sub.add_parser(
        "recalibrate", help="re-estimate BatchNorm statistics on data, write the state_dict",
        description="Re-estimate the running statistics of every normalization layer "
                    "(BatchNorm, SyncBatchNorm, normsurgeon's CBN and RBN) on calibration "
                    "inputs, and write the recalibrated state_dict. Default: one pass, the "
                    "layers normalizing with batch statistics and everything else in eval "
                    "mode; --exact: the fixed point, one pass per normalization depth. "
                    "Statistics are pooled over all the data (not averaged per batch).",
        epilog="example:\n  normsurgeon recalibrate mynet.py:build --weights pruned.pt "
               "--data calib.npy --batch-size 64 -o recalibrated.pt",
        formatter_class=_Formatter)
    p.add_argument("model", help="package.module:callable or path/to/file.py:callable")
    req = p.add_argument_group("required arguments")
    req.add_argument("--data", required=True,
                     help="calibration inputs (N, ...): a torch.save tensor (.pt), .npy or .npz")
    req.add_argument("-o", "--output", required=True, help="the state_dict file to write (.pt)")
    p.add_argument("--weights", help="a state_dict file to load into the model first")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--num-batches", type=int, help="use at most this many batches")
    p.add_argument("--exact", action="store_true",
                   help="the fixed point: one pass per normalization depth")
    p.add_argument("--seed", type=int, default=0, help="seed for building the model (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_recalibrate)


def _add_export_commands(sub: Any, choices: list[str]) -> None:
    p = sub.add_parser(
        "export", help="convert, export to ONNX, optionally verify",
        description="Build the model (seeded), convert it with --to (none: export it as it "
                    "is), export it to ONNX (CBN and RBN as single nodes of the normsurgeon "
                    "domain that carry their ONNX function bodies, so stock onnxruntime runs "
                    "them; --no-custom-ops: standard ops only) and, with --verify, compare the "
                    "file with PyTorch on onnxruntime. MODEL may be a .pt2 program.",
        epilog="examples:\n"
               "  normsurgeon export pytorchcv.models.resnet:resnet18 --to fold "
               "--input-shape 1,3,224,224 -o r18.onnx --verify\n"
               "  normsurgeon export pytorchcv.models.resnet:resnet18 --to cbn --cond-dim 8 "
               "--input-shape 1,3,224,224 -o r18_cbn.onnx\n"
               "  normsurgeon export model.pt2 --to fold -o model.onnx",
        formatter_class=_Formatter)
    _add_model_args(p, [*choices, "none"], shape_required=True)
    p._ns_required.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--no-custom-ops", action="store_true",
                   help="standard ONNX ops only (no normsurgeon domain)")
    p.add_argument("--verify", action="store_true", help="compare on onnxruntime")
    p.add_argument("--providers", help="cpu,cuda (default: cpu, plus cuda when available)")
    p.add_argument("--allow-specialized", action="store_true",
                   help="accept a graph that holds only the example's branch of a Python "
                        "decision on tensor values (refused by default)")
    _add_selection_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "verify", help="rebuild the reference model and compare an ONNX file",
        description="Rebuild the model exactly as `export` did (same MODEL, --weights, --seed, "
                    "--to and options), run the ONNX file on onnxruntime with graph "
                    "optimisations off and on, on families of inputs (random, another batch, "
                    "x10, negated, zeros, x100; for CBN extreme conditions and every label), "
                    "and compare every output with PyTorch (the bars: README, 'Exactness'). "
                    "Exit 0: all within the bar; 1: a mismatch; 2: bad usage.",
        epilog="example (after the export example of `normsurgeon export --help`):\n"
               "  normsurgeon verify r18_cbn.onnx --model pytorchcv.models.resnet:resnet18 "
               "--to cbn --cond-dim 8 --input-shape 1,3,224,224",
        formatter_class=_Formatter)
    req = p.add_argument_group("required arguments")
    p.add_argument("onnx_file", help="the .onnx file written by `normsurgeon export`")
    req.add_argument("--model", required=True,
                     help="package.module:callable, path/to/file.py:callable or model.pt2 "
                          "(as for export)")
    p.add_argument("--to", default="fold", choices=[*choices, "none"],
                   help="the --to the file was exported with (default: fold; none: the model "
                        "as it is)")
    req.add_argument("--input-shape",
                     help="example input shape, e.g. 1,3,224,224 (its batch and one more run); "
                          "not needed for a .pt2 program that holds example inputs")
    p.add_argument("--weights", help="the state_dict given to export, if any")
    p.add_argument("--seed", type=int, default=0, help="the --seed given to export (default 0)")
    p.add_argument("--cond-dim", type=int, help="CBN: the --cond-dim given to export")
    p.add_argument("--num-classes", type=int, help="CBN: the --num-classes given to export")
    p.add_argument("--providers", help="cpu,cuda (default: cpu, plus cuda when available); "
                                       "a provider that cannot run is reported, never passed")
    _add_selection_args(p, strict=False)
    p.set_defaults(func=cmd_verify)


def _add_selection_args(p: argparse.ArgumentParser, strict: bool = True) -> None:
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="convert only BatchNorms whose name matches (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="leave BatchNorms whose name matches (repeatable)")
    if strict:
        p.add_argument("--strict", action="store_true",
                       help="fail (exit 2) if any BatchNorm would be left alone, with reasons")


# -- parser -----------------------------------------------------------------------------------
_TO_HELP = ("fold: BatchNorm into its neighbouring Conv/Linear; cbn: Conditional BatchNorm "
            "(needs --cond-dim or --num-classes); rbn: Representative BatchNorm")


def _add_model_args(p: argparse.ArgumentParser, to_choices: Sequence[str],
                    shape_required: bool = False) -> None:
    p.add_argument("model", help="package.module:callable, path/to/file.py:callable, or a "
                                 "torch.export program file model.pt2")
    none = "; none: no conversion, export the model as it is" if "none" in to_choices else ""
    p.add_argument("--to", default="fold", choices=list(to_choices),
                   help=f"the transform (default: fold). {_TO_HELP}{none}")
    where = p.add_argument_group("required arguments") if shape_required else p
    p._ns_required = where  # type: ignore[attr-defined]
    where.add_argument("--input-shape",
                       help="example input shape, e.g. 1,3,224,224" + (
                           " (not needed for a .pt2 program that holds example inputs)"
                           if shape_required else "; enables the self-check and concrete "
                           "tracing"))
    p.add_argument("--weights", help="a state_dict file to load into the model")
    p.add_argument("--seed", type=int, default=0, help="seed for building the model (default 0)")
    p.add_argument("--cond-dim", type=int, help="CBN: width of the condition embedding")
    p.add_argument("--num-classes", type=int, help="CBN: condition on integer labels instead")


class _Formatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal, examples (epilogs) kept line by line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (what to fix and where to get help), and a
    mistyped choice (a subcommand, --to) names the nearest valid one."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"normsurgeon: error: {message} (see {self.prog} --help)\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is not None and value not in choices:
            import difflib

            names = [str(c) for c in choices]
            close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{hint} (choose from {', '.join(names)})")
        super()._check_value(action, value)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="normsurgeon",
        description="Surgery on the normalization layers of trained PyTorch models: fold "
                    "BatchNorm (in a Python model, a .pt2 program or an .onnx file), replace "
                    "it with Conditional or Representative BatchNorm, export to ONNX and "
                    "verify, recalibrate statistics. `normsurgeon COMMAND --help` explains "
                    "each command. Exit codes: 0 success, 1 a check or verification failed, "
                    "2 a usage mistake (one line says what to fix), 130 interrupted.",
        epilog="examples:\n  normsurgeon demo\n"
               "  normsurgeon inspect pytorchcv.models.resnet:resnet50 --input-shape "
               "1,3,224,224\n  normsurgeon fold model.onnx -o folded.onnx",
        formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"normsurgeon {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    choices = _transform_choices()

    p = sub.add_parser("inspect", help="show what conversion would do to every BatchNorm",
                       description="A table of every BatchNorm site and what --to would do "
                                   "with it (folded into which layer, or why it is left). "
                                   "Nothing is written. MODEL may be a .pt2 program.",
                       epilog="examples:\n  normsurgeon inspect pytorchcv.models.densenet:"
                              "densenet121 --input-shape 1,3,224,224\n"
                              "  normsurgeon inspect model.pt2 --json",
                       formatter_class=_Formatter)
    _add_model_args(p, choices)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_selection_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="fold a third-party model (pytorchcv ResNet-18) and report",
                       description="Fold pytorchcv's ResNet-18 (random weights, randomized "
                                   "BatchNorm statistics, nothing downloaded) and print the "
                                   "report and the measured output difference. Needs "
                                   "pytorchcv: pip install --no-deps pytorchcv.",
                       epilog="example:\n  normsurgeon demo --seed 3",
                       formatter_class=_Formatter)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights, statistics and input (default 0)")
    p.set_defaults(func=cmd_demo)
    for extra in _EXTRA_COMMANDS:
        extra(sub, choices)
    return parser


_EXTRA_COMMANDS: list[Callable[[Any, list[str]], None]] = [_add_export_commands,
                                                            _add_recalibrate_command,
                                                            _add_fold_command]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit code is returned. Ctrl-C at any point (torch's import
    at start-up included) is exit 130 with one line."""
    import warnings

    # torch's own deprecation noise while loading .pt2 files is not the user's to fix
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("normsurgeon: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .errors import (
        ConversionMismatchError,
        NormSurgeonError,
        StrictModeError,
        VerificationError,
    )

    NOTES.clear()
    try:
        code = int(args.func(args))
        for note in NOTES if args.verbose else ():
            print(f"normsurgeon: note: {note}", file=sys.stderr)
        return code
    except StrictModeError as e:
        print(f"normsurgeon: error: --strict: {len(e.reasons)} BatchNorm site(s) would be left "
              f"alone, e.g. {next(iter(e.reasons))}: {next(iter(e.reasons.values()))}",
              file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        print(f"normsurgeon: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except VerificationError as e:
        print(f"normsurgeon: verification failed: {e}", file=sys.stderr)
        return EXIT_MISMATCH
    except ConversionMismatchError as e:
        print(f"normsurgeon: conversion check failed: {str(e).splitlines()[0]}",
              file=sys.stderr)
        return EXIT_MISMATCH
    except (NormSurgeonError, ValueError, TypeError) as e:
        print(f"normsurgeon: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a full disk, a folder that vanished: what to fix, in one line
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"normsurgeon: error: cannot write or read a file{where}: "
              f"{e.strerror or _one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
