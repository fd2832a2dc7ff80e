"""The command table: one row per protocol verb, the single source of truth.

Each protocol module ends with a literal ``CommandTable(Command(...), ...)``
that reads like its RFC's command summary (RFC 1939 §9, RFC 5321 §4.1). From
that one table the session derives:

* dispatch: which handler runs for a verb, and whether the verb is allowed in
  the current state (unknown and known-but-wrong-state are different errors);
* the capability listings: POP3 ``CAPA`` and SMTP ``EHLO`` keywords;
* ``HELP``: the syntax line of every verb;
* the state diagram (``pymailsrv explain``): which verbs each state accepts
  and where they lead. ``moves`` records where each handler's ``enter()``
  goes; it is kept in step with the handlers by hand.

Nothing looks a handler up by building a method name from client input.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

Handler = Callable[[Any, str], Any]  # (session, argument) -> Reply


# The protocols separate arguments with spaces (RFC 5321 §4.1.1, RFC 1939
# §3). We also take a tab and the rest of ASCII's white space, as
# bytes.split() does, but not the Unicode spaces str.split() would:
# "AUTH PLAIN<NO-BREAK SPACE>x" is one word, as a filter in front of the
# server reads it.
ASCII_WHITESPACE = " \t\n\r\x0b\x0c"
_ASCII_WORD = re.compile(f"[^{ASCII_WHITESPACE}]+")


def ascii_words(text: str) -> list[str]:
    """``text`` split at ASCII white space only."""
    return _ASCII_WORD.findall(text)


def is_decimal(word: str) -> bool:
    """Is ``word`` ASCII digits, and nothing else? str.isdigit() alone also
    takes other scripts' digits and superscripts: int() reads "١" as 1, and
    refuses "²". The protocols, and file names, mean ASCII."""
    return word.isascii() and word.isdigit()


def ascii_upper(word: str) -> str:
    """``word`` upper-cased for matching a verb or keyword.

    Verbs and keywords are ASCII, and case-insensitive only there (RFC 5321
    §2.4, RFC 1939 §3). str.upper() would also turn "QUıT" (a dotless i)
    into QUIT and "PAſS" (a long s) into PASS, so a line that a filter in
    front of the server reads as unknown would run here.
    """
    return word.upper() if word.isascii() else word


@dataclass(frozen=True)
class Command:
    """One verb of a protocol.

    verb:        the command keyword, upper case, as on the wire.
    handler:     the session method that answers it, given the argument text.
    states:      the states in which the verb is valid.
    syntax:      how the RFC writes it, for HELP and syntax errors.
    rfc:         the section that defines it.
    capability:  the CAPA line / EHLO keyword the verb brings, if any.
    offered:     whether the session offers the verb right now (STARTTLS only
                 with a certificate and before TLS; AUTH only where a
                 password may be sent); listings and HELP leave out what is
                 not. Dispatch does not look: the handler refuses it itself.
    moves:       state -> next state when the command succeeds there (the
                 edges of the state diagram; the handler makes the move).
    secret_from: the index of the first argument word that is a credential:
                 traces show it and all after it as ****; None if no secret.
    """

    verb: str
    handler: Handler
    states: frozenset[enum.Enum]
    syntax: str
    rfc: str
    capability: str | None = None
    offered: Callable[[Any], bool] | None = None
    moves: Mapping[enum.Enum, enum.Enum | None] = field(default_factory=lambda: MappingProxyType({}))
    secret_from: int | None = None

    def offered_to(self, session: Any) -> bool:
        """Whether ``session`` offers the verb right now (see ``offered``)."""
        return self.offered is None or self.offered(session)


class CommandTable:
    """The commands of one protocol, looked up case-insensitively by verb."""

    def __init__(self, *commands: Command) -> None:
        self._by_verb = {command.verb: command for command in commands}
        if len(self._by_verb) != len(commands):
            raise ValueError("a verb appears twice in the command table")

    def __iter__(self) -> Iterator[Command]:
        return iter(self._by_verb.values())

    def find(self, verb: str) -> Command | None:
        return self._by_verb.get(ascii_upper(verb))

    def allowed_in(self, state: enum.Enum) -> list[Command]:
        return [command for command in self if state in command.states]

    def capabilities(self, session: Any = None) -> list[str]:
        """The capabilities the commands bring, in table order; with a session,
        only those it offers now."""
        return [command.capability for command in self if command.capability
                and (session is None or command.offered_to(session))]

    def transitions(self) -> list[tuple[enum.Enum, str, enum.Enum | None]]:
        """(from state, verb, to state) for every edge; None means the end."""
        return [
            (state, command.verb, target)
            for command in self
            for state, target in command.moves.items()
        ]
