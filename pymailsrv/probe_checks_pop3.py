"""The POP3 conformance checks (RFC 1939, RFC 2449), one dialogue each.

Read each function beside the RFC section its catalogue row cites. A check
says what it sends and what it wants back, in the order of a session::

    connect -> greeting -> AUTHORIZATION -> USER/PASS or APOP -> TRANSACTION -> QUIT -> UPDATE

Checks marked ``needs=("mail",)`` first send their own messages over SMTP
(``Probe.deliver``) and find them again by token, so they work on a
maildrop that already holds mail, and they leave it as they found it.
Checks that delete a message on purpose let their own QUIT do the
clean-up; ``Probe.cleanup`` deletes whatever is left.

The catalogue, ``POP3_CHECKS``, is at the foot of the module.
"""

from __future__ import annotations

import re
import time

from pymailsrv.probe_base import (
    DOTTED_BODY,
    IDLE_MARGIN_SECONDS,
    Check,
    Failed,
    LineClient,
    Probe,
    Skipped,
    apop_digest,
    apop_timestamp,
    fail_unless,
    octets,
    skip_if_refused_for_now,
    stuffed,
    unstuffed,
)

# RFC 1939 §3: "Responses may be up to 512 characters long, including the
# terminating CRLF."
RESPONSE_LINE_MAX = 512
# RFC 2449 §4: "Servers which support the CAPA command MUST support commands
# up to 255 octets, including the terminating CRLF": a floor, which a server
# may go past. The check that sends more is the strict reading ("(strict)" in
# its title), a FAIL to discuss rather than a bug to report.
OVERLONG_COMMAND = "NOOP " + "x" * 300
# RFC 1939 §3: an autologout timer "MUST be of at least 10 minutes' duration";
# the slow check stays idle for just under that.
AUTOLOGOUT_MINIMUM_SECONDS = 10 * 60
THREE_LINE_BODY = (b"body line 1", b"body line 2", b"body line 3")


def ok(reply: str, command: str) -> str:
    fail_unless(reply.startswith("+OK"), f"+OK to {command}", repr(reply))
    return reply


def err(reply: str, command: str) -> str:
    fail_unless(reply.startswith("-ERR"), f"-ERR to {command}", repr(reply))
    return reply


def stat(client: LineClient) -> tuple[int, int]:
    """STAT's drop listing: (count, size), RFC 1939 §5."""
    reply = client.pop3("STAT")
    match = re.match(r"\+OK (\d+) (\d+)(?: |$)", reply)
    fail_unless(match is not None, "'+OK count size' to STAT", repr(reply))
    return int(match.group(1)), int(match.group(2))


def multi(client: LineClient, command: str) -> list[bytes]:
    """The raw body of a multi-line reply, failing on -ERR."""
    status, lines = client.pop3_multi(command)
    fail_unless(lines is not None, f"+OK and a multi-line reply to {command}", repr(status))
    return lines


def optional_multi(client: LineClient, command: str, unsupported: str) -> list[bytes]:
    """The raw body of a multi-line reply to a command the RFC makes optional;
    an -ERR skips the check, saying ``unsupported`` and what came back."""
    status, lines = client.pop3_multi(command)
    if lines is None:
        raise Skipped(f"{unsupported}: {status!r}")
    return lines


def listing(client: LineClient, command: str) -> dict[int, str]:
    """A LIST or UIDL listing: msg_number -> the rest of its line (for LIST
    the size, in decimal: RFC 1939 §5's scan listing)."""
    sizes = command.startswith("LIST")
    value = rb"\d+" if sizes else rb"\S+"
    entries = {}
    for line in unstuffed(multi(client, command)):
        match = re.fullmatch(rb"(\d+) (" + value + rb")(?: .*)?", line)
        fail_unless(match is not None, f"'msg_number {'size' if sizes else 'value'}' lines from {command}", line)
        entries[int(match.group(1))] = match.group(2).decode("ascii", "replace")
    return entries


def present(probe: Probe, message) -> bool:
    """Is ``message`` in the maildrop? Asked in a session of its own, then QUIT."""
    client = probe.login()
    try:
        return message.token in probe.find(client, [message.token])
    finally:
        client.pop3("QUIT")


# --- AUTHORIZATION: greeting, commands before login (RFC 1939 §4, §7) --------------


def greeting_ok(p: Probe) -> None:
    client = p.connect()
    ok(client.greeting, "connecting (the greeting)")


def capa_in_authorization(p: Probe) -> None:
    _capabilities(p.connect())


def _capabilities(client: LineClient) -> None:
    """CAPA lists at least one capability; skipped where the server has no CAPA
    (an extension, RFC 2449: a server of RFC 1939 alone answers -ERR)."""
    capabilities = optional_multi(client, "CAPA", "the server has no CAPA")
    fail_unless(len(capabilities) > 0, "at least one capability", "an empty list")


def unknown_command_err(p: Probe) -> None:
    err(p.connect().pop3("XPROBE"), "an unknown command")


def transaction_command_before_login_err(p: Probe) -> None:
    err(p.connect().pop3("STAT"), "STAT in the AUTHORIZATION state")


def pass_before_user_err(p: Probe) -> None:
    err(p.connect().pop3("PASS secret", shown="PASS ****"), "PASS without USER")


def wrong_password_err(p: Probe) -> None:
    def wrong_password() -> tuple[LineClient, str]:
        client = p.connect()
        ok(client.pop3(f"USER {p.target.user}"), "USER")
        return client, client.pop3(f"PASS not-{p.target.password}", shown="PASS ****")

    err(p.until_unlocked(wrong_password)[1], "PASS with a wrong password")


def user_pass_login(p: Probe) -> None:
    client = p.login()  # fails unless USER and PASS both get +OK
    stat(client)


def apop(p: Probe, secret: str | None) -> tuple[LineClient, str]:
    """An APOP login with the digest of ``secret`` (None: a wrong digest);
    Skipped where the greeting offers no APOP timestamp."""
    client = p.connect()
    timestamp = apop_timestamp(client.greeting)
    if timestamp is None:
        raise Skipped("the greeting offers no APOP timestamp")
    digest = apop_digest(timestamp, secret) if secret is not None else "0" * 32
    # Masked: with the greeting's timestamp, the digest lets a guess list find the secret.
    return client, client.pop3(f"APOP {p.target.user} {digest}", shown=f"APOP {p.target.user} ****")


def apop_login(p: Probe) -> None:
    _, reply = p.until_unlocked(lambda: apop(p, p.target.password))
    if not reply.startswith("+OK"):
        skip_if_refused_for_now(reply)
        # The greeting offers APOP to every account, but this one may have
        # no APOP secret (pymailsrv keeps one only after "user add --apop").
        raise Failed(f"expected +OK to APOP with the password as the shared secret, got {reply!r} "
                     "(does the account have an APOP secret?)")


def apop_bad_digest_err(p: Probe) -> None:
    err(p.until_unlocked(lambda: apop(p, None))[1], "APOP with a wrong digest")


def apop_timestamp_unique(p: Probe) -> None:
    first, second = (apop_timestamp(p.connect().greeting) for _ in range(2))
    if first is None:
        raise Skipped("the greeting offers no APOP timestamp")
    fail_unless(first != second, "a different timestamp in every greeting", f"{first} twice")


def quit_in_authorization(p: Probe) -> None:
    client = p.connect()
    ok(client.pop3("QUIT"), "QUIT")
    fail_unless(client.closed_by_server(), "the server to close the connection", "it stayed open")


def keywords_case_insensitive(p: Probe) -> None:
    client = p.login(verbs=("user", "pass"))  # with login's wait for a lock still held
    ok(client.pop3("stat"), "stat")
    ok(client.pop3("NoOp"), "NoOp")


# --- TRANSACTION: every command (RFC 1939 §5, §7) ------------------------------------


def capa_in_transaction(p: Probe) -> None:
    _capabilities(p.login())


def stat_format(p: Probe) -> None:
    stat(p.login())


def list_matches_stat(p: Probe) -> None:
    client = p.login()
    count, size = stat(client)
    entries = listing(client, "LIST")
    fail_unless(len(entries) == count, f"{count} scan listings, as STAT said", len(entries))
    total = sum(int(value) for value in entries.values())
    fail_unless(total == size, f"sizes adding up to STAT's {size}", total)


def list_one(p: Probe) -> None:
    client, msg_number = p.session_holding(p.message())
    size = listing(client, "LIST")[msg_number]
    reply = client.pop3(f"LIST {msg_number}")
    fail_unless(reply.split()[:3] == ["+OK", str(msg_number), size],
                f"'+OK {msg_number} {size}', as the multi-line LIST said", repr(reply))


def list_no_such_message_err(p: Probe) -> None:
    client = p.login()
    count, _ = stat(client)
    err(client.pop3(f"LIST {count + 1}"), "LIST of a message that does not exist")


def noop_ok(p: Probe) -> None:
    ok(p.login().pop3("NOOP"), "NOOP")


def retr_whole_message(p: Probe) -> None:
    client, msg_number = p.session_holding(p.message(THREE_LINE_BODY))
    lines = unstuffed(multi(client, f"RETR {msg_number}"))
    fail_unless(lines[-len(THREE_LINE_BODY):] == list(THREE_LINE_BODY),
                "the body as sent at the end of RETR", lines[-len(THREE_LINE_BODY):])


def retr_size_matches_list(p: Probe) -> None:
    client, msg_number = p.session_holding(p.message(THREE_LINE_BODY))
    listed = int(listing(client, "LIST")[msg_number])
    raw = multi(client, f"RETR {msg_number}")
    sent = octets(raw)
    fail_unless(listed == sent, f"LIST's {listed} octets to be what RETR sends, CRLFs counted",
                f"{sent} octets")


def retr_byte_stuffing(p: Probe) -> None:
    client, msg_number = p.session_holding(p.message(DOTTED_BODY))
    raw = multi(client, f"RETR {msg_number}")
    tail = raw[-len(DOTTED_BODY):]
    wanted = [stuffed(line) + b"\r\n" for line in DOTTED_BODY]
    fail_unless(tail == wanted, "lines starting with '.' sent with another '.' in front", tail)


def top_header_and_lines(p: Probe) -> None:
    client, msg_number = p.session_holding(p.message(THREE_LINE_BODY))
    whole = unstuffed(multi(client, f"RETR {msg_number}"))
    header = whole[: whole.index(b"") + 1]  # up to and with the empty line
    top = optional_multi(client, f"TOP {msg_number} 0", "TOP is not supported (optional, RFC 1939 §7)")
    fail_unless(unstuffed(top) == header, "the header and the empty line, no body", unstuffed(top)[-2:])
    top = unstuffed(multi(client, f"TOP {msg_number} 2"))
    fail_unless(top == header + list(THREE_LINE_BODY[:2]), "the header and 2 body lines", top[-3:])


def top_beyond_body(p: Probe) -> None:
    client, msg_number = p.session_holding(p.message(THREE_LINE_BODY))
    whole = unstuffed(multi(client, f"RETR {msg_number}"))
    top = optional_multi(client, f"TOP {msg_number} 100", "TOP is not supported (optional, RFC 1939 §7)")
    fail_unless(unstuffed(top) == whole, "the entire message", f"{len(top)} of {len(whole)} lines")


def retr_no_such_message_err(p: Probe) -> None:
    client = p.login()
    count, _ = stat(client)
    err(client.pop3("RETR 0"), "RETR 0")
    err(client.pop3(f"RETR {count + 1}"), "RETR of a message that does not exist")


def dele_no_such_message_err(p: Probe) -> None:
    client = p.login()
    count, _ = stat(client)
    err(client.pop3(f"DELE {count + 1}"), "DELE of a message that does not exist")
    ok(client.pop3("RSET"), "RSET")


def bad_message_number_err(p: Probe) -> None:
    client = p.login()
    err(client.pop3("RETR one"), "RETR with a word for a number")
    err(client.pop3("LIST -1"), "LIST -1")


def user_in_transaction_err(p: Probe) -> None:
    client = p.login()
    err(client.pop3(f"USER {p.target.user}"), "USER in the TRANSACTION state")


# --- DELE, RSET and the UPDATE state (RFC 1939 §5, §6) ------------------------------


def retr_deleted_err(p: Probe) -> None:
    client, msg_number = p.session_holding(p.message())
    ok(client.pop3(f"DELE {msg_number}"), "DELE")
    err(client.pop3(f"RETR {msg_number}"), "RETR of a message marked as deleted")
    client.pop3("QUIT")


def list_excludes_deleted(p: Probe) -> None:
    client, msg_number = p.session_holding(p.message())
    count, size = stat(client)
    message_size = int(listing(client, "LIST")[msg_number])
    ok(client.pop3(f"DELE {msg_number}"), "DELE")
    err(client.pop3(f"LIST {msg_number}"), "LIST of a message marked as deleted")
    fail_unless(msg_number not in listing(client, "LIST"), "LIST to leave out the deleted message",
                f"message {msg_number} still listed")
    after = stat(client)
    fail_unless(after == (count - 1, size - message_size), f"STAT {count - 1} {size - message_size}",
                f"STAT {after[0]} {after[1]}")
    client.pop3("QUIT")


def dele_twice_err(p: Probe) -> None:
    client, msg_number = p.session_holding(p.message())
    ok(client.pop3(f"DELE {msg_number}"), "DELE")
    err(client.pop3(f"DELE {msg_number}"), "a second DELE of the same message")
    client.pop3("QUIT")


def dele_deferred_until_quit(p: Probe) -> None:
    message = p.message()
    client, msg_number = p.session_holding(message)
    ok(client.pop3(f"DELE {msg_number}"), "DELE")
    ok(client.pop3("RSET"), "RSET")
    ok(client.pop3("QUIT"), "QUIT")
    # Had DELE removed the message at once, RSET could not have brought it back.
    fail_unless(present(p, message), "the message to survive DELE, RSET, QUIT", "it was gone")


def disconnect_without_quit_keeps_mail(p: Probe) -> None:
    message = p.message()
    client, msg_number = p.session_holding(message)
    ok(client.pop3(f"DELE {msg_number}"), "DELE")
    client.close()  # no QUIT: the session never enters UPDATE
    fail_unless(present(p, message), "the message to survive a dropped session", "it was gone")


def quit_expunges_deleted(p: Probe) -> None:
    message = p.message()
    client, msg_number = p.session_holding(message)
    ok(client.pop3(f"DELE {msg_number}"), "DELE")
    ok(client.pop3("QUIT"), "QUIT")
    fail_unless(not present(p, message), "the message to be gone after QUIT", "it is still there")


def rset_unmarks(p: Probe) -> None:
    client, msg_number = p.session_holding(p.message())
    before = stat(client)
    ok(client.pop3(f"DELE {msg_number}"), "DELE")
    ok(client.pop3("RSET"), "RSET")
    after = stat(client)
    fail_unless(after == before, f"STAT {before[0]} {before[1]} again", f"STAT {after[0]} {after[1]}")
    multi(client, f"RETR {msg_number}")


def message_numbers_stable(p: Probe) -> None:
    first, second = p.message(), p.message()
    p.deliver(first, second)
    client = p.login()
    first_number, second_number = p.numbers(client, first, second)
    size = listing(client, "LIST")[second_number]
    ok(client.pop3(f"DELE {first_number}"), "DELE")
    reply = ok(client.pop3(f"LIST {second_number}"), f"LIST {second_number}")
    fail_unless(reply.split()[1:3] == [str(second_number), size],
                f"'+OK {second_number} {size}': numbers do not move after DELE", repr(reply))
    found = p.find(client, [second.token])
    fail_unless(found.get(second.token) == second_number, f"message {second_number} to be the same one",
                found)
    ok(client.pop3("RSET"), "RSET")


# --- UIDL (RFC 1939 §7) ------------------------------------------------------------------


def uidl_listing(p: Probe) -> None:
    client = p.login()
    raw = optional_multi(client, "UIDL", "UIDL is not supported (optional, RFC 1939 §7)")
    uids = []
    for line in unstuffed(raw):
        match = re.fullmatch(rb"(\d+) ([\x21-\x7e]{1,70})", line)
        fail_unless(match is not None, "'msg_number uid', the uid 1-70 characters 0x21-0x7E", line)
        uids.append(match.group(2))
    fail_unless(len(uids) == stat(client)[0], "one uid per message", f"{len(uids)} uids")


def _uid(p: Probe, client: LineClient, message) -> str:
    (msg_number,) = p.numbers(client, message)
    reply = client.pop3(f"UIDL {msg_number}")
    if reply.startswith("-ERR"):
        raise Skipped(f"UIDL is not supported (optional, RFC 1939 §7): {reply!r}")
    match = re.match(rf"\+OK {msg_number} ([\x21-\x7e]{{1,70}})(?: |$)", reply)
    fail_unless(match is not None, f"'+OK {msg_number} uid'", repr(reply))
    return match.group(1)


def uidl_one(p: Probe) -> None:
    message = p.message()
    client, msg_number = p.session_holding(message)
    uid = _uid(p, client, message)
    fail_unless(listing(client, "UIDL").get(msg_number) == uid, "the same uid as the listing", uid)


def uidl_stable_across_sessions(p: Probe) -> None:
    message = p.message()
    client, msg_number = p.session_holding(message)
    first = _uid(p, client, message)
    multi(client, f"RETR {msg_number}")  # reading must not change it either
    ok(client.pop3("QUIT"), "QUIT")
    second = _uid(p, p.login(), message)
    fail_unless(first == second, f"uid {first} in the next session too", second)


def uidl_unique(p: Probe) -> None:
    # Same text but for the token: a uid made from the content would clash.
    first, second = p.message(), p.message()
    p.deliver(first, second)
    client = p.login()
    one, two = _uid(p, client, first), _uid(p, client, second)
    fail_unless(one != two, "two messages, two different uids", f"{one} for both")


# --- locking (RFC 1939 §4, §6) ---------------------------------------------------------


def lock_second_session_err(p: Probe) -> None:
    p.login()  # holds the maildrop
    second = p.connect()
    ok(second.pop3(f"USER {p.target.user}"), "USER")
    reply = second.pop3(f"PASS {p.target.password}", shown="PASS ****")
    err(reply, "PASS while another session holds the maildrop lock")


def lock_released_after_quit(p: Probe) -> None:
    first = p.login()
    ok(first.pop3("QUIT"), "QUIT")
    first.closed_by_server()  # wait for the server to finish UPDATE and close
    second = p.connect()
    ok(second.pop3(f"USER {p.target.user}"), "USER")
    ok(second.pop3(f"PASS {p.target.password}", shown="PASS ****"), "PASS once the first session quit")


def quit_in_transaction(p: Probe) -> None:
    client = p.login()
    ok(client.pop3("QUIT"), "QUIT")
    fail_unless(client.closed_by_server(), "the server to close the connection", "it stayed open")


# --- the wire: line lengths and line ends (RFC 1939 §3, RFC 2449 §4) ----------------------


def overlong_command_refused(p: Probe) -> None:
    client = p.login()
    err(client.pop3(OVERLONG_COMMAND), f"a {len(OVERLONG_COMMAND) + 2}-octet command line")
    ok(client.pop3("NOOP"), "NOOP after it (the session must stay in step)")


def _response_lines(p: Probe) -> list[bytes]:
    """Every status and listing line of a typical session, exactly as sent.

    A login that fails fails the check: the lines of a session refused
    (-ERR [IN-USE]) could all end well and prove nothing."""
    client = p.login()
    lines = list(client.status_lines)  # the greeting, USER's, PASS's
    for command in ("STAT", "LIST", "UIDL", "CAPA"):
        status, body = client.pop3_multi(command) if command != "STAT" else (client.pop3(command), [])
        lines += [client.status_lines[-1], *(body or [])]
    return lines


def response_lines_end_in_crlf(p: Probe) -> None:
    for line in _response_lines(p):
        fail_unless(line.endswith(b"\r\n"), "every line to end in CRLF", line)


def response_lines_within_512(p: Probe) -> None:
    for line in _response_lines(p):
        fail_unless(len(line) <= RESPONSE_LINE_MAX, f"lines of at most {RESPONSE_LINE_MAX} octets",
                    f"{len(line)} octets: {line[:40]!r}...")


def autologout_at_least_ten_minutes(p: Probe) -> None:
    client = p.login()
    time.sleep(AUTOLOGOUT_MINIMUM_SECONDS - IDLE_MARGIN_SECONDS)
    ok(client.pop3("NOOP"), f"NOOP after {AUTOLOGOUT_MINIMUM_SECONDS - IDLE_MARGIN_SECONDS} s idle")


# --- The catalogue ------------------------------------------------------------------------

LOGIN = ("login",)
MAIL = ("mail",)

POP3_CHECKS = [
    Check("pop3.greeting-ok", "RFC 1939 §4", "the greeting is +OK", greeting_ok),
    Check("pop3.capa-in-authorization", "RFC 2449 §5", "CAPA works before login", capa_in_authorization),
    Check("pop3.unknown-command-err", "RFC 1939 §3", "an unknown command gets -ERR", unknown_command_err),
    Check("pop3.stat-before-login-err", "RFC 1939 §3, §4", "a TRANSACTION command before login gets -ERR",
          transaction_command_before_login_err),
    Check("pop3.pass-before-user-err", "RFC 1939 §7", "PASS without USER gets -ERR", pass_before_user_err),
    Check("pop3.wrong-password-err", "RFC 1939 §7", "a wrong password gets -ERR", wrong_password_err, LOGIN),
    Check("pop3.user-pass-login", "RFC 1939 §7", "USER and PASS log in", user_pass_login, LOGIN),
    Check("pop3.apop-login", "RFC 1939 §7", "APOP logs in when the greeting has a timestamp",
          apop_login, LOGIN),
    Check("pop3.apop-bad-digest-err", "RFC 1939 §7", "APOP with a wrong digest gets -ERR",
          apop_bad_digest_err, LOGIN),
    Check("pop3.apop-timestamp-unique", "RFC 1939 §7", "every greeting has a new APOP timestamp",
          apop_timestamp_unique),
    Check("pop3.quit-in-authorization", "RFC 1939 §4", "QUIT before login: +OK, then close",
          quit_in_authorization),
    Check("pop3.keywords-case-insensitive", "RFC 1939 §3", "command keywords are case-insensitive",
          keywords_case_insensitive, LOGIN),
    Check("pop3.capa-in-transaction", "RFC 2449 §5", "CAPA works after login", capa_in_transaction, LOGIN),
    Check("pop3.stat-format", "RFC 1939 §5", "STAT answers '+OK count size'", stat_format, LOGIN),
    Check("pop3.list-matches-stat", "RFC 1939 §5", "LIST has STAT's count and sizes adding up to its size",
          list_matches_stat, LOGIN),
    Check("pop3.list-one", "RFC 1939 §5", "LIST n agrees with the multi-line LIST", list_one, MAIL),
    Check("pop3.list-no-such-message-err", "RFC 1939 §5", "LIST of a missing message gets -ERR",
          list_no_such_message_err, LOGIN),
    Check("pop3.noop-ok", "RFC 1939 §5", "NOOP gets +OK", noop_ok, LOGIN),
    Check("pop3.retr-whole-message", "RFC 1939 §5", "RETR sends the message as it was sent",
          retr_whole_message, MAIL),
    Check("pop3.retr-size-matches-list", "RFC 1939 §5, §11", "LIST's size is RETR's octets, CRLF counted",
          retr_size_matches_list, MAIL),
    Check("pop3.retr-byte-stuffing", "RFC 1939 §3", "lines starting with '.' are byte-stuffed",
          retr_byte_stuffing, MAIL),
    Check("pop3.top-header-and-lines", "RFC 1939 §7", "TOP n k sends the header and k body lines",
          top_header_and_lines, MAIL),
    Check("pop3.top-beyond-body", "RFC 1939 §7", "TOP with more lines than the body sends it all",
          top_beyond_body, MAIL),
    Check("pop3.retr-no-such-message-err", "RFC 1939 §5", "RETR 0 and RETR past the end get -ERR",
          retr_no_such_message_err, LOGIN),
    Check("pop3.dele-no-such-message-err", "RFC 1939 §5", "DELE past the end gets -ERR",
          dele_no_such_message_err, LOGIN),
    Check("pop3.bad-message-number-err", "RFC 1939 §5", "a message number that is not one gets -ERR",
          bad_message_number_err, LOGIN),
    Check("pop3.user-in-transaction-err", "RFC 1939 §3", "USER after login gets -ERR",
          user_in_transaction_err, LOGIN),
    Check("pop3.retr-deleted-err", "RFC 1939 §5", "RETR of a deleted message gets -ERR",
          retr_deleted_err, MAIL),
    Check("pop3.list-excludes-deleted", "RFC 1939 §5", "LIST and STAT leave deleted messages out",
          list_excludes_deleted, MAIL),
    Check("pop3.dele-twice-err", "RFC 1939 §5", "DELE of a deleted message gets -ERR", dele_twice_err, MAIL),
    Check("pop3.dele-deferred-until-quit", "RFC 1939 §5, §6", "DELE only marks: RSET can still undo it",
          dele_deferred_until_quit, MAIL),
    Check("pop3.disconnect-without-quit-keeps-mail", "RFC 1939 §6",
          "a session dropped without QUIT deletes nothing", disconnect_without_quit_keeps_mail, MAIL),
    Check("pop3.quit-expunges-deleted", "RFC 1939 §6", "QUIT removes the messages marked by DELE",
          quit_expunges_deleted, MAIL),
    Check("pop3.rset-unmarks", "RFC 1939 §5", "RSET unmarks deleted messages", rset_unmarks, MAIL),
    Check("pop3.message-numbers-stable", "RFC 1939 §4, §5", "DELE does not renumber the other messages",
          message_numbers_stable, MAIL),
    Check("pop3.uidl-listing", "RFC 1939 §7", "UIDL lists unique ids of 1-70 printable characters",
          uidl_listing, LOGIN),
    Check("pop3.uidl-one", "RFC 1939 §7", "UIDL n agrees with the listing", uidl_one, MAIL),
    Check("pop3.uidl-stable-across-sessions", "RFC 1939 §7", "a message keeps its uid in the next session",
          uidl_stable_across_sessions, MAIL),
    Check("pop3.uidl-unique", "RFC 1939 §7", "two messages alike but for one header get two uids",
          uidl_unique, MAIL),
    Check("pop3.lock-second-session-err", "RFC 1939 §4", "a second session on a locked maildrop gets -ERR (strict)",
          lock_second_session_err, LOGIN),
    Check("pop3.lock-released-after-quit", "RFC 1939 §6", "after QUIT the maildrop can be opened again",
          lock_released_after_quit, LOGIN),
    Check("pop3.quit-in-transaction", "RFC 1939 §6", "QUIT after login: +OK, then close",
          quit_in_transaction, LOGIN),
    Check("pop3.overlong-command-refused", "RFC 2449 §4", "a command over 255 octets gets -ERR, in step (strict)",
          overlong_command_refused, LOGIN),
    Check("pop3.response-lines-end-in-crlf", "RFC 1939 §3", "every response line ends in CRLF",
          response_lines_end_in_crlf, LOGIN),
    Check("pop3.response-lines-within-512", "RFC 1939 §3", "no response line is over 512 octets",
          response_lines_within_512, LOGIN),
    Check("pop3.autologout-at-least-10-minutes", "RFC 1939 §3", "an idle session lasts 10 minutes",
          autologout_at_least_ten_minutes, ("login", "slow")),
]
