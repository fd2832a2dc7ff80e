"""The listeners: one ``ThreadingTCPServer`` per protocol.

``MailServer`` owns everything a running server shares - the settings, the
user store, the Maildir store and the tracer, bundled as a ``ServerContext``
that every session receives - and one ``Listener`` per protocol. Each
listener accepts connections in its own thread and serves each connection in
a thread of its own (``socketserver.ThreadingMixIn``, daemon threads).

A connection that fails only ends itself: ``handle_error`` logs it and the
listener carries on.

Port 0 means "pick a free port"; ``addresses`` tells which ports were bound,
and ``listening_line()`` is the one line ``pymailsrv start`` prints for them.

``start()`` is ``bind()`` then ``serve()``, in this order:

1. ``bind()``: raise the open-files limit for ``max_connections``; check
   the listeners and the ``run_as`` account; bind every port; load what
   ``run_as`` may not be able to read (dnspython); become ``run_as``; check
   the data root and take its lock (one server a root);
   sweep stale files from the Maildirs' tmp/; check that postmaster has
   someone to go to.
2. ``pymailsrv start --processes N`` forks N worker processes here
   (workers.py), each of which then serves the sockets bound above.
3. ``serve()``: a thread per listener accepts; the relay starts (in one
   process only), and sweeps the queue's stale files first.

``stop()`` runs the other way: stop accepting; stop reading new commands
(each session finishes the one in hand, STOP_DRAIN_SECONDS at most); stop
the relay meanwhile; shut the sockets still open; give up the data root's
lock. A POP3 session cut off like that changes nothing in its maildrop
(RFC 1939 §6).

Two guards stand before any session starts:

* Connection caps (``ConnectionLimits``): one count of open connections for
  the whole server and one per client address, shared by every listener
  and every worker process, since the threads and sockets a client holds
  are the server's whatever the port. Over a cap the *accepting* thread
  writes the refusal itself (``421 4.7.0`` / ``-ERR [SYS/TEMP]``) and
  closes: a flood of refused connections starts no thread. A connection
  counts until its thread ends.
* Privileges: started as root to bind ports 25/110/465/587/995, the server
  becomes the ``run_as`` user once every listener is bound and before it
  touches a mailbox, then checks that user can write the data root.
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import ipaddress
import logging
import os
import pwd
import resource
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

from pymailsrv.aliases import ALIASES_FILE_NAME, AliasTable
from pymailsrv.auth import FailureThrottle
from pymailsrv.config import ConfigError, Settings, host_and_port
from pymailsrv.durable import UnusableFile, make_private_directory
from pymailsrv.faults import FaultError, FaultPlan
from pymailsrv.limits import (
    ACCEPT_DEFER_PAUSE_SECONDS,
    ACCEPT_DEFER_SECONDS,
    ACCEPT_DEFER_STEP_SECONDS,
    AUTH_FAILURE_WINDOW_SECONDS,
    AUTH_MAX_FAILURES_PER_ADDRESS,
    FILES_BESIDES_CONNECTIONS,
    FILES_PER_CONNECTION,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    OUT_OF_DESCRIPTORS_PAUSE_SECONDS,
    POP3_AUTOLOGOUT_SECONDS,
    POP3_MAX_SESSIONS_PER_USER_ADDRESS,
    SHORTAGE_WARNING_SECONDS,
    SMTP_COMMAND_TIMEOUT_SECONDS,
)
from pymailsrv.maildir import MaildirStore
from pymailsrv.outqueue import QUEUE_DIR_NAME, OutboundQueue, RetryPolicy
from pymailsrv.paths import unmapped
from pymailsrv.placement import Placement
from pymailsrv.pop3 import Pop3Session
from pymailsrv.relay import MxResolver, Relay
from pymailsrv.replies import counted
from pymailsrv.session import Session
from pymailsrv.shared import FREE, SharedCounter, SharedRecords, client_key
from pymailsrv.smtp import SmtpSession, SubmissionSession
from pymailsrv.tls import KeyEncrypted, server_context, validity_problem
from pymailsrv.trace import TraceOptions, Tracer
from pymailsrv.transport import Connection, SessionHandler
from pymailsrv.users import UserStore

log = logging.getLogger("pymailsrv.server")

# How often a listener checks whether stop() was asked for. socketserver's
# default (0.5 s) makes every stop take half a second per listener.
LISTENER_POLL_SECONDS = 0.05
# How long a stopping server lets its sessions finish the command in hand (a
# message being committed, a RETR being sent) before it cuts them. The relay
# stops meanwhile (relay.STOP_WAIT_SECONDS); both must be done within
# workers.WORKER_STOP_SECONDS, after which a worker process is killed.
STOP_DRAIN_SECONDS = 3.0
# In the state directory: held by the server that serves the data root.
SERVER_LOCK_FILE_NAME = "server.lock"


class Tally:
    """How many of something are open per key, each key capped at ``limit``.

    Thread-safe; keys whose count falls to 0 are forgotten, so the table is
    never bigger than what is open now.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def take(self, key: Hashable) -> bool:
        """Count one more for ``key``, unless that would pass the limit."""
        with self._lock:
            count = self._counts.get(key, 0)
            if count >= self.limit:
                return False
            self._counts[key] = count + 1
            return True

    def give_back(self, key: Hashable) -> None:
        with self._lock:
            count = self._counts.pop(key) - 1
            if count:
                self._counts[key] = count

    def __getitem__(self, key: Hashable) -> int:
        with self._lock:
            return self._counts.get(key, 0)


class ConnectionLimits:
    """Open connections: at most ``total`` in all, ``per_address`` from one client
    (an address, or an IPv6 /48: ``shared.client_key``).

    Kept in memory that worker processes forked after it share (shared.py),
    so the caps hold for the whole server however many processes serve it.
    The table has one record per connection the server may have open: the
    client's key (``FREE``: an unused record) and the pid of the process
    serving it, so the records of a worker that died can be freed
    (``release_all_of``).
    """

    _RECORD = struct.Struct("=Qq")  # client_key, pid

    def __init__(self, total: int, per_address: int) -> None:
        self.per_address = per_address
        self._table = SharedRecords(self._RECORD, total)

    def admit(self, address: str) -> bool:
        key = client_key(address)  # an IPv6 client by its /48, as the throttle counts it
        with self._table.locked():
            keys = [held for held, _ in self._table.read_all()]
            if keys.count(key) >= self.per_address or FREE not in keys:
                return False
            self._table.write(keys.index(FREE), key, os.getpid())
            return True

    def release(self, address: str) -> None:
        mine = (client_key(address), os.getpid())
        with self._table.locked():
            self._table.write(self._table.read_all().index(mine), FREE, 0)

    def release_all_of(self, pid: int) -> int:
        """Free the records of a worker process that ended; how many it held."""
        with self._table.locked():
            indexes = [index for index, (_, owner) in enumerate(self._table.read_all()) if owner == pid]
            for index in indexes:
                self._table.write(index, FREE, 0)
            return len(indexes)

    @property
    def open(self) -> int:
        with self._table.locked():
            return sum(key != FREE for key, _ in self._table.read_all())

    def serves_more_than_another(self, workers: int) -> bool:
        """Has this process more connections open than one of the ``workers``
        processes serving them? (One that has none holds no record here.)"""
        with self._table.locked():
            owners = Counter(owner for key, owner in self._table.read_all() if key != FREE)
        mine = owners.pop(os.getpid(), 0)
        fewest = min(owners.values()) if len(owners) >= workers - 1 else 0
        return mine > fewest


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
    # Numbers for the sessions, unique across the worker processes.
    session_numbers: SharedCounter = field(default_factory=SharedCounter)
    # Open connections, shared by every listener (see ConnectionLimits).
    connections: ConnectionLimits = field(default_factory=lambda: ConnectionLimits(
        MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS))
    # Logged-in POP3 sessions per (user, client address), Dovecot's
    # mail_max_userip_connections. The maildrop lock (RFC 1939 §4) already
    # lets only one session per user in, so with the default cap of 10 the
    # lock answers first; the cap is what still holds where the lock would
    # not (a lower setting, or a store whose lock allows readers side by side).
    pop3_sessions: Tally = field(default_factory=lambda: Tally(POP3_MAX_SESSIONS_PER_USER_ADDRESS))
    # Which CPUs this process's threads may run on; each worker process has its own.
    placement: Placement = field(default_factory=Placement)


def address_family_of(host: str) -> socket.AddressFamily:
    """socketserver opens an IPv4 socket unless told otherwise: "::" and
    "::1" need an IPv6 one (on Linux "::" takes IPv4 clients as well)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def client_host_and_port(address: tuple) -> tuple[str, int]:
    """A client's (host, port), an IPv6 socket's four-part address cut to two,
    and an IPv4 client of an IPv6 socket (``::ffff:127.0.0.1``) written as
    IPv4: networks such as 127.0.0.0/8, the limits and the logs then see one
    client as one address."""
    return str(unmapped(ipaddress.ip_address(address[0]))), address[1]


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
        self._open_changed = threading.Condition()  # guards _open and _stopping; notified as sessions end
        self._stopping = False
        self.address_family = address_family_of(address[0])
        super().__init__(address, SessionHandler)
        # Worker processes share this socket (workers.py): a connection wakes
        # every one waiting in poll(), and only one gets it. A blocking
        # accept() would hold the others until the next connection, deaf to
        # stop(); non-blocking, theirs fails and socketserver waits again.
        self.socket.setblocking(False)
        self._incoming = select.poll()  # is a connection still waiting to be accepted?
        self._incoming.register(self.socket, select.POLLIN)
        self._deferring_again_at = 0.0  # time.monotonic(); see _leave_to_another_worker
        self._warned_at: dict[str, float] = {}  # shortage -> time.monotonic(); see _now_and_then

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Which of the worker processes gets a connection is luck, and ten
        # clients that arrive together can split 3/7 between two of them
        # (seen with scripts/bench.py). The busier process then sets the
        # pace for all, as its threads take turns at one interpreter lock.
        self._leave_to_another_worker()
        try:
            request, client_address = super().get_request()  # non-blocking: fails if another process took it
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE):
                self._wait_for_a_free_descriptor()
            raise  # socketserver drops it, and waits for the next connection
        return request, client_host_and_port(client_address)

    def _wait_for_a_free_descriptor(self) -> None:
        """accept() failed for want of a descriptor. The connection stays in
        the kernel's queue, so poll() reports it again at once: without a
        pause this thread would spin on it. Say so now and then."""
        if self._now_and_then("descriptors"):
            log.warning("%s: out of file descriptors: a connection waits unanswered until one is closed "
                        "(raise the open-files limit, or lower limits.max_connections)", self.name)
        time.sleep(OUT_OF_DESCRIPTORS_PAUSE_SECONDS)

    def _now_and_then(self, shortage: str) -> bool:
        """Is it time to warn of ``shortage`` again? At most once in SHORTAGE_WARNING_SECONDS."""
        now = time.monotonic()
        if now < self._warned_at.get(shortage, 0.0):
            return False
        self._warned_at[shortage] = now + SHORTAGE_WARNING_SECONDS
        return True

    def _leave_to_another_worker(self) -> None:
        """While this process serves more connections than another worker, let
        that one, woken by the same connection, take it: wait until it has, or
        this process no longer leads, for at most ACCEPT_DEFER_SECONDS."""
        # Looking every few milliseconds, not sleeping once: a single 20 ms
        # wait was too short where a virtual CPU stalls (CI saw the other
        # wake late, and a 6/4 split).
        if time.monotonic() < self._deferring_again_at:
            return
        deadline = time.monotonic() + ACCEPT_DEFER_SECONDS
        while self._another_worker_should_take_it():
            if time.monotonic() >= deadline:
                # The other is hung, stopped or being replaced: do not make
                # every connection wait for it.
                self._deferring_again_at = time.monotonic() + ACCEPT_DEFER_PAUSE_SECONDS
                return
            time.sleep(ACCEPT_DEFER_STEP_SECONDS)

    def _another_worker_should_take_it(self) -> bool:
        """Is a connection waiting, and does this process serve more than another worker?"""
        workers = self.context.settings.processes
        return (workers > 1 and bool(self._incoming.poll(0))
                and self.context.connections.serves_more_than_another(workers))

    def track(self, connection: Connection) -> None:
        with self._open_changed:
            self._open.add(connection)
            if self._stopping:  # accepted just before the stop, its thread late
                connection.stop_reading()

    def untrack(self, connection: Connection) -> None:
        with self._open_changed:
            self._open.discard(connection)
            self._open_changed.notify_all()

    def stop_reading(self) -> None:
        """Let every session end after the command in hand (Connection.stop_reading)."""
        with self._open_changed:
            self._stopping = True
            for connection in self._open:
                connection.stop_reading()

    def end_sessions(self, deadline: float) -> None:
        """Wait until the sessions have ended, or ``deadline`` (time.monotonic()); then cut what is left."""
        with self._open_changed:
            self._open_changed.wait_for(lambda: not self._open, timeout=max(0.0, deadline - time.monotonic()))
            connections = list(self._open)
        for connection in connections:
            connection.shutdown()

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        log.exception("%s connection from %s failed", self.name, client_address[0])

    # --- the connection caps: socketserver's hooks, in the accepting thread ------

    def verify_request(self, request: socket.socket, client_address: tuple[str, int]) -> bool:
        """Admit the connection, or refuse it here: no thread is started for it."""
        if self.context.connections.admit(client_address[0]):
            return True
        log.warning("%s connection from %s refused: too many connections (%d open)",
                    self.name, client_address[0], self.context.connections.open)
        self._refuse(request)
        return False  # socketserver then closes the socket

    def _refuse(self, request: socket.socket) -> None:
        if self.implicit_tls:
            return  # no plaintext before the handshake: just close
        refusal = self.session_class.TOO_MANY_CONNECTIONS.format(host=self.context.settings.hostname)
        wire = b"".join(line.encode("ascii") + b"\r\n" for line in refusal.head())
        # Non-blocking: a new socket's send buffer is empty, so these few
        # octets go in at once; a peer that does not read cannot hold up
        # the accepting thread, and if the send fails we close anyway.
        try:
            request.setblocking(False)
            request.send(wire)
        except OSError:
            pass

    def process_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except RuntimeError:  # "can't start new thread": the process is at its limit
            self.context.connections.release(client_address[0])
            if self._now_and_then("threads"):
                log.warning("%s: cannot start a thread for a connection: refusing connections until "
                            "sessions end (raise the process limit, ulimit -u, or lower "
                            "limits.max_connections)", self.name)
            self._refuse(request)
            self.shutdown_request(request)
        except BaseException:
            self.context.connections.release(client_address[0])  # no thread, no session
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        self.context.placement.session_started()
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.context.placement.session_ended()
            self.context.connections.release(client_address[0])


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context: the configured pair, else the generated one, else None."""
    cert, key = settings.tls.cert, settings.tls.key
    if (cert is None) != (key is None):
        raise ConfigError("tls.cert and tls.key must be given together")
    if cert is None:
        cert, key = default_certificate_paths(settings)
        try:
            present = [path for path in (cert, key) if path.is_file()]
            if len(present) == 1:  # TLS off without a word would shut out every login from afar
                raise ConfigError(f"the generated TLS pair is half there: {str(present[0])!r} without its "
                                  f"partner; run 'pymailsrv cert generate --force' to make both again")
            if not present:
                return None
        except PermissionError:  # is_file() inside a directory this user cannot search
            raise ConfigError(f"cannot look for the generated TLS pair in {str(cert.parent)!r} as {_current_user()}, "
                              "which reads it before --run-as: give tls.cert and tls.key outside the data root"
                              ) from None
    try:
        context = server_context(cert, key)
    except (OSError, ssl.SSLError, KeyEncrypted) as error:
        # Either file may be the one at fault (an unreadable key, say): both are named.
        raise ConfigError(f"cannot load the TLS certificate {str(cert)!r} with its key {str(key)!r}: {error}"
                          ) from None
    out_of_date = validity_problem(cert)
    if out_of_date:  # served all the same, as Postfix and Dovecot serve it: the admin may be renewing it
        log.warning("the TLS certificate %r %s: clients that check it will refuse it", str(cert), out_of_date)
    return context


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


def account_to_run_as(name: str) -> pwd.struct_passwd:
    """The account ``run_as`` names, if this process may become it (else ConfigError)."""
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"--run-as: there is no user {name!r} on this system") from None
    if os.geteuid() != 0 and account.pw_uid != os.geteuid():
        raise ConfigError(f"--run-as {name}: only root can change user (this process runs as "
                          f"uid {os.geteuid()})")
    return account


# Python loads a codec at its first use, from the Python installed, which
# after the switch of user may be unreadable (root's alone): looked up before
# it is "idna", which socket and ssl use for every host name the relay
# connects to. Without it, every relayed message failed at every retry.
# (replies.reply_line, which needed "unicode_escape", now needs no codec.)
CODECS_USED_AFTER_SWITCH = ("idna",)


def drop_privileges(account: pwd.struct_passwd) -> None:
    """Become ``account`` for good: no supplementary groups, its gid, its uid.

    The order matters: once the uid is not 0 the groups can no longer be
    changed. As root, setuid sets the real, effective and saved uid alike, so
    there is no way back; we check that rather than trust it.
    """
    if os.geteuid() != 0:
        return  # already that account (account_to_run_as checked)
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    if account.pw_uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise ConfigError(f"could not drop root privileges for --run-as {account.pw_name}")
    log.info("running as %s (uid %d, gid %d)", account.pw_name, account.pw_uid, account.pw_gid)


def check_data_root(settings: Settings) -> None:
    """Make sure the data root is there and ours to write, or say plainly what to fix."""
    who = _current_user()
    root, state_dir = settings.root, settings.state_dir
    advice = f"the data root must belong to the user the server runs as: chown -R {who} {str(root)!r}"
    try:
        make_private_directory(state_dir)
    except OSError as error:
        # chown mends only what permissions refuse, not a read-only disk or a file in the way.
        fix = f"; {advice}" if error.errno in (errno.EACCES, errno.EPERM) else ""
        raise ConfigError(f"cannot create {str(state_dir)!r} as {who}: {error.strerror}{fix}") from None
    try:
        # A file where the queue's directory belongs, or a directory where the
        # aliases file does, would fail only later: the relay with a traceback,
        # every RCPT with a 451.
        for name, is_right_kind, kind in ((QUEUE_DIR_NAME, Path.is_dir, "a directory"),
                                          (ALIASES_FILE_NAME, Path.is_file, "a file")):
            path = state_dir / name
            if path.exists() and not is_right_kind(path):
                raise ConfigError(f"{str(path)!r} must be {kind}: move it out of the way")
        # Every directory the server writes into (state: locks, queue, transcripts;
        # each Maildir and its tmp/new/cur): one made by a command run as root
        # would otherwise fail only at the first delivery, with a 451.
        writable = [root, state_dir, *sorted(path for path in state_dir.iterdir() if path.is_dir())]
        writable += [path for path in (state_dir / "queue" / "tmp",) if path.is_dir()]
        # A Maildir before what is in it: glob() passes over a directory it
        # cannot enter, in silence.
        writable += sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
        # (A file where one of them should be is that one user's broken Maildir,
        # refused at their deliveries: no reason to keep the server down.)
        writable += sorted(path for path in root.glob("*/*") if path.name in ("tmp", "new", "cur") and path.is_dir())
        for path in writable:
            if os.statvfs(path).f_flag & os.ST_RDONLY:
                raise ConfigError(f"{str(path)!r} is on a read-only file system: the server writes there")
            if not os.access(path, os.R_OK | os.W_OK | os.X_OK):  # listed too: the queue, a maildrop
                kind = "writable" if not os.access(path, os.W_OK | os.X_OK) else "readable"
                raise ConfigError(f"{str(path)!r} is not {kind} by {who}; {advice}")
        # The files it reads: users.json, aliases.
        for path in sorted(state_dir.iterdir()):
            if path.is_file() and not os.access(path, os.R_OK):
                raise ConfigError(f"{str(path)!r} is not readable by {who}; {advice}")
    except PermissionError as error:  # a directory root made and shut: even is_dir() inside it is refused
        raise ConfigError(f"cannot look into {str(error.filename)!r} as {who}; {advice}") from None


def lock_data_root(settings: Settings) -> int:
    """One server per data root: an ``flock`` held while it runs; its descriptor.

    A second server on the same root would deliver every queued message a
    second time, since a relay's claim on a message lives in its own memory.
    The kernel drops the lock when the process (and its workers) end, so no
    crash leaves it behind.
    """
    descriptor = os.open(settings.state_dir / SERVER_LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise ConfigError(f"another pymailsrv is serving {str(settings.root)!r} already: "
                          f"one data root takes one server") from None
    return descriptor


def raise_open_files_limit(needed: int) -> int:
    """Raise this process's soft limit on open files to ``needed``, or as near as
    the hard limit allows; returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return needed if soft == resource.RLIM_INFINITY else soft


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


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
            connections=ConnectionLimits(settings.limits.max_connections,
                                         settings.limits.max_connections_per_address),
            pop3_sessions=Tally(settings.limits.pop3_sessions_per_user_address),
            tls=tls_context(settings),
            aliases=AliasTable(settings.state_dir, users.names, settings.domains, settings.smtp.postmaster_user),
            queue=OutboundQueue(settings.state_dir, RetryPolicy.from_settings(settings.relay)),
            faults=fault_plan(settings),
        )
        self.listeners: list[Listener] = []
        self._threads: list[threading.Thread] = []
        self._root_lock: int | None = None  # lock_data_root's descriptor, from bind() to stop()
        # The delivery threads for the outbound queue (relay.py).
        self.relay = Relay(self.context)

    def _protocols(self) -> list[tuple[str, int, type[Session], bool]]:
        """(listener name, port, session class, implicit TLS) for every listener asked for."""
        pop3, smtp = self.settings.pop3, self.settings.smtp
        wanted = [("pop3", pop3.port, Pop3Session, False),
                  ("smtp", smtp.port, SmtpSession, False),
                  ("pop3s", pop3.pop3s_port, Pop3Session, True),
                  # RFC 8314 §3.3: port 465 is message submission over TLS.
                  ("smtps", smtp.smtps_port, SubmissionSession, True),
                  ("submission", smtp.submission_port, SubmissionSession, False)]
        chosen = [listener for listener in wanted if listener[1] is not None]
        for name, _, _, implicit_tls in chosen:
            if implicit_tls and self.context.tls is None:
                raise ConfigError(f"the {name} port needs a TLS certificate: give --tls-cert and "
                                  f"--tls-key, or run 'pymailsrv cert generate'")
        return chosen

    def start(self) -> "MailServer":
        """Bind, then serve: the whole server in this process."""
        self.bind()
        return self.serve()

    def bind(self) -> "MailServer":
        """Bind every listener, become ``run_as``, and tidy the data root; no thread yet.

        ``pymailsrv start --processes N`` forks its workers after this
        (workers.py): they inherit the bound sockets, and the open-files limit.
        """
        self._make_room_for_connections()
        # A listener that cannot run, or an account that does not exist, is a
        # one-line config error, before any warning.
        protocols = self._protocols()
        account = account_to_run_as(self.settings.run_as) if self.settings.run_as else None
        try:
            for name, port, session_class, implicit_tls in protocols:
                address = (self.settings.host, port)
                try:
                    self.listeners.append(Listener(name, address, session_class, self.context, implicit_tls))
                except OSError as error:  # which of several ports: two given the same one, say
                    raise ConfigError(f"cannot listen on {self.settings.host} port {port} ({name}): "
                                      f"{error.strerror or error}") from None
            # Nothing below runs as root if run_as is set: no mailbox is
            # touched before this line.
            if account is not None:
                if not self.settings.relay.smarthost:  # with one, no MX is ever looked up
                    MxResolver.load_before_switching_user()
                for codec in CODECS_USED_AFTER_SWITCH:
                    codecs.lookup(codec)
                drop_privileges(account)
            elif os.geteuid() == 0:
                log.warning("running as root: give --run-as USER to drop privileges once the ports are bound")
            check_data_root(self.settings)
            self._root_lock = lock_data_root(self.settings)
            removed = self.context.store.remove_stale_files()
            if removed:
                log.info("removed %s from tmp/ (older than 36 hours)", counted(removed, "stale file"))
            self._check_postmaster()
            self._check_timeouts()
        except (OSError, ConfigError):
            self.stop()
            raise
        return self

    def _check_timeouts(self) -> None:
        """Warn of a wait for the client shorter than its RFC asks: allowed (a
        test wants answers now), but a client that pauses as long as the RFC
        lets it is cut off."""
        for setting, seconds, least, rfc in (
                ("pop3.autologout", self.settings.pop3.autologout, POP3_AUTOLOGOUT_SECONDS, "RFC 1939 §3"),
                ("smtp.command_timeout", self.settings.smtp.command_timeout, SMTP_COMMAND_TIMEOUT_SECONDS,
                 "RFC 5321 §4.5.3.2.7")):
            if seconds < least:
                log.warning("%s is %g seconds: %s asks for at least %d, and a client idle longer is cut off",
                            setting, seconds, rfc, least)

    def _make_room_for_connections(self) -> None:
        """Raise the open-files limit to what max_connections needs, or warn that it cannot be.

        Out of descriptors, accept() fails: a client then waits in the
        kernel's queue, neither greeted nor refused. Every connection may
        land in one process, so each process needs room for all of them.
        """
        cap = self.settings.limits.max_connections
        needed = cap * FILES_PER_CONNECTION + FILES_BESIDES_CONNECTIONS
        limit = raise_open_files_limit(needed)
        if limit < needed:
            log.warning("the open-files limit is %d, short of the %d that %s need: raise it (ulimit -n) or "
                        "lower limits.max_connections", limit, needed, counted(cap, "connection"))

    def serve(self, relay: bool = True) -> "MailServer":
        """Accept connections in a thread per listener; with ``relay``, deliver the queue too."""
        for listener in self.listeners:
            thread = threading.Thread(target=listener.serve_forever, args=(LISTENER_POLL_SECONDS,),
                                      name=f"{listener.name}-listener", daemon=True)
            thread.start()
            self._threads.append(thread)
        if relay:
            self.relay.start()  # resumes whatever the queue holds from before
        return self

    def _check_postmaster(self) -> None:
        """RFC 5321 §4.5.1: postmaster mail must be deliverable; warn if it is not."""
        wanted = self.settings.smtp.postmaster_user
        try:
            names = self.context.users.names()
        except UnusableFile as error:  # no login would work: say so now, not at the first client
            raise ConfigError(str(error)) from None
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
        pairs = " ".join(f"{name}={host_and_port(host, port)}" for name, (host, port) in self.addresses.items())
        return f"listening {pairs}"

    def stop(self) -> None:
        """Take no more connections, let each session finish its command, stop the relay."""
        # Only the listeners serve() started: shutdown() waits for
        # serve_forever to end, for ever if it never began (a bound server
        # whose workers serve it, workers.py), and each waits for its loop
        # to look again (up to LISTENER_POLL_SECONDS): asked of every
        # listener at once, those waits overlap rather than add up.
        started = self.listeners[:len(self._threads)]
        shutdowns = [threading.Thread(target=listener.shutdown, name=f"{listener.name}-shutdown")
                     for listener in started]
        for shutdown in shutdowns:
            shutdown.start()
        for thread in [*shutdowns, *self._threads]:
            thread.join()
        deadline = time.monotonic() + STOP_DRAIN_SECONDS
        for listener in self.listeners:
            listener.server_close()
            listener.stop_reading()
        self.relay.stop()  # meanwhile, the sessions finish
        for listener in self.listeners:
            listener.end_sessions(deadline)
        self.listeners.clear()
        self._threads.clear()
        if self._root_lock is not None:
            os.close(self._root_lock)
            self._root_lock = None

    def __enter__(self) -> "MailServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
