"""Files that survive a crash, and files that a running server re-reads.

Small tools that ``users.py``, ``aliases.py``, ``outqueue.py`` and
``maildir.py`` share, so that the discipline is written once:

* ``fsync_directory(path)``: a ``rename`` or ``link`` is only durable once
  the directory that holds the new name is fsynced (``fsync(2)``: syncing a
  file "does not necessarily ensure that the entry in the directory
  containing the file has also reached disk").
* ``write_atomically(path, data)``: the new content goes into a temporary
  file beside the old one, is fsynced, renamed over it (``rename(2)`` is
  atomic: a reader sees the old file or the new one, never half of one) and
  the directory is fsynced. A crash at any point leaves the old file or the
  new one (POSIX promises nothing of crashes; journaled file systems such as
  ext4 and XFS make a rename one step). Given several files (a TLS key and
  its certificate), it writes them all before it renames any, so a failed
  write (a full or read-only disk) changes none of them; a failure or crash
  between two renames can still leave one new beside one old.
* ``exclusive_lock(path)``: an ``flock`` held for a read-modify-write, so two
  writers (the CLI and a running server, or two CLI runs) cannot both read
  the old content and each write back their own change. The kernel drops
  the lock when the process dies: no stale lock survives a crash.
* ``ChangedFile``: the parsed content of a file, parsed again only when the
  file's identity (inode, modification time, size) changes. An atomic
  rewrite gives the file a new inode (an old number can come back, but
  then the time tells), so an edit through the CLI is seen at once; so is
  an edit in a text editor, which changes the time or size.
* ``private`` and ``make_private_directory``: files and directories only
  their owner may read, whatever the umask.
* ``UnusableFile``: users.json or aliases there but unusable, told in one line.
* ``discard_file(file, path)``: a half-written file closed and removed,
  even when the close itself fails on a full disk; never raises.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

T = TypeVar("T")

# Mail, the queue and the trace are their owner's alone to read, whatever
# the umask: files 0600, directories 0700 (Postfix's umask is 077).
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIRECTORY_MODE = 0o700

log = logging.getLogger("pymailsrv.durable")


class UnusableFile(Exception):
    """A file the admin keeps (users.json, aliases) that cannot be used now:
    damaged, or shut to the server. The admin's to mend, and no bug: the
    server answers a temporary failure and logs one line, no traceback;
    the command line says it in one line."""


def fsync_directory(path: Path) -> None:
    """Make a rename or link into ``path`` durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private(path: str | Path, flags: int) -> int:
    """An ``opener`` for open(): a file it creates has PRIVATE_FILE_MODE."""
    return os.open(path, flags, PRIVATE_FILE_MODE)


def make_private_directory(path: Path) -> bool:
    """Make ``path`` with PRIVATE_DIRECTORY_MODE (missing parents with the
    default mode, as mkdir -p makes them); True if it was made, False if it
    was there."""
    try:
        path.mkdir(mode=PRIVATE_DIRECTORY_MODE, parents=True)
    except FileExistsError:
        if not path.is_dir():  # a file in the way: say so, not that it "exists"
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None
        return False
    return True


def discard_file(file: BinaryIO, path: Path) -> None:
    """Close a half-written file and remove it, whatever the close says.

    On a full disk, close() flushes the buffer again, the write fails again
    and close raises: the file must go all the same, or tmp/ keeps it. A
    file that cannot be removed (a disk gone read-only) is logged and left
    to the stale-file sweep: a discard runs where something has already
    failed, or a session is ending, and raising would hide that or stop it.
    """
    try:
        file.close()
    except OSError:
        pass
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("cannot remove %s: %s; the stale-file sweep will", path, error.strerror or error)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: old content or new after a crash, never a mix."""
    write_all_atomically([(path, data, mode)])


def write_all_atomically(files: list[tuple[Path, bytes, int]]) -> None:
    """Replace each (path, data, mode): every file is written before any is renamed."""
    written: list[Path] = []
    try:
        for path, data, mode in files:
            written.append(_written_beside(path, data, mode))
    except BaseException:
        for temporary in written:
            temporary.unlink(missing_ok=True)
        raise
    for (path, _, _), temporary in zip(files, written):
        os.replace(temporary, path)
    for directory in dict.fromkeys(path.parent for path, _, _ in files):
        fsync_directory(directory)


def _written_beside(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a new file beside ``path``, fsynced; that file's path."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as file:  # closes fd whatever fails below
            # O_CREAT's mode applies only to a new file; one left over by a
            # crash keeps its old mode unless we set it.
            os.fchmod(fd, mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if need be, as its
    directory, readable by the owner only: they name the data it guards)."""
    make_private_directory(path.parent)
    with open(path, "a", opener=private) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file drops the lock


class ChangedFile(Generic[T]):
    """``parse(path)``'s result, recomputed only when the file changes on disk.

    ``get()`` returns ``missing`` while the file does not exist, and raises
    UnusableFile where it is there but cannot be read (shut to us, or a
    directory). Threads may share one ``ChangedFile``: the check and the
    re-read happen under a lock.
    """

    def __init__(self, path: Path, parse: Callable[[Path], T], missing: T) -> None:
        self.path = path
        self._parse = parse
        self._missing = missing
        self._lock = threading.Lock()
        self._cache: tuple[tuple[int, int, int], T] | None = None

    def get(self) -> T:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return self._missing
        signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if self._cache is None or self._cache[0] != signature:
                try:
                    self._cache = (signature, self._parse(self.path))
                except FileNotFoundError:  # gone since the stat
                    return self._missing
                except OSError as error:  # put there, say, by root with its own permissions
                    raise UnusableFile(f"{self.path} cannot be read: {error.strerror or error}; it must be "
                                       f"readable by the user the server runs as") from None
            return self._cache[1]
