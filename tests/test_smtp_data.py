"""SMTP DATA and delivery (RFC 5321 §4.1.1.4, §4.4, §4.5.2, §4.5.3.1.6): what gets stored.

The message text ends only at ``<CRLF>.<CRLF>``, loses its dot-stuffing, and
is delivered to every recipient's Maildir before the 250. These tests send
over a real socket and read back the way a user would, over POP3, or look at
the files themselves. They cover the SMTP smuggling sequences of
CVE-2023-51764, bare line ends, over-long lines, over-size messages and
storage failures, and that the session stays in step after each refusal.
"""

from __future__ import annotations

import email.utils
import poplib
import re
import shutil
import smtplib
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymailsrv import replies as R
from pymailsrv.limits import SMTP_TEXT_LINE_MAX
from pymailsrv.smtp import MessageText
from tests.conftest import CLIENT_TIMEOUT, PASSWORD, RawClient
from tests.test_smtp import (  # noqa: F401 - fixtures are used by name
    answer,
    connect,
    exchange,
    greeted,
    hostname,
    read_reply,
    smtp,
    smtp_address,
    wire,
)

DELIVERED = re.compile(rb"250 2\.0\.0 OK (?P<queue_id>[0-9A-F]+)\r\n")


# --- helpers ------------------------------------------------------------------------


def stuff(lines: list[bytes]) -> bytes:
    """The lines as a client sends them after DATA: CRLF ends, dots doubled (§4.5.2)."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def open_transaction(client: RawClient, recipients: list[str], sender: str = "sender@example.org",
                     mail_parameters: str = "") -> None:
    """MAIL, RCPT for each recipient (all must be accepted), DATA up to its 354."""
    assert exchange(client, f"MAIL FROM:<{sender}>{mail_parameters}").startswith(b"250 ")
    for recipient in recipients:
        assert exchange(client, f"RCPT TO:<{recipient}>").startswith(b"250 ")
    assert exchange(client, "DATA") == wire(R.R354_START_DATA)


def send_text(client: RawClient, text: bytes) -> bytes:
    """Send message text that already ends in <CRLF>.<CRLF>; return the one reply."""
    client.send(text)
    return read_reply(client)


def queue_id_of(reply: bytes) -> str:
    match = DELIVERED.fullmatch(reply)
    assert match, reply
    return match["queue_id"].decode()


def deliver(client: RawClient, recipients: list[str], lines: list[bytes], **kwargs: str) -> str:
    """A whole transaction on an EHLO'd client; returns the queue id of the 250."""
    open_transaction(client, recipients, **kwargs)
    return queue_id_of(send_text(client, stuff(lines) + b".\r\n"))


def stored(store, user: str) -> list[bytes]:
    """The files in the user's Maildir, as bytes, in arrival order."""
    return [path.read_bytes() for _, path in store.messages(user)]


def stored_text(store, client: RawClient, text: bytes) -> bytes:
    """Send ``text`` (ending included) to alice alone; the one message stored."""
    open_transaction(client, ["alice@localhost"])
    queue_id_of(send_text(client, text))
    [message] = stored(store, "alice")
    return message


def without_trace(message: bytes) -> bytes:
    """The stored message without the Return-Path: and Received: lines we added."""
    lines = message.split(b"\n")
    assert lines[0].startswith(b"Return-Path: <") and lines[1].startswith(b"Received: from ")
    index = 2
    while lines[index].startswith(b"\t"):
        index += 1
    return b"\n".join(lines[index:])


def pop3_retrieve(address: tuple[str, int], user: str = "alice") -> list[tuple[int, bytes]]:
    """(LIST size, the octets RETR sent with dot-stuffing undone) for every message."""
    client = poplib.POP3(*address, timeout=CLIENT_TIMEOUT)
    try:
        client.user(user)
        client.pass_(PASSWORD)
        messages = []
        for entry in client.list()[1]:
            number, size = entry.split()
            _, lines, octets = client.retr(int(number))
            text = b"".join(line + b"\r\n" for line in lines)
            assert octets == len(text)
            messages.append((int(size), text))
        return messages
    finally:
        client.quit()


def pop3_body(message: bytes) -> bytes:
    """A message as RETR sent it (CRLF), without our trace lines."""
    return without_trace(message.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")


def files_under(path: Path) -> set[Path]:
    return {entry for entry in path.rglob("*")}


# --- a message goes in, and comes out over POP3 byte for byte -------------------------------


ROUND_TRIP_LINES = [
    b"Subject: dots and bytes",
    b"",
    b".",
    b"..",
    b"...",
    b".leading dot",
    b"..two leading dots",
    b"a lone . inside a line",
    b"line ending in a dot.",
    b" .space then dot",
    b"caf\xe9 au lait (latin-1, 8-bit)",
    "grüße, 日本語, emoji \U0001F4EC".encode(),
    b"tab\there and trailing spaces   ",
    b"",
    b"x" * 998,
    b"." + b"y" * 997,
    b"last line",
]


def test_message_round_trips_smtp_to_pop3_byte_for_byte(server, greeted, alice):
    client = greeted()
    deliver(client, ["alice@localhost"], ROUND_TRIP_LINES, mail_parameters=" BODY=8BITMIME")
    [(size, text)] = pop3_retrieve(server.addresses["pop3"])
    assert pop3_body(text) == b"".join(line + b"\r\n" for line in ROUND_TRIP_LINES)
    assert size == len(text)


def test_pop3_wire_bytes_equal_the_smtp_wire_bytes(server, greeted, raw, alice):
    # Both protocols stuff dots the same way (RFC 5321 §4.5.2, RFC 1939 §3):
    # what the client sent after DATA is what RETR sends back after the headers.
    client = greeted()
    deliver(client, ["alice@localhost"], ROUND_TRIP_LINES)
    pop3 = raw(server.addresses["pop3"])
    pop3.line()
    assert pop3.command("USER alice").startswith(b"+OK")
    assert pop3.command(f"PASS {PASSWORD}").startswith(b"+OK")
    assert pop3.command("RETR 1").startswith(b"+OK")
    lines = pop3.multiline()
    assert lines[0].startswith(b"Return-Path: ") and lines[1].startswith(b"Received: ")
    text_start = 2
    while lines[text_start].startswith(b"\t"):  # the Received: continuation lines
        text_start += 1
    assert b"".join(lines[text_start:]) == stuff(ROUND_TRIP_LINES) + b".\r\n"


def test_utf8_message_with_smtputf8_round_trips(server, greeted, alice):
    lines = ["From: Jürgen <jürgen@bücher.example>", "Subject: Grüße", "", "Schöne Grüße aus Köln"]
    client = greeted()
    deliver(client, ["alice@localhost"], [line.encode() for line in lines], sender="jürgen@bücher.example",
            mail_parameters=" SMTPUTF8 BODY=8BITMIME")
    [(size, text)] = pop3_retrieve(server.addresses["pop3"])
    assert pop3_body(text).decode() == "".join(line + "\r\n" for line in lines)
    assert text.startswith("Return-Path: <jürgen@bücher.example>\r\n".encode())
    assert size == len(text)


def test_empty_message_is_delivered_with_only_the_trace_lines(store, greeted, alice):
    message = stored_text(store, greeted(), b".\r\n")
    assert without_trace(message) == b""


def test_stored_message_has_lf_line_ends(store, greeted, alice):
    # The Maildir convention; POP3 turns them back into CRLF.
    client = greeted()
    deliver(client, ["alice@localhost"], [b"Subject: lf", b"", b"one", b"two"])
    [message] = stored(store, "alice")
    assert b"\r" not in message
    assert without_trace(message) == b"Subject: lf\n\none\ntwo\n"


def test_sizes_in_pop3_list_equal_the_octets_retr_sends(server, greeted, alice):
    client = greeted()
    bodies = [[b"Subject: one", b"", b"short"], ROUND_TRIP_LINES, [b"Subject: three", b"", b".", b"\xff\xfe"]]
    for lines in bodies:
        deliver(client, ["alice@localhost"], lines)
    retrieved = pop3_retrieve(server.addresses["pop3"])
    assert len(retrieved) == 3
    assert [size for size, _ in retrieved] == [len(text) for _, text in retrieved]


# --- the end of data: only <CRLF>.<CRLF> -----------------------------------------------------


SMUGGLED = (b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@localhost>\r\nDATA\r\n"
            b"Subject: forged\r\n\r\nforged body\r\n")


@pytest.mark.parametrize("sequence", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"],
                         ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF"])
def test_smuggling_sequence_neither_ends_the_message_nor_starts_another(store, greeted, alice, bob, hostname,
                                                                        sequence):
    # CVE-2023-51764: a relay ahead of us passes these along as text; were
    # any of them an end of data, the rest would run as a forged second message.
    client = greeted()
    open_transaction(client, ["alice@localhost"])
    client.send(b"Subject: smuggling\r\n\r\nbefore" + sequence + SMUGGLED + b".\r\nQUIT\r\n")
    replies = client.file.read()  # everything up to the close
    assert DELIVERED.fullmatch(replies[:-len(wire(R.R221_BYE, host=hostname))])
    assert replies.endswith(wire(R.R221_BYE, host=hostname))
    [message] = stored(store, "alice")
    assert b"MAIL FROM:<evil@example.org>\n" in message
    assert b"forged body\n" in message
    assert stored(store, "bob") == []
    assert b"\r" not in message


@pytest.mark.parametrize("sequence", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"],
                         ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF"])
def test_smuggling_sequence_with_bare_newline_reject_refuses_the_one_message(start_server, greeted, store, alice,
                                                                             bob, sequence):
    server = start_server(smtp={"bare_newline": "reject"})
    client = greeted(server.addresses["smtp"])
    open_transaction(client, ["alice@localhost"])
    reply = send_text(client, b"Subject: smuggling\r\n\r\nbefore" + sequence + SMUGGLED + b".\r\n")
    char = "CR" if sequence == b"\r.\r" else "LF"
    assert reply == wire(R.R550_BARE_LINE_END, char=char)
    assert exchange(client, "NOOP") == wire(R.R250_OK)
    assert stored(store, "alice") == stored(store, "bob") == []


def test_dot_line_after_a_bare_lf_line_is_text(store, greeted, alice):
    client = greeted()
    open_transaction(client, ["alice@localhost"])
    client.send(b"one\n.\r\n")
    client.send(b"two\r\n.\r\n")
    queue_id_of(read_reply(client))
    [message] = stored(store, "alice")
    assert without_trace(message) == b"one\n.\ntwo\n"


def test_dot_then_bare_lf_after_crlf_is_text(store, greeted, alice):
    message = stored_text(store, greeted(), b"one\r\n.\ntwo\r\n.\r\n")
    assert without_trace(message) == b"one\n.\ntwo\n"


def test_end_of_data_split_across_writes_is_still_the_end(store, greeted, alice):
    client = greeted()
    open_transaction(client, ["alice@localhost"])
    for piece in [b"hello\r", b"\n", b".", b"\r", b"\n"]:
        client.send(piece)
        time.sleep(0.02)
    queue_id_of(read_reply(client))
    assert without_trace(stored(store, "alice")[0]) == b"hello\n"


def test_text_after_data_and_quit_may_be_pipelined(store, connect, alice, hostname):
    client = connect()
    client.send(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n")
    replies = [read_reply(client) for _ in range(4)]
    assert replies[3] == wire(R.R354_START_DATA)
    client.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    queue_id_of(read_reply(client))
    assert read_reply(client) == wire(R.R221_BYE, host=hostname)
    assert client.closed()
    assert without_trace(stored(store, "alice")[0]) == b"Subject: pipelined\n\nbody\n"


def test_text_sent_with_data_before_its_354_still_follows_the_trace_header(store, greeted, alice):
    # RFC 2920 §3.1 has the client wait for 354. The trace header is written
    # only once 354 is on the wire, yet a client that did not wait still
    # finds it ahead of its text.
    client = greeted()
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n"
                b"Subject: eager\r\n\r\nbody\r\n.\r\n")
    replies = [read_reply(client) for _ in range(4)]
    assert replies[2] == wire(R.R354_START_DATA)
    queue_id_of(replies[3])
    [message] = stored(store, "alice")
    assert message.startswith(b"Return-Path: <a@example.org>\nReceived: from client.example")
    assert without_trace(message) == b"Subject: eager\n\nbody\n"


def test_text_sent_with_a_refused_data_before_its_354_ends_the_session_unread(store, greeted, alice, hostname):
    # The only recipient is refused, so DATA is (554). The text the client
    # did not wait to send would be read as commands: the transaction
    # inside it would deliver a message the client never sent as one.
    client = greeted()
    smuggled = b"MAIL FROM:<forged@example.org>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\n"
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<nobody@localhost>\r\nDATA\r\n" + smuggled)
    assert [read_reply(client) for _ in range(4)] == [
        wire(R.R250_SENDER_OK, address="a@example.org"), wire(R.R550_NO_SUCH_USER, address="nobody@localhost"),
        wire(R.R554_NO_VALID_RECIPIENTS),
        wire(R.R421_TEXT_BEFORE_354, host=hostname)]
    assert client.closed()
    assert stored(store, "alice") == []


def test_second_transaction_on_the_same_connection(store, greeted, alice):
    client = greeted()
    first = deliver(client, ["alice@localhost"], [b"Subject: one"])
    second = deliver(client, ["alice@localhost"], [b"Subject: two"])
    assert first != second
    assert [without_trace(message) for message in stored(store, "alice")] == [b"Subject: one\n", b"Subject: two\n"]


# --- bare line ends ----------------------------------------------------------------------------


def test_bare_lf_is_a_line_end_and_bare_cr_never_stored_by_default(store, greeted, alice):
    message = stored_text(store, greeted(), b"one\ntwo\r\nthree\rfour\r\nfive\r\r\n.\r\n")
    assert without_trace(message) == b"one\ntwo\nthree\nfour\nfive\n"
    assert b"\r" not in message


def test_cr_cr_lf_is_one_line_end_and_keeps_the_header_whole(store, greeted, alice):
    # Some clients end lines so (mailsend 1.17b2): a LF for each CR would
    # end the header section after Subject, and From would be body text.
    message = stored_text(store, greeted(), b"Subject: report\r\r\nFrom: a@example.com\r\n\r\r\nbody\r\r\n.\r\n")
    assert without_trace(message) == b"Subject: report\nFrom: a@example.com\n\nbody\n"


def test_bare_lf_with_reject_is_550_after_the_data_and_nothing_is_stored(start_server, greeted, store, alice):
    server = start_server(smtp={"bare_newline": "reject"})
    client = greeted(server.addresses["smtp"])
    open_transaction(client, ["alice@localhost"])
    assert send_text(client, b"one\ntwo\r\n.\r\n") == wire(R.R550_BARE_LINE_END, char="LF")
    assert wire(R.R550_BARE_LINE_END, char="LF") == b"550 5.5.2 bare <LF> received\r\n"
    assert exchange(client, "NOOP") == wire(R.R250_OK)
    assert stored(store, "alice") == []
    assert list((store.maildir("alice") / "tmp").iterdir()) == []


def test_bare_cr_with_reject_is_550(start_server, greeted, store, alice):
    server = start_server(smtp={"bare_newline": "reject"})
    client = greeted(server.addresses["smtp"])
    open_transaction(client, ["alice@localhost"])
    assert send_text(client, b"one\rtwo\r\n.\r\n") == wire(R.R550_BARE_LINE_END, char="CR")
    assert stored(store, "alice") == []


def test_crlf_message_is_delivered_with_reject(start_server, greeted, store, alice):
    server = start_server(smtp={"bare_newline": "reject"})
    client = greeted(server.addresses["smtp"])
    deliver(client, ["alice@localhost"], [b"Subject: strict", b"", b"fine"])
    assert without_trace(stored(store, "alice")[0]) == b"Subject: strict\n\nfine\n"


# --- over-long lines and over-size messages ---------------------------------------------------


def test_text_line_of_1000_octets_is_accepted(store, greeted, alice):
    client = greeted()
    deliver(client, ["alice@localhost"], [b"x" * 998, b"." + b"y" * 997])
    assert without_trace(stored(store, "alice")[0]) == b"x" * 998 + b"\n." + b"y" * 997 + b"\n"


@pytest.mark.parametrize("line", [b"x" * 999, b"x" * 1000, b"x" * 5000, b"x" * 200_000, b".." + b"y" * 998],
                         ids=["1001", "1002", "5002", "200002", "stuffed-1002"])
def test_text_line_over_1000_octets_is_500_after_the_end_and_nothing_is_stored(store, greeted, alice, line):
    # RFC 5321 §4.5.3.1.6: 1000 octets with the CRLF, not counting a stuffed dot.
    client = greeted()
    open_transaction(client, ["alice@localhost"])
    client.send(b"Subject: long\r\n\r\n" + line + b"\r\nafter the long line\r\n")
    client.send(b".\r\n")
    assert read_reply(client) == wire(R.R500_TEXT_LINE_TOO_LONG)
    assert exchange(client, "NOOP") == wire(R.R250_OK)
    assert stored(store, "alice") == []
    assert list((store.maildir("alice") / "tmp").iterdir()) == []


def test_long_line_does_not_swallow_the_end_of_data(greeted, store, alice):
    # The end marker right after an over-long line still ends the text.
    client = greeted()
    open_transaction(client, ["alice@localhost"])
    assert send_text(client, b"x" * 3000 + b"\r\n.\r\n") == wire(R.R500_TEXT_LINE_TOO_LONG)
    deliver(client, ["alice@localhost"], [b"Subject: next"])
    assert [without_trace(message) for message in stored(store, "alice")] == [b"Subject: next\n"]


def test_message_at_the_declared_size_limit_is_delivered(start_server, greeted, store, alice):
    server = start_server(smtp={"max_message_size": 1000})
    client = greeted(server.addresses["smtp"])
    lines = [b"x" * 98] * 10  # 10 * (98 + CRLF) = 1000 octets as sent
    deliver(client, ["alice@localhost"], lines, mail_parameters=" SIZE=1000")
    assert without_trace(stored(store, "alice")[0]) == b"".join(line + b"\n" for line in lines)


@pytest.mark.parametrize("lines, delivered", [
    ([b"x" * 99] + [b"x" * 98] * 9, False),  # 1001 octets as sent
    ([b"abcd"] * 167, False),  # 1002 as sent, though 835 stored: each CRLF counts two
    ([b"." + b"x" * 97] * 10, True),  # 1000: the dots the client doubled do not count
])
def test_the_size_limit_counts_crlf_pairs_but_not_doubled_dots(start_server, greeted, store, alice,
                                                               lines, delivered):
    # RFC 1870 §5: the message size is "the number of octets, including CR-LF
    # pairs, but not the SMTP DATA command's terminating dot or doubled
    # quoting dots" - the same whether or not the client declared a SIZE.
    server = start_server(smtp={"max_message_size": 1000})
    client = greeted(server.addresses["smtp"])
    open_transaction(client, ["alice@localhost"])
    reply = send_text(client, stuff(lines) + b".\r\n")
    assert reply.startswith(b"250 ") if delivered else reply == wire(R.R552_TOO_BIG)
    assert len(stored(store, "alice")) == delivered


def test_message_over_the_size_limit_is_552_after_the_end(start_server, greeted, store, alice):
    server = start_server(smtp={"max_message_size": 1000})
    client = greeted(server.addresses["smtp"])
    open_transaction(client, ["alice@localhost"])
    assert send_text(client, stuff([b"z" * 100] * 30) + b".\r\n") == wire(R.R552_TOO_BIG)
    assert exchange(client, "NOOP") == wire(R.R250_OK)
    assert stored(store, "alice") == []
    assert list((store.maildir("alice") / "tmp").iterdir()) == []
    # ... and the session is still good for the next message.
    deliver(client, ["alice@localhost"], [b"Subject: small"])
    assert len(stored(store, "alice")) == 1


def test_smtplib_declares_the_size_and_is_refused_at_mail(start_server, smtp, store, alice):
    # smtplib sends SIZE= because EHLO offered SIZE (RFC 1870): refused before DATA.
    server = start_server(smtp={"max_message_size": 1000})
    client = smtp(server.addresses["smtp"])
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        client.sendmail("a@example.org", ["alice@localhost"], b"Subject: big\r\n\r\n" + b"z" * 5000 + b"\r\n")
    assert (refused.value.smtp_code, refused.value.smtp_error) == answer(R.R552_TOO_BIG)
    assert stored(store, "alice") == []


# --- delivery: where copies go, and when 250 is said ---------------------------------------------


def test_250_comes_only_once_the_message_is_in_new(store, greeted, alice):
    client = greeted()
    queue_id = deliver(client, ["alice@localhost"], [b"Subject: durable"])
    # Checked the moment the reply is read: no waiting, no polling.
    [(info, path)] = store.messages("alice")
    assert path.parent == store.maildir("alice") / "new"
    assert f"R{queue_id}." in path.name
    assert list((store.maildir("alice") / "tmp").iterdir()) == []


def test_each_local_recipient_gets_one_copy_and_duplicates_are_merged(store, greeted, alice, bob):
    client = greeted()
    deliver(client, ["alice@localhost", "bob@localhost", '"alice"@localhost', "ALICE@localhost",
                     "Postmaster"], [b"Subject: many"])
    # Postmaster goes to the first user, alice, who already has her copy.
    assert len(stored(store, "alice")) == 1
    assert len(stored(store, "bob")) == 1
    assert stored(store, "alice") == stored(store, "bob")


def test_postmaster_goes_to_the_first_user_by_default(store, greeted, alice, bob):
    client = greeted()
    deliver(client, ["Postmaster"], [b"Subject: for the postmaster"])
    assert len(stored(store, "alice")) == 1 and stored(store, "bob") == []


@pytest.mark.parametrize("written", ["bob", "Bob"])  # a user name in any case, as 'user add' takes it
def test_postmaster_goes_to_the_configured_user(start_server, greeted, store, alice, bob, caplog, written):
    server = start_server(domains=["a.example", "b.example"], smtp={"postmaster": written})
    assert "no such user" not in caplog.text
    client = greeted(server.addresses["smtp"])
    deliver(client, ["Postmaster"], [b"Subject: one"])
    deliver(client, ["postmaster@a.example"], [b"Subject: two"])
    deliver(client, ["postmaster@b.example"], [b"Subject: three"])
    assert stored(store, "alice") == []
    assert [without_trace(message) for message in stored(store, "bob")] == [
        b"Subject: one\n", b"Subject: two\n", b"Subject: three\n"]


def test_rejected_recipients_get_no_copy(store, greeted, alice, bob):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    exchange(client, "RCPT TO:<alice@localhost>")
    exchange(client, "RCPT TO:<nobody@localhost>")
    exchange(client, "RCPT TO:<bob@example.com>")
    exchange(client, "DATA")
    queue_id_of(send_text(client, b"Subject: partial\r\n.\r\n"))
    assert len(stored(store, "alice")) == 1 and stored(store, "bob") == []


def test_path_like_local_parts_write_nothing_outside_the_root(tmp_path, root, store, server, greeted, alice):
    before = files_under(tmp_path)
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    for local_part in ["../x", "a/b", "..", ".pymailsrv", '"../x"', '"a/b"', '".."', '".pymailsrv"',
                       '"../../etc"', '"alice/../../x"']:
        assert exchange(client, f"RCPT TO:<{local_part}@localhost>")[:1] == b"5"
    exchange(client, "RCPT TO:<alice@localhost>")
    exchange(client, "DATA")
    queue_id_of(send_text(client, b"Subject: safe\r\n.\r\n"))
    added = files_under(tmp_path) - before
    assert {path.relative_to(root).parts[:2] for path in added} == {("alice", "new")}
    assert not (tmp_path / "x").exists() and not (root / "a").exists() and not (root / "x").exists()


def test_failed_copy_answers_451_and_leaves_no_copy_in_any_new(greeted, store, alice, bob):
    # bob's new/ becomes unusable between DATA and the end of the text: the
    # copy already linked into alice's new/ must be taken back.
    client = greeted()
    open_transaction(client, ["alice@localhost", "bob@localhost"])
    bob_new = store.maildir("bob") / "new"
    bob_new.rmdir()
    bob_new.write_bytes(b"not a directory")
    try:
        assert send_text(client, b"Subject: doomed\r\n.\r\n") == wire(R.R451_LOCAL_ERROR)
        assert stored(store, "alice") == []
        assert list((store.maildir("alice") / "tmp").iterdir()) == []
        assert exchange(client, "NOOP") == wire(R.R250_OK)
    finally:
        bob_new.unlink()
        bob_new.mkdir()


def test_client_that_drops_mid_data_leaves_nothing_behind(greeted, store, alice):
    client = greeted()
    open_transaction(client, ["alice@localhost"])
    client.send(b"Subject: unfinished\r\n\r\nhalf a message\r\n")
    client.close()
    tmp = store.maildir("alice") / "tmp"
    deadline = time.monotonic() + 2
    while any(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(tmp.iterdir()) == []
    assert stored(store, "alice") == []


# --- Return-Path: and Received: ----------------------------------------------------------------


def trace_lines(message: bytes) -> list[str]:
    lines = message.decode().split("\n")
    end = 2
    while lines[end].startswith("\t"):
        end += 1
    return lines[:end]


def check_date(text: str) -> None:
    date = email.utils.parsedate_to_datetime(text)
    assert abs((datetime.now(timezone.utc) - date).total_seconds()) < 60


def test_trace_lines_name_the_client_the_protocol_the_id_and_the_recipient(store, connect, hostname, alice):
    client = connect()
    exchange(client, "EHLO client.example")
    queue_id = deliver(client, ["alice@localhost"], [b"Subject: traced"])
    [message] = stored(store, "alice")
    return_path, received, by, recipient = trace_lines(message)
    assert return_path == "Return-Path: <sender@example.org>"
    assert received == "Received: from client.example ([127.0.0.1])"
    assert by == f"\tby {hostname} (pymailsrv) with ESMTP id {queue_id}"
    assert recipient.startswith("\tfor <alice@localhost>; ")
    check_date(recipient.split("; ", 1)[1])


def test_trace_lines_say_smtp_after_helo(store, connect, hostname, alice):
    client = connect()
    exchange(client, "HELO old.example")
    queue_id = deliver(client, ["alice@localhost"], [b"Subject: helo"])
    _, received, by, _ = trace_lines(stored(store, "alice")[0])
    assert received == "Received: from old.example ([127.0.0.1])"
    assert by == f"\tby {hostname} (pymailsrv) with SMTP id {queue_id}"


@pytest.mark.parametrize("name, smtputf8, received", [
    ("[127.0.0.1]", "", "[127.0.0.1] ([127.0.0.1])"),
    ("my_laptop", "", "[127.0.0.1] ([127.0.0.1]) (helo=my_laptop)"),
    ("evil;Thu,01Jan1970", "", "[127.0.0.1] ([127.0.0.1]) (helo=evil?Thu?01Jan1970)"),
    ("x(", "", "[127.0.0.1] ([127.0.0.1]) (helo=x?)"),
    ('a"b\\c)', "", "[127.0.0.1] ([127.0.0.1]) (helo=a?b?c?)"),
    ("b\u00fccher.example", "", "[127.0.0.1] ([127.0.0.1]) (helo=b?cher.example)"),
    ("b\u00fccher.example", " SMTPUTF8", "b\u00fccher.example ([127.0.0.1])"),
])
def test_received_names_the_client_by_a_domain_or_its_address(store, connect, alice, name, smtputf8, received):
    # RFC 5321 §4.4: From-domain is a Domain or an address literal. A name
    # that is neither goes into the comment, where nothing in it can end the
    # clause (";") or the comment ("(", ")") early.
    client = connect()
    exchange(client, f"EHLO {name}")
    deliver(client, ["alice@localhost"], [b"Subject: named"], mail_parameters=smtputf8)
    _, received_line, _, _ = trace_lines(stored(store, "alice")[0])
    assert received_line == f"Received: from {received}"


def test_trace_lines_say_utf8smtp_with_smtputf8(store, greeted, hostname, alice):
    client = greeted()
    queue_id = deliver(client, ["alice@localhost"], [b"Subject: utf8"], mail_parameters=" SMTPUTF8")
    _, _, by, _ = trace_lines(stored(store, "alice")[0])
    assert by == f"\tby {hostname} (pymailsrv) with UTF8SMTP id {queue_id}"


def test_trace_lines_leave_out_the_recipient_when_there_are_several(store, greeted, hostname, alice, bob):
    # Naming one recipient in a copy every recipient sees would leak Bcc's.
    client = greeted()
    queue_id = deliver(client, ["alice@localhost", "bob@localhost"], [b"Subject: two"])
    for user in ("alice", "bob"):
        return_path, received, by = trace_lines(stored(store, user)[0])
        assert by.startswith(f"\tby {hostname} (pymailsrv) with ESMTP id {queue_id}; ")
        check_date(by.split("; ", 1)[1])
        assert "for <" not in by


def test_trace_lines_leave_out_a_bare_postmaster(store, greeted, hostname, alice):
    # RFC 5321 §4.4: "for" takes a Path or a Mailbox, and <Postmaster> with
    # no domain (§4.1.1.3) is neither.
    client = greeted()
    queue_id = deliver(client, ["Postmaster"], [b"Subject: for the postmaster"])
    _, _, by = trace_lines(stored(store, "alice")[0])
    assert by.startswith(f"\tby {hostname} (pymailsrv) with ESMTP id {queue_id}; ")


def test_null_sender_gives_an_empty_return_path(store, greeted, alice):
    client = greeted()
    deliver(client, ["alice@localhost"], [b"Subject: bounce"], sender="")
    assert stored(store, "alice")[0].startswith(b"Return-Path: <>\n")


def test_trace_lines_come_before_the_message_text(store, greeted, alice):
    client = greeted()
    deliver(client, ["alice@localhost"], [b"Received: from earlier.example", b"Subject: hop"])
    message = stored(store, "alice")[0]
    assert message.index(b"Received: from client.example") < message.index(b"Received: from earlier.example")


# --- timeouts during DATA ---------------------------------------------------------------------


def test_slow_but_steady_data_is_not_cut_off(start_server, greeted, store, alice):
    # data_timeout bounds each wait, not the whole transfer (RFC 5321 §4.5.3.2.5).
    server = start_server(smtp={"command_timeout": 1.0, "data_timeout": 1.0})
    client = greeted(server.addresses["smtp"])
    open_transaction(client, ["alice@localhost"])
    started = time.monotonic()
    for number in range(8):
        client.send(b"line %d\r\n" % number)
        time.sleep(0.2)
    assert time.monotonic() - started > 1.5  # longer than the timeout, in total
    queue_id_of(send_text(client, b".\r\n"))
    assert without_trace(stored(store, "alice")[0]) == b"".join(b"line %d\n" % n for n in range(8))


def test_silence_during_data_is_421_and_nothing_is_stored(start_server, greeted, store, alice):
    server = start_server(smtp={"command_timeout": 5, "data_timeout": 0.5})
    client = greeted(server.addresses["smtp"])
    open_transaction(client, ["alice@localhost"])
    started = time.monotonic()  # before the server's clock starts, so a slow client cannot undercut it
    client.send(b"Subject: then silence\r\n")
    assert read_reply(client) == wire(R.R421_TIMEOUT, host=server.settings.hostname)
    assert 0.5 <= time.monotonic() - started < 4  # the data timeout, not the command timeout
    assert client.closed()
    tmp = store.maildir("alice") / "tmp"
    deadline = time.monotonic() + 2
    while any(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(tmp.iterdir()) == []
    assert stored(store, "alice") == []


# --- end to end with real clients ---------------------------------------------------------------


def test_smtplib_sends_and_poplib_retrieves_and_deletes(server, smtp, store, alice):
    message = b"From: a@example.org\r\nTo: alice@localhost\r\nSubject: hello\r\n\r\nHi Alice,\r\n.\r\nbye\r\n"
    client = smtp()
    assert client.sendmail("a@example.org", ["alice@localhost"], message) == {}
    client.quit()
    pop3 = poplib.POP3(*server.addresses["pop3"], timeout=CLIENT_TIMEOUT)
    try:
        pop3.user("alice")
        pop3.pass_(PASSWORD)
        count, size = pop3.stat()
        assert count == 1
        _, lines, octets = pop3.retr(1)
        assert octets == size
        assert pop3_body(b"".join(line + b"\r\n" for line in lines)) == message
        pop3.dele(1)
    finally:
        pop3.quit()
    assert store.messages("alice") == []


def test_smtplib_send_message_with_8bitmime_and_smtputf8(server, smtp, store, alice):
    client = smtp()
    message = "From: jürgen@bücher.example\r\nSubject: Grüße\r\n\r\nSchöne Grüße\r\n".encode()
    assert client.sendmail("jürgen@bücher.example", ["alice@localhost"], message,
                           mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
    [(size, text)] = pop3_retrieve(server.addresses["pop3"])
    assert pop3_body(text) == message
    assert size == len(text)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_sends_a_message(server, smtp_address, store, tmp_path, alice):
    message = b"From: a@example.org\r\nTo: alice@localhost\r\nSubject: curl\r\n\r\n.dot line\r\nbody\r\n"
    (tmp_path / "message.eml").write_bytes(message)
    host, port = smtp_address
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", str(CLIENT_TIMEOUT),
         f"smtp://{host}:{port}/curl.example", "--mail-from", "a@example.org",
         "--mail-rcpt", "alice@localhost", "--upload-file", str(tmp_path / "message.eml")],
        capture_output=True, timeout=CLIENT_TIMEOUT + 5)
    assert result.returncode == 0, result.stderr
    [stored_message] = stored(store, "alice")
    assert without_trace(stored_message) == message.replace(b"\r\n", b"\n")
    assert b"Received: from curl.example ([127.0.0.1])" in stored_message


def test_readme_smtplib_example_delivers(server, smtp_address, store, alice):
    # The README's first-message snippet, pointed at the test server.
    from email.message import EmailMessage

    message = EmailMessage()
    message["From"] = "bob@example.org"
    message["To"] = "alice@localhost"
    message["Subject"] = "hello over SMTP"
    message.set_content("Hi Alice!\n")
    with smtplib.SMTP(*smtp_address, timeout=CLIENT_TIMEOUT) as client:
        assert client.send_message(message) == {}
    [stored_message] = stored(store, "alice")
    assert stored_message.startswith(b"Return-Path: <bob@example.org>\n")
    assert stored_message.endswith(b"\n\nHi Alice!\n")


def test_recipient_maildir_that_cannot_be_opened_at_data_is_451(greeted, store, alice, bob):
    client = greeted()
    assert exchange(client, "MAIL FROM:<a@example.org>").startswith(b"250 ")
    assert exchange(client, "RCPT TO:<alice@localhost>").startswith(b"250 ")
    assert exchange(client, "RCPT TO:<bob@localhost>").startswith(b"250 ")
    bob_new = store.maildir("bob") / "new"
    bob_new.rmdir()
    bob_new.write_bytes(b"not a directory")
    try:
        assert exchange(client, "DATA") == wire(R.R451_LOCAL_ERROR)
        assert stored(store, "alice") == []
        assert list((store.maildir("alice") / "tmp").iterdir()) == []
        assert exchange(client, "RSET") == wire(R.R250_OK)
    finally:
        bob_new.unlink()
        bob_new.mkdir()


# --- the text parser itself: blocks of lines against one line at a time ---------------------


class _Collected:
    """Where the parser's output goes (an IncomingMessage): here a buffer, as only parsing is tested."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def _parsed(pieces: list[tuple[bytes, bool]], by_block: bool, max_size: int, normalize: bool) -> tuple:
    """Feed ``pieces`` - (blocks of whole lines, or single lines; too long?) as the
    transport hands them - and say what came of it."""
    sink = _Collected()
    text = MessageText(sink, max_size=max_size, normalize_bare_newlines=normalize)
    consumed = 0
    for piece, too_long in pieces:
        if by_block:
            end = text.feed_block(piece, too_long)
        else:
            end = len(piece) if text.feed(piece, too_long) else None
        if end is not None:
            consumed += end
            break
        consumed += len(piece)
    refusal = text.refusal()
    # A refused message is thrown away: how much of it was written first does not matter.
    stored = bytes(sink.data) if refusal is None else None
    return stored, consumed, text.lines_read, text.bare_line_end, text.line_too_long, text.too_big, refusal


def _as_read(line: bytes) -> tuple[bytes, bool]:
    """A line as transport.read_line hands it over: one past the limit cut short, its own end kept."""
    if len(line) <= SMTP_TEXT_LINE_MAX:
        return line, False
    return line[:SMTP_TEXT_LINE_MAX] + (b"\r\n" if line.endswith(b"\r\n") else b"\n"), True


def _lines(block: bytes) -> list[bytes]:
    return [line + b"\n" for line in block.split(b"\n")[:-1]]


@settings(max_examples=400)
@given(text=st.lists(st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\r\n", b".\r\n", b"x" * 40])
                     # runs of 996-1003 octets: lines just under, at and over the limit
                     | st.integers(min_value=996, max_value=1003).map(lambda length: b"z" * length),
                     max_size=60).map(b"".join),
       cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=5),
       max_size=st.sampled_from([10**6, 300]), normalize=st.booleans())
def test_text_taken_in_blocks_is_parsed_as_one_line_at_a_time(text, cuts, max_size, normalize):
    """feed_block's plain runs store, refuse and end exactly where feed, line by line, would
    (RFC 5321 §4.1.1.4, §4.5.2): for any text, any split into blocks, lines near the limit."""
    lines = [_as_read(line) for line in _lines(text)]  # whole lines: the transport never hands over a part
    # As transport.read_text groups them: a line too long comes alone, the others in blocks.
    bounds = sorted({0, len(lines), *(cut % (len(lines) + 1) for cut in cuts),
                     *(index for index, (_, too_long) in enumerate(lines) if too_long),
                     *(index + 1 for index, (_, too_long) in enumerate(lines) if too_long)})
    blocks = [(b"".join(line for line, _ in lines[start:end]), lines[start][1])
              for start, end in zip(bounds, bounds[1:])]
    assert (_parsed(blocks, True, max_size, normalize) == _parsed(lines, False, max_size, normalize))
