"""The benchmark's own SMTP and POP3 client code (scripts/bench.py) against a real server.

The bench reads RETR responses in bulk rather than with ``poplib``'s
line-at-a-time ``retr`` (which made the load generator the bottleneck), so
its MB/s must still count exactly what ``poplib`` counts, and leave the
session in step for the next command. It sends mail with its own
``send_transaction`` rather than ``smtplib``'s ``sendmail``, so that must
deliver the text as sent, one command at a time or pipelined, and report
a refusal.
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
