"""POP3: the Post Office Protocol, version 3 (RFC 1939, RFC 2449, RFC 3206).

Read this module beside RFC 1939. A POP3 session moves through three states
(RFC 1939 §3)::

    connect --> AUTHORIZATION --USER+PASS / APOP / AUTH--> TRANSACTION --QUIT--> UPDATE --> close
                      |                                          |
                      +--QUIT--> close                           +--(connection lost)--> close, nothing deleted

* AUTHORIZATION (§4): the client names itself with USER and PASS or APOP
  (§7), or AUTH (RFC 5034 §4).
  Before saying ``+OK`` we take the maildrop lock (§4) and a *snapshot*:
  the messages present now, their sizes and unique ids. Mail that arrives
  during the session is not in the snapshot, so message numbers never change.
* TRANSACTION (§5; TOP and UIDL: §7): STAT, LIST, RETR, DELE, NOOP, RSET,
  TOP, UIDL (and the obsolete LAST of RFC 1460). DELE only *marks* a message.
* UPDATE (§6): entered only by QUIT from TRANSACTION. Only here are the
  marked messages removed. A client that disconnects without QUIT never
  reaches UPDATE, so nothing it marked is deleted.

Three ways to name a message, kept apart on purpose (Dovecot's glossary):

* ``msg_number``: 1..n, as on the wire ("RETR 3");
* ``index``: 0..n-1, the position in the snapshot (``msg_number - 1``);
* ``key``: the store's own name for the message; only storage reads it.

A message is *live* while it is in the snapshot and not marked by DELE:
only live messages are counted, listed or may be named (RFC 1939 §5).

``_index()`` is the one place a msg_number from the client becomes an index.
The command table at the foot of the module drives dispatch, CAPA and the
state diagram; every handler returns a reply from ``replies.py``.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator

from pymailsrv import __version__
from pymailsrv.auth import Credentials
from pymailsrv.commands import Command, CommandTable, ascii_upper, ascii_words, is_decimal
from pymailsrv.limits import (
    POP3_MAX_BAD_COMMANDS_AFTER_LOGIN,
    POP3_MAX_BAD_COMMANDS_BEFORE_LOGIN,
)
from pymailsrv.replies import (
    CRLF,
    POP3_ADDRESS_BLOCKED,
    POP3_ALREADY_TLS,
    POP3_AUTH_CANCELLED,
    POP3_AUTH_FAILED,
    POP3_AUTH_MALFORMED,
    POP3_BEGIN_TLS,
    POP3_CHALLENGE,
    POP3_MECHANISMS_FOLLOW,
    POP3_PRIVACY_REQUIRED,
    POP3_PRIVACY_REQUIRED_NO_TLS,
    POP3_TLS_UNAVAILABLE,
    POP3_UNSUPPORTED_MECHANISM,
    POP3_AUTOLOGOUT,
    POP3_CAPABILITIES_FOLLOW,
    POP3_APOP_NOT_OFFERED,
    POP3_GREETING,
    POP3_GREETING_WITH_APOP,
    POP3_IN_USE,
    POP3_LAST,
    POP3_LINE_TOO_LONG,
    POP3_LOGGED_IN,
    POP3_MARKED_DELETED,
    POP3_MESSAGE_DELETED,
    POP3_MESSAGE_FOLLOWS,
    POP3_MESSAGE_UNREADABLE,
    POP3_MESSAGE_VANISHED,
    POP3_NO_SUCH_MESSAGE,
    POP3_NOOP,
    POP3_RESET,
    POP3_SASL_LINE_TOO_LONG,
    POP3_SCAN_LISTING,
    POP3_SCAN_LISTINGS_FOLLOW,
    POP3_SHUTTING_DOWN,
    POP3_SIGNING_OFF,
    POP3_SIGNING_OFF_AFTER_UPDATE,
    POP3_STAT,
    POP3_STORAGE_FAILURE,
    POP3_SYNTAX,
    POP3_TOO_MANY_BAD_COMMANDS,
    POP3_TOO_MANY_FAILED_LOGINS,
    POP3_TOO_MANY_CONNECTIONS,
    POP3_TOO_MANY_SESSIONS,
    POP3_TOP_FOLLOWS,
    POP3_UNIQUE_ID,
    POP3_UNIQUE_IDS_FOLLOW,
    POP3_UNKNOWN_COMMAND,
    POP3_UPDATE_FAILED,
    POP3_USER_ACCEPTED,
    POP3_USER_FIRST,
    POP3_WRONG_STATE,
    CommandError,
    Reply,
    counted,
)
from pymailsrv.session import AddressBlocked, NothingToGuess, Session
from pymailsrv.storage import MaildropLocked, MessageInfo, MessageUnreadable, MessageVanished, StorageError

log = logging.getLogger("pymailsrv.pop3")


class Pop3State(enum.Enum):
    """RFC 1939 §3."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


# RFC 2449 §6: capabilities of the server as a whole. The ones a command
# brings (USER, TOP, UIDL) come from the command table instead.
SESSION_CAPABILITIES = (
    "RESP-CODES",  # §6.4: -ERR replies may carry [CODES]
    "PIPELINING",  # §6.6: the transport answers pipelined commands in order
    "EXPIRE NEVER",  # §6.7: we never delete mail on our own
    "LOGIN-DELAY 0",  # §6.5: a client may log in again at once
    f"IMPLEMENTATION pymailsrv-{__version__}",  # §6.9
    "AUTH-RESP-CODE",  # RFC 3206 §6: [AUTH] on every login refused for its credentials
)

# -ERR replies that do not count as bad commands: every one that carries
# one of these response codes (RFC 2449 §8, RFC 3206). [AUTH] refuses a
# login, and failed logins have a limit of their own; [IN-USE] means "the
# authentication was successful" (RFC 2449 §8.1.2) and the session may be
# "tried again later" (RFC 3206 §3); [SYS/TEMP] and [SYS/PERM] are failures
# on our side.
_UNCOUNTED_CODES = (POP3_AUTH_FAILED.code, POP3_IN_USE.code, POP3_STORAGE_FAILURE.code,
                    POP3_MESSAGE_UNREADABLE.code)
# Nor does asking for a message another program removed meanwhile (mutt,
# say). If it counted, a client fetching a maildrop emptied under it would
# reach the limit before its QUIT, its DELEs would never reach UPDATE, and
# it would download everything again next time.
_UNCOUNTED_REPLIES = (POP3_MESSAGE_VANISHED,)

# RFC 5034: the SASL mechanisms POP3 AUTH offers. PLAIN sends the password,
# so it is offered only where USER/PASS would be (TLS or a local network).
SASL_MECHANISMS = ("PLAIN",)

# RFC 1939 §7: the APOP digest is MD5, written as 32 lower-case hex digits.
_APOP_DIGEST = re.compile(r"[0-9a-f]{32}")


class Pop3Session(Session):
    protocol = "pop3"
    UNKNOWN_COMMAND = POP3_UNKNOWN_COMMAND
    WRONG_STATE = POP3_WRONG_STATE
    SYNTAX_ERROR = POP3_SYNTAX
    LINE_TOO_LONG = POP3_LINE_TOO_LONG
    INTERNAL_ERROR = POP3_STORAGE_FAILURE
    TOO_MANY_CONNECTIONS = POP3_TOO_MANY_CONNECTIONS
    SASL_CANCELLED = POP3_AUTH_CANCELLED
    SASL_MALFORMED = POP3_AUTH_MALFORMED
    SASL_LINE_TOO_LONG = POP3_SASL_LINE_TOO_LONG
    LOGIN_UNAVAILABLE = POP3_STORAGE_FAILURE

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        # RFC 1939 §7: the greeting's timestamp is the APOP challenge; it must
        # be different in every greeting, so it carries a random part. It is
        # there only while some user has an APOP secret, as Dovecot offers
        # APOP only where it is set up: mutt tries APOP whenever a greeting
        # has a timestamp, and each try that cannot succeed would count as a
        # failed login, until the throttle refused even right passwords.
        self.apop_timestamp: str | None = None
        if self.context.users.anyone_has_apop_secret():
            self.apop_timestamp = (f"<{os.getpid()}.{secrets.token_hex(6)}.{int(time.time())}"
                                   f"@{self.settings.hostname}>")
        self.pending_user: str | None = None  # named by USER, awaiting PASS
        self._commands_run_at_user = 0  # commands_run when that USER came
        self.user: str | None = None
        self.maildrop = None
        self.messages: list[MessageInfo] = []  # the snapshot; index = msg_number - 1
        self.deleted: set[int] = set()  # indexes marked by DELE
        self.highest_accessed = 0  # for LAST (RFC 1460) ...
        self.highest_seen_before = 0  # ... which starts here, and RSET goes back to
        self.failed_logins = 0
        self._session_slot: tuple[str, str] | None = None  # counted in context.pop3_sessions

    # --- what the base class asks of a protocol ------------------------------

    def initial_state(self) -> Pop3State:
        return Pop3State.AUTHORIZATION

    def greeting(self) -> Reply:
        if self.apop_timestamp is None:
            return POP3_GREETING
        return POP3_GREETING_WITH_APOP.format(timestamp=self.apop_timestamp)

    def timed_out(self) -> Reply:
        return POP3_AUTOLOGOUT

    def shutting_down(self) -> Reply:
        return POP3_SHUTTING_DOWN

    def command_line_limit(self) -> int:
        return self.settings.pop3.command_line_max

    @property
    def timeout(self) -> float:
        return self.settings.pop3.autologout

    def max_errors(self) -> int:
        # The command that reaches the limit is answered with too_many_errors()
        # instead of its own reply, and the connection closes.
        if self.state is Pop3State.AUTHORIZATION:
            return POP3_MAX_BAD_COMMANDS_BEFORE_LOGIN
        return POP3_MAX_BAD_COMMANDS_AFTER_LOGIN

    def too_many_errors(self, last_error: Reply) -> Reply:
        return POP3_TOO_MANY_BAD_COMMANDS

    def is_error(self, reply: Reply) -> bool:
        """Does this reply count as a bad command?"""
        # Failed logins are counted in _log_in (auth.max_failures_per_connection).
        return (not reply.ok and reply.code not in _UNCOUNTED_CODES
                and not any(reply.made_from(template) for template in _UNCOUNTED_REPLIES))

    def named_user(self) -> str | None:
        return self.user or self.pending_user

    def tls_started(self) -> None:
        super().tls_started()
        # Forget the plaintext USER, as RFC 3207 §4.2 asks of SMTP (RFC 2595
        # §4 asks only the client to forget).
        self.pending_user = None

    def close(self) -> None:
        # RFC 1939 §6: a session that ends without QUIT never enters UPDATE,
        # so the messages marked by DELE stay. We only give up the lock.
        self._release_maildrop()

    def _release_maildrop(self) -> None:
        """Give back the maildrop lock and the session slot (the connection may go on)."""
        if self.maildrop is not None:
            self.maildrop.release()
            self.maildrop = None
        if self._session_slot is not None:
            self.context.pop3_sessions.give_back(self._session_slot)
            self._session_slot = None

    # --- arguments -------------------------------------------------------------

    def _arguments(self, verb: str, argument: str, minimum: int, maximum: int) -> list[str]:
        words = ascii_words(argument)
        if not minimum <= len(words) <= maximum:
            raise self._syntax_error(verb)
        return words

    def _number(self, verb: str, word: str) -> int:
        if not is_decimal(word):
            raise self._syntax_error(verb)
        try:
            return int(word)
        except ValueError:  # CPython's int() takes at most 4300 digits: more than any count here
            return sys.maxsize

    def _index(self, verb: str, word: str) -> int:
        """The index of the live message the client calls ``word`` (a msg_number)."""
        msg_number = self._number(verb, word)
        if not 1 <= msg_number <= len(self.messages):
            raise CommandError(POP3_NO_SUCH_MESSAGE)
        index = msg_number - 1
        if index in self.deleted:
            # RFC 1939 §5: a message marked as deleted may not be referred to.
            raise CommandError(POP3_MESSAGE_DELETED.format(msg_number=msg_number))
        return index

    def _live(self) -> Iterator[tuple[int, MessageInfo]]:
        """(msg_number, message) for every message not marked as deleted."""
        for index, message in enumerate(self.messages):
            if index not in self.deleted:
                yield index + 1, message

    def _totals(self) -> tuple[int, int]:
        live = [message.size for _, message in self._live()]
        return len(live), sum(live)

    def _text(self, index: int) -> Iterator[bytes]:
        try:
            return self.maildrop.text(self.messages[index].key)
        except MessageVanished:
            raise CommandError(POP3_MESSAGE_VANISHED.format(msg_number=index + 1)) from None
        except MessageUnreadable:
            raise CommandError(POP3_MESSAGE_UNREADABLE.format(msg_number=index + 1)) from None

    # --- AUTHORIZATION (RFC 1939 §4, §7) ------------------------------------

    def do_stls(self, argument: str) -> Reply:
        """STLS (RFC 2595 §4): the TLS handshake; the session stays in AUTHORIZATION."""
        # Only the checks are here: POP3_BEGIN_TLS is a .starting_tls() reply,
        # so the transport runs the handshake once the +OK is on the wire
        # (Connection.start_tls), then calls tls_started() above.
        self._arguments("STLS", argument, 0, 0)
        if self.tls:
            raise CommandError(POP3_ALREADY_TLS)
        if self.context.tls is None:
            raise CommandError(POP3_TLS_UNAVAILABLE)
        return POP3_BEGIN_TLS

    def do_user(self, argument: str) -> Reply:
        """USER name (RFC 1939 §7); refused where the password could be overheard."""
        (name,) = self._arguments("USER", argument, 1, 1)
        if not self.plaintext_auth_allowed():
            raise self._no_plaintext_password()
        self.pending_user, self._commands_run_at_user = name, self.commands_run
        return POP3_USER_ACCEPTED

    def _no_plaintext_password(self) -> CommandError:
        """The refusal of a login that would send a password in plaintext: it
        says to use STLS only where the command table offers STLS."""
        stls_offered = self.commands.find("STLS").offered_to(self)
        return CommandError(POP3_PRIVACY_REQUIRED if stls_offered else POP3_PRIVACY_REQUIRED_NO_TLS)

    def do_pass(self, argument: str) -> Reply:
        """PASS string (RFC 1939 §7): straight after USER; the password may contain spaces."""
        name, self.pending_user = self.pending_user, None
        # RFC 1939 §7: PASS "may only be given ... immediately after a
        # successful USER command". dispatch() counts every line, unknown
        # verbs too, before the handler runs, so "immediately after" is one
        # more than at USER. Any PASS, accepted or not, uses the name up.
        if name is None or self.commands_run != self._commands_run_at_user + 1:
            raise CommandError(POP3_USER_FIRST)
        if not argument:
            raise self._syntax_error("PASS")
        return self._log_in(name, lambda user: self.context.users.check_password(user, argument))

    def do_apop(self, argument: str) -> Reply:
        """APOP name digest (RFC 1939 §7): MD5(timestamp + secret), no password sent."""
        name, digest = self._arguments("APOP", argument, 2, 2)
        if self.apop_timestamp is None:
            raise CommandError(POP3_APOP_NOT_OFFERED)

        # A digest of the wrong shape is a wrong answer, a failed login, not a
        # syntax error; checked before hmac.compare_digest, which raises
        # TypeError on non-ASCII text (our failure, SYS/TEMP, to the client).
        def digest_matches(user: str) -> bool:
            secret = self.context.users.apop_secret(user)
            if secret is None:
                # No digest could pass. Clients that try APOP first whenever
                # the greeting offers it (mutt's "apop:user", s-nail) must not
                # use up their address's failed logins on it.
                raise NothingToGuess
            if not _APOP_DIGEST.fullmatch(digest):
                return False
            expected = hashlib.md5((self.apop_timestamp + secret).encode("utf-8")).hexdigest()
            return hmac.compare_digest(expected, digest)

        return self._log_in(name, digest_matches)

    def do_auth(self, argument: str) -> Reply:
        """AUTH mechanism [initial-response] (RFC 5034 §4); a bare AUTH lists the mechanisms."""
        # A bare AUTH is not in RFC 5034, but clients send it, and Dovecot answers it.
        words = self._arguments("AUTH", argument, 0, 2)
        if not words:
            # What CAPA's SASL line lists, asked of the same row: nothing where
            # a password may not go.
            offered = SASL_MECHANISMS if self.commands.find("AUTH").offered_to(self) else ()
            return POP3_MECHANISMS_FOLLOW.with_lines(name.encode("ascii") for name in offered)
        mechanism = ascii_upper(words[0])
        if mechanism not in SASL_MECHANISMS:
            raise CommandError(POP3_UNSUPPORTED_MECHANISM)
        if not self.plaintext_auth_allowed():
            raise self._no_plaintext_password()
        return self.start_sasl(mechanism, words[1] if len(words) == 2 else None)

    def sasl_challenge(self, challenge: str) -> Reply:
        return POP3_CHALLENGE.format(challenge=challenge)

    def sasl_finished(self, credentials: Credentials) -> Reply:
        return self._log_in(credentials.user, credentials.check(self.context.users))

    def _log_in(self, name: str, credentials_valid: Callable[[str], bool]) -> Reply:
        delay = self.settings.pop3.failed_login_delay
        refusal = POP3_AUTH_FAILED
        try:
            user = self.check_login(name, credentials_valid)
        except AddressBlocked:
            user, refusal = None, POP3_ADDRESS_BLOCKED
        if user is None:
            self.failed_logins += 1
            if self.failed_logins >= self.settings.auth.max_failures_per_connection:
                return POP3_TOO_MANY_FAILED_LOGINS.delayed(delay)
            return refusal.delayed(delay)
        # Not in RFC 1939: Dovecot's cap on logged-in sessions per user and
        # client address (server.py). Taken before the lock, so that when
        # the cap refuses, the client hears TOO_MANY_SESSIONS, not IN-USE.
        if not self.context.pop3_sessions.take((user, self.peer[0])):
            return POP3_TOO_MANY_SESSIONS
        self._session_slot = (user, self.peer[0])
        # RFC 1939 §4: lock the maildrop before saying +OK ... A login that
        # fails from here on leaves the session in AUTHORIZATION, so it gives
        # back the slot and the lock at once: kept, they would make the
        # client's next try fail with IN-USE against itself.
        try:
            self.maildrop = self.context.store.open_maildrop(user)
        except MaildropLocked:
            self._release_maildrop()
            return POP3_IN_USE
        except BaseException:
            self._release_maildrop()
            raise
        try:
            # ... and take the snapshot the whole session works from.
            self.messages = self.maildrop.snapshot()
        except (StorageError, OSError):
            self._release_maildrop()
            raise
        self.highest_seen_before = max((index + 1 for index, message in enumerate(self.messages) if message.seen),
                                       default=0)
        self.highest_accessed = self.highest_seen_before
        self.user = user
        self.enter(Pop3State.TRANSACTION)
        # The limits are per state, as in Dovecot where pop3-login and pop3
        # are separate processes with counters of their own: mistakes made
        # before login do not eat into the 20 allowed after it.
        self.errors = 0
        count, size = self._totals()
        return POP3_LOGGED_IN.format(user=user, messages=counted(count, "message"), size=size)

    def do_quit(self, argument: str) -> Reply:
        """QUIT (RFC 1939 §4 in AUTHORIZATION, §6 in TRANSACTION)."""
        self._arguments("QUIT", argument, 0, 0)
        if self.state is Pop3State.AUTHORIZATION:
            return POP3_SIGNING_OFF
        # RFC 1939 §6: deletions happen only in UPDATE, entered only by QUIT.
        self.enter(Pop3State.UPDATE)
        keys = [self.messages[index].key for index in sorted(self.deleted)]
        try:
            failures = self.maildrop.expunge(keys)
        except OSError:
            log.exception("pop3 session %d: UPDATE failed for %s", self.session_id, self.user)
            failures = len(keys)
        finally:
            self._release_maildrop()
        if failures:
            return POP3_UPDATE_FAILED
        count, _ = self._totals()
        remaining = f"{counted(count, 'message')} left" if count else "maildrop empty"
        return POP3_SIGNING_OFF_AFTER_UPDATE.format(remaining=remaining)

    # --- TRANSACTION (RFC 1939 §5, §7) --------------------------------------

    def do_stat(self, argument: str) -> Reply:
        """STAT (RFC 1939 §5): the drop listing, "count size"."""
        self._arguments("STAT", argument, 0, 0)
        count, size = self._totals()
        return POP3_STAT.format(count=count, size=size)

    def do_list(self, argument: str) -> Reply:
        """LIST [msg] (RFC 1939 §5): scan listings, "msg_number size"."""
        (word,) = self._arguments("LIST", argument, 0, 1) or [None]
        if word is not None:
            index = self._index("LIST", word)
            return POP3_SCAN_LISTING.format(msg_number=index + 1, size=self.messages[index].size)
        count, size = self._totals()
        listing = [f"{msg_number} {message.size}".encode() for msg_number, message in self._live()]
        return POP3_SCAN_LISTINGS_FOLLOW.format(messages=counted(count, "message"), size=size).with_lines(listing)

    def do_retr(self, argument: str) -> Reply:
        """RETR msg (RFC 1939 §5): the whole message, byte-stuffed."""
        (word,) = self._arguments("RETR", argument, 1, 1)
        index = self._index("RETR", word)
        text = self._text(index)  # opened now: a vanished message is an -ERR, not a +OK with no text
        self.maildrop.mark_seen(self.messages[index].key)  # for other mail readers: POP3 has no flags
        self.highest_accessed = max(self.highest_accessed, index + 1)
        return POP3_MESSAGE_FOLLOWS.format(size=self.messages[index].size).with_content(text)

    def do_dele(self, argument: str) -> Reply:
        """DELE msg (RFC 1939 §5): mark only; removal waits for UPDATE."""
        (word,) = self._arguments("DELE", argument, 1, 1)
        index = self._index("DELE", word)
        self.deleted.add(index)
        self.highest_accessed = max(self.highest_accessed, index + 1)
        return POP3_MARKED_DELETED.format(msg_number=index + 1)

    def do_noop(self, argument: str) -> Reply:
        """NOOP (RFC 1939 §5)."""
        self._arguments("NOOP", argument, 0, 0)
        return POP3_NOOP

    def do_rset(self, argument: str) -> Reply:
        """RSET (RFC 1939 §5): unmark every message marked as deleted."""
        self._arguments("RSET", argument, 0, 0)
        self.deleted.clear()
        # RFC 1460: RSET resets the LAST counter too, to where the session began.
        self.highest_accessed = self.highest_seen_before
        count, size = self._totals()
        return POP3_RESET.format(messages=counted(count, "message"), size=size)

    def do_top(self, argument: str) -> Reply:
        """TOP msg n (RFC 1939 §7): the header, the blank line, and n body lines."""
        msg_word, n_word = self._arguments("TOP", argument, 2, 2)
        index = self._index("TOP", msg_word)
        body_lines = self._number("TOP", n_word)
        return POP3_TOP_FOLLOWS.with_lines(_top(_lines_of(self._text(index)), body_lines))

    def do_uidl(self, argument: str) -> Reply:
        """UIDL [msg] (RFC 1939 §7): unique-id listings, "msg_number uid"."""
        (word,) = self._arguments("UIDL", argument, 0, 1) or [None]
        if word is not None:
            index = self._index("UIDL", word)
            return POP3_UNIQUE_ID.format(msg_number=index + 1, uid=self.messages[index].uid)
        listing = [f"{msg_number} {message.uid}".encode() for msg_number, message in self._live()]
        return POP3_UNIQUE_IDS_FOLLOW.with_lines(listing)

    def do_last(self, argument: str) -> Reply:
        """LAST (RFC 1460, dropped by RFC 1725): the highest msg_number accessed.

        Kept because the original design had it and old clients still ask.
        RETR and DELE count as access. As in UW's ipop3d, a session starts
        from the highest message already retrieved (the Maildir's S flag),
        and RSET goes back there: a client that leaves mail on the server
        and asks LAST for what is new (fetchmail with "keep" and no "uidl")
        would otherwise fetch every message again at every poll. UIDL (RFC
        1939 §7) is the better way, and why RFC 1725 dropped LAST: a
        message read elsewhere hides the unread ones below it.
        """
        self._arguments("LAST", argument, 0, 0)
        return POP3_LAST.format(msg_number=self.highest_accessed)

    # --- both states -------------------------------------------------------------

    def do_capa(self, argument: str) -> Reply:
        """CAPA (RFC 2449 §5): the same list in every state, from the command table."""
        self._arguments("CAPA", argument, 0, 0)
        lines = [*self.commands.capabilities(self), *SESSION_CAPABILITIES]
        return POP3_CAPABILITIES_FOLLOW.with_lines(line.encode("ascii") for line in lines)


def _lines_of(text: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of a message's text, without their CRLF."""
    # Closing this generator closes the text too: TOP stops reading early.
    with contextlib.closing(text):
        for block in text:
            # Maildrop.text yields whole CRLF-ended lines, so the last piece
            # of each split is always empty.
            yield from block.split(CRLF)[:-1]


def _top(lines: Iterator[bytes], body_lines: int) -> Iterator[bytes]:
    """The header, the empty line that ends it, then ``body_lines`` lines of body."""
    try:
        for line in lines:
            yield line
            if line == b"":
                break
        for _ in range(body_lines):
            line = next(lines, None)
            if line is None:
                return
            yield line
    finally:
        lines.close()  # stop reading the file early when n is small


# --- The command table (RFC 1939 §9, RFC 2449 §5) --------------------------

_AUTHORIZATION = frozenset({Pop3State.AUTHORIZATION})
_TRANSACTION = frozenset({Pop3State.TRANSACTION})
_BOTH = _AUTHORIZATION | _TRANSACTION

# moves= and OTHER_TRANSITIONS describe the state diagram (pymailsrv explain);
# the handlers change the state themselves with self.enter() (_log_in for
# PASS, APOP and AUTH; do_quit for QUIT), and UPDATE's close comes from the
# .closing() reply. RFC 1939 §6: the close follows UPDATE whether the marked
# messages could all be removed (+OK) or not (-ERR).
Pop3Session.OTHER_TRANSITIONS = (
    # RFC 1939 §6: a session that ends without QUIT never reaches UPDATE.
    (Pop3State.TRANSACTION, "cut off: none deleted", None),
    (Pop3State.UPDATE, "+OK/-ERR, close", None),
)

Pop3Session.commands = CommandTable(
    Command("STLS", Pop3Session.do_stls, _AUTHORIZATION, "STLS", "RFC 2595 §4", capability="STLS",
            offered=lambda session: session.context.tls is not None and not session.tls),
    Command("USER", Pop3Session.do_user, _AUTHORIZATION, "USER name", "RFC 1939 §7",
            capability="USER", offered=Pop3Session.plaintext_auth_allowed),
    Command("PASS", Pop3Session.do_pass, _AUTHORIZATION, "PASS string", "RFC 1939 §7",
            moves={Pop3State.AUTHORIZATION: Pop3State.TRANSACTION}, secret_from=0),
    Command("APOP", Pop3Session.do_apop, _AUTHORIZATION, "APOP name digest", "RFC 1939 §7",
            moves={Pop3State.AUTHORIZATION: Pop3State.TRANSACTION}, secret_from=1),
    Command("AUTH", Pop3Session.do_auth, _AUTHORIZATION, "AUTH [mechanism [initial-response]]",
            "RFC 5034 §4", capability="SASL " + " ".join(SASL_MECHANISMS),
            offered=Pop3Session.plaintext_auth_allowed,
            moves={Pop3State.AUTHORIZATION: Pop3State.TRANSACTION}, secret_from=1),
    Command("QUIT", Pop3Session.do_quit, _BOTH, "QUIT", "RFC 1939 §4, §6",
            moves={Pop3State.AUTHORIZATION: None, Pop3State.TRANSACTION: Pop3State.UPDATE}),
    Command("STAT", Pop3Session.do_stat, _TRANSACTION, "STAT", "RFC 1939 §5"),
    Command("LIST", Pop3Session.do_list, _TRANSACTION, "LIST [msg]", "RFC 1939 §5"),
    Command("RETR", Pop3Session.do_retr, _TRANSACTION, "RETR msg", "RFC 1939 §5"),
    Command("DELE", Pop3Session.do_dele, _TRANSACTION, "DELE msg", "RFC 1939 §5"),
    Command("NOOP", Pop3Session.do_noop, _TRANSACTION, "NOOP", "RFC 1939 §5"),
    Command("RSET", Pop3Session.do_rset, _TRANSACTION, "RSET", "RFC 1939 §5"),
    Command("TOP", Pop3Session.do_top, _TRANSACTION, "TOP msg n", "RFC 1939 §7",
            capability="TOP"),
    Command("UIDL", Pop3Session.do_uidl, _TRANSACTION, "UIDL [msg]", "RFC 1939 §7",
            capability="UIDL"),
    Command("LAST", Pop3Session.do_last, _TRANSACTION, "LAST", "RFC 1460 (obsolete)"),
    Command("CAPA", Pop3Session.do_capa, _BOTH, "CAPA", "RFC 2449 §5"),
)
