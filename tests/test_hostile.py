"""Hostile input: every reply is the protocol's own, and everyone else is still served.

Each test sends something a careless or malicious client would, over a real
socket, and checks the exact reply, that the session is still usable (or
closed on purpose), and that another client is served normally meanwhile:

* binary garbage and NUL octets; invalid UTF-8 in every argument;
* lines far past the limits (a 100 MB command line, 1 MB lines inside DATA):
  the transport reads such a line through to its LF holding at most the
  limit in memory, so the session answers ``500 5.5.2`` / ``-ERR`` and stays
  in step; the server's peak memory is measured in a process of its own;
* a line that never ends (slow-loris): dropped at the timeout;
* 10 000 pipelined commands: all answered, in order;
* addresses over the RFC 5321 §4.5.3.1 limits, ``%``/``!``/source routes
  (never relayed), a deeply nested MIME message (never parsed, so cheap);
* user names made to escape the data root or to pass for another user.

The last section is property tests (``hypothesis``): whatever lines reach a
POP3 or SMTP session, it answers with a well-formed Reply and logs no error.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import re
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymailsrv.auth import FailureThrottle
from pymailsrv.pop3 import Pop3Session
from pymailsrv.replies import Pop3Reply, Reply, SmtpReply
from pymailsrv.server import MailServer
from pymailsrv.smtp import SmtpSession
from pymailsrv.trace import Tracer
from pymailsrv.transport import Connection
from pymailsrv.users import UserStore
from tests.conftest import CLIENT_TIMEOUT, PASSWORD, RawClient, make_settings
from tests.test_crash import ServerProcess

MB = 1024 * 1024
R250_OK = b"250 2.0.0 OK\r\n"
R500_LINE_TOO_LONG = b"500 5.5.2 line too long\r\n"
R500_UNKNOWN = b"500 5.5.2 command not recognized\r\n"
R500_TEXT_LINE = b"500 5.5.2 message has a line longer than 1000 octets\r\n"
POP3_UNKNOWN = b"-ERR unknown command\r\n"
POP3_LINE_TOO_LONG = b"-ERR command line too long\r\n"
POP3_AUTH_FAILED = b"-ERR [AUTH] invalid user name or password\r\n"


# --- helpers -----------------------------------------------------------------------------


def reply_of(client: RawClient) -> bytes:
    """One whole SMTP reply; the last line of a multi-line one."""
    while True:
        line = client.line()
        if line[3:4] != b"-":
            return line


def smtp_send(client: RawClient, line: bytes) -> bytes:
    client.send(line + b"\r\n")
    return reply_of(client)


def pop3_send(client: RawClient, line: bytes) -> bytes:
    client.send(line + b"\r\n")
    return client.line()


@pytest.fixture
def alice(add_user) -> str:
    return add_user("alice", apop=True)


@pytest.fixture
def smtp_client(raw, server):
    """smtp_client(*lines) -> a RawClient past its greeting, after EHLO and the lines (each 250)."""

    def connect(*lines: bytes) -> RawClient:
        client = raw(server.addresses["smtp"])
        assert client.line().startswith(b"220 ")
        for line in (b"EHLO client.example", *lines):
            assert smtp_send(client, line).startswith(b"250 "), line
        return client

    return connect


@pytest.fixture
def pop3_client(raw, server):
    """pop3_client(login=False) -> a RawClient past the greeting, logged in as alice if asked."""

    def connect(login: bool = False) -> RawClient:
        client = raw(server.addresses["pop3"])
        assert client.line().startswith(b"+OK ")
        if login:
            assert pop3_send(client, b"USER alice") == b"+OK send PASS\r\n"
            assert pop3_send(client, f"PASS {PASSWORD}".encode()).startswith(b"+OK alice's maildrop")
        return client

    return connect


def served_normally(server) -> None:
    """Another client gets a whole SMTP transaction done, with its 250."""
    with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
        assert client.sendmail("someone@example.org", ["alice@localhost"], b"Subject: fine\r\n\r\nfine\r\n") == {}


def stored(root: Path, user: str = "alice") -> list[bytes]:
    return [path.read_bytes() for subdir in ("new", "cur") for path in sorted((root / user / subdir).iterdir())]


def send_long_line(client: RawClient, octets: int, prefix: bytes = b"NOOP ") -> None:
    """``prefix`` and ``octets`` octets of 'x', then CRLF, streamed in 1 MB chunks."""
    chunk = b"x" * MB
    client.send(prefix)
    for _ in range(octets // MB):
        client.send(chunk)
    client.send(b"x" * (octets % MB) + b"\r\n")


# --- garbage and NUL octets ------------------------------------------------------------------


@pytest.mark.parametrize("line", [bytes(range(256)).replace(b"\n", b""), b"\x00" * 100, b"NOOP\x00",
                                  b"\x00NOOP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
                                  b"GET / HTTP/1.1"],
                         ids=["every-octet", "nuls", "nul-after-verb", "nul-before-verb", "tls-hello", "http"])
def test_smtp_garbage_is_an_unknown_command(smtp_client, server, alice, line):
    client = smtp_client()
    assert smtp_send(client, line) == R500_UNKNOWN
    assert smtp_send(client, b"NOOP") == R250_OK
    served_normally(server)


def test_smtp_nul_inside_an_address_is_a_syntax_error(smtp_client, server, alice):
    client = smtp_client(b"MAIL FROM:<a@example.org>")
    assert smtp_send(client, b"RCPT TO:<ali\x00ce@localhost>") == \
        b"501 5.1.3 bad address syntax: bad local part 'ali\\x00ce'\r\n"
    assert smtp_send(client, b"RCPT TO:<alice@local\x00host>") == \
        b"501 5.1.3 bad address syntax: bad domain 'local\\x00host'\r\n"
    assert smtp_send(client, b"RCPT TO:<alice@localhost>").startswith(b"250 ")


@pytest.mark.parametrize("line", [bytes(range(250)).replace(b"\n", b""), b"\x00" * 100, b"STAT\x00"],
                         ids=["every-octet", "nuls", "nul-after-verb"])
def test_pop3_garbage_is_an_unknown_command(pop3_client, server, alice, line):
    client = pop3_client()
    assert pop3_send(client, line) == POP3_UNKNOWN
    assert pop3_send(client, b"CAPA") == b"+OK capability list follows\r\n"
    served_normally(server)


# --- lines far past the limit ------------------------------------------------------------------


def test_smtp_100_mb_command_line_is_refused_and_the_session_goes_on(smtp_client, server, alice):
    client = smtp_client()
    send_long_line(client, 100 * MB)
    assert reply_of(client) == R500_LINE_TOO_LONG
    assert smtp_send(client, b"NOOP") == R250_OK
    served_normally(server)


def test_pop3_100_mb_command_line_is_refused_and_the_session_goes_on(pop3_client, server, alice):
    client = pop3_client(login=True)
    send_long_line(client, 100 * MB, prefix=b"LIST ")
    assert client.line() == POP3_LINE_TOO_LONG
    assert pop3_send(client, b"STAT") == b"+OK 0 0\r\n"


def test_one_mb_header_line_in_data_is_refused_after_the_end(smtp_client, server, alice, root):
    client = smtp_client(b"MAIL FROM:<a@example.org>", b"RCPT TO:<alice@localhost>")
    assert smtp_send(client, b"DATA").startswith(b"354 ")
    client.send(b"Subject: big\r\nX-Big: ")
    send_long_line(client, MB, prefix=b"")
    client.send(b"\r\nbody\r\n.\r\n")
    # RFC 5321 §4.5.3.1.6: 1000 octets a text line; refused only at the end,
    # so the client and the server stay in step.
    assert reply_of(client) == R500_TEXT_LINE
    assert stored(root) == [] and list((root / "alice" / "tmp").iterdir()) == []
    assert smtp_send(client, b"MAIL FROM:<a@example.org>").startswith(b"250 ")
    served_normally(server)


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """A server in a process of its own, for what only a process can show (its memory)."""
    root = tmp_path_factory.mktemp("process") / "root"
    root.mkdir()
    UserStore(root / ".pymailsrv").add("alice", PASSWORD)
    process = ServerProcess(root).wait_listening()
    yield process
    process.stop()


def peak_memory_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)[1])


def test_memory_stays_bounded_under_huge_lines(server_process):
    before = peak_memory_kb(server_process.pid)
    smtp = RawClient(server_process.addresses["smtp"])
    pop3 = RawClient(server_process.addresses["pop3"])
    try:
        smtp.line(), pop3.line()
        send_long_line(smtp, 100 * MB)
        assert reply_of(smtp) == R500_LINE_TOO_LONG
        send_long_line(pop3, 100 * MB, prefix=b"USER ")
        assert pop3.line() == POP3_LINE_TOO_LONG
        for line in (b"EHLO client.example", b"MAIL FROM:<a@example.org>", b"RCPT TO:<alice@localhost>"):
            assert smtp_send(smtp, line).startswith(b"250 ")
        assert smtp_send(smtp, b"DATA").startswith(b"354 ")
        for _ in range(50):  # 50 header lines of 1 MB each
            send_long_line(smtp, MB, prefix=b"X-Big: ")
        smtp.send(b"\r\nbody\r\n.\r\n")
        assert reply_of(smtp) == R500_TEXT_LINE
    finally:
        smtp.close()
        pop3.close()
    # 250 MB went in; the server held one line's limit of it at a time.
    assert peak_memory_kb(server_process.pid) - before < 16 * 1024


# --- a line that never ends: slow-loris ---------------------------------------------------------


def test_smtp_line_without_newline_is_dropped_at_the_timeout(start_server, raw, alice):
    server = start_server(smtp={"command_timeout": 1})
    loris = raw(server.addresses["smtp"])
    assert loris.line().startswith(b"220 ")
    loris.send(b"EHLO never-ends")  # no CRLF, then silence
    started = time.monotonic()
    served_normally(server)  # meanwhile, others are served
    assert loris.line() == f"421 4.4.2 {server.settings.hostname} error: timeout exceeded\r\n".encode()
    assert loris.closed()
    assert time.monotonic() - started < 5


def test_pop3_line_without_newline_is_dropped_at_autologout(start_server, raw, alice):
    server = start_server(pop3={"autologout": 1})
    loris = raw(server.addresses["pop3"])
    assert loris.line().startswith(b"+OK ")
    loris.send(b"USER al")
    started = time.monotonic()
    served_normally(server)
    other = raw(server.addresses["pop3"])
    assert other.line().startswith(b"+OK ")
    assert pop3_send(other, b"CAPA") == b"+OK capability list follows\r\n"
    assert loris.line() == b"-ERR autologout: idle for too long\r\n"
    assert loris.closed()
    assert time.monotonic() - started < 5


def test_a_line_sent_slowly_leaves_its_reply_the_whole_timeout(start_server, raw, alice, store):
    # A line that came in pieces near its deadline shortened the socket's
    # timeout to what was left of it, and the reply went out under that: a
    # big RETR to a client slow to read it was cut off.
    lines = 120_000  # 8.5 MB
    store.deliver("alice", b"Subject: big\n\n" + (b"x" * 70 + b"\n") * lines)
    server = start_server(pop3={"autologout": 3})
    client = raw(server.addresses["pop3"], receive_buffer=64 * 1024)  # what the server's buffers cannot hold waits
    assert client.line().startswith(b"+OK ")
    client.command("USER alice")
    assert client.command(f"PASS {PASSWORD}").startswith(b"+OK ")
    client.send(b"RETR")
    time.sleep(2.5)
    client.send(b" 1")  # the server reads on with half a second of the line's time left
    time.sleep(0.2)
    client.send(b"\r\n")
    time.sleep(1.5)  # and we are slow to read: the server waits on full buffers
    assert client.line().startswith(b"+OK ")
    assert len(client.multiline()) == 2 + lines + 1  # the header, the blank line, the body, the dot
    assert client.command("QUIT").startswith(b"+OK ")


# --- 10 000 pipelined commands -----------------------------------------------------------------


def pipeline(client: RawClient, command: bytes, count: int) -> list[bytes]:
    """Send ``count`` commands at once from one thread, read the replies in another."""
    sender = threading.Thread(target=client.send, args=(command * count,))
    sender.start()
    replies = [client.line() for _ in range(count)]
    sender.join()
    return replies


def test_smtp_10000_pipelined_noops_are_all_answered_in_order(smtp_client, alice):
    client = smtp_client()
    started = time.monotonic()
    assert pipeline(client, b"NOOP\r\n", 10_000) == [R250_OK] * 10_000
    assert smtp_send(client, b"QUIT").startswith(b"221 ")
    assert time.monotonic() - started < 10


def test_pop3_10000_pipelined_noops_are_all_answered_in_order(pop3_client, alice):
    client = pop3_client(login=True)
    started = time.monotonic()
    assert pipeline(client, b"NOOP\r\n", 10_000) == [b"+OK\r\n"] * 10_000
    assert pop3_send(client, b"QUIT").startswith(b"+OK ")
    assert time.monotonic() - started < 10


# --- invalid UTF-8 in every argument -----------------------------------------------------------


@pytest.mark.parametrize("state, line, reply", [
    ((), b"EHLO \xff\xfe", b"501 5.5.4 syntax: EHLO domain\r\n"),
    ((), b"HELO \xc3\x28", b"501 5.5.4 syntax: HELO domain\r\n"),
    ((), b"VRFY \xff", b"252 2.5.0 cannot VRFY user, but will accept message and attempt delivery\r\n"),
    ((), b"EXPN \xff", b"502 5.5.1 EXPN not implemented\r\n"),
    ((), b"HELP \xff", b"214 2.0.0 QUIT  (RFC 5321 section 4.1.1.10)\r\n"),  # the whole list
    ((), b"NOOP \xff", R250_OK),
    ((), b"AUTH \xff", b"504 5.5.4 unrecognized authentication type\r\n"),
    ((), b"AUTH PLAIN \xff", b"501 5.5.2 cannot decode the response\r\n"),
    ((), b"MAIL FROM:<\xff@example.org>", b"501 5.1.7 bad address syntax: bad local part '\\udcff'\r\n"),
    ((), b"MAIL FROM:<a@ex\xffample.org>", b"501 5.1.7 bad address syntax: bad domain 'ex\\udcffample.org'\r\n"),
    ((), b"MAIL FROM:<a@example.org> SIZE=\xff",
     b"501 5.5.4 bad parameter syntax: bad value in parameter 'SIZE=\\udcff'\r\n"),
    ((), b"MAIL FROM:<a@example.org> \xff", b"501 5.5.4 bad parameter syntax: bad parameter '\\udcff'\r\n"),
    ((), b"MAIL \xff", b"501 5.5.4 syntax: MAIL FROM:<reverse-path> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]\r\n"),
    ((b"MAIL FROM:<a@example.org>",), b"RCPT TO:<\xff@localhost>",
     b"501 5.1.3 bad address syntax: bad local part '\\udcff'\r\n"),
    ((b"MAIL FROM:<a@example.org> SMTPUTF8",), b"RCPT TO:<al\xe9ice@localhost>",
     b"501 5.1.3 bad address syntax: bad local part 'al\\udce9ice'\r\n"),
    ((b"MAIL FROM:<a@example.org>",), b"RCPT TO:<alice@localhost> \xff=1",
     b"501 5.5.4 bad parameter syntax: bad parameter '\\udcff=1'\r\n"),
])
def test_smtp_invalid_utf8_in_an_argument_gets_the_protocols_reply(smtp_client, alice, state, line, reply):
    client = smtp_client(*state)
    assert smtp_send(client, line) == reply
    assert smtp_send(client, b"NOOP") == R250_OK


@pytest.mark.parametrize("login, lines, reply", [
    (False, [b"USER \xff", f"PASS {PASSWORD}".encode()], POP3_AUTH_FAILED),
    (False, [b"USER alice", b"PASS \xff\xfe"], POP3_AUTH_FAILED),
    (False, [b"APOP \xff 0123456789abcdef0123456789abcdef"], POP3_AUTH_FAILED),
    (False, [b"APOP alice \xff"], POP3_AUTH_FAILED),
    (False, [b"AUTH \xff"], b"-ERR unsupported SASL mechanism\r\n"),
    (False, [b"AUTH PLAIN \xff"], b"-ERR malformed SASL response\r\n"),
    (True, [b"RETR \xff"], b"-ERR syntax: RETR msg\r\n"),
    (True, [b"TOP \xff 1"], b"-ERR syntax: TOP msg n\r\n"),
    (True, [b"LIST \xd9\xa1"], b"-ERR syntax: LIST [msg]\r\n"),  # invalid UTF-8 that looks Arabic-Indic
    (True, [b"UIDL \xff"], b"-ERR syntax: UIDL [msg]\r\n"),
    (True, [b"DELE \xff"], b"-ERR syntax: DELE msg\r\n"),
    (True, [b"NOOP \xff"], b"-ERR syntax: NOOP\r\n"),
])
def test_pop3_invalid_utf8_in_an_argument_gets_the_protocols_reply(pop3_client, alice, login, lines, reply):
    client = pop3_client(login=login)
    for line in lines[:-1]:
        assert pop3_send(client, line).startswith(b"+OK")
    assert pop3_send(client, lines[-1]) == reply
    assert pop3_send(client, b"CAPA") == b"+OK capability list follows\r\n"


# --- over-long addresses, %, ! and source routes --------------------------------------------------


@pytest.mark.parametrize("verb, address, detail", [
    ("RCPT TO", "a" * 65 + "@localhost", "the local part is longer than 64 octets"),
    ("MAIL FROM", "a" * 65 + "@example.org", "the local part is longer than 64 octets"),
    ("RCPT TO", "a@" + "b" * 252 + ".com", "the path is longer than 256 octets"),  # domain 256
    ("RCPT TO", "a" * 64 + "@" + ("b" * 62 + ".") * 3 + "example", "the path is longer than 256 octets"),
])
def test_over_long_address_is_refused_with_501(smtp_client, alice, verb, address, detail):
    client = smtp_client(*([b"MAIL FROM:<a@example.org>"] if verb == "RCPT TO" else []))
    code = "5.1.3" if verb == "RCPT TO" else "5.1.7"  # RFC 3463 §3.2
    assert smtp_send(client, f"{verb}:<{address}>".encode()) == \
        f"501 {code} bad address syntax: {detail}\r\n".encode()


@pytest.mark.parametrize("address, reply", [
    # % and ! are plain characters of a local part: never a route, never a user.
    ("bob%other.example@localhost", b"550 5.1.1 <bob%other.example@localhost>: recipient address rejected: "
                                    b"user unknown\r\n"),
    ("other.example!bob@localhost", b"550 5.1.1 <other.example!bob@localhost>: recipient address rejected: "
                                    b"user unknown\r\n"),
    ("alice%localhost@localhost", b"550 5.1.1 <alice%localhost@localhost>: recipient address rejected: "
                                  b"user unknown\r\n"),
    # RFC 5321 §4.1.1.3 / Appendix C: the route is ignored, the mailbox decides.
    ("@localhost:bob@other.example", b"550 5.7.1 <bob@other.example>: relay access denied\r\n"),
    ("@a.example,@b.example:bob@other.example", b"550 5.7.1 <bob@other.example>: relay access denied\r\n"),
    ("bob%other.example", b"501 5.1.3 bad address syntax: expected local-part@domain\r\n"),
    ("bob@other.example@localhost", b"501 5.1.3 bad address syntax: bad local part 'bob@other.example'\r\n"),
])
def test_percent_bang_and_source_routes_are_never_relayed(smtp_client, alice, root, address, reply):
    client = smtp_client(b"MAIL FROM:<a@example.org>")
    assert smtp_send(client, f"RCPT TO:<{address}>".encode()) == reply
    assert smtp_send(client, b"DATA") == b"554 5.5.1 no valid recipients\r\n"
    assert stored(root) == []


def test_source_route_to_a_local_mailbox_delivers_locally(smtp_client, alice, root):
    client = smtp_client(b"MAIL FROM:<a@example.org>", b"RCPT TO:<@relay.example:alice@localhost>")
    assert smtp_send(client, b"DATA").startswith(b"354 ")
    assert smtp_send(client, b"Subject: routed\r\n\r\nhi\r\n.").startswith(b"250 ")
    assert len(stored(root)) == 1


# --- a MIME bomb ---------------------------------------------------------------------------------------


def mime_bomb(depth: int) -> bytes:
    """A multipart nested ``depth`` deep: a parser that recurses would fall over."""
    head = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=\"b%d\"\r\n\r\n" % (level, level + 1)
                    for level in range(depth))
    tail = b"".join(b"--b%d--\r\n" % level for level in reversed(range(depth + 1)))
    return (b"Subject: nested\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b0\"\r\n\r\n"
            + head + b"--b%d\r\nContent-Type: text/plain\r\n\r\nbottom\r\n" % depth + tail)


def test_deeply_nested_mime_is_stored_whole_and_cheaply(server, alice, root):
    bomb = mime_bomb(20_000)  # about 1.3 MB of nesting
    started = time.monotonic()
    with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
        assert client.sendmail("a@example.org", ["alice@localhost"], bomb) == {}
    assert time.monotonic() - started < 5
    (message,) = stored(root)
    assert message.endswith(bomb.replace(b"\r\n", b"\n"))


# --- user names that would escape the root or pass for someone else ---------------------------------

HOSTILE_NAMES = ["..", "../alice", "alice/../bob", "/etc/passwd", "a/b", "..\\alice", "al\\ice", "al\x00ice",
                 ".pymailsrv", "\u0430lice",  # Cyrillic a
                 "\u212alice",  # KELVIN SIGN, which str.lower() turns into "k"
                 "ａlice",  # full-width a
                 "alice\u200b"]  # with a zero-width space


def tree(path: Path) -> set[Path]:
    return set(path.rglob("*"))


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_user_name_over_user_pass_is_refused(pop3_client, alice, root, tmp_path, name):
    before = tree(tmp_path)
    client = pop3_client()
    assert pop3_send(client, b"USER " + name.encode("utf-8", "surrogateescape")) == b"+OK send PASS\r\n"
    assert pop3_send(client, f"PASS {PASSWORD}".encode()) == POP3_AUTH_FAILED
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", HOSTILE_NAMES + ["ALICE"])
def test_hostile_user_name_over_apop_is_refused_even_with_alices_digest(raw, server, alice, tmp_path, name):
    before = tree(tmp_path)
    client = raw(server.addresses["pop3"])
    timestamp = re.search(rb"<[^>]+>", client.line())[0]
    # The digest alice would send for this greeting (RFC 1939 §7): only the name differs.
    digest = hashlib.md5(timestamp + PASSWORD.encode()).hexdigest().encode()
    reply = pop3_send(client, b"APOP " + name.encode() + b" " + digest)
    if name == "ALICE":  # the control: the same name in capitals is alice
        assert reply.startswith(b"+OK alice's maildrop")
        return
    assert reply == POP3_AUTH_FAILED
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", ["ALICE", "Alice", "aLiCe"])
def test_user_names_are_case_insensitive_one_account_one_lock(pop3_client, alice, name):
    client = pop3_client()
    assert pop3_send(client, f"USER {name}".encode()) == b"+OK send PASS\r\n"
    assert pop3_send(client, f"PASS {PASSWORD}".encode()).startswith(b"+OK alice's maildrop")
    other = pop3_client()
    assert pop3_send(other, b"USER alice") == b"+OK send PASS\r\n"
    assert pop3_send(other, f"PASS {PASSWORD}".encode()) == \
        b"-ERR [IN-USE] maildrop is locked by another session\r\n"


@pytest.mark.parametrize("local_part, reply", [
    ("../alice", b"501 5.1.3 bad address syntax: bad local part '../alice'\r\n"),
    ('"../alice"', b"550 5.1.1 <\"../alice\"@localhost>: recipient address rejected: user unknown\r\n"),
    ("a/b", b"550 5.1.1 <a/b@localhost>: recipient address rejected: user unknown\r\n"),
    ('"a\\\\b"', b"550 5.1.1 <\"a\\\\b\"@localhost>: recipient address rejected: user unknown\r\n"),
    (".pymailsrv", b"501 5.1.3 bad address syntax: bad local part '.pymailsrv'\r\n"),
    ('".pymailsrv"', b"550 5.1.1 <\".pymailsrv\"@localhost>: recipient address rejected: user unknown\r\n"),
    # Reply text is ASCII (RFC 5321 §4.2): the Cyrillic and the full-width a go out escaped.
    ("\u0430lice", b"550 5.1.1 <\\u0430lice@localhost>: recipient address rejected: user unknown\r\n"),
    ("\uff41lice", b"550 5.1.1 <\\uff41lice@localhost>: recipient address rejected: user unknown\r\n"),
])
def test_hostile_local_part_over_rcpt_is_refused(smtp_client, alice, root, tmp_path, local_part, reply):
    before = tree(tmp_path)
    client = smtp_client(b"MAIL FROM:<a@example.org> SMTPUTF8")
    assert smtp_send(client, f"RCPT TO:<{local_part}@localhost>".encode()) == reply
    assert tree(tmp_path) == before


def test_upper_case_local_part_reaches_the_same_user(smtp_client, alice, root):
    client = smtp_client(b"MAIL FROM:<a@example.org>", b"RCPT TO:<ALICE@localhost>")
    assert smtp_send(client, b"DATA").startswith(b"354 ")
    assert smtp_send(client, b"Subject: hi\r\n\r\nhi\r\n.").startswith(b"250 ")
    assert len(stored(root)) == 1


def test_kelvin_sign_look_alike_does_not_reach_kate(smtp_client, add_user):
    add_user("kate")
    client = smtp_client(b"MAIL FROM:<a@example.org> SMTPUTF8")
    assert smtp_send(client, "RCPT TO:<\u212aate@localhost>".encode()) == \
        b"550 5.1.1 <\\u212aate@localhost>: recipient address rejected: user unknown\r\n"


# --- verbs and keywords that are ASCII only once upper-cased -----------------------------------
# str.upper() makes "\u0131" (DOTLESS I) "I" and "\u017f" (LONG S) "S"; verbs and
# keywords are case-insensitive in ASCII only (RFC 5321 §2.4, RFC 1939 §3).


@pytest.mark.parametrize("line, reply", [
    ("QU\u0131T", R500_UNKNOWN),
    ("R\u017fET", R500_UNKNOWN),
    ("MA\u0131L FROM:<a@example.org>", R500_UNKNOWN),
    ("MAIL FROM:<a@example.org> BODY=8B\u0131TMIME", b"501 5.5.4 syntax: BODY=7BIT|8BITMIME\r\n"),
    ("AUTH PLA\u0131N", b"504 5.5.4 unrecognized authentication type\r\n"),
    # Nor is a Unicode space a separator: one word, as a filter reads it.
    ("AUTH PLAIN\u00a0AGFsaWNlAHgK", b"504 5.5.4 unrecognized authentication type\r\n"),
    ("MAIL \u2003FROM:<a@example.org>",
     f"501 5.5.4 syntax: {SmtpSession.commands.find('MAIL').syntax}\r\n".encode()),
])
def test_smtp_a_verb_or_keyword_ascii_only_once_upper_cased_is_refused(smtp_client, alice, line, reply):
    client = smtp_client()
    assert smtp_send(client, line.encode()) == reply
    assert smtp_send(client, b"NOOP") == R250_OK


@pytest.mark.parametrize("line, reply", [
    ("U\u017fER alice", POP3_UNKNOWN),
    ("AUTH PLA\u0131N", b"-ERR unsupported SASL mechanism\r\n"),
])
def test_pop3_a_verb_or_keyword_ascii_only_once_upper_cased_is_refused(pop3_client, alice, line, reply):
    client = pop3_client()
    assert pop3_send(client, line.encode()) == reply
    assert pop3_send(client, b"USER alice") == b"+OK send PASS\r\n"


# --- properties: any line, a well-formed reply -----------------------------------------------------------

SMTP_VERBS = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY",
              b"EXPN", b"HELP", b"AUTH", b"STARTTLS", b"BDAT", b"."]
POP3_VERBS = [b"USER", b"PASS", b"APOP", b"AUTH", b"STLS", b"QUIT", b"STAT", b"LIST", b"RETR", b"DELE",
              b"NOOP", b"RSET", b"TOP", b"UIDL", b"LAST", b"CAPA", b"*", b""]

SMTP_SCRIPTS = [[], [b"EHLO a.example"], [b"EHLO a.example", b"MAIL FROM:<a@example.org>"],
                [b"EHLO a.example", b"MAIL FROM:<a@example.org>", b"RCPT TO:<alice@localhost>"],
                [b"EHLO a.example", b"MAIL FROM:<a@example.org>", b"RCPT TO:<alice@localhost>", b"DATA"],
                [b"EHLO a.example", b"AUTH PLAIN"], [b"EHLO a.example", b"AUTH LOGIN"]]
POP3_SCRIPTS = [[], [b"USER alice"], [b"USER alice", f"PASS {PASSWORD}".encode()],
                [b"USER alice", f"PASS {PASSWORD}".encode(), b"DELE 1"], [b"AUTH PLAIN"]]


def lines_for(verbs: list[bytes]):
    argument = st.binary(max_size=120)
    command = st.tuples(st.sampled_from(verbs), st.sampled_from([b" ", b"", b"  "]), argument).map(b"".join)
    line = st.one_of(st.binary(max_size=400), command)
    ending = st.sampled_from([b"\r\n", b"\n", b"\r\r\n"])
    return st.lists(st.tuples(line, ending).map(lambda pair: pair[0].replace(b"\n", b"") + pair[1]),
                    max_size=25)


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    """A real ServerContext on its own root, with alice (cheap password hash) and a few messages."""
    root = tmp_path_factory.mktemp("property") / "root"
    (root / ".pymailsrv").mkdir(parents=True)
    # verify_password reads the scrypt cost from the stored hash: a cost of
    # 2**1 keeps hundreds of logins fast and is checked by the same code.
    digest = hashlib.scrypt(PASSWORD.encode(), salt=b"0123456789abcdef", n=2, r=8, p=1, dklen=32)
    salt, hashed = (base64.b64encode(value).decode().rstrip("=")
                    for value in (b"0123456789abcdef", digest))
    (root / ".pymailsrv" / "users.json").write_text(json.dumps(
        {"users": {"alice": {"password": f"$scrypt$ln=1,r=8,p=1${salt}${hashed}", "apop_secret": "s"}}}))
    server = MailServer(make_settings(root))
    for number in range(3):
        server.context.store.deliver("alice", b"Subject: %d\n\n.hi\nthere\n" % number)
    return server.context


class ErrorLog(logging.Handler):
    """Records of ERROR and worse: the session's catch-all logs every bug it catches."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


SMTP_LINE = re.compile(r"[2-5][0-9][0-9]([ -][\x20-\x7e]*)?")
POP3_HEAD = re.compile(r"(\+OK|-ERR)( [\x20-\x7e]*)?|\+ [A-Za-z0-9+/=]*")


def check_reply(reply: Reply, session) -> None:
    assert isinstance(reply, Reply)
    head = reply.head()
    assert head
    for line in head:
        wire = line.encode("utf-8", "replace")
        assert b"\r" not in wire and b"\n" not in wire
        if isinstance(reply, SmtpReply):
            assert SMTP_LINE.fullmatch(line), line
        else:
            assert isinstance(reply, Pop3Reply) and POP3_HEAD.fullmatch(line), line
    for block in reply.body():  # blocks of whole lines (Reply.body), each ended by CRLF, no bare LF
        assert block.endswith(b"\r\n") and block.count(b"\n") == block.count(b"\r\n")
    if reply.then is not None:
        check_reply(reply.then, session)


def run_session(session, lines: list[bytes]) -> None:
    """Feed ``lines`` as the transport would (cut at the line limit); check every answer."""
    errors = ErrorLog()
    logger = logging.getLogger("pymailsrv")
    logger.addHandler(errors)
    try:
        check_reply(session.greeting(), session)
        for line in lines:
            limit = session.line_limit
            too_long = len(line) > limit
            if too_long:
                line = line[:limit] + (b"\r\n" if line.endswith(b"\r\n") else b"\n")
            reply = session.handle_line(line, too_long)
            if reply is None:
                assert session.collecting_text  # only message text goes unanswered
                continue
            check_reply(reply, session)
            if reply.after.value != "continue":
                break  # the transport closes, or hands the socket to TLS
        check_reply(session.timed_out(), session)
    finally:
        session.close()
        logger.removeHandler(errors)
    assert [record.getMessage() for record in errors.records] == []


def fresh(context):
    """The context with a throttle of its own, so failed logins of one example do not block the next."""
    return dataclasses.replace(context, throttle=FailureThrottle(10, 300))


PROPERTY_SETTINGS = settings(max_examples=150,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(script=st.sampled_from(SMTP_SCRIPTS), lines=lines_for(SMTP_VERBS))
def test_any_lines_get_well_formed_smtp_replies(context, script, lines):
    run_session(SmtpSession(fresh(context), ("127.0.0.1", 4000)), [line + b"\r\n" for line in script] + lines)


@PROPERTY_SETTINGS
@given(script=st.sampled_from(POP3_SCRIPTS), lines=lines_for(POP3_VERBS))
def test_any_lines_get_well_formed_pop3_replies(context, script, lines):
    run_session(Pop3Session(fresh(context), ("127.0.0.1", 4000)), [line + b"\r\n" for line in script] + lines)


# --- a client that reads nothing ----------------------------------------------------------


def test_replies_a_client_would_not_read_are_dropped_not_sent_again():
    # When a send times out, some of it may have gone: sending the buffer
    # again would repeat it, and wait out the timeout a second time.
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(0.3)
        connection = Connection(left, session=None, tracer=Tracer())
        big = Pop3Reply(ok=True, text="", content=[b"x" * 998 + b"\r\n"] * 8000)  # 8 MB: more than both buffers
        with pytest.raises(TimeoutError):
            connection.send(big)
        started = time.monotonic()
        connection.flush()  # nothing is left to send, so nothing is waited for
        assert time.monotonic() - started < 0.1
