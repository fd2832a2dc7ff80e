"""Maildir storage: durable delivery, the POP3 snapshot, deferred expunge.

Every user's mailbox is a plain Maildir (cr.yp.to/proto/maildir.html) at
``ROOT/<user>/`` with ``tmp/ new/ cur/``, readable by mutt, Dovecot or Python's
``mailbox.Maildir``. The rules we follow, and why:

* Delivery writes the message into ``tmp/`` under a unique name, flushes and
  fsyncs it, renames it into ``new/`` and fsyncs ``new/``. Only then is it
  acknowledged. A reader never sees a half-written file in ``new/`` or
  ``cur/``, and an acknowledged message survives ``kill -9`` and power loss.
  A message for several users is written once and hard-linked into the
  others' ``new/`` (then fsynced again, for its link count); if any step
  fails, every entry already made is taken back (from ``cur/`` too, where a
  POP3 login has moved it meanwhile), so it is in every mailbox or in none.
  A crash midway can leave it in some: the client, told no 250, sends it
  again, and they have it twice, the duplicate RFC 5321 §6.1 accepts.
  Why not write an unnamed file (Linux's ``O_TMPFILE``) and link it into
  ``new/``, with no ``tmp/`` entry at all? On a file system without a
  journal, nothing then makes the file's new link count durable along with
  the entry in ``new/``: that takes a third fsync, which costs more than
  the ``tmp/`` entry saves (on ext4 without a journal, scripts/bench.py's
  load at one connection delivered 0.93 times as many messages a second).
  Why not one ``syncfs(2)`` in place of the two fsyncs? It writes out the
  whole file system in one go, 1.18 times as fast at one connection, but
  with every other program's unsaved data on it, at every delivery; and
  before Linux 5.8 it reported no failed write at all.
  Why not answer once the message is appended to a log of our own (one
  write and one ``fdatasync``: 0.14-0.3 ms on our 2-CPU VM, against 0.6 ms
  for the steps above), and deliver into the Maildirs afterwards, as
  Postfix answers once its queue file is safe? The delivery's work is
  then still to do, on the same two CPUs, with the log's write on top: at
  one connection it only moves into the next transaction. A prototype
  took 1.34-1.88 ms a message at 2 KB x 1 (delivering in a thread, or in
  a process of its own), where these steps took 1.37-1.64 ms in the same
  runs; and a POP3 client would not yet see every message SMTP had
  acknowledged.
* A file's name, ``new/<key>`` or ``cur/<key>:2,<flags>``: the *key* is
  everything before the first ``:`` (what the Maildir spec calls the unique
  name), and the *info* after it. The key stays the same while the message
  moves from ``new/`` to ``cur/`` and gains flags. Ours is
  ``<base>,S=<octets on disk>,W=<octets as POP3 sends them>``, the *base*
  being ``<seconds>.M<microseconds>P<pid>Q<counter>R<random>.<host>``.
* The spec asks readers not to read anything out of names; we read two
  things, only to spare work: ``W=`` (Dovecot's field; ``S=`` is
  Maildir++'s) so STAT and LIST never open a message file, and a name
  without it is read instead; and the leading seconds, for arrival order.
  Messages are stored with LF line ends, the Maildir convention; POP3 sends
  them with CRLF (RFC 1939 §3), and W counts exactly that.
* The UIDL is the base (stable across sessions, RFC 1939 §7), or a hash of
  it where it does not fit the UIDL rules.
* Two files with one key (a Maildir restored over another, a
  careless program) would share a UIDL too, and a session would
  serve or delete one for the other; moving the second from ``new/`` to
  ``cur/`` would replace the first. The snapshot gives the second a unique
  name of its own and logs it, as Dovecot does.
* RFC 1939 §4 asks for an exclusive lock on the maildrop during a POP3
  session. ``mailbox.Maildir.lock()`` does nothing, so we take an ``flock``
  on ``ROOT/.pymailsrv/locks/<user>.lock``: it excludes other sessions in
  this process and other processes alike, and the kernel releases it when a
  crashed process dies, so no stale lock survives a crash.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import itertools
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from pymailsrv.commands import is_decimal
from pymailsrv.durable import discard_file, fsync_directory, make_private_directory, private
from pymailsrv.limits import MAILDIR_TMP_MAX_AGE_SECONDS, POP3_UIDL_MAX
from pymailsrv.storage import (
    MaildropLocked,
    MessageInfo,
    MessageUnreadable,
    MessageVanished,
    StorageError,
    storage_error,
)
from pymailsrv.users import STATE_DIR_NAME, check_user_name

log = logging.getLogger("pymailsrv.maildir")

SUBDIRS = ("tmp", "new", "cur")
# The Maildir spec's "info" separator; what follows ":2," are the flags.
INFO_SEPARATOR = ":2,"
SEEN_FLAG = "S"

_delivery_counter = itertools.count(1)


def _safe_hostname() -> str:
    # The spec: replace "/" with "\057" and ":" with "\072"; we also escape
    # "," because it separates the S= and W= fields that follow.
    host = socket.gethostname() or "localhost"
    return host.replace("/", r"\057").replace(":", r"\072").replace(",", r"\054")


# How much of a message file is read at once: a 2 KB message in one read,
# a 100 MB one without ever holding more than this (and a line) in memory.
READ_BLOCK_OCTETS = 64 * 1024


def pop3_text(file: BinaryIO) -> Iterator[bytes]:
    """A stored message as POP3 sends it, before byte-stuffing: every line
    ended by CRLF (RFC 1939 §3), in blocks of whole lines.

    Stored lines end in LF (the Maildir convention) or CRLF; a last line
    without a line end is still a line, and gets one. A block is converted
    with two ``bytes.replace`` calls rather than line by line: for a 100 KB
    message that is a third of the time, and RETR spends most of its time
    here.
    """
    # A line that goes on into the next block, kept in pieces: joined once,
    # a very long line costs no more than a short one.
    unfinished: list[bytes] = []
    for block in iter(lambda: file.read(READ_BLOCK_OCTETS), b""):
        lines_end = block.rfind(b"\n") + 1
        if lines_end:
            yield _crlf_line_ends(b"".join(unfinished) + block[:lines_end])
            unfinished.clear()
        unfinished.append(block[lines_end:])
    if any(unfinished):  # the last line, with no line end of its own
        yield b"".join(unfinished) + b"\r\n"


def _crlf_line_ends(lines: bytes) -> bytes:
    if b"\r" in lines:  # rare in a Maildir, and looking for one CR is far cheaper than for CRLF
        lines = lines.replace(b"\r\n", b"\n")
    return lines.replace(b"\n", b"\r\n")


def pop3_size(file: BinaryIO) -> int:
    """Octets as POP3 sends the message: every line plus CRLF (RFC 1939 §11)."""
    return sum(len(block) for block in pop3_text(file))


def _key_of(name: str) -> str:
    """A file name less its info part (``:2,<flags>``, or another program's ``:``)."""
    return name.split(":", 1)[0]


def _name_fields(key: str) -> dict[str, str]:
    """The ``,S=…,W=…`` fields after the base."""
    fields = {}
    for part in key.split(",")[1:]:
        field, _, value = part.partition("=")
        fields[field] = value
    return fields


# RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
_UIDL = re.compile(rf"[\x21-\x7e]{{1,{POP3_UIDL_MAX}}}")


def uid_of(key: str) -> str:
    """The UIDL of a message: its key's base, or a digest where that will not do."""
    base = key.split(",", 1)[0]
    if _UIDL.fullmatch(base):
        return base
    return hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()


def arrival_seconds(key: str) -> int | None:
    """The delivery time a Maildir name begins with, in seconds since the
    epoch; None where another program named the file otherwise (only ASCII
    digits are a time)."""
    seconds = key.split(".", 1)[0]
    return int(seconds) if is_decimal(seconds) else None


def _arrival_order(key: str) -> tuple[int, str]:
    """(seconds, base): the time a name begins with, then the name without
    its ",S=..." fields, which a name given by another program may lack."""
    return (arrival_seconds(key) or 0, key.split(",", 1)[0])


def _scan(maildir: Path) -> list[tuple[str, str]]:
    """(key, "new/…" or "cur/…") for every message file, in arrival order.

    Dot files and anything that is not a regular file are not messages; a
    file that vanishes while we look simply is not listed.
    """
    found = []
    for subdir in ("new", "cur"):
        try:
            entries = list(os.scandir(maildir / subdir))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                is_message = not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)
            except OSError:
                continue
            if is_message:
                found.append((_key_of(entry.name), f"{subdir}/{entry.name}"))
    # Of two files with one unique name, the one in cur/ comes first: a
    # session has shown it, and a client may know it by that name's UIDL.
    found.sort(key=lambda pair: (_arrival_order(pair[0]), pair[1].startswith("new/"), pair[0]))
    return found


class MaildirStore:
    """All mailboxes under one data root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.state_dir = self.root / STATE_DIR_NAME
        self._host = _safe_hostname()

    def maildir(self, user: str) -> Path:
        # The name check is what keeps "../x" or "a/b" from leaving the root.
        return self.root / check_user_name(user)

    def create_maildir(self, user: str) -> Path:
        path = self.maildir(user)
        make_maildir(path)
        return path

    def remove_maildir(self, user: str) -> None:
        """Delete the user's Maildir and all in it; StorageError if not all of it went.

        A file that vanishes meanwhile (a POP3 session's QUIT) is gone all
        the same. A Maildir that is a symbolic link is refused, not
        followed: what it points to is not ours to delete.
        """
        path = self.maildir(user)
        if path.is_symlink():
            raise StorageError(f"{path} is a symbolic link: what it points to is left alone")

        def unless_gone(function: Callable, name: str, exc_info: tuple) -> None:
            if not isinstance(exc_info[1], FileNotFoundError):
                raise storage_error(exc_info[1], "deleting")  # the error names the file

        shutil.rmtree(path, onerror=unless_gone)

    # --- delivery ------------------------------------------------------------

    def unique_name(self) -> tuple[str, str]:
        """A new base for a message's file name (see the module docstring) and
        the short id we quote to clients."""
        now = time.time()
        queue_id = os.urandom(5).hex().upper()
        name = (f"{int(now)}.M{int(now % 1 * 1_000_000):06d}P{os.getpid()}"
                f"Q{next(_delivery_counter)}R{queue_id}.{self._host}")
        return name, queue_id

    def receive(self, users: Iterable[str]) -> "IncomingMaildirMessage":
        """Start receiving one message for these users (see IncomingMaildirMessage)."""
        # Each once: a second "ALICE" beside "alice" would be a second link to one name.
        return IncomingMaildirMessage(self, list(dict.fromkeys(check_user_name(user) for user in users)))

    def deliver(self, user: str, message: bytes | BinaryIO) -> str:
        """Deliver one message to ``user``, whole or read from a file a block
        at a time (memory stays flat whatever its size); returns its id once
        it is durable. Stored as a Maildir keeps mail: CRLF as LF, and a last
        line without a line end given one."""
        file = io.BytesIO(message) if isinstance(message, bytes) else message
        incoming = self.receive([user])
        try:
            held = b""  # a block's last CR: the next block may begin with its LF
            ended = True  # what is written so far ends with a LF (or is nothing)
            for block in iter(lambda: file.read(READ_BLOCK_OCTETS), b""):
                block = held + block
                held = b"\r" if block.endswith(b"\r") else b""
                text = block[: len(block) - len(held)].replace(b"\r\n", b"\n")
                if text:
                    incoming.write(text)
                    ended = text.endswith(b"\n")
            if held or not ended:
                incoming.write(held + b"\n")
            return incoming.commit()
        except BaseException:
            incoming.discard()
            raise

    # --- reading -----------------------------------------------------------

    def open_maildrop(self, user: str) -> "MaildirMaildrop":
        """Lock the user's maildrop for a POP3 session (raises MaildropLocked)."""
        # The lock file is named after the checked, lower-cased name: "ALICE"
        # and "alice" are one maildrop and must meet at one lock.
        user = check_user_name(user)
        path = self.create_maildir(user)
        lock_dir = self.state_dir / "locks"
        make_private_directory(lock_dir)
        fd = os.open(lock_dir / f"{user}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MaildropLocked(user) from None
        except BaseException:  # e.g. ENOLCK on a network file system
            os.close(fd)
            raise
        return MaildirMaildrop(path, fd, self.unique_name)

    def messages(self, user: str) -> list[tuple[MessageInfo, Path]]:
        """A read-only listing (no lock, nothing moved) for the CLI: what a
        POP3 login would list, short of the renames it makes."""
        maildir = self.maildir(user)
        listing = []
        for key, relative in _scan(maildir):
            size = _listed_size(maildir, key, relative)
            if size is not None:
                listing.append((MessageInfo(key, size, uid_of(key)), maildir / relative))
        return listing

    def remove_stale_files(self) -> int:
        """Remove tmp/ files not accessed for 36 hours, as the Maildir spec
        says (the server does it once, at start); returns the count."""
        cutoff = time.time() - MAILDIR_TMP_MAX_AGE_SECONDS
        removed = 0
        for tmp in self.root.glob("*/tmp"):
            try:
                entries = list(os.scandir(tmp))
            except OSError as error:  # one broken Maildir (a file named tmp) must not keep the server down
                log.warning("%s: cannot look for stale files: %s", tmp, error.strerror or error)
                continue
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_atime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed


def _listed_size(maildir: Path, key: str, relative: str) -> int | None:
    """The POP3 size of a message _scan found; None where it is gone, or
    must be read for its size and cannot be (logged: left out)."""
    try:
        return _pop3_size_of(key, os.path.join(maildir, relative))
    except FileNotFoundError:
        return None
    except OSError as error:  # another program's file, say, that shuts us out
        log.warning("%s: cannot read %s: %s; left out", maildir, relative, error.strerror or error)
        return None


def _pop3_size_of(key: str, path: str | Path) -> int:
    recorded = _name_fields(key).get("W", "")
    if is_decimal(recorded):
        return int(recorded)
    with open(path, "rb") as file:
        return pop3_size(file)


def make_maildir(path: Path) -> None:
    """Make whatever of ``path``/tmp, new, cur is missing; what was made is fsynced,
    so a message acknowledged into it stays findable after a power cut."""
    made = make_private_directory(path)
    for subdir in SUBDIRS:
        made = make_private_directory(path / subdir) or made
    if made:
        fsync_directory(path)
        fsync_directory(path.parent)


class IncomingMaildirMessage:
    """One message being written into ``tmp/`` as it arrives.

    Creating one checks every recipient's Maildir; the file in ``tmp/`` is
    made at the first ``write``, which SMTP puts off until its 354 is on the
    wire. ``write`` takes text with LF line ends, the Maildir convention
    (a CRLF is still counted as RETR will send it: as one line end).
    ``commit`` makes it durable in every recipient's ``new/`` (or none) and
    returns its queue id; ``discard`` throws it away. Both remove the
    ``tmp/`` file.
    """

    def __init__(self, store: MaildirStore, users: list[str]) -> None:
        if not users:
            raise ValueError("a message needs at least one recipient")
        self._name, self.queue_id = store.unique_name()
        self._maildirs = [store.maildir(user) for user in users]
        self._new_dirs = [maildir / "new" for maildir in self._maildirs]
        try:
            for maildir, new_dir in zip(self._maildirs, self._new_dirs):
                # user add makes the Maildir; one removed (or half removed) by
                # hand is made again here, at DATA. Looking at new/ costs one
                # stat, where making sure of all three cost three mkdir and
                # three stat calls, a tenth of a delivery's Python time.
                if not os.path.isdir(new_dir):
                    make_maildir(maildir)
        except OSError as error:
            raise storage_error(error, "opening a recipient's Maildir") from error
        self._tmp_path = self._maildirs[0] / "tmp" / self._name
        self.octets = 0
        self._line_ends = 0  # LFs in the text
        self._crlf_line_ends = 0  # those of them that already have a CR before them
        self._last_octet = b""
        self._file: BinaryIO | None = None

    def _tmp_file(self) -> BinaryIO:
        """The file in tmp/, made at the first call."""
        if self._file is None:
            try:
                self._file = self._create_in_tmp()
            except OSError as error:
                raise storage_error(error, "creating a file in tmp/") from error
        return self._file

    def _create_in_tmp(self) -> BinaryIO:
        try:
            return open(self._tmp_path, "xb", opener=private)
        except FileNotFoundError:  # new/ is there, tmp/ is not
            make_maildir(self._maildirs[0])
            return open(self._tmp_path, "xb", opener=private)

    def write(self, data: bytes) -> None:
        if not data:
            return
        file = self._tmp_file()
        try:
            file.write(data)
        except OSError as error:
            raise storage_error(error, "writing into tmp/") from error
        self.octets += len(data)
        self._line_ends += data.count(b"\n")
        if b"\r" in data or self._last_octet == b"\r":  # rare: SMTP's text comes with its CRLFs made LF
            self._crlf_line_ends += data.count(b"\r\n") + (self._last_octet == b"\r" and data.startswith(b"\n"))
        self._last_octet = data[-1:]

    @property
    def pop3_size(self) -> int:
        """What pop3_text will make of the text: each LF goes out as CRLF (a
        CRLF as it is), and a last line without a line end gets one."""
        unended = self._last_octet not in (b"", b"\n")
        return self.octets + self._line_ends - self._crlf_line_ends + (2 if unended else 0)

    def commit(self) -> str:
        file = self._tmp_file()
        try:
            file.flush()
            os.fsync(file.fileno())
        except OSError as error:
            self.discard()
            raise storage_error(error, "syncing the message to disk") from error
        final_name = f"{self._name},S={self.octets},W={self.pop3_size}"
        first, *others = [new_dir / final_name for new_dir in self._new_dirs]
        linked: list[Path] = []
        try:
            # Links for the other recipients, then the tmp/ file itself renamed
            # into the first one's new/: one directory operation fewer than a
            # last link and an unlink, and each one costs a journal write.
            for target in others:
                os.link(self._tmp_path, target)
                linked.append(target)
            if others:
                # The links raised the file's link count, which its inode
                # holds: without a journal, only the file's own fsync writes
                # it (new/'s writes the entries). Else, after a power cut,
                # deleting one recipient's copy could free the file under
                # the others'. (The objection to O_TMPFILE above, again.)
                os.fsync(file.fileno())
            # Closed before the rename: once the message is in new/, nothing
            # may fail that we cannot take back, or the client, told of a
            # failure, sends it again and it arrives twice.
            file.close()
            os.rename(self._tmp_path, first)
            linked.append(first)
            for new_dir in self._new_dirs:
                fsync_directory(new_dir)
        except BaseException as error:  # a failed step, or Ctrl-C in `pymailsrv deliver`
            for entry in linked:
                _take_back(entry)
            self.discard()
            if isinstance(error, OSError):
                raise storage_error(error, "linking the message into new/") from error
            raise
        return self.queue_id

    def discard(self) -> None:
        if self._file is not None:
            discard_file(self._file, self._tmp_path)


def _take_back(entry: Path) -> None:
    """Remove an entry a failed delivery made in new/, or in cur/, where a
    POP3 login may have moved it meanwhile (as ``<name>:2,`` and flags)."""
    try:
        entry.unlink()
        return
    except FileNotFoundError:
        pass
    cur = entry.parent.parent / "cur"
    try:
        names = os.listdir(cur)
    except FileNotFoundError:
        return
    for name in names:
        if _key_of(name) == entry.name:
            (cur / name).unlink(missing_ok=True)


class MaildirMaildrop:
    """A user's Maildir while one POP3 session holds its lock."""

    def __init__(self, path: Path, lock_fd: int, unique_name: Callable[[], tuple[str, str]]) -> None:
        self._path = path
        self._lock_fd: int | None = lock_fd
        self._unique_name = unique_name
        self._files: dict[str, str] = {}  # key -> "cur/<name>"
        # The keys the last rescan found (see _relocate); None: none since
        # the operation in hand began.
        self._rescanned: set[str] | None = None

    def snapshot(self) -> list[MessageInfo]:
        """Every message now present; new ones move to cur/ as the session has seen them.

        A file whose unique name (so its UIDL) an earlier one has gets a name
        of its own (``_rename_duplicate``). One file another program left
        that we cannot move or read must not keep the user from the rest of
        the mail: it stays in new/, or is left out of this session, with a
        warning in the log.
        """
        infos, uids = [], set()
        for key, relative in _scan(self._path):
            uid = uid_of(key)
            if uid in uids:
                relative = self._rename_duplicate(relative)
            elif relative.startswith("new/"):
                relative = self._move_to_cur(relative)
            if relative is None:
                continue
            renamed = _key_of(relative.split("/", 1)[1])  # the move to cur/ keeps the key
            if renamed != key:  # a duplicate, given a unique name of its own
                key, uid = renamed, uid_of(renamed)
            size = _listed_size(self._path, key, relative)
            if size is None:
                continue
            self._files[key] = relative
            uids.add(uid)
            infos.append(MessageInfo(key, size, uid, seen=SEEN_FLAG in relative.partition(INFO_SEPARATOR)[2]))
        return infos

    def _move_to_cur(self, relative: str) -> str | None:
        name = relative.split("/", 1)[1]
        moved = f"cur/{name}" if INFO_SEPARATOR in name else f"cur/{name}{INFO_SEPARATOR}"
        if os.path.lexists(self._path / moved):  # rename(2) would replace that message
            return self._rename_duplicate(relative)
        try:
            return self._rename(relative, moved)
        except OSError as error:  # e.g. a name with no room for ":2,", or cur/ read-only
            log.warning("%s: cannot move %s to cur/: %s; read from new/",
                        self._path, relative, error.strerror or error)
            return relative

    def _rename_duplicate(self, relative: str) -> str | None:
        """Give a file whose unique name another file has a new one, in cur/.

        The new name has no ``,S=,W=`` fields: its size is counted from the file.
        Unrenamed, it would be a second message with one UIDL (RFC 1939 §7: a
        unique-id "uniquely identifies a message within a maildrop"; only
        identical copies may share one), so if it cannot be renamed it is
        left out.
        """
        _, _, flags = relative.partition(INFO_SEPARATOR)
        try:
            moved = self._rename(relative, f"cur/{self._unique_name()[0]}{INFO_SEPARATOR}{flags}")
        except OSError as error:
            log.warning("%s: %s has the unique name of another message and cannot be renamed: %s; "
                        "left out of this session", self._path, relative, error.strerror or error)
            return None
        if moved is not None:
            log.warning("%s: %s has the unique name of another message: renamed to %s",
                        self._path, relative, moved)
        return moved

    def _rename(self, relative: str, moved: str) -> str | None:
        """``moved``, once renamed; None if the file is gone (OSError for any other failure)."""
        try:
            os.rename(self._path / relative, self._path / moved)
        except FileNotFoundError:  # taken away meanwhile by another program
            return None
        return moved

    def _relocate(self, key: str) -> bool:
        """Find a message another program (a mail reader) renamed to change its flags.

        One rescan per operation finds every message's place at once: a
        reader that flags one message often flags all of them, and a rescan
        for each made QUIT quadratic (32 s for 4,000 such messages).
        """
        if self._rescanned is None:
            self._rescanned = set()
            for found_key, relative in _scan(self._path):
                if found_key in self._files and found_key not in self._rescanned:
                    self._files[found_key] = relative
                    self._rescanned.add(found_key)
        return key in self._rescanned

    def _open(self, key: str) -> BinaryIO:
        self._rescanned = None  # this RETR's own look, should it need one
        for _attempt in range(2):
            try:
                # Unbuffered: pop3_text reads in large blocks of its own, and a
                # buffered file would cost two more system calls per message.
                return open(os.path.join(self._path, self._files[key]), "rb", buffering=0)
            except FileNotFoundError:
                if not self._relocate(key):
                    break
            except PermissionError as error:
                # Listed from its W= field, never opened till now.
                log.warning("%s: cannot read %s: %s", self._path, self._files[key], error.strerror)
                raise MessageUnreadable(key) from None
        raise MessageVanished(key)

    def text(self, key: str) -> Iterator[bytes]:
        file = self._open(key)  # opened now, so a vanished message fails before +OK

        def read() -> Iterator[bytes]:
            with file:
                yield from pop3_text(file)

        return read()

    def mark_seen(self, key: str) -> None:
        """Add the S flag, if the message is in cur/ (files in new/ have no flags).

        The flag is for other mail readers; POP3 has no flags, so failing to
        set it is logged, and RETR goes on.
        """
        relative = self._files[key]
        base, _, flags = relative.partition(INFO_SEPARATOR)
        if SEEN_FLAG in flags or not relative.startswith("cur/"):
            return
        seen = f"{base}{INFO_SEPARATOR}{''.join(sorted(flags + SEEN_FLAG))}"
        try:
            if self._rename(relative, seen) is None:
                return  # renamed or removed by someone else: nothing to mark
        except OSError as error:
            log.warning("%s: cannot mark %s seen: %s", self._path, relative, error.strerror or error)
            return
        self._files[key] = seen

    def expunge(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        self._rescanned = None  # one look for all of them, should any have moved
        failures = sum(not self._remove(key) for key in keys)
        # Durable removals, in each directory one was made in: a message
        # read from new/ (see snapshot) is removed from there.
        for subdir in sorted({self._files[key].split("/", 1)[0] for key in keys}):
            try:
                fsync_directory(self._path / subdir)
            except FileNotFoundError:
                pass  # removed with all it held (the Maildir deleted meanwhile): nothing to make durable
        return failures

    def _remove(self, key: str) -> bool:
        """Unlink one message; False only if it is still there afterwards."""
        for _attempt in range(2):
            try:
                os.unlink(self._path / self._files[key])
                return True
            except FileNotFoundError:
                if not self._relocate(key):
                    return True  # already gone, as the user wanted
            except OSError:
                return False
        return False  # moved again as we looked: it is still there, somewhere

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None
