"""Settings: defaults, the TOML file, and command-line flags, in that order.

A ``Settings`` value is frozen: it is made once at start-up and handed to
every session. It comes from three layers, the later winning:

1. the defaults below (most of them from ``limits.py``);
2. a TOML file: ``--config FILE``, else ``$PYMAILSRV_CONFIG``, else
   ``./pymailsrv.toml`` if it exists;
3. the command-line flags (``--root`` also reads ``$PYMAILSRV_ROOT``).

The file mirrors the dataclasses: top-level keys, then one table per
protocol. An unknown key or a value of the wrong kind is a ``ConfigError``
that names the key::

    root = "/var/mail/pymailsrv"
    domains = ["example.org"]
    [pop3]
    port = 110
    failed_login_delay = 2.0
    [smtp]
    port = 25
    bare_newline = "reject"
    [relay]
    trusted_networks = ["192.0.2.0/24"]
    smarthost = "mail.example.net:587"
    [limits]
    max_connections_per_address = 20
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pymailsrv import limits, schema
from pymailsrv.commands import is_decimal
from pymailsrv.paths import is_domain

DEFAULT_ROOT = Path("./mailboxes")
DEFAULT_CONFIG_FILE = Path("./pymailsrv.toml")
# A settings file is a few KB; one far larger is some other file given by mistake.
CONFIG_FILE_MAX_OCTETS = 1_000_000


class ConfigError(Exception):
    """A bad setting; the message names it."""


def _port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError("a port is 0-65535 (0 picks a free port)")


def _remote_port(value: int) -> None:
    # 0 picks a free port to listen on; there is none to connect to.
    if not 1 <= value <= 65535:
        raise ValueError("a port to connect to is 1-65535")


def _positive(value: float) -> None:
    if value <= 0:
        raise ValueError("must be greater than 0")


def check_seconds(value: float) -> None:
    """A timeout, delay or lifetime: 0 up to a year (ValueError if not)."""
    if not 0 <= value <= limits.LONGEST_WAIT_SECONDS:  # nan compares false
        raise ValueError(f"must be 0-{limits.LONGEST_WAIT_SECONDS} seconds")


def _positive_seconds(value: float) -> None:
    check_seconds(value)
    _positive(value)


def _some_domain(value: tuple[str, ...]) -> None:
    # The first is the one this server names itself by (postmaster@, a
    # student's address): a server for no domain could take no mail at all.
    if not value:
        raise ValueError("name at least one domain")
    for domain in value:
        _domain(domain)


def _domain(value: str) -> None:
    # A Domain or an address literal as RFC 5321 §4.1.2 writes them: what an
    # address may end in, and what EHLO and Received: name this server by.
    if not is_domain(value):
        raise ValueError(f"{value!r} is not a domain name")


def _user_name(value: str) -> None:
    from pymailsrv.users import UserError, check_user_name  # here: users.py starts a thread pool

    try:
        check_user_name(value)
    except UserError as error:
        raise ValueError(str(error)) from None


def _existing_file(value: Path) -> None:
    # Read only at the first delivery through the smarthost: a typo would
    # otherwise show as deferred mail, days later.
    if not value.is_file():
        raise ValueError(f"no file {str(value)!r}")


def _listen_address(value: str) -> None:
    # The socket API takes "" for every interface (INADDR_ANY): a host left
    # blank would open the server to the whole network. That is said outright.
    if not value.strip():
        raise ValueError("give an address to listen on (0.0.0.0 or :: for every interface)")
    try:  # what bind() will do with it: a name no IDNA codec takes raised there, past any check
        value.encode("idna")
    except UnicodeError:
        raise ValueError(f"{value!r} is no address or host name") from None


def _dns_server(value: str) -> None:
    # dnspython takes only an address for a name server (a name would need
    # a name server to look it up): "localhost:53" failed every MX lookup.
    host, _ = parse_host_port(value, 53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected an IP address and a port, got {value!r}") from None


def _one_to(cap: int) -> typing.Callable[[int], None]:
    """A check for a count from 1 up to ``cap``, the cap that stops a typo."""
    def check(value: int) -> None:
        if not 1 <= value <= cap:
            raise ValueError(f"must be 1-{cap}")
    return check


def _recipient_limit(value: int) -> None:
    if value < limits.SMTP_RECIPIENTS_RFC_MINIMUM:
        raise ValueError(f"RFC 5321 §4.5.3.1.8 requires at least {limits.SMTP_RECIPIENTS_RFC_MINIMUM}")


def _networks(value: tuple[str, ...]) -> None:
    for network in value:
        ipaddress.ip_network(network, strict=False)


def _checked(default: Any, check: typing.Callable[[Any], None] | None = None, **kwargs: Any) -> Any:
    return field(default=default, metadata={"check": check}, **kwargs)


@dataclass(frozen=True)
class Pop3Settings:
    port: int = _checked(1100, _port)
    failed_login_delay: float = _checked(limits.POP3_FAILED_LOGIN_DELAY_SECONDS, check_seconds)
    command_line_max: int = _checked(limits.POP3_COMMAND_LINE_MAX, _positive)
    autologout: float = _checked(float(limits.POP3_AUTOLOGOUT_SECONDS), _positive_seconds)
    # RFC 8314 implicit TLS (POP3S, usually 995); None: no such listener.
    pop3s_port: int | None = _checked(None, _port)


@dataclass(frozen=True)
class SmtpSettings:
    port: int = _checked(2525, _port)
    max_message_size: int = _checked(limits.SMTP_MESSAGE_SIZE_MAX, _positive)
    max_recipients: int = _checked(limits.SMTP_RECIPIENTS_MAX, _recipient_limit)
    bare_newline: Literal["normalize", "reject"] = "normalize"
    # The local user who gets postmaster@ mail; None: the first user.
    postmaster: str | None = _checked(None, _user_name)
    command_timeout: float = _checked(float(limits.SMTP_COMMAND_TIMEOUT_SECONDS), _positive_seconds)
    data_timeout: float = _checked(float(limits.SMTP_DATA_TIMEOUT_SECONDS), _positive_seconds)
    # RFC 8314 implicit TLS (SMTPS, usually 465) and RFC 6409 submission
    # (usually 587, AUTH required before MAIL); None: no such listener.
    smtps_port: int | None = _checked(None, _port)
    submission_port: int | None = _checked(None, _port)

    @property
    def postmaster_user(self) -> str | None:
        """The user ``postmaster`` names, as user names are kept: in lower case."""
        return self.postmaster.lower() if self.postmaster else None


def host_and_port(host: str, port: int) -> str:
    """``127.0.0.1:25``, ``[::1]:25``: an IPv6 host in brackets (RFC 3986 §3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """A server to connect to, "host:port", "host" or "[v6 address]:port", as (host, port);
    ValueError if malformed."""
    host, port = text, str(default_port)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [address]:port, got {text!r}")
        port = rest[1:] or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not is_decimal(port):
        raise ValueError(f"expected host:port, got {text!r}")
    _remote_port(int(port))
    return host, int(port)


def _ascii(value: str) -> None:
    if not value.isascii():  # the value is no part of the message: it may be a secret
        raise ValueError("must be ASCII (the relay's smtplib sends AUTH data as ASCII)")


def _host_port(value: str) -> None:
    parse_host_port(value, 25)


@dataclass(frozen=True)
class RelaySettings:
    # Client networks allowed to relay without authenticating; empty: nobody.
    trusted_networks: tuple[str, ...] = _checked((), _networks)
    # --- outbound delivery (outqueue.py, relay.py) ---
    # "host:port" that takes all outbound mail; None: each domain's MX hosts.
    smarthost: str | None = _checked(None, _host_port)
    # AUTH at the smarthost (RFC 4954), only ever after STARTTLS. ASCII:
    # smtplib, which the relay speaks through, sends AUTH data as ASCII.
    smarthost_user: str | None = _checked(None, _ascii)
    smarthost_password: str | None = _checked(None, _ascii)
    # "opportunistic": STARTTLS when offered, certificate unchecked (as for
    # MX hosts); "required": STARTTLS or no delivery; "verified": required,
    # and the certificate must match the name (CAs: smarthost_ca_file, else
    # the system's). Unset: see smarthost_tls_policy.
    smarthost_tls: Literal["opportunistic", "required", "verified"] | None = None
    smarthost_ca_file: Path | None = _checked(None, _existing_file)
    # The port of MX hosts (25 on the Internet; tests use a free port).
    port: int = _checked(25, _remote_port)
    # "address:port" of the DNS server for MX lookups; None: the system's.
    dns_server: str | None = _checked(None, _dns_server)
    workers: int = _checked(limits.RELAY_WORKERS, _one_to(limits.RELAY_WORKERS_MAX))
    # Retries (Postfix's minimal_backoff_time, maximal_backoff_time,
    # maximal_queue_lifetime), in seconds.
    min_backoff: float = _checked(float(limits.QUEUE_MIN_BACKOFF_SECONDS), _positive_seconds)
    max_backoff: float = _checked(float(limits.QUEUE_MAX_BACKOFF_SECONDS), _positive_seconds)
    max_queue_lifetime: float = _checked(float(limits.QUEUE_MAX_LIFETIME_SECONDS), check_seconds)
    queue_scan_interval: float = _checked(limits.QUEUE_SCAN_INTERVAL_SECONDS, _positive_seconds)
    timeout: float = _checked(float(limits.SMTP_CLIENT_TIMEOUT_SECONDS), _positive_seconds)
    max_hops: int = _checked(limits.SMTP_MAX_HOPS, _positive)

    @property
    def smarthost_tls_policy(self) -> str:
        """smarthost_tls, or where it is not set: "verified" when a password
        goes to the smarthost (over TLS whose certificate no one checked,
        whoever stands between could take it), else "opportunistic"."""
        if self.smarthost_tls is not None:
            return self.smarthost_tls
        return "verified" if self.smarthost_user else "opportunistic"


@dataclass(frozen=True)
class TlsSettings:
    # PEM files; with neither, 'start' uses ROOT/.pymailsrv/tls/ if
    # 'pymailsrv cert generate' made a pair there, and offers no TLS if not.
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class AuthSettings:
    # Clients that may send a password over an unencrypted connection (as
    # Dovecot allows localhost); others must use TLS first.
    local_networks: tuple[str, ...] = _checked(("127.0.0.0/8", "::1/128"), _networks)
    # Failed logins one connection may make before it is closed ...
    max_failures_per_connection: int = _checked(limits.AUTH_MAX_FAILURES_PER_CONNECTION, _positive)
    # ... and one client address within failure_window seconds before its
    # further attempts are refused unchecked (other addresses are not slowed).
    max_failures_per_address: int = _checked(limits.AUTH_MAX_FAILURES_PER_ADDRESS, _positive)
    failure_window: float = _checked(float(limits.AUTH_FAILURE_WINDOW_SECONDS), _positive_seconds)


@dataclass(frozen=True)
class LimitSettings:
    # Open connections, all listeners together, and per client address; over
    # either the listener refuses at once (421 / -ERR [SYS/TEMP]).
    max_connections: int = _checked(limits.MAX_CONNECTIONS, _one_to(limits.MAX_CONNECTIONS_CAP))
    max_connections_per_address: int = _checked(limits.MAX_CONNECTIONS_PER_ADDRESS, _positive)
    # Logged-in POP3 sessions of one user from one address (-ERR [IN-USE]).
    pop3_sessions_per_user_address: int = _checked(limits.POP3_MAX_SESSIONS_PER_USER_ADDRESS, _positive)


@dataclass(frozen=True)
class Settings:
    root: Path = DEFAULT_ROOT
    host: str = _checked("127.0.0.1", _listen_address)
    # The name this server gives itself in greetings and Received: headers.
    hostname: str = field(default_factory=socket.gethostname, metadata={"check": _domain})
    domains: tuple[str, ...] = _checked(("localhost",), _some_domain)
    # Teaching mode (trace.py): the live trace and how it looks ...
    trace: bool = False
    trace_bodies: bool = False
    trace_format: Literal["text", "json"] = "text"
    annotate: bool = False
    # ... and a saved transcript of every session, the newest N kept.
    transcripts: bool = False
    transcripts_keep: int = _checked(1000, _positive)
    # Let passwords cross unencrypted connections from anywhere (a lab on
    # its own network); off, only auth.local_networks may (RFC 8314 §4.1).
    allow_plaintext_auth: bool = False
    # Fault scripts for testing mail clients (faults.py); never on a real server.
    faults: tuple[str, ...] = ()
    pop3: Pop3Settings = field(default_factory=Pop3Settings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    # The account to become once the ports are bound ('start --run-as');
    # None: stay who we are.
    run_as: str | None = None
    # Worker processes that serve connections (workers.py); 1: this process.
    processes: int = _checked(1, _one_to(limits.MAX_PROCESSES))
    # Keep a worker serving two sessions or more on a CPU of its own
    # (placement.py says why); off: the kernel places every thread.
    pin_workers: bool = True
    limits: LimitSettings = field(default_factory=LimitSettings)  # last: the name shadows the module

    @property
    def state_dir(self) -> Path:
        from pymailsrv.users import STATE_DIR_NAME

        return self.root / STATE_DIR_NAME


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and key in merged and not isinstance(merged[key], dict):
            continue  # the file's "pop3 = 5" stays, for the check to refuse: a flag must not hide it
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_file(explicit: str | os.PathLike | None) -> Path | None:
    """Which TOML file applies: the flag, then $PYMAILSRV_CONFIG, then ./pymailsrv.toml."""
    if explicit:
        return Path(explicit)
    if os.environ.get("PYMAILSRV_CONFIG"):
        return Path(os.environ["PYMAILSRV_CONFIG"])
    try:
        return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None
    except OSError:  # a working directory we may not look into ('sudo -u' from root's home): no file there
        return None


def load_settings(config: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                  *, read_files: bool = True) -> Settings:
    """Settings from the defaults, the TOML file and ``overrides`` (flags; None values skipped).

    ``read_files=False`` ignores $PYMAILSRV_CONFIG and ./pymailsrv.toml: a
    server embedded in a test must not change with the directory it runs in.
    """
    values: dict[str, Any] = {}
    path = config_file(config) if read_files else None
    if path is not None:
        try:
            with open(path, "rb") as file:
                text = file.read(CONFIG_FILE_MAX_OCTETS + 1)  # /dev/zero would never end
            if len(text) > CONFIG_FILE_MAX_OCTETS:
                raise ConfigError(f"config file {str(path)!r} is over {CONFIG_FILE_MAX_OCTETS:,} octets: "
                                  f"is it the right file?")
            values = tomllib.loads(text.decode("utf-8"))
        except OSError as error:
            raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror}") from None
        except ValueError as error:
            # tomllib.TOMLDecodeError; UnicodeDecodeError, as TOML is UTF-8
            # (TOML 1.0); or an integer of over 4300 digits, which int() refuses.
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None
        except RecursionError:  # arrays or tables nested thousands deep
            raise ConfigError(f"config file {str(path)!r} is nested too deep") from None
    flags = _without_none(overrides or {})
    values = _merge(values, flags)
    try:
        return schema.build(Settings, values)
    except schema.SchemaError as error:
        # Where a file gave it, the file is named: it may be one found, not named.
        where = f" in {str(path)!r}" if path is not None and not _given_in(flags, error.key) else ""
        if error.problem == schema.UNKNOWN_FIELD:
            raise ConfigError(f"unknown setting {error.key!r}{where}") from None
        raise ConfigError(f"bad value for {error.key!r}{where}: {error.problem}") from None


def _given_in(values: dict[str, Any], key: str) -> bool:
    """Whether the dotted ``key`` ("smtp.port") has a value in ``values``."""
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return False
        values = values[part]
    return True


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    cleaned = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _without_none(value)
            if not value:
                continue
        if value is not None:
            cleaned[key] = value
    return cleaned
