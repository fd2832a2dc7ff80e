"""Crash safety: kill -9 in the middle of a load loses nothing acknowledged.

The server runs as a real process (``python -m pymailsrv start``). Threads
deliver mail over SMTP and run POP3 sessions, some of which DELE and QUIT,
some of which DELE and drop the connection, and one per user that DELEs and
is still open when the server dies. We SIGKILL the server in mid-load,
restart it on the same root, and check the promises ``maildir.py`` makes:

* every message that got ``250`` is there exactly once, byte for byte;
* every file in ``new/`` and ``cur/`` is a whole message (tmp -> fsync -> link);
* a DELE counts only for a session whose QUIT was answered ``+OK`` (RFC
  1939 §6): every other marked message is still there;
* the crashed sessions' maildrop locks are gone (``flock`` dies with the
  process), and ``tmp/`` files older than 36 hours are removed at start.
"""

from __future__ import annotations

import os
import poplib
import random
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pymailsrv.maildir import MaildirStore
from pymailsrv.users import UserStore
from tests.conftest import CLIENT_TIMEOUT, PASSWORD

REPOSITORY = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening (?P<pairs>.*)")
TOKEN = re.compile(rb"^Message-ID: <(?P<token>[0-9a-z-]+)@crash\.test>$", re.MULTILINE)

SMTP_USERS = ("inbox1", "inbox2")
POP3_USERS = ("pop1", "pop2", "pop3")
SEEDED_PER_USER = 30
LOAD_SECONDS = 1.5


# --- a server process ----------------------------------------------------------------


class ServerProcess:
    """``python -m pymailsrv start`` on ``root``; its stderr goes to a file we read."""

    def __init__(self, root: Path, *arguments: str, log: Path | None = None, **popen: object) -> None:
        self.log = log or root.parent / f"server-{time.monotonic_ns()}.log"
        self._log_file = open(self.log, "wb")
        command = [sys.executable, "-m", "pymailsrv", "start", "--root", str(root),
                   "--pop3-port", "0", "--smtp-port", "0", *arguments]
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        env.pop("PYMAILSRV_CONFIG", None)
        # A process group of its own: kill() then reaches its workers too.
        self.process = subprocess.Popen(command, cwd=root.parent, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=self._log_file,
                                        start_new_session=True, **popen)
        self.addresses: dict[str, tuple[str, int]] = {}

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self, seconds: float = 15.0) -> "ServerProcess":
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            match = LISTENING.search(self.output())
            if match:
                for pair in match["pairs"].split():
                    name, _, address = pair.partition("=")
                    host, _, port = address.rpartition(":")
                    self.addresses[name] = (host, int(port))
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited ({self.process.returncode}):\n{self.output()}")
            time.sleep(0.02)
        raise AssertionError(f"the server did not start listening:\n{self.output()}")

    def wait_exit(self, seconds: float = 15.0) -> int:
        return self.process.wait(timeout=seconds)

    def kill(self) -> None:
        """SIGKILL the server and its worker processes at once, as a power cut would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()


@pytest.fixture
def processes():
    """processes(root, *arguments) -> a started ServerProcess; all are stopped at teardown."""
    started: list[ServerProcess] = []

    def start(root: Path, *arguments: str, **popen: object) -> ServerProcess:
        server = ServerProcess(root, *arguments, **popen)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --- messages that can be recognised whole ---------------------------------------------


def message_text(token: str) -> bytes:
    """A message of about 16 KB whose every line names its token; LF line ends."""
    lines = [f"From: load@crash.test", f"To: someone@localhost", f"Message-ID: <{token}@crash.test>",
             f"Subject: {token}", ""]
    lines += [f"{token} line {number:04d} " + "x" * 60 for number in range(200)]
    lines.append(f"END {token}")
    return ("\n".join(lines) + "\n").encode()


def wire_text(token: str) -> bytes:
    """The message as a client sends it: CRLF line ends (RFC 5321 §2.3.8)."""
    return message_text(token).replace(b"\n", b"\r\n")


def stored_token(data: bytes) -> str:
    """The token of a stored file, after checking that it holds its whole message."""
    match = TOKEN.search(data)
    assert match, f"no Message-ID in a stored file: {data[:200]!r}"
    token = match["token"].decode()
    assert data.endswith(message_text(token)), f"{token}: stored file is not the whole message"
    return token


def mailbox_tokens(root: Path, user: str) -> Counter:
    """How often each token is stored in ``user``'s new/ and cur/, checking every file."""
    found: Counter = Counter()
    for subdir in ("new", "cur"):
        for path in (root / user / subdir).iterdir():
            found[stored_token(path.read_bytes())] += 1
    return found


# --- the load ----------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the clients were told, so we know what must have survived."""

    acked: dict[str, list[str]] = field(default_factory=dict)  # token -> recipients, after 250
    committed: set[str] = set  # DELE'd in a session whose QUIT got +OK: must be gone
    uncertain: set[str] = set  # DELE'd, QUIT sent, no answer: gone or not
    marked_only: set[str] = set  # DELE'd in a session that never sent QUIT
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.committed, self.uncertain, self.marked_only = set(), set(), set()


def smtp_load(address: tuple[str, int], worker: int, ledger: Ledger, stop: threading.Event) -> None:
    rng = random.Random(worker)
    number = 0
    while not stop.is_set():
        number += 1
        token = f"smtp-{worker}-{number}"
        recipients = rng.sample(SMTP_USERS + POP3_USERS, rng.choice((1, 1, 2)))
        try:
            with smtplib.SMTP(*address, timeout=CLIENT_TIMEOUT) as client:
                client.sendmail("load@crash.test", [f"{user}@localhost" for user in recipients],
                                wire_text(token))
        except (OSError, smtplib.SMTPException):
            if stop.is_set():
                return
            continue  # refused or cut off: not acknowledged, so not promised
        with ledger.lock:
            ledger.acked[token] = recipients


def pop3_load(address: tuple[str, int], user: str, seeded: dict[str, str], ledger: Ledger,
              stop: threading.Event, hold: threading.Event) -> None:
    """Sessions on one maildrop: DELE some seeded messages, then QUIT or drop.

    Only seeded messages are marked (their UIDLs are known), so everything
    SMTP delivered stays, and the checks can tell the two apart. Once
    ``hold`` is set, the next session marks and then waits, open, for the kill.
    """
    rng = random.Random(user)
    while not stop.is_set():
        try:
            client = poplib.POP3(*address, timeout=CLIENT_TIMEOUT)
            client.user(user)
            client.pass_(PASSWORD)
        except (OSError, poplib.error_proto):
            if stop.is_set():
                return
            time.sleep(0.01)  # IN-USE while the previous session's end is seen
            continue
        try:
            _, listing, _ = client.uidl()
            candidates = [(int(number), seeded[uid.decode()]) for number, uid in
                          (entry.split() for entry in listing) if uid.decode() in seeded]
            marked = rng.sample(candidates, min(len(candidates), rng.randint(1, 3)))
            for number, _ in marked:
                client.dele(number)
            tokens = {token for _, token in marked}
            if hold.is_set():
                with ledger.lock:
                    ledger.marked_only |= tokens
                stop.wait()  # still open when the server is killed
                return
            if rng.random() < 0.5:
                with ledger.lock:
                    ledger.marked_only |= tokens
                client.close()  # dropped without QUIT: RFC 1939 §6, nothing deleted
                continue
            with ledger.lock:
                ledger.uncertain |= tokens
            client.quit()  # raises unless +OK
            with ledger.lock:
                ledger.uncertain -= tokens
                ledger.committed |= tokens
        except (OSError, poplib.error_proto):
            if stop.is_set():
                return
        finally:
            client.close()


# --- the test ----------------------------------------------------------------------------------


def seed(root: Path) -> dict[str, dict[str, str]]:
    """Users and their first messages; returns {pop3 user: {uidl: token}}."""
    users, store = UserStore(root / ".pymailsrv"), MaildirStore(root)
    seeded: dict[str, dict[str, str]] = {}
    for user in SMTP_USERS + POP3_USERS:
        users.add(user, PASSWORD)
        store.create_maildir(user)
    for user in POP3_USERS:
        for number in range(SEEDED_PER_USER):
            store.deliver(user, message_text(f"seed-{user}-{number}"))
        seeded[user] = {info.uid: stored_token(path.read_bytes()) for info, path in store.messages(user)}
    return seeded


@pytest.mark.parametrize("arguments", [(), ("--processes", "2")], ids=["one-process", "two-workers"])
def test_sigkill_mid_load_loses_nothing_acknowledged(tmp_path, processes, arguments):
    root = tmp_path / "root"
    root.mkdir()
    seeded = seed(root)
    server = processes(root, *arguments).wait_listening()
    ledger, stop, hold = Ledger(), threading.Event(), threading.Event()
    threads = [threading.Thread(target=smtp_load, args=(server.addresses["smtp"], worker, ledger, stop))
               for worker in range(4)]
    threads += [threading.Thread(target=pop3_load,
                                 args=(server.addresses["pop3"], user, seeded[user], ledger, stop, hold))
                for user in POP3_USERS]
    for thread in threads:
        thread.start()
    try:
        time.sleep(LOAD_SECONDS)
        hold.set()
        time.sleep(0.3)
        server.kill()  # SIGKILL: no handler, no cleanup, in the middle of everything
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=CLIENT_TIMEOUT + 5)
    assert not any(thread.is_alive() for thread in threads)
    assert len(ledger.acked) > 20, "the load delivered too little to prove anything"
    assert ledger.committed and ledger.marked_only, "the load never QUIT or never dropped a session"

    # Plant tmp/ leftovers: one 40 hours old (to go), one an hour old (to stay).
    stale, fresh = root / "inbox1" / "tmp" / "1.stale.host", root / "inbox1" / "tmp" / "2.fresh.host"
    for path, hours in ((stale, 40), (fresh, 1)):
        path.write_bytes(b"Subject: half a message\n")
        when = time.time() - hours * 3600
        os.utime(path, (when, when))

    restarted = processes(root, *arguments).wait_listening()

    # The maildir spec's 36 hours: the old tmp/ file went at start, the young one stays.
    assert not stale.exists() and fresh.exists()
    assert "removed 1 stale file from tmp/" in restarted.output()

    # Every file in new/ and cur/ is whole (stored_token checks), and every
    # acknowledged message is in each of its recipients' maildrops exactly once.
    tokens = {user: mailbox_tokens(root, user) for user in SMTP_USERS + POP3_USERS}
    for user, found in tokens.items():
        assert all(count == 1 for count in found.values()), f"{user}: a message stored twice"
    for token, recipients in ledger.acked.items():
        for user in recipients:
            assert tokens[user][token] == 1, f"{token} got 250 but is not in {user}'s maildrop"

    # RFC 1939 §6: only a QUIT answered +OK deletes; every other mark is undone.
    for user in POP3_USERS:
        for token in seeded[user].values():
            if token in ledger.committed:
                assert tokens[user][token] == 0, f"{token}: QUIT said +OK, yet it is still there"
            elif token not in ledger.uncertain:
                assert tokens[user][token] == 1, f"{token} deleted without a finished QUIT"

    # The locks of the sessions open at the kill died with the process.
    for user in POP3_USERS:
        client = poplib.POP3(*restarted.addresses["pop3"], timeout=CLIENT_TIMEOUT)
        client.user(user)
        assert client.pass_(PASSWORD).startswith(b"+OK")
        assert client.stat()[0] == sum(tokens[user].values())
        client.quit()

    # And the restarted server takes mail as before.
    with smtplib.SMTP(*restarted.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
        assert client.sendmail("load@crash.test", ["inbox1@localhost"], wire_text("after-restart")) == {}
    assert mailbox_tokens(root, "inbox1")["after-restart"] == 1
