"""STARTTLS (RFC 3207) and STLS (RFC 2595): the upgrade, the reset, the injection hole.

A server started with a certificate offers the upgrade in EHLO/CAPA until
the handshake is done, and never after. The handshake wipes the session:
a new EHLO is needed, a USER given in plaintext is forgotten. And any
plaintext the client pipelined after STARTTLS/STLS is thrown away, never run
inside the protected session (CVE-2011-0411 and its POP3 twin): the tests
send the command and an injected one in a single write, then show that the
injected one left no trace.

The certificate comes from ``trustme``: a throwaway CA, and a server
certificate for ``localhost`` and ``127.0.0.1`` that the clients trust
through that CA. The TLS helpers here are shared with the other TLS and
AUTH test files.
"""

from __future__ import annotations

import base64
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from pymailsrv import replies as R
from pymailsrv.pop3 import SESSION_CAPABILITIES
from tests.conftest import CLIENT_TIMEOUT, PASSWORD, RawClient, wait_for_open
from tests.test_pop3 import wire as pop3_wire
from tests.test_smtp import exchange, read_reply, wire

CLIENT_NAME = "client.example"


# --- helpers shared by the TLS and AUTH tests ---------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A CA the clients trust, and a server certificate it issued."""

    ca: trustme.CA
    cert: Path  # the server's key and certificate chain, PEM
    key: Path
    ca_file: Path  # the CA certificate, for curl --cacert

    def settings(self) -> dict[str, str]:
        """The ``tls`` table for start_server."""
        return {"cert": str(self.cert), "key": str(self.key)}

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TlsFiles:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_file = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    cert.write_bytes(issued.private_key_and_cert_chain_pem.bytes())
    key.write_bytes(issued.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    return TlsFiles(ca, cert, key, ca_file)


class TlsClient(RawClient):
    """A RawClient that may connect from another loopback address and upgrade to TLS."""

    def __init__(self, address: tuple[str, int], source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(address, timeout=CLIENT_TIMEOUT, source_address=(source, 0))
        self.file = self.sock.makefile("rb")

    def start_tls(self, context: ssl.SSLContext) -> None:
        """The client side of the handshake, over the same TCP connection."""
        self.file.close()
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.file = self.sock.makefile("rb")


@pytest.fixture
def client():
    """client(address, source="127.0.0.1") -> a TlsClient; all are closed at teardown."""
    clients: list[TlsClient] = []

    def connect(address: tuple[str, int], source: str = "127.0.0.1") -> TlsClient:
        connected = TlsClient(address, source)
        clients.append(connected)
        return connected

    yield connect
    for connected in clients:
        connected.close()


def ehlo_wire(server, client_name: str = CLIENT_NAME, starttls: bool = False, auth: bool = True) -> bytes:
    """The EHLO reply the server owes: STARTTLS and AUTH only where they are offered."""
    lines = [f"{server.settings.hostname} greets {client_name}", "PIPELINING",
             f"SIZE {server.settings.smtp.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
    lines += ["STARTTLS"] * starttls + ["AUTH PLAIN LOGIN"] * auth + ["HELP"]
    return wire(R.R250_EHLO, lines="\n".join(lines))


def capa_lines(stls: bool = False, user: bool = True) -> list[bytes]:
    """The CAPA listing the server owes, in command-table order, then the session ones."""
    lines = ["STLS"] * stls + ["USER"] * user + ["SASL PLAIN"] * user + ["TOP", "UIDL", *SESSION_CAPABILITIES]
    return [line.encode() + b"\r\n" for line in lines] + [b".\r\n"]


def capa(client: RawClient) -> list[bytes]:
    assert client.command("CAPA") == pop3_wire(R.POP3_CAPABILITIES_FOLLOW)
    return client.multiline()


def plain(user: str = "alice", password: str = PASSWORD) -> str:
    """A SASL PLAIN response (RFC 4616 §2): empty authzid, user, password."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def smtp_starttls(client: TlsClient, context: ssl.SSLContext) -> None:
    """EHLO, STARTTLS and the handshake on a RawClient that has read the greeting."""
    assert exchange(client, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    assert exchange(client, "STARTTLS") == wire(R.R220_READY_FOR_TLS)
    client.start_tls(context)


def pop3_stls(client: TlsClient, context: ssl.SSLContext) -> None:
    assert client.command("STLS") == pop3_wire(R.POP3_BEGIN_TLS)
    client.start_tls(context)


def stored_messages(store, user: str) -> list[bytes]:
    return [path.read_bytes() for _, path in store.messages(user)]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def tls_server(start_server, tls_files):
    return start_server(tls=tls_files.settings())


@pytest.fixture
def context(tls_files) -> ssl.SSLContext:
    return tls_files.client_context()


@pytest.fixture
def smtp_client(client, tls_server):
    """smtp_client(source="127.0.0.1") -> a TlsClient on the SMTP port that has read the greeting."""

    def connect(source: str = "127.0.0.1") -> TlsClient:
        connected = client(tls_server.addresses["smtp"], source)
        assert read_reply(connected) == wire(R.R220_GREETING, host=tls_server.settings.hostname)
        return connected

    return connect


@pytest.fixture
def pop3_client(client, tls_server):
    """pop3_client(source="127.0.0.1") -> a TlsClient on the POP3 port that has read the greeting."""

    def connect(source: str = "127.0.0.1") -> TlsClient:
        connected = client(tls_server.addresses["pop3"], source)
        assert connected.line().startswith(b"+OK pymailsrv POP3 server ready")
        return connected

    return connect


# --- SMTP STARTTLS: offered, refused, and the reset (RFC 3207 §4) -----------------------------


def test_ehlo_offers_starttls_only_with_a_certificate(tls_server, start_server, smtp_client, raw, tmp_path):
    assert exchange(smtp_client(), f"EHLO {CLIENT_NAME}") == ehlo_wire(tls_server, starttls=True)
    plain_server = start_server(root=tmp_path / "plain")  # one data root takes one server
    plain_client = raw(plain_server.addresses["smtp"])
    read_reply(plain_client)
    assert exchange(plain_client, f"EHLO {CLIENT_NAME}") == ehlo_wire(plain_server)


def test_ehlo_after_starttls_no_longer_offers_starttls(tls_server, smtp_client, context):
    client = smtp_client()
    smtp_starttls(client, context)
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert exchange(client, f"EHLO {CLIENT_NAME}") == ehlo_wire(tls_server)


def test_a_stopping_server_says_421_inside_tls(tls_server, smtp_client, context):
    # The stop shuts the socket's reading half under TLS, not the TLS layer
    # itself: the 421 still goes out encrypted.
    client = smtp_client()
    smtp_starttls(client, context)
    tls_server.stop()
    assert read_reply(client) == wire(R.R421_SHUTTING_DOWN, host=tls_server.settings.hostname)


def test_help_lists_starttls_only_while_ehlo_offers_it(smtp_client, context):
    client = smtp_client()
    assert b"STARTTLS" in exchange(client, "HELP")
    smtp_starttls(client, context)
    reply = exchange(client, "HELP")
    assert reply.startswith(b"214-") and b"STARTTLS" not in reply
    assert exchange(client, "HELP starttls").startswith(b"214 ")  # asked by name, its syntax all the same


def test_starttls_twice_is_503(smtp_client, context):
    client = smtp_client()
    smtp_starttls(client, context)
    assert exchange(client, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    assert exchange(client, "STARTTLS") == wire(R.R503_ALREADY_TLS)
    assert exchange(client, "NOOP") == wire(R.R250_OK)  # still in TLS, still talking


def test_starttls_without_a_certificate_is_502(server, raw):
    client = raw(server.addresses["smtp"])
    read_reply(client)
    assert exchange(client, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    assert exchange(client, "STARTTLS") == wire(R.R502_NOT_IMPLEMENTED, verb="STARTTLS")


def test_starttls_with_an_argument_is_a_syntax_error(smtp_client):
    client = smtp_client()
    assert exchange(client, "STARTTLS now") == wire(R.R501_SYNTAX, syntax="STARTTLS")


def test_starttls_inside_a_transaction_is_503(smtp_client, alice):
    client = smtp_client()
    assert exchange(client, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    assert exchange(client, "MAIL FROM:<bob@example.org>") == wire(R.R250_SENDER_OK, address="bob@example.org")
    assert exchange(client, "STARTTLS") == wire(R.R503_WRONG_STATE, verb="STARTTLS", state="MAIL")


def test_after_starttls_mail_needs_a_new_ehlo(smtp_client, context):
    client = smtp_client()
    smtp_starttls(client, context)
    assert exchange(client, "MAIL FROM:<bob@example.org>") == wire(R.R503_WRONG_STATE, verb="MAIL",
                                                                   state="CONNECTED")


def test_smtplib_starttls_then_sendmail_delivers(tls_server, context, alice, store):
    with smtplib.SMTP(*tls_server.addresses["smtp"], local_hostname=CLIENT_NAME, timeout=CLIENT_TIMEOUT) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        assert smtp.starttls(context=context) == (220, b"2.0.0 ready to start TLS")
        smtp.ehlo()
        assert not smtp.has_extn("starttls")
        assert smtp.sendmail("bob@example.org", ["alice@localhost"], b"Subject: hi\r\n\r\nsecret\r\n") == {}
    (message,) = stored_messages(store, "alice")
    assert b" with ESMTPS id " in message
    assert message.endswith(b"\n\nsecret\n")


def test_idle_client_after_starttls_gets_421_over_tls(start_server, tls_files, client, context):
    # Long beside each step before the idle wait (EHLO, STARTTLS, the handshake), stalls and all.
    server = start_server(tls=tls_files.settings(), smtp={"command_timeout": 1.0})
    connected = client(server.addresses["smtp"])
    read_reply(connected)
    smtp_starttls(connected, context)
    assert read_reply(connected) == wire(R.R421_TIMEOUT, host=server.settings.hostname)
    assert connected.closed()


# --- POP3 STLS: offered, refused, and the reset (RFC 2595 §4) ---------------------------------


def test_capa_offers_stls_only_with_a_certificate(pop3_client, start_server, raw, tmp_path):
    assert capa(pop3_client()) == capa_lines(stls=True)
    plain_server = start_server(root=tmp_path / "plain")  # one data root takes one server
    plain_client = raw(plain_server.addresses["pop3"])
    plain_client.line()
    assert capa(plain_client) == capa_lines()


def test_capa_after_stls_no_longer_offers_stls(pop3_client, context):
    client = pop3_client()
    pop3_stls(client, context)
    assert capa(client) == capa_lines()


def test_stls_twice_is_refused_as_tls_active(pop3_client, context):
    client = pop3_client()
    pop3_stls(client, context)
    assert client.command("STLS") == pop3_wire(R.POP3_ALREADY_TLS)


def test_stls_without_a_certificate_is_refused(server, raw):
    client = raw(server.addresses["pop3"])
    client.line()
    assert client.command("STLS") == pop3_wire(R.POP3_TLS_UNAVAILABLE)


def test_stls_in_the_transaction_state_is_a_wrong_state_error(pop3_client, alice):
    client = pop3_client()
    assert client.command("USER alice") == pop3_wire(R.POP3_USER_ACCEPTED)
    assert client.command(f"PASS {PASSWORD}").startswith(b"+OK alice's maildrop has ")
    assert client.command("STLS") == pop3_wire(R.POP3_WRONG_STATE, verb="STLS", state="TRANSACTION")


def test_user_given_before_stls_is_forgotten(pop3_client, context, alice):
    client = pop3_client()
    assert client.command("USER alice") == pop3_wire(R.POP3_USER_ACCEPTED)
    pop3_stls(client, context)
    assert client.command(f"PASS {PASSWORD}") == pop3_wire(R.POP3_USER_FIRST)


def test_poplib_stls_then_user_and_pass_log_in(tls_server, context, alice, store):
    store.deliver("alice", b"Subject: hi\n\nhello\n")
    client = poplib.POP3(*tls_server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
    try:
        assert client.stls(context=context) == pop3_wire(R.POP3_BEGIN_TLS).rstrip()
        assert b"STLS" not in b"".join(name.encode() for name in client.capa())
        client.user("alice")
        assert client.pass_(PASSWORD).startswith(b"+OK alice's maildrop has 1 message")
        assert client.retr(1)[1][-1] == b"hello"
        client.quit()
    finally:
        client.close()


# --- the injection hole (CVE-2011-0411): plaintext pipelined after the command ------------


def test_smtp_command_pipelined_after_starttls_is_discarded(tls_server, smtp_client, context):
    client = smtp_client()
    assert exchange(client, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    client.send(b"STARTTLS\r\nRSET\r\n")  # one write: the RSET is a man in the middle's
    assert read_reply(client) == wire(R.R220_READY_FOR_TLS)
    client.start_tls(context)
    # Had RSET run, its 250 would come before NOOP's, and QUIT would read that one.
    assert exchange(client, "NOOP") == wire(R.R250_OK)
    assert exchange(client, "QUIT") == wire(R.R221_BYE, host=tls_server.settings.hostname)


def test_the_trace_says_that_plaintext_after_starttls_was_thrown_away(traced, tls_files, client, context):
    # Else the trace, which promises every line on the wire, showed nothing
    # of the injection. Only a count: the lines may carry a password.
    server, stream = traced(trace=True, tls=tls_files.settings())
    connected = client(server.addresses["smtp"])
    read_reply(connected)
    assert exchange(connected, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    connected.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\n")
    assert read_reply(connected) == wire(R.R220_READY_FOR_TLS)
    connected.start_tls(context)
    assert exchange(connected, "QUIT") == wire(R.R221_BYE, host=server.settings.hostname)
    wait_for_open(server, 0)
    assert ("-- 2 lines (36 octets) sent with it, before TLS: thrown away, never run "
            "(RFC 3207 §4.2, RFC 2595 §4)") in stream.getvalue()
    assert "evil" not in stream.getvalue()


def test_smtp_ehlo_injected_after_starttls_does_not_greet_the_tls_session(smtp_client, context):
    client = smtp_client()
    assert exchange(client, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    client.send(b"STARTTLS\r\nEHLO attacker.example\r\n")
    assert read_reply(client) == wire(R.R220_READY_FOR_TLS)
    client.start_tls(context)
    # An injected EHLO would have let MAIL through; the session is still CONNECTED.
    assert exchange(client, "MAIL FROM:<bob@example.org>") == wire(R.R503_WRONG_STATE, verb="MAIL",
                                                                   state="CONNECTED")


def test_pop3_command_pipelined_after_stls_is_discarded(pop3_client, context):
    client = pop3_client()
    client.send(b"STLS\r\nCAPA\r\n")
    assert client.line() == pop3_wire(R.POP3_BEGIN_TLS)
    client.start_tls(context)
    # Had CAPA run, its listing would be the first thing read now.
    assert client.command("QUIT") == pop3_wire(R.POP3_SIGNING_OFF)
    assert client.closed()


def test_pop3_user_injected_after_stls_is_not_remembered(pop3_client, context, alice):
    client = pop3_client()
    client.send(b"STLS\r\nUSER alice\r\n")
    assert client.line() == pop3_wire(R.POP3_BEGIN_TLS)
    client.start_tls(context)
    assert client.command(f"PASS {PASSWORD}") == pop3_wire(R.POP3_USER_FIRST)


# --- Received: the "with" protocol (RFC 3848) ---------------------------------------------------


def test_received_header_says_esmtps_after_starttls_without_auth(smtp_client, context, alice, store):
    client = smtp_client()
    smtp_starttls(client, context)
    deliver(client)
    (message,) = stored_messages(store, "alice")
    assert b" with ESMTPS id " in message


def test_received_header_says_esmtpsa_after_starttls_and_auth(smtp_client, context, alice, store):
    client = smtp_client()
    smtp_starttls(client, context)
    assert exchange(client, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    assert exchange(client, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)
    deliver(client, greet=False, sender="alice@localhost")  # logged in: as herself
    (message,) = stored_messages(store, "alice")
    assert b" with ESMTPSA id " in message


def test_received_header_says_esmtpa_after_auth_on_loopback_without_tls(smtp_client, alice, store):
    client = smtp_client()
    assert exchange(client, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    assert exchange(client, f"AUTH PLAIN {plain()}") == wire(R.R235_AUTHENTICATED)
    deliver(client, greet=False, sender="alice@localhost")
    (message,) = stored_messages(store, "alice")
    assert b" with ESMTPA id " in message


def deliver(client: RawClient, greet: bool = True, sender: str = "bob@example.org") -> None:
    """One message from ``sender`` to alice@localhost."""
    if greet:
        assert exchange(client, f"EHLO {CLIENT_NAME}").startswith(b"250-")
    assert exchange(client, f"MAIL FROM:<{sender}>").startswith(b"250 ")
    assert exchange(client, "RCPT TO:<alice@localhost>").startswith(b"250 ")
    assert exchange(client, "DATA") == wire(R.R354_START_DATA)
    assert exchange(client, b"Subject: hi\r\n\r\nhello\r\n.").startswith(b"250 2.0.0 OK ")


# --- curl, a client we did not write -------------------------------------------------------------

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def curl(tls_files: TlsFiles, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-s", "-S", "--ssl-reqd", "--cacert", str(tls_files.ca_file),
                           "--max-time", str(CLIENT_TIMEOUT), *args],
                          capture_output=True, timeout=CLIENT_TIMEOUT + 5)


@needs_curl
def test_curl_ssl_reqd_lists_pop3_messages_over_stls(tls_server, tls_files, alice, store):
    store.deliver("alice", b"Subject: one\n\n1\n")
    store.deliver("alice", b"Subject: two\n\n2\n")
    host, port = tls_server.addresses["pop3"]
    result = curl(tls_files, "-u", f"alice:{PASSWORD}", f"pop3://{host}:{port}/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [b"1 19", b"2 19"]  # 16 octets, 3 lines: CRLF adds 3


@needs_curl
def test_curl_ssl_reqd_delivers_over_starttls(tls_server, tls_files, alice, store, tmp_path):
    message = tmp_path / "message.eml"
    message.write_bytes(b"From: bob@example.org\r\nSubject: by curl\r\n\r\nhello\r\n")
    host, port = tls_server.addresses["smtp"]
    result = curl(tls_files, f"smtp://{host}:{port}", "--mail-from", "bob@example.org",
                  "--mail-rcpt", "alice@localhost", "-T", str(message))
    assert result.returncode == 0, result.stderr
    (stored,) = stored_messages(store, "alice")
    assert b" with ESMTPS id " in stored
    assert stored.endswith(b"Subject: by curl\n\nhello\n")
