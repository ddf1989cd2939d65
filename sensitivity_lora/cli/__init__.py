"""sensitivity-lora: allocate LoRA ranks from Hessian sensitivity, compare allocations, export Hessians, evaluate."""
from __future__ import annotations

import argparse
import os
import sys

# Exit codes (README "Guarantees" lists them): every expected error is one line on stderr and one of these.
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: the message says so; --debug shows the traceback
EXIT_INPUT = 2  # bad input or usage: options, settings, model folder, data, target modules, files read
EXIT_CALIBRATION = 3  # calibration failed on this model and data (non-finite activations, out of memory, ...)
EXIT_IO = 4  # outputs cannot be written (the folder is a file, not writable, disk full)
EXIT_CONFLICT = 5  # what is on disk belongs to another run (checkpoint/export mismatch, folder in use)
EXIT_PACKAGE = 6  # an optional package is missing
EXIT_VERIFY = 7  # the PEFT model built from the config does not carry the allocated ranks
EXIT_INTERRUPTED = 130  # Ctrl-C


def exit_code(exc: BaseException) -> int:
    """The documented exit code of an exception (EXIT_INTERNAL for anything unexpected)."""
    import torch

    from .. import errors

    table = [
        (KeyboardInterrupt, EXIT_INTERRUPTED),
        (errors.MissingPackageError, EXIT_PACKAGE),
        ((errors.CheckpointMismatchError, errors.OutputInUseError, errors.OutputExistsError), EXIT_CONFLICT),
        (errors.RankMismatchError, EXIT_VERIFY),
        ((errors.CalibrationError, errors.NotPositiveDefiniteError, MemoryError, torch.OutOfMemoryError),
         EXIT_CALIBRATION),
        ((ValueError, errors.BackendUnavailableError, errors.DistributedSetupError, FileNotFoundError,
          IsADirectoryError, NotADirectoryError), EXIT_INPUT),
        (OSError, EXIT_IO),
    ]
    for kinds, code in table:
        if isinstance(exc, kinds):
            return code
    return EXIT_INTERNAL


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line ("[Errno 28] No space left on device: 'x'" as plain words)."""
    from ..errors import OutputError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, OutputError) and exc.strerror:
        filename = getattr(exc, "filename", None)
        text = f"{exc.strerror}: {filename}" if filename is not None else exc.strerror
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other error (argparse prints the usage too)
        self.exit(EXIT_INPUT, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import allocate, evaluate, hessians

    parser = _Parser(prog="sensitivity-lora", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    allocate.add_parsers(sub)
    hessians.add_parser(sub)
    evaluate.add_parser(sub)
    for choice in sub.choices.values():  # --debug after the sub-command too
        choice.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (already printed as one line)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_INPUT
    debug = bool(getattr(args, "debug", False)) or os.environ.get("SENSITIVITY_LORA_DEBUG") == "1"
    try:
        return args.func(args)
    except BaseException as exc:  # noqa: BLE001 - every error becomes one line and an exit code
        if isinstance(exc, SystemExit):
            raise
        code = exit_code(exc)
        if debug:
            import traceback

            traceback.print_exc()
        if code == EXIT_INTERRUPTED:
            print("sensitivity-lora: interrupted", file=sys.stderr)
        elif code == EXIT_INTERNAL:
            print(f"sensitivity-lora: internal error: {type(exc).__name__}: {one_line(exc)} "
                  "(a bug: please report it with the output of --debug)", file=sys.stderr)
        else:
            print(f"sensitivity-lora: error: {one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
