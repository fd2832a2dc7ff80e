"""Shared fixtures: a temp data root, users, and a real server on 127.0.0.1.

Every server a test starts listens on 127.0.0.1 port 0 and is stopped when
the test ends, pass or fail. Clients are the standard library's own
(``poplib``, ``smtplib``) or raw sockets where a test needs exact bytes.
"""

from __future__ import annotations

import io
import poplib
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest

from pymailsrv.config import Settings, load_settings
from pymailsrv.maildir import MaildirStore
from pymailsrv.server import MailServer, trace_options
from pymailsrv.testing import CLOSED_LOOPBACK_PORT
from pymailsrv.trace import Tracer
from pymailsrv.users import UserStore

PASSWORD = "correct horse"
CLIENT_TIMEOUT = 10  # seconds: no test waits on a socket longer than this
START_TIMEOUT = 15  # seconds for a started process to say "listening"
MAX_LINES_BEFORE_LISTENING = 100  # what a starting server may log first (warnings)

# Hypothesis fails an example that takes over 200 ms by default: on a
# machine that stalls, that fails the test for the machine, not the code.
# Speed is measured by scripts/bench.py, not by tests.
hypothesis.settings.register_profile("pymailsrv", deadline=None)
hypothesis.settings.load_profile("pymailsrv")


def make_settings(root: Path, **overrides: object) -> Settings:
    """Settings for a test server: free ports, no login delay, then ``overrides``.

    ``overrides`` uses the TOML layout: ``pop3={"autologout": 1}``.
    """
    base = {"root": str(root), "host": "127.0.0.1", "pop3": {"port": 0, "failed_login_delay": 0},
            "smtp": {"port": 0}}
    relay = overrides.get("relay", {})
    if "smarthost" not in relay and "dns_server" not in relay:
        # Mail a test relays stays on this machine, unless the test routes it
        # itself: the delivery threads send it to a closed loopback port.
        base["relay"] = {"smarthost": CLOSED_LOOPBACK_PORT}
    for key, value in overrides.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return load_settings(read_files=False, overrides=base)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "mailboxes"
    path.mkdir()
    return path


@pytest.fixture
def users(root: Path) -> UserStore:
    return UserStore(root / ".pymailsrv")


@pytest.fixture
def store(root: Path) -> MaildirStore:
    return MaildirStore(root)


@pytest.fixture
def add_user(users: UserStore, store: MaildirStore):
    """add_user(name, password=PASSWORD, apop=False): an account with its Maildir."""

    def add(name: str, password: str = PASSWORD, apop: bool = False) -> str:
        users.add(name, password, apop=apop)
        store.create_maildir(name)
        return name

    return add


@pytest.fixture
def alice(add_user) -> str:
    """The account most tests use (the POP3 modules' own gives it an APOP secret)."""
    return add_user("alice")


@pytest.fixture
def bob(add_user) -> str:
    return add_user("bob")


@pytest.fixture
def start_server(root: Path):
    """start_server(**overrides) -> a running MailServer; all are stopped at teardown.

    One data root takes one server: a second one at once needs root=another.
    """
    started: list[MailServer] = []

    def start(**overrides: object) -> MailServer:
        server = MailServer(make_settings(overrides.pop("root", root), **overrides)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server) -> MailServer:
    return start_server()


@pytest.fixture
def pop3_address(server: MailServer) -> tuple[str, int]:
    return server.addresses["pop3"]


@pytest.fixture
def pop3(pop3_address) -> Iterator:
    """pop3() -> a connected poplib.POP3; all are closed at teardown."""
    clients: list[poplib.POP3] = []

    def connect(address: tuple[str, int] | None = None) -> poplib.POP3:
        client = poplib.POP3(*(address or pop3_address), timeout=CLIENT_TIMEOUT)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        try:
            client.close()
        except OSError:
            pass


@pytest.fixture
def traced(root):
    """traced(**overrides) -> (server, stream): a server whose trace goes to a StringIO."""
    servers = []

    def start(**overrides):
        settings = make_settings(root, **overrides)
        stream = io.StringIO()
        server = MailServer(settings, tracer=Tracer(trace_options(settings), stream)).start()
        servers.append(server)
        return server, stream

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    """No stray ./pymailsrv.toml or environment settings leak into a test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYMAILSRV_ROOT", raising=False)
    monkeypatch.delenv("PYMAILSRV_CONFIG", raising=False)


def wait_until(condition, seconds: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.01)


def wait_for_open(server: MailServer, count: int) -> None:
    """Wait until the server counts ``count`` open connections (sessions end in threads of their own)."""
    wait_until(lambda: server.context.connections.open == count, what=f"{count} connections open")


def start_process(root: Path, *args: str) -> subprocess.Popen:
    """``pymailsrv start`` as a child process on free ports; its stderr unbuffered, for select()."""
    return subprocess.Popen([sys.executable, "-m", "pymailsrv", "start", "--root", str(root), "--pop3-port", "0",
                             "--smtp-port", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=0)


def listening_line(process: subprocess.Popen, seen: list[bytes] | None = None) -> bytes:
    """The "listening ..." line, after whatever the server logs first (kept
    in ``seen``, if given), bounded in lines and time."""
    seen = [] if seen is None else seen
    deadline = time.monotonic() + START_TIMEOUT
    for _ in range(MAX_LINES_BEFORE_LISTENING):
        ready, _, _ = select.select([process.stderr], [], [], max(0.0, deadline - time.monotonic()))
        # Unbuffered, so select() sees every byte not yet read: a buffered
        # readline could hold the listening line (read along with a warning
        # logged just before it) while select() waits for more.
        line = process.stderr.readline() if ready else b""
        if not line:
            break
        seen.append(line)
        if line.startswith(b"listening "):
            return line
    pytest.fail(f"no listening line within {START_TIMEOUT} s: {b''.join(seen)!r}")


class RawClient:
    """A line-level client for tests that need the exact bytes on the wire."""

    def __init__(self, address: tuple[str, int], receive_buffer: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        if receive_buffer is not None:  # before connecting: it bounds the window offered
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(CLIENT_TIMEOUT)
        self.sock.connect(address)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line from the server, with its CRLF."""
        return self.file.readline()

    def command(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        return self.line()

    def multiline(self) -> list[bytes]:
        """Lines up to and including the terminating '.', CRLFs kept."""
        lines = []
        while True:
            line = self.line()
            if not line:
                raise ConnectionError("server closed mid-reply")
            lines.append(line)
            if line == b".\r\n":
                return lines

    def closed(self) -> bool:
        """True once the server has closed the connection."""
        return self.file.read() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw():
    """raw(address, receive_buffer=None) -> a RawClient; all are closed at teardown."""
    clients: list[RawClient] = []

    def connect(address: tuple[str, int], receive_buffer: int | None = None) -> RawClient:
        client = RawClient(address, receive_buffer)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()
