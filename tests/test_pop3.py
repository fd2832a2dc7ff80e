"""POP3 on the wire (RFC 1939, RFC 2449): every command in every state, exact replies.

Each test talks to a real server on 127.0.0.1 through a raw socket (exact
bytes) or ``poplib`` (what a client sees). Replies are compared with the
catalogue in ``pymailsrv.replies``, so a reply cannot change unnoticed.
What QUIT does to the maildrop (UPDATE, locking) is in ``test_pop3_update.py``.
"""

from __future__ import annotations

import hashlib
import poplib
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pymailsrv import replies as R
from pymailsrv.pop3 import SESSION_CAPABILITIES, Pop3Session, Pop3State
from pymailsrv.server import ServerContext
from pymailsrv.trace import Tracer
from tests.conftest import CLIENT_TIMEOUT, PASSWORD, RawClient, make_settings

MESSAGE = b"Subject: hi\n\nhello\n"
DOTTED = b"Subject: dots\n\n.\n..two\n.three\nend\n"
# RFC 1939 §7, the APOP example.
RFC_TIMESTAMP = "<1896.697170952@dbc.mtview.ca.us>"
RFC_SECRET = "tanstaaf"
RFC_DIGEST = "c4c9334bac560ecc979e58001b3e22fb"

TRANSACTION_ONLY = ["STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "TOP 1 0", "UIDL", "LAST"]
AUTHORIZATION_ONLY = ["USER alice", "PASS x", "APOP alice " + "0" * 32]


def wire(reply: R.Pop3Reply, **fields: object) -> bytes:
    """The status line ``reply`` puts on the wire, CRLF included."""
    if fields:
        reply = reply.format(**fields)
    return reply.head()[0].encode() + b"\r\n"


def crlf_size(text: bytes) -> int:
    """Octets POP3 sends for a stored LF message: each line plus CRLF."""
    return sum(len(line) + 2 for line in text.split(b"\n")[:-1])


@pytest.fixture
def alice(add_user) -> str:
    return add_user("alice", apop=True)


@pytest.fixture
def connect(raw, pop3_address):
    """connect() -> a RawClient that has read the greeting (kept as .greeting)."""

    def connect() -> RawClient:
        client = raw(pop3_address)
        client.greeting = client.line()
        return client

    return connect


@pytest.fixture
def login(connect, alice):
    """login() -> a RawClient in the TRANSACTION state as alice."""

    def login() -> RawClient:
        client = connect()
        assert client.command("USER alice") == wire(R.POP3_USER_ACCEPTED)
        assert client.command(f"PASS {PASSWORD}").startswith(b"+OK alice's maildrop has ")
        return client

    return login


def logged_in(raw, server) -> RawClient:
    """A RawClient in the TRANSACTION state as alice, on a server started with settings of its own."""
    client = raw(server.addresses["pop3"])
    client.line()
    client.command("USER alice")
    assert client.command(f"PASS {PASSWORD}").startswith(b"+OK")
    return client


def bad_commands_until_closed(client: RawClient, count: int) -> list[bytes]:
    return [client.command("BOGUS") for _ in range(count)]


# --- greeting and AUTHORIZATION (RFC 1939 §4, §7) -----------------------------


def test_greeting_is_ok_with_an_apop_timestamp(connect, alice):
    greeting = connect().greeting
    assert re.fullmatch(rb"\+OK pymailsrv POP3 server ready <[^<>@\s]+@[^<>\s]+>\r\n", greeting)


def test_greeting_offers_no_apop_while_no_user_has_an_apop_secret(connect, add_user):
    # mutt tries APOP whenever the greeting has a timestamp: each try would
    # be a failed login, and enough of them block right passwords too.
    add_user("bob")
    client = connect()
    assert client.greeting == b"+OK pymailsrv POP3 server ready\r\n"
    assert client.command(f"APOP bob {'0' * 32}") == wire(R.POP3_APOP_NOT_OFFERED)
    add_user("carol", apop=True)  # the running server sees users.json change
    assert re.fullmatch(rb"\+OK pymailsrv POP3 server ready <.+>\r\n", connect().greeting)


def test_every_greeting_has_a_new_timestamp(connect, alice):
    timestamps = {re.search(rb"<.*>", connect().greeting).group() for _ in range(5)}
    assert len(timestamps) == 5


def test_user_and_pass_log_in_and_report_the_maildrop(connect, alice, store):
    store.deliver("alice", MESSAGE)
    client = connect()
    assert client.command("USER alice") == b"+OK send PASS\r\n"
    assert client.command(f"PASS {PASSWORD}") == wire(R.POP3_LOGGED_IN, user="alice", messages="1 message", size=22)
    assert client.command(f"PASS {PASSWORD}") == b"-ERR PASS is not valid in the TRANSACTION state\r\n"


def test_user_name_is_case_insensitive(connect, alice):
    client = connect()
    client.command("user ALICE")
    assert client.command(f"pass {PASSWORD}") == wire(R.POP3_LOGGED_IN, user="alice", messages="0 messages", size=0)


def test_pass_without_user_is_refused(connect, alice):
    assert connect().command(f"PASS {PASSWORD}") == b"-ERR send USER first\r\n"


def test_pass_after_a_failed_pass_needs_user_again(connect, alice):
    client = connect()
    client.command("USER alice")
    assert client.command("PASS wrong") == wire(R.POP3_AUTH_FAILED)
    assert client.command(f"PASS {PASSWORD}") == wire(R.POP3_USER_FIRST)


@pytest.mark.parametrize("between", ["CAPA", "USER", "BOGUS", "APOP alice " + "0" * 32, "AUTH PLAIN eA==",
                                     "X" * 300])  # the last too long a line to be read as a command
def test_pass_must_come_straight_after_user(connect, alice, between):
    # RFC 1939 §7: PASS "may only be given in the AUTHORIZATION state
    # immediately after a successful USER command".
    client = connect()
    client.command("USER alice")
    client.command(between)
    if between == "CAPA":
        client.multiline()
    assert client.command(f"PASS {PASSWORD}") == wire(R.POP3_USER_FIRST)
    client.command("USER alice")
    assert client.command(f"PASS {PASSWORD}").startswith(b"+OK")


def test_pass_without_a_password_is_a_syntax_error_not_a_failed_login(connect, alice):
    client = connect()
    client.command("USER alice")
    assert client.command("PASS") == wire(R.POP3_SYNTAX, syntax="PASS string")
    assert client.command(f"PASS {PASSWORD}") == wire(R.POP3_USER_FIRST)  # USER must come again
    for _ in range(2):  # two failed logins more leave it open: the bare PASS was not one
        client.command("USER alice")
        assert client.command("PASS wrong") == wire(R.POP3_AUTH_FAILED)
    client.command("USER alice")
    assert client.command(f"PASS {PASSWORD}").startswith(b"+OK")


@pytest.mark.parametrize("line, syntax", [("USER", "USER name"), ("USER a b", "USER name"),
                                          ("APOP alice", "APOP name digest"), ("CAPA x", "CAPA")])
def test_malformed_authorization_commands_answer_their_syntax(connect, alice, line, syntax):
    assert connect().command(line) == wire(R.POP3_SYNTAX, syntax=syntax)


def test_wrong_password_and_unknown_user_get_the_same_auth_error(connect, alice):
    client = connect()
    client.command("USER alice")
    assert client.command("PASS wrong") == b"-ERR [AUTH] invalid user name or password\r\n"
    client.command("USER nobody")
    assert client.command(f"PASS {PASSWORD}") == b"-ERR [AUTH] invalid user name or password\r\n"


def test_invalid_user_name_is_an_auth_error_not_a_crash(connect, alice):
    client = connect()
    client.command("USER ../alice")
    assert client.command(f"PASS {PASSWORD}") == wire(R.POP3_AUTH_FAILED)


@pytest.mark.parametrize("line", TRANSACTION_ONLY)
def test_transaction_commands_are_refused_in_authorization(connect, alice, line):
    verb = line.split()[0]
    assert connect().command(line) == f"-ERR {verb} is not valid in the AUTHORIZATION state\r\n".encode()


@pytest.mark.parametrize("line", AUTHORIZATION_ONLY)
def test_authorization_commands_are_refused_in_transaction(login, line):
    verb = line.split()[0]
    assert login().command(line) == f"-ERR {verb} is not valid in the TRANSACTION state\r\n".encode()


def test_unknown_command_is_not_a_wrong_state_error(connect, login):
    assert connect().command("XYZZY") == b"-ERR unknown command\r\n"
    assert login().command("XYZZY") == b"-ERR unknown command\r\n"
    assert connect().command("") == b"-ERR unknown command\r\n"


def test_quit_in_authorization_signs_off_and_closes(connect):
    client = connect()
    assert client.command("QUIT") == b"+OK pymailsrv POP3 server signing off\r\n"
    assert client.closed()


# --- CAPA (RFC 2449 §5) ----------------------------------------------------------


def test_capa_lists_the_same_capabilities_in_both_states(connect, login):
    expected = [b"+OK capability list follows\r\n", b"USER\r\n", b"SASL PLAIN\r\n", b"TOP\r\n",
                b"UIDL\r\n", b"RESP-CODES\r\n", b"PIPELINING\r\n", b"EXPIRE NEVER\r\n",
                b"LOGIN-DELAY 0\r\n", re.compile(rb"IMPLEMENTATION pymailsrv-\d+\.\d+\.\d+\r\n"),
                b"AUTH-RESP-CODE\r\n", b".\r\n"]
    for client in (connect(), login()):
        client.send(b"CAPA\r\n")
        lines = client.multiline()
        assert len(lines) == len(expected)
        for got, want in zip(lines, expected):
            assert want.fullmatch(got) if isinstance(want, re.Pattern) else got == want


def test_capa_through_poplib_matches_the_command_table(pop3, alice):
    capabilities = pop3().capa()
    assert set(capabilities) == {"USER", "SASL", "TOP", "UIDL", "RESP-CODES", "PIPELINING", "EXPIRE",
                                 "LOGIN-DELAY", "IMPLEMENTATION", "AUTH-RESP-CODE"}
    assert capabilities["SASL"] == ["PLAIN"]
    assert capabilities["EXPIRE"] == ["NEVER"]
    assert capabilities["LOGIN-DELAY"] == ["0"]


# --- TRANSACTION: STAT, LIST, UIDL (RFC 1939 §5, §7) ------------------------------


def test_stat_counts_messages_and_crlf_octets(login, store):
    store.deliver("alice", MESSAGE)
    store.deliver("alice", DOTTED)
    client = login()
    total = crlf_size(MESSAGE) + crlf_size(DOTTED)
    assert client.command("STAT") == f"+OK 2 {total}\r\n".encode()
    assert client.command("STAT 1") == wire(R.POP3_SYNTAX, syntax="STAT")


def test_list_without_argument_gives_every_scan_listing(login, store):
    store.deliver("alice", MESSAGE)
    store.deliver("alice", DOTTED)
    client = login()
    client.send(b"LIST\r\n")
    total = crlf_size(MESSAGE) + crlf_size(DOTTED)
    assert client.multiline() == [f"+OK 2 messages ({total} octets)\r\n".encode(),
                                  b"1 22\r\n", f"2 {crlf_size(DOTTED)}\r\n".encode(), b".\r\n"]


def test_list_of_an_empty_maildrop_is_an_empty_multiline(login):
    client = login()
    client.send(b"LIST\r\n")
    assert client.multiline() == [b"+OK 0 messages (0 octets)\r\n", b".\r\n"]
    client.send(b"UIDL\r\n")
    assert client.multiline() == [b"+OK unique-id listing follows\r\n", b".\r\n"]


@pytest.mark.parametrize("argument, reply", [
    ("1", b"+OK 1 22\r\n"),
    ("0", b"-ERR no such message\r\n"),
    ("2", b"-ERR no such message\r\n"),
    ("-1", b"-ERR syntax: LIST [msg]\r\n"),
    ("one", b"-ERR syntax: LIST [msg]\r\n"),
    ("\u0661", b"-ERR syntax: LIST [msg]\r\n"),  # ARABIC-INDIC DIGIT ONE is not a number here
    ("1 2", b"-ERR syntax: LIST [msg]\r\n"),
])
def test_list_with_a_message_number(login, store, argument, reply):
    store.deliver("alice", MESSAGE)
    assert login().command(f"LIST {argument}") == reply


def test_uidl_single_and_multi_agree_with_the_maildir_names(login, store, root):
    store.deliver("alice", MESSAGE)
    store.deliver("alice", DOTTED)
    client = login()
    client.send(b"UIDL\r\n")
    lines = client.multiline()
    assert lines[0] == b"+OK unique-id listing follows\r\n" and lines[-1] == b".\r\n"
    uids = [line.split()[1].decode() for line in lines[1:-1]]
    assert [line.split()[0] for line in lines[1:-1]] == [b"1", b"2"]
    names = sorted(path.name.split(",")[0] for path in (root / "alice" / "cur").iterdir())
    assert sorted(uids) == names
    assert all(re.fullmatch(r"[\x21-\x7e]{1,70}", uid) for uid in uids)
    assert client.command("UIDL 2") == f"+OK 2 {uids[1]}\r\n".encode()
    assert client.command("UIDL 3") == b"-ERR no such message\r\n"
    assert client.command("UIDL x") == b"-ERR syntax: UIDL [msg]\r\n"


# --- RETR, TOP and the wire form of a message ------------------------------------


def _place(root: Path, name: str, data: bytes, subdir: str = "new") -> Path:
    """Put a message file into alice's Maildir the way another program would."""
    path = root / "alice" / subdir / name
    path.write_bytes(data)
    return path


def test_retr_sends_exactly_as_many_octets_as_list_announces(login, store, root):
    # Two files written by other programs: CRLF line ends, and no final newline.
    _place(root, "1000000000.crlf.example", b"Subject: crlf\r\n\r\nline one\r\nline two\r\n")
    _place(root, "1000000001.nonl.example", b"Subject: nonl\n\nno newline at end")
    store.deliver("alice", DOTTED)
    client = login()
    for msg_number in (1, 2, 3):
        size = int(client.command(f"LIST {msg_number}").split()[2])
        announced = client.command(f"RETR {msg_number}")
        assert announced == f"+OK {size} octets\r\n".encode()
        body = client.multiline()
        assert body[-1] == b".\r\n"
        # Unstuff as a client does; what remains is exactly `size` octets.
        unstuffed = [line[1:] if line.startswith(b"..") else line for line in body[:-1]]
        assert sum(map(len, unstuffed)) == size
        assert all(line.endswith(b"\r\n") and b"\n" not in line[:-2] for line in body)


def test_two_files_with_one_unique_name_are_two_messages_deleted_one_by_one(login, root):
    # Placed by another program: the same unique name, with different info parts.
    texts = {b"Subject: a\r\n\r\nshort\r\n", b"Subject: b\r\n\r\na longer message than a\r\n"}
    for suffix, text in zip(("a", "b"), sorted(texts)):
        _place(root, f"1700000006.col.example:1,{suffix}", text.replace(b"\r\n", b"\n"))
    client = login()
    client.command("UIDL")
    uids = [line.split()[1] for line in client.multiline()[:-1]]
    assert len(set(uids)) == 2  # RFC 1939 §7: unique within the maildrop
    served = {}
    for msg_number in (1, 2):
        size = int(client.command(f"LIST {msg_number}").split()[2])
        assert client.command(f"RETR {msg_number}") == f"+OK {size} octets\r\n".encode()
        served[msg_number] = b"".join(client.multiline()[:-1])
        assert len(served[msg_number]) == size
    assert set(served.values()) == texts
    deleted = next(number for number, text in served.items() if b"short" in text)
    assert client.command(f"DELE {deleted}") == f"+OK message {deleted} deleted\r\n".encode()
    assert client.command("QUIT").startswith(b"+OK ")
    [kept] = (root / "alice" / "cur").iterdir()
    assert kept.read_bytes() == b"Subject: b\n\na longer message than a\n"


def test_retr_of_a_message_without_final_newline_ends_with_crlf_dot_crlf(login, root):
    _place(root, "1000000001.nonl.example", b"Subject: nonl\n\nno newline at end")
    client = login()
    assert client.command("RETR 1") == b"+OK 36 octets\r\n"
    assert client.multiline() == [b"Subject: nonl\r\n", b"\r\n", b"no newline at end\r\n", b".\r\n"]


def test_retr_of_a_crlf_file_does_not_double_the_carriage_returns(login, root):
    _place(root, "1000000000.crlf.example", b"Subject: crlf\r\n\r\nline\r\n")
    client = login()
    assert client.command("LIST 1") == b"+OK 1 23\r\n"
    assert client.command("RETR 1") == b"+OK 23 octets\r\n"
    assert client.multiline() == [b"Subject: crlf\r\n", b"\r\n", b"line\r\n", b".\r\n"]


def test_lines_starting_with_a_dot_are_byte_stuffed(login, store):
    store.deliver("alice", DOTTED)
    client = login()
    client.command("RETR 1")
    assert client.multiline() == [b"Subject: dots\r\n", b"\r\n", b"..\r\n", b"...two\r\n",
                                  b"..three\r\n", b"end\r\n", b".\r\n"]


def test_poplib_undoes_the_byte_stuffing(pop3, alice, store):
    store.deliver("alice", DOTTED)
    client = pop3()
    client.user("alice")
    client.pass_(PASSWORD)
    response, lines, octets = client.retr(1)
    assert lines == [b"Subject: dots", b"", b".", b"..two", b".three", b"end"]
    assert response == f"+OK {crlf_size(DOTTED)} octets".encode()


@pytest.mark.parametrize("argument, reply", [
    ("", b"-ERR syntax: RETR msg\r\n"),
    ("1 1", b"-ERR syntax: RETR msg\r\n"),
    ("x", b"-ERR syntax: RETR msg\r\n"),
    ("0", b"-ERR no such message\r\n"),
    ("2", b"-ERR no such message\r\n"),
])
def test_retr_refuses_bad_message_numbers(login, store, argument, reply):
    store.deliver("alice", MESSAGE)
    assert login().command(f"RETR {argument}".strip()) == reply


TOPPED = b"Subject: top\nFrom: a@example.org\n\nbody 1\n.body 2\nbody 3\n"


def test_top_with_zero_lines_sends_the_header_and_the_blank_line(login, store):
    store.deliver("alice", TOPPED)
    client = login()
    assert client.command("TOP 1 0") == b"+OK top of message follows\r\n"
    assert client.multiline() == [b"Subject: top\r\n", b"From: a@example.org\r\n", b"\r\n", b".\r\n"]


def test_top_sends_n_body_lines_byte_stuffed(login, store):
    store.deliver("alice", TOPPED)
    client = login()
    client.command("TOP 1 2")
    assert client.multiline()[-4:] == [b"\r\n", b"body 1\r\n", b"..body 2\r\n", b".\r\n"]


def test_top_past_the_end_sends_the_whole_message(login, store):
    store.deliver("alice", TOPPED)
    client = login()
    client.command("RETR 1")
    whole = client.multiline()
    assert client.command("TOP 1 1000") == b"+OK top of message follows\r\n"
    assert client.multiline() == whole


def test_top_does_not_mark_the_message_seen(login, store, root):
    store.deliver("alice", TOPPED)
    client = login()
    client.command("TOP 1 0")
    client.multiline()
    assert [path.name.endswith(":2,") for path in (root / "alice" / "cur").iterdir()] == [True]


@pytest.mark.parametrize("argument", ["1", "1 -1", "1 x", "1 2 3", ""])
def test_top_without_a_proper_line_count_is_a_syntax_error(login, store, argument):
    store.deliver("alice", TOPPED)
    assert login().command(f"TOP {argument}".strip()) == b"-ERR syntax: TOP msg n\r\n"


def test_top_of_a_missing_message_is_refused(login):
    assert login().command("TOP 1 0") == b"-ERR no such message\r\n"


# --- DELE, RSET, NOOP, LAST --------------------------------------------------------


def test_deleted_message_is_invisible_and_refused(login, store):
    store.deliver("alice", MESSAGE)
    store.deliver("alice", DOTTED)
    client = login()
    assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
    assert client.command("DELE 1") == b"-ERR message 1 already deleted\r\n"
    assert client.command("STAT") == f"+OK 1 {crlf_size(DOTTED)}\r\n".encode()
    client.send(b"LIST\r\n")
    assert client.multiline()[1:] == [f"2 {crlf_size(DOTTED)}\r\n".encode(), b".\r\n"]
    client.send(b"UIDL\r\n")
    assert [line.split()[0] for line in client.multiline()[1:-1]] == [b"2"]
    for line in ("RETR 1", "TOP 1 0", "LIST 1", "UIDL 1"):
        assert client.command(line) == b"-ERR message 1 already deleted\r\n"


def test_rset_unmarks_and_reports_the_maildrop(login, store):
    store.deliver("alice", MESSAGE)
    client = login()
    client.command("DELE 1")
    assert client.command("STAT") == b"+OK 0 0\r\n"
    assert client.command("RSET") == b"+OK maildrop has 1 message (22 octets)\r\n"
    assert client.command("RETR 1") == b"+OK 22 octets\r\n"
    client.multiline()
    assert client.command("RSET x") == b"-ERR syntax: RSET\r\n"


def test_noop_answers_a_bare_ok(login):
    client = login()
    assert client.command("NOOP") == b"+OK\r\n"
    assert client.command("noop") == b"+OK\r\n"
    assert client.command("NOOP x") == b"-ERR syntax: NOOP\r\n"


def test_last_reports_the_highest_message_accessed_and_rset_takes_it_back(login, store):
    """RFC 1460 (obsolete): RETR and DELE count as access, TOP does not."""
    for _ in range(3):
        store.deliver("alice", MESSAGE)
    client = login()
    assert client.command("LAST") == b"+OK 0\r\n"
    client.command("TOP 3 0")
    client.multiline()
    assert client.command("LAST") == b"+OK 0\r\n"
    client.command("RETR 2")
    client.multiline()
    assert client.command("LAST") == b"+OK 2\r\n"
    client.command("DELE 1")
    assert client.command("LAST") == b"+OK 2\r\n"
    client.command("DELE 3")
    assert client.command("LAST") == b"+OK 3\r\n"
    client.command("RSET")
    assert client.command("LAST") == b"+OK 0\r\n"
    assert client.command("LAST 1") == b"-ERR syntax: LAST\r\n"


def test_last_starts_each_session_at_the_highest_message_retrieved_before(login, store):
    """As UW's ipop3d: fetchmail with "keep" and no "uidl" asks LAST what is new,
    and fetched every message again at every poll while a session began at 0."""
    for _ in range(3):
        store.deliver("alice", MESSAGE)
    client = login()
    for msg_number in (1, 2):
        client.command(f"RETR {msg_number}")
        client.multiline()
    assert client.command("QUIT").startswith(b"+OK")
    store.deliver("alice", MESSAGE)
    client = login()
    assert client.command("LAST") == b"+OK 2\r\n"  # 3 and 4 are new
    client.command("RETR 4")
    client.multiline()
    assert client.command("LAST") == b"+OK 4\r\n"
    client.command("RSET")
    assert client.command("LAST") == b"+OK 2\r\n"  # back to where the session began


def test_pipelined_commands_are_answered_in_order(login, store):
    store.deliver("alice", MESSAGE)
    client = login()
    client.send(b"STAT\r\nLIST 1\r\nNOOP\r\nUIDL 1\r\nBOGUS\r\n")
    assert client.line() == b"+OK 1 22\r\n"
    assert client.line() == b"+OK 1 22\r\n"
    assert client.line() == b"+OK\r\n"
    assert client.line().startswith(b"+OK 1 ")
    assert client.line() == b"-ERR unknown command\r\n"


# --- APOP (RFC 1939 §7) ----------------------------------------------------------


def test_apop_accepts_the_rfc1939_test_vector(root, users, store, add_user):
    assert hashlib.md5((RFC_TIMESTAMP + RFC_SECRET).encode()).hexdigest() == RFC_DIGEST
    add_user("mrose", RFC_SECRET, apop=True)
    context = ServerContext(settings=make_settings(root), users=users, store=store, tracer=Tracer())
    session = Pop3Session(context, ("127.0.0.1", 0))
    session.apop_timestamp = RFC_TIMESTAMP  # the greeting of the RFC's example
    try:
        assert session.handle_line(f"APOP mrose {'0' * 32}\r\n".encode()) == R.POP3_AUTH_FAILED
        reply = session.handle_line(f"APOP mrose {RFC_DIGEST}\r\n".encode())
        assert reply == R.POP3_LOGGED_IN.format(user="mrose", messages="0 messages", size=0)
        assert session.state is Pop3State.TRANSACTION
    finally:
        session.close()


def test_apop_logs_in_over_the_wire_with_poplib(pop3, alice, store):
    store.deliver("alice", MESSAGE)
    assert pop3().apop("alice", PASSWORD) == b"+OK alice's maildrop has 1 message (22 octets)"


def test_apop_digest_is_computed_from_this_greetings_timestamp(connect, alice):
    client = connect()
    timestamp = re.search(rb"<.*>", client.greeting).group().decode()
    digest = hashlib.md5((timestamp + PASSWORD).encode()).hexdigest()
    assert client.command(f"APOP alice {digest}").startswith(b"+OK alice's maildrop")
    # The digest of another greeting's timestamp is worthless here.
    other = connect()
    assert other.command(f"APOP alice {digest}") == wire(R.POP3_AUTH_FAILED)


def test_apop_is_refused_for_a_user_without_an_apop_secret(connect, alice, add_user):
    add_user("bob")
    client = connect()
    timestamp = re.search(rb"<.*>", client.greeting).group().decode()
    digest = hashlib.md5((timestamp + PASSWORD).encode()).hexdigest()
    assert client.command(f"APOP bob {digest}") == wire(R.POP3_AUTH_FAILED)


# --- limits: bad commands, failed logins, line length, autologout ---------------------


def test_three_bad_commands_before_login_close_the_session(connect):
    client = connect()
    assert bad_commands_until_closed(client, 3) == [b"-ERR unknown command\r\n"] * 2 + [
        b"-ERR too many bad commands, closing\r\n"]
    assert client.closed()


def test_three_failed_logins_close_the_session(connect, alice):
    client = connect()
    replies = []
    for _ in range(3):
        client.command("USER alice")
        replies.append(client.command("PASS wrong"))
    assert replies == [wire(R.POP3_AUTH_FAILED)] * 2 + [b"-ERR [AUTH] too many failed logins, closing\r\n"]
    assert client.closed()


def test_twenty_bad_commands_after_login_close_the_session(login):
    client = login()
    replies = bad_commands_until_closed(client, 20)
    assert replies[:19] == [b"-ERR unknown command\r\n"] * 19
    assert replies[19] == b"-ERR too many bad commands, closing\r\n"
    assert client.closed()


def test_errors_before_login_do_not_shorten_the_allowance_after_it(connect, alice):
    client = connect()
    client.command("USER alice")
    client.command("PASS wrong")
    client.command("BOGUS")
    client.command("USER alice")
    assert client.command(f"PASS {PASSWORD}").startswith(b"+OK")
    assert bad_commands_until_closed(client, 19) == [b"-ERR unknown command\r\n"] * 19
    assert client.command("NOOP") == b"+OK\r\n"


def test_failed_login_is_answered_after_the_configured_delay(start_server, add_user, raw):
    add_user("alice")
    delay = 1.0  # long beside a login that succeeds (its scrypt check takes about 50 ms), stalls and all
    server = start_server(pop3={"failed_login_delay": delay})
    client = raw(server.addresses["pop3"])
    client.line()
    client.command("USER alice")
    started = time.monotonic()
    assert client.command("PASS wrong") == wire(R.POP3_AUTH_FAILED)
    assert time.monotonic() - started >= delay
    client.command("USER alice")
    started = time.monotonic()
    assert client.command(f"PASS {PASSWORD}").startswith(b"+OK")
    assert time.monotonic() - started < delay


def test_command_line_of_255_octets_is_accepted_and_256_refused(connect, alice):
    client = connect()
    # RFC 2449 §4: 255 octets including the CRLF.
    assert client.command("USER " + "a" * 248) == b"+OK send PASS\r\n"
    assert client.command("USER " + "a" * 249) == b"-ERR command line too long\r\n"
    assert client.command("CAPA").startswith(b"+OK")


def test_an_overlong_line_is_refused_and_the_session_continues(login, store):
    store.deliver("alice", MESSAGE)
    client = login()
    assert client.command("LIST " + "1" * 10_000) == b"-ERR command line too long\r\n"
    assert client.command("STAT") == b"+OK 1 22\r\n"


def test_command_line_limit_is_configurable(start_server, raw):
    server = start_server(pop3={"command_line_max": 16})
    client = raw(server.addresses["pop3"])
    client.line()
    assert client.command("USER abcdefghi") == b"+OK send PASS\r\n"  # 14 + CRLF
    assert client.command("USER abcdefghijk") == wire(R.POP3_LINE_TOO_LONG)


def test_a_number_of_more_digits_than_int_takes_is_no_such_message(start_server, add_user, store, raw):
    # Python's int() refuses over 4300 digits; a line that long needs a
    # raised limit, and the number is simply larger than any here.
    add_user("alice")
    store.deliver("alice", TOPPED)
    client = logged_in(raw, start_server(pop3={"command_line_max": 8192}))
    huge = "1" * 5000
    assert client.command(f"RETR {huge}") == b"-ERR no such message\r\n"
    assert client.command(f"TOP 1 {huge}").startswith(b"+OK")  # as many lines as there are
    assert client.multiline()[-2:] == [b"body 3\r\n", b".\r\n"]


def test_idle_session_is_logged_out_without_entering_update(start_server, add_user, store, raw, root):
    add_user("alice")
    store.deliver("alice", MESSAGE)
    client = logged_in(raw, start_server(pop3={"autologout": 0.5}))
    started = time.monotonic()  # before the server's clock starts, so a slow client cannot undercut it
    assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
    assert client.line() == b"-ERR autologout: idle for too long\r\n"
    assert 0.5 <= time.monotonic() - started < CLIENT_TIMEOUT
    assert client.closed()
    assert len(store.messages("alice")) == 1
    store.open_maildrop("alice").release()  # the lock went with the session


# --- real clients ----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_lists_and_retrieves_a_message(pop3_address, alice, store):
    store.deliver("alice", MESSAGE)
    host, port = pop3_address
    base = ["curl", "--silent", "--show-error", "--max-time", "10", "--user", f"alice:{PASSWORD}"]
    listing = subprocess.run([*base, f"pop3://{host}:{port}/"], capture_output=True, timeout=20)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout == b"1 22\r\n"
    message = subprocess.run([*base, f"pop3://{host}:{port}/1"], capture_output=True, timeout=20)
    assert message.returncode == 0, message.stderr
    assert message.stdout == b"Subject: hi\r\n\r\nhello\r\n"
