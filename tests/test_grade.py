"""pymailsrv grade: scripted clients that break one rule each fail exactly that criterion.

Every test runs real client sessions over loopback against a server started
with transcripts on (and --trace-bodies where message text matters), stops
the server so each transcript has its end record, and grades what was saved.
The well-behaved clients are the standard library's own, smtplib and poplib.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import poplib
import re
import smtplib
import ssl
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

from pymailsrv.cli import main
from pymailsrv.grade import FAIL, NA, PASS, grades_asked_for
from pymailsrv.grade_criteria import CRITERIA
from pymailsrv.server import MailServer, trace_options
from pymailsrv.trace import Tracer
from pymailsrv.transcripts import each_transcript
from tests.conftest import CLIENT_TIMEOUT, PASSWORD, RawClient, make_settings, wait_for_open

# Long enough that a client's first line is surely waiting before our greeting goes out.
SLOW_START_SECONDS = 0.3
# How long to wait for the server to write a transcript's end record.
END_RECORD_POLLS, END_RECORD_POLL_SECONDS = 50, 0.02


class SlowStartTracer(Tracer):
    """A tracer that takes its time opening a transcript, so the greeting goes out late."""

    def session_started(self, session) -> None:
        time.sleep(SLOW_START_SECONDS)
        super().session_started(session)


@pytest.fixture
def classroom(root, add_user):
    """classroom(**overrides) -> a server saving transcripts; alice exists; all stopped at teardown."""
    add_user("alice")
    servers: list[MailServer] = []

    def start(tracer_class=Tracer, **overrides) -> MailServer:
        settings = make_settings(root, transcripts=True, **overrides)
        server = MailServer(settings, tracer=tracer_class(trace_options(settings), io.StringIO())).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def graded(root, server: MailServer, stop_first: bool = False):
    """Once every client has gone (or at once: ``stop_first``), stop the server,
    then grade every transcript it saved, oldest first."""
    # A session that has not yet seen its client close would be cut by the
    # stop, and its outcome be "server stopping" rather than "dropped by client".
    if not stop_first:
        wait_for_open(server, 0)
    server.stop()
    for _ in range(END_RECORD_POLLS):
        transcripts = list(each_transcript(root / ".pymailsrv", [], keep_events=False))
        if transcripts and all(transcript.end for transcript in transcripts):
            break
        time.sleep(END_RECORD_POLL_SECONDS)
    grades, _ = grades_asked_for(root / ".pymailsrv", None, [])
    return grades


def verdicts(result) -> dict[str, str]:
    return {item.criterion: item.result for item in result.results}


def failed(result) -> list[str]:
    return [item.criterion for item in result.results if item.result == FAIL]


def smtp_reply(client: RawClient) -> list[bytes]:
    """The lines of one SMTP reply: up to the line with a space after the code."""
    lines = [client.line()]
    while lines[-1][3:4] == b"-":
        lines.append(client.line())
    return lines


def smtp_command(client: RawClient, line: str, end: bytes = b"\r\n") -> list[bytes]:
    client.send(line.encode() + end)
    return smtp_reply(client)


def raw_smtp(server: MailServer) -> RawClient:
    client = RawClient(server.addresses["smtp"])
    assert smtp_reply(client)[0].startswith(b"220")
    return client


def raw_pop3_login(server: MailServer) -> RawClient:
    client = RawClient(server.addresses["pop3"])
    assert client.line().startswith(b"+OK")
    assert client.command("USER alice").startswith(b"+OK")
    assert client.command(f"PASS {PASSWORD}").startswith(b"+OK")
    return client


def graded_message(classroom, root, text: bytes, **settings):
    """The grade of one session: EHLO, a message of ``text`` (accepted), QUIT."""
    server = classroom(**settings)
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    assert send_text(client, text)[0].startswith(b"250")
    smtp_command(client, "QUIT")
    (result,) = graded(root, server)
    return result


def start_text(client: RawClient) -> None:
    """MAIL, RCPT alice and DATA, each reply awaited: the server now reads text."""
    assert smtp_command(client, "MAIL FROM:<bob@example.org>")[0].startswith(b"250")
    assert smtp_command(client, "RCPT TO:<alice@localhost>")[0].startswith(b"250")
    assert smtp_command(client, "DATA")[0].startswith(b"354")


def send_text(client: RawClient, text: bytes) -> list[bytes]:
    """MAIL, RCPT alice, DATA and the text (ending included); the reply to it."""
    start_text(client)
    client.send(text)
    return smtp_reply(client)


def test_every_criterion_is_data_with_a_stable_id_and_an_rfc():
    for protocol, criteria in CRITERIA.items():
        ids = [criterion.id for criterion in criteria]
        assert len(ids) == len(set(ids))
        for criterion in criteria:
            assert criterion.id.startswith(f"{protocol}.") and criterion.protocol == protocol
            assert criterion.rfc.startswith("RFC ") and "§" in criterion.rfc
            assert callable(criterion.check) and criterion.title


def test_the_teaching_guide_lists_each_criterion_as_the_grader_has_it():
    # The guide's table had drifted: other RFC sections, other wording.
    guide = (Path(__file__).parent.parent / "docs" / "teaching.rst").read_text()
    rows = re.findall(r"^``([a-z0-9.-]+)``\s{2,}(RFC.*?)\s{2,}(.*)$", guide, re.M)
    assert rows == [(criterion.id, criterion.rfc, criterion.title)
                    for criteria in CRITERIA.values() for criterion in criteria]


@pytest.mark.parametrize("module", ["pymailsrv.grade", "pymailsrv.grade_criteria"])
def test_the_grader_imports_on_its_own_without_an_import_cycle(module):
    # transcripts.py reaches for cli.py at import time, and cli.py imports the grader.
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=CLIENT_TIMEOUT)


# --- well-behaved clients ----------------------------------------------------------


def test_smtplib_and_poplib_sessions_fail_nothing(classroom, root):
    server = classroom(trace_bodies=True)
    with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
        client.sendmail("bob@example.org", ["alice@localhost"],
                        b"Subject: hi\r\n\r\n.a line with a leading dot\r\nbye\r\n")
    client = poplib.POP3(*server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
    client.capa()
    client.user("alice")
    client.pass_(PASSWORD)
    client.stat()
    client.list()
    client.retr(1)
    client.dele(1)
    client.quit()
    smtp, pop3 = graded(root, server)
    assert (smtp.protocol, pop3.protocol) == ("smtp", "pop3")
    assert failed(smtp) == [] and failed(pop3) == []
    assert verdicts(smtp) == {
        "smtp.waits-for-greeting": PASS, "smtp.uses-crlf": PASS, "smtp.waits-for-replies": PASS,
        "smtp.ehlo-before-mail": PASS, "smtp.dot-stuffs-text": PASS, "smtp.ends-data-correctly": PASS,
        "smtp.no-data-without-recipients": PASS, "smtp.no-repeated-refusals": NA,
        "smtp.no-password-before-tls": NA, "smtp.issues-quit": PASS}
    assert verdicts(pop3) == {
        "pop3.waits-for-greeting": PASS, "pop3.uses-crlf": PASS, "pop3.waits-for-replies": PASS,
        "pop3.uses-listed-numbers": PASS, "pop3.commands-in-right-state": PASS,
        "pop3.no-repeated-refusals": NA, "pop3.no-password-before-tls": NA, "pop3.issues-quit": PASS}
    assert smtp.score == "8/8" and pop3.score == "6/6"
    assert (smtp.user, pop3.user) == ("bob", "alice")


# --- one broken rule each ------------------------------------------------------------


def test_lf_only_line_endings_fail_uses_crlf(classroom, root):
    server = classroom()
    client = raw_smtp(server)
    for line in ("EHLO student.example", "MAIL FROM:<bob@example.org>", "RCPT TO:<alice@localhost>", "RSET"):
        assert smtp_command(client, line, end=b"\n")[-1][:1] == b"2"
    smtp_command(client, "QUIT", end=b"\n")
    (result,) = graded(root, server)
    assert failed(result) == ["smtp.uses-crlf"]
    evidence = next(item.evidence for item in result.results if item.criterion == "smtp.uses-crlf")
    assert evidence == "'EHLO student.example' ended in a bare LF (and 4 more)"


@pytest.mark.parametrize("trace_bodies", [False, True], ids=["summary", "bodies"])
def test_a_bare_lf_in_the_message_text_fails_uses_crlf(classroom, root, trace_bodies):
    # RFC 5321 §2.3.8 holds for the text too; the server took it here only
    # because bare_newline = normalize (Postfix 3.9's default).
    result = graded_message(classroom, root, b"Subject: s3\n\nline one\r\n.\r\n", trace_bodies=trace_bodies)
    assert failed(result) == ["smtp.uses-crlf"]
    evidence = next(item.evidence for item in result.results if item.criterion == "smtp.uses-crlf")
    assert evidence.startswith("the message text ended in a bare LF (at ")


@pytest.mark.parametrize("trace_bodies", [False, True], ids=["summary", "bodies"])
def test_a_bare_cr_inside_a_text_line_fails_uses_crlf_traced_or_not(classroom, root, trace_bodies):
    # With --trace-bodies a line's ending came from its last octets alone:
    # "line one\rline two\r\n" passed there, and failed in the summary.
    result = graded_message(classroom, root, b"Subject: s4\r\n\r\nline one\rline two\r\n.\r\n",
                            trace_bodies=trace_bodies)
    assert failed(result) == ["smtp.uses-crlf"]
    evidence = next(item.evidence for item in result.results if item.criterion == "smtp.uses-crlf")
    assert evidence.startswith("the message text held a bare CR (at ")


def test_a_command_line_ended_in_cr_cr_lf_fails_uses_crlf(classroom, root):
    # All the CRs were taken off with the line end: "EHLO a\r\r\n" was
    # recorded as a clean "EHLO a".
    server = classroom()
    client = raw_smtp(server)
    assert smtp_command(client, "EHLO student.example", end=b"\r\r\n")[-1][:3] == b"250"
    smtp_command(client, "QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["smtp.uses-crlf"]
    evidence = next(item.evidence for item in result.results if item.criterion == "smtp.uses-crlf")
    assert evidence == "'EHLO student.example\\r' held a bare CR"


def test_a_last_line_never_ended_is_in_the_transcript_and_fails_uses_crlf(classroom, root):
    # The unended QUIT was left in the server's buffer when the client
    # closed: never traced, so uses-crlf passed.
    server = classroom()
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    client.send(b"QUIT")
    client.close()
    (result,) = graded(root, server)
    evidence = next(item.evidence for item in result.results if item.criterion == "smtp.uses-crlf")
    assert evidence == "'QUIT' had no line end"


def test_talking_before_the_greeting_fails_waits_for_greeting(classroom, root):
    server = classroom(tracer_class=SlowStartTracer)
    client = RawClient(server.addresses["smtp"])
    client.send(b"EHLO student.example\r\n")  # at once, before reading anything
    assert smtp_reply(client)[0].startswith(b"220")
    assert smtp_reply(client)[0].startswith(b"250")
    smtp_command(client, "QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["smtp.waits-for-greeting"]


def test_pop3_pipelining_without_asking_capa_fails_waits_for_replies(classroom, root):
    server = classroom()
    client = raw_pop3_login(server)
    client.send(b"STAT\r\nLIST\r\n")  # two commands, no waiting: PIPELINING never seen
    assert client.line().startswith(b"+OK")
    client.multiline()
    client.command("QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["pop3.waits-for-replies"]


def test_pop3_pipelining_after_capa_listed_it_passes(classroom, root):
    server = classroom()
    client = raw_pop3_login(server)
    client.send(b"CAPA\r\n")
    assert client.line().startswith(b"+OK")
    assert b"PIPELINING\r\n" in client.multiline()
    client.send(b"STAT\r\nLIST\r\n")
    assert client.line().startswith(b"+OK")
    client.multiline()
    client.command("QUIT")
    (result,) = graded(root, server)
    assert failed(result) == []
    assert verdicts(result)["pop3.waits-for-replies"] == PASS


def test_mail_before_ehlo_fails_ehlo_before_mail(classroom, root):
    server = classroom()
    client = raw_smtp(server)
    assert smtp_command(client, "MAIL FROM:<bob@example.org>")[0].startswith(b"503")
    assert smtp_command(client, "EHLO student.example")[-1].startswith(b"250 ")
    assert send_text(client, b"Subject: x\r\n\r\nhello\r\n.\r\n")[0].startswith(b"250")
    smtp_command(client, "QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["smtp.ehlo-before-mail"]


def test_a_leading_dot_sent_unstuffed_fails_dot_stuffs_text(classroom, root):
    result = graded_message(classroom, root, b"Subject: x\r\n\r\n.leading dot\r\n.\r\n", trace_bodies=True)
    assert failed(result) == ["smtp.dot-stuffs-text"]


def test_a_lone_dot_with_a_bare_lf_is_a_line_end_fault_not_a_stuffing_one(classroom, root):
    # ".<LF>" does not end the text (RFC 5321 §4.1.1.4 asks <CRLF>.<CRLF>); the
    # client meant it as the end. It was counted as a stuffed line, a PASS.
    result = graded_message(classroom, root, b"Subject: x\r\n\r\nfirst\n.\nsecond\r\n.\r\n",
                            trace_bodies=True)
    assert failed(result) == ["smtp.uses-crlf"]
    assert verdicts(result)["smtp.dot-stuffs-text"] == NA


def test_dot_stuffing_is_not_applicable_when_bodies_were_not_traced(classroom, root):
    result = graded_message(classroom, root, b"Subject: x\r\n\r\n.leading dot\r\n.\r\n")
    assert verdicts(result)["smtp.dot-stuffs-text"] == NA
    assert failed(result) == []


def test_data_after_every_rcpt_was_refused_fails_no_data_without_recipients(classroom, root):
    server = classroom()
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    smtp_command(client, "MAIL FROM:<bob@example.org>")
    assert smtp_command(client, "RCPT TO:<nobody@localhost>")[0].startswith(b"550")
    assert smtp_command(client, "DATA")[0].startswith(b"554")
    smtp_command(client, "QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["smtp.no-data-without-recipients"]
    assert verdicts(result)["smtp.ends-data-correctly"] == NA


def test_pipelined_data_after_refused_rcpt_is_allowed_once_ehlo_offered_pipelining(classroom, root):
    server = classroom()
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    client.send(b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<nobody@localhost>\r\nDATA\r\n")  # RFC 2920 §3
    assert [smtp_reply(client)[0][:3] for _ in range(3)] == [b"250", b"550", b"554"]
    smtp_command(client, "QUIT")
    (result,) = graded(root, server)
    assert failed(result) == []
    assert verdicts(result)["smtp.waits-for-replies"] == PASS


@pytest.mark.parametrize("group, evidence", [
    # The offer is in EHLO's reply, which the MAIL sent with it came before.
    (b"EHLO student.example\r\nMAIL FROM:<bob@example.org>\r\n", "and no EHLO reply it had read offered"),
    # RFC 2920 §3.1: NOOP only last in a group, even once PIPELINING is known.
    (b"NOOP\r\nMAIL FROM:<bob@example.org>\r\n", "which RFC 2920 §3.1 allows only last in a group"),
], ids=["with-ehlo", "after-noop"])
def test_a_line_pipelined_where_rfc_2920_forbids_fails_waits_for_replies(classroom, root, group, evidence):
    server = classroom()
    client = raw_smtp(server)
    if group.startswith(b"NOOP"):
        smtp_command(client, "EHLO student.example")  # PIPELINING offered, and read
    client.send(group)
    smtp_reply(client)
    smtp_reply(client)
    smtp_command(client, "QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["smtp.waits-for-replies"]
    (item,) = [item for item in result.results if item.criterion == "smtp.waits-for-replies"]
    assert evidence in item.evidence


def test_a_pipelining_client_may_send_quit_with_the_text_after_the_354(classroom, root):
    # RFC 2920 §3.1: the message text may be the first "command" of a group.
    server = classroom()
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    client.send(b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n")
    assert [smtp_reply(client)[0][:3] for _ in range(3)] == [b"250", b"250", b"354"]
    client.send(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert [smtp_reply(client)[0][:3] for _ in range(2)] == [b"250", b"221"]
    (result,) = graded(root, server)
    assert failed(result) == []
    assert verdicts(result)["smtp.waits-for-replies"] == PASS


def test_text_sent_with_data_before_its_354_fails_waits_for_replies(classroom, root):
    # RFC 2920 §3.1: DATA comes last in a group, PIPELINING or not.
    server = classroom()
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    smtp_command(client, "MAIL FROM:<bob@example.org>")
    smtp_command(client, "RCPT TO:<alice@localhost>")
    client.send(b"DATA\r\nSubject: x\r\n\r\nhello\r\n.\r\n")
    assert [smtp_reply(client)[0][:3] for _ in range(2)] == [b"354", b"250"]
    smtp_command(client, "QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["smtp.waits-for-replies"]
    (item,) = [item for item in result.results if item.criterion == "smtp.waits-for-replies"]
    assert item.evidence == "the message text was sent before the 354 reply to DATA, which RFC 2920 §3.1 puts last"


_LOGIN_ANSWERS = base64.b64encode(b"alice") + b"\r\n" + base64.b64encode(PASSWORD.encode()) + b"\r\n"
_PLAIN_ANSWER = base64.b64encode(f"\0alice\0{PASSWORD}".encode())


@pytest.mark.parametrize("group, replies, evidence", [
    # The answers went before the 334 challenges that ask for them.
    (b"AUTH LOGIN\r\n" + _LOGIN_ANSWERS + b"MAIL FROM:<alice@localhost>\r\n", [b"334", b"334", b"235", b"250"],
     "a SASL answer (****) was sent before the reply to 'AUTH LOGIN': it answers a challenge the client had not "
     "yet read"),
    (b"AUTH PLAIN\r\n" + _PLAIN_ANSWER + b"\r\n", [b"334", b"235"],
     "a SASL answer (****) was sent before the reply to 'AUTH PLAIN'"),
    # RFC 4954 §4: AUTH comes last in a group, short of a one-round-trip initial response.
    (b"AUTH CRAM-MD5\r\nMAIL FROM:<alice@localhost>\r\n", [b"504", b"250"],
     "'MAIL FROM:<alice@localhost>' was sent before the reply to 'AUTH CRAM-MD5', which RFC 4954 §4 allows only "
     "last in a group"),
], ids=["login-answers", "plain-answer", "after-auth"])
def test_auth_pipelined_where_rfc_4954_forbids_fails_waits_for_replies(classroom, root, group, replies, evidence):
    server = classroom()
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")  # PIPELINING offered, and read
    client.send(group)
    assert [smtp_reply(client)[-1][:3] for _ in replies] == replies
    smtp_command(client, "QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["smtp.waits-for-replies"]
    (item,) = [item for item in result.results if item.criterion == "smtp.waits-for-replies"]
    assert item.evidence.startswith(evidence)


def test_mail_pipelined_after_auth_plain_with_its_initial_response_passes(classroom, root):
    # RFC 4954 §4's exception: PLAIN completes in the one round trip.
    server = classroom()
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    client.send(b"AUTH PLAIN " + _PLAIN_ANSWER + b"\r\nMAIL FROM:<alice@localhost>\r\n")
    assert [smtp_reply(client)[-1][:3] for _ in range(2)] == [b"235", b"250"]
    smtp_command(client, "QUIT")
    (result,) = graded(root, server)
    assert verdicts(result)["smtp.waits-for-replies"] == PASS


def test_a_pop3_sasl_answer_sent_before_its_challenge_fails_waits_for_replies(classroom, root):
    server = classroom()
    client = RawClient(server.addresses["pop3"])
    assert client.line().startswith(b"+OK")
    assert client.command("CAPA").startswith(b"+OK")  # PIPELINING offered, and read
    assert b"PIPELINING\r\n" in client.multiline()
    client.send(b"AUTH PLAIN\r\n" + _PLAIN_ANSWER + b"\r\n")
    assert client.line() == b"+ \r\n"
    assert client.line().startswith(b"+OK")
    client.command("QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["pop3.waits-for-replies"]


def test_pop3_commands_pipelined_with_capa_fail_waits_for_replies(classroom, root):
    server = classroom()
    client = raw_pop3_login(server)
    client.send(b"CAPA\r\nSTAT\r\n")  # STAT could not know what CAPA would say
    assert client.line().startswith(b"+OK")
    client.multiline()
    assert client.line().startswith(b"+OK")
    client.command("QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["pop3.waits-for-replies"]


def test_the_same_refused_command_three_times_fails_no_repeated_refusals(classroom, root):
    server = classroom()
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    smtp_command(client, "MAIL FROM:<bob@example.org>")
    for _ in range(3):
        assert smtp_command(client, "RCPT TO:<nobody@localhost>")[0].startswith(b"550")
    smtp_command(client, "QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["smtp.no-repeated-refusals"]


def test_a_command_refused_for_now_may_be_sent_again(classroom, root):
    # RFC 5321 §4.2.1: after a 4yz "the action may be requested again".
    server = classroom(faults=["smtp:MAIL*3=451 4.3.0 try again later"])
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    for _ in range(3):
        assert smtp_command(client, "MAIL FROM:<bob@example.org>")[0].startswith(b"451")
    smtp_command(client, "QUIT")
    (result,) = graded(root, server)
    assert verdicts(result)["smtp.no-repeated-refusals"] == NA


def test_a_refused_quit_then_a_close_fails_issues_quit(classroom, root):
    server = classroom()
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    assert smtp_command(client, "QUIT now")[0].startswith(b"501")  # QUIT takes no argument: nothing ended
    client.close()
    (result,) = graded(root, server)
    (item,) = [item for item in result.results if item.criterion == "smtp.issues-quit"]
    assert (item.result, item.evidence) == (FAIL, "the client closed the connection without an accepted QUIT")


def test_a_server_stopped_while_the_text_came_counts_against_nothing(classroom, root):
    # The stop's 421 came in the middle of the text: neither the end of the
    # text nor the QUIT was the student's to give.
    server = classroom()
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    start_text(client)
    client.send(b"Subject: half a message\r\n")
    (result,) = graded(root, server, stop_first=True)
    assert verdicts(result)["smtp.ends-data-correctly"] == NA
    assert verdicts(result)["smtp.issues-quit"] == NA
    assert failed(result) == []


def test_a_client_silent_in_the_text_until_the_timeout_fails_ends_data_correctly(classroom, root):
    server = classroom(smtp={"data_timeout": 0.5})
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    start_text(client)
    client.send(b"Subject: never ended\r\n")
    assert smtp_reply(client)[0].startswith(b"421 4.4.2 ")
    (result,) = graded(root, server)
    assert failed(result) == ["smtp.ends-data-correctly", "smtp.issues-quit"]
    [evidence] = [item.evidence for item in result.results if item.criterion == "smtp.ends-data-correctly"]
    assert evidence == "the text never ended with '.': the server gave up waiting for it"


def test_a_server_that_hangs_up_in_the_text_on_purpose_counts_against_nothing(classroom, root):
    # An injected drop-mid fault ends the session without a word: the text,
    # sent whole with its dot, was cut off by the server, not left unended.
    server = classroom(faults=["smtp:DATA=drop-mid"])
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    start_text(client)
    client.send(b"Subject: cut off\r\n\r\nbody\r\n.\r\n")
    assert client.sock.recv(100) == b""  # closed, without a reply
    client.close()
    (result,) = graded(root, server)
    assert verdicts(result)["smtp.ends-data-correctly"] == NA
    assert failed(result) == []


def test_closing_without_quit_fails_issues_quit(classroom, root):
    server = classroom()
    client = poplib.POP3(*server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
    client.user("alice")
    client.pass_(PASSWORD)
    client.stat()
    client.close()
    (result,) = graded(root, server)
    assert failed(result) == ["pop3.issues-quit"]
    assert result.outcome == "dropped by client"


def test_pop3_commands_in_the_wrong_state_twice_fail(classroom, root):
    server = classroom()
    client = RawClient(server.addresses["pop3"])
    client.line()
    assert client.command("STAT").startswith(b"-ERR")  # not logged in yet
    assert client.command("LIST").startswith(b"-ERR")
    client.command("QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["pop3.commands-in-right-state"]


def test_retr_of_a_number_never_listed_fails_uses_listed_numbers(classroom, root, store):
    store.deliver("alice", b"Subject: one\n\nhello\n")
    server = classroom()
    client = raw_pop3_login(server)  # "+OK alice's maildrop has 1 message (...)"
    assert client.command("RETR 2").startswith(b"-ERR")  # a guess: nothing listed a second message
    client.command("QUIT")
    (result,) = graded(root, server)
    assert failed(result) == ["pop3.uses-listed-numbers"]


def retr_1_then_quit_graded(client: RawClient, root, server: MailServer) -> dict[str, str]:
    """RETR 1 (accepted), QUIT, then the session's verdicts."""
    assert client.command("RETR 1").startswith(b"+OK")
    client.multiline()
    client.command("QUIT")
    (result,) = graded(root, server)
    return verdicts(result)


def test_retr_of_a_number_the_login_counted_passes_uses_listed_numbers(classroom, root, store):
    # As curl does: RFC 1939 §7's example login reply gives the count.
    store.deliver("alice", b"Subject: one\n\nhello\n")
    server = classroom()
    client = raw_pop3_login(server)
    assert retr_1_then_quit_graded(client, root, server)["pop3.uses-listed-numbers"] == PASS


def test_retr_of_a_number_counted_in_reply_to_auths_response_passes_uses_listed_numbers(classroom, root, store):
    # curl: AUTH PLAIN, "+ ", the credentials, and the count comes in reply to them.
    store.deliver("alice", b"Subject: one\n\nhello\n")
    server = classroom()
    client = RawClient(server.addresses["pop3"])
    assert client.line().startswith(b"+OK")
    assert client.command("AUTH PLAIN") == b"+ \r\n"
    credentials = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    assert client.command(credentials).startswith(b"+OK alice's maildrop has 1 message ")
    assert retr_1_then_quit_graded(client, root, server)["pop3.uses-listed-numbers"] == PASS


def test_a_message_deleted_then_reset_may_be_retrieved(classroom, root, store):
    # RSET's reply also says "maildrop has 1 message (...)": it is no login count,
    # and it must still take back the DELE.
    store.deliver("alice", b"Subject: one\n\nhello\n")
    server = classroom()
    client = raw_pop3_login(server)
    assert client.command("DELE 1").startswith(b"+OK")
    assert client.command("RSET").startswith(b"+OK")
    assert retr_1_then_quit_graded(client, root, server)["pop3.uses-listed-numbers"] == PASS


def test_retr_after_a_login_that_counted_no_message_says_so(classroom, root):
    server = classroom()
    client = raw_pop3_login(server)  # "+OK alice's maildrop has 0 messages (0 octets)"
    assert client.command("RETR 1").startswith(b"-ERR")
    client.command("QUIT")
    (result,) = graded(root, server)
    (item,) = [item for item in result.results if item.criterion == "pop3.uses-listed-numbers"]
    assert (item.result, item.evidence) == (FAIL, "'RETR 1' but the server had listed no message")


# --- passwords and TLS ---------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path):
    """(tls settings, client context) for a server with a trustme certificate."""
    authority = trustme.CA()
    issued = authority.issue_cert("localhost", "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    issued.private_key_pem.write_to_path(tmp_path / "key.pem")
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return {"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}, context


def test_smtp_auth_before_offered_starttls_fails_no_password_before_tls(classroom, root, certificate):
    tls, _ = certificate
    server = classroom(tls=tls)
    with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
        client.ehlo("student.example")
        assert client.has_extn("starttls")
        client.login("alice", PASSWORD)  # allowed from loopback, but in the clear
    (result,) = graded(root, server)
    assert failed(result) == ["smtp.no-password-before-tls"]
    assert result.user == "alice"  # from the end record: AUTH succeeded


def test_smtp_auth_after_starttls_passes(classroom, root, certificate):
    tls, context = certificate
    server = classroom(tls=tls)
    with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
        client.starttls(context=context)
        client.login("alice", PASSWORD)
        client.sendmail("alice@localhost", ["alice@localhost"], b"Subject: x\r\n\r\nhi\r\n")
    (result,) = graded(root, server)
    assert failed(result) == []
    assert verdicts(result)["smtp.no-password-before-tls"] == PASS
    assert verdicts(result)["smtp.ehlo-before-mail"] == PASS  # smtplib says EHLO again after TLS


def test_a_mail_before_starttls_and_none_after_is_graded_not_a_crash(classroom, root, certificate):
    # The greeting was forgotten at TLS, and the evidence then read it:
    # AttributeError, and 'grade --all' stopped for the whole class.
    tls, context = certificate
    server = classroom(tls=tls)
    client = smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT)
    client.ehlo("student.example")
    assert client.mail("alice@localhost")[0] == 250
    assert client.rset()[0] == 250
    client.starttls(context=context)
    client.quit()
    (result,) = graded(root, server)
    assert verdicts(result)["smtp.ehlo-before-mail"] == PASS
    assert run(root, "--all").exit_code == 0


def test_a_command_sent_along_with_starttls_fails_waits_for_replies(classroom, root, certificate):
    # The server throws it away unrun (CVE-2011-0411), so it was in no
    # exchange of the transcript, and the client passed.
    tls, context = certificate
    server = classroom(tls=tls)
    client = raw_smtp(server)
    smtp_command(client, "EHLO student.example")
    client.send(b"STARTTLS\r\nEHLO sneaky.example\r\n")
    assert smtp_reply(client)[0].startswith(b"220")
    client.close()
    (result,) = graded(root, server)
    [waits] = [item for item in result.results if item.criterion == "smtp.waits-for-replies"]
    assert (waits.result, waits.evidence) == (FAIL, 
        "1 line (21 octets) sent with STARTTLS, before its reply and the TLS handshake (RFC 3207 §4, RFC 2595 §4)")


def test_pop3_pass_after_capa_offered_stls_fails_no_password_before_tls(classroom, root, certificate):
    tls, _ = certificate
    server = classroom(tls=tls, trace_bodies=True)  # CAPA's list is recorded only with bodies
    client = poplib.POP3(*server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
    assert "STLS" in client.capa()
    client.user("alice")
    client.pass_(PASSWORD)
    client.quit()
    (result,) = graded(root, server)
    assert failed(result) == ["pop3.no-password-before-tls"]


def test_pop3_auth_plain_after_stls_passes(classroom, root, certificate):
    tls, context = certificate
    server = classroom(tls=tls, trace_bodies=True)
    client = poplib.POP3(*server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
    client.capa()
    client.stls(context=context)
    token = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    assert client._shortcmd(f"AUTH PLAIN {token}").startswith(b"+OK")
    client.quit()
    (result,) = graded(root, server)
    assert failed(result) == []
    assert verdicts(result)["pop3.no-password-before-tls"] == PASS


# --- the command line ----------------------------------------------------------------


@pytest.fixture
def class_of_two(classroom, root):
    """Two saved sessions: alice's POP3 (no QUIT) and bob's SMTP (well-behaved); their ids."""
    server = classroom()
    client = poplib.POP3(*server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
    client.user("alice")
    client.pass_(PASSWORD)
    client.close()
    with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as smtp:
        smtp.sendmail("bob@example.org", ["alice@localhost"], b"Subject: x\r\n\r\nhi\r\n")
    pop3, smtp_result = graded(root, server)
    return pop3.transcript, smtp_result.transcript


def run(root, *arguments: str):
    return CliRunner().invoke(main, ["grade", "--root", str(root), *arguments])


def test_grade_user_prints_a_table_and_a_score_for_each_of_their_sessions(class_of_two, root):
    pop3_id, _ = class_of_two
    result = run(root, "--user", "alice")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"{pop3_id}: pop3 session of alice from 127.0.0.1, ")
    assert lines[0].endswith(", dropped by client")
    assert lines[1].split() == ["criterion", "rfc", "result", "evidence"]
    assert any(line.startswith("pop3.issues-quit") and " FAIL " in line and
               "closed the connection without an accepted QUIT" in line for line in lines)
    assert lines[-1] == "score 4/5: 4 passed, 1 failed, 3 not applicable"
    assert "smtp" not in result.output  # bob's session is not alice's


def test_grade_user_matches_the_local_part_of_mail_from(class_of_two, root):
    _, smtp_id = class_of_two
    result = run(root, "--user", "Bob", "--format", "json")
    assert result.exit_code == 0, result.stderr
    (document,) = json.loads(result.stdout)
    assert (document["transcript"], document["user"], document["score"]) == (smtp_id, "bob", "7/7")
    assert document["failed"] == []
    assert {item["criterion"]: item["result"] for item in document["results"]}["smtp.issues-quit"] == PASS


def test_grade_all_as_junit_has_a_testsuite_per_transcript_and_a_testcase_per_criterion(class_of_two, root):
    pop3_id, smtp_id = class_of_two
    result = run(root, "--all", "--format", "junit")
    assert result.exit_code == 0, result.stderr
    suites = ET.fromstring(result.stdout).findall("testsuite")
    assert [suite.get("name") for suite in suites] == [pop3_id, smtp_id]
    pop3_suite = suites[0]
    assert len(pop3_suite.findall("testcase")) == len(CRITERIA["pop3"])
    assert (pop3_suite.get("failures"), pop3_suite.get("skipped")) == ("1", "3")
    failing = [case.get("name") for case in pop3_suite.findall("testcase") if case.find("failure") is not None]
    assert failing == ["pop3.issues-quit"]


def a_session_as(classroom, root, user_line: str) -> None:
    """One POP3 session that sends ``user_line`` and QUIT, saved and ready to grade."""
    server = classroom()
    client = RawClient(server.addresses["pop3"])
    client.line()
    client.command(user_line)
    client.command("QUIT")
    graded(root, server)


def test_a_client_that_sends_control_characters_cannot_reach_the_terminal_or_break_junit(classroom, root):
    a_session_as(classroom, root, "USER alice\x1b]0;pwned\x07\x1b[2J")
    text = run(root, "--all")
    assert text.exit_code == 0, text.output
    assert "\x1b" not in text.stdout and "\x07" not in text.stdout and "alice\\x1b]0;pwned" in text.stdout
    junit = run(root, "--all", "--format", "junit")
    assert junit.exit_code == 0, junit.output
    ET.fromstring(junit.stdout)  # XML 1.0 allows no ESC: escaped, it parses


def test_a_client_that_sends_del_or_a_noncharacter_breaks_neither_json_nor_junit(classroom, root):
    # DEL went into the JSON as \x7f, no JSON escape; U+FFFF into the JUnit
    # file, where XML 1.0 allows no such character.
    a_session_as(classroom, root, "USER stu\x7fdent\uffff01")
    as_json = run(root, "--all", "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    (document,) = json.loads(as_json.stdout)
    assert document["user"] == "stu\x7fdent\uffff01"  # as sent, once parsed
    junit = run(root, "--all", "--format", "junit")
    assert junit.exit_code == 0, junit.output
    ET.fromstring(junit.stdout)


def test_a_user_name_that_a_spreadsheet_would_run_is_written_as_text(classroom, root):
    a_session_as(classroom, root, 'USER =HYPERLINK("http://evil.example/","marks")')
    result = run(root, "--all", "--format", "csv")
    assert result.exit_code == 0, result.output
    [row] = list(csv.DictReader(io.StringIO(result.stdout)))
    assert row["user"].startswith("'=")


def test_grade_all_as_csv_writes_one_row_per_transcript_into_a_file(class_of_two, root, tmp_path):
    pop3_id, smtp_id = class_of_two
    output = tmp_path / "class.csv"
    result = run(root, "--all", "--format", "csv", "--output", str(output))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    rows = list(csv.DictReader(output.open(encoding="utf-8")))
    assert [(row["transcript"], row["user"], row["protocol"], row["score"], row["failed"]) for row in rows] == [
        (pop3_id, "alice", "pop3", "4/5", "pop3.issues-quit"), (smtp_id, "bob", "smtp", "7/7", "")]


def test_grade_one_transcript_by_id_and_usage_errors(class_of_two, root):
    pop3_id, _ = class_of_two
    result = run(root, "--transcript", pop3_id, "--format", "csv")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2
    assert run(root).exit_code == 2  # nothing chosen
    assert run(root, "--all", "--user", "alice").exit_code == 2  # two choices
    missing = run(root, "--transcript", "nope")
    assert missing.exit_code == 1  # as 'transcripts show nope', and as for a user who is not there
    assert missing.stderr == "Error: no transcript 'nope' (see 'pymailsrv transcripts list')\n"
    nobody = run(root, "--user", "carol")
    assert nobody.exit_code == 0 and "no saved transcripts of user 'carol'" in nobody.stderr


def test_a_file_that_is_no_transcript_is_noted_and_skipped_or_refused_by_id(root):
    directory = root / ".pymailsrv" / "transcripts"
    directory.mkdir(parents=True)
    (directory / "junk.jsonl").write_bytes(b"\x00\xff garbage")
    everything = run(root, "--all")
    assert everything.exit_code == 0
    assert everything.stderr.splitlines() == ["note: skipped junk: no session record: not a transcript",
                                              f"no saved transcripts under {directory}"]
    by_id = run(root, "--transcript", "junk")
    assert by_id.exit_code == 1
    assert by_id.stderr == "Error: transcript 'junk' cannot be read: no session record: not a transcript\n"


def test_an_output_path_in_no_directory_or_naming_one_is_refused_before_grading(root, tmp_path):
    missing = run(root, "--all", "--output", str(tmp_path / "no-such-dir" / "class.csv"))
    assert missing.exit_code == 2
    assert missing.stderr.splitlines()[-1] == (f"Error: Invalid value for '--output': "
                                               f"no directory {tmp_path / 'no-such-dir'} to write into")
    assert not (tmp_path / "no-such-dir").exists()
    directory = run(root, "--all", "--output", str(tmp_path))
    assert directory.exit_code == 2
    assert directory.stderr.splitlines()[-1] == (f"Error: Invalid value for '--output': "
                                                 f"File '{tmp_path}' is a directory.")
    # A directory name past NAME_MAX: Path.is_dir() raised OSError, a traceback.
    too_long = tmp_path / ("a" * 300) / "class.csv"
    refused = run(root, "--all", "--output", str(too_long))
    assert refused.exit_code == 2
    assert refused.stderr.splitlines()[-1] == (f"Error: Invalid value for '--output': "
                                               f"cannot use {too_long}: File name too long")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_an_output_file_that_fails_to_write_is_a_one_line_error(root):
    full = run(root, "--all", "--output", "/dev/full")  # every write there fails with ENOSPC
    assert full.exit_code == 1
    assert full.stderr.splitlines()[-1] == "Error: cannot write /dev/full: No space left on device"
    assert "Traceback" not in full.output
