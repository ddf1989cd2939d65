"""The command's messages: the ``sensitivity_lora`` logger on stderr, at the level -q/-v ask for.

Results go to stdout (print); progress, what was written and warnings go through logging
to stderr, as in transformers and accelerate. -q also quiets transformers and
huggingface_hub; off a terminal their progress bars are off too (ours become log lines,
see ``progress.py``). Everything is put back on exit, since ``main`` also runs inside
other programs (and the tests).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

LOGGER = logging.getLogger("sensitivity_lora")


class _Stderr(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment, not the one at creation (callers and tests swap it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _Formatter(logging.Formatter):
    """INFO as the plain message; other levels named, e.g. ``sensitivity-lora: warning: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"sensitivity-lora: {record.levelname.lower()}: {text}"


@contextlib.contextmanager
def cli_logging(quiet: bool = False, verbose: bool = False) -> Iterator[None]:
    """The package logger on stderr (INFO; WARNING with ``quiet``, DEBUG with ``verbose``) while inside."""
    from .. import progress

    handler = _Stderr()
    handler.setFormatter(_Formatter("%(message)s"))
    saved = LOGGER.level, LOGGER.propagate
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    LOGGER.propagate = False  # a root handler of the calling program would print every line twice
    try:
        with _hugging_face(errors_only=quiet, bars=not quiet and progress.draws_bars()):
            yield
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(saved[0])
        LOGGER.propagate = saved[1]


@contextlib.contextmanager
def _hugging_face(errors_only: bool, bars: bool) -> Iterator[None]:
    """transformers at ERROR with ``errors_only``; its and huggingface_hub's bars off unless ``bars`` (off a
    terminal they are carriage-return lines). As before afterwards."""
    import huggingface_hub.utils as hub
    import transformers.utils.logging as hf_logging

    verbosity, hf_bars, hub_bars_off = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                                        hub.are_progress_bars_disabled())
    if errors_only:
        hf_logging.set_verbosity_error()
    if not bars:
        hf_logging.disable_progress_bar()  # hub's too
        hub.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hf_bars:
            hf_logging.enable_progress_bar()  # the hub's too: set right below
        (hub.disable_progress_bars if hub_bars_off else hub.enable_progress_bars)()
