"""An orderly stop (SIGTERM, or MailServer.stop): each session finishes the
command in hand, then hears why the server goes (RFC 5321 §3.8: 421).

Cut off in the middle of a reply, a client whose message was already on disk
would not hear its 250 and would send the message again (RFC 5321 §6.1);
cut off without a word, it cannot tell a stop from a fault.
"""

from __future__ import annotations

import threading
import time

import pytest

from pymailsrv.config import ConfigError
from pymailsrv.server import STOP_DRAIN_SECONDS, MailServer
from pymailsrv.smtp import SmtpSession
from tests.conftest import PASSWORD, RawClient, wait_until
from tests.test_crash import ServerProcess

SHUTTING_DOWN_421 = b"421 4.3.2 test.example service shutting down, try again later\r\n"
POP3_SHUTTING_DOWN = b"-ERR [SYS/TEMP] server shutting down, try again later\r\n"
# Long enough that the stop surely comes while the reply is being made.
REPLY_DELAY_MS = 500


def stop_in_background(server) -> threading.Thread:
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    return stopping


def test_an_idle_smtp_client_hears_421(start_server, raw):
    server = start_server(hostname="test.example")
    client = raw(server.addresses["smtp"])
    client.line()
    assert client.command("EHLO client.example").startswith(b"250")
    while client.line().startswith(b"250-"):
        pass
    server.stop()
    assert client.line() == SHUTTING_DOWN_421
    assert client.closed()


def test_the_reply_in_hand_goes_out_before_the_421(start_server, raw):
    server = start_server(hostname="test.example", faults=[f"smtp:NOOP=delay {REPLY_DELAY_MS}"])
    client = raw(server.addresses["smtp"])
    client.line()
    client.send(b"NOOP\r\n")
    wait_until(lambda: server.context.faults.faults[0].fired == 1, what="the session has NOOP in hand")
    stopping = stop_in_background(server)
    time.sleep(0.1)
    client.send(b"RSET\r\n")  # after the stop began: never run
    assert client.line() == b"250 2.0.0 OK\r\n"
    assert client.line() == SHUTTING_DOWN_421
    stopping.join()


def test_a_long_delay_in_hand_ends_when_the_server_stops(start_server, raw):
    # A sleep stop() could not cut: it waited STOP_DRAIN_SECONDS, and left the
    # session thread asleep for the rest of the delay (here 30 s).
    server = start_server(hostname="test.example", faults=["smtp:NOOP=delay 30000"])
    client = raw(server.addresses["smtp"])
    client.line()
    client.send(b"NOOP\r\n")
    wait_until(lambda: server.context.faults.faults[0].fired == 1, what="the session has NOOP in hand")
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < STOP_DRAIN_SECONDS
    assert client.line() == b"250 2.0.0 OK\r\n"
    assert client.line() == SHUTTING_DOWN_421
    wait_until(lambda: not [thread for thread in threading.enumerate() if "process_request" in thread.name],
               what="the session's thread has ended")


def test_a_pop3_session_stopped_before_quit_deletes_nothing(start_server, raw, add_user, store):
    add_user("alice")
    store.deliver("alice", b"Subject: keep me\n\nhello\n")
    server = start_server()
    client = raw(server.addresses["pop3"])
    client.line()
    client.command("USER alice")
    assert client.command(f"PASS {PASSWORD}").startswith(b"+OK")
    assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
    server.stop()
    assert client.line() == POP3_SHUTTING_DOWN
    assert len(store.messages("alice")) == 1  # RFC 1939 §6: no QUIT, no UPDATE


def test_sigterm_lets_every_session_finish_the_reply_in_hand(root, add_user):
    # One process: injected faults count per process. Worker processes stop
    # the same way, each on the SIGTERM the main process sends it.
    add_user("alice")
    server = ServerProcess(root, "--fault", f"smtp:NOOP=delay {REPLY_DELAY_MS}", "--trace")
    try:
        server.wait_listening()
        clients = [RawClient(server.addresses["smtp"]) for _ in range(4)]
        try:
            for client in clients:
                client.line()
                client.send(b"NOOP\r\n")
            wait_until(lambda: server.output().count("FAULT injected") == len(clients),
                       what="every session has NOOP in hand")
            server.process.terminate()
            for client in clients:
                assert client.line() == b"250 2.0.0 OK\r\n"
                assert client.line().startswith(b"421 4.3.2 ")
            assert server.wait_exit() == 0
        finally:
            for client in clients:
                client.close()
    finally:
        server.stop()


def test_a_session_whose_close_fails_is_still_let_go(start_server, raw, monkeypatch):
    # A bug in a session's clean-up must not leave the connection counted as
    # open: stop() would wait for it until its deadline.
    def broken_close(session):
        raise RuntimeError("a bug in close()")

    monkeypatch.setattr(SmtpSession, "close", broken_close)
    server = start_server(hostname="test.example")
    client = raw(server.addresses["smtp"])
    client.line()
    assert client.command("QUIT").startswith(b"221")
    assert client.closed()
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0


def test_a_second_server_on_the_same_data_root_is_refused_until_the_first_stops(root, add_user):
    # Two relays on one queue would each deliver every message: one copy too many.
    add_user("alice")
    first = ServerProcess(root, "--processes", "2").wait_listening()
    try:
        second = ServerProcess(root)
        try:
            assert second.wait_exit() == 1
        finally:
            second.stop()
        assert second.output().strip().splitlines()[-1] == (
            f"Error: another pymailsrv is serving {str(root)!r} already: one data root takes one server")
    finally:
        first.stop()
    again = ServerProcess(root).wait_listening()  # the lock went with the first server
    again.stop()


def test_the_embedded_server_holds_the_data_root_while_it_runs(start_server, root):
    first = start_server()
    with pytest.raises(ConfigError, match=r"^another pymailsrv is serving .* already: one data root takes one server$"):
        MailServer(first.settings).start()
    first.stop()
    start_server().stop()
