"""TLS contexts, and a self-signed certificate for a classroom or a first start.

Only the standard library's ``ssl`` speaks TLS here. The server context
requires TLS 1.2 or newer and keeps the library's default ciphers: the
protocol's cryptography is OpenSSL's choice, not ours.

``self_signed_pair`` makes a certificate and key with the ``cryptography``
package (no hand-made ASN.1; a P-256 key signed with SHA-256), and
``write_pair`` writes them: good for a lab or for trying STARTTLS with
``curl --insecure``, not for mail from strangers, who will not trust it.
``validity_problem`` reads a certificate's dates with the same package, so
that a start can warn of one out of date.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from pymailsrv.durable import write_all_atomically
from pymailsrv.paths import canonical_domain, is_domain, literal_address

# A self-signed certificate is a lab tool; a year is long enough for a course.
SELF_SIGNED_VALIDITY_DAYS = 365
# RFC 5280 Appendix A (ub-common-name): the longest common name a certificate may hold.
COMMON_NAME_MAX = 64


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context: TLS 1.2 minimum (RFC 8996 retired 1.0 and 1.1)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A key with a passphrase: OpenSSL would ask for it on the terminal, and
    # the server sat at that prompt rather than start.
    context.load_cert_chain(certfile=cert, keyfile=key, password=_no_passphrase)
    # A stopping server shuts the reading half under TLS, and then says its
    # 421 inside TLS (Connection.stop_reading). OpenSSL 3 takes that EOF
    # without close_notify for an error and refuses to write any more; this
    # option makes it a plain end. Safe here: SMTP and POP3 mark their own
    # ends (the "." after DATA, QUIT), so a cut stream is never taken for a
    # whole one. OpenSSL 1.1.1 has no such option, nor the error.
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return context


class KeyEncrypted(ValueError):
    """The key has a passphrase, which a server cannot ask for."""


def _no_passphrase() -> bytes:
    raise KeyEncrypted("the key is encrypted, and a server cannot ask for its passphrase: "
                       "give the key unencrypted (openssl pkey -in KEY -out NEWKEY)")


def validity_problem(cert: Path, now: datetime.datetime | None = None) -> str | None:
    """"expired on ..." or "is not valid before ...", for the first certificate
    in ``cert``; None while it is valid, or where it cannot be read as PEM
    (``ssl`` has taken it, and says what is wrong with it)."""
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if now > certificate.not_valid_after_utc:
        return f"expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if now < certificate.not_valid_before_utc:
        return f"is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return None


def self_signed_pair(hostname: str) -> tuple[bytes, bytes]:
    """A self-signed certificate for ``hostname`` (a name or an address) and
    its key, as PEM: (certificate, key). ValueError if ``hostname`` can be neither.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    # A lab server reached by its address (as the hostname setting may write
    # it: "[192.0.2.1]"): clients check an iPAddress SAN (RFC 5280 §4.2.1.6;
    # RFC 6125 §1.7.2 leaves IP addresses out of scope).
    try:
        hostname_entry: x509.GeneralName = x509.IPAddress(literal_address(hostname)
                                                          or ipaddress.ip_address(hostname))
    except ValueError:
        hostname_entry = x509.DNSName(_a_label(hostname))
    key = ec.generate_private_key(ec.SECP256R1())
    # RFC 5280 Appendix A: a common name is at most 64 characters. Clients go by
    # the SAN anyway (RFC 6125 §6.4.4), so a longer name goes without one.
    common_name = hostname if len(hostname) <= COMMON_NAME_MAX else "pymailsrv self-signed"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    loopback = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    alternative_names = [hostname_entry, *(entry for entry in loopback if entry != hostname_entry)]
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def write_pair(cert_path: Path, key_path: Path, pair: tuple[bytes, bytes]) -> None:
    """Write self_signed_pair's certificate and key (the key mode 0600)."""
    certificate, key = pair
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    # Both written before either replaces an old one: a disk that refuses
    # the second must not leave a new key beside the old certificate.
    write_all_atomically([(key_path, key, 0o600), (cert_path, certificate, 0o644)])


def _a_label(hostname: str) -> str:
    """``hostname`` as DNS and certificates write it: a UTF-8 name in its A-label (xn--) form."""
    if not is_domain(hostname):
        raise ValueError(f"{hostname!r} is neither a host name nor an address")
    return canonical_domain(hostname)


def client_context(verify: bool, ca_file: Path | None = None) -> ssl.SSLContext:
    """A client-side context for the relay's STARTTLS (RFC 3207).

    Opportunistic TLS to an MX host (RFC 7435) does not check the
    certificate: without DANE or MTA-STS nothing ties the MX host's name to
    the recipient's domain, so MTAs accept any certificate and still gain
    encryption against a passive listener. A smarthost is a host we chose by
    name, so its certificate can be checked, and is when ``verify`` (against
    ``ca_file``, else the system's CAs).
    """
    if verify:
        return ssl.create_default_context(cafile=ca_file)
    # Nothing is checked, so no CA is loaded: the system's bundle costs some
    # 30 ms to read, at every server's start.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
