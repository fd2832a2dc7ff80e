"""The protocol trace: every line on the wire, in the RFCs' ``C:``/``S:`` notation.

The transport reports each line it reads and writes here, and the sessions
report their state changes. With ``--trace`` the events are printed live to
stderr, one line each::

    01:02:03.456 pop3 #7 127.0.0.1 AUTHORIZATION C: USER alice
    01:02:03.457 pop3 #7 127.0.0.1 AUTHORIZATION S: +OK send PASS
    01:02:03.458 pop3 #7 127.0.0.1 AUTHORIZATION C: PASS ****
    01:02:03.470 pop3 #7 127.0.0.1 -- AUTHORIZATION -> TRANSACTION

* Credentials never reach a trace: the session masks them (``Session.mask``)
  before a client line is recorded - ``PASS ****``, ``APOP alice ****``,
  ``AUTH PLAIN ****`` and every line of a SASL exchange.
* Message text (a RETR body, SMTP DATA) is summarised as
  ``[212 lines, 14 380 octets]`` unless ``--trace-bodies``.
* ``--annotate`` adds what a line means and where the RFC says so: client
  lines from the command table (syntax and section), server lines from the
  reply's ``note`` in the catalogue (``replies.py``).
* ``--trace-format json`` prints one JSON object per event, for tools; the
  text form is coloured on a terminal and plain when piped.
* ``--transcripts`` also saves every session to its own file,
  ``ROOT/.pymailsrv/transcripts/<time>-<protocol>-<id>.jsonl``: the same
  events as JSON lines, between a ``session`` and an ``end`` record, which
  ``pymailsrv transcripts list/show`` read back (``transcripts.py``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, TextIO

from pymailsrv.durable import make_private_directory, private
from pymailsrv.replies import Reply, counted

if TYPE_CHECKING:
    import enum

    from pymailsrv.session import Session

log = logging.getLogger("pymailsrv.trace")

# ANSI colours for the text form on a terminal.
_COLOURS = {"C": "\033[36m", "S+": "\033[32m", "S-": "\033[31m", "--": "\033[33m"}
_DIM, _RESET = "\033[2m", "\033[0m"
# The text form shows control characters escaped: a client's ESC could
# recolour or rewrite the terminal a class is watching, and a bare CR
# overwrite the line. C0 and DEL show as \x1b, as an undecodable octet
# does; the C1 controls (a one-character CSI, U+009B) as \u009b, so that
# U+0085 and an undecodable 0x85 stay apart. So do the characters that
# reorder or break what is around them: the bidirectional embeddings,
# overrides and isolates, with which a line can read otherwise than it was
# sent (CVE-2021-42574, "Trojan Source"), and the line and paragraph
# separators that editors and browsers show as a line end. The marks (LRM,
# RLM, ALM) stay: right-to-left text uses them, and each only sets the
# direction of the one place it stands in. The live JSON form is ASCII
# (json.dumps escapes the rest); transcripts keep the characters, and
# 'transcripts show' escapes them as the text form does. A lone surrogate
# (an undecodable octet, or a "\\ud800" written into a transcript by hand)
# is escaped too: no terminal, and no UTF-8 encoder, takes one.
_BIDI_CONTROLS = (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
_CONTROLS_SHOWN = {**{code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)},
                   **{code: f"\\u{code:04x}" for code in (*range(0x80, 0xA0), *_BIDI_CONTROLS, 0x2028, 0x2029,
                                                          *range(0xD800, 0xE000))}}
# Reports (grade, probe, mailbox, queue and transcript listings) keep their
# layout, newlines and tabs, and show everything else as the trace does.
# U+FFFE and U+FFFF are no XML characters (a JUnit file): escaped there too.
_SHOWN_IN_REPORTS = {**{code: escape for code, escape in _CONTROLS_SHOWN.items() if code not in (0x09, 0x0A)},
                     **{code: f"\\u{code:04x}" for code in (0xFFFE, 0xFFFF)}}


def escape_controls(report: str) -> str:
    """``report`` safe for a teacher's terminal and for XML 1.0: control
    characters but newline and tab escaped (ESC as \\x1b), and those that
    reorder or break a line (U+202E, U+2028), as the trace shows them."""
    return report.translate(_SHOWN_IN_REPORTS)


def ascii_json(document: object) -> str:
    """``document`` as JSON that escape_controls leaves as it is, and so any
    JSON parser still reads: ASCII, with every other character as \\uXXXX,
    and DEL, which JSON may leave raw, so too (\\x7f is no JSON escape)."""
    return json.dumps(document, indent=2).replace("\x7f", "\\u007f")


@dataclass(frozen=True)
class TraceOptions:
    live: bool = False  # print events to the stream as they happen
    bodies: bool = False  # show message text line by line, not summarised
    annotate: bool = False
    json: bool = False
    transcripts_dir: Path | None = None  # save each session there
    transcripts_keep: int = 1000


def shown(text: object) -> str:
    """``text`` as the trace shows a line: every control character escaped, line ends too."""
    return str(text).translate(_CONTROLS_SHOWN)


def format_event(event: dict) -> str:
    """One event in the text form, without the time and client columns.

    A client line that did not wait for the reply before it, or did not end
    in CRLF, says so after it: the JSON form and the grader see that, and a
    class going through a transcript should too.
    """
    line = shown(event["line"])
    if event["dir"] == "--":
        return f"-- {line}"
    marks = ["pipelined"] if event.get("pipelined") else []
    ending = event.get("ending", "CRLF")
    if ending != "CRLF":
        marks.append("no line end" if ending == "none" else f"bare {shown(ending)}")  # a hand edit may hold anything
    after = f"  ({', '.join(marks)})" if marks else ""
    return f"{shown(event['state'])} {shown(event['dir'])}: {line}{after}"


# The event a trace records when message text came before the reply to
# DATA had gone out (the grader looks for it: RFC 2920 §3.1 puts DATA last
# in a group, as its 354 must be read before the text).
TEXT_BEFORE_354 = "the message text came before the 354 reply to DATA was sent"
# The end of the event recorded for plaintext sent along with STARTTLS or
# STLS, before their reply and the handshake (the grader looks for it too).
SENT_BEFORE_TLS = "sent with it, before TLS: thrown away, never run (RFC 3207 §4.2, RFC 2595 §4)"


def _line_end(line: bytes) -> str:
    """How a line read from a client ended: "CRLF", "LF" (bare), or "none";
    "CR" where a bare CR stands in it, as RFC 5321 §2.3.8 allows a CR only
    in a line end (the summary of message text says the same)."""
    if b"\r" in _content(line):
        return "CR"
    return "CRLF" if line.endswith(b"\r\n") else "LF" if line.endswith(b"\n") else "none"


def _content(line: bytes) -> bytes:
    """A line read from a client without its line end: one CRLF or LF, no
    more (a CR before it is no part of it, and shows)."""
    return line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else line


def octets_summary(lines: int, octets: int) -> str:
    """``[212 lines, 14 380 octets]``: how message text appears in a trace."""
    return f"[{counted(lines, 'line', grouped=True)}, {counted(octets, 'octet', grouped=True)}]"


# Two servers on one data root (or a restart) may number a session alike
# within one second: the transcript then takes the next free "-2" ... name.
TRANSCRIPT_NAME_TRIES = 10
# A transcript's name: the second its session began, the protocol, the
# session number, and the "-2" ... that a taken name was given.
_TRANSCRIPT_NAME = re.compile(r"([0-9]{8}T[0-9]{6})-[a-z0-9]+-([0-9]+)(?:-([0-9]+))?\.jsonl")


def oldest_first(paths: Iterable[Path]) -> list[Path]:
    """Transcripts in the order their sessions began: by the second, then by
    session number (by name alone, pop3 came before smtp within a second,
    and smtp-10 before smtp-9)."""
    def began(path: Path) -> tuple[str, int, int]:
        match = _TRANSCRIPT_NAME.fullmatch(path.name)
        return (match[1], int(match[2]), int(match[3] or 1)) if match else (path.name, 0, 0)
    return sorted(paths, key=began)


class Tracer:
    def __init__(self, options: TraceOptions | None = None, stream: TextIO | None = None) -> None:
        self.options = options or TraceOptions()
        self._stream = stream
        self._lock = threading.Lock()
        self._transcripts: dict[int, IO[str]] = {}
        self._transcripts_failing = False  # warned once; sessions go on without transcripts

    @property
    def bodies(self) -> bool:
        return self.options.bodies

    @property
    def active(self) -> bool:
        return self.options.live or self.options.transcripts_dir is not None

    # --- recording ---------------------------------------------------------------

    def _record(self, session: Session, direction: str, line: str, note: str = "", refusal: bool = False,
                **extra: object) -> None:
        """One event, to the live trace and the transcript; ``refusal`` only
        colours a server line red on a terminal (a listing's "4 180" is none)."""
        if not self.active:
            return
        now = time.time()
        event = {"time": round(now, 3), "protocol": session.protocol, "session": session.session_id,
                 "client": session.peer[0], "state": session.state.name, "dir": direction, "line": line,
                 **({"note": note} if note else {}), **extra}
        with self._lock:
            if self.options.live:
                self._print(event, now, refusal)
            transcript = self._transcripts.get(session.session_id)
            if transcript is not None:
                try:
                    transcript.write(json.dumps(event, ensure_ascii=False) + "\n")
                except OSError as error:
                    self._transcript_failed(error)

    def _print(self, event: dict, now: float, refusal: bool) -> None:
        stream = self._stream or sys.stderr
        if self.options.json:
            stream.write(json.dumps(event) + "\n")
            stream.flush()
            return
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        who = f"{event['protocol']} #{event['session']} {event['client']}"
        text = format_event(event)
        if self.options.annotate and event.get("note"):
            text += f"   ; {event['note']}"
        if stream.isatty():
            key = event["dir"]
            if key == "S":
                key = "S-" if refusal else "S+"
            text = f"{_COLOURS[key]}{text}{_RESET}"
            stamp = f"{_DIM}{stamp}{_RESET}"
        stream.write(f"{stamp} {who} {text}\n")
        stream.flush()

    # --- what the transport and the sessions report --------------------------------

    def session_started(self, session: Session) -> None:
        directory = self.options.transcripts_dir
        if directory is None:
            return
        header = {"record": "session", "protocol": session.protocol, "session": session.session_id,
                  "client": session.peer[0], "time": round(time.time(), 3)}
        try:
            make_private_directory(directory)
            transcript = self._new_transcript(directory, f"{time.strftime('%Y%m%dT%H%M%S')}-"
                                                         f"{session.protocol}-{session.session_id}")
            transcript.write(json.dumps(header) + "\n")
        except OSError as error:
            self._transcript_failed(error)
            return
        with self._lock:
            self._transcripts[session.session_id] = transcript

    @staticmethod
    def _new_transcript(directory: Path, stem: str) -> IO[str]:
        for suffix in ["", *(f"-{number}" for number in range(2, TRANSCRIPT_NAME_TRIES + 1))]:
            try:
                return open(directory / f"{stem}{suffix}.jsonl", "x", encoding="utf-8", opener=private)
            except FileExistsError:
                continue
        raise FileExistsError(f"{stem}.jsonl and its {TRANSCRIPT_NAME_TRIES - 1} other names are taken")

    def _transcript_failed(self, error: OSError) -> None:
        """A transcript is a record for teaching, not the mail: the session goes on without it."""
        if not self._transcripts_failing:  # once, not at every session
            self._transcripts_failing = True
            log.warning("cannot save transcripts in %s (%s); sessions go on without them",
                        self.options.transcripts_dir, error.strerror or error)

    def session_ended(self, session: Session, outcome: str) -> None:
        with self._lock:
            transcript = self._transcripts.pop(session.session_id, None)
        if transcript is None:
            return
        footer = {"record": "end", "time": round(time.time(), 3), "user": session.user,
                  "commands": session.commands_run, "outcome": outcome}
        try:
            with transcript:
                transcript.write(json.dumps(footer) + "\n")
            self._prune()
        except OSError as error:  # a full disk, say
            self._transcript_failed(error)

    def _prune(self) -> None:
        """Keep only the newest ``transcripts_keep`` transcripts."""
        directory = self.options.transcripts_dir
        paths = oldest_first(directory.glob("*.jsonl"))
        for path in paths[: max(0, len(paths) - self.options.transcripts_keep)]:
            path.unlink(missing_ok=True)

    def client_line(self, session: Session, line: bytes, pipelined: bool = False) -> None:
        if self.active:
            text = session.mask(_content(line)).decode("utf-8", "backslashreplace")
            self._record(session, "C", text, session.annotation(line), ending=_line_end(line), pipelined=pipelined)

    def client_text_line(self, session: Session, line: bytes) -> None:
        if self.active and self.bodies:
            self._record(session, "C", _content(line).decode("utf-8", "backslashreplace"), ending=_line_end(line))

    def client_text(self, session: Session, lines: int, octets: int, end_line: bytes,
                    bare_line_end: str | None = None) -> None:
        """The text has ended: its summary, then the line that ended it. The
        summary's ``ending`` is CRLF, or the first bare line end (LF, CR) in it."""
        if self.active and not self.bodies:  # with bodies, every line was recorded as it came
            self._record(session, "C", octets_summary(lines, octets), ending=bare_line_end or "CRLF")
            self._record(session, "C", end_line.rstrip(b"\r\n").decode("ascii", "backslashreplace"))

    def server_reply(self, session: Session, reply: Reply) -> None:
        for number, line in enumerate(reply.head()):
            self._record(session, "S", line, "" if number else reply.note,  # a reply's note, once
                         refusal=reply.refused)

    def server_body_line(self, session: Session, wire_line: bytes) -> None:
        self._record(session, "S", wire_line.rstrip(b"\r\n").decode("utf-8", "backslashreplace"))

    def server_text(self, session: Session, lines: int, octets: int, ended: bool) -> None:
        """Message text sent (RETR, TOP), summarised; then the dot that ended it."""
        self._record(session, "S", octets_summary(lines, octets))
        if ended:
            self._record(session, "S", ".")

    def event(self, session: Session, text: str) -> None:
        """Something that is not a protocol line: a TLS handshake, say."""
        self._record(session, "--", text)

    def state_change(self, session: Session, old: enum.Enum, new: enum.Enum) -> None:
        if self.active:  # else the line is not even formatted: this runs several times a message
            self._record(session, "--", f"{old.name} -> {new.name}")
