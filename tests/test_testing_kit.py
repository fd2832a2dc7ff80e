"""The test kit: pymailsrv.testing.MailServer, the mail_server fixture, and fault scripts.

Each fault kind is observed the way application code would meet it: through
a real smtplib or poplib client.
"""

from __future__ import annotations

import io
import poplib
import re
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pymailsrv.faults import Fault, FaultError
from pymailsrv.server import MailServer as Server, trace_options
from pymailsrv.testing import MailServer
from pymailsrv.trace import Tracer
from tests.conftest import CLIENT_TIMEOUT, make_settings

MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


def send_welcome(address: str, host: str, port: int) -> None:
    """The 'application code' under test: it sends one mail with smtplib."""
    with smtplib.SMTP(host, port, timeout=CLIENT_TIMEOUT) as client:
        client.sendmail("app@example.org", [address], b"Subject: Welcome\r\n\r\nHello!\r\n")


# --- MailServer and the fixture ----------------------------------------------------------


@pytest.mark.mail_server(users={"alice": "secret"})
def test_the_fixture_serves_a_test_of_code_that_sends_mail(mail_server):
    send_welcome("alice@localhost", mail_server.host, mail_server.smtp_port)
    [message] = mail_server.wait_for_messages("alice", 1)
    assert message["Subject"] == "Welcome"
    assert message.get_content() == "Hello!\n"


def test_mail_server_is_a_context_manager_that_cleans_up_even_when_the_test_fails():
    with pytest.raises(ZeroDivisionError):
        with MailServer(users={"bob": "pw"}) as server:
            root, port = server.root, server.pop3_port
            raise ZeroDivisionError
    assert not root.exists()
    with pytest.raises(OSError):
        poplib.POP3("127.0.0.1", port, timeout=1)


def test_users_deliver_and_pop3_see_the_same_mailbox():
    with MailServer() as server:
        assert server.add_user("carol", "pw") == "carol@localhost"
        server.deliver("carol", "Subject: one\n\nfirst\n")
        client = poplib.POP3(server.host, server.pop3_port, timeout=CLIENT_TIMEOUT)
        client.user("carol")
        client.pass_("pw")
        assert client.stat() == (1, 23)
        client.quit()
        assert [message["Subject"] for message in server.messages("carol")] == ["one"]


def test_wait_for_messages_gives_up_with_a_clear_assertion():
    with MailServer(users={"dave": "pw"}) as server:
        started = time.monotonic()
        with pytest.raises(AssertionError, match="dave has 0 messages after 0.2 s, expected 1"):
            server.wait_for_messages("dave", 1, timeout=0.2)
        assert time.monotonic() - started < 2


# --- faults, seen from real clients --------------------------------------------------------


@pytest.mark.mail_server(users={"alice": "pw", "bob": "pw"}, faults=["smtp:RCPT#2=452 4.2.2 mailbox full"])
def test_a_reply_fault_answers_the_nth_command_of_each_session(mail_server):
    for _ in range(2):  # each session counts its own RCPTs
        with smtplib.SMTP(mail_server.host, mail_server.smtp_port, timeout=CLIENT_TIMEOUT) as client:
            refused = client.sendmail("me@example.org", ["alice@localhost", "bob@localhost"], MESSAGE)
        assert refused == {"bob@localhost": (452, b"4.2.2 mailbox full")}
    assert len(mail_server.messages("alice")) == 2
    assert mail_server.messages("bob") == []  # the fault changed nothing stored


@pytest.mark.mail_server(users={"alice": "pw"}, faults=["smtp:MAIL=421"])
def test_a_421_fault_closes_the_connection(mail_server):
    client = smtplib.SMTP(mail_server.host, mail_server.smtp_port, timeout=CLIENT_TIMEOUT)
    client.ehlo()
    assert client.mail("me@example.org") == (421, b"injected fault")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()


def _pop3_login(server: MailServer, user: str = "alice", password: str = "pw") -> poplib.POP3:
    client = poplib.POP3(server.host, server.pop3_port, timeout=CLIENT_TIMEOUT)
    client.user(user)
    client.pass_(password)
    return client


@pytest.mark.mail_server(users={"alice": "pw"}, faults=["pop3:RETR 3=-ERR [SYS/TEMP] disk error"])
def test_a_pop3_fault_matches_the_command_argument(mail_server):
    for number in range(3):
        mail_server.deliver("alice", f"Subject: {number}\n\n{number}\n")
    client = _pop3_login(mail_server)
    assert client.retr(2)[0] == b"+OK 17 octets"
    with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\] disk error"):
        client.retr(3)
    client.quit()


@pytest.mark.mail_server(users={"alice": "pw", "bob": "pw"}, faults=["pop3:PASS[alice]=-ERR [AUTH] refused"])
def test_a_login_can_be_refused_for_one_user_only(mail_server):
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] refused"):
        _pop3_login(mail_server, "alice")
    _pop3_login(mail_server, "bob").quit()


@pytest.mark.mail_server(users={"alice": "pw"}, faults=["smtp:RCPT[bob@localhost]=550 5.1.1 no such user"])
def test_a_fault_can_match_a_recipient(mail_server):
    mail_server.add_user("bob", "pw")
    with smtplib.SMTP(mail_server.host, mail_server.smtp_port, timeout=CLIENT_TIMEOUT) as client:
        refused = client.sendmail("me@example.org", ["alice@localhost", "bob@localhost"], MESSAGE)
    assert refused == {"bob@localhost": (550, b"5.1.1 no such user")}


@pytest.mark.mail_server(users={"alice": "pw"}, faults=["smtp:EHLO=drop"])
def test_a_drop_fault_hangs_up_instead_of_answering(mail_server):
    client = smtplib.SMTP(mail_server.host, mail_server.smtp_port, timeout=CLIENT_TIMEOUT)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.ehlo()


def until_hang_up(server: MailServer, commands: bytes) -> bytes:
    """Everything the SMTP server sends, ``commands`` sent at once, until it hangs up."""
    with socket.create_connection((server.host, server.smtp_port), timeout=CLIENT_TIMEOUT) as client:
        client.sendall(commands)
        received = b""
        while chunk := client.recv(65536):  # CLIENT_TIMEOUT bounds each read
            received += chunk
    return received


@pytest.mark.mail_server(users={"alice": "pw"}, faults=["smtp:RCPT=drop"])
def test_a_drop_fault_still_sends_the_replies_owed_before_it(mail_server):
    # Pipelined: the replies to EHLO and MAIL were queued, not yet sent, when
    # RCPT's fault hung up; they were lost, though the trace showed them.
    received = until_hang_up(mail_server, b"EHLO pc07\r\nMAIL FROM:<me@example.org>\r\nRCPT TO:<alice@localhost>\r\n")
    replies = received.split(b"\r\n")
    assert replies[0].startswith(b"220 ") and replies[1].startswith(b"250-")
    assert replies[-3:] == [b"250 HELP", b"250 2.1.0 sender <me@example.org> OK", b""]


@pytest.mark.mail_server(users={"alice": "pw"}, faults=["smtp:DATA=drop-mid"])
def test_dropping_in_the_middle_of_data_stores_nothing(mail_server):
    with pytest.raises(smtplib.SMTPServerDisconnected):
        with smtplib.SMTP(mail_server.host, mail_server.smtp_port, timeout=CLIENT_TIMEOUT) as client:
            client.sendmail("me@example.org", ["alice@localhost"], MESSAGE)
    time.sleep(0.2)
    assert mail_server.messages("alice") == []
    assert list((mail_server.root / "alice" / "tmp").iterdir()) == []


@pytest.mark.mail_server(faults=["smtp:EHLO=drop-mid"])
def test_drop_mid_cuts_an_smtp_multiline_reply_after_half_its_lines(mail_server):
    greeting, *ehlo, end = until_hang_up(mail_server, b"EHLO pc07\r\n").split(b"\r\n")
    assert greeting.startswith(b"220 ") and end == b""
    # Each line sent still promises more: the client is left waiting for the last.
    assert len(ehlo) >= 2 and all(line.startswith(b"250-") for line in ehlo)


@pytest.mark.mail_server(users={"alice": "pw"}, faults=["pop3:RETR=drop-mid"])
def test_dropping_in_the_middle_of_retr_deletes_nothing(mail_server):
    mail_server.deliver("alice", b"Subject: long\n\n" + b"line\n" * 100)
    client = _pop3_login(mail_server)
    client.dele(1)  # marked, but the session will never reach UPDATE
    client.rset()
    client.dele(1)
    with pytest.raises((poplib.error_proto, EOFError, OSError)):
        client.retr(1)
    time.sleep(0.2)
    assert len(mail_server.messages("alice")) == 1


@pytest.mark.mail_server(users={"alice": "pw"}, faults=["smtp:NOOP*1=delay 1000"])
def test_a_delay_fault_answers_late_and_fires_only_as_often_as_asked(mail_server):
    with smtplib.SMTP(mail_server.host, mail_server.smtp_port, timeout=CLIENT_TIMEOUT) as client:
        started = time.monotonic()
        assert client.noop() == (250, b"2.0.0 OK")
        assert time.monotonic() - started >= 1.0
        started = time.monotonic()
        assert client.noop() == (250, b"2.0.0 OK")
        assert time.monotonic() - started < 1.0  # a NOOP takes well under a millisecond, stalls aside


@pytest.mark.mail_server(users={"alice": "pw"}, faults=[
    "smtp:RCPT#2=452 4.2.2 second", "smtp:RCPT#2=452 4.2.2 second", "smtp:RCPT#3=550 5.1.1 third"])
def test_every_matching_fault_counts_a_command_and_the_first_due_fires(mail_server):
    # The same spec twice counted each RCPT twice (its #2 fired at the 1st),
    # and a fault that fired kept the faults after it from counting.
    with smtplib.SMTP(mail_server.host, mail_server.smtp_port, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo()
        client.mail("me@example.org")
        assert [client.rcpt("alice@localhost")[0] for _ in range(4)] == [250, 452, 550, 250]


@pytest.mark.mail_server(users={"alice": "pw"}, faults=["pop3:PASS[Ali]=-ERR [AUTH] refused"])
def test_a_fault_matches_a_user_name_that_holds_its_text_in_any_case(mail_server):
    for typed in ("alice", "ALICE"):
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] refused"):
            _pop3_login(mail_server, typed)


def test_faults_can_be_added_while_the_server_runs():
    with MailServer(users={"alice": "pw"}) as server:
        server.add_fault("smtp:VRFY=502 5.5.1 not today")
        with smtplib.SMTP(server.host, server.smtp_port, timeout=CLIENT_TIMEOUT) as client:
            assert client.verify("alice") == (502, b"5.5.1 not today")


def test_a_server_with_faults_that_do_not_match_answers_exactly_as_without(root, add_user):
    add_user("alice")

    def dialogue(faults: tuple[str, ...]) -> list[tuple[int, bytes]]:
        server = Server(make_settings(root, faults=list(faults), hostname="test.example")).start()
        try:
            with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
                replies = [client.ehlo("client.example"), client.mail("a@example.org"),
                           client.rcpt("alice@localhost"), client.rcpt("nobody@localhost"), client.rset(),
                           client.noop()]
        finally:
            server.stop()
        return replies

    assert dialogue(()) == dialogue(("smtp:EXPN=500 nope", "pop3:RETR=drop"))


def test_the_trace_marks_every_injected_fault(root, add_user):
    add_user("alice")
    settings = make_settings(root, trace=True, faults=["smtp:NOOP=250 2.0.0 faked"])
    stream = io.StringIO()
    server = Server(settings, tracer=Tracer(trace_options(settings), stream)).start()
    try:
        with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
            assert client.noop() == (250, b"2.0.0 faked")
    finally:
        server.stop()
    assert "-- FAULT injected: smtp:NOOP=250 2.0.0 faked" in stream.getvalue()


def test_an_smtp_fault_reaches_the_submission_port_and_a_pop3_fault_does_not(root, add_user):
    add_user("alice")
    settings = make_settings(root, smtp={"submission_port": 0}, hostname="test.example",
                             faults=["smtp:NOOP=250 2.0.0 faked", "pop3:QUIT=-ERR faked"])
    server = Server(settings).start()
    try:
        with smtplib.SMTP(*server.addresses["submission"], timeout=CLIENT_TIMEOUT) as client:
            assert client.noop() == (250, b"2.0.0 faked")
            assert client.quit() == (221, b"2.0.0 test.example closing connection")
    finally:
        server.stop()


# --- the grammar ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["smtp:RCPT#2=452 4.2.2 mailbox full", "smtp:MAIL=421",
                                  "pop3:RETR 3=-ERR [SYS/TEMP] disk error", "smtp:DATA=drop-mid",
                                  "pop3:PASS[alice]*2=-ERR [AUTH] no", "smtp:MAIL=delay 50"])
def test_the_issues_examples_parse(spec):
    assert Fault.parse(spec).spec == spec


@pytest.mark.parametrize("spec", ["RCPT=452", "imap:LOGIN=NO", "smtp:RCPT=45", "smtp:RCPT=hello",
                                  "pop3:RETR=OK fine", "smtp:RCPT#x=452", "smtp:MAIL=delay fast"])
def test_a_bad_spec_is_refused_with_the_reason(spec):
    with pytest.raises(FaultError):
        Fault.parse(spec)


@pytest.mark.parametrize("spec, reason", [
    ("smtp:NOSUCH=421", "smtp has no command 'NOSUCH', so it could never fire"),
    ("pop3:EHLO=-ERR no", "pop3 has no command 'EHLO', so it could never fire"),
    ("smtp:MAIL#0=421", "#N and *N count from 1, so it could never fire"),
    ("smtp:MAIL*0=421", "#N and *N count from 1, so it could never fire"),
    # time.sleep() of so many seconds raised OverflowError in every session it met.
    ("smtp:EHLO=delay 99999999999999999999", "a delay is at most 31536000000 ms (a year)"),
])
def test_a_fault_that_could_never_fire_or_never_end_is_refused(spec, reason):
    with pytest.raises(FaultError, match=re.escape(f"bad fault {spec!r}: {reason}")):
        Fault.parse(spec)


def test_the_cli_takes_faults_and_refuses_a_bad_one_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pymailsrv", "start", "--root", str(tmp_path),
                             "--pop3-port", "0", "--smtp-port", "0", "--fault", "smtp:RCPT=nonsense"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: bad fault 'smtp:RCPT=nonsense': the action is a reply such as '452 4.2.2 text', "
        "or drop, drop-mid or 'delay MILLISECONDS'")
    assert "Traceback" not in result.stderr


def test_the_embedded_server_ignores_a_config_file_in_the_working_directory(tmp_path, monkeypatch):
    # A project's own ./pymailsrv.toml (or $PYMAILSRV_CONFIG) must not change its tests' server.
    (tmp_path / "pymailsrv.toml").write_text("[smtp]\nmax_message_size = 10\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYMAILSRV_CONFIG", str(tmp_path / "pymailsrv.toml"))
    with MailServer(users={"alice": "pw"}) as server:
        send_welcome("alice@localhost", server.host, server.smtp_port)
        assert len(server.wait_for_messages("alice", 1)) == 1


@pytest.mark.parametrize("timeout", [float("nan"), -1.0, float("inf")])
def test_wait_for_messages_refuses_a_timeout_it_could_never_end(timeout):
    with MailServer(users={"alice": "pw"}) as server:
        with pytest.raises(ValueError, match="timeout must be 0-31536000 seconds"):
            server.wait_for_messages("alice", 1, timeout=timeout)


def test_a_user_who_does_not_exist_fails_as_the_cli_does():
    # Else assert server.messages("alcie") == [] would pass, emptily.
    with MailServer(users={"alice": "pw"}) as server:
        with pytest.raises(ValueError, match="no such user 'alcie'"):
            server.deliver("alcie", b"Subject: typo\n\nhi\n")
        with pytest.raises(ValueError, match="no such user 'alcie'"):
            server.messages("alcie")
        with pytest.raises(ValueError, match="no such user 'alcie'"):
            server.wait_for_messages("alcie", 1, timeout=0)


def kit_directories() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("pymailsrv-test-*"))


@pytest.mark.parametrize("options, error", [
    ({"domains": ("not a domain",)}, "bad value for 'domains"),
    ({"users": {"alice": ""}}, "the password may not be empty"),  # no login could ever give it
    ({"users": {"alice": None}}, "a password is text, not NoneType"),
])
def test_a_server_that_cannot_start_says_why_and_leaves_nothing_behind(options, error):
    before = kit_directories()
    with pytest.raises(Exception, match=re.escape(error)):
        MailServer(**options).start()
    assert kit_directories() == before


def test_the_users_given_are_there_when_the_server_starts(caplog):
    with MailServer(users={"alice": "pw"}):
        pass
    assert "there are no users yet" not in caplog.text


def run_marked_test(directory: Path, marker: str, body: str = "pass", *options: str) -> subprocess.CompletedProcess:
    """pytest, in a process of its own, on one test marked ``@pytest.mark.mail_server(MARKER)``."""
    (directory / "test_it.py").write_text(f"import pytest\n\n@pytest.mark.mail_server({marker})\n"
                                          f"def test_it(mail_server):\n    {body}\n")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options, "test_it.py"],
                          cwd=directory, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("marker, said", [
    ('user={"alice": "pw"}', "mail_server does not take user (it takes users=, faults=, domains=)"),
    ('{"alice": "pw"}', "mail_server takes keywords only (users=, faults=, domains=)"),
    ('domains="example.org"', "mail_server's domains= is a list, not a string: domains=['example.org']"),
])
def test_the_marker_names_a_mistake_in_its_arguments(tmp_path, marker, said):
    done = run_marked_test(tmp_path, marker)
    assert done.returncode != 0 and said in done.stdout + done.stderr


def test_the_marker_takes_none_for_its_defaults(tmp_path):
    done = run_marked_test(tmp_path, "users=None, faults=None, domains=None", "assert mail_server.host")
    assert done.returncode == 0, done.stdout


def test_starting_a_running_server_again_is_refused():
    with MailServer(users={"alice": "pw"}) as server:
        with pytest.raises(RuntimeError, match="already running"):
            server.start()


def test_servers_come_and_go_without_a_resource_warning():
    # A suite that takes warnings for errors failed on the shared memory's
    # files, left for the garbage collector to close (and to warn of).
    script = ("import gc, smtplib\nfrom pymailsrv.testing import MailServer\n"
              "for _ in range(3):\n"
              "    with MailServer(users={'alice': 'pw'}) as server:\n"
              "        smtplib.SMTP(server.host, server.smtp_port, timeout=10).quit()\n"
              "gc.collect()\n")
    done = subprocess.run([sys.executable, "-W", "always::ResourceWarning", "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "ResourceWarning" not in done.stderr, done.stderr


def test_a_bad_mail_fault_option_is_one_usage_error_before_any_test_runs(tmp_path):
    done = run_marked_test(tmp_path, "", "pass", "--mail-fault", "smtp:RCPT=bogus")
    assert done.returncode == pytest.ExitCode.USAGE_ERROR
    assert done.stderr.strip() == ("ERROR: --mail-fault: bad fault 'smtp:RCPT=bogus': the action is a reply such as "
                                   "'452 4.2.2 text', or drop, drop-mid or 'delay MILLISECONDS'")


@pytest.mark.parametrize("options, said", [
    ({"domains": "example.org"}, "domains= is a list, not a string: domains=['example.org']"),
    ({"faults": "smtp:MAIL=421"}, "faults= is a list, not a string: faults=['smtp:MAIL=421']"),
    ({"users": ["alice"]}, "users= maps names to passwords, not a list: users={'alice': 'secret'}"),
])
def test_mail_server_refuses_a_string_where_a_list_is_meant(options, said):
    # A string was taken a character at a time: the domains "e", "x", "a" ...
    with pytest.raises(TypeError, match=re.escape(said)):
        MailServer(**options)
