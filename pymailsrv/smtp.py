"""SMTP: receiving mail for local users (RFC 5321, with ESMTP extensions).

Read this module beside RFC 5321. A session is a conversation; inside it the
client runs mail *transactions* (§3.3), each one MAIL, then RCPT (once per
recipient), then DATA. The per-connection facts live on the session (the
client's EHLO name); the per-transaction ones in an ``Envelope`` that MAIL
starts and RSET, EHLO, HELO, STARTTLS and the end of DATA throw away
(aiosmtpd's split). MAIL, RCPT and DATA, as states, mean the command of
that name was the last accepted::

    CONNECTED --EHLO/HELO--> GREETED --MAIL--> MAIL --RCPT--> RCPT --DATA--> DATA
                                ^                                             |
                                +------- <CRLF>.<CRLF> (250, or a refusal) ---+

(``pymailsrv explain`` draws the whole diagram, every command's moves.)

* A client must say EHLO or HELO before MAIL (§4.1.4); EHLO and RSET may
  come at any time and abort the transaction in progress.
* RCPT checks each recipient as it is given, not after DATA (§3.3): a
  local user of one of our domains, ``postmaster`` of any of them (§4.5.1),
  or a refusal. We are never an open relay: mail for other domains is
  refused (550 5.7.1) unless the client is in ``relay.trusted_networks``.
* DATA's text ends only at ``<CRLF>.<CRLF>`` (§4.1.1.4), with the leading
  dot of stuffed lines removed (§4.5.2). See ``MessageText`` for why nothing
  else - ``<LF>.<LF>``, ``<CR>.<CR>``, ``<LF>.<CRLF>`` - may end it (SMTP
  smuggling, CVE-2023-51764). The text streams to disk as it comes.
* ``250`` after DATA means the message is durable in every local
  recipient's Maildir and, for outside recipients, in the outbound queue
  (``Spool``: ``maildir.py`` and ``outqueue.py`` fsync before we answer).

Extensions offered in the EHLO reply: PIPELINING (RFC 2920), SIZE (RFC 1870),
8BITMIME (RFC 6152), ENHANCEDSTATUSCODES (RFC 2034, codes from RFC 3463) and
SMTPUTF8 (RFC 6531). The command table at the foot of the module drives
dispatch, the EHLO keywords that belong to commands, and HELP.
"""

from __future__ import annotations

import dataclasses
import email.utils
import enum
import functools
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pymailsrv.auth import Credentials
from pymailsrv.commands import ASCII_WHITESPACE, Command, CommandTable, ascii_upper, ascii_words, is_decimal
from pymailsrv.limits import (
    SMTP_COMMAND_LINE_EXTENSION_ALLOWANCE,
    SMTP_COMMAND_LINE_MAX,
    SMTP_MAX_ERRORS,
    SMTP_TEXT_LINE_MAX,
)
from pymailsrv.paths import (
    VCHAR,
    Address,
    PathError,
    in_domains,
    is_domain,
    least_quoted,
    parse_parameters,
    parse_path,
    unquoted_local_part,
    with_utf8_text,
)
from pymailsrv.replies import (
    After,
    R214_HELP,
    R220_GREETING,
    R220_READY_FOR_TLS,
    R235_AUTHENTICATED,
    R334_CHALLENGE,
    R421_TEXT_BEFORE_354,
    R421_TOO_MANY_AUTH_FAILURES,
    R421_TOO_MANY_CONNECTIONS,
    R454_ADDRESS_BLOCKED,
    R454_TEMPORARY_AUTH_FAILURE,
    R501_AUTH_CANCELLED,
    R501_AUTH_MALFORMED,
    R503_ALREADY_AUTHENTICATED,
    R503_ALREADY_TLS,
    R504_UNKNOWN_MECHANISM,
    R530_AUTH_REQUIRED,
    R535_AUTH_FAILED,
    R538_ENCRYPTION_REQUIRED,
    R550_SENDER_NOT_OWNED,
    R221_BYE,
    R250_DELIVERED,
    R250_EHLO,
    R250_HELO,
    R250_OK,
    R250_RECIPIENT_OK,
    R250_SENDER_OK,
    R252_CANNOT_VRFY,
    R354_START_DATA,
    R421_SHUTTING_DOWN,
    R421_TIMEOUT,
    R421_TOO_MANY_ERRORS,
    R451_LOCAL_ERROR,
    R452_INSUFFICIENT_STORAGE,
    R452_TOO_MANY_RECIPIENTS,
    R500_AUTH_LINE_TOO_LONG,
    R500_LINE_TOO_LONG,
    R500_TEXT_LINE_TOO_LONG,
    R500_UNKNOWN_COMMAND,
    R501_BAD_RECIPIENT_ADDRESS,
    R501_BAD_SENDER_ADDRESS,
    R501_BAD_PARAMETER,
    R501_SYNTAX,
    R502_NOT_IMPLEMENTED,
    R503_BAD_SEQUENCE,
    R503_WRONG_STATE,
    R550_BARE_LINE_END,
    R550_NO_SUCH_USER,
    R550_RELAY_DENIED,
    R550_SENDER_NEEDS_SMTPUTF8,
    R552_TOO_BIG,
    R553_RECIPIENT_NEEDS_SMTPUTF8,
    R554_NO_VALID_RECIPIENTS,
    R555_UNKNOWN_PARAMETER,
    CommandError,
    Reply,
)
from pymailsrv.session import AddressBlocked, Session, in_networks
from pymailsrv.storage import IncomingMessage, InsufficientStorage, StorageError
from pymailsrv.users import UserError, check_user_name

if TYPE_CHECKING:
    from pymailsrv.server import ServerContext

log = logging.getLogger("pymailsrv.smtp")

POSTMASTER = "postmaster"

# RFC 4954: the SASL mechanisms AUTH offers. Both send the password itself,
# so AUTH is offered only where that is safe (TLS or a local network), or
# where the site allows it (Session.plaintext_auth_allowed).
SASL_MECHANISMS = ("PLAIN", "LOGIN")

# RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF, "not
# counting the leading dot duplicated for transparency". The transport reads
# up to SMTP_TEXT_LINE_MAX (1001) to leave room for that dot; a line that
# carries none must still stop at 1000.
TEXT_LINE_OCTETS = SMTP_TEXT_LINE_MAX - 1

# A client's EHLO/HELO name: printable, no spaces. RFC 5321 §4.1.2 allows
# only letters, digits and hyphens in a domain's labels ("the underscore
# character is not permitted") and would have a command that breaks that
# refused with 501; but clients send names that are no domain
# ("my_laptop"), and we take them, as MTAs commonly do. (§4.1.4 only keeps
# a server from refusing mail because the name does not match the client's
# address, which we never check.) UTF-8 is tolerated, though RFC 6531
# §3.7.1 has clients send only ASCII (LDH or A-label) names in EHLO;
# control characters are not.
_CLIENT_NAME = re.compile(with_utf8_text(VCHAR) + "+")
# What of a client's name that is no domain may NOT go into the comment of
# a Received: header, and shows as "?" there (as Postfix's printable()
# shows what it may not print): anything but letters, digits, ".", "_" and
# "-". A ";" would end the "from" clause for a parser that splits there, a
# "(" or ")" the comment.
_UNSAFE_IN_RECEIVED = re.compile(r"[^A-Za-z0-9._-]")
# How much of the client's name a greeting echoes. Any reply line is made
# ASCII and cut to 512 octets anyway (replies.reply_line); this keeps the
# greeting short enough to read.
CLIENT_NAME_ECHO_MAX = 100


def _echoed_name(name: str) -> str:
    """The client's name as a greeting echoes it, cut to CLIENT_NAME_ECHO_MAX characters."""
    return name if len(name) <= CLIENT_NAME_ECHO_MAX else name[:CLIENT_NAME_ECHO_MAX] + "..."


class SmtpState(enum.Enum):
    CONNECTED = "CONNECTED"  # greeted by us, waiting for EHLO/HELO
    GREETED = "GREETED"  # EHLO/HELO done, no transaction open
    MAIL = "MAIL"  # MAIL accepted: a transaction is open
    RCPT = "RCPT"  # at least one recipient accepted
    DATA = "DATA"  # reading the message text


@dataclass
class Envelope:
    """One mail transaction (RFC 5321 §3.3)."""

    reverse_path: Address | None = None  # None is the null path <> (bounces)
    forward_paths: list[Address] = field(default_factory=list)  # as RCPT gave them
    # Where the message goes, aliases expanded: the user names of local
    # mailboxes, and outside addresses (from RCPT, or from an alias) for
    # the outbound queue; each once.
    local_users: list[str] = field(default_factory=list)
    relay_recipients: list[str] = field(default_factory=list)
    rejected_recipients: int = 0  # only to answer DATA 554 rather than 503 (§3.3)
    smtputf8: bool = False  # RFC 6531: the client may use UTF-8 addresses


class Spool:
    """Where one message's text goes as it arrives: the local users' Maildirs,
    the outbound queue (relay.py), or both.

    ``commit`` queues the outside copy held (its envelope waits on disk in
    the queue's tmp/, where no relay, in this process or another, looks),
    then delivers locally; if the local delivery fails the held copy is
    taken back, so a 451 leaves nothing behind, and nothing went out
    (RFC 5321 §6.1: 250 means the whole message is our responsibility).
    Only then does ``release`` queue it, durably, for the relay, and the
    client hears 250. A crash before that leaves the copy held, and never
    sent: the client heard no 250 and will send the message again. Should
    ``release`` itself fail, the client hears 451 with the local copies
    already in, and they arrive twice: the lesser harm, as they stay on
    this server.
    """

    def __init__(self, context: ServerContext, envelope: Envelope) -> None:
        self._queue = context.queue
        self._local = context.store.receive(envelope.local_users) if envelope.local_users else None
        self._outbound: IncomingMessage | None = None
        try:
            if envelope.relay_recipients:
                self._outbound = self._queue.receive()
        except StorageError:
            self.discard()
            raise
        # The id quoted in our 250: the Maildir copy's if there is one, else the queue entry's.
        self.queue_id = (self._local or self._outbound).queue_id

    def _parts(self) -> list[IncomingMessage]:
        return [part for part in (self._local, self._outbound) if part is not None]

    def write(self, data: bytes) -> None:
        for part in self._parts():
            part.write(data)

    def commit(self, envelope: Envelope) -> str:
        queued = None
        if self._outbound is not None:
            queued = self._outbound.commit(str(envelope.reverse_path or ""), envelope.relay_recipients,
                                           held=True)
        if self._local is not None:
            try:
                self._local.commit()
            except BaseException:  # whatever it was, the client hears no 250: take the copy back
                if queued is not None:
                    self._queue.take_back(queued)
                raise
        if queued is not None:
            self._queue.release(queued)
        return self.queue_id

    def discard(self) -> None:
        for part in self._parts():
            part.discard()


class MessageText:
    """The text after DATA, one line at a time (RFC 5321 §4.1.1.4, §4.5.2).

    The transport splits input at LF, so each line arrives with its own end:
    CRLF, or a bare LF. The text ends only at a line ".\\r\\n" that follows a
    line which itself ended in CRLF - the ``<CRLF>.<CRLF>`` of §4.1.1.4.
    SMTP smuggling (CVE-2023-51764) relies on a server also accepting
    ``<LF>.<LF>``, ``<LF>.<CRLF>``, ``<CRLF>.<LF>`` or ``<CR>.<CR>``: a
    relay ahead of us passes such a sequence along as text, and if we took
    it for the end, what follows would run as a second, forged message.
    Here none of them ends anything.

    Bare line ends (RFC 5321 §2.3.8 allows only CRLF) follow the
    ``smtp.bare_newline`` setting: ``normalize``, the default, treats a bare
    LF as a line end, as Postfix 3.9's default does, though §4.1.1.4 says
    servers "MUST NOT do this": mail programs still send them, and refusing
    their mail helps nobody. A bare CR is a line end too (where Postfix
    keeps it as text), except CRs just before a line end, which are part of it;
    ``reject`` refuses the message once it has been read to its end. Either
    way a bare CR is never stored as such, for POP3 sends a message line by
    line. A line too long, a message too big or a storage failure
    also refuse the message only at the end, so the session stays in step.
    Text is stored with LF line ends, the Maildir convention.
    """

    def __init__(self, sink: IncomingMessage | Spool, max_size: int, normalize_bare_newlines: bool) -> None:
        self._sink = sink  # where the stored text is written: the session's Spool
        self._max_size = max_size
        self._normalize = normalize_bare_newlines
        self._after_crlf = True  # the DATA command line itself ended in CRLF
        self.lines_read = 0
        self.octets_read = 0  # as sent, for the trace
        self.octets = 0  # RFC 1870 §5's message size, for the size limit (see _store)
        self.line_too_long = False
        self.too_big = False
        self.bare_line_end: str | None = None  # "LF" or "CR", the first seen
        self.storage_error: StorageError | None = None

    def feed_block(self, block: bytes, too_long: bool) -> int | None:
        """Take whole lines at once; the offset just past the end line, or None.

        Most text is plain: CRLF line ends, no line too long. The plain
        lines up to the next one that starts with a dot - the end line, or
        one whose dot the client doubled - are stored in one piece, each
        CRLF made LF. A dotted line, and a run of lines with anything else
        in it, go through ``feed`` a line at a time.
        """
        offset = 0
        while offset < len(block):
            run_end = self._run_end(block, offset)
            run = block[offset:run_end]
            stored = None if too_long or run.startswith(b".") else self._stored_if_plain(run)
            if stored is not None:
                self.lines_read += len(run) - len(stored)  # each line's CRLF became one LF
                self.octets_read += len(run)
                self._after_crlf = True
                self._store(stored)
            else:
                line_start = offset
                while line_start < run_end:
                    # find() gives -1 where there is no LF: +1 makes it 0, false, so "or" takes the end.
                    line_end = block.find(b"\n", line_start, run_end) + 1 or run_end
                    if self.feed(block[line_start:line_end], too_long):
                        return line_end
                    line_start = line_end
            offset = run_end
        return None

    @staticmethod
    def _run_end(block: bytes, offset: int) -> int:
        """The end of the lines from ``offset`` before the next that starts with a dot;
        a line that starts with one is a run of its own."""
        if block.startswith(b".", offset):
            return block.find(b"\n", offset) + 1 or len(block)
        return block.find(b"\n.", offset) + 1 or len(block)

    @staticmethod
    def _stored_if_plain(run: bytes) -> bytes | None:
        """The run with each CRLF made LF, if it is plain: only CRLF line
        ends, and no line over the limit. Otherwise None.

        Split at CRLF, a plain run leaves no CR or LF in any piece, and an
        empty last piece after its final CRLF. One split and two joins take
        a third of the time that counting CRs, LFs and CRLFs, then
        replacing CRLF, did (on 64 KB of text), and a 100 KB message spends
        most of its Python time here.
        """
        lines = run.split(b"\r\n")
        if lines[-1] or max(map(len, lines)) > TEXT_LINE_OCTETS - len(b"\r\n"):
            return None
        contents = b"".join(lines)
        if b"\r" in contents or b"\n" in contents:
            return None
        return b"\n".join(lines)

    def feed(self, line: bytes, too_long: bool) -> bool:
        """Take one line as read; True if it was the end of the text."""
        if line == b".\r\n" and self._after_crlf and not too_long:
            return True
        self.lines_read += 1
        self.octets_read += len(line)
        if line.endswith(b"\r\n"):
            content, self._after_crlf = line[:-2], True
        else:
            content, self._after_crlf = line[:-1], False
            self._saw_bare("LF")
        if len(line) - line.startswith(b".") > TEXT_LINE_OCTETS:
            too_long = True
        if too_long:
            self.line_too_long = True
            return False
        # RFC 5321 §4.5.2: the client doubled a leading dot; undo that.
        if content.startswith(b".") and len(content) > 1:
            content = content[1:]
        if b"\r" in content:
            self._saw_bare("CR")
            # CRs just before the line end go with it: some clients end lines
            # with CR CR LF, and a LF for each CR would end the header
            # section early, making the rest of the header body text.
            content = content.rstrip(b"\r").replace(b"\r", b"\n")
        self._store(content + b"\n")
        return False

    def _saw_bare(self, what: str) -> None:
        if self.bare_line_end is None:
            self.bare_line_end = what

    def _store(self, data: bytes) -> None:
        if self.refusal() is not None:
            return  # the message will be refused: stop writing, keep reading
        # RFC 1870 §5: the size is "the number of octets, including CR-LF
        # pairs" the client sends, less the dots it doubled. The text comes
        # here with a LF for each CRLF, so each counts one octet more.
        self.octets += len(data) + data.count(b"\n")
        if self.octets > self._max_size:
            self.too_big = True
            return
        self.write_unmetered(data)

    def write_unmetered(self, data: bytes) -> None:
        """Write ``data`` without counting it against the size limit: the
        text as counted, or the trace header we put before it."""
        try:
            self._sink.write(data)
        except StorageError as error:
            self.storage_error = error

    def refusal(self) -> Reply | None:
        """The reply that refuses this text, or None if it may be delivered."""
        if self.storage_error is not None:
            return _storage_refusal(self.storage_error)
        if self.line_too_long:
            return R500_TEXT_LINE_TOO_LONG
        if self.too_big:
            return R552_TOO_BIG
        if self.bare_line_end and not self._normalize:
            return R550_BARE_LINE_END.format(char=self.bare_line_end)
        return None


def _storage_refusal(error: StorageError) -> Reply:
    # RFC 3463 §3.4: X.3.1 "mail system full"; anything else is X.3.0.
    return R452_INSUFFICIENT_STORAGE if isinstance(error, InsufficientStorage) else R451_LOCAL_ERROR


class SmtpSession(Session):
    protocol = "smtp"
    UNKNOWN_COMMAND = R500_UNKNOWN_COMMAND
    WRONG_STATE = R503_WRONG_STATE
    SYNTAX_ERROR = R501_SYNTAX
    LINE_TOO_LONG = R500_LINE_TOO_LONG
    INTERNAL_ERROR = R451_LOCAL_ERROR
    TOO_MANY_CONNECTIONS = R421_TOO_MANY_CONNECTIONS
    SASL_CANCELLED = R501_AUTH_CANCELLED
    SASL_MALFORMED = R501_AUTH_MALFORMED
    SASL_LINE_TOO_LONG = R500_AUTH_LINE_TOO_LONG
    LOGIN_UNAVAILABLE = R454_TEMPORARY_AUTH_FAILURE

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.client_name: str | None = None  # from EHLO/HELO
        self.esmtp = False  # EHLO (not HELO) was used
        self.envelope = Envelope()
        self.text: MessageText | None = None
        self._spool: Spool | None = None  # the text's destination, from DATA until it is committed
        self.auth_failures = 0

    # --- what the base class asks of a protocol ------------------------------

    def initial_state(self) -> SmtpState:
        return SmtpState.CONNECTED

    def greeting(self) -> Reply:
        return R220_GREETING.format(host=self.settings.hostname)

    def timed_out(self) -> Reply:
        return R421_TIMEOUT.format(host=self.settings.hostname)

    def shutting_down(self) -> Reply:
        return R421_SHUTTING_DOWN.format(host=self.settings.hostname)

    def command_line_limit(self) -> int:
        """The longest line the transport reads: a text line, or a command line
        with room for MAIL's and RCPT's parameters (``dispatch`` holds every
        other verb to RFC 5321's 512 octets)."""
        if self.state is SmtpState.DATA:
            return SMTP_TEXT_LINE_MAX
        return SMTP_COMMAND_LINE_MAX + SMTP_COMMAND_LINE_EXTENSION_ALLOWANCE

    @property
    def timeout(self) -> float:
        if self.state is SmtpState.DATA:
            return self.settings.smtp.data_timeout
        return self.settings.smtp.command_timeout

    def max_errors(self) -> int:
        return SMTP_MAX_ERRORS

    def too_many_errors(self, last_error: Reply) -> Reply:
        # RFC 5321 §7.8 lets a server close "after generating an appropriate
        # number of 5yz" replies, a defence against attack (where §3.8 would
        # not have it close over commands it does not understand); §3.8's
        # unasked 421 says why. The client still sees its SMTP_MAX_ERRORS-th error first.
        return last_error.followed_by(R421_TOO_MANY_ERRORS.format(host=self.settings.hostname))

    def is_error(self, reply: Reply) -> bool:
        # RFC 5321 §4.5.3.1.10: the client is to send recipients refused with
        # 452 in a later transaction. A pipelining client has sent them all
        # before it sees the first 452; counting them would close the session
        # and lose the recipients already accepted (Postfix does not count
        # them either: smtpd_recipient_overshoot_limit).
        return reply.refused and not reply.made_from(R452_TOO_MANY_RECIPIENTS)

    def take_text(self, block: bytes, too_long: bool) -> tuple[Reply | None, bytes]:
        """Message text, for ``Session.handle_text`` (after DATA's 354).

        ``block`` is whole lines as the transport read them; ``too_long``
        says it is one line, cut at SMTP_TEXT_LINE_MAX (the transport hands
        such a line alone). Returns the reply once <CRLF>.<CRLF> has come
        (else None), and what came after that line: pipelined commands, which
        the transport reads next as commands.
        """
        end = self.text.feed_block(block, too_long)
        if end is None:
            return None, b""
        return self._end_of_text(), block[end:]

    def close(self) -> None:
        self._discard_text()

    def tls_started(self) -> None:
        """RFC 3207 §4.2: forget everything the client said before TLS, EHLO included."""
        super().tls_started()
        self.client_name = None
        self.esmtp = False
        self.user = None
        self._reset_transaction()

    def dispatch(self, line: bytes, too_long: bool = False) -> Reply:
        # RFC 5321 §4.5.3.1.4 allows 512 octets; RFC 1870 §3 (+26) and RFC
        # 6531 §3.1 item 5 (+10) give MAIL room for its parameters. We give
        # more, and to RCPT too (a UTF-8 path is longer), but to no other.
        if len(line) > SMTP_COMMAND_LINE_MAX and line[:4].upper() not in (b"MAIL", b"RCPT"):
            too_long = True
        reply = super().dispatch(line, too_long)
        if (reply.refused and reply.after is After.CONTINUE and self.last_command is not None
                and self.last_command.verb == "DATA" and self.client_is_ahead()):
            # RFC 2920 §3.1: DATA ends a pipelined group, and its text waits
            # for 354. Sent already, to a DATA refused, the text would be read
            # as commands: a MAIL, RCPT and DATA in it would send mail the
            # client never meant (Postfix's smtpd_forbid_unauth_pipelining
            # ends such sessions too).
            return reply.followed_by(R421_TEXT_BEFORE_354.format(host=self.settings.hostname))
        return reply

    # --- helpers -----------------------------------------------------------------

    def _no_argument(self, verb: str, argument: str) -> None:
        """Refuse an argument to a verb whose syntax has none (DATA, RSET,
        QUIT in RFC 5321 §4.1.1): 501, a syntax error in parameters (§4.2.2)."""
        if argument.strip(ASCII_WHITESPACE):
            raise self._syntax_error(verb)

    def _client_name_from(self, verb: str, argument: str) -> str:
        words = ascii_words(argument)
        if len(words) != 1 or not _CLIENT_NAME.fullmatch(words[0]):
            raise self._syntax_error(verb)
        return words[0]

    def _path_argument(self, verb: str, keyword: str, argument: str, reverse_path: bool
                       ) -> tuple[Address | None, dict[str, str | None]]:
        """Parse "FROM:<path> params" / "TO:<path> params" (RFC 5321 §4.1.1.2-3)."""
        head, colon, rest = argument.partition(":")
        if not colon or ascii_upper(head.strip(ASCII_WHITESPACE)) != keyword:
            raise self._syntax_error(verb)
        try:
            address, parameter_text = parse_path(rest, reverse_path=reverse_path)
        except PathError as error:
            bad_address = R501_BAD_SENDER_ADDRESS if reverse_path else R501_BAD_RECIPIENT_ADDRESS
            raise CommandError(bad_address.format(detail=error)) from None
        # A malformed parameter is a bad argument (X.5.4), not a bad address (X.1.3).
        try:
            parameters = parse_parameters(parameter_text)
        except PathError as error:
            raise CommandError(R501_BAD_PARAMETER.format(detail=error)) from None
        return address, parameters

    def _reset_transaction(self) -> None:
        """End the transaction in progress, if any (RSET, EHLO, HELO, STARTTLS,
        the end of DATA): back to GREETED, or CONNECTED where no EHLO or HELO
        stands (the callers set or clear ``client_name`` first)."""
        self._discard_text()
        self.envelope = Envelope()
        self.enter(SmtpState.GREETED if self.client_name else SmtpState.CONNECTED)

    def _discard_text(self) -> None:
        """Throw away the text being received, if any, and read commands again."""
        if self._spool is not None:
            self._spool.discard()
            self._spool = None
        self.text = None
        self.expect_lines(None)

    def extensions(self) -> list[str]:
        """The EHLO keywords (RFC 5321 §4.1.1.1), in the order we list them."""
        return [
            "PIPELINING",  # RFC 2920: the transport answers pipelined groups in order
            f"SIZE {self.settings.smtp.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "ENHANCEDSTATUSCODES",  # RFC 2034
            "SMTPUTF8",  # RFC 6531
            *self.commands.capabilities(self),  # STARTTLS and AUTH when offered, HELP
        ]

    # --- the session: EHLO, HELO, RSET, NOOP, QUIT, HELP, VRFY, EXPN ----------

    def do_ehlo(self, argument: str) -> Reply:
        """EHLO domain (RFC 5321 §4.1.1.1): greet, and list the extensions."""
        # The name is checked before anything is reset: after a refused EHLO
        # "the SMTP server MUST stay in the same state" (§4.1.4).
        self.client_name = self._client_name_from("EHLO", argument)
        self.esmtp = True
        self._reset_transaction()
        lines = [f"{self.settings.hostname} greets {_echoed_name(self.client_name)}", *self.extensions()]
        return R250_EHLO.format(lines="\n".join(lines))

    def do_helo(self, argument: str) -> Reply:
        """HELO domain (RFC 5321 §4.1.1.1): greet, plain SMTP without extensions."""
        self.client_name = self._client_name_from("HELO", argument)
        self.esmtp = False
        self._reset_transaction()
        return R250_HELO.format(host=self.settings.hostname, client=_echoed_name(self.client_name))

    def do_rset(self, argument: str) -> Reply:
        """RSET (RFC 5321 §4.1.1.5): abort the transaction, keep the greeting."""
        self._no_argument("RSET", argument)
        self._reset_transaction()
        return R250_OK

    def do_noop(self, argument: str) -> Reply:
        """NOOP [string] (RFC 5321 §4.1.1.9): the argument is ignored."""
        return R250_OK

    def do_quit(self, argument: str) -> Reply:
        """QUIT (RFC 5321 §4.1.1.10): takes no argument."""
        self._no_argument("QUIT", argument)
        return R221_BYE.format(host=self.settings.hostname)

    def do_help(self, argument: str) -> Reply:
        """HELP [string] (RFC 5321 §4.1.1.8): from the command table."""
        command = self.commands.find(argument.strip(ASCII_WHITESPACE))
        if command is None:  # no argument, or not a verb: every command offered now, as EHLO lists them
            commands = [command for command in self.commands if command.offered_to(self)]
        else:
            commands = [command]
        # Reply text is US-ASCII (RFC 5321 §4.2): no section sign on the wire.
        text = "\n".join(f"{command.syntax}  ({command.rfc.replace('§', 'section ')})"
                         for command in commands)
        return R214_HELP.format(text=text)

    # --- TLS and authentication (RFC 3207, RFC 4954) ------------------------------

    def do_starttls(self, argument: str) -> Reply:
        """STARTTLS (RFC 3207 §4): the TLS handshake, then the session starts afresh."""
        self._no_argument("STARTTLS", argument)
        if self.tls:
            raise CommandError(R503_ALREADY_TLS)
        if self.context.tls is None:
            raise CommandError(R502_NOT_IMPLEMENTED.format(verb="STARTTLS"))
        return R220_READY_FOR_TLS

    def do_auth(self, argument: str) -> Reply:
        """AUTH mechanism [initial-response] (RFC 4954 §4)."""
        words = ascii_words(argument)
        if not 1 <= len(words) <= 2:
            raise self._syntax_error("AUTH")
        if self.user is not None:
            raise CommandError(R503_ALREADY_AUTHENTICATED)
        mechanism = ascii_upper(words[0])
        if mechanism not in SASL_MECHANISMS:
            raise CommandError(R504_UNKNOWN_MECHANISM)
        if not self.plaintext_auth_allowed():
            raise CommandError(R538_ENCRYPTION_REQUIRED)
        return self.start_sasl(mechanism, words[1] if len(words) == 2 else None)

    def sasl_challenge(self, challenge: str) -> Reply:
        """For Session.start_sasl: a challenge as SMTP sends it (334, RFC 4954 §4)."""
        return R334_CHALLENGE.format(challenge=challenge)

    def sasl_finished(self, credentials: Credentials) -> Reply:
        """For Session.start_sasl: the exchange gave credentials; log in, or refuse."""
        # One failed-login delay for both protocols; the setting lives under [pop3].
        delay = self.settings.pop3.failed_login_delay
        try:
            user = self.check_login(credentials.user, credentials.check(self.context.users))
        except AddressBlocked:
            return R454_ADDRESS_BLOCKED.delayed(delay)
        if user is None:
            self.auth_failures += 1
            if self.auth_failures >= self.settings.auth.max_failures_per_connection:
                return R535_AUTH_FAILED.delayed(delay).followed_by(
                    R421_TOO_MANY_AUTH_FAILURES.format(host=self.settings.hostname))
            return R535_AUTH_FAILED.delayed(delay)
        self.user = user
        return R235_AUTHENTICATED

    def do_vrfy(self, argument: str) -> Reply:
        """VRFY string (RFC 5321 §3.5.3, §7.3): 252, so nobody can list our users."""
        if not argument.strip(ASCII_WHITESPACE):
            raise self._syntax_error("VRFY")
        return R252_CANNOT_VRFY

    def do_expn(self, argument: str) -> Reply:
        """EXPN string (RFC 5321 §4.1.1.7): 502, not implemented, as Postfix answers."""
        # EXPN is a SHOULD (§3.5.2), and §4.2.4 gives 502 to a command that is
        # recognized but not implemented. §7.3's 252 is for a server that has
        # EXPN and turns it off for security; we never implemented it.
        return R502_NOT_IMPLEMENTED.format(verb="EXPN")

    # --- the transaction: MAIL, RCPT, DATA ----------------------------------------

    def do_mail(self, argument: str) -> Reply:
        """MAIL FROM:<reverse-path> [parameters] (RFC 5321 §4.1.1.2)."""
        sender, parameters = self._path_argument("MAIL", "FROM", argument, reverse_path=True)
        if self.user is not None and not self.may_send_as(sender):
            raise CommandError(R550_SENDER_NOT_OWNED.format(address=sender or "", user=self.user))
        # Built aside and taken only once all is well: after a refused MAIL
        # the server "MUST stay in the same state" (§4.1.4).
        envelope = Envelope(reverse_path=sender)
        for keyword, value in parameters.items():
            self._mail_parameter(envelope, keyword, value)
        if sender is not None and not sender.is_ascii and not envelope.smtputf8:
            raise CommandError(R550_SENDER_NEEDS_SMTPUTF8)
        self.envelope = envelope
        self.enter(SmtpState.MAIL)
        return R250_SENDER_OK.format(address=sender or "")

    def may_send_as(self, sender: Address | None) -> bool:
        """May the logged-in user give ``sender`` in MAIL?

        Here, on the port other servers send to, a login may be another
        MTA's, relaying mail with its own senders: forwarded mail, and
        notifications from <> (RFC 5321 §4.5.5). Only an address of our own
        domains is kept to its owner, so that a login here cannot send as
        another of our users (Postfix's reject_known_sender_login_mismatch).
        """
        return sender is None or not self._is_local_domain(sender.domain) or self._owns(sender)

    def _owns(self, sender: Address) -> bool:
        """Is ``sender`` the logged-in user's own name, or an alias that delivers to them?

        Their own name stays theirs when an alias of that name sends its mail
        elsewhere (a user who forwards everything still sends as themselves).
        """
        local_part = unquoted_local_part(sender.local_part)
        try:
            # As users.py spells a name, never by str.lower() alone: KELVIN
            # SIGN lower-cases to "k", and would be a second spelling of it.
            if check_user_name(local_part) == self.user:
                return True
        except UserError:
            pass
        return self.user in self.context.aliases.expand(local_part).users

    def _mail_parameter(self, envelope: Envelope, keyword: str, value: str | None) -> None:
        """Check one MAIL parameter of the extensions we offer."""
        if keyword == "SIZE":  # RFC 1870 §6
            if value is None or not is_decimal(value):
                raise CommandError(R501_SYNTAX.format(syntax="SIZE=<octets>"))
            if int(value) > self.settings.smtp.max_message_size:
                raise CommandError(R552_TOO_BIG)
        elif keyword == "BODY":  # RFC 6152 §2: 7BIT or 8BITMIME; both stored alike
            if value is None or ascii_upper(value) not in ("7BIT", "8BITMIME"):
                raise CommandError(R501_SYNTAX.format(syntax="BODY=7BIT|8BITMIME"))
        elif keyword == "SMTPUTF8":  # RFC 6531 §3.4: takes no value
            if value is not None:
                raise CommandError(R501_SYNTAX.format(syntax="SMTPUTF8"))
            envelope.smtputf8 = True
        elif keyword == "AUTH" and value is not None:
            pass  # RFC 4954 §5: who the client says submitted it; we trust only our own AUTH
        else:
            raise CommandError(R555_UNKNOWN_PARAMETER.format(parameter=keyword))

    def do_rcpt(self, argument: str) -> Reply:
        """RCPT TO:<forward-path> [parameters] (RFC 5321 §4.1.1.3)."""
        try:
            return self._accept_recipient(argument)
        except CommandError:
            self.envelope.rejected_recipients += 1
            raise

    def _accept_recipient(self, argument: str) -> Reply:
        recipient, parameters = self._path_argument("RCPT", "TO", argument, reverse_path=False)
        if parameters:  # we offer no RCPT parameters (no DSN, RFC 3461)
            raise CommandError(R555_UNKNOWN_PARAMETER.format(parameter=next(iter(parameters))))
        if not recipient.is_ascii and not self.envelope.smtputf8:
            raise CommandError(R553_RECIPIENT_NEEDS_SMTPUTF8)
        if len(self.envelope.forward_paths) >= self.settings.smtp.max_recipients:
            raise CommandError(R452_TOO_MANY_RECIPIENTS)  # RFC 5321 §4.5.3.1.10
        users, relay_to = self._route(recipient)
        self.envelope.forward_paths.append(recipient)
        self.envelope.local_users.extend(user for user in users if user not in self.envelope.local_users)
        self.envelope.relay_recipients.extend(
            address for address in relay_to if address not in self.envelope.relay_recipients)
        self.enter(SmtpState.RCPT)
        return R250_RECIPIENT_OK.format(address=recipient)

    def _is_local_domain(self, domain: str) -> bool:
        return in_domains(domain, self.settings.domains)

    def _route(self, recipient: Address) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Where mail for ``recipient`` goes: (local users, addresses to relay
        to); raises CommandError with the refusal. A bare <Postmaster> has no
        domain and is ours."""
        if recipient.domain and not self._is_local_domain(recipient.domain):
            # Relaying is only for clients who logged in or sit in a trusted
            # network; for anyone else we are never an open relay.
            if self.user is not None or in_networks(self.peer[0], self.settings.relay.trusted_networks):
                # In the form with the least quoting (§4.1.2): "bob"@x and
                # bob@x, one mailbox, are then queued once.
                return (), (least_quoted(recipient),)
            raise CommandError(R550_RELAY_DENIED.format(address=recipient))
        local_part = unquoted_local_part(recipient.local_part)
        # Aliases (aliases.py) name users and outside addresses; a plain user
        # name expands to itself. "../x", "a/b" or UTF-8 expand to nothing.
        # Not lower-cased here: str.lower() would turn the Kelvin sign into
        # "k"; user names are checked as ASCII first, then lower-cased.
        expansion = self.context.aliases.expand(local_part)
        if expansion:
            return expansion.users, expansion.external
        if local_part.isascii() and local_part.lower() == POSTMASTER:
            # RFC 5321 §4.5.1: postmaster must be accepted. It is a default
            # alias (aliases.py) for smtp.postmaster or the first user, so we
            # come here only when that names nobody: no user at all yet, a
            # passing state.
            log.error("postmaster mail cannot be delivered: no user to receive it")
            raise CommandError(R451_LOCAL_ERROR)
        raise CommandError(R550_NO_SUCH_USER.format(address=recipient))

    def do_data(self, argument: str) -> Reply:
        """DATA (RFC 5321 §4.1.1.4): 354, then the text up to <CRLF>.<CRLF>."""
        self._no_argument("DATA", argument)
        if not (self.envelope.local_users or self.envelope.relay_recipients):
            if self.envelope.rejected_recipients:
                raise CommandError(R554_NO_VALID_RECIPIENTS)  # RFC 5321 §3.3
            raise CommandError(R503_BAD_SEQUENCE.format(detail="need RCPT first"))
        try:
            self._spool = Spool(self.context, self.envelope)
        except StorageError as error:  # Spool() has taken back whatever it made
            raise CommandError(self._unstored(error)) from None
        self.text = MessageText(self._spool, self.settings.smtp.max_message_size,
                                self.settings.smtp.bare_newline == "normalize")
        # Writing the trace header makes the file in the Maildir's tmp/ (the
        # queue's copy, for a relay, is made with the Spool): done while the
        # client reads our 354, it costs the client no wait. It still comes
        # first, as handle_text runs put-off work before it takes any text.
        # Should it fail, the text is refused once it has ended, as for a
        # failed write later.
        self.later(self._write_trace_header)
        self.expect_text()
        self.enter(SmtpState.DATA)
        return R354_START_DATA

    def _unstored(self, error: StorageError) -> Reply:
        """451, or 452 for a full disk: the refusal of a message we could not
        store. Why goes to the log, as the client is told only that."""
        log.error("smtp session %d: delivery failed: %s", self.session_id, error)
        return _storage_refusal(error)

    def _write_trace_header(self) -> None:
        self.text.write_unmetered(self._trace_header(self._spool.queue_id))

    def _end_of_text(self) -> Reply:
        """<CRLF>.<CRLF> came: refuse the text, or deliver it and say 250."""
        self.context.tracer.client_text(self, self.text.lines_read, self.text.octets_read, b".",
                                        self.text.bare_line_end)
        failed_write = self.text.storage_error
        refusal = self._unstored(failed_write) if failed_write is not None else self.text.refusal()
        try:
            if refusal is not None:
                return self._counted(refusal)
            try:
                queue_id = self._spool.commit(self.envelope)
            except StorageError as error:
                return self._counted(self._unstored(error))
            self._spool = None  # committed: the finally has nothing to throw away
            # A client that delivers is no attacker: its earlier errors (a list's
            # stale addresses, say) are forgiven, as Postfix does (SMTP_MAX_ERRORS).
            self.errors = 0
            # Logged while the client reads the 250: the message is already
            # safe. partial() takes the values now, before the finally below
            # resets the envelope and the text.
            self.later(functools.partial(
                log.info, "delivered %s from <%s> to %s (%d octets)", queue_id, self.envelope.reverse_path or "",
                ", ".join(self.envelope.local_users + self.envelope.relay_recipients), self.text.octets))
            return R250_DELIVERED.format(queue_id=queue_id)
        finally:
            self._reset_transaction()  # throws away a text refused, or not committed

    def _trace_header(self, queue_id: str) -> bytes:
        """Return-Path: and Received: (RFC 5321 §4.4), LF line ends as stored.

        The outbound queue's copy gets them too; relay.py takes Return-Path:
        off again before sending, as §4.4 keeps it for the final delivery.
        """
        envelope = self.envelope
        # RFC 3848 / RFC 6531 §3.7.3: the "with" protocol name, S for TLS, A for AUTH.
        protocol = "SMTP"
        if self.esmtp:
            protocol = ("UTF8SMTP" if envelope.smtputf8 else "ESMTP") + ("S" if self.tls else "") + (
                "A" if self.user else "")
        # The "for" clause names exactly one recipient (§4.4), so only where
        # there is one: naming one of several, in a copy each of them gets,
        # would show a blind copy's recipient to the others (§7.2). As a Path or a Mailbox: a bare
        # <Postmaster> (§4.1.1.3) is neither, having no domain.
        only = envelope.forward_paths[0] if len(envelope.forward_paths) == 1 else None
        recipient = f"\n\tfor <{only}>" if only is not None and only.domain else ""
        date = _date_of_second(int(time.time()))
        header = (f"Return-Path: <{envelope.reverse_path or ''}>\n"
                  f"Received: from {self._received_from()}\n"
                  f"\tby {self.settings.hostname} (pymailsrv) with {protocol} id {queue_id}"
                  f"{recipient}; {date}\n")
        return header.encode("utf-8")

    def _received_from(self) -> str:
        """The "from" clause of our Received: line (RFC 5321 §4.4).

        It names the client by a Domain or an address literal, the client's
        own name where it is one (and ASCII, in mail that is not SMTPUTF8);
        otherwise by its address, with the name it gave in a comment.
        """
        ip, name = self.peer[0], self.client_name
        address = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"  # RFC 5321 §4.1.3
        if is_domain(name) and (name.isascii() or self.envelope.smtputf8):
            return f"{name} ({address})"
        # TCP-info is what the connection told us, never the EHLO name; with
        # no reverse lookup it is the address literal alone, and the name the
        # client gave goes into a comment of its own.
        return f"{address} ({address}) (helo={_UNSAFE_IN_RECEIVED.sub('?', name)})"


@functools.lru_cache(maxsize=1)
def _date_of_second(second: int) -> str:
    """An RFC 5322 §3.3 date for a Received: line. Formatting one costs as
    much as the rest of the header; the mail of one second shares it."""
    return email.utils.formatdate(second, localtime=True)


# --- The command table (RFC 5321 §4.1.1, §4.3.2) ---------------------------

_CONNECTED, _GREETED, _MAIL, _RCPT, _DATA = SmtpState  # in the order SmtpState names them
# Every state that reads commands: in DATA, lines are message text.
_COMMAND_STATES = frozenset({_CONNECTED, _GREETED, _MAIL, _RCPT})

SmtpSession.OTHER_TRANSITIONS = ((_DATA, "<CRLF>.<CRLF>", _GREETED),)

SmtpSession.commands = CommandTable(
    Command("STARTTLS", SmtpSession.do_starttls, frozenset({_CONNECTED, _GREETED}), "STARTTLS",
            "RFC 3207 §4", capability="STARTTLS",
            offered=lambda session: session.context.tls is not None and not session.tls,
            # Made by tls_started() once the handshake is done (RFC 3207 §4.2).
            moves={_CONNECTED: _CONNECTED, _GREETED: _CONNECTED}),
    Command("AUTH", SmtpSession.do_auth, frozenset({_GREETED}), "AUTH mechanism [initial-response]",
            "RFC 4954 §4", capability="AUTH " + " ".join(SASL_MECHANISMS),
            offered=SmtpSession.plaintext_auth_allowed, secret_from=1),
    Command("EHLO", SmtpSession.do_ehlo, _COMMAND_STATES, "EHLO domain", "RFC 5321 §4.1.1.1",
            moves={state: _GREETED for state in _COMMAND_STATES}),
    Command("HELO", SmtpSession.do_helo, _COMMAND_STATES, "HELO domain", "RFC 5321 §4.1.1.1",
            moves={state: _GREETED for state in _COMMAND_STATES}),
    Command("MAIL", SmtpSession.do_mail, frozenset({_GREETED}),
            "MAIL FROM:<reverse-path> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]", "RFC 5321 §4.1.1.2",
            moves={_GREETED: _MAIL}),
    Command("RCPT", SmtpSession.do_rcpt, frozenset({_MAIL, _RCPT}), "RCPT TO:<forward-path>",
            "RFC 5321 §4.1.1.3", moves={_MAIL: _RCPT, _RCPT: _RCPT}),
    # Valid in MAIL too, only to be refused precisely: 554 where every RCPT
    # was refused, else 503 (§3.3).
    Command("DATA", SmtpSession.do_data, frozenset({_MAIL, _RCPT}), "DATA", "RFC 5321 §4.1.1.4",
            moves={_RCPT: _DATA}),
    Command("RSET", SmtpSession.do_rset, _COMMAND_STATES, "RSET", "RFC 5321 §4.1.1.5",
            moves={_MAIL: _GREETED, _RCPT: _GREETED}),
    Command("VRFY", SmtpSession.do_vrfy, _COMMAND_STATES, "VRFY string", "RFC 5321 §4.1.1.6"),
    # Known, to be answered 502 (do_expn), but never offered: HELP leaves it out.
    Command("EXPN", SmtpSession.do_expn, _COMMAND_STATES, "EXPN string", "RFC 5321 §4.1.1.7",
            offered=lambda session: False),
    # RFC 5321 §4.1.1.1: EHLO lists every command we offer beyond §4.5.1's required ones.
    Command("HELP", SmtpSession.do_help, _COMMAND_STATES, "HELP [string]", "RFC 5321 §4.1.1.8",
            capability="HELP"),
    Command("NOOP", SmtpSession.do_noop, _COMMAND_STATES, "NOOP [string]", "RFC 5321 §4.1.1.9"),
    Command("QUIT", SmtpSession.do_quit, _COMMAND_STATES, "QUIT", "RFC 5321 §4.1.1.10",
            moves={state: None for state in _COMMAND_STATES}),  # the 221 closes the connection
)


class SubmissionSession(SmtpSession):
    """Message submission (RFC 6409): the port a user's mail program sends through.

    The same SMTP, with two rules more: MAIL needs a logged-in user (RFC
    6409 §4.3, answered 530 as RFC 4954 §6 says), and that user may send
    only as themselves (§6.1). The implicit-TLS port (465) is submission too
    (RFC 8314 §3.3).
    """

    def do_mail(self, argument: str) -> Reply:
        """MAIL FROM:<reverse-path> (RFC 6409 §4.3): AUTH first."""
        if self.user is None:
            raise CommandError(R530_AUTH_REQUIRED)
        return super().do_mail(argument)

    def may_send_as(self, sender: Address | None) -> bool:
        """RFC 6409 §6.1: the user's own address, or an alias that delivers to
        them, in one of our domains; or <>, which a mail program gives a read
        receipt (RFC 5321 §4.5.5) and which names nobody."""
        return sender is None or self._is_local_domain(sender.domain) and self._owns(sender)


# The rows hold SmtpSession's functions, so a handler overridden here needs
# its row replaced too; helpers called through self (may_send_as) need none.
SubmissionSession.commands = CommandTable(*(
    dataclasses.replace(command, handler=SubmissionSession.do_mail) if command.verb == "MAIL" else command
    for command in SmtpSession.commands))
