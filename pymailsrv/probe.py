"""``pymailsrv probe``: run the conformance catalogue against any POP3 or SMTP server.

People who write a mail server of their own, and teachers grading students'
servers, need something to test against that is not the server itself. The
prober is a *client*: it connects to HOST:PORT, runs every check of the
catalogue for that protocol (``probe_checks_pop3.POP3_CHECKS``,
``probe_checks_smtp.SMTP_CHECKS``), and reports each one as PASS, FAIL or
SKIP::

    pymailsrv probe pop3 127.0.0.1:1100 --user alice --password-stdin \\
        --smtp 127.0.0.1:2525 --rcpt alice@localhost
    pymailsrv probe smtp 127.0.0.1:2525 --rcpt alice@localhost \\
        --pop3 127.0.0.1:1100 --user alice --password-stdin --format junit

What each option unlocks:

* ``--user``/``--password-stdin``: the checks that log in to POP3 (for an
  SMTP probe, with ``--pop3 HOST:PORT`` saying where).
* ``--smtp HOST:PORT`` and ``--rcpt ADDR`` (a POP3 probe): checks that need
  mail in the maildrop send it there first, to the probed user. Every check
  deletes the mail it sent before the next one starts.
* ``--rcpt ADDR`` (an SMTP probe): the checks that deliver a message; with
  the POP3 login as well, the ones that read it back (dot-stuffing, 8BITMIME),
  and every check's mail is deleted after it. Without a login the messages
  stay, and a note on stderr counts them.
* ``--tls`` (implicit TLS, RFC 8314) or ``--starttls`` (STLS, RFC 2595;
  STARTTLS, RFC 3207) for the probed connections; certificates are not
  verified, since the probe checks the protocol.
* ``--only ID`` (repeatable; shell patterns such as ``pop3.uidl-*``).
* ``--slow``: the timeout checks, which idle for minutes.

Checks run one after the other, in catalogue order; each stands alone. The
exit status is 0 only if no check failed.
"""

from __future__ import annotations

import fnmatch
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import click
from tabulate import tabulate

from pymailsrv.cli_common import echo_report
from pymailsrv.config import parse_host_port
from pymailsrv.limits import LONGEST_WAIT_SECONDS
from pymailsrv.probe_base import NO_REPLY, Check, Failed, Probe, Skipped, Target, missing_need
from pymailsrv.replies import counted, elided
from pymailsrv.probe_checks_pop3 import POP3_CHECKS
from pymailsrv.probe_checks_smtp import SMTP_CHECKS
from pymailsrv.trace import ascii_json

CATALOGUES: dict[str, list[Check]] = {"pop3": POP3_CHECKS, "smtp": SMTP_CHECKS}

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
# How a FAIL's detail begins when the server could not be reached at all.
CONNECTION_ERROR = "connection error: "
# Checks in a row that heard no more than a greeting before the timeout,
# after which run_probe takes the server for one that has stopped answering.
STALLED_IN_A_ROW = 2

# The text table keeps to a terminal's width; JSON and JUnit carry everything.
SHOWN_COMMANDS = 4
COLUMN_WIDTH = 60


@dataclass
class Result:
    """The outcome of one check, as every report format shows it."""

    id: str
    rfc: str
    title: str
    status: str  # PASS, FAIL or SKIP
    sent: list[str]  # the client's lines, in order ("C: ..." without the "C: ")
    detail: str  # why it failed or was skipped; empty on PASS
    transcript: list[str]  # the whole dialogue, C: and S: lines
    seconds: float
    left_behind: int = 0  # messages it sent, and could not delete if stored (no POP3 login)


def run_check(check: Check, target: Target) -> Result:
    """Run one check; nothing it raises escapes, everything becomes a Result."""
    started = time.monotonic()
    reason = missing_need(check, target)
    probe = Probe(target)
    status, detail = SKIP, reason or ""
    if reason is None:
        try:
            check.run(probe)
            status = PASS
        except Skipped as skipped:
            status, detail = SKIP, str(skipped)
        except Failed as failed:
            status, detail = FAIL, str(failed)
        except OSError as error:  # refused, reset, TLS failure: the server's doing
            status, detail = FAIL, f"{CONNECTION_ERROR}{error}"
        except Exception as error:
            # A bug in the check, or a reply odd enough to trip its parsing
            # (int() of a non-number, say): this check fails, the probe goes
            # on. KeyboardInterrupt is no Exception, so Ctrl-C still stops it.
            status, detail = FAIL, f"the check broke: {one_line(error)}"
        finally:
            probe.cleanup()
    sent = [line[3:] for line in probe.transcript if line.startswith("C: ")]
    return Result(check.id, check.rfc, check.title, status, sent, detail, list(probe.transcript),
                  round(time.monotonic() - started, 3), probe.left_behind)


def one_line(error: Exception) -> str:
    """``ValueError: no digits in '+OK'``: the exception's type and message, on one line."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def select(checks: list[Check], only: Iterable[str]) -> list[Check]:
    """The checks whose id matches one of ``only`` (all of them if it is empty)."""
    patterns = list(only)
    if not patterns:
        return list(checks)
    chosen = [check for check in checks if any(fnmatch.fnmatchcase(check.id, p) for p in patterns)]
    if not chosen:
        raise click.BadParameter(f"no check id matches {', '.join(patterns)}", param_hint="--only")
    return chosen


def silent(result: Result) -> bool:
    """Did the server take the check's connection, then send not a line?"""
    return unanswered(result) and not any(line.startswith("S: ") for line in result.transcript)


def nothing_answered(result: Result) -> bool:
    """Did the check find no server there: refused, or silent?"""
    return result.status == FAIL and result.detail.startswith(CONNECTION_ERROR) or silent(result)


def unanswered(result: Result) -> bool:
    """Did the check wait out the timeout for a reply (or a TLS handshake)?"""
    return result.status == FAIL and result.detail.startswith(NO_REPLY)


def stalled(result: Result) -> bool:
    """Did the check wait out the timeout with no more than a greeting heard?
    A server slow at one step (a content scanner at DATA) answered the rest."""
    return unanswered(result) and sum(line.startswith("S: ") for line in result.transcript) <= 1


def run_probe(target: Target, only: Iterable[str] = (),
              progress: Callable[[Result], None] | None = None) -> list[Result]:
    """Every selected check of the target's catalogue, in order; but once the
    server has stopped answering, the rest are skipped, not run: each would
    wait out its timeout to say the same (45 of them, 7 minutes, pointed at
    a port that never speaks). It has stopped when the first check to
    connect got not a line, or when STALLED_IN_A_ROW checks in a row heard
    no more than a greeting (a server that greets, then never answers)."""
    checks = select(CATALOGUES[target.protocol], only)
    results: list[Result] = []
    for index, check in enumerate(checks):
        results.append(run_check(check, target))
        if progress is not None:
            progress(results[-1])
        tried = [result for result in results if result.status != SKIP]
        last = tried[-STALLED_IN_A_ROW:]
        if (len(tried) == 1 and silent(tried[0])) or (
                len(last) == STALLED_IN_A_ROW and all(stalled(result) for result in last)):
            why = f"not run: the server stopped answering ({tried[-1].detail.removeprefix(NO_REPLY)})"
            results += [Result(rest.id, rest.rfc, rest.title, SKIP, [], why, [], 0.0) for rest in checks[index + 1:]]
            break
    return results


def summary(results: list[Result]) -> str:
    counts = {status: sum(result.status == status for result in results) for status in (PASS, FAIL, SKIP)}
    return f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped"


# --- reports ------------------------------------------------------------------------


def text_report(results: list[Result]) -> str:
    """A table (id, RFC, result, what was sent, what came back on FAIL), then the summary."""
    rows = []
    for result in results:
        # On FAIL the last commands led to it; otherwise the first say what the check does.
        shown = result.sent[-SHOWN_COMMANDS:] if result.status == FAIL else result.sent[:SHOWN_COMMANDS]
        more = "… " if result.status == FAIL and len(result.sent) > SHOWN_COMMANDS else ""
        rows.append((result.id, result.rfc, result.status, elided(more + " | ".join(shown), COLUMN_WIDTH),
                     elided(result.detail, COLUMN_WIDTH) if result.status != PASS else ""))
    table = tabulate(rows, headers=["check", "rfc", "result", "sent", "came back"])
    return f"{table}\n{summary(results)}"


def json_report(results: list[Result]) -> str:
    return ascii_json([asdict(result) for result in results])


def junit_report(results: list[Result], suite: str) -> str:
    """JUnit XML, the format CI and grading platforms read: one testcase per check."""
    failures = sum(result.status == FAIL for result in results)
    skipped = sum(result.status == SKIP for result in results)
    root = ET.Element("testsuites")
    suite_element = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)),
                                  failures=str(failures), errors="0", skipped=str(skipped),
                                  time=f"{sum(result.seconds for result in results):.3f}")
    for result in results:
        case = ET.SubElement(suite_element, "testcase", classname=result.id.split(".")[0], name=result.id,
                             time=f"{result.seconds:.3f}")
        ET.SubElement(case, "properties").append(ET.Element("property", name="rfc", value=result.rfc))
        if result.status == FAIL:
            failure = ET.SubElement(case, "failure", message=result.detail, type=result.rfc)
            failure.text = "\n".join(result.transcript)
        elif result.status == SKIP:
            ET.SubElement(case, "skipped", message=result.detail)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


# --- the command line --------------------------------------------------------------


def _timeout(_context: click.Context, _option: click.Parameter, seconds: float) -> float:
    """--timeout: a wait the socket can take, else a usage error (not a server's failure)."""
    if not 0 < seconds <= LONGEST_WAIT_SECONDS:  # nan compares false
        raise click.BadParameter(f"must be more than 0 and at most {LONGEST_WAIT_SECONDS} seconds")
    return seconds


# Port 0 is nothing to connect to, so as parse_host_port's default it makes
# "no port given" an error: the probe must be told where to connect.
NO_PORT = 0


def _address(value: str | None, option: str) -> tuple[str, int] | None:
    """HOST:PORT (or [v6]:PORT) as a socket address; the port is required."""
    if value is None:
        return None
    try:
        host, port = parse_host_port(value, default_port=NO_PORT)
    except ValueError:
        raise click.BadParameter(f"expected HOST:PORT or [IPv6]:PORT, port 1-65535, got {value!r}",
                                 param_hint=option) from None
    return host, port


@click.command()
@click.argument("protocol", type=click.Choice(["pop3", "smtp"]))
@click.argument("address")
@click.option("--user", help="POP3 user to log in as (the owner of --rcpt).")
@click.option("--password-stdin", is_flag=True, help="Read the POP3 password from the first line of stdin.")
@click.option("--smtp", "smtp_address", metavar="HOST:PORT",
              help="SMTP server that delivers to the probed maildrop (POP3 checks that need mail).")
@click.option("--pop3", "pop3_address", metavar="HOST:PORT",
              help="POP3 server to read delivered mail back from (SMTP round-trip checks).")
@click.option("--rcpt", metavar="ADDR", help="Address of the probed user, for checks that send mail.")
@click.option("--tls", "tls_mode", flag_value="tls", help="Implicit TLS on connect (RFC 8314).")
@click.option("--starttls", "tls_mode", flag_value="starttls", help="STLS / STARTTLS after the greeting.")
@click.option("--only", multiple=True, metavar="ID", help="Run only these checks (repeatable; patterns allowed).")
@click.option("--slow", is_flag=True, help="Also run the timeout checks (they idle for 5-10 minutes).")
@click.option("--timeout", type=float, default=10.0, show_default=True, callback=_timeout,
              help="Seconds to wait for a whole reply.")
@click.option("--format", "output_format", type=click.Choice(["text", "json", "junit"]), default="text",
              show_default=True)
def probe(protocol: str, address: str, user: str | None, password_stdin: bool, smtp_address: str | None,
          pop3_address: str | None, rcpt: str | None, tls_mode: str | None, only: tuple[str, ...],
          slow: bool, timeout: float, output_format: str) -> None:
    """Check a POP3 or SMTP server at ADDRESS (HOST:PORT) against the RFCs."""
    target_address = _address(address, "ADDRESS")
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    target = Target(
        protocol=protocol,
        address=target_address,
        user=user,
        password=password or None,
        pop3=target_address if protocol == "pop3" else _address(pop3_address, "--pop3"),
        smtp=target_address if protocol == "smtp" else _address(smtp_address, "--smtp"),
        rcpt=rcpt,
        tls=tls_mode or "none",
        slow=slow,
        timeout=timeout,
    )
    results = run_probe(target, only)
    tried = [result for result in results if result.status != SKIP]
    if output_format == "text" and tried and all(nothing_answered(result) for result in tried):
        # Nothing there to probe: one line says so, not a row per check.
        raise click.ClickException(f"cannot probe {address}: {tried[0].detail}")
    # What the server sent is in every report: escaped, it can neither
    # steer the terminal nor make the JUnit file invalid XML.
    if output_format == "text":
        echo_report(text_report(results))
    else:
        report = json_report(results) if output_format == "json" else \
            junit_report(results, suite=f"pymailsrv probe {protocol} {address}")
        echo_report(report)
        click.echo(summary(results), err=True)  # stdout stays one parseable document
    left_behind = sum(result.left_behind for result in results)
    if left_behind:
        click.echo(f"note: the probe sent {counted(left_behind, 'message')} to {target.rcpt}, and with no POP3 "
                   "login cannot delete what was stored: give --pop3, --user and --password-stdin for that",
                   err=True)
    sys.exit(1 if any(result.status == FAIL for result in results) else 0)
