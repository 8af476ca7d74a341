"""The ``d3s2`` command line. Each subcommand lives next to the code it drives and registers itself here.

Subcommand modules expose ``register(subparsers)`` which adds a parser whose ``func`` default takes the
parsed args and returns an exit code. Modules are imported only to build the parser, and they import their
heavy dependencies inside ``func``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
import weakref
from collections.abc import Iterator

# Module paths providing ``register(subparsers)``, in the order shown by ``d3s2 --help``.
SUBCOMMAND_MODULES = [
    "d3s2.doctor",
    "d3s2.demo",
    "d3s2.data.cli",
    "d3s2.train.cli",
    "d3s2.pipeline.convert_cli",
    "d3s2.pipeline.cli",
    "d3s2.models.vae.cli",
    "d3s2.app.cli",
]


EVAL_HELP = "evaluate a model on a built data folder"
# The `eval` parser of each top-level parser → its nested subcommands (`eval vae`, `eval generate`).
_EVAL_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def eval_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The subcommands of ``d3s2 eval``, created by the first module that asks; every model family registers
    its ``d3s2 eval FAMILY`` next to its code."""
    parser = subparsers.choices.get("eval")
    if parser is None:
        parser = subparsers.add_parser("eval", help=EVAL_HELP, description=EVAL_HELP)
        _EVAL_GROUPS[parser] = parser.add_subparsers(dest="eval_command", metavar="KIND", required=True)
    return _EVAL_GROUPS[parser]


def resolve_device(name: str | None) -> str:
    """The ``--device`` of a command: ``name`` checked against this machine, or cuda when available, else cpu."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"expected --device cpu, cuda or cuda:N, got {name!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"expected --device cpu, cuda or cuda:N, got {name!r}")
    return name


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="d3s2", description="Direct3D-S2 from scratch: image to watertight 3D mesh.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"d3s2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM (``kill``, a scheduler's time limit) raised in the main thread as Ctrl-C is, so that a file being
    written is removed whole (:mod:`d3s2.fileio`) instead of the process ending inside the write."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while entered, unless the process already handles it (a host that calls
    :func:`main`) or this is not the main thread; commands that stop more gently (train, data build) install
    their own handler inside."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _sigterm_raises():
            return int(args.func(args) or 0)
    except (KeyboardInterrupt, Terminated) as stop:
        # Ctrl-C or SIGTERM: outputs are atomic (nothing partial is left) and long jobs resume, so no traceback
        # (-v for it). The exit codes of a shell: 128 + the signal.
        if args.verbose:
            raise
        terminated = isinstance(stop, Terminated)
        print(f"d3s2 {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except (ValueError, OSError, RuntimeError) as err:
        # Expected user errors (bad values, missing or unwritable paths): one clear line, no traceback (-v for it).
        if args.verbose:
            raise
        print(f"d3s2 {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
