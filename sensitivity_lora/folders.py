"""Output folders written as one transaction: the run's lock (re-entrant in a process, released however the
process ends), a set of files staged and committed whole through a journal (:class:`FileSet`), recovery of
an interrupted commit, and a lock for one file shared by several processes (:func:`file_lock`).
Single files are written atomically by ``files.py``."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import OutputError, OutputInUseError
from .files import _fsync_dir, atomic_write_json, atomic_write_text

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".sensitivity-lora.lock"
JOURNAL_FILE = ".sensitivity-lora-commit.json"
STAGING_PREFIX = ".sensitivity-lora-staging-"


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

