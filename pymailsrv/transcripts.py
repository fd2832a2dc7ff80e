"""Saved session transcripts: ``pymailsrv transcripts list`` and ``show``.

With ``--transcripts`` the tracer (``trace.py``) saves each session as JSON
lines in ``ROOT/.pymailsrv/transcripts/<time>-<protocol>-<id>.jsonl``:

* a ``{"record": "session", ...}`` line: protocol, session id, client, time;
* one line per event, as the live trace shows them (``dir`` is ``C``, ``S``
  or ``--``; client lines also carry their ``ending`` - CRLF; LF, a bare
  one; CR, where a bare CR stands in the line; none, for a last line the
  client never ended - and, commands, whether they were ``pipelined``, sent
  before our previous reply went out; a message text's summary carries the
  first bare line end in it, if any);
* a ``{"record": "end", ...}`` line: user, commands, outcome.

A transcript's id is its file name without ``.jsonl``. A session still in
progress (or cut off by a crash) simply has no ``end`` record yet, and a
last line cut short is left out. A file that is no transcript at all (edited
by hand, garbage, a directory) is skipped by ``list`` with a note on stderr;
``show`` refuses it with a one-line error.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

from pymailsrv.cli_common import echo_table, require_data_root
from pymailsrv.trace import format_event, oldest_first, shown

SUFFIX = ".jsonl"


@dataclass
class Transcript:
    id: str
    header: dict
    events: list[dict] = field(default_factory=list)
    end: dict | None = None

    @property
    def user(self) -> str | None:
        return self.end.get("user") if self.end else None

    @property
    def outcome(self) -> str:
        return self.end["outcome"] if self.end else "(in progress)"


def transcripts_dir(state_dir: Path) -> Path:
    return state_dir / "transcripts"


# The fields list, show and the grader read from each record, with their
# types. The tracer always writes them; a file without them was edited by
# hand or is not a transcript at all.
HEADER_FIELDS = {"protocol": str, "session": int, "client": str, "time": (int, float)}
EVENT_FIELDS = {"state": str, "dir": str, "line": str}
END_FIELDS = {"user": (str, type(None)), "commands": int, "outcome": str}


class TranscriptError(ValueError):
    """No transcript to read by that id, or a file that is not one; the message says why."""


def load(path: Path, keep_events: bool = True) -> Transcript:
    """The transcript in ``path``: TranscriptError if the file holds none, OSError if unreadable.

    Without ``keep_events`` every event is still checked but none is kept:
    the header and the end are what ``list`` shows, and a session traced
    with ``--trace-bodies`` holds a line of its message text per event.
    """
    transcript = None
    with open(path, "rb", opener=_without_waiting) as file:
        # Only a regular file: a FIFO would wait for a writer, and a link to
        # /dev/zero is one endless line, read into memory as it grows.
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise TranscriptError("not a regular file")
        for number, line in enumerate(file, start=1):
            try:
                record = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError):
                # A line cut short by a crash, perhaps inside a UTF-8 sequence
                # (the tracer writes whole lines otherwise), or brackets nested
                # deeper than the parser recurses.
                continue
            if not isinstance(record, dict):  # a cut line never parses as anything else
                raise TranscriptError(f"line {number} is not a JSON object")
            kind = record.get("record")
            if kind == "session":
                _check(record, HEADER_FIELDS, number)
                _check_date(record["time"], number)
                transcript = Transcript(path.name.removesuffix(SUFFIX), record)
            elif transcript is None:
                raise TranscriptError(f"line {number} comes before the session record")
            elif kind == "end":
                _check(record, END_FIELDS, number)
                transcript.end = record
            else:
                _check(record, EVENT_FIELDS, number)
                if keep_events:
                    transcript.events.append(record)
    if transcript is None:
        raise TranscriptError("no session record: not a transcript")
    return transcript


def _without_waiting(path: str, flags: int) -> int:
    """An ``opener`` for open() that does not wait for a FIFO's writer."""
    return os.open(path, flags | os.O_NONBLOCK)


def _check(record: dict, fields: dict[str, type | tuple[type, ...]], number: int) -> None:
    for name, kind in fields.items():
        if not isinstance(record.get(name), kind):
            raise TranscriptError(f"line {number} has no valid {name!r}")


def _check_date(seconds: float, number: int) -> None:
    """A session's time is a number, but JSON also allows NaN and 1e300, which are no date."""
    try:
        time.localtime(seconds)
    except (OverflowError, OSError, ValueError):
        raise TranscriptError(f"line {number} has a 'time' that is no date") from None


def find(state_dir: Path, transcript_id: str) -> Transcript:
    """The transcript with this id; TranscriptError, saying why, if there is none to read."""
    path = transcripts_dir(state_dir) / f"{transcript_id}{SUFFIX}"
    # An id names a file in the directory, never a path that leads elsewhere.
    if "/" in transcript_id or not path.exists():
        raise TranscriptError(f"no transcript {transcript_id!r} (see 'pymailsrv transcripts list')")
    try:
        return load(path)
    except (OSError, TranscriptError) as error:
        raise TranscriptError(f"transcript {transcript_id!r} cannot be read: {_reason(error)}") from None


def each_transcript(state_dir: Path, unreadable: list[str], keep_events: bool = True) -> Iterator[Transcript]:
    """Every transcript (see ``load``), oldest first, read as it is asked for, so
    that memory holds one at a time; an "ID: why" note in ``unreadable`` for each
    file that cannot be read (all of them once the last transcript is read)."""
    directory = transcripts_dir(state_dir)
    for path in oldest_first(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []:
        try:
            transcript = load(path, keep_events)
        except (OSError, TranscriptError) as error:
            unreadable.append(shown(f"{path.name.removesuffix(SUFFIX)}: {_reason(error)}"))
            continue
        yield transcript


def _reason(error: OSError | TranscriptError) -> str:
    # An OSError's str() repeats the path; its strerror ("Is a directory") is the news.
    return getattr(error, "strerror", None) or str(error)


# --- the command line --------------------------------------------------------------


def transcripts_group(with_settings: Callable) -> click.Group:
    """The ``transcripts`` commands; cli.py passes its ``with_settings`` (no import cycle)."""

    @click.group("transcripts")
    def transcripts() -> None:
        """Saved protocol sessions (start the server with --transcripts)."""

    @transcripts.command("list")
    @with_settings
    def list_transcripts(settings) -> None:
        """List saved sessions, oldest first."""
        require_data_root(settings.root)
        unreadable: list[str] = []
        rows = []
        for transcript in each_transcript(settings.state_dir, unreadable, keep_events=False):
            header = transcript.header
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(header["time"]))
            commands = transcript.end["commands"] if transcript.end else "-"
            rows.append((transcript.id, started, header["protocol"], header["client"], transcript.user or "-",
                         commands, transcript.outcome))
        for note in unreadable:
            click.echo(f"note: skipped {note}", err=True)
        echo_table(rows, ["id", "time", "protocol", "client", "user", "commands", "outcome"])

    @transcripts.command("show")
    @click.argument("transcript_id")
    @with_settings
    def show_transcript(settings, transcript_id: str) -> None:
        """Replay one saved session, line by line."""
        try:
            transcript = find(settings.state_dir, transcript_id)
        except TranscriptError as error:
            raise click.ClickException(str(error)) from None
        # A transcript may have been edited by hand: nothing in it reaches the terminal unescaped.
        header = transcript.header
        click.echo(f"{shown(header['protocol'])} session {shown(header['session'])} from {shown(header['client'])}")
        for event in transcript.events:
            click.echo(format_event(event))
        click.echo(f"-- ended: {shown(transcript.outcome)}")

    return transcripts
