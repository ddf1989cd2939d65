"""sensitivity-lora: allocate LoRA ranks from Hessian sensitivity, compare allocations, export Hessians, evaluate."""
from __future__ import annotations

import argparse
import os
import sys

# Exit codes (docs/cli.md lists them): every expected error is one line on stderr and one of these.
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


class _Version(argparse.Action):
    """--version: computed only when asked for (it imports torch)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit(EXIT_OK)


def version_text() -> str:
    """``sensitivity-lora <version>``, then torch and whether the compiled extension loads."""
    import torch

    from .. import __version__
    from ..ops import available, unavailable_reason

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
    if available("accumulate_sumsq", "cpu"):
        extension = "loaded"
    else:
        extension = f"not loaded ({unavailable_reason('accumulate_sumsq', 'cpu')})"
    return f"sensitivity-lora {__version__}\ntorch {torch.__version__} ({cuda})\nsensitivity_lora._C: {extension}"


# the flags every parser takes, before or after the sub-command; each help says its default
FLAGS = (
    (("--debug",), "show the traceback of an error (default: off)"),
    (("-v", "--verbose"), "debug messages too (default: off)"),
    (("-q", "--quiet"), "warnings and errors only: no progress bars, no transformers or huggingface_hub "
                        "messages and bars (default: off)"),
)


def parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every sub-command's parser under it, at any depth."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                found += parsers(child)
    return found


def build_parser() -> argparse.ArgumentParser:
    from . import allocate, eva, evaluate, hessians
    from .options import HelpFormatter

    parser = _Parser(prog="sensitivity-lora", description=__doc__)
    parser.add_argument("--version", action=_Version, help="show the version, torch's and the extension's, and exit")
    for flags, text in FLAGS:
        parser.add_argument(*flags, action="store_true", help=text)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do (sensitivity-lora COMMAND --help lists its options)")
    allocate.add_parsers(sub)
    hessians.add_parser(sub)
    eva.add_parser(sub)
    evaluate.add_parser(sub)
    for child in parsers(parser):
        child.formatter_class = HelpFormatter
        if child is not parser:  # after the sub-command too; SUPPRESS keeps a flag given before it
            for flags, text in FLAGS:
                child.add_argument(*flags, action="store_true", default=argparse.SUPPRESS, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .logs import cli_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.quiet and args.verbose:
            parser.error("-q/--quiet and -v/--verbose contradict each other: give one")
    except SystemExit as exc:  # --help, --version, or a usage error (already printed as one line)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_INPUT
    debug = bool(args.debug) or os.environ.get("SENSITIVITY_LORA_DEBUG") == "1"
    with cli_logging(quiet=args.quiet, verbose=args.verbose):
        try:
            return args.func(args)
        except BaseException as exc:  # noqa: BLE001 - every error becomes one line and an exit code
            if isinstance(exc, SystemExit):
                raise
            return _report(exc, debug)


def _report(exc: BaseException, debug: bool) -> int:
    """Print ``exc`` as the one documented line (and the traceback with --debug); its exit code."""
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
