"""The POP3 command table as data: it must read like RFC 1939 §9 and drive everything.

These tests need no socket: they check the table itself, and that dispatch,
CAPA and the state diagram are derived from it rather than kept beside it.
"""

from __future__ import annotations

import inspect

import pytest

from pymailsrv import replies as R
from pymailsrv.commands import Command, CommandTable
from pymailsrv.pop3 import SESSION_CAPABILITIES, Pop3Session, Pop3State

TABLE = Pop3Session.commands
AUTHORIZATION, TRANSACTION, UPDATE = Pop3State.AUTHORIZATION, Pop3State.TRANSACTION, Pop3State.UPDATE

# RFC 1939 §9 (and RFC 2449 §5, RFC 1460 for LAST): verb -> states it is valid in.
RFC_STATES = {
    "STLS": {AUTHORIZATION}, "AUTH": {AUTHORIZATION},  # RFC 2595 §4, RFC 5034 §4
    "USER": {AUTHORIZATION}, "PASS": {AUTHORIZATION}, "APOP": {AUTHORIZATION},
    "QUIT": {AUTHORIZATION, TRANSACTION},
    "STAT": {TRANSACTION}, "LIST": {TRANSACTION}, "RETR": {TRANSACTION}, "DELE": {TRANSACTION},
    "NOOP": {TRANSACTION}, "RSET": {TRANSACTION}, "TOP": {TRANSACTION}, "UIDL": {TRANSACTION},
    "LAST": {TRANSACTION},
    "CAPA": {AUTHORIZATION, TRANSACTION},
}

RFC_SYNTAX = {
    "STLS": "STLS", "AUTH": "AUTH [mechanism [initial-response]]",
    "USER": "USER name", "PASS": "PASS string", "APOP": "APOP name digest", "QUIT": "QUIT",
    "STAT": "STAT", "LIST": "LIST [msg]", "RETR": "RETR msg", "DELE": "DELE msg", "NOOP": "NOOP",
    "RSET": "RSET", "TOP": "TOP msg n", "UIDL": "UIDL [msg]", "LAST": "LAST", "CAPA": "CAPA",
}


def test_the_table_has_exactly_the_rfc_verbs_in_their_states():
    assert {command.verb: set(command.states) for command in TABLE} == RFC_STATES


def test_every_verb_has_a_session_handler_with_a_docstring_naming_its_rfc():
    for command in TABLE:
        assert callable(command.handler)
        assert command.handler.__qualname__ == f"Pop3Session.do_{command.verb.lower()}"
        assert list(inspect.signature(command.handler).parameters) == ["self", "argument"]
        assert "RFC" in (command.handler.__doc__ or ""), command.verb
        assert command.rfc.startswith("RFC "), command.verb


def test_syntax_lines_follow_the_rfc():
    assert {command.verb: command.syntax for command in TABLE} == RFC_SYNTAX


def test_no_command_is_valid_in_update():
    # RFC 1939 §6: UPDATE is entered by QUIT and left by closing; it reads nothing.
    assert TABLE.allowed_in(UPDATE) == []


def test_lookup_is_case_insensitive_and_exact():
    assert TABLE.find("retr") is TABLE.find("RETR") is TABLE.find("Retr")
    assert TABLE.find("RET") is None
    assert TABLE.find("RETRX") is None
    assert TABLE.find("") is None


def test_capabilities_are_derived_from_the_table():
    assert TABLE.capabilities() == ["STLS", "USER", "SASL PLAIN", "TOP", "UIDL"]
    assert {command.verb for command in TABLE if command.capability} == {"STLS", "USER", "AUTH", "TOP",
                                                                          "UIDL"}
    assert SESSION_CAPABILITIES[:4] == ("RESP-CODES", "PIPELINING", "EXPIRE NEVER", "LOGIN-DELAY 0")
    assert SESSION_CAPABILITIES[4].startswith("IMPLEMENTATION pymailsrv-")
    assert SESSION_CAPABILITIES[5] == "AUTH-RESP-CODE"


def test_transitions_are_the_rfc_state_diagram():
    assert sorted(TABLE.transitions(), key=lambda edge: (edge[0].name, edge[1])) == [
        (AUTHORIZATION, "APOP", TRANSACTION),
        (AUTHORIZATION, "AUTH", TRANSACTION),
        (AUTHORIZATION, "PASS", TRANSACTION),
        (AUTHORIZATION, "QUIT", None),
        (TRANSACTION, "QUIT", UPDATE),
    ]


def test_credentials_are_marked_secret_for_the_trace():
    secret = {command.verb for command in TABLE
              if command.secret_from is not None}
    assert secret == {"PASS", "APOP", "AUTH"}


def test_a_verb_may_appear_only_once():
    row = Command("NOOP", Pop3Session.do_noop, frozenset({TRANSACTION}), "NOOP", "RFC 1939 §5")
    with pytest.raises(ValueError):
        CommandTable(row, row)


def test_wrong_state_and_unknown_command_are_different_replies():
    assert R.POP3_UNKNOWN_COMMAND.head() == ["-ERR unknown command"]
    assert R.POP3_WRONG_STATE.format(verb="STAT", state="AUTHORIZATION").head() == [
        "-ERR STAT is not valid in the AUTHORIZATION state"]
    assert not R.POP3_UNKNOWN_COMMAND.ok and not R.POP3_WRONG_STATE.ok


@pytest.mark.parametrize("reply, wire", [
    (R.POP3_IN_USE, "-ERR [IN-USE] maildrop is locked by another session"),
    (R.POP3_AUTH_FAILED, "-ERR [AUTH] invalid user name or password"),
    (R.POP3_STORAGE_FAILURE, "-ERR [SYS/TEMP] temporary storage failure, try again later"),
    (R.POP3_NOOP, "+OK"),
])
def test_response_codes_are_written_as_rfc2449_section8_says(reply, wire):
    assert reply.head() == [wire]


def test_multiline_body_is_byte_stuffed_and_terminated():
    reply = R.POP3_TOP_FOLLOWS.with_lines([b"a", b".", b"..b", b""])
    assert list(reply.body()) == [b"a\r\n", b"..\r\n", b"...b\r\n", b"\r\n", b".\r\n"]
    assert list(R.POP3_NOOP.body()) == []
