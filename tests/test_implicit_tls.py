"""Implicit TLS (RFC 8314): the smtps and pop3s listeners.

On these ports the TLS handshake comes first and the greeting only after it
(RFC 8314 §3.3). A handshake that fails - plain text sent to the port, or a
client that offers nothing newer than TLS 1.1 (RFC 8996 retired 1.0 and
1.1) - ends that one connection; the listener goes on serving. The ports
are off by default, and one asked for without a certificate is a one-line
configuration error.
"""

from __future__ import annotations

import poplib
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import warnings

import pytest

from pymailsrv import replies as R
from pymailsrv.config import ConfigError
from pymailsrv.server import MailServer
from tests.conftest import (CLIENT_TIMEOUT, PASSWORD, START_TIMEOUT, listening_line, make_settings, start_process,
                            wait_until)
from tests.test_pop3 import wire as pop3_wire
from tests.test_smtp import wire
from tests.test_starttls import (  # noqa: F401  (tls_files is a fixture)
    CLIENT_NAME,
    capa_lines,
    ehlo_wire,
    stored_messages,
    tls_files,
)

# Long enough for a server that would greet at once to have done so.
SILENCE_SECONDS = 0.3
MAX_READS = 100  # reads of a connection the server is about to close


@pytest.fixture
def implicit(start_server, tls_files):
    """A server with smtps and pop3s listeners on free ports."""
    return start_server(tls=tls_files.settings(), pop3={"pop3s_port": 0}, smtp={"smtps_port": 0})


@pytest.fixture
def context(tls_files) -> ssl.SSLContext:
    return tls_files.client_context()


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    for _ in range(MAX_READS):
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server kept sending: {received[:200]!r}")


def tls11_only_context(tls_files) -> ssl.SSLContext:
    """A client that offers TLS 1.1 and nothing newer (allowed on our side, for the test)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls_files.ca.configure_trust(context)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is deprecated: that is the point
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # else OpenSSL refuses 1.1 before sending anything
    return context


# --- the listening line and the configuration ----------------------------------------------


def test_implicit_tls_listeners_are_off_by_default(tls_files, start_server):
    assert set(start_server(tls=tls_files.settings()).addresses) == {"pop3", "smtp"}


def test_listening_line_names_the_implicit_tls_ports(implicit):
    line = implicit.listening_line()
    smtps_host, smtps_port = implicit.addresses["smtps"]
    pop3s_host, pop3s_port = implicit.addresses["pop3s"]
    assert f" smtps={smtps_host}:{smtps_port}" in line and f" pop3s={pop3s_host}:{pop3s_port}" in line
    assert re.fullmatch(r"listening pop3=127\.0\.0\.1:\d+ smtp=127\.0\.0\.1:\d+ pop3s=127\.0\.0\.1:\d+ "
                        r"smtps=127\.0\.0\.1:\d+", line), line


@pytest.mark.parametrize("listener", ["smtps", "pop3s"])
def test_implicit_tls_port_without_a_certificate_is_a_config_error(root, listener):
    table = {"smtps": ("smtp", "smtps_port"), "pop3s": ("pop3", "pop3s_port")}[listener]
    settings = make_settings(root, **{table[0]: {table[1]: 0}})
    with pytest.raises(ConfigError, match=f"^the {listener} port needs a TLS certificate: give --tls-cert"):
        MailServer(settings).start()


def run_start(root, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pymailsrv", "start", "--root", str(root), "--pop3-port", "0",
                           "--smtp-port", "0", *args], capture_output=True, timeout=timeout)


def test_start_with_smtps_port_but_no_certificate_is_exit_1_with_one_line(root):
    result = run_start(root, "--smtps-port", "0")
    assert result.returncode == 1
    assert result.stderr == (b"Error: the smtps port needs a TLS certificate: give --tls-cert and --tls-key, "
                             b"or run 'pymailsrv cert generate'\n")


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    process.communicate(timeout=START_TIMEOUT)


def test_start_with_a_certificate_lists_every_listener(root, tls_files):
    process = start_process(root, "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key),
                            "--smtps-port", "0", "--pop3s-port", "0", "--submission-port", "0")
    try:
        line = listening_line(process)
        assert re.fullmatch(rb"listening pop3=127\.0\.0\.1:\d+ smtp=127\.0\.0\.1:\d+ pop3s=127\.0\.0\.1:\d+ "
                            rb"smtps=127\.0\.0\.1:\d+ submission=127\.0\.0\.1:\d+\n", line), line
        port = int(re.search(rb"smtps=[\d.]+:(\d+)", line).group(1))
        with smtplib.SMTP_SSL("127.0.0.1", port, context=tls_files.client_context(),
                              timeout=CLIENT_TIMEOUT) as smtps:
            assert smtps.noop()[0] == 250
    finally:
        stop_process(process)


# --- the handshake comes first (RFC 8314 §3.3) ----------------------------------------------


@pytest.mark.parametrize("listener", ["smtps", "pop3s"])
def test_greeting_comes_only_after_the_handshake(implicit, context, listener):
    with socket.create_connection(implicit.addresses[listener], timeout=CLIENT_TIMEOUT) as sock:
        sock.settimeout(SILENCE_SECONDS)
        with pytest.raises(TimeoutError):
            sock.recv(4096)  # the server waits for our ClientHello, saying nothing
        sock.settimeout(CLIENT_TIMEOUT)
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            greeting = tls.makefile("rb").readline()
    if listener == "smtps":
        assert greeting == wire(R.R220_GREETING, host=implicit.settings.hostname)
    else:
        assert greeting.startswith(b"+OK pymailsrv POP3 server ready")


def test_smtps_delivers_with_auth_and_records_esmtpsa(implicit, context, alice, store):
    with smtplib.SMTP_SSL(*implicit.addresses["smtps"], local_hostname=CLIENT_NAME, context=context,
                          timeout=CLIENT_TIMEOUT) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        client.login("alice", PASSWORD)
        assert client.sendmail("alice@localhost", ["alice@localhost"], b"Subject: hi\r\n\r\nhello\r\n") == {}
    (message,) = stored_messages(store, "alice")
    assert b" with ESMTPSA id " in message


def test_smtps_ehlo_lacks_starttls_and_starttls_is_503(implicit, context):
    with socket.create_connection(implicit.addresses["smtps"], timeout=CLIENT_TIMEOUT) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            reader = tls.makefile("rb")
            assert reader.readline().startswith(b"220 ")
            tls.sendall(f"EHLO {CLIENT_NAME}\r\nSTARTTLS\r\n".encode())
            replies = b"".join(reader.readline() for _ in range(ehlo_wire(implicit).count(b"\r\n") + 1))
    assert replies == ehlo_wire(implicit) + wire(R.R503_ALREADY_TLS)


def test_pop3s_logs_in_and_capa_lacks_stls(implicit, context, alice, store):
    store.deliver("alice", b"Subject: hi\n\nhello\n")
    client = poplib.POP3_SSL(*implicit.addresses["pop3s"], context=context, timeout=CLIENT_TIMEOUT)
    try:
        assert [line.encode() for line in client.capa()] == [
            line.rstrip(b"\r\n").split(b" ")[0] for line in capa_lines()[:-1]]
        with pytest.raises(poplib.error_proto) as refused:
            client._shortcmd("STLS")  # poplib's own stls() would refuse before asking
        assert refused.value.args[0] == pop3_wire(R.POP3_ALREADY_TLS).rstrip()
        client.user("alice")
        assert client.pass_(PASSWORD).startswith(b"+OK alice's maildrop has 1 message")
        assert client.retr(1)[1][-1] == b"hello"
        client.quit()
    finally:
        client.close()


@pytest.mark.parametrize("listener, quit_reply", [("smtps", b"221 "), ("pop3s", b"+OK ")])
def test_quit_ends_tls_with_close_notify_not_a_cut_stream(implicit, context, listener, quit_reply):
    # RFC 8446 §6.1: close_notify before closing. Without it a client that
    # takes a stream cut short for an attack (suppress_ragged_eofs=False,
    # OpenSSL 3's s_client) saw the end of every clean QUIT as an error.
    with socket.create_connection(implicit.addresses[listener], timeout=CLIENT_TIMEOUT) as sock:
        with context.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False) as tls:
            replies = tls.makefile("rb")
            replies.readline()  # the greeting
            tls.sendall(b"QUIT\r\n")
            assert replies.readline().startswith(quit_reply)
            assert tls.recv(4096) == b""  # raised SSLEOFError, "unexpected eof while reading"


# --- a failed handshake ends that connection only -------------------------------------------


@pytest.mark.parametrize("listener", ["smtps", "pop3s"])
def test_plain_text_to_an_implicit_tls_port_ends_only_that_connection(implicit, context, listener):
    with socket.create_connection(implicit.addresses[listener], timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"EHLO client.example\r\n" if listener == "smtps" else b"CAPA\r\n")
        received = read_to_close(sock)
    assert b"220" not in received and b"+OK" not in received  # never greeted in plain text
    assert_listener_still_serves(implicit, context, listener)


@pytest.mark.parametrize("listener", ["smtps", "pop3s"])
def test_client_offering_only_tls_1_1_is_refused_and_the_listener_serves_on(implicit, context, tls_files,
                                                                            listener):
    with socket.create_connection(implicit.addresses[listener], timeout=CLIENT_TIMEOUT) as sock:
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL"):
            tls11_only_context(tls_files).wrap_socket(sock, server_hostname="localhost")
    assert_listener_still_serves(implicit, context, listener)


@pytest.mark.parametrize("listener", ["smtps", "pop3s"])
def test_stop_ends_a_handshake_the_client_never_begins(implicit, listener):
    # The handshake runs on the TLS socket that holds the descriptor, so
    # stop() can shut it: it used to wait out the whole timeout (5-10 min).
    with socket.create_connection(implicit.addresses[listener], timeout=CLIENT_TIMEOUT) as sock:
        wait_until(lambda: any(listener._open for listener in implicit.listeners),
                   what="the server has the connection")
        started = time.monotonic()
        implicit.stop()
        assert time.monotonic() - started < 1.0
        assert read_to_close(sock) == b""


def test_client_that_connects_and_leaves_before_the_handshake_harms_nobody(implicit, context):
    socket.create_connection(implicit.addresses["smtps"], timeout=CLIENT_TIMEOUT).close()
    assert_listener_still_serves(implicit, context, "smtps")


def assert_listener_still_serves(server: MailServer, context: ssl.SSLContext, listener: str) -> None:
    if listener == "smtps":
        with smtplib.SMTP_SSL(*server.addresses["smtps"], local_hostname=CLIENT_NAME, context=context,
                              timeout=CLIENT_TIMEOUT) as client:
            assert client.noop() == (250, b"2.0.0 OK")
    else:
        client = poplib.POP3_SSL(*server.addresses["pop3s"], context=context, timeout=CLIENT_TIMEOUT)
        try:
            assert client.quit() == pop3_wire(R.POP3_SIGNING_OFF).rstrip()
        finally:
            client.close()


def test_tls_1_2_is_the_minimum_the_server_accepts(implicit, tls_files):
    context = tls_files.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(implicit.addresses["pop3s"], timeout=CLIENT_TIMEOUT) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.2"
            assert tls.makefile("rb").readline().startswith(b"+OK ")
