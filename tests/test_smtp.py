"""SMTP commands on the wire (RFC 5321 §4.1, §4.2, §4.5.3): every reply, exactly.

Each test talks to a real server on 127.0.0.1 through ``smtplib`` (what a
client sees) or a raw socket (the exact bytes: pipelining, long lines).
Replies are compared with the catalogue in ``pymailsrv.replies``, so a reply
cannot change unnoticed. The message text after DATA - end of data,
dot-stuffing, smuggling, trace headers, delivery - is in
``test_smtp_data.py``; the path grammar on its own in ``test_paths.py``.

The helpers here are shared with ``test_smtp_data.py``.
"""

from __future__ import annotations

import re
import select
import smtplib
import socket
import time

import pytest

from pymailsrv import replies as R
from pymailsrv.config import ConfigError
from pymailsrv.limits import SMTP_MAX_ERRORS
from pymailsrv.smtp import SmtpSession
from tests.conftest import CLIENT_TIMEOUT, PASSWORD, RawClient, make_settings

# An SMTP reply never has more lines than this here (HELP has one per verb).
MAX_REPLY_LINES = 50


# --- helpers: the expected replies, and reading them ---------------------------------


def wire(reply: R.SmtpReply, **fields: object) -> bytes:
    """The whole reply ``reply`` puts on the wire, every line with its CRLF."""
    if fields:
        reply = reply.format(**fields)
    return b"".join(line.encode() + b"\r\n" for line in reply.head())


def answer(reply: R.SmtpReply, **fields: object) -> tuple[int, bytes]:
    """The reply as ``smtplib`` returns it: (code, the text of every line after the code)."""
    if fields:
        reply = reply.format(**fields)
    return reply.code, b"\n".join(line[4:].encode() for line in reply.head())


def read_reply(client: RawClient) -> bytes:
    """One whole SMTP reply: lines up to the one with a space after the code."""
    lines = b""
    for _ in range(MAX_REPLY_LINES):
        line = client.line()
        if not line:
            raise ConnectionError(f"server closed the connection; read so far: {lines!r}")
        lines += line
        if line[3:4] != b"-":
            return lines
    raise AssertionError(f"reply longer than {MAX_REPLY_LINES} lines: {lines!r}")


def exchange(client: RawClient, command: str | bytes) -> bytes:
    """Send one command line (CRLF added) and read its whole reply."""
    client.send((command.encode() if isinstance(command, str) else command) + b"\r\n")
    return read_reply(client)


def ehlo_lines(hostname: str, client_name: str, max_size: int) -> str:
    # AUTH is offered because the tests connect from 127.0.0.1, a local network
    # where a password may cross without TLS (auth.local_networks). HELP is
    # listed as RFC 5321 §4.1.1.1 asks for every command past §4.5.1's list.
    return "\n".join([f"{hostname} greets {client_name}", "PIPELINING", f"SIZE {max_size}", "8BITMIME",
                      "ENHANCEDSTATUSCODES", "SMTPUTF8", "AUTH PLAIN LOGIN", "HELP"])


def help_line(command) -> str:
    """A HELP line as the wire has it: US-ASCII, so no section sign (RFC 5321 §4.2)."""
    return f"{command.syntax}  ({command.rfc.replace('§', 'section ')})"


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def smtp_address(server) -> tuple[str, int]:
    return server.addresses["smtp"]


@pytest.fixture
def hostname(server) -> str:
    return server.settings.hostname


@pytest.fixture
def smtp(request):
    """smtp(address=None) -> a connected smtplib.SMTP; all are closed at teardown.

    The ``server`` fixture starts only for a client with no address: a test
    that starts a server of its own may not run a second on the data root.
    """
    clients: list[smtplib.SMTP] = []

    def connect(address: tuple[str, int] | None = None) -> smtplib.SMTP:
        client = smtplib.SMTP(*(address or request.getfixturevalue("smtp_address")),
                              local_hostname="client.example", timeout=CLIENT_TIMEOUT)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        try:
            client.close()
        except OSError:
            pass


@pytest.fixture
def connect(raw, request):
    """connect(address=None) -> a RawClient that has read the greeting (kept as .greeting);
    the ``server`` fixture starts only for one with no address, as for ``smtp``."""

    def connect(address: tuple[str, int] | None = None) -> RawClient:
        client = raw(address or request.getfixturevalue("smtp_address"))
        client.greeting = read_reply(client)
        return client

    return connect


@pytest.fixture
def greeted(connect):
    """greeted(address=None) -> a RawClient after a successful EHLO."""

    def greeted(address: tuple[str, int] | None = None) -> RawClient:
        client = connect(address)
        assert exchange(client, "EHLO client.example").startswith(b"250-")
        return client

    return greeted


# --- the catalogue ------------------------------------------------------------------------


SMTP_REPLIES = {name: value for name, value in vars(R).items() if isinstance(value, R.SmtpReply)}


@pytest.mark.parametrize("name", sorted(SMTP_REPLIES))
def test_catalogue_reply_has_an_enhanced_code_of_its_own_class(name):
    # RFC 2034 §3 (ENHANCEDSTATUSCODES): every reply but the greeting, the
    # EHLO/HELO reply, 354 and a SASL challenge (334, RFC 4954 §4: its text is
    # base64) carries class.subject.detail, and the class is the reply code's
    # first digit (RFC 3463 §2).
    reply = SMTP_REPLIES[name]
    assert str(reply.code) == name[1:4]
    if name in {"R220_GREETING", "R250_EHLO", "R250_HELO", "R354_START_DATA", "R334_CHALLENGE"}:
        assert reply.enhanced is None
    else:
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", reply.enhanced)
        assert reply.enhanced[0] == str(reply.code)[0]


# --- greeting, EHLO, HELO -------------------------------------------------------------------


def test_greeting_is_220_host_esmtp_pymailsrv(connect, hostname):
    assert connect().greeting == wire(R.R220_GREETING, host=hostname) == f"220 {hostname} ESMTP pymailsrv\r\n".encode()


def test_ehlo_lists_exactly_the_extensions_offered(connect, server, hostname):
    reply = exchange(connect(), "EHLO client.example")
    lines = ehlo_lines(hostname, "client.example", server.settings.smtp.max_message_size)
    assert reply == wire(R.R250_EHLO, lines=lines)
    assert reply.endswith(b"250-AUTH PLAIN LOGIN\r\n250 HELP\r\n")


def test_ehlo_through_smtplib_sees_every_keyword(smtp, server):
    client = smtp()
    assert client.ehlo() == answer(R.R250_EHLO, lines=ehlo_lines(
        server.settings.hostname, "client.example", server.settings.smtp.max_message_size))
    assert set(client.esmtp_features) == {"pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8",
                                          "auth", "help"}
    assert client.esmtp_features["size"] == str(server.settings.smtp.max_message_size)


def test_ehlo_size_keyword_shows_the_configured_limit(start_server, connect):
    server = start_server(smtp={"max_message_size": 12345})
    reply = exchange(connect(server.addresses["smtp"]), "EHLO client.example")
    assert b"250-SIZE 12345\r\n" in reply


def test_helo_greets_without_extensions(smtp, hostname):
    assert smtp().helo("client.example") == answer(R.R250_HELO, host=hostname, client="client.example")


@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
@pytest.mark.parametrize("argument", ["", " ", " two words", " a\tb"])
def test_greeting_without_exactly_one_name_is_501(connect, verb, argument):
    syntax = SmtpSession.commands.find(verb).syntax
    assert exchange(connect(), verb + argument) == wire(R.R501_SYNTAX, syntax=syntax)


@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
@pytest.mark.parametrize("control", ["\x7f", "\u0080", "\u009f"])
def test_a_greeting_name_with_a_control_character_is_501(connect, verb, control):
    syntax = SmtpSession.commands.find(verb).syntax
    assert exchange(connect(), f"{verb} a{control}b") == wire(R.R501_SYNTAX, syntax=syntax)


@pytest.mark.parametrize("name, echoed", [
    ("bücher.example", "b\\xfccher.example"),
    ("a\u00a1b", "a\\xa1b"),  # the first after the controls and NO-BREAK SPACE
    ("x" * 300 + ".example", "x" * 100 + "..."),  # a reply line stays under 512 octets
])
def test_a_greeting_name_is_echoed_in_ascii(connect, hostname, name, echoed):
    # RFC 6531 allows a U-label; RFC 5321 §4.2 allows only ASCII in reply text.
    reply = exchange(connect(), f"EHLO {name}")
    assert reply.startswith(f"250-{hostname} greets {echoed}\r\n".encode())
    assert exchange(connect(), f"HELO {name}") == wire(R.R250_HELO, host=hostname, client=echoed)


def test_ehlo_may_be_repeated_and_aborts_the_transaction(greeted, alice):
    client = greeted()
    assert exchange(client, "MAIL FROM:<a@example.org>") == wire(R.R250_SENDER_OK, address="a@example.org")
    assert exchange(client, "EHLO again.example").startswith(b"250-")
    # RFC 5321 §4.1.4: EHLO resets the state as RSET would.
    assert exchange(client, "RCPT TO:<alice@localhost>") == wire(
        R.R503_WRONG_STATE, verb="RCPT", state="GREETED")
    assert exchange(client, "MAIL FROM:<a@example.org>") == wire(R.R250_SENDER_OK, address="a@example.org")


def test_verbs_are_case_insensitive(connect, alice):
    client = connect()
    assert exchange(client, "ehlo client.example").startswith(b"250-")
    assert exchange(client, "mail from:<a@example.org>") == wire(R.R250_SENDER_OK, address="a@example.org")
    assert exchange(client, "Rcpt To:<alice@localhost>") == wire(R.R250_RECIPIENT_OK, address="alice@localhost")


# --- RSET, NOOP, QUIT, VRFY, EXPN, HELP -----------------------------------------------------


def test_noop_is_250_before_and_after_greeting(connect):
    client = connect()
    assert exchange(client, "NOOP") == wire(R.R250_OK)
    assert exchange(client, "NOOP anything at all") == wire(R.R250_OK)
    exchange(client, "EHLO client.example")
    assert exchange(client, "NOOP") == wire(R.R250_OK)


def test_rset_aborts_the_transaction_and_keeps_the_greeting(greeted, alice):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    exchange(client, "RCPT TO:<alice@localhost>")
    assert exchange(client, "RSET") == wire(R.R250_OK)
    assert exchange(client, "DATA") == wire(R.R503_WRONG_STATE, verb="DATA", state="GREETED")
    assert exchange(client, "MAIL FROM:<a@example.org>") == wire(R.R250_SENDER_OK, address="a@example.org")


def test_rset_through_smtplib(smtp, alice):
    client = smtp()
    client.ehlo()
    client.mail("a@example.org")
    assert client.rset() == answer(R.R250_OK)
    assert client.rcpt("alice@localhost") == answer(R.R503_WRONG_STATE, verb="RCPT", state="GREETED")


def test_rset_with_an_argument_is_501(greeted):
    assert exchange(greeted(), "RSET now") == wire(R.R501_SYNTAX, syntax="RSET")


def test_quit_is_221_and_closes(connect, hostname):
    client = connect()
    assert exchange(client, "QUIT") == wire(R.R221_BYE, host=hostname)
    assert client.closed()


def test_quit_through_smtplib(smtp, hostname):
    assert smtp().quit() == answer(R.R221_BYE, host=hostname)


def test_vrfy_is_252_for_users_and_strangers_alike(smtp, alice):
    # RFC 5321 §3.5.3 / §7.3: no way to tell which users exist.
    client = smtp()
    client.ehlo()
    assert client.verify("alice") == answer(R.R252_CANNOT_VRFY)
    assert client.verify("nobody") == answer(R.R252_CANNOT_VRFY)


def test_vrfy_without_argument_is_501(greeted):
    assert exchange(greeted(), "VRFY") == wire(R.R501_SYNTAX, syntax="VRFY string")


def test_expn_is_502(smtp):
    client = smtp()
    client.ehlo()
    assert client.expn("staff") == answer(R.R502_NOT_IMPLEMENTED, verb="EXPN")


# The test server has no certificate: STARTTLS is not offered, in EHLO or
# in HELP (test_starttls.py has HELP with one). EXPN, answered 502, never is.
OFFERED_WITHOUT_TLS = [command for command in SmtpSession.commands if command.verb not in ("STARTTLS", "EXPN")]


def test_help_lists_every_command_the_session_offers(connect):
    reply = exchange(connect(), "HELP")
    text = "\n".join(help_line(command) for command in OFFERED_WITHOUT_TLS)
    assert reply == wire(R.R214_HELP, text=text)
    assert reply.isascii()


def test_help_lines_are_the_tables_syntax_lines(smtp):
    # HELP is derived from the command table, so it can never list a verb the
    # server does not dispatch, nor miss one it offers.
    code, text = smtp().docmd("HELP")
    assert code == 214
    lines = [line.decode().removeprefix("2.0.0 ") for line in text.split(b"\n")]
    assert [line.split("  (")[0] for line in lines] == [command.syntax for command in OFFERED_WITHOUT_TLS]
    assert {line.split()[0] for line in lines} == {command.verb for command in OFFERED_WITHOUT_TLS}


def test_help_on_one_verb_gives_its_syntax(connect):
    command = SmtpSession.commands.find("MAIL")
    assert exchange(connect(), "HELP mail") == wire(R.R214_HELP, text=help_line(command))


# --- wrong order, unknown commands -------------------------------------------------------------


def test_mail_before_ehlo_is_503(connect):
    assert exchange(connect(), "MAIL FROM:<a@example.org>") == wire(
        R.R503_WRONG_STATE, verb="MAIL", state="CONNECTED")


def test_rcpt_before_mail_is_503(greeted):
    assert exchange(greeted(), "RCPT TO:<alice@localhost>") == wire(R.R503_WRONG_STATE, verb="RCPT", state="GREETED")


def test_data_before_mail_is_503(greeted):
    assert exchange(greeted(), "DATA") == wire(R.R503_WRONG_STATE, verb="DATA", state="GREETED")


def test_data_before_rcpt_is_503(greeted):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, "DATA") == wire(R.R503_BAD_SEQUENCE, detail="need RCPT first")


@pytest.mark.parametrize("recipients", [0, 1])
def test_nested_mail_is_503(greeted, alice, recipients):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    state = "MAIL"
    if recipients:
        exchange(client, "RCPT TO:<alice@localhost>")
        state = "RCPT"
    assert exchange(client, "MAIL FROM:<b@example.org>") == wire(R.R503_WRONG_STATE, verb="MAIL", state=state)


def test_out_of_sequence_codes_through_smtplib(smtp):
    client = smtp()
    assert client.docmd("MAIL", "FROM:<a@example.org>") == answer(
        R.R503_WRONG_STATE, verb="MAIL", state="CONNECTED")


@pytest.mark.parametrize("line", ["FOO", "MAILFROM:<a@example.org>", "STARTTLSX", "BDAT 10 LAST",
                                  "TURN", "SEND FROM:<a@example.org>", "\xe9HLO x"])
def test_unknown_command_is_500(connect, line):
    assert exchange(connect(), line) == wire(R.R500_UNKNOWN_COMMAND)


def test_empty_line_is_an_unknown_command(connect):
    assert exchange(connect(), "") == wire(R.R500_UNKNOWN_COMMAND)


# --- MAIL ---------------------------------------------------------------------------------------


def test_mail_accepts_a_sender_and_the_null_path(greeted):
    client = greeted()
    assert exchange(client, "MAIL FROM:<a@example.org>") == wire(R.R250_SENDER_OK, address="a@example.org")
    exchange(client, "RSET")
    assert exchange(client, "MAIL FROM:<>") == wire(R.R250_SENDER_OK, address="")


def test_mail_tolerates_a_space_after_the_colon(greeted):
    assert exchange(greeted(), "MAIL FROM: <a@example.org>") == wire(R.R250_SENDER_OK, address="a@example.org")


@pytest.mark.parametrize("argument", ["<a@example.org>", "TO:<a@example.org>", "FROM <a@example.org>", "",
                                      "FROMAGE:<a@example.org>"])
def test_mail_without_from_colon_is_501(greeted, argument):
    syntax = SmtpSession.commands.find("MAIL").syntax
    assert exchange(greeted(), f"MAIL {argument}".rstrip()) == wire(R.R501_SYNTAX, syntax=syntax)


def test_mail_address_without_angle_brackets_is_501(greeted):
    assert exchange(greeted(), "MAIL FROM:a@example.org") == wire(
        R.R501_BAD_SENDER_ADDRESS, detail="the address must be in angle brackets: <user@domain>")


def test_rcpt_address_without_angle_brackets_is_501(greeted, alice):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, "RCPT TO:alice@localhost") == wire(
        R.R501_BAD_RECIPIENT_ADDRESS, detail="the address must be in angle brackets: <user@domain>")


def test_mail_with_a_malformed_address_is_501(greeted):
    assert exchange(greeted(), "MAIL FROM:<a..b@example.org>") == wire(
        R.R501_BAD_SENDER_ADDRESS, detail="bad local part 'a..b'")


def test_mail_from_a_bare_postmaster_is_501(greeted):
    # RFC 5321 §4.1.2: the bare <Postmaster> is a forward-path (RCPT) only.
    client = greeted()
    assert exchange(client, "MAIL FROM:<Postmaster>") == wire(R.R501_BAD_SENDER_ADDRESS, detail="expected local-part@domain")
    assert exchange(client, "MAIL FROM:<postmaster@example.org>") == wire(
        R.R250_SENDER_OK, address="postmaster@example.org")


@pytest.mark.parametrize("parameters, keyword", [("SIZE=999999999999 SIZE=1", "SIZE"),
                                                 ("SMTPUTF8 smtputf8", "SMTPUTF8")])
def test_a_mail_parameter_given_twice_is_501(greeted, parameters, keyword):
    assert exchange(greeted(), f"MAIL FROM:<a@example.org> {parameters}") == wire(
        R.R501_BAD_PARAMETER, detail=f"parameter {keyword} given twice")


def test_unknown_mail_parameter_is_555(greeted):
    assert exchange(greeted(), "MAIL FROM:<a@example.org> X-FOO=1") == wire(
        R.R555_UNKNOWN_PARAMETER, parameter="X-FOO")


def test_unknown_rcpt_parameter_is_555(greeted, alice):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, "RCPT TO:<alice@localhost> NOTIFY=NEVER") == wire(
        R.R555_UNKNOWN_PARAMETER, parameter="NOTIFY")


def test_malformed_mail_parameter_is_501_5_5_4(greeted):
    # RFC 3463: X.5.4 is "invalid command arguments"; the address itself was fine.
    reply = exchange(greeted(), "MAIL FROM:<a@example.org> =1")
    assert reply == wire(R.R501_BAD_PARAMETER, detail="bad parameter '=1'")


def test_size_within_the_limit_is_accepted(start_server, greeted):
    server = start_server(smtp={"max_message_size": 1000})
    client = greeted(server.addresses["smtp"])
    assert exchange(client, "MAIL FROM:<a@example.org> SIZE=1000") == wire(R.R250_SENDER_OK, address="a@example.org")


def test_size_over_the_limit_is_552_at_mail(start_server, greeted):
    # RFC 1870 §6.1: refuse at MAIL, before any text is sent.
    server = start_server(smtp={"max_message_size": 1000})
    client = greeted(server.addresses["smtp"])
    assert exchange(client, "MAIL FROM:<a@example.org> SIZE=1001") == wire(R.R552_TOO_BIG)
    assert exchange(client, "RCPT TO:<alice@localhost>") == wire(R.R503_WRONG_STATE, verb="RCPT", state="GREETED")


def test_size_over_the_limit_through_smtplib(start_server, smtp):
    server = start_server(smtp={"max_message_size": 1000})
    client = smtp(server.addresses["smtp"])
    client.ehlo()
    assert client.mail("a@example.org", ["SIZE=999999"]) == answer(R.R552_TOO_BIG)


# The last: an EM SPACE parts no parameters (RFC 5321 §4.1.2 parts them by SP),
# so SMTPUTF8 is not asked for; it is the end of a SIZE that is no number.
@pytest.mark.parametrize("parameter", ["SIZE", "SIZE=ten", "SIZE=-1", "SIZE=\u0661", "SIZE=1\u2003SMTPUTF8"])
def test_size_that_is_not_a_number_is_501(greeted, parameter):
    assert exchange(greeted(), f"MAIL FROM:<a@example.org> {parameter}") == wire(
        R.R501_SYNTAX, syntax="SIZE=<octets>")


def test_size_with_an_empty_value_is_a_malformed_parameter(greeted):
    assert exchange(greeted(), "MAIL FROM:<a@example.org> SIZE=") == wire(
        R.R501_BAD_PARAMETER, detail="bad value in parameter 'SIZE='")


@pytest.mark.parametrize("body", ["8BITMIME", "7BIT", "8bitmime"])
def test_body_parameter_is_accepted(greeted, body):
    assert exchange(greeted(), f"MAIL FROM:<a@example.org> BODY={body}") == wire(
        R.R250_SENDER_OK, address="a@example.org")


@pytest.mark.parametrize("parameter", ["BODY=BINARYMIME", "BODY"])
def test_body_parameter_other_than_7bit_or_8bitmime_is_501(greeted, parameter):
    assert exchange(greeted(), f"MAIL FROM:<a@example.org> {parameter}") == wire(
        R.R501_SYNTAX, syntax="BODY=7BIT|8BITMIME")


def test_smtputf8_parameter_is_accepted_and_takes_no_value(greeted):
    client = greeted()
    assert exchange(client, "MAIL FROM:<a@example.org> SMTPUTF8 BODY=8BITMIME SIZE=10") == wire(
        R.R250_SENDER_OK, address="a@example.org")
    exchange(client, "RSET")
    assert exchange(client, "MAIL FROM:<a@example.org> SMTPUTF8=yes") == wire(R.R501_SYNTAX, syntax="SMTPUTF8")


def test_utf8_sender_with_smtputf8_is_accepted(greeted):
    assert exchange(greeted(), "MAIL FROM:<jürgen@bücher.example> SMTPUTF8") == wire(
        R.R250_SENDER_OK, address="jürgen@bücher.example")


def test_utf8_sender_without_smtputf8_is_550(greeted):
    # RFC 6531 §3.5: "the MAIL command requires an ASCII address, the
    # reply-code 550 is returned", with X.6.7.
    reply = exchange(greeted(), "MAIL FROM:<jürgen@bücher.example>")
    assert reply == wire(R.R550_SENDER_NEEDS_SMTPUTF8)
    assert reply.startswith(b"550 5.6.7 ")


def test_utf8_recipient_domain_needs_smtputf8(start_server, greeted, alice):
    server = start_server(domains=["bücher.example"])
    client = greeted(server.addresses["smtp"])
    exchange(client, "MAIL FROM:<a@example.org>")
    reply = exchange(client, "RCPT TO:<alice@bücher.example>")
    assert reply == wire(R.R553_RECIPIENT_NEEDS_SMTPUTF8) and reply.startswith(b"553 5.6.7 ")  # RFC 6531 §3.5
    exchange(client, "RSET")
    exchange(client, "MAIL FROM:<a@example.org> SMTPUTF8")
    assert exchange(client, "RCPT TO:<alice@bücher.example>") == wire(
        R.R250_RECIPIENT_OK, address="alice@bücher.example")


def test_utf8_local_part_with_smtputf8_is_parsed_and_refused_as_unknown_user(greeted):
    # User names are ASCII (users.py), so a UTF-8 local part is never a local
    # user: the refusal is "user unknown", not a syntax error.
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org> SMTPUTF8")
    assert exchange(client, "RCPT TO:<jürgen@localhost>") == wire(R.R550_NO_SUCH_USER, address="jürgen@localhost")


def test_undecodable_octets_in_a_path_are_501(greeted):
    reply = exchange(greeted(), b"MAIL FROM:<a\xff@example.org>")
    assert reply.startswith(b"501 5.1.7 bad address syntax: bad local part ")


# --- RCPT: local users, postmaster, relay ----------------------------------------------------------


def test_rcpt_to_a_local_user_is_250(smtp, alice):
    client = smtp()
    client.ehlo()
    client.mail("a@example.org")
    assert client.rcpt("alice@localhost") == answer(R.R250_RECIPIENT_OK, address="alice@localhost")


def test_rcpt_user_and_domain_are_case_insensitive(greeted, alice):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, "RCPT TO:<Alice@LOCALHOST>") == wire(R.R250_RECIPIENT_OK, address="Alice@localhost")


def test_rcpt_quoted_local_part_names_the_same_user(greeted, alice):
    # RFC 5321 §4.1.2: "alice" and alice are the same local part.
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, 'RCPT TO:<"alice"@localhost>') == wire(
        R.R250_RECIPIENT_OK, address='"alice"@localhost')


def test_rcpt_to_an_unknown_local_user_is_550(smtp, alice):
    client = smtp()
    client.ehlo()
    client.mail("a@example.org")
    assert client.rcpt("nobody@localhost") == answer(R.R550_NO_SUCH_USER, address="nobody@localhost")


def test_rcpt_to_another_domain_is_relay_denied_even_from_loopback(smtp, alice):
    # Never an open relay: 127.0.0.1 is not trusted unless configured.
    client = smtp()
    client.ehlo()
    client.mail("a@example.org")
    assert client.rcpt("alice@example.com") == answer(R.R550_RELAY_DENIED, address="alice@example.com")


def test_rcpt_to_an_address_literal_is_relay_denied(greeted, alice):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, "RCPT TO:<alice@[127.0.0.1]>") == wire(R.R550_RELAY_DENIED, address="alice@[127.0.0.1]")


def test_rcpt_percent_hack_does_not_relay(greeted):
    # "%" is an ordinary local-part character: no "user%other@localhost" relaying.
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, "RCPT TO:<alice%example.com@localhost>") == wire(
        R.R550_NO_SUCH_USER, address="alice%example.com@localhost")


def test_rcpt_from_a_trusted_network_is_relayed_through_the_outbound_queue(start_server, greeted):
    # relay.trusted_networks lifts the refusal: the message is queued for the
    # relay (outqueue.py) before the 250, with the original envelope sender.
    server = start_server(relay={"trusted_networks": ["127.0.0.0/8"]})
    client = greeted(server.addresses["smtp"])
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, "RCPT TO:<bob@example.com>") == wire(R.R250_RECIPIENT_OK, address="bob@example.com")
    assert exchange(client, "DATA") == wire(R.R354_START_DATA)
    reply = exchange(client, "Subject: out\r\n\r\nbye\r\n.")
    assert reply.startswith(b"250 2.0.0 OK ")
    [entry] = server.context.queue.entries()
    assert (entry.sender, [recipient.address for recipient in entry.recipients]) == ("a@example.org",
                                                                                   ["bob@example.com"])
    assert entry.queue_id == reply.split()[-1].decode()


def test_trusted_networks_that_do_not_hold_the_client_change_nothing(start_server, greeted):
    server = start_server(relay={"trusted_networks": ["192.0.2.0/24", "::1/128"]})
    client = greeted(server.addresses["smtp"])
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, "RCPT TO:<bob@example.com>") == wire(R.R550_RELAY_DENIED, address="bob@example.com")


@pytest.mark.parametrize("path", ["Postmaster", "postmaster", "postmaster@localhost", "POSTMASTER@LOCALHOST"])
def test_postmaster_is_accepted(greeted, alice, path):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    expected = "Postmaster" if "@" not in path else path.split("@")[0] + "@localhost"
    assert exchange(client, f"RCPT TO:<{path}>") == wire(R.R250_RECIPIENT_OK, address=expected)


def test_postmaster_of_a_foreign_domain_is_relay_denied(greeted, alice):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, "RCPT TO:<postmaster@example.com>") == wire(
        R.R550_RELAY_DENIED, address="postmaster@example.com")


def test_postmaster_without_any_user_is_451(greeted):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, "RCPT TO:<Postmaster>") == wire(R.R451_LOCAL_ERROR)


def test_every_configured_domain_is_local(start_server, greeted, alice):
    server = start_server(domains=["a.example", "b.example"])
    client = greeted(server.addresses["smtp"])
    exchange(client, "MAIL FROM:<x@example.org>")
    for path in ["alice@a.example", "alice@b.example", "postmaster@a.example", "postmaster@b.example"]:
        assert exchange(client, f"RCPT TO:<{path}>") == wire(R.R250_RECIPIENT_OK, address=path)
    assert exchange(client, "RCPT TO:<alice@localhost>") == wire(R.R550_RELAY_DENIED, address="alice@localhost")


def test_domains_are_compared_without_case(start_server, greeted, alice):
    # RFC 5321 §2.4: a --domain given in capitals is still the same domain.
    server = start_server(domains=["Mail.Example"])
    client = greeted(server.addresses["smtp"])
    exchange(client, "MAIL FROM:<x@example.org>")
    assert exchange(client, "RCPT TO:<alice@mail.example>") == wire(R.R250_RECIPIENT_OK, address="alice@mail.example")


@pytest.mark.parametrize("configured, spelled, echoed", [
    ("bücher.example", "xn--bcher-kva.example", "xn--bcher-kva.example"),  # RFC 5890 §2.3.2.1: one label, two forms
    ("xn--bcher-kva.example", "XN--Bcher-KVA.example", "xn--bcher-kva.example"),
    ("[IPv6:::1]", "[IPv6:0::1]", "[IPv6:0::1]"),
    ("[IPv6:::1]", "[ipv6:0:0:0:0:0:0:0:1]", "[IPv6:0:0:0:0:0:0:0:1]"),
])
def test_each_spelling_of_a_configured_domain_is_local(start_server, greeted, alice, configured, spelled, echoed):
    server = start_server(domains=[configured])
    client = greeted(server.addresses["smtp"])
    exchange(client, "MAIL FROM:<x@example.org>")
    for local_part in ["alice", "postmaster"]:
        assert exchange(client, f"RCPT TO:<{local_part}@{spelled}>") == wire(
            R.R250_RECIPIENT_OK, address=f"{local_part}@{echoed}")


def test_a_domain_that_idna_2003_would_map_onto_ours_is_not_ours(start_server, greeted, alice):
    server = start_server(domains=["straße.example"])
    client = greeted(server.addresses["smtp"])
    exchange(client, "MAIL FROM:<x@example.org>")
    assert exchange(client, "RCPT TO:<alice@strasse.example>") == wire(R.R550_RELAY_DENIED,
                                                                      address="alice@strasse.example")
    assert exchange(client, "RCPT TO:<alice@xn--strae-oqa.example>") == wire(
        R.R250_RECIPIENT_OK, address="alice@xn--strae-oqa.example")


def test_a_logged_in_user_writing_the_a_label_of_our_domain_is_delivered_locally(start_server, alice, store):
    server = start_server(domains=["bücher.example"])
    with smtplib.SMTP(*server.addresses["smtp"], timeout=CLIENT_TIMEOUT) as client:
        client.login("alice", PASSWORD)
        assert client.sendmail("alice@xn--bcher-kva.example", ["alice@xn--bcher-kva.example"],
                               b"Subject: hi\r\n\r\nhello\r\n") == {}
    assert len(store.messages("alice")) == 1
    assert server.context.queue.entries() == []


@pytest.mark.parametrize("local_part", ["../x", "..", ".pymailsrv", "../.pymailsrv"])
def test_path_like_local_part_that_is_no_dot_string_is_501(greeted, alice, local_part):
    # RFC 5321 §4.1.2: a Dot-string neither starts with "." nor holds "..".
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, f"RCPT TO:<{local_part}@localhost>") == wire(
        R.R501_BAD_RECIPIENT_ADDRESS, detail=f"bad local part {local_part!r}")


@pytest.mark.parametrize("local_part", ["a/b", "a/b/c", '"../alice"', '"a/b"', '".pymailsrv"',
                                        '"alice/../alice"', '".."', '"."', '"alice\\/x"'])
def test_path_like_local_part_that_parses_is_no_user(greeted, alice, local_part):
    # "/" is atext and quoted strings hold anything: such local parts parse,
    # but are never a user name (users.check_user_name), so never a path.
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    assert exchange(client, f"RCPT TO:<{local_part}@localhost>") == wire(
        R.R550_NO_SUCH_USER, address=f"{local_part}@localhost")


# --- recipient limit -------------------------------------------------------------------------------


def test_recipient_limit_keeps_the_first_n_and_refuses_the_next_with_452(start_server, greeted, alice):
    server = start_server(smtp={"max_recipients": 100})
    client = greeted(server.addresses["smtp"])
    exchange(client, "MAIL FROM:<a@example.org>")
    # 100 recipients, pipelined; alternate quoting so they are not all one string.
    commands = b"".join(b'RCPT TO:<"alice"@localhost>\r\n' if n % 2 else b"RCPT TO:<alice@localhost>\r\n"
                        for n in range(100))
    client.send(commands)
    replies = [read_reply(client) for _ in range(100)]
    assert all(reply.startswith(b"250 2.1.5 ") for reply in replies)
    assert exchange(client, "RCPT TO:<alice@localhost>") == wire(R.R452_TOO_MANY_RECIPIENTS)
    assert exchange(client, "RCPT TO:<Postmaster>") == wire(R.R452_TOO_MANY_RECIPIENTS)
    assert exchange(client, "DATA") == wire(R.R354_START_DATA)


def test_recipients_over_the_limit_do_not_count_as_errors(start_server, greeted, alice):
    # RFC 5321 §4.5.3.1.10: a client that gets 452 sends those recipients in a
    # later transaction. A pipelining client sends every RCPT before it sees
    # the first 452, so the overshoot must not run into the error limit and
    # cost it the transaction it already has (Postfix: smtpd_recipient_overshoot_limit).
    server = start_server(smtp={"max_recipients": 100})
    client = greeted(server.addresses["smtp"])
    exchange(client, "MAIL FROM:<a@example.org>")
    client.send(b"RCPT TO:<alice@localhost>\r\n" * 130 + b"DATA\r\n")
    replies = [read_reply(client) for _ in range(131)]
    assert replies[:100] == [wire(R.R250_RECIPIENT_OK, address="alice@localhost")] * 100
    assert replies[100:130] == [wire(R.R452_TOO_MANY_RECIPIENTS)] * 30
    assert replies[130] == wire(R.R354_START_DATA)


def test_recipient_limit_below_the_rfc_minimum_is_refused_by_config(root):
    # RFC 5321 §4.5.3.1.8: a server MUST accept at least 100 recipients.
    with pytest.raises(ConfigError, match="max_recipients"):
        make_settings(root, smtp={"max_recipients": 99})
    assert make_settings(root, smtp={"max_recipients": 100}).smtp.max_recipients == 100


def test_default_recipient_limit_is_1000(root):
    assert make_settings(root).smtp.max_recipients == 1000


# --- DATA without recipients -----------------------------------------------------------------------


def test_data_with_every_recipient_rejected_is_554(smtp, alice):
    client = smtp()
    client.ehlo()
    client.mail("a@example.org")
    client.rcpt("nobody@localhost")
    client.rcpt("someone@example.com")
    assert client.docmd("DATA") == answer(R.R554_NO_VALID_RECIPIENTS)


def test_data_after_an_accepted_and_a_rejected_recipient_is_354(greeted, alice):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    exchange(client, "RCPT TO:<nobody@localhost>")
    exchange(client, "RCPT TO:<alice@localhost>")
    assert exchange(client, "DATA") == wire(R.R354_START_DATA)


def test_data_with_an_argument_is_501(greeted, alice):
    client = greeted()
    exchange(client, "MAIL FROM:<a@example.org>")
    exchange(client, "RCPT TO:<alice@localhost>")
    assert exchange(client, "DATA now") == wire(R.R501_SYNTAX, syntax="DATA")


# --- command line length ---------------------------------------------------------------------------


def test_command_line_of_512_octets_is_answered(greeted):
    client = greeted()
    line = "NOOP " + "x" * (512 - len("NOOP ") - 2)
    assert len(line) + 2 == 512
    assert exchange(client, line) == wire(R.R250_OK)


def test_command_line_over_512_octets_is_500_and_the_next_is_answered(greeted):
    # RFC 5321 §4.5.3.1.4: 512 octets including CRLF.
    client = greeted()
    assert exchange(client, "NOOP " + "x" * (513 - len("NOOP ") - 2)) == wire(R.R500_LINE_TOO_LONG)
    assert exchange(client, "NOOP " + "x" * 595) == wire(R.R500_LINE_TOO_LONG)
    assert exchange(client, "NOOP") == wire(R.R250_OK)


def test_mail_line_with_long_parameters_within_1024_octets_is_parsed(greeted):
    # RFC 1870 §3 / RFC 6531 §3.1 item 5 give MAIL room for its parameters (RCPT: ours).
    client = greeted()
    line = "MAIL FROM:<a@example.org> X-LONG=" + "v" * 560
    assert 512 < len(line) + 2 < 1024
    assert exchange(client, line) == wire(R.R555_UNKNOWN_PARAMETER, parameter="X-LONG")
    line = "MAIL FROM:<a@example.org>" + " " * 500 + "SIZE=10 BODY=8BITMIME"
    assert exchange(client, line) == wire(R.R250_SENDER_OK, address="a@example.org")


def test_mail_line_over_1024_octets_is_500_and_the_next_is_answered(greeted):
    client = greeted()
    assert exchange(client, "MAIL FROM:<a@example.org> X-LONG=" + "v" * 5000) == wire(R.R500_LINE_TOO_LONG)
    assert exchange(client, "MAIL FROM:<a@example.org>") == wire(R.R250_SENDER_OK, address="a@example.org")


def test_a_reply_that_repeats_client_text_is_ascii_and_at_most_512_octets(greeted):
    # RFC 5321 §4.2 (textstring) and §4.5.3.1.5: a reply line is printable
    # ASCII, 512 octets with its CRLF, however long the text it repeats.
    client = greeted()
    reply = exchange(client, "MAIL FROM:<a@example.org> " + "K" * 950)
    assert reply.startswith(b"555 5.5.4 unsupported parameter KKK") and reply.endswith(b"KKK...\r\n")
    assert len(reply) == 512
    reply = exchange(client, "MAIL FROM:<\x01\xff é@example.org>".encode("utf-8", "surrogateescape"))
    assert reply.isascii() and reply.startswith(b"501 5.1.7 ") and b"\\xe9" in reply


def test_line_limit_does_not_grow_with_repeated_ehlo(greeted):
    client = greeted()
    for _ in range(5):
        exchange(client, "EHLO client.example")
    assert exchange(client, "NOOP " + "x" * 595) == wire(R.R500_LINE_TOO_LONG)
    assert exchange(client, "MAIL FROM:<a@example.org> X-LONG=" + "v" * 1100) == wire(R.R500_LINE_TOO_LONG)


def test_huge_command_line_is_read_through_in_bounded_pieces(greeted):
    client = greeted()
    client.send(b"NOOP " + b"x" * 2_000_000 + b"\r\n")
    assert read_reply(client) == wire(R.R500_LINE_TOO_LONG)
    assert exchange(client, "NOOP") == wire(R.R250_OK)


# --- pipelining ------------------------------------------------------------------------------------


def test_pipelined_transaction_is_answered_in_order(connect, server, alice, bob):
    # RFC 2920 §3: a client may send the whole envelope in one write.
    client = connect()
    client.send(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@localhost>\r\n"
                b"RCPT TO:<nobody@localhost>\r\nRCPT TO:<bob@localhost>\r\nDATA\r\n")
    replies = [read_reply(client) for _ in range(6)]
    assert replies == [
        wire(R.R250_EHLO, lines=ehlo_lines(server.settings.hostname, "client.example",
                                           server.settings.smtp.max_message_size)),
        wire(R.R250_SENDER_OK, address="a@example.org"),
        wire(R.R250_RECIPIENT_OK, address="alice@localhost"),
        wire(R.R550_NO_SUCH_USER, address="nobody@localhost"),
        wire(R.R250_RECIPIENT_OK, address="bob@localhost"),
        wire(R.R354_START_DATA),
    ]


def test_pipelined_replies_are_flushed_once_the_input_is_used_up(greeted, alice):
    # RFC 2920 §3: the server may hold replies while more commands wait in its
    # input, but must send them before it waits for more: no command follows
    # this group, and every reply still arrives.
    client = greeted()
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<alice@localhost>\r\nNOOP\r\n")
    expected = (wire(R.R250_SENDER_OK, address="a@example.org")
                + wire(R.R250_RECIPIENT_OK, address="alice@localhost") + wire(R.R250_OK))
    received = b""
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while len(received) < len(expected) and time.monotonic() < deadline:
        chunk = client.sock.recv(65536)
        if not chunk:
            break
        received += chunk
    assert received == expected


def test_smtplib_send_with_pipelining_advertised(smtp, alice, bob, store):
    client = smtp()
    refused = client.sendmail("a@example.org", ["alice@localhost", "nobody@localhost", "bob@localhost"],
                              b"Subject: pipelined\r\n\r\nhello\r\n")
    assert refused == {"nobody@localhost": answer(R.R550_NO_SUCH_USER, address="nobody@localhost")}
    assert len(store.messages("alice")) == len(store.messages("bob")) == 1


# --- error limit and timeouts ----------------------------------------------------------------------


def test_twenty_errors_end_the_session_with_421(connect, hostname):
    client = connect()
    client.send(b"BOGUS\r\n" * 25)
    replies = [read_reply(client) for _ in range(21)]
    # Every error is answered; the 421 follows the 20th unasked (RFC 5321 §3.8).
    assert replies[:20] == [wire(R.R500_UNKNOWN_COMMAND)] * 20
    assert replies[20] == wire(R.R421_TOO_MANY_ERRORS, host=hostname)
    assert client.closed()


def test_every_kind_of_error_counts_towards_the_limit(greeted, hostname):
    client = greeted()
    errors = ["BOGUS", "RCPT TO:<a@localhost>", "EXPN x", "MAIL FROM:a@b", "VRFY", "NOOP " + "x" * 600]
    replies = [exchange(client, errors[n % len(errors)]) for n in range(19)]
    assert all(reply[:1] in (b"4", b"5") for reply in replies)
    assert exchange(client, "BOGUS") == wire(R.R500_UNKNOWN_COMMAND)
    assert read_reply(client) == wire(R.R421_TOO_MANY_ERRORS, host=hostname)
    assert client.closed()


def test_a_delivered_message_forgives_the_errors_before_it(greeted, alice):
    # A list's sender with one stale address a message: 19 messages, 19
    # refused recipients, and the 20th still goes (Postfix's
    # smtpd_hard_error_limit counts errors made "without delivering mail").
    client = greeted()
    for number in range(SMTP_MAX_ERRORS + 5):
        assert exchange(client, "MAIL FROM:<list@example.org>") == wire(R.R250_SENDER_OK, address="list@example.org")
        assert exchange(client, "RCPT TO:<alice@localhost>") == wire(R.R250_RECIPIENT_OK, address="alice@localhost")
        assert exchange(client, f"RCPT TO:<gone{number}@localhost>") == wire(R.R550_NO_SUCH_USER,
                                                                              address=f"gone{number}@localhost")
        assert exchange(client, "DATA") == wire(R.R354_START_DATA)
        assert re.fullmatch(rb"250 2\.0\.0 OK [0-9A-F]{10}\r\n", exchange(client, "Subject: list\r\n\r\nhello\r\n."))


def test_successful_commands_do_not_count_as_errors(greeted):
    client = greeted()
    for _ in range(30):
        assert exchange(client, "NOOP") == wire(R.R250_OK)
    assert exchange(client, "BOGUS") == wire(R.R500_UNKNOWN_COMMAND)


def test_idle_client_gets_421_timeout_and_is_closed(start_server, connect):
    server = start_server(smtp={"command_timeout": 0.5})
    started = time.monotonic()  # before the server's clock starts, so a slow client cannot undercut it
    client = connect(server.addresses["smtp"])
    assert read_reply(client) == wire(R.R421_TIMEOUT, host=server.settings.hostname)
    assert 0.5 <= time.monotonic() - started < 5
    assert client.closed()
    assert R.R421_TIMEOUT.code == 421 and R.R421_TIMEOUT.enhanced == "4.4.2"
    assert R.R421_TIMEOUT.text.endswith("timeout exceeded")


def test_command_timeout_applies_after_each_command(start_server, connect):
    server = start_server(smtp={"command_timeout": 1.0})
    client = connect(server.addresses["smtp"])
    for _ in range(6):  # longer than the timeout in all, each wait far shorter
        time.sleep(0.2)
        assert exchange(client, "NOOP") == wire(R.R250_OK)
    assert read_reply(client) == wire(R.R421_TIMEOUT, host=server.settings.hostname)


def test_a_command_trickled_an_octet_at_a_time_is_timed_out_as_a_whole(start_server, connect):
    # RFC 5321 §4.5.3.2.7 times the wait for the next command, not for each
    # octet of it: otherwise an octet every few seconds would hold the
    # connection (and its slot) for ever.
    server = start_server(smtp={"command_timeout": 1.0})
    client = connect(server.addresses["smtp"])
    started = time.monotonic()
    for octet in b"NOOP " * 20:  # 100 octets, 0.3 s apart: 30 s, unless the server stops us
        client.send(bytes([octet]))
        if select.select([client.sock], [], [], 0.3)[0]:
            break  # the server spoke: send no more, so its close cannot meet unread octets
    assert read_reply(client) == wire(R.R421_TIMEOUT, host=server.settings.hostname)
    assert time.monotonic() - started < 3.0
    assert client.closed()


def test_client_that_closes_mid_command_does_not_hurt_the_server(connect):
    client = connect()
    client.send(b"EHLO half")
    client.sock.shutdown(socket.SHUT_WR)
    assert client.closed()
    assert exchange(connect(), "NOOP") == wire(R.R250_OK)
