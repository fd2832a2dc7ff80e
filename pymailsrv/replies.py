"""Replies: what a session answers, named after what they mean.

A protocol handler never writes to the network. It returns a ``Reply`` (or
raises ``CommandError`` carrying one), and the transport turns that reply into
bytes. This gives exactly one reply per command by construction, and puts the
wire details in one place each:

* POP3 (RFC 1939 §3): ``+OK``/``-ERR``, an optional RFC 2449 §8 response code
  in brackets, and for multi-line replies the byte-stuffed body ended by a
  line holding a single dot.
* SMTP (RFC 5321 §4.2): a three-digit code, an RFC 3463 enhanced status code
  (RFC 2034 §3, not on the greeting or EHLO/HELO), and ``250-`` continuation
  lines for every line but the last.

The two catalogues below are the only place reply texts are written. Tests
import them, so a reply cannot change without the tests seeing it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CRLF = b"\r\n"


class After(enum.Enum):
    """What the transport does once the reply is sent."""

    CONTINUE = "continue"
    CLOSE = "close"
    # Begin the TLS handshake (STARTTLS, STLS); see Connection.start_tls.
    START_TLS = "start-tls"


@dataclass(frozen=True)
class Reply:
    """Base of both protocols' replies: the wire form plus what comes after."""

    after: After = dataclasses.field(default=After.CONTINUE, kw_only=True)
    # Seconds the transport waits before sending (a failed login's delay).
    delay: float = dataclasses.field(default=0.0, kw_only=True)
    # What the reply means and where the RFC says so: the --annotate text.
    note: str = dataclasses.field(default="", kw_only=True)

    def head(self) -> list[str]:
        """The status line(s), without line ends: what a trace always shows."""
        raise NotImplementedError

    def body(self) -> Iterator[bytes]:
        """Wire lines after the head, each with its CRLF (a POP3 multi-line body)."""
        return iter(())

    @property
    def summary(self) -> str:
        return self.head()[0]

    def format(self, **fields: object) -> "Reply":
        """This reply with the ``{field}`` placeholders of its text filled in."""
        return dataclasses.replace(self, text=self.text.format(**fields))  # type: ignore[attr-defined]

    def closing(self) -> "Reply":
        """This reply, after which the connection is closed."""
        return dataclasses.replace(self, after=After.CLOSE)

    def starting_tls(self) -> "Reply":
        """This reply, after which the TLS handshake begins."""
        return dataclasses.replace(self, after=After.START_TLS)

    def delayed(self, seconds: float) -> "Reply":
        return dataclasses.replace(self, delay=seconds)


@dataclass(frozen=True)
class Pop3Reply(Reply):
    ok: bool
    text: str
    # RFC 2449 §8 extended response code, e.g. "IN-USE" (shown as "[IN-USE]").
    code: str | None = None
    # Lines of a multi-line reply, without line terminators; None if single-line.
    lines: Iterable[bytes] | None = None

    def with_lines(self, lines: Iterable[bytes]) -> "Pop3Reply":
        return dataclasses.replace(self, lines=lines)

    def head(self) -> list[str]:
        status = "+OK" if self.ok else "-ERR"
        parts = [status] + ([f"[{self.code}]"] if self.code else []) + ([self.text] if self.text else [])
        return [" ".join(parts)]

    def body(self) -> Iterator[bytes]:
        if self.lines is None:
            return
        for line in self.lines:
            # RFC 1939 §3: a line that starts with the termination octet is
            # "byte-stuffed" by prepending another one.
            if line.startswith(b"."):
                yield b"." + line + CRLF
            else:
                yield line + CRLF
        yield b"." + CRLF


@dataclass(frozen=True)
class SmtpReply(Reply):
    code: int
    # RFC 3463 enhanced status code ("class.subject.detail"), None where RFC
    # 2034 §3 leaves it out (the greeting and the EHLO/HELO reply).
    enhanced: str | None
    # May hold several lines separated by "\n" (EHLO, HELP).
    text: str

    def head(self) -> list[str]:
        lines = self.text.split("\n")
        last = len(lines) - 1
        enhanced = f"{self.enhanced} " if self.enhanced else ""
        # RFC 5321 §4.2.1: every line but the last has a hyphen after the code.
        return [f"{self.code}{' ' if number == last else '-'}{enhanced}{line}"
                for number, line in enumerate(lines)]

    @property
    def is_error(self) -> bool:
        return self.code >= 400


class CommandError(Exception):
    """A refusal with the reply it implies (after h11's error_status_hint).

    Handlers and shared argument parsers raise it; the session's dispatcher
    catches it and answers ``reply``.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.summary)
        self.reply = reply


# --- POP3 catalogue (RFC 1939, RFC 2449 §8, RFC 3206) ----------------------


def _ok(text: str) -> Pop3Reply:
    return Pop3Reply(ok=True, text=text)


def _err(text: str, code: str | None = None) -> Pop3Reply:
    return Pop3Reply(ok=False, text=text, code=code)


POP3_GREETING = _ok("pymailsrv POP3 server ready {timestamp}")
POP3_SIGNING_OFF = _ok("pymailsrv POP3 server signing off").closing()
POP3_SIGNING_OFF_AFTER_UPDATE = _ok("pymailsrv POP3 server signing off ({remaining})").closing()
POP3_USER_ACCEPTED = _ok("send PASS")
POP3_LOGGED_IN = _ok("{user}'s maildrop has {count} messages ({size} octets)")
POP3_STAT = _ok("{count} {size}")
POP3_SCAN_LISTING = _ok("{msg_number} {size}")
POP3_SCAN_LISTINGS_FOLLOW = _ok("{count} messages ({size} octets)")
POP3_UNIQUE_ID = _ok("{msg_number} {uid}")
POP3_UNIQUE_IDS_FOLLOW = _ok("unique-id listing follows")
POP3_MESSAGE_FOLLOWS = _ok("{size} octets")
POP3_TOP_FOLLOWS = _ok("top of message follows")
POP3_MARKED_DELETED = _ok("message {msg_number} deleted")
POP3_NOOP = _ok("")
POP3_RESET = _ok("maildrop has {count} messages ({size} octets)")
POP3_LAST = _ok("{msg_number}")
POP3_CAPABILITIES_FOLLOW = _ok("capability list follows")

POP3_UNKNOWN_COMMAND = _err("unknown command")
POP3_WRONG_STATE = _err("{verb} is not valid in the {state} state")
POP3_SYNTAX = _err("syntax: {syntax}")
POP3_LINE_TOO_LONG = _err("command line too long")
POP3_USER_FIRST = _err("send USER first")
POP3_NO_SUCH_MESSAGE = _err("no such message")
POP3_MESSAGE_DELETED = _err("message {msg_number} already deleted")
POP3_MESSAGE_VANISHED = _err("message {msg_number} has vanished from the maildrop")
# RFC 3206 §4: AUTH says the credentials were wrong, not that the server is ill.
POP3_AUTH_FAILED = _err("invalid user name or password", code="AUTH")
# RFC 2449 §8.1.1: IN-USE means the maildrop lock could not be had.
POP3_IN_USE = _err("maildrop is locked by another session", code="IN-USE")
# RFC 3206 §3: SYS/TEMP is a passing failure the user may simply retry.
POP3_STORAGE_FAILURE = _err("temporary storage failure, try again later", code="SYS/TEMP")
POP3_UPDATE_FAILED = _err("some deleted messages were not removed", code="SYS/TEMP").closing()
POP3_TOO_MANY_BAD_COMMANDS = _err("too many bad commands, closing").closing()
POP3_TOO_MANY_FAILED_LOGINS = _err("too many failed logins, closing", code="AUTH").closing()
POP3_AUTOLOGOUT = _err("autologout: idle for too long").closing()


# --- SMTP catalogue (RFC 5321 §4.2, RFC 3463) ------------------------------

R220_GREETING = SmtpReply(220, None, "{host} ESMTP pymailsrv")
R221_BYE = SmtpReply(221, "2.0.0", "{host} closing connection").closing()
R214_HELP = SmtpReply(214, "2.0.0", "{text}")
R250_OK = SmtpReply(250, "2.0.0", "OK")
R250_HELO = SmtpReply(250, None, "{host} greets {client}")
R250_EHLO = SmtpReply(250, None, "{lines}")
R250_SENDER_OK = SmtpReply(250, "2.1.0", "sender <{address}> OK")
R250_RECIPIENT_OK = SmtpReply(250, "2.1.5", "recipient <{address}> OK")
R250_DELIVERED = SmtpReply(250, "2.0.0", "OK {queue_id}")
R252_CANNOT_VRFY = SmtpReply(252, "2.5.0", "cannot VRFY user, but will accept message and attempt delivery")
R354_START_DATA = SmtpReply(354, None, "end data with <CR><LF>.<CR><LF>")
R421_TIMEOUT = SmtpReply(421, "4.4.2", "{host} error: timeout exceeded").closing()
R421_TOO_MANY_ERRORS = SmtpReply(421, "4.7.0", "{host} too many errors").closing()
R451_LOCAL_ERROR = SmtpReply(451, "4.3.0", "local error in processing, try again later")
R452_INSUFFICIENT_STORAGE = SmtpReply(452, "4.3.1", "insufficient system storage")
R452_TOO_MANY_RECIPIENTS = SmtpReply(452, "4.5.3", "too many recipients")
R500_UNKNOWN_COMMAND = SmtpReply(500, "5.5.2", "command not recognized")
R500_LINE_TOO_LONG = SmtpReply(500, "5.5.2", "line too long")
R500_TEXT_LINE_TOO_LONG = SmtpReply(500, "5.5.2", "message has a line longer than 1000 octets")
R501_SYNTAX = SmtpReply(501, "5.5.4", "syntax: {syntax}")
R501_BAD_ADDRESS = SmtpReply(501, "5.1.3", "bad address syntax: {detail}")
# RFC 3463 §3.6: X.5.4 "invalid command arguments" - the path was fine, a parameter was not.
R501_BAD_PARAMETER = SmtpReply(501, "5.5.4", "bad parameter syntax: {detail}")
R502_NOT_IMPLEMENTED = SmtpReply(502, "5.5.1", "{verb} not implemented")
R451_RELAY_UNAVAILABLE = SmtpReply(451, "4.4.0", "<{address}>: relaying is not available yet, try again later")
R503_BAD_SEQUENCE = SmtpReply(503, "5.5.1", "bad sequence of commands: {detail}")
R503_WRONG_STATE = SmtpReply(503, "5.5.1", "bad sequence of commands: {verb} is not valid in the {state} state")
R550_NO_SUCH_USER = SmtpReply(550, "5.1.1", "<{address}>: recipient address rejected: user unknown")
R550_BARE_LINE_END = SmtpReply(550, "5.5.2", "bare <{char}> received")
R552_TOO_BIG = SmtpReply(552, "5.3.4", "message size exceeds fixed limit")
R553_NEEDS_SMTPUTF8 = SmtpReply(553, "5.6.7", "non-ASCII address requires the SMTPUTF8 parameter")
R554_RELAY_DENIED = SmtpReply(554, "5.7.1", "<{address}>: relay access denied")
R554_NO_VALID_RECIPIENTS = SmtpReply(554, "5.5.1", "no valid recipients")
R555_UNKNOWN_PARAMETER = SmtpReply(555, "5.5.4", "unsupported parameter {parameter}")
