"""A full disk and failing I/O: refuse for now, leave nothing half done, carry on.

Two ways to make storage fail, both under real SMTP and POP3 sessions:

* A 1 MB tmpfs mounted for the test (root only; skipped where mount is not
  allowed) and filled up: the kernel itself says ENOSPC. SMTP answers
  ``452 4.3.1`` (RFC 3463 X.3.1, "mail system full"), nothing is left in
  ``tmp/`` or ``new/``, POP3 goes on working (it only reads, renames and
  unlinks, which need no space) and frees space, and once there is room
  again mail is taken as before.
* A failing file object put in at the storage boundary (``MaildirStore``),
  for the errors a tmpfs will not produce on demand: EIO on write or on
  fsync (``451 4.3.0``), and a maildrop that cannot be opened or read
  (``-ERR [SYS/TEMP]``, RFC 3206 §4).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import poplib
import smtplib
import subprocess
from pathlib import Path

import pytest

from pymailsrv.maildir import MaildirStore
from pymailsrv.server import MailServer
from pymailsrv.users import UserStore
from tests.conftest import CLIENT_TIMEOUT, PASSWORD, RawClient, make_settings

R452 = b"452 4.3.1 insufficient system storage\r\n"
R451 = b"451 4.3.0 local error in processing, try again later\r\n"
SYS_TEMP = b"-ERR [SYS/TEMP] temporary storage failure, try again later\r\n"
MESSAGE = b"Subject: test\r\n\r\n" + b"".join(b"line %04d of a message that needs some room\r\n" % n
                                              for n in range(400))


# --- helpers --------------------------------------------------------------------------


def make_user(root: Path, name: str = "alice") -> None:
    UserStore(root / ".pymailsrv").add(name, PASSWORD)
    MaildirStore(root).create_maildir(name)


def files(root: Path, user: str = "alice") -> dict[str, list[str]]:
    return {subdir: sorted(os.listdir(root / user / subdir)) for subdir in ("tmp", "new", "cur")}


def smtp_transaction(address: tuple[str, int], text: bytes = MESSAGE) -> bytes:
    """EHLO, MAIL, RCPT alice, DATA and the text; returns the reply to the final dot."""
    client = RawClient(address)
    try:
        client.line()
        client.send(b"EHLO client.example\r\n")
        while not client.line().startswith(b"250 "):
            pass
        assert client.command("MAIL FROM:<sender@example.org>").startswith(b"250 ")
        assert client.command("RCPT TO:<alice@localhost>").startswith(b"250 ")
        reply = client.command("DATA")  # storage may already fail here (a recipient's Maildir)
        if reply.startswith(b"354 "):
            client.send(text + b".\r\n")
            reply = client.line()
        assert client.command("NOOP") == b"250 2.0.0 OK\r\n"  # the session is still in step
        return reply
    finally:
        client.close()


def fill(path: Path) -> None:
    """Write ``path`` until the file system has no room left."""
    with open(path, "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 65536)
        except OSError as error:
            assert error.errno == errno.ENOSPC


@pytest.fixture
def tiny_root(tmp_path: Path):
    """A data root on a 1 MB tmpfs of its own; unmounted at teardown, pass or fail."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mountpoint)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.fixture
def servers():
    """servers(settings, store=None) -> a started MailServer; all stopped at teardown."""
    started: list[MailServer] = []

    def start(settings, store: MaildirStore | None = None) -> MailServer:
        server = MailServer(settings)
        if store is not None:  # the storage boundary: what the sessions write through
            server.context = dataclasses.replace(server.context, store=store)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


# --- a real full disk -------------------------------------------------------------------

# On a full disk, close() retries the write that failed and raises again:
# discard_file (durable.py) must remove the tmp/ file all the same, and the
# client must get its 452, not a dropped connection.


def test_full_disk_gets_452_and_leaves_nothing(tiny_root, servers):
    make_user(tiny_root)
    server = servers(make_settings(tiny_root))
    assert smtp_transaction(server.addresses["smtp"]).startswith(b"250 ")  # room for one
    fill(tiny_root / "filler")
    assert smtp_transaction(server.addresses["smtp"]) == R452
    assert smtp_transaction(server.addresses["smtp"]) == R452  # and again: nothing stuck
    assert files(tiny_root)["tmp"] == [] and len(files(tiny_root)["new"]) == 1


def test_full_disk_leaves_pop3_working_and_mail_flows_once_space_is_back(tiny_root, servers):
    make_user(tiny_root)
    server = servers(make_settings(tiny_root))
    smtp, pop3 = server.addresses["smtp"], server.addresses["pop3"]
    assert smtp_transaction(smtp).startswith(b"250 ")
    filler = tiny_root / "filler"
    fill(filler)
    assert smtp_transaction(smtp) == R452  # never a 250 for what is not on disk
    assert len(files(tiny_root)["new"]) == 1

    # POP3 needs no room to read and delete, so a user can make some.
    client = poplib.POP3(*pop3, timeout=CLIENT_TIMEOUT)
    client.user("alice")
    client.pass_(PASSWORD)
    assert client.retr(1)[1][-1] == b"line 0399 of a message that needs some room"
    client.dele(1)
    assert client.quit().startswith(b"+OK")
    assert files(tiny_root)["new"] == [] and files(tiny_root)["cur"] == []

    filler.unlink()
    assert smtp_transaction(smtp).startswith(b"250 ")
    assert len(files(tiny_root)["new"]) == 1


# --- failures injected at the storage boundary --------------------------------------------


class FailingFile:
    """A tmp/ file whose writes (past ``store.fail_after`` octets) or fsync fail
    with ``store.errno`` while ``store.failing`` says so."""

    def __init__(self, real, store: "FailingStore") -> None:
        self._real = real
        self._store = store
        self._written = 0

    def _check(self, when: str) -> None:
        if self._store.failing == when:
            raise OSError(self._store.errno, os.strerror(self._store.errno))

    def write(self, data: bytes) -> int:
        self._written += len(data)
        if self._written > self._store.fail_after:
            self._check("write")
        return self._real.write(data)

    def flush(self) -> None:
        self._check("sync")
        self._real.flush()

    def fileno(self) -> int:
        return self._real.fileno()

    def close(self) -> None:
        self._real.close()

    @property
    def closed(self) -> bool:
        return self._real.closed


class FailingStore(MaildirStore):
    """A MaildirStore whose message files fail as told, and maildrops too."""

    failing: str | None = None  # "create", "write", "sync", "maildrop", "read" or None
    errno: int = errno.EIO
    fail_after = 0  # octets written before writes fail: 0 fails the trace header

    def receive(self, users):
        incoming = super().receive(users)
        create = incoming._create_in_tmp

        def create_failing() -> FailingFile:
            if self.failing == "create":
                raise OSError(self.errno, os.strerror(self.errno))
            return FailingFile(create(), self)

        incoming._create_in_tmp = create_failing
        return incoming

    def open_maildrop(self, user):
        if self.failing == "maildrop":
            raise OSError(self.errno, os.strerror(self.errno))
        maildrop = super().open_maildrop(user)
        if self.failing == "read":
            def text(key):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            maildrop.text = text
        return maildrop


@pytest.mark.parametrize("when, fail_after, error, reply", [
    # The file in tmp/ is made as 354 goes out; if it cannot be, the text
    # is read to its end and refused then.
    ("create", 0, errno.ENOSPC, R452),
    ("create", 0, errno.EACCES, R451),
    ("write", 0, errno.ENOSPC, R452),  # the trace header, written as 354 goes out: 452 after the dot
    ("write", 4096, errno.ENOSPC, R452),  # in the middle of the text: 452 after the dot
    ("write", 4096, errno.EDQUOT, R452),  # over quota is full too (RFC 3463 X.3.1)
    ("write", 4096, errno.EIO, R451),
    ("sync", 0, errno.EIO, R451),  # the fsync before the 250 fails: no 250
    ("sync", 0, errno.ENOSPC, R452),
])
def test_failed_write_or_sync_is_refused_and_nothing_is_left(root, add_user, servers, caplog, when, fail_after,
                                                             error, reply):
    add_user("alice")
    store = FailingStore(root)
    server = servers(make_settings(root), store)
    store.failing, store.fail_after, store.errno = when, fail_after, error
    with caplog.at_level(logging.ERROR, logger="pymailsrv.smtp"):
        assert smtp_transaction(server.addresses["smtp"]) == reply
    # The client is told only 451 or 452: why is in the log, every time.
    [logged] = [record.getMessage() for record in caplog.records if record.name == "pymailsrv.smtp"]
    assert "delivery failed: " in logged and os.strerror(error) in logged
    assert files(root) == {"tmp": [], "new": [], "cur": []}
    store.failing = None  # the disk is back
    assert smtp_transaction(server.addresses["smtp"]).startswith(b"250 ")
    assert len(files(root)["new"]) == 1


def test_a_maildir_broken_by_hand_refuses_data_and_the_log_says_why(root, add_user, servers, caplog):
    # new/ is a file: no room can be made for the message, so DATA itself
    # is refused. The admin used to learn of it only from the senders.
    add_user("alice")
    (root / "alice" / "new").rmdir()
    (root / "alice" / "new").write_bytes(b"")
    server = servers(make_settings(root))
    with caplog.at_level(logging.ERROR, logger="pymailsrv.smtp"):
        assert smtp_transaction(server.addresses["smtp"]) == R451
    [logged] = [record.getMessage() for record in caplog.records if record.name == "pymailsrv.smtp"]
    assert "delivery failed: " in logged and "alice/new" in logged


def test_pop3_answers_sys_temp_when_the_maildrop_fails_and_recovers(root, add_user, servers):
    add_user("alice")
    store = FailingStore(root)
    store.deliver("alice", b"Subject: hi\n\nhello\n")
    server = servers(make_settings(root), store)
    pop3 = server.addresses["pop3"]

    store.failing = "maildrop"
    client = RawClient(pop3)
    client.line()
    client.command("USER alice")
    assert client.command(f"PASS {PASSWORD}") == SYS_TEMP
    client.close()

    store.failing = "read"
    client = RawClient(pop3)
    client.line()
    client.command("USER alice")
    assert client.command(f"PASS {PASSWORD}").startswith(b"+OK")  # the failed login kept no lock
    assert client.command("RETR 1") == SYS_TEMP
    assert client.command("QUIT").startswith(b"+OK")
    client.close()

    store.failing = None
    assert smtp_transaction(server.addresses["smtp"]).startswith(b"250 ")
    client = poplib.POP3(*pop3, timeout=CLIENT_TIMEOUT)
    client.user("alice")
    client.pass_(PASSWORD)
    assert client.stat()[0] == 2
    client.quit()
