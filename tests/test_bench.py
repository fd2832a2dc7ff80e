"""The benchmark's own POP3 reader (scripts/bench.py) against a real server.

The bench reads RETR responses in bulk rather than with ``poplib``'s
line-at-a-time ``retr`` (which made the load generator the bottleneck), so
its MB/s must still count exactly what ``poplib`` counts, and leave the
session in step for the next command.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import PASSWORD

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
