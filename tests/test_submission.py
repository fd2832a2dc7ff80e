"""Message submission (RFC 6409) and who may relay.

The submission listener is SMTP with two rules more: AUTH before MAIL
(530 5.7.0, RFC 6409 §4.3 / RFC 4954 §6), and a logged-in user sends only
as themselves (550 5.7.1, RFC 6409 §6.1). Relaying - mail for a domain
that is not ours - is for logged-in clients only, on any listener; until
the outbound queue exists they get a temporary 451 4.4.0. A client that has
not logged in can never relay (550 5.7.1).
"""

from __future__ import annotations

import smtplib

import pytest

from pymailsrv import replies as R
from tests.conftest import CLIENT_TIMEOUT, PASSWORD
from tests.test_smtp import exchange, read_reply, wire
from tests.test_starttls import (  # noqa: F401  (fixtures)
    CLIENT_NAME,
    TlsClient,
    client,
    ehlo_wire,
    plain,
    smtp_starttls,
    stored_messages,
    tls_files,
)


@pytest.fixture
def submission_server(start_server, tls_files):
    return start_server(tls=tls_files.settings(), smtp={"submission_port": 0, "smtps_port": 0},
                        domains=["localhost", "example.net"])


@pytest.fixture
def connect(client, submission_server, tls_files):
    """connect(listener="submission", source="127.0.0.1") -> a TlsClient after the greeting and EHLO."""

    def connect(listener: str = "submission", source: str = "127.0.0.1") -> TlsClient:
        connected = client(submission_server.addresses[listener], source)
        if listener == "smtps":
            connected.start_tls(tls_files.client_context())
        assert read_reply(connected) == wire(R.R220_GREETING, host=submission_server.settings.hostname)
        assert exchange(connected, f"EHLO {CLIENT_NAME}").startswith(b"250-")
        return connected

    return connect


@pytest.fixture
def logged_in(connect, alice):
    """logged_in(listener="submission") -> a TlsClient where alice has authenticated."""

    def logged_in(listener: str = "submission") -> TlsClient:
        connected = connect(listener)
        assert exchange(connected, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)
        return connected

    return logged_in


# --- the submission listener (RFC 6409) ----------------------------------------------------


def test_submission_listener_is_off_by_default(server):
    assert "submission" not in server.addresses


def test_submission_listening_line_names_the_port(submission_server):
    host, port = submission_server.addresses["submission"]
    assert f" submission={host}:{port}" in submission_server.listening_line()


def test_submission_ehlo_offers_starttls_and_auth(submission_server, client):
    connected = client(submission_server.addresses["submission"])
    read_reply(connected)
    assert exchange(connected, f"EHLO {CLIENT_NAME}") == ehlo_wire(submission_server, starttls=True)


@pytest.mark.parametrize("listener", ["submission", "smtps"])  # RFC 8314 §3.3: 465 is submission
def test_mail_before_auth_is_530(connect, alice, listener):
    assert exchange(connect(listener), "MAIL FROM:<alice@localhost>") == wire(R.R530_AUTH_REQUIRED)
    assert wire(R.R530_AUTH_REQUIRED) == b"530 5.7.0 authentication required\r\n"


@pytest.mark.parametrize("listener", ["submission", "smtps"])
@pytest.mark.parametrize("sender", ["bob@localhost", "alice@example.org", "alice.smith@localhost"])
def test_mail_from_an_address_not_owned_is_550(logged_in, bob, sender, listener):
    reply = exchange(logged_in(listener), f"MAIL FROM:<{sender}>")
    assert reply == wire(R.R550_SENDER_NOT_OWNED, address=sender, user="alice")
    assert reply.startswith(b"550 5.7.1 ")


# On port 25 a login may be another MTA's (pymailsrv's relay logs in to its
# smarthost): it relays other domains' senders, but sends as none of our users.
@pytest.mark.parametrize("sender, allowed", [("bob@localhost", False), ("alice.smith@localhost", False),
                                             ("alice@localhost", True), ("someone@example.org", True)])
def test_a_login_on_port_25_sends_as_no_other_user_of_ours(logged_in, bob, sender, allowed):
    reply = exchange(logged_in("smtp"), f"MAIL FROM:<{sender}>")
    assert reply == (wire(R.R250_SENDER_OK, address=sender) if allowed
                     else wire(R.R550_SENDER_NOT_OWNED, address=sender, user="alice"))


@pytest.mark.parametrize("listener", ["submission", "smtps", "smtp"])
def test_a_logged_in_user_may_send_a_notification_from_the_null_path(logged_in, listener):
    # RFC 5321 §4.5.5: a read receipt (MDN) goes from <>, which names nobody.
    assert exchange(logged_in(listener), "MAIL FROM:<>") == wire(R.R250_SENDER_OK, address="")


@pytest.mark.parametrize("sender", ["alice@localhost", "ALICE@LocalHost", "alice@example.net",
                                    '"alice"@localhost'])
def test_mail_from_the_users_own_address_in_any_local_domain_is_250(logged_in, sender):
    assert exchange(logged_in(), f"MAIL FROM:<{sender}>").startswith(b"250 2.1.0 ")


@pytest.mark.parametrize("aliases, sender", [
    ("alice: alice@home.example.org\n", "alice@localhost"),  # she forwards all her mail: still her name
    ("staff: alice, bob\n", "staff@localhost"),  # an alias that delivers to her
])
def test_a_user_sends_as_their_own_name_though_forwarded_and_as_an_alias_for_them(logged_in, bob, root, aliases,
                                                                                    sender):
    (root / ".pymailsrv" / "aliases").write_text(aliases)
    assert exchange(logged_in(), f"MAIL FROM:<{sender}>") == wire(R.R250_SENDER_OK, address=sender)


def test_a_look_alike_of_a_users_name_is_not_theirs_to_send_as(connect, add_user):
    # KELVIN SIGN lower-cases to "k": "\u212aate" is no spelling of kate's name
    # (users.py refuses it), so no address of hers.
    add_user("kate")
    connected = connect("submission")
    assert exchange(connected, f"AUTH PLAIN {plain('kate')}") == wire(R.R235_AUTHENTICATED)
    sender = "\u212aate@localhost"
    assert exchange(connected, f"MAIL FROM:<{sender}> SMTPUTF8") == wire(R.R550_SENDER_NOT_OWNED, address=sender,
                                                                          user="kate")


def test_own_address_delivers_to_a_local_user_with_esmtpa(logged_in, bob, store):
    connected = logged_in()
    assert exchange(connected, "MAIL FROM:<alice@localhost>") == wire(R.R250_SENDER_OK, address="alice@localhost")
    assert exchange(connected, "RCPT TO:<bob@localhost>") == wire(R.R250_RECIPIENT_OK, address="bob@localhost")
    assert exchange(connected, "DATA") == wire(R.R354_START_DATA)
    assert exchange(connected, b"Subject: hi\r\n\r\nfrom alice\r\n.").startswith(b"250 2.0.0 OK ")
    (message,) = stored_messages(store, "bob")
    assert message.startswith(b"Return-Path: <alice@localhost>\n")
    assert b" with ESMTPA id " in message
    assert message.endswith(b"\n\nfrom alice\n")


def test_smtplib_submits_after_starttls_and_login(submission_server, tls_files, alice, bob, store):
    with smtplib.SMTP(*submission_server.addresses["submission"], local_hostname=CLIENT_NAME,
                      timeout=CLIENT_TIMEOUT) as smtp:
        smtp.starttls(context=tls_files.client_context())
        smtp.login("alice", PASSWORD)
        assert smtp.sendmail("alice@localhost", ["bob@localhost"], b"Subject: hi\r\n\r\nhello\r\n") == {}
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("bob@localhost", ["alice@localhost"], b"Subject: forged\r\n\r\nx\r\n")
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            550, b"5.7.1 <bob@localhost>: sender address not owned by user alice")
    (message,) = stored_messages(store, "bob")
    assert b" with ESMTPSA id " in message


def test_after_starttls_the_login_is_gone_too(submission_server, client, alice, tls_files):
    connected = client(submission_server.addresses["submission"])
    read_reply(connected)
    assert exchange(connected, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    assert exchange(connected, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)
    assert exchange(connected, "STARTTLS") == wire(R.R220_READY_FOR_TLS)
    connected.start_tls(tls_files.client_context())
    assert exchange(connected, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    assert exchange(connected, "MAIL FROM:<alice@localhost>") == wire(R.R530_AUTH_REQUIRED)


def test_non_local_client_must_use_starttls_before_auth(start_server, client, tls_files, alice):
    server = start_server(tls=tls_files.settings(), smtp={"submission_port": 0},
                          auth={"local_networks": ["127.0.0.1/32"]})
    connected = client(server.addresses["submission"], "127.0.0.2")
    read_reply(connected)
    assert exchange(connected, f"EHLO {CLIENT_NAME}") == ehlo_wire(server, starttls=True, auth=False)
    assert exchange(connected, f"AUTH PLAIN {plain()}") == wire(R.R538_ENCRYPTION_REQUIRED)
    assert exchange(connected, "MAIL FROM:<alice@localhost>") == wire(R.R530_AUTH_REQUIRED)
    smtp_starttls(connected, tls_files.client_context())
    assert exchange(connected, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    assert exchange(connected, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)
    assert exchange(connected, "MAIL FROM:<alice@localhost>").startswith(b"250 ")


# --- relaying: only after AUTH ---------------------------------------------------------------


@pytest.mark.parametrize("listener", ["smtp", "submission", "smtps"])
def test_authenticated_client_may_send_to_another_domain(logged_in, listener):
    connected = logged_in(listener)
    assert exchange(connected, "MAIL FROM:<alice@localhost>").startswith(b"250 ")
    assert exchange(connected, "RCPT TO:<carol@example.org>") == wire(R.R250_RECIPIENT_OK,
                                                                       address="carol@example.org")


def test_unauthenticated_client_may_never_relay(connect):
    connected = connect("smtp")
    assert exchange(connected, "MAIL FROM:<alice@localhost>").startswith(b"250 ")
    reply = exchange(connected, "RCPT TO:<carol@example.org>")
    assert reply == wire(R.R550_RELAY_DENIED, address="carol@example.org")
    assert reply.startswith(b"550 5.7.1 ")


def test_failed_auth_does_not_open_the_relay(connect, alice):
    connected = connect("smtp")
    assert exchange(connected, f"AUTH PLAIN {plain(password='wrong')}") == wire(R.R535_AUTH_FAILED)
    assert exchange(connected, "MAIL FROM:<alice@localhost>").startswith(b"250 ")
    assert exchange(connected, "RCPT TO:<carol@example.org>") == wire(R.R550_RELAY_DENIED,
                                                                       address="carol@example.org")
