"""Writing one output file: atomically (temporary file in the same folder, fsync, rename), as plain JSON
and as byte-for-byte reproducible safetensors; reading JSON with the file named in its errors.

A reader never sees a half-written file under the final name: a crash leaves either the old file or the
new one. Sets of files written together, and the folder's lock, are ``folders.py``.

Leaf module: imports nothing of the package but ``errors``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .errors import FileFormatError


def json_safe(value: Any) -> Any:
    """A JSON-safe copy: numpy scalars to Python, tuples to lists, paths to strings, non-finite floats to strings."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf", "nan": standard JSON has no such numbers
    if isinstance(value, Path):
        return str(value)
    return value


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a FileFormatError naming the file when it is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"{path} is not valid JSON ({exc}); fix or remove it") from None


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def process_umask() -> int:
    """The process's file-creation mask, read without changing it where the system allows."""
    try:  # Linux ≥ 4.7: no window in which another thread would create files with a changed mask
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it and rename it to ``path``.

    The final file gets the mode a newly created file gets (0666 less the umask; an existing file's mode
    is not kept), not the 0600 of the private temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~process_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(folder: str | os.PathLike, stems: tuple[str, ...]) -> list[Path]:
    """Delete what a killed :func:`atomic_write` left in ``folder`` for files whose names start with one of
    ``stems`` (its temporaries are ``.<name>.<random>.tmp``). Call it holding the folder's lock."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        if path.is_file() and path.name[1:].startswith(stems):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    """``obj`` as standard JSON (no NaN/Infinity), keys in the order given."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n")


def canonical_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite the JSON header of a safetensors file in one canonical form, in place.

    safetensors keeps ``__metadata__`` in a Rust HashMap, whose order changes from one
    process to the next, so the same tensors and metadata give different bytes. Here the
    metadata keys are sorted and the tensors listed in the order of their data; the header
    keeps its length (same strings, reordered), so only its bytes are rewritten.
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        ordered: dict[str, Any] = {}
        if meta:
            ordered["__metadata__"] = dict(sorted(meta.items()))
        for name, info in sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])):
            ordered[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": info["data_offsets"]}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:  # cannot happen for safetensors' own compact JSON; never corrupt the file
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> Path:
    """A safetensors file written atomically, with a canonical header (the same inputs give the same bytes)."""
    from safetensors.torch import save_file

    def write(tmp: str) -> None:
        save_file(dict(tensors), tmp, metadata=dict(metadata))
        canonical_safetensors_header(tmp)

    return atomic_write(path, write)


def check_path(name: str, value: Any) -> None:
    """A path argument is a str or os.PathLike (Path(1) would fail with a message that names nothing)."""
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value):
        raise ValueError(f"{name} must be a path (a non-empty str or os.PathLike), got {value!r}")
