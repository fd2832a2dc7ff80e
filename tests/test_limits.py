"""Connection caps: in all, per client address, and POP3 sessions per user and address.

The caps are Postfix's and Dovecot's ideas (``limits.py`` gives the sources):
500 connections in all, 50 from one client address, counted across every
listener, and 10 logged-in POP3 sessions of one user from one address. Over
a connection cap the accepting thread answers ``421 4.7.0`` (SMTP) or
``-ERR [SYS/TEMP]`` (POP3) itself and closes, so a flood of refused
connections starts no thread. The tests use small caps to reach them, and
127.0.0.2 (on Linux all of 127.0.0.0/8 is loopback) as a second client
address. The last tests show that the caps never stand in the way of a
client under them: connections are given back when their sessions end.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pymailsrv.config import ConfigError, host_and_port, load_settings
from pymailsrv.replies import POP3_TOO_MANY_CONNECTIONS, POP3_TOO_MANY_SESSIONS, R421_TOO_MANY_CONNECTIONS
from pymailsrv.server import ConnectionLimits, Tally, address_family_of, client_host_and_port
from tests.conftest import CLIENT_TIMEOUT, PASSWORD, RawClient, listening_line, wait_for_open

OTHER_ADDRESS = "127.0.0.2"
POP3_IN_USE = b"-ERR [IN-USE] maildrop is locked by another session\r\n"


class ClientFrom(RawClient):
    """A RawClient whose connection comes from ``source`` (a loopback address)."""

    def __init__(self, address: tuple[str, int], source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(address, timeout=CLIENT_TIMEOUT, source_address=(source, 0))
        self.file = self.sock.makefile("rb")


@pytest.fixture
def clients():
    """clients(address, source="127.0.0.1") -> a connected client; all closed at teardown."""
    opened: list[ClientFrom] = []

    def connect(address: tuple[str, int], source: str = "127.0.0.1") -> ClientFrom:
        client = ClientFrom(address, source)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def other_address_usable() -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((OTHER_ADDRESS, 0))
    except OSError:
        return False
    return True


needs_other_address = pytest.mark.skipif(not other_address_usable(),
                                         reason="127.0.0.2 is not a loopback address here")


def wire(reply) -> bytes:
    return reply.head()[0].encode() + b"\r\n"


def refusal_421(server) -> bytes:
    return wire(R421_TOO_MANY_CONNECTIONS.format(host=server.settings.hostname))


def greeted(client: ClientFrom) -> ClientFrom:
    greeting = client.line()
    assert greeting.startswith((b"220 ", b"+OK ")), greeting
    return client


# --- the counters themselves ----------------------------------------------------------


def test_tally_refuses_past_its_limit_and_forgets_keys_at_zero():
    tally = Tally(2)
    assert tally.take("a") and tally.take("a")
    assert not tally.take("a")
    assert tally.take("b")  # another key has a limit of its own
    tally.give_back("a")
    assert tally["a"] == 1 and tally.take("a")
    tally.give_back("a"), tally.give_back("a"), tally.give_back("b")
    assert tally._counts == {}


def test_connection_limits_count_the_total_and_each_address():
    limits = ConnectionLimits(total=3, per_address=2)
    assert limits.admit("192.0.2.1") and limits.admit("192.0.2.1")
    assert not limits.admit("192.0.2.1")  # the address is full
    assert limits.admit("192.0.2.2")
    assert not limits.admit("192.0.2.3")  # the server is full
    assert limits.open == 3
    limits.release("192.0.2.1")
    assert limits.admit("192.0.2.3")
    # A refusal by the address cap must not keep a place in the total.
    assert not limits.admit("192.0.2.1") and limits.open == 3


def test_the_per_address_cap_counts_an_ipv6_client_by_its_48_as_the_throttle_does():
    # It counted each address: one client, holding a whole /48, could open
    # connections from new addresses until the total was used up.
    limits = ConnectionLimits(total=10, per_address=2)
    assert limits.admit("2001:db8::1") and limits.admit("2001:db8:0:1::2")
    assert not limits.admit("2001:db8:0:ffff::3")  # the same /48
    assert limits.admit("2001:db8:1::1")  # another
    limits.release("2001:db8::1")
    assert limits.admit("2001:db8::4")
    # And an IPv4 address written as IPv6 (a dual-stack listener) is that address.
    assert limits.admit("192.0.2.1") and limits.admit("::ffff:192.0.2.1")
    assert not limits.admit("192.0.2.1")


# --- settings ---------------------------------------------------------------------------


def test_caps_default_to_postfix_and_dovecot_values():
    limits = load_settings(config=None).limits
    assert (limits.max_connections, limits.max_connections_per_address,
            limits.pop3_sessions_per_user_address) == (500, 50, 10)


def test_caps_are_read_from_the_limits_table(tmp_path):
    config = tmp_path / "pymailsrv.toml"
    config.write_text("[limits]\nmax_connections = 40\nmax_connections_per_address = 4\n")
    limits = load_settings(config=config).limits
    assert (limits.max_connections, limits.max_connections_per_address) == (40, 4)


@pytest.mark.parametrize("key, why", [("max_connections", "must be 1-10000"),
                                      ("max_connections_per_address", "must be greater than 0"),
                                      ("pop3_sessions_per_user_address", "must be greater than 0")])
def test_a_cap_of_zero_would_lock_everyone_out_and_is_refused(key, why):
    with pytest.raises(ConfigError, match=f"bad value for 'limits.{key}': {why}"):
        load_settings(config=None, overrides={"limits": {key: 0}})


@pytest.mark.parametrize("section, key, cap", [("limits", "max_connections", 10_000), ("relay", "workers", 100)])
def test_a_count_past_its_cap_is_taken_for_a_typo(section, key, cap):
    # 2,000,000 connections made every greeting wait 0.4-0.8 s on the shared
    # table; 500 relay threads could not all start.
    load_settings(config=None, overrides={section: {key: cap}})
    with pytest.raises(ConfigError, match=f"bad value for '{section}.{key}': must be 1-{cap}"):
        load_settings(config=None, overrides={section: {key: cap + 1}})


# --- over the cap, on the wire ------------------------------------------------------------


def test_smtp_connection_over_the_total_cap_gets_421_and_is_closed(start_server, clients):
    server = start_server(limits={"max_connections": 2})
    held = [greeted(clients(server.addresses["smtp"])) for _ in range(2)]
    refused = clients(server.addresses["smtp"])
    assert refused.line() == refusal_421(server)
    assert refused.closed()
    # The connections under the cap are served as before.
    assert held[0].command("NOOP") == b"250 2.0.0 OK\r\n"


def test_refusal_texts_are_exact():
    assert wire(R421_TOO_MANY_CONNECTIONS.format(host="mx.example")) == \
        b"421 4.7.0 mx.example too many connections\r\n"
    assert wire(POP3_TOO_MANY_CONNECTIONS) == b"-ERR [SYS/TEMP] too many connections\r\n"
    assert wire(POP3_TOO_MANY_SESSIONS) == b"-ERR [IN-USE] too many sessions\r\n"


def test_the_total_cap_is_shared_by_every_listener(start_server, clients):
    server = start_server(limits={"max_connections": 2})
    greeted(clients(server.addresses["smtp"]))
    greeted(clients(server.addresses["smtp"]))
    refused = clients(server.addresses["pop3"])
    assert refused.line() == b"-ERR [SYS/TEMP] too many connections\r\n"
    assert refused.closed()


@needs_other_address
def test_per_address_cap_refuses_that_address_only(start_server, clients):
    server = start_server(limits={"max_connections_per_address": 2})
    smtp, pop3 = server.addresses["smtp"], server.addresses["pop3"]
    greeted(clients(smtp))
    greeted(clients(pop3))  # the per-address count spans the listeners too
    refused = clients(smtp)
    assert refused.line() == refusal_421(server)
    assert refused.closed()
    other = greeted(clients(smtp, source=OTHER_ADDRESS))
    assert other.command("NOOP") == b"250 2.0.0 OK\r\n"


def test_refused_connections_start_no_thread(start_server, clients, monkeypatch):
    server = start_server(limits={"max_connections": 1})
    greeted(clients(server.addresses["smtp"]))
    wait_for_open(server, 1)
    started = []
    real_start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda thread: (started.append(thread), real_start(thread)))
    baseline = threading.active_count()
    for _ in range(200):
        refused = ClientFrom(server.addresses["smtp"])
        try:
            assert refused.line() == refusal_421(server)
        finally:
            refused.close()
    assert started == []
    assert threading.active_count() == baseline
    assert server.context.connections.open == 1


def test_a_connection_no_thread_can_start_for_gets_421_and_one_warning(start_server, clients, monkeypatch, caplog):
    # What Thread.start raises at the process limit (ulimit -u). Each such
    # connection logged a traceback, and heard nothing before it was closed.
    server = start_server()
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if getattr(getattr(thread, "_target", None), "__name__", "") == "process_request_thread":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    for _ in range(3):
        refused = clients(server.addresses["smtp"])
        assert refused.line() == refusal_421(server)
        assert refused.closed()
    monkeypatch.undo()
    warnings = [record for record in caplog.records if "cannot start a thread" in record.getMessage()]
    assert len(warnings) == 1 and "Traceback" not in caplog.text
    assert server.context.connections.open == 0
    assert greeted(clients(server.addresses["smtp"])).command("NOOP") == b"250 2.0.0 OK\r\n"


# --- under the cap: never locked out --------------------------------------------------------


def test_sixty_sequential_smtp_connections_from_one_address_all_work(server, clients):
    for _ in range(60):
        client = greeted(clients(server.addresses["smtp"]))
        assert client.command("EHLO client.example").startswith(b"250")
        while not client.line().startswith(b"250 "):
            pass
        assert client.command("QUIT").startswith(b"221 ")
        client.close()
    wait_for_open(server, 0)


def test_connections_dropped_without_quit_are_given_back(start_server, add_user):
    add_user("alice")
    server = start_server(limits={"max_connections_per_address": 3})
    for _ in range(12):  # four times the cap
        client = greeted(ClientFrom(server.addresses["pop3"]))
        client.command("USER alice")
        assert client.command(f"PASS {PASSWORD}").startswith(b"+OK")
        client.close()  # no QUIT: the session must still give its places back
        wait_for_open(server, 0)
    assert server.context.pop3_sessions["alice", "127.0.0.1"] == 0


# --- POP3 sessions per user and address ------------------------------------------------------


def pop3_login(client: ClientFrom, user: str = "alice") -> bytes:
    greeted(client)
    assert client.command(f"USER {user}") == b"+OK send PASS\r\n"
    return client.command(f"PASS {PASSWORD}")


def test_with_the_default_cap_the_maildrop_lock_refuses_a_second_session(server, clients, add_user):
    add_user("alice")
    assert pop3_login(clients(server.addresses["pop3"])).startswith(b"+OK")
    assert pop3_login(clients(server.addresses["pop3"])) == POP3_IN_USE
    assert server.context.pop3_sessions["alice", "127.0.0.1"] == 1  # the refused one gave its place back


@needs_other_address
def test_pop3_cap_per_user_and_address_answers_in_use(start_server, clients, add_user):
    add_user("alice")
    add_user("bob")
    server = start_server(limits={"pop3_sessions_per_user_address": 1})
    pop3 = server.addresses["pop3"]
    first = clients(pop3)
    assert pop3_login(first).startswith(b"+OK")
    assert pop3_login(clients(pop3)) == b"-ERR [IN-USE] too many sessions\r\n"
    # Another user from the same address is not counted with alice ...
    bob = clients(pop3)
    assert pop3_login(bob, "bob").startswith(b"+OK")
    # ... and alice from another address meets only the maildrop lock.
    assert pop3_login(clients(pop3, source=OTHER_ADDRESS)) == POP3_IN_USE
    # Once the first session ends, alice may log in again from here.
    assert first.command("QUIT").startswith(b"+OK")
    first.close()
    deadline = time.monotonic() + 5
    while server.context.pop3_sessions["alice", "127.0.0.1"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert pop3_login(clients(pop3)).startswith(b"+OK")


def test_a_failed_login_takes_no_session_place(start_server, clients, add_user):
    add_user("alice")
    server = start_server(limits={"pop3_sessions_per_user_address": 1})
    client = greeted(clients(server.addresses["pop3"]))
    client.command("USER alice")
    assert client.command("PASS wrong").startswith(b"-ERR [AUTH]")
    assert server.context.pop3_sessions["alice", "127.0.0.1"] == 0
    assert pop3_login(clients(server.addresses["pop3"])).startswith(b"+OK")


# --- out of file descriptors ---------------------------------------------------------------


DESCRIPTOR_LIMIT = 64


def _low_descriptor_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTOR_LIMIT, DESCRIPTOR_LIMIT))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads a process's CPU time from /proc")
def test_out_of_descriptors_the_server_warns_and_waits_rather_than_spin(root, add_user):
    # A hard limit the server cannot raise: it says so at start, and once
    # every descriptor is in use, a connection waits in the kernel's queue
    # while the listener pauses between tries (it used to spin a CPU).
    add_user("alice")
    config = root.parent / "every-connection-from-here.toml"  # no per-address cap to meet first
    config.write_text("[limits]\nmax_connections_per_address = 500\n")
    process = subprocess.Popen([sys.executable, "-m", "pymailsrv", "start", "--root", str(root), "--config",
                                str(config), "--pop3-port", "0", "--smtp-port", "0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=0,
                               preexec_fn=_low_descriptor_limit)
    held: list[socket.socket] = []
    try:
        seen: list[bytes] = []
        port = re.search(rb" smtp=127\.0\.0\.1:(\d+)", listening_line(process, seen)).group(1)
        address = ("127.0.0.1", int(port))
        assert any(b"the open-files limit is 64, short of the 1256 that 500 connections need" in line
                   for line in seen)
        for _ in range(DESCRIPTOR_LIMIT + 16):  # more than the server has descriptors for
            held.append(socket.create_connection(address, timeout=CLIENT_TIMEOUT))
        time.sleep(0.5)  # the last connections wait; the listener keeps trying
        before = _cpu_seconds(process.pid)
        time.sleep(1.0)
        assert _cpu_seconds(process.pid) - before < 0.5  # a spinning listener took a whole CPU
    finally:
        for sock in held:
            sock.close()
        process.terminate()
        _, errors = process.communicate(timeout=CLIENT_TIMEOUT)
    assert b"out of file descriptors: a connection waits unanswered until one is closed" in errors


@pytest.mark.parametrize("accepted, seen", [
    (("127.0.0.1", 4000), ("127.0.0.1", 4000)),
    (("::ffff:127.0.0.1", 4000, 0, 0), ("127.0.0.1", 4000)),  # an IPv4 client of "--host ::"
    (("::1", 4000, 0, 0), ("::1", 4000)),
    (("2001:db8::7", 4000, 0, 0), ("2001:db8::7", 4000)),
])
def test_a_client_is_known_by_one_address_whichever_socket_took_it(accepted, seen):
    # 127.0.0.0/8 in auth.local_networks, the per-address caps and the logs
    # must see an IPv4 client as IPv4 on an IPv6 socket too.
    assert client_host_and_port(accepted) == seen


@pytest.mark.parametrize("host, family, shown", [
    ("127.0.0.1", socket.AF_INET, "127.0.0.1:25"),
    ("0.0.0.0", socket.AF_INET, "0.0.0.0:25"),
    ("::1", socket.AF_INET6, "[::1]:25"),
    ("::", socket.AF_INET6, "[::]:25"),
])
def test_an_ipv6_host_gets_an_ipv6_socket_and_brackets(host, family, shown):
    # "--host ::" failed: socketserver opened an IPv4 socket for any host.
    # (The tests listen on 127.0.0.1 only, so the choice is tested here.)
    assert address_family_of(host) == family
    assert host_and_port(host, 25) == shown
