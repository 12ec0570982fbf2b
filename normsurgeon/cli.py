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

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


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


def load_model(spec: str, weights: str | None = None, seed: int = 0) -> Any:
    """Build ``package.module:callable`` or ``path/to/file.py:callable`` with a fixed seed."""
    import torch

    if ":" not in spec:
        raise UsageError(f"MODEL {spec!r} must look like package.module:callable or "
                         "path/to/file.py:callable")
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
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{where!r} has no callable named {attr!r}")
    torch.manual_seed(seed)
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise UsageError(f"cannot read weights {weights!r}: {e}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UsageError(f"weights {weights!r} do not fit {spec}: "
                             f"{str(e).splitlines()[0]}") from None
    return model.eval()


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
    opts: dict[str, Any] = {}
    if getattr(args, "cond_dim", None) is not None:
        opts["cond_dim"] = args.cond_dim
    if getattr(args, "num_classes", None) is not None:
        opts["num_classes"] = args.num_classes
    return opts


# -- commands ---------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    import normsurgeon as ns

    model = load_model(args.model, args.weights, args.seed)
    x = torch.randn(parse_shape(args.input_shape)) if args.input_shape else None
    with progress("analysing"):
        report = ns.inspect(model, args.to, example_inputs=x, **_convert_options(args))
    print(report.to_json(indent=2) if args.json else report.table())
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
          f"{report.max_rel_error:.2e} (bar {report.bar:.0e}, docs/bars.md); "
          f"took {report.seconds:.2f}s")
    return EXIT_OK


def _example_args(args: argparse.Namespace) -> tuple[Any, ...]:
    import torch

    if not args.input_shape:
        raise UsageError("--input-shape is required, e.g. --input-shape 1,3,224,224")
    shape = parse_shape(args.input_shape)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(shape, generator=g)
    if args.to != "cbn":
        return (x,)
    if args.num_classes:
        return (x, torch.randint(0, args.num_classes, (shape[0],), generator=g))
    if not args.cond_dim:
        raise UsageError("--to cbn needs --cond-dim E or --num-classes K")
    return (x, torch.randn(shape[0], args.cond_dim, generator=g))


def _build_converted(args: argparse.Namespace) -> tuple[Any, tuple[Any, ...]]:
    """The model as ``export`` and ``verify`` both rebuild it: seeded, then converted."""
    import torch

    import normsurgeon as ns

    model = load_model(args.model, args.weights, args.seed)
    example = _example_args(args)
    if args.to == "none":
        return model, example
    torch.manual_seed(args.seed)
    converted = ns.convert(model, args.to, example_inputs=example[:1], **_convert_options(args))
    return converted, example


def _providers(text: str | None) -> list[str] | None:
    if not text:
        return None
    out = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in ("cpu", "cuda")]
    if bad:
        raise UsageError(f"unknown provider(s) {', '.join(bad)}: use cpu and/or cuda")
    return out


def _print_verification(res: Any) -> int:
    print(res.table())
    return EXIT_OK if res else EXIT_MISMATCH


def cmd_export(args: argparse.Namespace) -> int:
    import normsurgeon as ns

    providers = _providers(args.providers)
    with progress("converting"):
        model, example = _build_converted(args)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UsageError(f"output directory {out_dir!r} does not exist")
    with progress("exporting"):
        res = ns.export_onnx(model, example, args.output, custom_ops=not args.no_custom_ops)
    ops_text = ", ".join(res.custom_ops) or "standard ops only"
    print(f"wrote {res.path} ({ops_text}; opset {res.opset}; exporter {res.exporter}; "
          f"{res.seconds:.1f}s)")
    if args.verify:
        with progress("verifying on onnxruntime"):
            v = ns.verify_onnx(res.path, model, example, providers=providers)
        return _print_verification(v)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    import normsurgeon as ns

    if not os.path.isfile(args.onnx_file):
        raise UsageError(f"ONNX file {args.onnx_file!r} does not exist")
    providers = _providers(args.providers)
    with progress("rebuilding the reference"):
        model, example = _build_converted(args)
    with progress("verifying on onnxruntime"):
        try:
            v = ns.verify_onnx(args.onnx_file, model, example, providers=providers)
        except Exception as e:  # an unreadable or mismatched file is bad input
            if type(e).__name__ in ("InvalidGraph", "InvalidArgument", "Fail", "DecodeError",
                                    "NoSuchFile", "InvalidProtobuf"):
                raise UsageError(f"cannot run {args.onnx_file!r}: "
                                 f"{str(e).splitlines()[0]}") from None
            raise
    return _print_verification(v)


def _add_export_commands(sub: Any, choices: list[str]) -> None:
    p = sub.add_parser("export", help="convert, export to ONNX, optionally verify")
    _add_model_args(p, [*choices, "none"])
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--no-custom-ops", action="store_true",
                   help="standard ONNX ops only (no normsurgeon domain)")
    p.add_argument("--verify", action="store_true", help="compare on onnxruntime")
    p.add_argument("--providers", help="cpu,cuda (default: cpu, plus cuda when available)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="rebuild the reference model and compare an ONNX file")
    p.add_argument("onnx_file")
    p.add_argument("--model", required=True,
                   help="package.module:callable or path/to/file.py:callable")
    p.add_argument("--to", default="fold", choices=[*choices, "none"])
    p.add_argument("--input-shape", required=True)
    p.add_argument("--weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cond-dim", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--providers", help="cpu,cuda")
    p.set_defaults(func=cmd_verify)


# -- parser -----------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser, to_choices: Sequence[str]) -> None:
    p.add_argument("model", help="package.module:callable or path/to/file.py:callable")
    p.add_argument("--to", default="fold", choices=list(to_choices),
                   help="transform (default: fold)")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--weights", help="a state_dict file to load into the model")
    p.add_argument("--seed", type=int, default=0, help="seed for building the model (default 0)")
    p.add_argument("--cond-dim", type=int, help="CBN: width of the condition embedding")
    p.add_argument("--num-classes", type=int, help="CBN: condition on integer labels instead")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="normsurgeon",
        description="Surgery on the normalization layers of trained PyTorch models.")
    parser.add_argument("--version", action="version", version=f"normsurgeon {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    choices = _transform_choices()

    p = sub.add_parser("inspect", help="show what conversion would do to every BatchNorm",
                       description="A table of every BatchNorm site and what --to would do "
                                   "with it. Nothing is written.")
    _add_model_args(p, choices)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="fold a third-party model (pytorchcv ResNet-18) and report")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    for extra in _EXTRA_COMMANDS:
        extra(sub, choices)
    return parser


_EXTRA_COMMANDS: list[Callable[[Any, list[str]], None]] = [_add_export_commands]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .errors import ConversionMismatchError, NormSurgeonError, VerificationError

    try:
        return int(args.func(args))
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
