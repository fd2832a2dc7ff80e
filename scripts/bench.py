#!/usr/bin/env python3
"""Throughput and memory figures for pymailsrv, side by side with a peer.

What it does (issue 9), all on 127.0.0.1 and in one run, so the figures can
be compared as ratios:

* Starts ``python -m pymailsrv start`` as a *subprocess* on free ports with a
  temporary data root, N users and a private config file. A subprocess, not
  a thread, so the server's own CPU time and memory can be read from
  ``/proc/<pid>/stat`` and ``/proc/<pid>/status`` without the load
  generator's share mixed in. Its modules are compiled to bytecode first,
  as pip does on install, so start-up is timed as an installed server's
  (``compile_pymailsrv``).
* SMTP: M messages over C concurrent connections, each connection reused for
  many MAIL/RCPT/DATA transactions (``send_transaction``; with ``--pipelining``,
  MAIL, RCPT and DATA go in one write where the server offers RFC 2920
  PIPELINING). A message
  counts only once its file is in a Maildir ``new/``, not when the server
  says 250. Sizes 2 KB and 100 KB at 1, 10 and 50 connections.
* POP3: P clients (1 and 10), each on its own maildrop of 1000 messages of
  2 KB (then of 100 KB), filled beforehand with ``MaildirStore.deliver``:
  log in, STAT, RETR every message, QUIT. Nothing is deleted, so every run
  sees the same maildrop.
* pymailsrv runs with ``--processes`` workers (default: one per CPU), as a
  busy server should (``docs/deploy.rst``); ``--processes 1`` measures a
  single process.
* Memory: idle, with 500 idle connections open, and while one 100 MB
  message is received (``smtp.max_message_size`` is raised for that), as
  the proportional set size (Pss) summed over the server's processes: its
  workers share most pages with the main process they were forked from,
  and Pss counts a shared page once (``ServerProcess.memory_mb``).
* Peer: the same SMTP load against aiosmtpd with a handler that stores each
  message in a ``mailbox.Maildir`` (which fsyncs the file; we also fsync
  ``new/``, as pymailsrv does), if aiosmtpd is importable (``pip install
  '.[bench]'``). It runs in a subprocess too: this script with
  ``--serve-aiosmtpd``.
* The floor under one connection, measured first: four round trips between
  two processes and one 2 KB ``MaildirStore.deliver``, the least a message
  can cost at 2 KB x 1 on this machine (``one_connection_floor``); a note
  gives it.
* What making a file costs, measured first: every message makes one, on
  either server, and on an ext4 without a journal it costs ten times as
  much for minutes after many files were deleted (``file_creation_note``).
  While it is slow the script waits, up to 90 s; a note gives the cost, the
  wait, and says so if it is still slow.
* ``--peer dovecot``: the same POP3 load against Dovecot (the distribution's
  ``dovecot-pop3d``, 2.3), started with ``dovecot -F`` on a private config
  written into the temporary directory (``configure_dovecot``). It serves the
  very maildrops pymailsrv serves, their runs taken in turn; the SMTP and
  memory scenarios are skipped. Without Dovecot a note says so.

Every rate is the median of 3 runs (min-max shown); latency is per SMTP
transaction (MAIL+RCPT+DATA) or per POP3 RETR, over all runs of a scenario;
POP3 also gives MB/s (10**6 octets of messages retrieved); CPU is the
server's utime+stime per message (all its processes); the RSS column of a
load scenario is the server's peak (VmHWM, summed over its processes, so
too high for several), each scenario on a freshly started server. An SMTP
scenario starts pymailsrv and the peer together and takes their runs in
turn, the order reversed every other run, so that a drift of the machine
weighs on both alike (``in_turn``); each sends to users of its own
(``Site.recipients``). A POP3 scenario does the same with Dovecot, over
the same maildrops, after one untimed pass of each server, so the timed
runs see maildrops the server has already opened once.

The load generator is Python too and shares the machine: on a small box it
competes with the server for CPU, which is why only ratios within one run
mean anything. It reads each RETR response in large pieces (``retrieve``),
not a line at a time as ``poplib`` does: that cost it several times what
either server spends on a 100 KB message, so the client set the pace.

    python scripts/bench.py --quick            # smoke test, well under a minute
    python scripts/bench.py --json bench.json  # everything (a few minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import grp
import importlib.util
import json
import math
import multiprocessing
import os
import poplib
import pwd
import queue
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from tabulate import tabulate

HOST = "127.0.0.1"  # the network rule: listen on and connect to loopback only
PASSWORD = "bench password"
SIZES = {"2KB": 2 * 1024, "100KB": 100 * 1024}
SMTP_CONCURRENCY = (1, 10, 50)
POP3_CLIENTS = (1, 10)
POP3_MAILDROP_MESSAGES = 1000
RUNS = 3
IDLE_CONNECTIONS = 500
BIG_MESSAGE_OCTETS = 100 * 1024 * 1024
# RFC 5321 §4.5.3.1.5 allows a reply line 512 octets; read further, as smtplib does.
REPLY_LINE_LIMIT = 8192
# A line of message text that starts with a dot gets another (RFC 5321 §4.5.2).
DOT_AT_LINE_START = re.compile(rb"^\.", re.MULTILINE)

# Bounds, so that nothing here can hang: seconds to wait for a server's
# "listening" line, for a connection and its greeting, for any other client
# socket operation, for one timed run, and for delivered files to show up
# after the last 250.
START_TIMEOUT = 15.0
CONNECT_TIMEOUT = 10.0
SOCKET_TIMEOUT = 30.0
RUN_TIMEOUT = 120.0
SETTLE_TIMEOUT = 30.0
# Seconds a load generator process has to end once its work is done, and
# any child process to go once it is killed.
WORKER_END_TIMEOUT = 10.0
KILLED_PROCESS_TIMEOUT = 5.0

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- Servers under test ----------------------------------------------------------


class ServerProcess:
    """A server in a subprocess, ready once it listens.

    Ours print ``listening name=host:port ...`` on stderr. A server that
    prints no such line (Dovecot) is given its ``addresses`` up front, and is
    ready once the first of them answers with a greeting.

    ``stop()`` sends SIGTERM, waits, and kills if it must; the script calls it
    in a ``finally`` and again at exit, so no server outlives the script.
    """

    running: list["ServerProcess"] = []

    def __init__(self, name: str, argv: list[str],
                 addresses: dict[str, tuple[str, int]] | None = None) -> None:
        self.name = name
        self.addresses: dict[str, tuple[str, int]] = dict(addresses or {})
        self.stderr_tail: list[str] = []
        started = time.monotonic()
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, errors="replace")
        ServerProcess.running.append(self)
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        ready = self._greets() if addresses else self._listening.wait(START_TIMEOUT) and self.addresses
        if not ready:
            self.stop()
            # The last line of a traceback (or of Dovecot's log) says what went wrong.
            last = next((line.strip() for line in reversed(self.stderr_tail) if line.strip()), "no output")
            raise RuntimeError(f"{name} did not start: {last}")
        self.startup_seconds = time.monotonic() - started

    def _greets(self) -> bool:
        """Wait until the first address sends a greeting line, or the process ends."""
        address = next(iter(self.addresses.values()))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection(address, timeout=1.0) as sock:
                    if sock.recv(512).startswith((b"+OK", b"220")):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _read_stderr(self) -> None:
        # Keep reading to the end, so a chatty server never blocks on a full pipe.
        for line in self.process.stderr:
            line = line.rstrip("\n")
            self.stderr_tail = (self.stderr_tail + [line])[-20:]
            if not self._listening.is_set() and line.startswith("listening"):
                for name, host, port in re.findall(r"(\w+)=([^\s:]+):(\d+)", line):
                    self.addresses[name] = (host, int(port))
                self._listening.set()
        self._listening.set()  # the process ended: stop waiting

    @property
    def pid(self) -> int:
        return self.process.pid

    def processes(self) -> list[int]:
        """The server's pid and those of all its live descendants.

        pymailsrv and aiosmtpd are one process each; Dovecot is a master with
        a process per service (log, auth, pop3-login) and one per POP3 session.
        """
        parents: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    parents.setdefault(int(_proc_stat(int(entry.name))[1]), []).append(int(entry.name))
        tree, index = [self.pid], 0
        while index < len(tree):
            tree += parents.get(tree[index], [])
            index += 1
        return tree

    def cpu_seconds(self) -> float:
        """CPU time of the server: its processes' utime + stime, all threads (proc(5)).

        Each process's cutime + cstime is added too: that is the time of its
        children that have ended and been waited for, such as Dovecot's
        per-session pop3 processes. A live child is counted on its own, so
        nothing is counted twice.
        """
        ticks = 0
        for pid in self.processes():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = _proc_stat(pid)
                # Field 3 of stat(5) is fields[0], so utime (14) .. cstime (17) are [11] .. [14].
                ticks += sum(int(value) for value in fields[11:15])
        return ticks / CLOCK_TICKS

    def memory_mb(self, key: str) -> float:
        """Memory in MB, summed over the live processes of the server.

        ``Pss`` (proportional set size, /proc/PID/smaps_rollup): each page
        shared by n processes counts 1/n to each, so a server of several
        processes - pymailsrv's workers forked from one main process,
        Dovecot's - is counted with its shared pages once. It is what the
        memory figures use. ``VmRSS`` (now) and ``VmHWM`` (peak) from
        /proc/PID/status count every page of each process, shared or not:
        exact for one process, too high for several.
        """
        source = "smaps_rollup" if key == "Pss" else "status"
        total, found = 0, False
        for pid in self.processes():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/{source}") as file:
                for line in file:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
                        found = True
        return total / 1024 if found else float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        if self in ServerProcess.running:
            ServerProcess.running.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for server in list(cls.running):
            server.stop()


def _proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after "pid (comm)": state, ppid, ..."""
    with open(f"/proc/{pid}/stat") as file:
        return file.read().rsplit(")", 1)[1].split()


@dataclass
class Site:
    """A temporary data root with its users, shared by pymailsrv and the peer's layout."""

    root: Path
    smtp_users: list[str]
    # The peer's own SMTP recipients. Both servers are up at once during an
    # SMTP scenario (smtp_scenario), so what one delivers late must never
    # count as the other's.
    peer_smtp_users: list[str]
    # The POP3 users for each message size, one per client, each with a
    # maildrop of pop3_messages messages of that size.
    pop3_users: dict[str, list[str]] = field(default_factory=dict)
    pop3_messages: int = 0

    @property
    def all_pop3_users(self) -> list[str]:
        return [user for users in self.pop3_users.values() for user in users]

    def recipients(self, server: str) -> list[str]:
        """Whom the SMTP load sent to ``server`` writes to."""
        return self.smtp_users if server == "pymailsrv" else self.peer_smtp_users

    def count_new(self, users: list[str]) -> int:
        """Messages delivered so far: files in the ``new/`` of each of ``users``.

        A run counts what it adds; nothing is deleted between runs. On an
        ext4 without a journal (this VM's), the inode allocator steps over
        every inode freed in the last minute or more (``recently_deleted()``
        in the kernel; ``perf`` showed it at 30% of the CPU at 50
        connections), so emptying ``new/`` before each run made every file
        the next run created cost 0.1-0.5 ms more, on both servers alike.
        """
        total = 0
        for user in users:
            with os.scandir(self.root / user / "new") as entries:
                total += sum(1 for entry in entries if not entry.name.startswith("."))
        return total


def make_site(base: Path, name: str, smtp_users: int, pop3_plan: list[tuple[str, int]], pop3_messages: int) -> Site:
    """A data root with users, their Maildirs, and filled POP3 maildrops for every size in ``pop3_plan``."""
    from pymailsrv.maildir import MaildirStore
    from pymailsrv.users import UserStore

    root = base / name
    store = MaildirStore(root)
    users = UserStore(store.state_dir)
    clients = {size_name: max(count for size, count in pop3_plan if size == size_name) for size_name, _ in pop3_plan}
    pop3_users = {size_name: [f"pop{size_name.lower()}{i}" for i in range(count)]
                  for size_name, count in clients.items()}
    site = Site(root, [f"user{i}" for i in range(smtp_users)], [f"peer{i}" for i in range(smtp_users)],
                pop3_users, pop3_messages)
    for user in site.smtp_users + site.peer_smtp_users + site.all_pop3_users:
        users.add(user, PASSWORD)
        store.create_maildir(user)
    for size_name, pop3_users in site.pop3_users.items():
        for user in pop3_users:
            for index in range(pop3_messages):
                store.deliver(user, make_message(index, SIZES[size_name], user))
    return site


def start_pymailsrv(site: Site, base: Path, processes: int,
                    max_message_size: int | None = None) -> ServerProcess:
    # A private config file: no ./pymailsrv.toml or $PYMAILSRV_CONFIG of the
    # user's leaks in, and failed logins are not slowed down. Every client
    # here comes from 127.0.0.1, so the connection caps are raised above
    # what the bench opens: at the default of 50 per address, the 500 idle
    # connections would be 50 sessions and 450 refusals, and a 50-connection
    # run could meet the last run's connections still closing.
    config = base / f"pymailsrv-{site.root.name}.toml"
    cap = IDLE_CONNECTIONS + max(SMTP_CONCURRENCY)
    lines = [f"processes = {processes}", "[pop3]", "failed_login_delay = 0",
             "[limits]", f"max_connections = {cap}", f"max_connections_per_address = {cap}"]
    if max_message_size:
        lines += ["[smtp]", f"max_message_size = {max_message_size}"]
    config.write_text("\n".join(lines) + "\n")
    return ServerProcess("pymailsrv", [
        sys.executable, "-m", "pymailsrv", "start", "--config", str(config), "--root", str(site.root),
        "--host", HOST, "--pop3-port", "0", "--smtp-port", "0", "--domain", "localhost",
    ])


def start_aiosmtpd(site: Site, max_message_size: int | None = None) -> ServerProcess:
    argv = [sys.executable, os.path.abspath(__file__), "--serve-aiosmtpd", str(site.root)]
    if max_message_size:
        argv += ["--max-message-size", str(max_message_size)]
    return ServerProcess("aiosmtpd", argv)


def serve_aiosmtpd(root: Path, max_message_size: int) -> None:
    """The peer: aiosmtpd, delivering each message to ``mailbox.Maildir`` with fsync.

    The handler is synchronous, like aiosmtpd's own ``handlers.Mailbox``:
    ``Maildir.add`` writes to tmp/, fsyncs the file and links it into new/;
    we then fsync new/ so the peer's 250 is as durable as pymailsrv's.
    """
    import mailbox

    from aiosmtpd.smtp import SMTP

    class MaildirHandler:
        def __init__(self) -> None:
            self.maildirs: dict[str, mailbox.Maildir] = {}

        def _maildir(self, user: str) -> mailbox.Maildir | None:
            if user not in self.maildirs:
                path = root / user
                if not user.isalnum() or not (path / "new").is_dir():
                    return None
                self.maildirs[user] = mailbox.Maildir(path, create=False)
            return self.maildirs[user]

        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            local, _, domain = address.rpartition("@")
            if domain.lower() != "localhost" or self._maildir(local.lower()) is None:
                return "550 5.1.1 no such user"
            envelope.rcpt_tos.append(address)
            return "250 OK"

        async def handle_DATA(self, server, session, envelope):
            for address in envelope.rcpt_tos:
                user = address.rpartition("@")[0].lower()
                self.maildirs[user].add(envelope.content)
                directory = os.open(root / user / "new", os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
            return "250 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = MaildirHandler()
        server = await loop.create_server(
            lambda: SMTP(handler, data_size_limit=max_message_size, hostname="localhost"), HOST, 0)
        port = server.sockets[0].getsockname()[1]
        stopping = asyncio.Event()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, stopping.set)
        print(f"listening smtp={HOST}:{port}", file=sys.stderr, flush=True)
        await stopping.wait()
        server.close()

    asyncio.run(main())


def find_dovecot() -> tuple[str | None, str]:
    """(the ``dovecot`` binary, its version), or (None, why there is none to run).

    /usr/sbin is searched too: a user's PATH often lacks it.
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    binary = shutil.which("dovecot", path=search)
    if binary is None:
        return None, ("Dovecot is not installed (Debian and Ubuntu: apt-get install "
                      "--no-install-recommends dovecot-pop3d): no Dovecot figures")
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                                 check=True).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as error:
        return None, f"{binary} --version failed ({error!r}): no Dovecot figures"
    if not version.startswith("2.3."):
        # 2.4 renamed many of the settings below (mail_location, disable_plaintext_auth, passdb args).
        return None, f"Dovecot {version} at {binary}: this script writes a 2.3 configuration; no Dovecot figures"
    return binary, version


def free_port() -> int:
    """A port on HOST that nothing listens on now (the kernel picks it for port 0)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def configure_dovecot(site: Site, base: Path) -> tuple[Path, int]:
    """Write a private Dovecot 2.3 configuration that serves the site's POP3 maildrops.

    Returns (config file, POP3 port). Everything Dovecot writes goes under
    ``base/dovecot/`` or into the maildrops: the system's Dovecot
    configuration is neither read nor changed, and it listens on one
    loopback TCP port only. The users and
    passwords are the bench's, from a passwd-file, and USER/PASS is allowed
    without TLS. Otherwise Dovecot's defaults hold, as a packager ships them.

    Dovecot never reads mail as root ("userdb returned 0 as uid") and its
    login processes may not run as root. So when the bench runs as root, the
    POP3 maildrops are handed to ``nobody`` (pymailsrv, as root, can still
    read them) and logins run as ``dovenull``, the package's login user. As
    any other user, every Dovecot process runs as that user, without chroot.
    """
    directory = base / "dovecot"
    for subdir in ("run", "state"):
        (directory / subdir).mkdir(parents=True, exist_ok=True)
    if any(char in str(base) for char in ' "%#\\'):
        raise RuntimeError(f"{base}: Dovecot's configuration cannot quote this path (use --tmpdir)")
    if os.getuid() == 0:
        mail = pwd.getpwnam("nobody")
        uid, gid = mail.pw_uid, mail.pw_gid
        internal_user, internal_group = "root", "dovecot"
        try:
            login_user = pwd.getpwnam("dovenull").pw_name
        except KeyError:
            login_user = mail.pw_name
        for path in (base, directory, site.root):
            os.chmod(path, 0o711)  # nobody must get through to the maildrops, without listing
        for user in site.all_pop3_users:
            for dirpath, _dirnames, filenames in os.walk(site.root / user):
                os.chown(dirpath, uid, gid)
                for name in filenames:
                    os.chown(os.path.join(dirpath, name), uid, gid)
        no_chroot = ""
    else:
        uid, gid = os.getuid(), os.getgid()
        internal_user = login_user = pwd.getpwuid(uid).pw_name
        internal_group = grp.getgrgid(gid).gr_name
        # Only root may chroot: these are the services that start with POP3 and chroot by default.
        no_chroot = "".join(f"service {service} {{\n  chroot =\n}}\n" for service in ("anvil", "ipc", "pop3-login"))
    passwd = directory / "passwd"
    passwd.write_text("".join(f"{user}:{{PLAIN}}{PASSWORD}::::::\n" for user in site.all_pop3_users))
    port = free_port()
    config = directory / "dovecot.conf"
    config.write_text(f"""\
# A private Dovecot for scripts/bench.py: POP3 on {HOST}:{port}, files under {directory}.
base_dir = {directory}/run
state_dir = {directory}/state
log_path = /dev/stderr
protocols = pop3
listen = {HOST}
ssl = no
# The bench logs in with USER/PASS over plain TCP, on loopback.
disable_plaintext_auth = no
auth_mechanisms = plain
# The very maildrops pymailsrv serves: ROOT/<user>/{{new,cur,tmp}}.
mail_location = maildir:{site.root}/%u
first_valid_uid = 1
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
  default_fields = uid={uid} gid={gid} home={site.root}/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {HOST}
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
{no_chroot}""")
    return config, port


def start_dovecot(binary: str, config: Path, port: int) -> ServerProcess:
    # -F: in the foreground, so SIGTERM to this process stops Dovecot and all its children.
    return ServerProcess("dovecot", [binary, "-F", "-c", str(config)], addresses={"pop3": (HOST, port)})


# --- Load generators ---------------------------------------------------------------


def make_message(index: int, size: int, recipient: str) -> bytes:
    """A plain RFC 5322 message of about ``size`` octets, in 76-character lines."""
    header = (f"From: bench <bench@localhost>\r\nTo: <{recipient}@localhost>\r\n"
              f"Subject: bench message {index}\r\nMessage-ID: <{index}.{os.getpid()}@bench.localhost>\r\n"
              f"\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n"
    body_lines = max(1, (size - len(header)) // len(line))
    return header + line * body_lines


@dataclass
class Outcome:
    """What one worker process measured."""

    latencies: list[float] = field(default_factory=list)  # seconds per transaction
    messages: int = 0
    octets: int = 0  # POP3: message octets retrieved, as poplib counts them (CRLF line ends)
    errors: int = 0
    notes: list[str] = field(default_factory=list)


Session = TypeVar("Session")


def open_before_start(open_session: Callable[[], Session], what: str, errors_if_failed: int,
                      go: threading.Event, ready: threading.Barrier, outcome: Outcome,
                      lock: threading.Lock) -> Session | None:
    """Open a session before the clock starts, then wait with the others for the start.

    Returns the session, or None if it could not be opened (counted as
    ``errors_if_failed`` errors) or the start never came.
    """
    client = None
    try:
        client = open_session()
    except (OSError, smtplib.SMTPException, poplib.error_proto) as error:
        with lock:
            outcome.errors += errors_if_failed
            outcome.notes.append(f"{what}: {error!r}")
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait(timeout=START_TIMEOUT)
    if client is None or not go.wait(timeout=START_TIMEOUT * 2):
        return None
    return client


def smtp_connection(port: int, indexes: list[int], size: int, users: list[str],
                    go: threading.Event, ready: threading.Barrier, outcome: Outcome,
                    lock: threading.Lock, deadline: float, pipelining: bool) -> None:
    """One SMTP connection: EHLO, then one MAIL/RCPT/DATA transaction per index."""
    def greeted() -> smtplib.SMTP:
        client = smtplib.SMTP(HOST, port, timeout=CONNECT_TIMEOUT)
        client.ehlo("bench.localhost")
        client.sock.settimeout(SOCKET_TIMEOUT)
        return client

    client = open_before_start(greeted, "connect", len(indexes), go, ready, outcome, lock)
    if client is None:
        return
    if pipelining and not client.has_extn("pipelining"):
        pipelining = False
        with lock:
            outcome.notes.append("no PIPELINING offered: one command at a time")
    latencies, errors = [], 0
    for index in indexes:
        if time.monotonic() > deadline:
            errors += 1
            continue
        user = users[index % len(users)]
        message = make_message(index, size, user)
        started = time.perf_counter()
        try:
            send_transaction(client, "bench@localhost", [f"{user}@localhost"], message, pipelining)
        except (OSError, smtplib.SMTPException) as error:
            errors += 1
            with lock:
                if len(outcome.notes) < 3:
                    outcome.notes.append(f"send: {error!r}")
            if isinstance(error, (OSError, smtplib.SMTPServerDisconnected)):
                errors += len(indexes) - indexes.index(index) - 1
                break
            continue
        latencies.append(time.perf_counter() - started)
    with contextlib.suppress(OSError, smtplib.SMTPException):
        client.quit()
    with lock:
        outcome.latencies += latencies
        outcome.messages += len(latencies)
        outcome.errors += errors


def send_transaction(client: smtplib.SMTP, sender: str, recipients: list[str], message: bytes,
                     pipelining: bool) -> None:
    """One MAIL/RCPT/DATA transaction, each command written and its reply read
    as whole lines; with ``pipelining``, MAIL, RCPT and DATA go in one write
    and their replies are read together, as RFC 2920 §3.1 allows.

    One command at a time, the transaction stops at the first refusal, as
    ``smtplib`` does; pipelined, the server refuses what follows one.

    ``smtplib.SMTP.sendmail`` spends 0.25 to 0.3 ms of the load generator's
    CPU on a 2 KB message (it decodes and re-encodes every reply, and
    rewrites the text with two regular expressions); this spends 0.1 to
    0.14 ms, which leaves more of the machine to the servers.
    """
    envelope = [f"MAIL FROM:<{sender}>\r\n".encode()]
    envelope += [f"RCPT TO:<{recipient}>\r\n".encode() for recipient in recipients]
    envelope.append(b"DATA\r\n")
    if pipelining:
        client.sock.sendall(b"".join(envelope))
        replies = [read_reply(client) for _ in envelope]
    else:
        replies = []
        for command in envelope:
            client.sock.sendall(command)
            replies.append(read_reply(client))
            if replies[-1][0] >= 400:
                break
    # The first refusal says why; a DATA answered otherwise than 354 by a
    # server that refused nothing before it is its own reason.
    refusal = next((reply for reply in replies if reply[0] >= 400), None)
    if replies[-1][0] != 354:
        client.rset()
        raise smtplib.SMTPResponseException(*(refusal or replies[-1]))
    if replies[0][0] >= 400 or not any(200 <= code < 300 for code, _ in replies[1:-1]):
        # RFC 2920 §3.1: a client "cannot assume that the DATA command will
        # be rejected" when no recipient was accepted; a 354 then gets a
        # lone dot, so nothing is delivered.
        client.sock.sendall(b".\r\n")
        read_reply(client)
        raise smtplib.SMTPResponseException(*(refusal or replies[-1]))
    client.sock.sendall(DOT_AT_LINE_START.sub(b"..", message) + b".\r\n")  # RFC 5321 §4.5.2
    code, text = read_reply(client)
    if code != 250:
        raise smtplib.SMTPDataError(code, text)


def read_reply(client: smtplib.SMTP) -> tuple[int, bytes]:
    """One reply: its code and its last line (RFC 5321 §4.2: "250-" continues, "250 " ends)."""
    while True:
        line = client.file.readline(REPLY_LINE_LIMIT)
        if not line:
            raise smtplib.SMTPServerDisconnected("connection closed mid-reply")
        if not line.endswith(b"\n"):
            raise smtplib.SMTPResponseException(-1, b"reply line too long: " + line[:80])
        if line[3:4] != b"-":
            break
    if not line[:3].isdigit():
        raise smtplib.SMTPResponseException(-1, line)
    return int(line[:3]), line[4:].rstrip(b"\r\n")


def pop3_client(port: int, user: str, go: threading.Event, ready: threading.Barrier,
                outcome: Outcome, lock: threading.Lock, deadline: float) -> None:
    """One POP3 session: USER/PASS, then (timed) STAT, RETR every message, QUIT (nothing deleted).

    The login comes before the clock starts, as SMTP's EHLO does: a login
    costs what the server's password hashing costs (pymailsrv's scrypt takes
    ~50 ms by design, a PLAIN passdb nothing), which says nothing about how
    fast mail is handed out.
    """
    def logged_in() -> poplib.POP3:
        client = poplib.POP3(HOST, port, timeout=CONNECT_TIMEOUT)
        client.sock.settimeout(SOCKET_TIMEOUT)
        client.user(user)
        client.pass_(PASSWORD)
        return client

    client = open_before_start(logged_in, f"{user} login", 1, go, ready, outcome, lock)
    if client is None:
        return
    latencies, errors, octets = [], 0, 0
    try:
        count, _ = client.stat()
        for msg_number in range(1, count + 1):
            if time.monotonic() > deadline:
                errors += count - msg_number + 1
                break
            started = time.perf_counter()
            octets += retrieve(client, msg_number)
            latencies.append(time.perf_counter() - started)
        client.quit()
    except (OSError, poplib.error_proto) as error:
        errors += 1
        with lock:
            outcome.notes.append(f"{user}: {error!r}")
    with lock:
        outcome.latencies += latencies
        outcome.messages += len(latencies)
        outcome.octets += octets
        outcome.errors += errors


# RFC 1939 §3: a multi-line response ends with a line holding one dot;
# a text line that starts with a dot has one more put before it.
END_OF_MULTILINE = b"\r\n.\r\n"
STUFFED_LINE_START = b"\r\n.."
RETR_READ_SIZE = 256 * 1024


def retrieve(client: poplib.POP3, msg_number: int) -> int:
    """RETR one message; returns its octets as ``poplib.POP3.retr`` counts them.

    ``retr`` reads the message a line at a time in Python: 1.5-2 ms of the
    load generator's CPU for a 100 KB message, several times what either
    server spends sending it, so 100 KB x 10 measured the client. Here the
    response is read in large pieces until it ends with the terminating
    dot line; nothing comes after it, as the next command has not been sent.
    """
    client.sock.sendall(b"RETR %d\r\n" % msg_number)
    status = client.file.readline()
    if not status.startswith(b"+OK"):
        raise poplib.error_proto(status)
    response = bytearray(b"\r\n")  # the status line's CRLF: an empty message is just ".\r\n"
    while not response.endswith(END_OF_MULTILINE):
        piece = client.file.read1(RETR_READ_SIZE)
        if not piece:
            raise poplib.error_proto(f"RETR {msg_number}: connection closed mid-response")
        response += piece
    # poplib's count (and probe_base.octets'): every line with its CRLF, less
    # the dots taken off stuffed lines; the terminating line not at all.
    return len(response) - len(END_OF_MULTILINE) - response.count(STUFFED_LINE_START)


def load_worker(kind: str, port: int, jobs: list, size: int, users: list[str],
                barrier, results, pipelining: bool) -> None:
    """A load-generator process: one thread per connection in ``jobs``.

    Several processes share the connections, so the client side is not held
    to one core by the GIL. Each connects first, then all meet at ``barrier``
    with the parent, which starts its clock when the barrier opens.
    """
    outcome, lock, go = Outcome(), threading.Lock(), threading.Event()
    ready = threading.Barrier(len(jobs) + 1)
    deadline = time.monotonic() + RUN_TIMEOUT
    if kind == "smtp":
        threads = [threading.Thread(target=smtp_connection,
                                    args=(port, indexes, size, users, go, ready, outcome, lock, deadline,
                                          pipelining))
                   for indexes in jobs]
    else:
        threads = [threading.Thread(target=pop3_client, args=(port, user, go, ready, outcome, lock, deadline))
                   for user in jobs]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait(timeout=START_TIMEOUT)  # every connection of this process is open
    try:
        barrier.wait(timeout=START_TIMEOUT * 2)
    except threading.BrokenBarrierError:
        outcome.notes.append("start barrier broken")
    go.set()
    for thread in threads:
        thread.join(timeout=RUN_TIMEOUT + SOCKET_TIMEOUT)
    results.put(asdict(outcome))


def run_load(kind: str, port: int, jobs: list, size: int, users: list[str],
             done: callable, server_cpu: callable, pipelining: bool = False) -> tuple[float, float, Outcome]:
    """Spread ``jobs`` over worker processes, time them until ``done()`` is true.

    Returns (seconds, the server's CPU seconds meanwhile, merged outcome).
    The clock starts when every connection is open (and greeted, or logged
    in) and stops when ``done()`` holds (for SMTP: every acknowledged
    message is in a ``new/``) or SETTLE_TIMEOUT after the workers finished.
    """
    context = multiprocessing.get_context("spawn")
    processes = max(1, min(len(jobs), os.cpu_count() or 1))
    shares = [jobs[i::processes] for i in range(processes)]
    barrier = context.Barrier(processes + 1)
    results = context.Queue()
    workers = [context.Process(target=load_worker,
                               args=(kind, port, share, size, users, barrier, results, pipelining),
                               daemon=True) for share in shares]
    for worker in workers:
        worker.start()
    merged = Outcome()
    try:
        try:
            barrier.wait(timeout=START_TIMEOUT * 2)
        except threading.BrokenBarrierError:
            raise RuntimeError("the load generator processes did not start") from None
        started, cpu_before = time.perf_counter(), server_cpu()
        for _ in workers:
            try:
                part = results.get(timeout=RUN_TIMEOUT + SOCKET_TIMEOUT * 2)
            except queue.Empty:
                raise RuntimeError("a load generator process sent no result") from None
            merged.latencies += part["latencies"]
            merged.messages += part["messages"]
            merged.octets += part["octets"]
            merged.errors += part["errors"]
            merged.notes += part["notes"]
        settle_until = time.monotonic() + SETTLE_TIMEOUT
        while not done(merged) and time.monotonic() < settle_until:
            time.sleep(0.002)
        elapsed, cpu = time.perf_counter() - started, server_cpu() - cpu_before
    finally:
        for worker in workers:
            join_or_kill(worker, WORKER_END_TIMEOUT)
    return elapsed, cpu, merged


def join_or_kill(process: multiprocessing.process.BaseProcess, timeout: float) -> None:
    """Wait up to ``timeout`` for a child process to end, then kill it if it has not."""
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(KILLED_PROCESS_TIMEOUT)


# --- The floor under one connection ------------------------------------------------

# MAIL, RCPT, DATA and the text each wait for their reply (without --pipelining).
ROUND_TRIPS_PER_MESSAGE = 4
FLOOR_ROUND_TRIPS = 2000
FLOOR_DELIVERIES = 200


def one_connection_floor(base: Path) -> str:
    """What a message costs at one connection on this machine, before any server's own work.

    At one connection a message is four round trips, one after the other,
    and one durable delivery, and nothing overlaps them. Each is measured
    bare: a line and its reply between two processes over 127.0.0.1, and a
    2 KB message through pymailsrv's ``MaildirStore.deliver`` (``tmp/``,
    fsync, ``new/``, fsync) with no network. On a virtual machine whose idle
    CPUs halt, waking the process on the other CPU is a trip through the
    hypervisor, and a round trip can cost more than a server's work on the
    command. No server that stores mail this way can deliver more than one
    message per this sum at 2 KB x 1.
    """
    round_trip = statistics.median(loopback_round_trips(FLOOR_ROUND_TRIPS))
    delivery = statistics.median(delivery_times(base, FLOOR_DELIVERIES))
    floor = ROUND_TRIPS_PER_MESSAGE * round_trip + delivery
    return (f"one connection's floor here: {ROUND_TRIPS_PER_MESSAGE} round trips of {round_trip * 1000:.3f} ms "
            f"(a line and its reply between two processes, median of {FLOOR_ROUND_TRIPS:,}) and a 2 KB "
            f"delivery of {delivery * 1000:.3f} ms (MaildirStore.deliver, median of {FLOOR_DELIVERIES}), "
            f"{floor * 1000:.2f} ms a message: at most {1 / floor:,.0f} messages/s at 2 KB x 1 "
            f"for a server that stores mail this way")


def compile_pymailsrv() -> str:
    """Compile pymailsrv's modules to bytecode, as pip does when it installs
    a package, so that start-up is timed as an installed server starts.

    Run from a source tree under ``PYTHONDONTWRITEBYTECODE`` (set in some
    containers and CI machines), every start would first compile its forty
    modules: about 0.1 s that an installed server never spends. Returns a
    note for the report.
    """
    package = Path(importlib.util.find_spec("pymailsrv").origin).parent
    if compileall.compile_dir(package, quiet=1):
        return f"start-up from compiled modules (compileall {package}, as pip does on install)"
    return f"could not compile {package} (compileall failed): start-up may include compiling it"


FILE_CREATIONS = 200
# An empty file took 0.02-0.04 ms to make on our 2-CPU VM's ext4 (no
# journal), and 0.2-0.6 ms for nine minutes after 40,000 files were
# deleted: the inode allocator steps over every inode freed in the last
# minute, or in the last six while the block that holds it is not yet
# written back (recently_deleted() in the kernel's fs/ext4/ialloc.c).
SLOW_FILE_CREATION_SECONDS = 100e-6
# How often to look again while it is slow, and how far apart: up to 90 s,
# and the syncs on top. A sync writes the freed inodes back, so a minute
# after the deletions is enough: the last run's data root, for one, is
# synced once it is removed.
FILE_SYSTEM_SETTLE_LOOKS = 18
FILE_SYSTEM_SETTLE_STEP_SECONDS = 5.0


def file_creation_seconds(directory: Path) -> float:
    """The median time to make one empty file in a new ``directory``."""
    directory.mkdir()
    times = []
    for number in range(FILE_CREATIONS):
        started = time.perf_counter()
        os.close(os.open(directory / str(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def file_creation_note(base: Path) -> str:
    """What making one empty file costs here, once it is no longer slow or
    after FILE_SYSTEM_SETTLE_LOOKS looks; a warning if it still is."""
    started = time.monotonic()
    creation = file_creation_seconds(base / "file-creation-0")
    looks = 0
    while creation > SLOW_FILE_CREATION_SECONDS and looks < FILE_SYSTEM_SETTLE_LOOKS:
        looks += 1
        progress(f"making an empty file took {creation * 1000:.3f} ms: slow, as on an ext4 without a "
                 f"journal in the minutes after many files were deleted; waiting for that to pass "
                 f"(look {looks} of {FILE_SYSTEM_SETTLE_LOOKS}, {FILE_SYSTEM_SETTLE_STEP_SECONDS:.0f} s apart)")
        os.sync()
        time.sleep(FILE_SYSTEM_SETTLE_STEP_SECONDS)
        creation = file_creation_seconds(base / f"file-creation-{looks}")
    note = f"making an empty file took {creation * 1000:.3f} ms (median of {FILE_CREATIONS})"
    if looks:
        note += f", after {time.monotonic() - started:.0f} s of waiting for the file system to settle"
    if creation > SLOW_FILE_CREATION_SECONDS:
        note += (": still slow, as on an ext4 without a journal in the minutes after many files were "
                 "deleted (a test suite's temporary files, say). Every message makes a file, on either "
                 "server: wait a few minutes and run again")
    return note


def loopback_round_trips(count: int) -> list[float]:
    """Seconds for each of ``count`` lines sent to another process over HOST to be answered."""
    with socket.create_server((HOST, 0)) as listener:
        listener.settimeout(START_TIMEOUT)
        answerer = multiprocessing.get_context("spawn").Process(
            target=answer_lines, args=(listener.getsockname(),), daemon=True)
        answerer.start()
        times: list[float] = []
        try:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(SOCKET_TIMEOUT)
                for _ in range(count):
                    started = time.perf_counter()
                    connection.sendall(b"NOOP\r\n")
                    if not connection.recv(1024):
                        raise RuntimeError("the answering process closed the connection")
                    times.append(time.perf_counter() - started)
        finally:
            join_or_kill(answerer, SOCKET_TIMEOUT)
    return times


def answer_lines(address: tuple[str, int]) -> None:
    """The other process of ``loopback_round_trips``: a reply to every line, until it closes."""
    with socket.create_connection(address, timeout=CONNECT_TIMEOUT) as connection:
        connection.settimeout(SOCKET_TIMEOUT)
        while connection.recv(1024):
            connection.sendall(b"250 OK\r\n")


def delivery_times(base: Path, count: int) -> list[float]:
    """Seconds for each of ``count`` 2 KB messages stored durably, in a Maildir of their own."""
    from pymailsrv.maildir import MaildirStore

    store = MaildirStore(base / "floor")
    store.create_maildir("floor")
    message = make_message(0, SIZES["2KB"], "floor")
    times = []
    for _ in range(count):
        started = time.perf_counter()
        store.deliver("floor", message)
        times.append(time.perf_counter() - started)
    return times


# --- Scenarios ----------------------------------------------------------------------


@dataclass
class Record:
    """One row of the report, and one record of ``--json``."""

    server: str
    scenario: str
    size: str | None
    connections: int | None
    msgs_per_s: float | None = None
    msgs_per_s_min: float | None = None
    msgs_per_s_max: float | None = None
    mb_per_s: float | None = None  # POP3: median of message octets retrieved per second, in 10**6
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_ms_per_msg: float | None = None
    rss_mb: float | None = None
    messages: int | None = None
    errors: int = 0
    note: str = ""


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile: the smallest value that ``fraction`` of
    the values are at most (of 100 latencies, p99 is the 99th, not the 100th)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class Tally:
    """One server's runs of one scenario, added up as they come in."""

    server: ServerProcess
    record: Record
    users: list[str]  # whom its load is for: SMTP recipients (Site.recipients) or POP3 maildrops
    rates: list[float] = field(default_factory=list)
    byte_rates: list[float] = field(default_factory=list)  # POP3: MB/s
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0
    messages: int = 0  # delivered (SMTP) or retrieved (POP3)
    failed: bool = False

    def add(self, outcome: Outcome, elapsed: float, cpu: float, messages: int) -> None:
        """One run's figures: ``messages`` counted by the scenario (for SMTP, those in new/)."""
        self.cpu += cpu
        self.messages += messages
        self.rates.append(messages / elapsed)
        self.latencies += outcome.latencies
        self.record.errors += outcome.errors
        if outcome.notes and not self.record.note:
            self.record.note = outcome.notes[0][:80]


def summarise(tally: Tally) -> Record:
    """The record of one server's runs of one scenario, from its tally."""
    record = tally.record
    record.msgs_per_s = statistics.median(tally.rates)
    record.msgs_per_s_min, record.msgs_per_s_max = min(tally.rates), max(tally.rates)
    if tally.byte_rates:
        record.mb_per_s = statistics.median(tally.byte_rates)
    record.p50_ms = _ms(percentile(tally.latencies, 0.50))
    record.p99_ms = _ms(percentile(tally.latencies, 0.99))
    record.cpu_ms_per_msg = tally.cpu * 1000 / tally.messages if tally.messages else None
    record.rss_mb = tally.server.memory_mb("VmHWM")
    record.messages = tally.messages
    return record


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# What a server that fails to start, or fails a run, makes the bench raise.
RUN_FAILURES = (RuntimeError, OSError, smtplib.SMTPException, poplib.error_proto)


def in_turn(factories: dict[str, Callable[[], ServerProcess]], record_for: Callable[[str], Record],
            users_for: Callable[[str], list[str]], runs: int, one_run: Callable[[Tally], None],
            warm_up: Callable[[Tally], object] | None = None) -> list[Record]:
    """One scenario on each server, their runs taken in turn, the order
    reversed every other run (pymailsrv, peer; peer, pymailsrv; ...).

    All of one server's runs and then all of the other's would lay any
    drift of the machine over those seconds (a noisy neighbour, a disk
    still busy with what was written or deleted before) on one of them;
    in turn, it weighs on both alike. Each server is started fresh for the
    scenario, given its ``warm_up`` (untimed) if there is one, and idles
    while the other is driven. One that fails to start, or fails a run,
    gets a row saying so; the others go on.
    """
    records = {name: record_for(name) for name in factories}
    with contextlib.ExitStack() as stack:
        tallies = []
        for name, factory in factories.items():
            try:
                tallies.append(Tally(stack.enter_context(running(factory)), records[name], users_for(name)))
            except (RuntimeError, OSError) as error:
                records[name].note = failure(error)
        for run in range(runs):
            for tally in tallies if run % 2 == 0 else tallies[::-1]:
                if tally.failed:
                    continue
                try:
                    if run == 0 and warm_up is not None:
                        warm_up(tally)
                    one_run(tally)
                except RUN_FAILURES as error:
                    tally.record.note, tally.failed = failure(error), True
                    tally.server.stop()  # whatever it is still doing, not while the other is measured
        for tally in tallies:
            if not tally.failed:
                summarise(tally)
    return list(records.values())


def smtp_scenario(factories: dict[str, Callable[[], ServerProcess]], site: Site, size_name: str,
                  connections: int, messages: int, runs: int, pipelining: bool) -> list[Record]:
    """One SMTP scenario on each server, in turn (``in_turn``)."""
    return in_turn(factories, lambda name: Record(name, "smtp", size_name, connections), site.recipients, runs,
                   lambda tally: smtp_run(tally, site, size_name, connections, messages, pipelining))


def smtp_run(tally: Tally, site: Site, size_name: str, connections: int, messages: int,
             pipelining: bool) -> None:
    """One run of ``messages`` over ``connections``, added to ``tally``."""
    users = tally.users
    before = site.count_new(users)
    jobs = [list(range(start, messages, connections)) for start in range(connections)]
    elapsed, cpu, outcome = run_load("smtp", tally.server.addresses["smtp"][1], jobs, SIZES[size_name], users,
                                     lambda merged: site.count_new(users) - before >= merged.messages,
                                     tally.server.cpu_seconds, pipelining)
    in_maildir = site.count_new(users) - before
    tally.add(outcome, elapsed, cpu, in_maildir)
    if in_maildir < outcome.messages:
        tally.record.note = f"{outcome.messages - in_maildir} acknowledged but not in new/"


def pop3_scenario(factories: dict[str, Callable[[], ServerProcess]], site: Site, size_name: str,
                  clients: int, runs: int) -> list[Record]:
    """One POP3 scenario on each server, in turn (``in_turn``), over the same maildrops.

    Each server first makes one untimed pass. A server's first session on a
    maildrop does one-off work: both servers move new/ to cur/ and mark
    what was retrieved as seen (renames), and Dovecot builds its index. The
    timed runs then measure the steady state, whatever ``runs`` is.
    """
    users = site.pop3_users[size_name][:clients]
    return in_turn(factories, lambda name: Record(name, "pop3", size_name, clients), lambda name: users, runs,
                   lambda tally: pop3_run(tally, site, clients), warm_up=pop3_load)


def pop3_load(tally: Tally) -> tuple[float, float, Outcome]:
    """Every client logs in, retrieves its whole maildrop and quits."""
    return run_load("pop3", tally.server.addresses["pop3"][1], tally.users, 0, [], lambda merged: True,
                    tally.server.cpu_seconds)


def pop3_run(tally: Tally, site: Site, clients: int) -> None:
    """One timed ``pop3_load``, added to ``tally``."""
    elapsed, cpu, outcome = pop3_load(tally)
    tally.add(outcome, elapsed, cpu, outcome.messages)
    tally.byte_rates.append(outcome.octets / elapsed / 1e6)
    if outcome.messages != clients * site.pop3_messages and not tally.record.note:
        # Both servers must serve the same maildrops, all of them.
        tally.record.note = f"retrieved {outcome.messages} of {clients} x {site.pop3_messages} messages"


def idle_connections_rss(server: ServerProcess, protocol: str, count: int) -> Record:
    """RSS with ``count`` connections open, each greeted (so its thread exists), then idle."""
    record = Record(server.name, f"rss-{count}-idle-{protocol}", None, count)
    port = server.addresses[protocol][1]
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT)
            sockets.append(sock)
            greeting = sock.recv(512)  # the server has a session for it, unless it refused
            if not greeting.startswith((b"220 ", b"+OK")):
                raise ConnectionRefusedError(f"refused: {greeting[:40]!r}")
        time.sleep(0.5)
        record.rss_mb = server.memory_mb("Pss")
    except OSError as error:
        record.note = f"connection {len(sockets)}: {error!r}"[:80]
        record.rss_mb = server.memory_mb("Pss")
    finally:
        for sock in sockets:
            sock.close()
    return record


def big_message_rss(server: ServerProcess, site: Site, octets: int) -> Record:
    """Peak RSS while one message of ``octets`` streams in, and how much it rose."""
    record = Record(server.name, "rss-100MB-message", "100MB", 1)
    port = server.addresses["smtp"][1]
    before = server.memory_mb("Pss")
    peak = [before]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], server.memory_mb("Pss"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    line = b"x" * 76 + b"\r\n"
    chunk = line * (1024 * 1024 // len(line))
    try:
        with smtplib.SMTP(HOST, port, timeout=SOCKET_TIMEOUT) as client:
            client.ehlo("bench.localhost")
            client.mail("bench@localhost")
            client.rcpt(f"{site.smtp_users[0]}@localhost")
            code, _ = client.docmd("DATA")
            if code != 354:
                raise smtplib.SMTPDataError(code, b"DATA refused")
            client.sock.sendall(b"Subject: big\r\n\r\n")
            for _ in range(octets // len(chunk)):
                client.sock.sendall(chunk)
            client.sock.sendall(b".\r\n")
            code, text = client.getreply()
            if code != 250:
                record.note = f"{code} {text.decode(errors='replace')}"[:80]
    except (OSError, smtplib.SMTPException) as error:
        record.note = repr(error)[:80]
    finally:
        sampling.set()
        sampler.join(timeout=5)
    record.rss_mb = peak[0]
    record.note = record.note or f"+{peak[0] - before:.1f} MB over {before:.1f} MB before"
    return record


# --- The run as a whole -----------------------------------------------------------------


@contextlib.contextmanager
def running(server_factory) -> Iterator[ServerProcess]:
    server = server_factory()
    try:
        yield server
    finally:
        server.stop()


def attempt(records: list[Record], fallback: Record, server_factory, measure) -> None:
    """Start a server, ``measure(server)`` into a record; a failure becomes a noted row.

    One scenario that breaks (a server that will not start, a refused
    connection) should not cost the figures of all the others.
    """
    try:
        with running(server_factory) as server:
            records.append(measure(server))
    except RUN_FAILURES as error:
        fallback.note = failure(error)
        records.append(fallback)


def failure(error: Exception) -> str:
    """The note of a row whose server failed to start or to serve."""
    return f"failed: {error}"[:100]


def filesystem_of(path: Path) -> str:
    """The file system type under ``path`` (fsync costs differ a lot between them)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def aiosmtpd_available() -> bool:
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark pymailsrv (SMTP and POP3) against a peer.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 KB x 10 connections SMTP, a small POP3 run, idle RSS")
    parser.add_argument("--json", metavar="PATH", help="also write every record as JSON to PATH")
    parser.add_argument("--peer", choices=["aiosmtpd", "postfix-smtp-source", "dovecot", "none"],
                        default="aiosmtpd",
                        help="what to compare with (default aiosmtpd, if installed); dovecot runs "
                             "the POP3 scenarios only, against a private Dovecot if it is installed")
    parser.add_argument("--messages", type=int, help="SMTP messages per run (default 600 for 2 KB, 300 for 100 KB)")
    parser.add_argument("--users", type=int, default=10, help="SMTP recipients, round robin (default 10)")
    parser.add_argument("--pipelining", action="store_true",
                        help="SMTP clients send MAIL, RCPT and DATA in one write (RFC 2920) where the "
                             "server offers PIPELINING; one command at a time where it does not")
    parser.add_argument("--runs", type=int, default=RUNS, help="runs per scenario; the median is reported")
    parser.add_argument("--tmpdir", help="where the temporary data roots go (its file system matters)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="pymailsrv's worker processes, 'start --processes' (default: one per CPU)")
    # The peer server's own entry point (this script, in a subprocess).
    parser.add_argument("--serve-aiosmtpd", metavar="ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--max-message-size", type=int, default=33554432, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve_aiosmtpd:
        serve_aiosmtpd(Path(args.serve_aiosmtpd), args.max_message_size)
        return 0

    # SIGTERM ends the script like Ctrl-C does, through the finally clauses.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from pymailsrv.server import raise_open_files_limit

    raise_open_files_limit(IDLE_CONNECTIONS * 2 + 256)  # our side of the idle connections, and the peer's
    notes: list[str] = []
    records: list[Record] = []
    base = Path(tempfile.mkdtemp(prefix="pymailsrv-bench-", dir=args.tmpdir))
    try:
        records = run_all(args, base, notes)
    finally:
        ServerProcess.stop_all()
        shutil.rmtree(base, ignore_errors=True)
        os.sync()  # the freed inodes written back: a run a minute from now makes files at full speed
    report(records, notes)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(record) for record in records], indent=2) + "\n")
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0


def run_all(args: argparse.Namespace, base: Path, notes: list[str]) -> list[Record]:
    quick = args.quick
    runs = max(1, args.runs)
    smtp_plan = [("2KB", 10)] if quick else [(size, c) for size in SIZES for c in SMTP_CONCURRENCY]
    pop3_plan = [("2KB", 1)] if quick else [(size, clients) for size in SIZES for clients in POP3_CLIENTS]
    pop3_messages = 100 if quick else POP3_MAILDROP_MESSAGES

    def messages_for(size_name: str) -> int:
        if args.messages:
            return args.messages
        return 200 if quick else (600 if size_name == "2KB" else 300)

    peers: list[str] = []
    dovecot: str | None = None
    if args.peer == "aiosmtpd":
        if aiosmtpd_available():
            peers.append("aiosmtpd")
        else:
            notes.append("aiosmtpd is not installed (pip install '.[bench]'): no peer figures")
    elif args.peer == "postfix-smtp-source":
        notes.append("smtp-source (Postfix) found at " + shutil.which("smtp-source")
                     if shutil.which("smtp-source") else
                     "smtp-source (Postfix) is not installed here: compare with issue 9's reference figures")
        if shutil.which("smtp-source"):
            peers.append("postfix-smtp-source")
    elif args.peer == "dovecot":
        # Dovecot is the POP3 peer, so with it the run is about POP3 only.
        notes.append("--peer dovecot runs the POP3 scenarios only (--peer aiosmtpd for SMTP and memory)")
        smtp_plan = []
        dovecot, found = find_dovecot()
        if dovecot:
            peers.append("dovecot")
            notes.append(f"Dovecot {found} ({dovecot}), on a private configuration, serving the same maildrops")
        else:
            notes.append(found)

    print(f"data roots in {base} ({filesystem_of(base)}), {os.cpu_count()} CPUs, "
          f"{runs} runs per scenario", file=sys.stderr)
    notes.append(f"pymailsrv runs with --processes {args.processes}")
    if smtp_plan:
        try:
            note = file_creation_note(base)
        except OSError as error:
            note = f"what making a file costs could not be measured: {error}"
        progress(note)  # at once: whoever watches a slow one can stop, wait and run again
        notes.append(note)
    # With --pipelining a message takes as many round trips as its server
    # lets it (aiosmtpd offers no PIPELINING): no one floor for both.
    if not args.pipelining and any(connections == 1 for _, connections in smtp_plan):
        progress("the floor under one connection")
        try:
            notes.append(one_connection_floor(base))
        except (OSError, RuntimeError) as error:
            notes.append(f"the floor under one connection could not be measured: {error}")
    if args.pipelining:
        notes.append("SMTP clients pipeline MAIL, RCPT and DATA where the server offers PIPELINING")
    notes.append(compile_pymailsrv())
    site = make_site(base, "pymailsrv", args.users, pop3_plan, pop3_messages)

    def pymailsrv(max_message_size: int | None = None) -> ServerProcess:
        """A fresh pymailsrv on the bench site, with --processes as asked."""
        return start_pymailsrv(site, base, args.processes, max_message_size)

    records: list[Record] = []

    # Start-up and idle memory, then the SMTP scenarios, each on a fresh server.
    with running(pymailsrv) as server:
        has_smtp = "smtp" in server.addresses
        time.sleep(0.2)  # let start-up settle before reading the idle RSS
        records.append(Record("pymailsrv", "rss-idle", None, 0, rss_mb=server.memory_mb("Pss"),
                              note=f"listening after {server.startup_seconds:.2f} s; "
                                   f"RSS of each process summed: {server.memory_mb('VmRSS'):.1f} MB"))
    if not has_smtp and smtp_plan:
        notes.append("this pymailsrv has no SMTP listener yet (no smtp= in its listening line): "
                     "SMTP scenarios skipped")
        smtp_plan = []

    for size_name, connections in smtp_plan:
        progress(f"smtp {size_name} x {connections} connections")
        count = messages_for(size_name)

        factories = {"pymailsrv": pymailsrv}
        if "aiosmtpd" in peers:
            factories["aiosmtpd"] = lambda: start_aiosmtpd(site)
        records += smtp_scenario(factories, site, size_name, connections, count, runs, args.pipelining)
        if "postfix-smtp-source" in peers:
            attempt(records, Record("pymailsrv (smtp-source)", "smtp", size_name, connections),
                    pymailsrv,
                    lambda server: smtp_source_scenario(server, site, size_name, connections, count))

    pop3_servers = {"pymailsrv": pymailsrv}
    if "aiosmtpd" in peers and pop3_plan:
        notes.append("the peer is SMTP only: no POP3 comparison (--peer dovecot for that)")
    if "dovecot" in peers and pop3_plan:
        # Set up before either server runs: as root, that hands the maildrops
        # to Dovecot's mail user (pymailsrv, as root, still reads them). Both
        # then serve the same messages, in turn.
        try:
            config, port = configure_dovecot(site, base)
        except (OSError, KeyError, RuntimeError) as error:
            notes.append(f"Dovecot could not be configured: {error}")
        else:
            pop3_servers["dovecot"] = lambda: start_dovecot(dovecot, config, port)
    for size_name, clients in pop3_plan:
        progress(f"pop3 {size_name} x {clients} clients over {pop3_messages}-message maildrops")
        records += pop3_scenario(pop3_servers, site, size_name, clients, runs)

    if not quick and args.peer != "dovecot":
        protocol = "smtp" if has_smtp else "pop3"
        progress(f"memory: {IDLE_CONNECTIONS} idle {protocol} connections")
        servers = {"pymailsrv": pymailsrv}
        if "aiosmtpd" in peers and has_smtp:
            servers["aiosmtpd"] = lambda: start_aiosmtpd(site)
        for name, factory in servers.items():
            attempt(records, Record(name, f"rss-{IDLE_CONNECTIONS}-idle-{protocol}", None, IDLE_CONNECTIONS),
                    factory, lambda server: idle_connections_rss(server, protocol, IDLE_CONNECTIONS))
        if has_smtp:
            progress("memory: one 100 MB message")
            # The size limit is raised for this one, so the message is really stored.
            servers = {"pymailsrv": lambda: pymailsrv(BIG_MESSAGE_OCTETS * 2)}
            if "aiosmtpd" in peers:
                servers["aiosmtpd"] = lambda: start_aiosmtpd(site, BIG_MESSAGE_OCTETS * 2)
            for name, factory in servers.items():
                attempt(records, Record(name, "rss-100MB-message", "100MB", 1), factory,
                        lambda server: big_message_rss(server, site, BIG_MESSAGE_OCTETS))
    return records


def smtp_source_scenario(server: ServerProcess, site: Site, size_name: str, connections: int,
                         messages: int) -> Record:
    """Postfix's smtp-source as the load generator against pymailsrv (one run, rate only)."""
    record = Record("pymailsrv (smtp-source)", "smtp", size_name, connections)
    host, port = server.addresses["smtp"]
    before = site.count_new(site.smtp_users)
    argv = ["smtp-source", "-s", str(connections), "-m", str(messages), "-l", str(SIZES[size_name]),
            "-f", "bench@localhost", "-t", f"{site.smtp_users[0]}@localhost", f"{host}:{port}"]
    cpu_before = server.cpu_seconds()
    started = time.perf_counter()
    try:
        subprocess.run(argv, timeout=RUN_TIMEOUT, check=True, capture_output=True)
    except (OSError, subprocess.SubprocessError) as error:
        record.note = repr(error)[:80]
    settle_until = time.monotonic() + SETTLE_TIMEOUT
    while site.count_new(site.smtp_users) - before < messages and time.monotonic() < settle_until:
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    delivered = site.count_new(site.smtp_users) - before
    record.msgs_per_s = record.msgs_per_s_min = record.msgs_per_s_max = delivered / elapsed
    record.cpu_ms_per_msg = (server.cpu_seconds() - cpu_before) * 1000 / delivered if delivered else None
    record.rss_mb = server.memory_mb("VmHWM")
    record.messages = delivered
    return record


def progress(text: str) -> None:
    print(f"... {text}", file=sys.stderr, flush=True)


def report(records: list[Record], notes: list[str]) -> None:
    def number(value: float | None, digits: int = 1) -> str:
        return "" if value is None else f"{value:,.{digits}f}"

    rows = []
    for record in records:
        rate = ""
        if record.msgs_per_s is not None:
            rate = f"{record.msgs_per_s:,.0f} ({record.msgs_per_s_min:,.0f}-{record.msgs_per_s_max:,.0f})"
        rows.append([record.server, record.scenario, record.size or "", record.connections, rate,
                     number(record.mb_per_s), number(record.p50_ms, 2), number(record.p99_ms, 2),
                     number(record.cpu_ms_per_msg, 2), number(record.rss_mb), record.errors or "", record.note])
    print(tabulate(rows, headers=["server", "scenario", "size", "conns", "msg/s median (min-max)", "MB/s",
                                  "p50 ms", "p99 ms", "CPU ms/msg", "RSS MB", "errors", "note"]))

    def pairs(peer_name: str) -> Iterator[tuple[Record, Record]]:
        """(pymailsrv, peer) records of the same scenario, both with a rate."""
        for mine in records:
            for peer in records:
                if (mine.server == "pymailsrv" and peer.server == peer_name and mine.msgs_per_s
                        and peer.msgs_per_s and (peer.scenario, peer.size, peer.connections)
                        == (mine.scenario, mine.size, mine.connections)):
                    yield mine, peer

    ratios = [[mine.scenario, mine.size, mine.connections, f"{mine.msgs_per_s:,.0f}", f"{peer.msgs_per_s:,.0f}",
               f"{mine.msgs_per_s / peer.msgs_per_s:.2f}x"] for mine, peer in pairs("aiosmtpd")]
    if ratios:
        print("\npymailsrv / aiosmtpd+Maildir (delivered messages/s, same run):")
        print(tabulate(ratios, headers=["scenario", "size", "conns", "pymailsrv", "aiosmtpd", "ratio"]))
    ratios = [[mine.scenario, mine.size, mine.connections, f"{mine.msgs_per_s:,.0f}", f"{peer.msgs_per_s:,.0f}",
               f"{mine.msgs_per_s / peer.msgs_per_s:.2f}x", number(mine.mb_per_s, 2), number(peer.mb_per_s, 2),
               f"{mine.mb_per_s / peer.mb_per_s:.2f}x" if mine.mb_per_s and peer.mb_per_s else ""]
              for mine, peer in pairs("dovecot")]
    if ratios:
        print("\npymailsrv / Dovecot (messages and MB retrieved per second, same maildrops, same run):")
        print(tabulate(ratios, headers=["scenario", "size", "clients", "pymailsrv msg/s", "dovecot msg/s",
                                        "ratio", "pymailsrv MB/s", "dovecot MB/s", "ratio"]))
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        ServerProcess.stop_all()
