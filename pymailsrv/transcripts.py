"""Saved session transcripts: ``pymailsrv transcripts list`` and ``show``.

With ``--transcripts`` the tracer (``trace.py``) saves each session as JSON
lines in ``ROOT/.pymailsrv/transcripts/<time>-<protocol>-<id>.jsonl``:

* a ``{"record": "session", ...}`` line: protocol, session id, client, time;
* one line per event, as the live trace shows them (``dir`` is ``C``, ``S``
  or ``--``; client lines also carry their ``ending`` - CRLF or LF - and
  whether they were ``pipelined``, sent before our previous reply went out);
* a ``{"record": "end", ...}`` line: user, commands, outcome.

A transcript's id is its file name without ``.jsonl``. A session still in
progress (or cut off by a crash) simply has no ``end`` record yet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
from tabulate import tabulate

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


def load(path: Path) -> Transcript:
    transcript = None
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if record.get("record") == "session":
                transcript = Transcript(path.name[: -len(SUFFIX)], record)
            elif record.get("record") == "end" and transcript is not None:
                transcript.end = record
            elif transcript is not None:
                transcript.events.append(record)
    if transcript is None:
        raise ValueError(f"{path.name} is not a transcript")
    return transcript


def load_all(state_dir: Path) -> list[Transcript]:
    directory = transcripts_dir(state_dir)
    found = []
    for path in sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []:
        try:
            found.append(load(path))
        except (OSError, ValueError):
            continue
    return found


def format_event(event: dict) -> str:
    """One event in the live trace's text form, without the time and client columns."""
    if event["dir"] == "--":
        return f"-- {event['line']}"
    return f"{event['state']} {event['dir']}: {event['line']}"


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
        rows = []
        for transcript in load_all(settings.state_dir):
            header = transcript.header
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(header["time"]))
            commands = transcript.end["commands"] if transcript.end else "-"
            rows.append((transcript.id, started, header["protocol"], header["client"], transcript.user or "-",
                         commands, transcript.outcome))
        click.echo(tabulate(rows, headers=["id", "time", "protocol", "client", "user", "commands", "outcome"]))

    @transcripts.command("show")
    @click.argument("transcript_id")
    @with_settings
    def show_transcript(settings, transcript_id: str) -> None:
        """Replay one saved session, line by line."""
        path = transcripts_dir(settings.state_dir) / f"{transcript_id}{SUFFIX}"
        if "/" in transcript_id or not path.is_file():
            raise click.ClickException(f"no transcript {transcript_id!r} (see 'pymailsrv transcripts list')")
        transcript = load(path)
        header = transcript.header
        click.echo(f"{header['protocol']} session {header['session']} from {header['client']}")
        for event in transcript.events:
            click.echo(format_event(event))
        click.echo(f"-- ended: {transcript.outcome}")

    return transcripts
