"""The prober against small servers that each break one rule: exactly the right checks FAIL.

A prober is only as good as the bugs it notices. Each fake here is a tiny
``socketserver`` POP3 or SMTP server, correct enough to pass the catalogue,
with one switch that breaks one rule of the RFCs:

* POP3 ``lf_sizes``: LIST and STAT count LF line ends, not the CRLF that
  RETR sends (RFC 1939 §11);
* POP3 ``no_stuffing``: lines starting with '.' are sent as they are
  (RFC 1939 §3);
* POP3 ``delete_at_dele``: DELE removes the file at once, so RSET or a
  dropped connection cannot save it (RFC 1939 §6; Twisted's old design);
* SMTP ``bare_lf_ends_data``: ``<LF>.<LF>`` and friends end the text
  (RFC 5321 §4.1.1.4; the SMTP smuggling of CVE-2023-51764);
* SMTP ``bare_lf_refused`` is no bug: it answers a bare LF in the text with
  521 and hangs up, as Postfix can, and must pass. Nor are SMTP
  ``data_554`` (554, not 503, to a DATA with no recipient: RFC 5321 §3.3
  allows both), POP3 ``no_capa`` (RFC 1939 alone: no CAPA) and POP3
  ``slow_unlock`` (the maildrop's lock freed a moment after a session
  ends, as a server that notices a dropped connection late does).

With every switch off the fake passes, which shows that the FAILs below
come from the one rule broken. The fake POP3 serves the Maildir that
pymailsrv's own SMTP delivers into; the fake SMTP delivers into it, and the
probe reads the mail back through pymailsrv's POP3.

Every fake listens on 127.0.0.1 port 0, reads with a 5-second timeout, and
is shut down by its fixture, pass or fail.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from pymailsrv.maildir import MaildirStore
from pymailsrv.probe import FAIL, PASS, SKIP, Result, probe, run_probe, stalled, text_report
from pymailsrv.probe_base import Target
from pymailsrv.tls import self_signed_pair, server_context, write_pair
from tests.conftest import PASSWORD
from tests.remote_side import dripping_server

SOCKET_TIMEOUT = 5.0
MAX_COMMANDS = 1000  # per connection: a runaway client cannot keep a fake busy
MAX_TEXT_LINES = 10_000
POP3_LINE_MAX = 255  # RFC 2449 §4
SMTP_LINE_MAX = 512  # RFC 5321 §4.5.3.1.4


class FakeServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


class LineHandler(socketserver.StreamRequestHandler):
    timeout = SOCKET_TIMEOUT
    # Replies go out a line at a time; without this, Nagle's algorithm and
    # the client's delayed ACK hold each small write back for ~40 ms.
    disable_nagle_algorithm = True

    def send(self, *lines: bytes | str) -> None:
        for line in lines:
            self.wfile.write((line.encode() if isinstance(line, str) else line) + b"\r\n")

    def commands(self) -> Iterator[tuple[bytes, str, str]]:
        """(raw line, VERB, argument) for each command, until the client goes."""
        for _ in range(MAX_COMMANDS):
            try:
                line = self.rfile.readline(4096)
            except OSError:
                return
            if not line:
                return
            verb, _, argument = line.rstrip(b"\r\n").decode("utf-8", "replace").partition(" ")
            yield line, verb.upper(), argument


# --- a fake POP3 server ----------------------------------------------------------------------


@dataclass
class FakeMessage:
    path: Path
    lines: list[bytes]  # without line ends, as read at login
    uid: str


class FakePop3(LineHandler):
    """RFC 1939 for one user, alice, on her Maildir; ``self.server.broken`` names the bug."""

    def handle(self) -> None:
        server = self.server
        self.messages: list[FakeMessage] | None = None  # None: AUTHORIZATION
        self.deleted: set[int] = set()
        user = None
        timestamp = f"<{threading.get_ident()}.{time.monotonic_ns()}@fake>"
        self.send(f"+OK fake POP3 ready {timestamp}" if server.apop else "+OK fake POP3 ready")
        try:
            for line, verb, argument in self.commands():
                if len(line) > POP3_LINE_MAX:
                    self.send("-ERR line too long")
                elif verb == "CAPA" and server.broken == "no_capa":
                    self.send("-ERR")
                elif verb == "CAPA":
                    self.send("+OK", "USER", "TOP", "UIDL", *(["STLS"] if server.tls else []), ".")
                elif verb == "STLS" and server.tls and self.messages is None:
                    self.send("+OK begin TLS")  # RFC 2595 §4
                    self.connection = server.tls.wrap_socket(self.connection, server_side=True)
                    self.rfile = self.connection.makefile("rb")
                    self.wfile = self.connection.makefile("wb", buffering=0)
                elif verb == "QUIT":
                    self.quit()
                    return
                elif self.messages is None:
                    if verb == "USER" and argument:
                        user = argument
                        self.send("+OK")
                    elif verb == "PASS" and server.broken == "blocked":
                        self.send("-ERR [AUTH] too many failures: account temporarily blocked")
                    elif verb in ("PASS", "APOP") and server.broken == "throttled":  # as pymailsrv's limit
                        self.send("-ERR [SYS/TEMP] too many failed logins from your address, try again later")
                    elif verb == "PASS" and user == "alice" and argument == PASSWORD or (
                            verb == "APOP" and server.apop and self.apop_accepted(timestamp, argument)):
                        if not server.lock.acquire(blocking=False):
                            self.send("-ERR [IN-USE] maildrop locked")
                            continue
                        self.messages = server.snapshot()
                        self.send("+OK logged in")
                    else:
                        self.send("-ERR")
                else:
                    self.transaction(verb, argument)
        finally:
            if self.messages is not None:
                if server.broken == "slow_unlock":
                    time.sleep(0.3)  # past the probe's first retry (0.1 s), well within its 25
                server.lock.release()

    def apop_accepted(self, timestamp: str, argument: str) -> bool:
        """RFC 1939 §7, or (``apop="any digest"``) any digest at all."""
        name, _, digest = argument.partition(" ")
        return name == "alice" and (self.server.apop == "any digest"
                                    or digest == hashlib.md5((timestamp + PASSWORD).encode()).hexdigest())

    def quit(self) -> None:
        if self.messages is not None:  # UPDATE
            for index in self.deleted:
                self.messages[index].path.unlink(missing_ok=True)
        self.send("+OK bye")

    def uid(self, message: FakeMessage) -> str:
        # RFC 1939 §7 allows a hash of the message, so that two identical
        # copies share their unique-id: no bug, but a "content_uids" server.
        if self.server.broken == "content_uids":
            return hashlib.sha1(b"\n".join(message.lines)).hexdigest()
        return message.uid

    def size(self, message: FakeMessage) -> int:
        line_end = 1 if self.server.broken == "lf_sizes" else 2
        return sum(len(line) + line_end for line in message.lines)

    def number(self, word: str) -> int | None:
        """The index of message ``word``, or None after sending -ERR."""
        if not word.isdigit() or not 1 <= int(word) <= len(self.messages) or int(word) - 1 in self.deleted:
            self.send("-ERR no such message")
            return None
        return int(word) - 1

    def body(self, lines: list[bytes]) -> None:
        for line in lines:
            stuff = line.startswith(b".") and self.server.broken != "no_stuffing"
            self.send(b"." + line if stuff else line)
        self.send(".")

    def transaction(self, verb: str, argument: str) -> None:
        words = argument.split()
        live = [(index, message) for index, message in enumerate(self.messages) if index not in self.deleted]
        if verb == "STAT":
            self.send(f"+OK {len(live)} {sum(self.size(message) for _, message in live)}")
        elif verb in ("LIST", "UIDL") and not words:
            self.send("+OK")
            for index, message in live:
                size = f"{self.size(message)}{'o' if self.server.broken == 'size_in_octets' else ''}"
                self.send(f"{index + 1} {size if verb == 'LIST' else self.uid(message)}")
            self.send(".")
        elif verb in ("LIST", "UIDL", "RETR", "DELE", "TOP") and words:
            index = self.number(words[0])
            if index is None:
                return
            message = self.messages[index]
            if verb == "LIST":
                self.send(f"+OK {index + 1} {self.size(message)}")
            elif verb == "UIDL":
                self.send(f"+OK {index + 1} {self.uid(message)}")
            elif verb == "RETR":
                self.send(f"+OK {self.size(message)} octets")
                self.body(message.lines)
            elif verb == "TOP" and len(words) == 2 and words[1].isdigit():
                header_end = message.lines.index(b"") + 1
                self.send("+OK")
                self.body(message.lines[: header_end + int(words[1])])
            elif verb == "DELE":
                self.deleted.add(index)
                if self.server.broken == "delete_at_dele":
                    message.path.unlink(missing_ok=True)
                self.send("+OK deleted")
            else:
                self.send("-ERR syntax")
        elif verb == "NOOP" and not words:
            self.send("+OK")
        elif verb == "RSET":
            self.deleted.clear()
            self.send("+OK")
        else:
            self.send("-ERR")


class FakePop3Server(FakeServer):
    def __init__(self, maildir: Path, broken: str | None, tls: ssl.SSLContext | None = None,
                 implicit_tls: bool = False, apop: str | None = None) -> None:
        self.maildir = maildir
        self.broken = broken
        self.apop = apop  # None: no APOP; "checked" (RFC 1939 §7); "any digest", a broken one
        self.tls = tls  # offers STLS when set
        self.implicit_tls = implicit_tls  # RFC 8314: the handshake before the greeting
        self.lock = threading.Lock()  # RFC 1939 §4: one session per maildrop
        super().__init__(("127.0.0.1", 0), FakePop3)

    def get_request(self):
        sock, address = super().get_request()
        if self.implicit_tls:
            sock.settimeout(SOCKET_TIMEOUT)
            sock = self.tls.wrap_socket(sock, server_side=True)
        return sock, address

    def snapshot(self) -> list[FakeMessage]:
        paths = sorted((path for subdir in ("new", "cur") for path in (self.maildir / subdir).iterdir()),
                       key=lambda path: path.name)
        return [FakeMessage(path, path.read_bytes().split(b"\n")[:-1], path.name.split(":")[0])
                for path in paths]


# --- a fake SMTP server ------------------------------------------------------------------------


class FakeSmtp(LineHandler):
    """RFC 5321 for alice@localhost; ``self.server.broken`` names the bug."""

    def handle(self) -> None:
        greeted, sender, recipients = False, None, []
        self.send("220 fake ESMTP")
        for line, verb, argument in self.commands():
            if len(line) > SMTP_LINE_MAX:
                self.send("500 line too long")
            elif verb in ("EHLO", "HELO"):
                if not argument:
                    self.send("501 syntax: EHLO domain")
                    continue
                greeted, sender, recipients = True, None, []
                self.send("250-fake greets you", "250 PIPELINING") if verb == "EHLO" else self.send("250 fake")
            elif verb == "MAIL":
                match = re.fullmatch(r"FROM:<([^>]*)>( .*)?", argument, re.IGNORECASE)
                if not greeted or sender is not None:
                    self.send("503 bad sequence")
                elif match is None:
                    self.send("501 syntax: MAIL FROM:<address>")
                elif match.group(2):
                    self.send("555 no parameters are supported")
                else:
                    sender = match.group(1)
                    self.send("250 sender OK")
            elif verb == "RCPT":
                match = re.fullmatch(r"TO:<([^>]*)>", argument, re.IGNORECASE)
                address = match.group(1).lower() if match else ""
                if sender is None:
                    self.send("503 bad sequence")
                elif match is None:
                    self.send("501 syntax: RCPT TO:<address>")
                elif (address in ("postmaster", "postmaster@localhost", "alice@localhost")
                      or self.server.broken == "open_relay"):
                    recipients.append(address)
                    # RFC 5321 §4.3.2: 251 is a success too (no bug, but a "rcpt_251" server).
                    self.send("251 2.1.5 not local; will forward" if self.server.broken == "rcpt_251"
                              else "250 recipient OK")
                else:
                    self.send("554 relay access denied" if not address.endswith("@localhost") else "550 no")
            elif verb == "DATA":
                if sender is None or not recipients:
                    self.send("554 no valid recipients" if self.server.broken == "data_554" else "503 bad sequence")
                    continue
                self.send("354 go ahead")
                text = self.text()
                if text is None:  # Postfix 3.9's smtpd_forbid_bare_newline: refuse, and hang up
                    self.send("521 5.5.2 bare <LF> received")
                    return
                self.server.store.deliver("alice", text)
                sender, recipients = None, []
                self.send("250 delivered")
            elif verb == "RSET":
                sender, recipients = None, []
                self.send("250 OK")
            elif verb == "NOOP":
                self.send("250 OK")
            elif verb == "VRFY":
                self.send("252 cannot VRFY")
            elif verb == "EXPN":
                self.send("502 EXPN not implemented")
            elif verb == "HELP":
                self.send("214 see RFC 5321")
            elif verb == "QUIT":
                self.send("221 bye")
                return
            else:
                self.send("500 command not recognized")

    def text(self) -> bytes | None:
        """The text after DATA, un-stuffed, with LF line ends; None for a bare
        LF, when the server is ``bare_lf_refused`` (which is no bug)."""
        stored, after_crlf = [], True
        for _ in range(MAX_TEXT_LINES):
            line = self.rfile.readline(4096)
            if not line:
                break
            if self.server.broken == "bare_lf_refused" and not line.endswith(b"\r\n"):
                return None
            if self.server.broken == "bare_lf_ends_data":
                if line.rstrip(b"\r\n") == b".":
                    break
            elif line == b".\r\n" and after_crlf:
                break
            after_crlf = line.endswith(b"\r\n")
            content = line.rstrip(b"\r\n")
            stored.append(content[1:] if content.startswith(b"..") else content)
        return b"".join(line + b"\n" for line in stored)


class FakeSmtpServer(FakeServer):
    def __init__(self, store: MaildirStore, broken: str | None) -> None:
        self.store = store
        self.broken = broken
        super().__init__(("127.0.0.1", 0), FakeSmtp)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def pymailsrv(start_server, add_user):
    add_user("alice")
    return start_server()


@pytest.fixture
def fake():
    """fake(server_class, *arguments) -> a started fake server; all are stopped at teardown."""
    started = []

    def start(server_class, *arguments):
        server = server_class(*arguments)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=SOCKET_TIMEOUT)


def statuses(results) -> dict[str, set[str]]:
    grouped = {PASS: set(), FAIL: set(), SKIP: set()}
    for result in results:
        grouped[result.status].add(result.id)
    return grouped


# --- POP3 ------------------------------------------------------------------------------------------

POP3_BROKEN = {
    None: set(),
    "lf_sizes": {"pop3.retr-size-matches-list"},
    "no_stuffing": {"pop3.retr-byte-stuffing"},
    "delete_at_dele": {"pop3.dele-deferred-until-quit", "pop3.disconnect-without-quit-keeps-mail"},
    "no_capa": set(),
}
POP3_ALSO_SKIPPED = {"no_capa": {"pop3.capa-in-authorization", "pop3.capa-in-transaction"}}
# The fake offers no APOP timestamp; the timeout check needs --slow.
POP3_SKIPPED = {"pop3.apop-login", "pop3.apop-bad-digest-err", "pop3.apop-timestamp-unique",
                "pop3.autologout-at-least-10-minutes"}


@pytest.mark.parametrize("broken", POP3_BROKEN, ids=lambda broken: broken or "correct")
def test_a_pop3_server_breaking_one_rule_fails_exactly_its_checks(pymailsrv, fake, store, broken):
    server = fake(FakePop3Server, store.maildir("alice"), broken)
    target = Target("pop3", server.server_address[:2], user="alice", password=PASSWORD,
                    pop3=server.server_address[:2], smtp=pymailsrv.addresses["smtp"], rcpt="alice@localhost",
                    timeout=SOCKET_TIMEOUT)
    results = run_probe(target)
    outcome = statuses(results)
    assert outcome[FAIL] == POP3_BROKEN[broken], text_report(results)
    assert outcome[SKIP] == POP3_SKIPPED | POP3_ALSO_SKIPPED.get(broken, set()), text_report(results)
    assert store.messages("alice") == []  # the probe cleaned up, even after its FAILs


def test_a_lock_freed_late_is_waited_for_by_every_login(pymailsrv, fake, store):
    # Two checks logged in on their own, without login()'s wait for a lock
    # a session just cut off still holds: one FAILed a correct server, the
    # other PASSed lines that were only the -ERR [IN-USE] of a refused login.
    server = fake(FakePop3Server, store.maildir("alice"), "slow_unlock")
    target = Target("pop3", server.server_address[:2], user="alice", password=PASSWORD,
                    pop3=server.server_address[:2], timeout=SOCKET_TIMEOUT)
    results = run_probe(target, only=["pop3.user-pass-login", "pop3.keywords-case-insensitive",
                                      "pop3.overlong-command-refused", "pop3.response-lines-end-in-crlf"])
    assert [result.status for result in results] == [PASS] * 4, text_report(results)
    assert "S: +OK logged in" in results[-1].transcript  # the lines judged are a real session's


def test_the_failure_says_what_came_back(pymailsrv, fake, store):
    server = fake(FakePop3Server, store.maildir("alice"), "lf_sizes")
    target = Target("pop3", server.server_address[:2], user="alice", password=PASSWORD,
                    pop3=server.server_address[:2], smtp=pymailsrv.addresses["smtp"], rcpt="alice@localhost",
                    timeout=SOCKET_TIMEOUT)
    (result,) = run_probe(target, only=["pop3.retr-size-matches-list"])
    assert result.status == FAIL
    assert re.search(r"expected LIST's (\d+) octets .*, got (\d+) octets", result.detail)
    assert result.sent[-2:] == ["LIST", "RETR 1"]


def pop3_target(server: FakePop3Server, pymailsrv=None) -> Target:
    return Target("pop3", server.server_address[:2], user="alice", password=PASSWORD,
                  pop3=server.server_address[:2], smtp=pymailsrv.addresses["smtp"] if pymailsrv else None,
                  rcpt="alice@localhost", timeout=SOCKET_TIMEOUT)


@pytest.mark.parametrize("apop, expected", [("checked", [PASS, PASS, PASS]), ("any digest", [PASS, PASS, FAIL])])
def test_apop_checks_wait_for_a_lock_a_session_just_cut_off_holds(pymailsrv, fake, store, apop, expected):
    # APOP logged in without login()'s wait: the lock of the session before
    # (cut off, no QUIT) FAILed a correct server, and its -ERR [IN-USE]
    # PASSed a server that takes any digest.
    server = fake(FakePop3Server, store.maildir("alice"), "slow_unlock", None, False, apop)
    results = run_probe(pop3_target(server), only=["pop3.user-pass-login", "pop3.apop-login",
                                                   "pop3.apop-bad-digest-err"])
    assert [result.status for result in results] == expected, text_report(results)


def test_a_blocked_login_is_not_taken_for_a_locked_maildrop(pymailsrv, fake, store):
    # "blocked" holds "lock": each login tried 25 times against a server
    # that was locking the account out.
    server = fake(FakePop3Server, store.maildir("alice"), "blocked")
    (result,) = run_probe(pop3_target(server), only=["pop3.user-pass-login"])
    assert result.status == FAIL
    assert result.sent.count("PASS ****") == 1


def test_logins_refused_for_now_skip_the_checks_that_need_one(pymailsrv, fake, store):
    # Run four or five times in five minutes, the probe's own wrong logins
    # met pymailsrv's limit, and 34 checks FAILed "cannot log in".
    server = fake(FakePop3Server, store.maildir("alice"), "throttled", None, False, "checked")
    results = run_probe(pop3_target(server), only=["pop3.user-pass-login", "pop3.apop-login",
                                                   "pop3.wrong-password-err"])
    refused = "the server refuses logins for now: '-ERR [SYS/TEMP] too many failed logins from your address, " \
              "try again later'"
    assert {result.id: (result.status, result.detail) for result in results} == {
        "pop3.wrong-password-err": (PASS, ""),  # an -ERR all the same
        "pop3.user-pass-login": (SKIP, refused), "pop3.apop-login": (SKIP, refused)}


def test_identical_messages_may_share_a_uid(pymailsrv, fake, store):
    # RFC 1939 §7: a unique-id may be "calculated as a hash of the message",
    # and two identical copies then share it.
    for _ in range(2):
        store.deliver("alice", b"Subject: twice\n\nthe same\n")
    server = fake(FakePop3Server, store.maildir("alice"), "content_uids")
    (result,) = run_probe(pop3_target(server), only=["pop3.uidl-listing"])
    assert result.status == PASS, text_report([result])


def test_a_scan_listing_whose_size_is_no_number_fails_the_server_not_the_check(pymailsrv, fake, store):
    store.deliver("alice", b"Subject: sized\n\nhi\n")
    server = fake(FakePop3Server, store.maildir("alice"), "size_in_octets")
    (result,) = run_probe(pop3_target(server, pymailsrv), only=["pop3.list-matches-stat"])
    assert result.status == FAIL
    assert result.detail.startswith("expected 'msg_number size' lines from LIST, got ")


def test_a_server_that_never_speaks_is_one_line_after_one_timeout():
    # Each of 45 checks waited out its timeout: 7 minutes of silence at the default.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connections complete in the kernel; no greeting ever comes
        host, port = silent.getsockname()
        started = time.monotonic()
        results = run_probe(Target("pop3", (host, port), timeout=0.5))
        outcome = CliRunner().invoke(probe, ["pop3", f"{host}:{port}", "--timeout", "0.5"])
    first, *rest = results
    assert first.status == FAIL and rest
    assert {(result.status, result.detail) for result in rest} == {
        (SKIP, "not run: the server stopped answering (timed out after 0.5 s waiting for the server)")}
    assert outcome.exit_code == 1
    assert outcome.stderr == f"Error: cannot probe {host}:{port}: no reply: timed out after 0.5 s waiting for the server\n"
    assert time.monotonic() - started < 10


def test_a_server_silent_through_the_tls_handshake_is_one_line_after_one_timeout():
    # Each check waited out its handshake: 8 minutes at the default timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        host, port = silent.getsockname()
        started = time.monotonic()
        outcome = CliRunner().invoke(probe, ["pop3", f"{host}:{port}", "--tls", "--timeout", "0.5"])
    assert outcome.exit_code == 1
    assert outcome.stderr == f"Error: cannot probe {host}:{port}: no reply: the TLS handshake timed out after 0.5 s\n"
    assert time.monotonic() - started < 10


def test_a_server_slow_at_one_step_is_not_taken_for_one_that_stopped_answering():
    # A content scanner slower than --timeout at DATA: two such checks in a
    # row stopped the run, and ten healthy checks went unrun.
    slow_at_data = Result("smtp.data-delivers", "RFC 5321 §4.1.1.4", "", FAIL, [],
                          "no reply: timed out after 1 s waiting for the server",
                          ["S: 220 mail", "C: EHLO probe.invalid", "S: 250 mail", "C: MAIL FROM:<>",
                           "S: 250 ok", "C: RCPT TO:<alice@localhost>", "S: 250 ok", "C: DATA", "S: 354 go",
                           "C: ."], 1.0)
    greeted_only = dataclasses.replace(slow_at_data, transcript=["S: 220 mail", "C: EHLO probe.invalid"])
    assert (stalled(slow_at_data), stalled(greeted_only)) == (False, True)


def test_a_server_that_greets_then_never_answers_stops_the_probe_after_two_timeouts():
    # A greeting, then silence (a minute at most, should the probe not stop).
    with dripping_server(b"", 0.1, 600, opening=b"+OK hello\r\n") as address:
        started = time.monotonic()
        results = run_probe(Target("pop3", address, timeout=0.5))
        assert time.monotonic() - started < 10
    greeting, *unanswered, first_skipped = results[:4]
    assert (greeting.status, [result.status for result in unanswered]) == (PASS, [FAIL, FAIL])
    assert {(result.status, result.detail) for result in results[3:]} == {
        (SKIP, "not run: the server stopped answering (timed out after 0.5 s waiting for the server)")}


# --- SMTP ------------------------------------------------------------------------------------------

SMTP_BROKEN = {
    None: set(),
    "bare_lf_ends_data": {"smtp.smuggling-lf-dot-lf", "smtp.smuggling-lf-dot-crlf", "smtp.smuggling-crlf-dot-lf"},
    # Not broken but strict: a 521 and a closed connection at a bare LF is
    # the safest answer to smuggling, and passes.
    "bare_lf_refused": set(),
    # Fails the relay check alone: the pipelining check has no refusal to tell
    # the order by, and skips rather than blame the order.
    "open_relay": {"smtp.relay-refused"},
    "data_554": set(),
}
SMTP_ALSO_SKIPPED = {"open_relay": {"smtp.pipelining-in-order"}}
# The fake advertises PIPELINING only; the timeout check needs --slow.
SMTP_SKIPPED = {"smtp.size-refused-at-mail", "smtp.size-within-limit-accepted", "smtp.8bitmime-accepted",
                "smtp.8bitmime-round-trip", "smtp.smtputf8-accepted", "smtp.enhanced-status-codes",
                "smtp.idle-5-minutes-allowed"}


@pytest.mark.parametrize("broken", SMTP_BROKEN, ids=lambda broken: broken or "correct")
def test_an_smtp_server_breaking_one_rule_fails_exactly_its_checks(pymailsrv, fake, store, broken):
    server = fake(FakeSmtpServer, store, broken)
    target = Target("smtp", server.server_address[:2], user="alice", password=PASSWORD,
                    pop3=pymailsrv.addresses["pop3"], smtp=server.server_address[:2], rcpt="alice@localhost",
                    timeout=SOCKET_TIMEOUT)
    results = run_probe(target)
    outcome = statuses(results)
    assert outcome[FAIL] == SMTP_BROKEN[broken], text_report(results)
    assert outcome[SKIP] == SMTP_SKIPPED | SMTP_ALSO_SKIPPED.get(broken, set()), text_report(results)
    assert store.messages("alice") == []


def test_a_251_to_rcpt_is_a_success(pymailsrv, fake, store):
    # RFC 5321 §4.3.2: the checks that deliver took only 250.
    server = fake(FakeSmtpServer, store, "rcpt_251")
    target = Target("smtp", server.server_address[:2], user="alice", password=PASSWORD,
                    pop3=pymailsrv.addresses["pop3"], smtp=server.server_address[:2], rcpt="alice@localhost",
                    timeout=SOCKET_TIMEOUT)
    results = run_probe(target, only=["smtp.data-delivers", "smtp.delivery-round-trip"])
    assert [result.status for result in results] == [PASS, PASS], text_report(results)


def test_a_smuggled_command_shows_in_what_came_back(pymailsrv, fake, store):
    server = fake(FakeSmtpServer, store, "bare_lf_ends_data")
    target = Target("smtp", server.server_address[:2], smtp=server.server_address[:2], rcpt="alice@localhost",
                    timeout=SOCKET_TIMEOUT)
    (result,) = run_probe(target, only=["smtp.smuggling-lf-dot-lf"])
    assert result.status == FAIL
    assert "got 250 500 500 221" in result.detail


# --- TLS ---------------------------------------------------------------------------------------------


@pytest.fixture
def tls_context(tmp_path) -> ssl.SSLContext:
    write_pair(tmp_path / "cert.pem", tmp_path / "key.pem", self_signed_pair("localhost"))
    return server_context(tmp_path / "cert.pem", tmp_path / "key.pem")


@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_the_probe_speaks_implicit_tls_and_stls(pymailsrv, fake, store, tls_context, mode):
    server = fake(FakePop3Server, store.maildir("alice"), None, tls_context, mode == "tls")
    target = Target("pop3", server.server_address[:2], user="alice", password=PASSWORD,
                    pop3=server.server_address[:2], smtp=pymailsrv.addresses["smtp"], rcpt="alice@localhost",
                    tls=mode, timeout=SOCKET_TIMEOUT)
    results = run_probe(target, only=["pop3.greeting-ok", "pop3.user-pass-login", "pop3.retr-byte-stuffing"])
    assert [result.status for result in results] == [PASS, PASS, PASS], text_report(results)
    if mode == "starttls":
        assert results[1].sent[:2] == ["STLS", "USER alice"]


# --- a server that floods every reply ----------------------------------------------------------


class FloodingSmtp(LineHandler):
    """220, then to every command a reply of FLOOD_LINES lines of FLOOD_LINE_OCTETS."""

    def handle(self) -> None:
        self.send("220 flood.example ESMTP")
        for _ in self.commands():
            self.send(*[f"250-{'x' * FLOOD_LINE_OCTETS}"] * (FLOOD_LINES - 1), "250 ok")


FLOOD_LINES, FLOOD_LINE_OCTETS = 200, 4000


def test_a_flooding_server_leaves_a_bounded_transcript(fake):
    # Each 800 KB reply was kept whole, one after another: 1.5 GB for the
    # 100 replies of smtp.recipients-100-accepted at 15 MB a reply.
    server = fake(FakeServer, ("127.0.0.1", 0), FloodingSmtp)
    (result,) = run_probe(Target("smtp", server.server_address[:2], timeout=SOCKET_TIMEOUT),
                          only=["smtp.ehlo-250"])
    kept = f"S: 250-{'x' * (512 - len('250-'))}..."  # each line cut to RFC 5321 §4.5.3.1.5's 512
    assert [line for line in result.transcript if line.startswith("S: ")] == [
        "S: 220 flood.example ESMTP", *[kept] * 20, "S: (180 more lines)"]


# --- a server that answers an octet at a time, never a whole line -------------------------


def test_a_server_that_drips_octets_fails_within_the_timeout():
    # "+" every 0.1 s and never a line end (a minute at most, should the deadline not hold).
    with dripping_server(b"+", 0.1, 600) as address:
        target = Target("pop3", address, timeout=1.0)
        started = time.monotonic()
        [result] = run_probe(target, ("pop3.greeting-ok",))
        assert time.monotonic() - started < 5
        assert (result.status, result.detail) == (FAIL, "no reply: timed out after 1 s waiting for the server")
