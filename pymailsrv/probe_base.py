"""What every conformance check stands on: a raw line client, the check record, the probe.

The prober (``probe.py``) talks to *any* POP3 or SMTP server, not only to
pymailsrv, so nothing here imports the server's protocol code (only
``counted``, the wording every report shares, and ``is_decimal``, RFC
digits' test). It is a client, and
a deliberately plain one: ``LineClient`` is a socket plus CRLF, so a check
can send exact bytes - a bare LF in the middle of DATA, a 600-octet command
line - that a library such as ``smtplib`` would tidy up or refuse to send.

A check is data (``Check``): a stable id a teacher can cite, the RFC section
it enforces, what it needs from the command line (``needs``), and ``run``,
a short function that plays one dialogue through a ``Probe`` and either
returns (PASS), raises ``Failed`` (FAIL) or raises ``Skipped`` (SKIP, e.g.
when the extension under test is not advertised). Anything else it raises -
a bug, or a reply odd enough to trip it - fails that check alone. The
catalogues themselves are in ``probe_checks_pop3.py`` and
``probe_checks_smtp.py``.

A ``Probe`` is made fresh for every check. It opens connections (greeting
read, TLS or STARTTLS/STLS done as asked), logs in, and, for checks that
need mail in the maildrop, sends it first over SMTP with a unique token in
an ``X-Probe-Token`` header, so the check can find *its* messages among
whatever the maildrop already holds. After the check, ``cleanup()`` deletes
every message it sent. Everything the check itself says and hears is kept in
``transcript`` as ``C:``/``S:`` lines in the RFCs' example notation; the
set-up and clean-up dialogues are not, so a FAIL shows only what matters.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pymailsrv.commands import is_decimal
from pymailsrv.replies import counted

CRLF = b"\r\n"

# No reply line we expect is anywhere near this long (RFC 1939 §3 allows 512
# octets, RFC 5321 §4.5.3.1.5 the same); it only bounds our memory.
MAX_REPLY_LINE = 64 * 1024
# A multi-line reply longer than this is not one we asked for.
MAX_REPLY_LINES = 100_000
# Nor one of more octets than this (the probe's own messages are small):
# with MAX_REPLY_LINE, what bounds the probe's memory against one reply.
MAX_REPLY_OCTETS = 16 * 1024 * 1024
# What a check's transcript keeps of each reply: its first lines, each cut
# to the 512 octets the RFCs allow a line (RFC 5321 §4.5.3.1.5, RFC 1939
# §3), and a count of the rest. A report needs no more, and a server that
# floods every reply must not fill memory one kept reply after another.
TRANSCRIPT_REPLY_LINES = 20
TRANSCRIPT_LINE_OCTETS = 512

# How many times, and how often, to look for mail just sent: a server may
# hand it to a delivery agent that needs a moment (Postfix to Dovecot).
DELIVERY_POLLS = 25
DELIVERY_POLL_SECONDS = 0.2
# A session cut off without QUIT may keep the maildrop lock until the
# server notices the closed socket; a login that finds it locked retries.
LOCK_RETRIES = 25
LOCK_RETRY_SECONDS = 0.1
# A body whose lines start with the termination octet, for dot-stuffing
# (RFC 1939 §3, RFC 5321 §4.5.2), both ways.
DOTTED_BODY = (b".leading dot", b"..two leading dots", b".", b"last line")
# The slow checks stay idle for this much less than the least the RFC allows.
IDLE_MARGIN_SECONDS = 10

# How a FAIL's detail begins when the server sent nothing within the timeout.
NO_REPLY = "no reply: "
# Only the newest messages are searched for a check's token: the probe's own
# mail is what just arrived, and a big maildrop must not make every check slow.
SEARCH_NEWEST = 50

TOKEN_HEADER = "X-Probe-Token"

# A probe checks the protocol, not the certificate: classroom servers use
# self-signed ones ('pymailsrv cert generate') that no CA vouches for. So
# TLS connections are encrypted but neither the chain nor the host name
# is checked.
PROBE_VERIFIES_CERTIFICATES = False


class Failed(Exception):
    """The server broke the rule the check is about: the message says how."""


class Skipped(Exception):
    """The check cannot run here (an extension is not offered, say)."""


class ConnectionClosed(Failed):
    """The server closed the connection when the check expected a reply."""


def maildrop_locked(reply: str) -> bool:
    """Does this -ERR say the maildrop is locked: RFC 2449 §8.1.2's [IN-USE],
    or words to that effect? A refused login ([AUTH]) is not, whatever its
    words ("account blocked")."""
    return "[IN-USE]" in reply or ("[AUTH]" not in reply
                                   and re.search(r"\block(ed)?\b", reply, re.IGNORECASE) is not None)


def skip_if_refused_for_now(reply: str) -> None:
    """Skip the check if this -ERR refuses every login for a while, right or
    wrong: RFC 2449 §8.1.1's [LOGIN-DELAY], RFC 3206 §4's [SYS/TEMP] (a
    limit on failed logins, such as the probe's own wrong ones run up when
    it is run again and again). The check cannot run, which is no failure
    of the rule it checks."""
    if reply.startswith("-ERR") and ("[LOGIN-DELAY]" in reply or "[SYS/TEMP]" in reply):
        raise Skipped(f"the server refuses logins for now: {reply!r}")


def fail_unless(condition: bool, expected: str, got: object) -> None:
    """Raise ``Failed("expected …, got …")`` unless ``condition`` holds."""
    if not condition:
        raise Failed(f"expected {expected}, got {_shown(got)}")


def _shown(got: object) -> str:
    if isinstance(got, bytes):
        return repr(got)[1:]
    if isinstance(got, SmtpReply):
        return repr(got.text)
    return str(got)  # a description; callers pass a server's line as repr(line)


# --- the line client -----------------------------------------------------------


@dataclass(frozen=True)
class SmtpReply:
    """One SMTP reply (RFC 5321 §4.2): the code and the text of every line."""

    code: int
    lines: list[str]
    wire: list[bytes]  # exactly as received, CRLFs kept

    @property
    def text(self) -> str:
        return " | ".join(f"{self.code} {line}" for line in self.lines)

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 code at the start of the last line, if any."""
        match = re.match(r"([245])\.\d{1,3}\.\d{1,3}(?: |$)", self.lines[-1])
        return match.group(0).strip() if match else None


class LineClient:
    """A socket that speaks in CRLF lines and records the dialogue.

    ``send`` puts exact bytes on the wire; the readers return lines as they
    came. ``transcript`` is the probe's, or None for set-up dialogues that a
    report should not show.
    """

    def __init__(self, address: tuple[str, int], timeout: float,
                 transcript: list[str] | None, tls: ssl.SSLContext | None = None) -> None:
        self.address = address
        self.transcript = transcript
        # A whole reply, every line of it, must come within this: a server
        # that drips an octet at a time cannot hold a check for hours.
        self.timeout = timeout
        self.sock = socket.create_connection(address, timeout=timeout)
        # Each command is one write and waits for its reply: never hold it back (Nagle).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()
        self.greeting: object = None  # set by Probe.connect: a str (POP3) or SmtpReply
        self.status_lines: list[bytes] = []  # every status line read, exactly as sent
        if tls is not None:
            self._handshake(tls)

    def _handshake(self, context: ssl.SSLContext) -> None:
        """TLS over the connection; a server silent through the handshake
        is one that sends no reply (run_probe stops on it, as on silence)."""
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=self.address[0])
        except TimeoutError:
            self.close()
            raise Failed(f"{NO_REPLY}the TLS handshake timed out after {self.timeout:g} s") from None

    def _note(self, side: str, data: bytes) -> None:
        if self.transcript is not None:
            cut = b"..." if len(data) > TRANSCRIPT_LINE_OCTETS else b""
            self.transcript.append(f"{side}: {(data[:TRANSCRIPT_LINE_OCTETS] + cut).decode('utf-8', 'replace')}")

    def send(self, data: bytes, shown: str | None = None) -> None:
        """Send ``data`` as it is; ``shown`` replaces it in the transcript (a password)."""
        self.sock.sendall(data)
        if shown is not None:
            self._note("C", shown.encode())
        else:
            for line in data.splitlines() or [b""]:
                self._note("C", line)

    def send_line(self, text: str, shown: str | None = None) -> None:
        self.send(text.encode("utf-8") + CRLF, shown)

    def line(self, deadline: float) -> bytes:
        """The next line from the server, with whatever ended it, by ``deadline`` (time.monotonic())."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > MAX_REPLY_LINE:
                raise Failed(f"reply line longer than {MAX_REPLY_LINE} octets")
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed(self._timed_out)
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise Failed(self._timed_out) from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ConnectionClosed("the server closed the connection instead of replying")
            self._buffer += chunk

    def _reply_deadline(self) -> float:
        return time.monotonic() + self.timeout

    @property
    def _timed_out(self) -> str:
        return f"{NO_REPLY}timed out after {self.timeout:g} s waiting for the server"

    def closed_by_server(self, wait: float = 2.0) -> bool:
        """True if the server closes the connection within ``wait`` seconds."""
        if self._buffer:
            return False
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True

    def start_tls(self, context: ssl.SSLContext) -> None:
        """After STARTTLS/STLS: handshake; anything buffered was plaintext and is dropped."""
        self._buffer.clear()
        self._handshake(context)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # --- POP3 (RFC 1939 §3) ---------------------------------------------------

    def pop3_reply(self) -> str:
        """One status line, without its line end."""
        line = self.line(self._reply_deadline())
        self.status_lines.append(line)
        self._note("S", line.rstrip(b"\r\n"))
        return line.rstrip(b"\r\n").decode("utf-8", "replace")

    def pop3(self, command: str, shown: str | None = None) -> str:
        """Send a command, return its status line."""
        self.send_line(command, shown)
        return self.pop3_reply()

    def pop3_body(self) -> list[bytes]:
        """The lines of a multi-line reply, exactly as sent, up to and without the '.' line."""
        raw, size, deadline = [], 0, self._reply_deadline()
        while len(raw) < MAX_REPLY_LINES and size <= MAX_REPLY_OCTETS:
            line = self.line(deadline)
            if line == b".\r\n":
                self._note("S", f"({counted(len(raw), 'line')}) .".encode())
                return raw
            raw.append(line)
            size += len(line)
        raise Failed(f"multi-line reply has no end after {counted(len(raw), 'line')}, {counted(size, 'octet')}")

    def pop3_multi(self, command: str) -> tuple[str, list[bytes] | None]:
        """A multi-line command: its status line and, on +OK, the raw body lines."""
        status = self.pop3(command)
        if not status.startswith("+OK"):
            return status, None
        return status, self.pop3_body()

    # --- SMTP (RFC 5321 §4.2) -------------------------------------------------

    def smtp_reply(self) -> SmtpReply:
        """One reply, continuation lines (``250-``) included."""
        lines, wire, size, deadline = [], [], 0, self._reply_deadline()
        while len(wire) < MAX_REPLY_LINES and size <= MAX_REPLY_OCTETS:
            line = self.line(deadline)
            wire.append(line)
            size += len(line)
            if len(wire) <= TRANSCRIPT_REPLY_LINES:
                self._note("S", line.rstrip(b"\r\n"))
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            if not re.match(r"[2-5]\d\d([ -]|$)", text):
                raise Failed(f"expected an SMTP reply line (3 digits), got {text!r}")
            lines.append(text[4:])
            if text[3:4] != "-":
                if len(wire) > TRANSCRIPT_REPLY_LINES:
                    self._note("S", f"({counted(len(wire) - TRANSCRIPT_REPLY_LINES, 'more line')})".encode())
                return SmtpReply(int(text[:3]), lines, wire)
        raise Failed("SMTP reply with no last line")

    def smtp(self, command: str) -> SmtpReply:
        self.send_line(command)
        return self.smtp_reply()


def stuffed(line: bytes) -> bytes:
    """A line of text as it goes on the wire: one more "." before a leading
    "." (RFC 1939 §3, RFC 5321 §4.5.2), without its line end."""
    return b"." + line if line.startswith(b".") else line


def unstuffed(raw: Iterable[bytes]) -> list[bytes]:
    """Body lines with the line end cut and byte-stuffing undone (RFC 1939 §3)."""
    lines = []
    for line in raw:
        line = line[:-2] if line.endswith(CRLF) else line.rstrip(b"\n")
        lines.append(line[1:] if line.startswith(b"..") else line)
    return lines


def octets(raw: Iterable[bytes]) -> int:
    """The size of a message as RETR sent it: un-stuffed lines, each with CRLF (RFC 1939 §11)."""
    return sum(len(line) + 2 for line in unstuffed(raw))


# --- the check record ----------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One conformance check.

    id:     stable name, ``protocol.what-is-checked``; teachers cite it.
    rfc:    the section whose rule is checked.
    title:  the rule, in one line.
    run:    the dialogue; returns for PASS, raises Failed or Skipped.
    needs:  what the command line must give (see ``NEEDS``); SKIP otherwise.
    """

    id: str
    rfc: str
    title: str
    run: Callable[["Probe"], None]
    needs: tuple[str, ...] = ()


@dataclass
class Target:
    """What the command line says to probe, and with what."""

    protocol: str  # "pop3" or "smtp"
    address: tuple[str, int]
    user: str | None = None
    password: str | None = None
    pop3: tuple[str, int] | None = None  # where to read mail (the target itself for pop3)
    smtp: tuple[str, int] | None = None  # where to send it (the target itself for smtp)
    rcpt: str | None = None  # the probed user's address
    tls: str = "none"  # "none", "tls" (implicit, RFC 8314) or "starttls"
    slow: bool = False
    timeout: float = 10.0
    verify_certificates: bool = PROBE_VERIFIES_CERTIFICATES


# What a check may need, when the command line provides it, and what to say if not.
NEEDS: dict[str, tuple[Callable[[Target], bool], str]] = {
    "login": (lambda t: bool(t.user and t.password and t.pop3),
              "needs a POP3 login: --user and --password-stdin (and --pop3 for smtp)"),
    "rcpt": (lambda t: bool(t.rcpt and t.smtp), "needs --rcpt (and --smtp for pop3)"),
    "mail": (lambda t: bool(t.user and t.password and t.pop3 and t.smtp and t.rcpt),
             "needs mail: --smtp and --rcpt, plus the POP3 login"),
    "slow": (lambda t: t.slow, "slow: run with --slow"),
}


def missing_need(check: Check, target: Target) -> str | None:
    """Why ``check`` cannot run against ``target``, or None if it can."""
    for need in check.needs:
        available, reason = NEEDS[need]
        if not available(target):
            return reason
    return None


# --- the probe: one check's connections, mail and transcript --------------------------


@dataclass
class Sent:
    """A message a check sent, found again by its token."""

    token: str
    text: bytes  # as the client meant it: CRLF lines, not dot-stuffed


@dataclass
class Probe:
    target: Target
    transcript: list[str] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    left_behind: int = 0  # messages sent, that cleanup could not delete if stored (no POP3 login)
    _clients: list[LineClient] = field(default_factory=list)

    # --- connections -------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if not self.target.verify_certificates:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _open(self, address: tuple[str, int], quiet: bool, tls: bool) -> LineClient:
        client = LineClient(address, self.target.timeout, None if quiet else self.transcript,
                            self._tls_context() if tls else None)
        self._clients.append(client)
        return client

    def connect(self, quiet: bool = False) -> LineClient:
        """A connection to the probed server; its greeting is in ``.greeting``."""
        mode = self.target.tls
        client = self._open(self.target.address, quiet, tls=mode == "tls")
        if self.target.protocol == "pop3":
            client.greeting = client.pop3_reply()
            if mode == "starttls":
                self._stls(client)
        else:
            client.greeting = client.smtp_reply()
            if mode == "starttls":
                self._starttls(client)
        return client

    def _stls(self, client: LineClient) -> None:
        reply = client.pop3("STLS")  # RFC 2595 §4
        if not reply.startswith("+OK"):
            raise Failed(f"STLS refused: {reply!r}")
        client.start_tls(self._tls_context())

    def _starttls(self, client: LineClient) -> None:
        client.smtp("EHLO probe.invalid")
        reply = client.smtp("STARTTLS")  # RFC 3207 §4
        if reply.code != 220:
            raise Failed(f"STARTTLS refused: {reply.text!r}")
        client.start_tls(self._tls_context())

    def pop3_connect(self, quiet: bool = False) -> LineClient:
        """A POP3 connection: the target itself, or ``--pop3`` when probing SMTP."""
        if self.target.protocol == "pop3":
            return self.connect(quiet)
        client = self._open(self.target.pop3, quiet, tls=False)
        client.greeting = client.pop3_reply()
        return client

    def login(self, quiet: bool = False, verbs: tuple[str, str] = ("USER", "PASS")) -> LineClient:
        """A POP3 session in the TRANSACTION state (USER/PASS, RFC 1939 §7;
        ``verbs`` spells them, in another case say).

        A maildrop still locked by a session the probe just cut off is
        waited for; any other refusal fails the check.
        """
        user_verb, pass_verb = verbs

        def user_pass() -> tuple[LineClient, str]:
            client = self.pop3_connect(quiet)
            reply = client.pop3(f"{user_verb} {self.target.user}")
            fail_unless(reply.startswith("+OK"), f"+OK to {user_verb}", repr(reply))
            return client, client.pop3(f"{pass_verb} {self.target.password}", shown=f"{pass_verb} ****")

        client, reply = self.until_unlocked(user_pass)
        if not reply.startswith("+OK"):
            skip_if_refused_for_now(reply)
            raise Failed(f"cannot log in as {self.target.user}: {reply!r}")
        return client

    def until_unlocked(self, log_in: Callable[[], tuple[LineClient, str]]) -> tuple[LineClient, str]:
        """``log_in`` (a login, right or wrong: its client and the reply to its
        last line), made again while the reply says the maildrop is locked:
        a session the probe just cut off without QUIT may hold the lock
        until the server notices, and a check must not take that -ERR for
        the one it looks for."""
        for _ in range(LOCK_RETRIES - 1):
            client, reply = log_in()
            if not maildrop_locked(reply):
                return client, reply
            client.close()
            time.sleep(LOCK_RETRY_SECONDS)
        return log_in()

    def close_all(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()

    # --- mail ------------------------------------------------------------------

    def message(self, body: Iterable[bytes] = (b"A message sent by pymailsrv probe.",),
                subject: str = "probe") -> Sent:
        """A new message (CRLF lines, not yet dot-stuffed) with a fresh token."""
        token = secrets.token_hex(8)
        header = ["From: <probe@probe.invalid>", f"To: <{self.target.rcpt}>",
                  f"Subject: {subject} {token}", f"Message-ID: <{token}@probe.invalid>",
                  f"{TOKEN_HEADER}: {token}"]
        lines = [line.encode() for line in header] + [b""] + list(body)
        return Sent(token, b"".join(line + CRLF for line in lines))

    def smtp_send(self, message: Sent, client: LineClient | None = None, parameters: str = "") -> SmtpReply:
        """Send ``message`` to ``--rcpt`` (dot-stuffed, RFC 5321 §4.5.2); the reply to the dot.

        With ``client`` the dialogue runs there (and shows in the
        transcript); otherwise on a quiet connection of its own.
        """
        own = client is None
        if own:
            client = self._open(self.target.smtp, quiet=True, tls=False)
            client.smtp_reply()
            reply = client.smtp("EHLO probe.invalid")
            fail_unless(reply.code == 250, "250 to EHLO", reply)
        self.sent.append(message)  # even if refused: clean-up then finds nothing
        # RFC 5321 §4.3.2: RCPT may get 251 (user not local; will forward) as well as 250.
        for command, wanted in ((f"MAIL FROM:<> {parameters}".rstrip(), (250,)),
                                (f"RCPT TO:<{self.target.rcpt}>", (250, 251)), ("DATA", (354,))):
            reply = client.smtp(command)
            if reply.code not in wanted:
                raise Failed(f"cannot send mail to {self.target.rcpt}: {command} got {reply.text!r}")
        text = b"".join(stuffed(line) + CRLF for line in message.text.split(CRLF)[:-1])
        client.send(text + b".\r\n", shown=f"({counted(text.count(CRLF), 'line')} of text) .")
        reply = client.smtp_reply()
        if own:
            client.smtp("QUIT")
            client.close()
        return reply

    def deliver(self, *messages: Sent) -> None:
        """Send each message over SMTP and wait until POP3 shows it (the check's set-up)."""
        for message in messages:
            reply = self.smtp_send(message)
            if reply.code != 250:
                raise Failed(f"set-up: the SMTP server refused the probe's message: {reply.text!r}")
        self.wait_for(*messages)

    def wait_for(self, *messages: Sent) -> None:
        tokens = {message.token for message in messages}
        for _ in range(DELIVERY_POLLS):
            client = self.login(quiet=True)
            found = self.find(client, tokens)
            client.pop3("QUIT")
            client.close()
            if len(found) == len(tokens):
                return
            time.sleep(DELIVERY_POLL_SECONDS)
        raise Failed("set-up: mail sent over SMTP never appeared in the POP3 maildrop")

    def find(self, client: LineClient, tokens: Iterable[str]) -> dict[str, int]:
        """token -> msg_number, among the newest messages of a logged-in session.

        The set-up dialogue is quiet: it runs on ``client`` with the
        transcript switched off for a moment.
        """
        wanted = set(tokens)
        saved, client.transcript = client.transcript, None
        try:
            # LIST, not STAT: after a DELE the live numbers are not 1..count.
            status, listing = client.pop3_multi("LIST")
            fail_unless(listing is not None, "+OK to LIST", repr(status))
            live = sorted(int(line.split()[0]) for line in unstuffed(listing)
                          if line.split()[:1] and is_decimal(line.split()[0]))
            found: dict[str, int] = {}
            for msg_number in reversed(live[-SEARCH_NEWEST:]):
                status, lines = client.pop3_multi(f"TOP {msg_number} 0")
                if lines is None:  # TOP is optional (RFC 1939 §7); RETR is not
                    status, lines = client.pop3_multi(f"RETR {msg_number}")
                for line in unstuffed(lines or []):
                    name, _, value = line.decode("utf-8", "replace").partition(":")
                    if name.lower() == TOKEN_HEADER.lower() and value.strip() in wanted:
                        found[value.strip()] = msg_number
                if len(found) == len(wanted):
                    break
            return found
        finally:
            client.transcript = saved

    def numbers(self, client: LineClient, *messages: Sent) -> list[int]:
        """The msg_numbers of ``messages`` in this session, in order."""
        found = self.find(client, [message.token for message in messages])
        missing = [message.token for message in messages if message.token not in found]
        if missing:
            raise Failed(f"the probe's message {missing[0]} is not in the maildrop")
        return [found[message.token] for message in messages]

    def session_holding(self, message: Sent) -> tuple[LineClient, int]:
        """Deliver ``message`` and log in: the POP3 session, and the message's
        msg_number in it (most POP3 checks start so)."""
        self.deliver(message)
        client = self.login()
        (msg_number,) = self.numbers(client, message)
        return client, msg_number

    def cleanup(self) -> None:
        """Delete every message this check sent that is still there (best
        effort); with no POP3 login to do it, count them in ``left_behind``."""
        self.close_all()
        can_log_in, _ = NEEDS["login"]
        if not can_log_in(self.target):
            self.left_behind = len(self.sent)
            return
        if not self.sent:
            return
        try:
            client = self.login(quiet=True)
            found = self.find(client, [message.token for message in self.sent])
            for msg_number in found.values():
                client.pop3(f"DELE {msg_number}")
            client.pop3("QUIT")
        except Exception:  # whatever the server or our parsing did: clean-up must never turn a result around
            pass
        finally:
            self.close_all()


def apop_digest(timestamp: str, secret: str) -> str:
    """RFC 1939 §7: MD5 of the greeting's timestamp followed by the shared secret."""
    return hashlib.md5((timestamp + secret).encode("utf-8")).hexdigest()


def apop_timestamp(greeting: str) -> str | None:
    """The ``<…@…>`` msg-id in a POP3 greeting, if the server offers APOP."""
    match = re.search(r"<[^<>\s]*@[^<>\s]*>", greeting)
    return match.group(0) if match else None
