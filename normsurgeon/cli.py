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
            assert spec_ is not None and spec_.loader is not None
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
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # trained-looking BN statistics, so the fold is really exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    x = torch.randn(2, 3, 224, 224)
    print("normsurgeon demo: folding BatchNorm in pytorchcv resnet18 (random weights, "
          "randomized BN statistics)\n")
    with progress("folding"):
        folded, report = ns.convert_with_report(model, "fold", example_inputs=x)
    print(report.table())
    left = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    print(f"\nBatchNorm modules left: {left}; output max relative difference: "
          f"{report.max_rel_error:.2e} (SPEC bar 1e-5); took {report.seconds:.2f}s")
    return EXIT_OK


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

    p = sub.add_parser("inspect", help="show what conversion would do to every BatchNorm")
    _add_model_args(p, choices)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="fold a third-party model (pytorchcv ResNet-18) and report")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    for extra in _EXTRA_COMMANDS:
        extra(sub, choices)
    return parser


_EXTRA_COMMANDS: list[Callable[[Any, list[str]], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .errors import NormSurgeonError, VerificationError

    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"normsurgeon: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except VerificationError as e:
        print(f"normsurgeon: verification failed: {e}", file=sys.stderr)
        return EXIT_MISMATCH
    except (NormSurgeonError, ValueError, TypeError) as e:
        print(f"normsurgeon: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
