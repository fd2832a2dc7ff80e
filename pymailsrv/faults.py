"""Deterministic fault scripts: make the server misbehave on purpose, exactly when asked.

Code that sends or fetches mail must cope with a server that says no, stalls
or hangs up. A fault script says precisely when that happens, so a test of
that code is repeatable (unlike "chaos" servers that fail at random)::

    smtp:RCPT#2=452 4.2.2 mailbox full      the 2nd RCPT of each session gets 452
    smtp:MAIL=421                           every MAIL gets 421, and the server hangs up
    pop3:RETR 3=-ERR [SYS/TEMP] disk error  RETR 3 fails
    smtp:RCPT[bob@localhost]=550 5.1.1 no   only RCPTs that name bob@localhost
    pop3:PASS[alice]=-ERR [AUTH] refused    refuse alice's logins
    smtp:DATA=drop-mid                      hang up in the middle of the message text
    pop3:RETR=drop-mid                      hang up halfway through the message
    smtp:EHLO=drop                          hang up instead of answering
    smtp:MAIL*1=delay 500                   the first MAIL on this server waits 0.5 s

The grammar::

    spec    = protocol ":" step [ "[" match "]" ] [ "#" nth ] [ "*" times ] "=" action
    step    = VERB [ " " argument ]   the command, and optionally how its argument starts
    match   = text the argument or the logged-in user must contain
    nth     = fire at the nth matching command of each session (default: every one)
    times   = fire at most this many times on this server (default: no limit)
    action  = a reply ("452 4.2.2 text", "-ERR [CODE] text", "+OK text", "421")
            | "drop" | "drop-mid" | "delay MILLISECONDS"

A reply or ``drop`` replaces the command: its handler never runs, so nothing
is stored or changed for this or any other session. ``delay`` runs it and
answers late; ``drop-mid`` runs it, then hangs up partway: after half the
octets of a POP3 multi-line reply (often in the middle of a line), after the
first half of an SMTP multi-line reply's lines (each still promising more),
or after the first line of DATA's text (discarded). A one-line reply is sent
whole before the hang-up. Every fault that fires is marked in the trace.

Every fault that matches a command counts it, and the first of them (in the
order given) that is due fires. A refusal injected by a fault counts toward
the session's limit of bad commands, as the server's own refusals do.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pymailsrv.limits import LONGEST_WAIT_SECONDS
from pymailsrv.replies import After, Pop3Reply, Reply, SmtpReply

if TYPE_CHECKING:
    from collections.abc import Callable

    from pymailsrv.session import Session

_SPEC = re.compile(
    r"(?P<protocol>smtp|pop3):(?P<verb>[A-Za-z]+)(?: (?P<argument>[^\[#*=]+))?"
    r"(?:\[(?P<match>[^\]]+)\])?(?:#(?P<nth>\d{1,9}))?(?:\*(?P<times>\d{1,9}))?=(?P<action>.+)",
    re.IGNORECASE)
_SMTP_REPLY = re.compile(r"(?P<code>[2-5]\d\d)(?: (?P<enhanced>[245]\.\d{1,3}\.\d{1,3}))?(?: (?P<text>.*))?")
_POP3_REPLY = re.compile(r"(?P<status>\+OK|-ERR)(?: \[(?P<code>[^\]]+)\])?(?: (?P<text>.*))?")
_DELAY = re.compile(r"delay (?P<milliseconds>\d+)")
LONGEST_DELAY_MS = LONGEST_WAIT_SECONDS * 1000


class Action(enum.Enum):
    """What a fault does when it fires."""

    REPLY = "reply"  # answer the spec's reply; the command never runs
    DROP = "drop"  # hang up without answering; the command never runs
    DROP_MID = "drop-mid"  # run the command, then hang up partway
    DELAY = "delay"  # run the command, then answer late


class FaultError(ValueError):
    """A fault spec that does not follow the grammar; the message says why."""


def _verbs(protocol: str) -> list[str]:
    """The verbs a fault can match: the protocol's command table's (Session.dispatch runs the faults)."""
    from pymailsrv.pop3 import Pop3Session  # here: both import the session, which runs the faults
    from pymailsrv.smtp import SmtpSession

    table = SmtpSession.commands if protocol == "smtp" else Pop3Session.commands
    return [command.verb for command in table]


def _not_an_action(spec: str, reply_example: str) -> FaultError:
    return FaultError(f"bad fault {spec!r}: the action is a reply such as '{reply_example}', "
                      f"or {Action.DROP.value}, {Action.DROP_MID.value} or 'delay MILLISECONDS'")


def _reply(spec: str, protocol: str, action: str) -> Reply:
    """The reply a fault answers with, parsed from the spec's action."""
    if protocol == "smtp":
        found = _SMTP_REPLY.fullmatch(action)
        if not found:
            raise _not_an_action(spec, "452 4.2.2 text")
        code = int(found["code"])
        reply = SmtpReply(code, found["enhanced"], found["text"] or "injected fault",
                          note="an injected fault (--fault)")
        # RFC 5321 §3.8: a 421 means the server is closing the connection.
        return reply.closing() if code == 421 else reply
    found = _POP3_REPLY.fullmatch(action)
    if not found:
        raise _not_an_action(spec, "-ERR [SYS/TEMP] text")
    return Pop3Reply(ok=found["status"] == "+OK", text=found["text"] or "injected fault", code=found["code"],
                     note="an injected fault (--fault)")


# eq=False: a fault is itself, not its spec (two given the same spec are two
# faults, each with its own count), so it can key a session's counts.
@dataclass(eq=False)
class Fault:
    spec: str
    protocol: str
    verb: str
    argument: str | None
    match: str | None
    nth: int | None
    times: int | None
    action: Action
    reply: Reply | None = None
    delay: float = 0.0
    fired: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        found = _SPEC.fullmatch(spec.strip())
        if not found:
            raise FaultError(f"bad fault {spec!r}: expected PROTOCOL:VERB[ ARGUMENT][[MATCH]][#N][*N]=ACTION, "
                             f"e.g. 'smtp:RCPT#2=452 4.2.2 mailbox full'")
        protocol, action = found["protocol"].lower(), found["action"].strip()
        verbs = _verbs(protocol)
        if found["verb"].upper() not in verbs:
            raise FaultError(f"bad fault {spec!r}: {protocol} has no command {found['verb']!r}, so it "
                             f"could never fire (its commands: {', '.join(verbs)})")
        fault = cls(spec=spec.strip(), protocol=protocol, verb=found["verb"].upper(),
                    argument=found["argument"].strip() if found["argument"] else None, match=found["match"],
                    nth=int(found["nth"]) if found["nth"] else None,
                    times=int(found["times"]) if found["times"] else None, action=Action.REPLY)
        if 0 in (fault.nth, fault.times):
            raise FaultError(f"bad fault {spec!r}: #N and *N count from 1, so it could never fire")
        delay = _DELAY.fullmatch(action)
        if action in (Action.DROP.value, Action.DROP_MID.value):
            fault.action = Action(action)
        elif delay:
            milliseconds = delay["milliseconds"].lstrip("0") or "0"
            # Length first: int() refuses a string of over 4300 digits (ValueError).
            if len(milliseconds) > len(str(LONGEST_DELAY_MS)) or int(milliseconds) > LONGEST_DELAY_MS:
                raise FaultError(f"bad fault {spec!r}: a delay is at most {LONGEST_DELAY_MS} ms (a year)")
            fault.action, fault.delay = Action.DELAY, int(milliseconds) / 1000
        else:
            fault.reply = _reply(fault.spec, protocol, action)
        return fault

    def matches(self, session: Session, verb: str, argument: str) -> bool:
        # Submission sessions are SMTP sessions (protocol "smtp"), so an
        # smtp: fault reaches port 587 too, as a test of a mail client expects.
        if session.protocol != self.protocol or verb != self.verb:
            return False
        if self.argument is not None and not argument.upper().startswith(self.argument.upper()):
            return False
        return self.match is None or any(self.match.lower() in text.lower()
                                         for text in (argument, session.named_user() or ""))

    def claim(self, occurrence: int) -> bool:
        """Should the fault fire for this session's ``occurrence``-th matching command?"""
        if self.nth is not None and occurrence != self.nth:
            return False
        with self._lock:  # sessions run in threads of their own
            if self.times is not None and self.fired >= self.times:
                return False
            self.fired += 1
            return True


class FaultPlan:
    """The faults of one server; sessions ask it before running each command."""

    def __init__(self, specs: tuple[str, ...] | list[str] = ()) -> None:
        self.faults = [Fault.parse(spec) for spec in specs]

    def __bool__(self) -> bool:
        return bool(self.faults)

    def add(self, spec: str) -> Fault:
        fault = Fault.parse(spec)
        self.faults.append(fault)
        return fault

    def run(self, session: Session, verb: str, argument: str, handler: Callable[[], Reply]) -> Reply:
        """The reply to a command: its handler's, unless a fault fires."""
        firing = None
        for fault in self.faults:
            if fault.matches(session, verb, argument):
                occurrence = session.fault_counts.get(fault, 0) + 1
                session.fault_counts[fault] = occurrence
                if firing is None and fault.claim(occurrence):
                    firing = fault
        if firing is None:
            return handler()
        session.context.tracer.event(session, f"FAULT injected: {firing.spec}")
        return _apply(firing, session, handler)


def _apply(fault: Fault, session: Session, handler: Callable[[], Reply]) -> Reply:
    """The reply of a command a fault fired on: the fault's own, or the
    handler's, late or cut off."""
    if fault.action is Action.REPLY:
        return fault.reply
    if fault.action is Action.DROP:
        return dataclasses.replace(session.INTERNAL_ERROR, after=After.DROP)
    reply = handler()
    if fault.action is Action.DELAY:
        return reply.delayed(reply.delay + fault.delay)
    # drop-mid: at DATA's first line of text; halfway through a multi-line
    # reply, its end never sent; after a one-line reply.
    if session.collecting_text:
        session.drop_in_text = True
        return reply
    if isinstance(reply, Pop3Reply) and reply.content is not None:
        content = b"".join(reply.content)
        return dataclasses.replace(reply, content=[content[: len(content) // 2]], after=After.DROP_MID)
    if isinstance(reply, SmtpReply) and "\n" in reply.text:
        lines = reply.text.split("\n")
        return dataclasses.replace(reply, text="\n".join(lines[: len(lines) // 2]), after=After.DROP_MID)
    return reply.closing()
