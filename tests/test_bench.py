"""The benchmark's own SMTP and POP3 client code (scripts/bench.py) against a real server.

The bench reads RETR responses in bulk rather than with ``poplib``'s
line-at-a-time ``retr`` (which made the load generator the bottleneck), so
its MB/s must still count exactly what ``poplib`` counts, and leave the
session in step for the next command. It sends mail with its own
``send_transaction`` rather than ``smtplib``'s ``sendmail``, so that must
deliver the text as sent, one command at a time or pipelined, and report
a refusal. Last, its bookkeeping: the two servers' runs taken in turn, a
row for a server that fails, a bounded wait for a slow file system, and
its percentiles.
"""

from __future__ import annotations

import email
import importlib.util
import smtplib
import sys
from pathlib import Path

import pytest

from tests.conftest import CLIENT_TIMEOUT, PASSWORD

BENCH_PATH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"

MESSAGES = [
    b"Subject: plain\n\nhello\n",
    b"Subject: dots\n\n.\n..two\n.three\nend\n",
    b"",
    b"no line end at the end",
    b"Subject: long\n\n" + b"The quick brown fox jumps over the lazy dog.\n" * 3000,
]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # its dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["bench"]


def test_bulk_retr_counts_what_poplib_counts(bench, add_user, store, pop3):
    add_user("alice")
    for message in MESSAGES:
        store.deliver("alice", message)
    client = pop3()
    client.user("alice")
    client.pass_(PASSWORD)
    for number in range(1, len(MESSAGES) + 1):
        by_poplib = client.retr(number)[2]
        assert bench.retrieve(client, number) == by_poplib
    # Each response was read to its end and no further: the session is in step.
    assert client.noop() == b"+OK"


def test_bulk_retr_of_a_missing_message_is_an_error(bench, add_user, pop3):
    add_user("alice")
    client = pop3()
    client.user("alice")
    client.pass_(PASSWORD)
    with pytest.raises(bench.poplib.error_proto, match="-ERR"):
        bench.retrieve(client, 1)
    assert client.noop() == b"+OK"


def test_transactions_deliver_the_text_one_command_at_a_time_and_pipelined(bench, add_user, server, store):
    add_user("alice")
    text = b"Subject: dots\r\n\r\n.\r\n..two\r\n.three\r\nend\r\n"
    with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
        client.ehlo("bench.localhost")
        for pipelining in (False, True):
            bench.send_transaction(client, "bench@localhost", ["alice@localhost"], text, pipelining)
        assert client.noop() == (250, b"2.0.0 OK")
    # 250 came after the text was on disk: it is in the Maildir now.
    delivered = [email.message_from_bytes(path.read_bytes()) for _, path in store.messages("alice")]
    assert [message.get_payload() for message in delivered] == [".\n..two\n.three\nend\n"] * 2


@pytest.mark.parametrize("pipelining", [False, True])
def test_a_refused_recipient_is_raised_and_the_session_reset(bench, add_user, server, store, pipelining):
    add_user("alice")
    with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
        client.ehlo("bench.localhost")
        with pytest.raises(smtplib.SMTPResponseException) as refused:
            bench.send_transaction(client, "bench@localhost", ["nobody@localhost"], b"hi\r\n", pipelining)
        assert refused.value.smtp_code == 550
        bench.send_transaction(client, "bench@localhost", ["alice@localhost"], b"hi\r\n", pipelining)
    assert len(store.messages("alice")) == 1


# --- How the bench schedules its measurements -----------------------------------------
# These test the script's own bookkeeping, with stand-ins for the servers and
# for the load: the load itself is real in the tests above.


class StandInServer:
    """What a scenario asks of a server, without a process behind it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1

    def memory_mb(self, key: str) -> float:
        return 1.0


def scheduled(bench, monkeypatch, tmp_path, factories, failing_run=None):
    """Run smtp_scenario over stand-ins; return its records and the order the runs came in."""
    order = []

    def one_run(tally, site, size_name, connections, messages, pipelining):
        order.append(tally.record.server)
        if len(order) == failing_run:
            raise RuntimeError("connection refused")
        tally.rates.append(100.0)
        tally.messages += messages

    monkeypatch.setattr(bench, "smtp_run", one_run)
    site = bench.Site(tmp_path, ["user0"], ["peer0"])
    return bench.smtp_scenario(factories, site, "2KB", 1, 10, 3, False), order


def test_the_two_servers_runs_are_taken_in_turn(bench, monkeypatch, tmp_path):
    servers = {name: StandInServer(name) for name in ("pymailsrv", "aiosmtpd")}
    records, order = scheduled(bench, monkeypatch, tmp_path, {name: (lambda s=s: s) for name, s in servers.items()})
    assert order == ["pymailsrv", "aiosmtpd", "aiosmtpd", "pymailsrv", "pymailsrv", "aiosmtpd"]
    assert [(record.server, record.msgs_per_s, record.messages) for record in records] == [
        ("pymailsrv", 100.0, 30), ("aiosmtpd", 100.0, 30)]
    assert all(server.stops == 1 for server in servers.values())


def test_pop3_servers_warm_up_once_then_take_turns_over_the_same_maildrops(bench, monkeypatch, tmp_path):
    passes = []

    def pop3_load(tally):
        passes.append((tally.record.server, tally.users))
        return 2.0, 0.1, bench.Outcome(messages=4, octets=4_000_000)

    monkeypatch.setattr(bench, "pop3_load", pop3_load)
    site = bench.Site(tmp_path, [], [], {"2KB": ["pop2kb0", "pop2kb1", "pop2kb2"]}, pop3_messages=2)
    servers = {name: StandInServer(name) for name in ("pymailsrv", "dovecot")}
    records = bench.pop3_scenario({name: (lambda s=s: s) for name, s in servers.items()}, site, "2KB", 2, 3)
    # Each server's first pass is untimed; then the timed runs, in turn.
    assert [server for server, _ in passes] == ["pymailsrv", "pymailsrv", "dovecot", "dovecot", "dovecot",
                                                "pymailsrv", "pymailsrv", "dovecot"]
    assert all(users == ["pop2kb0", "pop2kb1"] for _, users in passes)
    assert [(record.server, record.scenario, record.msgs_per_s, record.mb_per_s, record.messages, record.note)
            for record in records] == [("pymailsrv", "pop3", 2.0, 2.0, 12, ""), ("dovecot", "pop3", 2.0, 2.0, 12, "")]


def test_each_server_writes_to_recipients_of_its_own(bench, tmp_path):
    site = bench.Site(tmp_path, ["user0", "user1"], ["peer0", "peer1"])
    assert site.recipients("pymailsrv") == ["user0", "user1"]
    assert site.recipients("aiosmtpd") == ["peer0", "peer1"]


def test_a_server_that_will_not_start_gets_a_row_and_the_other_is_measured(bench, monkeypatch, tmp_path):
    def will_not_start():
        raise RuntimeError("aiosmtpd did not start: no module named aiosmtpd")

    records, order = scheduled(bench, monkeypatch, tmp_path,
                               {"pymailsrv": lambda: StandInServer("pymailsrv"), "aiosmtpd": will_not_start})
    assert order == ["pymailsrv"] * 3
    assert records[0].msgs_per_s == 100.0
    assert (records[1].server, records[1].msgs_per_s) == ("aiosmtpd", None)
    assert records[1].note == "failed: aiosmtpd did not start: no module named aiosmtpd"


def test_a_server_whose_run_fails_is_stopped_and_run_no_more(bench, monkeypatch, tmp_path):
    peer = StandInServer("aiosmtpd")
    records, order = scheduled(bench, monkeypatch, tmp_path,
                               {"pymailsrv": lambda: StandInServer("pymailsrv"), "aiosmtpd": lambda: peer},
                               failing_run=2)
    assert order == ["pymailsrv", "aiosmtpd", "pymailsrv", "pymailsrv"]
    assert (records[1].msgs_per_s, records[1].note) == (None, "failed: connection refused")
    assert peer.stops == 2  # at once, and (doing nothing) as the scenario ends
    assert records[0].msgs_per_s == 100.0


@pytest.mark.parametrize("slow_looks, waited", [(0, False), (2, True), (100, True)])
def test_a_slow_file_system_is_waited_for_a_bounded_number_of_looks(bench, monkeypatch, tmp_path,
                                                                      slow_looks, waited):
    looks = []

    def creation_seconds(directory):
        looks.append(directory.name)
        return 1e-3 if len(looks) <= slow_looks else 20e-6

    monkeypatch.setattr(bench, "file_creation_seconds", creation_seconds)
    monkeypatch.setattr(bench.os, "sync", lambda: None)
    monkeypatch.setattr(bench.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(bench, "progress", lambda text: None)
    note = bench.file_creation_note(tmp_path)
    assert len(looks) == 1 + min(slow_looks, bench.FILE_SYSTEM_SETTLE_LOOKS)
    assert ("of waiting for the file system to settle" in note) is waited
    assert note.endswith("wait a few minutes and run again") is (slow_looks > bench.FILE_SYSTEM_SETTLE_LOOKS)


@pytest.mark.parametrize("values, fraction, expected", [
    (list(range(1, 101)), 0.99, 99),  # of 100, p99 is the 99th: the slowest is the 100th
    (list(range(1, 101)), 0.50, 50),
    ([3, 1, 2], 0.99, 3),
    ([7], 0.50, 7),
    ([], 0.50, None),
])
def test_percentiles_are_of_the_nearest_rank(bench, values, fraction, expected):
    assert bench.percentile(values, fraction) == expected
