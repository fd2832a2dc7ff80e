"""The SMTP conformance checks (RFC 5321 and the extensions it advertises), one dialogue each.

Read each function beside the RFC section its catalogue row cites. Most
checks need nothing but the address: they greet, try one rule, and leave
without a message ever being sent (RSET or QUIT end the transaction).
Checks marked ``needs=("rcpt",)`` send mail to ``--rcpt``, the probed
user; those marked ``("mail",)`` also read it back over POP3 (``--pop3``
with ``--user``/``--password-stdin``) to see what was stored, and delete
it again afterwards.

An extension is checked only when the EHLO reply advertises it: a server
that offers SIZE must refuse an oversized MAIL, one that does not is
skipped, not failed (RFC 5321 §4.1.1.1: the keywords are the contract).

The smuggling checks (CVE-2023-51764) put a would-be end of data made of
bare line ends in the middle of the text, followed by a command. A server
that takes it for the end answers that command, and the extra replies give
it away; a correct one ends the text only at ``<CRLF>.<CRLF>``
(§4.1.1.4) and answers once.

The catalogue, ``SMTP_CHECKS``, is at the foot of the module.
"""

from __future__ import annotations

import time

from pymailsrv.commands import is_decimal
from pymailsrv.probe_base import (
    DOTTED_BODY,
    IDLE_MARGIN_SECONDS,
    ConnectionClosed,
    Check,
    LineClient,
    Probe,
    Skipped,
    SmtpReply,
    fail_unless,
    unstuffed,
)
from pymailsrv.trace import shown

# RFC 5321 §4.5.3.1.4: "The maximum total length of a command line including
# the command word and the <CRLF> is 512 octets." §4.5.3.1 makes such sizes
# what every implementation must at least take, so a server that takes more
# keeps the RFC: the check that sends this is the strict reading ("(strict)"
# in its title), a FAIL to discuss rather than a bug to report.
OVERLONG_COMMAND = "NOOP " + "x" * 600
# RFC 5321 §4.5.3.1.8: a server MUST accept at least 100 recipients.
RECIPIENTS_MINIMUM = 100
# RFC 5321 §4.5.3.2.7: the server should wait at least 5 minutes for a command.
SERVER_TIMEOUT_MINIMUM_SECONDS = 5 * 60
# Mail for this domain is never ours to accept (RFC 2606 reserves it).
FOREIGN_ADDRESS = "probe@example.com"
# Enough replies to see a smuggled command answered, few enough to stop.
MAX_REPLIES_AFTER_TEXT = 10

EIGHT_BIT_BODY = ("Grüße aus dem Prüfprogramm: ½ € ✓".encode("utf-8"),)


def greeted(p: Probe, verb: str = "EHLO") -> tuple[LineClient, dict[str, str]]:
    """A connection after a 250 to EHLO: the client and its extensions (keyword -> parameters)."""
    client = p.connect()
    reply = client.smtp(f"{verb} probe.invalid")
    fail_unless(reply.code == 250, f"250 to {verb}", reply)
    extensions = {}
    for line in reply.lines[1:] if verb == "EHLO" else []:
        keyword, _, parameters = line.partition(" ")
        extensions[keyword.upper()] = parameters
    return client, extensions


def offered(extensions: dict[str, str], keyword: str) -> str:
    """The parameters of an advertised extension; SKIP when it is not advertised."""
    if keyword not in extensions:
        raise Skipped(f"{keyword} is not advertised")
    return extensions[keyword]


def expect(reply: SmtpReply, codes: tuple[int, ...] | range, what: str) -> SmtpReply:
    wanted = "/".join(str(code) for code in codes) if len(codes) < 5 else f"{codes[0]}-{codes[-1]}"
    fail_unless(reply.code in codes, f"{wanted} to {what}", reply)
    return reply


def in_step(client: LineClient) -> None:
    """The session still answers one reply per command (NOOP → 250)."""
    expect(client.smtp("NOOP"), (250,), "NOOP after it (the session must stay in step)")


def begin_data(client: LineClient, p: Probe, parameters: str = "") -> None:
    expect(client.smtp(f"MAIL FROM:<> {parameters}".rstrip()), (250,), "MAIL")
    expect(client.smtp(f"RCPT TO:<{p.target.rcpt}>"), (250, 251), f"RCPT to --rcpt {p.target.rcpt}")
    expect(client.smtp("DATA"), (354,), "DATA")


def stored_body(p: Probe, message) -> list[bytes]:
    """The message as POP3 gives it back: its unstuffed lines."""
    p.wait_for(message)
    client = p.login()
    (msg_number,) = p.numbers(client, message)
    status, raw = client.pop3_multi(f"RETR {msg_number}")
    fail_unless(raw is not None, "+OK to RETR", repr(status))
    return unstuffed(raw)


# --- greeting, EHLO, HELO (RFC 5321 §3.1, §4.1.1.1, §4.2) ------------------------------


def greeting_220(p: Probe) -> None:
    expect(p.connect().greeting, (220,), "connecting (the greeting)")


def ehlo_250(p: Probe) -> None:
    greeted(p)


def ehlo_multiline_format(p: Probe) -> None:
    client = p.connect()
    reply = expect(client.smtp("EHLO probe.invalid"), (250,), "EHLO")
    *leading, last = reply.wire
    for line in leading:
        fail_unless(line.startswith(b"250-") and line.endswith(b"\r\n"), "'250-…' CRLF before the last line",
                    line)
    fail_unless(last[:4] in (b"250 ", b"250\r") and last.endswith(b"\r\n"), "'250 …' CRLF last", last)


def helo_250(p: Probe) -> None:
    greeted(p, "HELO")


def helo_without_domain_501(p: Probe) -> None:
    expect(p.connect().smtp("HELO"), (501,), "HELO without a domain")


def verbs_case_insensitive(p: Probe) -> None:
    client = p.connect()
    expect(client.smtp("ehlo probe.invalid"), (250,), "ehlo")
    expect(client.smtp("mail from:<>"), (250,), "mail from:<>")
    expect(client.smtp("Rset"), (250,), "Rset")


# --- sequence and syntax errors (RFC 5321 §3.3, §4.1.4, §4.2.4) ---------------------


def mail_before_ehlo_503(p: Probe) -> None:
    expect(p.connect().smtp("MAIL FROM:<>"), (503,), "MAIL before EHLO/HELO")


def rcpt_before_mail_503(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("RCPT TO:<postmaster>"), (503,), "RCPT before MAIL")


def data_before_mail_503(p: Probe) -> None:
    client, _ = greeted(p)
    # §3.3: "If there was no MAIL ... the server MAY return" 503 or 554.
    expect(client.smtp("DATA"), (503, 554), "DATA before MAIL")


def data_without_recipients_refused(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("MAIL FROM:<>"), (250,), "MAIL")
    # §3.3: "command out of sequence" (503) or "no valid recipients" (554).
    expect(client.smtp("DATA"), (503, 554), "DATA with no recipient")


def nested_mail_503(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("MAIL FROM:<>"), (250,), "MAIL")
    expect(client.smtp("MAIL FROM:<>"), (503,), "a second MAIL in the same transaction")


def unknown_command_500(p: Probe) -> None:
    client, _ = greeted(p)
    # §4.2.4: 502 is for a command recognized but not implemented.
    expect(client.smtp("XPROBE"), (500,), "an unknown command")


def mail_syntax_501(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("MAIL TO:<probe@probe.invalid>"), (501,), "MAIL TO: (not FROM:)")


def rcpt_syntax_501(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("MAIL FROM:<>"), (250,), "MAIL")
    expect(client.smtp("RCPT FROM:<postmaster>"), (501,), "RCPT FROM: (not TO:)")


def unknown_mail_parameter_555(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("MAIL FROM:<> XPROBE=1"), (555,), "MAIL with a parameter nobody defined")


def null_reverse_path_accepted(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("MAIL FROM:<>"), (250,), "MAIL FROM:<> (the null reverse-path of bounces)")


# --- RSET, NOOP, QUIT, VRFY, EXPN, HELP (RFC 5321 §4.1.1.5-10) ---------------------------


def rset_clears_transaction(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("MAIL FROM:<>"), (250,), "MAIL")
    expect(client.smtp("RSET"), (250,), "RSET")
    expect(client.smtp("RCPT TO:<postmaster>"), (503,), "RCPT after RSET (no transaction left)")


def ehlo_clears_transaction(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("MAIL FROM:<>"), (250,), "MAIL")
    expect(client.smtp("EHLO probe.invalid"), (250,), "a second EHLO")
    expect(client.smtp("RCPT TO:<postmaster>"), (503,), "RCPT after EHLO (it resets like RSET)")


def noop_250(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("NOOP"), (250,), "NOOP")
    expect(client.smtp("NOOP any argument"), (250,), "NOOP with an argument")


def quit_221_and_close(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("QUIT"), (221,), "QUIT")
    fail_unless(client.closed_by_server(), "the server to close the connection", "it stayed open")


def vrfy_answers(p: Probe) -> None:
    client, _ = greeted(p)
    # §4.3.2: 250/251/252 succeed (252 "cannot verify", §3.5.3), 550/551/553
    # refuse, 502/504 not implemented.
    expect(client.smtp(f"VRFY {p.target.rcpt or 'postmaster'}"), (250, 251, 252, 502, 504, 550, 551, 553),
           "VRFY")
    in_step(client)


def expn_answers(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("EXPN postmaster"), (250, 252, 500, 502, 504, 550), "EXPN")  # §4.3.2
    in_step(client)


def help_answers(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("HELP"), (211, 214, 502, 504), "HELP")  # §4.3.2
    in_step(client)


# --- recipients: relay, postmaster, limits (RFC 5321 §3.6, §4.5.1, §4.5.3.1) ---------------


def relay_refused(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("MAIL FROM:<probe@probe.invalid>"), (250,), "MAIL")
    reply = client.smtp(f"RCPT TO:<{FOREIGN_ADDRESS}>")
    fail_unless(reply.code >= 400, f"a refusal (4xx/5xx) to RCPT for a foreign domain ({FOREIGN_ADDRESS})",
                reply)


def postmaster_accepted(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("MAIL FROM:<>"), (250,), "MAIL")
    expect(client.smtp("RCPT TO:<postmaster>"), (250, 251), "RCPT TO:<postmaster> (no domain)")


def postmaster_at_domain_accepted(p: Probe) -> None:
    _, at, domain = p.target.rcpt.rpartition("@")
    if not (at and domain):
        raise Skipped("--rcpt has no domain")
    client, _ = greeted(p)
    expect(client.smtp("MAIL FROM:<>"), (250,), "MAIL")
    expect(client.smtp(f"RCPT TO:<postmaster@{domain}>"), (250, 251), f"RCPT TO:<postmaster@{domain}>")


def command_line_over_512_refused(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp(OVERLONG_COMMAND), (500, 501), f"a {len(OVERLONG_COMMAND) + 2}-octet command line")
    in_step(client)


def recipients_100_accepted(p: Probe) -> None:
    client, _ = greeted(p)
    expect(client.smtp("MAIL FROM:<>"), (250,), "MAIL")
    for number in range(1, RECIPIENTS_MINIMUM + 1):
        expect(client.smtp(f"RCPT TO:<{p.target.rcpt}>"), (250, 251), f"RCPT number {number}")
    expect(client.smtp("RSET"), (250,), "RSET")


# --- DATA and what is stored (RFC 5321 §4.1.1.4, §4.5.2) ----------------------------------


def data_delivers(p: Probe) -> None:
    client, _ = greeted(p)
    expect(p.smtp_send(p.message(), client), (250,), "the text ended by <CRLF>.<CRLF>")


def delivery_round_trip(p: Probe) -> None:
    message = p.message((b"line one", b"line two"))
    client, _ = greeted(p)
    expect(p.smtp_send(message, client), (250,), "the end of the text")
    body = stored_body(p, message)
    fail_unless(body[-2:] == [b"line one", b"line two"], "the body as sent", body[-2:])


def dot_stuffing_round_trip(p: Probe) -> None:
    message = p.message(DOTTED_BODY)
    client, _ = greeted(p)
    expect(p.smtp_send(message, client), (250,), "the end of the text")
    body = stored_body(p, message)
    fail_unless(body[-len(DOTTED_BODY):] == list(DOTTED_BODY),
                "lines starting with '.' stored with the stuffed '.' removed", body[-len(DOTTED_BODY):])


def _smuggling(sequence: bytes):
    """A check that puts ``before{sequence}NOOP smuggled`` inside the text."""

    def run(p: Probe) -> None:
        client, _ = greeted(p)
        message = p.message()
        p.sent.append(message)  # clean-up deletes it if it is stored
        begin_data(client, p)
        smuggled = b"before" + sequence + b"NOOP smuggled\r\nafter\r\n.\r\n"
        # One transcript line, its line ends escaped: split at each, the bare
        # sequence the check is about would not show.
        client.send(message.text + smuggled, shown=f"(the message text, then) {shown(smuggled.decode('ascii'))}")
        ended = expect(client.smtp_reply(), range(200, 600), "the end of the text")
        # A server that stopped reading text at the bare sequence has more to say:
        # the smuggled NOOP's 250, then 500s for the lines after it.
        replies = []
        try:
            client.send_line("QUIT")
            while len(replies) < MAX_REPLIES_AFTER_TEXT:
                replies.append(client.smtp_reply())
                if replies[-1].code == 221:
                    break
        except (ConnectionClosed, OSError):
            if not replies and ended.code >= 400:
                # It refused the text and hung up (Postfix's 521 to a bare
                # LF, say): nothing inside the text ran. The safest answer.
                return
        codes = " ".join(str(reply.code) for reply in replies)
        came_back = f"{codes} (a command inside the text was run)" if replies else "the connection closed"
        fail_unless(codes == "221", f"only 221 to QUIT: {sequence!r} must not end the text", came_back)

    return run


def pipelining_in_order(p: Probe) -> None:
    client, extensions = greeted(p)
    offered(extensions, "PIPELINING")
    commands = ["MAIL FROM:<>", "RCPT TO:<postmaster>", f"RCPT TO:<{FOREIGN_ADDRESS}>", "RSET", "NOOP"]
    client.send(b"".join(command.encode() + b"\r\n" for command in commands))  # one write: a group
    codes = [client.smtp_reply().code for _ in commands]
    shape = [code // 100 for code in codes]
    if shape == [2, 2, 2, 2, 2]:
        # The refusal marks the order; an open relay (its own check fails)
        # gives none, and five 250s say nothing of which reply was which.
        raise Skipped(f"RCPT TO:<{FOREIGN_ADDRESS}> was accepted: no refusal to tell the order by")
    fail_unless(shape[:2] == [2, 2] and shape[2] in (4, 5) and codes[3:] == [250, 250],
                "replies in order: 250 250 4xx/5xx 250 250", " ".join(map(str, codes)))


def _size_limit(extensions: dict[str, str]) -> int | None:
    """The fixed limit SIZE offers, or None (RFC 1870 §3 item 3: 0 means no fixed one; §7: nor does none)."""
    limit = offered(extensions, "SIZE").strip()
    return int(limit) if is_decimal(limit) and int(limit) > 0 else None


def size_refused_at_mail(p: Probe) -> None:
    client, extensions = greeted(p)
    limit = _size_limit(extensions)
    if limit is None:
        raise Skipped("SIZE is advertised without a fixed limit")
    expect(client.smtp(f"MAIL FROM:<> SIZE={limit + 1}"), (552,), f"MAIL with SIZE over {limit}")


def size_within_limit_accepted(p: Probe) -> None:
    client, extensions = greeted(p)
    limit = _size_limit(extensions)
    size = 1000 if limit is None else min(1000, limit)  # within the limit, however small
    expect(client.smtp(f"MAIL FROM:<> SIZE={size}"), (250,), f"MAIL FROM:<> SIZE={size}")


def eight_bit_mime_accepted(p: Probe) -> None:
    client, extensions = greeted(p)
    offered(extensions, "8BITMIME")
    expect(client.smtp("MAIL FROM:<> BODY=8BITMIME"), (250,), "MAIL FROM:<> BODY=8BITMIME")


def eight_bit_round_trip(p: Probe) -> None:
    client, extensions = greeted(p)
    offered(extensions, "8BITMIME")
    message = p.message(EIGHT_BIT_BODY)
    expect(p.smtp_send(message, client, "BODY=8BITMIME"), (250,), "the end of the 8-bit text")
    body = stored_body(p, message)
    fail_unless(body[-1:] == list(EIGHT_BIT_BODY), "the 8-bit octets stored unchanged", body[-1:])


def smtputf8_accepted(p: Probe) -> None:
    client, extensions = greeted(p)
    offered(extensions, "SMTPUTF8")
    expect(client.smtp("MAIL FROM:<prøbe@probe.invalid> SMTPUTF8"), (250,),
           "MAIL with a UTF-8 reverse-path and SMTPUTF8")


def enhanced_status_codes(p: Probe) -> None:
    client, extensions = greeted(p)
    offered(extensions, "ENHANCEDSTATUSCODES")
    for command in ("MAIL FROM:<>", "RSET", "NOOP", "XPROBE"):
        reply = client.smtp(command)
        fail_unless(reply.enhanced is not None and reply.enhanced[0] == str(reply.code)[0],
                    f"an enhanced code of class {str(reply.code)[0]} in the reply to {command}", reply)


def idle_five_minutes_allowed(p: Probe) -> None:
    client, _ = greeted(p)
    time.sleep(SERVER_TIMEOUT_MINIMUM_SECONDS - IDLE_MARGIN_SECONDS)
    expect(client.smtp("NOOP"), (250,), f"NOOP after {SERVER_TIMEOUT_MINIMUM_SECONDS - IDLE_MARGIN_SECONDS} s idle")


# --- The catalogue ---------------------------------------------------------------------

RCPT = ("rcpt",)
MAIL = ("rcpt", "mail")
SMUGGLING = "RFC 5321 §4.1.1.4, §2.3.8"

SMTP_CHECKS = [
    Check("smtp.greeting-220", "RFC 5321 §3.1, §4.2", "the greeting is 220", greeting_220),
    Check("smtp.ehlo-250", "RFC 5321 §4.1.1.1", "EHLO gets 250", ehlo_250),
    Check("smtp.ehlo-multiline-format", "RFC 5321 §4.2.1", "EHLO's lines are 250- … then 250 ",
          ehlo_multiline_format),
    Check("smtp.helo-250", "RFC 5321 §4.1.1.1", "HELO gets 250", helo_250),
    Check("smtp.helo-without-domain-501", "RFC 5321 §4.1.1.1", "HELO without a domain gets 501",
          helo_without_domain_501),
    Check("smtp.verbs-case-insensitive", "RFC 5321 §2.4", "verbs are case-insensitive", verbs_case_insensitive),
    Check("smtp.mail-before-ehlo-503", "RFC 5321 §4.1.4", "MAIL before EHLO/HELO gets 503",
          mail_before_ehlo_503),
    Check("smtp.rcpt-before-mail-503", "RFC 5321 §4.1.4", "RCPT before MAIL gets 503", rcpt_before_mail_503),
    Check("smtp.data-before-mail-503", "RFC 5321 §4.1.4, §3.3", "DATA before MAIL gets 503 (or 554)",
          data_before_mail_503),
    Check("smtp.data-without-recipients-refused", "RFC 5321 §3.3", "DATA with no recipient gets 503/554",
          data_without_recipients_refused),
    Check("smtp.nested-mail-503", "RFC 5321 §4.1.4", "a second MAIL in a transaction gets 503", nested_mail_503),
    Check("smtp.unknown-command-500", "RFC 5321 §4.2.4", "an unknown command gets 500", unknown_command_500),
    Check("smtp.mail-syntax-501", "RFC 5321 §4.1.1.2", "MAIL with bad syntax gets 501", mail_syntax_501),
    Check("smtp.rcpt-syntax-501", "RFC 5321 §4.1.1.3", "RCPT with bad syntax gets 501", rcpt_syntax_501),
    Check("smtp.unknown-mail-parameter-555", "RFC 5321 §4.1.1.11", "an unknown MAIL parameter gets 555",
          unknown_mail_parameter_555),
    Check("smtp.null-reverse-path-accepted", "RFC 5321 §4.1.2, §6.1", "MAIL FROM:<> is accepted",
          null_reverse_path_accepted),
    Check("smtp.rset-clears-transaction", "RFC 5321 §4.1.1.5", "RSET ends the transaction",
          rset_clears_transaction),
    Check("smtp.ehlo-clears-transaction", "RFC 5321 §4.1.4", "EHLO mid-transaction resets it",
          ehlo_clears_transaction),
    Check("smtp.noop-250", "RFC 5321 §4.1.1.9", "NOOP, with or without argument, gets 250", noop_250),
    Check("smtp.quit-221-and-close", "RFC 5321 §4.1.1.10", "QUIT gets 221, then the server closes",
          quit_221_and_close),
    Check("smtp.vrfy-answers", "RFC 5321 §3.5, §4.3.2", "VRFY gets 25x/50x/55x and the session goes on",
          vrfy_answers),
    Check("smtp.expn-answers", "RFC 5321 §4.1.1.7, §4.3.2", "EXPN gets 25x/50x/550 and the session goes on",
          expn_answers),
    Check("smtp.help-answers", "RFC 5321 §4.1.1.8, §4.3.2", "HELP gets 211/214/502/504", help_answers),
    Check("smtp.relay-refused", "RFC 5321 §3.6.1", "mail for a foreign domain is refused (policy)", relay_refused),
    Check("smtp.postmaster-accepted", "RFC 5321 §4.5.1", "RCPT TO:<postmaster> is accepted",
          postmaster_accepted),
    Check("smtp.postmaster-at-domain-accepted", "RFC 5321 §4.5.1", "postmaster@ the --rcpt domain is accepted",
          postmaster_at_domain_accepted, RCPT),
    Check("smtp.command-line-over-512-refused", "RFC 5321 §4.5.3.1.4", "a command over 512 octets gets 500 or 501 (strict)",
          command_line_over_512_refused),
    Check("smtp.recipients-100-accepted", "RFC 5321 §4.5.3.1.8", "100 recipients are accepted",
          recipients_100_accepted, RCPT),
    Check("smtp.data-delivers", "RFC 5321 §4.1.1.4", "DATA gets 354, the final dot 250", data_delivers, RCPT),
    Check("smtp.delivery-round-trip", "RFC 5321 §4.1.1.4", "the message reaches the maildrop intact",
          delivery_round_trip, MAIL),
    Check("smtp.dot-stuffing-round-trip", "RFC 5321 §4.5.2", "a stuffed leading dot is removed before storing",
          dot_stuffing_round_trip, MAIL),
    Check("smtp.smuggling-lf-dot-lf", SMUGGLING, "<LF>.<LF> does not end the text",
          _smuggling(b"\n.\n"), RCPT),
    Check("smtp.smuggling-lf-dot-crlf", SMUGGLING, "<LF>.<CRLF> does not end the text",
          _smuggling(b"\n.\r\n"), RCPT),
    Check("smtp.smuggling-crlf-dot-lf", SMUGGLING, "<CRLF>.<LF> does not end the text",
          _smuggling(b"\r\n.\n"), RCPT),
    Check("smtp.smuggling-cr-dot-cr", SMUGGLING, "<CR>.<CR> does not end the text",
          _smuggling(b"\r.\r"), RCPT),
    Check("smtp.smuggling-cr-dot-crlf", SMUGGLING, "<CR>.<CRLF> does not end the text",
          _smuggling(b"\r.\r\n"), RCPT),
    Check("smtp.pipelining-in-order", "RFC 2920 §3", "a pipelined group is answered in order",
          pipelining_in_order),
    Check("smtp.size-refused-at-mail", "RFC 1870 §6", "MAIL with SIZE over the limit gets 552",
          size_refused_at_mail),
    Check("smtp.size-within-limit-accepted", "RFC 1870 §6", "MAIL with a small SIZE gets 250",
          size_within_limit_accepted),
    Check("smtp.8bitmime-accepted", "RFC 6152 §2", "MAIL with BODY=8BITMIME gets 250", eight_bit_mime_accepted),
    Check("smtp.8bitmime-round-trip", "RFC 6152 §3", "8-bit text is stored unchanged", eight_bit_round_trip,
          MAIL),
    Check("smtp.smtputf8-accepted", "RFC 6531 §3.2", "a UTF-8 address with SMTPUTF8 is accepted",
          smtputf8_accepted),
    Check("smtp.enhanced-status-codes", "RFC 2034 §3, §4", "replies carry an enhanced code of the right class",
          enhanced_status_codes),
    Check("smtp.idle-5-minutes-allowed", "RFC 5321 §4.5.3.2.7", "an idle session lasts 5 minutes",
          idle_five_minutes_allowed, ("slow",)),
]
