"""The protocol session: a line comes in, a Reply goes out.

A session is the heir of ``TPop``, the session object of the Delphi mail
server design pymailsrv grew out of: one per connection, holding the
protocol state. It never sees a socket (the transport owns that) nor a file
name (storage owns those). The transport calls:

* ``greeting()`` once, when the client connects;
* ``handle_line(line, too_long)`` for every command line the client sends,
  with its line end (a line longer than ``line_limit`` arrives cut short,
  with ``too_long`` set), and for every line of a SASL exchange: the answer
  is a ``Reply``;
* ``handle_text(block, too_long)`` instead while ``collecting_text`` (SMTP
  DATA): whole lines of message text at once; the answer is the reply once
  the text has ended (else None) and whatever came after its end;
* ``timed_out()`` when the client kept silent past ``timeout``;
* ``run_put_off_work()`` once its replies are on the wire, before it waits
  for the client (see ``later``);
* ``close()`` when the connection ends, however it ends.

``line_limit`` and ``timeout`` tell the transport how long a line it may read
and how long it may wait for one in the current state.

Commands go through ``dispatch``: the verb is looked up in the protocol's
command table, refused if unknown or not valid in this state, and the handler
runs. A handler answers by returning a Reply or raising ``CommandError``; any
other exception is a bug or a storage failure, logged with its traceback and
answered with a generic temporary failure that never shows the exception text
to the client; met in message text, it ends the session too, as where the
text stood is then unknown. Each error reply counts towards a limit that
depends on the state (``max_errors``); past it the session answers once more
and closes.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, ClassVar

from pymailsrv.auth import EMPTY_INITIAL_RESPONSE, Admission, Credentials, SaslCancelled, SaslError, SaslExchange
from pymailsrv.commands import Command, CommandTable
from pymailsrv.durable import UnusableFile
from pymailsrv.limits import LOGIN_THROTTLE_POLL_SECONDS, LOGIN_THROTTLE_WAIT_SECONDS, SASL_LINE_MAX
from pymailsrv.replies import After, CommandError, Reply
from pymailsrv.users import UserError, check_user_name

if TYPE_CHECKING:
    from pymailsrv.faults import Fault
    from pymailsrv.server import ServerContext

log = logging.getLogger("pymailsrv.session")


def in_networks(address: str, networks: Iterable[str]) -> bool:
    """Is ``address`` inside one of ``networks`` ("192.0.2.0/24", "::1/128")?"""
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(network, strict=False) for network in networks)


def command_text(line: bytes) -> str:
    """A command line as text, without its line end.

    surrogateescape keeps undecodable octets, so the parsers can refuse them.
    """
    return line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")


class AddressBlocked(Exception):
    """The client address has failed to log in too often lately to be heard."""


class NothingToGuess(Exception):
    """Raised by a credentials check that no answer could pass (APOP for an
    account with no APOP secret): refused as a wrong password is, but not
    counted against the client's address, as it guessed at nothing."""


class InputKind(enum.Enum):
    """What the session takes the next client line to be."""

    COMMANDS = "commands"
    TEXT = "text"  # message text (SMTP DATA): traced as a summary
    SECRET = "secret"  # a SASL response: traced as ****


LineHandler = Callable[[bytes, bool], Reply]


class Session:
    """Base of ``Pop3Session`` and ``SmtpSession``: dispatch, states, error limits."""

    protocol: ClassVar[str]
    commands: ClassVar[CommandTable]
    # The replies each protocol gives for the failures every session shares.
    UNKNOWN_COMMAND: ClassVar[Reply]
    WRONG_STATE: ClassVar[Reply]  # with {verb} and {state}
    SYNTAX_ERROR: ClassVar[Reply]  # with {syntax}: the command table's
    LINE_TOO_LONG: ClassVar[Reply]
    INTERNAL_ERROR: ClassVar[Reply]
    TOO_MANY_CONNECTIONS: ClassVar[Reply]  # with {host}: the listener's refusal over a cap
    SASL_CANCELLED: ClassVar[Reply]  # the client answered "*"
    SASL_MALFORMED: ClassVar[Reply]  # not base64, or not what the mechanism wants
    SASL_LINE_TOO_LONG: ClassVar[Reply]  # a response over SASL_LINE_MAX octets
    LOGIN_UNAVAILABLE: ClassVar[Reply]  # credentials that cannot be checked now (users.json unusable)
    # State changes made by something other than a command (the end of DATA's
    # text, the close after UPDATE): (from, what happens, to; None = closed).
    # With the command table's moves they make the whole state diagram.
    OTHER_TRANSITIONS: ClassVar[tuple[tuple[enum.Enum, str, enum.Enum | None], ...]] = ()

    def __init__(self, context: ServerContext, peer: tuple[str, int]) -> None:
        self.context = context
        self.settings = context.settings
        self.peer = peer
        # One number for the session in the whole server, whichever worker serves it.
        self.session_id = context.session_numbers.next()
        self.state: enum.Enum = self.initial_state()
        self.errors = 0
        self.commands_run = 0
        self.last_command: Command | None = None  # the known command of the line dispatched last
        self.user: str | None = None  # who logged in, once someone has
        self.tls = False  # set by the transport once a TLS handshake is done
        # Set by the transport: has the client sent more than we have read?
        self.client_is_ahead: Callable[[], bool] = lambda: False
        self._line_handler: LineHandler = self.dispatch
        self._input_kind = InputKind.COMMANDS
        # Injected faults (faults.py): matching commands seen per fault, and
        # whether to hang up at the next line of text.
        self.fault_counts: dict[Fault, int] = {}
        self.drop_in_text = False
        self._put_off: list[Callable[[], None]] = []
        # An AUTH was refused, and no known command has come since (mask()).
        self._after_refused_auth = False

    # --- what each protocol supplies -------------------------------------

    def initial_state(self) -> enum.Enum:
        raise NotImplementedError

    def greeting(self) -> Reply:
        raise NotImplementedError

    def timed_out(self) -> Reply:
        raise NotImplementedError

    def shutting_down(self) -> Reply:
        """The last word to a client when the server stops: after the command in
        hand is answered, or in the middle of a message's text."""
        raise NotImplementedError

    @property
    def line_limit(self) -> int:
        """The longest line the transport may hand over now."""
        if self._input_kind is InputKind.SECRET:
            return SASL_LINE_MAX
        return self.command_line_limit()

    def command_line_limit(self) -> int:
        raise NotImplementedError

    @property
    def timeout(self) -> float:
        raise NotImplementedError

    def max_errors(self) -> int:
        raise NotImplementedError

    def too_many_errors(self, last_error: Reply) -> Reply:
        raise NotImplementedError

    def is_error(self, reply: Reply) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        """The connection is gone; release whatever the session holds."""

    def tls_started(self) -> None:
        """The transport finished a TLS handshake; protocols forget what came before."""
        self.tls = True

    # --- the shared machinery ----------------------------------------------

    def later(self, work: Callable[[], None]) -> None:
        """Do ``work`` once the reply being made is on the wire, before the next line.

        The client then spends its turn - reading the reply, sending what
        comes next - while we work, rather than waiting for us: at one
        connection, the time it takes is hidden (SMTP's DATA uses it).
        """
        self._put_off.append(work)

    def run_put_off_work(self) -> None:
        """Do the work ``later`` put off. The transport calls this once the
        replies are sent, and when the connection ends (a reply that never
        got out still had its work to do: a delivery is logged all the
        same); every line handled calls it first, for a client that sent
        that line before our reply reached it. Work that fails is logged,
        as a handler's failure is, and the session goes on."""
        while self._put_off:
            work = self._put_off.pop(0)
            try:
                work()
            except Exception:
                log.exception("%s session %d from %s: work put off until after a reply failed",
                              self.protocol, self.session_id, self.peer[0])

    def handle_line(self, line: bytes, too_long: bool = False) -> Reply:
        self.run_put_off_work()
        return self._line_handler(line, too_long)

    def handle_text(self, block: bytes, too_long: bool = False) -> tuple[Reply | None, bytes]:
        """Whole lines of message text (while ``collecting_text``): the reply, if
        the text ended, and the part of ``block`` after its end, not yet read."""
        self.run_put_off_work()
        if self.drop_in_text:
            return dataclasses.replace(self.INTERNAL_ERROR, after=After.DROP), b""
        try:
            return self.take_text(block, too_long)
        except Exception:
            # As for a command, but where the text stood is now unknown: the
            # session ends after the reply, and close() throws the text away.
            return self._internal_error("message text").closing(), b""

    def take_text(self, block: bytes, too_long: bool) -> tuple[Reply | None, bytes]:
        raise NotImplementedError  # only protocols that collect text (SMTP DATA)

    @property
    def collecting_text(self) -> bool:
        """True while lines are message text, not commands (traces summarise them)."""
        return self._input_kind is InputKind.TEXT

    def expect_lines(self, handler: LineHandler | None, kind: InputKind = InputKind.SECRET) -> None:
        """Send the next lines to ``handler`` (None: back to commands)."""
        self._line_handler = handler or self.dispatch
        self._input_kind = kind if handler else InputKind.COMMANDS

    def expect_text(self) -> None:
        """What comes next is message text, for ``take_text``, until it ends."""
        self._line_handler = self.dispatch
        self._input_kind = InputKind.TEXT

    def dispatch(self, line: bytes, too_long: bool = False) -> Reply:
        """Look the verb up in the command table and run its handler."""
        self.commands_run += 1  # every line, too long or unknown too (see Pop3Session.do_pass)
        self.last_command = None
        if too_long:
            return self._counted(self.LINE_TOO_LONG)
        verb, _, argument = command_text(line).partition(" ")
        command = self.last_command = self.commands.find(verb)
        reply = self._answer(command, argument)
        # An AUTH refused however (its handler, its state, a fault) may be
        # followed by the base64 lines meant for its exchange; mask() hides
        # what is no command until the next command.
        if command is not None:  # a known verb: it ends the masking, or (a refused AUTH) starts it
            self._after_refused_auth = command.verb == "AUTH" and reply.refused
        return self._counted(reply)

    def _answer(self, command: Command | None, argument: str) -> Reply:
        if command is None:
            return self.UNKNOWN_COMMAND
        if self.state not in command.states:
            return self.WRONG_STATE.format(verb=command.verb, state=self.state.name)
        faults = self.context.faults
        if faults:
            return faults.run(self, command.verb, argument, lambda: self._run(command, argument))
        return self._run(command, argument)

    def _run(self, command: Command, argument: str) -> Reply:
        return self._guarded(command.verb, command.handler, self, argument)

    def _guarded(self, what: str, function: Callable[..., Reply], *arguments: object) -> Reply:
        """Run a handler; a refusal becomes its reply, anything else a temporary failure."""
        try:
            return function(*arguments)
        except CommandError as refusal:
            return refusal.reply
        except UnusableFile as error:  # the admin's to mend, and no bug: its one line, no traceback
            log.error("%s session %d: %s failed: %s", self.protocol, self.session_id, what, error)
            return self.INTERNAL_ERROR
        except Exception:
            return self._internal_error(what)

    def _internal_error(self, what: str) -> Reply:
        """A bug or a storage failure, met in ``what``: the log gets the
        traceback, the client a temporary failure, never the exception's text."""
        log.exception("%s session %d from %s: %s failed", self.protocol, self.session_id, self.peer[0], what)
        return self.INTERNAL_ERROR

    def _syntax_error(self, verb: str) -> CommandError:
        """The refusal of a verb's arguments: its syntax, as the command table writes it."""
        return CommandError(self.SYNTAX_ERROR.format(syntax=self.commands.find(verb).syntax))

    def _counted(self, reply: Reply) -> Reply:
        if self.is_error(reply):
            self.errors += 1
            if self.errors >= self.max_errors():
                return self.too_many_errors(reply).delayed(reply.delay)
        return reply

    # --- authentication, shared by both protocols ------------------------------

    def named_user(self) -> str | None:
        """The user the client has logged in as, or says it is about to."""
        return self.user

    def plaintext_auth_allowed(self) -> bool:
        """May a password cross this connection? Over TLS, from a local network,
        or where the site allows it (Dovecot's disable_plaintext_auth rule)."""
        return (self.tls or self.settings.allow_plaintext_auth
                or in_networks(self.peer[0], self.settings.auth.local_networks))

    def check_login(self, name: str, credentials_valid: Callable[[str], bool]) -> str | None:
        """The user ``name`` names, if the credentials hold; else None.

        The client address's failed logins are counted (``FailureThrottle``):
        a wrong password is one, a check that raises is a fault of ours and
        none, and so is an APOP to an account with no APOP secret
        (NothingToGuess). Raises AddressBlocked, checking nothing, where the
        address has failed too often lately; waits first while checks under
        way from it could still bring it there. Credentials that cannot be
        checked now (users.json unusable) are refused with LOGIN_UNAVAILABLE,
        and no failure is counted.
        """
        throttle, address = self.context.throttle, self.peer[0]
        deadline = time.monotonic() + LOGIN_THROTTLE_WAIT_SECONDS
        while (admission := throttle.begin(address)) is Admission.WAIT and time.monotonic() < deadline:
            time.sleep(LOGIN_THROTTLE_POLL_SECONDS)
        if admission is not Admission.CHECK:
            raise AddressBlocked
        failed, guessed = False, True
        try:
            try:
                user = check_user_name(name)
            except UserError:
                user = None  # not a possible user name: fails like a wrong password
            failed = not (user is not None and credentials_valid(user))
        except NothingToGuess:
            failed, guessed = True, False
        except UnusableFile as error:  # the admin's to mend: one line, and the protocol's own refusal
            log.error("%s session %d: cannot check a login now: %s", self.protocol, self.session_id, error)
            raise CommandError(self.LOGIN_UNAVAILABLE) from None
        finally:
            throttle.end(address, failed and guessed)
        return None if failed else user

    def start_sasl(self, mechanism: str, initial_response: str | None) -> Reply:
        """Begin a SASL exchange (RFC 4954 §4, RFC 5034 §4); the protocol supplies
        ``sasl_challenge`` (how a challenge goes on the wire) and
        ``sasl_finished`` (what to do with the credentials)."""
        exchange = SaslExchange(mechanism)
        if initial_response is None:
            return self._next_sasl_challenge(exchange, exchange.challenge())
        # RFC 4954 §4, RFC 5034 §4: "=" is an empty initial response (an
        # empty argument could not be told from none); only there.
        return self._sasl_step(exchange, "" if initial_response == EMPTY_INITIAL_RESPONSE else initial_response)

    def sasl_challenge(self, challenge: str) -> Reply:
        raise NotImplementedError

    def sasl_finished(self, credentials: Credentials) -> Reply:
        raise NotImplementedError

    def _next_sasl_challenge(self, exchange: SaslExchange, challenge: str) -> Reply:
        # The answer is a credential: the trace shows it as ****.
        self.expect_lines(functools.partial(self._sasl_answer, exchange), InputKind.SECRET)
        return self.sasl_challenge(challenge)

    def _sasl_answer(self, exchange: SaslExchange, line: bytes, too_long: bool) -> Reply:
        """A continuation line; counted here, as dispatch counts command replies."""
        self.expect_lines(None)
        if too_long:
            return self._counted(self.SASL_LINE_TOO_LONG)
        answer = line.rstrip(b"\r\n").decode("ascii", "replace")
        return self._counted(self._guarded("AUTH", self._sasl_step, exchange, answer))

    def _sasl_step(self, exchange: SaslExchange, answer: str) -> Reply:
        try:
            outcome = exchange.answer(answer)
        except SaslCancelled:
            return self.SASL_CANCELLED
        except SaslError:
            return self.SASL_MALFORMED
        if isinstance(outcome, Credentials):
            return self.sasl_finished(outcome)
        return self._next_sasl_challenge(exchange, outcome)

    def enter(self, state: enum.Enum) -> None:
        """Every state change goes through here, so the trace can show it."""
        if state is not self.state:
            old, self.state = self.state, state
            self.context.tracer.state_change(self, old, state)

    def mask(self, line: bytes) -> bytes:
        """The line as a trace may show it: credentials replaced by ****."""
        if self._input_kind is InputKind.SECRET:
            return b"****"
        # Split at any white space, Unicode's too, where the handlers split at
        # ASCII's only (commands.ascii_words): "AUTH PLAIN<TAB>secret" logs
        # in and "AUTH PLAIN<NO-BREAK SPACE>secret" does not, but both hold
        # a credential, so both are masked.
        words = command_text(line).split()
        command = self.commands.find(words[0]) if words else None
        if command is None and words and self._after_refused_auth:
            # A client whose AUTH was refused may send the base64 lines it
            # meant for the exchange all the same: until the next command,
            # what is no command is taken for them.
            return b"****"
        if command is None or command.secret_from is None:
            return line
        shown = 1 + command.secret_from  # the verb, then the public arguments
        if len(words) <= shown:
            return line
        return " ".join(words[:shown] + ["****"]).encode("utf-8", "surrogateescape")

    def annotation(self, line: bytes) -> str:
        """What a client line is, from the command table: its syntax and RFC section."""
        if self._input_kind is not InputKind.COMMANDS:
            return ""
        command = self.commands.find(line.split(b" ", 1)[0].strip().decode("ascii", "replace"))
        return f"{command.syntax}, {command.rfc}" if command else ""
