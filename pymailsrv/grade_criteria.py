"""What ``pymailsrv grade`` judges: the client's side of a saved session, one rule each.

The prober (``probe.py``) judges a *server*; this catalogue judges a
*client*, from what pymailsrv recorded while a student's program talked to
it (``trace.py``, ``transcripts.py``). Every client line of a transcript
carries how it ended (``ending``: see transcripts.py) and whether it was
``pipelined``, sent before our previous reply - the greeting included - had
gone out. That, with the server's own lines, is enough to grade the rules a
client must keep.

A criterion is data (``Criterion``): a stable id a teacher can cite
(``smtp.waits-for-greeting``), the protocol, the RFC section, the rule in
one line, and ``check``, a function of the transcript that returns
``(verdict, evidence)``:

* ``True`` (PASS) or ``False`` (FAIL), with the line that shows it;
* ``None`` (N/A) when the session never came near the rule - no DATA, no
  password, no refusal - or the transcript cannot tell (message text
  summarised because the server ran without ``--trace-bodies``).

Only the client is judged. What the server did (a 421 for too many errors,
a shutdown while the client was sending its text) never counts against it,
and a rule the client could not have known about is N/A: a POP3 client that
never asked CAPA was never told that STLS was offered. A client that fell
silent until the server timed out did leave its session (and its text)
unfinished, and that does count.

The catalogues, ``SMTP_CRITERIA`` and ``POP3_CRITERIA``, are at the foot of
the module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pymailsrv.commands import is_decimal
from pymailsrv.pop3 import SESSION_CAPABILITIES
from pymailsrv.replies import POP3_WRONG_STATE, counted, elided
from pymailsrv.trace import SENT_BEFORE_TLS, TEXT_BEFORE_354
from pymailsrv.transcripts import Transcript

Verdict = tuple["bool | None", str]

# RFC 5321 §4.2.1 says not to repeat a refused request; a third identical
# try in a row is where a retry turns into a loop.
MAX_IDENTICAL_REFUSALS = 2
# RFC 1939 §3 answers a command "issued when the session is in an incorrect
# state" with -ERR; one is a slip, a second a pattern (our threshold).
MAX_WRONG_STATE_COMMANDS = 1
# SASL mechanisms that put the password itself on the wire (RFC 4616, and
# the de-facto LOGIN); challenge-response ones such as CRAM-MD5 do not.
CLEARTEXT_MECHANISMS = {"PLAIN", "LOGIN"}

# How the tracer writes summarised message text: "[212 lines, 14 380 octets]".
_SUMMARY = re.compile(r"\[([\d ]+) lines?, ([\d ]+) octets?\]")
# A client line recorded as "****": a credential the session masked.
_MASK = "****"
# POP3_WRONG_STATE's text with its fields as patterns, so a reworded
# catalogue entry cannot silently stop this criterion from matching.
_WRONG_STATE = re.compile(re.escape("-ERR " + POP3_WRONG_STATE.text)
                          .replace(re.escape("{verb}"), r"(?P<verb>\S+)")
                          .replace(re.escape("{state}"), r"(?P<state>\S+)"))


# --- reading a transcript -----------------------------------------------------------


@dataclass
class Exchange:
    """One client command line and what followed it, up to the next command.

    ``text`` holds the lines of SMTP DATA (only with ``--trace-bodies``;
    otherwise a summary and the final dot), ``text_events`` the same as
    recorded (their ``ending``: the summary's is the first bare one, if
    any), and ``after_text`` the server's lines once the text had ended.
    """

    index: int  # position of the command in transcript.events
    event: dict
    replies: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    text_events: list[dict] = field(default_factory=list)
    after_text: list[dict] = field(default_factory=list)
    tls_before: bool = False  # a TLS handshake had been done when it was sent

    @property
    def line(self) -> str:
        return self.event["line"]

    @property
    def verb(self) -> str:
        return self.line.split(" ", 1)[0].upper()

    @property
    def arguments(self) -> list[str]:
        return self.line.split()[1:]

    @property
    def reply(self) -> str:
        """The first line of the server's answer ("" if none came)."""
        return self.replies[0] if self.replies else ""

    @property
    def pipelined(self) -> bool:
        return bool(self.event.get("pipelined"))


def is_command(event: dict) -> bool:
    """A client line read as a command (or a SASL answer), not as message text:
    only a command can be sent ahead of a reply, so only it says ``pipelined``."""
    return event["dir"] == "C" and "pipelined" in event


def is_tls_start(event: dict) -> bool:
    return event["dir"] == "--" and event["line"].startswith("TLS established")


def exchanges(transcript: Transcript) -> list[Exchange]:
    """The transcript as command -> replies, in order."""
    found: list[Exchange] = []
    tls = False
    for index, event in enumerate(transcript.events):
        if is_tls_start(event):
            tls = True
        elif is_command(event):
            found.append(Exchange(index, event, tls_before=tls))
        elif found and event["dir"] == "C":
            found[-1].text.append(event["line"])
            found[-1].text_events.append(event)
        elif found and event["dir"] == "S":
            if found[-1].text:
                found[-1].after_text.append(event)
            else:
                found[-1].replies.append(event["line"])
    return found


def refused(protocol: str, reply: str) -> bool:
    """A refusal the same command would meet again: SMTP 5yz, not 4yz, after
    which "the action may be requested again" (RFC 5321 §4.2.1); POP3 -ERR,
    but not [IN-USE] or [SYS/TEMP], which say to try again later (RFC 3206
    §3, §4)."""
    if protocol == "smtp":
        return reply[:1] == "5"
    return reply.startswith("-ERR") and not reply.startswith(("-ERR [IN-USE]", "-ERR [SYS/TEMP]"))


def shown(line: str, width: int = 60) -> str:
    """A line for an evidence column, quoted and cut to a readable width."""
    return repr(elided(line, width))


def _ending(event: dict) -> str:
    """What a line's recorded end says of it: "ended in a bare LF". A "CR"
    line may end in CRLF: the CR stands inside it (trace.py's _line_end)."""
    return {"CRLF": "ended in CRLF", "LF": "ended in a bare LF", "CR": "held a bare CR",
            "none": "had no line end"}.get(event["ending"], f"ended in {event['ending']}")


# --- rules both protocols share ------------------------------------------------------


def waits_for_greeting(t: Transcript) -> Verdict:
    """RFC 5321 §3.1, §4.3.1, RFC 1939 §4: the server speaks first; the client waits for it."""
    commands = exchanges(t)
    if not commands:
        return None, "the client sent no command"
    first = commands[0]
    greeting = next((event for event in t.events[: first.index] if event["dir"] == "S"), None)
    if greeting is None or first.pipelined:
        return False, f"{shown(first.line)} was sent before the greeting went out"
    return True, f"{shown(first.line)} came after the greeting {shown(greeting['line'], 40)}"


def uses_crlf(t: Transcript) -> Verdict:
    """RFC 5321 §2.3.8, RFC 1939 §3: every line ends in CR LF, the message text's too."""
    commands = exchanges(t)
    if not commands:
        return None, "the client sent no command"
    wrong = [exchange for exchange in commands if exchange.event["ending"] != "CRLF"]
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        return False, f"{shown(wrong[0].line)} {_ending(wrong[0].event)}{more}"
    # Text lines in transcripts older than their recorded line ends have none: CRLF.
    text = next((event for exchange in commands for event in exchange.text_events
                 if event.get("ending", "CRLF") != "CRLF"), None)
    if text is not None:
        return False, f"the message text {_ending(text)} (at {shown(text['line'], 40)})"
    every = "all " if len(commands) > 1 else ""
    return True, f"{every}{counted(len(commands), 'command line')} ended in CRLF"


def _pipelining_offered(t: Transcript, exchange: Exchange) -> bool:
    """Did this reply advertise PIPELINING (EHLO keyword, or a CAPA line)?"""
    if t.header["protocol"] == "smtp":
        return exchange.verb == "EHLO" and any(
            re.match(r"250[ -]PIPELINING\b", line, re.IGNORECASE) for line in exchange.replies)
    if exchange.verb != "CAPA" or not exchange.reply.startswith("+OK"):
        return False
    listed = exchange.replies[1:]
    if len(listed) == 1 and _SUMMARY.fullmatch(listed[0]):
        # Run without --trace-bodies, the list itself was not recorded;
        # pymailsrv's CAPA always carries its session capabilities.
        return "PIPELINING" in SESSION_CAPABILITIES
    return any(line.split()[:1] == ["PIPELINING"] for line in listed)


# RFC 2920 §3.1: these "can only appear as the last command in a group",
# as their replies change what may follow (EHLO's lists what is offered).
_LAST_IN_A_GROUP = ("EHLO", "DATA", "VRFY", "EXPN", "TURN", "QUIT", "NOOP")
# RFC 4954 §4: AUTH too, unless it carries the initial response of a
# mechanism that completes in one round trip; "PLAIN [PLAIN] and EXTERNAL
# [SASL]" are its examples.
_ONE_ROUND_TRIP_MECHANISMS = ("PLAIN", "EXTERNAL")


def _ends_its_group(exchange: Exchange) -> bool:
    """May nothing be pipelined after this SMTP command (RFC 2920 §3.1, RFC 4954 §4)?"""
    if exchange.verb == "AUTH":
        mechanism, *initial_response = exchange.arguments or [""]
        return not (initial_response and mechanism.upper() in _ONE_ROUND_TRIP_MECHANISMS)
    # (A line pipelined after DATA's text went with the text, after the
    # 354: RFC 2920 §3.1 lets the text be the first "command" of a group.)
    return exchange.verb in _LAST_IN_A_GROUP and not (exchange.verb == "DATA" and exchange.text_events)


def waits_for_replies(t: Transcript) -> Verdict:
    """RFC 2920 §3, RFC 2449 §6.6: no command before the last reply, unless a
    reply the client had already read offered PIPELINING; never a SASL
    answer before its challenge (RFC 4954 §4, RFC 5034 §4)."""
    smtp = t.header["protocol"] == "smtp"
    # What the server recorded of lines that are no command in the transcript:
    for event in t.events:
        if event["dir"] != "--":
            continue
        if event["line"] == TEXT_BEFORE_354:
            return False, "the message text was sent before the 354 reply to DATA, which RFC 2920 §3.1 puts last"
        if event["line"].endswith(SENT_BEFORE_TLS):  # thrown away unrun
            return False, (f"{event['line'].removesuffix(SENT_BEFORE_TLS).strip()} sent with "
                           f"{'STARTTLS' if smtp else 'STLS'}, before its reply and the TLS handshake "
                           "(RFC 3207 §4, RFC 2595 §4)")
    commands = exchanges(t)
    if len(commands) < 2:
        return None, "fewer than two commands: nothing to wait between"
    asked = "EHLO" if smtp else "CAPA"
    offered = _pipelining_offered(t, commands[0])  # by the replies so far
    known = False  # by the replies the client had read when it sent the line in hand
    previous = commands[0]  # the first line is waits-for-greeting's business
    for exchange in commands[1:]:
        if exchange.tls_before and not previous.tls_before:
            offered = known = False  # RFC 3207 §4.2, RFC 2595 §4: forget what was said before TLS
        if not exchange.pipelined:
            known = offered  # sent after every reply before it had come
        elif not known:
            # Sent with the line before it, so before that line's reply: an
            # EHLO's own offer cannot cover the MAIL sent along with it.
            return False, (f"{shown(exchange.line)} was sent before the reply to {shown(previous.line)}, "
                           f"and no {asked} reply it had read offered PIPELINING")
        elif exchange.line == _MASK:
            # A SASL answer answers the server's challenge (RFC 4954 §4,
            # RFC 5034 §4): sent ahead, it answered none it had read.
            return False, (f"a SASL answer (****) was sent before the reply to {shown(previous.line)}: "
                           "it answers a challenge the client had not yet read")
        elif smtp and _ends_its_group(previous):
            rfc = "RFC 4954 §4" if previous.verb == "AUTH" else "RFC 2920 §3.1"
            return False, (f"{shown(exchange.line)} was sent before the reply to {shown(previous.line)}, "
                           f"which {rfc} allows only last in a group")
        if _pipelining_offered(t, exchange):
            offered = True
        previous = exchange
    pipelined = sum(exchange.pipelined for exchange in commands[1:])
    if pipelined:
        return True, f"{counted(pipelined, 'pipelined line')}, all after {asked} offered PIPELINING"
    return True, f"waited for the reply to each of {len(commands)} commands"


def _client_ended(outcome: str) -> bool:
    """The session's end record says the client closed or reset the connection."""
    return outcome == "dropped by client" or (outcome.startswith("network error") and "reset" in outcome)


def _issues_quit(t: Transcript, closing_reply: str) -> Verdict:
    # A QUIT the server refused ("QUIT now": a syntax error) ended nothing.
    accepted = ("2",) if t.header["protocol"] == "smtp" else ("+OK",)
    quit_ = next((exchange for exchange in exchanges(t)
                  if exchange.verb == "QUIT" and exchange.reply.startswith(accepted)), None)
    if quit_ is not None:
        return True, f"QUIT, answered {shown(quit_.reply, 40)}"
    if t.end is None:
        return None, "the session is still in progress (no end record)"
    outcome = t.end["outcome"]
    if _client_ended(outcome):
        how = "reset" if outcome.startswith("network error") else "closed"
        return False, f"the client {how} the connection without an accepted QUIT"
    if outcome == "timeout":
        return False, f"the client went silent until the server gave up ({closing_reply})"
    return None, f"the server ended the session: {shown(outcome, 50)}"


def smtp_issues_quit(t: Transcript) -> Verdict:
    """RFC 5321 §4.1.1.10: the client MUST NOT close the channel before it sends QUIT."""
    return _issues_quit(t, "421 timeout")


def pop3_issues_quit(t: Transcript) -> Verdict:
    """RFC 1939 §6: only QUIT enters UPDATE; without it, DELE changes nothing."""
    return _issues_quit(t, "autologout")


def no_repeated_refusals(t: Transcript) -> Verdict:
    """RFC 5321 §4.2.1: a client SHOULD NOT repeat the exact request that was refused.

    POP3 has no such sentence; RFC 3206 §3 gives its response codes so that
    a client knows whether trying again can help, and we hold it to that.
    """
    protocol = t.header["protocol"]
    run: list[Exchange] = []
    refusals = 0
    for exchange in exchanges(t):
        if not refused(protocol, exchange.reply):
            run = []
            continue
        refusals += 1
        if _MASK in exchange.line:
            run = []  # masked credentials: two "PASS ****" may be two different passwords
            continue
        run = run + [exchange] if run and run[-1].line == exchange.line else [exchange]
        if len(run) > MAX_IDENTICAL_REFUSALS:
            return False, f"{shown(run[0].line)} refused {len(run)} times in a row ({shown(exchange.reply, 40)})"
    if not refusals:
        again = "a 4yz" if protocol == "smtp" else "an [IN-USE] or [SYS/TEMP]"
        return None, f"no command was refused for good ({again} may be tried again)"
    return True, (f"{counted(refusals, 'refused command')}, none sent again unchanged "
                  f"more than {MAX_IDENTICAL_REFUSALS} times")


def _tls_offered(t: Transcript, exchange: Exchange) -> bool | None:
    """Did this reply offer STARTTLS/STLS? None: CAPA's list was not recorded."""
    if t.header["protocol"] == "smtp":
        return exchange.verb == "EHLO" and any(
            re.match(r"250[ -]STARTTLS\b", line, re.IGNORECASE) for line in exchange.replies)
    if exchange.verb != "CAPA" or not exchange.reply.startswith("+OK"):
        return False
    listed = exchange.replies[1:]
    if len(listed) == 1 and _SUMMARY.fullmatch(listed[0]):
        return None  # STLS is listed only when the server has a certificate: cannot tell
    return any(line.split()[:1] == ["STLS"] for line in listed)


def _sends_password(t: Transcript, exchange: Exchange) -> bool:
    if exchange.verb == "PASS" and t.header["protocol"] == "pop3":
        return True
    mechanism = exchange.arguments[:1]
    return exchange.verb == "AUTH" and bool(mechanism) and mechanism[0].upper() in CLEARTEXT_MECHANISMS


def no_password_before_tls(t: Transcript) -> Verdict:
    """RFC 8314 §5.2 (and RFC 2595 §2.3 for POP3): where TLS is offered, no
    password crosses before it."""
    starter = "STARTTLS" if t.header["protocol"] == "smtp" else "STLS"
    offered: bool | None = False
    for exchange in exchanges(t):
        if exchange.tls_before:
            if _sends_password(t, exchange):
                return True, f"{shown(exchange.line)} was sent over TLS"
            continue
        if _sends_password(t, exchange):
            if offered:
                return False, f"{shown(exchange.line)} was sent in the clear after the server offered {starter}"
            if offered is None:
                return None, (f"{shown(exchange.line)} was sent in the clear; whether {starter} was offered "
                              "is not recorded (CAPA's list needs --trace-bodies)")
            return None, f"a password was sent in the clear, but {starter} had not been offered"
        seen = _tls_offered(t, exchange)
        if seen or (seen is None and offered is False):
            offered = seen
    return None, "no password was sent"


# --- SMTP ----------------------------------------------------------------------------


def ehlo_before_mail(t: Transcript) -> Verdict:
    """RFC 5321 §4.1.4: EHLO or HELO before the first MAIL; RFC 3207 §4.2: again after STARTTLS."""
    greeted = None  # the greeting that stands now
    first = None  # the one that stood at the first MAIL (TLS may have ended it since)
    tls = False
    for exchange in exchanges(t):
        if exchange.tls_before and not tls:
            tls, greeted = True, None  # RFC 3207 §4.2: the session starts afresh
        if exchange.verb in ("EHLO", "HELO") and exchange.reply.startswith("250"):
            greeted = exchange
        elif exchange.verb == "MAIL":
            if greeted is None:
                after_tls = " since STARTTLS" if tls else ""
                return False, (f"{shown(exchange.line)} came before any EHLO/HELO{after_tls} "
                               f"({shown(exchange.reply, 40)})")
            first = first or greeted
    if first is None:
        return None, "the client sent no MAIL"
    return True, f"{shown(first.line)} came before MAIL"


def _data_texts(t: Transcript) -> Iterator[Exchange]:
    """DATA commands that got 354, so the client sent message text."""
    for exchange in exchanges(t):
        if exchange.verb == "DATA" and exchange.reply.startswith("354"):
            yield exchange


def _summarised(exchange: Exchange) -> bool:
    return len(exchange.text) <= 2 and bool(exchange.text) and bool(_SUMMARY.fullmatch(exchange.text[0]))


def dot_stuffs_text(t: Transcript) -> Verdict:
    """RFC 5321 §4.5.2: a text line that starts with '.' gets one more '.' in front."""
    texts = list(_data_texts(t))
    if not texts:
        return None, "no message text was sent"
    recorded = [exchange for exchange in texts if not _summarised(exchange)]
    if not recorded:
        return None, "message text is summarised in this transcript (run the server with --trace-bodies)"
    dotted = 0
    for exchange in recorded:
        events = exchange.text_events[:-1] if exchange.text[-1:] == ["."] else exchange.text_events
        for event in events:  # as on the wire: a stuffed line still has both dots
            line = event["line"]
            if line == "." and event.get("ending", "CRLF") != "CRLF":
                # Meant as the end, surely: its bare line end is what went
                # wrong (uses-crlf's business), not its stuffing.
                continue
            if line.startswith("."):
                dotted += 1
                if line[1:2] != ".":
                    return False, f"text line {shown(line)} was sent without its stuffing dot"
    if not dotted:
        return None, "no text line starts with '.'"
    return True, f"{counted(dotted, 'text line')} starting with '.', stuffed"


def ends_data_correctly(t: Transcript) -> Verdict:
    """RFC 5321 §4.1.1.4: the text ends with a line holding only '.' (<CRLF>.<CRLF>)."""
    texts = list(_data_texts(t))
    if not texts:
        return None, "no message text was sent"
    for exchange in texts:
        # The text ended when the server's first line after it was read in
        # a state past DATA. A line in DATA cut it short; so did one right
        # after the 354 when the text was summarised (nothing recorded yet).
        after = exchange.after_text[0] if exchange.after_text else None
        if after is not None and after["state"] != "DATA":
            continue
        if t.end is None:
            return None, "the session is still in progress (no end record)"
        outcome = t.end["outcome"]
        if outcome == "timeout":
            return False, "the text never ended with '.': the server gave up waiting for it"
        if _client_ended(outcome):
            return False, "the text never ended: the connection closed before <CRLF>.<CRLF>"
        return None, f"the server ended the session while the text came: {shown(outcome, 50)}"
    last = texts[-1].after_text[0]["line"]
    return True, f"{counted(len(texts), 'message text')} ended with '.', answered {shown(last, 40)}"


def no_data_without_recipients(t: Transcript) -> Verdict:
    """No DATA once every RCPT was refused (RFC 2920 §3: unless pipelined).

    Good practice, after RFC 5321 §3.3, which lets the server refuse such a
    DATA (503 or 554) and forbids the client only the text without a 354:
    a client that has read every refusal has nothing to send.
    """
    accepted, refusals, datas = 0, [], 0
    for exchange in exchanges(t):
        if exchange.verb in ("MAIL", "RSET", "EHLO", "HELO"):
            accepted, refusals = 0, []
        elif exchange.verb == "RCPT":
            if exchange.reply.startswith("2"):
                accepted += 1
            else:
                refusals.append(exchange)
        elif exchange.verb == "DATA":
            datas += 1
            # A pipelined DATA went out before the RCPT replies came back
            # (RFC 2920 §3): the client learns of the refusals from its 554.
            if accepted == 0 and not exchange.pipelined:
                if refusals:
                    return False, (f"DATA after every RCPT was refused ({shown(refusals[-1].line, 30)}: "
                                   f"{shown(refusals[-1].reply, 40)})")
                return False, f"DATA with no recipient at all ({shown(exchange.reply, 40)})"
            accepted = 0
    if not datas:
        return None, "the client sent no DATA"
    return True, f"{counted(datas, 'DATA command')}, each after an accepted recipient"


# --- POP3 ----------------------------------------------------------------------------


def _listed_numbers(exchange: Exchange) -> tuple[int, set[int]]:
    """What a STAT, LIST or UIDL reply told the client: (message count, numbers named)."""
    if not exchange.reply.startswith("+OK"):
        return 0, set()
    words = exchange.reply.split()
    count = int(words[1]) if len(words) > 1 and is_decimal(words[1]) else 0
    if exchange.verb == "STAT":
        return count, set()
    if exchange.arguments:  # LIST n / UIDL n: "+OK n ..." names that one message
        return 0, {count} if count else set()
    listed = exchange.replies[1:]
    if len(listed) == 1 and (summary := _SUMMARY.fullmatch(listed[0])):
        lines = int(summary.group(1).replace(" ", "")) - 1  # the final "." is counted
        return max(count if exchange.verb == "LIST" else 0, lines), set()
    numbers = {int(line.split()[0]) for line in listed if line.split()[:1] and is_decimal(line.split()[0])}
    return max(numbers, default=0), numbers


_LOGIN_COUNT = re.compile(r"^\+OK .*\bhas ([0-9]+) messages? \(")


def uses_listed_numbers(t: Transcript) -> Verdict:
    """RFC 1939 §5: RETR/DELE/TOP name messages STAT/LIST/UIDL (or the login's
    +OK) reported, never a deleted one."""
    highest, named, deleted = 0, set(), set()
    told = False  # whether the server had said anything of the maildrop's messages
    uses = 0
    for exchange in exchanges(t):
        if exchange.verb in ("STAT", "LIST", "UIDL"):
            count, numbers = _listed_numbers(exchange)
            highest = max(highest, count)
            named |= numbers
            told = True
        elif (exchange.verb in ("PASS", "APOP", "AUTH", _MASK)
              and (said := _LOGIN_COUNT.search(exchange.reply))):
            # RFC 1939 §7's own example: "+OK mrose's maildrop has 2 messages
            # (320 octets)". A client may go by it (curl does). The reply to
            # PASS, APOP or AUTH, or to AUTH's last response line (shown ****).
            highest = max(highest, int(said.group(1)))
            told = True
        elif exchange.verb == "RSET" and exchange.reply.startswith("+OK"):
            deleted.clear()
        elif exchange.verb in ("RETR", "DELE", "TOP") and exchange.arguments:
            uses += 1
            word = exchange.arguments[0]
            number = int(word) if is_decimal(word) else None
            if number in deleted:
                return False, f"{shown(exchange.line)} names a message this session had deleted"
            if number is None or not (1 <= number <= highest or number in named):
                listed = (f"1-{highest}" if highest else "no message" if told
                          else "nothing (no STAT, LIST, UIDL, nor a count at login)")
                return False, f"{shown(exchange.line)} but the server had listed {listed}"
            if exchange.verb == "DELE" and exchange.reply.startswith("+OK"):
                deleted.add(number)
    if not uses:
        return None, "no RETR, DELE or TOP"
    return True, f"{counted(uses, 'RETR/DELE/TOP command')}, all on listed messages"


def commands_in_right_state(t: Transcript) -> Verdict:
    """RFC 1939 §3: each command only in a state that allows it (one slip is forgiven)."""
    commands = exchanges(t)
    if not commands:
        return None, "the client sent no command"
    wrong = [(exchange, match) for exchange in commands if (match := _WRONG_STATE.match(exchange.reply))]
    listed = ", ".join(f"{match['verb']} in {match['state']}" for _, match in wrong)
    if len(wrong) > MAX_WRONG_STATE_COMMANDS:
        return False, f"{len(wrong)} commands in the wrong state: {listed}"
    if wrong:
        return True, f"one command in the wrong state, not repeated: {listed}"
    return True, f"every command in a state that allows it ({counted(len(commands), 'command')})"


# --- the catalogues ------------------------------------------------------------------


@dataclass(frozen=True)
class Criterion:
    """One rule a client keeps.

    id:        stable name, ``protocol.what-is-judged``; teachers cite it.
    protocol:  "smtp" or "pop3": the transcripts it applies to.
    rfc:       the section that states the rule.
    title:     the rule, in one line.
    check:     transcript -> (True/False/None, the evidence line).
    """

    id: str
    protocol: str
    rfc: str
    title: str
    check: Callable[[Transcript], Verdict]


SMTP_CRITERIA = [
    Criterion("smtp.waits-for-greeting", "smtp", "RFC 5321 §3.1, §4.3.1",
              "sends nothing before the 220 greeting", waits_for_greeting),
    Criterion("smtp.uses-crlf", "smtp", "RFC 5321 §2.3.8",
              "ends every line, commands and message text, with CRLF", uses_crlf),
    Criterion("smtp.waits-for-replies", "smtp", "RFC 5321 §4.3.1, RFC 2920 §3",
              "waits for each reply unless EHLO offered PIPELINING", waits_for_replies),
    Criterion("smtp.ehlo-before-mail", "smtp", "RFC 5321 §4.1.4, RFC 3207 §4.2",
              "says EHLO or HELO before MAIL (again after STARTTLS)", ehlo_before_mail),
    Criterion("smtp.dot-stuffs-text", "smtp", "RFC 5321 §4.5.2",
              "doubles the dot of text lines that start with '.'", dot_stuffs_text),
    Criterion("smtp.ends-data-correctly", "smtp", "RFC 5321 §4.1.1.4",
              "ends the text with <CRLF>.<CRLF>", ends_data_correctly),
    Criterion("smtp.no-data-without-recipients", "smtp", "RFC 5321 §3.3 (practice)",
              "sends no DATA once every RCPT was refused", no_data_without_recipients),
    Criterion("smtp.no-repeated-refusals", "smtp", "RFC 5321 §4.2.1",
              "does not send a refused command a third time unchanged", no_repeated_refusals),
    Criterion("smtp.no-password-before-tls", "smtp", "RFC 8314 §5.2",
              "sends no AUTH PLAIN/LOGIN before an offered STARTTLS", no_password_before_tls),
    Criterion("smtp.issues-quit", "smtp", "RFC 5321 §4.1.1.10", "ends the session with QUIT", smtp_issues_quit),
]

POP3_CRITERIA = [
    Criterion("pop3.waits-for-greeting", "pop3", "RFC 1939 §4", "sends nothing before the +OK greeting",
              waits_for_greeting),
    Criterion("pop3.uses-crlf", "pop3", "RFC 1939 §3", "ends every command line with CRLF", uses_crlf),
    Criterion("pop3.waits-for-replies", "pop3", "RFC 2449 §6.6",
              "waits for each reply unless CAPA listed PIPELINING", waits_for_replies),
    Criterion("pop3.uses-listed-numbers", "pop3", "RFC 1939 §5",
              "RETR/DELE/TOP only messages STAT/LIST/UIDL or the login reported", uses_listed_numbers),
    Criterion("pop3.commands-in-right-state", "pop3", "RFC 1939 §3",
              "sends a command in the wrong state at most once", commands_in_right_state),
    Criterion("pop3.no-repeated-refusals", "pop3", "RFC 5321 §4.2.1 (practice)",
              "does not send a refused command a third time unchanged", no_repeated_refusals),
    Criterion("pop3.no-password-before-tls", "pop3", "RFC 2595 §2.3, RFC 8314 §5.2",
              "sends no PASS/AUTH before STLS, when CAPA offered it", no_password_before_tls),
    Criterion("pop3.issues-quit", "pop3", "RFC 1939 §6", "ends the session with QUIT", pop3_issues_quit),
]

CRITERIA: dict[str, list[Criterion]] = {"smtp": SMTP_CRITERIA, "pop3": POP3_CRITERIA}
