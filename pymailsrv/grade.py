"""``pymailsrv grade``: judge students' clients from the sessions the server saved.

In a networking course the students write POP3 and SMTP clients and point
them at the classroom server, started with ``--transcripts`` (and
``--trace-bodies``, so that dot-stuffing can be judged too). Every session
is saved (``transcripts.py``); this command grades the *client* side of
them against the catalogue in ``grade_criteria.py``::

    pymailsrv grade --user student07              # every session of one student
    pymailsrv grade --transcript 20250301T101500-smtp-12
    pymailsrv grade --all --format csv --output class.csv

Whose session is it? A transcript belongs to user U when its end record
names U (a POP3 login, an SMTP AUTH), when a POP3 client said ``USER U`` or
``APOP U`` (a failed login is still the student's), or when an SMTP client
gave a ``MAIL FROM`` whose local part is U. An SMTP AUTH that failed cannot
be matched: its user name is masked in the transcript like the password.

Each criterion is PASS, FAIL or N/A with the line that shows why; the score
is passed / applicable. Formats: a text table per transcript, JSON, JUnit
XML (one testsuite per transcript, one testcase per criterion: N/A is
``skipped``) and CSV (one row per transcript, for a spreadsheet of the
class). The exit status is 0 whatever the grades; 2 is a usage error.
"""

from __future__ import annotations

import csv
import io
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import click
from tabulate import tabulate

from pymailsrv.cli_common import output_file, require_data_root
from pymailsrv.grade_criteria import CRITERIA, Criterion, exchanges
from pymailsrv.replies import counted, elided
from pymailsrv.trace import ascii_json, escape_controls
from pymailsrv.transcripts import Transcript, TranscriptError, each_transcript, find, transcripts_dir

PASS, FAIL, NA = "PASS", "FAIL", "N/A"

# The text table keeps to a terminal's width; JSON and JUnit carry everything.
EVIDENCE_WIDTH = 72

_MAIL_FROM = re.compile(r"MAIL FROM:\s*<\"?([^@\">]+)", re.IGNORECASE)


@dataclass
class Result:
    """One criterion judged on one transcript."""

    criterion: str
    rfc: str
    title: str
    result: str  # PASS, FAIL or N/A
    evidence: str


@dataclass
class Grade:
    """One transcript, graded."""

    transcript: str  # its id
    protocol: str
    user: str  # whose session it is, as far as the transcript tells ("-" if not at all)
    client: str
    started: float
    outcome: str
    results: list[Result]

    @property
    def passed(self) -> int:
        return sum(result.result == PASS for result in self.results)

    @property
    def failed(self) -> list[str]:
        return [result.criterion for result in self.results if result.result == FAIL]

    @property
    def applicable(self) -> int:
        return sum(result.result != NA for result in self.results)

    @property
    def score(self) -> str:
        return f"{self.passed}/{self.applicable}"

    def summary(self) -> str:
        not_applicable = len(self.results) - self.applicable
        return (f"score {self.score}: {self.passed} passed, {len(self.failed)} failed, "
                f"{not_applicable} not applicable")


# --- whose session, and grading it --------------------------------------------------


def names(transcript: Transcript) -> list[str]:
    """The user names a transcript shows, the most certain first."""
    found = [transcript.user] if transcript.user else []
    for exchange in exchanges(transcript):
        words = exchange.arguments
        if transcript.header["protocol"] == "pop3" and exchange.verb in ("USER", "APOP") and words:
            found.append(words[0])
        elif exchange.verb == "MAIL" and (match := _MAIL_FROM.match(exchange.line)):
            found.append(match.group(1))
    return list(dict.fromkeys(name.lower() for name in found))


def belongs_to(transcript: Transcript, user: str) -> bool:
    return user.lower() in names(transcript)


def judge(criterion: Criterion, transcript: Transcript) -> Result:
    """One criterion's verdict; a criterion that trips over an odd transcript says so as N/A."""
    try:
        verdict, evidence = criterion.check(transcript)
    except Exception as error:  # a hand-edited or truncated transcript, or a bug of ours
        # N/A, and the class's other grades go on: one transcript must not stop them all.
        verdict, evidence = None, f"cannot judge this transcript: {type(error).__name__}: {error}"
    result = NA if verdict is None else PASS if verdict else FAIL
    return Result(criterion.id, criterion.rfc, criterion.title, result, evidence)


def grade(transcript: Transcript) -> Grade:
    protocol = transcript.header.get("protocol", "?")
    results = [judge(criterion, transcript) for criterion in CRITERIA.get(protocol, [])]
    user = (names(transcript) or ["-"])[0]
    return Grade(transcript.id, protocol, user, transcript.header.get("client", "-"),
                 transcript.header.get("time", 0.0), transcript.outcome, results)


def grades_asked_for(state_dir: Path, user: str | None, ids: Iterable[str]) -> tuple[list[Grade], list[str]]:
    """The grades the command line asks for, and notes on files that are no transcripts.

    Those of ``ids``, in that order; else those of every saved session of
    ``user`` (None: of everyone), oldest first. Each session is read, graded
    and let go in turn: memory holds one session's events, not a term's.
    """
    ids = list(ids)
    if ids:
        try:
            return [grade(find(state_dir, transcript_id)) for transcript_id in ids], []
        except TranscriptError as error:  # as 'transcripts show' says it: a user error, not a usage error
            raise click.ClickException(str(error)) from None
    unreadable: list[str] = []
    grades = [grade(transcript) for transcript in each_transcript(state_dir, unreadable)
              if user is None or belongs_to(transcript, user)]
    # File names start with the time to the second only; the header has it to the millisecond.
    grades.sort(key=lambda one: one.started)
    return grades, unreadable


# --- reports ------------------------------------------------------------------------


def _heading(graded: Grade) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(graded.started))
    return (f"{graded.transcript}: {graded.protocol} session of {graded.user} from {graded.client}, "
            f"{started}, {graded.outcome}")


def text_report(grades: list[Grade]) -> str:
    """Per transcript: a heading, the table (criterion, RFC, result, evidence), the score."""
    parts = []
    for graded in grades:
        rows = [(result.criterion, result.rfc, result.result, elided(result.evidence, EVIDENCE_WIDTH)) for result in graded.results]
        table = tabulate(rows, headers=["criterion", "rfc", "result", "evidence"])
        parts.append(f"{_heading(graded)}\n{table}\n{graded.summary()}")
    return "\n\n".join(parts)


def json_report(grades: list[Grade]) -> str:
    documents = [{"transcript": graded.transcript, "protocol": graded.protocol, "user": graded.user,
                  "client": graded.client, "time": graded.started, "outcome": graded.outcome,
                  "passed": graded.passed, "applicable": graded.applicable, "score": graded.score,
                  "failed": graded.failed,
                  "results": [vars(result) for result in graded.results]} for graded in grades]
    return ascii_json(documents)


def junit_report(grades: list[Grade]) -> str:
    """JUnit XML, as grading platforms read it: a testsuite per transcript, a testcase per criterion."""
    root = ET.Element("testsuites", name="pymailsrv grade")
    for graded in grades:
        suite = ET.SubElement(root, "testsuite", name=graded.transcript, tests=str(len(graded.results)),
                              failures=str(len(graded.failed)), errors="0",
                              skipped=str(len(graded.results) - graded.applicable),
                              timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(graded.started)))
        properties = ET.SubElement(suite, "properties")
        for name in ("user", "protocol", "client", "outcome", "score"):
            ET.SubElement(properties, "property", name=name, value=str(getattr(graded, name)))
        for result in graded.results:
            case = ET.SubElement(suite, "testcase", classname=f"{graded.user}.{graded.transcript}",
                                 name=result.criterion)
            if result.result == FAIL:
                failure = ET.SubElement(case, "failure", message=result.evidence, type=result.rfc)
                failure.text = f"{result.title} ({result.rfc})\n{result.evidence}"
            elif result.result == NA:
                ET.SubElement(case, "skipped", message=result.evidence)
            else:
                ET.SubElement(case, "system-out").text = result.evidence
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


CSV_COLUMNS = ["transcript", "user", "protocol", "client", "score", "passed", "applicable", "failed"]


# A spreadsheet runs a cell that starts with one of these as a formula
# (OWASP's "CSV injection"). A student chooses the user name a session is
# graded under, so that cell starts with "'", which spreadsheets read as text.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _as_text_cell(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def csv_report(grades: list[Grade]) -> str:
    """One row per transcript; ``failed`` lists the failed criteria, space-separated."""
    output = io.StringIO()
    writer = csv.writer(output, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for graded in grades:
        writer.writerow([graded.transcript, _as_text_cell(graded.user), graded.protocol, graded.client, graded.score,
                         graded.passed, graded.applicable, " ".join(graded.failed)])
    return output.getvalue().rstrip("\n")


REPORTS: dict[str, Callable[[list[Grade]], str]] = {
    "text": text_report, "json": json_report, "junit": junit_report, "csv": csv_report}


# --- the command line --------------------------------------------------------------


def grade_command(with_settings: Callable) -> click.Command:
    """The ``grade`` command; cli.py passes its ``with_settings`` (no import cycle)."""

    @click.command("grade")
    @click.option("--user", metavar="U", help="Grade every session of this user.")
    @click.option("--transcript", "transcript_ids", multiple=True, metavar="ID",
                  help="Grade this transcript (repeatable; ids from 'pymailsrv transcripts list').")
    @click.option("--all", "everything", is_flag=True, help="Grade every saved transcript.")
    @click.option("--format", "output_format", type=click.Choice(list(REPORTS)), default="text",
                  show_default=True)
    @output_file("--output", help_text="Write the report to FILE instead of stdout.")
    @with_settings
    def grade_cli(settings, user: str | None, transcript_ids: tuple[str, ...], everything: bool,
                  output_format: str, output: str | None) -> None:
        """Judge the client side of saved sessions (start the server with --transcripts)."""
        if sum((user is not None, bool(transcript_ids), everything)) != 1:
            raise click.UsageError("give exactly one of --user U, --transcript ID ... or --all")
        require_data_root(settings.root)
        grades, unreadable = grades_asked_for(settings.state_dir, user, transcript_ids)
        for note in unreadable:
            click.echo(f"note: skipped {note}", err=True)
        if not grades:
            whose = f" of user {user!r}" if user else ""
            click.echo(f"no saved transcripts{whose} under {transcripts_dir(settings.state_dir)}", err=True)
        # Escaped in every format: a student's ESC must not reach the
        # teacher's terminal, nor make the JUnit file invalid XML.
        report = escape_controls(REPORTS[output_format](grades))
        if output is not None:
            try:
                Path(output).write_text(report + "\n", encoding="utf-8")
            except OSError as error:  # what no check beforehand can rule out: a full disk, say
                raise click.ClickException(f"cannot write {output}: {error.strerror}") from None
            click.echo(f"graded {counted(len(grades), 'transcript')} into {output}", err=True)
        else:
            click.echo(report)

    return grade_cli
