"""The listeners: one ``ThreadingTCPServer`` per protocol, all in one process.

``MailServer`` owns everything a running server shares - the settings, the
user store, the Maildir store and the tracer, bundled as a ``ServerContext``
that every session receives - and one ``Listener`` per protocol. Each
listener accepts connections in its own thread and serves each connection in
a thread of its own (``socketserver.ThreadingMixIn``, daemon threads).

A connection that fails only ends itself: ``handle_error`` logs it and the
listener carries on. ``stop()`` stops accepting, then shuts down the sockets
of the connections still open, so their threads end promptly; a POP3 session
cut off like that changes nothing in its maildrop (RFC 1939 §6).

Port 0 means "pick a free port"; ``addresses`` tells which ports were bound,
and ``listening_line()`` is the one line ``pymailsrv start`` prints for them.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pymailsrv.aliases import AliasTable
from pymailsrv.auth import FailureThrottle
from pymailsrv.config import ConfigError, Settings
from pymailsrv.faults import FaultError, FaultPlan
from pymailsrv.limits import AUTH_FAILURE_WINDOW_SECONDS, AUTH_MAX_FAILURES_PER_ADDRESS
from pymailsrv.maildir import MaildirStore
from pymailsrv.outqueue import OutboundQueue, RetryPolicy
from pymailsrv.pop3 import Pop3Session
from pymailsrv.relay import Relay
from pymailsrv.session import Session
from pymailsrv.smtp import SmtpSession, SubmissionSession
from pymailsrv.tls import server_context
from pymailsrv.trace import TraceOptions, Tracer
from pymailsrv.transport import Connection, SessionHandler
from pymailsrv.users import UserStore

log = logging.getLogger("pymailsrv.server")

# How often a listener checks whether stop() was asked for. socketserver's
# default (0.5 s) makes every stop take half a second per listener.
LISTENER_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class ServerContext:
    """What every session of one server shares."""

    settings: Settings
    users: UserStore
    store: MaildirStore
    tracer: Tracer
    tls: ssl.SSLContext | None = None  # None: no certificate, no STARTTLS/STLS
    # The aliases file and the outbound queue (issue 5); None only in a
    # context built by hand for a test.
    aliases: AliasTable | None = None
    queue: OutboundQueue | None = None
    # Injected faults (faults.py); empty on a server run for real.
    faults: FaultPlan = field(default_factory=FaultPlan)
    # Failed logins per client address, shared by every session.
    throttle: FailureThrottle = field(default_factory=lambda: FailureThrottle(
        AUTH_MAX_FAILURES_PER_ADDRESS, AUTH_FAILURE_WINDOW_SECONDS))


class Listener(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops connections when 50 clients
    # arrive at once (seen in scripts/bench.py); the kernel caps it anyway.
    request_queue_size = socket.SOMAXCONN
    # stop() shuts the connections down itself; no need to join their threads.
    block_on_close = False

    def __init__(self, name: str, address: tuple[str, int], session_class: type[Session],
                 context: ServerContext, implicit_tls: bool = False) -> None:
        self.name = name
        self.session_class = session_class
        self.context = context
        # RFC 8314: on an implicit-TLS port the handshake comes before the greeting.
        self.implicit_tls = implicit_tls
        self._open: set[Connection] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, SessionHandler)

    def track(self, connection: Connection) -> None:
        with self._open_lock:
            self._open.add(connection)

    def untrack(self, connection: Connection) -> None:
        with self._open_lock:
            self._open.discard(connection)

    def close_connections(self) -> None:
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            connection.shutdown()

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        log.exception("%s connection from %s failed", self.name, client_address[0])


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context: the configured pair, else the generated one, else None."""
    cert, key = settings.tls.cert, settings.tls.key
    if (cert is None) != (key is None):
        raise ConfigError("tls.cert and tls.key must be given together")
    if cert is None:
        cert, key = default_certificate_paths(settings)
        if not (cert.is_file() and key.is_file()):
            return None
    try:
        return server_context(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load the TLS certificate {str(cert)!r}: {error}") from None


def fault_plan(settings: Settings) -> FaultPlan:
    try:
        return FaultPlan(settings.faults)
    except FaultError as error:
        raise ConfigError(str(error)) from None


def default_certificate_paths(settings: Settings) -> tuple[Path, Path]:
    """Where 'pymailsrv cert generate' writes, and 'start' looks when none is configured."""
    directory = settings.state_dir / "tls"
    return directory / "cert.pem", directory / "key.pem"


def trace_options(settings: Settings) -> TraceOptions:
    """How to trace, from the settings; asking for bodies, JSON or notes turns the trace on."""
    live = settings.trace or settings.trace_bodies or settings.annotate or settings.trace_format == "json"
    return TraceOptions(
        live=live,
        bodies=settings.trace_bodies,
        annotate=settings.annotate,
        json=settings.trace_format == "json",
        transcripts_dir=settings.state_dir / "transcripts" if settings.transcripts else None,
        transcripts_keep=settings.transcripts_keep,
    )


class MailServer:
    """All listeners of one data root. Use as a context manager, or start()/stop()."""

    def __init__(self, settings: Settings, tracer: Tracer | None = None) -> None:
        self.settings = settings
        users = UserStore(settings.state_dir)
        self.context = ServerContext(
            settings=settings,
            users=users,
            store=MaildirStore(settings.root),
            tracer=tracer or Tracer(trace_options(settings)),
            throttle=FailureThrottle(settings.auth.max_failures_per_address, settings.auth.failure_window),
            tls=tls_context(settings),
            aliases=AliasTable(settings.state_dir, users.names, settings.domains, settings.smtp.postmaster),
            queue=OutboundQueue(settings.state_dir, RetryPolicy.from_settings(settings.relay)),
            faults=fault_plan(settings),
        )
        self.listeners: list[Listener] = []
        self._threads: list[threading.Thread] = []
        # The delivery threads for the outbound queue (relay.py).
        self.relay = Relay(self.context)

    def _protocols(self) -> list[tuple[str, int, type[Session], bool]]:
        """(listener name, port, session class, implicit TLS) for every listener asked for."""
        pop3, smtp = self.settings.pop3, self.settings.smtp
        wanted = [("pop3", pop3.port, Pop3Session, False),
                  ("smtp", smtp.port, SmtpSession, False),
                  ("pop3s", pop3.pop3s_port, Pop3Session, True),
                  ("smtps", smtp.smtps_port, SmtpSession, True),
                  ("submission", smtp.submission_port, SubmissionSession, False)]
        chosen = [listener for listener in wanted if listener[1] is not None]
        for name, _, _, implicit_tls in chosen:
            if implicit_tls and self.context.tls is None:
                raise ConfigError(f"the {name} port needs a TLS certificate: give --tls-cert and "
                                  f"--tls-key, or run 'pymailsrv cert generate'")
        return chosen

    def start(self) -> "MailServer":
        # A listener that cannot run is a one-line config error, before any warning.
        protocols = self._protocols()
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        removed = self.context.store.remove_stale_files()
        if removed:
            log.info("removed %d stale files from tmp/ (older than 36 hours)", removed)
        self._check_postmaster()
        try:
            for name, port, session_class, implicit_tls in protocols:
                address = (self.settings.host, port)
                self.listeners.append(Listener(name, address, session_class, self.context, implicit_tls))
        except (OSError, ConfigError):
            self.stop()
            raise
        for listener in self.listeners:
            thread = threading.Thread(target=listener.serve_forever, args=(LISTENER_POLL_SECONDS,),
                                      name=f"{listener.name}-listener", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.relay.start()  # resumes whatever the queue holds from before
        return self

    def _check_postmaster(self) -> None:
        """RFC 5321 §4.5.1: postmaster mail must be deliverable; warn if it is not."""
        wanted = self.settings.smtp.postmaster
        names = self.context.users.names()
        if wanted and wanted not in names:
            log.warning("smtp.postmaster is %r, but there is no such user: postmaster mail will be "
                        "refused with 451 until that user exists", wanted)
        elif not wanted and not names:
            log.warning("there are no users yet: postmaster mail will be refused with 451 until "
                        "one is added (the first user receives it)")

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        return {listener.name: listener.server_address[:2] for listener in self.listeners}

    def listening_line(self) -> str:
        pairs = " ".join(f"{name}={host}:{port}" for name, (host, port) in self.addresses.items())
        return f"listening {pairs}"

    def stop(self) -> None:
        self.relay.stop()
        for listener, thread in zip(self.listeners, self._threads):
            listener.shutdown()
            thread.join()
        for listener in self.listeners:
            listener.server_close()
            listener.close_connections()
        self.listeners.clear()
        self._threads.clear()

    def __enter__(self) -> "MailServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
