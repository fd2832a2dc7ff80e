"""``pymailsrv cert generate``: a self-signed pair for a lab, which ``start`` then uses.

The pair goes to ``ROOT/.pymailsrv/tls/`` (the key readable by its owner
alone), an existing pair is kept unless ``--force`` says otherwise, and a
server started without ``--tls-cert`` offers STARTTLS/STLS with it. A client
that trusts the certificate file itself can then verify the server.
"""

from __future__ import annotations

import datetime
import logging
import poplib
import re
import smtplib
import ssl
import stat

import pytest
import trustme
from click.testing import CliRunner
from cryptography import x509

from pymailsrv import replies as R
from pymailsrv.cli import main
from pymailsrv.config import ConfigError
from pymailsrv.server import MailServer
from pymailsrv.tls import validity_problem
from tests.conftest import CLIENT_TIMEOUT, PASSWORD, listening_line, make_settings, start_process
from tests.test_implicit_tls import stop_process
from tests.test_pop3 import wire as pop3_wire
from tests.test_starttls import CLIENT_NAME



pytestmark = pytest.mark.usefixtures("clean_environment")


@pytest.fixture
def tls_dir(root):
    return root / ".pymailsrv" / "tls"


def generate(root, *args: str):
    return CliRunner().invoke(main, ["cert", "generate", "--root", str(root), *args])


def trusting(cert_path) -> ssl.SSLContext:
    """A client context whose only trust anchor is the self-signed certificate itself."""
    return ssl.create_default_context(cafile=str(cert_path))


def names_in(cert_path) -> set[str]:
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name) for name in alternative.get_values_for_type(x509.DNSName)} | {
        str(address) for address in alternative.get_values_for_type(x509.IPAddress)}


# --- cert generate ----------------------------------------------------------------------------


def test_generate_writes_cert_and_key_under_the_state_directory(root, tls_dir):
    result = generate(root, "--hostname", "mail.example.org")
    assert result.exit_code == 0, result.output
    cert, key = tls_dir / "cert.pem", tls_dir / "key.pem"
    assert result.output == f"wrote {cert} and {key} (self-signed for mail.example.org)\n"
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----\n")
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert names_in(cert) == {"mail.example.org", "localhost", "127.0.0.1"}
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)  # a matching pair


@pytest.mark.parametrize("hostname, names", [
    ("192.0.2.10", {"192.0.2.10", "localhost", "127.0.0.1"}),  # an IP SAN, which clients check for an address
    # As the hostname setting may write an address: it got the DNS SAN "[192.0.2.10]", which no client checks.
    ("[192.0.2.10]", {"192.0.2.10", "localhost", "127.0.0.1"}),
    ("[IPv6:2001:db8::1]", {"2001:db8::1", "localhost", "127.0.0.1"}),
    ("über.example", {"xn--ber-goa.example", "localhost", "127.0.0.1"}),  # the A-label
    ("a" * 40 + "." + "b" * 40 + ".example", {"a" * 40 + "." + "b" * 40 + ".example", "localhost", "127.0.0.1"}),
])
def test_generate_for_an_address_a_utf8_name_or_a_name_too_long_for_a_common_name(root, tls_dir, hostname, names):
    result = generate(root, "--hostname", hostname)
    assert result.exit_code == 0, result.output
    assert names_in(tls_dir / "cert.pem") == names


def test_generate_names_localhost_once(root, tls_dir):
    assert generate(root, "--hostname", "localhost").exit_code == 0
    certificate = x509.load_pem_x509_certificate((tls_dir / "cert.pem").read_bytes())
    alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(alternative.get_values_for_type(x509.DNSName)) == ["localhost"]


def test_generate_for_an_empty_hostname_is_a_one_line_error(root, tls_dir):
    # It was taken as "no --hostname": the machine's name, without a word.
    result = generate(root, "--hostname", "")
    assert result.exit_code == 1
    assert result.output == "Error: '' is neither a host name nor an address\n"
    assert not tls_dir.exists()


def test_generate_for_what_is_no_host_name_is_a_one_line_error(root, tls_dir):
    result = generate(root, "--hostname", "a" * 64 + ".example")  # a label over 63 octets
    assert result.exit_code == 1
    assert result.output == f"Error: {'a' * 64 + '.example'!r} is neither a host name nor an address\n"


def test_generate_names_the_servers_hostname_by_default(root, tls_dir):
    settings = make_settings(root)
    assert generate(root).exit_code == 0
    assert settings.hostname in names_in(tls_dir / "cert.pem")


def test_generate_refuses_to_overwrite_without_force(root, tls_dir):
    assert generate(root).exit_code == 0
    before = (tls_dir / "cert.pem").read_bytes(), (tls_dir / "key.pem").read_bytes()
    result = generate(root)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tls_dir / 'cert.pem'} already exists (use --force to replace it)\n"
    assert ((tls_dir / "cert.pem").read_bytes(), (tls_dir / "key.pem").read_bytes()) == before


def test_generate_refuses_to_overwrite_a_key_alone_without_force(root, tls_dir):
    # A key with no certificate beside it (one sent to a CA, say) was replaced.
    tls_dir.mkdir(parents=True)
    (tls_dir / "key.pem").write_bytes(b"the key a CA certified\n")
    result = generate(root)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tls_dir / 'key.pem'} already exists (use --force to replace it)\n"
    assert (tls_dir / "key.pem").read_bytes() == b"the key a CA certified\n"


def test_generate_with_force_replaces_the_pair_and_keeps_the_key_private(root, tls_dir):
    assert generate(root).exit_code == 0
    old_cert = (tls_dir / "cert.pem").read_bytes()
    (tls_dir / "key.pem").chmod(0o644)
    assert generate(root, "--force").exit_code == 0
    assert (tls_dir / "cert.pem").read_bytes() != old_cert
    assert stat.S_IMODE((tls_dir / "key.pem").stat().st_mode) == 0o600


def test_a_pair_that_cannot_be_written_whole_leaves_the_old_pair(root, tls_dir):
    # The key is written first; were it renamed into place before the
    # certificate is written, a failure here would leave a key that matches
    # no certificate, and 'start' would refuse TLS.
    assert generate(root).exit_code == 0
    before = (tls_dir / "cert.pem").read_bytes(), (tls_dir / "key.pem").read_bytes()
    (tls_dir / "cert.pem.tmp").mkdir()  # what the certificate's temporary file cannot be
    result = generate(root, "--force")
    assert result.exit_code == 1
    assert result.stderr == f"Error: cannot use {tls_dir / 'cert.pem.tmp'}: Is a directory\n"
    assert ((tls_dir / "cert.pem").read_bytes(), (tls_dir / "key.pem").read_bytes()) == before
    assert not (tls_dir / "key.pem.tmp").exists()


# --- start uses the generated pair -------------------------------------------------------------


def test_without_a_generated_pair_there_is_no_starttls(root, start_server):
    server = start_server()
    with smtplib.SMTP(*server.addresses["smtp"], local_hostname=CLIENT_NAME, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo()
        assert not client.has_extn("starttls")


def test_server_without_tls_cert_uses_the_generated_pair(root, tls_dir, start_server, add_user):
    add_user("alice")
    assert generate(root).exit_code == 0
    server = start_server()
    context = trusting(tls_dir / "cert.pem")
    with smtplib.SMTP(*server.addresses["smtp"], local_hostname=CLIENT_NAME, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert client.starttls(context=context) == (220, b"2.0.0 ready to start TLS")
        client.ehlo()
        assert not client.has_extn("starttls")
    pop3 = poplib.POP3(*server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
    try:
        assert pop3.stls(context=context) == pop3_wire(R.POP3_BEGIN_TLS).rstrip()
        pop3.user("alice")
        assert pop3.pass_(PASSWORD).startswith(b"+OK alice's maildrop has 0 messages")
    finally:
        pop3.close()


def test_tls_cert_without_tls_key_is_a_config_error(root, tls_dir):
    assert generate(root).exit_code == 0
    with pytest.raises(ConfigError, match="^tls.cert and tls.key must be given together$"):
        MailServer(make_settings(root, tls={"cert": str(tls_dir / "cert.pem")}))


def test_unreadable_certificate_is_a_config_error_naming_it_and_its_key(root, tmp_path):
    # The key alone may be at fault (root's 0600 key, a server not started as root).
    bogus, key = tmp_path / "bogus.pem", tmp_path / "key.pem"
    bogus.write_text("not a certificate\n")
    key.write_text("not a key\n")
    with pytest.raises(ConfigError, match=(f"^cannot load the TLS certificate '{re.escape(str(bogus))}' "
                                           f"with its key '{re.escape(str(key))}': ")):
        MailServer(make_settings(root, tls={"cert": str(bogus), "key": str(key)}))


def test_a_key_with_a_passphrase_is_a_config_error_not_a_prompt(root, tls_dir):
    # OpenSSL asked for the passphrase on the terminal: the server sat at that prompt.
    from cryptography.hazmat.primitives import serialization

    assert generate(root).exit_code == 0
    key_path = tls_dir / "key.pem"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError) as refusal:
        MailServer(make_settings(root))
    # The sentence itself, not the repr of an exception's arguments.
    assert str(refusal.value).endswith(f"with its key {str(key_path)!r}: the key is encrypted, and a server "
                                       "cannot ask for its passphrase: give the key unencrypted "
                                       "(openssl pkey -in KEY -out NEWKEY)")


@pytest.mark.parametrize("kept", ["cert.pem", "key.pem"])
def test_a_generated_pair_half_there_is_a_config_error_not_tls_switched_off(root, tls_dir, kept):
    # Without a word, every login from outside auth.local_networks would be refused.
    assert generate(root).exit_code == 0
    lost = {"cert.pem": "key.pem", "key.pem": "cert.pem"}[kept]
    (tls_dir / lost).unlink()
    with pytest.raises(ConfigError, match=rf"^the generated TLS pair is half there: '{re.escape(str(tls_dir / kept))}' "
                                          r"without its partner; run 'pymailsrv cert generate --force'"):
        MailServer(make_settings(root))


def test_a_certificate_out_of_date_is_served_with_a_warning(root, tmp_path, caplog):
    # Clients that check it refuse it: the admin should hear of it at start.
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = trustme.CA().issue_cert("localhost", not_before=now - datetime.timedelta(days=30),
                                   not_after=now - datetime.timedelta(days=1))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    with caplog.at_level(logging.WARNING, logger="pymailsrv.server"):
        MailServer(make_settings(root, tls={"cert": str(cert), "key": str(key)}))
    expired = f"{now - datetime.timedelta(days=1):%Y-%m-%d}"
    assert any(record.getMessage().startswith(f"the TLS certificate {str(cert)!r} expired on {expired} ")
               and record.getMessage().endswith("UTC: clients that check it will refuse it")
               for record in caplog.records)


def test_a_certificate_is_out_of_date_before_and_after_its_validity(root, tls_dir):
    assert generate(root).exit_code == 0
    cert = tls_dir / "cert.pem"
    now = datetime.datetime.now(datetime.timezone.utc)
    assert validity_problem(cert) is None
    assert validity_problem(cert, now - datetime.timedelta(days=1)).startswith("is not valid before ")
    assert validity_problem(cert, now + datetime.timedelta(days=366)).startswith("expired on ")


def test_start_as_a_process_offers_starttls_with_the_generated_pair(root, tls_dir):
    assert generate(root).exit_code == 0
    process = start_process(root)
    try:
        line = listening_line(process)
        host, port = re.search(rb" smtp=([\d.]+):(\d+)", line).groups()
        with smtplib.SMTP(host.decode(), int(port), local_hostname=CLIENT_NAME, timeout=CLIENT_TIMEOUT) as client:
            client.starttls(context=trusting(tls_dir / "cert.pem"))
            assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
            assert client.noop() == (250, b"2.0.0 OK")
    finally:
        stop_process(process)
