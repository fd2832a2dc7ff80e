"""The protocol session: a line comes in, a Reply goes out.

A session is the heir of the old design's ``TPop`` object: one per connection,
holding the protocol state. It never sees a socket (the transport owns that)
nor a file name (storage owns those). The transport calls:

* ``greeting()`` once, when the client connects;
* ``handle_line(line, too_long)`` for every line the client sends, with its
  line end (a line longer than ``line_limit`` arrives cut short, with
  ``too_long`` set); the answer is a ``Reply``, or None while the session is
  collecting input that gets no reply per line (the text of SMTP DATA);
* ``timed_out()`` when the client kept silent past ``timeout``;
* ``close()`` when the connection ends, however it ends.

``line_limit`` and ``timeout`` tell the transport how long a line it may read
and how long it may wait for one in the current state.

Commands go through ``dispatch``: the verb is looked up in the protocol's
command table, refused if unknown or not valid in this state, and the handler
runs. A handler answers by returning a Reply or raising ``CommandError``; any
other exception is a bug or a storage failure, logged with its traceback and
answered with a generic temporary failure that never shows the exception text
to the client. Each error reply counts towards a limit that depends on the
state (``max_errors``); past it the session answers once more and closes.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from pymailsrv.commands import Command, CommandTable
from pymailsrv.replies import CommandError, Reply

if TYPE_CHECKING:
    from pymailsrv.server import ServerContext

log = logging.getLogger("pymailsrv.session")


class InputKind(enum.Enum):
    """What the session takes the next client line to be."""

    COMMANDS = "commands"
    TEXT = "text"  # message text (SMTP DATA): traced as a summary
    SECRET = "secret"  # a SASL response: traced as ****

_session_ids = itertools.count(1)

LineHandler = Callable[[bytes, bool], "Reply | None"]


class Session:
    """Base of ``Pop3Session`` and ``SmtpSession``: dispatch, states, error limits."""

    protocol: ClassVar[str]
    commands: ClassVar[CommandTable]
    # The replies each protocol gives for the failures every session shares.
    UNKNOWN_COMMAND: ClassVar[Reply]
    WRONG_STATE: ClassVar[Reply]  # with {verb} and {state}
    LINE_TOO_LONG: ClassVar[Reply]
    INTERNAL_ERROR: ClassVar[Reply]
    # State changes made by something other than a command (the end of DATA's
    # text, the close after UPDATE): (from, what happens, to; None = closed).
    # With the command table's moves they make the whole state diagram.
    OTHER_TRANSITIONS: ClassVar[tuple[tuple[enum.Enum, str, enum.Enum | None], ...]] = ()

    def __init__(self, context: ServerContext, peer: tuple[str, int]) -> None:
        self.context = context
        self.settings = context.settings
        self.peer = peer
        self.session_id = next(_session_ids)
        self.state: enum.Enum = self.initial_state()
        self.errors = 0
        self.commands_run = 0
        self.user: str | None = None  # who logged in, once someone has
        self.tls = False  # set by the transport once a TLS handshake is done
        self._line_handler: LineHandler = self.dispatch
        self._input_kind = InputKind.COMMANDS

    # --- what each protocol supplies -------------------------------------

    def initial_state(self) -> enum.Enum:
        raise NotImplementedError

    def greeting(self) -> Reply:
        raise NotImplementedError

    def timed_out(self) -> Reply:
        raise NotImplementedError

    @property
    def line_limit(self) -> int:
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

    def handle_line(self, line: bytes, too_long: bool = False) -> Reply | None:
        return self._line_handler(line, too_long)

    @property
    def collecting_text(self) -> bool:
        """True while lines are message text, not commands (traces summarise them)."""
        return self._input_kind is InputKind.TEXT

    def expect_lines(self, handler: LineHandler | None, kind: InputKind | None = None) -> None:
        """Send the next lines to ``handler`` (None: back to commands)."""
        self._line_handler = handler or self.dispatch
        self._input_kind = kind or (InputKind.TEXT if handler else InputKind.COMMANDS)

    def dispatch(self, line: bytes, too_long: bool = False) -> Reply:
        """Look the verb up in the command table and run its handler."""
        if too_long:
            return self._counted(self.LINE_TOO_LONG)
        # surrogateescape keeps undecodable octets; parsers then refuse them.
        text = line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        verb, _, argument = text.partition(" ")
        command = self.commands.find(verb)
        self.commands_run += 1
        if command is None:
            return self._counted(self.UNKNOWN_COMMAND)
        if self.state not in command.states:
            return self._counted(self.WRONG_STATE.format(verb=command.verb, state=self.state.name))
        return self._counted(self._run(command, argument))

    def _run(self, command: Command, argument: str) -> Reply:
        try:
            return command.handler(self, argument)
        except CommandError as refusal:
            return refusal.reply
        except Exception:
            # A bug or a storage failure: the log gets the traceback, the
            # client a temporary failure, never the exception's text.
            log.exception("%s session %d from %s: %s failed", self.protocol, self.session_id,
                          self.peer[0], command.verb)
            return self.INTERNAL_ERROR

    def _counted(self, reply: Reply) -> Reply:
        if self.is_error(reply):
            self.errors += 1
            if self.errors >= self.max_errors():
                return self.too_many_errors(reply).delayed(reply.delay)
        return reply

    def enter(self, state: enum.Enum) -> None:
        """Every state change goes through here, so the trace can show it."""
        if state is not self.state:
            old, self.state = self.state, state
            self.context.tracer.state_change(self, old, state)

    def mask(self, line: bytes) -> bytes:
        """The line as a trace may show it: credentials replaced by ****."""
        if self._input_kind is InputKind.SECRET:
            return b"****"
        words = line.split(b" ")
        command = self.commands.find(words[0].decode("ascii", "replace"))
        if command is None or command.secret_from is None:
            return line
        shown = 1 + command.secret_from  # the verb, then the public arguments
        if len(words) <= shown:
            return line
        return b" ".join(words[:shown] + [b"****"])

    def annotation(self, line: bytes) -> str:
        """What a client line is, from the command table: its syntax and RFC section."""
        if self._input_kind is not InputKind.COMMANDS:
            return ""
        command = self.commands.find(line.split(b" ", 1)[0].strip().decode("ascii", "replace"))
        return f"{command.syntax}, {command.rfc}" if command else ""
