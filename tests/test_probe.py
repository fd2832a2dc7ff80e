"""``pymailsrv probe`` against pymailsrv itself, the catalogue as data, and the reports.

pymailsrv must pass its own probe: every check PASSes, and only the ones
that idle for minutes (``--slow``) are skipped. The servers are real ones on
127.0.0.1 port 0, from the conftest fixtures.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from pymailsrv.probe import (
    CATALOGUES,
    FAIL,
    PASS,
    SKIP,
    Result,
    json_report,
    junit_report,
    probe,
    run_check,
    run_probe,
    summary,
    text_report,
)
from pymailsrv.probe_base import NEEDS, Check, Probe, Sent, Target
from pymailsrv.probe_checks_pop3 import POP3_CHECKS
from pymailsrv.probe_checks_smtp import SMTP_CHECKS
from pymailsrv.trace import escape_controls
from tests.conftest import PASSWORD

# Check ids pymailsrv is known to fail, each with the bug report that explains
# it. Empty: the self-probe below must then find no FAIL at all.
KNOWN_FAILURES: dict[str, str] = {}
TIMEOUT = 5.0


@pytest.fixture
def mail_server(start_server, add_user):
    """A running pymailsrv with user alice (APOP enabled), and what to probe it with."""
    add_user("alice", apop=True)
    server = start_server()
    return server


def target_for(server, protocol: str, **overrides) -> Target:
    addresses = server.addresses
    fields = dict(protocol=protocol, address=addresses[protocol], user="alice", password=PASSWORD,
                  pop3=addresses["pop3"], smtp=addresses["smtp"], rcpt="alice@localhost", timeout=TIMEOUT)
    return Target(**{**fields, **overrides})


def cli_arguments(server, protocol: str) -> list[str]:
    def address(name: str) -> str:
        host, port = server.addresses[name]
        return f"{host}:{port}"

    other = "smtp" if protocol == "pop3" else "pop3"
    return [protocol, address(protocol), "--user", "alice", "--password-stdin", f"--{other}", address(other),
            "--rcpt", "alice@localhost", "--timeout", str(TIMEOUT)]


# --- the catalogue is data -------------------------------------------------------------


def test_the_catalogues_are_as_large_as_the_issue_asks():
    assert len(POP3_CHECKS) >= 35
    assert len(SMTP_CHECKS) >= 30


@pytest.mark.parametrize("protocol", ["pop3", "smtp"])
def test_every_check_has_a_stable_unique_id_and_an_rfc_section(protocol):
    checks = CATALOGUES[protocol]
    ids = [check.id for check in checks]
    assert len(set(ids)) == len(ids)
    for check in checks:
        assert re.fullmatch(rf"{protocol}\.[a-z0-9]+(-[a-z0-9]+)*", check.id), check.id
        assert re.match(r"RFC \d+ §\d", check.rfc), check.rfc
        assert check.title and callable(check.run)
        assert set(check.needs) <= set(NEEDS), check.id


# --- pymailsrv passes its own probe ----------------------------------------------------------


@pytest.mark.parametrize("protocol", ["pop3", "smtp"])
def test_pymailsrv_passes_its_own_probe(mail_server, store, protocol):
    results = run_probe(target_for(mail_server, protocol))
    report = text_report(results)
    failed = {result.id for result in results if result.status == FAIL}
    assert failed == set(KNOWN_FAILURES) & failed, report
    skipped = {result.id for result in results if result.status == SKIP}
    slow = {check.id for check in CATALOGUES[protocol] if "slow" in check.needs}
    assert skipped == slow, report
    # Every check cleaned up after itself: the maildrop is as empty as it started.
    assert store.messages("alice") == []


def test_checks_whose_options_are_missing_are_skipped_with_the_reason(mail_server):
    results = run_probe(target_for(mail_server, "pop3", user=None, password=None, smtp=None, rcpt=None))
    by_id = {result.id: result for result in results}
    assert by_id["pop3.greeting-ok"].status == PASS
    assert by_id["pop3.user-pass-login"].status == SKIP
    assert "--user" in by_id["pop3.user-pass-login"].detail
    assert by_id["pop3.retr-byte-stuffing"].status == SKIP
    assert not [result for result in results if result.status == FAIL], text_report(results)


def test_the_apop_digest_is_masked_as_a_password_is(mail_server):
    # With the greeting's timestamp beside it, the digest let a guess list
    # find the secret from the report.
    (result,) = run_probe(target_for(mail_server, "pop3"), only=["pop3.apop-login"])
    assert result.status == PASS
    assert result.sent == ["APOP alice ****"] and "C: APOP alice ****" in result.transcript


def test_a_recipient_without_a_domain_skips_the_postmaster_check(mail_server):
    # rpartition gave the whole name as the domain: RCPT TO:<postmaster@alice>, a false FAIL.
    (result,) = run_probe(target_for(mail_server, "smtp", rcpt="alice"), only=["smtp.postmaster-at-domain-accepted"])
    assert (result.status, result.detail) == (SKIP, "--rcpt has no domain")


def test_mail_the_probe_cannot_delete_is_said_on_stderr(mail_server, store):
    # With --rcpt and no POP3 login, the SMTP checks that deliver left their
    # messages behind without a word, though the README said every check
    # deletes its mail.
    host, port = mail_server.addresses["smtp"]
    outcome = CliRunner().invoke(probe, ["smtp", f"{host}:{port}", "--rcpt", "alice@localhost",
                                         "--only", "smtp.data-delivers", "--timeout", str(TIMEOUT)])
    assert outcome.exit_code == 0, outcome.output
    assert len(store.messages("alice")) == 1
    assert outcome.stderr.splitlines()[-1] == (
        "note: the probe sent 1 message to alice@localhost, and with no POP3 login cannot delete what was "
        "stored: give --pop3, --user and --password-stdin for that")


def test_a_smuggling_check_shows_the_bare_sequence_it_sent(mail_server):
    # The transcript split what was sent at every line end, so the five
    # smuggling checks read alike and the bare LF they are about never showed.
    (result,) = run_probe(target_for(mail_server, "smtp"), only=["smtp.smuggling-lf-dot-lf"])
    assert result.status == PASS
    assert (r"C: (the message text, then) before\x0a.\x0aNOOP smuggled\x0d\x0aafter\x0d\x0a.\x0d\x0a"
            in result.transcript)


def test_a_size_within_a_small_limit_is_asked_within_it(start_server, add_user):
    # It always asked SIZE=1000, over a limit of 500: a false FAIL.
    add_user("alice")
    server = start_server(smtp={"max_message_size": 500})
    (result,) = run_probe(target_for(server, "smtp"), only=["smtp.size-within-limit-accepted"])
    assert (result.status, result.sent[-1]) == (PASS, "MAIL FROM:<> SIZE=500")


def test_a_probe_of_the_wrong_protocol_fails_and_shows_what_came_back(mail_server):
    target = target_for(mail_server, "pop3", address=mail_server.addresses["smtp"])
    (result,) = run_probe(target, only=["pop3.greeting-ok"])
    assert result.status == FAIL
    assert "220" in result.detail and "+OK" in result.detail
    assert result.transcript[0].startswith("S: 220")


def test_a_server_that_is_not_there_fails_every_check_that_connects():
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        address = placeholder.getsockname()
    # The port is closed again now: connecting is refused.
    results = run_probe(Target("smtp", address, timeout=TIMEOUT), only=["smtp.greeting-220", "smtp.ehlo-250"])
    assert [result.status for result in results] == [FAIL, FAIL]
    assert "connection error" in results[0].detail


def test_the_command_says_in_one_line_that_nothing_is_there():
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        host, port = placeholder.getsockname()
    outcome = CliRunner().invoke(probe, ["smtp", f"{host}:{port}", "--timeout", str(TIMEOUT)])
    assert outcome.exit_code == 1
    assert outcome.stderr == f"Error: cannot probe {host}:{port}: connection error: [Errno 111] Connection refused\n"
    assert outcome.stdout == ""


# --- the command line and its report formats ------------------------------------------------


def test_the_text_report_ends_with_the_summary_and_exit_status_0(mail_server):
    arguments = cli_arguments(mail_server, "pop3") + ["--only", "pop3.uidl-*", "--only", "pop3.greeting-ok"]
    outcome = CliRunner().invoke(probe, arguments, input=PASSWORD + "\n")
    assert outcome.exit_code == 0, outcome.output
    lines = outcome.output.splitlines()
    assert lines[0].split()[:5] == ["check", "rfc", "result", "sent", "came"]
    assert lines[-1] == "5 passed, 0 failed, 0 skipped"
    assert "PASS ****" in outcome.output and PASSWORD not in outcome.output


def test_a_failed_check_makes_the_exit_status_1(mail_server):
    host, port = mail_server.addresses["smtp"]
    outcome = CliRunner().invoke(probe, ["pop3", f"{host}:{port}", "--only", "pop3.greeting-ok"])
    assert outcome.exit_code == 1
    assert "FAIL" in outcome.output and "220" in outcome.output
    assert outcome.output.splitlines()[-1] == "0 passed, 1 failed, 0 skipped"


def test_json_format_lists_one_object_per_check(mail_server):
    arguments = cli_arguments(mail_server, "smtp") + ["--only", "smtp.smuggling-*", "--format", "json"]
    outcome = CliRunner().invoke(probe, arguments, input=PASSWORD + "\n")
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.stdout)
    assert [result["id"] for result in report] == [check.id for check in SMTP_CHECKS
                                                    if check.id.startswith("smtp.smuggling-")]
    assert {result["status"] for result in report} == {PASS}
    assert report[0]["rfc"].startswith("RFC 5321") and report[0]["transcript"][0].startswith("S: 220")


def test_a_reply_with_del_or_a_noncharacter_breaks_neither_json_nor_junit():
    # As the reports go out: DEL went into the JSON as \x7f, no JSON escape;
    # U+FFFF into the JUnit file, where XML 1.0 allows no such character.
    line = "S: +OK fake \x7f\uffff ready"
    results = [Result("pop3.greeting-ok", "RFC 1939 §4", "a greeting", FAIL, [], line, [line], 0.1)]
    assert json.loads(escape_controls(json_report(results)))[0]["transcript"] == [line]
    ET.fromstring(escape_controls(junit_report(results, "pop3")))


def test_junit_format_has_a_testcase_per_check_with_failures_and_skips(mail_server):
    host, port = mail_server.addresses["pop3"]
    arguments = ["pop3", f"{host}:{port}", "--format", "junit",
                 "--only", "pop3.greeting-ok", "--only", "pop3.user-pass-login"]
    outcome = CliRunner().invoke(probe, arguments)
    assert outcome.exit_code == 0, outcome.output
    suite = ET.fromstring(outcome.stdout).find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("2", "0", "1")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["pop3.greeting-ok"].find("skipped") is None
    assert cases["pop3.user-pass-login"].find("skipped") is not None


def test_only_with_no_matching_check_is_a_usage_error(mail_server):
    host, port = mail_server.addresses["pop3"]
    outcome = CliRunner().invoke(probe, ["pop3", f"{host}:{port}", "--only", "pop3.no-such-check"])
    assert outcome.exit_code == 2
    assert "no check id matches" in outcome.output


def parse_message_count(probe: Probe) -> None:
    """A check with a bug: it takes the word after +OK for a number, which the greeting is not."""
    greeting = probe.connect().greeting
    int(greeting.split()[1])


def test_a_check_that_raises_anything_fails_alone_with_a_one_line_reason(mail_server):
    buggy = Check("pop3.buggy", "RFC 1939 §4", "a check with a bug", parse_message_count)
    result = run_check(buggy, target_for(mail_server, "pop3"))
    assert result.status == FAIL
    assert result.detail == "the check broke: ValueError: invalid literal for int() with base 10: 'pymailsrv'"
    assert result.transcript[0].startswith("S: +OK pymailsrv")  # what it heard before it broke is kept


def test_a_clean_up_that_breaks_does_not_turn_the_result_around(mail_server):
    def send_with_a_bad_token(probe: Probe) -> None:
        probe.sent.append(Sent(token=["a list is no token"], text=b""))  # clean-up's set() of tokens raises

    careless = Check("pop3.careless", "RFC 1939 §4", "a check whose mail clean-up cannot find", send_with_a_bad_token)
    result = run_check(careless, target_for(mail_server, "pop3"))
    assert (result.status, result.detail) == (PASS, "")


@pytest.mark.parametrize("address", ["localhost", "localhost:", "localhost:0", "localhost:65536", "localhost:pop3",
                                     ":110", "::1:110", "[::1]", "[::1", "[::1]110"])
def test_an_address_without_a_usable_port_is_a_usage_error(address):
    outcome = CliRunner().invoke(probe, ["smtp", address])
    assert outcome.exit_code == 2
    assert outcome.stderr.splitlines()[-1] == ("Error: Invalid value for ADDRESS: expected HOST:PORT or "
                                               f"[IPv6]:PORT, port 1-65535, got {address!r}")


def test_the_other_servers_addresses_are_checked_the_same_way():
    outcome = CliRunner().invoke(probe, ["pop3", "127.0.0.1:1100", "--smtp", "127.0.0.1"])
    assert outcome.exit_code == 2
    assert outcome.stderr.splitlines()[-1] == ("Error: Invalid value for --smtp: expected HOST:PORT or "
                                               "[IPv6]:PORT, port 1-65535, got '127.0.0.1'")


@pytest.fixture
def ipv6_greeter():
    """The port of a listener on [::1] that greets one connection as a POP3 server would."""
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    listener.settimeout(TIMEOUT)  # the thread ends even if the probe never comes

    def greet_once() -> None:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.sendall(b"+OK greeter ready\r\n")

    thread = threading.Thread(target=greet_once)
    thread.start()
    yield listener.getsockname()[1]
    thread.join()
    listener.close()


def test_an_ipv6_address_is_written_in_brackets(ipv6_greeter):
    outcome = CliRunner().invoke(probe, ["pop3", f"[::1]:{ipv6_greeter}", "--only", "pop3.greeting-ok"])
    assert outcome.exit_code == 0, outcome.output
    assert outcome.stdout.splitlines()[-1] == "1 passed, 0 failed, 0 skipped"


def test_summary_counts_each_status():
    results = run_probe(Target("pop3", ("127.0.0.1", 9), slow=False), only=["pop3.autologout-*"])
    assert summary(results) == "0 passed, 0 failed, 1 skipped"


def test_probe_is_a_subcommand_of_pymailsrv():
    from pymailsrv.cli import main

    outcome = CliRunner().invoke(main, ["probe", "--help"])
    assert outcome.exit_code == 0
    assert "{pop3|smtp} ADDRESS" in outcome.output


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "1e300"])
def test_a_timeout_no_socket_can_wait_is_a_usage_error_not_a_server_failure(timeout):
    result = CliRunner().invoke(probe, ["pop3", "127.0.0.1:1", "--timeout", timeout])
    assert result.exit_code == 2
    assert "Invalid value for '--timeout': must be more than 0 and at most 31536000 seconds" in result.output
