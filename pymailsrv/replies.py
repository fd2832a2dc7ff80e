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
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pymailsrv.limits import (
    AUTH_MAX_FAILURES_PER_CONNECTION,
    POP3_COMMAND_LINE_MAX,
    POP3_MAX_BAD_COMMANDS_AFTER_LOGIN,
    POP3_MAX_BAD_COMMANDS_BEFORE_LOGIN,
    REPLY_LINE_MAX,
    SASL_LINE_MAX,
    SMTP_COMMAND_LINE_EXTENSION_ALLOWANCE,
    SMTP_COMMAND_LINE_MAX,
    SMTP_TEXT_LINE_MAX,
)

CRLF = b"\r\n"
# RFC 1939 §3: the line holding a single dot that ends a multi-line reply.
END_OF_MULTILINE = b"." + CRLF

# RFC 5321 §4.2: reply text is tab and printable ASCII (textstring).
_NOT_REPLY_TEXT = re.compile(r"[^\t\x20-\x7e]")
_CUT_MARK = "..."


def reply_line(line: str) -> str:
    """A status line fit for the wire, whatever client text it repeats: other
    characters escaped (é as \\xe9), and cut to REPLY_LINE_MAX with its CRLF."""
    if not _NOT_REPLY_TEXT.search(line) and len(line) <= REPLY_LINE_MAX - len(CRLF):
        return line  # nearly always
    # ascii() writes a character as Python escapes it, and loads no codec
    # (after --run-as, the Python installed may be unreadable: server.py).
    line = _NOT_REPLY_TEXT.sub(lambda match: ascii(match[0])[1:-1], line)
    if len(line) > REPLY_LINE_MAX - len(CRLF):
        line = line[:REPLY_LINE_MAX - len(CRLF) - len(_CUT_MARK)] + _CUT_MARK
    return line


def counted(number: int, noun: str, plural: str | None = None, *, grouped: bool = False) -> str:
    """``1 message``, ``2 messages`` (``plural`` where it is not ``noun`` + "s"):
    a count that reads as English, as RFC 1939's own examples do ("2 messages").
    The replies use it, and so do the reports, the command line and the log.
    ``grouped`` writes thousands apart, ``14 380 octets``, as the trace does."""
    digits = f"{number:,}".replace(",", " ") if grouped else str(number)
    return f"{digits} {noun if number == 1 else plural or noun + 's'}"


def elided(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the last of them "…" where it
    was cut: a column of a report or a table, which the eye reads, not a
    program (the wire's own cut is reply_line's)."""
    return text if len(text) <= width else text[: width - 1] + "…"


class After(enum.Enum):
    """What the transport does once the reply is sent."""

    CONTINUE = "continue"
    CLOSE = "close"
    # Begin the TLS handshake (STARTTLS, STLS); see Connection.start_tls.
    START_TLS = "start-tls"
    # Injected faults (faults.py): hang up without sending the reply at all,
    # or after sending it only in part (a multi-line reply without its end).
    DROP = "drop"
    DROP_MID = "drop-mid"


@dataclass(frozen=True)
class Reply:
    """Base of both protocols' replies: the wire form plus what comes after."""

    after: After = dataclasses.field(default=After.CONTINUE, kw_only=True)
    # Seconds the transport waits before sending (a failed login's delay).
    delay: float = dataclasses.field(default=0.0, kw_only=True)
    # What the reply means and where the RFC says so: the --annotate text.
    note: str = dataclasses.field(default="", kw_only=True)
    # A reply sent straight after this one, unasked (SMTP's closing 421).
    then: "Reply | None" = dataclasses.field(default=None, kw_only=True)
    # Its body is message text (RETR, TOP): a trace summarises that, unless
    # asked for bodies, and shows other bodies (CAPA, LIST, UIDL) line by line.
    message_text: bool = dataclasses.field(default=False, kw_only=True)

    def head(self) -> list[str]:
        """The status line(s), without line ends: what a trace always shows."""
        raise NotImplementedError

    def body(self) -> Iterator[bytes]:
        """What follows the head on the wire: a POP3 multi-line body, byte-stuffed,
        in blocks of whole CRLF-ended lines, then the line with a single dot."""
        return iter(())

    @property
    def summary(self) -> str:
        return self.head()[0]

    @property
    def refused(self) -> bool:
        """A negative reply: POP3's -ERR, SMTP's 4yz or 5yz."""
        raise NotImplementedError

    def format(self, **fields: object) -> "Reply":
        """This reply with the ``{field}`` placeholders of its text filled in."""
        return dataclasses.replace(self, text=self.text.format(**fields))  # type: ignore[attr-defined]

    def made_from(self, template: "Reply") -> bool:
        """Is this ``template``, its placeholders filled in or not?"""
        return dataclasses.replace(self, text=template.text) == template  # type: ignore[attr-defined]

    def closing(self) -> "Reply":
        """This reply, after which the connection is closed."""
        return dataclasses.replace(self, after=After.CLOSE)

    def starting_tls(self) -> "Reply":
        """This reply, after which the TLS handshake begins."""
        return dataclasses.replace(self, after=After.START_TLS)

    def delayed(self, seconds: float) -> "Reply":
        return dataclasses.replace(self, delay=seconds)

    def followed_by(self, other: "Reply") -> "Reply":
        """This reply, then ``other`` at once; what happens after is ``other``'s."""
        return dataclasses.replace(self, then=other, after=other.after)


@dataclass(frozen=True)
class Pop3Reply(Reply):
    ok: bool
    text: str
    # RFC 2449 §8 extended response code, e.g. "IN-USE" (shown as "[IN-USE]").
    code: str | None = None
    # What a multi-line reply carries, not yet byte-stuffed: lines ended by
    # CRLF, in blocks of whole lines (a block may be one line or a whole
    # message). Blocks, not lines, because RETR sends a message with a few
    # bytes.replace calls rather than a Python step per line (maildir.pop3_text).
    # None if single-line.
    content: Iterable[bytes] | None = None

    def with_lines(self, lines: Iterable[bytes]) -> "Pop3Reply":
        """A multi-line reply of these lines, given without line ends."""
        return self.with_content(line + CRLF for line in lines)

    def with_content(self, content: Iterable[bytes]) -> "Pop3Reply":
        return dataclasses.replace(self, content=content)

    @property
    def refused(self) -> bool:
        return not self.ok

    def head(self) -> list[str]:
        status = "+OK" if self.ok else "-ERR"
        parts = [status] + ([f"[{self.code}]"] if self.code else []) + ([self.text] if self.text else [])
        return [reply_line(" ".join(parts))]

    def body(self) -> Iterator[bytes]:
        if self.content is None:
            return
        for block in self.content:
            # RFC 1939 §3: a line that starts with the termination octet is
            # "byte-stuffed" by prepending another one. A block starts a line.
            if block.startswith(b"."):
                block = b"." + block
            yield block.replace(CRLF + b".", CRLF + b"..")
        if self.after is not After.DROP_MID:  # a reply cut off never reaches its end
            yield END_OF_MULTILINE


@dataclass(frozen=True)
class Pop3Challenge(Pop3Reply):
    """RFC 5034 §4: during AUTH the server sends "+ " and a base64 challenge."""

    def head(self) -> list[str]:
        return [f"+ {self.text}"]


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
        # A reply cut off (faults.py) never reaches its last line.
        last = len(lines) - 1 if self.after is not After.DROP_MID else len(lines)
        enhanced = f"{self.enhanced} " if self.enhanced else ""
        # RFC 5321 §4.2.1: every line but the last has a hyphen after the code.
        return [reply_line(f"{self.code}{' ' if number == last else '-'}{enhanced}{line}")
                for number, line in enumerate(lines)]

    @property
    def refused(self) -> bool:
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
# Each note says what the reply means and where the RFC says so: the trace
# shows it with --annotate.


def _ok(text: str, note: str) -> Pop3Reply:
    return Pop3Reply(ok=True, text=text, note=note)


def _err(text: str, note: str, code: str | None = None) -> Pop3Reply:
    return Pop3Reply(ok=False, text=text, code=code, note=note)


POP3_GREETING = _ok("pymailsrv POP3 server ready", "greeting, RFC 1939 §4")
POP3_GREETING_WITH_APOP = _ok("pymailsrv POP3 server ready {timestamp}",
                              "greeting; <...> is the APOP challenge, RFC 1939 §4, §7")
POP3_SIGNING_OFF = _ok("pymailsrv POP3 server signing off",
                       "QUIT before login: nothing changes, RFC 1939 §4").closing()
POP3_SIGNING_OFF_AFTER_UPDATE = _ok("pymailsrv POP3 server signing off ({remaining})",
                                    "UPDATE done: messages marked by DELE are gone, RFC 1939 §6").closing()
POP3_USER_ACCEPTED = _ok("send PASS", "name noted; the password comes next, RFC 1939 §7")
POP3_LOGGED_IN = _ok("{user}'s maildrop has {messages} ({size} octets)",
                     "maildrop locked and snapshot taken: TRANSACTION state, RFC 1939 §4")
POP3_STAT = _ok("{count} {size}", "drop listing: message count and octets, RFC 1939 §5")
POP3_SCAN_LISTING = _ok("{msg_number} {size}", "scan listing: number and exact octets, RFC 1939 §5")
POP3_SCAN_LISTINGS_FOLLOW = _ok("{messages} ({size} octets)",
                                "one scan listing per line, then '.', RFC 1939 §5")
POP3_UNIQUE_ID = _ok("{msg_number} {uid}", "unique-id listing, stable across sessions, RFC 1939 §7")
POP3_UNIQUE_IDS_FOLLOW = _ok("unique-id listing follows", "one unique-id per line, then '.', RFC 1939 §7")
POP3_MESSAGE_FOLLOWS = dataclasses.replace(
    _ok("{size} octets", "the message follows, byte-stuffed, then '.', RFC 1939 §3, §5"), message_text=True)
POP3_TOP_FOLLOWS = dataclasses.replace(
    _ok("top of message follows", "header, blank line, n body lines, RFC 1939 §7"), message_text=True)
POP3_MARKED_DELETED = _ok("message {msg_number} deleted",
                          "only marked: removed at QUIT (UPDATE), RFC 1939 §5, §6")
POP3_NOOP = _ok("", "nothing to do, RFC 1939 §5")
POP3_RESET = _ok("maildrop has {messages} ({size} octets)", "all DELE marks removed, RFC 1939 §5")
POP3_LAST = _ok("{msg_number}", "highest message number accessed, RFC 1460 (obsolete)")
POP3_CAPABILITIES_FOLLOW = _ok("capability list follows", "one capability per line, then '.', RFC 2449 §5")
POP3_BEGIN_TLS = _ok("begin TLS negotiation",
                     "TLS handshake next; the session stays in AUTHORIZATION, RFC 2595 §4").starting_tls()
POP3_MECHANISMS_FOLLOW = _ok("SASL mechanisms follow", "one mechanism per line, then '.': bare AUTH, which "
                                                       "RFC 5034 does not define but clients use (as Dovecot answers)")
POP3_CHALLENGE = Pop3Challenge(ok=True, text="{challenge}", note="SASL challenge: answer in base64, or * to cancel, "
                                                         "RFC 5034 §4")

POP3_UNKNOWN_COMMAND = _err("unknown command", "no such POP3 command, RFC 1939 §3")
POP3_WRONG_STATE = _err("{verb} is not valid in the {state} state",
                        "a known command, but not in this state, RFC 1939 §3")
POP3_SYNTAX = _err("syntax: {syntax}", "wrong arguments for the command, RFC 1939 §3")
POP3_LINE_TOO_LONG = _err("command line too long", f"over pop3.command_line_max octets ({POP3_COMMAND_LINE_MAX} "
                                                   "unless set), RFC 2449 §4")
POP3_SASL_LINE_TOO_LONG = _err("authentication exchange line is too long",
                               f"a SASL response over {SASL_LINE_MAX} octets, RFC 5034 §4")
POP3_USER_FIRST = _err("send USER first", "PASS needs a USER before it, RFC 1939 §7")
POP3_APOP_NOT_OFFERED = _err("APOP is not offered: the greeting had no timestamp",
                              "APOP needs the greeting's timestamp, RFC 1939 §7; here only while "
                              "some user has an APOP secret")
POP3_PRIVACY_REQUIRED = _err("plaintext authentication is not allowed here without TLS: use STLS first",
                             "no password over an unencrypted connection, RFC 8314 §4.1 / RFC 2595 §2.3; "
                             "[AUTH]: a login against policy, RFC 3206 §5 (as Dovecot answers)",
                             code="AUTH")
# The same refusal where STLS is not on offer (no certificate): "use STLS
# first" would send the student to a command that fails too.
POP3_PRIVACY_REQUIRED_NO_TLS = _err("plaintext authentication is not allowed here without TLS, which this "
                                    "server does not offer", "no password over an unencrypted connection, "
                                    "RFC 8314 §4.1; and no certificate for STLS (RFC 2595 §4)", code="AUTH")
POP3_TLS_UNAVAILABLE = _err("STLS is not available: no certificate is configured",
                            "STLS, RFC 2595 §4: TLS needs a certificate on the server")
POP3_ALREADY_TLS = _err("command not permitted when TLS active", "TLS is already on, RFC 2595 §4")
POP3_UNSUPPORTED_MECHANISM = _err("unsupported SASL mechanism", "see CAPA's SASL line, RFC 5034 §4")
POP3_AUTH_CANCELLED = _err("authentication cancelled", "the client answered *, RFC 5034 §4")
POP3_AUTH_MALFORMED = _err("malformed SASL response", "not base64, or not what the mechanism expects, "
                                                      "RFC 5034 §4")
POP3_TOO_MANY_SESSIONS = _err("too many sessions",
                              "too many sessions of this user from this address (Dovecot's "
                              "mail_max_userip_connections); [IN-USE], RFC 2449 §8.1.2's 'in use', as "
                              "Dovecot reads it", code="IN-USE")
# Written by the accepting thread itself, in place of the greeting.
POP3_TOO_MANY_CONNECTIONS = _err("too many connections", "connection cap reached, try again later, "
                                                         "RFC 3206 §4", code="SYS/TEMP").closing()
POP3_ADDRESS_BLOCKED = _err("too many failed logins from your address, try again later",
                            "failed logins are limited per client address", code="SYS/TEMP")
POP3_NO_SUCH_MESSAGE = _err("no such message", "no message with that number in the snapshot, RFC 1939 §5")
POP3_MESSAGE_DELETED = _err("message {msg_number} already deleted",
                            "marked messages may not be used, RFC 1939 §5")
POP3_MESSAGE_VANISHED = _err("message {msg_number} has vanished: another program removed it from the maildrop",
                             "the file went during the session, not the client's fault")
# RFC 3206 §4: SYS/PERM, a failure on our side that retrying will not mend.
POP3_MESSAGE_UNREADABLE = _err("message {msg_number} cannot be read by the server: its file's permissions "
                               "shut the server out; ask the administrator",
                               "a file another program left, RFC 3206 §4", code="SYS/PERM")
# RFC 3206 §5: AUTH says the credentials were wrong, not that the server is ill.
POP3_AUTH_FAILED = _err("invalid user name or password",
                        "credentials refused, after a delay against guessing, RFC 3206 §5", code="AUTH")
# RFC 2449 §8.1.2: IN-USE means the maildrop lock could not be had.
POP3_IN_USE = _err("maildrop is locked by another session",
                   "maildrop locked by another session, RFC 1939 §4 / RFC 2449 §8.1.2", code="IN-USE")
# RFC 3206 §4: SYS/TEMP is a passing failure the user may simply retry.
POP3_STORAGE_FAILURE = _err("temporary storage failure, try again later",
                            "server-side failure, retry later, RFC 3206 §4", code="SYS/TEMP")
POP3_UPDATE_FAILED = _err("some deleted messages were not removed",
                          "UPDATE could not remove everything, RFC 1939 §6 / RFC 3206 §4",
                          code="SYS/TEMP").closing()
POP3_TOO_MANY_BAD_COMMANDS = _err("too many bad commands, closing",
                                  f"error limit reached ({POP3_MAX_BAD_COMMANDS_BEFORE_LOGIN} before login, "
                                  f"{POP3_MAX_BAD_COMMANDS_AFTER_LOGIN} after)").closing()
POP3_TOO_MANY_FAILED_LOGINS = _err("too many failed logins, closing",
                                   "auth.max_failures_per_connection failed logins "
                                   f"({AUTH_MAX_FAILURES_PER_CONNECTION} unless set): the connection closes; "
                                   "[AUTH], RFC 3206 §5",
                                   code="AUTH").closing()
POP3_AUTOLOGOUT = _err("autologout: idle for too long",
                       "inactivity timer expired, no UPDATE, RFC 1939 §3 (which would close without a reply; "
                       "we say why first, as Dovecot does)").closing()
POP3_SHUTTING_DOWN = _err("server shutting down, try again later",
                          "the server is stopping: no UPDATE, nothing deleted, RFC 1939 §6 / RFC 3206 §4",
                          code="SYS/TEMP").closing()


# --- SMTP catalogue (RFC 5321 §4.2, RFC 3463) ------------------------------

R220_GREETING = SmtpReply(220, None, "{host} ESMTP pymailsrv",
                          note="service ready; the client speaks next, RFC 5321 §4.2, §3.1")
R220_READY_FOR_TLS = SmtpReply(220, "2.0.0", "ready to start TLS",
                               note="TLS handshake next; the session then starts afresh, "
                                    "RFC 3207 §4").starting_tls()
R221_BYE = SmtpReply(221, "2.0.0", "{host} closing connection",
                     note="closing after QUIT, RFC 5321 §4.1.1.10").closing()
R214_HELP = SmtpReply(214, "2.0.0", "{text}", note="help, from the command table, RFC 5321 §4.1.1.8")
R235_AUTHENTICATED = SmtpReply(235, "2.7.0", "authentication successful",
                               note="logged in, RFC 4954 §6; this session may now relay (our policy)")
R250_OK = SmtpReply(250, "2.0.0", "OK", note="requested action completed, RFC 5321 §4.2.2")
R250_HELO = SmtpReply(250, None, "{host} greets {client}",
                      note="greeted: plain SMTP, no extensions, RFC 5321 §4.1.1.1")
R250_EHLO = SmtpReply(250, None, "{lines}",
                      note="greeted; each further line is an extension we offer, RFC 5321 §4.1.1.1")
R250_SENDER_OK = SmtpReply(250, "2.1.0", "sender <{address}> OK",
                           note="transaction started, reverse-path noted, RFC 5321 §4.1.1.2")
R250_RECIPIENT_OK = SmtpReply(250, "2.1.5", "recipient <{address}> OK",
                              note="recipient accepted, RFC 5321 §4.1.1.3")
R250_DELIVERED = SmtpReply(250, "2.0.0", "OK {queue_id}",
                           note="message safely on disk in every mailbox, RFC 5321 §4.1.1.4, §6.1")
R252_CANNOT_VRFY = SmtpReply(252, "2.5.0", "cannot VRFY user, but will accept message and attempt delivery",
                             note="we do not tell who exists, RFC 5321 §3.5.3, §7.3")
R334_CHALLENGE = SmtpReply(334, None, "{challenge}",
                           note="SASL challenge: answer in base64, or * to cancel, RFC 4954 §4")
R354_START_DATA = SmtpReply(354, None, "end data with <CR><LF>.<CR><LF>",
                            note="send the message; a line with a lone '.' ends it, RFC 5321 §4.1.1.4")
R421_TIMEOUT = SmtpReply(421, "4.4.2", "{host} error: timeout exceeded",
                         note="client silent too long, closing, RFC 5321 §4.5.3.2").closing()
R421_SHUTTING_DOWN = SmtpReply(421, "4.3.2", "{host} service shutting down, try again later",
                               note="the server is stopping, RFC 5321 §3.8 / RFC 3463 X.3.2").closing()
R421_TOO_MANY_ERRORS = SmtpReply(421, "4.7.0", "{host} too many errors",
                                 note="error limit reached, closing (Postfix's hard limit)").closing()
# RFC 5321 §3.1 lets a server refuse a session for good with 554 in place
# of its greeting; a refusal for now is 421, "Service not available, closing
# transmission channel" (§4.2.2), a reply §4.2 allows upon connection.
# Written by the accepting thread itself.
R421_TOO_MANY_CONNECTIONS = SmtpReply(421, "4.7.0", "{host} too many connections",
                                      note="connection cap reached, try again later (Postfix's anvil), "
                                           "RFC 5321 §4.2, §4.2.2").closing()
R421_TOO_MANY_AUTH_FAILURES = SmtpReply(421, "4.7.0", "{host} too many failed authentications",
                                        note="failed logins are limited per connection").closing()
R421_TEXT_BEFORE_354 = SmtpReply(421, "4.5.0", "{host} message text came before 354, and DATA was refused",
                                 note="DATA ends a pipelined group: its text waits for 354, RFC 2920 §3.1; "
                                      "read as commands, it could send mail the client never meant").closing()
R451_LOCAL_ERROR = SmtpReply(451, "4.3.0", "local error in processing, try again later",
                             note="temporary failure on our side; the client retries, RFC 3463 X.3.0")
R452_INSUFFICIENT_STORAGE = SmtpReply(452, "4.3.1", "insufficient system storage",
                                      note="disk full: try again later, RFC 3463 X.3.1")
R452_TOO_MANY_RECIPIENTS = SmtpReply(452, "4.5.3", "too many recipients",
                                     note="recipient limit: send the rest in another transaction, "
                                          "RFC 5321 §4.5.3.1.10")
R454_ADDRESS_BLOCKED = SmtpReply(454, "4.7.0", "too many failed authentications from your address, "
                                 "try again later",
                                 note="temporary authentication failure: limited per client address, "
                                      "RFC 4954 §6")
R454_TEMPORARY_AUTH_FAILURE = SmtpReply(454, "4.7.0", "temporary authentication failure",
                                        note="the accounts cannot be read now (see the server's log), "
                                             "RFC 4954 §6")
R500_UNKNOWN_COMMAND = SmtpReply(500, "5.5.2", "command not recognized",
                                 note="no such SMTP command, RFC 5321 §4.2.4")
R500_LINE_TOO_LONG = SmtpReply(500, "5.5.2", "line too long",
                               note=f"command line over {SMTP_COMMAND_LINE_MAX} octets (MAIL and RCPT: "
                                    f"{SMTP_COMMAND_LINE_MAX + SMTP_COMMAND_LINE_EXTENSION_ALLOWANCE}, with their "
                                    "parameters), RFC 5321 §4.5.3.1.4")
R500_TEXT_LINE_TOO_LONG = SmtpReply(500, "5.5.2", "message has a line longer than 1000 octets",
                                    note=f"text line over {SMTP_TEXT_LINE_MAX - 1} octets: message refused, "
                                         "RFC 5321 §4.5.3.1.6")
R501_SYNTAX = SmtpReply(501, "5.5.4", "syntax: {syntax}", note="bad arguments, RFC 5321 §4.2.2")
# RFC 3463 §3.2: X.1.7 is a bad sender's address, X.1.3 a bad recipient's.
R501_BAD_SENDER_ADDRESS = SmtpReply(501, "5.1.7", "bad address syntax: {detail}",
                                    note="the reverse-path does not follow the grammar, RFC 5321 §4.1.2")
R501_BAD_RECIPIENT_ADDRESS = SmtpReply(501, "5.1.3", "bad address syntax: {detail}",
                                       note="the forward-path does not follow the grammar, RFC 5321 §4.1.2")
# RFC 3463 §3.6: X.5.4 "invalid command arguments" - the path was fine, a parameter was not.
R501_BAD_PARAMETER = SmtpReply(501, "5.5.4", "bad parameter syntax: {detail}",
                               note="a malformed ESMTP parameter, RFC 5321 §4.1.2")
R501_AUTH_CANCELLED = SmtpReply(501, "5.0.0", "authentication cancelled",
                                note="the client answered *, RFC 4954 §4")
R500_AUTH_LINE_TOO_LONG = SmtpReply(500, "5.5.6", "authentication exchange line is too long",
                                    note=f"a SASL response over {SASL_LINE_MAX} octets, RFC 4954 §4, §6")
R501_AUTH_MALFORMED = SmtpReply(501, "5.5.2", "cannot decode the response",
                                note="not base64, or not what the mechanism expects, RFC 4954 §4")
R502_NOT_IMPLEMENTED = SmtpReply(502, "5.5.1", "{verb} not implemented",
                                 note="a command we choose not to offer, RFC 5321 §4.2.4")
R503_BAD_SEQUENCE = SmtpReply(503, "5.5.1", "bad sequence of commands: {detail}",
                              note="commands out of order, RFC 5321 §3.3, §4.1.4")
R503_WRONG_STATE = SmtpReply(503, "5.5.1", "bad sequence of commands: {verb} is not valid in the {state} state",
                             note="commands out of order, RFC 5321 §3.3, §4.1.4")
R503_ALREADY_TLS = SmtpReply(503, "5.5.1", "TLS already active", note="STARTTLS only once, RFC 3207 §4.2")
R503_ALREADY_AUTHENTICATED = SmtpReply(503, "5.5.1", "already authenticated",
                                       note="AUTH only once per session, RFC 4954 §4")
R504_UNKNOWN_MECHANISM = SmtpReply(504, "5.5.4", "unrecognized authentication type",
                                   note="see the AUTH line of EHLO, RFC 4954 §4")
R530_AUTH_REQUIRED = SmtpReply(530, "5.7.0", "authentication required",
                               note="the submission port takes mail only after AUTH, RFC 6409 §4.3 / "
                                    "RFC 4954 §6")
R535_AUTH_FAILED = SmtpReply(535, "5.7.8", "authentication credentials invalid",
                             note="wrong user name or password, RFC 4954 §6")
R538_ENCRYPTION_REQUIRED = SmtpReply(538, "5.7.11", "encryption required for requested authentication "
                                                    "mechanism",
                                     note="no password over an unencrypted connection: STARTTLS first, where "
                                          "EHLO offers it (a certificate is configured), RFC 4954 §6")
R550_NO_SUCH_USER = SmtpReply(550, "5.1.1", "<{address}>: recipient address rejected: user unknown",
                              note="no such mailbox here, RFC 5321 §3.3 / RFC 3463 X.1.1")
R550_BARE_LINE_END = SmtpReply(550, "5.5.2", "bare <{char}> received",
                               note="only CRLF ends a line, RFC 5321 §2.3.8 (smtp.bare_newline = reject)")
R550_RELAY_DENIED = SmtpReply(550, "5.7.1", "<{address}>: relay access denied",
                              note="not our domain and you may not relay: no open relay, RFC 5321 §3.6.2; "
                                   "550, as §4.3.2 lists for RCPT (Postfix says 554)")
R550_SENDER_NOT_OWNED = SmtpReply(550, "5.7.1", "<{address}>: sender address not owned by user {user}",
                                  note="a submitting user may only send as themselves: 550 5.7.1, as "
                                       "RFC 6409 §6.1 says (Postfix answers 553)")
# RFC 6531 §3.5: a non-ASCII path without SMTPUTF8 is 550 at MAIL, 553 at RCPT.
R550_SENDER_NEEDS_SMTPUTF8 = SmtpReply(550, "5.6.7", "non-ASCII address requires the SMTPUTF8 parameter",
                                       note="a UTF-8 sender needs MAIL ... SMTPUTF8, RFC 6531 §3.5")
R552_TOO_BIG = SmtpReply(552, "5.3.4", "message size exceeds fixed limit",
                         note="over the SIZE limit, RFC 1870 §6 / RFC 3463 X.3.4")
R553_RECIPIENT_NEEDS_SMTPUTF8 = SmtpReply(553, "5.6.7", "non-ASCII address requires the SMTPUTF8 parameter",
                                          note="a UTF-8 recipient needs MAIL ... SMTPUTF8, RFC 6531 §3.5")
R554_NO_VALID_RECIPIENTS = SmtpReply(554, "5.5.1", "no valid recipients",
                                     note="DATA after every RCPT was refused, RFC 5321 §3.3")
R555_UNKNOWN_PARAMETER = SmtpReply(555, "5.5.4", "unsupported parameter {parameter}",
                                   note="a MAIL/RCPT parameter we do not offer, RFC 5321 §4.1.1.11")
