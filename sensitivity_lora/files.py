"""Writing output files: atomically (temporary file in the same folder, fsync, rename), as plain JSON
and as byte-for-byte reproducible safetensors; sets of files committed together; one run per folder.

A reader never sees a half-written file under the final name: a crash leaves
either the old file or the new one. :class:`FileSet` extends that to several
files that belong together (an allocation and its PEFT config): they are
staged in a hidden folder beside the final names, and a commit journal makes
the renames one step (a run killed during them is finished by the next run
or reader, see :func:`recover`). :func:`output_lock` keeps two runs out of one folder.

Leaf module: imports nothing of the package but ``errors``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .errors import FileFormatError, OutputError, OutputInUseError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".sensitivity-lora.lock"
JOURNAL_FILE = ".sensitivity-lora-commit.json"
STAGING_PREFIX = ".sensitivity-lora-staging-"


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


# ---------------------------------------------------------------- output folders

def check_path(name: str, value: Any) -> None:
    """A path argument is a str or os.PathLike (Path(1) would fail with a message that names nothing)."""
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value):
        raise ValueError(f"{name} must be a path (a non-empty str or os.PathLike), got {value!r}")


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> None:
    """What :func:`ensure_output_folder` would refuse, found without creating anything (a run refused
    later, e.g. for its budget, leaves no empty folder behind)."""
    path = Path(path)
    if path.exists():
        ensure_output_folder(path, what)  # exists already: nothing is created
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create the {what} {path}: a parent of it is a file", errno.ENOTDIR)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create the {what} {path}: {parent} is not writable", errno.EACCES)


def ensure_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` as a writable folder (created with its parents); OutputError naming it otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"the {what} {path} is a file, not a folder: pass a folder (it is created when "
                          "missing)", errno.ENOTDIR)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot create the {what} {path}: a parent of it is a file", errno.ENOTDIR) from None
    except NotADirectoryError:
        raise OutputError(f"cannot create the {what} {path}: a parent of it is a file", errno.ENOTDIR) from None
    except OSError as exc:
        raise OutputError(f"cannot create the {what} {path}: {exc.strerror or exc}", exc.errno) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"the {what} {path} is not writable: choose another folder or fix its permissions",
                          errno.EACCES)
    return path


_HELD: dict[str, list] = {}  # resolved folder → [open lock file, count]: the lock is re-entrant in a process
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Hold ``folder``'s lock for the duration; OutputInUseError when another process holds it.

    An advisory ``flock`` on ``folder/.sensitivity-lora.lock``, removed when the run ends: the
    system drops the lock when the process ends, however it ends, so a killed run never blocks
    the next one (its lock file is simply taken over). Within one process the lock is re-entrant
    (a checkpoint folder may be the output folder).
    """
    created = not Path(folder).exists()
    folder = ensure_output_folder(folder, what)
    key = str(folder.resolve())
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
        else:
            held = _HELD[key] = [_acquire(folder, what), 1]
    failed = False
    try:
        yield folder
    except BaseException:
        failed = True
        raise
    finally:
        with _HELD_GUARD:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                _release(folder, held[0])
                if created and failed:  # a refused run leaves no empty folder it made (rmdir keeps a non-empty one)
                    with contextlib.suppress(OSError):
                        folder.rmdir()


def _lock_in_place(path: Path, blocking: bool):
    """An open handle holding an exclusive ``flock`` on ``path`` as it is now. The holder before may have
    removed the file (and another process re-created it): a lock on the removed one would guard nothing,
    so retry until the locked file is the one in place. Non-blocking: BlockingIOError when held."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            try:
                same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            handle.close()
            raise
        if same:
            return handle
        handle.close()


def _acquire(folder: Path, what: str):
    path = folder / LOCK_FILE
    if fcntl is None:  # pragma: no cover - Windows: no advisory locks here; one run at a time is up to the user
        return None
    while True:
        try:
            handle = _lock_in_place(path, blocking=False)
            break
        except FileNotFoundError:  # the run that held it failed and removed the folder it had made
            folder.mkdir(parents=True, exist_ok=True)
        except BlockingIOError:
            owner = "another process"
            with contextlib.suppress(OSError), open(path) as held:
                owner = held.read().strip() or owner
            raise OutputInUseError(f"the {what} {folder} is in use by another sensitivity-lora run ({owner}); "
                                   "wait for it to end or choose another folder", errno.EBUSY) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def _release(folder: Path, handle) -> None:
    if handle is None:  # pragma: no cover
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / LOCK_FILE)  # while still locked: a waiting run re-opens the new file
    handle.close()  # drops the flock


class FileSet:
    """Files that belong together, written to ``folder`` all at once or not at all.

        with output_lock(out):
            files = FileSet(out, replaces=["allocation.json", "adapter_config.json", "ranks.png"])
            files.write_json("allocation.json", data)            # into a hidden staging folder
            files.path("ranks.png")                              # a staged path to write yourself
            ...                                                  # check the staged files
            files.commit()                                       # now they replace the old set

    Nothing under the final names changes before :meth:`commit`; an error (or a kill) before it
    leaves the old set as it was (:meth:`discard`, or the next run, removes the staging folder).
    ``replaces`` names the files of the old set that the new one supersedes: those the new
    set does not write are removed at the commit, so no file of the old set is left beside the new.
    """

    def __init__(self, folder: str | os.PathLike, replaces: tuple[str, ...] | list[str] = ()) -> None:
        self.folder = ensure_output_folder(folder)
        recover(self.folder)
        self.replaces = list(replaces)
        self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.folder))
        self.names: list[str] = []

    def path(self, name: str) -> Path:
        """Where to write ``name`` (staged); it becomes ``folder/name`` at the commit."""
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"{name!r} must be a plain file name")
        if name not in self.names:
            self.names.append(name)
        return self.staging / name

    def forget(self, name: str) -> None:
        """Leave ``name`` out of the set after all (e.g. a plot that could not be made)."""
        if name in self.names:
            self.names.remove(name)
        (self.staging / name).unlink(missing_ok=True)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path(name), text)

    def write_json(self, name: str, obj: Any, indent: int = 1) -> Path:
        return atomic_write_json(self.path(name), obj, indent)

    def commit(self) -> None:
        """Move every staged file to its final name (and remove the superseded old ones) as one step."""
        missing = [n for n in self.names if not (self.staging / n).is_file()]
        if missing:
            raise RuntimeError(f"FileSet.commit: {', '.join(missing)} were never written")
        for name in self.names:  # everything durable before the journal says "commit"
            with open(self.staging / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(self.staging)
        remove = [n for n in self.replaces if n not in self.names]
        atomic_write_json(self.folder / JOURNAL_FILE, {"staging": self.staging.name, "files": self.names,
                                                        "remove": remove})
        _apply_journal(self.folder)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "FileSet":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # after a commit the staging folder is already gone


def _apply_journal(folder: Path) -> None:
    journal = folder / JOURNAL_FILE
    plan = json.loads(journal.read_text(encoding="utf-8"))
    staging = folder / plan["staging"]
    if Path(plan["staging"]).name != plan["staging"] or not plan["staging"].startswith(STAGING_PREFIX):
        raise OutputError(f"{journal} names {plan['staging']!r}, not a staging folder of ours", errno.EINVAL)
    for name in plan["files"]:
        if Path(name).name != name:
            raise OutputError(f"{journal} names {name!r}, not a plain file name", errno.EINVAL)
        if (staging / name).exists():
            os.replace(staging / name, folder / name)
    for name in plan.get("remove", []):
        if Path(name).name == name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
    _fsync_dir(folder)
    shutil.rmtree(staging, ignore_errors=True)
    os.unlink(journal)
    _fsync_dir(folder)


def recover(folder: str | os.PathLike) -> None:
    """Finish a commit that a killed run had started (its journal exists), and drop uncommitted staging
    folders. Call it holding the folder's lock (every writer here does; the readers too when they can)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if (folder / JOURNAL_FILE).is_file():
        _apply_journal(folder)
    for stale in folder.glob(STAGING_PREFIX + "*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def pending_commit(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a started but unfinished commit (a run was killed during its renames)."""
    return (Path(folder) / JOURNAL_FILE).is_file()


def write_folder_whole(folder: str | os.PathLike, write: Callable[[Path], None],
                       replaces: tuple[str, ...] | list[str] = ()) -> Path:
    """Run ``write(staging_dir)`` (e.g. a ``save_pretrained`` that writes several files) and put what it
    wrote into ``folder`` as one set (:class:`FileSet`): complete, or the old files untouched. Writing
    nothing, or a sub-folder, is refused. Holds ``folder``'s lock for the whole write."""
    with output_lock(folder):
        files = FileSet(folder, replaces=replaces)
        try:
            write(files.staging)
            written = sorted(files.staging.iterdir())
            nested = [p.name for p in written if not p.is_file()]
            if nested or not written:
                what = f"the sub-folder(s) {', '.join(nested)}" if nested else "no file"
                raise RuntimeError(f"writing {folder} produced {what}; expected plain files")
            for path in written:
                files.path(path.name)
            files.commit()
        finally:
            files.discard()
    return Path(folder)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Wait for, then hold, an exclusive lock on ``path`` (an advisory ``flock`` on the hidden
    ``.<name>.lock`` beside it, removed when released), for a read-modify-write of one file shared by
    several processes."""
    if fcntl is None:  # pragma: no cover - Windows: no advisory locks here
        yield
        return
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    handle = _lock_in_place(lock, blocking=True)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still locked: a waiter re-opens the new file
        handle.close()

