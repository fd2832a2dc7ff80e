"""SMTP AUTH (RFC 4954) and POP3 AUTH (RFC 5034), and where passwords may go.

Both protocols carry the same SASL exchanges (PLAIN, RFC 4616; LOGIN for
SMTP): the credential on the AUTH line itself (the initial response) or on
a line of its own after a challenge, ``*`` to cancel. Every reply is
compared with the catalogue.

Guessing is slowed three ways: each failure waits ``failed_login_delay``,
a connection closes after ``auth.max_failures_per_connection`` failures,
and an address that failed ``auth.max_failures_per_address`` times is
refused unchecked - other addresses are not. The tests use 127.0.0.2 as a
second client address (all of 127.0.0.0/8 is loopback on Linux).

A password may cross only a TLS connection or one from ``auth.local_networks``
(Dovecot's disable_plaintext_auth). To be a client "not local", the tests
set that list to 127.0.0.1 alone and connect from 127.0.0.2.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import os
import smtplib
import subprocess
import sys
import threading
import time

import pytest

from pymailsrv import replies as R
from pymailsrv.auth import Admission, FailureThrottle
from pymailsrv.server import MailServer
from pymailsrv.shared import address_key
from tests.conftest import CLIENT_TIMEOUT, PASSWORD
from tests.test_pop3 import wire as pop3_wire
from tests.test_smtp import exchange, read_reply, wire
from tests.test_starttls import (  # noqa: F401  (fixtures)
    CLIENT_NAME,
    TlsClient,
    capa,
    capa_lines,
    client,
    ehlo_wire,
    plain,
    pop3_stls,
    smtp_starttls,
    tls_files,
)

NOT_LOCAL = "127.0.0.2"  # a client address outside auth.local_networks = 127.0.0.1/32
ONLY_LOOPBACK_ONE = {"local_networks": ["127.0.0.1/32"]}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def alice(add_user) -> str:
    return add_user("alice", apop=True)


@pytest.fixture
def smtp_at(client):
    """smtp_at(server, source="127.0.0.1", ehlo=True) -> a TlsClient past the greeting (and EHLO)."""

    def connect(server: MailServer, source: str = "127.0.0.1", ehlo: bool = True,
                listener: str = "smtp") -> TlsClient:
        connected = client(server.addresses[listener], source)
        assert read_reply(connected) == wire(R.R220_GREETING, host=server.settings.hostname)
        if ehlo:
            assert exchange(connected, f"EHLO {CLIENT_NAME}").startswith(b"250-")
        return connected

    return connect


@pytest.fixture
def pop3_at(client):
    """pop3_at(server, source="127.0.0.1") -> a TlsClient past the POP3 greeting (kept as .greeting)."""

    def connect(server: MailServer, source: str = "127.0.0.1") -> TlsClient:
        connected = client(server.addresses["pop3"], source)
        connected.greeting = connected.line()
        assert connected.greeting.startswith(b"+OK pymailsrv POP3 server ready")
        return connected

    return connect


@pytest.fixture
def smtp(server, smtp_at):
    return lambda **options: smtp_at(server, **options)


@pytest.fixture
def pop3(server, pop3_at):
    return lambda **options: pop3_at(server, **options)


# --- SMTP AUTH PLAIN and LOGIN (RFC 4954 §4) ---------------------------------------------


def test_auth_plain_with_initial_response_is_235(smtp, alice):
    assert exchange(smtp(), f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)


def test_auth_while_the_accounts_cannot_be_read_is_a_temporary_authentication_failure(smtp, alice, root):
    # RFC 4954 §6 gives 454 4.7.0 to a failure of the server's own; it was
    # 451 4.3.0, a local error in processing.
    (root / ".pymailsrv" / "users.json").write_text('{"users": {"alice": {"password": 5}}}')
    assert exchange(smtp(), f"AUTH PLAIN {plain()}") == wire(R.R454_TEMPORARY_AUTH_FAILURE)


def test_auth_plain_after_an_empty_challenge_is_235(smtp, alice):
    client = smtp()
    assert exchange(client, "AUTH PLAIN") == wire(R.R334_CHALLENGE, challenge="") == b"334 \r\n"
    assert exchange(client, plain()) == wire(R.R235_AUTHENTICATED)


@pytest.mark.parametrize("authzid", ["alice", "ALICE"])
def test_auth_plain_with_the_user_as_authorization_identity_is_235(smtp, alice, authzid):
    credential = base64.b64encode(f"{authzid}\0alice\0{PASSWORD}".encode()).decode()
    assert exchange(smtp(), f"AUTH PLAIN {credential}") == wire(R.R235_AUTHENTICATED)


def test_auth_plain_acting_for_another_user_fails_as_a_wrong_password_would(smtp, alice):
    # RFC 4616 §2: an authzid the user may not act as makes "the authentication fail".
    credential = base64.b64encode(f"bob\0alice\0{PASSWORD}".encode()).decode()
    assert exchange(smtp(), f"AUTH PLAIN {credential}") == wire(R.R535_AUTH_FAILED)


def test_auth_login_prompts_for_user_name_then_password(smtp, alice):
    client = smtp()
    assert exchange(client, "AUTH LOGIN") == wire(R.R334_CHALLENGE, challenge=b64("Username:"))
    assert exchange(client, b64("alice")) == wire(R.R334_CHALLENGE, challenge=b64("Password:"))
    assert exchange(client, b64(PASSWORD)) == wire(R.R235_AUTHENTICATED)


def test_auth_login_with_the_user_name_as_initial_response(smtp, alice):
    client = smtp()
    assert exchange(client, f"AUTH LOGIN {b64('alice')}") == wire(R.R334_CHALLENGE, challenge=b64("Password:"))
    assert exchange(client, b64(PASSWORD)) == wire(R.R235_AUTHENTICATED)


def test_auth_mechanism_name_is_case_insensitive(smtp, alice):
    assert exchange(smtp(), f"AUTH plain {plain()}") == wire(R.R235_AUTHENTICATED)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_logs_in_with_each_mechanism(server, alice, mechanism):
    with smtplib.SMTP(*server.addresses["smtp"], local_hostname=CLIENT_NAME, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo()
        assert client.esmtp_features["auth"] == " PLAIN LOGIN"
        client.user, client.password = "alice", PASSWORD
        authobject = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login}[mechanism]
        assert client.auth(mechanism, authobject) == (235, b"2.7.0 authentication successful")


@pytest.mark.parametrize("command", ["AUTH PLAIN", "AUTH LOGIN", f"AUTH LOGIN {b64('alice')}"])
def test_star_cancels_the_exchange_with_501(smtp, alice, command):
    client = smtp()
    assert exchange(client, command).startswith(b"334 ")
    assert exchange(client, "*") == wire(R.R501_AUTH_CANCELLED) == b"501 5.0.0 authentication cancelled\r\n"
    assert exchange(client, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)  # free to try again


@pytest.mark.parametrize("response", ["not-base64!", "YWJj=", "YQ", b64("no nul bytes"),
                                      b64("\0\0"), b64("\0alice\0"), b64("\0\0secret")])  # RFC 4616: 1*SAFE
def test_initial_response_that_is_not_plain_base64_is_501(smtp, alice, response):
    assert exchange(smtp(), f"AUTH PLAIN {response}") == wire(R.R501_AUTH_MALFORMED)


def test_continuation_that_is_not_base64_is_501(smtp, alice):
    client = smtp()
    assert exchange(client, "AUTH LOGIN") == wire(R.R334_CHALLENGE, challenge=b64("Username:"))
    assert exchange(client, "!!!") == wire(R.R501_AUTH_MALFORMED) == b"501 5.5.2 cannot decode the response\r\n"
    assert exchange(client, "NOOP") == wire(R.R250_OK)  # back to commands


@pytest.mark.parametrize("answer", [f" {plain()}", f"{plain()} ", f"\t{plain()}", "="])
def test_a_continuation_with_blanks_round_its_base64_or_an_equals_sign_is_501(smtp, alice, answer):
    # RFC 4954 §4: a server MUST reject, not ignore, what is not base64; "="
    # means an empty *initial* response, and nothing in a continuation.
    client = smtp()
    assert exchange(client, "AUTH PLAIN") == b"334 \r\n"
    assert exchange(client, answer) == wire(R.R501_AUTH_MALFORMED)


def test_an_equals_sign_as_the_initial_response_is_an_empty_one(smtp, alice):
    # RFC 4954 §4: AUTH LOGIN = starts the exchange with no initial response
    # data; LOGIN's first challenge is then the password's.
    client = smtp()
    assert exchange(client, "AUTH LOGIN =") == wire(R.R334_CHALLENGE, challenge=b64("Password:"))


def test_wrong_password_is_535(smtp, alice):
    assert exchange(smtp(), f"AUTH PLAIN {plain(password='wrong')}") == wire(R.R535_AUTH_FAILED)


def test_unknown_user_is_the_same_535(smtp, alice):
    assert exchange(smtp(), f"AUTH PLAIN {plain(user='mallory')}") == wire(R.R535_AUTH_FAILED)


def test_impossible_user_name_is_535_not_a_crash(smtp, alice):
    assert exchange(smtp(), f"AUTH PLAIN {plain(user='../etc')}") == wire(R.R535_AUTH_FAILED)


def test_failed_auth_waits_the_configured_delay(start_server, smtp_at, alice):
    delay = 1.0  # long beside a login that succeeds (its scrypt check takes about 50 ms), stalls and all
    server = start_server(pop3={"failed_login_delay": delay})
    client = smtp_at(server)
    started = time.monotonic()
    assert exchange(client, f"AUTH PLAIN {plain(password='wrong')}") == wire(R.R535_AUTH_FAILED)
    assert time.monotonic() - started >= delay
    started = time.monotonic()
    assert exchange(client, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)
    assert time.monotonic() - started < delay  # success is never slowed


def test_auth_twice_is_503(smtp, alice):
    client = smtp()
    assert exchange(client, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)
    assert exchange(client, f"AUTH PLAIN {plain()}") == wire(R.R503_ALREADY_AUTHENTICATED)


def test_auth_inside_a_transaction_is_503(smtp, alice):
    client = smtp()
    assert exchange(client, "MAIL FROM:<bob@example.org>").startswith(b"250 ")
    assert exchange(client, f"AUTH PLAIN {plain()}") == wire(R.R503_WRONG_STATE, verb="AUTH", state="MAIL")


def test_auth_before_ehlo_is_503(smtp, alice):
    assert exchange(smtp(ehlo=False), f"AUTH PLAIN {plain()}") == wire(R.R503_WRONG_STATE, verb="AUTH",
                                                                         state="CONNECTED")


def test_unknown_mechanism_is_504(smtp, alice):
    assert exchange(smtp(), "AUTH CRAM-MD5") == wire(R.R504_UNKNOWN_MECHANISM)


@pytest.mark.parametrize("command", ["AUTH", "AUTH PLAIN a b"])
def test_auth_with_no_mechanism_or_too_many_words_is_a_syntax_error(smtp, command):
    assert exchange(smtp(), command) == wire(R.R501_SYNTAX, syntax="AUTH mechanism [initial-response]")


def test_third_failure_on_a_connection_is_535_then_421_and_close(server, smtp, alice):
    client = smtp()
    for _ in range(2):
        assert exchange(client, f"AUTH PLAIN {plain(password='wrong')}") == wire(R.R535_AUTH_FAILED)
    assert exchange(client, f"AUTH PLAIN {plain(password='wrong')}") == wire(R.R535_AUTH_FAILED)
    assert read_reply(client) == wire(R.R421_TOO_MANY_AUTH_FAILURES, host=server.settings.hostname)
    assert client.closed()


def test_failures_in_the_continuation_form_count_too(server, smtp, alice):
    client = smtp()
    for _ in range(3):
        assert exchange(client, "AUTH PLAIN") == b"334 \r\n"
        last = exchange(client, plain(password="wrong"))
    assert last == wire(R.R535_AUTH_FAILED)
    assert read_reply(client) == wire(R.R421_TOO_MANY_AUTH_FAILURES, host=server.settings.hostname)
    assert client.closed()


def test_address_that_failed_too_often_is_454_even_with_the_right_password(start_server, smtp_at, alice):
    server = start_server(auth={"max_failures_per_address": 2})
    for _ in range(2):
        client = smtp_at(server)
        assert exchange(client, f"AUTH PLAIN {plain(password='wrong')}") == wire(R.R535_AUTH_FAILED)
    third = smtp_at(server)
    assert exchange(third, f"AUTH PLAIN {plain()}") == wire(R.R454_ADDRESS_BLOCKED)
    # Another address is not slowed by it.
    other = smtp_at(server, source="127.0.0.2")
    assert exchange(other, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)


def logins_at_once(server: MailServer, smtp_at, password: str, count: int = 12) -> list[bytes]:
    """AUTH PLAIN as alice on ``count`` connections at the same moment; the replies in order."""
    clients = [smtp_at(server) for _ in range(count)]
    start = threading.Barrier(count, timeout=CLIENT_TIMEOUT)

    def log_in(client: TlsClient) -> bytes:
        start.wait()
        return exchange(client, f"AUTH PLAIN {plain(password=password)}")

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(log_in, clients))


def test_guesses_sent_at_once_on_many_connections_are_held_to_the_limit(start_server, smtp_at, alice):
    # With a test before the check and a count after it, all twelve were checked.
    server = start_server(auth={"max_failures_per_address": 3})
    replies = sorted(logins_at_once(server, smtp_at, "wrong"))
    assert replies == [wire(R.R454_ADDRESS_BLOCKED)] * 9 + [wire(R.R535_AUTH_FAILED)] * 3


def test_right_passwords_sent_at_once_on_many_connections_all_log_in(start_server, smtp_at, alice):
    # They wait while the checks under way could reach the limit, never refused.
    server = start_server(auth={"max_failures_per_address": 3})
    assert logins_at_once(server, smtp_at, PASSWORD) == [wire(R.R235_AUTHENTICATED)] * 12


def test_a_login_that_succeeds_is_not_counted_as_a_failure(start_server, smtp_at, alice):
    server = start_server(auth={"max_failures_per_address": 2})
    for _ in range(3):
        assert exchange(smtp_at(server), f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)
    assert exchange(smtp_at(server), f"AUTH PLAIN {plain(password='wrong')}") == wire(R.R535_AUTH_FAILED)
    assert exchange(smtp_at(server), f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)


def test_a_login_the_server_could_not_check_is_not_counted_as_a_failure(start_server, pop3_at, alice, root):
    server = start_server(auth={"max_failures_per_address": 2})
    users_file = root / ".pymailsrv" / "users.json"
    good = users_file.read_bytes()
    users_file.write_bytes(b"{")  # damaged while the server runs: every check is a storage error
    for _ in range(3):
        client = pop3_at(server)
        assert client.command("USER alice").startswith(b"+OK")
        assert client.command(f"PASS {PASSWORD}").startswith(b"-ERR [SYS/TEMP] ")
    users_file.write_bytes(good)
    client = pop3_at(server)
    assert client.command("USER alice").startswith(b"+OK")
    assert client.command(f"PASS {PASSWORD}").startswith(b"+OK alice's maildrop has ")


def apop(client, name: str, secret: str) -> bytes:
    """APOP name with the digest of this greeting's timestamp and ``secret`` (RFC 1939 §7)."""
    timestamp = client.greeting[client.greeting.index(b"<"):client.greeting.index(b">") + 1].decode()
    return client.command(f"APOP {name} {hashlib.md5((timestamp + secret).encode()).hexdigest()}")


def test_apop_for_an_account_without_an_apop_secret_is_not_counted_against_the_address(start_server, pop3_at,
                                                                                      add_user):
    # mutt with "apop:user" tries APOP first whenever the greeting offers it:
    # each connection of a user with no APOP secret counted a failure.
    add_user("alice", apop=True)  # so every greeting offers APOP
    add_user("bob")
    server = start_server(auth={"max_failures_per_address": 2})
    for _ in range(3):
        client = pop3_at(server)
        assert apop(client, "bob", PASSWORD) == pop3_wire(R.POP3_AUTH_FAILED)
        assert client.command("USER bob").startswith(b"+OK")
        assert client.command(f"PASS {PASSWORD}").startswith(b"+OK bob's maildrop has ")
        client.command("QUIT")
    # A wrong digest for an account that has a secret is a guess, and counted.
    for _ in range(2):
        assert apop(pop3_at(server), "alice", "wrong") == pop3_wire(R.POP3_AUTH_FAILED)
    assert apop(pop3_at(server), "alice", PASSWORD) == pop3_wire(R.POP3_ADDRESS_BLOCKED)


def test_pop3_address_that_failed_too_often_is_refused_unchecked(start_server, pop3_at, alice):
    server = start_server(auth={"max_failures_per_address": 2})
    client = pop3_at(server)
    for _ in range(2):
        assert client.command(f"AUTH PLAIN {plain(password='wrong')}") == pop3_wire(R.POP3_AUTH_FAILED)
    # A new connection: a third failure on the first would close it (our limit; RFC 3206 §5 gives it [AUTH]).
    assert pop3_at(server).command(f"AUTH PLAIN {plain()}") == pop3_wire(R.POP3_ADDRESS_BLOCKED)
    other = pop3_at(server, source="127.0.0.2")
    assert other.command(f"AUTH PLAIN {plain()}").startswith(b"+OK alice's maildrop has ")


def test_throttle_forgets_failures_after_the_window(start_server, smtp_at, alice):
    window = 1.0  # long beside the step inside it (a login's scrypt check takes about 50 ms), stalls and all
    server = start_server(auth={"max_failures_per_address": 1, "failure_window": window})
    client = smtp_at(server)
    assert exchange(client, f"AUTH PLAIN {plain(password='wrong')}") == wire(R.R535_AUTH_FAILED)
    assert exchange(client, f"AUTH PLAIN {plain()}") == wire(R.R454_ADDRESS_BLOCKED)
    time.sleep(window + 0.05)
    assert exchange(client, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)


def fail(throttle: FailureThrottle, address: str) -> None:
    """One wrong password from ``address``, as a session reports it."""
    assert throttle.begin(address) is Admission.CHECK
    throttle.end(address, failed=True)


def test_the_throttle_counts_the_failures_of_every_worker_process():
    throttle = FailureThrottle(limit=2, window=60)
    child = os.fork()
    if child == 0:  # a worker's failures (start --processes), in its own process
        fail(throttle, "192.0.2.1")
        fail(throttle, "192.0.2.1")
        os._exit(0)
    assert os.waitpid(child, 0)[1] == 0
    assert throttle.begin("192.0.2.1") is Admission.REFUSE
    assert throttle.begin("192.0.2.2") is Admission.CHECK


def test_where_an_address_goes_in_the_table_cannot_be_worked_out_outside_the_server():
    # The key was an unkeyed hash: a client could compute addresses whose
    # records fill the places its own address may take, and then its failed
    # logins went uncounted. Every start keys it with a secret of its own.
    here = address_key("192.0.2.1")
    another_start = subprocess.run(
        [sys.executable, "-c", "from pymailsrv.shared import address_key; print(address_key('192.0.2.1'))"],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=True)
    assert int(another_start.stdout) != here
    assert here != int.from_bytes(hashlib.blake2b(b"192.0.2.1", digest_size=8).digest(), "big")


def test_checks_under_way_hold_back_the_next_only_while_they_could_reach_the_limit():
    throttle = FailureThrottle(limit=2, window=60)
    assert throttle.begin("192.0.2.1") is Admission.CHECK
    assert throttle.begin("192.0.2.1") is Admission.CHECK
    assert throttle.begin("192.0.2.1") is Admission.WAIT  # two under way: both may fail
    throttle.end("192.0.2.1", failed=False)  # the right password
    assert throttle.begin("192.0.2.1") is Admission.CHECK
    throttle.end("192.0.2.1", failed=True)
    throttle.end("192.0.2.1", failed=True)
    assert throttle.begin("192.0.2.1") is Admission.REFUSE


def test_a_check_under_way_across_the_end_of_a_window_still_counts_in_the_next():
    # Else a right password that straddled the window's end made room for one guess too many.
    window = 1.0  # long beside the steps inside it, stalls and all
    throttle = FailureThrottle(limit=2, window=window)
    fail(throttle, "192.0.2.1")
    assert throttle.begin("192.0.2.1") is Admission.CHECK  # the right password, slow to check
    time.sleep(window + 0.05)
    assert throttle.begin("192.0.2.1") is Admission.CHECK  # a new window: one guess
    assert throttle.begin("192.0.2.1") is Admission.WAIT  # the first check may still fail
    throttle.end("192.0.2.1", failed=False)
    assert throttle.begin("192.0.2.1") is Admission.CHECK


def test_the_checks_of_a_worker_that_died_are_forgotten():
    throttle = FailureThrottle(limit=2, window=60)
    child = os.fork()
    if child == 0:  # a worker that begins two checks, and dies before it ends them
        throttle.begin("192.0.2.1")
        throttle.begin("192.0.2.1")
        os._exit(0)
    assert os.waitpid(child, 0)[1] == 0
    assert throttle.begin("192.0.2.1") is Admission.WAIT
    throttle.forget_checks()  # what the main process does when it reaps a worker
    assert throttle.begin("192.0.2.1") is Admission.CHECK


def test_an_ipv6_client_is_counted_by_its_48_as_dovecot_counts_it():
    # A site's /48 holds 2**80 addresses: counted one by one, none would ever be blocked.
    throttle = FailureThrottle(limit=2, window=60)
    fail(throttle, "2001:db8:1:2::1")
    fail(throttle, "2001:db8:1:ffff::99")
    assert throttle.begin("2001:db8:1::7") is Admission.REFUSE
    assert throttle.begin("2001:db8:2::1") is Admission.CHECK  # another /48
    fail(throttle, "192.0.2.1")
    fail(throttle, "::ffff:192.0.2.1")  # one client, two spellings
    assert throttle.begin("192.0.2.1") is Admission.REFUSE


def test_an_address_whose_window_is_over_makes_room_for_another(caplog):
    window = 1.0  # long beside the steps inside it, stalls and all
    throttle = FailureThrottle(limit=1, window=window, size=1)  # room for one address
    fail(throttle, "192.0.2.1")
    assert throttle.begin("192.0.2.1") is Admission.REFUSE
    fail(throttle, "192.0.2.2")  # .1 is inside its window: no room, so uncounted
    fail(throttle, "192.0.2.2")
    assert "failed-login table full: a login from 192.0.2.2 is not counted" in caplog.text
    time.sleep(window + 0.05)
    fail(throttle, "192.0.2.2")
    assert throttle.begin("192.0.2.2") is Admission.REFUSE
    assert throttle.begin("192.0.2.1") is Admission.CHECK  # .2 holds the one record now


def test_sasl_answer_may_be_longer_than_a_command_line(smtp, alice):
    # RFC 4954 §4: a response line may run to 12288 octets, past SMTP's 512.
    client = smtp()
    assert exchange(client, "AUTH PLAIN") == b"334 \r\n"
    assert exchange(client, plain(password="x" * 3000)) == wire(R.R535_AUTH_FAILED)


def test_sasl_answer_over_12288_octets_is_500_and_the_session_goes_on(smtp, alice):
    client = smtp()
    assert exchange(client, "AUTH PLAIN") == b"334 \r\n"
    assert exchange(client, "A" * 13000) == wire(R.R500_AUTH_LINE_TOO_LONG)  # RFC 4954 §6: 500 5.5.6
    assert exchange(client, "NOOP") == wire(R.R250_OK)


# --- POP3 AUTH (RFC 5034) ---------------------------------------------------------------------


def test_pop3_sasl_answer_over_12288_octets_is_its_own_error_and_the_session_goes_on(pop3, alice):
    # It was "command line too long", whose note said "over 255 octets".
    client = pop3()
    assert client.command("AUTH PLAIN") == b"+ \r\n"
    assert client.command("A" * 13000) == pop3_wire(R.POP3_SASL_LINE_TOO_LONG)
    assert client.command("NOOP") == b"-ERR NOOP is not valid in the AUTHORIZATION state\r\n"


def test_pop3_auth_plain_with_initial_response_logs_in(pop3, alice):
    logged_in = pop3_wire(R.POP3_LOGGED_IN, user="alice", messages="0 messages", size=0)
    assert pop3().command(f"AUTH PLAIN {plain()}") == logged_in


def test_pop3_auth_plain_after_a_continuation_logs_in(pop3, alice, store):
    store.deliver("alice", b"Subject: hi\n\nhello\n")
    client = pop3()
    assert client.command("AUTH PLAIN") == pop3_wire(R.POP3_CHALLENGE, challenge="") == b"+ \r\n"
    assert client.command(plain()) == pop3_wire(R.POP3_LOGGED_IN, user="alice", messages="1 message", size=22)
    assert client.command("STAT") == pop3_wire(R.POP3_STAT, count=1, size=22)


def test_pop3_auth_star_cancels(pop3, alice):
    client = pop3()
    assert client.command("AUTH PLAIN") == b"+ \r\n"
    assert client.command("*") == pop3_wire(R.POP3_AUTH_CANCELLED) == b"-ERR authentication cancelled\r\n"
    assert client.command(f"AUTH PLAIN {plain()}").startswith(b"+OK alice's maildrop has ")


@pytest.mark.parametrize("response", ["not-base64!", b64("no nul bytes")])
def test_pop3_auth_bad_response_is_malformed(pop3, alice, response):
    client = pop3()
    assert client.command(f"AUTH PLAIN {response}") == pop3_wire(R.POP3_AUTH_MALFORMED)
    assert client.command("AUTH PLAIN") == b"+ \r\n"
    assert client.command(response) == pop3_wire(R.POP3_AUTH_MALFORMED)


def test_pop3_auth_failure_is_err_auth(pop3, alice):
    reply = pop3().command(f"AUTH PLAIN {plain(password='wrong')}")
    assert reply == pop3_wire(R.POP3_AUTH_FAILED) == b"-ERR [AUTH] invalid user name or password\r\n"


def test_pop3_auth_failure_waits_the_configured_delay(start_server, pop3_at, alice):
    server = start_server(pop3={"failed_login_delay": 0.2})
    client = pop3_at(server)
    started = time.monotonic()
    assert client.command(f"AUTH PLAIN {plain(password='wrong')}") == pop3_wire(R.POP3_AUTH_FAILED)
    assert time.monotonic() - started >= 0.2


def test_pop3_third_auth_failure_closes(pop3, alice):
    client = pop3()
    for _ in range(2):
        assert client.command(f"AUTH PLAIN {plain(password='wrong')}") == pop3_wire(R.POP3_AUTH_FAILED)
    assert client.command(f"AUTH PLAIN {plain(password='wrong')}") == pop3_wire(R.POP3_TOO_MANY_FAILED_LOGINS)
    assert client.closed()


def test_pop3_bare_auth_lists_the_mechanisms(pop3):
    client = pop3()
    assert client.command("AUTH") == pop3_wire(R.POP3_MECHANISMS_FOLLOW)
    assert client.multiline() == [b"PLAIN\r\n", b".\r\n"]


def test_pop3_unknown_mechanism_is_refused(pop3):
    assert pop3().command("AUTH CRAM-MD5") == pop3_wire(R.POP3_UNSUPPORTED_MECHANISM)


def test_pop3_capa_lists_sasl_plain_and_auth_resp_code(pop3):
    lines = capa(pop3())
    assert lines == capa_lines()
    assert b"SASL PLAIN\r\n" in lines and b"AUTH-RESP-CODE\r\n" in lines


# --- passwords only over TLS or from a local network (RFC 8314 §4.1) -----------------------------


@pytest.fixture
def guarded(start_server, tls_files):
    """A server with a certificate where only 127.0.0.1 counts as local."""
    return start_server(auth=ONLY_LOOPBACK_ONE, tls=tls_files.settings())


def test_pop3_user_from_a_non_local_address_is_privacy_required(guarded, pop3_at, alice):
    reply = pop3_at(guarded, source=NOT_LOCAL).command("USER alice")
    assert reply == pop3_wire(R.POP3_PRIVACY_REQUIRED)
    assert reply.startswith(b"-ERR [AUTH] ")


def test_pop3_auth_plain_from_a_non_local_address_is_privacy_required(guarded, pop3_at, alice):
    client = pop3_at(guarded, source=NOT_LOCAL)
    assert client.command(f"AUTH PLAIN {plain()}") == pop3_wire(R.POP3_PRIVACY_REQUIRED)
    assert client.command("AUTH PLAIN") == pop3_wire(R.POP3_PRIVACY_REQUIRED)


def test_without_a_certificate_the_refusal_does_not_send_the_client_to_stls(start_server, pop3_at, alice):
    # It said "use STLS first", and STLS answered "not available".
    server = start_server(auth=ONLY_LOOPBACK_ONE)
    client = pop3_at(server, source=NOT_LOCAL)
    assert client.command("USER alice") == pop3_wire(R.POP3_PRIVACY_REQUIRED_NO_TLS)
    assert client.command(f"AUTH PLAIN {plain()}") == pop3_wire(R.POP3_PRIVACY_REQUIRED_NO_TLS)
    assert client.command("STLS") == pop3_wire(R.POP3_TLS_UNAVAILABLE)


def test_pop3_capa_from_a_non_local_address_lacks_user_and_sasl(guarded, pop3_at):
    assert capa(pop3_at(guarded, source=NOT_LOCAL)) == capa_lines(stls=True, user=False)


def test_pop3_bare_auth_from_a_non_local_address_lists_no_mechanism(guarded, pop3_at):
    # The same as CAPA, which has no SASL line there: PLAIN would be refused.
    client = pop3_at(guarded, source=NOT_LOCAL)
    assert client.command("AUTH") == pop3_wire(R.POP3_MECHANISMS_FOLLOW)
    assert client.multiline() == [b".\r\n"]


def test_pop3_after_stls_a_non_local_address_may_log_in(guarded, pop3_at, alice, tls_files):
    client = pop3_at(guarded, source=NOT_LOCAL)
    pop3_stls(client, tls_files.client_context())
    assert capa(client) == capa_lines()
    assert client.command("USER alice") == pop3_wire(R.POP3_USER_ACCEPTED)
    assert client.command(f"PASS {PASSWORD}").startswith(b"+OK alice's maildrop has ")


def test_pop3_auth_plain_after_stls_from_a_non_local_address(guarded, pop3_at, alice, tls_files):
    client = pop3_at(guarded, source=NOT_LOCAL)
    pop3_stls(client, tls_files.client_context())
    assert client.command(f"AUTH PLAIN {plain()}").startswith(b"+OK alice's maildrop has ")


def test_pop3_apop_works_without_tls_from_a_non_local_address(guarded, pop3_at, users, alice):
    client = pop3_at(guarded, source=NOT_LOCAL)
    greeting = client.greeting.decode()
    timestamp = greeting[greeting.index("<"):greeting.index(">") + 1]
    digest = hashlib.md5((timestamp + users.apop_secret("alice")).encode()).hexdigest()
    # RFC 1939 §7: APOP never sends the password, so it needs no TLS.
    assert client.command(f"APOP alice {digest}").startswith(b"+OK alice's maildrop has ")


def test_smtp_ehlo_from_a_non_local_address_lacks_auth(guarded, smtp_at):
    client = smtp_at(guarded, source=NOT_LOCAL, ehlo=False)
    assert exchange(client, f"EHLO {CLIENT_NAME}") == ehlo_wire(guarded, starttls=True, auth=False)


@pytest.mark.parametrize("command", [f"AUTH PLAIN {plain()}", "AUTH PLAIN", "AUTH LOGIN"])
def test_smtp_auth_from_a_non_local_address_is_538(guarded, smtp_at, alice, command):
    client = smtp_at(guarded, source=NOT_LOCAL)
    assert exchange(client, command) == wire(R.R538_ENCRYPTION_REQUIRED)
    assert wire(R.R538_ENCRYPTION_REQUIRED).startswith(b"538 5.7.11 encryption required")


def test_smtp_after_starttls_a_non_local_address_is_offered_auth_and_logs_in(guarded, smtp_at, alice,
                                                                             tls_files):
    client = smtp_at(guarded, source=NOT_LOCAL, ehlo=False)
    smtp_starttls(client, tls_files.client_context())
    assert exchange(client, f"EHLO {CLIENT_NAME}") == ehlo_wire(guarded)
    assert exchange(client, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)


def test_allow_plaintext_auth_lifts_the_refusal(start_server, smtp_at, pop3_at, alice):
    server = start_server(auth=ONLY_LOOPBACK_ONE, allow_plaintext_auth=True)
    smtp = smtp_at(server, source=NOT_LOCAL, ehlo=False)
    assert exchange(smtp, f"EHLO {CLIENT_NAME}") == ehlo_wire(server)
    assert exchange(smtp, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)
    pop3 = pop3_at(server, source=NOT_LOCAL)
    assert capa(pop3) == capa_lines()
    assert pop3.command("USER alice") == pop3_wire(R.POP3_USER_ACCEPTED)
    assert pop3.command(f"PASS {PASSWORD}").startswith(b"+OK alice's maildrop has ")


# --- no password in a trace ------------------------------------------------------------------------


def assert_no_secret(trace: str, *secrets: str) -> None:
    for secret in (PASSWORD, *secrets):
        assert secret not in trace


def test_smtp_trace_masks_auth_plain_in_both_forms(traced, smtp_at, alice):
    server, stream = traced(trace=True)
    client = smtp_at(server)
    assert exchange(client, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)
    second = smtp_at(server)
    assert exchange(second, "AUTH PLAIN") == b"334 \r\n"
    assert exchange(second, plain(password="wrong guess")) == wire(R.R535_AUTH_FAILED)
    server.stop()
    trace = stream.getvalue()
    assert "C: AUTH PLAIN ****" in trace
    assert "C: ****" in trace
    assert_no_secret(trace, plain(), plain(password="wrong guess"), "wrong guess")


def test_smtp_trace_masks_auth_login_user_and_password(traced, smtp_at, alice):
    server, stream = traced(trace=True)
    client = smtp_at(server)
    assert exchange(client, f"AUTH LOGIN {b64('alice')}").startswith(b"334 ")
    assert exchange(client, b64(PASSWORD)) == wire(R.R235_AUTHENTICATED)
    server.stop()
    trace = stream.getvalue()
    assert "C: AUTH LOGIN ****" in trace
    assert trace.count("C: ****") == 1
    assert_no_secret(trace, b64("alice"), b64(PASSWORD))


def test_pop3_trace_masks_auth_plain_in_both_forms(traced, pop3_at, alice):
    server, stream = traced(trace=True)
    client = pop3_at(server)
    assert client.command("AUTH PLAIN") == b"+ \r\n"
    assert client.command(plain(password="wrong guess")) == pop3_wire(R.POP3_AUTH_FAILED)
    assert client.command(f"AUTH PLAIN {plain()}").startswith(b"+OK ")
    server.stop()
    trace = stream.getvalue()
    assert "C: AUTH PLAIN ****" in trace
    assert "C: ****" in trace
    assert_no_secret(trace, plain(), plain(password="wrong guess"), "wrong guess")


def test_json_trace_and_transcripts_mask_auth_too(traced, smtp_at, root, alice):
    server, stream = traced(trace_format="json", transcripts=True)
    client = smtp_at(server)
    assert exchange(client, "AUTH PLAIN") == b"334 \r\n"
    assert exchange(client, plain()) == wire(R.R235_AUTHENTICATED)
    assert exchange(client, "QUIT").startswith(b"221 ")
    assert client.closed()
    server.stop()
    transcripts = "".join(path.read_text() for path in (root / ".pymailsrv" / "transcripts").rglob("*")
                          if path.is_file())
    assert "****" in stream.getvalue() and "****" in transcripts
    assert_no_secret(stream.getvalue() + transcripts, plain())


@pytest.mark.parametrize("separator, reply", [
    ("\t", R.R235_AUTHENTICATED), (" \t", R.R235_AUTHENTICATED), ("  ", R.R235_AUTHENTICATED),
    # Not ASCII white space: one word, no mechanism of that name, but the
    # credentials must not reach the trace all the same.
    ("\x1c", R.R504_UNKNOWN_MECHANISM), ("\u00a0", R.R504_UNKNOWN_MECHANISM), ("\u2003", R.R504_UNKNOWN_MECHANISM),
])
def test_trace_masks_a_credential_after_any_whitespace(traced, smtp_at, alice, separator, reply):
    server, stream = traced(trace=True)
    client = smtp_at(server)
    assert exchange(client, f"AUTH PLAIN{separator}{plain()}") == wire(reply)
    server.stop()
    assert "C: AUTH PLAIN ****" in stream.getvalue()
    assert_no_secret(stream.getvalue(), plain())
